"""The platform Helm chart, rendered offline with Helm's own engine (helm-python-sdk)."""

from __future__ import annotations

import json
import re

import pytest

from mlstm_platform.chart import ChartError, chart_dir, lint_platform, load_values, parse_objects, render_platform, render_platform_notes, validate_values
from mlstm_platform.constants import KUBE_VERSION
from mlstm_platform.platform_refs import PlatformRefs, platform_fullname
from tests.conftest_k8s import validate_object

SWITCHES = [
    pytest.param({}, id="defaults"),
    pytest.param({"minio": {"enabled": False}}, id="no-minio"),
    pytest.param({"minio": {"auth": {"existingSecret": "my-s3"}}}, id="existing-secret"),
    pytest.param({"bucketJob": {"enabled": False}}, id="no-bucket-job"),
    pytest.param({"trainer": {"serviceAccount": {"create": False}, "rbac": {"create": False}}}, id="no-sa-no-rbac"),
    pytest.param({"podMonitor": {"enabled": False}}, id="no-podmonitor"),
    pytest.param({"podMonitor": {"labels": {"release": "kps"}, "maxRanksPerPod": 1}}, id="podmonitor-labels"),
    pytest.param({"dashboard": {"enabled": False}}, id="no-dashboard"),
    pytest.param({"priorityClass": {"create": True}}, id="priorityclass"),
    pytest.param({"minio": {"persistence": {"storageClass": "fast"}, "nodeSelector": {"disk": "ssd"},
                            "tolerations": [{"key": "storage", "operator": "Exists", "effect": "NoSchedule"}]},
                  "commonLabels": {"team": "nlp"}}, id="minio-placement"),
]
APP_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "app.kubernetes.io/part-of")


def kinds(objects: list[dict]) -> dict[str, str]:
    return {o["kind"]: o["metadata"]["name"] for o in objects}


@pytest.mark.parametrize("values", SWITCHES)
def test_every_object_validates_against_the_upstream_schemas(values: dict) -> None:
    objects = parse_objects(render_platform(values, namespace="mlstm"))
    assert objects
    for obj in objects:
        validate_object(obj)


@pytest.mark.parametrize("values", SWITCHES)
def test_lint_is_clean(values: dict) -> None:
    findings = lint_platform(values, kube_version=KUBE_VERSION)
    # Only INFO (severity 1) such as "icon is recommended"; no warning, no error.
    assert [f for f in findings if f["severity"] >= 2] == []


@pytest.mark.parametrize("values", SWITCHES)
def test_every_object_and_pod_template_carries_the_app_labels(values: dict) -> None:
    for obj in parse_objects(render_platform(values)):
        assert all(label in obj["metadata"]["labels"] for label in APP_LABELS), obj["kind"]
        template = obj.get("spec", {}).get("template")
        if template:
            assert all(label in template["metadata"]["labels"] for label in APP_LABELS), obj["kind"]


def test_defaults_install_every_component() -> None:
    assert kinds(parse_objects(render_platform())) == {
        "ServiceAccount": "mlstm-platform-trainer", "Secret": "mlstm-platform-minio",
        "ConfigMap": "mlstm-platform-dashboard", "Role": "mlstm-platform-trainer", "RoleBinding": "mlstm-platform-trainer",
        "Service": "mlstm-platform-minio", "StatefulSet": "mlstm-platform-minio", "PodMonitor": "mlstm-platform-trainer",
        "Job": "mlstm-platform-minio-bucket"}


@pytest.mark.parametrize("values, gone", [
    pytest.param({"minio": {"enabled": False}}, {"Secret", "Service", "StatefulSet", "Job"}, id="minio"),
    pytest.param({"minio": {"auth": {"existingSecret": "my-s3"}}}, {"Secret"}, id="existing-secret"),
    pytest.param({"bucketJob": {"enabled": False}}, {"Job"}, id="bucket-job"),
    pytest.param({"trainer": {"serviceAccount": {"create": False}}}, {"ServiceAccount"}, id="service-account"),
    pytest.param({"trainer": {"rbac": {"create": False}}}, {"Role", "RoleBinding"}, id="rbac"),
    pytest.param({"podMonitor": {"enabled": False}}, {"PodMonitor"}, id="podmonitor"),
    pytest.param({"dashboard": {"enabled": False}}, {"ConfigMap"}, id="dashboard"),
])
def test_each_component_can_be_switched_off(values: dict, gone: set[str]) -> None:
    assert set(kinds(parse_objects(render_platform()))) - set(kinds(parse_objects(render_platform(values)))) == gone


def test_priority_class_is_optional() -> None:
    assert "PriorityClass" not in kinds(parse_objects(render_platform()))
    objects = parse_objects(render_platform({"priorityClass": {"create": True, "name": "gang", "value": 5000}}))
    priority = next(o for o in objects if o["kind"] == "PriorityClass")
    assert (priority["metadata"]["name"], priority["value"], priority["globalDefault"]) == ("gang", 5000, False)


def test_existing_secret_is_used_by_minio_and_the_bucket_job() -> None:
    text = render_platform({"minio": {"auth": {"existingSecret": "my-s3"}}})
    refs = re.findall(r"secretKeyRef:\n\s+name: (\S+)", text)
    assert refs and set(refs) == {"my-s3"}


