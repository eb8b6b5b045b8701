"""Expert parallelism: slice each MoE layer's experts over the ``ep`` mesh dimension.

GShard (Lepikhin et al. 2020, sec. 3.2) / DeepSpeed-MoE (Rajbhandari et al. 2022, sec. 5): rank j
of an EP group keeps global experts ``[j * E/ep, (j+1) * E/ep)`` and tokens reach them through an
uneven all-to-all (:class:`system.moe.dispatch.AllToAllDispatcher`).
"""

from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from system.moe.hierarchical_a2a import build_ep_dispatcher
from system.moe.layer import MoELayer
from system.parallel.layout import ParamLayout, Replicate, Shard, record


def _dim_size(mesh: DeviceMesh, name: str) -> int:
    return mesh[name].size() if name in (mesh.mesh_dim_names or ()) else 1


def stage_group(mesh: DeviceMesh):
    """The process group of the ranks of this rank's pipeline stage on ``mesh`` (an expert mesh with ``"dp"``
    and ``"ep"`` and optionally ``"pp"``/``"etp"`` dimensions); ``None`` for one rank. With ``pp = 1`` it is
    the world."""
    names = [n for n in (mesh.mesh_dim_names or ()) if n != "pp"]
    if mesh.size() // _dim_size(mesh, "pp") == 1:
        return None
    if _dim_size(mesh, "pp") == 1:
        return dist.group.WORLD
    return mesh[tuple(names)]._flatten("stage").get_group()


def apply_ep(model: nn.Module, mesh: DeviceMesh, *, grad_divisor: int | None = None, a2a: str = "flat",
             ranks_per_node: int = 0) -> None:
    """Shard the experts of every :class:`MoELayer` of ``model`` over ``mesh["ep"]``, in place.

    Each expert parameter ``[E, ...]`` of the layer's :class:`~system.moe.experts.ExpertModule`
    (SwiGLU weights, or FME modulations) is replaced by its local rows ``[E/ep, ...]`` (the module
    keeps ``expert_offset`` and ``num_global_experts`` so checkpoints use global expert indices);
    dense parts of the layer (router, FME shared block, shared experts) stay replicated. The
    layer's dispatcher becomes an all-to-all over the EP group, and its routing statistics (for the
    load-balancing loss) are summed over all ranks of ``mesh``.

    Each expert parameter gets its layout record (:mod:`system.parallel.layout`): ``Shard(0)`` over ``"ep"``
    at offset ``expert_offset``, ``Replicate()`` over ``"dp"``, gradient summed over the ``"dp"`` replicas
    and divided by ``grad_divisor``.

    Call after the model's weights are initialised identically on every rank and before the
    optimizer is built.

    Args:
        model: the model (its MoE layers hold all E experts).
        mesh: the expert mesh (:meth:`system.distributed.ParallelDims.build_mesh`; any mesh with ``"dp"`` and
            ``"ep"`` dimensions).
        grad_divisor: data-parallel streams the loss is averaged over; default: the ranks of one pipeline
            stage (right when every rank of the stage reads its own batch, i.e. no tensor parallelism).
        a2a: ``parallel.a2a``: ``"flat"`` or ``"hierarchical"`` all-to-all.
        ranks_per_node: ``parallel.a2a_ranks_per_node`` for the hierarchical all-to-all (0: ``LOCAL_WORLD_SIZE``).

    Raises:
        ValueError: when a layer's number of experts does not divide by the EP degree.
    """
    ep_mesh = mesh["ep"]
    ep, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    dp = _dim_size(mesh, "dp")
    stage = mesh.size() // _dim_size(mesh, "pp")
    divisor = grad_divisor if grad_divisor is not None else stage
    dp_group = mesh["dp"].get_group() if dp > 1 else None
    stats = stage_group(mesh) if stage > 1 else None
    for moe in (m for m in model.modules() if isinstance(m, MoELayer)):
        experts = moe.experts
        num = experts.num_global_experts
        if num % ep:
            raise ValueError(f"moe.num_experts={num} does not divide by the expert-parallel degree parallel.ep={ep}")
        lo, hi = expert_rows(num, ep, ep_rank)
        experts.keep_experts_(lo, hi)
        for p in experts.parameters():
            record(p, ParamLayout(
                "expert", (num, *p.shape[1:]), offsets=(lo,) + (0,) * (p.dim() - 1),
                placements=(("dp", Replicate()), ("ep", Shard(0))), replicas=dp * _dim_size(mesh, "etp"),
                grad_group=dp_group, grad_divisor=divisor, shard_group=ep_mesh.get_group() if ep > 1 else None,
            ))
        if ep > 1:
            moe.dispatcher = build_ep_dispatcher(ep_mesh, num, a2a, ranks_per_node)
        if stats is not None:
            moe.stats_group = stats


def expert_rows(num_experts: int, ep: int, ep_rank: int) -> tuple[int, int]:
    """Global expert range ``[lo, hi)`` held by ``ep_rank`` of an EP group of size ``ep``."""
    per = num_experts // ep
    return ep_rank * per, (ep_rank + 1) * per
