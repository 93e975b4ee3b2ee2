"""``x @ weight.T`` for a weight that every step of the mLSTM's time loops reuses.

Each step multiplies only B rows (the batch) by a weight of up to ``4H x H``.  At that shape how the
weight is laid out in memory matters more than usual, and the loop can afford to lay it out once and
reuse it for all T steps.  Three implementations, chosen per loop by :class:`RecurrentMatmul`:

* ``native``: our own AVX2/FMA kernel (``_packedgemm.c``) over a weight packed into 24-column strips,
  with the caller's threads plus a small spinning pool.  ``bench/recurrent_matmul.py`` at B=32,
  H=1024 on this 2-core AMD EPYC VM (noisy: +-15% between runs), native / oneDNN GFLOP/s: one thread
  1.2x for the ``H x H`` products and 1.5x for the ``4H x H`` ones; two threads 0.8x and 1.15x.  A whole
  training step (``bench/throughput.py``) is 1.24-1.36x faster than with oneDNN.
  Needs x86-64 with AVX2 and FMA, float32 on CPU and an output width divisible by 8.
* ``onednn``: the weight reordered once into oneDNN's blocked layout, as ``torch.nn.LSTM``'s oneDNN
  kernel does.  A plain ``torch.mm`` re-packs the whole weight on every call, which made each matmul
  about 15-30% slower at B=32.  The two oneDNN ops are torch internals (the ones Inductor's CPU
  backend uses), hence the ``hasattr`` guard.
* ``torch``: a plain matmul.  Used on CUDA, for other dtypes, and for short loops (sampling token by
  token), where packing would cost more than it saves.

``MLSTM_RECURRENT_MATMUL=auto|native|onednn|torch`` overrides the automatic choice (native, else
oneDNN for weights big enough to pay off, else torch) for loops long enough to pack; asking for an
implementation that cannot run here is a :class:`ConfigError`, not a silent fallback.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from mlstm_trainer.config import ConfigError

try:  # the C extension is optional: without it the loops use oneDNN or torch
    from mlstm_trainer import _packedgemm
except ImportError:  # pragma: no cover - depends on how the package was installed
    _packedgemm = None

MATMUL_ENV = "MLSTM_RECURRENT_MATMUL"
MATMUL_CHOICES = ("auto", "native", "onednn", "torch")

# Packing costs about as much as a few steps' matmuls, so short loops skip it.  oneDNN's fixed
# per-call cost outweighs its faster kernel for small weights (below about 4H x H with H = 360,
# measured on one core at B=32); the native kernel has no such threshold.
MIN_STEPS_TO_PACK = 8
_MIN_WEIGHT_NUMEL_FOR_ONEDNN = 1 << 19
# Multiply-adds per thread below which another thread costs more than it saves (~25 us of work).
_MACS_PER_THREAD = 1 << 20


def matmul_choice() -> str:
    """``MLSTM_RECURRENT_MATMUL``, checked; the trainer calls it at start-up so a typo stops the run."""
    choice = os.environ.get(MATMUL_ENV, "auto").strip().lower() or "auto"
    if choice not in MATMUL_CHOICES:
        raise ConfigError(f"{MATMUL_ENV}={choice!r} is not one of {', '.join(MATMUL_CHOICES)}")
    return choice


def native_available() -> bool:
    """Whether the native kernel was built and this CPU can run it (AVX2 and FMA)."""
    return _packedgemm is not None and _packedgemm.supported()


class RecurrentMatmul:
    """``x @ weight.T`` for ``[batch, K]`` inputs and a ``[N, K]`` weight (any strides) reused ``steps``
    times.  ``threads`` defaults to ``torch.get_num_threads()``; ``kind`` says which implementation this loop uses (see the module docstring).
    """

    def __init__(self, weight: Tensor, batch: int, steps: int, threads: int | None = None) -> None:
        self.weight = weight
        self.kind = choose_kind(weight.device, weight.dtype, tuple(weight.shape), steps)
        # More threads than CPUs would leave spinning workers time-sliced against the caller.
        self.threads = min(torch.get_num_threads() if threads is None else threads, _cpus())
        self.packed: Tensor | None = None
        if self.kind == "native":
            self.packed = pack_weight(weight)
        elif self.kind == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch)

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """``x @ weight.T``, written into ``out`` when given, else a new tensor."""
        if self.kind == "native":
            return self._native(x, out, None)
        if self.kind == "onednn":
            product = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
            return product if out is None else out.copy_(product)
        return torch.mm(x, self.weight.t(), out=out)

    def plus(self, x: Tensor, other: Tensor) -> Tensor:
        """A new tensor ``other + x @ weight.T`` (the add fused into the matmul)."""
        if self.kind == "native":
            return self._native(x, None, other)
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, None, "add")
        return torch.addmm(other, x, self.weight.t())

    def _native(self, x: Tensor, out: Tensor | None, init: Tensor | None) -> Tensor:
        rows, width = x.shape[0], self.weight.shape[0]
        _check_rows(x, rows, self.weight.shape[1], "x")
        if out is None:
            out = torch.empty(rows, width, dtype=torch.float32)
        _check_rows(out, rows, width, "out")
        init_ptr, init_stride = (0, 0) if init is None else _check_rows(init, rows, width, "other")
        threads = max(1, min(self.threads, rows * x.shape[1] * width // _MACS_PER_THREAD))
        _packedgemm.matmul(
            rows, x.shape[1], width, x.data_ptr(), x.stride(0), self.packed.data_ptr(),
            out.data_ptr(), out.stride(0), init_ptr, init_stride, threads,
        )  # fmt: skip
        return out


def pack_weight(weight: Tensor) -> Tensor:
    """``weight`` (``[N, K]``, float32 CPU, any strides) as the native kernel's strips of ``weight.T``."""
    width, depth = weight.shape
    packed = torch.empty(width * depth, dtype=torch.float32)
    # The kernel reads B = weight.T: B[k, n] = weight[n, k].
    _packedgemm.pack(depth, width, weight.data_ptr(), weight.stride(1), weight.stride(0), packed.data_ptr())
    return packed


