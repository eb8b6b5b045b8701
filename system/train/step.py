"""One optimizer step of an MoE model: the function :class:`~system.train.trainer.Trainer` runs each step.

It is public so that benchmarks (and anyone driving a model without the trainer) time exactly the
code the trainer runs: forward and backward over the micro-batches, gradient synchronisation and
global-norm clipping through :mod:`system.parallel.grads` (or a caller's replacement for a peer
system), the optimizer and scheduler steps, auxiliary-loss-free bias balancing, and FSSDP's per-step
hooks. It does no cross-rank averaging of its statistics and logs nothing: the caller decides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from system.moe.balance import update_expert_bias
from system.parallel.grads import clip_grad_norm_, sync_gradients
from system.parallel.pp import Pipeline

__all__ = ["LocalStepStats", "pipeline_train_step", "train_step"]


@dataclass
class LocalStepStats:
    """What one step measured on this rank (nothing averaged over ranks).

    Attributes:
        loss: cross-entropy in nats/token, mean over this rank's micro-batches.
        aux_loss: load-balancing loss, mean over micro-batches and MoE layers.
        z_loss: router z-loss, mean over micro-batches and MoE layers.
        router_std: uncertainty router's mean score std, or ``None`` for deterministic routing.
        grad_norm: the global gradient norm before clipping (0-dim tensor, on the device).
        tokens_per_expert: per MoE layer, ``[E]`` global assignments summed over the micro-batches.
        dropped: assignments this rank dropped at the capacity limit.
        assignments: assignments this rank made (``T * k`` per MoE layer and micro-batch).
        expert_tokens: token copies this rank's experts computed, all MoE layers and micro-batches.
    """

    loss: float
    aux_loss: float
    z_loss: float
    router_std: float | None
    grad_norm: torch.Tensor
    tokens_per_expert: list[torch.Tensor]
    dropped: int
    assignments: int
    expert_tokens: int


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               *, mesh=None, max_grad_norm: float = 1.0, autocast_dtype: torch.dtype | None = None, fssdp=None,
               load_balance: str = "aux", sync_and_clip: Callable[[], torch.Tensor] | None = None) -> LocalStepStats:
    """One optimizer step over ``micro_batches`` (gradient accumulation), as the trainer runs it.

    Args:
        model: an :class:`~system.models.model.MoETransformer` (after any ``apply_*``/``parallelize_model``),
            or a model with the same ``forward(tokens [B, S]) -> logits [B, S, V]``, ``aux_loss()`` and
            ``moe_layers()`` whose layers set ``last_stats`` (:class:`~system.moe.layer.MoEStats`).
        optimizer, scheduler: stepped once each.
        micro_batches: ``(inputs, targets)`` int64 ``[B, S]`` pairs, already on the model's device; the
            loss of each is divided by their number, so gradients are those of their mean.
        mesh: the model's DeviceMesh, for :func:`~system.parallel.grads.sync_gradients` and
            :func:`~system.parallel.grads.clip_grad_norm_`.
        max_grad_norm: global-norm clipping threshold (0 disables clipping).
        autocast_dtype: run the forward under ``torch.autocast`` in this dtype (``None``: no autocast).
        fssdp: the FSSDP controller ``parallelize_model`` returned, whose ``begin_step``/``end_step`` bracket the step.
        load_balance: ``moe.load_balance``; ``"bias"`` updates the routers' expert bias from the step's loads
            (DeepSeek-V3 auxiliary-loss-free balancing, arXiv:2412.19437 section 2.1.2).
        sync_and_clip: replaces gradient synchronisation and clipping (for a peer system whose parameters
            our gradient code does not know); returns the global norm.

    Returns:
        :class:`LocalStepStats` of this rank.

    Raises:
        ValueError: ``micro_batches`` is empty.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    if fssdp is not None:
        fssdp.begin_step()
    batches = list(micro_batches)
    if not batches:
        raise ValueError("train_step needs at least one micro-batch")
    n = len(batches)
    moe_layers = model.moe_layers()
    device = batches[0][0].device
    # cross-entropy, aux loss, z loss, router std summed on the device in fp64: one host sync per step.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    std_count = dropped = made = expert_tokens = 0
    load = [None] * len(moe_layers)
    for inputs, targets in batches:
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        with ctx:
            logits = model(inputs)
        with loss_parallel() if isinstance(logits, DTensor) else contextlib.nullcontext():
            # Tensor parallelism hands vocabulary-sharded logits (Shard(-1)): cross-entropy without gathering them.
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            if isinstance(ce, DTensor):
                ce = ce.full_tensor()
            aux = model.aux_loss()
            ((ce + aux) / n).backward()
        sums[0] += ce.detach().double()
        for i, moe in enumerate(moe_layers):
            st = moe.last_stats
            sums[1] += st.aux_loss.detach().double()
            sums[2] += st.z_loss.detach().double()
            tpe = st.tokens_per_expert.detach()
            load[i] = tpe.clone() if load[i] is None else load[i] + tpe
            dropped += int(st.dropped)
            made += int(st.assignments)
            expert_tokens += int(st.expert_tokens)
            if st.router_std is not None:
                sums[3] += st.router_std.double()
                std_count += 1
    if sync_and_clip is not None:
        norm = sync_and_clip()
    else:
        sync_gradients(model, mesh)
        norm = clip_grad_norm_(model, mesh, max_grad_norm)
    optimizer.step()
    scheduler.step()
    if load_balance == "bias":  # aux-loss-free balancing from the whole step's global loads
        update_expert_bias(moe_layers, load)
    if fssdp is not None:
        fssdp.end_step(optimizer)
    n_moe = max(len(moe_layers), 1)
    ce_sum, aux_sum, z_sum, std_sum = sums.tolist()
    return LocalStepStats(
        loss=ce_sum / n, aux_loss=aux_sum / n / n_moe, z_loss=z_sum / n / n_moe,
        router_std=std_sum / std_count if std_count else None, grad_norm=norm, tokens_per_expert=load,
        dropped=dropped, assignments=made, expert_tokens=expert_tokens,
    )


