"""Which parameters are dense, expert-parallel experts, or FSSDP-owned experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from system.moe.experts import ExpertModule
from system.parallel.layout import has_layout, layout_of


@dataclass
class ParamSplit:
    """Parameters of a model by how their gradients are reduced.

    Attributes:
        dense: replicated (or FSDP2-sharded) parameters: gradient averaged over all ranks.
        ep_experts: expert rows under expert parallelism: gradient summed over the ``dp`` replicas.
        fssdp_experts: FSSDP owned expert rows: gradient already summed on the owner by
            SparseReduceScatter.
    """

    dense: list[nn.Parameter]
    ep_experts: list[nn.Parameter]
    fssdp_experts: list[nn.Parameter]

    @property
    def experts(self) -> list[nn.Parameter]:
        return self.ep_experts + self.fssdp_experts


def expert_modules(model: nn.Module) -> list[ExpertModule]:
    """Every :class:`~system.moe.experts.ExpertModule` (SwiGLU or FME experts) in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ExpertModule)]


def split_parameters(model: nn.Module) -> ParamSplit:
    """Split ``model``'s parameters (each once) into a :class:`ParamSplit` by their layout records
    (:mod:`system.parallel.layout`); a model never parallelised (no records) splits by module: the
    parameters of its :class:`~system.moe.experts.ExpertModule` s are experts."""
    expert_ids = {id(p) for m in expert_modules(model) for p in m.parameters()}
    split = ParamSplit([], [], [])
    for p in model.parameters():
        kind = layout_of(p).kind if has_layout(p) else ("expert" if id(p) in expert_ids else "dense")
        {"dense": split.dense, "expert": split.ep_experts, "fssdp": split.fssdp_experts}[kind].append(p)
    return split
