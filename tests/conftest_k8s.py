"""A stateful Kubernetes API on loopback for the job-lifecycle tests: kmock, in a background thread.

No real API server can run in CI here (no cluster, no container engine), so the kubernetes client,
kubeflow-training's TrainingClient and Helm's Go client talk plain HTTP to kmock's
KubernetesEmulator through a kubeconfig the test writes. Nothing in the code under test is patched.

The emulator is extended where the tests rely on API-server behaviour kmock leaves out: it assigns
`metadata.uid`/`creationTimestamp` on create and honours equality `labelSelector`s on lists.
`FakeOperator` stands in for the Kubeflow training operator: it creates the pods a PyTorchJob asks
for (with the operator's labels) and writes the job's status.

Import what a test needs: `from tests.conftest_k8s import k8s_api, kubeconfig  # noqa: F401`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
from kmock import KubernetesEmulator, ResourceInfo, Server

PYTORCHJOBS = "kubeflow.org/v1/pytorchjobs"
RESOURCES = {
    "v1/pods": ResourceInfo(kind="Pod", namespaced=True, verbs={"get", "list", "watch"}, subresources={"log", "proxy"}),
    "v1/configmaps": ResourceInfo(kind="ConfigMap", namespaced=True, verbs={"get", "list", "create", "patch", "delete"}),
    "v1/secrets": ResourceInfo(kind="Secret", namespaced=True, verbs={"get", "list"}),
    PYTORCHJOBS: ResourceInfo(kind="PyTorchJob", namespaced=True, verbs={"get", "list", "create", "patch", "delete", "watch"}),
}


def _matches(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selector: `a=b,c=d`."""
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


class ApiServerEmulator(KubernetesEmulator):
    """kmock's emulator plus the API-server defaults and list filtering the tests depend on."""

    async def _handle(self, request: kmock.Request) -> Any:  # type: ignore[override]
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        return await super()._handle(request)

    async def _serve_list(self, request: kmock.Request) -> Any:  # type: ignore[override]
        result = await super()._serve_list(request)
        selector = (request.params or {}).get("labelSelector")
        if selector:
            result["items"] = [i for i in result["items"] if _matches((i.get("metadata") or {}).get("labels") or {}, selector)]
        return result


class K8sApi:
    """The emulator served on 127.0.0.1 from its own thread and event loop."""

    def __init__(self, *, with_training_operator: bool = True) -> None:
        self._with_operator = with_training_operator
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self.emulator: ApiServerEmulator | None = None
        self.url = ""

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with ApiServerEmulator() as emulator, Server(emulator) as server:
            for name, info in RESOURCES.items():
                if name != PYTORCHJOBS or self._with_operator:
                    emulator.resources[name] = info
            self.emulator, self.url = emulator, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> K8sApi:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("kmock did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's loop (so state changes never race a request) and return its result."""
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored object, or None when absent or deleted."""
        def read() -> dict[str, Any] | None:
            key = (kmock.resource(resource), namespace, name)
            if key not in self.emulator.objects or self.emulator.objects[key].deleted:
                return None
            return dict(self.emulator.objects[key].raw)
        return self.call(read)

    def put(self, resource: str, namespace: str, name: str, obj: dict[str, Any]) -> None:
        """Store an object as if a controller had written it."""
        def write() -> None:
            key = (kmock.resource(resource), namespace, name)
            if key in self.emulator.objects and not self.emulator.objects[key].deleted:
                self.emulator.objects[key].patch(obj)
            else:
                self.emulator.objects[key] = obj
        self.call(write)

    def react(self, register: Callable[[ApiServerEmulator], None]) -> None:
        """Add reactions (logs, metrics proxy, errors) on the server's loop."""
        self.call(lambda: register(self.emulator))

    def request_bodies(self) -> list[bytes]:
        """Raw bodies of every request the server received (for credential greps)."""
        return self.call(lambda: [bytes(r.body or b"") for r in list(self.emulator)])


class FakeOperator:
    """What the training operator would do for a PyTorchJob: pods with its labels, and job status."""

    def __init__(self, api: K8sApi, namespace: str) -> None:
        self.api, self.namespace = api, namespace

    def start(self, name: str, *, phase: str = "Running", state: str = "Running") -> list[str]:
        """Create the job's pods in `phase` and mark the job Created then `state`; returns the pod names."""
        job = self.api.get(PYTORCHJOBS, self.namespace, name)
        assert job is not None, f"no PyTorchJob {name}"
        pods = []
        for replica_type, spec in job["spec"]["pytorchReplicaSpecs"].items():
            for index in range(spec["replicas"]):
                pod = f"{name}-{replica_type.lower()}-{index}"
                labels = {"training.kubeflow.org/job-name": name, "training.kubeflow.org/replica-type": replica_type.lower(),
                          "training.kubeflow.org/replica-index": str(index), **spec["template"]["metadata"]["labels"]}
                if replica_type == "Master":
                    labels["training.kubeflow.org/job-role"] = "master"
                self.api.put("v1/pods", self.namespace, pod, {
                    "apiVersion": "v1", "kind": "Pod", "status": {"phase": phase},
                    "metadata": {"name": pod, "namespace": self.namespace, "labels": labels}})
                pods.append(pod)
        self.set_state(name, state)
        return pods

    def set_state(self, name: str, state: str) -> None:
        job = self.api.get(PYTORCHJOBS, self.namespace, name)
        now = "2026-01-01T00:00:00Z"
        conditions = [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated", "message": f"PyTorchJob {name} is created.",
                       "lastTransitionTime": now, "lastUpdateTime": now}]
        if state != "Created":
            conditions.append({"type": state, "status": "True", "reason": f"PyTorchJob{state}",
                               "message": f"PyTorchJob {name} is {state.lower()}.", "lastTransitionTime": now, "lastUpdateTime": now})
        running = state == "Running"
        replicas = {t: {"active": s["replicas"] if running else 0, "succeeded": s["replicas"] if state == "Succeeded" else 0,
                        "failed": 0} for t, s in job["spec"]["pytorchReplicaSpecs"].items()}
        self.api.put(PYTORCHJOBS, self.namespace, name, {"status": {"conditions": conditions, "replicaStatuses": replicas}})


