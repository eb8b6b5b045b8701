"""A job's life under signals, with real ``moesys train`` processes (torchrun agent + 2 Gloo workers):

- SIGKILL of the launcher's process group: the workers do not train on; they commit a checkpoint of the
  step they were on (parent-death signal -> SIGTERM) and exit; the run folder's lock keeps a second job
  out while they run, and the lock of a dead job is taken over.
- SIGTERM to one worker (a Slurm or cloud preemption): every rank commits a checkpoint of the same step
  and exits 143; nothing is lost, and the resumed run's losses equal an uninterrupted run's.
- A worker SIGKILLed under ``--max-restarts 1``: torchrun restarts the group, which resumes from the
  newest checkpoint and ends with the uninterrupted losses.
- A worker-side data error: one line per rank, the launcher's last line repeats it, no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from system.checkpoint import verify
from system.checkpoint.storage import read_latest
from system.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 14
SMALL = [
    "--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.expert_dim", "64",
    "--training.seq_len", "64", "--training.batch_size", "4", "--training.log_interval", "1",
    "--training.eval_interval", "0", "--training.sample_tokens", "0", "--training.warmup_steps", "2",
    "--metrics.progress", "false", "--metrics.tensorboard", "false", "--checkpoint.save_final", "false",
]


def _cmd(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "system.cli", "train", "--config", str(ROOT / "configs/cpu-tiny.toml"), *SMALL,
            "--training.steps", str(steps), "--metrics.run_dir", str(run_dir), *extra]


def _start(run_dir: Path, steps: int, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = run_dir.with_suffix(".log")
    out = open(log, "w")
    proc = subprocess.Popen(_cmd(run_dir, steps, *extra), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out.close()
    return proc, log


def _run(run_dir: Path, steps: int, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run_dir, steps, *extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [r["step"] for r in read_metrics(path) if "loss" in r]
    return max(steps, default=0)


def _wait_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while _last_step(run_dir) < step:
        assert proc.poll() is None, f"the job ended early with {proc.returncode}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    """Worker processes (``system.train.main``) whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == pid and "system.train.main" in cmdline:
            out.append(int(entry.name))
    return sorted(out)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def _assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=0), (step, got[step], loss)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = _run(run, STEPS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _losses(run)


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc: Linux")


def test_launcher_sigkill_stops_workers_and_the_lock_keeps_a_second_job_out(tmp_path: Path) -> None:
    run = tmp_path / "run"
    job, log = _start(run, 400)
    try:
        _wait_step(run, 3, job)
        workers = _children(job.pid)
        assert len(workers) == 2, workers
        second = _run(run, 400, "--checkpoint.resume", "latest", timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: run folder {run} is in use by pid ") and "on host" in last
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
        deadline = time.monotonic() + 45
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers outlived their launcher"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    # The workers committed the step they were on: nothing logged is lost, the lock is released.
    stopped = _last_step(run)
    assert stopped < 400
    assert read_latest(run / "checkpoints") == f"step_{stopped:08d}", log.read_text()[-3000:]
    assert verify(run / "checkpoints" / f"step_{stopped:08d}") == []
    assert not (run / ".moesys.lock").exists()
    resumed = _run(run, stopped + 2, "--checkpoint.resume", "latest", "--checkpoint.interval", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(_losses(run)) == list(range(1, stopped + 3))
    summary = json.loads((run / "summary.json").read_text())
    tokens_per_step = 4 * 64 * 2  # batch x seq_len x world
    assert summary["steps_run"] == 2 and summary["start_step"] == stopped
    assert summary["tokens_per_s"] == pytest.approx(2 * tokens_per_step / summary["train_seconds"])
    # Resuming a finished run: no step left, the summary still says what the model's loss was.
    again = _run(run, stopped + 2, "--checkpoint.resume", "latest")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_run"] == 0 and summary["tokens_per_s"] is None
    assert summary["train_loss"] == pytest.approx(_losses(run)[stopped + 2])
    assert "no step left to run" in again.stdout and "nan" not in again.stdout


def test_sigterm_to_one_worker_commits_the_step_and_resumes_exactly(tmp_path: Path, reference) -> None:
    run = tmp_path / "run"
    job, log = _start(run, STEPS)
    try:
        _wait_step(run, 3, job)
        workers = _children(job.pid)
        os.kill(workers[-1], signal.SIGTERM)  # one rank, as a preemption notice may reach only one
        code = job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    out = log.read_text()
    assert code == 143, out[-3000:]
    stopped = _last_step(run)
    assert 3 <= stopped < STEPS
    assert read_latest(run / "checkpoints") == f"step_{stopped:08d}"
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"error: preempted (SIGTERM) after step {stopped}") and "--checkpoint.resume latest" in last
    assert "Traceback" not in out
    resumed = _run(run, STEPS, "--checkpoint.resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_losses(_losses(run), reference)


def test_killed_worker_restarts_from_the_newest_checkpoint(tmp_path: Path, reference) -> None:
    run = tmp_path / "run"
    job, log = _start(run, STEPS, "--max-restarts", "1", "--checkpoint.interval", "4")
    try:
        _wait_step(run, 6, job)
        os.kill(_children(job.pid)[0], signal.SIGKILL)
        code = job.wait(timeout=240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert code == 0, log.read_text()[-3000:]
    text = (run / "metrics.jsonl").read_text()
    assert '"event": "resume"' in text and ("step_00000004" in text or "step_00000008" in text)
    _assert_same_losses(_losses(run), reference)


def test_worker_error_is_one_line_per_rank(tmp_path: Path) -> None:
    data = tmp_path / "corpus.txt"
    data.write_bytes(bytes(range(256)) * 40)  # not UTF-8: passes the launch check, fails in the workers
    proc = _run(tmp_path / "run", 4, "--data.path", str(data), timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    per_rank = sorted(ln for ln in lines if ln.startswith("error: [rank"))
    assert [ln[:13] for ln in per_rank] == ["error: [rank0", "error: [rank1"], lines
    assert str(data) in per_rank[0]
    assert lines[-1].startswith("error: ") and str(data) in lines[-1] and "2 rank(s) failed" in lines[-1]
    assert not any("Traceback" in ln or "ChildFailedError" in ln for ln in lines), proc.stderr


def test_plain_torchrun_workers_refuse_a_folder_with_an_earlier_run(tmp_path: Path) -> None:
    """Started without the launcher's checks (plain torchrun, as launchers/torchrun.sh does), the workers
    themselves refuse a fresh start over an earlier run: every rank says so in one line."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = (run / "metrics.jsonl").read_bytes()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "-m", "system.train.main", "--config", str(ROOT / "configs/cpu-tiny.toml"), *SMALL,
           "--training.steps", "2", "--metrics.run_dir", str(run)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    lines = sorted(ln for ln in proc.stderr.splitlines() if ln.startswith("error: [rank"))
    assert len(lines) == 2 and all("holds an earlier run" in ln and "--checkpoint.overwrite true" in ln
                                   for ln in lines), proc.stderr[-3000:]
    assert (run / "metrics.jsonl").read_bytes() == before and not (run / ".moesys.lock").exists()
