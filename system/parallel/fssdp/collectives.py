"""SparseAllGather and SparseReduceScatter: the two collectives of FSSDP.

Hecate (arXiv 2502.02581, sec. 3.2; DESIGN.md section 3). Each expert has one owner
(:class:`~system.parallel.fssdp.ownership.Ownership`); a placement ``[E, W]`` bool says on which
ranks an expert is *materialized* for the current iteration. SparseAllGather (spAG, P -> P') copies
each expert's parameters from its owner to the ranks that materialize it; SparseReduceScatter
(spRS, P' -> P) sends every materialized copy's gradient back to the owner and sums them there.

Broadcasting to an arbitrary set of ranks would need one NCCL communicator per set, so both are
built from one ``dist.all_to_all_single`` with per-peer uneven splits over rows of the flat buffer
(works on Gloo and NCCL). Rows travel as raw bytes (``uint8`` views), so any dtype moves bit-exactly
and the summation of spRS happens locally, in a fixed order. Every rank computes the same send and
receive plans from the replicated ``ownership`` and ``placement``: no sizes are exchanged. The plans
live on the host; their row indices reach the device through pinned memory without a host sync
(:func:`~system.moe.dispatch.to_device_async`), so neither collective synchronises with the device.
These functions move data only; they are not differentiable (wrap them in an autograd.Function).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from system.moe.dispatch import to_device_async
from system.parallel.fssdp.ownership import Ownership


def materialized_ids(placement: torch.Tensor, rank: int) -> torch.Tensor:
    """Ascending ids of the experts materialized on ``rank`` (``placement[:, rank]`` true), int64."""
    return torch.nonzero(placement[:, rank]).flatten()


def as_rows_of_bytes(x: torch.Tensor) -> torch.Tensor:
    """``[n, ...]`` tensor of any dtype -> ``[n, numel_per_row * itemsize]`` uint8 (a view when
    ``x`` is contiguous), detached."""
    x = x.detach().contiguous()
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    if flat.dtype == torch.uint8:
        return flat
    if flat.shape[1] == 0:
        return flat.new_empty((flat.shape[0], 0), dtype=torch.uint8)
    return flat.view(torch.uint8)


def from_rows_of_bytes(b: torch.Tensor, dtype: torch.dtype, row_shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`as_rows_of_bytes`: ``[n, B]`` uint8 -> ``[n, *row_shape]`` of ``dtype``."""
    if dtype == torch.uint8:
        return b.reshape((b.shape[0],) + tuple(row_shape))
    if b.numel() == 0:  # empty views may have odd strides: allocate instead
        return torch.empty((b.shape[0],) + tuple(row_shape), dtype=dtype, device=b.device)
    if b.stride() != (b.shape[1], 1):  # a column slice (even a "contiguous" single row) cannot be viewed
        b = torch.empty(b.shape, dtype=torch.uint8, device=b.device).copy_(b)
    return b.view(dtype).reshape((b.shape[0],) + tuple(row_shape))


def exchange_plan(src_of: torch.Tensor, dst_of: torch.Tensor, rank: int, world: int
                  ) -> tuple[torch.Tensor, list[int], torch.Tensor, list[int]]:
    """Which experts' rows this rank sends and receives when expert ``e`` moves ``src -> dst``.

    ``src_of`` / ``dst_of`` are ``[E, W]`` bool: ``src_of[e, q]`` says rank q sends a row of e to
    the ranks where ``dst_of[e, :]`` is true (each expert has at most one source per destination,
    never itself). Rows are grouped by peer rank and ascending expert id within a peer.

    Returns:
        ``(send_ids, in_splits, recv_ids, out_splits)``: expert ids of the rows sent, in send order,
        with the count per destination rank; and the ids of the rows received, in receive order,
        with the count per source rank.
    """
    send = src_of[:, rank].unsqueeze(1) & dst_of
    send[:, rank] = False
    recv = src_of & dst_of[:, rank].unsqueeze(1)
    recv[:, rank] = False
    send_peer, send_ids = torch.nonzero(send.t(), as_tuple=True)  # sorted by (peer, expert)
    recv_peer, recv_ids = torch.nonzero(recv.t(), as_tuple=True)
    in_splits = torch.bincount(send_peer, minlength=world).tolist()
    out_splits = torch.bincount(recv_peer, minlength=world).tolist()
    return send_ids, in_splits, recv_ids, out_splits


def _owner_matrix(ownership: Ownership, world: int) -> torch.Tensor:
    """``[E, W]`` bool, true at ``(e, owner[e])``."""
    own = torch.zeros(ownership.num_experts, world, dtype=torch.bool)
    own[torch.arange(ownership.num_experts), ownership.owner.cpu()] = True
    return own


