"""Parallelisms applied to a model by plain functions (TorchTitan style)."""

from system.parallel.expert_parallel import apply_ep, expert_rows
from system.parallel.fsdp import apply_fsdp
from system.parallel.grads import clip_grad_norm_, sync_gradients
from system.parallel.params import expert_modules, split_parameters

__all__ = [
    "apply_ep",
    "apply_fsdp",
    "clip_grad_norm_",
    "expert_modules",
    "expert_rows",
    "split_parameters",
    "sync_gradients",
]
