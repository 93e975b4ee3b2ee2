"""What one optimizer step reports, and the two local sinks for it: a JSONL log and a progress bar.

The same `StepStats` feeds the JSONL log, the rich progress display and the Prometheus metrics,
so the three can never disagree about a step.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

LN2 = math.log(2.0)


@dataclass(kw_only=True, slots=True)
class StepStats:
    """Everything the loop knows about one optimizer step (losses in nats per character)."""

    step: int
    loss: float
    lr: float
    tokens: int
    """Characters trained on so far by the whole job (all ranks)."""
    tokens_per_s: float
    """Job-wide characters per second over this step."""
    loss_scale: float
    grad_norm: float
    skipped: int
    """Overflowed (skipped) steps so far."""
    epoch: int
    world_size: int
    """Processes (GPUs) training together; tokens_per_s / world_size is the per-GPU rate."""
    step_seconds: float
    data_wait_seconds: float
    progress: float
    """Fraction of the planned steps done."""
    eta_seconds: float
    """Time left at the current rate."""
    val_bpc: float | None = None
    """Validation bits per character, on steps that evaluated."""

    @property
    def bpc(self) -> float:
        return self.loss / LN2

    def log_record(self) -> dict[str, Any]:
        """The JSONL record: the fields the issue promises, plus the timing ones."""
        record = asdict(self)
        record["bpc"] = self.bpc
        if self.val_bpc is None:
            del record["val_bpc"]
        return record


class JsonlLog:
    """Appends one JSON object per step; appending keeps a resumed run's earlier lines."""

    def __init__(self, path: str) -> None:
        self._handle: TextIO | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class ProgressDisplay:
    """A rich progress bar showing step, loss, bits per character and tokens/s."""

    def __init__(self, total_steps: int, *, start_step: int, enabled: bool, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  bpc {task.fields[bpc]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, loss="-", bpc="-", tps="-")

    def __enter__(self) -> "ProgressDisplay":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, stats: StepStats) -> None:
        self._progress.update(
            self._task, completed=stats.step, loss=f"{stats.loss:.3f}", bpc=f"{stats.bpc:.3f}", tps=f"{stats.tokens_per_s:,.0f}"
        )

    def log(self, message: str) -> None:
        """A line above the bar (resume notices, checkpoint saves)."""
        self._progress.console.print(message, soft_wrap=True)  # a path must stay on one line
