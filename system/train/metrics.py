"""Run records: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard, rank 0 only.

``metrics.jsonl`` is append-only, so a crash never damages what was logged. A job that resumes (or
restarts) in a run folder appends a marker row ``{"step": S, "event": "resume", ...}`` first: rows
logged before it for steps above ``S`` belong to work that was lost and recomputed.
:func:`read_metrics` applies that rule and merges the rows of each step (the loss record and the
validation record of one step are two rows); read the file through it. TensorBoard hides the lost
steps itself (``purge_step``).

The FLOP accounting behind MFU lives in :mod:`system.train.flops`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

class MetricsLogger:
    """Writes scalars and histograms of a run; a no-op on ranks other than 0.

    Args:
        run_dir: the run directory; ``metrics.jsonl`` and ``tb/`` are created under it.
        rank: this process's rank.
        tensorboard: also write TensorBoard event files.
        resume_step: the step a resumed (or restarted) job starts from: writes the resume marker row
            and has TensorBoard purge the events of later steps. None for a fresh run.
        resume_from: where the resumed state came from (a checkpoint path; empty for a restart from
            step 0), recorded in the marker.
    """

    def __init__(self, run_dir: str | Path, rank: int, tensorboard: bool = True, resume_step: int | None = None,
                 resume_from: str = ""):
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        continuing = resume_step is not None and path.is_file() and path.stat().st_size > 0
        self._jsonl = open(path, "a", buffering=1)
        if continuing:
            self._jsonl.write(json.dumps({"step": resume_step, "event": "resume", "from": resume_from,
                                         "unix_s": round(time.time(), 3)}) + "\n")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)

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


class RoutingTrace:
    """Per-step expert loads of every MoE layer, appended to ``<run_dir>/routing_trace.jsonl`` (rank 0).

    One JSON line per optimizer step: ``{"step": S, "tokens": T, "tokens_per_expert": [[n_0, ..., n_{E-1}], ...]}``
    with ``T`` the global tokens of the step and one ``[E]`` list of global assignments per MoE layer
    (summed over ranks and micro-batches; ``sum = T * top_k`` when nothing is dropped). A resumed run
    appends; :func:`read_routing_trace` keeps the last row of each step. It is the routing input of
    ``benchmarks/expert_parallel_sim.py``.

    Args:
        run_dir: the run directory.
        rank: this process's rank (only rank 0 writes).
    """

    FILE = "routing_trace.jsonl"

    def __init__(self, run_dir: str | Path, rank: int):
        self._f = None
        if rank == 0:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self._f = open(Path(run_dir) / self.FILE, "a", buffering=1)

    def record(self, step: int, tokens: int, loads: list[torch.Tensor]) -> None:
        """Append step ``step``'s loads (``loads[i]`` ``[E]`` for MoE layer ``i``)."""
        if self._f is None:
            return
        rows = [[int(round(float(x))) for x in load.tolist()] for load in loads]
        self._f.write(json.dumps({"step": step, "tokens": int(tokens), "tokens_per_expert": rows}) + "\n")

    def close(self) -> None:
        """Close the file."""
        if self._f is not None:
            self._f.close()
            self._f = None


def read_routing_trace(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``routing_trace.jsonl`` by step, the last row of each step winning (see :class:`RoutingTrace`)."""
    rows: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, one per step, oldest first, as the run finally computed them.

    Rows of one step are merged (later keys win). A resume marker ``{"step": S, "event": "resume"}``
    drops every earlier row of a step above ``S`` (work lost in a crash and done again after the
    resume). Marker rows themselves are not returned.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line is not a JSON object with an integer ``step`` (names the line).
    """
    by_step: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: line {lineno} is not a metrics record: {e}") from None
            if row.get("event") == "resume":
                for s in [s for s in by_step if s > step]:
                    del by_step[s]
                continue
            by_step.setdefault(step, {}).update(row)
    return [by_step[s] for s in sorted(by_step)]
