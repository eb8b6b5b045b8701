"""The parallel layouts ``moesys plan`` considers for a job on a cluster, and why the others are left out.

A layout is a :class:`~system.train.memory.StateLayout`: ``pp x dp_replicate x dp_shard x tp`` over the world,
expert parallelism ``ep`` folded onto ``dp_shard x tp`` (onto ``dp_shard`` with ``expert_tp``), or FSSDP, and
dense parameters replicated or FSDP2-sharded. The candidates (:func:`enumerate_layouts`):

- ``tp`` divides the GPUs of a node (a tensor-parallel group stays on NVLink);
- ``pp`` divides the world and the blocks (pipeline schedule and stages per rank from the config);
- ``dense = "replicate"`` with ``dp_replicate = 1`` (the split of the data ranks does not matter then);
  ``dense = "fsdp"`` with every ``dp_replicate`` leaving ``dp_shard >= 2`` (HSDP);
- ``expert_mode = "ep"`` with every ``ep`` dividing ``moe.num_experts`` and the ranks it folds onto, with and
  without ``expert_tp``; ``expert_mode = "fssdp"`` with ``ep = 1``.

Each is checked by :meth:`~system.distributed.ParallelDims.from_config` (the degrees against the world) and
:func:`check_layout` (what the model's shapes and the batch need).
"""

from __future__ import annotations

import re
from collections import Counter

from system.config.job import JobConfig
from system.distributed.parallel_dims import ParallelDims
from system.plan.memory import StepShape
from system.train.memory import StateLayout


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(cfg: JobConfig, layout: StateLayout, step: StepShape) -> str | None:
    """Why ``layout`` cannot run ``cfg`` (one line naming the config key), or ``None`` when it can."""
    m, moe = cfg.model, cfg.moe
    try:
        dims = ParallelDims.from_config(-1, layout.ep, layout.world_size, pp=layout.pp,
                                        dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard, tp=layout.tp,
                                        expert_tp=layout.expert_tp)
        if layout.expert_mode == "ep":
            dims.check_experts(moe.num_experts)
    except ValueError as e:
        return str(e)
    tp = layout.tp
    if layout.expert_mode == "fssdp" and (layout.ep != 1 or layout.expert_tp):
        return "parallel.expert_mode='fssdp' needs parallel.ep=1 and no parallel.expert_tp"
    if tp > 1:
        kv = m.n_heads if m.attention_type == "mla" else (m.n_kv_heads or m.n_heads)
        for key, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", kv), ("model.vocab_size", m.vocab_size)):
            if value % tp:
                return f"{key}={value} does not divide by parallel.tp={tp}"
        if moe.first_dense_layers or moe.interleave > 1:
            if m.ffn_dim % tp:
                return f"model.ffn_dim={m.ffn_dim} does not divide by parallel.tp={tp}"
        if moe.shared_hidden_dim() % tp:
            return f"the shared experts' hidden size {moe.shared_hidden_dim()} does not divide by parallel.tp={tp}"
        if layout.expert_tp and (moe.expert_type != "ffn" or moe.expert_dim % tp):
            return f"parallel.expert_tp needs SwiGLU experts with moe.expert_dim divisible by parallel.tp={tp}"
    stages = layout.pp * layout.stages_per_rank
    if m.n_layers % stages:
        return f"model.n_layers={m.n_layers} does not divide by {stages} pipeline stages"
    if layout.pp > 1 and m.tie_embeddings:
        return ("model.tie_embeddings shares the embedding with the head, which pipeline parallelism puts on "
                "another stage")
    try:
        n_mb = step.micro_batches(layout)
    except ValueError as e:
        return str(e)
    if layout.pp > 1:
        m = step.pipeline_microbatches(layout)
        if m < layout.pp:
            return f"parallel.pp_microbatches={m} cannot fill parallel.pp={layout.pp} pipeline ranks"
        if n_mb % m:
            return (f"the global batch gives {n_mb} micro-batches per data stream, not a multiple of the "
                    f"{m} of one pipeline schedule run (parallel.pp_microbatches)")
    return None


def enumerate_layouts(cfg: JobConfig, world: int, gpus_per_node: int, step: StepShape
                      ) -> tuple[list[StateLayout], Counter]:
    """Every candidate layout of ``cfg`` on ``world`` ranks that :func:`check_layout` accepts, and a count of
    the rejected ones by reason (the reason's text up to its first digit, so that one rule counts once)."""
    spr = cfg.parallel.stages_per_rank()
    v_schedule = cfg.parallel.pp_schedule == "ZBVZeroBubble"
    out: list[StateLayout] = []
    rejected: Counter = Counter()
    for tp in divisors(gpus_per_node):
        for pp in divisors(world // tp) if world % tp == 0 else []:
            if pp > cfg.model.n_layers:
                continue
            data = world // (pp * tp)
            dense_choices = [("replicate", 1)] + [("fsdp", r) for r in divisors(data) if data // r >= 2]
            for dense, dpr in dense_choices:
                dps = data // dpr
                fold = dps * tp
                expert_choices = [("fssdp", 1, False)]
                for ep in divisors(cfg.moe.num_experts):
                    if fold % ep == 0:
                        expert_choices.append(("ep", ep, False))
                    if tp > 1 and dps % ep == 0:
                        expert_choices.append(("ep", ep, True))
                for mode, ep, etp in expert_choices:
                    layout = StateLayout(world_size=world, ep=ep, expert_mode=mode, dense=dense, pp=pp,
                                         dp_replicate=dpr, dp_shard=dps, tp=tp, expert_tp=etp,
                                         stages_per_rank=spr if pp > 1 else 1, v_schedule=v_schedule and pp > 1)
                    reason = check_layout(cfg, layout, step)
                    if reason is None:
                        out.append(layout)
                    else:
                        rejected[_reason_key(reason)] += 1
    return out, rejected


def _reason_key(reason: str) -> str:
    """A rejection reason without its numbers (``model.n_heads=... does not divide by parallel.tp=...``)."""
    return re.sub(r"=?-?\d[\d.]*", "", reason).replace("  ", " ").strip()


def describe(layout: StateLayout) -> str:
    """A short name of a layout: ``pp2 dpr1 dps64 tp8 | ep8 (expert tp) | fsdp``."""
    experts = "fssdp" if layout.expert_mode == "fssdp" else f"ep{layout.ep}" + ("+etp" if layout.expert_tp else "")
    return (f"pp{layout.pp} dpr{layout.dp_replicate} dps{layout.dp_shard} tp{layout.tp} {experts} "
            f"{'fsdp' if layout.dense == 'fsdp' else 'repl'}")