def write_kubeconfig(path: Path, server: str, *, namespace: str | None = None, context: str = "kmock") -> Path:
    """A kubeconfig whose current context points at `server` (token auth, as a real cluster would want)."""
    ns = f", namespace: {namespace}" if namespace else ""
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: {context}\n  cluster: {{server: \"{server}\"}}\n"
        f"users:\n- name: tester\n  user: {{token: not-a-real-token}}\n"
        f"contexts:\n- name: {context}\n  context: {{cluster: {context}, user: tester{ns}}}\n"
        f"current-context: {context}\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def k8s_api() -> Iterator[K8sApi]:
    """A fresh emulated API server with the training operator's CRD installed."""
    api = K8sApi().start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def k8s_api_without_operator() -> Iterator[K8sApi]:
    """An emulated API server that does not serve kubeflow.org/v1 (training operator not installed)."""
    api = K8sApi(with_training_operator=False).start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def kubeconfig(k8s_api: K8sApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """KUBECONFIG pointing at the emulator, current context namespace `team` (kubectl's conventions)."""
    path = write_kubeconfig(tmp_path / "kubeconfig", k8s_api.url, namespace="team")
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


# --- Schema validation of rendered objects ---------------------------------------------------------
# kubernetes-validate ships the upstream OpenAPI schemas of core Kubernetes kinds only. A PyTorchJob
# is checked by deserialising it into kubeflow-training's model (which must round-trip without losing
# a field) and validating each replica's pod template as a core PodTemplate; a PodMonitor (no schema
# here) by the structure the Prometheus Operator reads.

def validate_core(obj: dict[str, Any]) -> None:
    """Validate a core Kubernetes object against the upstream schema (strict: unknown fields fail)."""
    import kubernetes_validate

    from mlstm_platform.constants import KUBE_VERSION

    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def validate_pytorchjob(obj: dict[str, Any]) -> Any:
    """Deserialise into KubeflowOrgV1PyTorchJob (no field lost) and validate every pod template."""
    from kubeflow.training.api_client import ApiClient

    from mlstm_platform.jobs import to_model

    model = to_model(obj)
    assert ApiClient().sanitize_for_serialization(model) == obj, "PyTorchJob has fields the kubeflow model does not know"
    for replica_type, spec in obj["spec"]["pytorchReplicaSpecs"].items():
        validate_core({"apiVersion": "v1", "kind": "PodTemplate",
                       "metadata": {"name": f"{obj['metadata']['name']}-{replica_type.lower()}"},
                       "template": spec["template"]})
    return model


def validate_podmonitor(obj: dict[str, Any]) -> None:
    """The PodMonitor fields the Prometheus Operator (monitoring.coreos.com/v1) reads."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "PodMonitor"
    assert set(obj["spec"]) <= {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel", "podTargetLabels"}
    assert obj["spec"]["selector"]["matchLabels"]
    assert all(isinstance(n, str) for n in obj["spec"]["namespaceSelector"]["matchNames"])
    for endpoint in obj["spec"]["podMetricsEndpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "honorLabels", "scrapeTimeout", "relabelings"}
        assert len(endpoint["port"]) <= 15 and endpoint["path"].startswith("/")


def validate_object(obj: dict[str, Any]) -> None:
    """Validate any object the platform renders, by kind."""
    if obj["kind"] == "PyTorchJob":
        validate_pytorchjob(obj)
    elif obj["kind"] == "PodMonitor":
        validate_podmonitor(obj)
    else:
        validate_core(obj)
