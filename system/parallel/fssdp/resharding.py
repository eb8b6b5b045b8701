"""Heterogeneous sharding: re-assign expert owners by load, and move their state with them.

Hecate (arXiv 2502.02581, Algorithm 2; DESIGN.md section 3): every R iterations (100 in the paper)
the owners are re-assigned from the expert loads so that the owners' total load is balanced
(hot experts on different devices, under-loaded experts spread over the least-loaded devices),
with at most ``ceil(E / W)`` experts per rank so memory stays balanced. :func:`reshard` then moves
each expert's rows (parameters and optimizer state) to its new owner with one all-to-all.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from system.parallel.fssdp.collectives import as_rows_of_bytes, exchange_plan, from_rows_of_bytes
from system.parallel.fssdp.ownership import Ownership


def heterogeneous_sharding(load: torch.Tensor, world_size: int, previous: Ownership | None = None) -> Ownership:
    """Hecate Algorithm 2, as a deterministic greedy (longest-processing-time first) assignment.

    Experts are taken by load descending (ties by expert id). The greedy choice for expert e is the
    rank with the least assigned load among the ranks holding fewer than ``ceil(E / W)`` experts,
    ties by fewest experts, then lowest rank. With ``previous``, e stays at its previous owner p
    instead when p still has room and keeping it does not worsen balance: the largest assigned
    load after placing e on p is no larger than after placing it on the greedy choice (in
    particular ``previous`` is returned unchanged when it is the greedy answer for ``load``). Every
    step that raises the largest load still goes to a least-loaded rank, so the LPT bound holds.

    Slots: without ``previous``, each rank's experts are in ascending id order; with it, experts
    that stay keep their previous relative order first, then arrivals in ascending id order.

    Args:
        load: ``[E]`` expert loads (e.g. ``LoadTracker.load``).
        world_size: W.
        previous: the current ownership, to limit movement.

    Returns:
        The new :class:`Ownership`.

    Raises:
        ValueError: when ``world_size < 1``, ``load`` is empty, or ``previous`` has another E.
    """
    E = load.numel()
    if world_size < 1 or E < 1:
        raise ValueError(f"heterogeneous_sharding needs world_size >= 1 and E >= 1, got W={world_size}, E={E}")
    if previous is not None:
        if previous.num_experts != E:
            raise ValueError(f"previous ownership has {previous.num_experts} experts, load has {E}")
        previous.validate(world_size)
    values = load.detach().to(device="cpu", dtype=torch.float64).flatten().tolist()
    cap = math.ceil(E / world_size)
    assigned = [0.0] * world_size
    count = [0] * world_size
    owner = [0] * E
    prev_owner = previous.owner.tolist() if previous is not None else None
    for e in sorted(range(E), key=lambda i: (-values[i], i)):
        room = [r for r in range(world_size) if count[r] < cap]
        best = min(room, key=lambda r: (assigned[r], count[r], r))
        chosen = best
        if prev_owner is not None:
            p = prev_owner[e]
            if count[p] < cap:
                worst = max(assigned)
                if max(worst, assigned[p] + values[e]) <= max(worst, assigned[best] + values[e]):
                    chosen = p
        owner[e] = chosen
        assigned[chosen] += values[e]
        count[chosen] += 1

    slot = [0] * E
    prev_slot = previous.slot.tolist() if previous is not None else None
    for r in range(world_size):
        mine = [e for e in range(E) if owner[e] == r]
        if prev_owner is not None:
            mine.sort(key=lambda e: (0, prev_slot[e], e) if prev_owner[e] == r else (1, 0, e))
        for s, e in enumerate(mine):
            slot[e] = s
    return Ownership(owner=torch.tensor(owner, dtype=torch.int64), slot=torch.tensor(slot, dtype=torch.int64))


@torch.no_grad()
def reshard(tensors: list[torch.Tensor], old: Ownership, new: Ownership, group=None) -> list[torch.Tensor]:
    """Move expert rows from their old owners to their new owners, bit-exactly.

    Each tensor holds this rank's rows under ``old``: ``[old.num_owned(rank), ...]`` in old slot
    order (parameters, AdamW ``exp_avg``, ``exp_avg_sq``, ...; dtypes and trailing shapes may
    differ between tensors but must match across ranks). The rows of one expert of all tensors are
    packed into one byte row, so a single ``dist.all_to_all_single`` with uneven splits moves
    everything: a rank sends the rows of each expert whose owner changes away from it (grouped by
    new owner, ascending expert id) and receives the experts arriving to it. Rows of experts that
    stay are copied locally. Every rank of ``group`` must call it with the same ``old`` and ``new``.

    Allocated: one packed send buffer, one receive buffer and the results; the inputs are only read.

    Args:
        tensors: this rank's flat buffers under ``old``.
        old: the current ownership.
        new: the target ownership (same E).
        group: the FSSDP process group (default: the world).

    Returns:
        One tensor per input, ``[new.num_owned(rank), ...]`` in new slot order, same dtype, device
        and trailing shape.

    Raises:
        ValueError: when E differs, an ownership is invalid, or a tensor has the wrong number of rows.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if old.num_experts != new.num_experts:
        raise ValueError(f"reshard: old ownership has {old.num_experts} experts, new has {new.num_experts}")
    old.validate(world)
    new.validate(world)
    n_old, n_new = old.num_owned(rank), new.num_owned(rank)
    for i, t in enumerate(tensors):
        if t.dim() < 1 or t.shape[0] != n_old:
            raise ValueError(f"reshard: tensor {i} has shape {tuple(t.shape)}, expected {n_old} rows (old ownership)")
    if not tensors:
        return []
    E = old.num_experts
    src = torch.zeros(E, world, dtype=torch.bool)
    dst = torch.zeros(E, world, dtype=torch.bool)
    src[torch.arange(E), old.owner.cpu()] = True
    dst[torch.arange(E), new.owner.cpu()] = True
    moving = old.owner.cpu() != new.owner.cpu()
    src &= moving.unsqueeze(1)
    dst &= moving.unsqueeze(1)
    send_ids, in_splits, recv_ids, out_splits = exchange_plan(src, dst, rank, world)
    dev = tensors[0].device
    packed = torch.cat([as_rows_of_bytes(t).to(dev) for t in tensors], dim=1)
    old_slot, new_slot = old.slot.cpu(), new.slot.cpu()
    send = packed[old_slot[send_ids].to(dev)]
    recv = packed.new_empty((sum(out_splits), packed.shape[1]))
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)

    stay = torch.nonzero((old.owner.cpu() == rank) & ~moving).flatten()
    rows = packed.new_empty((n_new, packed.shape[1]))
    if stay.numel():
        rows[new_slot[stay].to(dev)] = packed[old_slot[stay].to(dev)]
    if recv_ids.numel():
        rows[new_slot[recv_ids].to(dev)] = recv
    out, col = [], 0
    for t in tensors:
        width = math.prod(t.shape[1:]) * t.element_size()
        chunk = rows[:, col:col + width]
        col += width
        out.append(from_rows_of_bytes(chunk, t.dtype, tuple(t.shape[1:])).to(t.device))
    return out
