"""Top-k gating with the auxiliary load-balancing loss and the router z-loss.

- Top-k softmax gating: Shazeer et al. 2017; GShard (Lepikhin et al. 2020, sec. 2.2).
- Auxiliary load-balancing loss ``E * sum_e f_e * P_e``: Switch Transformer (Fedus et al. 2021,
  eq. 4-6), generalised to top-k as in GShard / Megatron-Core.
- Router z-loss ``mean(logsumexp(logits)^2)``: ST-MoE (Zoph et al. 2022, sec. 3.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RouterOutput:
    """One routing decision for ``T`` tokens.

    Attributes:
        indices: ``[T, k]`` int64 expert ids (global numbering ``0..E-1``).
        weights: ``[T, k]`` float32 combine weights.
        scores: ``[T, E]`` float32 router scores (softmax probabilities or sigmoid scores).
        logits: ``[T, E]`` float32 raw router logits.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor


class TopKRouter(nn.Module):
    """Linear router ``d -> E`` followed by top-k selection, computed in float32.

    ``forced_indices`` (``[T, k]`` int64, or ``None``) overrides the choice for the next forward
    passes while keeping the router's weights for the chosen experts: the forced-routing knob used
    by benchmarks so that every system sees identical assignments.

    Args:
        dim: model width d.
        num_experts: E.
        top_k: k experts per token.
        score_func: ``"softmax"`` or ``"sigmoid"``.
        norm_topk_prob: renormalise the k weights of each token to sum to 1.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, score_func: str = "softmax", norm_topk_prob: bool = True):
        super().__init__()
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.norm_topk_prob = norm_topk_prob
        self.forced_indices: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route ``x`` of shape ``[T, d]``; see :class:`RouterOutput`."""
        logits = F.linear(x.float(), self.gate.weight.float())
        scores = torch.softmax(logits, dim=-1) if self.score_func == "softmax" else torch.sigmoid(logits)
        if self.forced_indices is not None:
            indices = self.forced_indices.to(device=x.device, dtype=torch.int64)
            if indices.shape != (x.shape[0], self.top_k):
                raise ValueError(
                    f"forced_indices has shape {tuple(indices.shape)}, expected ({x.shape[0]}, {self.top_k})"
                )
            weights = scores.gather(1, indices)
        else:
            weights, indices = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return RouterOutput(indices=indices, weights=weights, scores=scores, logits=logits)


def load_balancing_loss(scores: torch.Tensor, global_counts: torch.Tensor, global_tokens: int, top_k: int) -> torch.Tensor:
    """Auxiliary load-balancing loss ``E * sum_e f_e * P_e`` (Switch Transformer eq. 4).

    ``f_e`` is the fraction of the ``global_tokens * top_k`` assignments that went to expert e,
    counted over the whole global micro-batch (all ranks, a constant); ``P_e`` is the mean router
    score of this rank's tokens. Averaging this loss over ranks (as data-parallel gradient averaging
    does) gives exactly the loss of the global batch: the same value and gradient as one process
    holding every rank's tokens. Equals 1 under perfectly uniform routing.

    Args:
        scores: ``[T, E]`` router scores of the local tokens (differentiable).
        global_counts: ``[E]`` float assignments per expert over all ranks (not differentiable).
        global_tokens: tokens over all ranks.
        top_k: k.
    """
    num_experts = scores.shape[-1]
    f = global_counts.detach().float() / float(max(global_tokens * top_k, 1))
    p = scores.float().mean(dim=0)
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_e logits[t, e])^2`` for ``logits`` ``[T, E]``."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
