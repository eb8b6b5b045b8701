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
  recomputation (one more synchronisation per MoE layer in backward on CUDA; ``"selective"`` keeps
  device-to-host copies, which removes the copy but not the collective before it).
- Statistics: ``MoELayer.last_stats`` keeps the object of the original forward (the one whose
  ``aux_loss`` the loss used), and FSSDP's per-step ``expert_tokens`` counter is not counted twice.
  FSSDP's ``gather_bytes`` does count the recomputation's SparseAllGather: those bytes move again.
- FSSDP: the recomputed forward gathers the materialized experts again (one more SparseAllGather per
  MoE layer and step). Without ``fssdp.rematerialize`` the first forward's gathered rows stay alive
  until backward anyway (the expert function keeps its sub-graph on its context, outside the
  checkpoint's reach); with it, the backward gathers a third time.

Order of use (TorchTitan's): TP, EP/FSSDP, then :func:`apply_ac`, then
:func:`system.parallel.compile.apply_compile`, then FSDP2.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from system.moe.layer import MoELayer

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


class _KeepForwardStats(contextlib.AbstractContextManager):
    """Recomputation context: run ``inner`` (SAC's replay mode, or nothing), then put back what the
    block's first forward recorded.

    ``MoELayer.last_stats`` is restored to the object of the first forward (the loss used its
    ``aux_loss``; the recomputation would replace it by an equal one from a graph nobody reads), and
    FSSDP's ``expert_tokens`` counter to its value before the recomputation.
    """

    def __init__(self, inner, moe_layers: list[MoELayer]):
        self.inner = inner
        self.moe_layers = moe_layers
        self.saved: list = []

    def __enter__(self) -> "_KeepForwardStats":
        self.saved = []
        for moe in self.moe_layers:
            stats = _fssdp_stats(moe)
            self.saved.append((moe, moe.last_stats, stats, None if stats is None else stats["expert_tokens"]))
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self.inner.__exit__(*exc)
        finally:
            for moe, last, stats, tokens in self.saved:
                moe.last_stats = last
                if stats is not None:
                    stats["expert_tokens"] = tokens
            self.saved = []


def _fssdp_stats(moe: MoELayer) -> dict | None:
    """The per-step counters of an FSSDP dispatcher's layer state, or None for another dispatcher."""
    state = getattr(moe.dispatcher, "state", None)
    stats = getattr(state, "stats", None)
    return stats if isinstance(stats, dict) and "expert_tokens" in stats else None


class ActivationCheckpointed:
    """Mixin placed before a block's class by :func:`apply_ac`: ``forward`` runs under ``checkpoint``.

    The instance attribute ``ac_mode`` (``"full"`` or ``"selective"``) picks the policy.
    """

    ac_mode: str

    def forward(self, *args, **kwargs):  # noqa: D102
        return checkpoint(super().forward, *args, use_reentrant=False, preserve_rng_state=True,
                          early_stop=False, determinism_check="default", context_fn=self._ac_contexts, **kwargs)

    def _ac_contexts(self) -> tuple:
        """The (forward, recomputation) contexts of one checkpointed call (``checkpoint``'s ``context_fn``)."""
        if self.ac_mode == "selective":
            forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(sac_policy)
        else:
            forward_ctx, recompute_ctx = contextlib.nullcontext(), contextlib.nullcontext()
        moe_layers = [m for m in self.modules() if isinstance(m, MoELayer)]
        if not moe_layers:
            return forward_ctx, recompute_ctx
        return forward_ctx, _KeepForwardStats(recompute_ctx, moe_layers)


_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """The cached subclass ``Checkpointed<cls>`` of ``(ActivationCheckpointed, cls)``."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (ActivationCheckpointed, cls), {"__module__": cls.__module__})
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
        raise ValueError(f"training.activation_checkpoint={mode!r} needs a model with a `layers` ModuleList/ModuleDict, "
                         f"got {type(model).__name__}")
    blocks = layers.values() if isinstance(layers, nn.ModuleDict) else layers
    for block in blocks:
        if isinstance(block, ActivationCheckpointed):
            raise ValueError(f"training.activation_checkpoint: block {type(block).__name__} is already checkpointed "
                             f"(mode {block.ac_mode!r}); apply_ac must be called once")
        block.__class__ = _checkpointed_class(type(block))
        block.ac_mode = mode
    logger.info("activation checkpointing: %s, %d blocks", mode, len(layers))
