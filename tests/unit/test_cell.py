"""The fused cells (native C kernels, torch.compile) against TorchCell, the plain torch-ops reference."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mlstm_trainer import cell as cell_module
from mlstm_trainer.cell import BackwardStep, ForwardStep, NativeCell, TorchCell, native_available, select_cell
from mlstm_trainer.recurrence import mlstm_recurrence

needs_native = pytest.mark.skipif(not native_available(), reason="C extension not built (no compiler)")
B, H = 5, 12


def _forward_buffers(gen: torch.Generator, scale: float = 3.0) -> dict[str, Tensor]:
    """One step's inputs; ``scale`` pushes pre-activations into the saturated range too."""
    return {
        "z": scale * torch.randn(B, 4 * H, generator=gen),
        "c_prev": torch.randn(B, H, generator=gen),
        "gates": torch.empty(B, 4 * H),
        "c_next": torch.empty(B, H),
        "tanh_c": torch.empty(B, H),
        "h": torch.empty(B, H),
    }


def _run_forward(cell: object, bufs: dict[str, Tensor], keep: Tensor | None) -> dict[str, Tensor]:
    out = {name: t.clone() for name, t in bufs.items()}
    h_reset = torch.empty(B, H) if keep is not None else None
    cell.forward(ForwardStep(**out, keep_next=keep, h_reset=h_reset))
    if h_reset is not None:
        out["h_reset"] = h_reset
    return out


@needs_native
@pytest.mark.parametrize("with_keep", [False, True], ids=["no-reset", "reset"])
def test_native_forward_matches_torch(with_keep: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    bufs = _forward_buffers(gen)
    # A column of a [B, T] mask, as the loop passes it: stride T, not 1.
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]] * 3).t()[:, 1:2] if with_keep else None
    ours, ref = _run_forward(NativeCell(), bufs, keep), _run_forward(TorchCell(), bufs, keep)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=2e-6, atol=2e-7, msg=lambda m, n=name: f"{n}: {m}")
    if with_keep:
        assert torch.all(ours["c_next"][1] == 0) and torch.all(ours["h_reset"][1] == 0)


@needs_native
@pytest.mark.parametrize("with_scale", [False, True], ids=["no-reset", "reset"])
@pytest.mark.parametrize("with_grad_h", [False, True], ids=["no-output-grad", "output-grad"])
def test_native_backward_matches_torch(with_scale: bool, with_grad_h: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    fwd = _run_forward(TorchCell(), _forward_buffers(gen, scale=1.0), None)
    dh = torch.randn(B, H, generator=gen)
    dc = torch.randn(B, H, generator=gen)
    grad_h = torch.randn(B, H, generator=gen) if with_grad_h else None
    scale = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0]]) if with_scale else None
    results = []
    for cell in (NativeCell(), TorchCell()):
        dz, dc_run = torch.empty(B, 4 * H), dc.clone()
        cell.backward(BackwardStep(dh.clone(), grad_h, scale, fwd["gates"], fwd["tanh_c"], fwd["c_prev"], dc_run, dz))
        results.append((dz, dc_run))
    for (ours, ref), name in zip(zip(*results), ("dz", "dc")):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@needs_native
