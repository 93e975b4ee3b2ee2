"""The job lifecycle against a cluster: submit, status, logs, delete, list.

PyTorchJobs go through kubeflow-training's TrainingClient; the ConfigMap, pod logs and the metrics
proxy through the kubernetes client. Every failure comes out as one ClusterError line (k8s_errors).
"""

from __future__ import annotations

import codecs
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kubeflow.training import models
from kubeflow.training.api_client import ApiClient
from kubernetes.client.exceptions import ApiException

from .constants import API_VERSION, CONTAINER_NAME, PYTORCHJOB_KIND, PYTORCHJOB_MODEL, REPLICA_MASTER, REPLICA_WORKER
from .jobspec import JsonPayload
from .k8s_errors import CRD_MISSING, ClusterError, api_errors, crd_installed
from .kubeconn import Cluster
from .pytorchjob import config_map_name
from .run_progress import Progress, scrape_progress


def to_model(job: dict[str, Any]) -> models.KubeflowOrgV1PyTorchJob:
    """A rendered PyTorchJob dict as the kubeflow-training model TrainingClient.create_job takes."""
    return ApiClient().deserialize(JsonPayload(job), PYTORCHJOB_MODEL)


def submit(cluster: Cluster, objects: list[dict[str, Any]]) -> str:
    """Create the job's ConfigMap, then the PyTorchJob; returns the job name.

    The CRD is checked first so nothing is created in a cluster without the training operator; if
    the job cannot be created, the ConfigMap created for it is removed again.
    """
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")
    job = next(o for o in objects if o["kind"] == PYTORCHJOB_KIND)
    name, namespace = job["metadata"]["name"], cluster.namespace
    if {job["metadata"]["namespace"], config_map["metadata"]["namespace"]} != {namespace}:
        raise ValueError(f"job {name} was rendered for another namespace than {namespace}")
    with api_errors(cluster, action="check for the PyTorchJob resource"):
        if not crd_installed(cluster):
            raise ClusterError(CRD_MISSING)
    with api_errors(cluster, action=f"create ConfigMap {config_map['metadata']['name']}", name=name):
        cluster.core.create_namespaced_config_map(namespace, config_map)
    try:
        with api_errors(cluster, action=f"create PyTorchJob {name}", name=name):
            cluster.training.create_job(job=to_model(job), namespace=namespace)
    except ClusterError:
        _delete_config_map(cluster, config_map["metadata"]["name"])
        raise
    _adopt_config_map(cluster, name)
    return name


def _adopt_config_map(cluster: Cluster, name: str) -> None:
    """Make the job own its ConfigMap, so Kubernetes deletes it with the job (e.g. after its TTL)."""
    with api_errors(cluster, action=f"read PyTorchJob {name}", name=name):
        uid = cluster.training.get_job(name, namespace=cluster.namespace).metadata.uid
    if not uid:
        return
    owner = {"apiVersion": API_VERSION, "kind": PYTORCHJOB_KIND, "name": name, "uid": uid}
    with api_errors(cluster, action=f"link ConfigMap {config_map_name(name)} to its job", name=name):
        cluster.core.patch_namespaced_config_map(
            config_map_name(name), cluster.namespace, {"metadata": {"ownerReferences": [owner]}})


def _delete_config_map(cluster: Cluster, config_map: str) -> None:
    try:
        cluster.core.delete_namespaced_config_map(config_map, cluster.namespace)
    except ApiException as err:
        if err.status != 404:
            raise ClusterError(f"could not delete ConfigMap {config_map}: {err.reason}") from None


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str
    time: str


@dataclass(frozen=True)
class ReplicaState:
    replica_type: str
    desired: int
    active: int
    succeeded: int
    failed: int


@dataclass
class JobStatus:
    """What `mlstm status` shows."""

    name: str
    namespace: str
    state: str
    pods: int
    gpus_per_pod: int
    conditions: list[Condition] = field(default_factory=list)
    replicas: list[ReplicaState] = field(default_factory=list)
    pod_phases: dict[str, str] = field(default_factory=dict)
    progress: Progress | None = None
    progress_note: str = ""


def _state(job: models.KubeflowOrgV1PyTorchJob) -> str:
    """The latest condition that holds (the operator appends them in order), else Pending."""
    conditions = (job.status.conditions if job.status else None) or []
    current = [c for c in conditions if c.status == "True"]
    return current[-1].type if current else "Pending"


def _shape(job: models.KubeflowOrgV1PyTorchJob) -> tuple[int, int]:
    """(pods, ranks per pod) from the job's spec."""
    specs = job.spec.pytorch_replica_specs or {}
    pods = sum((spec.replicas or 0) for spec in specs.values())
    nproc = job.spec.nproc_per_node or "1"
    return pods, int(nproc) if str(nproc).isdigit() else 1


def _time(value: Any) -> str:
    return value.isoformat() if isinstance(value, dt.datetime) else str(value or "")


