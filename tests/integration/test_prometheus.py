"""A real Prometheus scrapes a real 2-rank training run (torchrun, CPU, gloo) and the dashboard works on it.

One module-scoped run serves every test: torchrun starts two trainer ranks serving /metrics on
base and base + 1, Prometheus scrapes both every second, and the tests query Prometheus' HTTP
API while the run is still training (a finished target's series go stale at once). The run is
stopped in the fixture's teardown; it takes about 45 s in all, mostly waiting for 30 s of data.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlstm_platform.dashboard import build_dashboard, dashboard_queries

from . import prometheus_server
from .prometheus_server import PrometheusServer, free_port, require_prometheus, scrape_config

JOB = "pytest-mlstm"
RANKS = 2
SCRAPE_S = 1
WINDOW_S = 30
"""The rate window the issue names: sum(rate(mlstm_tokens_total[30s]))."""
RATE_INTERVAL = f"{4 * SCRAPE_S}s"
"""What Grafana puts in $__rate_interval for a short range: max($__interval + scrape, 4 * scrape)."""
WARM_STEPS = 5
"""Steps at the start (allocator warm-up, first allreduce) kept out of the rate window."""
TOKENS_RATE_TOLERANCE = 0.35
PEAK_TFLOPS = "0.05"
"""A nominal CPU peak so MFU is exported: CPUs are not in the peak table (mlstm_trainer.hardware)."""


@dataclass
class LiveRun:
    """A training run being scraped: its Prometheus, its JSONL log and its torchrun process."""

    prom: PrometheusServer
    log_jsonl: Path
    output: Path
    process: subprocess.Popen[bytes]

    def records(self) -> dict[int, dict[str, Any]]:
        """Rank 0's JSONL log, by step (complete lines only: the trainer may be mid-write)."""
        lines = self.log_jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
        return {r["step"]: r for r in (json.loads(line) for line in lines if line.endswith("\n"))}

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"training exited with {self.process.returncode}:\n{self.output.read_text(errors='replace')[-3000:]}")


