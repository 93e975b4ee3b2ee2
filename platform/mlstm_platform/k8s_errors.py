"""Kubernetes API failures as one clear line: not found, forbidden, unreachable, CRD not installed.

TrainingClient wraps API errors in RuntimeError (with the ApiException as `__cause__`, or only as
`__context__` for transport errors), so the original is found by walking the exception chain.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import urllib3
from kubernetes.client.exceptions import ApiException

from .constants import GROUP, PYTORCHJOB_PLURAL, TRAINING_OPERATOR_INSTALL, VERSION

if TYPE_CHECKING:
    from .kubeconn import Cluster


class ClusterError(RuntimeError):
    """A request to the cluster failed; the message is one line for the user."""


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status_message(api: ApiException) -> str:
    """The `message` of the Status body the API server returned, else the HTTP reason."""
    try:
        body = json.loads(api.body or "")
        return " ".join(str(body.get("message") or api.reason or "").split())
    except (ValueError, AttributeError):
        return " ".join(str(api.reason or "").split())


def crd_installed(cluster: Cluster) -> bool:
    """Whether the API server serves kubeflow.org/v1 pytorchjobs (the training operator's CRD)."""
    try:
        resources = cluster.custom.get_api_resources(GROUP, VERSION, _request_timeout=10)
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return any(r.name == PYTORCHJOB_PLURAL for r in (resources.resources or []))


CRD_MISSING = (f"this cluster has no PyTorchJob resource ({PYTORCHJOB_PLURAL}.{GROUP}/{VERSION}); "
               f"install the Kubeflow training operator: {TRAINING_OPERATOR_INSTALL}")


def explain(err: BaseException, cluster: Cluster, *, action: str, name: str | None = None) -> ClusterError:
    """Turn an exception from the kubernetes client or TrainingClient into a one-line ClusterError."""
    namespace = cluster.namespace
    for cause in _chain(err):
        if isinstance(cause, ApiException):
            return _explain_api(cause, cluster, action=action, name=name)
        if isinstance(cause, (urllib3.exceptions.HTTPError, ConnectionError)):
            reason = getattr(cause, "reason", None) or cause
            return ClusterError(f"cannot reach the Kubernetes API at {cluster.host} to {action}: "
                                f"{' '.join(str(reason).split())}")
        if isinstance(cause, TimeoutError):
            return ClusterError(f"the Kubernetes API at {cluster.host} did not answer in time to {action} in {namespace}")
    return ClusterError(f"could not {action} in namespace {namespace}: {' '.join(str(err).split())}")


def _explain_api(api: ApiException, cluster: Cluster, *, action: str, name: str | None) -> ClusterError:
    namespace, message = cluster.namespace, _status_message(api)
    if api.status == 404:
        if not _safe_crd_installed(cluster):
            return ClusterError(CRD_MISSING)
        if name:
            return ClusterError(f"PyTorchJob {name} not found in namespace {namespace} (mlstm list -n {namespace} shows its jobs)")
        return ClusterError(f"not found while trying to {action} in namespace {namespace}: {message}")
    if api.status == 403:
        return ClusterError(f"forbidden to {action} in namespace {namespace}: {message}")
    if api.status == 401:
        return ClusterError(f"the Kubernetes API at {cluster.host} rejected your kubeconfig credentials (log in again)")
    if api.status == 409:
        return ClusterError(f"{name or 'the object'} already exists in namespace {namespace}: "
                            f"pick another --name or run mlstm delete {name or '<name>'} -n {namespace}")
    return ClusterError(f"Kubernetes API error {api.status} ({api.reason}) while trying to {action}: {message}")


def _safe_crd_installed(cluster: Cluster) -> bool:
    """crd_installed, assuming yes when the check itself fails (so the original error is reported)."""
    try:
        return crd_installed(cluster)
    except Exception:  # noqa: BLE001 - any failure here must not hide the error being explained
        return True


@contextmanager
def api_errors(cluster: Cluster, *, action: str, name: str | None = None) -> Iterator[None]:
    """Run a block of API calls; whatever fails comes out as one ClusterError line."""
    try:
        yield
    except ClusterError:
        raise
    except (ApiException, RuntimeError, TimeoutError, ConnectionError, urllib3.exceptions.HTTPError) as err:
        raise explain(err, cluster, action=action, name=name) from None
