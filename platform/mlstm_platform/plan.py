"""Will a run fit in its time budget? Wall clock, GPU-hours and all-reduce share before submitting.

The model is deliberately simple and written out so a user can check it:

    tokens         = dataset_bytes x epochs                    (one token per byte)
    steps          = tokens / (global_batch x seq_len)
    compute_s      = global_batch x seq_len / (gpus x tokens_per_s_per_gpu)      per step
    allreduce_s    = 2 (gpus - 1) / gpus x parameters x grad_bytes / link_bytes_per_s   per step
    wall_s         = steps x (compute_s + allreduce_s)          (no overlap: an upper bound)
    gpu_hours      = wall_s x gpus / 3600

The all-reduce term is a bandwidth-bound ring all-reduce (each GPU sends and receives
2(N-1)/N of the gradient); gradients travel as fp16 (2 bytes) in fp16 runs. DDP overlaps much
of it with the backward pass, so the real wall clock is between compute-only and this figure.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from mlstm_trainer.model import MLSTM


class PlanError(ValueError):
    """Bad planning input; the message is one line naming the option."""


@dataclass(frozen=True, slots=True)
class PlanInput:
    gpus: int
    dataset_bytes: float
    epochs: float
    tokens_per_s_per_gpu: float
    hidden_size: int = 4096
    embed_dim: int = 64
    global_batch: int = 32768
    seq_len: int = 256
    grad_bytes: int = 2
    """2 for fp16 gradient all-reduce, 4 for fp32."""
    link_gbps: float = 100.0
    """Interconnect bandwidth per GPU in Gbit/s (e.g. 100 for one 100G InfiniBand port per GPU)."""
    target_hours: float = 4.0

    def __post_init__(self) -> None:
        checks = [
            (self.gpus > 0, "--gpus must be > 0"), (self.dataset_bytes > 0, "--dataset-bytes must be > 0"),
            (self.epochs > 0, "--epochs must be > 0"), (self.tokens_per_s_per_gpu > 0, "tokens per second per GPU must be > 0"),
            (self.link_gbps > 0, "--link-gbps must be > 0"), (self.global_batch > 0, "--global-batch must be > 0"),
            (self.seq_len > 0, "--seq-len must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise PlanError(message)


@dataclass(frozen=True, slots=True)
class Plan:
    parameters: int
    tokens: float
    steps: float
    compute_seconds_per_step: float
    allreduce_seconds_per_step: float
    wall_seconds: float
    gpu_hours: float
    allreduce_share: float
    fits: bool


def count_parameters(hidden_size: int, embed_dim: int) -> int:
    """Parameters of the real model class, built on the meta device (no memory for weights)."""
    with torch.device("meta"):
        return MLSTM(vocab_size=256, embed_dim=embed_dim, hidden_size=hidden_size).num_parameters()


def make_plan(spec: PlanInput) -> Plan:
    parameters = count_parameters(spec.hidden_size, spec.embed_dim)
    tokens = spec.dataset_bytes * spec.epochs
    step_tokens = spec.global_batch * spec.seq_len
    steps = tokens / step_tokens
    compute = step_tokens / (spec.gpus * spec.tokens_per_s_per_gpu)
    ring = 2 * (spec.gpus - 1) / spec.gpus
    allreduce = ring * parameters * spec.grad_bytes / (spec.link_gbps * 1e9 / 8)
    wall = steps * (compute + allreduce)
    return Plan(
        parameters=parameters, tokens=tokens, steps=steps, compute_seconds_per_step=compute,
        allreduce_seconds_per_step=allreduce, wall_seconds=wall, gpu_hours=wall * spec.gpus / 3600,
        allreduce_share=allreduce / (compute + allreduce), fits=wall <= spec.target_hours * 3600,
    )


def measured_tokens_per_s_per_gpu(path: Path) -> float:
    """Median per-GPU tokens/s of a trainer JSONL log (`--log-jsonl`), skipping the first steps (warm-up)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise PlanError(f"--measured {path}: {err.strerror}") from None
    rates = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            rates.append(record["tokens_per_s"] / record.get("world_size", 1))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PlanError(f"--measured {path}:{number} is not a trainer log record (from mlstm train --log-jsonl)") from None
    if not rates:
        raise PlanError(f"--measured {path} is empty; pass a log written by mlstm train --log-jsonl")
    return statistics.median(rates[len(rates) // 5:] or rates)


def format_duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"
