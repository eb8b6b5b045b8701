"""Expert parallelism: slice each MoE layer's experts over the ``ep`` mesh dimension.

GShard (Lepikhin et al. 2020, sec. 3.2) / DeepSpeed-MoE (Rajbhandari et al. 2022, sec. 5): rank j
of an EP group keeps global experts ``[j * E/ep, (j+1) * E/ep)`` and tokens reach them through an
uneven all-to-all (:class:`system.moe.dispatch.AllToAllDispatcher`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from system.moe.dispatch import AllToAllDispatcher
from system.moe.layer import MoELayer


def apply_ep(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard the experts of every :class:`MoELayer` of ``model`` over ``mesh["ep"]``, in place.

    Each expert parameter ``[E, ...]`` of the layer's :class:`~system.moe.experts.ExpertModule`
    (SwiGLU weights, or FME modulations) is replaced by its local rows ``[E/ep, ...]`` (the module
    keeps ``expert_offset`` and ``num_global_experts`` so checkpoints use global expert indices);
    dense parts of the layer (router, FME shared block, shared experts) stay replicated. The
    layer's dispatcher becomes an all-to-all over the EP group, and its routing statistics (for the
    load-balancing loss) are summed over all ranks of ``mesh``.

    Call after the model's weights are initialised identically on every rank and before the
    optimizer is built.

    Raises:
        ValueError: when a layer's number of experts does not divide by the EP degree.
    """
    ep_mesh = mesh["ep"]
    ep, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    for moe in (m for m in model.modules() if isinstance(m, MoELayer)):
        experts = moe.experts
        num = experts.num_global_experts
        if num % ep:
            raise ValueError(f"moe.num_experts={num} does not divide by the expert-parallel degree parallel.ep={ep}")
        lo, hi = expert_rows(num, ep, ep_rank)
        experts.keep_experts_(lo, hi)
        if ep > 1:
            moe.dispatcher = AllToAllDispatcher(ep_mesh.get_group(), num)
        if mesh.size() > 1:
            moe.stats_group = dist.group.WORLD


def expert_rows(num_experts: int, ep: int, ep_rank: int) -> tuple[int, int]:
    """Global expert range ``[lo, hi)`` held by ``ep_rank`` of an EP group of size ``ep``."""
    per = num_experts // ep
    return ep_rank * per, (ep_rank + 1) * per


@torch.no_grad()
def gather_experts(local: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """All-gather expert rows ``[E/ep, ...]`` over ``mesh["ep"]`` into the global ``[E, ...]``."""
    ep_mesh = mesh["ep"]
    if ep_mesh.size() == 1:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(ep_mesh.size())]
    dist.all_gather(parts, local.detach().contiguous(), group=ep_mesh.get_group())
    return torch.cat(parts, dim=0)
