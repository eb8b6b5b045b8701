"""Bytes each rank sends per training step, per collective, on intra-node (NVLink) and inter-node links.

Ranks are laid out ``pp x dp_replicate x dp_shard x tp`` row-major (``tp`` innermost, the order of
:class:`~system.distributed.ParallelDims`); node ``= rank // gpus_per_node``. Every process group is an
arithmetic progression of ranks (``size`` members, ``stride`` apart), so whether it crosses nodes, and how
many of its members share a node, follows from the two numbers (:class:`Group`).

Bytes are what one rank puts on its links (the algorithms' bus bytes): a ring all-gather or
reduce-scatter of a full buffer ``B`` over ``n`` ranks sends ``B (n-1)/n``, an all-reduce twice that, an
all-to-all ``B (n-1)/n`` of the ``B`` a rank scatters (``(local-1)/n`` of it to peers on its node, the rest
over the network), a pipeline send its whole buffer. A ring collective over a group that spans nodes is
counted on the inter-node link (the ring's bottleneck); within a node on NVLink.

What moves, per step, under the layouts :mod:`system.plan.layouts` enumerates (``n_mb`` micro-batches of
``T`` tokens per data stream; blocks and MoE layers of the fullest pipeline rank):

- FSDP2 (``dense = "fsdp"``, over ``dp_shard``): per micro-batch an all-gather of the stage's dense parameters
  in the compute dtype in forward and again for the blocks in backward (the root stays unsharded), and a
  reduce-scatter of their fp32 gradients; HSDP adds an all-reduce of the gradient shards over ``dp_replicate``;
- replicated dense parameters: one all-reduce of their fp32 gradients per step over ``dp_replicate x dp_shard``;
- expert gradients (``expert_mode = "ep"``): one fp32 all-reduce per step over the expert ``dp`` replicas;
- tensor parallelism with sequence parallelism (:mod:`system.parallel.tp`): per block and micro-batch, an
  all-gather of the fp32 norm output and a reduce-scatter of the linear output (compute dtype) around
  attention, and around the FFN of dense blocks and of MoE blocks under expert TP (a MoE layer whose experts
  fold onto the TP ranks runs on the local sequence shard), mirrored in backward; again in the recomputation
  under full AC (selective AC keeps functional collectives' outputs); the embedding's and the head's too;
- expert parallelism: per MoE layer and micro-batch the dispatch (fp32 rows, as the norm outputs them) and
  the combine (compute dtype), ``T_routed x top_k`` rows each way, mirrored in backward, and again in the
  recomputation under either AC mode (the hand-written all-to-all is not kept by selective AC); FSSDP
  exchanges as much over the ranks of a stage, plus its sparse all-gather of ``fssdp.memory_budget`` fp32
  expert rows per MoE layer (again for backward with ``fssdp.rematerialize``) and their reduce-scatter;
- pipeline parallelism: per micro-batch, each stage boundary sends the fp32 residual stream forward and its
  gradient back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from system.config.job import JobConfig
from system.plan.memory import StepShape
from system.train.memory import PARAM_BYTES, RankState, StateLayout


@dataclass(frozen=True)
class Group:
    """A process group as ``size`` ranks ``stride`` apart, on nodes of ``gpus_per_node``."""

    name: str
    size: int
    stride: int
    gpus_per_node: int

    @property
    def local(self) -> int:
        """Members on the node of the group's first rank (all members when the group fits one node)."""
        if self.stride >= self.gpus_per_node:
            return 1
        return min(self.size, math.ceil(self.gpus_per_node / self.stride))

    @property
    def crosses_nodes(self) -> bool:
        return self.local < self.size


