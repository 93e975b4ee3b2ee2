"""Replay the recurrence's forward and backward time loops as captured CUDA graphs.

At the paper's size a time step's GPU work (two GEMMs and one fused cell kernel, ~0.1 ms on an H100)
is shorter than the Python and launch overhead of issuing it, so an eager loop leaves the GPU idle
between steps.  Captured once per input signature, each loop becomes one ``graph.replay()``: the
kernels run back to back with no host work and no host synchronisation inside the step.

A captured graph reads and writes fixed ("static") memory, which shapes the rules here:

* inputs are copied into static buffers before each replay (the caller's tensors may live anywhere);
* outputs live in static buffers that the next replay overwrites.  The recurrence hands out views of
  them and clones the small carried state (``h_last``, ``c_last``);
* a backward must belong to the latest forward: every forward bumps a generation counter, and a
  backward for an older generation raises instead of reading overwritten activations.

Opt-in (the trainer's ``--cuda-graphs``, ``MLSTM(cuda_graphs=True)``, ``mlstm_recurrence(graphs=True)``);
CUDA only, ignored on CPU.  ``EagerReplay`` stands in for
``torch.cuda.CUDAGraph`` in the CPU tests: it re-runs the captured function and copies the results
into the captured outputs, so the static-buffer rules above are exercised without a GPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

# Signatures kept captured (e.g. the training batch plus one other); each holds a copy of the
# activations, so this bounds memory when shapes change.
MAX_CAPTURED = 2
_WARMUP_RUNS = 2  # eager runs before capture: compile Triton kernels, let cuBLAS pick its algorithms


class Replayable(Protocol):
    """What the graph cache needs from a CUDA graph: capture once, then replay."""

    def capture(self, fn: Callable[[], Any]) -> Any:
        """Record ``fn``; returns its (static) outputs, whose contents are defined only after replay."""

    def replay(self) -> None:
        """Run the recorded work again, writing the static outputs."""


class CudaGraph:
    """``torch.cuda.CUDAGraph`` with warm-up on a side stream, as ``make_graphed_callables`` does."""

    def __init__(self, pool: Any) -> None:
        self._graph = torch.cuda.CUDAGraph()
        self._pool = pool

    def capture(self, fn: Callable[[], Any]) -> Any:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(_WARMUP_RUNS):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(self._graph, pool=self._pool):
            outputs = fn()
        return outputs

    def replay(self) -> None:
        self._graph.replay()


class EagerReplay:
    """CPU stand-in for :class:`CudaGraph`: replay re-runs ``fn`` and copies into the first outputs."""

    def __init__(self, pool: Any = None) -> None:
        self._fn: Callable[[], Any] | None = None
        self._outputs: Any = None

    def capture(self, fn: Callable[[], Any]) -> Any:
        self._fn = fn
        self._outputs = fn()
        for tensor in _tensors(self._outputs):  # like a captured graph: nothing valid until replay
            tensor.data.fill_(float("nan"))
        return self._outputs

    def replay(self) -> None:
        assert self._fn is not None, "replay before capture"
        _copy_into(self._outputs, self._fn())


def graph_factory_for(x: Tensor, requested: bool) -> Callable[[Any], Replayable] | None:
    """The graph kind to capture loops over ``x`` with when ``requested``, or None to run them eagerly.

    Only while autograd records (training): evaluation and sampling change shapes often and gain
    little, so they stay eager and do not pin more captured buffers.
    """
    if requested and x.is_cuda and torch.is_grad_enabled():
        return CudaGraph
    return None


class GraphedLoops:
    """Forward and backward loops captured for one input signature, sharing their static buffers.

    ``forward_fn(*static_args)`` returns the forward's outputs; ``backward_fn(needs_input_grad,
    static_grads, static_args, forward_outputs)`` returns the gradients.  One backward graph is
    captured per pattern of missing incoming gradients and requested input gradients.
    """

    def __init__(
        self,
        forward_fn: Callable[..., Any],
        backward_fn: Callable[..., Any],
        args: Sequence[Tensor | None],
        graph_factory: Callable[[Any], Replayable],
    ) -> None:
        self._backward_fn = backward_fn
        self._factory = graph_factory
        self._pool = torch.cuda.graph_pool_handle() if graph_factory is CudaGraph else None
        self.static_args = [_static_copy(a) for a in args]
        self._forward_graph = graph_factory(self._pool)
        self.outputs = self._forward_graph.capture(lambda: forward_fn(*self.static_args))
        self._backward: dict[tuple, tuple[list[Tensor | None], Replayable, Any]] = {}
        self.generation = 0

    def forward(self, args: Sequence[Tensor | None]) -> tuple[Any, int]:
        """Copy ``args`` in, replay; returns (static outputs, this forward's generation)."""
        _copy_args(self.static_args, args)
        self._forward_graph.replay()
        self.generation += 1
        return self.outputs, self.generation

    def backward(
        self, generation: int, needs_input_grad: tuple[bool, ...], grads: Sequence[Tensor | None]
    ) -> Any:
        """Replay the backward for forward ``generation``; returns the static gradient outputs."""
        if generation != self.generation:
            raise RuntimeError(
                "CUDA-graphed mLSTM: another forward with the same shapes ran before this backward and "
                "overwrote its activations; run backward after each forward, or turn CUDA graphs off"
            )
        key = (tuple(g is None for g in grads), tuple(needs_input_grad))
        entry = self._backward.get(key)
        if entry is None:
            static_grads = [_static_copy(g) for g in grads]
            graph = self._factory(self._pool)
            outputs = graph.capture(
                lambda: self._backward_fn(needs_input_grad, static_grads, self.static_args, self.outputs)
            )
            entry = self._backward[key] = (static_grads, graph, outputs)
        static_grads, graph, outputs = entry
        _copy_args(static_grads, grads)
        graph.replay()
        return outputs


_CAPTURED: OrderedDict[tuple, GraphedLoops] = OrderedDict()


def graphed_loops(
    forward_fn: Callable[..., Any],
    backward_fn: Callable[..., Any],
    args: Sequence[Tensor | None],
    graph_factory: Callable[[Any], Replayable] = CudaGraph,
) -> GraphedLoops:
    """The captured loops for ``args``' signature, capturing them on first use (LRU of MAX_CAPTURED)."""
    key = (forward_fn, backward_fn, graph_factory, *(_signature(a) for a in args))
    loops = _CAPTURED.get(key)
    if loops is None:
        loops = GraphedLoops(forward_fn, backward_fn, args, graph_factory)
        _CAPTURED[key] = loops
        while len(_CAPTURED) > MAX_CAPTURED:
            _CAPTURED.popitem(last=False)
    _CAPTURED.move_to_end(key)
    return loops


def clear_captured() -> None:
    """Drop every captured graph and its buffers (tests; or to free memory after training)."""
    _CAPTURED.clear()


def _signature(x: Tensor | None) -> tuple | None:
    if x is None:
        return None
    return (tuple(x.shape), x.stride(), x.dtype, x.device)


def _static_copy(x: Tensor | None) -> Tensor | None:
    """A buffer holding a copy of ``x``: with ``x``'s strides when it is batch- or time-major
    (the layouts the loops are fast with), else contiguous (say the expanded gradient of ``hs.sum()``)."""
    if x is None:
        return None
    if x.is_contiguous() or (x.dim() >= 2 and x.transpose(0, 1).is_contiguous()):
        static = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    else:
        static = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return static.copy_(x)


def _copy_args(statics: Sequence[Tensor | None], args: Sequence[Tensor | None]) -> None:
    for static, arg in zip(statics, args, strict=True):
        if (static is None) != (arg is None):
            raise RuntimeError("CUDA-graphed mLSTM: an argument changed between None and a tensor")
        if static is not None:
            static.copy_(arg)


def _copy_into(dst: Any, src: Any) -> None:
    """Copy as a graph replay writes: through ``.data``, which autograd's version counters do not see."""
    for a, b in zip(_tensors(dst), _tensors(src), strict=True):
        a.data.copy_(b)


def _tensors(tree: Any) -> list[Tensor]:
    """The tensors of a nested tuple/list, in order (None entries skipped)."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    return []
