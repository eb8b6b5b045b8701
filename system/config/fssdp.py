"""``[fssdp]`` section: Fully Sharded Sparse Data Parallelism for experts (Hecate, arXiv 2502.02581)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FSSDPConfig:
    """Knobs of FSSDP (used when ``parallel.expert_mode = "fssdp"``); defaults follow the paper."""

    load_window: int = field(
        default=5, metadata={"help": "w: expert loads are a moving average over the last w iterations (Alg. 1)."}
    )
    overlap_budget: int = field(
        default=-1,
        metadata={
            "help": "t: extra experts per device whose gathering hides behind attention; "
            "-1: estimated from measured attention time x gather bandwidth / expert bytes."
        },
    )
    memory_budget: int = field(
        default=2, metadata={"help": "m: extra (non-owned) materialized experts per device and layer."}
    )
    replicate_above: float = field(
        default=1.0,
        metadata={
            "help": "Replicate an expert only while its load per copy exceeds this x the mean expert load "
            "(1.0: experts at or below average load are never replicated; 0: every budgeted copy is used, as in the paper)."
        },
    )
    reshard_interval: int = field(
        default=100, metadata={"help": "R: iterations between heterogeneous re-shardings (Alg. 2); 0 disables."}
    )
    rematerialize: bool = field(
        default=False,
        metadata={"help": "RM: free materialized experts after forward and gather them again for backward."},
    )
    prefetch: bool = field(
        default=True,
        metadata={
            "help": "Start each layer's SparseAllGather asynchronously when its transformer block begins, so "
            "it overlaps attention (CUDA: NCCL stream; Gloo: its background thread)."
        },
    )
    ranks_per_node: int = field(
        default=0, metadata={"help": "Ranks per node for locality-aware token routing; 0: LOCAL_WORLD_SIZE."}
    )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key when a value is out of range."""
        if self.load_window < 1:
            raise ValueError(f"fssdp.load_window must be >= 1, got {self.load_window}")
        if self.overlap_budget < -1:
            raise ValueError(f"fssdp.overlap_budget must be >= 0 or -1 (estimate), got {self.overlap_budget}")
        for key in ("memory_budget", "reshard_interval", "ranks_per_node", "replicate_above"):
            if getattr(self, key) < 0:
                raise ValueError(f"fssdp.{key} must be >= 0, got {getattr(self, key)}")
