"""Hierarchical (topology-aware) all-to-all for expert-parallel dispatch, and the dispatcher factory.

SE-MoE (Shen et al. 2022, arXiv 2205.10034, the hierarchical AllToAll of its training design) splits the
expert-parallel all-to-all in two: an **intra-node** all-to-all that brings each token row to the rank of its own node
whose local index is that of the row's destination, then an **inter-node** all-to-all among the ranks of
equal local index, one per node. Combine runs the two stages in reverse.

Layout. The EP group of ``P = ep`` ranks is viewed as ``N`` nodes of ``L = ranks_per_node`` ranks: EP rank
``r`` is ``(node n, local l) = divmod(r, L)`` (the EP group's ranks of one node are consecutive in EP order,
as :class:`~system.distributed.ParallelDims` lays them out). The two families of groups are made once per EP
group by unflattening the 1-D EP mesh into ``("node", "local")``; ``"local"`` groups are the intra-node
ones (``L`` ranks), ``"node"`` groups the inter-node ones (``N`` ranks of equal local index).

Messages each rank sends per all-to-all (dispatch; combine mirrors it), ``P = N * L``:

====================  ====================  ===================================
link class            flat                  hierarchical
====================  ====================  ===================================
intra-node            ``L - 1``             ``L - 1`` (stage 1)
inter-node            ``(N - 1) * L``       ``N - 1`` (stage 2)
====================  ====================  ===================================

So between two nodes, ``L`` messages flow per direction instead of ``L * L``, each on average ``L`` times
larger: the same inter-node bytes (every row crosses the network once) in fewer, larger messages, which is
what an inter-node fabric (InfiniBand/RoCE: per-message latency, one queue pair per peer) rewards. The price:
rows whose destination's local index differs from their source's also cross the intra-node link (NVLink)
once more, two extra row gathers per direction, and one more small count exchange.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from system.moe.dispatch import AllToAllDispatcher, all_to_all, expert_major_permutation, to_device_async

logger = logging.getLogger(__name__)

A2A_KINDS = ("flat", "hierarchical")

# EP process group -> {ranks_per_node: (intra-node group, inter-node group)}. A cache, so that the groups of
# one EP group are created once (creation is collective) although every MoE layer gets its own dispatcher.
# Weak keys: the entry goes with the EP group (a job that re-initialises torch.distributed gets new groups).
_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_ranks_per_node(ep_ranks: list[int], ranks_per_node: int) -> int:
    """EP-group ranks per node ``L`` for the hierarchical all-to-all, validated.

    ``ranks_per_node > 0`` is taken as given (ranks of the EP group on one node). ``0`` derives it from
    ``LOCAL_WORLD_SIZE`` (torchrun: node ``i`` holds global ranks ``[i * LWS, (i+1) * LWS)``): the number of
    the EP group's ranks on each node, which is ``LOCAL_WORLD_SIZE`` itself when the EP group is made of whole
    nodes, and ``ep`` (one node: flat) when ``LOCAL_WORLD_SIZE`` is unset.

    Args:
        ep_ranks: global ranks of the EP group in EP order (``ep_mesh.mesh.tolist()``).
        ranks_per_node: ``parallel.a2a_ranks_per_node``.

    Returns:
        ``L`` with ``1 <= L <= ep`` and ``ep % L == 0``.

    Raises:
        ValueError: ``L`` does not divide the EP degree, or (derived) the EP group's ranks are spread unevenly
            or non-contiguously over the nodes; the message names ``parallel.a2a_ranks_per_node`` and ``parallel.ep``.
    """
    ep = len(ep_ranks)
    source = f"parallel.a2a_ranks_per_node={ranks_per_node}"
    if ranks_per_node < 0:
        raise ValueError(f"{source} must be >= 0 (0: from LOCAL_WORLD_SIZE)")
    if ranks_per_node == 0:
        lws = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        if lws <= 0:
            return ep
        nodes = [r // lws for r in ep_ranks]
        per_node = Counter(nodes)
        contiguous = all(a <= b for a, b in zip(nodes, nodes[1:]))
        if len(set(per_node.values())) != 1 or not contiguous:
            raise ValueError(
                f"the parallel.ep={ep} ranks {ep_ranks} of this EP group are not spread as equal consecutive blocks "
                f"over nodes of LOCAL_WORLD_SIZE={lws} ranks; set parallel.a2a_ranks_per_node explicitly "
                f"(parallel.a2a_ranks_per_node=0 derives it from LOCAL_WORLD_SIZE)"
            )
        ranks_per_node = next(iter(per_node.values()))
        source = f"parallel.a2a_ranks_per_node=0 (LOCAL_WORLD_SIZE={lws}: {ranks_per_node} EP ranks per node)"
    if ep % ranks_per_node:
        raise ValueError(
            f"{source} does not divide the expert-parallel degree parallel.ep={ep}: the hierarchical all-to-all "
            f"needs the EP group to be whole nodes of equal size (or use parallel.a2a='flat')"
        )
    return ranks_per_node


def node_groups(ep_mesh: DeviceMesh, ranks_per_node: int) -> tuple:
    """``(intra, inter)`` process groups of this rank for an EP mesh seen as nodes of ``ranks_per_node``.

    Collective over every rank of ``ep_mesh``'s root mesh on the first call for an EP group (it creates the
    groups of all EP groups at once by unflattening the EP dimension into ``("node", "local")``: each rank
    takes part in creating every group, as ``torch.distributed.new_group`` requires); cached afterwards, so
    call it in the same order on all ranks. A stage of size 1 gets ``None`` (no group, no communication).

    Args:
        ep_mesh: the 1-D EP mesh (``mesh["ep"]``), whose group ranks are in EP order.
        ranks_per_node: ``L``, validated by :func:`resolve_ranks_per_node`.

    Returns:
        ``(intra, inter)``: the group of the ``L`` EP ranks of this rank's node (group rank = local index),
        and the group of the ``N = ep / L`` EP ranks of equal local index (group rank = node index).
    """
    ep = ep_mesh.size()
    key = ep_mesh.get_group()
    cached = _GROUPS.setdefault(key, {})
    if ranks_per_node not in cached:
        if ranks_per_node == ep:
            cached[ranks_per_node] = (key, None)
        elif ranks_per_node == 1:
            cached[ranks_per_node] = (None, key)
        else:
            two_d = ep_mesh._unflatten(0, (ep // ranks_per_node, ranks_per_node), ("node", "local"))
            intra, inter = two_d.get_group("local"), two_d.get_group("node")
            node, local = divmod(ep_mesh.get_local_rank(), ranks_per_node)
            if dist.get_rank(intra) != local or dist.get_rank(inter) != node:
                raise RuntimeError(f"EP mesh ranks {ep_mesh.mesh.tolist()} are not in increasing order; the "
                                   f"hierarchical all-to-all needs group ranks equal to mesh coordinates")
            cached[ranks_per_node] = (intra, inter)
            logger.info("hierarchical all-to-all: EP group of %d ranks as %d nodes x %d", ep, ep // ranks_per_node,
                        ranks_per_node)
    return cached[ranks_per_node]


def _exchange(t: torch.Tensor, group) -> torch.Tensor:
    """Even all-to-all of ``t`` ``[G, ...]`` (slice ``j`` to group rank ``j``) over ``group``; ``t`` if no group."""
    t = t.contiguous()
    if group is None:
        return t
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t, group=group)
    return out


def _rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows (:func:`~system.moe.dispatch.all_to_all`); ``x`` if no group."""
    return x if group is None else all_to_all(x, out_splits, in_splits, group)


