"""Mixed precision: autocast for the forward pass, dynamic loss scaling for fp16.

fp16 keeps fp32 master weights (the parameters stay fp32; autocast casts per op), computes the
logits/softmax/loss in fp32, and scales the loss so small gradients survive fp16's narrow range.
The scale starts at 2^16, halves on every overflow (that step is skipped) and doubles after
`growth_interval` clean steps. bf16 has fp32's exponent range, so it needs no scaler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .config import PrecisionConfig

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class MixedPrecision:
    """Autocast context and loss scaler for one precision mode on one device type."""

    def __init__(self, config: PrecisionConfig, device_type: str) -> None:
        self.mode = config.mode
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(
            device_type,
            init_scale=config.init_scale,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=config.growth_interval,
            enabled=config.mode == "fp16",
        )

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Run the enclosed forward pass in the low-precision dtype (no-op for fp32)."""
        dtype = AUTOCAST_DTYPES.get(self.mode)
        with torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None):
            yield

    @property
    def loss_scale(self) -> float:
        """Current loss scale (1.0 when no scaler is used)."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
