"""FSDP2 for the dense parameters, composed with expert parallelism and tensor parallelism on the same ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from system.parallel.layout import ParamLayout, dtensor_replicas, has_layout, layout_of, record


def _dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards over: a world mesh's ``("dp_replicate", "dp_shard")`` (HSDP when replicas > 1,
    else ``"dp_shard"``), or any other mesh flattened (the expert mesh ``("dp", "ep")`` of a ``pp = tp = 1`` job)."""
    names = mesh.mesh_dim_names or ()
    if "dp_shard" in names:
        if "dp_replicate" in names and mesh["dp_replicate"].size() > 1:
            return mesh[("dp_replicate", "dp_shard")]
        return mesh["dp_shard"]
    return mesh._flatten("_".join(names)) if mesh.ndim > 1 else mesh


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None = None, *,
               world_size: int | None = None, pp: int = 1) -> None:
    """Fully shard the dense parameters of ``model`` over the data-parallel ranks of ``mesh``, in place.

    Every transformer block is one FSDP2 unit and the root holds the embeddings, final norm and head.
    Expert parameters (layout kind ``"expert"``/``"fssdp"``) are left out (``ignored_params``): they are
    sharded by expert parallelism or FSSDP and their gradients reduced by :func:`~system.parallel.grads.sync_gradients`.
    FSDP2 reduce-scatters dense gradients averaged over the data-parallel ranks, which is what replicated
    all-reduce would give. Parameters that are already DTensors over a tensor-parallel mesh (from
    :func:`~system.parallel.tp.apply_tp`) become 2-D (FSDP x TP) DTensors. Each dense parameter's layout
    record is rewritten for its new DTensor (no gradient all-reduce left to do, no further division).

    Args:
        model: a model with ``blocks()`` (or a ``layers`` container).
        mesh: the world mesh (``"dp_replicate"``, ``"dp_shard"`` dimensions) or, for a job without TP and PP,
            the expert mesh ``("dp", "ep")`` whose ranks are all data-parallel.
        param_dtype: compute dtype for the all-gathered parameters (e.g. bf16 on CUDA), or None.
        world_size: ranks of the job (default: the default group's size), for the records' replica counts.
        pp: pipeline-parallel degree (a stage's parameters exist on its ranks only).
    """
    dp_mesh = _dp_mesh(mesh)
    ignored = {p for p in model.parameters() if has_layout(p) and layout_of(p).kind != "dense"}
    # Plain dense parameters whose gradient was summed over more ranks than FSDP2 reduces over (an MoE router
    # under tensor parallelism sees other tokens on each "tp" rank): the sum over "tp" is left to the record.
    beyond_dp = {name for name, p in model.named_parameters() if p not in ignored and not isinstance(p, DTensor)
                 and has_layout(p) and layout_of(p).grad_group is not None
                 and dist.get_world_size(layout_of(p).grad_group) > dp_mesh.size()}
    names = mesh.mesh_dim_names or ()
    tp_group = mesh["tp"].get_group() if "tp" in names and mesh["tp"].size() > 1 else None
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = model.blocks() if hasattr(model, "blocks") else list(model.layers)
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, ignored_params=ignored, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, ignored_params=ignored, mp_policy=mp)
    world = world_size or (dist.get_world_size() if dist.is_initialized() else 1)
    for name, p in model.named_parameters():
        if p in ignored or not isinstance(p, DTensor):
            continue
        kind = layout_of(p).kind if has_layout(p) else "dense"
        record(p, ParamLayout(kind, tuple(p.shape), replicas=dtensor_replicas(p, world, pp),
                              grad_group=tp_group if name in beyond_dp else None, grad_divisor=1))
