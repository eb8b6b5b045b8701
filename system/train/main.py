"""Entry point of one training rank: ``python -m system.train.main --config FILE [--section.key value ...]``.

Launched by torchrun (``moesys train`` runs its agent). What a rank does besides training:

- **Dies with its launcher, stops cleanly on SIGTERM** (:mod:`system.train.lifecycle`): SIGTERM when
  the parent dies, even by SIGKILL; SIGTERM (preemption, the agent shutting down) makes every rank
  finish its step, commit a checkpoint of it and exit with code 143.
- **One line per error.** An expected error (:class:`~system.errors.MoesysError`: config, data,
  checkpoint, plan, run folder) prints ``error: [rankN] <message>`` and exits with code 2, and so does
  a failed collective (a peer rank died or hung: ``torch.distributed.DistError``); the message also
  goes to torchrun's error file, from which the launcher's last line repeats the root cause. Any other
  exception is a bug: full traceback, exit code 1. ``MOESYS_DEBUG=1`` (``moesys train --debug``) adds
  the traceback to expected errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback

from system.errors import MoesysError
from system.train.lifecycle import DEBUG_ENV, PREEMPTED_EXIT, Preempted, die_with_parent, install_sigterm_handler
from system.train.log import init_logging

logger = logging.getLogger("system.train")


def _write_error_file(message: str, exc: BaseException | None) -> None:
    """Put ``message`` where torchrun's agent reads it (``TORCHELASTIC_ERROR_FILE``), for the launcher."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": message, "timestamp": int(time.time())}
    if exc is not None:
        data["traceback"] = "".join(traceback.format_exception(exc))
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass


def _is_comm_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(e, getattr(dist, "DistError", ())) or (
        isinstance(e, RuntimeError) and ("Connection closed by peer" in str(e) or "Timed out" in str(e)
                                         or "Connection reset by peer" in str(e))
    )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, clean up; returns the process exit code (see the module docstring)."""
    die_with_parent()
    parser = argparse.ArgumentParser(prog="system.train.main", description=__doc__)
    parser.add_argument("--config", default=None, help="TOML job file (defaults when omitted)")
    args, overrides = parser.parse_known_args(argv)
    init_logging()
    rank = os.environ.get("RANK", "0")
    debug = os.environ.get(DEBUG_ENV) == "1"
    from system.config.loader import load_config
    from system.train.trainer import Trainer

    install_sigterm_handler()
    try:
        cfg = load_config(args.config, overrides)
        from system.distributed.init import shutdown_distributed

        Trainer(cfg).run()  # on an exception torchrun tears the other ranks down; no collective teardown here
        shutdown_distributed()
        return 0
    except Preempted as e:
        print(f"[rank{rank}] {e}", file=sys.stderr, flush=True)
        _write_error_file(str(e), None)
        return PREEMPTED_EXIT
    except (MoesysError, FileNotFoundError) as e:
        message = str(e)
        code = 2
    except Exception as e:  # noqa: BLE001 - classify, then report
        if not _is_comm_failure(e):  # a bug: the whole traceback
            traceback.print_exc()
            _write_error_file(f"{type(e).__name__}: {e}", e)
            return 1
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = f"a collective failed, so a peer rank died, hung or was stopped ({type(e).__name__}: {first})"
        code = 2
    if debug:
        traceback.print_exc()
    print(f"error: [rank{rank}] {message}", file=sys.stderr, flush=True)
    _write_error_file(message, None)
    return code


def _exit(code: int) -> None:
    """Exit with ``code``; after a failure without waiting for background threads.

    A rank that failed may still have a checkpoint save in flight, blocked in the checkpoint group's
    collective on a peer that died or hangs (its timeout is long: slow storage is not a failure); the
    interpreter's normal exit would join that thread and keep the rank alive. A failed rank exits now:
    an unfinished save is uncommitted, which the commit protocol makes harmless.
    """
    if code == 0:
        sys.exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
