"""keep_freed_host_memory: freed buffers are reused instead of faulted in again (checked in subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlstm_trainer.hostmem import HOST_MALLOC_ENV

# A training-like loop: each "step" allocates, fills and frees the same 64 + 32 + 8 MiB of tensors.
# Reports the minor page faults and resident-size growth over the last 4 of 16 steps.
PROBE = """
import json, resource, torch
from mlstm_trainer.hostmem import keep_freed_host_memory
active = keep_freed_host_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
def step():
    buffers = [torch.empty(n << 20).fill_(1.0) for n in (16, 8, 2)]
    del buffers
for _ in range(12):
    step()
before, rss_before = faults(), rss()
for _ in range(4):
    step()
print(json.dumps({"active": active, "faults": faults() - before, "rss_growth": rss() - rss_before}))
"""

PAGES_PER_STEP = (104 << 20) // 4096


def _probe(env_value: str | None) -> dict:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    if env_value is not None:
        env[HOST_MALLOC_ENV] = env_value
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    tuned, default = _probe(None), _probe("default")
    assert tuned["active"] is True and default["active"] is False
    # glibc's default maps and unmaps blocks over 32 MiB on every step: their pages fault in again.
    assert default["faults"] > 4 * (64 << 20) // 4096
    # Kept memory: the steady state reuses it, with next to no new faults and no growth (the slack is
    # for the interpreter's own small allocations, not the 104 MiB a step allocates).
    assert tuned["faults"] < PAGES_PER_STEP // 20
    assert tuned["rss_growth"] < 1 << 20
