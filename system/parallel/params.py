"""Which parameters are expert parameters (sharded on the expert axis) and which are dense."""

from __future__ import annotations

import torch.nn as nn

from system.moe.experts import GroupedExperts


def expert_modules(model: nn.Module) -> list[GroupedExperts]:
    """Every :class:`GroupedExperts` in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, GroupedExperts)]


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(dense, expert)`` parameter lists of ``model`` (each parameter once)."""
    expert_ids = {id(p) for m in expert_modules(model) for p in m.parameters()}
    dense, expert = [], []
    for p in model.parameters():
        (expert if id(p) in expert_ids else dense).append(p)
    return dense, expert
