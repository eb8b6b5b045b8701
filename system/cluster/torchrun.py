"""Build, print and run ``torchrun`` (``python -m torch.distributed.run``) command lines.

One node uses ``--standalone`` (a local rendezvous on a free port); several nodes use the
``c10d`` rendezvous backend at ``HOST:PORT`` with one torchrun agent per node. Under ``c10d``
torchrun assigns node ranks itself, so ``--node-rank`` is never passed.
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from types import FrameType

from system.train.lifecycle import SHUTDOWN_GRACE_S

# Set for elastic ranges and restarts: with the rendezvous TCP store shared with the workers,
# a node joining (or rejoining) a running job deadlocks (pytorch/pytorch#135712).
DISABLE_SHARE_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"

_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@functools.lru_cache(maxsize=1)
def torchrun_has_shutdown_timeout() -> bool:
    """Whether this torch's torchrun takes ``--shutdown-timeout`` (added after torch 2.11).

    An older torchrun waits its built-in grace (30 s) between SIGTERM and SIGKILL to the workers.
    """
    from torch.distributed.run import get_args_parser

    return any("--shutdown-timeout" in a.option_strings for a in get_args_parser()._actions)


@dataclass
class LaunchSpec:
    """How to launch one torchrun agent (one per node).

    Attributes:
        nproc_per_node: worker processes (normally GPUs) on each node.
        nnodes: ``"N"`` for a fixed node count, or ``"MIN:MAX"`` for an elastic range.
        rdzv_endpoint: ``HOST:PORT`` of the c10d rendezvous; required across nodes.
        rdzv_id: job id shared by all agents of the same job.
        max_restarts: how many times torchrun restarts the worker group after a failure.
        shutdown_timeout: seconds torchrun waits after SIGTERM to the workers before SIGKILL: their
            time to commit a checkpoint of the current step (:mod:`system.train.lifecycle`).
        module: the Python module the workers run (``python -m <module>``).
        python: the interpreter that runs torchrun.
    """

    nproc_per_node: int
    nnodes: str = "1"
    rdzv_endpoint: str = ""
    rdzv_id: str = "moesys"
    max_restarts: int = 0
    shutdown_timeout: int = SHUTDOWN_GRACE_S
    module: str = "system.train.main"
    python: str = field(default_factory=lambda: sys.executable)


def parse_nnodes(nnodes: str) -> tuple[int, int]:
    """Parse ``"N"`` or ``"MIN:MAX"`` into ``(min_nodes, max_nodes)``.

    Raises:
        ValueError: not of that form, or not ``1 <= MIN <= MAX``.
    """
    text = str(nnodes).strip()
    parts = text.split(":")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"nnodes must be 'N' or 'MIN:MAX' with 1 <= MIN <= MAX, got {nnodes!r}")
    lo, hi = int(parts[0]), int(parts[-1])
    if lo < 1 or lo > hi:
        raise ValueError(f"nnodes must be 'N' or 'MIN:MAX' with 1 <= MIN <= MAX, got {nnodes!r} (MIN={lo}, MAX={hi})")
    return lo, hi


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) into ``(host, port)``.

    Raises:
        ValueError: no host, or a port that is not an integer in 1..65535.
    """
    host, sep, port_text = endpoint.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"rdzv_endpoint must be HOST:PORT, got {endpoint!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"rdzv_endpoint port must be in 1..65535, got {port} in {endpoint!r}")
    return host, port


