"""The trainer's optimizer: fused Adam where available, and steps with inf/NaN gradients skipped."""

from __future__ import annotations

import math

import pytest
import torch

from mlstm_trainer.config import TrainConfig
from mlstm_trainer.trainer import build_model, build_optimizer, step_unless_nonfinite


def _model_and_optimizer(fused: bool) -> tuple[torch.nn.Module, torch.optim.Adam]:
    config = TrainConfig()
    model = build_model(config, torch.device("cpu"))
    if fused:
        optimizer = build_optimizer(config, model)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr, foreach=False)
    return model, optimizer


def _set_grads(model: torch.nn.Module, poison: bool) -> torch.Tensor:
    """Random gradients (one NaN among them if ``poison``); returns their total norm like the trainer."""
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    if poison:
        next(iter(model.parameters())).grad.view(-1)[3] = float("nan")
    return torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def test_trainer_uses_fused_adam_on_cpu() -> None:
    _, optimizer = _model_and_optimizer(fused=True)
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per-tensor"])
def test_nonfinite_gradients_leave_weights_and_adam_state_untouched(fused: bool) -> None:
    model, optimizer = _model_and_optimizer(fused)
    step_unless_nonfinite(optimizer, _set_grads(model, poison=False))  # one real step creates the state
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    steps_before = [float(s["step"]) for s in optimizer.state.values()]

    norm = _set_grads(model, poison=True)
    assert not math.isfinite(float(norm))
    step_unless_nonfinite(optimizer, norm)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"{name} changed on a skipped step"
    assert [float(s["step"]) for s in optimizer.state.values()] == steps_before
    assert not hasattr(optimizer, "found_inf"), "the skip flag must not leak into the next step"

    step_unless_nonfinite(optimizer, _set_grads(model, poison=False))
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert [float(s["step"]) for s in optimizer.state.values()] == [s + 1 for s in steps_before]


def test_fused_and_per_tensor_adam_take_the_same_step() -> None:
    """Fusing changes speed, not the update (up to float rounding)."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model, optimizer = _model_and_optimizer(fused)
        for _ in range(3):
            step_unless_nonfinite(optimizer, _set_grads(model, poison=False))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