def groups(layout: StateLayout, gpus_per_node: int) -> dict[str, Group]:
    """The process groups of ``layout`` by name: ``tp``, ``dp_shard``, ``dp_replicate``, ``dp`` (both data
    dimensions), ``pp``, ``ep``, ``expert_dp`` and ``stage`` (every rank of a pipeline stage)."""
    tp, dps, dpr = layout.tp, layout.dp_shard, layout.dp_replicate
    g = gpus_per_node
    return {
        "tp": Group("tp", tp, 1, g),
        "dp_shard": Group("dp_shard", dps, tp, g),
        "dp_replicate": Group("dp_replicate", dpr, dps * tp, g),
        "dp": Group("dp_replicate x dp_shard", dpr * dps, tp, g),
        "pp": Group("pp", layout.pp, layout.stage_ranks, g),
        "ep": Group("ep", layout.ep, layout.etp, g),
        "expert_dp": Group("expert dp", layout.expert_dp, layout.ep * layout.etp, g),
        "stage": Group("stage", layout.stage_ranks, 1, g),
    }


@dataclass
class Collective:
    """One kind of collective of a step, as one rank sees it.

    Attributes:
        name: what moves (``"fsdp all-gather"``, ...).
        group: the :class:`Group` it runs over.
        calls: how many times per step.
        intra_bytes, inter_bytes: bytes this rank sends per step over NVLink and over the network.
        overlapped: runs behind compute (FSDP2's prefetched gathers and reduce-scatters, FSSDP's prefetched
            gather); the others are on the critical path.
        per_microbatch: repeats with every micro-batch (a pipeline bubble stretches it), not once per step.
    """

    name: str
    group: Group
    calls: int
    intra_bytes: float
    inter_bytes: float
    overlapped: bool = False
    per_microbatch: bool = True

    @property
    def bytes(self) -> float:
        return self.intra_bytes + self.inter_bytes

    def seconds(self, intra_bps: float, inter_bps: float) -> float:
        """Time on the links: NVLink and network transfers of an all-to-all proceed together (the slower
        decides); a ring runs at the speed of the link it is counted on."""
        return max(self.intra_bytes / intra_bps, self.inter_bytes / inter_bps)

    def as_dict(self) -> dict:
        return {"name": self.name, "group": self.group.name, "group_size": self.group.size, "calls": self.calls,
                "intra_node_bytes": int(self.intra_bytes), "inter_node_bytes": int(self.inter_bytes),
                "overlapped": self.overlapped}


def _ring(name: str, g: Group, calls: int, full_bytes: float, factor: float = 1.0, **kw) -> Collective | None:
    """A ring collective moving ``full_bytes`` (the unsharded buffer) per call: ``factor (n-1)/n`` of it."""
    if g.size <= 1 or calls <= 0 or full_bytes <= 0:
        return None
    sent = calls * full_bytes * factor * (g.size - 1) / g.size
    return Collective(name, g, calls, 0.0 if g.crosses_nodes else sent, sent if g.crosses_nodes else 0.0, **kw)


def _all_to_all(name: str, g: Group, calls: int, scattered_bytes: float, **kw) -> Collective | None:
    """An all-to-all in which each rank scatters ``scattered_bytes`` evenly over the group's members."""
    if g.size <= 1 or calls <= 0 or scattered_bytes <= 0:
        return None
    total = calls * scattered_bytes
    return Collective(name, g, calls, total * (g.local - 1) / g.size, total * (g.size - g.local) / g.size, **kw)


def _sent(name: str, g: Group, calls: int, sent: float, **kw) -> Collective | None:
    """Transfers of ``sent`` bytes in all to other members of ``g`` (point-to-point, sparse gathers): on the
    network when the group spans nodes."""
    if g.size <= 1 or calls <= 0 or sent <= 0:
        return None
    return Collective(name, g, calls, 0.0 if g.crosses_nodes else sent, sent if g.crosses_nodes else 0.0, **kw)


