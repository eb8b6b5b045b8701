"""A training rank's life: dying with its launcher, and stopping cleanly on SIGTERM (preemption).

- :func:`die_with_parent`: the kernel sends this process SIGTERM when its parent (the torchrun agent,
  i.e. the ``moesys train`` process) dies, even by SIGKILL (``prctl(PR_SET_PDEATHSIG)``, Linux; a
  no-op elsewhere). A rank whose parent is already gone exits at once.
- :func:`install_sigterm_handler`: SIGTERM (Slurm or a cloud preempting the node, the agent shutting
  the job down, the parent-death signal) or SIGINT (Ctrl-C forwarded by the agent) only sets a flag, :func:`preempt_requested`; the trainer
  shares it with every rank in the step's one all-reduce, so all ranks stop after the same step,
  commit a checkpoint of it, and exit with :data:`PREEMPTED_EXIT`. A rank that is still alive
  :data:`SHUTDOWN_GRACE_S` seconds after the SIGTERM (stuck in a collective with a dead peer) exits
  by itself, so no worker outlives its launcher by more than that.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from system.train.run_folder import pid_alive

logger = logging.getLogger(__name__)

LAUNCHER_PID_ENV = "MOESYS_LAUNCHER_PID"
"""Set by ``moesys train`` for its workers: the pid their parent must have."""
DEBUG_ENV = "MOESYS_DEBUG"
"""``1``: workers print the full traceback of expected errors too (``moesys train --debug``)."""
PREEMPTED_EXIT = 128 + signal.SIGTERM
"""Exit code of a rank stopped by SIGTERM (after committing a checkpoint when it could): 143."""
SHUTDOWN_GRACE_S = 60
"""Seconds a rank may take after SIGTERM to commit its checkpoint before it ends itself; the launcher's
torchrun agent waits as long before it sends SIGKILL (``--shutdown-timeout``)."""

_PR_SET_PDEATHSIG = 1
_requested = threading.Event()
_signal_name = ["SIGTERM"]


class Preempted(Exception):
    """Raised by the trainer after SIGTERM, once the checkpoint of the current step is committed."""


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux; a no-op elsewhere).

    Exits at once (code 143) when the parent is already gone: it is init, or ``MOESYS_LAUNCHER_PID``
    names a launcher that no longer runs.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: nothing more we can do
        return
    expected = os.environ.get(LAUNCHER_PID_ENV, "")
    gone = os.getppid() == 1 or (expected.isdigit() and int(expected) != os.getppid() and not pid_alive(int(expected)))
    if gone:
        print(f"error: [rank{os.environ.get('RANK', '?')}] the launcher exited before this rank started",
              file=sys.stderr, flush=True)
        os._exit(PREEMPTED_EXIT)


def _on_sigterm(signum: int, _frame) -> None:
    if _requested.is_set():
        return
    _signal_name[0] = signal.Signals(signum).name
    _requested.set()
    logger.warning("%s: committing a checkpoint of the current step, then stopping (%d s grace)",
                   _signal_name[0], SHUTDOWN_GRACE_S)
    timer = threading.Timer(SHUTDOWN_GRACE_S, _give_up)
    timer.daemon = True
    timer.start()


def _give_up() -> None:
    print(f"error: [rank{os.environ.get('RANK', '?')}] still running {SHUTDOWN_GRACE_S} s after SIGTERM "
          f"(stuck in a collective?); exiting", file=sys.stderr, flush=True)
    os._exit(PREEMPTED_EXIT)


def install_sigterm_handler() -> bool:
    """Route SIGTERM and SIGINT to :func:`preempt_requested` (main thread only); returns whether installed.

    SIGINT is what torchrun's agent forwards when the launcher gets Ctrl-C: it stops the job the same
    way, with a checkpoint of the current step, rather than with a ``KeyboardInterrupt`` traceback per rank.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigterm)
    return True


def preempt_requested() -> bool:
    """Whether this process received SIGTERM (or SIGINT)."""
    return _requested.is_set()


def stop_signal_name() -> str:
    """The name of the signal that asked this process to stop (``SIGTERM`` unless it was SIGINT)."""
    return _signal_name[0]
