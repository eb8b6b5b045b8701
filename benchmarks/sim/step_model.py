"""A discrete-event model of one training step of EP, FSSDP (Hecate) and DeepSpeed-MoE on W ranks.

What is modelled (per MoE layer, per rank, in program order; DESIGN.md sections 2 and 3):

- forward: attention (+ norms), router / permutation / combine work, the per-layer routing-statistics
  all-reduce, the count all-to-all and the row all-to-all (EP: to the owner block of each expert;
  FSSDP: to a materialized copy chosen as :func:`system.parallel.fssdp.route_tokens` does;
  DeepSpeed: dense ``[E, C, d]`` buffers), the expert GEMMs (SwiGLU: 3 matmuls forward, 2x that
  backward), the combine all-to-all;
- FSSDP only: the SparseAllGather of the layer's materialized experts, issued asynchronously when
  the block starts (the trainer's prefetch hook) so it overlaps attention, and the SparseReduceScatter
  of their gradients after the expert backward; placement from the real
  :func:`~system.parallel.fssdp.sparse_materialization` on the real :class:`LoadTracker` average, the
  overlap budget from the real :func:`estimate_overlap_budget`, re-sharding from the real
  :func:`heterogeneous_sharding`;
- backward: the mirror image; then dense-gradient all-reduce, the clipping all-reduce, the optimizer.

Semantics. Every rank has a clock. Compute advances a rank's clock by its own work; where several
ranks share fewer processors (a CPU run with more processes than cores) the work is served by
processor sharing. A collective starts when its slowest participant arrives and when the previous
collective of the process group is done (one FIFO channel, as NCCL streams and Gloo queues behave),
and every participant leaves when it ends: that is how a straggler delays everybody. An asynchronous
collective (the prefetched SparseAllGather) is issued without blocking and waited for later.

Inputs. Per-op costs come from a cost object: :class:`TableCosts` (tables measured on this machine by
``expert_parallel_sim.py calibrate``) or :class:`DeviceCosts` (FLOP/s and link figures of a stated
GPU system). Loads come from a function ``(step, layer) -> [W, E]`` assignments per source rank.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from system.config.fssdp import FSSDPConfig
from system.parallel.fssdp import (
    LoadTracker,
    Ownership,
    estimate_overlap_budget,
    heterogeneous_sharding,
    sparse_materialization,
)

SYSTEMS = ("ep", "fssdp", "deepspeed")


# --------------------------------------------------------------------------------------------
# the engine


def ps_finish(start: np.ndarray, work: np.ndarray, cores: float) -> np.ndarray:
    """Finish times of jobs ``work[r]`` (seconds of one processor) started at ``start[r]`` when the
    running jobs share ``cores`` processors equally (each runs at ``min(1, cores / running)``)."""
    start = np.asarray(start, dtype=float)
    work = np.broadcast_to(np.asarray(work, dtype=float), start.shape).copy()
    if not math.isfinite(cores) or cores >= start.size:
        return start + work
    finish = start.copy()
    rem = work
    pending = rem > 0
    t = float(start[pending].min()) if pending.any() else 0.0
    while pending.any():
        active = pending & (start <= t + 1e-15)
        waiting = pending & ~active
        if not active.any():
            t = float(start[waiting].min())
            continue
        rate = min(1.0, cores / int(active.sum()))
        t_next = t + float(rem[active].min()) / rate
        if waiting.any():
            t_next = min(t_next, float(start[waiting].min()))
        rem[active] -= (t_next - t) * rate
        t = t_next
        done = active & (rem <= 1e-12)
        finish[done] = t
        rem[done] = 0.0
        pending &= ~done
    return finish


class Timeline:
    """Clocks of W ranks running the same program; collectives on one FIFO channel.

    Consecutive compute calls are merged into one segment (flushed at the next collective or wait),
    so processor sharing sees whole segments between synchronisation points.
    """

    def __init__(self, world: int, cores: float = math.inf):
        self.world = world
        self.cores = cores
        self.clock = np.zeros(world)
        self.channel = 0.0
        self._pending = np.zeros(world)
        self._handles: dict[int, float] = {}
        self.comm_s: dict[str, float] = {}
        self.wait_s = np.zeros(world)  # time ranks spent waiting for the slowest participant
        self.compute_s = np.zeros(world)

    def compute(self, seconds: Any) -> None:
        """Add work (a scalar or ``[W]`` seconds) to every rank's current compute segment."""
        self._pending = self._pending + np.asarray(seconds, dtype=float)

    def _flush(self) -> None:
        if self._pending.any():
            self.compute_s += self._pending
            self.clock = ps_finish(self.clock, self._pending, self.cores)
            self._pending = np.zeros(self.world)

    def collective(self, seconds: float, kind: str, async_op: bool = False) -> int | None:
        """A collective of all ranks lasting ``seconds`` once it starts; returns a handle if async."""
        self._flush()
        start = max(float(self.clock.max()), self.channel)
        end = start + float(seconds)
        self.channel = end
        self.comm_s[kind] = self.comm_s.get(kind, 0.0) + float(seconds)
        if async_op:
            handle = len(self._handles)
            self._handles[handle] = end
            return handle
        self.wait_s += start - self.clock
        self.clock = np.full(self.world, end)
        return None

    def wait(self, handle: int) -> None:
        """Block every rank until the asynchronous collective ``handle`` has completed."""
        self._flush()
        end = self._handles.pop(handle)
        self.wait_s += np.maximum(end - self.clock, 0.0)
        self.clock = np.maximum(self.clock, end)

    def now(self) -> float:
        """The time the slowest rank has reached (pending compute included)."""
        self._flush()
        return float(self.clock.max())


