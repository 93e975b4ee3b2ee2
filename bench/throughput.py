"""Training throughput on CPU: our mLSTM vs a per-step autograd mLSTM vs ``torch.nn.LSTM``.

Measures tokens/s of a full fp32 training step (forward, cross-entropy, backward, fused Adam step as in
the trainer) for:

* ``ours``: :class:`mlstm_trainer.model.MLSTM` (hand-written recurrence, weight norm included);
* ``per-step``: the same mLSTM spelled out with ``nn.Linear`` calls per step and plain autograd;
* ``nn.LSTM``: ``torch.nn.LSTM`` with the same hidden size and the same embedding/readout layers;
* ``ours/onednn``: ours again with the recurrent matmuls on oneDNN instead of the native packed kernel
  (``MLSTM_RECURRENT_MATMUL=onednn``), to show what the kernel buys; ``--no-onednn-row`` skips it.

It reports and never asserts (exit code 0).  Models are timed step by step in turn and tokens/s comes
from the median step time, but CPU timings on a shared machine stay noisy: run it a few times.
Targets from the performance issue: ours >= 1.6x per-step and >= 0.7x nn.LSTM.

    python bench/throughput.py --hidden 1024 --batch 32 --seq 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlstm_trainer.cell import CELL_ENV, native_available
from mlstm_trainer.hostmem import keep_freed_host_memory
from mlstm_trainer.model import MLSTM
from mlstm_trainer.recurrent_matmul import MATMUL_ENV
from mlstm_trainer.recurrent_matmul import native_available as native_matmul_available

VOCAB = 256
EMBED = 64


class PerStepMLSTM(nn.Module):
    """The mLSTM as most people first write it: four ``nn.Linear`` calls per step, autograd does the rest."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.w_mx = nn.Linear(EMBED, hidden, bias=False)
        self.w_mh = nn.Linear(hidden, hidden, bias=False)
        self.w_x = nn.Linear(EMBED, 4 * hidden)
        self.w_h = nn.Linear(hidden, 4 * hidden, bias=False)
        self.out = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, T, vocab]`` from a zero initial state."""
        emb = self.embed(tokens)
        h = emb.new_zeros(tokens.shape[0], self.hidden)
        c = torch.zeros_like(h)
        outputs = []
        for t in range(tokens.shape[1]):
            x = emb[:, t]
            m = self.w_mx(x) * self.w_mh(h)
            i, f, o, u = (self.w_x(x) + self.w_h(m)).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return self.out(torch.stack(outputs, dim=1))


class TorchLSTM(nn.Module):
    """``torch.nn.LSTM`` between the same embedding and readout layers."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.lstm = nn.LSTM(EMBED, hidden, batch_first=True)
        self.out = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, T, vocab]`` from a zero initial state."""
        hs, _ = self.lstm(self.embed(tokens))
        return self.out(hs)


class OursLogits(nn.Module):
    """Adapts :class:`MLSTM` (which also returns the state) to the logits-only interface."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.model = MLSTM(vocab_size=VOCAB, embed_dim=EMBED, hidden_size=hidden)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, T, vocab]`` from a zero initial state."""
        return self.model(tokens)[0]


def build_step(model: nn.Module, batch: int, seq: int) -> Callable[[], None]:
    """One fp32 training step on a fixed random batch: forward, cross-entropy, backward, Adam."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as the trainer builds it

    def step() -> None:
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def with_env(step: Callable[[], None], name: str, value: str) -> Callable[[], None]:
    """``step`` run with environment variable ``name`` set to ``value`` (restored afterwards)."""

    def run() -> None:
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            step()
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before

    return run


def time_steps(steps: dict[str, Callable[[], None]], iters: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step for each model, over ``iters`` rounds that each run every model once.

    Interleaving step by step (rather than timing one model's whole run, then the next) means a burst
    of load from other work on a shared machine hits all models alike instead of skewing one ratio.
    """
    for step in steps.values():
        for _ in range(warmup):  # first steps allocate Adam state and warm allocator/BLAS caches
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def parse_args() -> argparse.Namespace:
    """Command-line flags; defaults are the sizes the performance issue names."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size H")
    parser.add_argument("--batch", type=int, default=32, help="batch size B")
    parser.add_argument("--seq", type=int, default=64, help="sequence length T")
    parser.add_argument("--iters", type=int, default=10, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per model")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps the default")
    parser.add_argument("--no-onednn-row", action="store_true", help="skip the ours/onednn comparison row")
    return parser.parse_args()


def main() -> int:
    """Time every model, print tokens/s (from the median step time) and the two ratios; returns 0."""
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # Process-wide, so every model gets the same allocator; the trainer sets it the same way.
    tuned = keep_freed_host_memory()
    builders: dict[str, Callable[[int], nn.Module]] = {
        "ours": OursLogits,
        "per-step": PerStepMLSTM,
        "nn.LSTM": TorchLSTM,
    }
    print(f"torch {torch.__version__}, num_threads={torch.get_num_threads()}, hidden={args.hidden}, "
          f"batch={args.batch}, seq={args.seq}, iters={args.iters}, warmup={args.warmup}")
    cell = os.environ.get(CELL_ENV, "auto")
    print(f"mlstm cell: {cell} (native C kernels built: {native_available()}); "
          f"host allocator keeps freed memory: {tuned}")
    print(f"recurrent matmul: {os.environ.get(MATMUL_ENV, 'auto')} (native packed kernel usable: "
          f"{native_matmul_available()})")
    steps = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        steps[name] = build_step(build(args.hidden), args.batch, args.seq)
    if not args.no_onednn_row and torch.backends.mkldnn.is_available():
        torch.manual_seed(0)
        ours_onednn = build_step(OursLogits(args.hidden), args.batch, args.seq)
        steps["ours/onednn"] = with_env(ours_onednn, MATMUL_ENV, "onednn")
    seconds = time_steps(steps, args.iters, args.warmup)
    tokens = args.batch * args.seq
    rate = {name: tokens / statistics.median(values) for name, values in seconds.items()}
    for name, value in rate.items():
        best = tokens / min(seconds[name])
        print(f"{name:>11}: {value:8.0f} tokens/s median step  ({best:.0f} best step)")
    print(f"ours / per-step: {rate['ours'] / rate['per-step']:.2f}x  (target >= 1.6x)")
    print(f"ours / nn.LSTM:  {rate['ours'] / rate['nn.LSTM']:.2f}x  (target >= 0.7x)")
    if "ours/onednn" in rate:
        print(f"ours / ours with oneDNN recurrent matmuls: {rate['ours'] / rate['ours/onednn']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
