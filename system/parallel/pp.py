"""Pipeline parallelism: the model split by blocks into stages over the ``pp`` ranks, run by a schedule of
``torch.distributed.pipelining``, with the MoE auxiliary losses of every stage in the gradient.

What is split (TorchTitan's ``pipeline_llm``): ``pp * stages_per_rank`` stages, each a copy of the
:class:`~system.models.model.MoETransformer` holding a contiguous, balanced run of blocks (``layers`` a
``ModuleDict`` keyed by the original block index, so every parameter keeps its single-device name), the
embedding on the first stage and the final norm and head on the last (``None`` elsewhere). A stage shares
the modules of the model it was cut from (nothing is copied); once that model is dropped, a rank holds only
its stages. The whole model is still built and initialised on every rank first (its initialisation draws
one random stream over all blocks, which is what makes the stages equal to the single-device model), so
set-up peaks at one whole model per rank. Stage ``i`` of pp rank ``r``: ``i = r`` with one stage per rank; ``i = r + k * pp`` (loop) for
Interleaved1F1B (Narayanan et al. 2021, arXiv 2104.04473, sec. 2.2), LoopedBFS and InterleavedZeroBubble
(Qi et al. 2024, arXiv 2401.10241); ``r`` and ``2 pp - 1 - r`` (V) for ZBVZeroBubble.

Each stage is parallelised on its own (``parallelize_model`` on the stage: TP, EP/FSSDP, AC, compile, FSDP2
over the ranks of that stage), then wrapped in a :class:`MoEPipelineStage` over the ``"pp"`` process group.

Losses. The last stage computes the token cross-entropy (vocabulary-parallel under tensor parallelism,
inside ``loss_parallel``), multiplied by ``1 / (micro-batches per optimizer step)``; the schedule runs with
``scale_grads=False`` (TorchTitan's choice), so gradients are those of the mean loss over the step. The
MoE auxiliary losses (load balancing, router z-loss) of *every* stage reach the gradient through
:class:`AuxLossAutoScaler` (Megatron-Core's ``MoEAuxLossAutoScaler``): the stage output carries its
stage's auxiliary loss, whose gradient ``d(aux) = scale`` (the same ``1 / micro-batches``) is injected when
the output's gradient arrives; equal to ``((ce + aux) / n).backward()`` of the one-process step. The
routing statistics of each stage forward are summed in :class:`MoEStepStats` and reduced over the pp group
once per step, so every rank logs the whole model's loads, losses and drops.

Forward only (evaluation, sampling): :meth:`Pipeline.forward` runs the stages in order with blocking
send/recv over the pp group (variable sequence lengths, no schedule state touched).

Tied embeddings (``model.tie_embeddings``) are refused: the head would live on another rank than the
embedding it shares (TorchTitan refuses them too; Megatron keeps a copy and all-reduces its gradient).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from system.config.loader import ConfigError
from system.config.parallel import ParallelConfig
from system.distributed.parallel_dims import ParallelDims

logger = logging.getLogger(__name__)

FIRST_MODULES = ("tok_embeddings",)
"""Children of the model that live on the first stage."""
LAST_MODULES = ("norm", "output")
"""Children of the model that live on the last stage."""
V_SCHEDULES = ("ZBVZeroBubble",)
"""Schedules placing stages ``r`` and ``2 pp - 1 - r`` on pp rank ``r`` (the others loop: ``r + k pp``)."""


# ----------------------------------------------------------------------------------------------- the split


def stage_layer_ranges(n_layers: int, pp: int, stages_per_rank: int) -> list[range]:
    """Block indices of each of the ``pp * stages_per_rank`` stages: contiguous, sizes differing by at most one
    (the earlier stages take the extra blocks: the last one also holds the head and the loss).

    Raises:
        ConfigError: fewer blocks than stages.
    """
    n_stages = pp * stages_per_rank
    if n_layers < n_stages:
        raise ConfigError(
            f"model.n_layers={n_layers} cannot fill {n_stages} pipeline stages (parallel.pp={pp} x "
            f"parallel.pp_stages_per_rank={stages_per_rank}) with at least one block each"
        )
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> tuple[int, ...]:
    """The stages pp rank ``pp_rank`` holds, in increasing order: loop style ``r + k pp``, or V style
    ``(r, 2 pp - 1 - r)`` for the schedules in :data:`V_SCHEDULES`."""
    if schedule in V_SCHEDULES:
        if stages_per_rank != 2:
            raise ConfigError(f"parallel.pp_schedule={schedule!r} needs parallel.pp_stages_per_rank=2, "
                              f"got {stages_per_rank}")
        return (pp_rank, 2 * pp - 1 - pp_rank)
    return tuple(pp_rank + k * pp for k in range(stages_per_rank))


def split_stage(model: nn.Module, layers: range, *, first: bool, last: bool) -> nn.Module:
    """A stage of ``model``: the same class and attributes, the blocks ``layers`` in a ``ModuleDict`` keyed by
    their original index, the embedding only when ``first``, the final norm and head only when ``last``.

    The stage *shares* the kept submodules, parameters and buffers with ``model`` (no copy): build the
    stages of this rank, then drop ``model`` to free the rest. Hooks are not carried over.

    Raises:
        ValueError: ``model`` has a child this split does not know where to put.
    """
    stage = copy.copy(model)  # plain attributes (cfg, moe_cfg) shared
    nn.Module.__init__(stage)  # fresh parameter/buffer/module registries and hook tables
    stage.train(model.training)
    for name, p in model.named_parameters(recurse=False):
        stage.register_parameter(name, p)
    for name, buf in model.named_buffers(recurse=False):
        stage.register_buffer(name, buf, persistent=name not in model._non_persistent_buffers_set)
    for name, child in model._modules.items():
        if name == "layers":
            blocks = ({int(k): b for k, b in child.items()} if isinstance(child, nn.ModuleDict)
                      else dict(enumerate(child)))
            stage.layers = nn.ModuleDict({str(i): blocks[i] for i in layers})
        elif name in FIRST_MODULES:
            setattr(stage, name, child if first else None)
        elif name in LAST_MODULES:
            setattr(stage, name, child if last else None)
        else:
            raise ValueError(f"pipeline split: no stage is assigned the model's child module {name!r}")
    return stage


class PipelineParts(nn.Module):
    """This rank's stages seen as one module with the single-device parameter names (``tok_embeddings.weight``,
    ``layers.7.moe.experts.w1``, ...): what the optimizer, gradient sync and clipping, checkpoints and export
    take. It holds the stages' submodules (no copies); it has no ``forward`` of its own (run the
    :class:`Pipeline`).

    Attributes:
        cfg, moe_cfg: the model's configs.
        parts: the stage modules, in stage order (not registered: their parameters are reached once,
            through the children above).
    """

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.cfg = getattr(parts[0], "cfg", None)
        self.moe_cfg = getattr(parts[0], "moe_cfg", None)
        self.parts = list(parts)
        layers: dict[int, nn.Module] = {}
        for part in parts:
            for name, child in part.named_children():
                if name == "layers":
                    layers.update({int(k): b for k, b in child.items()})
                else:
                    setattr(self, name, child)
        self.layers = nn.ModuleDict({str(i): layers[i] for i in sorted(layers)})

    def train(self, mode: bool = True) -> "PipelineParts":
        """Set the training mode of every stage (their root modules too)."""
        super().train(mode)
        for part in self.parts:
            part.train(mode)
        return self

    def blocks(self) -> list[nn.Module]:
        """This rank's blocks, in depth order."""
        return list(self.layers.values())

    def moe_layers(self) -> list[nn.Module]:
        """This rank's MoE layers, in depth order."""
        return [b.moe for b in self.blocks() if getattr(b, "moe", None) is not None]

    def forward(self, *args, **kwargs):  # noqa: D102
        raise RuntimeError("PipelineParts holds pipeline stages: run them through system.parallel.pp.Pipeline")


