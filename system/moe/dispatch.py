"""Token movement between the router and the experts: local, or all-to-all expert parallel.

A dispatcher receives the token copies of one MoE layer sorted by global expert id, moves them to
the rank that holds each expert, and brings the expert outputs back in the original order.

Expert parallelism (GShard, Lepikhin et al. 2020, sec. 3.2; DeepSpeed-MoE, Rajbhandari et al.
2022, sec. 5): the E experts are split into ``ep`` contiguous blocks of ``E / ep``; rank j of an EP
group holds global experts ``[j * E/ep, (j+1) * E/ep)``. One all-to-all of uneven split sizes sends
each token copy to its expert's rank, a second one returns the outputs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait for the device.

    A host tensor bound for a CUDA device is staged in pinned memory and copied with
    ``non_blocking=True``: a plain ``.to(device)`` from pageable memory synchronises the stream (the
    host waits for every kernel queued before it), a cost that small index tensors of the dispatch
    would pay once per layer per step. The pinned block comes from PyTorch's caching host allocator,
    which records the copy's stream and does not reuse the block before the copy is done, so ``t``
    may be dropped at once. Anything else (already there, CPU to CPU, device to host) is ``t.to(device)``.

    Args:
        t: any tensor.
        device: the destination.

    Returns:
        ``t`` on ``device`` (``t`` itself when it is already there).
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _AllToAll(torch.autograd.Function):
    """Differentiable ``dist.all_to_all_single`` with uneven splits.

    The backward pass is the reverse all-to-all (input and output splits swapped). Written by hand
    because the functional ``all_to_all_single_autograd`` aborts at process exit on Gloo.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # noqa: D102
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        out = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of the rows of ``x`` (``[sum(in_splits), ...]``).

    Args:
        x: rows to send, ``in_splits[j]`` consecutive rows for rank j of ``group``.
        out_splits: rows to receive from each rank.
        in_splits: rows to send to each rank.
        group: process group.

    Returns:
        ``[sum(out_splits), ...]`` rows, grouped by source rank.
    """
    return _AllToAll.apply(x, out_splits, in_splits, group)


class LocalDispatcher:
    """No movement: every expert is on this rank (single process, or data parallel only)."""

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``x`` (``[N, d]`` sorted by expert) and ``counts`` (``[E]``) unchanged."""
        return x, counts

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """Return ``y`` unchanged."""
        return y


class AllToAllDispatcher:
    """Expert-parallel dispatch over an EP process group with uneven all-to-all.

    ``dispatch`` exchanges the per-expert counts (one small all-to-all), then the token rows; the
    received rows come grouped by (source rank, local expert) and are permuted to (local expert,
    source rank) order so each local expert's rows are contiguous for the grouped matmul.
    ``combine`` undoes both steps. The split sizes are read to the host in one transfer (one
    synchronisation per layer and step, inherent to uneven all-to-all), together with the received
    counts, from which the permutation and the local counts are computed on the host: the local
    counts are returned on the host (the chunked expert kernel reads them there; the grouped matmul
    uploads its offsets asynchronously).

    Args:
        group: the EP process group (``ep`` ranks).
        num_experts: E, global experts of the layer (divisible by the group size).

    Raises:
        ValueError: when E does not divide by the EP group size.
    """

    def __init__(self, group, num_experts: int):
        self.group = group
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep:
            raise ValueError(f"num_experts={num_experts} does not divide by the expert-parallel degree {self.ep}")
        self.num_local = num_experts // self.ep
        self._state: tuple | None = None

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Send rows to their experts' ranks.

        Args:
            x: ``[N, d]`` token copies sorted by global expert id.
            counts: ``[E]`` int64 rows per global expert (sums to N).

        Returns:
            ``(x_local [M, d], local_counts [E/ep])``: the rows this rank's experts must process,
            sorted by local expert; ``local_counts`` is a host (CPU) int64 tensor.
        """
        send = counts.view(self.ep, self.num_local)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)  # recv[s, e]: from rank s for local e
        # The one host sync of the layer: rows sent per rank [ep] and received counts [ep, E/ep] together.
        host = torch.cat([send.sum(dim=1), recv.flatten()]).cpu()
        in_splits = host[: self.ep].tolist()
        recv = host[self.ep :].view(self.ep, self.num_local)
        out_splits = recv.sum(dim=1).tolist()
        received = all_to_all(x, out_splits, in_splits, self.group)
        perm = to_device_async(expert_major_permutation(recv), x.device)
        self._state = (perm, in_splits, out_splits)
        return received[perm], recv.sum(dim=0)

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """Return expert outputs ``[M, d]`` (order of :meth:`dispatch`'s output) to their source
        ranks; result ``[N, d]`` in the order of :meth:`dispatch`'s input."""
        if self._state is None:
            raise RuntimeError("combine() called before dispatch()")
        perm, in_splits, out_splits = self._state
        self._state = None
        unperm = torch.zeros_like(y).index_copy(0, perm, y)
        return all_to_all(unperm, in_splits, out_splits, self.group)


def expert_major_permutation(recv: torch.Tensor) -> torch.Tensor:
    """Row permutation from (source rank, expert) order to (expert, source rank) order.

    Args:
        recv: ``[S, E_loc]`` int64, rows received from source s for local expert e, laid out
            source-major (all of source 0's rows by expert, then source 1's, ...).

    Returns:
        ``[sum(recv)]`` int64 indices ``perm`` such that ``rows[perm]`` is expert-major.
    """
    num_src, num_exp = recv.shape
    seg_sizes = recv.flatten()
    seg_ids = torch.arange(seg_sizes.numel(), device=recv.device).view(num_src, num_exp).t().flatten()
    starts = torch.cumsum(seg_sizes, 0) - seg_sizes
    return _segment_gather_index(starts[seg_ids], seg_sizes[seg_ids])


def _segment_gather_index(starts: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Concatenate ``arange(starts[i], starts[i] + sizes[i])`` over i, vectorised."""
    total = int(sizes.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=sizes.device)
    seg = torch.repeat_interleave(torch.arange(sizes.numel(), device=sizes.device), sizes)
    offsets_in_seg = torch.arange(total, device=sizes.device) - (torch.cumsum(sizes, 0) - sizes)[seg]
    return starts[seg] + offsets_in_seg
