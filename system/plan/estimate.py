"""Step time and MFU of a layout from its FLOPs and communication bytes, and the ranked plan of a job.

Step time (per optimizer step; Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on
GPU Clusters Using Megatron-LM", sec. 2.2 for the bubble):

    step = (compute + exposed per-micro-batch communication + exposed FSDP2/FSSDP communication)
           x (m v + pp - 1) / (m v)  +  once-per-step all-reduces

- compute: the model FLOPs of the rank's share (``6 N_active + 12 L d S`` per token, PaLM appendix B, as
  :func:`system.train.flops.flops_per_token` counts for the trainer's MFU), plus the recomputed forward of
  the blocks under full AC (``2 N_blocks + 4 L d S`` per token), at ``compute_efficiency`` of the dense
  bf16 peak (the fraction of peak good matmuls reach; selective AC recomputes only memory-bound ops, not
  counted);
- communication (:mod:`system.plan.comm`), each link at ``link_efficiency`` of its bandwidth:
  tensor-parallel, all-to-all and pipeline transfers are on the critical path (no overlap assumed);
  FSDP2's gathers and reduce-scatters (and FSSDP's prefetched gathers) overlap the compute, except what
  exceeds it and one block's worth; the replicated-dense and expert gradient all-reduces run after the
  backward (the trainer's :func:`~system.parallel.grads.sync_gradients`), exposed;
- the bubble of each pipeline schedule run, ``m`` micro-batches (``parallel.pp_microbatches``, default the
  number of stages) on ``v`` stages per rank: ``(pp - 1) / (m v + pp - 1)`` of the time idle (the trainer runs
  one schedule per ``training.grad_accum`` step, each filling and draining the pipeline);
- MFU = model FLOPs per step / (step time x peak x world).

The slowest pipeline rank (of the first and the last) sets the step. Routing is assumed balanced.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from system.config.job import JobConfig
from system.plan import comm
from system.plan.activations import AC_MODES
from system.plan.devices import DeviceProfile
from system.plan.layouts import describe, enumerate_layouts
from system.plan.memory import RankMemory, StepShape, rank_memory
from system.train.flops import flops_per_token
from system.train.memory import ModelCensus, RankState, StateLayout, rank_states


@dataclass(frozen=True)
class Cluster:
    """The machines a plan is for, and the efficiencies assumed.

    Attributes:
        world: ranks (GPUs).
        gpus_per_node: GPUs sharing NVLink.
        device: one GPU's figures.
        memory_fraction: share of device memory the job may use (the rest: CUDA context, NCCL buffers,
            allocator fragmentation).
        compute_efficiency: fraction of the dense peak the matmuls reach.
        link_efficiency: fraction of each link's bandwidth a collective reaches.
    """

    world: int
    gpus_per_node: int
    device: DeviceProfile
    memory_fraction: float = 0.9
    compute_efficiency: float = 0.5
    link_efficiency: float = 0.8

    @property
    def usable_bytes(self) -> float:
        return self.device.memory_bytes * self.memory_fraction

    def peak_flops(self, cb: int) -> float:
        """The device's dense peak for the job's math: bf16 (``cb = 2``), else TF32."""
        return self.device.peak_flops if cb == 2 else self.device.tf32_flops


@dataclass
class StepTime:
    """Time of one step of one layout under one AC mode (seconds).

    Attributes:
        compute: FLOPs at the assumed efficiency (recomputation included).
        comm_exposed: communication not hidden behind compute.
        bubble: idle fraction of the pipeline.
        step: the step.
        mfu: model FLOPs utilisation in [0, 1].
        tokens_per_s: tokens trained per second, whole job.
        collectives: the slowest rank's collectives.
    """

    compute: float
    comm_exposed: float
    bubble: float
    step: float
    mfu: float
    tokens_per_s: float
    collectives: list = field(default_factory=list)


@dataclass
class LayoutPlan:
    """One layout: its memory under each AC mode, and the timing of the fastest mode that fits.

    Attributes:
        layout: the layout.
        memory: :class:`RankMemory` per AC mode.
        ac: the chosen mode (fits, fastest); ``None`` when no mode fits.
        time: :class:`StepTime` of ``ac`` (or of ``"full"`` when nothing fits, for reference).
    """

    layout: StateLayout
    memory: dict[str, RankMemory]
    ac: str | None
    time: StepTime

    @property
    def name(self) -> str:
        return describe(self.layout)

    @property
    def peak(self) -> float:
        """Peak bytes of the chosen mode (the smallest of the modes when none fits)."""
        return self.memory[self.ac].peak if self.ac else min(m.peak for m in self.memory.values())


@dataclass
class PlanResult:
    """Every layout considered, ranked.

    Attributes:
        fits: layouts whose chosen AC mode fits, fastest first.
        nearest: when nothing fits, the layout with the smallest peak.
        considered: candidate layouts evaluated.
        rejected: candidates left out before evaluation, by reason.
        model_flops_per_step: the model FLOPs of one step (whole job).
        tokens_per_step: tokens of one step (whole job).
        total_params, active_params: of the model (active: ``top_k`` routed experts per token).
    """

    fits: list[LayoutPlan]
    nearest: LayoutPlan | None
    considered: int
    rejected: Counter
    model_flops_per_step: float
    tokens_per_step: int
    total_params: int = 0
    active_params: int = 0


def model_flops(cfg: JobConfig, census: ModelCensus, step: StepShape) -> float:
    """Model FLOPs of one optimizer step (no recomputation): ``flops_per_token x tokens``."""
    per_token = flops_per_token(census.active_params, cfg.model.n_layers, cfg.model.dim, step.seq_len)
    return per_token * step.global_batch * step.seq_len


def recompute_flops(cfg: JobConfig, census: ModelCensus, step: StepShape) -> float:
    """FLOPs full AC adds per step: the blocks' forward again, ``2 N_blocks + 4 L d S`` per token."""
    root = sum(p.numel for p in census.params if p.block is None)
    per_token = 2 * (census.active_params - root) + 4 * cfg.model.n_layers * cfg.model.dim * step.seq_len
    return per_token * step.global_batch * step.seq_len


