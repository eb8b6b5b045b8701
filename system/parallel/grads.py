"""Gradient reduction and clipping for expert-parallel models.

Under EP every rank reads different data, so the true gradient of a dense parameter is the mean
over all W ranks of the local gradients. An expert held by EP rank j receives, through the
all-to-all backward, the gradient contributions of every token of its EP group; summing those over
the ``dp`` replicas and dividing by W gives the true gradient of the mean loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from system.parallel.layout import ParamLayout, has_layout, layout_of, local_tensor


def _sq_norm(g: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of ``g`` accumulated in float64 (one fused pass, no float64 copy of ``g``)."""
    return torch.linalg.vector_norm(g, dtype=torch.float64).square()


def _flat_all_reduce(grads: list[torch.Tensor], group, scale: float) -> None:
    """Sum ``grads`` over ``group`` in one flattened bucket per dtype, then multiply by ``scale``."""
    if group is None:  # nothing to reduce: scale in place, no flattening copy
        for g in grads:
            g.mul_(scale)
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        offset = 0
        for g in same:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def _ensure_grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Gradients of ``params``, zero-filled where a parameter received none (e.g. an idle expert)."""
    out = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        out.append(p.grad)
    return out


@torch.no_grad()
def all_reduce_grads(params: list[nn.Parameter], group, scale: float) -> None:
    """Sum the gradients of ``params`` over ``group`` (``None``: no collective) and multiply by ``scale``, in place.

    Parameters without a gradient get a zero one first (every rank must contribute the same buckets).
    The gradients travel in one flattened bucket per dtype.
    """
    _flat_all_reduce(_ensure_grads(params), group, scale)


@torch.no_grad()
def clip_by_global_norm_(local: list[torch.Tensor], summed: list[tuple[torch.Tensor, int]], group,
                         max_norm: float) -> torch.Tensor:
    """Clip gradients to a global L2 norm ``max_norm`` (0: no clipping) and return that norm (fp32, 0-dim).

    Args:
        local: gradients every rank holds whole and identical (replicated): their squares count once, locally.
        summed: ``(gradient, copies)`` pairs whose squares, divided by ``copies``, are summed over
            ``group``: shards (``copies = 1``) and gradients held identically by ``copies`` ranks of the group.
        group: the process group of the sum (``None``: this rank alone).
        max_norm: the threshold.

    Squares accumulate in float64; the clip coefficient ``min(1, max_norm / (norm + 1e-6))`` multiplies
    every gradient of both lists.
    """
    device = (local + [g for g, _ in summed])[0].device if (local or summed) else torch.device("cpu")
    local_sq = torch.zeros((), dtype=torch.float64, device=device)
    shared_sq = torch.zeros((), dtype=torch.float64, device=device)
    for g in local:
        local_sq += _sq_norm(g)
    for g, w in summed:
        shared_sq += _sq_norm(g) if w == 1 else _sq_norm(g) / w
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(shared_sq, group=group)
    total = (local_sq + shared_sq).sqrt().float()
    grads = list(local) + [g for g, _ in summed]
    if max_norm > 0 and grads:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
    return total


def _group_key(group) -> int:
    return id(group)


def _layout(p: torch.Tensor, world: int) -> ParamLayout:
    """``p``'s layout record; a parameter of a single-process job that no ``apply_*`` saw is held whole."""
    if world == 1 and not has_layout(p):
        return ParamLayout("dense", tuple(p.shape), replicas=1)
    return layout_of(p)


@torch.no_grad()
def sync_gradients(model: nn.Module, mesh: DeviceMesh | None = None) -> None:
    """Turn each rank's local gradients into the gradient of the global mean loss, in place.

    Reads only each parameter's layout record (:class:`~system.parallel.layout.ParamLayout`): the local
    gradient (a DTensor's local part) is summed over the record's ``grad_group`` (one flattened bucket per
    group and dtype) and divided by its ``grad_divisor``. That covers every layout: replicated dense
    parameters (all-reduce over the stage's ranks, divide by the data-parallel streams), tensor-parallel
    DTensors (DTensor already reduced over ``tp``; all-reduce over the data-parallel ranks), FSDP2 DTensors
    (already reduce-scattered and averaged: nothing), expert-parallel rows (all-reduce over the ``dp``
    replicas; the all-to-all backward already summed the EP group's tokens), FSSDP's owned rows (summed on
    the owner by SparseReduceScatter; divide only).

    Args:
        model: the parallelised model; every parameter has a record (``parallelize_model`` writes them).
        mesh: unused (kept for callers of the earlier signature).

    Raises:
        LookupError: a parameter without a layout record in a job of several ranks (a single-process job's
            unrecorded parameters are held whole).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    buckets: dict[tuple[int, int], tuple[object, int, list[torch.Tensor]]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        lay = _layout(p, world)
        if lay.grad_group is None and lay.grad_divisor == 1:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        key = (_group_key(lay.grad_group), lay.grad_divisor)
        buckets.setdefault(key, (lay.grad_group, lay.grad_divisor, []))[2].append(local_tensor(p.grad))
    for group, divisor, grads in buckets.values():
        _flat_all_reduce(grads, group, 1.0 / divisor)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, mesh: DeviceMesh | None = None, max_norm: float = 1.0) -> torch.Tensor:
    """Clip all gradients to a global L2 norm ``max_norm`` (0 disables clipping); return the norm.

    The norm counts every parameter of the global model once, from the layout records: a gradient held
    whole by every rank counts locally; any other block's squares are divided by the record's ``replicas``
    (ranks holding that same block) and summed over the world in one all-reduce. Call after
    :func:`sync_gradients`.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    local: list[torch.Tensor] = []
    summed: list[tuple[torch.Tensor, int]] = []
    for p in model.parameters():
        if p.grad is None:
            continue
        lay = _layout(p, world)
        g = local_tensor(p.grad)
        if lay.replicas >= world and lay.kind != "fssdp":
            local.append(g)
        else:
            summed.append((g, max(lay.replicas, 1)))
    return clip_by_global_norm_(local, summed, dist.group.WORLD if world > 1 else None, max_norm)
