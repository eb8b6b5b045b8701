"""``[parallel]`` section: degrees of parallelism and the backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ParallelConfig:
    """How the job is spread over ranks. ``dp * ep`` must equal the world size."""

    dp: int = field(default=-1, metadata={"help": "Data-parallel replicas of the experts; -1: world size / ep."})
    ep: int = field(default=1, metadata={"help": "Expert-parallel degree: ranks the experts of a layer are split over."})
    expert_mode: Literal["ep", "fssdp"] = field(
        default="ep",
        metadata={
            "help": "ep: experts split over the ep dimension with all-to-all dispatch; fssdp: every expert "
            "owned by one rank and materialized sparsely where tokens need it (Hecate; see [fssdp])."
        },
    )
    dense: Literal["replicate", "fsdp"] = field(
        default="replicate",
        metadata={"help": "Dense (non-expert) parameters: replicated + all-reduce, or FSDP2 fully sharded."},
    )
    backend: Literal["auto", "nccl", "gloo"] = field(
        default="auto", metadata={"help": "Process-group backend; auto: nccl on CUDA, gloo on CPU."}
    )
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata={"help": "Compute device; auto: cuda when available."}
    )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key when a value is out of range."""
        if self.ep < 1:
            raise ValueError(f"parallel.ep must be >= 1, got {self.ep}")
        if self.dp == 0 or self.dp < -1:
            raise ValueError(f"parallel.dp must be >= 1 or -1 (derived), got {self.dp}")
