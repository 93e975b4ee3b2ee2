"""Render a training job as Kubernetes objects: its trainer ConfigMap and a kubeflow.org/v1 PyTorchJob.

`render_pytorchjob(spec, config)` is a pure function of a JobSpec and the TrainConfig every rank
runs; the objects are built with the kubeflow-training and kubernetes models and returned as plain
dicts (what the API server receives). Each pod runs
`torchrun --nnodes=<pods> --nproc-per-node=<gpus per pod> -m mlstm_trainer --config /etc/mlstm/config.yaml`;
the training operator supplies the node rank and master address (PET_NODE_RANK, PET_MASTER_ADDR,
PET_MASTER_PORT), which torchrun reads from the environment.
"""

from __future__ import annotations

from typing import Any

import yaml
from kubeflow.training import models
from kubeflow.training.api_client import ApiClient
from kubernetes.utils import parse_quantity

from mlstm_trainer import __version__ as TRAINER_VERSION
from mlstm_trainer.config import TrainConfig, config_to_dict

from .constants import (API_VERSION, COMPONENT_LABEL, CONFIG_DIR, CONFIG_FILE, CONFIG_PATH, CONTAINER_NAME,
                        GPU_RESOURCE, INSTANCE_LABEL, KUEUE_QUEUE_LABEL, MANAGED_BY, MANAGED_BY_LABEL, METRICS_PORT,
                        NAME_LABEL, PART_OF, PART_OF_LABEL, POD_USER_ID, PYTORCHJOB_KIND, RENDEZVOUS_PORT,
                        RENDEZVOUS_PORT_NAME, REPLICA_MASTER, REPLICA_WORKER, S3_ACCESS_KEY_KEY, S3_SECRET_KEY_KEY,
                        TERMINATION_GRACE_SECONDS, TRAINER_COMPONENT, TRAINER_NAME, VERSION_LABEL, metrics_port_name)
from .jobspec import JobSpec, parse_affinity, uses_s3

_SERIALIZER = ApiClient()


def config_map_name(job_name: str) -> str:
    return f"{job_name}-config"


def job_labels(spec: JobSpec) -> dict[str, str]:
    """app.kubernetes.io/* labels of the job, its ConfigMap and its pods (the PodMonitor selects on them)."""
    return {
        NAME_LABEL: TRAINER_NAME,
        INSTANCE_LABEL: spec.name,
        COMPONENT_LABEL: TRAINER_COMPONENT,
        PART_OF_LABEL: PART_OF,
        MANAGED_BY_LABEL: MANAGED_BY,
        VERSION_LABEL: TRAINER_VERSION,
    }


def torchrun_args(spec: JobSpec) -> list[str]:
    """torchrun's arguments; node rank and master address come from the operator's PET_* variables."""
    return [
        f"--nnodes={spec.pods}",
        f"--nproc-per-node={spec.gpus_per_pod}",
        # A failed rank fails the pod at once; Kubernetes restarts it and the trainer resumes from its
        # checkpoint. Local restarts inside a static rendezvous would only wait for the dead peers.
        "--max-restarts=0",
        "--monitor-interval=5",
        "-m", "mlstm_trainer",
        "--config", CONFIG_PATH,
    ]


def _env(name: str, value: str) -> models.V1EnvVar:
    return models.V1EnvVar(name=name, value=value)


def _secret_env(name: str, secret: str, key: str) -> models.V1EnvVar:
    ref = models.V1SecretKeySelector(name=secret, key=key)
    return models.V1EnvVar(name=name, value_from=models.V1EnvVarSource(secret_key_ref=ref))