# ----------------------------------------------------------------------------------------------- losses


class AuxLossAutoScaler(torch.autograd.Function):
    """Identity on a stage's ``output`` whose backward also gives ``aux_loss`` the gradient ``scale``.

    Megatron-Core's ``MoEAuxLossAutoScaler`` (``megatron/core/transformer/moe/moe_utils.py``): a pipeline
    schedule back-propagates each stage from the gradient of its output only, so a loss term computed inside
    a stage (the MoE load-balancing and z-losses) must ride on the output. ``forward`` returns ``output``
    (``copy``: a copy of it; autograd makes an input returned as-is a view of it, and the zero-bubble
    schedules ``detach_()`` the outputs of non-last stages, which a view refuses; the copy is one hidden state
    ``[mb, S, d]``, and the original is freed since nothing saved it); ``backward`` passes ``grad_output``
    through and feeds ``d(aux_loss) = scale``, exactly what ``(aux_loss * scale).backward()`` would. ``scale``
    must match the scaling of the cross-entropy (``1 / micro-batches of the step``).
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float,  # noqa: D102
                copy: bool) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.clone() if copy else output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: D102
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None, None


STAT_FIELDS = ("ce", "aux", "z", "std_sum", "std_count", "dropped", "assignments")


class MoEStepStats:
    """Sums over one optimizer step of the MoE statistics of this rank's stage forwards, and of the last
    stage's cross-entropy, in one float64 device buffer ``[len(STAT_FIELDS) + n_moe * E]`` (the loads of every
    MoE layer of the model at its global position) that :meth:`reduce` all-reduces over the pp group.

    Args:
        layer_index: ``id(MoELayer) -> index`` among the model's MoE layers in depth order (all stages).
        n_moe: MoE layers in the whole model.
        num_experts: ``E``.
        device: where the sums live.
    """

    def __init__(self, layer_index: dict[int, int], n_moe: int, num_experts: int, device: torch.device):
        self.layer_index, self.n_moe, self.num_experts = layer_index, n_moe, num_experts
        self.buf = torch.zeros(len(STAT_FIELDS) + n_moe * num_experts, dtype=torch.float64, device=device)
        self.loss_scale = 1.0
        self.expert_tokens = 0
        self.seen: set[int] = set()

    def reset(self, loss_scale: float) -> None:
        """Start a step whose losses are scaled by ``loss_scale`` (``1 / micro-batches``)."""
        self.buf.zero_()
        self.loss_scale = loss_scale
        self.expert_tokens = 0
        self.seen = set()

    def _at(self, name: str) -> torch.Tensor:
        i = STAT_FIELDS.index(name)
        return self.buf[i : i + 1]

    def loads(self) -> torch.Tensor:
        """``[n_moe, E]`` view of the summed expert loads."""
        return self.buf[len(STAT_FIELDS):].view(self.n_moe, self.num_experts)

    @torch.no_grad()
    def record(self, moe_layers: list[nn.Module]) -> None:
        """Add the ``last_stats`` of ``moe_layers`` (one stage forward of one micro-batch)."""
        loads = self.loads()
        for moe in moe_layers:
            st, i = moe.last_stats, self.layer_index[id(moe)]
            self.seen.add(i)
            self._at("aux").add_(st.aux_loss.detach().double())
            self._at("z").add_(st.z_loss.detach().double())
            loads[i].add_(st.tokens_per_expert.detach().double())
            self._at("dropped").add_(st.dropped)
            self._at("assignments").add_(st.assignments)
            self.expert_tokens += int(st.expert_tokens)
            if st.router_std is not None:
                self._at("std_sum").add_(st.router_std.double())
                self._at("std_count").add_(1)

    @torch.no_grad()
    def add_ce(self, ce_sum: torch.Tensor) -> None:
        """Add the last stage's summed (unscaled) cross-entropy of some micro-batches."""
        self._at("ce").add_(ce_sum.detach().double())

    def local_loads(self, moe_layers: list[nn.Module]) -> list[torch.Tensor]:
        """This step's loads ``[E]`` (float32) of ``moe_layers`` (this rank's), before any pp reduction."""
        loads = self.loads()
        return [loads[self.layer_index[id(m)]].float() for m in moe_layers]

    def reduce(self, group) -> dict:
        """All-reduce (sum) the step's sums over ``group`` (the pp group; one collective, one host sync) and
        return ``{"ce", "aux", ..., "loads": [n_moe x [E] float32]}``."""
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(self.buf, group=group)
        values = self.buf[: len(STAT_FIELDS)].tolist()  # host sync
        out = dict(zip(STAT_FIELDS, values))
        out["loads"] = [row.float().clone() for row in self.loads()]
        return out


