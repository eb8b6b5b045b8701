"""A run folder's state and its lock: one job writes a run folder at a time, and a fresh run never
mixes with (or silently clobbers) an earlier one.

The lock is a file, ``<folder>/.moesys.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local
file systems and NFSv3+), holding JSON: the holder's host, pid, process start time, job id (torchrun's
rendezvous id, Ray's run name) and when it was taken. Rank 0 of a job takes it before writing
anything and removes it at the end; a holder that died without removing it (SIGKILL, a lost node)
leaves a *stale* lock, which the next job takes over:

- on the holder's host, the lock is stale when no process with that pid and start time exists
  (a recycled pid is told apart by its start time, read from ``/proc/<pid>/stat``);
- from another host the process cannot be seen, so the holder refreshes the lock's mtime every
  :data:`HEARTBEAT_S` seconds and the lock is stale once it is older than :data:`STALE_AFTER_S`;
- a lock holding this job's own id (a worker-group restart after a failure, rank 0 now on another
  node) is taken over unless its process still runs on this host (another job that reused the id:
  ``--rdzv-id`` defaults to ``moesys``).

Taking over renames the stale file to a unique name first (only one contender's rename succeeds),
then creates the lock with ``O_EXCL`` again, so two jobs racing for a stale lock never both win.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from system.errors import RunFolderError

logger = logging.getLogger(__name__)

LOCK_FILE = ".moesys.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
RUN_FILES = ("metrics.jsonl", "summary.json")
"""Files of a run's records directly under the run folder (with ``tb/`` and the exported model)."""