def build_env(spec: JobSpec, config: TrainConfig) -> list[models.V1EnvVar]:
    """Container environment: node name, S3 access (credentials only as secretKeyRef), NCCL and fail-fast settings."""
    node = models.V1EnvVarSource(field_ref=models.V1ObjectFieldSelector(field_path="spec.nodeName"))
    env = [models.V1EnvVar(name="NODE_NAME", value_from=node)]
    if uses_s3(config):
        env += [
            _env("MLSTM_S3_ENDPOINT", spec.s3_endpoint_url),
            _secret_env("AWS_ACCESS_KEY_ID", spec.s3_secret_name, S3_ACCESS_KEY_KEY),
            _secret_env("AWS_SECRET_ACCESS_KEY", spec.s3_secret_name, S3_SECRET_KEY_KEY),
        ]
    # One rank's share of the pod's cores for intra-op threads (torchrun would otherwise pick 1).
    cpus_per_rank = max(1, int(parse_quantity(spec.cpu_request)) // spec.gpus_per_pod)
    env.append(_env("OMP_NUM_THREADS", str(cpus_per_rank)))
    if spec.cpu_only:
        return env
    env += [
        _env("NCCL_DEBUG", "WARN"),
        # Async error handling tears a rank down when a collective fails or times out, and the
        # heartbeat monitor kills a rank whose NCCL watchdog hangs, so a dead peer fails the job
        # within minutes instead of leaving 127 GPUs blocked in an all-reduce.
        _env("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        _env("TORCH_NCCL_ENABLE_MONITORING", "1"),
        _env("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", str(spec.heartbeat_timeout)),
    ]
    if spec.nccl_socket_ifname:
        env.append(_env("NCCL_SOCKET_IFNAME", spec.nccl_socket_ifname))
    if spec.nccl_ib_hca:
        env.append(_env("NCCL_IB_HCA", spec.nccl_ib_hca))
    return env


def build_ports(spec: JobSpec) -> list[models.V1ContainerPort]:
    """The rendezvous port the operator's master Service uses, and one metrics port per local rank."""
    ports = [models.V1ContainerPort(name=RENDEZVOUS_PORT_NAME, container_port=RENDEZVOUS_PORT, protocol="TCP")]
    for local_rank in range(spec.gpus_per_pod):
        ports.append(models.V1ContainerPort(name=metrics_port_name(local_rank),
                                            container_port=METRICS_PORT + local_rank, protocol="TCP"))
    return ports


def build_resources(spec: JobSpec) -> models.V1ResourceRequirements:
    """CPU and memory requests; memory limited to its request (no overcommit on a 4-hour run), CPU unlimited."""
    requests = {"cpu": spec.cpu_request, "memory": spec.memory_request}
    limits = {"memory": spec.memory_request, **dict(spec.extra_resources)}
    if not spec.cpu_only:
        requests[GPU_RESOURCE] = str(spec.gpus_per_pod)
        limits[GPU_RESOURCE] = str(spec.gpus_per_pod)
    return models.V1ResourceRequirements(requests=requests, limits=limits)


def build_container(spec: JobSpec, config: TrainConfig) -> models.V1Container:
    """The `pytorch` container: torchrun over the trainer, its config mounted read-only."""
    capabilities = models.V1Capabilities(drop=["ALL"], add=["IPC_LOCK"] if spec.rdma else None)
    security = models.V1SecurityContext(allow_privilege_escalation=False, run_as_non_root=True, capabilities=capabilities)
    return models.V1Container(
        name=CONTAINER_NAME,
        image=spec.image,
        image_pull_policy=spec.image_pull_policy,
        command=["torchrun"],
        args=torchrun_args(spec),
        env=build_env(spec, config),
        ports=build_ports(spec),
        resources=build_resources(spec),
        security_context=security,
        volume_mounts=[
            models.V1VolumeMount(name="config", mount_path=CONFIG_DIR, read_only=True),
            models.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
        ],
    )


def build_pod_template(spec: JobSpec, config: TrainConfig) -> models.V1PodTemplateSpec:
    """The pod every replica runs: restricted securityContext unless RDMA is asked for, GPU toleration, shm."""
    annotations = {
        # Fallback discovery for annotation-based Prometheus configs (local rank 0 of each pod).
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
        "kubectl.kubernetes.io/default-container": CONTAINER_NAME,
    }
    pod_security = models.V1PodSecurityContext(
        run_as_non_root=True, run_as_user=POD_USER_ID, run_as_group=POD_USER_ID, fs_group=POD_USER_ID,
        seccomp_profile=models.V1SeccompProfile(type="RuntimeDefault"),
    )
    tolerations = None if spec.cpu_only else [
        models.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
    config_volume = models.V1Volume(name="config", config_map=models.V1ConfigMapVolumeSource(
        name=config_map_name(spec.name), items=[models.V1KeyToPath(key=CONFIG_FILE, path=CONFIG_FILE)]))
    shm_volume = models.V1Volume(name="dshm", empty_dir=models.V1EmptyDirVolumeSource(
        medium="Memory", size_limit=spec.shm_request))
    pod = models.V1PodSpec(
        service_account_name=spec.service_account_name,
        security_context=pod_security,
        containers=[build_container(spec, config)],
        volumes=[config_volume, shm_volume],
        tolerations=tolerations,
        node_selector=dict(spec.node_selector) or None,
        affinity=parse_affinity(spec.affinity) if spec.affinity else None,
        priority_class_name=spec.priority_class or None,
        host_network=spec.host_network or None,
        dns_policy="ClusterFirstWithHostNet" if spec.host_network else None,
        termination_grace_period_seconds=TERMINATION_GRACE_SECONDS,
    )
    return models.V1PodTemplateSpec(
        metadata=models.V1ObjectMeta(labels=job_labels(spec), annotations=annotations), spec=pod)


def build_run_policy(spec: JobSpec) -> models.KubeflowOrgV1RunPolicy:
    """Backoff, TTL and pod cleanup; with Volcano, a gang of all pods (all start or none does)."""
    scheduling = None
    if spec.scheduler == "volcano":
        scheduling = models.KubeflowOrgV1SchedulingPolicy(
            min_available=spec.pods, queue=spec.queue or None, priority_class=spec.priority_class or None)
    return models.KubeflowOrgV1RunPolicy(
        backoff_limit=spec.backoff_limit,
        ttl_seconds_after_finished=spec.ttl_seconds_after_finished,
        clean_pod_policy=spec.clean_pod_policy,
        scheduling_policy=scheduling,
    )


def build_pytorchjob(spec: JobSpec, config: TrainConfig) -> models.KubeflowOrgV1PyTorchJob:
    """The PyTorchJob model: one Master and pods-1 Workers sharing one pod template."""
    template = build_pod_template(spec, config)
    replicas = {REPLICA_MASTER: models.KubeflowOrgV1ReplicaSpec(
        replicas=1, restart_policy=spec.restart_policy, template=template)}
    if spec.workers:
        replicas[REPLICA_WORKER] = models.KubeflowOrgV1ReplicaSpec(
            replicas=spec.workers, restart_policy=spec.restart_policy, template=template)
    labels = job_labels(spec)
    if spec.scheduler == "kueue":
        # Kueue admits the whole job at once when its queue has quota for every pod.
        labels[KUEUE_QUEUE_LABEL] = spec.queue
    return models.KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=PYTORCHJOB_KIND,
        metadata=models.V1ObjectMeta(name=spec.name, namespace=spec.namespace, labels=labels),
        spec=models.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(spec.gpus_per_pod),
            pytorch_replica_specs=replicas,
            run_policy=build_run_policy(spec),
        ),
    )


def build_config_map(spec: JobSpec, config: TrainConfig) -> models.V1ConfigMap:
    """The trainer's config file, exactly `config_to_dict(config)` as YAML."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    return models.V1ConfigMap(
        api_version="v1", kind="ConfigMap",
        metadata=models.V1ObjectMeta(name=config_map_name(spec.name), namespace=spec.namespace, labels=job_labels(spec)),
        data={CONFIG_FILE: text},
    )


def to_dict(model: Any) -> dict[str, Any]:
    """A model as the API server receives it (camelCase keys, unset fields left out), in kubectl's key order."""
    obj = _SERIALIZER.sanitize_for_serialization(model)
    head = ("apiVersion", "kind", "metadata")
    ordered = {key: obj[key] for key in head if key in obj} | {k: v for k, v in obj.items() if k not in head}
    meta = ordered.get("metadata", {})
    first = ("name", "namespace", "labels", "annotations")
    ordered["metadata"] = {k: meta[k] for k in first if k in meta} | {k: v for k, v in meta.items() if k not in first}
    return ordered


def render_pytorchjob(spec: JobSpec, config: TrainConfig) -> list[dict[str, Any]]:
    """The job's objects in creation order: its ConfigMap, then the PyTorchJob that mounts it."""
    return [to_dict(build_config_map(spec, config)), to_dict(build_pytorchjob(spec, config))]


class _Dumper(yaml.SafeDumper):
    """Safe YAML that prints multi-line strings (the trainer config) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_objects(objects: list[dict[str, Any]]) -> str:
    """Objects as one multi-document YAML stream, keys in the models' order."""
    return "".join("---\n" + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120) for obj in objects)
