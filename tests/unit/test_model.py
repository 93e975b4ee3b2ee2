"""MLSTM and its hand-written recurrence against a plain per-step autograd reference (CPU, small sizes)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mlstm_trainer import recurrent_matmul
from mlstm_trainer.model import MLSTM, WeightNormLinearWeight
from mlstm_trainer.recurrence import mlstm_recurrence
from mlstm_trainer.recurrent_matmul import MIN_STEPS_TO_PACK

B, T, E, H, V = 3, 7, 5, 6, 11


def _weight(module: torch.nn.Module) -> Tensor:
    """Weight norm spelled out independently of the model: w = g * v / ||v|| per row."""
    v, g = module.v, module.g
    return g.unsqueeze(1) * v / v.norm(dim=1, keepdim=True)


def reference_forward(
    model: MLSTM, tokens: Tensor, state: tuple[Tensor, Tensor] | None, reset: Tensor | None
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The mLSTM one step at a time with ordinary autograd ops, straight from the equations."""
    w_mx, w_mh, w_x, w_h = (_weight(m) for m in (model.w_mx, model.w_mh, model.w_x, model.w_h))
    h, c = state if state is not None else model.init_state(tokens.shape[0])
    outputs = []
    for t in range(tokens.shape[1]):
        x = model.embed.weight[tokens[:, t]]
        if reset is not None:
            keep = (~reset[:, t]).to(h.dtype).unsqueeze(1)
            h, c = h * keep, c * keep
        m = (x @ w_mx.T) * (h @ w_mh.T)
        z = x @ w_x.T + model.bias + m @ w_h.T
        i, f, o, u = z.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    hs = torch.stack(outputs, dim=1)
    return hs @ model.out.weight.T + model.out.bias, (h, c)


def _model(dtype: torch.dtype = torch.float64) -> MLSTM:
    torch.manual_seed(0)
    model = MLSTM(vocab_size=V, embed_dim=E, hidden_size=H).to(dtype)
    with torch.no_grad():  # move g off ||v|| so the test sees weight norm actually scaling rows
        for module in (model.w_mx, model.w_mh, model.w_x, model.w_h):
            module.g.mul_(torch.empty_like(module.g).uniform_(0.5, 1.5))
    return model


def _inputs(with_state: bool, with_reset: bool) -> tuple[Tensor, tuple[Tensor, Tensor] | None, Tensor | None]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    state = None
    if with_state:
        state = (
            torch.randn(B, H, generator=gen, dtype=torch.float64),
            torch.randn(B, H, generator=gen, dtype=torch.float64),
        )
    reset = None
    if with_reset:
        reset = torch.zeros(B, T, dtype=torch.bool)
        reset[0, 0] = True  # reset on the very first step (initial state discarded)
        reset[1, 3] = True
        reset[2, 2] = reset[2, 5] = True
    return tokens, state, reset


def _loss(logits: Tensor, state: tuple[Tensor, Tensor], weights: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """A loss touching logits and both state tensors, with fixed random weights so no grad is trivial."""
    return (logits * weights[0]).sum() + (state[0] * weights[1]).sum() + (state[1] * weights[2]).sum()


CASES = [
    pytest.param(False, False, id="zero-state"),
    pytest.param(True, False, id="initial-state"),
    pytest.param(False, True, id="reset-mask"),
    pytest.param(True, True, id="initial-state-and-reset"),
]


@pytest.mark.parametrize(("with_state", "with_reset"), CASES)
def test_matches_per_step_reference(with_state: bool, with_reset: bool) -> None:
    model = _model()
    tokens, state, reset = _inputs(with_state, with_reset)
    gen = torch.Generator().manual_seed(2)
    weights = (
        torch.randn(B, T, V, generator=gen, dtype=torch.float64),
        torch.randn(B, H, generator=gen, dtype=torch.float64),
        torch.randn(B, H, generator=gen, dtype=torch.float64),
    )

    results = []
    for forward in (model.forward, lambda *a: reference_forward(model, *a)):
        model.zero_grad()
        logits, new_state = forward(tokens, state, reset)
        _loss(logits, new_state, weights).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results.append((logits.detach(), tuple(s.detach() for s in new_state), grads))

    (logits, new_state, grads), (ref_logits, ref_state, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(new_state, ref_state)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=f"gradient of {name}")


def test_fewer_tokens_than_vocab_matches_reference() -> None:
    """Batches smaller than the vocabulary embed tokens directly instead of projecting the table."""
    model = _model()
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    assert tokens.numel() < V
    results = []
    for forward in (model.forward, lambda t: reference_forward(model, t, None, None)):
        model.zero_grad()
        logits, (h, c) = forward(tokens)
        (logits.sum() + h.sum() + c.sum()).backward()
        results.append((logits.detach(), model.embed.weight.grad.clone(), model.w_x.v.grad.clone()))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref)


