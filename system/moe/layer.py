"""The MoE feed-forward layer: router -> permute -> dispatch -> grouped experts -> combine.

Dropless by default (every token reaches its k experts; uneven all-to-all under expert
parallelism). With ``capacity_factor > 0`` each expert accepts at most
``ceil(capacity_factor * T * k / E)`` of a group's ``T`` tokens, in GShard's priority order (all
first choices before second choices, then token order; GShard sec. 2.2, Algorithm 1); dropped
assignments contribute nothing and the token passes through the residual connection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from system.config.moe import MoEConfig
from system.moe.dispatch import LocalDispatcher
from system.moe.experts import FeedForward, GroupedExperts
from system.moe.router import TopKRouter, load_balancing_loss, router_z_loss


@dataclass
class MoEStats:
    """What one MoE forward pass measured.

    Attributes:
        aux_loss: scalar load-balancing loss (differentiable).
        z_loss: scalar router z-loss (differentiable).
        tokens_per_expert: ``[E]`` float assignments per expert over the global micro-batch.
        dropped: assignments dropped by the capacity limit on this rank.
        assignments: assignments made on this rank (``T * k``).
        expert_tokens: token copies this rank's experts computed (after dispatch): its expert load.
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped: int
    assignments: int
    expert_tokens: int = 0


class MoELayer(nn.Module):
    """Mixture-of-Experts SwiGLU layer ``[B, S, d] -> [B, S, d]``.

    Holds all E experts until :func:`system.parallel.apply_ep` slices them; the ``dispatcher``
    (local or all-to-all) and ``stats_group`` (the group over which routing statistics are
    summed for the load-balancing loss) are set by the parallelisms, so this code reads like
    single-device code.

    Attributes:
        capacity_groups: in capacity mode, the tokens of one forward are split into this many equal
            groups, each with its own capacity (a single-process reference of an N-rank job uses N).
        last_stats: :class:`MoEStats` of the latest forward.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.router = TopKRouter(dim, cfg.num_experts, cfg.top_k, cfg.score_func, cfg.norm_topk_prob)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_dim, grouped_mm=cfg.grouped_mm)
        self.shared_experts = (
            FeedForward(dim, cfg.expert_dim * cfg.num_shared_experts) if cfg.num_shared_experts else None
        )
        self.dispatcher = LocalDispatcher()
        self.stats_group = None
        self.capacity_groups = 1
        self.last_stats: MoEStats | None = None

    def init_weights(self, std: float, out_std: float) -> None:
        """Initialise router, experts and shared experts."""
        nn.init.trunc_normal_(self.router.gate.weight, std=std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route, dispatch, compute and combine ``x`` ``[B, S, d]``; sets :attr:`last_stats`."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        num_tokens = xf.shape[0]
        route = self.router(xf)
        flat_expert = route.indices.flatten()  # [T*k], assignment a = t*k + j

        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        global_counts = counts.float()
        global_tokens = num_tokens
        if self.stats_group is not None:
            dist.all_reduce(global_counts, group=self.stats_group)
            global_tokens = num_tokens * dist.get_world_size(self.stats_group)
        aux = load_balancing_loss(route.scores, global_counts, global_tokens, self.top_k)
        zloss = router_z_loss(route.logits)

        dropped = 0
        sort_key = flat_expert
        if self.capacity_factor > 0:
            keep = self._capacity_mask(route.indices)
            dropped = int((~keep).sum())
            sort_key = torch.where(keep, flat_expert, self.num_experts)  # dropped sort last
            counts = torch.bincount(flat_expert[keep], minlength=self.num_experts)
        order = torch.argsort(sort_key, stable=True)
        num_kept = flat_expert.numel() - dropped
        order = order[:num_kept]
        token_of = order // self.top_k

        x_local, local_counts = self.dispatcher.dispatch(xf[token_of], counts)
        y_local = self.experts(x_local, local_counts)
        y = self.dispatcher.combine(y_local)
        # Weighted sum over each token's k experts, accumulated in float32 (y may be bf16).
        w = route.weights.flatten()[order]
        out = torch.zeros(num_tokens, shape[-1], dtype=torch.float32, device=xf.device)
        out = out.index_add(0, token_of, y.float() * w[:, None])
        if self.shared_experts is not None:
            out = out + self.shared_experts(xf)
        self.last_stats = MoEStats(
            aux_loss=aux,
            z_loss=zloss,
            tokens_per_expert=global_counts.detach(),
            dropped=dropped,
            assignments=flat_expert.numel(),
            expert_tokens=x_local.shape[0],
        )
        return out.to(x.dtype).view(shape)

    def _capacity_mask(self, indices: torch.Tensor) -> torch.Tensor:
        """``[T*k]`` bool: which assignments fit their expert's capacity within their group.

        Priority inside a (group, expert) bucket: choice rank j first, then token position.
        """
        num_tokens, k = indices.shape
        groups = self.capacity_groups
        if num_tokens % groups:
            raise ValueError(f"capacity_groups={groups} does not divide the {num_tokens} tokens of the batch")
        group_tokens = num_tokens // groups
        capacity = math.ceil(self.capacity_factor * group_tokens * k / self.num_experts)
        t = torch.arange(num_tokens, device=indices.device).repeat_interleave(k)
        j = torch.arange(k, device=indices.device).repeat(num_tokens)
        bucket = (t // group_tokens) * self.num_experts + indices.flatten()
        key = (bucket * k + j) * num_tokens + t
        order = torch.argsort(key)
        sorted_bucket = bucket[order]
        bucket_sizes = torch.bincount(sorted_bucket, minlength=groups * self.num_experts)
        bucket_start = torch.cumsum(bucket_sizes, 0) - bucket_sizes
        position = torch.arange(order.numel(), device=indices.device) - bucket_start[sorted_bucket]
        keep = torch.empty_like(position, dtype=torch.bool)
        keep[order] = position < capacity
        return keep
