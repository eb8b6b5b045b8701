"""``[parallel]`` section: degrees of parallelism, how the model is split over them, and the backend.

The world is a ``pp x dp_replicate x dp_shard x tp`` grid (TorchTitan's order, ``tp`` innermost so a
tensor-parallel group sits inside one node). Expert parallelism folds onto ``dp_shard x tp`` (the ranks
of one pipeline stage and one ``dp_replicate`` replica), Megatron-Core's "parallel folding": attention
is split ``tp`` ways while the experts of a layer are split ``ep`` ways over the same ranks. The one
place that turns these keys into meshes is :class:`system.distributed.ParallelDims`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble")
"""``parallel.pp_schedule`` values: the schedules of ``torch.distributed.pipelining`` by their short names."""
MULTI_STAGE_SCHEDULES = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble")
"""Schedules that place several (virtual) stages on each pipeline rank."""


@dataclass
class ParallelConfig:
    """How the job is spread over ranks: ``pp * dp_replicate * dp_shard * tp`` must equal the world size."""

    dp: int = field(
        default=-1,
        metadata={"help": "Expert data-parallel degree: replicas of each expert shard (world / (pp * ep), / tp "
                  "too with expert_tp); -1: derived. Set only to check it."},
    )
    ep: int = field(default=1, metadata={"help": "Expert-parallel degree: ranks the experts of a layer are split over "
                                            "(folded onto dp_shard x tp; onto dp_shard with expert_tp)."})
    expert_mode: Literal["ep", "fssdp"] = field(
        default="ep",
        metadata={
            "help": "ep: experts split over the ep dimension with all-to-all dispatch; fssdp: every expert "
            "owned by one rank and materialized sparsely where tokens need it (Hecate; see [fssdp])."
        },
    )
    dense: Literal["replicate", "fsdp"] = field(
        default="replicate",
        metadata={"help": "Dense (non-expert) parameters: replicated + all-reduce, or FSDP2 fully sharded over "
                  "dp_shard (HSDP: replicated over dp_replicate)."},
    )
    dp_replicate: int = field(
        default=1, metadata={"help": "Data-parallel replicas of the dense parameters (HSDP's replicate dimension)."}
    )
    dp_shard: int = field(
        default=-1, metadata={"help": "Data-parallel ranks the dense parameters are sharded over under "
                              "dense='fsdp'; -1: world / (pp * dp_replicate * tp)."}
    )
    tp: int = field(default=1, metadata={"help": "Tensor-parallel degree: attention heads, dense FFN columns and the "
                                            "output head split over tp ranks (sequence parallel in between)."})
    expert_tp: bool = field(
        default=False,
        metadata={"help": "Shard each expert's FFN over the tp ranks (column/row-wise) instead of folding expert "
                  "parallelism onto them."},
    )
    loss_parallel: bool = field(
        default=True,
        metadata={"help": "With tp > 1: cross-entropy on the vocabulary-sharded logits, never gathering [B, S, V]."},
    )
    pp: int = field(default=1, metadata={"help": "Pipeline-parallel degree: ranks the blocks are split over."})
    pp_schedule: str = field(
        default="1F1B",
        metadata={"help": "Pipeline schedule (torch.distributed.pipelining): " + ", ".join(PP_SCHEDULES) + "."},
    )
    pp_microbatches: int = field(
        default=0,
        metadata={"help": "Micro-batches each rank's batch is split into per pipeline step; 0: the number of stages."},
    )
    pp_stages_per_rank: int = field(
        default=0,
        metadata={"help": "Pipeline stages (model chunks) per pp rank; 0: 1, or 2 for the multi-stage schedules "
                  "(" + ", ".join(MULTI_STAGE_SCHEDULES) + ")."},
    )
    a2a: Literal["flat", "hierarchical"] = field(
        default="flat",
        metadata={"help": "Expert-parallel all-to-all: one flat exchange, or SE-MoE's hierarchical one (intra-node to "
                  "the local rank of the destination, then inter-node among ranks of equal local rank)."},
    )
    a2a_ranks_per_node: int = field(
        default=0, metadata={"help": "Ranks per node for the hierarchical all-to-all; 0: LOCAL_WORLD_SIZE."}
    )
    backend: Literal["auto", "nccl", "gloo"] = field(
        default="auto", metadata={"help": "Process-group backend; auto: nccl on CUDA, gloo on CPU."}
    )
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata={"help": "Compute device; auto: cuda when available."}
    )

    def stages_per_rank(self) -> int:
        """Pipeline stages per pp rank: ``pp_stages_per_rank``, or the schedule's minimum (1, or 2 multi-stage)."""
        if self.pp_stages_per_rank:
            return self.pp_stages_per_rank
        return 2 if self.pp_schedule in MULTI_STAGE_SCHEDULES else 1

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key when a value is out of range (degrees against the world size
        are checked by :class:`system.distributed.ParallelDims`)."""
        for key in ("ep", "tp", "pp", "dp_replicate"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("dp", "dp_shard"):
            if getattr(self, key) == 0 or getattr(self, key) < -1:
                raise ValueError(f"parallel.{key} must be >= 1 or -1 (derived), got {getattr(self, key)}")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"parallel.pp_schedule must be one of {', '.join(PP_SCHEDULES)}, got {self.pp_schedule!r}")
        for key in ("pp_microbatches", "pp_stages_per_rank", "a2a_ranks_per_node"):
            if getattr(self, key) < 0:
                raise ValueError(f"parallel.{key} must be >= 0, got {getattr(self, key)}")
        if self.pp_schedule in MULTI_STAGE_SCHEDULES and self.pp_stages_per_rank == 1:
            raise ValueError(f"parallel.pp_schedule={self.pp_schedule!r} needs parallel.pp_stages_per_rank >= 2 (or 0)")
        if self.pp_schedule not in MULTI_STAGE_SCHEDULES and self.pp_stages_per_rank > 1:
            raise ValueError(f"parallel.pp_schedule={self.pp_schedule!r} runs one stage per rank; "
                             f"parallel.pp_stages_per_rank={self.pp_stages_per_rank} needs a multi-stage schedule "
                             f"({', '.join(MULTI_STAGE_SCHEDULES)})")
        if self.pp_schedule == "ZBVZeroBubble" and self.stages_per_rank() != 2:
            raise ValueError("parallel.pp_schedule='ZBVZeroBubble' (a V schedule) needs exactly 2 stages per rank")
        if self.expert_tp and self.expert_mode == "fssdp":
            raise ValueError("parallel.expert_tp shards experts over tp ranks; FSSDP (expert_mode='fssdp') owns whole "
                             "experts: use one of them")
