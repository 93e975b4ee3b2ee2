"""The mLSTM time loop as one autograd Function (Krause et al. 2016, multiplicative LSTM).

Per step, with ``xm_t = W_mx x_t`` and ``xg_t = W_x x_t + b`` precomputed for the whole sequence::

    m_t   = xm_t * (h_{t-1} @ w_mh.T)
    z_t   = xg_t + m_t @ w_h.T                 # gate order along 4H: i, f, o, u
    c_t   = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(u)
    h_t   = sigmoid(o) * tanh(c_t)

Why a hand-written Function rather than plain autograd: autograd would record ~15 nodes per step and
compute the weight gradients as T small matmuls.  Here the loops (forward and backward) only do the two
recurrent matmuls and hand the pointwise work in between to a fused cell (:mod:`mlstm_trainer.cell`)
that writes into preallocated buffers, and the weight gradients are two big matmuls over all ``B*T``
rows at the end, the way cuDNN does its LSTMs.

Layout: buffers copy the memory layout of ``xm``/``xg`` (``empty_like``).  The model passes time-major
``[T, B, ...]`` memory viewed as ``[B, T, ...]``, so each step's ``[B, ...]`` slice is one contiguous
block.  Plain batch-major inputs work too, with per-step slices of row stride ``T * width`` (the
matmuls of :mod:`mlstm_trainer.recurrent_matmul` and the cells take any row stride).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from mlstm_trainer import cuda_graphs
from mlstm_trainer.cell import BackwardStep, ForwardStep, select_cell
from mlstm_trainer.recurrent_matmul import RecurrentMatmul


def mlstm_recurrence(
    xm: Tensor,
    xg: Tensor,
    w_mh: Tensor,
    w_h: Tensor,
    h0: Tensor,
    c0: Tensor,
    keep: Tensor | None = None,
    *,
    graphs: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the mLSTM over a sequence.

    Args:
        xm: ``[B, T, H]`` multiplicative input projection ``x_t @ W_mx.T``.
        xg: ``[B, T, 4H]`` gate input projection ``x_t @ W_x.T + b``.
        w_mh: ``[H, H]`` hidden-to-m weight.
        w_h: ``[4H, H]`` m-to-gates weight.
        h0, c0: ``[B, H]`` initial state.
        keep: ``[B, T]`` floats, 1.0 keeps the state and 0.0 zeroes it *before* step ``t`` (a document
            boundary), or ``None`` for no resets.
        graphs: on CUDA, while autograd records, replay the loops as captured CUDA graphs
            (:mod:`mlstm_trainer.cuda_graphs`); ignored elsewhere.

    All tensors must share one dtype and device.

    Returns:
        ``(hs [B, T, H], h_last [B, H], c_last [B, H])``; ``h_last`` equals ``hs[:, -1]`` but is its own
        tensor, and gradients arriving through both are summed.
    """
    _check_inputs(xm, xg, w_mh, w_h, h0, c0, keep)
    xm, xg = _unit_feature_stride(xm), _unit_feature_stride(xg)
    keep = None if keep is None else keep.contiguous()
    graph_factory = cuda_graphs.graph_factory_for(xm, graphs)
    return _MLSTMRecurrence.apply(xm, xg, w_mh, w_h, h0, c0, keep, graph_factory)


def _unit_feature_stride(x: Tensor) -> Tensor:
    """``x`` itself when its last dim is dense, else a contiguous copy.

    The cells read each step's ``[B, F]`` slice as rows of ``F`` adjacent values (the native cell's C
    code relies on it); any batch and time strides are fine, so the model's time-major views pass as is.
    """
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _check_inputs(
    xm: Tensor, xg: Tensor, w_mh: Tensor, w_h: Tensor, h0: Tensor, c0: Tensor, keep: Tensor | None
) -> None:
    """Fail early with a readable message; a shape slip would otherwise surface deep inside a matmul."""
    batch, steps, hidden = xm.shape
    expected = {
        "xg": (xg, (batch, steps, 4 * hidden)),
        "w_mh": (w_mh, (hidden, hidden)),
        "w_h": (w_h, (4 * hidden, hidden)),
        "h0": (h0, (batch, hidden)),
        "c0": (c0, (batch, hidden)),
    }
    if keep is not None:
        expected["keep"] = (keep, (batch, steps))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"mlstm_recurrence: {name} has shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.dtype != xm.dtype or tensor.device != xm.device:
            raise TypeError(
                f"mlstm_recurrence: {name} is {tensor.dtype} on {tensor.device}, "
                f"but xm is {xm.dtype} on {xm.device}"
            )
    if steps == 0:
        raise ValueError("mlstm_recurrence: the sequence is empty (T == 0)")


