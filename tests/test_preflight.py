"""Launch-time checks of ``moesys train`` (:mod:`system.train.preflight`), the run-folder lock, the
resume-model check and the metrics reader: everything decided before a worker starts, as one line and
exit code 2, with no file the user had touched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from system.cli import main
from system.config.compat import model_config_diff
from system.config.loader import config_to_dict, load_config
from system.errors import RunFolderError
from system.train.metrics import read_metrics
from system.train.run_folder import LOCK_FILE, RunLock, check_unlocked, clear_earlier_run, earlier_run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "cpu-tiny.toml")
SMALL = ["--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.expert_dim", "32",
         "--training.seq_len", "32", "--training.batch_size", "2", "--training.steps", "4"]


def _train(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["train", "--config", CONFIG, *SMALL, *args])
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip()]


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _one_error(lines: list[str]) -> str:
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert not any("Traceback" in ln for ln in lines), lines
    return errors[0]


def _save_checkpoint(root: Path, step: int, config: dict) -> Path:
    """A real committed checkpoint of a tiny model under ``root`` (``latest`` moved to it)."""
    from system.checkpoint import save
    from system.checkpoint.train_state import sharded_train_state
    from system.config.model import ModelConfig
    from system.config.moe import MoEConfig
    from system.config.training import TrainingConfig
    from system.models.model import MoETransformer
    from system.train.optim import build_optimizer

    model = MoETransformer(ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=16),
                           MoEConfig(num_experts=4, top_k=2, expert_dim=48))
    model.init_weights(seed=0)
    path = root / f"step_{step:08d}"
    save(sharded_train_state(model, build_optimizer(model, TrainingConfig())), path,
         extra={"step": step, "config": config}, layout={"world_size": 1}, no_dist=True, update_latest=True)
    return path


# ---------------------------------------------------------------------------------------- launch checks
def test_world_size_mismatch_is_refused_before_start(capsys, tmp_path: Path) -> None:
    code, lines = _train(capsys, "--nproc-per-node", "3", "--metrics.run_dir", str(tmp_path / "r"))
    assert code == 2
    msg = _one_error(lines)
    assert "parallel.dp=1 x parallel.ep=2 = 2 ranks" in msg and "--nproc-per-node 3" in msg
    assert not (tmp_path / "r").exists(), "nothing may be created before the checks pass"


def test_elastic_range_checks_every_world_size(capsys, tmp_path: Path) -> None:
    code, lines = _train(capsys, "--nnodes", "1:3", "--rdzv-endpoint", "127.0.0.1:29999", "--nproc-per-node", "2",
                         "--parallel.dp", "-1", "--parallel.ep", "4", "--dry-run")
    assert code == 2 and "= 2 ranks does not divide by parallel.ep=4" in _one_error(lines)


def test_fssdp_with_expert_parallel_is_refused_in_dry_run(capsys) -> None:
    code, lines = _train(capsys, "--parallel.expert_mode", "fssdp", "--dry-run")
    assert code == 2 and "expert_mode='fssdp'" in _one_error(lines) and "parallel.ep=1" in lines[-1]


def test_missing_data_and_resume_paths_are_named(capsys, tmp_path: Path) -> None:
    code, lines = _train(capsys, "--data.path", str(tmp_path / "nope.txt"), "--dry-run")
    assert code == 2 and "data.path" in _one_error(lines) and "does not exist" in lines[-1]
    code, lines = _train(capsys, "--checkpoint.resume", str(tmp_path / "gone"), "--metrics.run_dir",
                         str(tmp_path / "r"), "--dry-run")
    assert code == 2 and "does not exist" in _one_error(lines) and "did not finish" not in lines[-1]


def test_cuda_device_without_cuda_is_refused(capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, lines = _train(capsys, "--parallel.device", "cuda", "--dry-run")
    assert code == 2 and "parallel.device='cuda'" in _one_error(lines)


def test_malformed_tokenizer_is_refused(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    code, lines = _train(capsys, "--data.tokenizer", str(bad), "--dry-run")
    assert code == 2 and str(bad) in _one_error(lines)


# ---------------------------------------------------------------------------------------- run folder
def test_fresh_run_into_a_folder_with_checkpoints_is_refused(capsys, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save_checkpoint(run / "checkpoints", 4, {})
    (run / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n')
    before = _tree(run)
    code, lines = _train(capsys, "--metrics.run_dir", str(run))
    assert code == 2
    msg = _one_error(lines)
    for way_out in ("--checkpoint.resume latest", "--metrics.run_dir", "--checkpoint.overwrite true"):
        assert way_out in msg
    assert "step_00000004" in msg
    assert _tree(run) == before
    code, lines = _train(capsys, "--metrics.run_dir", str(run), "--checkpoint.overwrite", "true",
                         "--checkpoint.resume", "latest", "--dry-run")
    assert code == 2 and "pass only one" in _one_error(lines)


def test_resume_with_a_different_model_lists_the_fields(capsys, tmp_path: Path) -> None:
    run = tmp_path / "run"
    saved = load_config(CONFIG, SMALL)
    saved.model.vocab_size = 320  # what the byte tokenizer resolves to (257 rounded up to 64)
    _save_checkpoint(run / "checkpoints", 4, config_to_dict(saved))
    code, lines = _train(capsys, "--metrics.run_dir", str(run), "--checkpoint.resume", "latest", "--dry-run")
    assert code == 0, lines  # the same model: accepted
    code, lines = _train(capsys, "--metrics.run_dir", str(run), "--checkpoint.resume", "latest", "--dry-run",
                         "--model.n_heads", "4", "--moe.top_k", "1", "--model.init_std", "0.5")
    msg = _one_error(lines)
    assert code == 2 and "model.n_heads: checkpoint 2, now 4" in msg and "moe.top_k: checkpoint 2, now 1" in msg
    assert "init_std" not in msg  # the initialisation does not matter to a resumed model


def test_model_config_diff_defaults_for_old_checkpoints() -> None:
    cfg = load_config(CONFIG, SMALL)
    saved = config_to_dict(cfg)
    del saved["moe"]["router"]  # a checkpoint older than the key: taken at its default
    assert model_config_diff(saved, cfg) == []
    cfg.moe.router = "uncertainty"
    assert model_config_diff(saved, cfg) == ["moe.router: checkpoint 'topk', now 'uncertainty'"]
    cfg.moe.router, cfg.moe.grouped_mm, cfg.model.max_seq_len = "topk", "off", 4096
    assert model_config_diff(saved, cfg) == []


def test_read_only_run_folder_is_refused(tmp_path: Path) -> None:
    """A run folder on a read-only file system (a tmpfs mounted ro in a private mount namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not available")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount -t tmpfs -o ro none {ro} && exec {sys.executable} -m system.cli train --config {CONFIG} "
              f"--metrics.run_dir {ro}/run --dry-run")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro none {ro}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {probe.stderr.decode().strip()}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run folder") and "read-only file system" in last


