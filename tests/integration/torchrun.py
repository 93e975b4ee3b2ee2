"""Run the trainer as real processes: plain `python -m mlstm_trainer` or 2 ranks under torchrun (gloo, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def trainer_command(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "mlstm_trainer", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "mlstm_trainer", *args]


def run(args: list[str], env: dict[str, str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    # One thread per rank: two ranks on two cores, and results independent of the core count.
    env = {**env, "OMP_NUM_THREADS": "1"} if nproc > 1 else env
    return subprocess.run(trainer_command(args, nproc), env=env, capture_output=True, text=True, timeout=timeout)


def start(args: list[str], env: dict[str, str], nproc: int = 1) -> subprocess.Popen:
    """A trainer in its own process group, so a SIGKILL can take torchrun and all its ranks at once."""
    env = {**env, "OMP_NUM_THREADS": "1"} if nproc > 1 else env
    return subprocess.Popen(trainer_command(args, nproc), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, as a node failure would."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


def read_log(path: Path) -> dict[int, dict]:
    """step -> record; a resumed run re-logs the steps after its checkpoint, and the last record wins."""
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["step"]] = record
    return records


def wait_for_step(log_path: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.exists() and read_log(log_path) and max(read_log(log_path)) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited with {proc.returncode} before step {step}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"trainer did not reach step {step} in {timeout}s")
