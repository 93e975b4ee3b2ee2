"""The platform chart keeps its generated MinIO Secret on upgrade, checked with Helm's own `lookup`.

No real API server can run in CI here, so Helm's Go client (helm-python-sdk's cluster-aware render)
talks HTTP to kmock's emulated Kubernetes API on loopback through a kubeconfig the test writes; the
emulator holds the Secret an earlier install created. See tests/conftest_k8s.py.
"""

from __future__ import annotations

import base64
from pathlib import Path

import helm_python as helm
import yaml

from mlstm_platform.chart import chart_dir
from tests.conftest_k8s import K8sApi, k8s_api, write_kubeconfig  # noqa: F401

SECRET_TEMPLATE = "mlstm-platform/templates/minio-secret.yaml"
KEYS = ("rootUser", "rootPassword", "accessKey", "secretKey")


def render_secret(kubeconfig: Path, *, upgrade: bool) -> dict[str, str]:
    with helm.Chart.load(str(chart_dir())) as chart, helm.Config(kubeconfig_path=str(kubeconfig), namespace="mlstm") as config:
        rendered = config.render(chart, {}, name="mlstm-platform", namespace="mlstm", is_upgrade=upgrade, is_install=not upgrade)
    return yaml.safe_load(rendered[SECRET_TEMPLATE])["data"]


def test_upgrade_reuses_the_live_secret(k8s_api: K8sApi, tmp_path: Path) -> None:
    live = {key: base64.b64encode(f"installed-{key}".encode()).decode() for key in KEYS}
    k8s_api.put("v1/secrets", "mlstm", "mlstm-platform-minio", {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": live,
        "metadata": {"name": "mlstm-platform-minio", "namespace": "mlstm"}})
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", k8s_api.url)
    assert render_secret(kubeconfig, upgrade=True) == live
    # Helm really asked the API server for it (not a cached or default value).
    paths = [str(r.url.path) for r in k8s_api.call(lambda: list(k8s_api.emulator))]
    assert "/api/v1/namespaces/mlstm/secrets/mlstm-platform-minio" in paths


def test_first_install_generates_fresh_random_credentials(k8s_api: K8sApi, tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", k8s_api.url)
    first, second = render_secret(kubeconfig, upgrade=False), render_secret(kubeconfig, upgrade=False)
    assert set(first) == set(KEYS)
    assert all(first[key] != second[key] for key in KEYS)
    assert len(base64.b64decode(first["rootPassword"])) == 40