def pipeline_train_step(pipe: Pipeline, optimizer: torch.optim.Optimizer, scheduler,
                        micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, max_grad_norm: float = 1.0,
                        autocast_dtype: torch.dtype | None = None, load_balance: str = "aux") -> LocalStepStats:
    """One optimizer step of a pipeline-parallel model (:mod:`system.parallel.pp`): :func:`train_step` for a
    :class:`~system.parallel.pp.Pipeline`.

    Each ``(inputs, targets)`` pair ``[B, S]`` (this rank's data-parallel stream; its TP and PP peers pass the
    same) is one run of the schedule, split into ``pipe.n_microbatches`` micro-batches; with ``n`` micro-batches
    in all, each one's cross-entropy and every stage's auxiliary losses are scaled by ``1 / n``, so the
    gradients are those of ``mean((ce + aux))`` over the micro-batches, as in :func:`train_step`. Then the same
    gradient synchronisation and global-norm clipping (over all stages: the norm's all-reduce spans the
    world), optimizer and scheduler steps, bias balancing of this rank's MoE layers, and FSSDP's hooks.

    Returns:
        :class:`LocalStepStats` of this rank's data-parallel stream for the *whole model*: the statistics of
        every stage are summed over the pp group (one all-reduce), so ``loss`` (from the last stage),
        ``aux_loss``/``z_loss`` (means over micro-batches and all MoE layers), ``tokens_per_expert`` (every
        MoE layer), ``dropped`` and ``assignments`` are the same on every rank of the pp group;
        ``expert_tokens`` stays this rank's.

    Raises:
        ValueError: ``micro_batches`` is empty.
    """
    model = pipe.model
    model.train()
    optimizer.zero_grad(set_to_none=True)
    for controller in pipe.controllers:
        controller.begin_step()
    batches = list(micro_batches)
    if not batches:
        raise ValueError("pipeline_train_step needs at least one batch")
    n = len(batches) * pipe.n_microbatches
    pipe.stats.reset(loss_scale=1.0 / n)
    for inputs, targets in batches:
        pipe.step(inputs, targets, autocast_dtype=autocast_dtype)
    sync_gradients(model)
    norm = clip_grad_norm_(model, None, max_grad_norm)
    optimizer.step()
    scheduler.step()
    layers = pipe.moe_layers()
    if load_balance == "bias":  # this rank's layers, from their step loads (summed over the stage's ranks)
        update_expert_bias(layers, pipe.stats.local_loads(layers))
    for controller in pipe.controllers:
        controller.end_step(optimizer)
    sums = pipe.stats.reduce(pipe.group)  # every stage's statistics, one all-reduce over the pp group
    n_moe = max(pipe.stats.n_moe, 1)
    return LocalStepStats(
        loss=sums["ce"] / n, aux_loss=sums["aux"] / n / n_moe, z_loss=sums["z"] / n / n_moe,
        router_std=sums["std_sum"] / sums["std_count"] if sums["std_count"] else None, grad_norm=norm,
        tokens_per_expert=sums["loads"], dropped=int(sums["dropped"]), assignments=int(sums["assignments"]),
        expert_tokens=pipe.stats.expert_tokens,
    )
