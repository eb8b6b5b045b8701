"""Apply the configured parallelisms to a :class:`~system.models.model.MoETransformer` (or one pipeline stage of it).

Order (TorchTitan's ``parallelize_<model>``): tensor parallelism (it turns dense weights into DTensors over
``tp``), expert parallelism or FSSDP (slices the experts, installs the dispatcher), the replicated-dense
layout records for everything left, activation checkpointing, ``torch.compile``, and FSDP2 last (it wraps
what the others produced). Each ``apply_*`` records where the parameters it moved live
(:mod:`system.parallel.layout`); nothing downstream looks at module types.

::

    TP (apply_tp) -> EP (apply_ep) | FSSDP (apply_fssdp) -> record_replicated -> AC (apply_ac)
       -> compile (apply_compile) -> FSDP2 (apply_fsdp)
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from system.config.fssdp import FSSDPConfig
from system.config.parallel import ParallelConfig
from system.distributed.parallel_dims import ParallelDims
from system.parallel.expert_parallel import apply_ep, stage_group
from system.parallel.fsdp import apply_fsdp
from system.parallel.layout import record_replicated


def _dims_of(mesh_or_dims: DeviceMesh | ParallelDims, parallel: ParallelConfig) -> ParallelDims:
    """A :class:`ParallelDims` for an expert mesh ``("dp", "ep")`` given directly (``pp = tp = 1`` jobs)."""
    if isinstance(mesh_or_dims, ParallelDims):
        return mesh_or_dims
    mesh = mesh_or_dims
    names = mesh.mesh_dim_names or ()
    if any(mesh[n].size() > 1 for n in ("pp", "etp") if n in names) or parallel.tp > 1 or parallel.pp > 1:
        raise ValueError("tensor or pipeline parallelism needs the ParallelDims (with its world mesh), not an expert mesh")
    dims = ParallelDims.from_config(mesh["dp"].size(), mesh["ep"].size(), mesh.size())
    dims._expert_mesh = mesh
    return dims


def parallelize_model(
    model: nn.Module,
    mesh: DeviceMesh | ParallelDims,
    parallel: ParallelConfig,
    param_dtype: torch.dtype | None = None,
    fssdp: FSSDPConfig | None = None,
    *,
    activation_checkpoint: str = "none",
    compile: bool = False,
):
    """Apply tensor, expert (or FSSDP) and data parallelism, activation checkpointing and compile, in that order.

    ``parallel.expert_mode == "ep"``: expert parallelism over the expert mesh's ``"ep"`` (a no-op slice when
    ``ep == 1``). ``"fssdp"``: Hecate's FSSDP over the ranks of the stage (``ep`` must be 1).

    Args:
        model: an initialised model (or pipeline stage), identical on every rank of its stage.
        mesh: the job's :class:`~system.distributed.ParallelDims` (meshes built), or, for a job without tensor
            and pipeline parallelism, its expert mesh ``("dp", "ep")``.
        parallel: the ``[parallel]`` config.
        param_dtype: FSDP2 compute dtype (bf16 on CUDA under mixed precision), or None.
        fssdp: the ``[fssdp]`` config (defaults when None).
        activation_checkpoint: ``training.activation_checkpoint``: ``"none"``, ``"full"`` or ``"selective"``.
        compile: ``training.compile``: ``torch.compile`` each block.

    Returns:
        The :class:`~system.parallel.fssdp.FSSDPController` under FSSDP, else None.

    Raises:
        ValueError: FSSDP requested with ``parallel.ep > 1``; tensor/pipeline parallelism without ParallelDims.
    """
    dims = _dims_of(mesh, parallel)
    emesh = dims.mesh
    if dims.tp > 1:
        from system.parallel.tp import apply_tp

        apply_tp(model, dims, parallel)
    controller = None
    stage = dims.world_size // dims.pp
    if parallel.expert_mode == "fssdp":
        if dims.ep != 1:
            raise ValueError(
                f"parallel.expert_mode='fssdp' shards experts over all ranks; set parallel.ep=1 (got {dims.ep})"
            )
        from system.parallel.fssdp.apply import apply_fssdp

        group = stage_group(emesh) if dims.pp > 1 else None
        controller = apply_fssdp(model, fssdp or FSSDPConfig(), group, grad_divisor=dims.dp_degree)
    elif dims.expert_tp and dims.tp > 1:
        from system.parallel.tp import apply_expert_tp

        apply_expert_tp(model, dims, parallel)
    else:
        apply_ep(model, emesh, grad_divisor=dims.dp_degree, a2a=parallel.a2a, ranks_per_node=parallel.a2a_ranks_per_node)
    world_group = stage_group(emesh) if stage > 1 else None
    record_replicated(model, replicas=stage, grad_group=world_group, grad_divisor=dims.dp_degree)
    if activation_checkpoint != "none":
        from system.parallel.ac import apply_ac

        apply_ac(model, activation_checkpoint)
    if compile:
        from system.parallel.compile import apply_compile

        apply_compile(model)
    if parallel.dense == "fsdp":
        fsdp_mesh = dims.world_mesh if dims._world_mesh is not None else emesh
        apply_fsdp(model, fsdp_mesh, param_dtype=param_dtype, world_size=dims.world_size, pp=dims.pp)
    return controller

