"""Run records: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard, rank 0 only.

Also the FLOP accounting behind MFU (model FLOPs utilisation, PaLM appendix B): 6 FLOPs per active
parameter per token for forward+backward, plus attention's ``12 * L * d * S`` per token.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (FLOP/s), by device-name substring.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of ``device``, or ``None`` when unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


def flops_per_token(active_params: int, n_layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N_active + 12 * L * d * S`` (PaLM, Chowdhery et al. 2022, app. B)."""
    return 6.0 * active_params + 12.0 * n_layers * dim * seq_len


class MetricsLogger:
    """Writes scalars and histograms of a run; a no-op on ranks other than 0.

    Args:
        run_dir: the run directory; ``metrics.jsonl`` and ``tb/`` are created under it.
        rank: this process's rank.
        tensorboard: also write TensorBoard event files.
    """

    def __init__(self, run_dir: str | Path, rank: int, tensorboard: bool = True):
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def log(
        self,
        step: int,
        scalars: dict[str, float],
        histograms: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Record ``scalars`` (names like ``loss`` or ``moe/imbalance/layer0``) at ``step``.

        ``histograms`` maps a tag to a ``[E]`` tensor of tokens per expert: TensorBoard shows it as
        the distribution of expert ids over the routed tokens (one bin per expert). Non-finite
        scalars are written to JSON as ``null``.
        """
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step}
        for key, value in scalars.items():
            v = float(value)
            record[key] = v if math.isfinite(v) else None
            if self._tb is not None:
                self._tb.add_scalar(key, v, step)
        if histograms and self._tb is not None:
            for key, counts in histograms.items():
                self._add_expert_histogram(key, counts, step)
        self._jsonl.write(json.dumps(record) + "\n")

    def _add_expert_histogram(self, tag: str, counts: torch.Tensor, step: int) -> None:
        counts = counts.detach().double().cpu()
        num = counts.numel()
        ids = torch.arange(num, dtype=torch.float64)
        self._tb.add_histogram_raw(
            tag,
            min=0.0,
            max=float(num - 1),
            num=float(counts.sum()),
            sum=float((ids * counts).sum()),
            sum_squares=float((ids * ids * counts).sum()),
            bucket_limits=(ids + 0.5).tolist(),
            bucket_counts=counts.tolist(),
            global_step=step,
        )

    def close(self) -> None:
        """Flush and close files."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