# --------------------------------------------------------------------------------------------
# the simulated model and its costs


@dataclass(frozen=True)
class Shape:
    """The simulated model, per rank.

    Attributes:
        dim, expert_dim: d and the SwiGLU hidden size F of an expert.
        experts, top_k: E and k.
        layers: MoE layers simulated (every block has one).
        tokens: tokens per rank per step (one micro-batch).
        dense_params: parameters outside the experts (replicated on every rank).
    """

    dim: int
    expert_dim: int
    experts: int
    top_k: int
    layers: int
    tokens: int
    dense_params: int

    @property
    def expert_params(self) -> int:
        """Parameters of one SwiGLU expert (w1, w2, w3)."""
        return 3 * self.dim * self.expert_dim


def _interp(x: np.ndarray, xs: list[float], ys: list[float]) -> np.ndarray:
    """Piecewise-linear interpolation in a measured table, linear extrapolation past its ends."""
    xs_a, ys_a = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    x = np.asarray(x, dtype=float)
    y = np.interp(x, xs_a, ys_a)
    if len(xs_a) >= 2:
        hi = x > xs_a[-1]
        slope = (ys_a[-1] - ys_a[-2]) / (xs_a[-1] - xs_a[-2])
        y = np.where(hi, ys_a[-1] + slope * (x - xs_a[-1]), y)
    return np.maximum(y, 0.0)


def _link_time(traffic: np.ndarray, ranks_per_node: int, bw_intra: float, bw_inter: float) -> float:
    """Slowest rank's transfer time for a ``[W, W]`` bytes matrix (diagonal = local, free): per
    rank, the larger of its sent and received bytes per link class, over that class's bandwidth."""
    w = traffic.shape[0]
    rpn = min(max(ranks_per_node, 1), w)
    t = np.asarray(traffic, dtype=float)
    diag = np.diagonal(t)
    send, recv = t.sum(1) - diag, t.sum(0) - diag
    if w % rpn:  # ragged last node: mask (slow path)
        node = np.arange(w) // rpn
        same = node[:, None] == node[None, :]
        send_in, recv_in = np.where(same, t, 0.0).sum(1) - diag, np.where(same, t, 0.0).sum(0) - diag
    else:
        n = w // rpn
        blocks = np.einsum("iaib->iab", t.reshape(n, rpn, n, rpn))  # [node, src, dst] inside a node
        send_in, recv_in = blocks.sum(2).ravel() - diag, blocks.sum(1).ravel() - diag
    worst_intra = max(send_in.max(), recv_in.max(), 0.0)
    worst_inter = max((send - send_in).max(), (recv - recv_in).max(), 0.0)
    return max(worst_intra / bw_intra, worst_inter / bw_inter if worst_inter > 1e-9 else 0.0)


class TableCosts:
    """Per-op costs from a calibration measured on this machine (one configuration).

    ``entry`` is one ``calibration["configs"][i]`` of ``expert_parallel_sim.py``; ``comm`` the fitted
    Gloo collectives (``alpha_s`` + bytes / ``bytes_per_s``). ``cores``: processors the ranks share.
    """

    kind = "table"
    dense_sync_critical = True  # the trainer all-reduces dense gradients after backward
    host_on_step = True  # the host Python of FSSDP runs on the same CPU, inside the step
    param_bytes = 4  # fp32 parameters, activations and gradients on CPU
    act_bytes = 4
    expert_call_overhead = 0.0

    def __init__(self, entry: dict[str, Any], comm: dict[str, Any], cores: float, world: int):
        self.e = entry
        self.comm = comm
        self.cores = cores
        self.world = world
        m = entry["model"]
        self.attn_fwd, self.attn_bwd = m["attention_fwd_s"], m["attention_bwd_s"]
        self.moe_fwd, self.moe_bwd = m["moe_other_fwd_s"], m["moe_other_bwd_s"]
        self.head_fwd, self.head_bwd = m["head_fwd_s"], m["head_bwd_s"]

    def expert(self, rows: np.ndarray, backward: bool) -> np.ndarray:
        """Seconds of one expert's SwiGLU (system kernel) on ``rows`` rows, elementwise."""
        t = self.e["expert"]
        return _interp(rows, t["rows"], t["bwd_s" if backward else "fwd_s"])

    def ds_expert(self, rows: np.ndarray, backward: bool) -> np.ndarray:
        """Seconds of one DeepSpeed expert (``nn.Linear`` SwiGLU) on ``rows`` rows, elementwise."""
        t = self.e["ds_expert"]
        return _interp(rows, t["rows"], t["bwd_s" if backward else "fwd_s"])

    def row_copy(self, rows: Any, backward: bool) -> Any:
        """Seconds to gather (forward) or scatter-add (backward) ``rows`` rows of d elements."""
        c = self.e["row_copy"]
        return np.asarray(rows, dtype=float) * (c["bwd_s_per_row"] if backward else c["fwd_s_per_row"])

    def optimizer(self, params: Any) -> Any:
        """Seconds of grad scaling, clipping norms and AdamW over ``params`` parameters."""
        return np.asarray(params, dtype=float) * self.e["optimizer"]["s_per_param"]

    def a2a(self, traffic: np.ndarray, ranks_per_node: int) -> float:
        """An uneven all-to-all (Gloo fit over the remote bytes of the busiest rank)."""
        f = self.comm["all_to_all"]
        return f["alpha_s"] + _link_time(traffic, ranks_per_node, f["bytes_per_s"], f["bytes_per_s"])

    def allreduce(self, nbytes: float, world: int) -> float:
        """An all-reduce of ``nbytes`` (Gloo fit at 2 ranks, bytes term scaled as a ring: 2(W-1)/W)."""
        f = self.comm["all_reduce"]
        return f["alpha_s"] + nbytes * (2 * (world - 1) / world) / f["bytes_per_s"]


