"""The CUDA path on a real GPU: fused (compiled) cell, CUDA-graph replay, no host syncs in the loops.

Skipped where no CUDA device is present (CI has none).  ``bench/gpu_session.sh`` runs this module and
the GPU benchmark in one go on a lent GPU machine; the CPU suites test the same logic with stand-ins
(``tests/unit/test_cell.py``, ``tests/unit/test_cuda_graphs.py``).
"""

from __future__ import annotations

import pytest
import torch

from mlstm_trainer import cuda_graphs
from mlstm_trainer.cell import CELL_ENV
from mlstm_trainer.model import MLSTM
from mlstm_trainer.recurrence import mlstm_recurrence

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

B, T, H, V = 8, 16, 64, 50
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
# Per-dtype tolerances between two correct implementations that round differently.
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _case(dtype: torch.dtype, steps: int = T) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    scale = H**-0.5

    def rand(*shape: int, s: float = 1.0) -> torch.Tensor:
        return (s * torch.randn(*shape, generator=gen, device="cuda")).to(dtype)

    xm = rand(steps, B, H).transpose(0, 1)
    xg = rand(steps, B, 4 * H).transpose(0, 1)
    keep = torch.ones(B, steps, device="cuda", dtype=dtype)
    keep[1, 3] = keep[5, steps - 1] = 0
    return [xm, xg, rand(H, H, s=scale), rand(4 * H, H, s=scale), rand(B, H), rand(B, H), keep]


def _run(case: list[torch.Tensor], graphs: bool = False) -> list[torch.Tensor]:
    inputs = [t.clone().requires_grad_() for t in case[:6]]
    hs, h_last, c_last = mlstm_recurrence(*inputs, case[6], graphs=graphs)
    weights = torch.linspace(-1, 1, hs.numel(), device="cuda").reshape(hs.shape).to(hs.dtype)
    ((hs * weights).sum() + h_last.float().square().sum() + c_last.float().sum()).backward()
    return [t.detach().float() for t in (hs, h_last, c_last)] + [t.grad.float() for t in inputs]


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_cell_matches_torch_cell(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    case = _case(dtype)
    monkeypatch.setenv(CELL_ENV, "torch")
    ref = _run(case)
    monkeypatch.setenv(CELL_ENV, "compiled")
    ours = _run(case)
    for index, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype], msg=lambda m, i=index: f"#{i}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_graphed_loops_match_eager_loops(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three forward/backward rounds through captured graphs equal the eager loops."""
    monkeypatch.setenv(CELL_ENV, "compiled")
    cases = [_case(dtype) for _ in range(3)]
    for case, shift in zip(cases, (0.0, 0.5, -0.25)):
        case[0].add_(shift)  # different inputs each round: replay must read the new ones
    eager = [_run(case) for case in cases]
    cuda_graphs.clear_captured()
    try:
        graphed = [_run(case, graphs=True) for case in cases]
        assert len(cuda_graphs._CAPTURED) == 1
    finally:
        cuda_graphs.clear_captured()
    for round_index, (ours, ref) in enumerate(zip(graphed, eager)):
        for index, (a, b) in enumerate(zip(ours, ref)):
            tol = TOL[dtype] / 10  # same kernels replayed; a margin only for cuBLAS picking another algorithm
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, r=round_index, i=index: f"round {r} #{i}: {m}")


def test_replayed_loops_never_synchronise_with_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CELL_ENV, "compiled")
    cuda_graphs.clear_captured()
    case = _case(torch.float16)
    try:
        _run(case, graphs=True)  # captures (warm-up may synchronise)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            inputs = [t.clone().requires_grad_() for t in case[:6]]
            hs, h_last, c_last = mlstm_recurrence(*inputs, case[6], graphs=True)
            torch.autograd.backward([hs, h_last, c_last], [torch.ones_like(hs), None, None])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        cuda_graphs.clear_captured()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_model_trains_under_autocast_with_graphs(precision: str) -> None:
    """A few optimizer steps of the whole model with the CUDA defaults plus graphs: the loss falls."""
    cuda_graphs.clear_captured()
    torch.manual_seed(0)
    model = MLSTM(vocab_size=V, embed_dim=16, hidden_size=H, cuda_graphs=True).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, V, (B, T + 1), device="cuda")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    losses = []
    try:
        for _ in range(30):
            with torch.autocast("cuda", dtype=dtype):
                logits, _ = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
    finally:
        cuda_graphs.clear_captured()
    assert losses[-1] < 0.7 * losses[0], losses
