"""Tensor parallelism for the MoE decoder: DTensor ``parallelize_module`` plans, and tensor-parallel experts.

Megatron-LM's tensor parallelism (Shoeybi et al. 2019, arXiv 1909.08053, sec. 3) with sequence parallelism
(Korthikanti et al. 2022, arXiv 2205.05198, sec. 4.2.2), in TorchTitan's form (``apply_tp`` of
``torchtitan/models/llama3/infra/parallelize.py``, ``apply_moe_ep_tp`` of ``llama4/infra/parallelize.py``):
between blocks the residual stream of a data-parallel stream is split over the ``tp`` ranks along the
sequence (each holds ``[B, S/tp, d]``); each block all-gathers the sequence before attention and the dense
FFN, splits their heads / hidden columns over the ranks, and reduce-scatters the output back to a sequence
shard.

::

    module                    placement of the weight        input -> output (activations)
    tok_embeddings            Shard(0) (vocabulary rows)     tokens Replicate -> Shard(1) (reduce-scatter)
    attention_norm, ffn_norm  Replicate                      Shard(1) -> Shard(1) (sequence parallel)
    attention.wq / wk / wv    Shard(0) (heads)               all-gathered Replicate -> local heads
    attention.q_norm / k_norm Replicate ("head" mode)        local heads (Shard(2)) -> local heads
    attention.wo              Shard(1) (heads)               local heads -> Shard(1) (reduce-scatter)
    mlp.w1 / w3, mlp.w2       Shard(0), Shard(1)             all-gathered Replicate -> Shard(1)
    moe (EP experts)          router, shared experts: plain  Shard(1): the MoE runs on the local tokens
    moe (expert_tp)           router, shared experts: plain  all-gathered Replicate -> Shard(1) (a slice)
    norm                      Replicate                      Shard(1) -> Shard(1)
    output                    Shard(0) (vocabulary)          all-gathered -> Shard(-1) (loss parallel) or Replicate

MLA (:class:`~system.models.model.MLAttention`): ``wq`` / ``wq_b`` / ``wkv_b`` column-wise, ``wo`` row-wise,
the latent projections ``wq_a`` / ``wkv_a`` and their norms computed whole on every rank (:class:`NoParallel`).
The attention modules run on local tensors: their ``n_heads`` / ``n_kv_heads`` become the local head counts.
The rotary table stays a plain buffer, whole on every rank.

Gradients. Every dense parameter outside the MoE layers becomes a ``DTensor`` over ``tp``, so DTensor's
backward reduces its gradient over the tensor-parallel ranks (sum over the stream's tokens); its layout
record (:mod:`system.parallel.layout`) then asks :func:`~system.parallel.grads.sync_gradients` to sum over
the data-parallel ranks ``("dp_replicate", "dp_shard")`` and divide by the streams. With experts folded
onto ``dp_shard x tp`` (:func:`~system.parallel.expert_parallel.apply_ep`), the MoE layer of each rank
routes its own sequence shard: its router and shared experts stay plain tensors whose gradients (from
different tokens on each tensor-parallel rank) are summed over the whole stage by the default record. The
routing losses of those ranks are averaged over ``tp`` (:func:`_average_routing_losses`) so that a stream
adds its load-balancing and z losses once, as the single-process model does.

Hooks :func:`apply_tp` installs besides the styles' own: a post-accumulate-grad hook on every DTensor weight
that all-reduces a gradient DTensor left ``Partial`` (a replicated weight applied to a sequence shard) to the
weight's placement, so that the gradient code reads whole local gradients; the routing-loss mean above; for MLA,
the sum over ``tp`` of the shared rotary key's gradient (:class:`_SumGradTail`); and a check that input
sequences divide by ``tp`` (``DTensor.from_local`` assumes even shards). Greedy sampling of a growing sequence
can right-pad it to a multiple of ``tp``: causal attention leaves earlier positions unchanged.

Expert tensor parallelism (:func:`apply_expert_tp`, ``parallel.expert_tp``): every tensor-parallel rank of
a stream routes all of the stream's tokens; each expert's SwiGLU is split column-wise (``w1``/``w3``
``[E_local, d, f/tp]``) and row-wise (``w2`` ``[E_local, f/tp, d]``) over ``tp``; the experts are split over
the expert mesh's ``"ep"`` (folded onto ``dp_shard``) with the all-to-all among ranks of equal ``tp``
coordinate.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from system.config.loader import ConfigError
from system.config.parallel import ParallelConfig
from system.distributed.parallel_dims import ParallelDims
from system.moe.layer import MoELayer
from system.moe.hierarchical_a2a import build_ep_dispatcher
from system.parallel.expert_parallel import expert_rows
from system.parallel.layout import ParamLayout, dtensor_replicas, has_layout, record

logger = logging.getLogger(__name__)

__all__ = ["NoParallel", "apply_expert_tp", "apply_tp", "check_tp"]


class NoParallel(ParallelStyle):
    """A module computed whole on every tensor-parallel rank, its weights ``Replicate`` DTensors (TorchTitan's
    ``NoParallel``), so that their gradients are reduced like every other tensor-parallel weight.

    The input (a plain tensor, identical on the ranks, or a DTensor) becomes a ``Replicate`` DTensor; the output
    is returned as a local tensor whose gradient is taken to be identical on the ranks.
    """

    @staticmethod
    def _prepare_input(mod, inputs, mesh: DeviceMesh):
        x = inputs[0]
        x = x.redistribute(placements=(Replicate(),)) if isinstance(x, DTensor) else \
            DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
        return (x, *inputs[1:])

    @staticmethod
    def _prepare_output(mod, output, mesh: DeviceMesh):
        return output.to_local() if isinstance(output, DTensor) else output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, None, self._prepare_input, self._prepare_output)


class _SumGradTail(torch.autograd.Function):
    """Identity; the backward sums the last ``width`` features of the gradient over ``group``.

    MLA's decoupled rotary key ``k_rope`` (the tail of ``wkv_a``'s output) is shared by all heads: the
    local heads of a rank give only part of its gradient, while the latent part of the same output already
    receives the whole gradient through ``wkv_b``'s column-parallel input.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, width: int, group) -> torch.Tensor:  # noqa: D102
        ctx.width, ctx.group = width, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        tail = grad[..., -ctx.width:].contiguous()
        dist.all_reduce(tail, group=ctx.group)  # [B, S, Dr] per MLA layer: the shared key's gradient
        return torch.cat((grad[..., :-ctx.width], tail), dim=-1), None, None