# ----------------------------------------------------------------------------------------------- the stage


class MoEPipelineStage(PipelineStage):
    """A :class:`~torch.distributed.pipelining.PipelineStage` of an MoE model: each micro-batch forward the
    schedule runs records the stage's MoE statistics and, when gradients are on, attaches the stage's
    auxiliary loss (``submod.aux_loss()``) to its output through :class:`AuxLossAutoScaler`.

    Args:
        submodule, stage_index, num_stages, device, group, get_mesh: as for ``PipelineStage``.
        stats: the step's :class:`MoEStepStats` (its ``loss_scale`` is the auxiliary-loss gradient).
        moe_layers: the stage's MoE layers.
    """

    def __init__(self, submodule: nn.Module, stage_index: int, num_stages: int, device: torch.device, *,
                 group, stats: MoEStepStats, moe_layers: list[nn.Module], get_mesh=None):
        super().__init__(submodule, stage_index, num_stages, device, group=group, get_mesh=get_mesh)
        self.stats = stats
        self.moe_layers = moe_layers

    def forward_maybe_with_nosync(self, *args, **kwargs):  # noqa: D102 - called once per micro-batch forward
        out = super().forward_maybe_with_nosync(*args, **kwargs)
        if self.moe_layers:
            self.stats.record(self.moe_layers)
            if torch.is_grad_enabled():
                out = AuxLossAutoScaler.apply(out, self.submod.aux_loss(), self.stats.loss_scale, not self.is_last)
        return out


