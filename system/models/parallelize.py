"""Apply the configured parallelisms to a :class:`~system.models.model.MoETransformer`.

Order (TorchTitan's ``parallelize_<model>`` pattern): expert parallelism first (it slices the
expert weights and installs the all-to-all dispatcher), then FSDP2 over the dense parameters.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from system.config.fssdp import FSSDPConfig
from system.config.parallel import ParallelConfig
from system.models.model import MoETransformer
from system.parallel.expert_parallel import apply_ep
from system.parallel.fsdp import apply_fsdp


def parallelize_model(
    model: MoETransformer,
    mesh: DeviceMesh,
    parallel: ParallelConfig,
    param_dtype: torch.dtype | None = None,
    fssdp: FSSDPConfig | None = None,
):
    """Apply the expert parallelism, then FSDP2 to the dense parameters if configured.

    ``parallel.expert_mode == "ep"``: expert parallelism over ``mesh["ep"]`` (a no-op slice when
    ``ep == 1``). ``"fssdp"``: Hecate's FSSDP over all ranks (``ep`` must be 1).

    Args:
        model: an initialised model, identical on every rank.
        mesh: the ``("dp", "ep")`` DeviceMesh.
        parallel: the ``[parallel]`` config.
        param_dtype: FSDP2 compute dtype (bf16 on CUDA under mixed precision), or None.
        fssdp: the ``[fssdp]`` config (defaults when None).

    Returns:
        The :class:`~system.parallel.fssdp.FSSDPController` under FSSDP, else None.

    Raises:
        ValueError: FSSDP requested with ``parallel.ep > 1``.
    """
    controller = None
    if parallel.expert_mode == "fssdp":
        if mesh["ep"].size() != 1:
            raise ValueError(
                f"parallel.expert_mode='fssdp' shards experts over all ranks; set parallel.ep=1 (got {mesh['ep'].size()})"
            )
        from system.parallel.fssdp.apply import apply_fssdp

        controller = apply_fssdp(model, fssdp or FSSDPConfig())
    else:
        apply_ep(model, mesh)
    if parallel.dense == "fsdp":
        apply_fsdp(model, mesh, param_dtype=param_dtype)
    return controller
