"""How much of a device a training job's model state takes, from the config alone (``moesys train --dry-run``).

The model is built on the ``meta`` device (shapes only, nothing allocated), so the count holds for
any size, and each parameter is placed the way :func:`~system.models.parallelize.parallelize_model`
places it: expert rows over ``ep`` (or, under FSSDP, whole experts owned over the world), dense
parameters replicated or, under FSDP2, sharded on dim 0 over the world.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from system.config.job import JobConfig

PARAM_BYTES = 4
"""The trainer keeps fp32 parameters whatever ``training.mixed_precision`` says: it builds the model in
torch's default dtype and computes in bf16 through autocast (FSDP2 gathers bf16 copies). Gradients have
the parameters' dtype, and AdamW's two moments (``exp_avg``, ``exp_avg_sq``) too: 2 x fp32."""
ADAMW_STATES = 2


@dataclass
class MemoryEstimate:
    """Per-rank bytes of one job's model state (the fullest rank; activations not included).

    Attributes:
        world_size, dp, ep: the mesh (``dp x ep = world_size``).
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

    @property
    def total_bytes(self) -> int:
        """Parameters + gradients + optimizer state + working copies of the fullest rank."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.working_bytes

    def describe(self) -> list[str]:
        """The lines ``moesys train --dry-run`` prints."""
        experts = (f"experts: EP over ep={self.ep} ({self.experts_per_rank} per rank and MoE layer)"
                   if self.expert_mode == "ep" else
                   f"experts: FSSDP, each owned by one of {self.world_size} ranks (up to {self.experts_per_rank} "
                   f"per rank and MoE layer)")
        dense = f"FSDP2 over {self.world_size} ranks" if self.dense == "fsdp" else "replicated"
        return [
            f"mesh: world size {self.world_size} = dp {self.dp} x ep {self.ep}; {experts}; dense: {dense}",
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


def _compute_bytes(cfg: JobConfig) -> int:
    """Bytes per element of the compute copies: bf16 under mixed precision (the trainer's rule)."""
    mode, device = cfg.training.mixed_precision, cfg.parallel.device
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return 2 if mode == "bf16" or (mode == "auto" and cuda) else 4


def estimate_memory(cfg: JobConfig, world_size: int) -> MemoryEstimate:
    """Per-rank parameter, gradient and optimizer bytes of ``cfg`` on ``world_size`` ranks.

    Builds :class:`~system.models.model.MoETransformer` on the ``meta`` device and places every
    parameter as the trainer's layout does, counting the fullest rank (rank 0):

    - routed experts (``[E, ...]`` tensors): ``E / ep`` rows per rank under ``expert_mode = "ep"``
      (replicated over ``dp``); ``ceil(E / world)`` owned experts under FSSDP (owners may move, but
      never beyond ``ceil(E / W)`` each, Hecate Algorithm 2);
    - dense parameters (attention, norms, embeddings, routers, shared experts): whole on every rank
      (``dense = "replicate"``), or ``ceil(dim0 / world)`` rows of each tensor (FSDP2).

    Each parameter costs :data:`PARAM_BYTES` for itself, as much for its gradient, and
    ``ADAMW_STATES x PARAM_BYTES`` of optimizer state. ``working_bytes`` adds the copies a step keeps
    (see :class:`MemoryEstimate`); activations depend on the batch and are not counted.

    Args:
        cfg: a validated job; ``model.vocab_size`` must be resolved (non-zero).
        world_size: ranks of the job (``parallel.dp = -1`` takes ``world_size / ep``).

    Raises:
        ValueError: ``model.vocab_size`` is 0, or the degrees do not fit ``world_size`` (named).
    """
    from system.models.model import MoETransformer
    from system.parallel.params import split_parameters

    p = cfg.parallel
    if cfg.model.vocab_size <= 0:
        raise ValueError("model.vocab_size must be resolved (the tokenizer's) before estimating memory")
    dp = world_size // p.ep if p.dp == -1 else p.dp
    if dp * p.ep != world_size:
        raise ValueError(f"parallel.dp={p.dp} x parallel.ep={p.ep} does not make world size {world_size}")
    with torch.device("meta"):
        model = MoETransformer(cfg.model, cfg.moe)
    total, active = model.num_params()
    experts = {id(t) for t in split_parameters(model).experts}
    expert_params = sum(t.numel() for t in model.parameters() if id(t) in experts)
    moe_layers = len(model.moe_layers())
    num_e = cfg.moe.num_experts
    per_expert = expert_params // (num_e * moe_layers) if moe_layers else 0  # P: one expert of one layer

    def shard(t: torch.Tensor) -> int:
        if p.dense != "fsdp" or t.ndim == 0:
            return t.numel()
        return math.ceil(t.shape[0] / world_size) * (t.numel() // t.shape[0])

    dense_local = sum(shard(t) for t in model.parameters() if id(t) not in experts)
    experts_per_rank = num_e // p.ep if p.expert_mode == "ep" else math.ceil(num_e / world_size)
    expert_local = experts_per_rank * per_expert * moe_layers
    rank_params = dense_local + expert_local

    cb = _compute_bytes(cfg)
    working = 0
    if p.dense == "fsdp":  # the root's and two blocks' unsharded parameters (current + prefetched)
        blocks = [sum(t.numel() for t in b.parameters() if id(t) not in experts) for b in model.layers]
        in_blocks = {id(t) for b in model.layers for t in b.parameters()}
        root = sum(t.numel() for t in model.parameters() if id(t) not in in_blocks)
        working += (root + 2 * max(blocks, default=0)) * cb
    elif cb < PARAM_BYTES:  # autocast's bf16 copies of the replicated weights, saved for backward
        working += dense_local * cb
    if p.expert_mode == "ep":
        working += expert_local * cb if cb < PARAM_BYTES else 0
    else:  # gathered rows (+ their bf16 cast) kept until backward, and one layer's row gradients
        kept = 1 if cfg.fssdp.rematerialize else moe_layers
        rows = (experts_per_rank + cfg.fssdp.memory_budget) * per_expert
        working += rows * (PARAM_BYTES + (cb if cb < PARAM_BYTES else 0)) * kept + rows * PARAM_BYTES
    return MemoryEstimate(
        world_size=world_size, dp=dp, ep=p.ep, expert_mode=p.expert_mode, dense=p.dense,
        compute_dtype="bf16" if cb == 2 else "fp32", total_params=total, active_params=active,
        dense_params=total - expert_params, expert_params=expert_params, experts_per_rank=experts_per_rank,
        rank_params=rank_params, param_bytes=rank_params * PARAM_BYTES, grad_bytes=rank_params * PARAM_BYTES,
        optimizer_bytes=rank_params * PARAM_BYTES * ADAMW_STATES, working_bytes=working,
    )
