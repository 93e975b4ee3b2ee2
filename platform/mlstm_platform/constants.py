"""Names the platform shares with Kubernetes, the training operator and the Helm chart, in one place.

Renderers, the job client and the tests import these instead of spelling strings again, so a label
key or a port name cannot drift between the chart's PodMonitor and the pods it scrapes.
"""

from __future__ import annotations

# --- Kubeflow training operator (kubeflow.org/v1) -------------------------------------------
GROUP = "kubeflow.org"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
PYTORCHJOB_KIND = "PyTorchJob"
PYTORCHJOB_PLURAL = "pytorchjobs"
PYTORCHJOB_MODEL = "KubeflowOrgV1PyTorchJob"
REPLICA_MASTER = "Master"
REPLICA_WORKER = "Worker"
# The operator finds the training container by this name and the rendezvous port by its port name.
CONTAINER_NAME = "pytorch"
RENDEZVOUS_PORT_NAME = "pytorchjob-port"
RENDEZVOUS_PORT = 23456
# Labels the operator puts on the pods it creates.
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
RESTART_POLICIES = ("ExitCode", "OnFailure")
CLEAN_POD_POLICIES = ("Running", "All", "None")
JOB_CONDITIONS = ("Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
TRAINING_OPERATOR_INSTALL = (
    'kubectl apply --server-side -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.9.0"'
)

# --- Gang scheduling --------------------------------------------------------------------------
SCHEDULERS = ("none", "volcano", "kueue")
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

# --- Labels (app.kubernetes.io/*) -------------------------------------------------------------
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
PART_OF_LABEL = "app.kubernetes.io/part-of"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
VERSION_LABEL = "app.kubernetes.io/version"
PART_OF = "mlstm-platform"
TRAINER_NAME = "mlstm-trainer"
TRAINER_COMPONENT = "trainer"
MANAGED_BY = "mlstm"

# --- The trainer inside the pod ---------------------------------------------------------------
CONFIG_DIR = "/etc/mlstm"
CONFIG_FILE = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
METRICS_PORT = 9400
METRICS_PORT_NAME = "metrics"
POD_USER_ID = 1000
# A fresh checkpoint of the 4096-unit model is a few GB; SIGTERM triggers one, so give it time.
TERMINATION_GRACE_SECONDS = 180
GPU_RESOURCE = "nvidia.com/gpu"

# --- The platform chart (charts/mlstm-platform) -----------------------------------------------
CHART_NAME = "mlstm-platform"
DEFAULT_PLATFORM_RELEASE = "mlstm-platform"
DEFAULT_BUCKET = "mlstm"
MINIO_API_PORT = 9000
S3_ACCESS_KEY_KEY = "accessKey"
S3_SECRET_KEY_KEY = "secretKey"

# --- Validation -------------------------------------------------------------------------------
# Kubernetes version whose upstream schemas (kubernetes-validate) the rendered objects must pass.
KUBE_VERSION = "1.34"
DNS_LABEL_MAX = 63


def metrics_port_name(local_rank: int) -> str:
    """Container port name of a local rank's /metrics (rank 0's is `metrics`; names are <= 15 chars)."""
    return METRICS_PORT_NAME if local_rank == 0 else f"{METRICS_PORT_NAME}-{local_rank}"