def start_training(workdir: Path, metrics_port: int) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """torchrun with 2 CPU ranks of a tiny model; far more steps than the test needs (it is stopped)."""
    log_jsonl, output = workdir / "train.jsonl", workdir / "train.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSTM_")}  # no stray settings
    env.update({"MLSTM_PEAK_TFLOPS": PEAK_TFLOPS, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
        "-m", "mlstm_trainer", "--device", "cpu", "--steps", "20000",
        "--hidden-size", "32", "--embed-dim", "16", "--batch-size", "4", "--seq-len", "32",
        "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1", "--job-name", JOB,
        "--checkpoint-dir", str(workdir / "ckpt"), "--checkpoint-every", "0", "--log-jsonl", str(log_jsonl),
        # Frequent, short validations so the validation panels have data within seconds.
        "--eval-every", "10", "--eval-max-steps", "4",
    ]
    with open(output, "wb") as out:
        # A session of its own, so teardown can stop torchrun and both ranks as one group.
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return process, log_jsonl, output


def stop_training(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (torchrun forwards it; ranks checkpoint and exit), then SIGKILL to the group if stuck."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for_window(run: LiveRun, timeout_s: float = 240) -> None:
    """Wait until both ranks are scraped and a whole rate window lies after the warm-up steps."""
    ready = f'count(mlstm_step{{job="{JOB}"}} offset {WINDOW_S}s >= {WARM_STEPS})'
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run.check_alive()
        if run.prom.scalar(ready) == RANKS and len(run.prom.targets_up()) == RANKS:
            return
        time.sleep(SCRAPE_S)
    pytest.fail(f"no {WINDOW_S}s of metrics from {RANKS} ranks after {timeout_s}s; targets up: "
                f"{run.prom.targets_up()}\n{run.output.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    binary = require_prometheus()
    workdir = tmp_path_factory.mktemp("prometheus-run")
    base_port = free_port(consecutive=RANKS)  # rank r serves on base_port + local rank r
    process, log_jsonl, output = start_training(workdir, base_port)
    try:
        targets = [f"127.0.0.1:{base_port + r}" for r in range(RANKS)]
        with PrometheusServer(binary, workdir / "prometheus", scrape_config("mlstm", targets, SCRAPE_S)) as prom:
            run = LiveRun(prom=prom, log_jsonl=log_jsonl, output=output, process=process)
            wait_for_window(run)
            yield run
    finally:
        stop_training(process)


@pytest.mark.slow
def test_both_ranks_report_with_job_rank_node_labels(live_run: LiveRun) -> None:
    series = live_run.prom.query(f'mlstm_step{{job="{JOB}"}}')
    assert sorted(s["metric"]["rank"] for s in series) == ["0", "1"]
    assert all(s["metric"]["node"] for s in series)
    info = live_run.prom.query(f'mlstm_build_info{{job="{JOB}"}}')
    assert {(s["metric"]["world_size"], s["metric"]["hidden_size"], s["metric"]["precision"]) for s in info} == {("2", "32", "fp32")}


@pytest.mark.slow
def test_cluster_tokens_rate_matches_logged_tokens_per_s(live_run: LiveRun) -> None:
    """sum(rate(mlstm_tokens_total[30s])) against the tokens/s rank 0 logged over the same 30 s.

    The tolerance is loose on purpose. The logged figure is the job's batch over a smoothed time of
    the training step alone (no reporting between steps, the smoothing lags), rate() extrapolates
    1 s-spaced samples to the window's edges, and on a small shared CPU machine two ranks plus
    Prometheus make step times jitter by tens of percent. The mistakes this guards against - a
    per-rank figure where the job's is meant, a counter counting another rank's tokens too - are
    off by 50% or more, so 35% still catches them.
    """
    prom, at = live_run.prom, time.time()
    measured = prom.scalar(f'sum(rate(mlstm_tokens_total{{job="{JOB}"}}[{WINDOW_S}s]))', at)
    first = prom.scalar(f'mlstm_step{{job="{JOB}",rank="0"}}', at - WINDOW_S)
    last = prom.scalar(f'mlstm_step{{job="{JOB}",rank="0"}}', at)
    assert measured and first is not None and last is not None and last > first
    records = live_run.records()
    rates = [records[step]["tokens_per_s"] for step in range(int(first) + 1, int(last) + 1)]
    # Every step trains the same number of tokens, so the window's rate is the harmonic mean.
    logged = len(rates) / sum(1.0 / r for r in rates)
    assert abs(measured - logged) / logged < TOKENS_RATE_TOLERANCE, (
        f"Prometheus {measured:,.0f} tokens/s vs logged {logged:,.0f} tokens/s over steps {first:.0f}-{last:.0f}"
    )


@pytest.mark.slow
def test_loss_gauge_matches_logged_loss(live_run: LiveRun) -> None:
    """mlstm_loss of rank 0 equals the loss rank 0 logged for the step Prometheus last scraped.

    One scrape reads the metrics one after another while the trainer may be updating them, so a
    scrape can, rarely, pair one step's loss with the next step's number; then a later scrape is
    compared. A wrong value fails every attempt.
    """
    names = "mlstm_loss|mlstm_bits_per_character|mlstm_step"
    seen = []
    for _ in range(5):
        live_run.check_alive()
        sample = {s["metric"]["__name__"]: float(s["value"][1])
                  for s in live_run.prom.query(f'{{__name__=~"{names}",job="{JOB}",rank="0"}}')}
        record = live_run.records().get(int(sample["mlstm_step"]))
        if record and math.isclose(sample["mlstm_loss"], record["loss"], rel_tol=1e-9):
            assert math.isclose(sample["mlstm_bits_per_character"], record["bpc"], rel_tol=1e-9)
            return
        seen.append((sample, record and record["loss"]))
        time.sleep(1.5 * SCRAPE_S)
    pytest.fail(f"mlstm_loss never matched the logged loss of its step: {seen}")


def _dashboard_cases() -> list[Any]:
    cases = []
    for index, (title, expr, instant) in enumerate(dashboard_queries(build_dashboard())):
        cases.append(pytest.param(title, expr, instant, id=f"{index:02d}-{title}"))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize(("title", "expr", "instant"), _dashboard_cases())
def test_dashboard_query_returns_data(live_run: LiveRun, title: str, expr: str, instant: bool) -> None:
    """Each panel query, with Grafana's variables filled in, gives numbers for the live run."""
    promql = expr.replace("$job", JOB).replace("$__rate_interval", RATE_INTERVAL)
    assert "$" not in promql, f"unsubstituted variable in {promql}"
    now = time.time()
    if instant:
        values = [s["value"][1] for s in live_run.prom.query(promql, now)]
    else:
        series = live_run.prom.query_range(promql, now - WINDOW_S, now, step_s=2 * SCRAPE_S)
        values = [v for s in series for _, v in s["values"]]
    numbers = [float(v) for v in values if not math.isnan(float(v))]
    assert numbers, f"panel {title!r}: {promql} returned no data ({values[:5]})"


@pytest.mark.parametrize(("ci", "outcome"), [pytest.param("true", pytest.fail.Exception, id="ci-fails"),
                                             pytest.param("", pytest.skip.Exception, id="local-skips")])
def test_missing_prometheus_skips_locally_and_fails_under_ci(monkeypatch, ci, outcome):
    monkeypatch.setattr(prometheus_server.shutil, "which", lambda _: None)
    monkeypatch.setattr(prometheus_server, "CANDIDATES", ())
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="prometheus is not installed"):
        require_prometheus()
