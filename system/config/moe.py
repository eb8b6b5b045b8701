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
    shared_expert_dim: int = field(
        default=0, metadata={"help": "Hidden size of the shared-expert SwiGLU; 0: num_shared_experts * expert_dim "
                             "(Qwen2-MoE sets it on its own)."}
    )
    shared_expert_gate: bool = field(
        default=False, metadata={"help": "Scale the shared experts' output by sigmoid(x w_g), w_g [d] (Qwen2-MoE)."}
    )
    score_func: Literal["softmax", "sigmoid"] = field(
        default="softmax", metadata={"help": "Router score function."}
    )
    norm_topk_prob: bool = field(
        default=True, metadata={"help": "Renormalise the top-k weights of each token to sum to 1."}
    )
    route_scale: float = field(
        default=1.0, metadata={"help": "Routed scaling factor: the top-k weights are multiplied by it (DeepSeek-V3)."}
    )
    num_expert_groups: int = field(
        default=0, metadata={"help": "Group-limited routing: experts split into this many equal groups, each token "
                             "picks its experts from num_limited_groups groups (DeepSeek-V3 node-limited routing); "
                             "0 or 1: off."}
    )
    num_limited_groups: int = field(default=0, metadata={"help": "Groups each token may route to (see num_expert_groups)."})
    load_balance: Literal["aux", "bias", "none"] = field(
        default="aux",
        metadata={"help": "aux: the auxiliary load-balancing loss (aux_loss_coef). bias: auxiliary-loss-free balancing "
                  "(DeepSeek-V3, arXiv 2412.19437, sec. 2.1.2): a per-expert bias added to the scores for top-k "
                  "selection only, updated after each step from the observed loads. none: no balancing."},
    )
    bias_update_rate: float = field(
        default=1e-3, metadata={"help": "load_balance = bias: the bias update speed gamma (each step, +gamma for an "
                                "under-loaded expert, -gamma for an over-loaded one)."}
    )
    aux_loss_coef: float = field(
        default=0.01, metadata={"help": "Coefficient of the GShard/Switch auxiliary load-balancing loss."}
    )
    z_loss_coef: float = field(default=0.001, metadata={"help": "Coefficient of the router z-loss (ST-MoE)."})
    capacity_factor: float = field(
        default=0.0,
        metadata={"help": "0: dropless. > 0: each expert takes at most ceil(cf * T * k / E) tokens; the rest drop."},
    )
    expert_type: Literal["ffn", "fme"] = field(
        default="ffn",
        metadata={"help": "ffn: E SwiGLU experts of hidden expert_dim. fme: MoFME feature-modulated experts, one "
                  "shared SwiGLU block of hidden expert_dim run once per token, expert i a per-feature scale and "
                  "shift of its hidden features (docs/mofme.md)."},
    )
    fme_modulation: Literal["vector", "lowrank"] = field(
        default="vector",
        metadata={"help": "FME expert: vector = per-feature scale and shift (2 * expert_dim parameters); lowrank = "
                  "plus a rank-fme_rank linear map of the features (2 * expert_dim * (1 + fme_rank))."},
    )
    fme_rank: int = field(default=8, metadata={"help": "Rank r of the FME low-rank map (fme_modulation = lowrank)."})
    router: Literal["topk", "uncertainty"] = field(
        default="topk",
        metadata={"help": "topk: linear gate + top-k. uncertainty: MoFME uncertainty-aware router (Monte Carlo "
                  "dropout passes in training, top-k on their mean, weights calibrated by their spread; eval = topk)."},
    )
    router_dropout: float = field(
        default=0.1, metadata={"help": "Uncertainty router: dropout on the router input in training, in [0, 1) "
                               "(0 = the plain top-k router)."}
    )
    router_passes: int = field(default=4, metadata={"help": "Uncertainty router: M stochastic passes in training."})
    router_uncertainty_scale: float = field(
        default=1.0, metadata={"help": "Uncertainty router: alpha, weights scaled by 1 / (1 + alpha (std/mean)^2) "
                               "before re-normalisation (0 = mean scores)."}
    )
    grouped_mm: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "Expert kernel: on = torch._grouped_mm, off = fused chunked per-expert kernel (exact), "
        "auto = grouped_mm on CUDA where it runs, the chunked kernel on CPU."}
    )

    def shared_hidden_dim(self) -> int:
        """Hidden size of the shared-expert SwiGLU (0: no shared experts)."""
        if not self.num_shared_experts:
            return 0
        return self.shared_expert_dim or self.num_shared_experts * self.expert_dim

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
        if self.expert_type not in ("ffn", "fme"):
            raise ValueError(f"moe.expert_type must be 'ffn' or 'fme', got {self.expert_type!r}")
        if self.fme_modulation not in ("vector", "lowrank"):
            raise ValueError(f"moe.fme_modulation must be 'vector' or 'lowrank', got {self.fme_modulation!r}")
        if self.fme_rank < 1:
            raise ValueError(f"moe.fme_rank must be >= 1, got {self.fme_rank}")
        if self.router not in ("topk", "uncertainty"):
            raise ValueError(f"moe.router must be 'topk' or 'uncertainty', got {self.router!r}")
        if not 0.0 <= self.router_dropout < 1.0:
            raise ValueError(f"moe.router_dropout must be in [0, 1), got {self.router_dropout}")
        if self.router_passes < 1:
            raise ValueError(f"moe.router_passes must be >= 1, got {self.router_passes}")
        if self.router_uncertainty_scale < 0:
            raise ValueError(f"moe.router_uncertainty_scale must be >= 0, got {self.router_uncertainty_scale}")
        if self.num_expert_groups > 1:
            if self.num_experts % self.num_expert_groups:
                raise ValueError(f"moe.num_experts ({self.num_experts}) must divide by moe.num_expert_groups "
                                 f"({self.num_expert_groups})")
            if not 1 <= self.num_limited_groups <= self.num_expert_groups:
                raise ValueError(f"moe.num_limited_groups must be in [1, moe.num_expert_groups="
                                 f"{self.num_expert_groups}], got {self.num_limited_groups}")
            if self.top_k > self.num_limited_groups * (self.num_experts // self.num_expert_groups):
                raise ValueError(f"moe.top_k ({self.top_k}) exceeds the experts of moe.num_limited_groups "
                                 f"({self.num_limited_groups}) groups")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("moe.shared_expert_gate needs shared experts (moe.num_shared_experts >= 1)")
        if self.load_balance not in ("aux", "bias", "none"):
            raise ValueError(f"moe.load_balance must be 'aux', 'bias' or 'none', got {self.load_balance!r}")
        if self.route_scale <= 0:
            raise ValueError(f"moe.route_scale must be > 0, got {self.route_scale}")
        for key in ("aux_loss_coef", "z_loss_coef", "first_dense_layers", "num_shared_experts", "shared_expert_dim",
                    "num_expert_groups", "num_limited_groups", "bias_update_rate"):
            if getattr(self, key) < 0:
                raise ValueError(f"moe.{key} must be >= 0, got {getattr(self, key)}")
