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
from torch.distributed.tensor import DTensor

from system.parallel.params import split_parameters


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
def sync_gradients(model: nn.Module, mesh: DeviceMesh) -> None:
    """Average gradients as data parallelism requires, in place.

    - Dense parameters that are plain tensors (replicated): all-reduce over all ranks, divide by W.
      FSDP2-sharded dense parameters (DTensors) were already reduce-scattered and are skipped.
    - Expert parameters: all-reduce over the ``dp`` mesh dimension (replicas of the same experts),
      divide by W.
    - FSSDP owned expert rows: SparseReduceScatter already summed every copy's gradient on the
      owner during backward; divide by W.
    """
    world = mesh.size()
    split = split_parameters(model)
    replicated = [p for p in split.dense if p.requires_grad and not isinstance(p, DTensor)]
    if replicated and world > 1:
        _flat_all_reduce(_ensure_grads(replicated), dist.group.WORLD, 1.0 / world)
    expert = [p for p in split.ep_experts if p.requires_grad]
    if expert:
        dp_group = mesh["dp"].get_group() if mesh["dp"].size() > 1 else None
        _flat_all_reduce(_ensure_grads(expert), dp_group, 1.0 / world)
    owned = [p for p in split.fssdp_experts if p.requires_grad]
    if owned:
        _flat_all_reduce(_ensure_grads(owned), None, 1.0 / world)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, mesh: DeviceMesh, max_norm: float) -> torch.Tensor:
    """Clip all gradients to a global L2 norm ``max_norm`` (0 disables clipping); return the norm.

    The norm counts every parameter of the global model once: replicated dense gradients locally,
    FSDP2 shards and expert rows summed over the ranks that hold them (expert rows are replicated
    ``dp`` times, so their squares are divided by ``dp`` before the one all-reduce). Call after
    :func:`sync_gradients`.
    """
    split = split_parameters(model)
    dense, expert = split.dense, split.ep_experts
    dp = mesh["dp"].size()
    device = next(model.parameters()).device
    local_sq = torch.zeros((), dtype=torch.float64, device=device)
    shared_sq = torch.zeros((), dtype=torch.float64, device=device)
    grads = []
    for p in dense:
        if p.grad is None:
            continue
        g = p.grad
        if isinstance(g, DTensor):
            shared_sq += _sq_norm(g.to_local())
            grads.append(g.to_local())
        else:
            local_sq += _sq_norm(g)
            grads.append(g)
    for p in expert:
        if p.grad is not None:
            shared_sq += _sq_norm(p.grad) / dp
            grads.append(p.grad)
    for p in split.fssdp_experts:  # one owner per expert row
        if p.grad is not None:
            shared_sq += _sq_norm(p.grad)
            grads.append(p.grad)
    if mesh.size() > 1:
        dist.all_reduce(shared_sq)
    total = (local_sq + shared_sq).sqrt().float()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
    return total