def get_status(cluster: Cluster, name: str, *, with_progress: bool = True) -> JobStatus:
    """Conditions, replica states and pod phases; with_progress also scrapes rank 0's metrics."""
    with api_errors(cluster, action=f"read PyTorchJob {name}", name=name):
        job = cluster.training.get_job(name, namespace=cluster.namespace)
        pods = cluster.training.get_job_pods(name, namespace=cluster.namespace)
    n_pods, nproc = _shape(job)
    status = JobStatus(name=name, namespace=cluster.namespace, state=_state(job), pods=n_pods, gpus_per_pod=nproc)
    for c in (job.status.conditions if job.status else None) or []:
        status.conditions.append(Condition(c.type, c.status, c.reason or "", " ".join((c.message or "").split()),
                                           _time(c.last_transition_time)))
    observed = (job.status.replica_statuses if job.status else None) or {}
    for replica_type, spec in (job.spec.pytorch_replica_specs or {}).items():
        seen = observed.get(replica_type)
        status.replicas.append(ReplicaState(replica_type, spec.replicas or 0, getattr(seen, "active", 0) or 0,
                                            getattr(seen, "succeeded", 0) or 0, getattr(seen, "failed", 0) or 0))
    status.pod_phases = {p.metadata.name: (p.status.phase if p.status else "Unknown") or "Unknown" for p in pods}
    if with_progress:
        _attach_progress(cluster, status)
    return status


def _attach_progress(cluster: Cluster, status: JobStatus) -> None:
    """Rank 0 lives in the master pod; its metrics are reachable only while it runs."""
    master = f"{status.name}-{REPLICA_MASTER.lower()}-0"
    if status.pod_phases.get(master) != "Running":
        status.progress_note = f"metrics: {master} is not running"
        return
    try:
        status.progress = scrape_progress(cluster.core, cluster.namespace, master)
    except Exception as err:  # noqa: BLE001 - an unreachable metrics port must not break `status`
        reason = getattr(err, "reason", None) or type(err).__name__
        status.progress_note = f"metrics: not reachable through the API server ({' '.join(str(reason).split())})"


def pod_for_rank(cluster: Cluster, name: str, rank: int) -> tuple[str, str]:
    """(pod name, phase) of the pod that runs global rank `rank` (pod index = rank // ranks per pod)."""
    with api_errors(cluster, action=f"read PyTorchJob {name}", name=name):
        job = cluster.training.get_job(name, namespace=cluster.namespace)
    n_pods, nproc = _shape(job)
    if not 0 <= rank < n_pods * nproc:
        raise ClusterError(f"rank {rank} is out of range: job {name} has {n_pods * nproc} ranks (0..{n_pods * nproc - 1})")
    index = rank // nproc
    replica_type, replica_index = (REPLICA_MASTER, 0) if index == 0 else (REPLICA_WORKER, index - 1)
    with api_errors(cluster, action=f"list the pods of {name}", name=name):
        pods = cluster.training.get_job_pods(name, namespace=cluster.namespace, replica_type=replica_type.lower(),
                                             replica_index=replica_index)
    if not pods:
        raise ClusterError(f"job {name} has no {replica_type.lower()} pod {replica_index} yet (mlstm status {name} -n {cluster.namespace})")
    pod = pods[0]
    return pod.metadata.name, (pod.status.phase if pod.status else None) or "Unknown"


def stream_logs(cluster: Cluster, name: str, *, rank: int = 0, follow: bool = False) -> Iterator[str]:
    """The `pytorch` container log of the pod running `rank`, as text chunks (live with follow)."""
    pod, phase = pod_for_rank(cluster, name, rank)
    if phase == "Pending":
        raise ClusterError(f"pod {pod} is Pending and has no logs yet (mlstm status {name} -n {cluster.namespace} shows why)")
    with api_errors(cluster, action=f"read the logs of {pod}", name=name):
        response = cluster.core.read_namespaced_pod_log(pod, cluster.namespace, container=CONTAINER_NAME,
                                                        follow=follow, _preload_content=False)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        with api_errors(cluster, action=f"read the logs of {pod}", name=name):
            for chunk in response.stream(4096, decode_content=True):
                yield decoder.decode(chunk)
        yield decoder.decode(b"", final=True)
    finally:
        response.release_conn()


def delete(cluster: Cluster, name: str) -> None:
    """Delete the PyTorchJob (the operator removes its pods) and its ConfigMap."""
    with api_errors(cluster, action=f"delete PyTorchJob {name}", name=name):
        cluster.training.delete_job(name, namespace=cluster.namespace)
    _delete_config_map(cluster, config_map_name(name))


@dataclass(frozen=True)
class JobSummary:
    name: str
    state: str
    pods: int
    gpus: int
    age: str


def _age(created: Any, now: dt.datetime) -> str:
    if not isinstance(created, dt.datetime):
        return "-"
    seconds = int((now - created).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def list_jobs(cluster: Cluster) -> list[JobSummary]:
    """The namespace's PyTorchJobs with their state and size."""
    with api_errors(cluster, action="list PyTorchJobs"):
        jobs = cluster.training.list_jobs(namespace=cluster.namespace)
    now = dt.datetime.now(dt.timezone.utc)
    summaries = []
    for job in jobs:
        pods, nproc = _shape(job)
        summaries.append(JobSummary(job.metadata.name, _state(job), pods, pods * nproc,
                                    _age(job.metadata.creation_timestamp, now)))
    return sorted(summaries, key=lambda s: s.name)