def test_reset_at_first_step_ignores_initial_state() -> None:
    model = _model()
    tokens, state, _ = _inputs(with_state=True, with_reset=False)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True
    with_state, _ = model(tokens, state, reset)
    from_zeros, _ = model(tokens)
    torch.testing.assert_close(with_state, from_zeros)


@pytest.mark.parametrize(
    ("with_keep", "time_major"),
    [
        pytest.param(False, False, id="no-keep"),
        pytest.param(True, False, id="keep-mask"),
        # The model passes [T, B, ...] memory as [B, T, ...] views; buffers follow that layout.
        pytest.param(True, True, id="keep-mask-time-major-views"),
    ],
)
def test_recurrence_gradcheck(with_keep: bool, time_major: bool) -> None:
    batch, steps, hidden = 2, 4, 3
    gen = torch.Generator().manual_seed(3)

    def rand(*shape: int) -> Tensor:
        return (0.5 * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    lead = (steps, batch) if time_major else (batch, steps)
    inputs = (rand(*lead, hidden), rand(*lead, 4 * hidden), rand(hidden, hidden),
              rand(4 * hidden, hidden), rand(batch, hidden), rand(batch, hidden))
    keep = None
    if with_keep:
        keep = torch.ones(batch, steps, dtype=torch.float64)
        keep[0, 2] = keep[1, 0] = 0.0

    def run(xm: Tensor, xg: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if time_major:
            xm, xg = xm.transpose(0, 1), xg.transpose(0, 1)
        return mlstm_recurrence(xm, xg, *rest, keep)

    assert torch.autograd.gradcheck(run, inputs)


@pytest.mark.parametrize(
    ("steps", "hidden", "choice", "kind"),
    [
        pytest.param(MIN_STEPS_TO_PACK - 1, 8, "auto", "torch", id="short-loop-plain-matmul"),
        pytest.param(9, 12, "torch", "torch", id="plain-matmul"),
        pytest.param(9, 12, "onednn", "onednn", id="onednn-packed"),
        pytest.param(9, 24, "auto", "native", id="native-packed"),
    ],
)
def test_recurrence_float32_matches_float64(
    monkeypatch: pytest.MonkeyPatch, steps: int, hidden: int, choice: str, kind: str
) -> None:
    """Every float32 recurrent matmul (plain, oneDNN-packed, native-packed) agrees with float64."""
    if kind == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    if kind == "native" and not recurrent_matmul.native_available():
        pytest.skip("native kernel not built or no AVX2/FMA")
    monkeypatch.setenv(recurrent_matmul.MATMUL_ENV, choice)
    batch = 3
    gen = torch.Generator().manual_seed(5)
    scale = hidden**-0.5  # keeps pre-activations O(1) so the comparison is not all saturated gates
    shapes = ((batch, steps, hidden), (batch, steps, 4 * hidden), (hidden, hidden), (4 * hidden, hidden),
              (batch, hidden), (batch, hidden))
    inputs64 = [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in shapes]
    inputs64[2].mul_(scale)
    inputs64[3].mul_(scale)
    # The test is only meaningful if it takes the path it names (all four loop matmuls).
    for weight in (inputs64[2], inputs64[3], inputs64[2].t(), inputs64[3].t()):
        assert recurrent_matmul.RecurrentMatmul(weight.float(), batch, steps).kind == kind
    keep = torch.ones(batch, steps, dtype=torch.float64)
    keep[1, 1] = 0.0
    grad_out = [torch.randn(batch, steps, hidden, generator=gen, dtype=torch.float64),
                torch.randn(batch, hidden, generator=gen, dtype=torch.float64),
                torch.randn(batch, hidden, generator=gen, dtype=torch.float64)]
    results = []
    for dtype, dtype_choice in ((torch.float64, "torch"), (torch.float32, choice)):
        monkeypatch.setenv(recurrent_matmul.MATMUL_ENV, dtype_choice)  # a forced kind runs float32 only
        inputs = [x.to(dtype).requires_grad_() for x in inputs64]
        outputs = mlstm_recurrence(*inputs, keep.to(dtype))
        grads = torch.autograd.grad(outputs, inputs, [g.to(dtype) for g in grad_out])
        results.append([t.double() for t in (*outputs, *grads)])
    names = ("hs", "h_last", "c_last", "d_xm", "d_xg", "d_w_mh", "d_w_h", "d_h0", "d_c0")
    for name, ours, ref in zip(names, results[1], results[0]):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("with_reset", [pytest.param(False, id="plain"), pytest.param(True, id="reset")])
def test_state_carrying_is_exact(with_reset: bool) -> None:
    model = _model()
    tokens, state, reset = _inputs(with_state=True, with_reset=with_reset)
    split = 4
    full, full_state = model(tokens, state, reset)
    first, mid_state = model(tokens[:, :split], state, None if reset is None else reset[:, :split])
    second, end_state = model(tokens[:, split:], mid_state, None if reset is None else reset[:, split:])
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(end_state, full_state, rtol=0, atol=1e-12)


@pytest.mark.parametrize("which", [pytest.param(0, id="h_last"), pytest.param(1, id="c_last")])
def test_gradient_through_returned_state_only(which: int) -> None:
    """A loss on the final state alone (hs unused) must still give the reference's gradients."""
    model = _model()
    tokens, state, reset = _inputs(with_state=True, with_reset=True)
    h0, c0 = (s.clone().requires_grad_() for s in state)
    grads = []
    for forward in (model.forward, lambda *a: reference_forward(model, *a)):
        _, new_state = forward(tokens, (h0, c0), reset)
        loss = (new_state[which] ** 2).sum()
        params = [model.w_mh.v, model.w_h.v, model.w_x.g, model.embed.weight, h0, c0]
        grads.append(torch.autograd.grad(loss, params))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_autocast_cpu(dtype: torch.dtype) -> None:
    model = _model(torch.float32)
    tokens, _, reset = _inputs(with_state=False, with_reset=True)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))

    def loss_of(logits: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))

    ref_loss = loss_of(model(tokens, reset=reset)[0])
    with torch.autocast(device_type="cpu", dtype=dtype):
        logits, (h, c) = model(tokens, reset=reset)
        loss = loss_of(logits)
    assert logits.dtype == torch.float32
    assert h.dtype == dtype and c.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=3e-2)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name
    assert model.w_h.v.grad.abs().sum() > 0


