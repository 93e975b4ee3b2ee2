"""The job options `mlstm render job` and `mlstm submit` share, declared once.

`_job_option_params` only exists to declare the options with typer annotations; `with_job_options`
splices those parameters into a command's signature (typer reads `__signature__`) and hands the
command a `JobOptions` with their values, so both commands show identical flags and help.
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from .constants import (CLEAN_POD_POLICIES, DEFAULT_BUCKET, DEFAULT_PLATFORM_RELEASE, RESTART_POLICIES,
                        SCHEDULERS)
from .jobspec import PAPER_GLOBAL_BATCH, JobSpec, JobSpecError

SHAPE, PLATFORM, RESOURCES, NETWORK, SCHEDULING = "Job shape", "Platform", "Resources", "Network", "Scheduling"


def _job_option_params(
    name: Annotated[str, typer.Option(help="Job name (a DNS label); pods are <name>-master-0, <name>-worker-<i>.", rich_help_panel=SHAPE)],
    image: Annotated[str, typer.Option(help="Trainer image built from trainer/Dockerfile.", envvar="MLSTM_IMAGE", rich_help_panel=SHAPE)],
    gpus: Annotated[int, typer.Option(help="Total GPUs (ranks) of the job.", rich_help_panel=SHAPE)] = 128,
    gpus_per_pod: Annotated[int, typer.Option(help="GPUs (ranks) per pod; --gpus must be a multiple.", rich_help_panel=SHAPE)] = 8,
    data: Annotated[str, typer.Option(help="Training data: s3://bucket/prefix (or a path in the image; empty: the trainer's embedded text).", rich_help_panel=SHAPE)] = "",
    global_batch: Annotated[int, typer.Option(help="Rows per step over all ranks (the paper: 32768); each rank gets an equal share.", rich_help_panel=SHAPE)] = PAPER_GLOBAL_BATCH,
    cpu_only: Annotated[bool, typer.Option("--cpu-only", help="Run the ranks on CPUs with gloo and no GPU requests (smoke tests).", rich_help_panel=SHAPE)] = False,
    platform_release: Annotated[str, typer.Option(help="Helm release of the platform chart (its MinIO, Secret and ServiceAccount).", envvar="MLSTM_PLATFORM_RELEASE", rich_help_panel=PLATFORM)] = DEFAULT_PLATFORM_RELEASE,
    bucket: Annotated[str, typer.Option(help="Bucket for checkpoints: s3://<bucket>/<name>/checkpoints.", rich_help_panel=PLATFORM)] = DEFAULT_BUCKET,
    s3_endpoint: Annotated[str, typer.Option(help="S3 endpoint URL (default: the platform's MinIO Service).", rich_help_panel=PLATFORM)] = "",
    s3_secret: Annotated[str, typer.Option(help="Secret with accessKey/secretKey (default: the platform's).", rich_help_panel=PLATFORM)] = "",
    service_account: Annotated[str, typer.Option(help="ServiceAccount of the pods (default: the platform's trainer account).", rich_help_panel=PLATFORM)] = "",
    cpu: Annotated[str, typer.Option(help="CPU request per pod (default 4 per GPU).", rich_help_panel=RESOURCES)] = "",
    memory: Annotated[str, typer.Option(help="Memory request and limit per pod (default 32Gi per GPU).", rich_help_panel=RESOURCES)] = "",
    shm_size: Annotated[str, typer.Option(help="Memory-backed /dev/shm per pod (default 2Gi per GPU).", rich_help_panel=RESOURCES)] = "",
    node_selector: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE node label the pods need (repeatable).", rich_help_panel=RESOURCES)] = None,
    affinity: Annotated[Optional[Path], typer.Option(help="YAML/JSON file with a core/v1 Affinity for the pods.", rich_help_panel=RESOURCES)] = None,
    extra_resource: Annotated[Optional[list[str]], typer.Option(help="NAME=COUNT extra resource limit per pod, e.g. rdma/hca_shared_devices_a=1 (repeatable).", rich_help_panel=RESOURCES)] = None,
    image_pull_policy: Annotated[str, typer.Option(help="Image pull policy.", rich_help_panel=RESOURCES)] = "IfNotPresent",
    nccl_socket_ifname: Annotated[str, typer.Option(help="NCCL_SOCKET_IFNAME: interfaces NCCL may use, e.g. eth0.", rich_help_panel=NETWORK)] = "",
    ib_hca: Annotated[str, typer.Option(help="NCCL_IB_HCA: InfiniBand adapters NCCL may use, e.g. mlx5.", rich_help_panel=NETWORK)] = "",
    host_network: Annotated[bool, typer.Option("--host-network", help="Use the node's network namespace (leaves the restricted profile).", rich_help_panel=NETWORK)] = False,
    rdma: Annotated[bool, typer.Option("--rdma", help="Add IPC_LOCK so NCCL can register memory for RDMA (leaves the restricted profile).", rich_help_panel=NETWORK)] = False,
    heartbeat_timeout: Annotated[int, typer.Option(help="Seconds before a hung NCCL watchdog kills its rank, failing the job fast.", rich_help_panel=NETWORK)] = 300,
    scheduler: Annotated[Optional[str], typer.Option(help=f"Gang scheduling: {', '.join(SCHEDULERS)} (default: kueue with --queue, else none).", rich_help_panel=SCHEDULING)] = None,
    queue: Annotated[str, typer.Option(help="Kueue LocalQueue (kueue.x-k8s.io/queue-name), or the Volcano queue.", rich_help_panel=SCHEDULING)] = "",
    priority_class: Annotated[str, typer.Option(help="PriorityClass of the pods (the chart can create one).", rich_help_panel=SCHEDULING)] = "",
    restart_policy: Annotated[str, typer.Option(help=f"{' or '.join(RESTART_POLICIES)}: OnFailure restarts any failed pod (the trainer resumes from its checkpoint); ExitCode only pods killed by a signal.", rich_help_panel=SCHEDULING)] = "OnFailure",
    backoff_limit: Annotated[int, typer.Option(help="Pod restarts allowed before the job fails.", rich_help_panel=SCHEDULING)] = 5,
    ttl_after_finished: Annotated[int, typer.Option(help="Seconds a finished job (and its ConfigMap) is kept.", rich_help_panel=SCHEDULING)] = 86400,
    clean_pod_policy: Annotated[str, typer.Option(help=f"Pods deleted when the job ends: {', '.join(CLEAN_POD_POLICIES)}.", rich_help_panel=SCHEDULING)] = "Running",
) -> None:
    """Declares the shared job options; never called."""


_PARAMS = list(inspect.signature(_job_option_params, eval_str=True).parameters.values())
OPTION_NAMES = tuple(p.name for p in _PARAMS)


@dataclass(frozen=True)
class JobOptions:
    """The raw values of the job options, turned into a JobSpec once the namespace is known."""

    values: dict[str, Any]

    def to_spec(self, namespace: str) -> JobSpec:
        """The JobSpec these options describe; JobSpecError (one line) when they do not fit together."""
        v = dict(self.values)
        scheduler = v.pop("scheduler") or ("kueue" if v["queue"] else "none")
        return JobSpec(
            name=v["name"], image=v["image"], namespace=namespace, gpus=v["gpus"], gpus_per_pod=v["gpus_per_pod"],
            data=v["data"], global_batch=v["global_batch"], cpu_only=v["cpu_only"],
            platform_release=v["platform_release"], bucket=v["bucket"], s3_endpoint=v["s3_endpoint"],
            s3_secret=v["s3_secret"], service_account=v["service_account"], cpu=v["cpu"], memory=v["memory"],
            shm_size=v["shm_size"], node_selector=_pairs(v["node_selector"], "--node-selector"),
            affinity=_read_affinity(v["affinity"]), extra_resources=_pairs(v["extra_resource"], "--extra-resource"),
            image_pull_policy=v["image_pull_policy"], nccl_socket_ifname=v["nccl_socket_ifname"],
            nccl_ib_hca=v["ib_hca"], host_network=v["host_network"], rdma=v["rdma"],
            heartbeat_timeout=v["heartbeat_timeout"], scheduler=scheduler, queue=v["queue"],
            priority_class=v["priority_class"], restart_policy=v["restart_policy"], backoff_limit=v["backoff_limit"],
            ttl_seconds_after_finished=v["ttl_after_finished"], clean_pod_policy=v["clean_pod_policy"],
        )


def _pairs(items: list[str] | None, option: str) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobSpecError(f"{option} {item!r} must look like KEY=VALUE")
        pairs[key] = value
    return pairs


def _read_affinity(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise JobSpecError(f"--affinity {path} cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise JobSpecError(f"--affinity {path} is not YAML/JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise JobSpecError(f"--affinity {path} must hold a mapping (nodeAffinity:, podAntiAffinity:, ...)")
    # Accept a whole `affinity:` block as pasted from a pod spec.
    return loaded.get("affinity", loaded) if set(loaded) == {"affinity"} else loaded


def with_job_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the job options to `command`'s parameters; it receives them as `job: JobOptions`."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "job"]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        job = JobOptions({name: kwargs.pop(name) for name in OPTION_NAMES})
        return command(job=job, **kwargs)

    params = own + _PARAMS
    # Keyword-only, so options without defaults may follow ones with defaults; typer shows this order.
    wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper
