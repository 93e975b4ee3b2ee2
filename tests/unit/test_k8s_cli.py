"""The Kubernetes commands through typer's CliRunner: exit codes and the words a user sees.

Commands that reach a cluster are exercised end to end in tests/integration/test_jobs_kmock.py;
here they only meet missing or broken kubeconfigs and bad options, which must fail before any request.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlstm_platform.chart import parse_objects
from mlstm_platform.cli import app
from tests.conftest_k8s import write_kubeconfig

JOB = ["render", "job", "--name", "paper", "--image", "registry.example.com/mlstm-trainer:1", "--data", "s3://mlstm/reviews"]


def mlstm(*args: str, env: dict[str, str] | None = None) -> object:
    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture(autouse=True)
def no_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No cluster configuration unless a test writes one."""
    path = tmp_path / "missing-kubeconfig"
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return path


@pytest.mark.parametrize("command", [["render", "platform"], ["render", "job"], ["submit"], ["status"], ["logs"],
                                     ["delete"], ["list"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = mlstm(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_render_platform_prints_the_chart() -> None:
    result = mlstm("render", "platform", "-n", "mlstm")
    assert result.exit_code == 0, result.output
    kinds = {o["kind"] for o in parse_objects(result.stdout)}
    assert {"StatefulSet", "Secret", "PodMonitor", "Job"} <= kinds


def test_render_platform_takes_set_and_values_files(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("priorityClass:\n  create: true\n")
    result = mlstm("render", "platform", "-f", str(values), "--set", "podMonitor.enabled=false", "--release", "lab")
    assert result.exit_code == 0, result.output
    objects = parse_objects(result.stdout)
    assert "PodMonitor" not in {o["kind"] for o in objects} and "PriorityClass" in {o["kind"] for o in objects}
    assert any(o["metadata"]["name"] == "lab-mlstm-platform-minio" for o in objects)


@pytest.mark.parametrize("args, words", [
    pytest.param(["--set", "bogus=1"], "additional properties 'bogus' not allowed", id="unknown-key"),
    pytest.param(["--set", "a=1,,=x="], "is not a Helm --set expression", id="bad-set"),
    pytest.param(["-f", "/nonexistent/values.yaml"], "values file /nonexistent/values.yaml cannot be read", id="missing-file"),
    pytest.param(["--release", "Bad_Release"], "invalid release name", id="bad-release"),
])
def test_render_platform_bad_input_is_one_line_and_exit_2(args: list[str], words: str) -> None:
    result = mlstm("render", "platform", *args)
    assert result.exit_code == 2
    assert result.stdout == "" and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, pods", [pytest.param([], 16, id="16x8"), pytest.param(["--gpus-per-pod", "1"], 128, id="128x1")])
def test_render_job_prints_configmap_and_pytorchjob(args: list[str], pods: int) -> None:
    result = mlstm(*JOB, *args, "--steps", "4800", "-n", "mlstm")
    assert result.exit_code == 0, result.output
    config_map, job = parse_objects(result.stdout)
    assert (config_map["kind"], job["kind"], job["apiVersion"]) == ("ConfigMap", "PyTorchJob", "kubeflow.org/v1")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] + replicas["Worker"]["replicas"] == pods
    assert job["metadata"]["namespace"] == "mlstm" and "steps: 4800" in config_map["data"]["config.yaml"]


def test_render_job_queue_alone_means_kueue() -> None:
    result = mlstm(*JOB, "--queue", "team-a")
    assert result.exit_code == 0, result.output
    assert parse_objects(result.stdout)[1]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_render_job_reads_affinity_and_node_selectors(tmp_path: Path) -> None:
    affinity = tmp_path / "affinity.yaml"
    affinity.write_text("affinity:\n  nodeAffinity:\n    requiredDuringSchedulingIgnoredDuringExecution:\n"
                        "      nodeSelectorTerms:\n      - matchExpressions:\n        - {key: zone, operator: In, values: [a]}\n")
    result = mlstm(*JOB, "--affinity", str(affinity), "--node-selector", "pool=v100", "--node-selector", "ib=yes")
    assert result.exit_code == 0, result.output
    pod = parse_objects(result.stdout)[1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "v100", "ib": "yes"}
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]


def test_render_job_never_prints_a_credential() -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    result = mlstm(*JOB, env={"AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE12345",
                              "MLSTM_S3_ENDPOINT": "http://user:pass@minio:9000"})
    assert result.exit_code == 0
    assert secret not in result.output and "AKIAEXAMPLE12345" not in result.output and "user:pass" not in result.output


@pytest.mark.parametrize("args, words", [
    pytest.param(["--gpus", "100"], "100 GPUs is not a multiple of 8 GPUs per pod", id="gpus-per-pod"),
    pytest.param(["--gpus", "96", "--gpus-per-pod", "8"], "global batch 32768 is not a multiple of 96 GPUs", id="batch"),
    pytest.param(["--scheduler", "kueue"], "--scheduler kueue needs --queue", id="kueue"),
    pytest.param(["--gpu", "8"], "--gpu is neither a job option", id="typo"),
    pytest.param(["--batch-size", "8"], "use --global-batch", id="platform-owned"),
    pytest.param(["--node-selector", "novalue"], "--node-selector 'novalue' must look like KEY=VALUE", id="selector"),
    pytest.param(["--affinity", "/nonexistent.yaml"], "--affinity /nonexistent.yaml cannot be read", id="affinity-file"),
    pytest.param(["--shm-size", "1Ti"], "--shm-size 1Ti must be below --memory 256Gi", id="shm"),
])
def test_render_job_bad_input_is_one_line_and_exit_2(args: list[str], words: str) -> None:
    result = mlstm(*JOB, *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_render_job_needs_name_and_image() -> None:
    result = mlstm("render", "job", "--name", "paper")
    assert result.exit_code == 2 and "--image" in result.output


def test_submit_rejects_bad_options_before_reading_a_kubeconfig() -> None:
    result = mlstm("submit", "--name", "paper", "--image", "i:1", "--gpus", "100")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: 100 GPUs is not a multiple of 8 GPUs per pod"


@pytest.mark.parametrize("command", [["submit", "--name", "paper", "--image", "i:1"], ["status", "paper"],
                                     ["logs", "paper"], ["delete", "paper"], ["list"]])
def test_cluster_commands_without_kubeconfig_say_what_to_set(command: list[str], no_kubeconfig: Path) -> None:
    result = mlstm(*command)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: no kubeconfig at {no_kubeconfig}; set KUBECONFIG or pass --kubeconfig"


def test_unknown_context_is_one_line(tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9")
    result = mlstm("list", "--kubeconfig", str(kubeconfig), "--context", "prod")
    assert result.exit_code == 2
    assert "context 'prod' is not in your kubeconfig" in result.stderr
