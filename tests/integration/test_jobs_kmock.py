"""`mlstm submit/status/logs/delete/list` end to end over HTTP against kmock's stateful Kubernetes API.

No real Kubernetes API server can run in CI here, so these tests run the real CLI (typer's
CliRunner) and the real kubernetes client and TrainingClient against kmock's emulator on loopback,
reached through a kubeconfig the test writes; no function is patched. `FakeOperator` plays the
training operator's part (pods and job status). See tests/conftest_k8s.py.
"""

from __future__ import annotations

from pathlib import Path

import kmock
import pytest
import yaml
from typer.testing import CliRunner

from mlstm_platform.cli import app
from tests.conftest_k8s import (PYTORCHJOBS, FakeOperator, K8sApi, k8s_api, k8s_api_without_operator,  # noqa: F401
                                kubeconfig, write_kubeconfig)

IMAGE = "registry.example.com/mlstm-trainer:test"
METRICS = """\
# HELP mlstm_tokens_total Characters (bytes) trained on by this rank.
# TYPE mlstm_tokens_total counter
mlstm_tokens_total{job="paper",rank="0",node="n0"} 4.0e+08
# HELP mlstm_step_duration_seconds Wall time of one optimizer step.
# TYPE mlstm_step_duration_seconds histogram
mlstm_step_duration_seconds_bucket{job="paper",rank="0",node="n0",le="+Inf"} 1000.0
mlstm_step_duration_seconds_count{job="paper",rank="0",node="n0"} 1000.0
mlstm_step_duration_seconds_sum{job="paper",rank="0",node="n0"} 2000.0
# HELP mlstm_step Optimizer steps done.
# TYPE mlstm_step gauge
mlstm_step{job="paper",rank="0",node="n0"} 1000.0
# HELP mlstm_run_progress_ratio Fraction of the planned training done.
# TYPE mlstm_run_progress_ratio gauge
mlstm_run_progress_ratio{job="paper",rank="0",node="n0"} 0.25
# HELP mlstm_eta_seconds Estimated time left at the current rate.
# TYPE mlstm_eta_seconds gauge
mlstm_eta_seconds{job="paper",rank="0",node="n0"} 10800.0
# HELP mlstm_build_info Constant 1, labelled with the run's version and shape.
# TYPE mlstm_build_info gauge
mlstm_build_info{job="paper",rank="0",node="n0",version="0.1.0",precision="fp16",hidden_size="4096",world_size="128"} 1.0
"""


