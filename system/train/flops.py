"""FLOP accounting for MFU (model FLOPs utilisation): the device peaks and the model's FLOPs per token.

One table serves the trainer's ``mfu_pct`` and every benchmark in ``benchmarks/``. Each row is the
dense (no structured sparsity) peak of one device model for one math mode, in FLOP/s, with the vendor
document it comes from. MFU is PaLM's definition (Chowdhery et al. 2022, appendix B): model FLOPs per
second over the peak of the math the run actually uses, so an fp32 run is measured against the fp32
(or, with TF32 matmuls allowed, the TF32) peak, never against the bf16 one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DevicePeak", "PEAKS", "math_mode", "peak_flops", "flops_per_token", "mfu"]


@dataclass(frozen=True)
class DevicePeak:
    """Dense peak FLOP/s of one device model per math mode, and where the figures come from.

    Attributes:
        match: substrings of ``torch.cuda.get_device_name()`` that select this row (all must occur).
        bf16: dense BF16/FP16 tensor-core peak, FLOP/s.
        tf32: dense TF32 tensor-core peak, FLOP/s.
        fp32: FP32 (CUDA-core, non-tensor) peak, FLOP/s.
        source: the datasheet the figures are read from.
    """

    match: tuple[str, ...]
    bf16: float
    tf32: float
    fp32: float
    source: str


_H100_SXM = "NVIDIA H100 Tensor Core GPU datasheet (2023), SXM column, dense (half the 'with sparsity' figures)"
_H100_PCIE = "NVIDIA H100 Tensor Core GPU datasheet (2023), PCIe column, dense"
_H100_NVL = "NVIDIA H100 Tensor Core GPU datasheet (2023), H100 NVL column (per GPU), dense"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet (2024), H200 SXM column, dense"
_H200_NVL = "NVIDIA H200 Tensor Core GPU datasheet (2024), H200 NVL column, dense"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (2021), dense"
_L40S = "NVIDIA L40S datasheet (2023), dense"
_B200 = "NVIDIA HGX B200 specifications (2024): 8-GPU totals divided by 8, dense"

# Most specific rows first: the first row whose substrings all occur in the device name wins.
PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak(("H200", "NVL"), 835e12, 418e12, 60e12, _H200_NVL),
    DevicePeak(("H200",), 989e12, 494e12, 67e12, _H200),
    DevicePeak(("H100", "NVL"), 835e12, 418e12, 60e12, _H100_NVL),
    DevicePeak(("H100", "PCIe"), 756e12, 378e12, 51e12, _H100_PCIE),
    DevicePeak(("H100",), 989e12, 494e12, 67e12, _H100_SXM),
    DevicePeak(("H800", "PCIe"), 756e12, 378e12, 51e12, _H100_PCIE + " (H800 PCIe shares the H100 PCIe compute)"),
    DevicePeak(("H800",), 989e12, 494e12, 67e12, _H100_SXM + " (H800 SXM shares the H100 SXM compute)"),
    DevicePeak(("A100",), 312e12, 156e12, 19.5e12, _A100),
    DevicePeak(("A800",), 312e12, 156e12, 19.5e12, _A100 + " (A800 shares the A100 compute)"),
    DevicePeak(("L40S",), 362e12, 183e12, 91.6e12, _L40S),
    DevicePeak(("B200",), 2250e12, 1100e12, 75e12, _B200),
)


def math_mode(dtype: torch.dtype | None, allow_tf32: bool | None = None) -> str:
    """The peak column a run of compute dtype ``dtype`` is measured against: ``bf16``, ``tf32`` or ``fp32``.

    Args:
        dtype: the matmul compute dtype (the autocast dtype, else the parameter dtype); ``None`` means fp32.
        allow_tf32: whether fp32 matmuls run as TF32; ``None`` reads ``torch.backends.cuda.matmul.allow_tf32``.

    Raises:
        ValueError: a dtype with no peak column (e.g. an integer dtype).
    """
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype in (None, torch.float32):
        if allow_tf32 is None:
            allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        return "tf32" if allow_tf32 else "fp32"
    raise ValueError(f"no peak FLOP/s column for compute dtype {dtype}")


def peak_flops(device: torch.device | str, dtype: torch.dtype | None = torch.bfloat16,
               allow_tf32: bool | None = None) -> tuple[float, str] | None:
    """Dense peak FLOP/s of one device for the math a run of ``dtype`` uses, and its source.

    Args:
        device: a CUDA ``torch.device`` (its name is read with ``torch.cuda.get_device_name``) or a
            device name string as that function returns it (``"NVIDIA H100 80GB HBM3"``).
        dtype: the compute dtype (see :func:`math_mode`).
        allow_tf32: see :func:`math_mode`.

    Returns:
        ``(flop_per_s, source)``, or ``None`` for a CPU or a device not in :data:`PEAKS`.
    """
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(device)
    else:
        name = device
    mode = math_mode(dtype, allow_tf32)
    for row in PEAKS:
        if all(m in name for m in row.match):
            return getattr(row, mode), f"{row.source}; {mode}"
    return None


def flops_per_token(active_params: int, n_layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N_active + 12 * L * d * S`` (PaLM, Chowdhery et al. 2022, app. B).

    ``N_active`` counts the parameters one token passes through (top-k experts, not all of them).
    """
    return 6.0 * active_params + 12.0 * n_layers * dim * seq_len


def mfu(model_flops_per_s: float, peak_flop_per_s: float, devices: int = 1) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over ``devices`` times the peak.

    Raises:
        ValueError: a non-positive peak or device count.
    """
    if peak_flop_per_s <= 0 or devices <= 0:
        raise ValueError(f"peak ({peak_flop_per_s}) and devices ({devices}) must be positive")
    return model_flops_per_s / (peak_flop_per_s * devices)