def _proc_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (``kill(pid, 0)``; owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run folder's lock (the JSON in the lock file)."""

    host: str
    pid: int
    job_id: str
    since: float  # unix seconds
    start_time: int | None = None  # process start, clock ticks since boot (Linux)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on host {self.host} (job {self.job_id}, since {when})"

    def blocks(self, job_id: str | None, mtime: float) -> bool:
        """Whether this holder keeps job ``job_id`` out: it runs, and it is not this job's own lock
        held from another host (which a restart takes over; the holder there was stopped by its agent)."""
        if not self.pid or not self.is_alive(mtime):
            return False
        return not (job_id is not None and self.job_id == job_id and self.host != socket.gethostname())

    def is_alive(self, mtime: float) -> bool:
        """Whether the holding process still runs (see the module docstring for how it is told)."""
        if self.host == socket.gethostname():
            if not pid_alive(self.pid):
                return False
            now_start = _proc_start_time(self.pid)
            return self.start_time is None or now_start is None or now_start == self.start_time
        return time.time() - mtime < STALE_AFTER_S


def read_lock(folder: str | os.PathLike) -> tuple[LockHolder, float] | None:
    """The holder of ``folder``'s lock and the lock file's mtime, or None when there is no lock.

    An unreadable or malformed lock file (a crash while writing it) counts as a stale lock of an
    unknown holder: pid 0, host ``?``, job ``?``, mtime 0.
    """
    path = Path(folder) / LOCK_FILE
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError:
        return LockHolder("?", 0, "?", 0.0), 0.0
    try:
        d = json.loads(text)
        return LockHolder(str(d["host"]), int(d["pid"]), str(d["job_id"]), float(d["since"]), d.get("start_time")), mtime
    except (ValueError, KeyError, TypeError):
        return LockHolder("?", 0, "?", 0.0), 0.0


def check_unlocked(folder: str | os.PathLike, job_id: str | None = None) -> None:
    """Raise when a live job other than ``job_id`` holds ``folder``'s lock (launch-time check; takes nothing).

    Raises:
        RunFolderError: naming the folder and the holder's host, pid and job.
    """
    found = read_lock(folder)
    if found is None:
        return
    holder, mtime = found
    if holder.blocks(job_id, mtime):
        raise RunFolderError(
            f"run folder {folder} is in use by {holder.describe()}; stop that job first, or choose another "
            f"--metrics.run_dir"
        )


class RunLock:
    """The lock of one run folder, held by rank 0 of a job (see the module docstring).

    Args:
        folder: the run folder (created if missing).
        job_id: this job's id; a lock holding the same id is taken over (a restart of this job).

    Use :meth:`acquire` then :meth:`release` (or the object as a context manager).
    """

    def __init__(self, folder: str | os.PathLike, job_id: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.job_id = job_id
        self.holder: LockHolder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one or one of this job; start the heartbeat.

        Raises:
            RunFolderError: a live job holds it (naming its host and pid), or the folder is not writable.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"cannot create run folder {self.folder}: {e.strerror or e}") from None
        me = LockHolder(socket.gethostname(), os.getpid(), self.job_id, time.time(), _proc_start_time(os.getpid()))
        for _ in range(3):
            if self._create(me):
                self.holder = me
                self._start_heartbeat()
                return
            found = read_lock(self.folder)
            if found is None:
                continue  # released between our attempt and the read
            holder, mtime = found
            if holder.pid == os.getpid() and holder.job_id == self.job_id:
                pass  # our own lock (acquired twice): take it over
            elif holder.blocks(self.job_id, mtime):
                raise RunFolderError(
                    f"run folder {self.folder} is in use by {holder.describe()}; stop that job first, or choose "
                    f"another --metrics.run_dir"
                )
            reason = "this job's earlier attempt" if holder.job_id == self.job_id else "a process that is gone"
            logger.warning("run folder %s: taking over the lock of %s (%s)", self.folder, holder.describe(), reason)
            stale = self.folder / f"{LOCK_FILE}.stale-{os.getpid()}"
            try:
                os.rename(self.path, stale)  # only one contender's rename succeeds
                stale.unlink()
            except FileNotFoundError:
                pass  # another contender moved it first; retry the create
        raise RunFolderError(f"could not take the lock {self.path}: other jobs keep taking it")

    def _create(self, me: LockHolder) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise RunFolderError(f"run folder {self.folder} is not writable: {e.strerror or e}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me.__dict__, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._thread = threading.Thread(target=beat, name="moesys-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (a no-op otherwise)."""
        self._stop.set()
        if self.holder is None:
            return
        found = read_lock(self.folder)
        if found is not None and found[0].pid == self.holder.pid and found[0].job_id == self.job_id:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.holder = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def earlier_run(run_dir: str | os.PathLike, checkpoint_root: str) -> list[str]:
    """What an earlier run left in ``run_dir`` and ``checkpoint_root``: e.g. ``["checkpoints up to step 4 (latest:
    step_00000004)", "metrics.jsonl"]``; empty for a new or empty folder.

    Only local checkpoint roots are listed (an object-store root is not inspected here).
    """
    from system.checkpoint.storage import list_checkpoints, read_latest

    found: list[str] = []
    if "://" not in checkpoint_root or checkpoint_root.startswith("file://"):
        root = checkpoint_root.removeprefix("file://")
        if os.path.isdir(root):
            committed = list_checkpoints(root)
            latest = read_latest(root)
            if committed or latest:
                last = committed[-1].rstrip("/").rsplit("/", 1)[-1] if committed else None
                found.append(f"checkpoints in {root} (newest {last or 'none committed'}, latest -> {latest or 'none'})")
    run = Path(run_dir)
    for name in RUN_FILES:
        if (run / name).is_file():
            found.append(str(run / name))
    return found


def earlier_run_error(run_dir: str | os.PathLike, found: list[str]) -> RunFolderError:
    """The error for a fresh start in a folder holding :func:`earlier_run`'s ``found``, naming the ways out."""
    return RunFolderError(
        f"run folder {run_dir} holds an earlier run ({'; '.join(found)}). To continue it pass "
        f"--checkpoint.resume latest; to keep it and start anew pass a new --metrics.run_dir; to delete it and "
        f"start anew pass --checkpoint.overwrite true"
    )


def clear_earlier_run(run_dir: str | os.PathLike, checkpoint_root: str) -> list[str]:
    """Delete what :func:`earlier_run` lists, plus ``tb/`` (``checkpoint.overwrite``).

    Deletes only what a run writes: the ``step_*`` folders and ``latest`` under a local
    ``checkpoint_root``, ``metrics.jsonl``, ``summary.json`` and ``tb/``; any other file in the folders
    is left alone. The exported model is not deleted here: the final export replaces an earlier export
    (one carrying the export marker) and refuses anything else. Returns the paths deleted.
    """
    from system.checkpoint.storage import LATEST_FILE

    deleted: list[str] = []
    run = Path(run_dir)
    if "://" not in checkpoint_root or checkpoint_root.startswith("file://"):
        root = Path(checkpoint_root.removeprefix("file://"))
        if root.is_dir():
            for entry in sorted(root.iterdir()):
                if (entry.name.startswith("step_") and entry.is_dir()) or entry.name == LATEST_FILE:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                    deleted.append(str(entry))
    for name in (*RUN_FILES, "tb"):
        entry = run / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
            deleted.append(str(entry))
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
            deleted.append(str(entry))
    return deleted
