"""What one training job asks of the cluster, checked where it is built, and the trainer config it runs.

A JobSpec holds the platform's side (shape, image, scheduling, networking); the trainer's side is a
`TrainConfig` built from the paper's settings, the job's shape and any trainer flags the user adds.
Every check fails with one line that names the option, before anything is rendered or sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NoReturn

from kubeflow.training import models
from kubeflow.training.api_client import ApiClient
from kubernetes.utils import parse_quantity

from mlstm_trainer.config import ConfigError, TrainConfig, coerce, config_from_dict, field_type, set_dotted
from mlstm_trainer.options import FLAGS, build_parser

from .constants import (CLEAN_POD_POLICIES, DEFAULT_BUCKET, DEFAULT_PLATFORM_RELEASE, DNS_LABEL_MAX,
                        METRICS_PORT, RESTART_POLICIES, SCHEDULERS)
from .platform_refs import PlatformRefs

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# The 2018 run: 4096-unit mLSTM, 64-wide byte embedding, fp16, 256-character truncated BPTT.
PAPER_MODEL = {"hidden_size": 4096, "embed_dim": 64}
PAPER_SEQ_LEN = 256
PAPER_GLOBAL_BATCH = 32768
# Three epochs of 40 GB at 32768 x 256 characters per step; checkpoints every ~10 minutes of that run.
PAPER_STEPS = -(-3 * 40 * 10**9 // (PAPER_GLOBAL_BATCH * PAPER_SEQ_LEN))
PAPER_OPTIM = {"steps": PAPER_STEPS, "lr": 5e-4, "lr_scaling": "sqrt", "lr_cap": 3e-3, "warmup_steps": 200}
PAPER_CHECKPOINT_EVERY = 500
# Per GPU (or per process with --cpu-only): CPU cores, memory, shared memory.
GPU_POD_SHARE = (4, 32, 2)
CPU_POD_SHARE = (1, 2, 1)
# Trainer flags the platform decides, and what to use instead.
PLATFORM_FLAGS = {
    "--batch-size": "--global-batch (the per-rank batch is global batch / GPUs)",
    "--metrics-port": "nothing (pods serve metrics on 9400 + local rank)",
    "--metrics-host": "nothing (pods serve metrics on 0.0.0.0)",
    "--job-name": "--name",
    "--device": "--cpu-only",
    "--config": "trainer flags after the job options",
}


class JobSpecError(ValueError):
    """A job option or combination is invalid; the message is one line naming the option."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise JobSpecError(message)


def _quantity(value: str, option: str) -> Decimal:
    try:
        return parse_quantity(value)
    except (ValueError, TypeError):
        raise JobSpecError(f"{option} {value!r} is not a Kubernetes quantity (e.g. 32, 500m, 64Gi)") from None


class JsonPayload:
    """What ApiClient.deserialize reads: a response with JSON in `.data`."""

    def __init__(self, obj: Any) -> None:
        self.data = json.dumps(obj)


def parse_affinity(affinity: Mapping[str, Any]) -> models.V1Affinity:
    """A core/v1 Affinity model from its dict; keys the model does not know are an error, not dropped."""
    client = ApiClient()
    try:
        model = client.deserialize(JsonPayload(dict(affinity)), "V1Affinity")
    except (ValueError, TypeError, AttributeError) as err:
        raise JobSpecError(f"--affinity is not a core/v1 Affinity: {err}") from None
    if client.sanitize_for_serialization(model) != dict(affinity):
        raise JobSpecError("--affinity has fields a core/v1 Affinity does not have (check nodeAffinity/podAntiAffinity spelling)")
    return model


