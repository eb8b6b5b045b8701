"""Peak memory of one rank over a training step, by category, for a layout and a step shape.

The model state (parameters, gradients, AdamW moments, working copies) comes from
:mod:`system.train.memory` (the same count ``moesys train --dry-run`` prints); activations from
:mod:`system.plan.activations`. The peak is the largest of these moments of a steady-state step (the AdamW
moments exist from the previous step; ``zero_grad(set_to_none=True)`` dropped the gradients):

- **loss backward** on the head stage: the activations of every in-flight micro-batch (1F1B: ``pp - pp_rank``
  of them on pipeline rank ``pp_rank``, Narayanan et al. 2021, sec. 2.2), the working copies, the gradients
  when earlier micro-batches of the step made them, and the loss's own backward (``[T, V]`` fp32 gradients);
- **backward of each block**, from the last: the activations of the blocks before it (and of the other
  in-flight micro-batches), the gradients of the blocks after it (all of them after the step's first
  micro-batch), the working copies, and the block's backward: its recomputation under AC, the experts'
  workspace, the routed rows' gradients, the all-to-all buffers, FSDP2's unsharded gradient and
  reduce-scatter input, and (first micro-batch) its own gradients. Within a run of same-kind blocks the total
  changes linearly, so only the run's first and last block are evaluated;
- **backward end**: every gradient, the working copies and FSDP2's gradient buffers of one block;
- **gradient synchronisation**: every gradient and the flat copy of one all-reduce bucket
  (:func:`system.parallel.grads.sync_gradients`: replicated dense gradients, or expert gradients when each
  expert shard has replicas);
- **optimizer step**: every gradient and AdamW's temporaries (``foreach=False``: two tensors the size of the
  parameter being updated, at most the largest one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from system.config.job import JobConfig
from system.plan import activations as act
from system.train.memory import ADAMW_STATES, PARAM_BYTES, ModelCensus, RankState, StateLayout, rank_states, \
    working_bytes


@dataclass(frozen=True)
class StepShape:
    """The work of one optimizer step, and the kernels it runs.

    Attributes:
        micro_batch: sequences per micro-batch of one data stream (``training.batch_size``).
        seq_len: tokens per sequence.
        global_batch: sequences per optimizer step, all data streams together.
        cb: bytes per element of the compute dtype (2: bf16 autocast, 4: fp32).
        flash: fused attention (no ``[S, S]`` probabilities kept).
        grouped_mm: experts run as ``torch._grouped_mm`` (CUDA bf16 on sm90/sm100), else the chunked kernel.
        chunk_bytes: the chunked kernel's chunk (4 MiB on CPU, ``None`` on CUDA: one chunk per expert).
        pp_microbatches: with pipeline parallelism, micro-batches per schedule run (``parallel.pp_microbatches``;
            0: the number of stages, the trainer's default). Each is ``micro_batch`` sequences: the trainer's
            ``training.batch_size`` is then ``pp_microbatches x micro_batch``, one schedule run per
            ``training.grad_accum`` step.
        pp_schedule: ``parallel.pp_schedule`` (GPipe keeps every micro-batch of a run in flight, the 1F1B
            family at most ``pp - pp_rank``).
    """

    micro_batch: int
    seq_len: int
    global_batch: int
    cb: int = 2
    flash: bool = True
    grouped_mm: bool = True
    chunk_bytes: int | None = None
    pp_microbatches: int = 0
    pp_schedule: str = "1F1B"

    def pipeline_microbatches(self, layout: StateLayout) -> int:
        """Micro-batches per pipeline schedule run (1 without pipeline parallelism)."""
        if layout.pp == 1:
            return 1
        return self.pp_microbatches or layout.pp * layout.stages_per_rank

    def in_flight(self, layout: StateLayout, pp_rank: int) -> int:
        """Micro-batches whose activations pipeline rank ``pp_rank`` holds at once (Narayanan et al. 2021,
        sec. 2.2: 1F1B warms up with ``pp - pp_rank`` forwards; GPipe runs every forward first)."""
        m = self.pipeline_microbatches(layout)
        if layout.pp == 1:
            return 1
        return m if self.pp_schedule == "GPipe" else min(m, layout.pp - pp_rank)

    def micro_batches(self, layout: StateLayout) -> int:
        """Micro-batches per step of each data stream: ``global_batch / (dp_replicate x dp_shard x micro_batch)``.

        Raises:
            ValueError: the global batch does not divide into whole micro-batches of every data stream.
        """
        per = layout.dp_replicate * layout.dp_shard * self.micro_batch
        if self.global_batch % per:
            raise ValueError(f"global batch of {self.global_batch} sequences does not divide by dp_replicate x "
                             f"dp_shard x training.batch_size = {per}")
        return self.global_batch // per


@dataclass
class RankMemory:
    """One rank's memory under one activation-checkpointing mode (bytes).

    Attributes:
        mode: ``none``, ``full`` or ``selective``.
        pp_rank: the pipeline rank with the highest peak (the one described).
        params, grads, optimizer: fp32 parameters, gradients and AdamW moments held.
        buffers: module buffers (the rotary table).
        working: compute copies of weights (bf16 casts, FSDP2's gathered units, FSSDP's gathered rows).
        activations: what the in-flight micro-batches keep for backward, plus the block recomputed under AC.
        a2a: one MoE layer's all-to-all buffers (send and receive, fp32 rows; 0 without expert parallelism).
        backward: one block's backward: its recomputation under AC, the experts' workspace, the gradients of
            the routed rows, the all-to-all buffers, and its parameters' gradients on the first micro-batch.
        peak: the step's peak (the largest moment, see the module docstring): what must fit the device.
        phase: the moment of the peak.
        phases: every moment's total.
        grads_at_peak: the gradients that exist at the peak (all of them after the first micro-batch of a step;
            during the first one's backward, those of the blocks done so far).
    """

    mode: str
    pp_rank: int
    params: float
    grads: float
    optimizer: float
    buffers: float
    working: float
    activations: float
    a2a: float
    backward: float
    peak: float
    phase: str
    phases: dict = field(default_factory=dict)
    grads_at_peak: float = 0.0

    def as_dict(self) -> dict:
        """JSON-ready fields (bytes as integers)."""
        out = {k: (int(v) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "phases"}
        out["phases"] = {k: int(v) for k, v in self.phases.items()}
        return out


def buffer_bytes(cfg: JobConfig) -> float:
    """Module buffers: the fp32 rotary table ``[max_seq_len, Dr/2, 2]`` (and each router's fp32 expert bias)."""
    rope = cfg.model.max_seq_len * cfg.model.rope_dim() // 2 * 2 * 4
    return rope + (cfg.model.n_layers * cfg.moe.num_experts * 4 if cfg.moe.load_balance == "bias" else 0)


def act_shape(step: StepShape, layout: StateLayout) -> act.ActShape:
    """The :class:`~system.plan.activations.ActShape` of one micro-batch on one rank of ``layout``."""
    ep = layout.ep if layout.expert_mode == "ep" else layout.stage_ranks
    return act.ActShape(tokens=step.micro_batch * step.seq_len, seq_len=step.seq_len, tp=layout.tp,
                        routed_split=not layout.expert_tp, ep=ep, etp=layout.etp, cb=step.cb, flash=step.flash,
                        grouped_mm=step.grouped_mm, chunk_bytes=step.chunk_bytes)


def _run_ends(kinds: list[bool]) -> list[int]:
    """Indices of the first and last block of each run of same-kind blocks (the backward walk's extremes:
    within a run the live bytes change linearly with the block)."""
    ends = set()
    for i, k in enumerate(kinds):
        if i == 0 or kinds[i - 1] != k:
            ends.add(i)
        if i == len(kinds) - 1 or kinds[i + 1] != k:
            ends.add(i)
    return sorted(ends)


def _stage_memory(cfg: JobConfig, layout: StateLayout, step: StepShape, st: RankState, mode: str, n_mb: int,
                  a: act.ActShape, kept: dict, recompute: dict, moe_blocks: set) -> RankMemory:
    kinds = [b in moe_blocks for b in st.blocks]
    emb = act.rows_bytes(act.embedding_rows(a), a, "none") if st.has_embedding else 0.0
    head = act.rows_bytes(act.head_rows(cfg.model, a, cfg.model.vocab_size), a, "none") if st.has_head else 0.0
    micro = emb + sum(kept[k] for k in kinds) + head  # what one micro-batch keeps on this stage
    in_flight = step.in_flight(layout, st.pp_rank)
    others = (in_flight - 1) * micro  # the other in-flight micro-batches (1F1B)

    params = st.params * PARAM_BYTES
    grads = params
    optimizer = params * ADAMW_STATES
    buffers = buffer_bytes(cfg)
    working = working_bytes(st, layout, step.cb, cfg.fssdp.memory_budget, cfg.fssdp.rematerialize, mode)
    fsdp = layout.dense == "fsdp" and layout.dp_shard > 1
    fsdp_grad = 2 * st.max_block_dense * PARAM_BYTES if fsdp else 0  # one block's unsharded grad + RS input
    dense_block = -(-st.max_block_dense // layout.dp_shard) if fsdp else st.max_block_dense
    # A block's gradients as its backward makes them (FSSDP's row gradients are in the working copies until
    # its reduce-scatter hands them to the owners after backward).
    expert_block = st.expert_local // st.moe_blocks if st.moe_blocks and layout.expert_mode == "ep" else 0
    block_grads = {True: (dense_block + expert_block) * PARAM_BYTES, False: dense_block * PARAM_BYTES}
    a2a = act.exchange_bytes(cfg.moe, cfg.model, a) if st.moe_blocks else 0.0
    backward = {k: act.block_backward_bytes(cfg.moe, cfg.model, a, k) + recompute[k] + fsdp_grad
                + (block_grads[k] if n_mb == 1 else 0) for k in set(kinds)}

    # Backward, block by block from the last: earlier blocks' activations are still kept, later blocks'
    # gradients exist (all gradients after the step's first micro-batch).
    early = grads if n_mb > 1 else 0.0
    phases = {"loss backward": others + micro + working + early + (
        act.loss_backward_bytes(a, cfg.model.vocab_size) if st.has_head else 0.0)}
    grads_part = {"loss backward": early}
    head_grads = st.root_local * PARAM_BYTES if st.has_head else 0
    for i in _run_ends(kinds):
        k = kinds[i]
        done = grads if n_mb > 1 else head_grads + sum(block_grads[j] for j in kinds[i + 1:])
        live = others + emb + sum(kept[j] for j in kinds[: i + 1]) + done + working + backward[k]
        name = f"backward of block {st.blocks[i]}"
        phases[name] = live
        grads_part[name] = done + (block_grads[k] if n_mb == 1 else 0)
    phases["backward end"] = grads + working + fsdp_grad
    flat = 0.0  # sync_gradients' flat bucket copies, one group at a time
    if layout.dense == "replicate" and layout.dp_replicate * layout.dp_shard > 1:
        flat = st.dense_local * PARAM_BYTES
    if layout.expert_mode == "ep" and layout.expert_dp > 1:
        flat = max(flat, st.expert_local * PARAM_BYTES)
    phases["gradient sync"] = grads + flat
    phases["optimizer step"] = grads + 2 * st.largest_local * PARAM_BYTES
    phase = max(phases, key=phases.get)
    base = params + optimizer + buffers
    return RankMemory(mode, st.pp_rank, params, grads, optimizer, buffers, working,
                      others + micro + max((recompute[k] for k in set(kinds)), default=0.0), a2a,
                      max(backward.values(), default=0.0), base + phases[phase], phase,
                      {key: base + v for key, v in phases.items()}, grads_part.get(phase, grads))


def rank_memory(cfg: JobConfig, census: ModelCensus, layout: StateLayout, step: StepShape,
                modes: tuple[str, ...] = act.AC_MODES, states: list[RankState] | None = None,
                memo: dict | None = None) -> dict[str, RankMemory]:
    """The peak memory of the fullest rank of ``layout`` under each activation-checkpointing mode of ``modes``
    (a name or a tuple of names), by mode.

    Only the first and the last pipeline rank are candidates: the first keeps the most micro-batches in
    flight and the embedding, the last the head and the loss; the ranks between hold the same blocks with less.

    Args:
        states: :func:`~system.train.memory.rank_states` of ``layout`` when already computed.
        memo: a dict the caller reuses across the layouts of one config: a block's bytes for an
            :class:`~system.plan.activations.ActShape` already seen are not computed again.

    Raises:
        ValueError: the global batch does not divide into micro-batches, or the blocks into pipeline stages.
    """
    if isinstance(modes, str):
        modes = (modes,)
    n_mb = step.micro_batches(layout)
    states = states if states is not None else rank_states(census, layout)
    ends = [states[0]] + ([states[-1]] if len(states) > 1 else [])
    a = act_shape(step, layout)
    memo = {} if memo is None else memo
    if a not in memo:
        rows = {kind: act.block_rows(cfg.model, cfg.moe, a, kind) for kind in (True, False)}
        memo[a] = {mode: ({k: act.rows_bytes(rows[k], a, mode) for k in rows},  # one block, one micro-batch
                          {k: act.recompute_bytes(rows[k], a, mode) for k in rows}) for mode in act.AC_MODES}
    moe_blocks = set(census.moe_blocks)
    out = {}
    for mode in modes:
        kept, recompute = memo[a][mode]
        out[mode] = max((_stage_memory(cfg, layout, step, st, mode, n_mb, a, kept, recompute, moe_blocks)
                         for st in ends), key=lambda m: m.peak)
    return out