class _MLSTMRecurrence(torch.autograd.Function):
    """Forward and backward loops, run eagerly or replayed as CUDA graphs; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        xm: Tensor,
        xg: Tensor,
        w_mh: Tensor,
        w_h: Tensor,
        h0: Tensor,
        c0: Tensor,
        keep: Tensor | None,
        graph_factory: Callable[[Any], cuda_graphs.Replayable] | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # Unused outputs get None rather than a materialised zero tensor: skips work in backward.
        ctx.set_materialize_grads(False)
        ctx.device_type = xm.device.type
        args = (xm, xg, w_mh, w_h, h0, c0, keep)
        # Autocast off: the caller already chose the dtype, and autocast would silently re-cast each
        # per-step matmul (and allocate a fresh weight copy every step).
        with torch.autocast(device_type=ctx.device_type, enabled=False):
            if graph_factory is None:
                ctx.graphed = None
                saved, hs, h_last, c_last = _forward_loop(*args)
                ctx.save_for_backward(xm, w_mh, w_h, h0, keep, hs, *saved)
                return hs, h_last, c_last
            ctx.graphed = cuda_graphs.graphed_loops(_forward_loop, _graphed_backward, args, graph_factory)
            (_, hs, h_last, c_last), ctx.generation = ctx.graphed.forward(args)
        # Static buffers: hand out a view of hs (valid until the next forward, by which time its
        # backward has run) and copies of the carried state, which outlives the step.
        return hs.view_as(hs), h_last.clone(), c_last.clone()

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_hs: Tensor | None, grad_h_last: Tensor | None, grad_c_last: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        grads = (grad_hs, grad_h_last, grad_c_last)
        with torch.autocast(device_type=ctx.device_type, enabled=False):
            if ctx.graphed is not None:
                result = ctx.graphed.backward(ctx.generation, ctx.needs_input_grad, grads)
            else:
                xm, w_mh, w_h, h0, keep, hs, *saved = ctx.saved_tensors
                result = _backward_pass(ctx.needs_input_grad, grads, xm, w_mh, w_h, h0, keep, hs, *saved)
        return (*result, None, None)


def _backward_pass(
    needs_input_grad: tuple[bool, ...],
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    xm: Tensor,
    w_mh: Tensor,
    w_h: Tensor,
    h0: Tensor,
    keep: Tensor | None,
    hs: Tensor,
    gates: Tensor,
    mh: Tensor,
    m: Tensor,
    c_prev: Tensor,
    tanh_c: Tensor,
) -> tuple[Tensor | None, ...]:
    """All input gradients: (dxm, dxg, dw_mh, dw_h, dh0, dc0)."""
    dxm, dxg, d_mh, dh0, dc0 = _backward_loop(grads, xm, w_mh, w_h, keep, gates, mh, c_prev, tanh_c)
    dw_mh, dw_h = _weight_grads(needs_input_grad, dxg, d_mh, m, h0, hs, keep)
    return dxm, dxg, dw_mh, dw_h, dh0, dc0


def _graphed_backward(
    needs_input_grad: tuple[bool, ...],
    grads: tuple[Tensor | None, ...],
    static_args: tuple[Tensor | None, ...],
    forward_outputs: tuple,
) -> tuple[Tensor | None, ...]:
    """:func:`_backward_pass` over a captured forward's static inputs and outputs."""
    xm, _, w_mh, w_h, h0, _, keep = static_args
    saved, hs, _, _ = forward_outputs
    return _backward_pass(needs_input_grad, tuple(grads), xm, w_mh, w_h, h0, keep, hs, *saved)


