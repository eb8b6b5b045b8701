"""Launching: torchrun command lines for one node (``--standalone``) or many (c10d rendezvous).

:class:`LaunchSpec` holds the launch options; :func:`build_torchrun_command` turns it into an
argv plus extra environment variables, :func:`format_command` prints them as a shell line and
:func:`run_command` runs them, forwarding SIGINT/SIGTERM. The shell equivalents live in
``launchers/`` (``torchrun.sh``, ``slurm.sbatch``).

On a Ray cluster, :mod:`system.cluster.ray_launch` (driver: ``RayLaunchSpec``, ``plan_launch``,
``launch``) and :mod:`system.cluster.ray_worker` (the per-worker training loop, resume from the newest
committed checkpoint) run the same job under Ray Train's ``TorchTrainer``; they are not imported here
so that torchrun jobs never import Ray.
"""

from __future__ import annotations

from system.cluster.torchrun import (
    DISABLE_SHARE_STORE_ENV,
    LaunchSpec,
    build_torchrun_command,
    format_command,
    parse_endpoint,
    parse_nnodes,
    run_command,
)

__all__ = [
    "DISABLE_SHARE_STORE_ENV",
    "LaunchSpec",
    "build_torchrun_command",
    "format_command",
    "parse_endpoint",
    "parse_nnodes",
    "run_command",
]
