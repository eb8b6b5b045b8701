"""Mixture-of-Experts building blocks: router, experts, token dispatch and the MoE layer."""

from system.moe.balance import bias_step, update_expert_bias
from system.moe.dispatch import AllToAllDispatcher, LocalDispatcher, all_to_all
from system.moe.experts import (
    ExpertKind, ExpertModule, FeedForward, GroupedExperts, SwiGLUKind, expert_swiglu, grouped_matmul,
)
from system.moe.fme import FeatureModulatedExperts, FMEKind
from system.moe.layer import MoELayer, MoEStats
from system.moe.router import (
    RouterOutput, TopKRouter, UncertaintyRouter, build_router, limit_groups, load_balancing_loss, router_z_loss,
)

__all__ = [
    "AllToAllDispatcher",
    "ExpertKind",
    "ExpertModule",
    "FMEKind",
    "FeatureModulatedExperts",
    "FeedForward",
    "GroupedExperts",
    "LocalDispatcher",
    "MoELayer",
    "MoEStats",
    "RouterOutput",
    "SwiGLUKind",
    "TopKRouter",
    "UncertaintyRouter",
    "all_to_all",
    "bias_step",
    "build_router",
    "expert_swiglu",
    "grouped_matmul",
    "limit_groups",
    "load_balancing_loss",
    "router_z_loss",
    "update_expert_bias",
]
