"""Training throughput on one GPU at the paper's per-GPU size: our mLSTM paths vs the baselines.

Times a full mixed-precision training step (forward, cross-entropy, backward, fused Adam; fp16 with a
GradScaler, bf16 without) at hidden 4096, batch 256, sequence 256 for:

* ``ours/eager-cell``: :class:`mlstm_trainer.model.MLSTM` with the plain torch-ops cell;
* ``ours/compiled-cell``: the same with the torch.compile-fused cell (the CUDA default);
* ``ours/compiled+graphs``: fused cell plus the forward and backward loops replayed as CUDA graphs;
* ``per-step``: the mLSTM as plain per-step autograd (``bench/throughput.py``'s ``PerStepMLSTM``);
* ``nn.LSTM``: ``torch.nn.LSTM`` (cuDNN) between the same embedding and readout.

For each it prints tokens/s per GPU, model FLOPs utilisation (6 x matmul parameters x tokens / time /
the GPU's dense peak, from ``mlstm_trainer.hardware``; ``MLSTM_PEAK_TFLOPS`` overrides) and peak
memory, then the ratios the performance issue asks for.  Reports, never asserts (exit code 0).

    python bench/gpu_throughput.py                       # the issue's sizes, fp16 and bf16
    python bench/gpu_throughput.py --device cpu --hidden 32 --batch 4 --seq 8 --dtypes bf16 --skip nn.LSTM

The CPU run is a smoke test of the script only (oneDNN's LSTM has no bf16 kernel on most CPUs, hence
``--skip nn.LSTM``); its numbers say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import VOCAB, PerStepMLSTM, TorchLSTM  # noqa: E402

from mlstm_trainer import cuda_graphs  # noqa: E402
from mlstm_trainer.cell import CELL_ENV  # noqa: E402
from mlstm_trainer.hardware import peak_flops  # noqa: E402
from mlstm_trainer.model import MLSTM  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class OursLogits(nn.Module):
    """:class:`MLSTM` returning logits only; ``env`` holds its cell setting, which :func:`build_step`
    applies around the whole step (the backward loop reads it too)."""

    def __init__(self, hidden: int, cell: str, graphs: bool) -> None:
        super().__init__()
        self.model = MLSTM(vocab_size=VOCAB, embed_dim=64, hidden_size=hidden, cuda_graphs=graphs)
        self.env = {CELL_ENV: cell}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)[0]


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (the cell switch is read per loop)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls (2-D weights, embedding tables excluded)."""
    return sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name)


def build_step(model: nn.Module, tokens: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    """One mixed-precision training step on a fixed batch."""
    device_type = tokens.device.type
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as the trainer builds it
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)

    env = getattr(model, "env", {})

    def step() -> None:
        with _environment(env):
            with torch.autocast(device_type, dtype=dtype):
                logits = model(inputs)
            # The loss in fp32; per-step and nn.LSTM logits arrive in the autocast dtype.
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    return step


def measure(step: Callable[[], None], device: torch.device, iters: int, warmup: int) -> tuple[float, float]:
    """(median seconds per step, peak memory in GiB) after ``warmup`` untimed steps (compiles, captures)."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(seconds), peak


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtypes", default="fp16,bf16", help="comma-separated: fp16, bf16")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", default="", help="comma-separated model names to leave out")
    return parser.parse_args()


def models(hidden: int) -> dict[str, Callable[[], nn.Module]]:
    return {
        "ours/eager-cell": lambda: OursLogits(hidden, "torch", graphs=False),
        "ours/compiled-cell": lambda: OursLogits(hidden, "compiled", graphs=False),
        "ours/compiled+graphs": lambda: OursLogits(hidden, "compiled", graphs=True),
        "per-step": lambda: PerStepMLSTM(hidden),
        "nn.LSTM": lambda: TorchLSTM(hidden),
    }


def run_dtype(args: argparse.Namespace, device: torch.device, precision: str) -> dict[str, float]:
    """Print one table row per model for ``precision``; returns tokens/s by model."""
    dtype = DTYPES[precision]
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq + 1), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    per_step_tokens = args.batch * args.seq
    peak = peak_flops(device, precision)
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    rates = {}
    for name, build in models(args.hidden).items():
        if name in skip:
            continue
        torch.manual_seed(0)
        model = build().to(device)
        seconds, memory = measure(build_step(model, tokens, dtype), device, args.iters, args.warmup)
        rates[name] = per_step_tokens / seconds
        flops = 6 * matmul_params(model) * rates[name]
        mfu = f"{flops / peak:6.1%}" if peak else "   n/a"
        print(f"{precision} {name:>22}: {rates[name]:12,.0f} tokens/s  MFU {mfu}  peak memory {memory:6.1f} GiB",
              flush=True)
        del model
        cuda_graphs.clear_captured()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rates


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    precisions = [p.strip() for p in args.dtypes.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in DTYPES]
    if unknown or not precisions:
        print(f"gpu_throughput: error: --dtypes {args.dtypes!r}: use fp16 and/or bf16", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {name}, hidden={args.hidden}, batch={args.batch}, seq={args.seq}, "
          f"iters={args.iters}, warmup={args.warmup}")
    for precision in precisions:
        rates = run_dtype(args, device, precision)
        best = max((v for k, v in rates.items() if k.startswith("ours/")), default=None)
        for baseline in ("per-step", "nn.LSTM"):
            if best is not None and baseline in rates:
                print(f"{precision} best ours / {baseline}: {best / rates[baseline]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