def step_time(cfg: JobConfig, census: ModelCensus, layout: StateLayout, step: StepShape, mode: str,
              cluster: Cluster, states: list[RankState] | None = None) -> StepTime:
    """:class:`StepTime` of ``layout`` under AC ``mode`` (see the module docstring); ``states``: its
    :func:`~system.train.memory.rank_states` when already computed."""
    peak = cluster.peak_flops(step.cb) * cluster.compute_efficiency
    intra = cluster.device.intra_node_bps * cluster.link_efficiency
    inter = cluster.device.inter_node_bps * cluster.link_efficiency
    flops = model_flops(cfg, census, step)
    work = flops + (recompute_flops(cfg, census, step) if mode == "full" else 0.0)
    compute = work / cluster.world / peak
    n_mb = step.micro_batches(layout)
    m, v = step.pipeline_microbatches(layout), layout.stages_per_rank
    stretch = (m * v + layout.pp - 1) / (m * v)  # every schedule run fills and drains the pipeline
    states = states if states is not None else rank_states(census, layout)
    worst = None
    for st in {states[0].pp_rank: states[0], states[-1].pp_rank: states[-1]}.values():
        colls = comm.step_collectives(cfg, layout, st, step, mode, cluster.gpus_per_node)
        per_mb = sum(c.seconds(intra, inter) for c in colls if not c.overlapped and c.per_microbatch)
        once = sum(c.seconds(intra, inter) for c in colls if not c.overlapped and not c.per_microbatch)
        overlapped = [c for c in colls if c.overlapped]
        hidden = sum(c.seconds(intra, inter) for c in overlapped)
        units = max(1, n_mb * (len(st.blocks) + 1))
        exposed_overlap = max(0.0, hidden - compute) + hidden / units if overlapped else 0.0
        total = (compute + per_mb + exposed_overlap) * stretch + once
        if worst is None or total > worst[0]:
            worst = (total, per_mb + once + exposed_overlap, colls)
    total, exposed, colls = worst
    tokens = step.global_batch * step.seq_len
    return StepTime(compute, exposed, (layout.pp - 1) / (m * v + layout.pp - 1), total,
                    flops / (total * cluster.peak_flops(step.cb) * cluster.world), tokens / total, colls)


def plan_layout(cfg: JobConfig, census: ModelCensus, layout: StateLayout, step: StepShape,
                cluster: Cluster, memo: dict | None = None) -> LayoutPlan:
    """Memory of ``layout`` under every AC mode, and the time of the fastest mode that fits (``memo``: see
    :func:`~system.plan.memory.rank_memory`)."""
    states = rank_states(census, layout)
    memory = rank_memory(cfg, census, layout, step, AC_MODES, states, memo)
    best: tuple[str, StepTime] | None = None
    for mode in AC_MODES:
        if memory[mode].peak <= cluster.usable_bytes:
            t = step_time(cfg, census, layout, step, mode, cluster, states)
            if best is None or t.step < best[1].step:
                best = (mode, t)
    if best is None:
        return LayoutPlan(layout, memory, None, step_time(cfg, census, layout, step, "full", cluster, states))
    return LayoutPlan(layout, memory, best[0], best[1])


def plan(cfg: JobConfig, cluster: Cluster, step: StepShape) -> PlanResult:
    """Enumerate the layouts of ``cfg`` on ``cluster`` (:func:`~system.plan.layouts.enumerate_layouts`), estimate
    each, and rank those that fit by step time.

    Raises:
        ValueError: ``model.vocab_size`` is unresolved.
    """
    census = ModelCensus.from_config(cfg)
    layouts, rejected = enumerate_layouts(cfg, cluster.world, cluster.gpus_per_node, step)
    fits, nearest, memo = [], None, {}
    for layout in layouts:
        lp = plan_layout(cfg, census, layout, step, cluster, memo)
        if lp.ac is not None:
            fits.append(lp)
        elif nearest is None or lp.peak < nearest.peak:
            nearest = lp
    fits.sort(key=lambda lp: (lp.time.step, lp.peak))
    return PlanResult(fits, None if fits else nearest, len(layouts), rejected, model_flops(cfg, census, step),
                      step.global_batch * step.seq_len, census.total_params, census.active_params)
