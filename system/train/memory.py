"""How much of a device a training job's model state takes, from the config alone (``moesys train --dry-run``,
``moesys plan``).

The model is built once on the ``meta`` device (shapes only, nothing allocated), so the count holds for
any size: :class:`ModelCensus` lists every parameter with its role (dense or routed expert), the block
it belongs to and the dimension tensor parallelism splits. :func:`rank_state` then places each parameter
as the parallelisms do on a ``pp x dp_replicate x dp_shard x tp`` grid (:class:`~system.distributed.ParallelDims`):

- tensor parallelism (TorchTitan's plan): the embedding and output head split over the vocabulary,
  ``wq``/``wk``/``wv`` (MLA: ``wq``/``wq_b``/``wkv_b``), dense FFN ``w1``/``w3`` column-wise (dim 0 of
  ``[out, in]``), ``wo`` and ``w2`` row-wise (dim 1); norms, routers, shared experts and MLA's
  down-projections replicated (:mod:`system.parallel.tp`); routed experts split within each expert (hidden
  dim ``f``) only with ``parallel.expert_tp``;
- pipeline parallelism: blocks split evenly over the stages, the embedding on the first stage and the
  final norm and head on the last; the fullest stage is reported;
- routed experts: ``E / ep`` per rank (replicated over the expert ``dp``) under ``expert_mode = "ep"``;
  ``ceil(E / ranks of a stage)`` owned experts under FSSDP (owners may move, never beyond that, Hecate
  Algorithm 2);
- dense parameters: whole on every rank (``dense = "replicate"``) or ``ceil(dim0 / dp_shard)`` rows of the
  tensor-parallel shard (FSDP2 over ``dp_shard``; HSDP replicates over ``dp_replicate``).

:func:`estimate_memory` applies that to the job's own layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from system.config.job import JobConfig

PARAM_BYTES = 4
"""The trainer keeps fp32 parameters whatever ``training.mixed_precision`` says: it builds the model in
torch's default dtype and computes in bf16 through autocast (FSDP2 gathers bf16 copies). Gradients have
the parameters' dtype, and AdamW's two moments (``exp_avg``, ``exp_avg_sq``) too: 2 x fp32."""
ADAMW_STATES = 2

# Tensor-parallel split of a dense parameter, by the end of its name: dim 0 (column-wise / vocabulary)
# or dim 1 (row-wise). Everything else is replicated over the tp ranks.
_TP_COLWISE = ("tok_embeddings.weight", "output.weight", "attention.wq.weight", "attention.wq.bias",
               "attention.wk.weight", "attention.wk.bias", "attention.wv.weight", "attention.wv.bias",
               "attention.wq_b.weight", "attention.wkv_b.weight", "mlp.w1.weight", "mlp.w3.weight")
_TP_ROWWISE = ("attention.wo.weight", "mlp.w2.weight")
# Routed SwiGLU experts under expert_tp: w1/w3 [E, d, f] split on f (dim 2), w2 [E, f, d] on f (dim 1).
_EXPERT_TP = {"w1": 2, "w3": 2, "w2": 1}


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of the single-device model.

    Attributes:
        name: its fully qualified name.
        shape: its full shape (routed experts: ``[E, ...]``).
        expert: a routed-expert tensor (an :class:`~system.moe.experts.ExpertModule` parameter).
        block: index of its transformer block; ``None`` for the root (embedding, final norm, head).
        tp_dim: the dimension tensor parallelism splits (routed experts: under ``expert_tp``); ``None``: replicated.
    """

    name: str
    shape: tuple[int, ...]
    expert: bool
    block: int | None
    tp_dim: int | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelCensus:
    """Every parameter of a job's model, counted on the ``meta`` device (:meth:`from_config`).

    Attributes:
        params: one :class:`ParamInfo` per parameter, in ``named_parameters()`` order.
        n_layers: transformer blocks.
        moe_blocks: indices of the blocks with a MoE FFN.
        num_experts: routed experts per MoE layer.
        total_params, active_params: of the whole model (active: ``top_k`` routed experts per token).
        per_expert: parameters of one routed expert of one layer (P).
    """

    params: list[ParamInfo]
    n_layers: int
    moe_blocks: list[int]
    num_experts: int
    total_params: int
    active_params: int
    per_expert: int
    by_block: dict = field(default_factory=dict, repr=False)
    root: dict = field(default_factory=dict, repr=False)
    signature: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        """Group the parameters by block (and the root's by part) once; blocks with the same dense shapes
        share a signature, so a layout counts each structure once."""
        self.by_block, self.root = {}, {"embedding": [], "head": []}
        for p in self.params:
            if p.block is not None:
                self.by_block.setdefault(p.block, []).append(p)
            else:
                self.root["embedding" if p.name.startswith("tok_embeddings") else "head"].append(p)
        self.signature = {b: tuple((p.shape, p.tp_dim) for p in ps if not p.expert) for b, ps in self.by_block.items()}

    @classmethod
    def from_config(cls, cfg: JobConfig) -> "ModelCensus":
        """Build the model of ``cfg`` on the ``meta`` device and list its parameters.

        Raises:
            ValueError: ``model.vocab_size`` is 0 (resolve it from the tokenizer first).
        """
        from system.models.model import MoETransformer
        from system.parallel.params import split_parameters

        if cfg.model.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (the tokenizer's) before estimating memory")
        with torch.device("meta"):
            model = MoETransformer(cfg.model, cfg.moe)
        total, active = model.num_params()
        experts = {id(t) for t in split_parameters(model).experts}
        params = []
        for name, t in model.named_parameters():
            block = int(name.split(".")[1]) if name.startswith("layers.") else None
            is_expert = id(t) in experts
            if is_expert:
                tp_dim = _EXPERT_TP.get(name.rsplit(".", 1)[-1]) if cfg.moe.expert_type == "ffn" else None
            else:
                tp_dim = 0 if name.endswith(_TP_COLWISE) else 1 if name.endswith(_TP_ROWWISE) else None
            params.append(ParamInfo(name, tuple(t.shape), is_expert, block, tp_dim))
        moe_blocks = [i for i, b in enumerate(model.layers) if b.moe is not None]
        expert_total = sum(p.numel for p in params if p.expert)
        per_expert = expert_total // (cfg.moe.num_experts * len(moe_blocks)) if moe_blocks else 0
        return cls(params, cfg.model.n_layers, moe_blocks, cfg.moe.num_experts, total, active, per_expert)

    @property
    def expert_params(self) -> int:
        """Routed-expert parameters of the whole model."""
        return sum(p.numel for p in self.params if p.expert)


def stage_blocks(n_layers: int, pp: int, stages_per_rank: int = 1, pp_rank: int = 0,
                 v_schedule: bool = False) -> list[int]:
    """Blocks held by pipeline rank ``pp_rank``: ``n_layers`` split evenly into ``pp * stages_per_rank``
    stages of consecutive blocks; stage ``s`` lives on rank ``s % pp`` (looped schedules) or, for a V
    schedule (ZBVZeroBubble), on ``s`` for the first ``pp`` stages and ``2 pp - 1 - s`` after.

    Raises:
        ValueError: ``n_layers`` does not divide by ``pp * stages_per_rank``.
    """
    stages = pp * stages_per_rank
    if n_layers % stages:
        raise ValueError(f"model.n_layers={n_layers} does not divide by parallel.pp={pp} x {stages_per_rank} "
                         f"stage(s) per rank = {stages} stages")
    per = n_layers // stages
    out = []
    for s in range(stages):
        rank = (s if s < pp else 2 * pp - 1 - s) if v_schedule else s % pp
        if rank == pp_rank:
            out.extend(range(s * per, (s + 1) * per))
    return out


def stage_ranks_of_root(pp: int, stages_per_rank: int = 1, v_schedule: bool = False) -> tuple[int, int]:
    """Pipeline ranks holding the embedding (first stage) and the final norm and head (last stage)."""
    last = pp * stages_per_rank - 1
    return 0, ((last if last < pp else 2 * pp - 1 - last) if v_schedule else last % pp)


@dataclass(frozen=True)
class StateLayout:
    """How a layout places parameters: degrees of the ``pp x dp_replicate x dp_shard x tp`` grid and the modes.

    Attributes:
        world_size, pp, dp_replicate, dp_shard, tp: the grid (``pp * dp_replicate * dp_shard * tp = world_size``).
        ep: expert-parallel degree; ``expert_tp``: experts split within each expert over ``tp``.
        expert_mode: ``"ep"`` or ``"fssdp"``; ``dense``: ``"replicate"`` or ``"fsdp"``.
        stages_per_rank: pipeline stages per pp rank; ``v_schedule``: a V-shaped schedule (ZBVZeroBubble).
    """

    world_size: int
    ep: int = 1
    expert_mode: str = "ep"
    dense: str = "replicate"
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    expert_tp: bool = False
    stages_per_rank: int = 1
    v_schedule: bool = False

    def __post_init__(self) -> None:
        if self.dp_shard == -1:
            object.__setattr__(self, "dp_shard", self.world_size // (self.pp * self.dp_replicate * self.tp))

    @property
    def etp(self) -> int:
        """Expert tensor-parallel degree: ``tp`` with ``expert_tp``, else 1."""
        return self.tp if self.expert_tp else 1

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert shard (the expert mesh's ``dp``)."""
        return self.world_size // (self.pp * self.ep * self.etp)

    @property
    def stage_ranks(self) -> int:
        """Ranks of one pipeline stage."""
        return self.world_size // self.pp


@dataclass(frozen=True)
class RankState:
    """Parameters held by the fullest rank (its pipeline stage) under a :class:`StateLayout`.

    Attributes:
        pp_rank: the pipeline rank counted (the one holding the most parameters).
        blocks: its transformer blocks; ``moe_blocks``: how many of them are MoE blocks.
        has_embedding, has_head: whether it holds the embedding / the final norm and head.
        dense_local: dense parameters it holds (after TP and FSDP2 sharding).
        dense_stage: dense parameters of its stage after TP, before FSDP2 (what FSDP2 gathers, what a
            replicated all-reduce moves).
        root_dense: of those, the root's (embedding, norm, head) on this stage.
        max_block_dense: the largest block's dense parameters after TP (one FSDP2 unit).
        experts_per_rank: routed experts per MoE layer held here.
        per_expert: parameters of one expert of one layer on this rank (after expert TP).
        expert_local: routed-expert parameters held here (all its MoE layers).
        largest_local: elements of the largest tensor held here (AdamW's per-tensor temporaries).
        root_local: of ``dense_local``, the root's (embedding, norm, head).
    """

    pp_rank: int
    blocks: tuple[int, ...]
    moe_blocks: int
    has_embedding: bool
    has_head: bool
    dense_local: int
    dense_stage: int
    root_dense: int
    max_block_dense: int
    experts_per_rank: int
    per_expert: int
    expert_local: int
    largest_local: int = 0
    root_local: int = 0

    @property
    def params(self) -> int:
        return self.dense_local + self.expert_local


def _split(shape: tuple[int, ...], dim: int | None, ways: int) -> tuple[int, ...]:
    """``shape`` with ``dim`` split ``ways`` ways (the largest, first shard: ``ceil``)."""
    if dim is None or ways == 1:
        return shape
    out = list(shape)
    out[dim] = math.ceil(out[dim] / ways)
    return tuple(out)


def _dense_counts(params: list[ParamInfo], layout: StateLayout) -> tuple[int, int, int]:
    """``(after TP, after TP and FSDP2, largest local tensor)`` element counts of dense ``params``."""
    stage = local = largest = 0
    for p in params:
        shape = _split(p.shape, p.tp_dim, layout.tp)
        n = math.prod(shape)
        stage += n
        if layout.dense == "fsdp" and shape:
            n = math.ceil(shape[0] / layout.dp_shard) * (n // shape[0])
        local += n
        largest = max(largest, n)
    return stage, local, largest


def rank_states(census: ModelCensus, layout: StateLayout) -> list[RankState]:
    """Place every parameter of ``census`` as ``layout`` does and count each pipeline rank (index = pp rank).

    Uneven splits are counted for the first (largest) shard: ``ceil``. Blocks of the same structure are
    counted once.

    Raises:
        ValueError: ``model.n_layers`` does not divide by the pipeline stages.
    """
    moe = set(census.moe_blocks)
    per_expert = largest_expert = 0  # one expert of one layer, after expert TP
    for p in census.by_block.get(census.moe_blocks[0], []) if census.moe_blocks else []:
        if p.expert:
            inner = None if p.tp_dim is None else p.tp_dim - 1
            n = math.prod(_split(p.shape[1:], inner, layout.etp))
            per_expert += n
            largest_expert = max(largest_expert, n)
    if layout.expert_mode == "ep":
        experts_per_rank = census.num_experts // layout.ep
        largest_expert *= experts_per_rank
    else:  # FSSDP keeps one flat [n_owned, P] buffer per layer
        experts_per_rank = math.ceil(census.num_experts / layout.stage_ranks)
        largest_expert = experts_per_rank * per_expert
    cache: dict[tuple, tuple[int, int, int]] = {}
    for b, sig in census.signature.items():
        if sig not in cache:
            cache[sig] = _dense_counts([p for p in census.by_block[b] if not p.expert], layout)
    root = {part: _dense_counts(ps, layout) for part, ps in census.root.items()}

    first, last = stage_ranks_of_root(layout.pp, layout.stages_per_rank, layout.v_schedule)
    out = []
    for pp_rank in range(layout.pp):
        blocks = tuple(stage_blocks(census.n_layers, layout.pp, layout.stages_per_rank, pp_rank, layout.v_schedule))
        emb, head = pp_rank == first, pp_rank == last
        dense_stage = dense_local = largest = root_stage = root_local = max_block = 0
        for part, held in (("embedding", emb), ("head", head)):
            if held:
                s, loc, big = root[part]
                dense_stage, dense_local, root_stage, root_local = dense_stage + s, dense_local + loc, root_stage + s, \
                    root_local + loc
                largest = max(largest, big)
        for b in blocks:
            s, loc, big = cache[census.signature[b]]
            dense_stage, dense_local, largest, max_block = dense_stage + s, dense_local + loc, max(largest, big), \
                max(max_block, s)
        n_moe = sum(1 for b in blocks if b in moe)
        if n_moe:
            largest = max(largest, largest_expert)
        out.append(RankState(pp_rank, blocks, n_moe, emb, head, dense_local, dense_stage, root_stage, max_block,
                             experts_per_rank, per_expert, experts_per_rank * per_expert * n_moe, largest, root_local))
    return out


def rank_state(census: ModelCensus, layout: StateLayout) -> RankState:
    """The :func:`rank_states` entry of the pipeline rank holding the most parameters."""
    return max(rank_states(census, layout), key=lambda s: s.params)


@dataclass
class MemoryEstimate:
    """Per-rank bytes of one job's model state (the fullest rank; activations not included).

    Attributes:
        world_size, dp, ep: the mesh (``pp x dp x ep x etp = world_size``; ``dp`` replicates each expert shard).
        expert_mode, dense: ``parallel.expert_mode`` and ``parallel.dense``.
        compute_dtype: ``"bf16"`` under mixed precision, else ``"fp32"``.
        total_params, active_params: of the whole model (active: ``top_k`` routed experts per token).
        dense_params, expert_params: the whole model's dense and routed-expert parameters.
        experts_per_rank: routed experts per MoE layer on the fullest rank.
        rank_params: parameters held by the fullest rank.
        param_bytes, grad_bytes, optimizer_bytes: its parameters, gradients and AdamW state.
        working_bytes: copies the step keeps besides the state, roughly: under bf16 the cast weights
            saved for backward (replicated dense, EP experts); FSDP2's gathered root and two blocks;
            FSSDP's gathered expert rows (owned + ``fssdp.memory_budget`` per MoE layer, every layer
            until backward, one with ``fssdp.rematerialize``) and one layer's row gradients.
        pp, dp_replicate, dp_shard, tp, expert_tp: the rest of the grid (1, 1, world, 1, False: EP x FSDP2 only).
        state: the :class:`RankState` counted.
    """

    world_size: int
    dp: int
    ep: int
    expert_mode: str
    dense: str
    compute_dtype: str
    total_params: int
    active_params: int
    dense_params: int
    expert_params: int
    experts_per_rank: int
    rank_params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    working_bytes: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 0
    tp: int = 1
    expert_tp: bool = False
    state: RankState | None = None

    @property
    def total_bytes(self) -> int:
        """Parameters + gradients + optimizer state + working copies of the fullest rank."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.working_bytes

    def describe(self) -> list[str]:
        """The lines ``moesys train --dry-run`` prints."""
        experts = (f"experts: EP over ep={self.ep} ({self.experts_per_rank} per rank and MoE layer)"
                   if self.expert_mode == "ep" else
                   f"experts: FSSDP, each owned by one of {self.world_size // self.pp} ranks (up to "
                   f"{self.experts_per_rank} per rank and MoE layer)")
        shard = self.dp_shard or self.world_size
        dense = (f"FSDP2 over {shard} ranks" + (f" x {self.dp_replicate} replicas" if self.dp_replicate > 1 else "")
                 if self.dense == "fsdp" else "replicated")
        if self.pp == 1 and self.tp == 1 and self.dp_replicate == 1:
            mesh = f"mesh: world size {self.world_size} = dp {self.dp} x ep {self.ep}"
        else:
            mesh = (f"mesh: world size {self.world_size} = pp {self.pp} x dp_replicate {self.dp_replicate} x dp_shard "
                    f"{shard} x tp {self.tp} (expert mesh: dp {self.dp} x ep {self.ep}"
                    + (f" x expert tp {self.tp}" if self.expert_tp else "") + ")")
        return [
            f"{mesh}; {experts}; dense: {dense}",
            f"parameters: {_count(self.total_params)} total, {_count(self.active_params)} active (dense "
            f"{_count(self.dense_params)}, experts {_count(self.expert_params)}); {_count(self.rank_params)} on the "
            f"fullest rank",
            f"memory per rank: params {_gb(self.param_bytes)} (fp32) + grads {_gb(self.grad_bytes)} (fp32) + AdamW "
            f"state {_gb(self.optimizer_bytes)} (2 x fp32) + working copies {_gb(self.working_bytes)} "
            f"({self.compute_dtype}) = {_gb(self.total_bytes)} ({self.total_bytes} bytes); activations not included",
        ]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def compute_bytes(mixed_precision: str, cuda: bool) -> int:
    """Bytes per element of the compute copies: 2 (bf16) under ``mixed_precision = "bf16"``, or ``"auto"``
    on CUDA (the trainer's rule), else 4."""
    return 2 if mixed_precision == "bf16" or (mixed_precision == "auto" and cuda) else 4


def _compute_bytes(cfg: JobConfig) -> int:
    device = cfg.parallel.device
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return compute_bytes(cfg.training.mixed_precision, cuda)


def working_bytes(state: RankState, layout: StateLayout, cb: int, fssdp_memory_budget: int = 0,
                  fssdp_rematerialize: bool = False, activation_checkpoint: str = "none") -> int:
    """Bytes of the copies a step keeps besides the model state (see :class:`MemoryEstimate`).

    Under bf16 autocast the cast weights are saved for backward; with activation checkpointing a block's
    saved tensors are dropped after its forward, so only the root's casts and one block's (the one being
    recomputed) are alive at once.

    Args:
        state: the rank counted.
        layout: its layout.
        cb: bytes per element of the compute dtype (2 or 4).
        fssdp_memory_budget, fssdp_rematerialize: ``fssdp.memory_budget`` and ``fssdp.rematerialize``.
        activation_checkpoint: ``training.activation_checkpoint``.
    """
    working = 0
    cast = cb < PARAM_BYTES
    one_block = activation_checkpoint != "none" and state.blocks
    if layout.dense == "fsdp" and layout.dp_shard > 1:  # gathered root and two blocks (current + prefetched)
        working += (state.root_dense + 2 * state.max_block_dense) * cb
    elif cast:  # autocast's bf16 copies of the replicated weights, saved for backward
        working += (state.root_local + state.max_block_dense if one_block else state.dense_local) * cb
    if layout.expert_mode == "ep":
        if cast:
            working += (state.expert_local // max(state.moe_blocks, 1) if one_block else state.expert_local) * cb
    elif state.moe_blocks:  # gathered rows (+ their bf16 cast) kept until backward, and one layer's row gradients
        kept = 1 if fssdp_rematerialize else state.moe_blocks
        rows = (state.experts_per_rank + fssdp_memory_budget) * state.per_expert
        working += rows * (PARAM_BYTES + (cb if cast else 0)) * kept + rows * PARAM_BYTES
    return working


def estimate_model_state(census: ModelCensus, layout: StateLayout, cb: int, fssdp_memory_budget: int = 0,
                         fssdp_rematerialize: bool = False, activation_checkpoint: str = "none") -> MemoryEstimate:
    """Per-rank parameter, gradient, optimizer and working bytes of ``census`` placed by ``layout``.

    Each parameter costs :data:`PARAM_BYTES` for itself, as much for its gradient, and
    ``ADAMW_STATES x PARAM_BYTES`` of optimizer state; ``working_bytes`` is :func:`working_bytes`.
    """
    state = rank_state(census, layout)
    n = state.params
    return MemoryEstimate(
        world_size=layout.world_size, dp=layout.expert_dp, ep=layout.ep, expert_mode=layout.expert_mode,
        dense=layout.dense, compute_dtype="bf16" if cb == 2 else "fp32", total_params=census.total_params,
        active_params=census.active_params, dense_params=census.total_params - census.expert_params,
        expert_params=census.expert_params, experts_per_rank=state.experts_per_rank, rank_params=n,
        param_bytes=n * PARAM_BYTES, grad_bytes=n * PARAM_BYTES, optimizer_bytes=n * PARAM_BYTES * ADAMW_STATES,
        working_bytes=working_bytes(state, layout, cb, fssdp_memory_budget, fssdp_rematerialize, activation_checkpoint),
        pp=layout.pp, dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard, tp=layout.tp,
        expert_tp=layout.expert_tp, state=state,
    )


def layout_of_config(cfg: JobConfig, world_size: int) -> StateLayout:
    """The :class:`StateLayout` of ``cfg.parallel`` on ``world_size`` ranks, validated by
    :meth:`~system.distributed.ParallelDims.from_parallel_config`.

    Raises:
        ConfigError: (a ``ValueError``) the degrees do not fit ``world_size`` (every key named).
    """
    from system.distributed.parallel_dims import ParallelDims

    p = cfg.parallel
    dims = ParallelDims.from_parallel_config(p, world_size)
    return StateLayout(world_size=world_size, ep=dims.ep, expert_mode=p.expert_mode, dense=p.dense, pp=dims.pp,
                       dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard, tp=dims.tp, expert_tp=dims.expert_tp,
                       stages_per_rank=p.stages_per_rank(), v_schedule=p.pp_schedule == "ZBVZeroBubble")


def estimate_memory(cfg: JobConfig, world_size: int) -> MemoryEstimate:
    """Per-rank parameter, gradient and optimizer bytes of ``cfg`` on ``world_size`` ranks.

    Builds :class:`~system.models.model.MoETransformer` on the ``meta`` device (:class:`ModelCensus`) and
    places every parameter as the job's layout does (:func:`rank_state`), counting the fullest rank.
    Activations depend on the batch and are not counted here (``moesys plan`` adds them).

    Args:
        cfg: a validated job; ``model.vocab_size`` must be resolved (non-zero).
        world_size: ranks of the job (``parallel.dp = -1`` and ``parallel.dp_shard = -1`` are derived from it).

    Raises:
        ValueError: ``model.vocab_size`` is 0, the degrees do not fit ``world_size`` (named), or the blocks
            do not divide by the pipeline stages.
    """
    census = ModelCensus.from_config(cfg)
    layout = layout_of_config(cfg, world_size)
    return estimate_model_state(census, layout, _compute_bytes(cfg), cfg.fssdp.memory_budget, cfg.fssdp.rematerialize,
                                cfg.training.activation_checkpoint)