def test_weight_norm_gradcheck() -> None:
    """The weight-norm weight (hand-written backward) against its formula and finite differences."""
    gen = torch.Generator().manual_seed(6)
    module = WeightNormLinearWeight(4, 3).double()
    v = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.rand(4, generator=gen, dtype=torch.float64).add_(0.5).requires_grad_()

    def weight(v: Tensor, g: Tensor) -> Tensor:
        return torch.func.functional_call(module, {"v": v, "g": g}, ())

    torch.testing.assert_close(weight(v, g), g.unsqueeze(1) * v / v.norm(dim=1, keepdim=True))
    assert torch.autograd.gradcheck(weight, (v, g))


def test_double_model_end_to_end() -> None:
    model = _model()
    logits, (h, c) = model(torch.zeros(2, 3, dtype=torch.long))
    assert logits.dtype == h.dtype == c.dtype == torch.float64
    assert logits.shape == (2, 3, V) and h.shape == c.shape == (2, H)


def test_counts() -> None:
    model = MLSTM(vocab_size=V, embed_dim=E, hidden_size=H)
    matmul = 5 * H * E + 5 * H * H + V * H
    norms = H + H + 4 * H + 4 * H  # one g per output row of each weight-normed matrix
    assert model.num_parameters() == V * E + matmul + norms + 4 * H + V
    assert model.flops_per_token() == 6 * matmul