def choose_kind(device: torch.device, dtype: torch.dtype, shape: tuple[int, int], steps: int) -> str:
    """Which implementation a loop of ``steps`` steps over a ``[N, K]`` weight uses (see the module
    docstring); raises :class:`ConfigError` for a forced choice that cannot run here."""
    choice = matmul_choice()
    if steps < MIN_STEPS_TO_PACK or choice == "torch":
        return "torch"
    if choice == "native":
        if not native_available():
            raise ConfigError(
                f"{MATMUL_ENV}=native: the kernel is not built or this CPU lacks AVX2/FMA; "
                "reinstall with a C compiler present (pip install -e .) or unset the variable"
            )
        if not _native_fits(device, dtype, shape[0]):
            raise ConfigError(
                f"{MATMUL_ENV}=native runs float32 on CPU with widths divisible by 8, not a "
                f"{dtype} weight of shape {shape} on {device}; unset it"
            )
        return "native"
    if choice == "onednn":
        if not _onednn_fits(device, dtype):
            raise ConfigError(
                f"{MATMUL_ENV}=onednn needs a float32 CPU weight and torch built with oneDNN, not a "
                f"{dtype} weight on {device}; unset it"
            )
        return "onednn"
    if native_available() and _native_fits(device, dtype, shape[0]):
        return "native"
    if _onednn_fits(device, dtype) and shape[0] * shape[1] >= _MIN_WEIGHT_NUMEL_FOR_ONEDNN:
        return "onednn"
    return "torch"


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _native_fits(device: torch.device, dtype: torch.dtype, width: int) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and width % 8 == 0


def _onednn_fits(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _check_rows(x: Tensor, rows: int, width: int, name: str) -> tuple[int, int]:
    """``(data pointer, row stride)`` of a ``[rows, width]`` float32 CPU tensor with unit column stride.

    The kernel reads raw pointers, so a mismatch is a bug in the caller and raises before any access.
    """
    if (
        x.dtype != torch.float32
        or x.device.type != "cpu"
        or tuple(x.shape) != (rows, width)
        or (x.stride(1) != 1 and width > 1)
    ):
        raise ValueError(
            f"RecurrentMatmul: {name} must be a [{rows}, {width}] float32 CPU tensor with unit column "
            f"stride, got {x.dtype} on {x.device} with shape {tuple(x.shape)} and strides {x.stride()}"
        )
    return x.data_ptr(), x.stride(0)
