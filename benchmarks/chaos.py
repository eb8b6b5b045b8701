"""Chaos run: how much of a training job survives SIGKILLs, a hang and a preemption.

A small training job (the tiny config, 2 ranks, EP=2, Gloo) runs under a launcher while this process,
the controller, injects faults at seeded random points and watches what the job leaves behind:

- ``torchrun``: ``moesys train --max-restarts R`` (torchrun's agent inside the launcher process; the
  workers are its children).
- ``ray``: ``moesys launch --ray-address 127.0.0.1:P --num-nodes 2 --workers-per-node 1`` against two
  raylets on this machine (``ray start --head --port P`` and ``ray start --address 127.0.0.1:P``, one
  CPU each) that the controller starts and, at the end, ends by process id (never ``ray stop``, which
  would stop every Ray instance on the machine). Ray registers both at the host's own address: ``ray
  start`` rewrites 127.0.0.1 unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which a joining node refuses.
- ``torchrun_stop_in_save`` (a probe, not a chaos run): one SIGSTOP while a checkpoint is being
  written; the controller watches for ``--hang-watch`` seconds whether the job restarts.

Faults (the victim is a random worker; the step is random within its share of the run):

- ``sigkill``: SIGKILL once the job has logged the chosen step.
- ``sigkill_mid_save``: SIGKILL while a checkpoint is being written. The save of the chosen step is
  held uncommitted for ``--save-delay`` seconds after its data files are written and before
  ``metadata.json`` (the test-only hook ``MOESYS_FAULT_CKPT_WRITE_DELAY_S=SECONDS@step_NNNNNNNN`` of
  :mod:`system.checkpoint.writer`; other saves are not delayed); the controller waits for that
  directory to hold every rank's data file and no ``metadata.json``, and kills at a random moment of
  the first half of the window. Saves are asynchronous: training goes on while one is written.
- ``sigstop``: SIGSTOP (a hang) once the job has logged the chosen step, at a point where no save is
  in flight; the job must notice it through the collective timeout (``--comm.train_timeout_seconds``)
  and restart. The stopped process is never continued by the controller.
- ``sigterm`` (torchrun only): SIGTERM to one worker (a preemption): every rank stops after the same
  step, commits a checkpoint of it and exits with 143; the agent restarts the group, which resumes
  from that checkpoint.

The next fault is armed once the job has recovered from the previous one (a step logged by a new
attempt). Reported, per run:

- goodput = completed steps / steps computed, where steps computed counts every step any attempt
  logged (``metrics.jsonl`` is append-only; ``--training.log_interval 1``), recomputed ones included
  (TorchFT's definition);
- per failure: seconds from the signal to the first step logged after the restart (also to the new
  attempt's resume marker, written once it has loaded its checkpoint; for a hang, to the launcher
  line reporting the collective timeout), steps recomputed (last step the failed attempt logged
  minus the step the next attempt resumed from), whether a save was in flight, and whether the job
  resumed from the newest checkpoint committed before it restarted;
- checkpoints: every committed one left is re-read with :func:`system.checkpoint.verify`
  (``checkpoint.keep_last 0`` keeps them all); ``latest`` must name a committed one; a checkpoint
  seen committed during the run must still be there; the directory of a save killed mid-write must
  not have been committed by the killed attempt;
- the final per-step train losses (:func:`system.train.metrics.read_metrics`, which keeps each step's
  last computation) against an uninterrupted reference run of the same config (``moesys train``
  without faults);
- the launcher's exit code and the processes of the job still alive after it exited.

Usage (from the repository root)::

    python benchmarks/chaos.py                                  # torchrun + ray + stop-in-save probe (~8 min)
    python benchmarks/chaos.py --scenarios torchrun --kills 2   # one launcher, fewer faults
    python benchmarks/chaos.py --seed 7 --steps 200 --interval 10

Writes ``<out>/chaos_cpu<tag>.json`` (configuration, every fault with its timings, every attempt,
checkpoint checks, losses, versions, host, commit, command) and ``<out>/chaos_cpu<tag>.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    free_port, provenance, setup_logging, write_json, write_text,
)
from benchmarks.chaos_procs import (  # noqa: E402
    TOKEN_ENV, _cmdline, _ppid_and_state, _read, end_processes, processes_with_token, ray_workers, torchrun_workers,
)
from benchmarks.chaos_report import _fmt, checks, render_markdown  # noqa: E402
from system.checkpoint import verify  # noqa: E402
from system.checkpoint.errors import CheckpointError  # noqa: E402
from system.checkpoint.writer import FAULT_WRITE_DELAY_ENV  # noqa: E402
from system.train.metrics import read_metrics  # noqa: E402

logger = logging.getLogger("benchmarks.chaos")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/cpu-tiny.toml"
WORLD = 2  # the tiny config: EP=2 over 2 ranks
POLL_S = 0.01
SCENARIOS = ("torchrun", "ray", "torchrun_stop_in_save")
KINDS = ("sigkill", "sigkill_mid_save", "sigstop", "sigterm")
SIGNALS = {"sigkill": signal.SIGKILL, "sigkill_mid_save": signal.SIGKILL, "sigstop": signal.SIGSTOP,
           "sigterm": signal.SIGTERM, "sigstop_mid_save": signal.SIGSTOP}
MID_SAVE = ("sigkill_mid_save", "sigstop_mid_save")
# Launcher lines that say a hang was detected (the surviving rank's collective timed out).
HANG_DETECTED = re.compile(r"collective failed|Timed out waiting")


def job_overrides(steps: int, interval: int, train_timeout_s: int) -> list[str]:
    """``--section.key value`` overrides of ``configs/cpu-tiny.toml`` for the chaos job (and its reference)."""
    return [
        "--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.expert_dim", "64",
        "--training.seq_len", "64", "--training.batch_size", "4", "--training.steps", str(steps),
        "--training.log_interval", "1", "--training.eval_interval", "0", "--training.eval_batches", "2",
        "--training.sample_tokens", "0", "--training.warmup_steps", "10", "--training.threads_per_rank", "1",
        "--metrics.tensorboard", "false", "--metrics.progress", "false",
        "--checkpoint.interval", str(interval), "--checkpoint.keep_last", "0", "--checkpoint.save_final", "false",
        "--comm.train_timeout_seconds", str(train_timeout_s),
    ]


# --------------------------------------------------------------------------------------------
# the job's files


def committed_steps(ckpt_root: Path) -> dict[int, bool]:
    """``{step: committed}`` for every ``step_*`` directory (committed: ``metadata.json`` exists)."""
    out = {}
    try:
        names = os.listdir(ckpt_root)
    except OSError:
        return out
    for name in names:
        m = re.fullmatch(r"step_(\d+)", name)
        if m:
            out[int(m.group(1))] = (ckpt_root / name / "metadata.json").exists()
    return out


def read_latest_step(ckpt_root: Path) -> int | None:
    text = _read(str(ckpt_root / "latest"))
    m = re.fullmatch(r"step_(\d+)", (text or "").strip())
    return int(m.group(1)) if m else None


class MetricsTail:
    """Reads new complete lines of ``metrics.jsonl`` as they are appended, stamping each with the time seen."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""
        self.rows: list[tuple[float, dict]] = []  # (unix time seen, row), in file order

    def poll(self) -> list[tuple[float, dict]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        now = time.time()
        new = [(now, json.loads(line)) for line in lines if line.strip()]
        self.rows.extend(new)
        return new


class OutputLog:
    """Drains a launcher's merged stdout/stderr on a thread into a file (each line prefixed with the unix
    time it was read), keeping ``(unix time, line)``."""

    def __init__(self, proc: subprocess.Popen, path: Path):
        self.lines: list[tuple[float, str]] = []
        self._file = open(path, "w", buffering=1)  # noqa: SIM115 - closed by the thread
        self._thread = threading.Thread(target=self._drain, args=(proc,), daemon=True)
        self._thread.start()

    def _drain(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            now = time.time()
            self.lines.append((now, line.rstrip("\n")))
            self._file.write(f"{now:.3f} {line}")
        self._file.close()

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)

    def first_after(self, t: float, pattern: re.Pattern) -> tuple[float, str] | None:
        return next(((ts, ln) for ts, ln in list(self.lines) if ts >= t and pattern.search(ln)), None)


# --------------------------------------------------------------------------------------------
# faults


@dataclass
class Fault:
    """One planned fault and, once fired, what the controller saw."""

    kind: str
    target_step: int  # fire once the job has logged this step (mid-save: the step being saved)
    victim_index: int  # index into the sorted worker list at firing time
    delay_fraction: float = 0.0  # where to fire: mid-save, this fraction of the hold window; else x 0.2 s
    fired: bool = False
    t_fault: float | None = None  # unix time of the signal
    pid: int | None = None
    victim: str | None = None  # "rank N" (torchrun) or "node N" (Ray)
    attempt: int | None = None  # index of the attempt it hit (0 = first)
    last_logged_step: int | None = None  # the attempt's last logged step when the signal went
    save_in_flight: int | None = None  # step of an uncommitted save under way at the signal
    latest_at_fault: int | None = None
    committed_at_fault: list[int] = field(default_factory=list)
    recovered: bool = False


def plan_faults(seed: int, steps: int, interval: int, kinds: list[str]) -> list[Fault]:
    """Seeded fault plan: ``kinds`` in a random order, each at a random step of its share of the run.

    The run from step ``interval + 2`` to ``steps - interval`` is cut into ``len(kinds)`` equal shares;
    each fault lands in its share: ``sigkill_mid_save`` on a checkpoint step, ``sigstop`` on a step
    whose next two steps are not checkpoint steps (so no save can be in flight), the others anywhere.

    Raises:
        ValueError: too many faults for the run (a share shorter than one checkpoint interval), or an
            unknown kind.
    """
    rng = random.Random(seed)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown fault kinds {bad}; allowed: {', '.join(KINDS)}")
    lo, hi = interval + 2, steps - interval
    share = (hi - lo) // max(len(kinds), 1)
    if kinds and share < interval:
        raise ValueError(f"{len(kinds)} faults do not fit {steps} steps with checkpoint.interval={interval}: each "
                         f"needs a share of >= {interval} steps between steps {lo} and {hi}")
    order = list(kinds)
    rng.shuffle(order)
    faults = []
    for i, kind in enumerate(order):
        a, b = lo + i * share, lo + (i + 1) * share - 1
        if kind == "sigkill_mid_save":
            choices = [s for s in range(a, b + 1) if s % interval == 0]
        elif kind == "sigstop":
            choices = [s for s in range(a, b + 1) if s % interval not in (0, interval - 1, interval - 2)]
        else:
            choices = list(range(a, b + 1))
        faults.append(Fault(kind, rng.choice(choices), rng.randrange(1 << 30), rng.uniform(0.05, 0.5)))
    return faults


def delay_env(seconds: float, faults: list[Fault]) -> dict[str, str]:
    """The ``MOESYS_FAULT_CKPT_WRITE_DELAY_S`` setting that holds the saves of the mid-save faults' steps."""
    names = [f"step_{f.target_step:08d}" for f in faults if f.kind in MID_SAVE]
    return {FAULT_WRITE_DELAY_ENV: f"{seconds:g}@{','.join(names)}"} if names else {}


# --------------------------------------------------------------------------------------------
# the controller


@dataclass
class RunSpec:
    """One chaos run: how to start the job and what to inject.

    ``workers(launcher_pid)`` lists the ``(pid, label)`` of the job's running training processes.
    """

    name: str  # "torchrun" | "ray" | "torchrun_stop_in_save"
    argv: list[str]
    env: dict[str, str]
    run_dir: Path  # where metrics.jsonl is
    ckpt_root: Path
    workers: Callable[[int], list[tuple[int, str]]]
    faults: list[Fault]
    interval: int
    steps: int
    save_delay_s: float
    token: str
    timeout_s: float  # the whole run
    recover_timeout_s: float  # per fault: give up (and stop the job) when no step follows it by then


class Controller:
    """Starts a launcher, fires the :class:`Fault` s at their points, records what happens.

    Everything is observed from outside the job: ``metrics.jsonl`` (rows and resume markers), the
    checkpoint root (step directories, ``metadata.json``, ``latest``), the launcher's output and ``/proc``.
    A fault is armed once the previous one has recovered (a step logged by a later attempt). When no
    step follows a fault within ``recover_timeout_s`` (or the run exceeds ``timeout_s``) the controller
    records why and ends the launcher and the workers.
    """

    def __init__(self, spec: RunSpec, log_path: Path):
        self.spec = spec
        self.log_path = log_path
        self.tail = MetricsTail(spec.run_dir / "metrics.jsonl")
        self.attempt = 0
        self.attempt_last_step: int | None = None  # last step logged by the current attempt
        self.markers: list[dict] = []  # resume markers, with what the checkpoint root held when seen
        self.committed_seen: set[int] = set()
        self.killed_saves: list[int] = []  # steps whose save a fault interrupted
        self.aborted: str | None = None
        self.launcher_pid = 0

    # ---------------------------------------------------------------- observation
    def _observe(self) -> None:
        for t, row in self.tail.poll():
            if row.get("event") == "resume":
                self.attempt += 1
                self.attempt_last_step = None
                states = committed_steps(self.spec.ckpt_root)
                self.markers.append({"t_seen": t, "attempt": self.attempt, "latest": read_latest_step(
                    self.spec.ckpt_root), "committed": sorted(s for s, ok in states.items() if ok)})
            elif "loss" in row:
                self.attempt_last_step = int(row["step"])
        for step, ok in committed_steps(self.spec.ckpt_root).items():
            if ok:
                self.committed_seen.add(step)

    def _save_in_flight(self) -> int | None:
        """The step of an uncommitted directory the current attempt may be writing (not one left behind
        by an interrupted save that this attempt has not reached yet)."""
        last = self.attempt_last_step or 0
        for step, ok in sorted(committed_steps(self.spec.ckpt_root).items()):
            if not ok and step <= last + 1 and not (step in self.killed_saves and step > last):
                return step
        return None

    def _held_uncommitted(self, step: int) -> bool:
        """Every rank's data file of ``step`` written (size steady over 20 ms) and no ``metadata.json``."""
        d = self.spec.ckpt_root / f"step_{step:08d}"
        files = [d / f"data-{r:05d}.bin" for r in range(WORLD)]
        if (d / "metadata.json").exists() or not all(p.exists() for p in files):
            return False
        sizes = [p.stat().st_size for p in files]
        time.sleep(0.02)
        return sizes == [p.stat().st_size for p in files] and min(sizes) > 0 and not (d / "metadata.json").exists()

    # ---------------------------------------------------------------- firing
    def _ready(self, fault: Fault) -> bool:
        last, interval = self.attempt_last_step, self.spec.interval
        if last is None:
            return False
        if fault.kind in MID_SAVE:
            meta = self.spec.ckpt_root / f"step_{fault.target_step:08d}" / "metadata.json"
            if last > fault.target_step and meta.exists():
                raise RuntimeError(f"the save of step {fault.target_step} committed before the controller saw it "
                                   f"in flight; raise --save-delay")
            if last < fault.target_step or not self._held_uncommitted(fault.target_step):
                return False
            time.sleep(fault.delay_fraction * self.spec.save_delay_s)
            return not meta.exists()
        if last < fault.target_step:
            return False
        if fault.kind == "sigstop":  # away from saves: none in flight, and the next step does not save
            return self._save_in_flight() is None and last % interval != 0 and (last + 1) % interval != 0
        time.sleep(fault.delay_fraction * 0.2)
        return True

    def _fire(self, fault: Fault) -> bool:
        self._observe()  # _ready may have slept: take the latest step
        workers = self.spec.workers(self.launcher_pid)
        if len(workers) < WORLD:
            return False  # between attempts: wait for the whole group
        pid, label = sorted(workers)[fault.victim_index % len(workers)]
        states = committed_steps(self.spec.ckpt_root)
        fault.save_in_flight = fault.target_step if fault.kind in MID_SAVE else self._save_in_flight()
        fault.latest_at_fault = read_latest_step(self.spec.ckpt_root)
        fault.committed_at_fault = sorted(s for s, ok in states.items() if ok)
        fault.last_logged_step, fault.attempt = self.attempt_last_step, self.attempt
        fault.pid, fault.victim = pid, label
        fault.t_fault = time.time()
        os.kill(pid, SIGNALS[fault.kind])
        fault.fired = True
        if fault.save_in_flight is not None and fault.kind != "sigterm":
            self.killed_saves.append(fault.save_in_flight)
        logger.info("%s: %s -> pid %d (%s) after step %s%s", self.spec.name, fault.kind, pid, label,
                    fault.last_logged_step,
                    f", save of step {fault.save_in_flight} in flight" if fault.save_in_flight else "")
        return True

    # ---------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """Run the job to its end (or abort it); returns everything observed."""
        spec = self.spec
        env = {**os.environ, **spec.env, TOKEN_ENV: spec.token, "PYTHONUNBUFFERED": "1"}
        t0 = time.time()
        proc = subprocess.Popen(spec.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        self.launcher_pid = proc.pid
        out = OutputLog(proc, self.log_path)
        pending = list(spec.faults)
        current: Fault | None = None
        try:
            while proc.poll() is None:
                self._observe()
                now = time.time()
                if now - t0 > spec.timeout_s:
                    self.aborted = f"the run did not finish within {spec.timeout_s:.0f} s"
                    break
                if current is not None and not current.recovered:
                    if self.attempt > current.attempt and self.attempt_last_step is not None:
                        current.recovered = True
                    elif now - current.t_fault > spec.recover_timeout_s:
                        self.aborted = (f"no step logged within {spec.recover_timeout_s:.0f} s of the {current.kind} "
                                        f"after step {current.last_logged_step}")
                        break
                if pending and (current is None or current.recovered) and self._ready(pending[0]):
                    if self._fire(pending[0]):
                        current = pending.pop(0)
                time.sleep(POLL_S)
        except Exception as e:  # noqa: BLE001 - recorded; the job is stopped below
            self.aborted = f"controller error: {type(e).__name__}: {e}"
            logger.exception("%s: controller error", spec.name)
        alive_at_abort: list[dict] = []
        if self.aborted:
            logger.error("%s: %s; ending the job", spec.name, self.aborted)
            job = [proc.pid, *(p for p, _ in spec.workers(proc.pid))]
            if spec.name.startswith("torchrun"):
                job = processes_with_token(spec.token)
            alive_at_abort = describe(job)
            end_processes(job)
        try:
            rc = proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            end_processes([proc.pid])
            rc = proc.wait(timeout=30)
        t_end = time.time()
        out.join()
        left, gone_s = self._wait_workers_gone(t_end)
        self._observe()
        return {"exit_code": rc, "seconds": t_end - t0, "aborted": self.aborted, "alive_at_abort": alive_at_abort,
                "workers_left": left, "workers_gone_s": gone_s, "output": out, "rows": self.tail.rows,
                "markers": self.markers, "committed_seen": sorted(self.committed_seen)}

    def _wait_workers_gone(self, t_end: float, wait_s: float = 20.0) -> tuple[list[dict], float | None]:
        """Wait up to ``wait_s`` for the job's training processes to be gone once the launcher exited;
        returns those still there (described) and how long after the exit the last one went."""
        def job() -> list[int]:
            if self.spec.name == "ray":
                return [p for p, _ in ray_workers(self.spec.token, include_stopped=True)]
            return processes_with_token(self.spec.token)

        while job() and time.time() - t_end < wait_s:
            time.sleep(0.2)
        left = job()
        return describe(left), (None if left else max(time.time() - t_end, 0.0))


def describe(pids: list[int]) -> list[dict]:
    """``pid``, state (``/proc`` letter: T = stopped) and command of each live process of ``pids``."""
    out = []
    for pid in pids:
        st = _ppid_and_state(pid)
        if st is not None:
            out.append({"pid": pid, "state": st[1], "cmd": _cmdline(pid)[:160]})
    return out


# --------------------------------------------------------------------------------------------
# analysis


def split_attempts(rows: list[tuple[float, dict]]) -> list[dict[str, Any]]:
    """The attempts of a run from its ``metrics.jsonl`` rows (with the time each was seen): start step,
    resume marker, and ``(time seen, step)`` of every loss row each logged. Attempt 0 has no marker."""
    attempts: list[dict[str, Any]] = [{"start_step": 0, "resumed_from": None, "t_marker": None, "steps": []}]
    for t, row in rows:
        if row.get("event") == "resume":
            attempts.append({"start_step": int(row["step"]), "resumed_from": row.get("from") or None,
                             "t_marker": row.get("unix_s"), "steps": []})
        elif "loss" in row:
            attempts[-1]["steps"].append((t, int(row["step"])))
    return attempts


def _failure_record(fault: Fault, attempts: list[dict], markers: list[dict], out: OutputLog,
                    interval: int) -> dict[str, Any]:
    rec: dict[str, Any] = {k: v for k, v in asdict(fault).items() if k not in ("delay_fraction", "victim_index")}
    if not fault.fired:
        return rec
    failed = attempts[fault.attempt]
    last_before = max((s for _, s in failed["steps"]), default=failed["start_step"])
    rec["last_step_before"] = last_before
    rec["steps_logged_after_signal"] = [s for t, s in failed["steps"] if t >= fault.t_fault]
    if fault.kind.startswith("sigstop"):
        hit = out.first_after(fault.t_fault, HANG_DETECTED)
        rec["detected_s"] = None if hit is None else hit[0] - fault.t_fault
        rec["detected_line"] = None if hit is None else hit[1][:300]
    nxt = next((i for i in range(fault.attempt + 1, len(attempts)) if attempts[i]["steps"]), None)
    rec["recovered"] = nxt is not None
    if nxt is None:
        return rec
    a = attempts[nxt]
    marker = next(m for m in markers if m["attempt"] == nxt)
    newest = max(marker["committed"], default=0)
    rec.update(
        restarts=nxt - fault.attempt,
        resumed_at=a["start_step"], resumed_from=a["resumed_from"],
        newest_committed_at_restart=newest, latest_at_restart=marker["latest"],
        resumed_from_newest=a["start_step"] == newest,
        restart_loaded_s=(a["t_marker"] or marker["t_seen"]) - fault.t_fault,
        recovery_s=a["steps"][0][0] - fault.t_fault,
        steps_recomputed=last_before - a["start_step"],
    )
    rec["within_one_interval"] = rec["steps_recomputed"] <= interval
    # An asynchronous save in flight at the signal may never commit: then the job resumes one interval
    # further back, and the bound is one interval plus the steps run since that save began.
    s = fault.save_in_flight
    rec["recompute_bound"] = interval + (max(last_before - s, 0) if s is not None and fault.kind != "sigterm" else 0)
    if fault.kind in MID_SAVE:
        rec["interrupted_save_committed_at_restart"] = fault.target_step in marker["committed"]
    return rec


def check_checkpoints(ckpt_root: Path, committed_seen: list[int]) -> dict[str, Any]:
    """Re-read every committed checkpoint left (:func:`system.checkpoint.verify`); check ``latest`` and that
    none seen committed during the run is gone."""
    states = committed_steps(ckpt_root)
    corrupted, verified = {}, []
    for step, ok in sorted(states.items()):
        if not ok:
            continue
        try:
            problems = verify(ckpt_root / f"step_{step:08d}")
        except CheckpointError as e:
            problems = [str(e)]
        if problems:
            corrupted[str(step)] = problems
        else:
            verified.append(step)
    latest = read_latest_step(ckpt_root)
    committed = sorted(s for s, ok in states.items() if ok)
    return {"committed": committed, "verified_ok": verified, "corrupted": corrupted,
            "lost": sorted(set(committed_seen) - set(committed)),
            "uncommitted_left": sorted(s for s, ok in states.items() if not ok),
            "latest": latest, "latest_is_committed": latest in committed}


def compare_losses(final: dict[int, float], reference: dict[int, float]) -> dict[str, Any]:
    """Per-step train losses of the final view against the reference: max relative difference, equality."""
    missing = [s for s in sorted(reference) if s not in final]
    rel = [abs(final[s] - reference[s]) / max(abs(reference[s]), 1e-12) for s in sorted(reference) if s in final]
    return {"steps_compared": len(rel), "missing_steps": missing, "max_rel_diff": max(rel, default=None),
            "bitwise_equal": not missing and all(final[s] == reference[s] for s in reference),
            "equal_within_1e-6": not missing and all(d <= 1e-6 for d in rel)}


def analyse(spec: RunSpec, observed: dict[str, Any], reference: dict[int, float]) -> dict[str, Any]:
    """Goodput, per-failure recovery, checkpoint checks and loss equality of one finished run."""
    attempts = split_attempts(observed["rows"])
    computed = sum(len(a["steps"]) for a in attempts)
    path = spec.run_dir / "metrics.jsonl"
    final = {int(r["step"]): float(r["loss"]) for r in read_metrics(path) if "loss" in r} if path.exists() else {}
    completed = max(final, default=0)
    failures = [_failure_record(f, attempts, observed["markers"], observed["output"], spec.interval)
                for f in spec.faults]
    fired = [f for f in failures if f["fired"]]
    return {
        "exit_code": observed["exit_code"], "seconds": observed["seconds"], "aborted": observed["aborted"],
        "completed_steps": completed, "steps_computed": computed,
        "goodput": completed / computed if computed else None,
        "attempts": [{"start_step": a["start_step"], "resumed_from": a["resumed_from"], "steps_logged": len(a["steps"]),
                      "last_step": max((s for _, s in a["steps"]), default=None)} for a in attempts],
        "failures": failures,
        "all_recovered": len(fired) == len(spec.faults) and all(f.get("recovered") for f in fired),
        "checkpoints": check_checkpoints(spec.ckpt_root, observed["committed_seen"]),
        "losses": compare_losses(final, reference),
        "alive_at_abort": observed["alive_at_abort"], "workers_left": observed["workers_left"],
        "workers_gone_s": observed["workers_gone_s"],
    }


# --------------------------------------------------------------------------------------------
# runs


def reference_losses(work: Path, overrides: list[str], timeout_s: float = 600) -> dict[int, float]:
    """Per-step train losses of the same job run once without faults (``moesys train``)."""
    run_dir = work / "reference"
    argv = [sys.executable, "-m", "system.cli", "train", "--config", CONFIG, *overrides,
            "--metrics.run_dir", str(run_dir)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {int(r["step"]): float(r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def _moesys(argv: list[str]) -> str:
    """The shell form of a ``python -m system.cli ...`` command line."""
    return "moesys " + " ".join(argv[3:])


def run_torchrun(args: argparse.Namespace, work: Path, kinds: list[str], reference: dict[int, float],
                 name: str = "torchrun") -> dict[str, Any]:
    """A chaos run under ``moesys train --max-restarts`` (``name="torchrun_stop_in_save"``: the probe, one
    SIGSTOP during a save, watched for ``--hang-watch`` seconds); returns :func:`analyse`'s record."""
    run_dir = work / name
    if name == "torchrun_stop_in_save":
        step = max(args.interval, args.steps // 10 // args.interval * args.interval)
        faults = [Fault("sigstop_mid_save", step, plan_faults(args.seed, args.steps, args.interval,
                                                              ["sigstop"])[0].victim_index, 0.25)]
        recover = args.hang_watch
    else:
        faults, recover = plan_faults(args.seed, args.steps, args.interval, kinds), args.recover_timeout
    argv = [sys.executable, "-m", "system.cli", "train", "--max-restarts", str(len(faults) + 1), "--config", CONFIG,
            *job_overrides(args.steps, args.interval, args.train_timeout), "--metrics.run_dir", str(run_dir)]
    env = delay_env(args.save_delay, faults)
    spec = RunSpec(name, argv, env, run_dir, run_dir / "checkpoints", torchrun_workers, faults, args.interval,
                   args.steps, args.save_delay, uuid.uuid4().hex, args.run_timeout, recover)
    logger.info("%s: %s", name, ", ".join(f"{f.kind}@{f.target_step}" for f in faults))
    result = analyse(spec, Controller(spec, work / f"{name}.log").run(), reference)
    result.update(launcher="moesys train (torchrun agent in-process)", command=_moesys(argv), env=env)
    return result


def start_ray_cluster(token: str, env_extra: dict[str, str]) -> tuple[str, Path]:
    """Two raylets on this machine, one CPU each (``ray start --head`` + ``ray start --address``), started with
    ``MOESYS_CHAOS_TOKEN`` and ``env_extra`` in their environment (their workers inherit it); returns the
    head's address and the session's temp dir. Ended by :func:`stop_ray_cluster`."""
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="mchaos-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, **env_extra, TOKEN_ENV: token}
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    for argv in ([ray, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                  "--temp-dir", str(temp), *common],
                 [ray, "start", "--address", f"127.0.0.1:{port}", *common]):
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            stop_ray_cluster(token, temp)
            raise RuntimeError(f"{' '.join(argv[1:])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return f"127.0.0.1:{port}", temp


def stop_ray_cluster(token: str, temp: Path) -> list[int]:
    """End every process of the cluster (by the token in its environment, never ``ray stop``, which would
    stop other Ray instances on this machine too); returns the pids that needed SIGKILL."""
    killed = end_processes(processes_with_token(token), grace_s=15.0)
    shutil.rmtree(temp, ignore_errors=True)
    return killed


def run_ray(args: argparse.Namespace, work: Path, kinds: list[str], reference: dict[int, float]) -> dict[str, Any]:
    """A chaos run under ``moesys launch`` on two local raylets; returns :func:`analyse`'s record."""
    token = uuid.uuid4().hex
    faults = plan_faults(args.seed + 1, args.steps, args.interval, kinds)
    env = delay_env(args.save_delay, faults)
    t0 = time.time()
    address, temp = start_ray_cluster(token, env)  # the raylets' workers inherit the delay setting
    cluster_s = time.time() - t0
    try:
        store = work / "ray_store"
        argv = [sys.executable, "-m", "system.cli", "launch", "--config", CONFIG, "--ray-address", address,
                "--num-nodes", "2", "--workers-per-node", "1", "--storage-path", str(store), "--name", "chaos",
                "--max-failures", str(len(faults) + 1), *job_overrides(args.steps, args.interval, args.train_timeout)]
        run_dir = store / "chaos"
        spec = RunSpec("ray", argv, {}, run_dir, run_dir / "checkpoints", lambda _pid: ray_workers(token), faults,
                       args.interval, args.steps, args.save_delay, token, args.run_timeout, args.recover_timeout)
        logger.info("ray: %s", ", ".join(f"{f.kind}@{f.target_step}" for f in faults))
        result = analyse(spec, Controller(spec, work / "ray.log").run(), reference)
    finally:
        sigkilled = stop_ray_cluster(token, temp)
    result.update(launcher="moesys launch (Ray Train TorchTrainer, 2 raylets on this host)", command=_moesys(argv),
                  env=env, cluster_start_s=cluster_s, cluster_processes_sigkilled_at_teardown=len(sigkilled),
                  cluster_processes_left=describe(processes_with_token(token)),
                  cluster=f"ray start --head --port P --num-cpus 1 --include-dashboard false; ray start --address "
                          f"127.0.0.1:P --num-cpus 1 (environment: {env})")
    return result


# --------------------------------------------------------------------------------------------
# checks, results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list from {','.join(SCENARIOS)}")
    p.add_argument("--steps", type=int, default=160, help="training steps (160)")
    p.add_argument("--interval", type=int, default=10, help="checkpoint interval in steps (10)")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs under torchrun, the first one mid-save (3)")
    p.add_argument("--ray-kills", type=int, default=2, help="SIGKILLs under Ray, the first one mid-save (2)")
    p.add_argument("--stops", type=int, default=1, help="SIGSTOPs (hangs) per run (1)")
    p.add_argument("--sigterms", type=int, default=1, help="SIGTERMs (preemptions) under torchrun (1)")
    p.add_argument("--train-timeout", type=int, default=20, help="comm.train_timeout_seconds (20)")
    p.add_argument("--save-delay", type=float, default=1.0,
                   help=f"seconds the save a mid-save fault targets is held uncommitted ({FAULT_WRITE_DELAY_ENV}; 1.0)")
    p.add_argument("--recover-timeout", type=float, default=240.0,
                   help="seconds a fault may take to be followed by a step before the run is declared stuck (240)")
    p.add_argument("--hang-watch", type=float, default=120.0,
                   help="torchrun_stop_in_save: seconds to wait for a restart after the SIGSTOP (120)")
    p.add_argument("--run-timeout", type=float, default=900.0, help="seconds one run may take in all (900)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="where the runs go (default: a fresh temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenario_list if s not in SCENARIOS]
    if bad:
        p.error(f"unknown scenarios {bad}; allowed: {', '.join(SCENARIOS)}")
    if args.kills < 1 or args.ray_kills < 1 or min(args.stops, args.sigterms) < 0:
        p.error("need --kills >= 1 and --ray-kills >= 1 (the first is mid-save), --stops and --sigterms >= 0")
    return args


def fault_kinds(kills: int, stops: int, sigterms: int) -> list[str]:
    """The faults of one run: ``kills`` SIGKILLs (the first mid-save), ``stops`` SIGSTOPs, ``sigterms`` SIGTERMs."""
    return ["sigkill_mid_save"] + ["sigkill"] * (kills - 1) + ["sigstop"] * stops + ["sigterm"] * sigterms


def run_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The reference, then every scenario of ``--scenarios``; returns the result document."""
    t0 = time.time()
    reference = reference_losses(work, job_overrides(args.steps, args.interval, args.train_timeout))
    logger.info("reference: %d steps, final loss %.6f (%.0f s)", len(reference), reference[max(reference)],
                time.time() - t0)
    runs: dict[str, Any] = {}
    for name in args.scenario_list:
        t1 = time.time()
        if name == "ray":
            runs[name] = run_ray(args, work, fault_kinds(args.ray_kills, args.stops, 0), reference)
        else:
            runs[name] = run_torchrun(args, work, fault_kinds(args.kills, args.stops, args.sigterms), reference, name)
        logger.info("%s: done in %.0f s: exit %s, goodput %s, aborted: %s", name, time.time() - t1,
                    runs[name]["exit_code"], _fmt(runs[name]["goodput"], 3), runs[name]["aborted"])
    return {
        "benchmark": "chaos", "device": "cpu",
        "description": "fault tolerance: goodput, recovery time, recomputed steps, checkpoint integrity and loss "
                       "equality of a training job under SIGKILL, SIGSTOP and SIGTERM",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {k: v for k, v in vars(args).items() if k != "scenario_list"},
        "job_overrides": job_overrides(args.steps, args.interval, args.train_timeout),
        "reference_losses": {str(k): v for k, v in sorted(reference.items())},
        "runs": runs,
        "checks": {n: checks(r, args.interval) for n, r in runs.items()},
        "seconds": time.time() - t0,
        "provenance": provenance(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write ``chaos_cpu<tag>.json`` and ``.md`` under ``--out``."""
    args = parse_args(argv)
    setup_logging(level=getattr(logging, args.log_level.upper(), logging.INFO))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="moesys-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run_all(args, work)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    stem = f"chaos_cpu{args.tag}"
    write_json(out / f"{stem}.json", result)
    md = render_markdown(result)
    write_text(out / f"{stem}.md", md)
    print(md)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
