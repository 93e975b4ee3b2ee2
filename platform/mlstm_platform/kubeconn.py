"""Connect to a cluster the way kubectl does: KUBECONFIG (or ~/.kube/config), its current context, --namespace.

Each connection builds its own client Configuration instead of the kubernetes package's global
default, so two connections (or a test's and the user's) never leak into each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kubeflow.training import TrainingClient
from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from .constants import PYTORCHJOB_KIND

DEFAULT_KUBECONFIG = "~/.kube/config"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ConnectError(RuntimeError):
    """No usable cluster configuration; the message is one line saying what to set."""


@dataclass(frozen=True)
class Cluster:
    """API clients bound to one cluster and the namespace commands act in."""

    namespace: str
    host: str
    api_client: client.ApiClient
    core: client.CoreV1Api
    custom: client.CustomObjectsApi
    training: TrainingClient


def kubeconfig_paths(explicit: str | None = None) -> str:
    """--kubeconfig, else $KUBECONFIG (a ':'-separated list, merged like kubectl), else ~/.kube/config."""
    return explicit or os.environ.get("KUBECONFIG") or os.path.expanduser(DEFAULT_KUBECONFIG)


def _context_namespace(paths: str, context: str | None) -> str | None:
    contexts, current = config.list_kube_config_contexts(config_file=paths)
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else current
    if context and chosen is None:
        raise ConnectError(f"context {context!r} is not in your kubeconfig ({paths})")
    return ((chosen or {}).get("context") or {}).get("namespace")


def _load(paths: str, context: str | None, configuration: client.Configuration) -> str | None:
    """Fill `configuration`; return the context's namespace (None in-cluster)."""
    existing = [p for p in paths.split(os.pathsep) if p and Path(p).expanduser().is_file()]
    if not existing and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if SERVICE_ACCOUNT_NAMESPACE.is_file() else None
    if not existing:
        raise ConnectError(f"no kubeconfig at {paths}; set KUBECONFIG or pass --kubeconfig")
    try:
        namespace = _context_namespace(os.pathsep.join(existing), context)
        config.load_kube_config(config_file=os.pathsep.join(existing), context=context,
                                client_configuration=configuration, persist_config=False)
    except ConfigException as err:
        raise ConnectError(f"kubeconfig {paths} cannot be used: {' '.join(str(err).split())}") from None
    return namespace


def connect(*, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None) -> Cluster:
    """Clients for the chosen context; the namespace is --namespace, else the context's, else `default`."""
    configuration = client.Configuration()
    context_namespace = _load(kubeconfig_paths(kubeconfig), context, configuration)
    chosen = namespace or context_namespace or "default"
    api_client = client.ApiClient(configuration)
    training = TrainingClient(client_configuration=configuration, namespace=chosen, job_kind=PYTORCHJOB_KIND)
    return Cluster(
        namespace=chosen,
        host=configuration.host,
        api_client=api_client,
        core=client.CoreV1Api(api_client),
        custom=client.CustomObjectsApi(api_client),
        training=training,
    )