def _is_identity(pos: torch.Tensor, slot: torch.Tensor, n_owned: int, n_mat: int) -> bool:
    """Whether the locally owned, materialized experts map row i of ``owned`` to row i of the
    materialized buffer, for all rows of both (so one can stand for the other without a copy)."""
    if n_owned != n_mat or pos.numel() != n_owned:
        return False
    ar = torch.arange(n_owned)
    return bool(torch.equal(pos, ar) and torch.equal(slot, ar))


def _check_placement(ownership: Ownership, placement: torch.Tensor, world: int) -> None:
    E = ownership.num_experts
    if placement.dtype != torch.bool or tuple(placement.shape) != (E, world):
        raise ValueError(f"placement must be bool [E={E}, W={world}], got {placement.dtype} {tuple(placement.shape)}")
    if int(ownership.owner.min()) < 0 or int(ownership.owner.max()) >= world:
        raise ValueError(f"ownership names ranks outside the group of size {world}")


def _check_rows(rows: torch.Tensor, expected_rows: int, what: str) -> None:
    if rows.dim() < 1 or rows.shape[0] != expected_rows:
        raise ValueError(f"{what} has shape {tuple(rows.shape)}, expected {expected_rows} rows")


class SparseAllGatherHandle:
    """Pending :func:`sparse_all_gather` started with ``async_op=True``.

    The locally owned rows are already in place; :meth:`wait` waits for the all-to-all (on CUDA:
    makes the current stream wait) and scatters the received rows into the result.
    """

    def __init__(self, work, result: torch.Tensor, recv: torch.Tensor, recv_pos: torch.Tensor,
                 keep_alive: torch.Tensor):
        self._work, self._result, self._recv, self._recv_pos = work, result, recv, recv_pos
        self._keep_alive = keep_alive  # the send buffer must outlive the collective
        self._done = False

    def wait(self) -> torch.Tensor:
        """Finish the gather and return ``[n_mat, ...]`` (idempotent)."""
        if not self._done:
            if self._work is not None:
                self._work.wait()
            _scatter_rows(self._result, self._recv, self._recv_pos)
            self._done = True
            self._recv = self._keep_alive = None
        return self._result


def _scatter_rows(result: torch.Tensor, recv_bytes: torch.Tensor, pos: torch.Tensor) -> None:
    if pos.numel():
        result.index_copy_(0, pos, from_rows_of_bytes(recv_bytes, result.dtype, tuple(result.shape[1:])))


