"""Apply the configured parallelisms to a :class:`~system.models.model.MoETransformer`.

Order (TorchTitan's ``parallelize_<model>`` pattern): expert parallelism first (it slices the
expert weights and installs the all-to-all dispatcher), then FSDP2 over the dense parameters.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from system.config.parallel import ParallelConfig
from system.models.model import MoETransformer
from system.parallel.expert_parallel import apply_ep
from system.parallel.fsdp import apply_fsdp


def parallelize_model(
    model: MoETransformer, mesh: DeviceMesh, parallel: ParallelConfig, param_dtype: torch.dtype | None = None
) -> None:
    """Apply EP (always; a no-op slice when ``ep == 1``) and, if ``parallel.dense == "fsdp"``, FSDP2.

    Args:
        model: an initialised model, identical on every rank.
        mesh: the ``("dp", "ep")`` DeviceMesh.
        parallel: the ``[parallel]`` config.
        param_dtype: FSDP2 compute dtype (bf16 on CUDA under mixed precision), or None.
    """
    apply_ep(model, mesh)
    if parallel.dense == "fsdp":
        apply_fsdp(model, mesh, param_dtype=param_dtype)