# ---------------------------------------------------------------------------------------- the lock
def test_lock_held_by_a_live_process_is_refused_with_host_and_pid(capsys, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid, "job_id": "other", "since": time.time()}
        (run / LOCK_FILE).write_text(json.dumps(lock))
        code, lines = _train(capsys, "--metrics.run_dir", str(run), "--dry-run")
        msg = _one_error(lines)
        assert code == 2 and f"pid {holder.pid} on host {socket.gethostname()}" in msg
        with pytest.raises(RunFolderError, match=f"pid {holder.pid}"):
            RunLock(run, "mine").acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale, the launch check passes and the lock is taken over.
    code, lines = _train(capsys, "--metrics.run_dir", str(run), "--dry-run")
    assert code == 0, lines
    lock = RunLock(run, "mine")
    lock.acquire()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_FILE).exists()


def test_lock_of_the_same_job_or_a_recycled_pid_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    me = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": "job-1", "since": time.time()}
    (run / LOCK_FILE).write_text(json.dumps(me))
    with pytest.raises(RunFolderError):  # a live process here under the same id: another job reusing it
        check_unlocked(run, "job-1")
    with pytest.raises(RunFolderError):
        check_unlocked(run, "job-2")
    (run / LOCK_FILE).write_text(json.dumps({**me, "host": "node7"}))
    check_unlocked(run, "job-1")  # this job's own lock from another node: a restart takes it over
    with pytest.raises(RunFolderError):
        check_unlocked(run, "job-2")  # a fresh lock of another job on another node
    (run / LOCK_FILE).write_text(json.dumps(me))
    # The same pid with another start time is a recycled pid: the holder is gone.
    (run / LOCK_FILE).write_text(json.dumps({**me, "start_time": 1}))
    check_unlocked(run, "job-2")
    with RunLock(run, "job-2"):
        assert json.loads((run / LOCK_FILE).read_text())["job_id"] == "job-2"
    (run / LOCK_FILE).write_text("{garbage")  # a crash while writing the lock: stale
    with RunLock(run, "job-3"):
        pass


def test_overwrite_clears_only_what_a_run_writes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save_checkpoint(run / "checkpoints", 2, {})
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "tb").mkdir()
    (run / "tb" / "events.out.tfevents.1").write_text("x")
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "README").write_text("mine too")
    assert earlier_run(run, str(run / "checkpoints"))
    clear_earlier_run(run, str(run / "checkpoints"))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "notes.txt"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["README"]
    assert earlier_run(run, str(run / "checkpoints")) == []


# ---------------------------------------------------------------------------------------- metrics
def test_read_metrics_drops_rows_superseded_by_a_resume(tmp_path: Path) -> None:
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.9}, {"step": 3, "loss": 2.8}, {"step": 3, "val_loss": 2.7},
            {"step": 4, "loss": 9.9},  # lost in the crash: recomputed after the resume from step 2
            {"step": 2, "event": "resume", "from": "ckpt/step_00000002"},
            {"step": 3, "loss": 2.81}, {"step": 4, "loss": 2.7}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_metrics(path)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert got[2] == {"step": 3, "loss": 2.81} and got[3]["loss"] == 2.7
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