def test_generated_secret_has_every_key_and_is_kept_on_uninstall() -> None:
    secret = next(o for o in parse_objects(render_platform()) if o["kind"] == "Secret")
    assert set(secret["data"]) == {"rootUser", "rootPassword", "accessKey", "secretKey"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_dashboard_configmap_is_labelled_for_grafana_and_holds_json() -> None:
    dashboard = next(o for o in parse_objects(render_platform()) if o["kind"] == "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["mlstm-training.json"])["title"]


def test_podmonitor_scrapes_every_local_rank_with_the_trainers_labels() -> None:
    monitor = next(o for o in parse_objects(render_platform()) if o["kind"] == "PodMonitor")
    ports = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    assert ports == ["metrics"] + [f"metrics-{r}" for r in range(1, 8)]
    assert all(e["honorLabels"] for e in monitor["spec"]["podMetricsEndpoints"])
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["default"]


def test_pods_run_restricted() -> None:
    for obj in parse_objects(render_platform()):
        template = obj.get("spec", {}).get("template")
        if not template:
            continue
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        assert template["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in template["spec"]["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("values, words", [
    pytest.param({"bogus": 1}, "additional properties 'bogus' not allowed", id="unknown-top-level-key"),
    pytest.param({"minio": {"persistance": {"size": "1Gi"}}}, "'persistance' not allowed", id="misspelt-nested-key"),
    pytest.param({"minio": {"bucket": "Not_A_Bucket"}}, "/minio/bucket", id="bad-bucket-name"),
    pytest.param({"podMonitor": {"maxRanksPerPod": 0}}, "/podMonitor/maxRanksPerPod", id="zero-ranks"),
])
def test_values_schema_rejects_bad_values(values: dict, words: str) -> None:
    with pytest.raises(ChartError, match=re.escape(words)):
        validate_values(values)
    with pytest.raises(ChartError, match=re.escape(words)):
        render_platform(values)


def test_schema_modeline_and_closed_objects() -> None:
    assert (chart_dir() / "values.yaml").read_text().startswith("# yaml-language-server: $schema=values.schema.json")
    schema = json.loads((chart_dir() / "values.schema.json").read_text())

    def closed(node: dict, path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, path
            for key, child in node["properties"].items():
                closed(child, f"{path}.{key}")
    closed(schema, "values")


def test_output_is_formatted_like_helm_template() -> None:
    text = render_platform()
    assert text.startswith("---\n# Source: mlstm-platform/templates/")
    sources = re.findall(r"^# Source: (\S+)$", text, flags=re.MULTILINE)
    assert "mlstm-platform/templates/NOTES.txt" not in sources
    # Hooks come after the release manifest, as `helm template` appends them.
    assert sources[-1] == "mlstm-platform/templates/bucket-job.yaml"
    objects = parse_objects(text)
    assert [o["kind"] for o in objects][:2] == ["ServiceAccount", "Secret"]  # Helm's install order


def test_notes_say_what_to_run_next() -> None:
    notes = render_platform_notes(release="lab", namespace="mlstm")
    assert "mlstm submit" in notes and "--platform-release lab -n mlstm" in notes
    assert "lab-mlstm-platform-minio" in notes


@pytest.mark.parametrize("release, namespace", [
    pytest.param("mlstm-platform", "default", id="default-release"),
    pytest.param("lab", "mlstm", id="short-release"),
    pytest.param("a-rather-long-release-name-that-tests-helm-truncation", "ns", id="truncated-to-63"),
])
def test_platform_refs_name_the_charts_objects(release: str, namespace: str) -> None:
    objects = parse_objects(render_platform(release=release, namespace=namespace))
    refs = PlatformRefs(release=release, namespace=namespace)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("Secret", refs.s3_secret), ("Service", refs.minio_name), ("ServiceAccount", refs.service_account)} <= names
    service = next(o for o in objects if o["kind"] == "Service")
    port = service["spec"]["ports"][0]["port"]
    assert refs.s3_endpoint == f"http://{service['metadata']['name']}.{namespace}.svc:{port}"
    assert len(platform_fullname(release)) <= 63 and all(len(n) <= 63 for _, n in names)


def test_values_from_files_and_set_merge_like_helm(tmp_path) -> None:
    first = tmp_path / "a.yaml"
    first.write_text("minio:\n  bucket: first\n  persistence:\n    size: 1Ti\n")
    second = tmp_path / "b.yaml"
    second.write_text("minio:\n  bucket: second\n")
    values = load_values([first, second], ["minio.bucket=third,podMonitor.enabled=false"])
    assert values == {"minio": {"bucket": "third", "persistence": {"size": "1Ti"}}, "podMonitor": {"enabled": False}}


@pytest.mark.parametrize("sets, words", [
    pytest.param(["a=1,,=x="], "is not a Helm --set expression", id="bad-set"),
])
def test_bad_set_expressions_are_one_line(sets: list[str], words: str) -> None:
    with pytest.raises(ChartError, match=words):
        load_values([], sets)


def test_chart_ships_the_exported_dashboard() -> None:
    pytest.importorskip("grafana_foundation_sdk")
    from mlstm_platform.dashboard import dashboard_json

    shipped = (chart_dir() / "dashboards" / "mlstm-training.json").read_text(encoding="utf-8")
    assert json.loads(shipped) == json.loads(dashboard_json()), (
        "the chart's dashboard is stale; run: mlstm dashboard export -o charts/mlstm-platform/dashboards/mlstm-training.json"
        " && python -m mlstm_platform.regen_manifests")