def check_tp(model: nn.Module, tp: int) -> None:
    """Raise ``ConfigError`` when ``model`` cannot be split ``tp`` ways.

    Raises:
        ConfigError: heads that do not divide by ``tp``, or ``model.qk_norm = "full"`` (one norm over all
            heads' projections, which a head split cannot compute locally).
    """
    cfg = model.cfg
    n_kv = cfg.n_kv_heads or cfg.n_heads
    if cfg.n_heads % tp:
        raise ConfigError(f"model.n_heads={cfg.n_heads} does not divide by parallel.tp={tp}")
    if cfg.attention_type != "mla" and n_kv % tp:
        raise ConfigError(f"model.n_kv_heads={n_kv} does not divide by parallel.tp={tp}")
    if cfg.attention_type != "mla" and cfg.qk_norm == "full":
        raise ConfigError(f"model.qk_norm='full' normalises all heads together and cannot be split over "
                          f"parallel.tp={tp}; use model.qk_norm='head' or parallel.tp=1")


def apply_tp(model: nn.Module, dims: ParallelDims, parallel: ParallelConfig) -> None:
    """Split the dense layers of ``model`` (a :class:`~system.models.model.MoETransformer` or a pipeline stage of
    it) over the world mesh's ``"tp"`` dimension, in place (see the module docstring for the plan).

    Call first, before the experts are placed (``apply_ep`` / ``apply_fssdp`` / :func:`apply_expert_tp`) and
    before FSDP2. Every parameter it turns into a DTensor gets its layout record (gradient summed over the
    data-parallel ranks and divided by ``dims.dp_degree``); the MoE layers' dense parts are left to the caller's
    ``record_replicated`` (or :func:`apply_expert_tp`).

    With ``parallel.loss_parallel`` the model returns vocabulary-sharded logits, a ``DTensor`` ``[B, S, V]``
    with ``Shard(-1)``: compute the cross-entropy under ``torch.distributed.tensor.parallel.loss_parallel()``
    (as :func:`~system.train.step.train_step` does) or call ``full_tensor()``; otherwise plain ``[B, S, V]``
    logits, identical on the tensor-parallel ranks. Input sequences must divide by ``tp``.

    Args:
        model: the model, initialised identically on every rank of its stage.
        dims: the job's degrees with its meshes built (:meth:`ParallelDims.build_mesh`).
        parallel: the ``[parallel]`` config (``loss_parallel``).

    Raises:
        ConfigError: see :func:`check_tp`.
    """
    tp = dims.tp
    check_tp(model, tp)
    tp_mesh = dims.submesh("tp")
    parallelize_module(model, tp_mesh, _root_plan(model, parallel.loss_parallel))
    if model.output is None and model.norm is not None and not parallel.loss_parallel:
        model.register_forward_hook(_replicate_logits)  # tied head: F.linear gives Shard(-1) logits
    blocks = model.blocks()
    for block in blocks:
        parallelize_module(block, tp_mesh, _block_plan(block, dims.expert_tp))
        attn = block.attention
        attn.n_heads //= tp
        attn.n_kv_heads //= tp
        if getattr(attn, "wkv_a", None) is not None:
            attn.wkv_a.register_forward_hook(
                lambda mod, inp, out, width=attn.rope_dim: _SumGradTail.apply(out, width, tp_mesh.get_group()))
        if block.moe is not None and not dims.expert_tp:
            block.moe.register_forward_hook(_average_routing_losses(tp_mesh))
    _stage_boundaries(model, blocks, tp_mesh)
    model.register_forward_pre_hook(_check_sequence(tp))
    dp_group = dims.group("dp_replicate", "dp_shard")
    for p in model.parameters():
        if isinstance(p, DTensor):
            p.register_post_accumulate_grad_hook(_reduce_partial_grad)
            record(p, ParamLayout("dense", tuple(p.shape), replicas=dtensor_replicas(p, dims.world_size, dims.pp),
                                  grad_group=dp_group, grad_divisor=dims.dp_degree))
    logger.info("tensor parallelism: %d ranks, %d blocks, loss_parallel=%s, expert_tp=%s", tp, len(blocks),
                parallel.loss_parallel, dims.expert_tp)


