"""The processes of a chaos run, read from Linux ``/proc``: found by the controller's token, by parent, by name."""

from __future__ import annotations

import os
import signal
import time

TOKEN_ENV = "MOESYS_CHAOS_TOKEN"
"""Set in the environment of everything the controller starts (launchers, raylets), inherited by the
workers: the controller finds the job's processes by it (``/proc/<pid>/environ``) and ends only those."""



def _read(path: str, binary: bool = False):
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data if binary else data.decode(errors="replace")
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    return (_read(f"/proc/{pid}/cmdline", binary=True) or b"").replace(b"\0", b" ").decode(errors="replace").strip()


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0]


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def processes_with_token(token: str) -> list[int]:
    """Live processes (zombies excluded) whose environment holds ``MOESYS_CHAOS_TOKEN=token``."""
    needle = f"{TOKEN_ENV}={token}".encode()
    out = []
    for pid in _pids():
        raw = _read(f"/proc/{pid}/environ", binary=True)
        if raw and needle in raw.split(b"\0"):
            st = _ppid_and_state(pid)
            if st is not None and st[1] != "Z":
                out.append(pid)
    return sorted(out)


def torchrun_workers(launcher_pid: int) -> list[tuple[int, str]]:
    """``(pid, "rank N")`` of the running training ranks: children of the launcher running ``system.train.main``
    (stopped and zombie processes left out)."""
    out = []
    for pid in _pids():
        st = _ppid_and_state(pid)
        if st and st[0] == launcher_pid and st[1] not in "TtZ" and "system.train.main" in _cmdline(pid):
            env = (_read(f"/proc/{pid}/environ", binary=True) or b"").split(b"\0")
            rank = next((e[5:].decode() for e in env if e.startswith(b"RANK=")), "?")
            out.append((pid, f"rank {rank}"))
    return sorted(out)


def ray_workers(token: str, include_stopped: bool = False) -> list[tuple[int, str]]:
    """``(pid, "node N")`` of Ray Train's worker actors (``ray::RayTrainWorker...``) of this cluster; the
    node is the index of the worker's raylet in start order (0: the head). Ray sets ``RANK`` inside the
    process, so ``/proc`` does not show it."""
    mine = processes_with_token(token)
    raylets = sorted(p for p in mine if "raylet/raylet" in _cmdline(p))
    out = []
    for pid in mine:
        cmd = _cmdline(pid)
        st = _ppid_and_state(pid)
        if st and cmd.startswith("ray::") and "TrainWorker" in cmd and (include_stopped or st[1] not in "TtZ"):
            node = raylets.index(st[0]) if st[0] in raylets else "?"
            out.append((pid, f"node {node}"))
    return out


def end_processes(pids: list[int], grace_s: float = 10.0) -> list[int]:
    """SIGTERM ``pids`` (SIGCONT too: a stopped one could not act on it), SIGKILL those left after
    ``grace_s``; returns the pids that had to be SIGKILLed."""
    for pid in pids:
        for sig in (signal.SIGTERM, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if (_ppid_and_state(p) or (0, "Z"))[1] != "Z"]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive
