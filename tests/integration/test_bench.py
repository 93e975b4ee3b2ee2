"""The benchmark scripts run end to end at toy sizes and print the ratios they promise.

Their numbers at these sizes mean nothing; the real figures come from running them at the issue's
sizes and go into the issue notes (benchmarks report, they never assert speed).
"""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_cpu_throughput_bench_prints_both_ratios() -> None:
    out = _run("throughput.py", "--hidden", "32", "--batch", "4", "--seq", "8", "--iters", "2", "--warmup", "1",
               "--threads", "1")
    assert "mlstm cell:" in out and "recurrent matmul:" in out
    for baseline in ("per-step", "nn.LSTM", "ours with oneDNN recurrent matmuls"):
        match = re.search(rf"ours / {re.escape(baseline)}:\s+([0-9.]+)x", out)
        assert match and float(match.group(1)) > 0, out


def test_recurrent_matmul_bench_prints_every_product() -> None:
    out = _run("recurrent_matmul.py", "--hidden", "16", "--batch", "4", "--rounds", "2", "--threads", "1")
    rows = re.findall(r"^ *(fwd|bwd) \S+ \[4x\d+\]x\[\d+x\d+\]: (.*) GFLOP/s", out, flags=re.MULTILINE)
    assert len(rows) == 4, out
    for _, rates in rows:
        assert all(float(value) > 0 for value in re.findall(r"[a-z]+ +([0-9.]+)", rates)), rates


def test_gpu_throughput_bench_runs_on_cpu_as_a_smoke_test() -> None:
    out = _run("gpu_throughput.py", "--device", "cpu", "--hidden", "32", "--batch", "4", "--seq", "8",
               "--dtypes", "bf16", "--iters", "1", "--warmup", "1",
               "--skip", "nn.LSTM,ours/compiled-cell,ours/compiled+graphs")
    rows = re.findall(r"^bf16\s+(\S+): +([0-9,]+) tokens/s", out, flags=re.MULTILINE)
    assert [name for name, _ in rows] == ["ours/eager-cell", "per-step"], out
    assert all(int(rate.replace(",", "")) > 0 for _, rate in rows)
    assert re.search(r"bf16 best ours / per-step: [0-9.]+x", out), out


def test_gpu_throughput_bench_rejects_unknown_precision() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_throughput.py"), "--dtypes", "fp8"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["gpu_throughput: error: --dtypes 'fp8': use fp16 and/or bf16"]
