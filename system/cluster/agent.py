"""``moesys train``'s torchrun agent, run in the launcher's own process, and the one-line failure report.

Why in-process. ``python -m torch.distributed.run`` as a child process would put a process between
the launcher and the workers, print a Python traceback and a ``ChildFailedError`` block as its last
lines on any worker failure, and outlive a SIGKILLed launcher. Running torchrun's own
:func:`torch.distributed.run.run` here (the same argument parser, rendezvous, restarts and signal
handling) makes the launcher the workers' parent (so their parent-death signal fires when it dies,
see :mod:`system.train.main`) and lets it read the workers' error files itself: each rank writes its
one-line message to ``TORCHELASTIC_ERROR_FILE``, torchrun collects them into the ``ChildFailedError``,
and :func:`run_agent` turns that into one line per failing rank and a last line naming the root
cause (the earliest failure).
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

from system.train.lifecycle import DEBUG_ENV, LAUNCHER_PID_ENV


@dataclass
class RankFailure:
    """One failed worker: global rank, exit code and its one-line message."""

    rank: int
    exitcode: int
    message: str


@dataclass
class AgentResult:
    """How the job ended, as the launcher reports it.

    Attributes:
        exit_code: 0 on success; the root cause's exit code on a worker failure (2: an expected error,
            143: preempted, 1: a bug); ``128 + N`` when the launcher was stopped by signal ``N``.
        failures: the failed ranks, root cause first.
        message: the root cause in one line (empty on success).
    """

    exit_code: int
    failures: list[RankFailure] = field(default_factory=list)
    message: str = ""


def _one_line(message: str | dict) -> str:
    if isinstance(message, dict):  # torch's own error-file format: {"message": ..., "extraInfo": {...}}
        message = str(message.get("message", message))
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class _DropFailureLines(logging.Filter):
    """Drops torchrun's per-worker ``failed (exitcode: ...)`` records: the report says it once, better."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed (exitcode" not in str(record.msg)


def run_agent(argv: list[str], env: dict[str, str], *, debug: bool = False) -> AgentResult:
    """Run the torchrun agent of ``argv`` (a :func:`~system.cluster.torchrun.build_torchrun_command` argv) here.

    Args:
        argv: ``[python, "-m", "torch.distributed.run", *torchrun_args]``; only the torchrun arguments
            are used (the workers run this interpreter, ``sys.executable``).
        env: variables to add to this process's environment before the agent starts (the workers
            inherit them).
        debug: keep torchrun's own failure records and let workers print tracebacks of expected errors.

    Returns:
        The :class:`AgentResult`; never raises for a worker failure or a signal.

    Raises:
        ValueError: ``argv`` is not a torchrun command line.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if argv[1:3] != ["-m", "torch.distributed.run"]:
        raise ValueError(f"not a torchrun command line: {argv[:3]}")
    os.environ.update(env)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    if debug:
        os.environ[DEBUG_ENV] = "1"
    drop = _DropFailureLines()
    api_logger = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    if not debug:
        api_logger.addFilter(drop)
    try:
        run(parse_args(argv[3:]))
    except ChildFailedError as e:
        return _report(e)
    except SignalException as e:
        return AgentResult(128 + int(e.sigval), [], f"stopped by {signal.Signals(e.sigval).name}")
    finally:
        api_logger.removeFilter(drop)
    return AgentResult(0)


def _report(e) -> AgentResult:
    root_rank, _ = e.get_first_failure()
    failures = []
    for rank, f in e.failures.items():
        message = _one_line(f.message)
        if not message or message.startswith("To enable traceback"):
            message = f"exited with code {f.exitcode} without an error message"
        failures.append(RankFailure(int(rank), int(f.exitcode), message))
    failures.sort(key=lambda f: (f.rank != root_rank, f.rank))
    root = failures[0]
    code = root.exitcode if root.exitcode > 0 else 128 - root.exitcode  # a signal -N -> 128 + N
    return AgentResult(code, failures, root.message)