@torch.no_grad()
def sparse_all_gather(owned: torch.Tensor, ownership: Ownership, placement: torch.Tensor, group=None,
                      async_op: bool = False) -> torch.Tensor | SparseAllGatherHandle:
    """SparseAllGather (Hecate sec. 3.2): materialize experts from their owners onto the placement.

    Every owner sends the row of expert ``e`` to each rank ``r != owner[e]`` with
    ``placement[e, r]``; rows are sent grouped by destination rank, ascending expert id within one
    destination, as raw bytes in one ``dist.all_to_all_single`` with uneven splits. Experts this
    rank owns and materializes are copied locally (no communication). Every rank of ``group`` must
    call it with the same ``ownership`` and ``placement``, at the same point of the program.

    Allocated: a send buffer (the rows leaving this rank), a receive buffer (the rows arriving) and
    the result ``[n_mat, ...]``; ``owned`` is only read. Nothing is freed for you: drop the result
    after use (or re-gather it before backward under re-materialization).

    Args:
        owned: this rank's flat buffer ``[n_owned, ...]``, row ``i`` = expert ``ownership.owned(rank)[i]``
            (typically ``[n_owned, P]`` with P the flattened parameters of one expert); any dtype,
            any device supported by the backend.
        ownership: the owner and slot of every expert (ranks of ``group``).
        placement: ``[E, W]`` bool, ``placement[e, r]`` when expert ``e`` is materialized on group
            rank ``r`` (normally true at ``(e, owner[e])``; when false, the owner just does not
            return its own row).
        group: the FSSDP process group (default: the world).
        async_op: when true, start the collective with ``async_op=True`` and return a
            :class:`SparseAllGatherHandle`; its ``wait()`` returns the tensor. Use it to overlap the
            gather with attention on CUDA.

    Returns:
        ``[n_mat, ...]`` (same dtype, device and trailing shape as ``owned``): the rows of
        ``materialized_ids(placement, rank)`` in that order, or a handle when ``async_op``.

    Raises:
        ValueError: when ``placement`` is not ``[E, W]`` bool, or ``owned`` has not ``num_owned(rank)`` rows.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    _check_placement(ownership, placement, world)
    _check_rows(owned, ownership.num_owned(rank), "owned")
    placement = placement.cpu()
    owner, slot = ownership.owner.cpu(), ownership.slot.cpu()
    send_ids, in_splits, recv_ids, out_splits = exchange_plan(_owner_matrix(ownership, world), placement, rank, world)
    dev = owned.device
    owned_bytes = as_rows_of_bytes(owned)
    send = owned_bytes.index_select(0, to_device_async(slot[send_ids], dev))
    recv = owned_bytes.new_empty((sum(out_splits), owned_bytes.shape[1]))
    work = None
    if world > 1:  # alone, a rank sends and receives nothing
        work = dist.all_to_all_single(recv, send, out_splits, in_splits, group=group, async_op=async_op)

    mat = placement[:, rank]
    pos = torch.cumsum(mat.to(torch.int64), 0) - 1  # row of expert e in the result
    local = torch.nonzero(mat & (owner == rank)).flatten()
    if sum(out_splits) == 0 and _is_identity(pos[local], slot[local], owned.shape[0], int(mat.sum())):
        # Nothing arrives and the result would be a copy of ``owned``: return it without copying.
        result = owned.detach()
        return SparseAllGatherHandle(work, result, recv, pos[:0], send) if async_op else result
    result = owned.new_empty((int(mat.sum()),) + tuple(owned.shape[1:]))
    if local.numel():
        rows = owned.detach().index_select(0, to_device_async(slot[local], dev))
        result.index_copy_(0, to_device_async(pos[local], dev), rows)
    recv_pos = to_device_async(pos[recv_ids], dev)
    if async_op:
        return SparseAllGatherHandle(work, result, recv, recv_pos, send)
    _scatter_rows(result, recv, recv_pos)
    return result


@torch.no_grad()
def sparse_reduce_scatter(materialized: torch.Tensor, ownership: Ownership, placement: torch.Tensor,
                          group=None) -> torch.Tensor:
    """SparseReduceScatter (Hecate sec. 3.2): sum every expert's materialized copies on its owner.

    Every rank sends its row of each expert ``e`` it materializes but does not own to
    ``owner[e]`` (grouped by owner, ascending expert id within one owner) as raw bytes in one
    ``dist.all_to_all_single`` with uneven splits. The owner then adds, for each of its experts,
    the copies of all ranks that materialized it (its own included) in ascending source-rank order,
    starting from zero, in the dtype of ``materialized``: the result is deterministic and equals
    ``sum(copy_r for r in sorted(ranks))`` computed the same way on one process. Cast to float32
    first if you want the sum of bf16 gradients accumulated in float32.

    Allocated: the send and receive buffers, and the result ``[n_owned, ...]`` (zeros, then summed
    into). ``materialized`` is only read; when nothing arrives and its rows are exactly the owned
    rows in slot order, it is returned as is (no copy).

    Args:
        materialized: ``[n_mat, ...]`` rows in ``materialized_ids(placement, rank)`` order (e.g. the
            gradients of the materialized expert copies).
        ownership: the owner and slot of every expert (ranks of ``group``).
        placement: ``[E, W]`` bool, the same placement as the matching :func:`sparse_all_gather`.
        group: the FSSDP process group (default: the world).

    Returns:
        ``[n_owned, ...]`` in this rank's slot order: row ``i`` is the sum of the copies of expert
        ``ownership.owned(rank)[i]``; an owned expert materialized nowhere gets a zero row.

    Raises:
        ValueError: when ``placement`` is not ``[E, W]`` bool, or ``materialized`` has not the
            number of rows ``placement[:, rank]`` asks for.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    _check_placement(ownership, placement, world)
    _check_rows(materialized, int(placement[:, rank].sum()), "materialized")
    placement = placement.cpu()
    owner, slot = ownership.owner.cpu(), ownership.slot.cpu()
    own = _owner_matrix(ownership, world)
    send_ids, in_splits, recv_ids, out_splits = exchange_plan(placement, own, rank, world)
    dev = materialized.device
    pos = torch.cumsum(placement[:, rank].to(torch.int64), 0) - 1
    mat_bytes = as_rows_of_bytes(materialized)
    send = mat_bytes.index_select(0, to_device_async(pos[send_ids], dev))
    recv_bytes = mat_bytes.new_empty((sum(out_splits), mat_bytes.shape[1]))
    if world > 1:  # alone, a rank sends and receives nothing
        dist.all_to_all_single(recv_bytes, send, out_splits, in_splits, group=group)
    recv = from_rows_of_bytes(recv_bytes, materialized.dtype, tuple(materialized.shape[1:]))

    mine = torch.nonzero(placement[:, rank] & (owner == rank)).flatten()
    n_owned = ownership.num_owned(rank)
    if sum(out_splits) == 0 and _is_identity(pos[mine], slot[mine], n_owned, materialized.shape[0]):
        return materialized.detach()  # nothing arrives: the owned rows' sums are the local copies
    out = materialized.new_zeros((n_owned,) + tuple(materialized.shape[1:]))
    start = 0
    for src in range(world):  # fixed order: ascending source rank
        if src == rank:
            rows, ids = materialized.detach().index_select(0, to_device_async(pos[mine], dev)), mine
        else:
            n = out_splits[src]
            rows, ids = recv[start:start + n], recv_ids[start:start + n]
            start += n
        if ids.numel():  # one row per expert per source: unique indices, deterministic on CUDA too
            out.index_add_(0, to_device_async(slot[ids], dev), rows)
    return out
