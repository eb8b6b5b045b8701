"""FSDP2 for the dense parameters, composed with expert parallelism on the same ranks."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from system.parallel.params import split_parameters


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> None:
    """Fully shard the dense parameters of ``model`` over all ranks of ``mesh``, in place.

    Every transformer block (``model.layers[i]``) is one FSDP2 unit and the root holds the
    embeddings, final norm and head. Expert parameters are left out (``ignored_params``): they are
    already sharded by :func:`~system.parallel.apply_ep` and their gradients are reduced over the
    ``dp`` dimension by :func:`~system.parallel.sync_expert_gradients`. FSDP2 reduce-scatters dense
    gradients averaged over the world, which is what replicated all-reduce would give.

    Args:
        model: a model with a ``layers`` ModuleList.
        mesh: the ``("dp", "ep")`` mesh; dense parameters are sharded over its flattened ranks.
        param_dtype: compute dtype for the all-gathered parameters (e.g. bf16 on CUDA), or None.
    """
    world = mesh._flatten("dp_ep") if mesh.ndim > 1 else mesh
    ignored = set(split_parameters(model).experts)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=world, ignored_params=ignored, mp_policy=mp)
    fully_shard(model, mesh=world, ignored_params=ignored, mp_policy=mp)