def _reduce_partial_grad(p: DTensor) -> None:
    """Post-accumulate-grad hook: a gradient left ``Partial`` over ``tp`` (a replicated weight applied to a
    sequence shard, e.g. a sequence-parallel norm, gets the sum of its ranks' partial gradients lazily) is
    all-reduced to the parameter's placements now, so that its local tensor is the whole gradient that
    :mod:`system.parallel.grads` syncs and clips. (FSDP2, when applied, does the same for the parameters it wraps.)"""
    if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
        p.grad = p.grad.redistribute(placements=p.placements)  # all-reduce [numel] over tp


def _root_plan(model: nn.Module, loss_parallel: bool) -> dict[str, ParallelStyle]:
    """Embedding, final norm and head (those this stage holds)."""
    plan: dict[str, ParallelStyle] = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        if model.output is not None:
            plan["norm"] = SequenceParallel()
            plan["output"] = ColwiseParallel(input_layouts=Shard(1),
                                             output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                             use_local_output=not loss_parallel)
        else:  # tied head F.linear(norm(h), tok_embeddings.weight): a Replicate input makes it column-parallel
            plan["norm"] = _SequenceParallelGathered()
    return plan


class _SequenceParallelGathered(SequenceParallel):
    """:class:`SequenceParallel` whose output is all-gathered to a ``Replicate`` DTensor (``[B, S, d]``): the
    input of a tied head, whose vocabulary-sharded weight then gives ``Shard(-1)`` logits."""

    @staticmethod
    def _prepare_output_fn(use_local_output, mod, outputs, device_mesh):
        return outputs.redistribute(placements=(Replicate(),))