def _forward_loop(
    xm: Tensor, xg: Tensor, w_mh: Tensor, w_h: Tensor, h0: Tensor, c0: Tensor, keep: Tensor | None
) -> tuple[tuple[Tensor, ...], Tensor, Tensor, Tensor]:
    """Step through time; returns (saved buffers for backward, hs, h_last, c_last)."""
    batch, steps, _ = xm.shape
    gates = torch.empty_like(xg)  # activated i, f, o, u
    mh = torch.empty_like(xm)  # h_{t-1} @ w_mh.T, needed for d xm
    m = torch.empty_like(xm)  # m_t, the input of the big dW_h matmul
    c_prev = torch.empty_like(xm)  # c_{t-1} after the reset, needed for d f
    tanh_c = torch.empty_like(xm)  # tanh(c_t), needed for d o and d c
    hs = torch.empty_like(xm)
    c_last = torch.empty_like(c0)
    h_reset = torch.empty_like(h0) if keep is not None else None
    cell = select_cell(xm.device, xm.dtype)
    mh_matmul = RecurrentMatmul(w_mh, batch, steps)  # x @ w_mh.T
    z_matmul = RecurrentMatmul(w_h, batch, steps)  # x @ w_h.T
    h_prev = h0 if keep is None else h0 * keep[:, :1]
    if keep is None:
        c_prev[:, 0].copy_(c0)
    else:
        torch.mul(c0, keep[:, :1], out=c_prev[:, 0])
    # Each buffer's per-step [B, ...] views, made in one call per buffer: indexing x[:, t] in the loop
    # cost ~15 Python-level slices per step, a fifth of a step at H=256.
    xm_, xg_, mh_, m_, c_, gates_, tanh_c_, hs_ = (
        x.unbind(1) for x in (xm, xg, mh, m, c_prev, gates, tanh_c, hs)
    )
    keep_ = (None,) * steps if keep is None else keep.unsqueeze(2).unbind(1)  # [B, 1] each
    for t in range(steps):
        mh_matmul(h_prev, out=mh_[t])
        cell.mul(m_[t], xm_[t], mh_[t])
        z = z_matmul.plus(m_[t], xg_[t])
        last = t + 1 == steps
        c_next = c_last if last else c_[t + 1]
        # Rows that start a new document at t+1 get a zeroed state there; hs keeps the un-reset value.
        keep_next = None if last else keep_[t + 1]
        cell.forward(ForwardStep(z, c_[t], gates_[t], c_next, tanh_c_[t], hs_[t], keep_next, h_reset))
        h_prev = hs_[t] if keep_next is None else h_reset
    h_last = hs[:, -1].clone()  # its own storage: Function outputs must not alias each other
    return (gates, mh, m, c_prev, tanh_c), hs, h_last, c_last


