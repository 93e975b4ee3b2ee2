"""Bits per character on a held-out split: its own contiguous row streams, no gradients.

Validation uses a fixed number of global rows, split across ranks like training rows, with the
hidden state carried from one batch to the next. Each rank sums its per-character losses in
float64 and the sums are all-reduced, so 1 and 2 ranks report the same number (up to float
rounding) for the same checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import DistContext
from .model import MLSTM
from .precision import MixedPrecision
from .streams import ByteSource, RowStreams

LN2 = math.log(2.0)


@dataclass(frozen=True, slots=True)
class EvalResult:
    bpc: float
    """Bits per character over everything evaluated."""
    chars: int
    """Characters evaluated by all ranks together."""


class Evaluator:
    """Evaluates a model on one split; `run` may be called many times (it always restarts the streams)."""

    def __init__(self, source: ByteSource, *, rows: int, seq_len: int, ctx: DistContext, max_steps: int = 0) -> None:
        self.source = source
        self.rows = rows
        self.seq_len = seq_len
        self.ctx = ctx
        self.max_steps = max_steps

    @torch.no_grad()
    def run(self, model: MLSTM, precision: MixedPrecision) -> EvalResult:
        streams = RowStreams(self.source, global_rows=self.rows, seq_len=self.seq_len,
                             rank=self.ctx.rank, world_size=self.ctx.world_size)
        steps = streams.steps_per_epoch if self.max_steps == 0 else min(self.max_steps, streams.steps_per_epoch)
        was_training = model.training
        model.eval()
        state = None
        totals = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)  # [loss sum in nats, characters]
        for _ in range(steps):
            batch = streams.next_batch()
            inputs, targets, reset = (t.to(self.ctx.device) for t in (batch.inputs, batch.targets, batch.reset))
            with precision.autocast():
                logits, state = model(inputs, state, reset)
            losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            totals[0] += losses.double().sum()
            totals[1] += losses.numel()
        model.train(was_training)
        if self.ctx.distributed:
            dist.all_reduce(totals)
        loss_sum, chars = totals.tolist()
        return EvalResult(bpc=loss_sum / max(chars, 1) / LN2, chars=int(chars))


def should_evaluate(step: int, every: int) -> bool:
    return every > 0 and step > 0 and step % every == 0


def evaluate_checkpoint(checkpoint: str, *, data: str | None = None, split: str = "val", rows: int = 16,
                        max_steps: int = 0, device: str = "cpu") -> EvalResult:
    """Bits per character of a saved model on one split of `data` (default: the data it was trained on)."""
    from .checkpoint import CONFIG, load_checkpoint
    from .config import PrecisionConfig, config_from_dict
    from .corpus import CorpusError
    from .sampling import model_from_state
    from .shard_source import open_source

    state = load_checkpoint(checkpoint, map_location=device)
    config = config_from_dict(state[CONFIG])
    path = config.data.path if data is None else data
    source = open_source(path, split, val_fraction=config.data.val_fraction, retry_seconds=config.retry_seconds)
    if source is None:
        raise CorpusError(f"data {path or '(embedded text)'} has no {split} split; prepare a dataset with --{split}-shards")
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device(device), node="local")
    evaluator = Evaluator(source, rows=rows, seq_len=config.data.seq_len, ctx=ctx, max_steps=max_steps)
    return evaluator.run(model_from_state(state, device), MixedPrecision(PrecisionConfig(), ctx.device.type))
