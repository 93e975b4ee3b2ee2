"""The platform Helm chart rendered and linted with Helm's own Go engine (helm-python-sdk).

`render_platform` prints exactly what `helm template` prints: the release manifest comes from a
client-only dry-run install (Helm sorts it in its install order), followed by the hook manifests,
formatted the way Helm's `template` command appends them (`---\\n# Source: <path>\\n<doc>\\n`).
No cluster is contacted: `lookup` returns nothing, so the Secret's generated values are fresh.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from .constants import CHART_NAME, DEFAULT_PLATFORM_RELEASE

CHART_DIR_ENV = "MLSTM_CHART_DIR"
HOOK_ANNOTATION = "helm.sh/hook"
# Helm's SplitManifests separator (pkg/release/util/manifest.go).
_DOC_SEPARATOR = re.compile(r"(?:^|\s*\n)---\s*")
# Helm's InstallOrder for the kinds a hook may have here; other kinds sort after these.
_INSTALL_ORDER = ("PriorityClass", "Namespace", "ServiceAccount", "Secret", "ConfigMap", "Role", "RoleBinding",
                  "Service", "StatefulSet", "Job")


class ChartError(ValueError):
    """The chart could not be loaded, its values are invalid, or a template failed; one line."""


def chart_dir() -> Path:
    """The chart in this checkout (override with MLSTM_CHART_DIR)."""
    override = os.environ.get(CHART_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "charts" / CHART_NAME


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    # Schema failures arrive wrapped in a preamble; the part after the chart name names the key.
    marker = f"{CHART_NAME}: - "
    if "schema" in text and marker in text:
        return "invalid values: " + text.split(marker, 1)[1]
    return text or type(err).__name__


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge nested mappings like Helm merges -f files and --set values (the override wins)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_values(files: Sequence[Path] = (), sets: Sequence[str] = ()) -> dict[str, Any]:
    """User values from `-f` files (in order) and then `--set` expressions, as Helm combines them."""
    values: dict[str, Any] = {}
    for file in files:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as err:
            raise ChartError(f"values file {file} cannot be read: {err.strerror}") from None
        try:
            values = deep_merge(values, helm.values_from_yaml(text) or {})
        except helm.HelmError as err:
            raise ChartError(f"values file {file} is not valid YAML: {_one_line(err)}") from None
    for expression in sets:
        try:
            values = deep_merge(values, helm.parse_set_string(expression))
        except helm.HelmError as err:
            raise ChartError(f"--set {expression} is not a Helm --set expression: {_one_line(err)}") from None
    return values


def _install_dry_run(values: dict[str, Any], release: str, namespace: str, directory: Path) -> dict[str, Any]:
    if not (directory / "Chart.yaml").is_file():
        raise ChartError(f"no chart at {directory}; set {CHART_DIR_ENV} to the mlstm-platform chart directory")
    try:
        helm.validate_release_name(release)
        # "memory" storage and a client-only dry run: nothing is stored and no cluster is contacted.
        with helm.Config(storage_driver="memory", namespace=namespace) as config:
            return config.install(str(directory), release, values, dry_run="client", namespace=namespace)
    except helm.HelmError as err:
        raise ChartError(f"the platform chart does not render: {_one_line(err)}") from None


def _split_documents(text: str) -> list[str]:
    """Helm's SplitManifests: trimmed, non-empty documents in file order."""
    return [doc.strip() for doc in _DOC_SEPARATOR.split(text.strip()) if doc.strip()]


def _hook_manifests(values: dict[str, Any], release: str, namespace: str, directory: Path) -> list[tuple[str, str]]:
    """(template path, document) of every hook, sorted by file path and then by Helm's install order."""
    try:
        with helm.Chart.load(str(directory)) as chart:
            rendered = chart.render(values, name=release, namespace=namespace, revision=1, is_install=True)
    except helm.HelmError as err:
        raise ChartError(f"the platform chart does not render: {_one_line(err)}") from None
    hooks = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt") or os.path.basename(path).startswith("_"):
            continue
        for doc in _split_documents(rendered[path]):
            head = yaml.safe_load(doc) or {}
            annotations = (head.get("metadata") or {}).get("annotations") or {}
            if HOOK_ANNOTATION in annotations:
                hooks.append((path, doc, head.get("kind", "")))
    order = {kind: index for index, kind in enumerate(_INSTALL_ORDER)}
    hooks.sort(key=lambda hook: order.get(hook[2], len(order)))  # stable: keeps the path order within a kind
    return [(path, doc) for path, doc, _ in hooks]


def render_platform(
    values: dict[str, Any] | None = None,
    *,
    release: str = DEFAULT_PLATFORM_RELEASE,
    namespace: str = "default",
    directory: Path | None = None,
) -> str:
    """The chart rendered as `helm template <release> <chart> -n <namespace>` prints it."""
    directory = directory or chart_dir()
    values = values or {}
    installed = _install_dry_run(values, release, namespace, directory)
    text = installed.get("manifest", "").strip() + "\n"
    for path, doc in _hook_manifests(values, release, namespace, directory):
        text += f"---\n# Source: {path}\n{doc}\n"
    return text


def render_platform_notes(values: dict[str, Any] | None = None, *, release: str = DEFAULT_PLATFORM_RELEASE,
                          namespace: str = "default", directory: Path | None = None) -> str:
    """The chart's NOTES.txt as `helm install` would print it."""
    return str(_install_dry_run(values or {}, release, namespace, directory or chart_dir()).get("notes", ""))


def parse_objects(text: str) -> list[dict[str, Any]]:
    """The Kubernetes objects of a multi-document YAML stream (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def lint_platform(values: dict[str, Any] | None = None, *, directory: Path | None = None,
                  kube_version: str | None = None) -> list[dict[str, Any]]:
    """`helm lint --strict` findings as dicts {severity, path, error}; severity 1 info, 2 warning, 3 error."""
    report = helm.lint(str(directory or chart_dir()), values or {}, strict=True,
                       kube_version=f"v{kube_version}.0" if kube_version else None)
    findings = list(report.get("messages") or [])
    findings += [{"severity": 3, "path": "", "error": error} for error in report.get("errors") or []]
    return findings


def validate_values(values: dict[str, Any], *, directory: Path | None = None) -> None:
    """Check values against values.schema.json; ChartError names the offending key."""
    try:
        with helm.Chart.load(str(directory or chart_dir())) as chart:
            chart.validate_schema(values)
    except helm.HelmError as err:
        raise ChartError(f"the platform chart rejects these values: {_one_line(err)}") from None
