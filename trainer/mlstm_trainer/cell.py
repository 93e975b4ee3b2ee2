"""The mLSTM cell's pointwise work per time step, in three interchangeable implementations.

The time loops in :mod:`mlstm_trainer.recurrence` do two matmuls per step and hand everything between
them to a cell object from :func:`select_cell`:

* :class:`TorchCell`: plain torch ops writing into ``out=`` buffers.  Works for every device and dtype
  and is the reference the others are tested against.
* :class:`NativeCell`: float32 on CPU.  One C function per step direction (``_cellkernels.c``, built by
  ``pip install``) instead of 6-12 torch ops, each of which pays dispatch and OpenMP fork/join costs
  that are large next to the work on a ``[B, H]`` slice.  Measured at H=1024, B=32 on two threads:
  155 us per forward step against 377 us for the torch ops, 60-74 us per backward step against
  197 us; about 8% of a whole training step, whose time is mostly the recurrent matmuls.
* :class:`CompiledCell`: CUDA.  The same math as :class:`TorchCell` as pure functions fused by
  ``torch.compile`` (Triton on GPUs), so each direction is one kernel launch per step.

``MLSTM_CELL=torch|native|compiled`` overrides the choice (``auto``, the default, picks per device and
dtype as above); asking for a kernel that cannot run here is an error, not a silent fallback.  Only
the automatic choice falls back: when ``torch.compile`` cannot build the CUDA cell (no Triton, no C
compiler), it warns once and the run continues on :class:`TorchCell`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from mlstm_trainer.config import ConfigError

try:  # the C extension is optional: a build without a compiler still trains, on TorchCell
    from mlstm_trainer import _cellkernels
except ImportError:  # pragma: no cover - depends on how the package was installed
    _cellkernels = None

CELL_ENV = "MLSTM_CELL"
CELL_CHOICES = ("auto", "torch", "native", "compiled")

_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input
_tanh_backward = torch.ops.aten.tanh_backward.grad_input


@dataclass(slots=True)
class ForwardStep:
    """One forward step's ``[B, ...]`` views: the cell activates ``z`` into ``gates`` (i, f, o sigmoid;
    u tanh) and writes ``c = f * c_prev + i * u``, ``tanh_c = tanh(c)``, ``h = o * tanh_c``.

    With ``keep_next`` (``[B, 1]``, the next step's keep factor) it also writes ``c_next = c * keep_next``
    and ``h_reset = h * keep_next``; without it ``c_next = c`` and ``h_reset`` is unused.
    """

    z: Tensor
    c_prev: Tensor
    gates: Tensor
    c_next: Tensor
    tanh_c: Tensor
    h: Tensor
    keep_next: Tensor | None = None
    h_reset: Tensor | None = None


@dataclass(slots=True)
class BackwardStep:
    """One backward step's ``[B, ...]`` views.

    ``dh`` (dL/dh_t from step t+1; may be overwritten) and ``dc`` (running dL/dc_t) are first multiplied
    by ``scale`` (``[B, 1]``, the keep factor of step t+1) when given, and ``grad_h`` (dL/dh_t from the
    outputs) is added to ``dh``.  The cell writes ``dz`` (``[B, 4H]``, the pre-activation gradient) and
    replaces ``dc`` by dL/dc_{t-1}.
    """

    dh: Tensor
    grad_h: Tensor | None
    scale: Tensor | None
    gates: Tensor
    tanh_c: Tensor
    c_prev: Tensor
    dc: Tensor
    dz: Tensor


class Cell(Protocol):
    """Per-step pointwise work of the forward and backward loops (all tensors ``[B, ...]``)."""

    def mul(self, out: Tensor, a: Tensor, b: Tensor) -> None:
        """``out = a * b``."""

    def forward(self, step: ForwardStep) -> None:
        """The forward cell; see :class:`ForwardStep`."""

    def backward(self, step: BackwardStep) -> None:
        """The backward cell; see :class:`BackwardStep`."""

    def mul2(self, grad: Tensor, a: Tensor, out_a: Tensor, b: Tensor, out_b: Tensor) -> None:
        """``out_a = grad * a`` and ``out_b = grad * b``."""


class TorchCell:
    """Plain torch ops into ``out=`` buffers; any device and dtype."""

    name = "torch"

    def mul(self, out: Tensor, a: Tensor, b: Tensor) -> None:
        torch.mul(a, b, out=out)

    def forward(self, step: ForwardStep) -> None:
        z, c_prev, gates, c_next, tanh_c, h, keep_next, h_reset = _fields(step)
        split = 3 * c_prev.shape[1]
        torch.sigmoid(z[:, :split], out=gates[:, :split])
        torch.tanh(z[:, split:], out=gates[:, split:])
        i, f, o, u = gates.chunk(4, dim=1)
        torch.mul(f, c_prev, out=c_next)
        c_next.addcmul_(i, u)
        torch.tanh(c_next, out=tanh_c)
        torch.mul(o, tanh_c, out=h)
        if keep_next is not None:
            c_next.mul_(keep_next)
            torch.mul(h, keep_next, out=h_reset)

    def backward(self, step: BackwardStep) -> None:
        dh, grad_h, scale, gates, tanh_c, c_prev, dc, dz = _fields(step)
        if scale is not None:
            dh.mul_(scale)
            dc.mul_(scale)
        if grad_h is not None:
            dh.add_(grad_h)
        split = 3 * c_prev.shape[1]
        i, f, o, u = gates.chunk(4, dim=1)
        dz_i, dz_f, dz_o, dz_u = dz.chunk(4, dim=1)
        torch.mul(dh, tanh_c, out=dz_o)
        dh.mul_(o)  # dh is scratch from here on: dL/d tanh_c
        dc.add_(_tanh_backward(dh, tanh_c, grad_input=dh))
        torch.mul(dc, u, out=dz_i)
        torch.mul(dc, c_prev, out=dz_f)
        torch.mul(dc, i, out=dz_u)
        _tanh_backward(dz_u, u, grad_input=dz_u)
        _sigmoid_backward(dz[:, :split], gates[:, :split], grad_input=dz[:, :split])
        dc.mul_(f)

    def mul2(self, grad: Tensor, a: Tensor, out_a: Tensor, b: Tensor, out_b: Tensor) -> None:
        torch.mul(grad, a, out=out_a)
        torch.mul(grad, b, out=out_b)


class NativeCell:
    """The C kernels of ``_cellkernels.c``: float32, CPU, rows with unit stride along the features.

    The kernels read raw pointers, so every call checks what the C code assumes; a failed check is a
    bug in the caller and raises rather than reading the wrong memory.
    """

    name = "native"

    def __init__(self) -> None:
        if _cellkernels is None:
            raise ConfigError(
                f"{CELL_ENV}=native: the C extension mlstm_trainer._cellkernels is not built; "
                "reinstall with a C compiler present (pip install -e .) or unset the variable"
            )
        self._zeros: Tensor | None = None

    def mul(self, out: Tensor, a: Tensor, b: Tensor) -> None:
        _cellkernels.mul(*_sizes(out, out.shape[1]), *_rows(out), *_rows(a), *_rows(b))

    def forward(self, step: ForwardStep) -> None:
        hidden = step.c_prev.shape[1]
        _check_width(step.z, 4 * hidden)
        _check_width(step.gates, 4 * hidden)
        keep = (0, 0, 0, 0) if step.keep_next is None else (*_column(step.keep_next), *_rows(step.h_reset))
        rows = (step.z, step.c_prev, step.gates, step.c_next, step.tanh_c, step.h)
        _cellkernels.forward_cell(*_sizes(step.c_prev, hidden), *(v for x in rows for v in _rows(x)), *keep)

    def backward(self, step: BackwardStep) -> None:
        hidden = step.c_prev.shape[1]
        _check_width(step.gates, 4 * hidden)
        _check_width(step.dz, 4 * hidden)
        grad_h = self._zeros_like(step.dh) if step.grad_h is None else step.grad_h
        scale = (0, 0) if step.scale is None else _column(step.scale)
        after = (step.gates, step.tanh_c, step.c_prev, step.dc, step.dz)
        _cellkernels.backward_cell(
            *_sizes(step.c_prev, hidden), *_rows(step.dh), *_rows(grad_h), *scale,
            *(v for x in after for v in _rows(x)),
        )

    def mul2(self, grad: Tensor, a: Tensor, out_a: Tensor, b: Tensor, out_b: Tensor) -> None:
        _cellkernels.mul2(
            *_sizes(grad, grad.shape[1]), *_rows(grad), *_rows(a), *_rows(out_a), *_rows(b), *_rows(out_b)
        )

    def _zeros_like(self, x: Tensor) -> Tensor:
        """A cached zero ``[B, H]`` block standing in for a missing output gradient."""
        if self._zeros is None or self._zeros.shape != x.shape:
            self._zeros = torch.zeros(x.shape, dtype=torch.float32)
        return self._zeros


def _fields(step: ForwardStep | BackwardStep) -> tuple:
    """A step's tensors in field order, for unpacking into local names."""
    return tuple(getattr(step, name) for name in step.__slots__)


def _sizes(x: Tensor, width: int) -> tuple[int, int]:
    return x.shape[0], width


def _rows(x: Tensor) -> tuple[int, int]:
    """``(data pointer, row stride)`` of a ``[rows, width]`` float32 CPU tensor with unit column stride."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(
            f"NativeCell needs [rows, width] float32 CPU tensors with unit column stride, got "
            f"{x.dtype} on {x.device} with shape {tuple(x.shape)} and strides {x.stride()}"
        )
    return x.data_ptr(), x.stride(0)


def _column(x: Tensor) -> tuple[int, int]:
    """``(data pointer, element stride)`` of a ``[rows, 1]`` float32 CPU column."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != 1:
        raise ValueError(f"NativeCell needs a [rows, 1] float32 CPU column, got {tuple(x.shape)} {x.dtype}")
    return x.data_ptr(), x.stride(0)


def _check_width(x: Tensor, width: int) -> None:
    if x.shape[1] != width:
        raise ValueError(f"NativeCell: expected width {width}, got shape {tuple(x.shape)}")


def native_available() -> bool:
    """Whether the C kernels were built with this installation."""
    return _cellkernels is not None


def cell_choice() -> str:
    """``MLSTM_CELL``, checked; the trainer calls it at start-up so a typo stops the run before step 1.

    Misconfigurations raise :class:`ConfigError` (one line, exit code 2 from the trainer).
    """
    choice = os.environ.get(CELL_ENV, "auto").strip().lower() or "auto"
    if choice not in CELL_CHOICES:
        raise ConfigError(f"{CELL_ENV}={choice!r} is not one of {', '.join(CELL_CHOICES)}")
    return choice


def select_cell(device: torch.device, dtype: torch.dtype) -> Cell:
    """The cell for tensors on ``device`` in ``dtype``: ``MLSTM_CELL`` if set, else the fastest that runs."""
    choice = cell_choice()
    automatic = choice == "auto"
    if automatic:
        if device.type == "cpu" and dtype == torch.float32 and native_available():
            choice = "native"
        elif device.type == "cuda":
            choice = "compiled"
        else:
            choice = "torch"
    if choice == "native":
        if device.type != "cpu" or dtype != torch.float32:
            raise ConfigError(f"{CELL_ENV}=native runs float32 on CPU only, not {dtype} on {device}; unset it")
        return NativeCell()
    if choice == "compiled":
        from mlstm_trainer import compiled_cell

        if automatic and compiled_cell.compile_failure is not None:
            return TorchCell()  # it failed once already this process (and warned)
        return compiled_cell.CompiledCell(fallback=automatic)
    return TorchCell()
