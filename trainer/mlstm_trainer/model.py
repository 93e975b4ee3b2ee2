"""Byte-level multiplicative LSTM language model (Krause et al. 2016; Radford et al. 2017).

Embedding -> one mLSTM layer -> linear readout.  The four mLSTM matrices are weight-normalised (as in
OpenAI's generating-reviews-discovering-sentiment code), the normalisation is applied once per forward
rather than once per step, and the time loop itself lives in :mod:`mlstm_trainer.recurrence`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from mlstm_trainer.recurrence import mlstm_recurrence


class WeightNormLinearWeight(nn.Module):
    """A weight ``w = g * v / ||v||`` with one norm per output row (torch's ``weight_norm``, dim=0).

    Our own ``v``/``g`` rather than ``torch.nn.utils.parametrizations.weight_norm`` so the weight is
    built exactly once per forward and the parameter names are plain (``v``, ``g``) in checkpoints.
    """

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.v = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        # g = ||v|| makes the initial w equal v, so init is the usual uniform fan-in init.
        self.g = nn.Parameter(self.v.detach().norm(dim=1))

    def forward(self) -> Tensor:
        """The normalised weight, ``[out_features, in_features]``."""
        return _WeightNorm.apply(self.v, self.g)


class _WeightNorm(torch.autograd.Function):
    """``w = v * (g / ||v||)`` per row, with a hand-written backward.

    Autograd's backward for the spelled-out formula makes about four weight-sized temporaries; for W_h
    (4H x H) that costs more than a recurrent step.  The closed form needs one:
    ``dg = <dw, v> / ||v||`` and ``dv = (g / ||v||) * dw - (g <dw, v> / ||v||^3) * v``.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, v: Tensor, g: Tensor) -> Tensor:  # type: ignore[override]
        norm = torch.linalg.vector_norm(v, dim=1)
        scale = g / norm
        ctx.save_for_backward(v, norm, scale)
        return v * scale.unsqueeze(1)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_w: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        v, norm, scale = ctx.saved_tensors
        dot = (grad_w * v).sum(dim=1)
        grad_g = dot / norm
        grad_v = grad_w * scale.unsqueeze(1)
        grad_v.addcmul_(v, (scale * dot / norm.square()).unsqueeze(1), value=-1.0)
        return grad_v, grad_g


class MLSTM(nn.Module):
    """Embedding + single-layer mLSTM + readout; maps byte tokens to next-byte logits."""

    def __init__(
        self, vocab_size: int = 256, embed_dim: int = 64, hidden_size: int = 4096, cuda_graphs: bool = False
    ) -> None:
        super().__init__()
        # Training forwards on CUDA replay the time loops as CUDA graphs (recurrence.py, cuda_graphs.py).
        self.cuda_graphs = cuda_graphs
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.hidden_size = hidden_size
        hidden = hidden_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.w_mx = WeightNormLinearWeight(hidden, embed_dim)
        self.w_mh = WeightNormLinearWeight(hidden, hidden)
        self.w_x = WeightNormLinearWeight(4 * hidden, embed_dim)
        self.w_h = WeightNormLinearWeight(4 * hidden, hidden)
        # Gate order i, f, o, u; forget bias +1 so early training does not wash out the cell state.
        bias = torch.zeros(4 * hidden)
        bias[hidden : 2 * hidden] = 1.0
        self.bias = nn.Parameter(bias)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(
        self,
        tokens: Tensor,
        state: tuple[Tensor, Tensor] | None = None,
        reset: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run a batch of sequences.

        Args:
            tokens: ``[B, T]`` int64 byte ids.
            state: ``(h, c)``, each ``[B, H]``; ``None`` starts from zeros.
            reset: ``[B, T]`` bool, True zeroes the state before token ``t`` (a document boundary).

        Returns:
            ``(logits [B, T, vocab], (h_last, c_last))``.  Logits are float32 under autocast and the
            parameters' dtype otherwise; the state is in the recurrence's compute dtype.
        """
        # Time-major [T, B, ...] activations, handed to the recurrence as [B, T, ...] views: every step
        # then reads and writes contiguous [B, ...] blocks, which the matmul kernels need (a strided
        # slice would be copied first, once per step and matmul).
        xm, xg = (x.transpose(0, 1) for x in self._input_projections(tokens.t()))
        dtype = xg.dtype
        if state is None:
            state = self.init_state(tokens.shape[0], device=tokens.device, dtype=dtype)
        h0, c0 = (s.to(dtype) for s in state)
        keep = None if reset is None else (~reset).to(dtype)
        # The casts are recorded by autograd, so fp32 master weights still get fp32 gradients.
        w_mh = self.w_mh().to(dtype)
        w_h = self.w_h().to(dtype)
        hs, h_last, c_last = mlstm_recurrence(xm.to(dtype), xg, w_mh, w_h, h0, c0, keep, graphs=self.cuda_graphs)
        logits = self.out(hs.transpose(0, 1)).transpose(0, 1).contiguous()
        if torch.is_autocast_enabled(tokens.device.type):
            # Loss in fp32: fp16 log-softmax over 256 classes loses too much precision.
            logits = logits.float()
        return logits, (h_last, c_last)

    def _input_projections(self, tokens_tm: Tensor) -> tuple[Tensor, Tensor]:
        """``xm = x W_mx^T`` and ``xg = x W_x^T + b`` for a whole ``[T, B]`` sequence at once.

        Under autocast these follow autocast's dtype, which then sets the recurrence's dtype.  With at
        least as many tokens as vocabulary entries, the embedding table is projected and rows gathered
        (``x = E[token]`` so ``x W^T = (E W^T)[token]``): for a training batch that is several times
        fewer FLOPs, and backward becomes a row scatter-add instead of two skinny matmuls.
        """
        if tokens_tm.numel() >= self.vocab_size:
            table = self.embed.weight
            xm = F.embedding(tokens_tm, F.linear(table, self.w_mx()))
            xg = F.embedding(tokens_tm, F.linear(table, self.w_x(), self.bias))
            return xm, xg
        emb = self.embed(tokens_tm)
        return F.linear(emb, self.w_mx()), F.linear(emb, self.w_x(), self.bias)

    def init_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Zero ``(h, c)`` for ``batch_size`` rows; defaults to the parameters' device and dtype."""
        device = self.bias.device if device is None else device
        dtype = self.bias.dtype if dtype is None else dtype
        shape = (batch_size, self.hidden_size)
        h0 = torch.zeros(shape, device=device, dtype=dtype)
        return h0, torch.zeros_like(h0)

    def num_parameters(self) -> int:
        """Trainable parameter count (weight-norm ``g`` vectors included)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def flops_per_token(self) -> int:
        """Model FLOPs per training token, forward + backward.

        The usual ``6 * N`` rule with ``N`` counting only matmul weights: each weight does a multiply-add
        (2 FLOPs) per token in forward and twice that in backward (input and weight gradients).  The
        embedding is a lookup, and biases, weight-norm and pointwise gate math are left out as small.
        Per token: W_mx (H*E) + W_x (4H*E) + W_mh (H*H) + W_h (4H*H) + readout (V*H).
        """
        hidden, embed, vocab = self.hidden_size, self.embed_dim, self.vocab_size
        matmul_params = 5 * hidden * embed + 5 * hidden * hidden + vocab * hidden
        return 6 * matmul_params
