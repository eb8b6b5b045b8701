"""Mixture-of-Experts building blocks: router, experts, token dispatch and the MoE layer."""

from system.moe.dispatch import AllToAllDispatcher, LocalDispatcher, all_to_all
from system.moe.experts import FeedForward, GroupedExperts, expert_swiglu, grouped_matmul
from system.moe.layer import MoELayer, MoEStats
from system.moe.router import RouterOutput, TopKRouter, load_balancing_loss, router_z_loss

__all__ = [
    "AllToAllDispatcher",
    "FeedForward",
    "GroupedExperts",
    "LocalDispatcher",
    "MoELayer",
    "MoEStats",
    "RouterOutput",
    "TopKRouter",
    "all_to_all",
    "expert_swiglu",
    "grouped_matmul",
    "load_balancing_loss",
    "router_z_loss",
]