@dataclass(kw_only=True, slots=True, frozen=True)
class JobSpec:
    """One PyTorchJob: a Master pod plus Workers, each running `gpus_per_pod` ranks under torchrun."""

    name: str
    """Job name (a DNS label); pods are <name>-master-0 and <name>-worker-<i>."""
    image: str
    """Trainer image (built from trainer/Dockerfile)."""
    namespace: str = "default"
    """Namespace of the job and of the platform release it uses."""
    gpus: int = 128
    """Total ranks (GPUs) of the job."""
    gpus_per_pod: int = 8
    """Ranks per pod (torchrun --nproc-per-node)."""
    data: str = ""
    """Training data: s3://bucket/prefix, an absolute path in the image, or empty for the embedded text."""
    global_batch: int = PAPER_GLOBAL_BATCH
    """Rows per optimizer step across all ranks."""
    platform_release: str = DEFAULT_PLATFORM_RELEASE
    """Helm release of the platform chart (its Secret, MinIO Service and ServiceAccount)."""
    bucket: str = DEFAULT_BUCKET
    """Bucket for checkpoints (s3://<bucket>/<name>/checkpoints)."""
    s3_endpoint: str = ""
    """S3 endpoint URL; empty means the platform's MinIO."""
    s3_secret: str = ""
    """Secret with accessKey/secretKey; empty means the platform's."""
    service_account: str = ""
    """ServiceAccount of the pods; empty means the platform's trainer account."""
    cpu_only: bool = False
    """Run the ranks on CPUs (gloo, no GPU requests): smoke tests."""
    cpu: str = ""
    """CPU request per pod; empty means 4 per GPU."""
    memory: str = ""
    """Memory request and limit per pod; empty means 32Gi per GPU."""
    shm_size: str = ""
    """Size of the memory-backed /dev/shm; empty means 2Gi per GPU."""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    """Node labels the pods must match."""
    affinity: Mapping[str, Any] | None = None
    """A core/v1 Affinity for the pods."""
    nccl_socket_ifname: str = ""
    """NCCL_SOCKET_IFNAME (network interfaces NCCL may use)."""
    nccl_ib_hca: str = ""
    """NCCL_IB_HCA (InfiniBand adapters NCCL may use)."""
    host_network: bool = False
    """Run pods in the node's network namespace."""
    rdma: bool = False
    """Add IPC_LOCK so NCCL can pin memory for RDMA (leaves the restricted profile)."""
    extra_resources: Mapping[str, str] = field(default_factory=dict)
    """Extra resource limits per pod, e.g. rdma/hca_shared_devices_a=1."""
    restart_policy: str = "OnFailure"
    """OnFailure (any failed pod restarts and resumes; torchrun exits 1 when a rank dies) or ExitCode (signals only)."""
    backoff_limit: int = 5
    """Pod restarts allowed before the job fails."""
    ttl_seconds_after_finished: int = 86400
    """Seconds a finished job is kept."""
    clean_pod_policy: str = "Running"
    """Which pods are deleted when the job ends: Running, All or None."""
    scheduler: str = "none"
    """Gang scheduling: none, volcano or kueue."""
    queue: str = ""
    """Kueue LocalQueue, or Volcano queue."""
    priority_class: str = ""
    """PriorityClass of the pods."""
    heartbeat_timeout: int = 300
    """Seconds before a stuck NCCL watchdog kills its rank (TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC)."""
    image_pull_policy: str = "IfNotPresent"
    """Image pull policy of the trainer container."""

    def __post_init__(self) -> None:
        self._check_shape()
        self._check_sources()
        self._check_policies()
        self._check_resources()

    def _check_shape(self) -> None:
        _require(self.gpus >= 1, f"--gpus must be at least 1, got {self.gpus}")
        _require(self.gpus_per_pod >= 1, f"--gpus-per-pod must be at least 1, got {self.gpus_per_pod}")
        _require(self.gpus % self.gpus_per_pod == 0,
                 f"{self.gpus} GPUs is not a multiple of {self.gpus_per_pod} GPUs per pod")
        _require(self.global_batch >= 1, f"--global-batch must be at least 1, got {self.global_batch}")
        _require(self.global_batch % self.gpus == 0,
                 f"global batch {self.global_batch} is not a multiple of {self.gpus} GPUs (each rank trains an equal share)")
        _require(bool(_DNS_LABEL.match(self.name)),
                 f"job name {self.name!r} must be lower-case letters, digits and '-', start with a letter and end alphanumeric")
        longest = f"{self.name}-worker-{max(self.pods - 2, 0)}"
        _require(len(longest) <= DNS_LABEL_MAX,
                 f"job name {self.name!r} is too long: pod and Service names like {longest} must fit in {DNS_LABEL_MAX} characters")
        _require(bool(_DNS_LABEL.match(self.namespace)), f"namespace {self.namespace!r} is not a valid Kubernetes namespace")

    def _check_sources(self) -> None:
        _require(bool(self.image) and not any(c.isspace() for c in self.image), f"--image {self.image!r} is not an image reference")
        is_s3 = self.data.startswith("s3://")
        _require(not self.data or is_s3 or self.data.startswith("/"),
                 f"--data must be an s3://bucket/prefix URL or an absolute path inside the image, got {self.data!r}")
        _require(not is_s3 or not self.data[len("s3://"):].startswith("/") and len(self.data) > len("s3://"),
                 f"--data {self.data!r} names no bucket")

    def _check_policies(self) -> None:
        _require(self.restart_policy in RESTART_POLICIES,
                 f"--restart-policy must be one of {', '.join(RESTART_POLICIES)}, got {self.restart_policy!r}")
        _require(self.clean_pod_policy in CLEAN_POD_POLICIES,
                 f"--clean-pod-policy must be one of {', '.join(CLEAN_POD_POLICIES)}, got {self.clean_pod_policy!r}")
        _require(self.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        _require(self.scheduler != "kueue" or bool(self.queue), "--scheduler kueue needs --queue (the Kueue LocalQueue to submit to)")
        _require(self.scheduler != "none" or not self.queue, "--queue needs --scheduler kueue or --scheduler volcano")
        _require(self.backoff_limit >= 0, f"--backoff-limit must be >= 0, got {self.backoff_limit}")
        _require(self.ttl_seconds_after_finished >= 0, f"--ttl-after-finished must be >= 0, got {self.ttl_seconds_after_finished}")
        _require(self.heartbeat_timeout >= 1, f"--heartbeat-timeout must be at least 1 second, got {self.heartbeat_timeout}")
        _require(not (self.cpu_only and self.rdma), "--rdma needs GPUs; drop --cpu-only")

    def _check_resources(self) -> None:
        cpu = _quantity(self.cpu_request, "--cpu")
        memory = _quantity(self.memory_request, "--memory")
        shm = _quantity(self.shm_request, "--shm-size")
        _require(cpu > 0 and memory > 0 and shm > 0, "--cpu, --memory and --shm-size must be positive")
        # /dev/shm is a tmpfs whose pages count against the container's memory limit.
        _require(shm < memory, f"--shm-size {self.shm_request} must be below --memory {self.memory_request} "
                               "(shared memory counts against the pod's memory limit)")
        for name, value in self.extra_resources.items():
            _require(bool(name) and "/" in name, f"--extra-resource {name!r} must be a vendor resource like rdma/hca=1")
            _quantity(value, f"--extra-resource {name}")
        for key in self.node_selector:
            _require(bool(key), "--node-selector needs KEY=VALUE")
        if self.affinity:
            parse_affinity(self.affinity)

    @property
    def pods(self) -> int:
        return self.gpus // self.gpus_per_pod

    @property
    def workers(self) -> int:
        return self.pods - 1

    @property
    def rank_batch(self) -> int:
        return self.global_batch // self.gpus

    @property
    def _share(self) -> tuple[int, int, int]:
        return CPU_POD_SHARE if self.cpu_only else GPU_POD_SHARE

    @property
    def cpu_request(self) -> str:
        return self.cpu or str(self._share[0] * self.gpus_per_pod)

    @property
    def memory_request(self) -> str:
        return self.memory or f"{self._share[1] * self.gpus_per_pod}Gi"

    @property
    def shm_request(self) -> str:
        return self.shm_size or f"{self._share[2] * self.gpus_per_pod}Gi"

    @property
    def refs(self) -> PlatformRefs:
        return PlatformRefs(release=self.platform_release, namespace=self.namespace)

    @property
    def s3_endpoint_url(self) -> str:
        return self.s3_endpoint or self.refs.s3_endpoint

    @property
    def s3_secret_name(self) -> str:
        return self.s3_secret or self.refs.s3_secret

    @property
    def service_account_name(self) -> str:
        return self.service_account or self.refs.service_account


def parse_trainer_args(args: Sequence[str]) -> dict[str, Any]:
    """Trainer flags (mlstm train --help) as a nested dict of overrides; platform-owned flags are refused."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in PLATFORM_FLAGS:
            raise JobSpecError(f"{flag} is set by the platform for a job; use {PLATFORM_FLAGS[flag]}")
    parser = build_parser(prog="mlstm job")

    def refuse(message: str) -> NoReturn:
        raise JobSpecError(f"trainer flags: {message} (see mlstm train --help)")

    parser.error = refuse  # type: ignore[method-assign]  # one line via JobSpecError, not argparse's exit
    parsed, unknown = parser.parse_known_args(list(args))
    if unknown:
        raise JobSpecError(f"{unknown[0]} is neither a job option (see --help) nor a trainer option (see mlstm train --help)")
    overrides: dict[str, Any] = {}
    for flag, dotted in FLAGS.items():
        raw = getattr(parsed, dotted)
        if raw is not None:
            try:
                set_dotted(overrides, dotted, coerce(raw, field_type(dotted), dotted))
            except ConfigError as err:
                raise JobSpecError(f"{err} (from {flag})") from None
    return overrides


def build_train_config(spec: JobSpec, trainer_args: Sequence[str] = ()) -> TrainConfig:
    """The trainer config of every rank: the paper's run, this job's shape, then the user's trainer flags."""
    values: dict[str, Any] = {
        "model": dict(PAPER_MODEL),
        "data": {"path": spec.data, "batch_size": spec.rank_batch, "seq_len": PAPER_SEQ_LEN},
        # fp16 autocast is a GPU recipe; CPU smoke runs stay in fp32.
        "optim": dict(PAPER_OPTIM),
        "precision": {"mode": "fp32" if spec.cpu_only else "fp16"},
        "checkpoint": {"dir": f"s3://{spec.bucket}/{spec.name}/checkpoints", "every": PAPER_CHECKPOINT_EVERY},
        "metrics": {"port": METRICS_PORT, "host": "0.0.0.0", "job": spec.name},
        "device": "cpu" if spec.cpu_only else "cuda",
    }
    for section, fields in parse_trainer_args(trainer_args).items():
        if isinstance(fields, dict):
            values.setdefault(section, {}).update(fields)
        else:
            values[section] = fields
    try:
        return config_from_dict(values)
    except ConfigError as err:
        raise JobSpecError(str(err)) from None


def uses_s3(config: TrainConfig) -> bool:
    """Whether the ranks read or write S3 (and so need the endpoint and credentials)."""
    return config.data.path.startswith("s3://") or config.checkpoint.dir.startswith("s3://")
