"""`render_pytorchjob`: the paper's 128-GPU job as a kubeflow.org/v1 PyTorchJob plus its trainer ConfigMap."""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import pytest
import yaml

from mlstm_trainer.config import config_from_dict, config_to_dict
from mlstm_platform.chart import parse_objects, render_platform
from mlstm_platform.jobspec import JobSpec, JobSpecError, build_train_config
from mlstm_platform.pytorchjob import dump_objects, render_pytorchjob
from tests.conftest_k8s import validate_core, validate_object, validate_pytorchjob

SHAPES = [pytest.param(8, 16, id="16x8"), pytest.param(1, 128, id="128x1")]


def spec(**changes: Any) -> JobSpec:
    base = dict(name="paper", image="registry.example.com/mlstm-trainer:1", namespace="mlstm", data="s3://mlstm/reviews")
    return JobSpec(**{**base, **changes})


def render(trainer_args: tuple[str, ...] = (), **changes: Any) -> tuple[dict, dict]:
    job_spec = spec(**changes)
    config_map, job = render_pytorchjob(job_spec, build_train_config(job_spec, trainer_args))
    return config_map, job


def pod(job: dict, replica: str = "Master") -> dict:
    return job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]


def env(job: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod(job)["containers"][0]["env"]}


@pytest.mark.parametrize("per_pod, pods", SHAPES)
def test_both_shapes_validate(per_pod: int, pods: int) -> None:
    config_map, job = render(gpus_per_pod=per_pod)
    validate_core(config_map)
    model = validate_pytorchjob(job)
    assert model.spec.nproc_per_node == str(per_pod)


@pytest.mark.parametrize("per_pod, pods", SHAPES)
def test_one_master_plus_workers_make_128_gpus(per_pod: int, pods: int) -> None:
    _, job = render(gpus_per_pod=per_pod)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == pods - 1
    assert job["spec"]["nprocPerNode"] == str(per_pod)
    container = pod(job)["containers"][0]
    assert container["name"] == "pytorch" and container["command"] == ["torchrun"]
    assert container["args"][:2] == [f"--nnodes={pods}", f"--nproc-per-node={per_pod}"]
    assert container["args"][-4:] == ["-m", "mlstm_trainer", "--config", "/etc/mlstm/config.yaml"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == container["resources"]["requests"]["nvidia.com/gpu"] == str(per_pod)
    assert pods * int(gpus) == 128


def test_a_single_pod_job_has_no_workers() -> None:
    _, job = render(gpus=8, gpus_per_pod=8)
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}


@pytest.mark.parametrize("per_pod, pods", SHAPES)
def test_metrics_ports_per_local_rank_first_named_metrics(per_pod: int, pods: int) -> None:
    _, job = render(gpus_per_pod=per_pod)
    ports = {p["name"]: p["containerPort"] for p in pod(job)["containers"][0]["ports"]}
    assert ports.pop("pytorchjob-port") == 23456
    assert ports == {("metrics" if r == 0 else f"metrics-{r}"): 9400 + r for r in range(per_pod)}


