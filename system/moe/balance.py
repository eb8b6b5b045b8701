"""Auxiliary-loss-free load balancing: the per-step update of the routers' selection bias.

DeepSeek-V3 (arXiv 2412.19437, sec. 2.1.2, "Auxiliary-Loss-Free Load Balancing"; Wang et al. 2024,
arXiv 2408.15664, Algorithm 1): each expert e has a bias ``b_e`` added to its score for the top-k
choice only (:class:`~system.moe.router.TopKRouter`). At the end of each training step, from the
expert loads ``c_e`` (token assignments) of the whole global batch::

    b_e <- b_e + gamma * sign(mean_e(c) - c_e)

an over-loaded expert loses ``gamma``, an under-loaded one gains it. The update is outside autograd
and the optimizer; ``gamma`` is ``moe.bias_update_rate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from system.moe.layer import MoELayer


@torch.no_grad()
def bias_step(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """In place ``bias += rate * sign(mean(load) - load)``.

    Args:
        bias: ``[E]`` float32 selection bias.
        load: ``[E]`` assignments per expert over the global batch (any float or integer dtype).
        rate: gamma >= 0.
    """
    load = load.to(device=bias.device, dtype=torch.float32)
    bias.add_(torch.sign(load.mean() - load), alpha=rate)


@torch.no_grad()
def update_expert_bias(layers: Sequence[MoELayer], loads: Sequence[torch.Tensor], group=None) -> None:
    """Update the selection bias of every bias-balanced MoE layer from its loads over one step.

    Call once per optimizer step, after it, on every rank, with ``loads[i]`` the sum over the step's
    micro-batches of ``layers[i].last_stats.tokens_per_expert``. Those counts are already summed over
    the layer's ``stats_group``: all ranks under expert parallelism or FSSDP when the world has more
    than one rank (:func:`~system.parallel.apply_ep`, :func:`~system.parallel.fssdp.apply.apply_fssdp`),
    which covers every rank that sees different tokens (data- and expert-parallel). A layer without a
    ``stats_group`` holds local counts: they are all-reduced (summed) over ``group`` first, one
    collective per such layer, so that every rank computes the same bias. The inputs being identical
    and the update elementwise, the bias stays bitwise identical across ranks.

    Layers whose router has no ``expert_bias`` (``load_balance != "bias"``) are skipped.

    Args:
        layers: the model's MoE layers (``model.moe_layers()``).
        loads: per layer, ``[E]`` float assignments per expert over the step (not modified).
        group: process group to sum local counts over (``None``: the default group when the
            process group is initialised with more than one rank, else no reduction).

    Raises:
        ValueError: ``layers`` and ``loads`` of different lengths.
    """
    if len(layers) != len(loads):
        raise ValueError(f"update_expert_bias: {len(layers)} MoE layers but {len(loads)} load vectors")
    multi_rank = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    for moe, load in zip(layers, loads):
        bias = moe.router.expert_bias
        if bias is None:
            continue
        if moe.stats_group is None and multi_rank:
            load = load.detach().float().clone()
            dist.all_reduce(load, group=group)  # local counts -> global batch counts
        bias_step(bias, load, moe.router.bias_update_rate)