def mlstm(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def submit(name: str = "paper", *extra: str) -> object:
    return mlstm("submit", "--name", name, "--image", IMAGE, "--data", "s3://mlstm/reviews", *extra)


def serve_logs_and_metrics(api: K8sApi) -> None:
    """Pod logs say which pod they come from; rank 0's metrics come through the pod proxy."""
    def register(emulator: object) -> None:
        emulator["get", kmock.resource("v1/pods"), kmock.subresource("log")] << (
            lambda request: f"training log of {request.name}\nstep 1 loss 5.5\n".encode())
        emulator["get", kmock.resource("v1/pods"), kmock.subresource("proxy/metrics")] << METRICS.encode()
    api.react(register)


def test_submit_creates_configmap_and_job_in_the_context_namespace(k8s_api: K8sApi, kubeconfig: Path) -> None:
    result = submit("paper", "--steps", "4800")
    assert result.exit_code == 0, result.output
    assert "created PyTorchJob paper in namespace team: 16 pods x 8 GPUs = 128" in result.output
    job = k8s_api.get(PYTORCHJOBS, "team", "paper")
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 15
    config_map = k8s_api.get("v1/configmaps", "team", "paper-config")
    assert yaml.safe_load(config_map["data"]["config.yaml"])["optim"]["steps"] == 4800
    # The job owns its ConfigMap, so Kubernetes removes it with the job.
    owner = config_map["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("PyTorchJob", "paper", job["metadata"]["uid"])


def test_namespace_flag_wins_over_the_context(k8s_api: K8sApi, kubeconfig: Path) -> None:
    assert submit("paper", "-n", "other").exit_code == 0
    assert k8s_api.get(PYTORCHJOBS, "other", "paper") is not None
    assert k8s_api.get(PYTORCHJOBS, "team", "paper") is None


def test_submit_without_training_operator_says_how_to_install_it(k8s_api_without_operator: K8sApi, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kc", k8s_api_without_operator.url)))
    result = submit()
    assert result.exit_code == 1
    assert "install the Kubeflow training operator" in result.output and "kubectl apply" in result.output
    assert k8s_api_without_operator.get("v1/configmaps", "default", "paper-config") is None


def test_submitting_the_same_name_twice_is_refused(k8s_api: K8sApi, kubeconfig: Path) -> None:
    assert submit().exit_code == 0
    again = submit()
    assert again.exit_code == 1
    assert "paper already exists in namespace team" in again.output
    assert k8s_api.get(PYTORCHJOBS, "team", "paper") is not None


def test_status_shows_conditions_replicas_and_rank0_progress(k8s_api: K8sApi, kubeconfig: Path) -> None:
    assert submit().exit_code == 0
    FakeOperator(k8s_api, "team").start("paper")
    serve_logs_and_metrics(k8s_api)
    result = mlstm("status", "paper")
    assert result.exit_code == 0, result.output
    assert "PyTorchJob paper in team: Running (16 pods x 8 ranks = 128)" in result.output
    assert "Master  1 desired, 1 active" in result.output and "Worker  15 desired, 15 active" in result.output
    assert "pods: 16 Running" in result.output
    # 4e8 characters in 2000 s of steps on rank 0, times 128 ranks; the trainer's own ETA.
    assert "progress (rank 0): step 1000, 25.60M tokens/s, 25.0% done, ETA 3h 00m" in result.output


def test_status_without_reachable_metrics_still_reports_the_job(k8s_api: K8sApi, kubeconfig: Path) -> None:
    assert submit().exit_code == 0
    FakeOperator(k8s_api, "team").start("paper", phase="Pending", state="Created")
    result = mlstm("status", "paper")
    assert result.exit_code == 0, result.output
    assert "Created" in result.output and "metrics: paper-master-0 is not running" in result.output


@pytest.mark.parametrize("rank, pod", [pytest.param("0", "paper-master-0", id="rank0-master"),
                                       pytest.param("9", "paper-worker-0", id="rank9-second-pod"),
                                       pytest.param("127", "paper-worker-14", id="last-rank")])
def test_logs_come_from_the_pod_that_runs_the_rank(k8s_api: K8sApi, kubeconfig: Path, rank: str, pod: str) -> None:
    assert submit().exit_code == 0
    FakeOperator(k8s_api, "team").start("paper")
    serve_logs_and_metrics(k8s_api)
    result = mlstm("logs", "paper", "--rank", rank)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"training log of {pod}\n")


def test_logs_follow_streams_the_master(k8s_api: K8sApi, kubeconfig: Path) -> None:
    assert submit().exit_code == 0
    FakeOperator(k8s_api, "team").start("paper")
    serve_logs_and_metrics(k8s_api)
    result = mlstm("logs", "paper", "--follow")
    assert result.exit_code == 0, result.output
    assert "training log of paper-master-0\nstep 1 loss 5.5\n" == result.output
    follow = [r for r in k8s_api.call(lambda: list(k8s_api.emulator)) if r.subresource == "log"]
    assert follow[-1].params.get("follow", "").lower() == "true"


@pytest.mark.parametrize("args, words", [
    pytest.param(["--rank", "128"], "rank 128 is out of range: job paper has 128 ranks (0..127)", id="rank-out-of-range"),
    pytest.param(["--rank", "-1"], "rank -1 is out of range", id="negative-rank"),
])
def test_logs_reject_ranks_the_job_does_not_have(k8s_api: K8sApi, kubeconfig: Path, args: list[str], words: str) -> None:
    assert submit().exit_code == 0
    FakeOperator(k8s_api, "team").start("paper")
    result = mlstm("logs", "paper", *args)
    assert result.exit_code == 1 and words in result.output


def test_logs_of_a_pending_pod_say_why_there_are_none(k8s_api: K8sApi, kubeconfig: Path) -> None:
    assert submit().exit_code == 0
    FakeOperator(k8s_api, "team").start("paper", phase="Pending", state="Created")
    result = mlstm("logs", "paper")
    assert result.exit_code == 1 and "pod paper-master-0 is Pending" in result.output


def test_list_and_delete(k8s_api: K8sApi, kubeconfig: Path) -> None:
    assert submit("paper").exit_code == 0
    assert submit("smoke", "--gpus", "2", "--gpus-per-pod", "1", "--cpu-only", "--global-batch", "8").exit_code == 0
    FakeOperator(k8s_api, "team").start("paper")
    listing = mlstm("list")
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "PODS", "GPUS", "AGE"]
    assert lines[1].split()[:4] == ["paper", "Running", "16", "128"]
    assert lines[2].split()[:4] == ["smoke", "Pending", "2", "2"]
    deleted = mlstm("delete", "paper")
    assert deleted.exit_code == 0 and "deleted PyTorchJob paper" in deleted.output
    assert k8s_api.get(PYTORCHJOBS, "team", "paper") is None
    assert k8s_api.get("v1/configmaps", "team", "paper-config") is None
    assert [line.split()[0] for line in mlstm("list").output.splitlines()[1:]] == ["smoke"]


def test_empty_namespace_lists_nothing(k8s_api: K8sApi, kubeconfig: Path) -> None:
    result = mlstm("list", "-n", "empty")
    assert result.exit_code == 0 and "no PyTorchJobs in namespace empty" in result.output


@pytest.mark.parametrize("command", [["status", "ghost"], ["logs", "ghost"], ["delete", "ghost"]])
def test_unknown_job_is_one_clear_line(k8s_api: K8sApi, kubeconfig: Path, command: list[str]) -> None:
    result = mlstm(*command)
    assert result.exit_code == 1
    assert result.output.strip() == "error: PyTorchJob ghost not found in namespace team (mlstm list -n team shows its jobs)"


def test_forbidden_is_one_clear_line(k8s_api: K8sApi, kubeconfig: Path) -> None:
    message = 'pytorchjobs.kubeflow.org is forbidden: User "tester" cannot list resource "pytorchjobs" in namespace "locked"'
    k8s_api.react(lambda emulator: emulator["get", kmock.resource(PYTORCHJOBS), kmock.namespace("locked")] << 403 << {
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": message})
    result = mlstm("list", "-n", "locked")
    assert result.exit_code == 1
    assert result.output.strip() == f"error: forbidden to list PyTorchJobs in namespace locked: {message}"


def test_unreachable_api_server_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9")))
    result = mlstm("list")
    assert result.exit_code == 1
    assert result.output.startswith("error: cannot reach the Kubernetes API at http://127.0.0.1:9")
    assert len(result.output.strip().splitlines()) == 1


def test_no_credential_reaches_the_api_server_or_the_output(k8s_api: K8sApi, kubeconfig: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = ["AKIAEXAMPLEACCESS123", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", secrets[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets[1])
    outputs = [submit().output]
    FakeOperator(k8s_api, "team").start("paper")
    serve_logs_and_metrics(k8s_api)
    outputs += [mlstm(*cmd).output for cmd in (["status", "paper"], ["logs", "paper"], ["list"])]
    sent = b"".join(k8s_api.request_bodies()).decode()
    for secret in secrets:
        assert secret not in sent and not any(secret in out for out in outputs)
    job_env = k8s_api.get(PYTORCHJOBS, "team", "paper")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    keys = {e["name"]: e for e in job_env if e["name"].startswith("AWS_")}
    assert all("value" not in e and "secretKeyRef" in e["valueFrom"] for e in keys.values())
