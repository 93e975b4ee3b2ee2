"""The CUDA-graph replay logic of the recurrence, on CPU.

No GPU runs here, so ``EagerReplay`` stands in for ``torch.cuda.CUDAGraph``: it keeps the captured
outputs as static buffers, poisons them with NaN at capture (a captured graph has computed nothing
yet), and on replay recomputes and copies into them.  That exercises what the graphed path must get
right (static inputs and outputs, buffers reused and overwritten across steps, carried state, the
forward/backward pairing) but not the capture itself, which only a CUDA device can check.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mlstm_trainer import cuda_graphs
from mlstm_trainer.cuda_graphs import EagerReplay
from mlstm_trainer.model import MLSTM

B, T, H, V = 3, 6, 8, 13


def _stand_in_factory(x: Tensor, requested: bool):
    """graph_factory_for with EagerReplay in place of CudaGraph and CPU allowed."""
    return EagerReplay if requested and torch.is_grad_enabled() else None


@pytest.fixture
def eager_replay(monkeypatch: pytest.MonkeyPatch):
    """Route the recurrence through the graph cache on CPU, with EagerReplay as the graph."""
    monkeypatch.setattr(cuda_graphs, "graph_factory_for", _stand_in_factory)
    cuda_graphs.clear_captured()
    yield
    cuda_graphs.clear_captured()


def _train_steps(model: MLSTM, batches: list[tuple[Tensor, Tensor | None]]) -> list[list[Tensor]]:
    """Truncated-BPTT steps with the state carried (detached) between them; per step: loss, state, grads."""
    state = None
    results = []
    for tokens, reset in batches:
        logits, state = model(tokens, state, reset)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens.roll(-1, 1).reshape(-1))
        loss = loss + state[1].square().mean()  # a gradient through the returned cell state too
        model.zero_grad(set_to_none=True)
        loss.backward()
        state = tuple(s.detach() for s in state)
        results.append([loss.detach(), *state, *(p.grad.clone() for p in model.parameters())])
    return results


def _batches(with_reset: bool) -> list[tuple[Tensor, Tensor | None]]:
    gen = torch.Generator().manual_seed(4)
    batches = []
    for step in range(3):
        reset = torch.zeros(B, T, dtype=torch.bool) if with_reset else None
        if reset is not None:
            reset[step % B, (2 * step + 1) % T] = True
        batches.append((torch.randint(0, V, (B, T), generator=gen), reset))
    return batches


def _model(graphs: bool = True) -> MLSTM:
    torch.manual_seed(0)
    return MLSTM(vocab_size=V, embed_dim=5, hidden_size=H, cuda_graphs=graphs)


@pytest.mark.parametrize("with_reset", [False, True], ids=["no-reset", "reset"])
def test_replayed_steps_match_eager_steps(with_reset: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = _batches(with_reset)
    eager = _train_steps(_model(graphs=False), batches)
    monkeypatch.setattr(cuda_graphs, "graph_factory_for", _stand_in_factory)
    cuda_graphs.clear_captured()
    try:
        replayed = _train_steps(_model(), batches)
        # One signature: captured once, then replayed for every step.
        assert len(cuda_graphs._CAPTURED) == 1
        loops = next(iter(cuda_graphs._CAPTURED.values()))
        assert loops.generation == len(batches)
    finally:
        cuda_graphs.clear_captured()
    for step, (ours, ref) in enumerate(zip(replayed, eager)):
        for index, (a, b) in enumerate(zip(ours, ref)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, s=step, i=index: f"step {s} #{i}: {m}")


def test_backward_after_a_newer_forward_is_refused(eager_replay: None) -> None:
    model = _model()
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    first, _ = model(tokens)
    second, _ = model(tokens)  # same shapes: replays the same graph, overwriting first's activations
    with pytest.raises(RuntimeError, match="another forward with the same shapes ran before this backward"):
        first.sum().backward()
    second.sum().backward()  # the latest forward's backward is fine


def test_evaluation_runs_eagerly_and_captures_nothing(eager_replay: None) -> None:
    model = _model()
    with torch.no_grad():
        model(torch.randint(0, V, (B, T)))
    assert not cuda_graphs._CAPTURED


def test_captured_signatures_are_bounded(eager_replay: None) -> None:
    """Each new shape captures (and pins) buffers; only the most recent MAX_CAPTURED are kept."""
    model = _model()
    for batch in range(1, cuda_graphs.MAX_CAPTURED + 3):
        logits, _ = model(torch.randint(0, V, (batch, T)))
        logits.sum().backward()
    assert len(cuda_graphs._CAPTURED) == cuda_graphs.MAX_CAPTURED


def test_graphs_are_never_captured_on_cpu() -> None:
    assert cuda_graphs.graph_factory_for(torch.zeros(1), requested=True) is None


def test_trainer_setting_reaches_the_model() -> None:
    """--cuda-graphs (or MLSTM_CUDA_GRAPHS, or cuda_graphs: in the config file) turns it on; off by default."""
    from mlstm_trainer.options import load_config
    from mlstm_trainer.trainer import build_model

    assert build_model(load_config([]), torch.device("cpu")).cuda_graphs is False
    assert build_model(load_config(["--cuda-graphs", "1"]), torch.device("cpu")).cuda_graphs is True
    assert load_config([], environ={"MLSTM_CUDA_GRAPHS": "true"}).cuda_graphs is True