def _mesh_lookup(dims: ParallelDims) -> Callable:
    """``get_mesh(names, layout)`` for DTensors crossing stages: the world mesh's dimensions ``names``."""

    def get_mesh(names: tuple[str, ...], layout=None):
        try:
            mesh = dims.world_mesh[names[0] if len(names) == 1 else tuple(names)]
        except (KeyError, ValueError, RuntimeError):
            return None
        if layout is not None and getattr(mesh, "_layout", layout) != layout:
            return None
        return mesh

    return get_mesh


def _autocast(device_type: str, dtype: torch.dtype | None):
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (fp32, 0-dim, plain tensor) of ``logits`` ``[B, S, V]`` against ``targets`` ``[B, S]``.

    Vocabulary-sharded DTensor logits (tensor parallelism, ``Shard(-1)``) need ``loss_parallel()`` active around
    this call and around its backward: the caller enters it once (the context is not reentrant: an inner exit
    would switch it off for the outer one).
    """
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return ce.full_tensor() if isinstance(ce, DTensor) else ce


# ----------------------------------------------------------------------------------------------- the pipeline


@dataclass
class Pipeline:
    """This rank's share of a pipeline-parallel model and the schedule that runs it.

    Attributes:
        schedule: the ``torch.distributed.pipelining`` schedule.
        stages: this rank's :class:`MoEPipelineStage` objects, in stage order.
        model: :class:`PipelineParts` over the stage modules (optimizer, checkpoints, export).
        group: the pp process group (one rank of every stage).
        n_microbatches: micro-batches each batch given to :meth:`step` is split into.
        stats: the step's :class:`MoEStepStats`.
        controllers: FSSDP controllers of the stages (empty without FSSDP).
        loss_parallel: enter ``loss_parallel`` around the schedule (tensor parallelism).
        get_mesh: ``(mesh dim names, layout) -> DeviceMesh`` for DTensors crossing stages.
    """

    schedule: object
    stages: list[MoEPipelineStage]
    model: PipelineParts
    group: object
    n_microbatches: int
    stats: MoEStepStats
    controllers: list = field(default_factory=list)
    loss_parallel: bool = False
    get_mesh: Callable | None = None

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.stages)

    @property
    def num_stages(self) -> int:
        return self.stages[0].num_stages

    def moe_layers(self) -> list[nn.Module]:
        """This rank's MoE layers, in depth order."""
        return [m for s in self.stages for m in s.moe_layers]

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The schedule's loss of one micro-batch: token cross-entropy times ``stats.loss_scale``."""
        return token_cross_entropy(logits, targets) * self.stats.loss_scale

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, *, autocast_dtype: torch.dtype | None = None) -> None:
        """Forward and backward of one batch ``[B, S]`` (``B`` divisible by :attr:`n_microbatches`) through the
        schedule; gradients accumulate into the stages' parameters, statistics into :attr:`stats`.

        Every rank passes its data-parallel stream's batch; only the first stage reads ``inputs`` and only the
        last ``targets``.
        """
        args = (inputs,) if self.has_first else ()
        kwargs = {"target": targets} if self.has_last else {}
        losses: list[torch.Tensor] | None = [] if self.has_last else None
        amp = _autocast(inputs.device.type, autocast_dtype)
        lp = loss_parallel() if self.loss_parallel else contextlib.nullcontext()
        with amp, lp:  # as TorchTitan: the whole schedule (its backward of the loss too) under both
            self.schedule.step(*args, losses=losses, return_outputs=False, **kwargs)
        if losses:
            self.stats.add_ce(torch.stack([l.detach() for l in losses]).double().sum() / self.stats.loss_scale)

    # ------------------------------------------------------------------ forward only
    def _rank_of(self, stage: int) -> int:
        """Global rank holding ``stage`` in this rank's pp group."""
        return dist.get_global_rank(self.group, self.stages[0].stage_index_to_group_rank[stage])

    def _send(self, h: torch.Tensor, dst: int) -> None:
        local = h.to_local() if isinstance(h, DTensor) else h
        meta = (tuple(local.shape), local.dtype,
                (tuple(h.device_mesh.mesh_dim_names), tuple(h.placements), tuple(h.shape), tuple(h.stride()))
                if isinstance(h, DTensor) else None)
        dist.send_object_list([meta], dst=dst, group=self.group, device=local.device)
        dist.send(local.contiguous(), dst=dst, group=self.group)

    def _recv(self, src: int, device: torch.device) -> torch.Tensor:
        box = [None]
        dist.recv_object_list(box, src=src, group=self.group, device=device)
        shape, dtype, dt = box[0]
        local = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(local, src=src, group=self.group)
        if dt is None:
            return local
        names, placements, gshape, gstride = dt
        return DTensor.from_local(local, self.get_mesh(names), placements, run_check=False, shape=gshape,
                                  stride=gstride)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Logits ``[B, S, V]`` of ``tokens`` ``[B, S]`` on the rank holding the last stage, ``None`` elsewhere
        (a collective over the pp group: every rank passes the same ``tokens``).

        Runs the stages in order, each hidden state ``[B, S, d]`` sent with blocking point-to-point calls (a
        small pickled header with its shape and dtype, then the tensor), so any sequence length works and the
        schedule's buffers are untouched. Every rank walks its stages in increasing order and stage ``i + 1``
        only waits for stage ``i``, so the blocking calls form a chain, never a cycle. FSDP2 parameters are
        resharded afterwards (a forward without backward leaves the root's gathered).
        """
        device = tokens.device
        amp = _autocast(device.type, autocast_dtype)
        h, out, last = None, None, self.num_stages - 1
        try:
            for stage in self.stages:
                i = stage.stage_index
                if i == 0:
                    x = tokens
                elif self._rank_of(i - 1) == dist.get_rank():
                    x = h  # the previous stage is this rank's too (V schedules)
                else:
                    x = self._recv(self._rank_of(i - 1), device)
                with amp:
                    h = stage.submod(x)
                if i == last:
                    out = h
                elif self._rank_of(i + 1) != dist.get_rank():
                    self._send(h, self._rank_of(i + 1))
        finally:
            for stage in self.stages:
                for m in stage.submod.modules():
                    if isinstance(m, FSDPModule):
                        m.reshard()
        return out

    def from_last(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` of the rank holding the last stage, on every rank of the pp group (an all-reduce in which
        the other ranks contribute zeros); pass a tensor of the same shape and dtype everywhere."""
        t = value.clone() if self.has_last else torch.zeros_like(value)
        dist.all_reduce(t, group=self.group)
        return t

    @torch.no_grad()
    def greedy_generate(self, prompt: torch.Tensor, max_new_tokens: int, max_seq_len: int, *,
                        autocast_dtype: torch.dtype | None = None, seq_multiple: int = 1) -> torch.Tensor:
        """Append ``max_new_tokens`` argmax tokens to ``prompt`` (int64 ``[B, S0]``, the same on every rank) through
        the pipeline (no KV cache: the last ``max_seq_len`` tokens each step); every rank returns
        ``[B, S0 + max_new_tokens]``. Each new token is broadcast from the last stage.

        ``seq_multiple``: the window is trimmed at the front to a multiple of it (sequence parallelism needs
        lengths divisible by ``tp``; then the first ``len % tp`` tokens of the context are not seen).
        """
        tokens, was_training = prompt, self.model.training
        self.model.eval()
        try:
            for _ in range(max_new_tokens):
                window = tokens[:, -max_seq_len:]
                window = window[:, window.shape[1] % seq_multiple:]
                logits = self.forward(window, autocast_dtype=autocast_dtype)
                if logits is not None:
                    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
                    nxt = logits[:, -1].float().argmax(dim=-1, keepdim=True)
                else:
                    nxt = torch.zeros(tokens.shape[0], 1, dtype=torch.long, device=tokens.device)
                tokens = torch.cat([tokens, self.from_last(nxt)], dim=1)
        finally:
            self.model.train(was_training)
        return tokens


def check_microbatches(batch_size: int, n_microbatches: int) -> None:
    """Raise ``ConfigError`` unless a rank's batch splits into the pipeline's micro-batches evenly."""
    if batch_size % n_microbatches:
        raise ConfigError(
            f"training.batch_size={batch_size} does not divide into {n_microbatches} pipeline micro-batches "
            f"(parallel.pp_microbatches, 0 meaning the number of stages)"
        )


def build_pipeline(model: nn.Module, dims: ParallelDims, parallel: ParallelConfig, device: torch.device, *,
                   parallelize: Callable[[nn.Module], object] | None = None) -> Pipeline:
    """Split ``model`` into this rank's stages, parallelise each, and build the schedule.

    Args:
        model: an initialised :class:`~system.models.model.MoETransformer`, identical on every rank (its weights
            are shared with the stages, not copied; drop it afterwards so the blocks of other stages are freed).
        dims: the job's :class:`ParallelDims`, meshes built (``dims.pp > 1``).
        parallel: the ``[parallel]`` config (``pp_schedule``, ``pp_microbatches``, ``pp_stages_per_rank``).
        device: this rank's device.
        parallelize: applied to each stage module in place (``parallelize_model`` with the job's options);
            what it returns that is not None (FSSDP controllers) is kept in :attr:`Pipeline.controllers`.

    Raises:
        ConfigError: tied embeddings, fewer blocks than stages, or a micro-batch count the schedule refuses
            (each message names the keys).
    """
    if getattr(model.cfg, "tie_embeddings", False):
        raise ConfigError(
            f"model.tie_embeddings=true shares the embedding with the output head, which parallel.pp={parallel.pp} "
            f"puts on different pipeline stages: set model.tie_embeddings=false"
        )
    spr = parallel.stages_per_rank()
    n_stages = dims.pp * spr
    ranges = stage_layer_ranges(len(model.blocks()), dims.pp, spr)
    pp_mesh = dims.world_mesh["pp"]
    group = pp_mesh.get_group()
    ids = stage_ids(pp_mesh.get_local_rank(), dims.pp, spr, parallel.pp_schedule)
    all_moe = [b.moe for b in model.blocks() if getattr(b, "moe", None) is not None]
    stats = MoEStepStats({id(m): i for i, m in enumerate(all_moe)}, len(all_moe), model.moe_cfg.num_experts, device)
    get_mesh = _mesh_lookup(dims)
    parts, stages, controllers = [], [], []
    for i in ids:
        part = split_stage(model, ranges[i], first=i == 0, last=i == n_stages - 1)
        moe_layers = [b.moe for b in part.blocks() if getattr(b, "moe", None) is not None]
        controller = parallelize(part) if parallelize is not None else None
        if controller is not None:
            controllers.append(controller)
        parts.append(part)
        stages.append(MoEPipelineStage(part, i, n_stages, device, group=group, stats=stats, moe_layers=moe_layers,
                                       get_mesh=get_mesh))
        logger.info("pipeline: pp rank %d holds stage %d of %d: blocks %d-%d%s%s", pp_mesh.get_local_rank(), i,
                    n_stages, ranges[i].start, ranges[i].stop - 1, " + embedding" if i == 0 else "",
                    " + norm and head" if i == n_stages - 1 else "")
    n_mb = parallel.pp_microbatches or n_stages
    pipe = Pipeline(None, stages, PipelineParts(parts), group, n_mb, stats, controllers,
                    loss_parallel=dims.tp > 1, get_mesh=get_mesh)
    pipe.schedule = _build_schedule(parallel.pp_schedule, stages, n_mb, pipe.loss_fn)
    return pipe


def _build_schedule(name: str, stages: list[MoEPipelineStage], n_microbatches: int, loss_fn: Callable):
    """The schedule ``name`` over ``stages`` (TorchTitan's ``build_pipeline_schedule``), ``scale_grads=False``:
    the loss function scales each micro-batch's loss itself.

    Raises:
        ConfigError: the schedule refuses the micro-batch count (its reason quoted).
    """
    cls = get_schedule_class(name)
    try:
        if issubclass(cls, PipelineScheduleSingle):
            return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    except ValueError as e:
        raise ConfigError(f"parallel.pp_microbatches={n_microbatches} does not fit parallel.pp_schedule={name!r} "
                          f"with {stages[0].num_stages} stages: {e}") from None


__all__ = [
    "AuxLossAutoScaler", "MoEPipelineStage", "MoEStepStats", "Pipeline", "PipelineParts", "build_pipeline",
    "check_microbatches", "split_stage", "stage_ids", "stage_layer_ranges", "token_cross_entropy",
]