@dataclass(frozen=True)
class Figure:
    """A number with its unit and where it comes from."""

    value: float
    unit: str
    source: str


@dataclass(frozen=True)
class Hardware:
    """A GPU system for the scaled runs: compute, memory and link figures, each with its source."""

    name: str
    description: str
    peak_flops: Figure
    gemm_efficiency: Figure
    hbm_bytes_per_s: Figure
    memory_efficiency: Figure
    kernel_launch_s: Figure
    intra_bytes_per_s: Figure  # per GPU per direction inside a node (NVLink)
    inter_bytes_per_s: Figure  # per GPU per direction between nodes (InfiniBand); = intra for one domain
    link_efficiency: Figure
    alpha_s: Figure  # fixed latency of one collective
    alpha_per_peer_s: Figure  # added per peer of an all-to-all (W-1 sends and receives are posted)
    ranks_per_node: int  # 0: every rank in one NVLink domain
    device_memory_bytes: Figure

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "description": self.description, "ranks_per_node": self.ranks_per_node}
        for k, v in self.__dict__.items():
            if isinstance(v, Figure):
                out[k] = {"value": v.value, "unit": v.unit, "source": v.source}
        return out


class DeviceCosts:
    """Per-op costs on a GPU system from FLOP/s, memory and link figures (:class:`Hardware`).

    GEMMs: ``max(FLOPs / (peak x efficiency), bytes / (HBM x efficiency))`` (a roofline: an expert with
    few rows is bound by reading its weights) plus kernel launches. Attention: ``8 d^2 + 2 S d`` FLOPs
    per token forward (Q, K, V, O projections; causal scores and values), 2x backward. Collectives:
    latency + busiest rank's bytes per link class / (bandwidth x efficiency). bf16 activations,
    parameters and gradients (2 bytes). Dense-gradient reduction is assumed overlapped with the
    backward (DDP / FSDP buckets), embeddings and the LM head are outside the simulated layers.
    """

    kind = "device"
    dense_sync_critical = False
    host_on_step = False  # the Python of the host is reported separately (see the report)
    param_bytes = 2
    act_bytes = 2
    cores = math.inf

    def __init__(self, hw: Hardware, shape: Shape, seq_len: int, world: int):
        self.hw = hw
        self.shape = shape
        self.world = world
        self.ranks_per_node = hw.ranks_per_node or world
        self.flops = hw.peak_flops.value * hw.gemm_efficiency.value
        self.mem = hw.hbm_bytes_per_s.value * hw.memory_efficiency.value
        self.launch = hw.kernel_launch_s.value
        d, T, E, k = shape.dim, shape.tokens, shape.experts, shape.top_k
        attn = T * (8 * d * d + 2 * seq_len * d) / self.flops + 6 * self.launch
        self.attn_fwd, self.attn_bwd = attn, 2 * attn
        # router GEMM [T, d] x [d, E], softmax / top-k, permutation of T*k rows and weighted combine
        other = 2 * T * d * E / self.flops + (T * d + 3 * T * k * d) * self.act_bytes / self.mem + 8 * self.launch
        self.moe_fwd, self.moe_bwd = other, 2 * other
        self.head_fwd = self.head_bwd = 0.0
        self.expert_call_overhead = 3 * self.launch  # one grouped GEMM per projection

    def _gemm(self, rows: np.ndarray, backward: bool) -> np.ndarray:
        d, f = self.shape.dim, self.shape.expert_dim
        rows = np.asarray(rows, dtype=float)
        mult = 2.0 if backward else 1.0
        flops = mult * 6.0 * rows * d * f
        weights = 3 * d * f * self.param_bytes * mult  # read W (+ write dW backward)
        acts = rows * (2 * d + 3 * f) * self.act_bytes * mult
        return np.maximum(flops / self.flops, (weights + acts) / self.mem)

    def expert(self, rows: np.ndarray, backward: bool) -> np.ndarray:
        return self._gemm(rows, backward)

    def ds_expert(self, rows: np.ndarray, backward: bool) -> np.ndarray:
        # DeepSpeed's Experts loop over local experts: 3 nn.Linear launches forward, 6 backward, each
        return self._gemm(rows, backward) + (6 if backward else 3) * self.launch

    def row_copy(self, rows: Any, backward: bool) -> Any:
        return np.asarray(rows, dtype=float) * 2 * self.shape.dim * self.act_bytes / self.mem

    def optimizer(self, params: Any) -> Any:
        # AdamW, fp32 master/moments: read p, g, m, v; write p, m, v (~26 bytes per parameter)
        return np.asarray(params, dtype=float) * 26.0 / self.mem

    def a2a(self, traffic: np.ndarray, ranks_per_node: int) -> float:
        eff = self.hw.link_efficiency.value
        peers = traffic.shape[0] - 1
        return (self.hw.alpha_s.value + peers * self.hw.alpha_per_peer_s.value
                + _link_time(traffic, ranks_per_node, self.hw.intra_bytes_per_s.value * eff,
                             self.hw.inter_bytes_per_s.value * eff))

    def allreduce(self, nbytes: float, world: int) -> float:
        bw = self.hw.intra_bytes_per_s.value if world <= self.ranks_per_node else self.hw.inter_bytes_per_s.value
        return self.hw.alpha_s.value + nbytes * 2 * (world - 1) / world / (bw * self.hw.link_efficiency.value)


