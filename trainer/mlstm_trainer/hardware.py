"""Peak dense FLOPs of the accelerators we train on, and model FLOPs utilization (MFU) from them.

MFU = model FLOPs actually done per second / the device's peak. The model FLOPs come from
`MLSTM.flops_per_token()` (the 6N rule); the peak comes from the vendor datasheets below, for
the numeric format the matmuls run in. Where the device is not in the table (CPUs, unknown GPUs)
the peak is unknown and no MFU is reported, rather than a made-up number; `MLSTM_PEAK_TFLOPS`
supplies a peak for such devices (and overrides the table).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from .config import ConfigError

PEAK_TFLOPS_ENV = "MLSTM_PEAK_TFLOPS"
"""Per-device peak in TFLOPS; named like a `--peak-tflops` flag would be (mlstm_trainer.options.env_name)."""


@dataclass(frozen=True, slots=True)
class DevicePeak:
    """Dense (no structured sparsity) peak TFLOPS of one accelerator model."""

    pattern: str
    """Regular expression matched against `torch.cuda.get_device_name()`."""
    half: float
    """fp16/bf16 tensor-core peak (autocast runs the matmuls in 16 bits)."""
    fp32: float
    """Plain fp32 peak; PyTorch leaves TF32 off for matmuls by default, so fp32 runs use this."""


# First match wins, so the PCIe/NVL variants come before the SXM part of the same name.
# Figures are NVIDIA datasheet dense peaks (the sparse figures are twice these).
DEVICE_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak(pattern=r"H100.*PCIe", half=756.0, fp32=51.2),
    DevicePeak(pattern=r"H100.*NVL", half=835.0, fp32=60.0),
    DevicePeak(pattern=r"H100|H200|GH200", half=989.4, fp32=66.9),
    DevicePeak(pattern=r"A100", half=312.0, fp32=19.5),
    DevicePeak(pattern=r"V100.*PCIE", half=112.0, fp32=14.0),
    DevicePeak(pattern=r"V100", half=125.0, fp32=15.7),  # the paper's DGX-1 parts (SXM2)
    DevicePeak(pattern=r"L40S", half=362.0, fp32=91.6),
    DevicePeak(pattern=r"\bL4\b", half=121.0, fp32=30.3),
    DevicePeak(pattern=r"\bT4\b", half=65.0, fp32=8.1),
)


def table_peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of a named device for a precision mode (fp32, fp16, bf16), or None if unknown."""
    for peak in DEVICE_PEAKS:
        if re.search(peak.pattern, device_name, flags=re.IGNORECASE):
            return (peak.fp32 if precision == "fp32" else peak.half) * 1e12
    return None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """This process's peak FLOP/s: the override from the environment, else the table, else None.

    The trainer asks once, at start-up, so a bad override fails before any training is done.
    """
    override = os.environ.get(PEAK_TFLOPS_ENV, "").strip()
    if override:
        try:
            tflops = float(override)
        except ValueError:
            raise ConfigError(f"{PEAK_TFLOPS_ENV} must be a number of TFLOPS, got {override!r}") from None
        if tflops <= 0:
            raise ConfigError(f"{PEAK_TFLOPS_ENV} must be > 0, got {override!r}")
        return tflops * 1e12
    if device.type != "cuda":
        return None  # CPU peaks depend on SKU, clocks and vector width; no honest table exists
    return table_peak_flops(torch.cuda.get_device_name(device), precision)


def model_flops_utilization(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Fraction of `peak` FLOP/s that `tokens_per_s` tokens of `flops_per_token` each amount to.

    Both rates are per device. None when the peak is unknown or there is no rate yet.
    """
    if peak is None or peak <= 0 or tokens_per_s <= 0:
        return None
    return flops_per_token * tokens_per_s / peak
