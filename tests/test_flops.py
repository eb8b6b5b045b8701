"""The one peak-FLOPs table (system.train.flops): device rows, dtype-aware columns, MFU."""

from __future__ import annotations

import pytest
import torch

from system.train.flops import PEAKS, flops_per_token, math_mode, mfu, peak_flops


@pytest.mark.parametrize("name, dtype, tf32, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, None, 989e12),    # SXM
    ("NVIDIA H100 PCIe", torch.bfloat16, None, 756e12),         # not the SXM figure
    ("NVIDIA H100 NVL", torch.float16, None, 835e12),
    ("NVIDIA H200", torch.bfloat16, None, 989e12),
    ("NVIDIA H200 NVL", torch.bfloat16, None, 835e12),
    ("NVIDIA H100 80GB HBM3", torch.float32, False, 67e12),     # fp32 runs: the fp32 peak, not bf16
    ("NVIDIA H100 80GB HBM3", torch.float32, True, 494e12),     # TF32 matmuls allowed
    ("NVIDIA A100-SXM4-80GB", None, False, 19.5e12),
    ("NVIDIA L40S", torch.bfloat16, None, 362e12),
])
def test_peak_by_device_and_math(name: str, dtype, tf32, expected: float) -> None:
    flops, source = peak_flops(name, dtype, allow_tf32=tf32)
    assert flops == expected
    assert "datasheet" in source or "specifications" in source


def test_unknown_devices_and_cpu_have_no_peak() -> None:
    assert peak_flops("Some Future GPU", torch.bfloat16) is None
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    with pytest.raises(ValueError, match="no peak"):
        math_mode(torch.int8)


def test_every_row_orders_its_columns() -> None:
    for row in PEAKS:  # dense bf16 > TF32 > fp32 on every listed part
        assert row.bf16 > row.tf32 > row.fp32 > 0, row


def test_mfu_and_flops_per_token() -> None:
    assert flops_per_token(10, 2, 4, 8) == 6 * 10 + 12 * 2 * 4 * 8
    assert mfu(400e12, 989e12, 1) == pytest.approx(0.4044, abs=1e-4)
    assert mfu(800e12, 1000e12, 2) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0)