def test_configmap_holds_the_trainer_config_of_the_paper_run() -> None:
    job_spec = spec()
    config = build_train_config(job_spec)
    config_map, job = render_pytorchjob(job_spec, config)
    text = config_map["data"]["config.yaml"]
    assert yaml.safe_load(text) == config_to_dict(config)
    loaded = config_from_dict(yaml.safe_load(text))
    assert (loaded.model.hidden_size, loaded.model.embed_dim, loaded.precision.mode) == (4096, 64, "fp16")
    assert (loaded.data.batch_size, loaded.data.seq_len, loaded.data.path) == (32768 // 128, 256, "s3://mlstm/reviews")
    assert (loaded.metrics.port, loaded.metrics.host, loaded.metrics.job) == (9400, "0.0.0.0", "paper")
    assert loaded.checkpoint.dir == "s3://mlstm/paper/checkpoints" and loaded.device == "cuda"
    volume = next(v for v in pod(job)["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"] == "paper-config"


def test_trainer_flags_override_the_paper_settings() -> None:
    config_map, _ = render(("--steps", "4800", "--lr", "5e-4", "--hidden-size", "1024"))
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert (config["optim"]["steps"], config["optim"]["lr"], config["model"]["hidden_size"]) == (4800, 5e-4, 1024)


def test_s3_credentials_come_only_from_the_platform_secret() -> None:
    _, job = render()
    variables = env(job)
    assert variables["MLSTM_S3_ENDPOINT"]["value"] == "http://mlstm-platform-minio.mlstm.svc:9000"
    for name, key in (("AWS_ACCESS_KEY_ID", "accessKey"), ("AWS_SECRET_ACCESS_KEY", "secretKey")):
        assert "value" not in variables[name]
        assert variables[name]["valueFrom"]["secretKeyRef"] == {"name": "mlstm-platform-minio", "key": key}


def test_no_s3_settings_when_the_job_never_touches_s3() -> None:
    _, job = render(("--checkpoint-dir", "/tmp/ckpt"), data="", cpu_only=True, gpus=2, gpus_per_pod=1, global_batch=8)
    assert not {"MLSTM_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env(job))


def test_cpu_only_jobs_ask_for_no_gpu() -> None:
    config_map, job = render(cpu_only=True, gpus=2, gpus_per_pod=1, global_batch=8)
    resources = pod(job)["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources["limits"] and "tolerations" not in pod(job)
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert (config["device"], config["precision"]["mode"]) == ("cpu", "fp32")


def test_gpu_toleration_shm_and_resources() -> None:
    _, job = render()
    spec_ = pod(job)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec_["tolerations"]
    shm = next(v for v in spec_["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    resources = spec_["containers"][0]["resources"]
    assert resources["requests"]["cpu"] == "32" and resources["requests"]["memory"] == resources["limits"]["memory"] == "256Gi"
    assert {"mountPath": "/dev/shm", "name": "dshm"} in spec_["containers"][0]["volumeMounts"]


def test_nccl_and_fail_fast_settings() -> None:
    _, job = render(nccl_socket_ifname="eth0", nccl_ib_hca="mlx5", heartbeat_timeout=120)
    values = {name: e.get("value") for name, e in env(job).items()}
    assert values["NCCL_DEBUG"] == "WARN" and values["NCCL_SOCKET_IFNAME"] == "eth0" and values["NCCL_IB_HCA"] == "mlx5"
    assert values["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and values["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "120"
    assert "--max-restarts=0" in pod(job)["containers"][0]["args"]
    _, plain = render()
    assert not {"NCCL_SOCKET_IFNAME", "NCCL_IB_HCA"} & set(env(plain))


def test_restricted_security_context_unless_rdma() -> None:
    _, job = render()
    security = pod(job)["containers"][0]["securityContext"]
    assert security == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}
    assert pod(job)["securityContext"]["runAsNonRoot"] is True
    assert pod(job)["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod(job)
    _, rdma = render(rdma=True, host_network=True, extra_resources={"rdma/hca_shared_devices_a": "1"})
    assert pod(rdma)["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert pod(rdma)["hostNetwork"] is True and pod(rdma)["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod(rdma)["containers"][0]["resources"]["limits"]["rdma/hca_shared_devices_a"] == "1"


def test_run_policy_and_restart_policy() -> None:
    _, job = render(restart_policy="ExitCode", backoff_limit=9, ttl_seconds_after_finished=60, clean_pod_policy="All")
    assert job["spec"]["runPolicy"] == {"backoffLimit": 9, "cleanPodPolicy": "All", "ttlSecondsAfterFinished": 60}
    assert {r["restartPolicy"] for r in job["spec"]["pytorchReplicaSpecs"].values()} == {"ExitCode"}
    _, default = render()
    assert default["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] == "OnFailure"
    assert default["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"


@pytest.mark.parametrize("changes, policy, label", [
    pytest.param({}, None, None, id="none"),
    pytest.param({"scheduler": "volcano", "queue": "gpu"}, {"minAvailable": 16, "queue": "gpu"}, None, id="volcano"),
    pytest.param({"scheduler": "volcano", "priority_class": "gang"}, {"minAvailable": 16, "priorityClass": "gang"}, None, id="volcano-priority"),
    pytest.param({"scheduler": "kueue", "queue": "team-a"}, None, "team-a", id="kueue"),
])
def test_gang_scheduling(changes: dict, policy: dict | None, label: str | None) -> None:
    _, job = render(**changes)
    assert job["spec"]["runPolicy"].get("schedulingPolicy") == policy
    assert job["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == label


def test_placement_options() -> None:
    affinity = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "paper"}}, "topologyKey": "kubernetes.io/hostname"}]}}
    _, job = render(node_selector={"nvidia.com/gpu.product": "Tesla-V100-SXM2-32GB"}, affinity=affinity, priority_class="gang")
    validate_object(job)
    assert pod(job)["nodeSelector"] == {"nvidia.com/gpu.product": "Tesla-V100-SXM2-32GB"}
    assert pod(job)["affinity"] == affinity and pod(job)["priorityClassName"] == "gang"


def test_app_labels_on_every_object_and_pod() -> None:
    config_map, job = render()
    for labels in (config_map["metadata"]["labels"], job["metadata"]["labels"],
                   job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/name"] == "mlstm-trainer" and labels["app.kubernetes.io/instance"] == "paper"
        assert labels["app.kubernetes.io/part-of"] == "mlstm-platform" and labels["app.kubernetes.io/managed-by"] == "mlstm"


def test_the_charts_podmonitor_secret_and_account_fit_the_job() -> None:
    platform = parse_objects(render_platform(namespace="mlstm"))
    _, job = render()
    monitor = next(o for o in platform if o["kind"] == "PodMonitor")
    labels = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    job_ports = {p["name"] for p in pod(job)["containers"][0]["ports"]} - {"pytorchjob-port"}
    assert job_ports <= {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    secret = next(o for o in platform if o["kind"] == "Secret")
    refs = [e["valueFrom"]["secretKeyRef"] for e in env(job).values() if "secretKeyRef" in e.get("valueFrom", {})]
    assert all(r["name"] == secret["metadata"]["name"] and r["key"] in secret["data"] for r in refs)
    accounts = {o["metadata"]["name"] for o in platform if o["kind"] == "ServiceAccount"}
    assert pod(job)["serviceAccountName"] in accounts


def test_pod_template_validation_catches_a_bad_field() -> None:
    _, job = render()
    bad = copy.deepcopy(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"])
    bad["spec"]["containers"][0]["ports"][0]["containerPort"] = "not-a-port"
    with pytest.raises(jsonschema.ValidationError):
        validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": bad})


def test_dump_round_trips() -> None:
    objects = list(render())
    assert parse_objects(dump_objects(objects)) == objects


@pytest.mark.parametrize("changes, words", [
    pytest.param({"gpus": 100}, "100 GPUs is not a multiple of 8 GPUs per pod", id="gpus-not-multiple"),
    pytest.param({"gpus": 0}, "--gpus must be at least 1", id="zero-gpus"),
    pytest.param({"gpus_per_pod": 0}, "--gpus-per-pod must be at least 1", id="zero-per-pod"),
    pytest.param({"global_batch": 1000}, "global batch 1000 is not a multiple of 128 GPUs", id="batch-not-multiple"),
    pytest.param({"name": "Paper_Run"}, "job name 'Paper_Run' must be lower-case", id="bad-name"),
    pytest.param({"name": "x" * 60}, "is too long", id="long-name"),
    pytest.param({"data": "http://example.com/x"}, "--data must be an s3://bucket/prefix URL", id="http-data"),
    pytest.param({"data": "relative/path"}, "--data must be an s3://bucket/prefix URL", id="relative-data"),
    pytest.param({"data": "s3:///prefix"}, "--data 's3:///prefix' names no bucket", id="s3-without-bucket"),
    pytest.param({"scheduler": "kueue"}, "--scheduler kueue needs --queue", id="kueue-without-queue"),
    pytest.param({"queue": "q"}, "--queue needs --scheduler kueue or --scheduler volcano", id="queue-without-scheduler"),
    pytest.param({"scheduler": "slurm"}, "--scheduler must be one of none, volcano, kueue", id="unknown-scheduler"),
    pytest.param({"restart_policy": "Always"}, "--restart-policy must be one of ExitCode, OnFailure", id="restart-policy"),
    pytest.param({"clean_pod_policy": "Some"}, "--clean-pod-policy must be one of", id="clean-pod-policy"),
    pytest.param({"memory": "lots"}, "--memory 'lots' is not a Kubernetes quantity", id="bad-memory"),
    pytest.param({"shm_size": "300Gi"}, "--shm-size 300Gi must be below --memory 256Gi", id="shm-over-memory"),
    pytest.param({"cpu_only": True, "rdma": True}, "--rdma needs GPUs", id="rdma-on-cpu"),
    pytest.param({"image": "has space"}, "is not an image reference", id="bad-image"),
    pytest.param({"affinity": {"nodeAfinity": {}}}, "--affinity has fields a core/v1 Affinity does not have", id="bad-affinity"),
])
def test_bad_combinations_fail_with_one_line(changes: dict, words: str) -> None:
    with pytest.raises(JobSpecError, match=re.escape(words)) as caught:
        spec(**changes)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("args, words", [
    pytest.param(["--batch-size", "8"], "--batch-size is set by the platform for a job; use --global-batch", id="batch-size"),
    pytest.param(["--metrics-port=9500"], "--metrics-port is set by the platform", id="metrics-port"),
    pytest.param(["--device", "cpu"], "use --cpu-only", id="device"),
    pytest.param(["--gpu", "8"], "--gpu is neither a job option", id="typo"),
    pytest.param(["--lr", "fast"], "optim.lr must be float, got 'fast' (from --lr)", id="bad-value"),
    pytest.param(["--steps"], "trainer flags: argument --steps: expected one argument", id="missing-value"),
])
def test_bad_trainer_flags_fail_with_one_line(args: list[str], words: str) -> None:
    with pytest.raises(JobSpecError, match=re.escape(words)):
        build_train_config(spec(), args)
