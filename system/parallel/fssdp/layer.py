"""FSSDP inside one MoE layer: owned flat expert buffer, sparse materialization, token routing.

Hecate (arXiv 2502.02581), sec. 4: every expert has exactly one owner, which keeps its parameters
(one row of a flat ``[n_owned, P]`` buffer, ``P`` = parameters of one expert: a SwiGLU FFN expert, or
an FME modulation, laid out by the expert type's :class:`~system.moe.experts.ExpertKind`) and its AdamW
state. Each iteration the layer's placement ``[E, W]`` says where experts are materialized;
SparseAllGather copies owners' rows to those ranks before the experts run, tokens go to a
materialized replica (local first, then same node, then anywhere), and after backward
SparseReduceScatter sums the gradient copies back on the owners, which then update their experts.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from system.moe.dispatch import all_to_all, expert_major_permutation, to_device_async
from system.moe.experts import ExpertKind, ExpertModule, autocast_inputs
from system.parallel.fssdp.collectives import materialized_ids, sparse_all_gather, sparse_reduce_scatter
from system.parallel.fssdp.ownership import Ownership
from system.parallel.fssdp.placement import LoadTracker, route_counts, route_tokens, routed_to


@dataclass
class FSSDPLayerState:
    """Sharding and placement of one MoE layer, identical on every rank.

    Attributes:
        ownership: owner rank and buffer row of each expert.
        placement: ``[E, W]`` bool, experts materialized on each rank this iteration.
        tracker: moving average of the layer's expert loads (tokens per expert).
        rank, world_size, ranks_per_node: this rank and the layout, for routing.
        group: process group (all ranks).
        rematerialize: free materialized experts after forward, gather again for backward.
        stats: bytes moved by the sparse collectives and expert tokens computed, since the last reset.
    """

    ownership: Ownership
    placement: torch.Tensor
    tracker: LoadTracker
    rank: int
    world_size: int
    ranks_per_node: int
    group: object = None
    rematerialize: bool = False
    stats: dict = field(default_factory=lambda: {"gather_bytes": 0, "reduce_bytes": 0, "expert_tokens": 0, "prefetched": 0})

    @property
    def mat_ids(self) -> torch.Tensor:
        """Expert ids materialized on this rank, ascending."""
        return materialized_ids(self.placement, self.rank)


class FSSDPDispatcher:
    """Sends each token copy to a rank where its expert is materialized, and back.

    Destinations come from :func:`~system.parallel.fssdp.placement.route_tokens`; one uneven
    all-to-all of rows, as under EP, but the receiving rank groups rows by its *materialized* experts
    rather than a fixed block. The sizes: the ranks all-gather their per-expert counts ``[W, E]`` and
    read them to the host, the layer's one device-to-host synchronisation per step (the backward pass
    reuses the sizes). Routing is a pure function of (counts, source, placement), so every rank
    derives from them what it sends (:func:`~system.parallel.fssdp.placement.route_counts`) and what
    it receives (:func:`~system.parallel.fssdp.placement.routed_to`) without a count all-to-all; the
    index tensors built on the host go to the device through pinned memory, without a sync.
    """

    def __init__(self, state: FSSDPLayerState, num_experts: int):
        self.state = state
        self.num_experts = num_experts
        self._saved: tuple | None = None

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[N, d]`` sorted by global expert, ``counts`` ``[E]`` -> rows for this rank's
        materialized experts ``[M, d]`` (sorted by materialized expert) and their counts ``[n_mat]``
        (a host int64 tensor)."""
        st = self.state
        num_e = self.num_experts
        all_counts = _gather_counts(counts, st.world_size, st.group)  # [W, E] on the host: the one sync
        mine = all_counts[st.rank]
        experts = torch.repeat_interleave(torch.arange(num_e), mine)  # host
        dest = route_tokens(experts, st.rank, st.placement, st.ranks_per_node)
        order = torch.argsort(dest, stable=True)  # by destination, then (stable) by expert
        send = route_counts(mine, st.rank, st.placement, st.ranks_per_node)  # [W, E] to each destination
        recv = routed_to(all_counts, st.rank, st.placement, st.ranks_per_node)  # [W, E] from each source
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        order = to_device_async(order, x.device)
        received = all_to_all(x[order], out_splits, in_splits, st.group)
        recv_mat = recv[:, st.mat_ids]
        if int(recv_mat.sum()) != int(recv.sum()):
            raise RuntimeError(f"rank {st.rank} received tokens for experts it has not materialized")
        perm = to_device_async(expert_major_permutation(recv_mat), x.device)
        self._saved = (order, perm, in_splits, out_splits)
        local_counts = recv_mat.sum(0)
        st.stats["expert_tokens"] += int(local_counts.sum())
        return received[perm], local_counts

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`dispatch`: outputs ``[M, d]`` back to ``[N, d]`` in the input order."""
        if self._saved is None:
            raise RuntimeError("combine() called before dispatch()")
        order, perm, in_splits, out_splits = self._saved
        self._saved = None
        unperm = torch.zeros_like(y).index_copy(0, perm, y)
        back = all_to_all(unperm, in_splits, out_splits, self.state.group)
        return torch.zeros_like(back).index_copy(0, order, back)


class FSSDPExperts(nn.Module):
    """The experts of one MoE layer under FSSDP: this rank's owned rows ``owned`` ``[n_owned, P]``.

    Row ``i`` is expert ``ownership.owned(rank)[i]``, flattened in the layout of the expert type's
    :class:`~system.moe.experts.ExpertKind` (SwiGLU: ``[w1 (d*f), w2 (f*d), w3 (d*f)]``; FME:
    ``[scale (f), shift (f), (down (f*r), up (r*f))]``). ``forward`` gathers the materialized experts
    (SparseAllGather), runs them with the kind's :meth:`~system.moe.experts.ExpertKind.compute_flat`,
    and its backward returns the owners' gradient (SparseReduceScatter) for ``owned``.

    Args:
        experts: the layer's full expert module (all E experts, identical on every rank). Only its
            kind (a small description) is kept, not its weights.
        state: the layer's :class:`FSSDPLayerState`.
    """

    def __init__(self, experts: ExpertModule, state: FSSDPLayerState):
        super().__init__()
        self.state = state
        self.kind: ExpertKind = experts.kind()
        self.num_global_experts = experts.num_global_experts
        owned = state.ownership.owned(state.rank)
        full = self.kind.flatten({k: v.detach() for k, v in experts.expert_weights().items()})
        self.owned = nn.Parameter(full[owned].clone())
        self._pending: tuple | None = None  # (handle, placement it was started for)

    @property
    def expert_numel(self) -> int:
        """P: parameters of one expert."""
        return self.kind.numel

    def unflatten(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[n, P]`` rows -> ``{name: view [n, *shape]}`` (SwiGLU: ``w1 [n, d, f]``, ``w2 [n, f, d]``, ``w3``)."""
        return self.kind.unflatten(rows)

    def compute(self, x: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Experts on rows ``x`` ``[M, in]`` grouped by materialized expert, with weights ``rows`` -> ``[M, out]``."""
        if rows.shape[0] == 0:
            return x.new_zeros(0, self.kind.out_features)
        x, cast = autocast_inputs(x, {"rows": rows})
        with torch.autocast(x.device.type, enabled=False):
            return self.kind.compute_flat(x, counts, cast["rows"])

    def prefetch(self) -> None:
        """Start this iteration's SparseAllGather asynchronously (a collective; every rank calls it).

        The next :meth:`gather` waits for it instead of starting its own, so the transfer overlaps
        whatever runs in between (the block's attention). Hecate sec. 4.2: the overlap budget ``t``
        is the number of experts whose gathering hides behind attention this way.
        """
        if self._pending is None:
            st = self.state
            handle = sparse_all_gather(self.owned.detach(), st.ownership, st.placement, st.group, async_op=True)
            self._pending = (handle, st.placement)

    def gather(self) -> torch.Tensor:
        """SparseAllGather of this iteration's materialized experts ``[n_mat, P]`` (a collective).

        Completes a pending :meth:`prefetch` when there is one for the current placement.
        """
        st = self.state
        rows = None
        if self._pending is not None:
            handle, placement = self._pending
            self._pending = None
            rows = handle.wait()
            st.stats["prefetched"] += 1
            if placement is not st.placement:  # placement changed since the prefetch: gather again
                rows = None
        if rows is None:
            rows = sparse_all_gather(self.owned.detach(), st.ownership, st.placement, st.group)
        st.stats["gather_bytes"] += _remote_rows(st) * self.expert_numel * self.owned.element_size()
        return rows

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x`` ``[M, d]`` rows for the materialized experts (``counts`` ``[n_mat]``) -> ``[M, d]``."""
        return _FSSDPExpertFn.apply(x, counts, self.owned, self)

    @torch.no_grad()
    def full_weights(self) -> dict[str, torch.Tensor]:
        """Global expert tensors ``{name: [E, *shape]}`` on every rank (a collective), e.g. SwiGLU
        ``w1 [E, d, f]``, ``w2 [E, f, d]``, ``w3 [E, d, f]``."""
        st = self.state
        counts = [st.ownership.num_owned(r) for r in range(st.world_size)]
        width = max(counts)
        padded = self.owned.new_zeros(width, self.expert_numel)
        padded[: self.owned.shape[0]] = self.owned.detach()
        parts = [torch.empty_like(padded) for _ in range(st.world_size)]
        dist.all_gather(parts, padded, group=st.group)
        full = self.owned.new_empty(self.num_global_experts, self.expert_numel)
        for r in range(st.world_size):
            ids = st.ownership.owned(r)
            full[ids] = parts[r][: len(ids)]
        return self.unflatten(full)


def _gather_counts(counts: torch.Tensor, world: int, group) -> torch.Tensor:
    """Every rank's per-expert counts ``[E]`` -> ``[W, E]`` int64 on the host (a collective; one
    device-to-host copy). ``all_gather`` into a list: Gloo and NCCL, torch 2.11 to 2.13."""
    counts = counts.to(torch.int64).contiguous()
    if world == 1:
        return counts.cpu()[None]
    parts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(parts, counts, group=group)
    return torch.stack(parts).cpu()


def _remote_rows(st: FSSDPLayerState) -> int:
    """Materialized rows on this rank that it does not own (the rows a gather receives)."""
    return int(st.placement[:, st.rank].sum()) - st.ownership.num_owned(st.rank)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_state() -> tuple[tuple[str, bool, torch.dtype], ...]:
    """The autocast settings in force (device type, enabled, dtype), to replay in a recompute."""
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES)


def _autocast_as(state: tuple[tuple[str, bool, torch.dtype], ...]) -> contextlib.ExitStack:
    """Enter the autocast settings captured by :func:`_autocast_state` (as ``torch.utils.checkpoint`` does)."""
    stack = contextlib.ExitStack()
    for device_type, enabled, dtype in state:
        stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
    return stack


class _FSSDPExpertFn(torch.autograd.Function):
    """Experts computed on sparsely materialized weights; backward reduce-scatters to owners.

    Forward: SparseAllGather the materialized rows, compute. Without re-materialization the
    expert sub-graph (built on detached leaves) is kept and the materialized rows stay alive until
    backward; with it, only the inputs are kept, and backward gathers the rows again and recomputes
    the experts before differentiating. Backward ends with SparseReduceScatter of the rows'
    gradients, which becomes the gradient of ``owned`` (the sum over all copies).
    """

    @staticmethod
    def forward(ctx, x, counts, owned, module: FSSDPExperts):  # noqa: D102
        ctx.module = module
        rows = module.gather()
        if module.state.rematerialize:
            with torch.no_grad():
                y = module.compute(x, counts, rows)
            ctx.save_for_backward(x, counts)
            ctx.autocast = _autocast_state()  # the recompute in backward runs outside the caller's autocast
            ctx.graph = None
            return y
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_()
            rows_leaf = rows.requires_grad_()
            y = module.compute(x_leaf, counts, rows_leaf)
        ctx.graph = (y, x_leaf, rows_leaf)
        return y.detach()

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        module: FSSDPExperts = ctx.module
        if ctx.graph is None:
            x, counts = ctx.saved_tensors
            rows = module.gather()
            with torch.enable_grad(), _autocast_as(ctx.autocast):
                x_leaf = x.detach().requires_grad_()
                rows_leaf = rows.requires_grad_()
                y = module.compute(x_leaf, counts, rows_leaf)
        else:
            y, x_leaf, rows_leaf = ctx.graph
            ctx.graph = None
        if y.requires_grad:
            gx, grows = torch.autograd.grad(y, (x_leaf, rows_leaf), grad_y, allow_unused=True)
        else:
            gx = grows = None
        gx = torch.zeros_like(x_leaf) if gx is None else gx
        grows = torch.zeros_like(rows_leaf) if grows is None else grows
        st = module.state
        owned_grad = sparse_reduce_scatter(grows.to(module.owned.dtype), st.ownership, st.placement, st.group)
        st.stats["reduce_bytes"] += _remote_rows(st) * module.expert_numel * module.owned.element_size()
        return gx, None, owned_grad, None
