"""The time loops' recurrent matmuls alone: native packed kernel vs oneDNN-packed vs ``torch.mm``.

Times ``x @ weight.T`` for the four products of one mLSTM step (forward ``H x H`` and ``4H x H``,
backward ``H x 4H`` and ``H x H``) at batch B, each implementation built the way the loops build it
(:class:`mlstm_trainer.recurrent_matmul.RecurrentMatmul`), and prints GFLOP/s from the median of
interleaved rounds plus the ratio native / oneDNN.  It reports and never asserts (exit code 0).

    python bench/recurrent_matmul.py --hidden 1024 --batch 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from mlstm_trainer.recurrent_matmul import MATMUL_ENV, RecurrentMatmul, native_available

KINDS = ("native", "onednn", "torch")


def build(kind: str, weight: torch.Tensor, batch: int) -> RecurrentMatmul:
    """The loop's matmul for ``weight``, forced to ``kind``."""
    os.environ[MATMUL_ENV] = kind
    try:
        return RecurrentMatmul(weight, batch, steps=64)
    finally:
        del os.environ[MATMUL_ENV]


def time_calls(calls: dict[str, Callable[[], object]], repeat: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each callable over ``rounds`` interleaved rounds of ``repeat`` calls."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(repeat):
                call()
            seconds[name].append((time.perf_counter() - start) / repeat)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size H (a multiple of 8)")
    parser.add_argument("--batch", type=int, default=32, help="rows per step B")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps the default")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    kinds = [k for k in KINDS if (k != "native" or native_available())
             and (k != "onednn" or torch.backends.mkldnn.is_available())]  # fmt: skip
    print(f"torch {torch.__version__}, num_threads={torch.get_num_threads()}, hidden={args.hidden}, "
          f"batch={args.batch}; GFLOP/s from the median of {args.rounds} rounds")
    hidden, gen = args.hidden, torch.Generator().manual_seed(0)
    w_mh, w_h = torch.randn(hidden, hidden, generator=gen), torch.randn(4 * hidden, hidden, generator=gen)
    products = {"fwd h@w_mh.T": w_mh, "fwd m@w_h.T": w_h, "bwd dz@w_h": w_h.t(), "bwd dmh@w_mh": w_mh.t()}
    for label, weight in products.items():
        x = torch.randn(args.batch, weight.shape[1], generator=gen)
        matmuls = {kind: build(kind, weight, args.batch) for kind in kinds}
        calls = {kind: (lambda m=m: m(x)) for kind, m in matmuls.items()}
        flops = 2 * args.batch * weight.shape[0] * weight.shape[1]
        # Rounds of ~50 ms (at most 2000 calls for toy sizes): thread pools spinning down after the
        # previous round then do not dominate a round.
        repeat = max(3, min(2000, int(4e9 / flops)))
        median = time_calls(calls, repeat, args.rounds)
        rates = "  ".join(f"{kind} {flops / median[kind] / 1e9:6.3g}" for kind in kinds)
        ratio = f"  native/onednn {median['onednn'] / median['native']:.2f}x" if len(kinds) == 3 else ""
        print(f"{label:>13} [{args.batch}x{weight.shape[1]}]x[{weight.shape[1]}x{weight.shape[0]}]: "
              f"{rates} GFLOP/s{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
