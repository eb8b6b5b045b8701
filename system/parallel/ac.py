"""Activation checkpointing per transformer block (``training.activation_checkpoint``).

``"full"`` recomputes each block's forward in the backward pass and keeps only the block's inputs;
``"selective"`` is op-level selective activation checkpointing (SAC, ``torch.utils.checkpoint.
create_selective_checkpoint_contexts``): the outputs of the ops in :data:`SAVE_OPS` (matmuls,
attention, functional collectives, device-to-host copies, the router's top-k) are kept, everything
else is recomputed. Both use non-reentrant ``torch.utils.checkpoint.checkpoint`` with
``preserve_rng_state=True`` and ``early_stop=False``, as TorchTitan's ``FullAC``/``SelectiveAC`` do
(``torchtitan/distributed/activation_checkpoint.py``); see Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", sec. 4, for the selective idea.

How it is applied: each block's class is swapped for a subclass whose ``forward`` runs the original
``forward`` under ``checkpoint`` (as FSDP2's ``fully_shard`` swaps classes), instead of wrapping the
block in ``checkpoint_wrapper``. Parameter names, ``state_dict`` keys and module hooks are unchanged
(a wrapper module would add ``_checkpoint_wrapped_module.`` to every name), and hooks registered on
the block (FSSDP's prefetch pre-hook, FSDP2's unshard hooks) run once per forward, outside the
checkpointed region: the recomputation calls ``forward``, not ``__call__``.

MoE blocks, and what the recomputation does there:

- Routing is identical: the CPU and the inputs' device RNG states are restored (the uncertainty
  router's Monte Carlo dropout draws the same masks), and under ``"selective"`` the router's
  ``topk`` output is kept. Shape checks (``determinism_check="default"``) fail loudly if a
  recomputed tensor differs in shape, e.g. after a different routing.
- Collectives: the recomputation runs every collective of the block's forward again, in the same
  order (the statistics all-reduce, the count and token all-to-alls of
  :class:`~system.moe.dispatch.AllToAllDispatcher`, FSSDP's count all-gather and SparseAllGather).
  Every rank checkpoints the same blocks and recomputes a block when its backward starts, so the
  ranks stay matched. ``early_stop=False`` makes the recomputation run the whole forward, so every
  rank issues every collective whatever the number of tensors it saved. The hand-written all-to-all
  (``dist.all_to_all_single`` into a preallocated buffer) cannot be kept by SAC (a cached in-place
  op would leave the recomputed buffer empty), so ``"selective"`` runs it again too; functional
  collectives (``torch.ops._c10d_functional``) are kept.
- Host synchronisations: the dispatchers read their split sizes to the host again in the
  recomputation (one more synchronisation per MoE layer in backward on CUDA) under ``"full"``;
  ``"selective"`` keeps device-to-host copies, so its recomputation does not wait for the device (the
  collectives before those copies still run).
- Statistics: ``MoELayer.last_stats`` keeps the object of the original forward (the one whose
  ``aux_loss`` the loss used), and FSSDP's per-step ``expert_tokens`` and ``prefetched`` counters are
  not counted twice. FSSDP's ``gather_bytes`` does count the recomputation's SparseAllGather: those
  bytes move again.
- FSSDP: the recomputed forward gathers the materialized experts again (one more SparseAllGather per
  MoE layer and step); when the forward took its experts from a prefetch (the block's pre-hook, which
  the recomputation does not call), the recomputation starts the same prefetch first, so it runs the
  same ops (SAC compares them op by op) and overlaps the gather with the recomputed attention.
  What FSSDP's expert function saves is kept out of the checkpoint (:class:`_KeepSavedTensors`):
  without ``fssdp.rematerialize`` it keeps the gathered rows and its expert sub-graph until backward
  anyway, as without AC; with it, the backward gathers a third time.

Order of use (TorchTitan's): TP, EP/FSSDP, then :func:`apply_ac`, then
:func:`system.parallel.compile.apply_compile`, then FSDP2.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from system.moe.layer import MoELayer
from system.parallel.fssdp.layer import FSSDPExperts

logger = logging.getLogger(__name__)

AC_MODES = ("none", "full", "selective")
"""The values of ``training.activation_checkpoint``."""


def _ops(*names: str) -> set:
    """The ``torch.ops`` overloads named ``"namespace.op.overload"`` that exist in this PyTorch build."""
    found = set()
    for name in names:
        obj = torch.ops
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except (AttributeError, RuntimeError):
            continue
        found.add(obj)
    return found


SAVE_OPS = frozenset(_ops(
    # matmuls (nn.Linear decomposes to addmm / mm; batched and grouped expert matmuls)
    "aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default", "aten._grouped_mm.default",
    # attention kernels behind F.scaled_dot_product_attention
    "aten._scaled_dot_product_flash_attention.default", "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_efficient_attention.default", "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_attention_math.default",
    "aten._scaled_dot_product_fused_attention_overrideable.default",
    # functional collectives: keeping their outputs avoids communicating again in the recomputation
    "_c10d_functional.all_to_all_single.default", "_c10d_functional.reduce_scatter_tensor.default",
    "_c10d_functional.all_gather_into_tensor.default", "_c10d_functional.all_reduce.default",
    # the routing decision: the recomputation reuses the forward's expert choice
    "aten.topk.default",
))
"""Ops whose outputs selective AC keeps (TorchTitan's ``_save_list`` idea, without its every-other-mm rule:
see :func:`sac_policy`)."""


def sac_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Selective AC policy: ``MUST_SAVE`` for :data:`SAVE_OPS` and device-to-host copies, else ``PREFER_RECOMPUTE``.

    Unlike TorchTitan, every matmul output is kept, not every other one. In an MoE block the number of
    expert matmuls depends on how many experts (and chunks of rows) received tokens on this rank, so
    the parity of every later matmul would change from step to step and rank to rank: the memory kept
    per block would depend on the routing. Keeping all of them makes the activation memory of a block
    a function of its shapes, which the planner can estimate.

    Device-to-host copies (the dispatchers' split sizes, ``aten._to_copy`` to the CPU) are kept so the
    recomputation does not copy (and synchronise) again; TorchTitan does the same.
    """
    if func in SAVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    if func is torch.ops.aten._to_copy.default and _to_host(args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _to_host(args: tuple, kwargs: dict) -> bool:
    """Whether an ``aten._to_copy`` call copies a device tensor to the CPU."""
    device = kwargs.get("device")
    return (device is not None and torch.device(device).type == "cpu" and bool(args)
            and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu")


def _fssdp_experts(moe: MoELayer) -> FSSDPExperts | None:
    return moe.experts if isinstance(moe.experts, FSSDPExperts) else None


class _MoEForward(contextlib.AbstractContextManager):
    """Forward context of a checkpointed MoE block: ``inner`` (SAC's caching mode, or nothing), noting which
    FSSDP layers took their experts from a prefetched SparseAllGather (started by the block's pre-hook)."""

    def __init__(self, inner, moe_layers: list[MoELayer]):
        self.inner, self.moe_layers = inner, moe_layers
        self.prefetched: list[FSSDPExperts] = []

    def __enter__(self) -> "_MoEForward":
        self._before = [(e, e.state.stats["prefetched"]) for e in map(_fssdp_experts, self.moe_layers) if e is not None]
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self.inner.__exit__(*exc)
        finally:
            self.prefetched = [e for e, before in self._before if e.state.stats["prefetched"] > before]


class _MoERecompute(contextlib.AbstractContextManager):
    """Recomputation context of a checkpointed MoE block.

    Before: starts the prefetches the forward consumed (so the recomputed forward runs the same ops, which
    SAC requires, and overlaps the gather with the recomputed attention), then enters ``inner`` (SAC's
    replay mode, or nothing). After: puts back ``MoELayer.last_stats`` (the first forward's object) and
    FSSDP's ``expert_tokens`` and ``prefetched`` counters.
    """

    def __init__(self, inner, forward: _MoEForward):
        self.inner, self.forward = inner, forward
        self.saved: list = []

    def __enter__(self) -> "_MoERecompute":
        self.saved = []
        for moe in self.forward.moe_layers:
            experts = _fssdp_experts(moe)
            counters = None if experts is None else {k: experts.state.stats[k] for k in ("expert_tokens", "prefetched")}
            self.saved.append((moe, moe.last_stats, experts, counters))
        for experts in self.forward.prefetched:
            experts.prefetch()
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self.inner.__exit__(*exc)
        finally:
            for moe, last, experts, counters in self.saved:
                moe.last_stats = last
                if experts is not None:
                    experts.state.stats.update(counters)
            self.saved = []


def _moe_contexts(mode: str, moe_layers: list[MoELayer]) -> tuple:
    """``checkpoint``'s ``context_fn`` for a block with MoE layers (SAC's modes for ``"selective"``)."""
    if mode == "selective":
        forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(sac_policy)
    else:
        forward_ctx, recompute_ctx = contextlib.nullcontext(), contextlib.nullcontext()
    forward = _MoEForward(forward_ctx, moe_layers)
    return forward, _MoERecompute(recompute_ctx, forward)


class _KeepSavedTensors:
    """Forward pre-/post-hooks that keep what a module saves for backward out of an enclosing checkpoint.

    For FSSDP's experts: without re-materialization their autograd function builds a sub-graph in forward
    and differentiates it with ``torch.autograd.grad`` in backward, a separate graph task; were its saved
    tensors checkpointed, unpacking them there would recompute the whole block a second time (the
    checkpoint recomputes once per graph task), and SAC would refuse (its cache is consumed once). The
    function keeps that sub-graph until backward anyway, so nothing is lost.
    """

    def __init__(self):
        self.stack: list = []

    def pre(self, module: nn.Module, args) -> None:
        hooks = torch.autograd.graph.saved_tensors_hooks(_identity, _identity)
        hooks.__enter__()
        self.stack.append(hooks)

    def post(self, module: nn.Module, args, output) -> None:
        self.stack.pop().__exit__(None, None, None)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class ActivationCheckpointed:
    """Mixin placed before a block's class by :func:`apply_ac`: ``forward`` runs under ``checkpoint``.

    The instance attribute ``ac_mode`` (``"full"`` or ``"selective"``) picks the policy. A block
    without MoE layers passes ``checkpoint`` plain SAC contexts (or none), which ``torch.compile``
    can trace into its ``tag_activation_checkpoint`` region.
    """

    ac_mode: str

    def forward(self, *args, **kwargs):  # noqa: D102
        options = dict(use_reentrant=False, preserve_rng_state=True, early_stop=False,
                       determinism_check="default")
        moe_layers = [m for m in self.modules() if isinstance(m, MoELayer)]
        if moe_layers:
            options["context_fn"] = functools.partial(_moe_contexts, self.ac_mode, moe_layers)
        elif self.ac_mode == "selective":
            options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, sac_policy)
        # "full" without MoE: checkpoint's default (no context), the only form torch.compile accepts besides SAC's
        return checkpoint(super().forward, *args, **options, **kwargs)


_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """The cached subclass ``Checkpointed<cls>`` of ``(ActivationCheckpointed, cls)``."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (ActivationCheckpointed, cls),
                             {"__module__": cls.__module__})
    return _CLASSES[cls]


def apply_ac(model: nn.Module, mode: str) -> None:
    """Apply activation checkpointing to every block of ``model.layers``, in place.

    Each block's class becomes ``Checkpointed<Block>`` (a subclass; ``isinstance`` checks, parameter
    names, ``state_dict`` keys and hooks are unchanged) whose ``forward`` runs the block under
    non-reentrant ``torch.utils.checkpoint`` (see the module docstring for the MoE details).

    Call after TP and EP/FSSDP and before ``apply_compile`` and FSDP2 (TorchTitan's order). Every rank
    must apply the same mode to the same blocks (the recomputation issues collectives).

    Args:
        model: a model with a ``layers`` container of blocks (``nn.ModuleList`` or ``nn.ModuleDict``).
        mode: ``training.activation_checkpoint``: ``"none"`` (nothing), ``"full"`` or ``"selective"``.

    Raises:
        ValueError: an unknown ``mode``, a model without ``layers``, or a block already checkpointed.
    """
    if mode not in AC_MODES:
        raise ValueError(f"training.activation_checkpoint must be one of {list(AC_MODES)}, got {mode!r}")
    if mode == "none":
        return
    layers = getattr(model, "layers", None)
    if not isinstance(layers, (nn.ModuleList, nn.ModuleDict)):
        raise ValueError(f"training.activation_checkpoint={mode!r} needs a model with a `layers` "
                         f"ModuleList/ModuleDict, got {type(model).__name__}")
    blocks = layers.values() if isinstance(layers, nn.ModuleDict) else layers
    for block in blocks:
        if isinstance(block, ActivationCheckpointed):
            raise ValueError(f"training.activation_checkpoint: block {type(block).__name__} is already checkpointed "
                             f"(mode {block.ac_mode!r}); apply_ac must be called once")
        block.__class__ = _checkpointed_class(type(block))
        block.ac_mode = mode
        for experts in (m for m in block.modules() if isinstance(m, FSSDPExperts)):
            keep = _KeepSavedTensors()
            experts.register_forward_pre_hook(keep.pre)
            experts.register_forward_hook(keep.post, always_call=True)
    logger.info("activation checkpointing: %s, %d blocks", mode, len(layers))