def test_native_activations_saturate_and_keep_nan() -> None:
    """Extreme pre-activations saturate exactly; NaN stays NaN (a diverging run must not look healthy)."""
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), 100.0, -100.0, 0.0, 1e-4, -20.0])
    z = torch.zeros(1, 4 * 8)
    z[0, :8] = special  # i gate: sigmoid
    z[0, 24:] = special  # u gate: tanh
    c_prev = torch.zeros(1, 8)
    bufs = {"gates": torch.empty(1, 32), "c_next": torch.empty(1, 8), "tanh_c": torch.empty(1, 8),
            "h": torch.empty(1, 8)}
    NativeCell().forward(ForwardStep(z, c_prev, bufs["gates"], bufs["c_next"], bufs["tanh_c"], bufs["h"]))
    sig, tanh = bufs["gates"][0, :8], bufs["gates"][0, 24:]
    assert torch.isnan(sig[0]) and torch.isnan(tanh[0])
    assert sig[[1, 3]].tolist() == [1.0, 1.0] and tanh[1:5].tolist() == [1.0, -1.0, 1.0, -1.0]
    assert 0.0 <= sig[2] < 1e-37 and 0.0 <= sig[4] < 1e-37  # exp clamps at float32's range: ~0, not NaN
    torch.testing.assert_close(sig[1:], torch.sigmoid(special[1:]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tanh[1:], torch.tanh(special[1:]), rtol=1e-6, atol=1e-7)


@needs_native
def test_native_rejects_layouts_it_cannot_read() -> None:
    """A strided feature dimension would make the C code read the wrong memory: it must refuse."""
    strided = torch.randn(B, 2 * H)[:, ::2]
    with pytest.raises(ValueError, match="unit column stride"):
        NativeCell().mul(torch.empty(B, H), strided, torch.randn(B, H))
    with pytest.raises(ValueError, match="float32"):
        NativeCell().mul(torch.empty(B, H, dtype=torch.float64), torch.randn(B, H), torch.randn(B, H))


def test_select_cell_follows_device_dtype_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv(cell_module.CELL_ENV, raising=False)
    expected = NativeCell if native_available() else TorchCell
    assert isinstance(select_cell(cpu, torch.float32), expected)
    assert isinstance(select_cell(cpu, torch.float64), TorchCell)
    monkeypatch.setenv(cell_module.CELL_ENV, "torch")
    assert isinstance(select_cell(cpu, torch.float32), TorchCell)
    monkeypatch.setenv(cell_module.CELL_ENV, "fused")
    with pytest.raises(ValueError, match="MLSTM_CELL='fused' is not one of auto, torch, native, compiled"):
        select_cell(cpu, torch.float32)
    monkeypatch.setenv(cell_module.CELL_ENV, "native")
    with pytest.raises(ValueError, match="float32 on CPU only"):
        select_cell(cpu, torch.float64)


def _recurrence_case(gen: torch.Generator, steps: int, hidden: int = 8, batch: int = 3) -> list[Tensor]:
    """float32 inputs in the model's time-major layout, plus a keep mask with resets."""
    scale = hidden**-0.5
    xm = torch.randn(steps, batch, hidden, generator=gen).transpose(0, 1)
    xg = torch.randn(steps, batch, 4 * hidden, generator=gen).transpose(0, 1)
    w_mh = scale * torch.randn(hidden, hidden, generator=gen)
    w_h = scale * torch.randn(4 * hidden, hidden, generator=gen)
    h0, c0 = torch.randn(batch, hidden, generator=gen), torch.randn(batch, hidden, generator=gen)
    keep = torch.ones(batch, steps)
    keep[0, min(2, steps - 1)] = keep[2, steps - 1] = 0.0
    return [xm, xg, w_mh, w_h, h0, c0, keep]


def _values_and_grads(case: list[Tensor], sum_loss: bool = False) -> list[Tensor]:
    inputs = [t.clone().requires_grad_() for t in case[:6]]
    hs, h_last, c_last = mlstm_recurrence(*inputs, case[6])
    # hs.sum() hands backward an expanded (stride 0) gradient; the weighted loss a dense one.
    weights = torch.linspace(-1, 1, hs.numel()).reshape(hs.shape)
    loss = hs.sum() if sum_loss else (hs * weights).sum() + h_last.square().sum() + c_last.sum()
    loss.backward()
    return [hs.detach(), h_last.detach(), c_last.detach(), *(t.grad for t in inputs)]


@pytest.mark.parametrize("cell_name", ["native", "compiled"])
@pytest.mark.parametrize("sum_loss", [False, True], ids=["dense-grad", "expanded-grad"])
def test_recurrence_with_fused_cell_matches_torch_cell(
    cell_name: str, sum_loss: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole forward and backward loops, values and every gradient, with each fused cell."""
    if cell_name == "native" and not native_available():
        pytest.skip("C extension not built (no compiler)")
    case = _recurrence_case(torch.Generator().manual_seed(2), steps=6)
    monkeypatch.setenv(cell_module.CELL_ENV, "torch")
    ref = _values_and_grads(case, sum_loss)
    monkeypatch.setenv(cell_module.CELL_ENV, cell_name)
    ours = _values_and_grads(case, sum_loss)
    names = ("hs", "h_last", "c_last", "d_xm", "d_xg", "d_w_mh", "d_w_h", "d_h0", "d_c0")
    for name, a, b in zip(names, ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_cell_compiles_once_for_all_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step's slices differ only in offset: a longer sequence must reuse the compiled graphs."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv(cell_module.CELL_ENV, "compiled")
    gen = torch.Generator().manual_seed(3)
    _values_and_grads(_recurrence_case(gen, steps=4))
    graphs = counters["stats"]["unique_graphs"]
    _values_and_grads(_recurrence_case(gen, steps=11, batch=4))
    assert counters["stats"]["unique_graphs"] == graphs


class _CompileFailed(torch._dynamo.exc.TorchDynamoException):
    """What Dynamo/Inductor raise when a backend cannot compile (no Triton, no C compiler, ...)."""


def _failing_compiled(*args: object) -> None:
    raise _CompileFailed("no working C compiler found\nlong details")


def test_automatic_compiled_cell_falls_back_to_torch_ops_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiling fails: the automatic (CUDA) choice warns once and runs the step on TorchCell."""
    from mlstm_trainer import compiled_cell

    monkeypatch.setattr(compiled_cell, "compile_failure", None)
    monkeypatch.delenv(cell_module.CELL_ENV, raising=False)
    cell = select_cell(torch.device("cuda"), torch.float16)  # constructing it touches no GPU
    assert isinstance(cell, compiled_cell.CompiledCell)
    cell._forward = cell._backward = cell._mul2 = _failing_compiled
    bufs = _forward_buffers(torch.Generator().manual_seed(6))
    with pytest.warns(RuntimeWarning, match=r"fused cell failed \(_CompileFailed: no working C compiler found\)"):
        ours = _run_forward(cell, bufs, None)
    ref = _run_forward(TorchCell(), bufs, None)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name])
    assert isinstance(select_cell(torch.device("cuda"), torch.float16), TorchCell)  # no second attempt


def test_explicit_compiled_cell_does_not_hide_a_compile_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlstm_trainer import compiled_cell

    monkeypatch.setattr(compiled_cell, "compile_failure", None)
    monkeypatch.setenv(cell_module.CELL_ENV, "compiled")
    cell = select_cell(torch.device("cpu"), torch.float32)
    cell._forward = _failing_compiled
    with pytest.raises(_CompileFailed):
        _run_forward(cell, _forward_buffers(torch.Generator().manual_seed(7)), None)
    assert compiled_cell.compile_failure is None


def test_trainer_rejects_a_bad_cell_choice_in_one_line_before_writing(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlstm_trainer.__main__ import main

    monkeypatch.setenv(cell_module.CELL_ENV, "fused")
    run_dir = tmp_path / "run"
    assert main(["--checkpoint-dir", str(run_dir), "--metrics-port", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "mlstm train: error: MLSTM_CELL='fused' is not one of auto, torch, native, compiled"
    ]
    assert not run_dir.exists()