# --------------------------------------------------------------------------------------------
# where the rows go


def ep_owner(experts: int, world: int) -> np.ndarray:
    """``[E]`` EP owner rank: rank j holds experts ``[j E/W, (j+1) E/W)`` (:func:`system.parallel.apply_ep`)."""
    return np.arange(experts) // (experts // world)


def ep_routing(counts: np.ndarray, world: int) -> tuple[np.ndarray, np.ndarray]:
    """EP: ``counts`` ``[W, E]`` assignments per source rank -> rows per (rank, expert) ``[W, E]`` and
    the rows sent source -> destination ``[W, W]``."""
    E = counts.shape[1]
    owner = ep_owner(E, world)
    rows = np.zeros((world, E))
    rows[owner, np.arange(E)] = counts.sum(0)
    return rows, counts.reshape(counts.shape[0], world, E // world).sum(2)


def group_rows(values: np.ndarray, group: np.ndarray, groups: int) -> np.ndarray:
    """``out[g] = sum of values[i] over i with group[i] == g`` for 2-D ``values``: ``[groups, cols]`` (no BLAS: numpy's
    threaded matmul is pathologically slow on a shared, busy machine)."""
    values = np.asarray(values, dtype=float)
    cols = values.shape[1]
    flat = (np.asarray(group)[:, None] * cols + np.arange(cols)[None, :]).ravel()
    return np.bincount(flat, weights=values.ravel(), minlength=groups * cols).reshape(groups, cols)


_ROUTING_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def fssdp_routing(counts: np.ndarray, placement: np.ndarray, ranks_per_node: int) -> tuple[np.ndarray, np.ndarray]:
    """FSSDP topology-aware dispatch at the level of counts: what
    :func:`system.parallel.fssdp.route_tokens` does token by token, for every source rank at once.

    For expert e and source s: the eligible ranks are s if it holds e, else the holders on s's
    node, else all holders (ascending); its ``n = counts[s, e]`` copies are dealt round-robin
    starting at eligible index ``s % k``: eligible j gets ``n // k + ((j - s % k) mod k < n % k)``.
    Memoised on its inputs (the returned arrays must not be modified).

    Returns:
        rows ``[W, E]`` received per (rank, expert) and rows sent ``[W_src, W_dst]``.

    Raises:
        ValueError: when an expert with assignments is materialized nowhere.
    """
    key = (counts.tobytes(), placement.tobytes(), placement.shape, ranks_per_node)
    hit = _ROUTING_CACHE.get(key)
    if hit is not None:
        return hit
    W, E = counts.shape[0], counts.shape[1]
    holders_n = placement.sum(1)
    if (holders_n[counts.sum(0) > 0] == 0).any():
        e = int(np.flatnonzero((holders_n == 0) & (counts.sum(0) > 0))[0])
        raise ValueError(f"expert {e} is routed tokens but materialized on no rank")
    node = np.arange(W) // max(ranks_per_node, 1)
    rows = np.zeros((W, E))
    # experts held by one rank only: every copy goes there
    single = np.flatnonzero(holders_n == 1)
    dest = placement[single].argmax(1)
    rows[dest, single] = counts[:, single].sum(0)
    traffic = group_rows(counts[:, single].T, dest, W).T.copy()  # [src, dst]
    src = np.arange(W)
    for e in np.flatnonzero(holders_n > 1):
        n = counts[:, e]
        if not n.any():
            continue
        holders = np.flatnonzero(placement[e])
        local = placement[e].astype(bool)
        rows[local, e] += n[local]  # sources holding e keep their copies
        traffic[src[local], src[local]] += n[local]
        others = src[~local & (n > 0)]
        for nd in np.unique(node[others]):
            S = others[node[others] == nd]
            near = holders[node[holders] == nd]
            elig = near if near.size else holders
            k = elig.size
            ns = n[S]
            base, extra = ns // k, ns % k
            j = np.arange(k)[None, :]
            amount = base[:, None] + (((j - (S % k)[:, None]) % k) < extra[:, None])
            traffic[np.ix_(S, elig)] += amount
            rows[elig, e] += amount.sum(0)
    if len(_ROUTING_CACHE) > 4096:
        _ROUTING_CACHE.clear()
    _ROUTING_CACHE[key] = (rows, traffic)
    return rows, traffic


def ds_capacity(counts: np.ndarray, capacity_factor: float | None, top_k: int, min_capacity: int = 0) -> int:
    """GShard / DeepSpeed capacity C per expert: dropless (``None``): the largest per-rank expert load
    over the group; else ``max(ceil(capacity_factor * T * k / E), min_capacity)``."""
    if capacity_factor is None:
        return int(counts.max())
    T_k = int(counts[0].sum())
    return max(int(math.ceil(capacity_factor * T_k / counts.shape[1])), min_capacity)


# --------------------------------------------------------------------------------------------
# the FSSDP controller, mirrored (placement and sharding decisions are the system's functions)


_PLACEMENT_CACHE: dict[tuple, tuple[np.ndarray, float]] = {}


def placement_for(load: torch.Tensor, ownership: Ownership, world: int, ranks_per_node: int, t: int, m: int,
                  replicate_above: float) -> tuple[np.ndarray, float]:
    """:func:`sparse_materialization` (memoised on its inputs) and the CPU seconds of this thread its
    first call took (its cost on a core of its own, whatever else runs on the machine)."""
    key = (load.numpy().tobytes(), ownership.owner.numpy().tobytes(), world, ranks_per_node, t, m, replicate_above)
    hit = _PLACEMENT_CACHE.get(key)
    if hit is None:
        t0 = time.thread_time()
        p = sparse_materialization(load, ownership, world, ranks_per_node, t, m, replicate_above)
        hit = (p.numpy().copy(), time.thread_time() - t0)
        if len(_PLACEMENT_CACHE) > 20000:
            _PLACEMENT_CACHE.clear()
        _PLACEMENT_CACHE[key] = hit
    return hit


class FSSDPMirror:
    """What :class:`~system.parallel.fssdp.apply.FSSDPController` decides each step, without tensors.

    ``begin_step`` gives each layer's placement from its :class:`LoadTracker` average; ``end_step``
    records the step's global loads, sets the estimated overlap budget after step 2 (as the controller
    does) and re-shards every ``reshard_interval`` steps with :func:`heterogeneous_sharding`.
    """

    def __init__(self, cfg: FSSDPConfig, experts: int, world: int, layers: int, ranks_per_node: int,
                 estimated_t: int):
        self.cfg = cfg
        self.world = world
        self.rpn = ranks_per_node
        self.trackers = [LoadTracker(cfg.load_window, experts) for _ in range(layers)]
        self.owners = [Ownership.uniform(experts, world) for _ in range(layers)]
        self.t = cfg.overlap_budget if cfg.overlap_budget >= 0 else cfg.memory_budget
        self.estimated_t = estimated_t
        self.step = 0
        self.resharded = 0

    def begin_step(self) -> tuple[list[np.ndarray], float]:
        """Placements ``[E, W]`` per layer and the host seconds the real function took for them."""
        out, host = [], 0.0
        for tracker, own in zip(self.trackers, self.owners):
            p, s = placement_for(tracker.load, own, self.world, self.rpn, self.t, self.cfg.memory_budget,
                                 self.cfg.replicate_above)
            out.append(p)
            host += s
        return out, host

    def end_step(self, global_counts: list[np.ndarray]) -> list[int]:
        """Record the loads; returns the experts whose owner changed per layer (re-sharding)."""
        self.step += 1
        for tracker, c in zip(self.trackers, global_counts):
            tracker.update(torch.as_tensor(c, dtype=torch.float64))
        if self.cfg.overlap_budget < 0 and self.step == 2:
            self.t = self.estimated_t
        moved = [0] * len(self.owners)
        if self.cfg.reshard_interval and self.step % self.cfg.reshard_interval == 0:
            for i, (tracker, own) in enumerate(zip(self.trackers, self.owners)):
                new = heterogeneous_sharding(tracker.load, self.world, previous=own)
                moved[i] = int((new.owner != own.owner).sum())
                self.owners[i] = new
            self.resharded += int(any(moved))
        return moved


def overlap_budget_estimate(costs: Any, shape: Shape, world: int, ranks_per_node: int) -> int:
    """The controller's t: attention forward time x gather bandwidth / expert bytes, the bandwidth
    being that of a SparseAllGather of every expert to every rank (as ``_estimate_overlap_budget``)."""
    E = shape.experts
    expert_bytes = shape.expert_params * costs.param_bytes
    owner = Ownership.uniform(E, world).owner.numpy()
    per_owner = np.bincount(owner, minlength=world)
    traffic = np.repeat(per_owner[:, None], world, axis=1).astype(float) * expert_bytes
    np.fill_diagonal(traffic, 0.0)
    seconds = costs.a2a(traffic, ranks_per_node)
    received = (E - per_owner.min()) * expert_bytes
    return estimate_overlap_budget(costs.attn_fwd, received / max(seconds, 1e-12), expert_bytes)


# --------------------------------------------------------------------------------------------
# one run of a system


@dataclass
class RunResult:
    """What one simulated run of a system gives (times in seconds)."""

    system: str
    step_s: list[float]
    timed_from: int
    busiest_rows_over_even: float = 0.0  # sum over layers of the busiest rank's expert rows / (T k L)
    bytes_per_step: float = 0.0  # FSSDP: spAG + spRS bytes over all ranks; DS: padded a2a bytes
    host_s_per_step: float = 0.0  # FSSDP: measured Python of placement + routing (not in step_s on GPU)
    drop_rate: float = 0.0
    capacity: float = 0.0
    overlap_budget: int | None = None
    replicas_end: list[list[int]] = field(default_factory=list)
    resharded: int = 0
    comm_s: dict[str, float] = field(default_factory=dict)
    wait_s_mean: float = 0.0

    @property
    def step_mean_s(self) -> float:
        """Mean step time over steps ``timed_from ..``."""
        return self.window_mean_s(self.timed_from, len(self.step_s))

    def window_mean_s(self, start: int, stop: int) -> float:
        """Mean step time over steps ``start .. stop - 1``."""
        timed = self.step_s[start:stop]
        return float(np.mean(timed)) if timed else math.nan

    def as_dict(self, compact: bool = False) -> dict[str, Any]:
        """Plain values; ``compact`` leaves out the per-step times and the final placement."""
        d = {k: v for k, v in self.__dict__.items()}
        d["step_mean_ms"] = 1e3 * self.step_mean_s
        d["step_s"] = [round(x, 7) for x in self.step_s]
        if compact:
            del d["step_s"], d["replicas_end"]
        return d


LoadFn = Callable[[int, int], np.ndarray]  # (step, layer) -> [W, E] assignments per source rank


class _Run:
    """One simulated run: the program of each system's step, layer by layer, on a :class:`Timeline`."""

    def __init__(self, system: str, shape: Shape, costs: Any, world: int, rpn: int, cfg: FSSDPConfig,
                 capacity_factor: float | None, route_host_s: float, timed_from: int, fssdp_t: int | None,
                 min_capacity: int):
        self.system, self.shape, self.costs, self.world, self.rpn = system, shape, costs, world, rpn
        self.capacity_factor, self.route_host_s, self.min_capacity = capacity_factor, route_host_s, min_capacity
        self.tl = Timeline(world, costs.cores)
        self.res = RunResult(system, [], timed_from)
        self.row_b = shape.dim * costs.act_bytes
        self.expert_b = shape.expert_params * costs.param_bytes
        self.local = shape.experts // world
        self.mirror = None
        if system == "fssdp":
            t = fssdp_t if fssdp_t is not None else overlap_budget_estimate(costs, shape, world, rpn)
            self.mirror = FSSDPMirror(cfg, shape.experts, world, shape.layers, rpn, t)
        # the count exchange: int64 counts per (peer, expert): EP sends its E/W per peer, FSSDP all E
        per_peer = shape.experts if system == "fssdp" else self.local
        self.count_a2a = costs.a2a(np.full((world, world), per_peer * 8.0), rpn)
        self.timed = False
        self.acc = {"rows": 0.0, "bytes": 0.0, "host": 0.0, "drops": 0.0, "assigned": 0.0, "caps": []}

    # -- EP and FSSDP (our dispatch)

    def forward_ours(self, c: np.ndarray, placement: np.ndarray | None, layer: int) -> tuple:
        tl, costs, W = self.tl, self.costs, self.world
        handle = None
        if placement is not None:  # prefetched SparseAllGather, issued when the block starts
            own = self.mirror.owners[layer].owner.numpy()
            gather = group_rows(placement.astype(float), own, W) * self.expert_b  # owner -> every holder, bytes
            np.fill_diagonal(gather, 0.0)
            if gather.any():
                handle = tl.collective(costs.a2a(gather, self.rpn), "spAG", async_op=True)
                if self.timed:
                    self.acc["bytes"] += 2 * gather.sum()  # spAG now, spRS of the same rows in backward
        tl.compute(costs.attn_fwd + costs.moe_fwd)
        tl.collective(costs.allreduce(self.shape.experts * 4, W), "stats_allreduce")  # FIFO: after spAG
        if handle is not None:
            tl.wait(handle)
        if placement is None:
            rows, traffic = ep_routing(c, W)
            mat = np.zeros((self.shape.experts, W), dtype=bool)
            mat[np.arange(self.shape.experts), ep_owner(self.shape.experts, W)] = True
        else:
            rows, traffic = fssdp_routing(c, placement, self.rpn)
            mat = placement.astype(bool)
        tl.collective(self.count_a2a, "count_a2a")
        tl.collective(costs.a2a(traffic * self.row_b, self.rpn), "dispatch")
        tl.compute(self._experts(rows, mat, False))
        tl.collective(costs.a2a(traffic.T * self.row_b, self.rpn), "combine")
        if self.timed:
            self.acc["rows"] += float(rows.sum(1).max())
        return traffic, rows, mat, handle is not None

    def _experts(self, rows: np.ndarray, mat: np.ndarray, backward: bool) -> np.ndarray:
        """Per-rank seconds of the materialized experts' GEMMs and the row permutations around them."""
        costs, T, k = self.costs, self.shape.tokens, self.shape.top_k
        rank, expert = np.nonzero(mat.T)  # the materialized (rank, expert) pairs only
        gemm = np.bincount(rank, weights=costs.expert(rows[rank, expert], backward), minlength=self.world)
        gemm = gemm + costs.expert_call_overhead * (2 if backward else 1)
        # received rows permuted to expert-major and back; FSSDP also orders its T*k rows by destination
        copies = 2 * rows.sum(1) + (2 * T * k if self.system == "fssdp" else 0)
        return gemm + costs.row_copy(copies, backward)

    def backward_ours(self, saved: tuple, layer: int) -> None:
        tl, costs, W = self.tl, self.costs, self.world
        traffic, rows, mat, gathered = saved
        tl.collective(costs.a2a(traffic * self.row_b, self.rpn), "combine_bwd")
        tl.compute(self._experts(rows, mat, True))
        if gathered:  # SparseReduceScatter: every other holder -> owner
            own = self.mirror.owners[layer].owner.numpy()
            reduce = group_rows(mat.astype(float), own, W).T * self.expert_b
            np.fill_diagonal(reduce, 0.0)
            tl.collective(costs.a2a(reduce, self.rpn), "spRS")
        tl.collective(costs.a2a(traffic.T * self.row_b, self.rpn), "dispatch_bwd")
        tl.compute(costs.moe_bwd + costs.attn_bwd)

    # -- DeepSpeed-MoE (GShard capacity, dense [E, C, d] all-to-alls)

    def _capped(self, c: np.ndarray) -> int:
        """The capacity C of this layer (dropless: the largest load); records drops when timed."""
        C = ds_capacity(c, self.capacity_factor, self.shape.top_k, self.min_capacity)
        if self.timed:
            self.acc["drops"] += float((c - np.minimum(c, C)).sum())
            self.acc["assigned"] += float(c.sum())
            self.acc["caps"].append(C)
        return C

    def forward_ds(self, c: np.ndarray) -> tuple:
        tl, costs, W, T, k, E = self.tl, self.costs, self.world, self.shape.tokens, self.shape.top_k, self.shape.experts
        C = self._capped(c)
        tl.compute(costs.attn_fwd + costs.moe_fwd)
        if self.capacity_factor is None:  # dropless: C = max load over the group (an all-reduce MAX)
            tl.collective(costs.allreduce(8, W), "capacity_allreduce")
        tl.compute(costs.row_copy(max(E * C - T * k, 0), False))  # encode into [E, C, d]
        dense = np.full((W, W), self.local * C * self.row_b)
        tl.collective(costs.a2a(dense, self.rpn), "dispatch")
        rows = np.full(W, float(W * C))  # each local expert: C rows from every rank
        tl.compute(self.local * costs.ds_expert(rows, False))
        tl.collective(costs.a2a(dense, self.rpn), "combine")
        if self.timed:
            self.acc["rows"] += float(self.local * W * C)
            self.acc["bytes"] += 4 * (dense.sum() - np.trace(dense))
        return dense, rows, C

    def backward_ds(self, saved: tuple) -> None:
        tl, costs, T, k, E = self.tl, self.costs, self.shape.tokens, self.shape.top_k, self.shape.experts
        dense, rows, C = saved
        tl.collective(costs.a2a(dense, self.rpn), "combine_bwd")
        tl.compute(self.local * costs.ds_expert(rows, True))
        tl.collective(costs.a2a(dense, self.rpn), "dispatch_bwd")
        tl.compute(costs.row_copy(max(E * C - T * k, 0), True) + costs.moe_bwd + costs.attn_bwd)

    # -- one step

    def step(self, counts: list[np.ndarray]) -> None:
        tl, costs, shape, W = self.tl, self.costs, self.shape, self.world
        placements: list[np.ndarray | None] = [None] * shape.layers
        if self.mirror is not None:
            placements, host = self.mirror.begin_step()
            host += self.route_host_s * shape.layers
            self.last_placements = placements
            if self.timed:
                self.acc["host"] += host
            if costs.host_on_step:
                tl.compute(host)
        if self.system == "ep" and self.capacity_factor is not None:  # ours with a capacity: drops, no padding
            counts = [np.minimum(c, self._capped(c)) for c in counts]
        saved = []
        for layer, c in enumerate(counts):
            saved.append(self.forward_ds(c) if self.system == "deepspeed" else self.forward_ours(c, placements[layer], layer))
        tl.compute(costs.head_fwd + costs.head_bwd)
        for layer in reversed(range(shape.layers)):
            if self.system == "deepspeed":
                self.backward_ds(saved[layer])
            else:
                self.backward_ours(saved[layer], layer)
        if costs.dense_sync_critical:
            tl.collective(costs.allreduce(shape.dense_params * 4, W), "dense_grad_allreduce")
        tl.collective(costs.allreduce(8, W), "clip_allreduce")
        if self.mirror is None:
            tl.compute(costs.optimizer(shape.dense_params + self.local * shape.layers * shape.expert_params))
            return
        owned = sum(np.bincount(o.owner.numpy(), minlength=W) for o in self.mirror.owners)
        tl.compute(costs.optimizer(shape.dense_params + owned * shape.expert_params))
        moved = self.mirror.end_step([c.sum(0) for c in counts])
        if any(moved):  # parameters + two AdamW moments (fp32) of the moved experts, one all-to-all
            per_peer = sum(moved) * shape.expert_params * 12.0 / W / max(W - 1, 1)
            tl.collective(costs.a2a(np.full((W, W), per_peer), self.rpn), "reshard")


def simulate(system: str, shape: Shape, costs: Any, loads: LoadFn, world: int, steps: int, timed_from: int,
             ranks_per_node: int | None = None, fssdp: FSSDPConfig | None = None,
             capacity_factor: float | None = None, route_host_s: float = 0.0,
             fssdp_t: int | None = None, min_capacity: int = 0) -> RunResult:
    """Simulate ``steps`` training steps of ``system`` on ``world`` ranks; the mean over steps
    ``timed_from ..`` is :attr:`RunResult.step_mean_s`.

    Args:
        system: ``"ep"``, ``"fssdp"`` or ``"deepspeed"``.
        shape: the model.
        costs: :class:`TableCosts` or :class:`DeviceCosts`.
        loads: ``(step, layer) -> [W, E]`` assignments per source rank.
        ranks_per_node: node size for FSSDP's routing and link classes (default: all ranks on one node).
        fssdp: FSSDP knobs (default: :class:`FSSDPConfig` defaults).
        capacity_factor: DeepSpeed and EP: ``None`` dropless, else the GShard capacity factor: each
            expert takes at most C of a rank's assignments, the rest are dropped (DeepSpeed pads to C).
        route_host_s: FSSDP: host seconds of one :func:`route_tokens` call (one per layer forward);
            added to the step where ``costs.host_on_step``.
        fssdp_t: FSSDP: the overlap budget the controller adopts after step 2 (a measured run's
            recorded t); default: :func:`overlap_budget_estimate` from ``costs``.
        min_capacity: the smallest capacity with a capacity factor (DeepSpeed's default is 4).

    Raises:
        ValueError: an unknown system, or E not divisible by W.
    """
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")
    if shape.experts % world:
        raise ValueError(f"E={shape.experts} experts must divide by W={world} ranks (EP / DeepSpeed blocks)")
    run = _Run(system, shape, costs, world, ranks_per_node or world, fssdp or FSSDPConfig(), capacity_factor,
               route_host_s, timed_from, fssdp_t, min_capacity)
    prev = 0.0
    for step in range(steps):
        run.timed = step >= timed_from
        run.step([np.asarray(loads(step, layer), dtype=float) for layer in range(shape.layers)])
        end = run.tl.now()
        run.res.step_s.append(end - prev)
        prev = end
    res, acc = run.res, run.acc
    n_timed = max(steps - timed_from, 1)
    res.busiest_rows_over_even = acc["rows"] / n_timed / (shape.tokens * shape.top_k * shape.layers)
    res.bytes_per_step = acc["bytes"] / n_timed
    res.host_s_per_step = acc["host"] / n_timed
    res.comm_s = {kind: v / steps for kind, v in run.tl.comm_s.items()}
    res.wait_s_mean = float(run.tl.wait_s.mean()) / steps
    if acc["caps"]:
        res.drop_rate = acc["drops"] / acc["assigned"] if acc["assigned"] else 0.0
        res.capacity = float(np.mean(acc["caps"])) if acc["caps"] else 0.0
    if run.mirror is not None:
        res.overlap_budget = run.mirror.t
        res.replicas_end = [p.sum(1).astype(int).tolist() for p in run.last_placements]
        res.resharded = run.mirror.resharded
    return res
