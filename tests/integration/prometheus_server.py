"""A real Prometheus server on a free loopback port, for integration tests.

`PrometheusServer` writes a scrape config and a storage directory under a temporary folder, starts
the `prometheus` binary there and answers PromQL through the HTTP API. `require_prometheus()` finds
the binary; where it is missing the test is skipped with the reason, except under CI=true, where a
missing Prometheus fails the test (CI installs it with tests/install_test_deps.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

CANDIDATES = ("/usr/bin/prometheus",)


def require_prometheus() -> str:
    """Path of the prometheus binary; skips (or under CI=true fails) the test when there is none."""
    found = shutil.which("prometheus") or next((p for p in CANDIDATES if os.access(p, os.X_OK)), None)
    if found:
        return found
    reason = "prometheus is not installed (run `make test-deps` or `apt-get install prometheus`)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true requires it")
    pytest.skip(f"SKIPPED LOUDLY: {reason}")
    raise AssertionError("unreachable")


def free_port(consecutive: int = 1) -> int:
    """A loopback port p such that p .. p+consecutive-1 are free now (trainer ranks use base + local rank)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + consecutive <= 65535 and all(_is_free(base + i) for i in range(consecutive)):
            return base
    raise RuntimeError(f"no {consecutive} consecutive free loopback ports")


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def scrape_config(job_name: str, targets: list[str], interval_s: int) -> dict[str, Any]:
    """A Prometheus config scraping `targets` every `interval_s` seconds.

    honor_labels keeps the trainer's own `job` label (the training job's name) instead of renaming
    it to exported_job; the Helm chart's scrape config does the same.
    """
    return {
        "global": {"scrape_interval": f"{interval_s}s", "scrape_timeout": f"{interval_s}s",
                   "evaluation_interval": f"{interval_s}s"},
        "scrape_configs": [{"job_name": job_name, "honor_labels": True, "static_configs": [{"targets": targets}]}],
    }


class PrometheusError(RuntimeError):
    """Prometheus did not start or rejected a query."""


class PrometheusServer:
    """One `prometheus` process; use as a context manager."""

    def __init__(self, binary: str, workdir: Path, config: dict[str, Any]) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._config = config
        self._process: subprocess.Popen[bytes] | None = None
        self._log = workdir / "prometheus.log"

    def __enter__(self) -> "PrometheusServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(json.dumps(self._config), encoding="utf-8")  # JSON is valid YAML
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(
                [self.binary, f"--config.file={config_file}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        self._wait_ready(timeout_s=30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def log_tail(self, chars: int = 2000) -> str:
        return self._log.read_text(encoding="utf-8", errors="replace")[-chars:] if self._log.exists() else ""

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self._process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {timeout_s}s: {self.log_tail()}")

    def api(self, path: str, **params: object) -> Any:
        """GET /api/v1/<path>; returns the `data` of a successful answer."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode({k: str(v) for k, v in params.items()})}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as err:
            raise PrometheusError(f"{path} {params}: HTTP {err.code} {err.read().decode(errors='replace')}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant vector of `expr` at time `at` (default: now)."""
        data = self.api("query", query=expr, time=at if at is not None else time.time())
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        """Range matrix of `expr` from `start` to `end`."""
        return self.api("query_range", query=expr, start=start, end=end, step=step_s)["result"]

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        """The single value of a one-series instant query, or None when it is empty."""
        result = self.query(expr, at)
        if not result:
            return None
        if len(result) != 1:
            raise PrometheusError(f"{expr} returned {len(result)} series, expected one: {result}")
        return float(result[0]["value"][1])

    def targets_up(self) -> list[str]:
        """scrapeUrls of the targets whose last scrape succeeded."""
        return [t["scrapeUrl"] for t in self.api("targets")["activeTargets"] if t["health"] == "up"]
