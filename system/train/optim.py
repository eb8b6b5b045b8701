"""AdamW with decoupled weight decay on matrices, and a linear-warmup cosine LR schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from system.config.training import TrainingConfig


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s local parameters: weight decay on tensors of rank >= 2 only.

    Expert parameters are local rows of the global expert axis; each rank updates what it holds.
    ``foreach`` is off so the update of each tensor is the same elementwise arithmetic whatever the
    sharding (bitwise-comparable across parallel layouts).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=False)


def lr_lambda(step: int, cfg: TrainingConfig) -> float:
    """LR multiplier at ``step``: linear warmup to 1 over ``warmup_steps``, cosine to ``min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_lambda`; call ``step()`` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg))
