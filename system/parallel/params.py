"""Which parameters are dense, expert-parallel experts, or FSSDP-owned experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from system.moe.experts import ExpertModule


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
    """Split ``model``'s parameters (each once) into a :class:`ParamSplit`.

    FSSDP expert modules are recognised by their ``owned`` parameter and ``state`` attribute
    (``system.parallel.fssdp.layer.FSSDPExperts``), without importing that package here.
    """
    ep_ids = {id(p) for m in expert_modules(model) for p in m.parameters()}
    fssdp_ids = {
        id(m.owned) for m in model.modules() if hasattr(m, "owned") and hasattr(m, "state") and not isinstance(m, ExpertModule)
    }
    split = ParamSplit([], [], [])
    for p in model.parameters():
        if id(p) in ep_ids:
            split.ep_experts.append(p)
        elif id(p) in fssdp_ids:
            split.fssdp_experts.append(p)
        else:
            split.dense.append(p)
    return split
