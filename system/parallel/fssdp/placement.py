"""Where experts are materialized each iteration, and where each token copy goes.

Hecate (arXiv 2502.02581; DESIGN.md section 3): the load of each expert (tokens per iteration,
moving average over ``w = 5`` iterations) decides which experts get extra, temporary copies
(*sparse materialization*, Algorithm 1), and token copies go to the nearest copy of their expert
(*topology-aware dispatch*). Everything here is pure and deterministic: all ranks compute the same
placement from the same (all-reduced) load, without communication.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

import torch

from system.parallel.fssdp.ownership import Ownership


class LoadTracker:
    """Moving average of the tokens routed to each expert over the last ``window`` iterations.

    Args:
        window: iterations averaged (Hecate uses 5).
        num_experts: optional E; lets :attr:`load` answer (uniform) before the first update.

    Raises:
        ValueError: when ``window < 1``.
    """

    def __init__(self, window: int = 5, num_experts: int | None = None):
        if window < 1:
            raise ValueError(f"LoadTracker window must be >= 1, got {window}")
        self.window = window
        self.num_experts = num_experts
        self._history: deque[torch.Tensor] = deque(maxlen=window)

    def update(self, counts: torch.Tensor) -> None:
        """Record one iteration's ``[E]`` token counts (already summed over ranks).

        Raises:
            ValueError: when ``counts`` is not 1-D or E differs from earlier updates.
        """
        counts = counts.detach().to(device="cpu", dtype=torch.float64).flatten()
        if self.num_experts is not None and counts.numel() != self.num_experts:
            raise ValueError(f"LoadTracker got counts for {counts.numel()} experts, expected {self.num_experts}")
        self.num_experts = counts.numel()
        self._history.append(counts.clone())

    @property
    def load(self) -> torch.Tensor:
        """``[E]`` float64: the mean of the last ``min(window, updates)`` counts; all ones (uniform)
        before any update.

        Raises:
            RuntimeError: before any update when ``num_experts`` was not given.
        """
        if not self._history:
            if self.num_experts is None:
                raise RuntimeError("LoadTracker.load read before any update and without num_experts")
            return torch.ones(self.num_experts, dtype=torch.float64)
        return torch.stack(list(self._history)).mean(dim=0)

    def state_dict(self) -> dict:
        """Plain Python values (JSON-safe): window, E and the recorded counts, oldest first."""
        return {"window": self.window, "num_experts": self.num_experts,
                "history": [h.tolist() for h in self._history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.window = int(state["window"])
        self.num_experts = state["num_experts"]
        self._history = deque((torch.tensor(h, dtype=torch.float64) for h in state["history"]), maxlen=self.window)


def estimate_overlap_budget(attention_seconds: float, bandwidth_bytes_per_s: float, expert_bytes: int) -> int:
    """Overlap budget t = floor(T_attention * bandwidth / expert_bytes): how many experts can be
    fetched while attention runs (Hecate Algorithm 1's t).

    Raises:
        ValueError: when ``expert_bytes <= 0`` or a time / bandwidth is negative.
    """
    if expert_bytes <= 0 or attention_seconds < 0 or bandwidth_bytes_per_s < 0:
        raise ValueError(f"estimate_overlap_budget needs expert_bytes > 0 and non-negative time and bandwidth, got "
                         f"attention_seconds={attention_seconds}, bandwidth_bytes_per_s={bandwidth_bytes_per_s}, "
                         f"expert_bytes={expert_bytes}")
    return int(math.floor(attention_seconds * bandwidth_bytes_per_s / expert_bytes))


def _by_load(load: torch.Tensor) -> list[int]:
    """Expert ids by load descending, ties by expert id."""
    values = load.tolist()
    return sorted(range(len(values)), key=lambda e: (-values[e], e))


def sparse_materialization(load: torch.Tensor, ownership: Ownership, world_size: int, ranks_per_node: int,
                           overlap_budget: int, memory_budget: int, replicate_above: float = 0.0) -> torch.Tensor:
    """Hecate Algorithm 1: choose the experts materialized on each rank for one iteration.

    Interpretation implemented. The owner of an expert always holds it (free). ``overlap_budget`` t
    and ``memory_budget`` m count *extra* (non-owned) copies per device; no rank ever gets more
    than ``min(t, m)`` of them, and experts of zero load are never replicated.

    * ``t <= m`` (communication is the limit): the top-t experts by load (ties by expert id) are
      materialized on every rank.
    * ``t > m`` (memory is the limit): up to m extra copies per rank are handed out one at a time,
      proportionally to load by the D'Hondt rule: the next copy goes to the expert with the largest
      load per copy ``load[e] / copies[e]`` (copies counting the owner; ties by expert id), so the
      copies end up proportional to load and a hotter expert never has fewer copies than a colder
      one unless placement constraints block it. The copy goes to the rank that (1) does not hold
      the expert yet and has budget left, (2) lies on the node with the fewest copies of the
      expert (spreading an expert over nodes before filling a node), (3) has the most budget left,
      (4) has the lowest id. When every rank with budget left already holds the expert, extra copies
      of other experts are moved along a shortest augmenting path to make room (as in bipartite
      b-matching), so a copy is refused only when no assignment of the copies handed out so far
      could take it; such an expert gets no more copies. Consequently a hotter expert ends with
      fewer copies than a colder one only when every rank lacking it is full (e.g. hot experts
      crowded on one owner whose own slots can only take other experts).

    Args:
        load: ``[E]`` expert loads (e.g. :attr:`LoadTracker.load`).
        ownership: current owners.
        world_size: W, ranks of the FSSDP group.
        ranks_per_node: ranks per node; rank r is on node ``r // ranks_per_node``.
        overlap_budget: t >= 0 (see :func:`estimate_overlap_budget`).
        memory_budget: m >= 0 extra experts per device.
        replicate_above: a copy is only handed out while the expert's load per copy exceeds
            ``replicate_above`` x the mean expert load (0: the paper's rule, every budgeted copy is
            used). With 1.0, an expert no busier than average is never replicated, so a balanced
            load materializes nothing beyond the owners and pays no SparseAllGather traffic; a hot
            expert gets copies until its load per copy is down to the mean.

    Returns:
        ``[E, W]`` bool placement.

    Raises:
        ValueError: on negative budgets, ``ranks_per_node < 1``, or a load / ownership mismatch.
    """
    E = ownership.num_experts
    if overlap_budget < 0 or memory_budget < 0 or ranks_per_node < 1:
        raise ValueError(f"sparse_materialization needs overlap_budget >= 0, memory_budget >= 0, ranks_per_node >= 1; "
                         f"got {overlap_budget}, {memory_budget}, {ranks_per_node}")
    if load.numel() != E:
        raise ValueError(f"load has {load.numel()} entries for {E} experts")
    ownership.validate(world_size)
    load = load.detach().to(device="cpu", dtype=torch.float64).flatten()
    placement = torch.zeros(E, world_size, dtype=torch.bool)
    placement[torch.arange(E), ownership.owner.cpu()] = True
    threshold = max(float(replicate_above) * float(load.mean()), 0.0) if E else 0.0
    order = [e for e in _by_load(load) if load[e] > threshold]
    if overlap_budget <= memory_budget:
        placement[order[:overlap_budget]] = True
        return placement

    num_nodes = (world_size + ranks_per_node - 1) // ranks_per_node
    node_of = [r // ranks_per_node for r in range(world_size)]
    budget = [memory_budget] * world_size
    held = placement.tolist()
    node_copies = [[0] * num_nodes for _ in range(E)]
    owner = ownership.owner.tolist()
    for e, o in enumerate(owner):
        node_copies[e][node_of[o]] += 1
    copies = [1] * E
    values = load.tolist()
    heap = [(-values[e], e) for e in order]
    heapq.heapify(heap)
    left = memory_budget * world_size
    while heap and left:
        neg, e = heapq.heappop(heap)
        if -neg <= threshold:  # every remaining expert is at or below the threshold per copy
            break
        free = [r for r in range(world_size) if budget[r] and not held[e][r]]
        if not free:
            moves = _augmenting_path(e, held, budget, owner)
            if moves is None:
                continue
            for f, src, dst in reversed(moves):  # last move first: each dst has a free slot
                held[f][src], held[f][dst] = False, True
                budget[src] += 1
                budget[dst] -= 1
                node_copies[f][node_of[src]] -= 1
                node_copies[f][node_of[dst]] += 1
            free = [moves[0][1]]
        r = min(free, key=lambda q: (node_copies[e][node_of[q]], -budget[q], q))
        held[e][r] = True
        budget[r] -= 1
        left -= 1
        node_copies[e][node_of[r]] += 1
        copies[e] += 1
        heapq.heappush(heap, (-values[e] / copies[e], e))
    return torch.tensor(held, dtype=torch.bool)


def _augmenting_path(e: int, held: list[list[bool]], budget: list[int], owner: list[int]
                     ) -> list[tuple[int, int, int]] | None:
    """When every rank with budget left already holds ``e``: a shortest chain of moves of extra
    copies that frees a slot for ``e`` (breadth-first over ranks, ascending ids: deterministic).

    Returns ``[(f, src, dst), ...]`` in the order to apply (each move puts f's extra copy on a rank
    that lacks f), the first ``src`` being the rank that then receives ``e``; None if there is none.
    """
    world = len(budget)
    parent: dict[int, tuple[int, int] | None] = {q: None for q in range(world) if not held[e][q]}
    frontier = list(parent)
    while frontier:
        nxt = []
        for q in frontier:
            for f in range(len(held)):
                if not held[f][q] or owner[f] == q:
                    continue
                for r in range(world):
                    if held[f][r] or r in parent:
                        continue
                    parent[r] = (q, f)
                    if budget[r]:
                        moves = []
                        while parent[r] is not None:
                            src, g = parent[r]
                            moves.append((g, src, r))
                            r = src
                        return moves[::-1]
                    nxt.append(r)
        frontier = nxt
    return None


def route_tokens(experts: torch.Tensor, source_rank: int, placement: torch.Tensor, ranks_per_node: int) -> torch.Tensor:
    """Topology-aware dispatch (Hecate): the destination rank of each token copy of ``source_rank``.

    For the copies of expert e, the eligible ranks are: ``source_rank`` itself if it holds e; else
    the ranks of its node (``r // ranks_per_node``) holding e; else all ranks holding e. The copies of
    e (in their order in ``experts``) are dealt round-robin over the eligible ranks in ascending
    order, starting at eligible index ``source_rank % n_eligible`` (so that sources sending few
    tokens do not all pick the same replica); per-rank counts differ by at most one.

    Args:
        experts: ``[N]`` int64 global expert ids of the token copies (normally sorted by expert id).
        source_rank: the rank where the copies are.
        placement: ``[E, W]`` bool from :func:`sparse_materialization`.
        ranks_per_node: ranks per node.

    Returns:
        ``[N]`` int64 destination ranks.

    Raises:
        ValueError: when a routed expert is materialized nowhere, or ``ranks_per_node < 1``.
    """
    if ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node}")
    placement = placement.cpu()
    device = experts.device
    experts = experts.cpu()
    order = torch.argsort(experts, stable=True)
    ids, counts = torch.unique_consecutive(experts[order], return_counts=True)
    dest_sorted = torch.empty(experts.numel(), dtype=torch.int64)
    node = source_rank // ranks_per_node
    start = 0
    for e, n in zip(ids.tolist(), counts.tolist()):
        holders = torch.nonzero(placement[e]).flatten()
        if holders.numel() == 0:
            raise ValueError(f"expert {e} is routed tokens but materialized on no rank")
        if bool(placement[e, source_rank]):
            eligible = torch.tensor([source_rank])
        else:
            near = holders[holders // ranks_per_node == node]
            eligible = near if near.numel() else holders
        k = eligible.numel()
        dest_sorted[start:start + n] = eligible[(torch.arange(n) + source_rank % k) % k]
        start += n
    dest = torch.empty_like(dest_sorted)
    dest[order] = dest_sorted
    return dest.to(device)


def _check_rpn(ranks_per_node: int) -> None:
    if ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node}")


def _dealt(n: torch.Tensor, k: torch.Tensor, index: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Copies the eligible rank at position ``index`` gets when ``n`` copies are dealt round-robin over
    ``k`` eligible ranks from position ``start`` (:func:`route_tokens`): copy ``i`` goes to position
    ``(i + start) % k``, so position ``j`` gets ``n // k + (((j - start) % k) < n % k)``."""
    k = k.clamp_min(1)
    return n // k + (((index - start) % k) < n % k).to(torch.int64)


def _raise_unplaced(counts: torch.Tensor, k: torch.Tensor) -> None:
    """Raise like :func:`route_tokens` when an expert with copies has no eligible rank."""
    bad = torch.nonzero((k == 0) & (counts > 0))
    if bad.numel():
        raise ValueError(f"expert {int(bad[0, -1])} is routed tokens but materialized on no rank")


def route_counts(counts: torch.Tensor, source_rank: int, placement: torch.Tensor, ranks_per_node: int) -> torch.Tensor:
    """:func:`route_tokens` as counts: how many copies of each expert ``source_rank`` sends to each rank.

    Equal to the ``[W, E]`` histogram of ``(route_tokens(experts, source_rank, ...), experts)`` for
    any ``experts`` holding ``counts[e]`` copies of expert ``e``, computed from the counts alone (no
    per-token work), on the host. FSSDP's dispatcher uses it (with :func:`routed_to`) so that every
    rank derives every send and receive count from the all-gathered per-expert counts.

    Args:
        counts: ``[E]`` int copies per expert on ``source_rank`` (any device; read on the host).
        source_rank: the sending rank.
        placement: ``[E, W]`` bool from :func:`sparse_materialization`.
        ranks_per_node: ranks per node.

    Returns:
        ``[W, E]`` int64 on the CPU: ``[r, e]`` copies of expert ``e`` sent to rank ``r``.

    Raises:
        ValueError: an expert with copies is materialized nowhere, or ``ranks_per_node < 1``.
    """
    _check_rpn(ranks_per_node)
    placement = placement.cpu()
    counts = counts.detach().to("cpu", torch.int64)
    E, W = placement.shape
    node = torch.arange(W) // ranks_per_node
    near = placement & (node == source_rank // ranks_per_node)[None, :]  # [E, W]
    local = placement[:, source_rank]  # [E]
    only_source = torch.zeros(W, dtype=torch.bool)
    only_source[source_rank] = True
    eligible = torch.where(local[:, None], only_source[None, :],
                           torch.where(near.any(1, keepdim=True), near, placement))  # [E, W]
    k = eligible.sum(1)
    _raise_unplaced(counts, k)
    index = torch.cumsum(eligible.to(torch.int64), 1) - 1  # position of each eligible rank, ascending ids
    start = (source_rank % k.clamp_min(1))[:, None]
    dealt = _dealt(counts[:, None], k[:, None], index, start)
    return torch.where(eligible, dealt, 0).t().contiguous()


def routed_to(counts: torch.Tensor, dest_rank: int, placement: torch.Tensor, ranks_per_node: int) -> torch.Tensor:
    """What rank ``dest_rank`` receives from every rank: ``out[s] == route_counts(counts[s], s, ...)[dest_rank]``.

    Computed for all sources at once in ``O(W * E)`` (no ``[W, W, E]`` intermediate), from where
    ``dest_rank`` stands among the eligible ranks of each (source, expert) under the rule of
    :func:`route_tokens`: the source itself when it holds the expert; else the holders on the
    source's node, which include ``dest_rank`` only on the same node; else every holder.

    Args:
        counts: ``[W, E]`` int copies per expert on each source rank (any device; read on the host).
        dest_rank: the receiving rank.
        placement: ``[E, W]`` bool.
        ranks_per_node: ranks per node (node ``n`` is ranks ``n * ranks_per_node ...``).

    Returns:
        ``[W, E]`` int64 on the CPU: ``[s, e]`` copies of expert ``e`` that rank ``s`` sends to ``dest_rank``.

    Raises:
        ValueError: ``counts`` is not ``[W, E]``, an expert with copies is materialized nowhere, or
            ``ranks_per_node < 1``.
    """
    _check_rpn(ranks_per_node)
    placement = placement.cpu()
    counts = counts.detach().to("cpu", torch.int64)
    E, W = placement.shape
    if tuple(counts.shape) != (W, E):
        raise ValueError(f"routed_to needs counts [W={W}, E={E}], got {tuple(counts.shape)}")
    r = dest_rank
    source = torch.arange(W)
    node = source // ranks_per_node
    first = (r // ranks_per_node) * ranks_per_node  # first rank of dest_rank's node
    held = placement.to(torch.int64)
    per_node = torch.zeros(E, int(node.max()) + 1, dtype=torch.int64).index_add_(1, node, held)  # [E, nodes]
    holders = held.sum(1)  # [E]
    below_all = held[:, :r].sum(1)  # holders with a lower id than dest_rank
    below_node = held[:, first:r].sum(1)  # the same, on dest_rank's node
    has_self = placement.t()  # [W, E]: source s holds e
    k_near = per_node[:, node].t()  # [W, E]: holders on s's node
    has_near = k_near > 0
    k = torch.where(has_self, 1, torch.where(has_near, k_near, holders[None, :]))
    _raise_unplaced(counts, k)
    r_holds = placement[:, r][None, :]  # [1, E]
    as_self = has_self & (source == r)[:, None]
    as_near = ~has_self & has_near & (node == r // ranks_per_node)[:, None] & r_holds
    as_any = ~has_self & ~has_near & r_holds
    index = torch.where(as_near, below_node[None, :], below_all[None, :])
    index = torch.where(as_self, 0, index)
    start = source[:, None] % k.clamp_min(1)
    dealt = _dealt(counts, k, index, start)
    return torch.where(as_self | as_near | as_any, dealt, 0)
