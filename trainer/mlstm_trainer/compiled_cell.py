"""The mLSTM cell's pointwise work fused by ``torch.compile``: one kernel per step and direction.

On CUDA, :class:`~mlstm_trainer.cell.TorchCell` launches about 8 kernels per forward step and 12 per
backward step, each reading and writing ``[B, 4H]`` or ``[B, H]`` blocks from GPU memory; at the
paper's size (H=4096, B=256 per GPU) that traffic and the launch gaps cost more than the step's
pointwise math.  Here the same math is written as pure functions that store into the loop's buffers,
and Inductor fuses each into a single Triton kernel (on CPU it generates C++, which is how the tests
check the fused code without a GPU).

Each step's slices differ only in their storage offset; the functions are compiled with dynamic
shapes so all steps (and batch sizes) share one compiled kernel instead of recompiling per step.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from mlstm_trainer.cell import CELL_ENV, BackwardStep, ForwardStep, TorchCell

# Set when compiling the cell failed in this process (no Triton, no C compiler, ...): later loops that
# chose the cell automatically then go straight to plain torch ops.
compile_failure: str | None = None


def _forward_math(
    z: Tensor, c_prev: Tensor, keep_next: Tensor, gates: Tensor, c_next: Tensor, tanh_c: Tensor, h: Tensor,
    h_reset: Tensor,
) -> None:
    """TorchCell.forward as one expression graph; ``keep_next`` is all ones when there is no reset."""
    hidden = c_prev.shape[1]
    ifo = torch.sigmoid(z[:, : 3 * hidden])
    u = torch.tanh(z[:, 3 * hidden :])
    i, f, o = ifo[:, :hidden], ifo[:, hidden : 2 * hidden], ifo[:, 2 * hidden :]
    c = f * c_prev + i * u
    t = torch.tanh(c)
    out = o * t
    gates[:, : 3 * hidden].copy_(ifo)
    gates[:, 3 * hidden :].copy_(u)
    tanh_c.copy_(t)
    h.copy_(out)
    c_next.copy_(c * keep_next)
    h_reset.copy_(out * keep_next)


def _backward_math(
    dh: Tensor, grad_h: Tensor, scale: Tensor, gates: Tensor, tanh_c: Tensor, c_prev: Tensor, dc: Tensor,
    dz: Tensor,
) -> None:
    """TorchCell.backward as one expression graph; ``scale`` is all ones when there is no reset."""
    hidden = c_prev.shape[1]
    i, f = gates[:, :hidden], gates[:, hidden : 2 * hidden]
    o, u = gates[:, 2 * hidden : 3 * hidden], gates[:, 3 * hidden :]
    h_grad = dh * scale + grad_h
    c_grad = dc * scale + h_grad * o * (1 - tanh_c * tanh_c)
    dz[:, :hidden].copy_(c_grad * u * i * (1 - i))
    dz[:, hidden : 2 * hidden].copy_(c_grad * c_prev * f * (1 - f))
    dz[:, 2 * hidden : 3 * hidden].copy_(h_grad * tanh_c * o * (1 - o))
    dz[:, 3 * hidden :].copy_(c_grad * i * (1 - u * u))
    dc.copy_(c_grad * f)


def _mul2_math(grad: Tensor, a: Tensor, out_a: Tensor, b: Tensor, out_b: Tensor) -> None:
    out_a.copy_(grad * a)
    out_b.copy_(grad * b)


@functools.cache
def _compiled(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` compiled once per process (Dynamo caches the graphs; this caches the wrapper)."""
    return torch.compile(fn, dynamic=True, fullgraph=True)


class CompiledCell:
    """:class:`~mlstm_trainer.cell.Cell` with Inductor-fused forward and backward steps.

    With ``fallback`` (the automatic choice on CUDA), a failure to *compile* (Dynamo/Inductor errors,
    e.g. no Triton or no C compiler in the image) warns once and runs the same step with plain torch
    ops instead of stopping the run; errors while running compiled code still raise.  Compilation
    happens before any kernel writes, so the fallback starts from untouched buffers.

    Missing ``keep_next``/``scale``/``grad_h`` become ones or zeros so every step runs the same
    compiled graph; ``h_reset`` gets a scratch block when the caller has none.  Keep columns are made
    contiguous (B values) so they match those constants' strides: Dynamo specialises strides of 1, and
    a column of a ``[B, T]`` mask has stride T, which would otherwise compile a second graph.
    """

    name = "compiled"

    def __init__(self, fallback: bool = False) -> None:
        self._forward = _compiled(_forward_math)
        self._backward = _compiled(_backward_math)
        self._mul2 = _compiled(_mul2_math)
        self._constants: dict[tuple, Tensor] = {}
        self._fallback = TorchCell() if fallback else None

    def _run(self, compiled: Callable[..., None], args: tuple, fallback: Callable[[], None]) -> None:
        """``compiled(*args)``, or ``fallback()`` once compiling has failed and falling back is allowed."""
        global compile_failure
        if self._fallback is not None and compile_failure is not None:
            fallback()
            return
        try:
            compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as err:
            if self._fallback is None:
                raise
            first_line = (str(err).strip().splitlines() or [""])[0]
            compile_failure = f"{type(err).__name__}: {first_line}"
            warnings.warn(
                f"mlstm: torch.compile of the fused cell failed ({compile_failure}); using plain torch ops, "
                f"which is slower. Set {CELL_ENV}=torch to skip the attempt.",
                RuntimeWarning,
                stacklevel=2,
            )
            fallback()

    def mul(self, out: Tensor, a: Tensor, b: Tensor) -> None:
        torch.mul(a, b, out=out)  # already a single kernel

    def forward(self, step: ForwardStep) -> None:
        keep_next, h_reset = step.keep_next, step.h_reset
        if keep_next is None:
            keep_next = self._constant(1.0, (step.c_prev.shape[0], 1), step.c_prev)
            h_reset = self._constant(0.0, step.c_prev.shape, step.c_prev, key="h_reset")
        args = (step.z, step.c_prev, keep_next.contiguous(), step.gates, step.c_next, step.tanh_c, step.h, h_reset)
        self._run(self._forward, args, lambda: self._fallback.forward(step))

    def backward(self, step: BackwardStep) -> None:
        scale, grad_h = step.scale, step.grad_h
        if scale is None:
            scale = self._constant(1.0, (step.c_prev.shape[0], 1), step.c_prev)
        if grad_h is None:
            grad_h = self._constant(0.0, step.c_prev.shape, step.c_prev)
        args = (step.dh, grad_h, scale.contiguous(), step.gates, step.tanh_c, step.c_prev, step.dc, step.dz)
        self._run(self._backward, args, lambda: self._fallback.backward(step))

    def mul2(self, grad: Tensor, a: Tensor, out_a: Tensor, b: Tensor, out_b: Tensor) -> None:
        args = (grad, a, out_a, b, out_b)
        self._run(self._mul2, args, lambda: self._fallback.mul2(*args))

    def _constant(self, value: float, shape: tuple[int, ...] | torch.Size, like: Tensor, key: str = "") -> Tensor:
        """A cached filled block (``key`` separates a scratch output from a read-only constant)."""
        cache_key = (key, value, tuple(shape), like.dtype, like.device)
        block = self._constants.get(cache_key)
        if block is None:
            block = torch.full(tuple(shape), value, dtype=like.dtype, device=like.device)
            self._constants[cache_key] = block
        return block
