"""The learning-rate schedule reported to work at a 32k global batch: scaled base LR, warm-up, linear decay.

The base LR is quoted per 128 sequences (the small-batch setting it was tuned at) and scaled to the
global batch by a rule, but capped: past a point larger batches diverge instead of converging faster.
Everything here is a pure function of its arguments, so it is unit-tested without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import OptimConfig

REFERENCE_BATCH = 128
"""Global batch (in sequences) at which the base learning rate is quoted."""


def peak_learning_rate(base_lr: float, global_batch: int, rule: str, cap: float) -> float:
    """Base LR scaled from 128 sequences to `global_batch` by `rule` (none|linear|sqrt), capped at `cap`."""
    ratio = global_batch / REFERENCE_BATCH
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]
    return min(base_lr * factor, cap)


@dataclass(frozen=True, slots=True)
class LRSchedule:
    """Linear warm-up to `peak`, then linear decay to zero over `decay_steps`."""

    peak: float
    warmup_steps: int
    decay_steps: int

    def __call__(self, update: int) -> float:
        """LR for the update with 0-based index `update` (skipped fp16 steps are not counted)."""
        if update < self.warmup_steps:
            return self.peak * (update + 1) / self.warmup_steps
        done = (update - self.warmup_steps) / max(self.decay_steps, 1)
        return self.peak * max(0.0, 1.0 - done)


def build_schedule(optim: OptimConfig, global_batch: int) -> LRSchedule:
    """The schedule for a run; `decay_steps=0` decays over whatever the run has left after warm-up."""
    decay = optim.decay_steps or max(optim.steps - optim.warmup_steps, 1)
    peak = peak_learning_rate(optim.lr, global_batch, optim.lr_scaling, optim.lr_cap)
    return LRSchedule(peak=peak, warmup_steps=optim.warmup_steps, decay_steps=decay)