def _replicate_logits(model, inputs, logits):
    """The whole logits ``[B, S, V]`` as a local tensor (tied head without loss parallelism)."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def _block_plan(block: nn.Module, expert_tp: bool) -> dict[str, ParallelStyle]:
    """The TP plan of one transformer block, keyed by submodule name."""
    attn = block.attention
    plan: dict[str, ParallelStyle] = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
    }
    if hasattr(attn, "wkv_a"):  # MLA
        if attn.wq is not None:
            plan["attention.wq"] = ColwiseParallel()
        else:
            plan.update({"attention.wq_a": NoParallel(), "attention.q_norm": NoParallel(),
                         "attention.wq_b": ColwiseParallel()})
        plan.update({"attention.wkv_a": NoParallel(), "attention.kv_norm": NoParallel(),
                     "attention.wkv_b": ColwiseParallel()})
    else:
        plan.update({f"attention.{n}": ColwiseParallel() for n in ("wq", "wk", "wv")})
        if attn.q_norm is not None:  # per head ("head"): the local heads are a Shard(2) of [B, S, H, Dh]
            plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    if block.moe is None:
        plan.update({
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.w1": ColwiseParallel(), "mlp.w3": ColwiseParallel(),
            "mlp.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
    elif expert_tp:  # every TP rank routes the stream's tokens; the MoE output is identical there: keep a slice
        plan["moe"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True)
    else:  # the MoE routes this rank's sequence shard: no communication here
        plan["moe"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_input=True,
            output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),), use_local_output=True)
    return plan


def _average_routing_losses(tp_mesh: DeviceMesh):
    """A forward hook of a :class:`MoELayer` routing its rank's sequence shard: replace ``last_stats``'s
    ``aux_loss`` and ``z_loss`` by their mean over the tensor-parallel ranks (one all-reduce of 2 floats).

    Each rank's losses are means over its own tokens (the load-balancing loss's expert fractions are already
    global, summed over ``moe.stats_group``), so their mean over ``tp`` is the stream's loss. The mean is a
    ``Partial`` DTensor made whole: every rank then adds the same stream loss, whose gradient DTensor's
    backward gives each rank's tokens with weight ``1/tp`` (a plain sum would count the stream ``tp`` times).
    """
    size = tp_mesh.size()

    def hook(moe: MoELayer, inputs, output) -> None:
        st = moe.last_stats
        both = torch.stack((st.aux_loss.float(), st.z_loss.float())) / size
        both = DTensor.from_local(both, tp_mesh, (Partial(),), run_check=False).full_tensor()
        moe.last_stats = replace(st, aux_loss=both[0], z_loss=both[1])

    return hook


def _stage_boundaries(model: nn.Module, blocks: list[nn.Module], tp_mesh: DeviceMesh) -> None:
    """A pipeline stage's hidden states cross stage boundaries whole (``[B, S, d]``, identical on the stage's
    tensor-parallel ranks): the first block of a stage without the embedding keeps its sequence shard of
    them, and the last block of a stage without the head all-gathers its output."""
    if not blocks:
        return
    if model.tok_embeddings is None:
        parallelize_module(blocks[0], tp_mesh, PrepareModuleInput(
            input_layouts=(Replicate(), None), desired_input_layouts=(Shard(1), None), use_local_output=True))
    if model.norm is None:
        parallelize_module(blocks[-1], tp_mesh, PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))


def _check_sequence(tp: int):
    """A forward pre-hook rejecting input sequences that do not divide by ``tp`` (sequence parallelism)."""

    def hook(model, args) -> None:
        seq = args[0].shape[1]
        if seq % tp:
            raise ValueError(f"sequence length {seq} does not divide by parallel.tp={tp} "
                             "(sequence parallelism splits every sequence over the tensor-parallel ranks)")

    return hook


def apply_expert_tp(model: nn.Module, dims: ParallelDims, parallel: ParallelConfig) -> None:
    """Split each expert of every :class:`MoELayer` over ``tp`` and the experts over the expert mesh's
    ``"ep"``, in place (call after :func:`apply_tp`, in place of ``apply_ep``).

    Expert ``e``'s SwiGLU ``(silu(x W1) * (x W3)) W2`` is split Megatron-style (Shoeybi et al. 2019, sec. 3):
    ``W1``/``W3`` by columns and ``W2`` by rows of the hidden ``f``, so rank ``t`` of ``tp`` computes a partial
    output from ``f/tp`` hidden units. Every tensor-parallel rank of a stream routes all of the stream's tokens
    (:func:`apply_tp` all-gathers the MoE input), so the dispatched rows are the same on those ranks; the
    all-to-all runs over the expert mesh's ``"ep"`` (ranks of equal ``tp`` coordinate, different streams).
    Around the local experts: the input rows' gradient is summed over ``tp`` in backward (each rank's is
    partial), and the partial output rows ``[M, d]`` are all-reduced over ``tp`` before the router-weighted
    combine (the router weights' gradient needs whole expert outputs). The layer output is then identical
    on the ``tp`` ranks, which keep their sequence shard of it. This all-reduce moves ``M = T * top_k`` rows
    per layer where TorchTitan's reduce-scatter of the combined output moves ``T``: the price of combining
    with weights after the experts (the SwiGLU is not linear in its input, so the weights cannot move before).

    Layout records: expert blocks ``(lo, 0, t f/tp)`` of ``w1``/``w3`` and ``(lo, t f/tp, 0)`` of ``w2``,
    ``Shard(0)`` over ``"ep"`` and ``Shard(2)``/``Shard(1)`` over ``"etp"``, gradient summed over the expert
    ``"dp"`` replicas and divided by the data streams; the router, shared experts and other dense parts of the
    layer are plain tensors, identical on the ``tp`` ranks, their gradient summed over the data-parallel ranks
    only. Routing statistics are summed over the data-parallel ranks (one per stream).

    Raises:
        ConfigError: ``moe.expert_type`` is not ``"ffn"``, ``moe.expert_dim`` does not divide by ``tp``, or
            ``moe.num_experts`` does not divide by ``parallel.ep``.
    """
    mesh = dims.mesh
    ep_mesh, etp_mesh = mesh["ep"], mesh["etp"]
    ep, tp = ep_mesh.size(), etp_mesh.size()
    ep_rank, tp_rank = ep_mesh.get_local_rank(), etp_mesh.get_local_rank()
    dp_group = dims.group("dp_replicate", "dp_shard")
    expert_dp = mesh["dp"].size()
    expert_dp_group = mesh["dp"].get_group() if expert_dp > 1 else None
    shard_mesh = mesh[("ep", "etp")]._flatten("ep_etp")
    shard_group = shard_mesh.get_group() if shard_mesh.size() > 1 else None
    stage = dims.world_size // dims.pp
    for moe in (m for m in model.modules() if isinstance(m, MoELayer)):
        experts = moe.experts
        if moe.expert_type != "ffn":
            raise ConfigError(f"parallel.expert_tp splits SwiGLU experts; moe.expert_type={moe.expert_type!r} "
                              "needs parallel.expert_tp=false")
        num, hidden = experts.num_global_experts, experts.w1.shape[2]
        if num % ep:
            raise ConfigError(f"moe.num_experts={num} does not divide by the expert-parallel degree parallel.ep={ep}")
        if hidden % tp:
            raise ConfigError(f"moe.expert_dim={hidden} does not divide by parallel.tp={tp} (parallel.expert_tp)")
        lo, hi = expert_rows(num, ep, ep_rank)
        experts.keep_experts_(lo, hi)
        cols = slice(tp_rank * hidden // tp, (tp_rank + 1) * hidden // tp)
        for name, dim in (("w1", 2), ("w2", 1), ("w3", 2)):
            p = getattr(experts, name)
            block = p.detach().narrow(dim, cols.start, cols.stop - cols.start).clone()
            setattr(experts, name, nn.Parameter(block, requires_grad=p.requires_grad))
            offsets = [lo, 0, 0]
            offsets[dim] = cols.start
            shape = [num, *p.shape[1:]]
            record(getattr(experts, name), ParamLayout(
                "expert", tuple(shape), offsets=tuple(offsets),
                placements=(("dp", Replicate()), ("ep", Shard(0)), ("etp", Shard(dim))), replicas=expert_dp,
                grad_group=expert_dp_group, grad_divisor=dims.dp_degree, shard_group=shard_group))
        experts.register_forward_pre_hook(lambda mod, args: _tp_expert_input(args, etp_mesh))
        experts.register_forward_hook(lambda mod, args, out: _tp_expert_output(out, etp_mesh))
        if ep > 1:
            moe.dispatcher = build_ep_dispatcher(ep_mesh, num, parallel.a2a, parallel.a2a_ranks_per_node)
        moe.stats_group = dp_group
        for p in moe.parameters():
            if not isinstance(p, DTensor) and not has_layout(p):
                record(p, ParamLayout("dense", tuple(p.shape), replicas=stage, grad_group=dp_group,
                                      grad_divisor=dims.dp_degree))
    logger.info("expert tensor parallelism: experts split %d ways over tp and %d ways over ep", tp, ep)


def _tp_expert_input(args: tuple, etp_mesh: DeviceMesh) -> tuple:
    """Expert input rows ``[M, d]`` (identical on the ``etp`` ranks) whose gradient, partial on each rank (its
    ``f/tp`` hidden units), is all-reduced over ``etp`` in backward."""
    x, counts = args
    x = DTensor.from_local(x, etp_mesh, (Replicate(),), run_check=False).to_local(grad_placements=(Partial(),))
    return x, counts


def _tp_expert_output(y: torch.Tensor, etp_mesh: DeviceMesh) -> torch.Tensor:
    """Sum the partial expert outputs ``[M, d]`` over ``etp`` (an all-reduce); the gradient stays local."""
    return DTensor.from_local(y, etp_mesh, (Partial(),), run_check=False).full_tensor()
