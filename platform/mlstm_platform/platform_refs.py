"""Names of the platform chart's objects that a training job refers to.

These mirror `charts/mlstm-platform/templates/_helpers.tpl` (the Helm `fullname` convention: the
release name when it already contains the chart name, else `<release>-<chart>`, cut to 63
characters). A unit test renders the chart and checks that every name here matches an object in it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import CHART_NAME, DNS_LABEL_MAX, MINIO_API_PORT


def _trunc(name: str, limit: int) -> str:
    """Helm's `trunc N | trimSuffix "-"`."""
    cut = name[:limit]
    return cut[:-1] if cut.endswith("-") else cut


def platform_fullname(release: str) -> str:
    """The chart's `mlstm-platform.fullname` for a release with no name overrides."""
    if CHART_NAME in release:
        return _trunc(release, DNS_LABEL_MAX)
    return _trunc(f"{release}-{CHART_NAME}", DNS_LABEL_MAX)


@dataclass(frozen=True, slots=True)
class PlatformRefs:
    """Where a job in `namespace` finds the platform release `release`."""

    release: str
    namespace: str

    @property
    def fullname(self) -> str:
        return platform_fullname(self.release)

    @property
    def minio_name(self) -> str:
        """MinIO's StatefulSet, Service and credentials Secret share this name."""
        return f"{_trunc(self.fullname, DNS_LABEL_MAX - len('-minio'))}-minio"

    @property
    def s3_secret(self) -> str:
        return self.minio_name

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.minio_name}.{self.namespace}.svc:{MINIO_API_PORT}"

    @property
    def service_account(self) -> str:
        return f"{_trunc(self.fullname, DNS_LABEL_MAX - len('-trainer'))}-trainer"
