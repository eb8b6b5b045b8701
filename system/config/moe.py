"""``[moe]`` section: the Mixture-of-Experts feed-forward layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class MoEConfig:
    """Router, experts and token-dropping policy of every MoE layer."""

    num_experts: int = field(default=8, metadata={"help": "Routed experts E per MoE layer."})
    top_k: int = field(default=2, metadata={"help": "Experts each token is sent to (top-k gating)."})
    expert_dim: int = field(default=512, metadata={"help": "Hidden size of each SwiGLU expert."})
    interleave: int = field(
        default=1, metadata={"help": "Every n-th block is MoE (1: all blocks; 2: blocks 1, 3, ...); others dense."}
    )
    first_dense_layers: int = field(default=0, metadata={"help": "Leading blocks that are always dense."})
    num_shared_experts: int = field(
        default=0, metadata={"help": "Always-active shared experts (one SwiGLU of n * expert_dim) per MoE layer."}
    )
    score_func: Literal["softmax", "sigmoid"] = field(
        default="softmax", metadata={"help": "Router score function."}
    )
    norm_topk_prob: bool = field(
        default=True, metadata={"help": "Renormalise the top-k weights of each token to sum to 1."}
    )
    aux_loss_coef: float = field(
        default=0.01, metadata={"help": "Coefficient of the GShard/Switch auxiliary load-balancing loss."}
    )
    z_loss_coef: float = field(default=0.001, metadata={"help": "Coefficient of the router z-loss (ST-MoE)."})
    capacity_factor: float = field(
        default=0.0,
        metadata={"help": "0: dropless. > 0: each expert takes at most ceil(cf * T * k / E) tokens; the rest drop."},
    )
    grouped_mm: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "Expert kernel: on = torch._grouped_mm, off = fused chunked per-expert kernel (exact), "
        "auto = grouped_mm on CUDA where it runs, the chunked kernel on CPU."}
    )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key when a value is out of range."""
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k must be in [1, moe.num_experts={self.num_experts}], got {self.top_k}")
        if self.expert_dim <= 0:
            raise ValueError(f"moe.expert_dim must be > 0, got {self.expert_dim}")
        if self.interleave < 1:
            raise ValueError(f"moe.interleave must be >= 1, got {self.interleave}")
        if self.capacity_factor < 0:
            raise ValueError(f"moe.capacity_factor must be >= 0 (0 = dropless), got {self.capacity_factor}")
        for key in ("aux_loss_coef", "z_loss_coef", "first_dense_layers", "num_shared_experts"):
            if getattr(self, key) < 0:
                raise ValueError(f"moe.{key} must be >= 0, got {getattr(self, key)}")