def build_torchrun_command(spec: LaunchSpec, job_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Build the torchrun argv and the extra environment variables for one node's agent.

    On one node (``nnodes`` of exactly one node and no ``rdzv_endpoint``) the command is
    ``--standalone --nnodes 1 --nproc-per-node P`` (plus ``--max-restarts R`` when R > 0);
    otherwise ``--nnodes N|MIN:MAX --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint
    HOST:PORT --rdzv-id ID --max-restarts R``; then ``--shutdown-timeout S`` (when S > 0), ``-m <module>``
    and ``job_args`` verbatim.

    Args:
        spec: the launch options.
        job_args: arguments for the job module (e.g. ``["--config", "x.toml"]``), passed unchanged.

    Returns:
        ``(argv, env)``: ``env`` holds the variables to add to the current environment;
        it sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for elastic ranges or ``max_restarts > 0``.

    Raises:
        ValueError: ``nproc_per_node < 1``; a malformed ``nnodes``; several nodes without
            ``rdzv_endpoint``; a malformed ``rdzv_endpoint`` or port outside 1..65535;
            ``max_restarts < 0``; an empty ``rdzv_id`` or ``module``.
    """
    if not isinstance(spec.nproc_per_node, int) or spec.nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be an integer >= 1, got {spec.nproc_per_node!r}")
    if not isinstance(spec.max_restarts, int) or spec.max_restarts < 0:
        raise ValueError(f"max_restarts must be an integer >= 0, got {spec.max_restarts!r}")
    min_nodes, max_nodes = parse_nnodes(spec.nnodes)
    if not spec.module:
        raise ValueError("module must name the Python module to run, got an empty string")

    env: dict[str, str] = {}
    if min_nodes != max_nodes or spec.max_restarts > 0:
        env[DISABLE_SHARE_STORE_ENV] = "1"

    argv = [spec.python, "-m", "torch.distributed.run"]
    if max_nodes == 1 and not spec.rdzv_endpoint:
        argv += ["--standalone", "--nnodes", "1", "--nproc-per-node", str(spec.nproc_per_node)]
        if spec.max_restarts > 0:
            argv += ["--max-restarts", str(spec.max_restarts)]
    else:
        if not spec.rdzv_endpoint:
            raise ValueError(
                f"rdzv_endpoint (HOST:PORT) is required when nnodes={spec.nnodes!r} spans more than one node"
            )
        parse_endpoint(spec.rdzv_endpoint)
        if not spec.rdzv_id:
            raise ValueError("rdzv_id must be a non-empty job id shared by all nodes, got an empty string")
        nnodes = str(min_nodes) if min_nodes == max_nodes else f"{min_nodes}:{max_nodes}"
        argv += [
            "--nnodes", nnodes,
            "--nproc-per-node", str(spec.nproc_per_node),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", spec.rdzv_endpoint.strip(),
            "--rdzv-id", spec.rdzv_id,
            "--max-restarts", str(spec.max_restarts),
        ]  # fmt: skip
    # Another interpreter's torch is not inspected here: launchers/torchrun.sh asks its torchrun instead.
    if spec.shutdown_timeout and (spec.python != sys.executable or torchrun_has_shutdown_timeout()):
        argv += ["--shutdown-timeout", str(spec.shutdown_timeout)]
    argv += ["-m", spec.module, *job_args]
    return argv, env


def format_command(argv: list[str], env: dict[str, str] | None = None) -> str:
    """A copy-pasteable shell line: ``VAR=value ... argv`` with shell quoting.

    Args:
        argv: the command.
        env: extra environment variables, written as ``VAR=value`` prefixes (sorted by name).
    """
    prefix = [f"{name}={shlex.quote(value)}" for name, value in sorted((env or {}).items())]
    return " ".join([*prefix, shlex.join(argv)])


def run_command(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``argv`` with the current environment plus ``env``, inheriting stdin/stdout/stderr.

    SIGINT and SIGTERM received by this process while the child runs are forwarded to the child
    (when called from the main thread), and this process waits for the child to exit.

    Args:
        argv: the command.
        env: extra environment variables (override the inherited ones).

    Returns:
        The child's exit code; ``128 + N`` when the child was killed by signal ``N``.

    Raises:
        OSError: the command could not be started (e.g. the executable does not exist).
    """
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(argv, env=full_env)

    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():

        def _forward(signum: int, _frame: FrameType | None) -> None:
            if proc.poll() is None:
                proc.send_signal(signum)

        for sig in _FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, _forward)
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            # ``None`` means a handler not installed from Python; the default is the closest match.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # type: ignore[arg-type]
    return 128 - code if code < 0 else code