class HierarchicalAllToAllDispatcher:
    """Expert-parallel dispatch in two all-to-all stages, intra-node then inter-node (module docstring).

    Same contract as :class:`~system.moe.dispatch.AllToAllDispatcher` and the same result, bit for bit: the
    rows reach the same experts in the same order (expert-major, then source EP rank, then the source's
    order), so the expert computation and everything after it are unchanged.

    Dispatch, with counts ``c[n_d, l_d, e]`` (rows of this rank for local expert ``e`` of EP rank
    ``(n_d, l_d)``), on rank ``(n, l)``:

    1. exchange counts intra-node, then inter-node (two small even all-to-alls on the device), and read all
       three count tables to the host in **one** transfer: the only host sync of the layer, as for flat;
    2. reorder the rows from ``(n_d, l_d, e)`` to ``(l_d, n_d, e)`` and all-to-all them over the node's
       ranks: local rank ``l_d`` now holds, from each peer ``l_s``, the rows bound for ``(*, l_d)``;
    3. reorder the received ``(l_s, n_d, e)`` to ``(n_d, l_s, e)`` and all-to-all over the ranks of local
       index ``l``: rank ``(n_d, l)`` receives ``(n_s, l_s, e)``, i.e. source-EP-rank-major as flat does;
    4. permute to expert-major (:func:`~system.moe.dispatch.expert_major_permutation`).

    Combine undoes 4, 3, 2 with the saved permutations and split sizes (no host sync).

    Args:
        ep_mesh: the 1-D EP mesh (``mesh["ep"]``, ``ep`` ranks, EP rank ``j`` holding experts
            ``[j * E/ep, (j+1) * E/ep)``).
        num_experts: E, global experts of the layer (divisible by ``ep``).
        ranks_per_node: ``parallel.a2a_ranks_per_node`` (0: from ``LOCAL_WORLD_SIZE``,
            :func:`resolve_ranks_per_node`). With 1 or ``ep`` one stage is empty and skipped (flat).

    Raises:
        ValueError: E not divisible by ``ep``, or a ``ranks_per_node`` that does not divide ``ep``.
    """

    def __init__(self, ep_mesh: DeviceMesh, num_experts: int, ranks_per_node: int):
        self.ep = ep_mesh.size()
        if num_experts % self.ep:
            raise ValueError(f"moe.num_experts={num_experts} does not divide by the expert-parallel degree "
                             f"parallel.ep={self.ep}")
        self.ranks_per_node = resolve_ranks_per_node(ep_mesh.mesh.flatten().tolist(), ranks_per_node)
        self.num_nodes = self.ep // self.ranks_per_node
        self.num_local = num_experts // self.ep
        self.intra, self.inter = node_groups(ep_mesh, self.ranks_per_node)
        self._state: tuple | None = None

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Send rows to their experts' ranks through the two stages.

        Args:
            x: ``[T, d]`` token copies sorted by global expert id.
            counts: ``[E]`` int64 rows per global expert (sums to T).

        Returns:
            ``(x_local [M, d], local_counts [E/ep])``, equal to :meth:`AllToAllDispatcher.dispatch`'s:
            rows sorted by local expert, then source EP rank; ``local_counts`` on the host (CPU, int64).
        """
        nodes, per_node, num_local = self.num_nodes, self.ranks_per_node, self.num_local
        c = counts.view(nodes, per_node, num_local)  # [n_d, l_d, e]
        c1 = _exchange(c.transpose(0, 1), self.intra)  # [l_s, n_d, e]: from local peer l_s, bound for (n_d, my l)
        c2 = _exchange(c1.transpose(0, 1), self.inter)  # [n_s, l_s, e]: from EP rank (n_s, l_s) to my experts
        # The one host sync of the layer: the three count tables together.
        host = torch.cat([c.flatten(), c1.flatten(), c2.flatten()]).cpu()
        c, c1, c2 = (t.view(a, b, num_local) for t, (a, b) in
                     zip(host.split(c.numel()), ((nodes, per_node), (per_node, nodes), (nodes, per_node))))
        in1, out1 = c.sum(dim=(0, 2)).tolist(), c1.sum(dim=(1, 2)).tolist()  # rows to / from each local peer
        in2, out2 = c1.sum(dim=(0, 2)).tolist(), c2.sum(dim=(1, 2)).tolist()  # rows to / from each node
        recv = c2.view(self.ep, num_local)  # [source EP rank, local expert], as flat's received counts
        perm1 = to_device_async(expert_major_permutation(c.sum(dim=2)), x.device)  # (n_d, l_d) -> (l_d, n_d)
        perm2 = to_device_async(expert_major_permutation(c1.sum(dim=2)), x.device)  # (l_s, n_d) -> (n_d, l_s)
        perm3 = to_device_async(expert_major_permutation(recv), x.device)  # (source, e) -> (e, source)
        stage1 = _rows(x[perm1], out1, in1, self.intra)  # [sum(out1), d], (l_s, n_d, e) order
        stage2 = _rows(stage1[perm2], out2, in2, self.inter)  # [M, d], (n_s, l_s, e) order
        self._state = (perm1, perm2, perm3, in1, out1, in2, out2)
        return stage2[perm3], recv.sum(dim=0)

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """Return expert outputs ``[M, d]`` (order of :meth:`dispatch`'s output) to their source ranks
        through the two stages in reverse; result ``[T, d]`` in the order of :meth:`dispatch`'s input."""
        if self._state is None:
            raise RuntimeError("combine() called before dispatch()")
        perm1, perm2, perm3, in1, out1, in2, out2 = self._state
        self._state = None
        back2 = _rows(torch.zeros_like(y).index_copy(0, perm3, y), in2, out2, self.inter)  # (n_d, l_s, e)
        back1 = _rows(torch.zeros_like(back2).index_copy(0, perm2, back2), in1, out1, self.intra)  # (l_d, n_d, e)
        return torch.zeros_like(back1).index_copy(0, perm1, back1)  # (n_d, l_d, e): dispatch's input order


def build_ep_dispatcher(ep_mesh: DeviceMesh, num_experts: int, a2a: str, ranks_per_node: int):
    """The expert-parallel dispatcher ``parallel.a2a`` names, over the 1-D EP mesh of one MoE layer.

    ``"flat"``: :class:`~system.moe.dispatch.AllToAllDispatcher`. ``"hierarchical"``:
    :class:`HierarchicalAllToAllDispatcher`, or the flat one when the EP group is one node or one rank per
    node (``ranks_per_node`` resolved to ``ep`` or 1: nothing to aggregate). Call on every rank, for every
    layer in the same order: the first hierarchical call per EP group creates its groups (collective), later
    calls reuse them.

    Args:
        ep_mesh: ``mesh["ep"]``.
        num_experts: E of the layer.
        a2a: ``parallel.a2a``.
        ranks_per_node: ``parallel.a2a_ranks_per_node`` (0: from ``LOCAL_WORLD_SIZE``).

    Raises:
        ValueError: an unknown ``a2a``, or (:class:`HierarchicalAllToAllDispatcher`) invalid sizes.
    """
    if a2a not in A2A_KINDS:
        raise ValueError(f"parallel.a2a must be one of {', '.join(map(repr, A2A_KINDS))}, got {a2a!r}")
    if a2a == "hierarchical":
        per_node = resolve_ranks_per_node(ep_mesh.mesh.flatten().tolist(), ranks_per_node)
        if 1 < per_node < ep_mesh.size():
            return HierarchicalAllToAllDispatcher(ep_mesh, num_experts, per_node)
        logger.debug("parallel.a2a='hierarchical' with %d EP ranks per node of %d: flat all-to-all", per_node,
                    ep_mesh.size())
    return AllToAllDispatcher(ep_mesh.get_group(), num_experts)