def _moe_collectives(cfg: JobConfig, layout: StateLayout, st: RankState, step: StepShape, mode: str,
                     gs: dict[str, Group], n_mb: int) -> list[Collective | None]:
    """The token exchange of the rank's MoE layers, and FSSDP's sparse gathers and reduce-scatters."""
    k, d, cb = cfg.moe.top_k, cfg.model.dim, step.cb
    tokens = step.micro_batch * step.seq_len / (1 if layout.expert_tp else layout.tp)  # the MoE layer's tokens
    pair = tokens * k * d * (4 + cb)  # one dispatch (fp32 rows) + one combine (compute dtype)
    layers = n_mb * st.moe_blocks
    calls = layers * 2 * (2 + (mode != "none"))  # dispatch and combine: forward, backward (, recomputation)
    if layout.expert_mode == "ep":
        return [_all_to_all("EP all-to-all (dispatch + combine)", gs["ep"], calls, pair / 2)]
    expert_bytes = cfg.fssdp.memory_budget * st.per_expert * PARAM_BYTES  # rows gathered per layer
    gathers = layers * (1 + int(cfg.fssdp.rematerialize) + (mode != "none"))
    return [
        _all_to_all("FSSDP all-to-all (dispatch + combine)", gs["stage"], calls, pair / 2),
        _sent("FSSDP sparse all-gather (expert rows)", gs["stage"], gathers, gathers * expert_bytes,
              overlapped=cfg.fssdp.prefetch),
        _sent("FSSDP sparse reduce-scatter (expert grads)", gs["stage"], layers, layers * expert_bytes),
    ]


def step_collectives(cfg: JobConfig, layout: StateLayout, st: RankState, step: StepShape, mode: str,
                     gpus_per_node: int) -> list[Collective]:
    """Every collective one rank of pipeline rank ``st`` runs in one step under AC ``mode`` (see the module
    docstring), with its bytes on each kind of link.

    Raises:
        ValueError: the global batch does not divide into micro-batches (:meth:`StepShape.micro_batches`).
    """
    gs = groups(layout, gpus_per_node)
    n_mb = step.micro_batches(layout)
    cb, d = step.cb, cfg.model.dim
    tokens = step.micro_batch * step.seq_len
    blocks, moe_layers = len(st.blocks), st.moe_blocks
    out: list[Collective | None] = []
    if layout.dense == "fsdp":
        gathered = st.dense_stage + (st.dense_stage - st.root_dense)  # forward, then the blocks again for backward
        out.append(_ring("FSDP2 all-gather (params)", gs["dp_shard"], n_mb * (2 * blocks + 1),
                         gathered * cb / (2 * blocks + 1), overlapped=True))
        out.append(_ring("FSDP2 reduce-scatter (grads)", gs["dp_shard"], n_mb * (blocks + 1),
                         st.dense_stage * PARAM_BYTES / (blocks + 1), overlapped=True))
        out.append(_ring("HSDP all-reduce (grad shards)", gs["dp_replicate"], n_mb * (blocks + 1),
                         st.dense_local * PARAM_BYTES / (blocks + 1), factor=2, overlapped=True))
    else:
        out.append(_ring("dense all-reduce (grads)", gs["dp"], 1, st.dense_local * PARAM_BYTES, factor=2,
                         per_microbatch=False))
    if layout.expert_mode == "ep":
        out.append(_ring("expert all-reduce (grads)", gs["expert_dp"], 1, st.expert_local * PARAM_BYTES, factor=2,
                         per_microbatch=False))
    if layout.tp > 1:
        passes = 2 + (mode == "full")  # forward, backward (, the recomputation gathers and scatters again)
        gathered_ffn = (blocks - moe_layers) + (moe_layers if layout.expert_tp else 0)
        pairs = blocks + gathered_ffn  # all-gather + reduce-scatter pairs per pass: attention, gathered FFNs
        calls = n_mb * (2 * pairs * passes + 4 * (st.has_head + st.has_embedding))
        full = tokens * d * (4 + cb) / 2  # half fp32 gathers of norm outputs, half compute-dtype scatters
        out.append(_ring("TP all-gather + reduce-scatter (sequence parallel)", gs["tp"], calls, full))
    if moe_layers:
        out += _moe_collectives(cfg, layout, st, step, mode, gs, n_mb)
    if layout.pp > 1:
        boundary = tokens / layout.tp * d * 4  # the fp32 residual stream of a micro-batch (a sequence shard)
        ends = layout.stages_per_rank == 1 and st.pp_rank in (0, layout.pp - 1)
        sends = n_mb * (1 if ends else 2) * layout.stages_per_rank  # activations forward, gradients back
        out.append(_sent("PP send/recv (activations, grads)", gs["pp"], sends, sends * boundary))
    return [c for c in out if c is not None]
