"""Launching: torchrun command lines for one node (``--standalone``) or many (c10d rendezvous).

:class:`LaunchSpec` holds the launch options; :func:`build_torchrun_command` turns it into an
argv plus extra environment variables, :func:`format_command` prints them as a shell line and
:func:`run_command` runs them, forwarding SIGINT/SIGTERM. The shell equivalents live in
``launchers/`` (``torchrun.sh``, ``slurm.sbatch``).
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