def _backward_loop(
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    xm: Tensor,
    w_mh: Tensor,
    w_h: Tensor,
    keep: Tensor | None,
    gates: Tensor,
    mh: Tensor,
    c_prev: Tensor,
    tanh_c: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Walk time in reverse; returns (dxm, dxg, d_mh, dh0, dc0). Only recurrent matmuls run per step."""
    grad_hs, grad_h_last, grad_c_last = grads
    if grad_hs is not None:
        grad_hs = _unit_feature_stride(grad_hs)  # e.g. an expanded gradient of hs.sum()
    batch, steps, _ = xm.shape
    dxg = torch.empty_like(gates)  # doubles as dZ for all steps, which dW_h needs
    dxm = torch.empty_like(xm)
    d_mh = torch.empty_like(xm)  # per-step d(h_{t-1} @ w_mh.T); stored for dW_mh
    dh = _zeros_or_clone(grad_h_last, xm)  # running dL/dh_t
    dc = _zeros_or_clone(grad_c_last, xm)  # running dL/dc_t
    cell = select_cell(xm.device, xm.dtype)
    # Backward multiplies by the weights untransposed: x @ w == x @ (w.T).T
    dm_matmul = RecurrentMatmul(w_h.t(), batch, steps)
    dh_matmul = RecurrentMatmul(w_mh.t(), batch, steps)
    gates_, tanh_c_, c_, dxg_, mh_, dxm_, xm_, d_mh_ = (
        x.unbind(1) for x in (gates, tanh_c, c_prev, dxg, mh, dxm, xm, d_mh)
    )  # per-step views, as in _forward_loop
    grad_h_ = (None,) * steps if grad_hs is None else grad_hs.unbind(1)
    keep_ = (None,) * steps if keep is None else keep.unsqueeze(2).unbind(1)
    for t in reversed(range(steps)):
        # The gradients arriving from step t+1 belong to its reset state: scale them by its keep.
        scale = keep_[t + 1] if t + 1 < steps else None
        cell.backward(BackwardStep(dh, grad_h_[t], scale, gates_[t], tanh_c_[t], c_[t], dc, dxg_[t]))
        d_m = dm_matmul(dxg_[t])
        cell.mul2(d_m, mh_[t], dxm_[t], xm_[t], d_mh_[t])
        dh = dh_matmul(d_mh_[t])  # dL/d h_{t-1} as step t used it, before step t's reset
    if keep is not None:
        dh.mul_(keep[:, :1])
        dc.mul_(keep[:, :1])
    return dxm, dxg, d_mh, dh, dc


def _weight_grads(
    needs_input_grad: tuple[bool, ...],
    dz: Tensor,
    d_mh: Tensor,
    m: Tensor,
    h0: Tensor,
    hs: Tensor,
    keep: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """dW_mh and dW_h as one matmul each over all B*T rows (instead of T small ones in the loop)."""
    hidden = hs.shape[2]
    # Pair rows in the buffers' memory order so flattening is a view, not a copy (see _rows).
    time_major = _is_time_major(dz)
    dw_mh = dw_h = None
    if needs_input_grad[3]:
        dw_h = _rows(dz, time_major).t().mm(_rows(m, time_major))
    if needs_input_grad[2]:
        dw_mh = _rows(d_mh, time_major).t().mm(_h_prev_rows(h0, hs, keep, time_major))
    return dw_mh, dw_h


def _h_prev_rows(h0: Tensor, hs: Tensor, keep: Tensor | None, time_major: bool) -> Tensor:
    """Every step's h_{t-1} (after resets) as ``[B*T, H]`` rows in the order ``_rows`` uses.

    Rebuilt from ``hs`` here rather than stored by forward: saves B*T*H memory for one cheap copy.
    """
    seq_dim = 0 if time_major else 1
    if time_major:
        hs = hs.transpose(0, 1)
        keep = None if keep is None else keep.t()
    h_prev = torch.cat([h0.unsqueeze(seq_dim), hs.narrow(seq_dim, 0, hs.shape[seq_dim] - 1)], seq_dim)
    if keep is not None:
        h_prev.mul_(keep.unsqueeze(2))
    return h_prev.reshape(-1, h_prev.shape[2])


def _is_time_major(x: Tensor) -> bool:
    """Whether ``[B, T, F]`` ``x`` keeps each step's ``[B, F]`` slice together in memory."""
    return x.stride(1) > x.stride(0)


def _rows(x: Tensor, time_major: bool) -> Tensor:
    """``[B, T, F]`` -> ``[B*T, F]``, rows ordered (t, b) if ``time_major`` else (b, t).

    Both operands of a weight-gradient matmul must use the same order; choosing the order that matches
    their memory layout makes this a free view (it copies only when a layout disagrees).
    """
    if time_major:
        x = x.transpose(0, 1)
    return x.reshape(-1, x.shape[2])


def _zeros_or_clone(grad: Tensor | None, like: Tensor) -> Tensor:
    """A writable [B, H] running gradient, seeded from an incoming grad when there is one."""
    if grad is None:
        return like.new_zeros(like.shape[0], like.shape[2])
    return grad.clone(memory_format=torch.contiguous_format)
