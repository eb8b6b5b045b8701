"""End to end: ``moesys train`` launches torchrun, 2 Gloo ranks with EP=2 train on real text and
leave metrics.jsonl, TensorBoard events, summary.json and a saved model in the run directory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SMALL = [
    "--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.expert_dim", "64",
    "--training.seq_len", "64", "--training.batch_size", "4", "--training.steps", "12",
    "--training.log_interval", "4", "--training.eval_interval", "8", "--training.eval_batches", "2",
    "--training.sample_tokens", "8", "--training.warmup_steps", "2", "--metrics.progress", "false",
]


def _train(tmp_path: Path, *extra: str, expect_progress: bool = False) -> tuple[dict, list[dict]]:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "system.cli", "train", "--config", str(ROOT / "configs/cpu-tiny.toml"),
           *SMALL, "--metrics.run_dir", str(run_dir), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== summary ==" in proc.stdout
    # Progress in the units of the summary: the intermediate validation loss, then each final phase.
    for line in ("step 8: val loss ", "bits/byte (train ", "step 12: val loss ", "exporting the model to",
                 "exported the model", "sampling 8 tokens greedily") if expect_progress else ():
        assert line in proc.stderr, (line, proc.stderr[-3000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert list((run_dir / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert (run_dir / "model" / "model.safetensors").is_file()
    return summary, records


def test_train_default_corpus_ep2(tmp_path: Path) -> None:
    summary, records = _train(tmp_path, "--metrics.routing_trace", "true", expect_progress=True)
    assert summary["world_size"] == 2 and summary["ep"] == 2 and summary["steps"] == 12
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [4, 8, 12]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "aux_loss", "z_loss", "expert_imbalance", "drop_rate"):
        assert key in steps[0], key
    assert any("val_loss" in r for r in records)
    assert steps[-1]["loss"] < steps[0]["loss"], "loss did not fall"
    assert summary["val_bpb"] < 8.0 and summary["unigram_entropy_bpb"] > 3.0
    assert summary["sample"].startswith("def ")
    # The routing trace: one row per step, each MoE layer's global loads summing to tokens x top-k, and
    # the imbalance logged at step 4 recomputed from the trace's row of step 4.
    from system.train.metrics import read_routing_trace

    trace = read_routing_trace(tmp_path / "run" / "routing_trace.jsonl")
    assert [row["step"] for row in trace] == list(range(1, 13))
    tokens = 4 * 64 * 2
    for row in trace:
        assert row["tokens"] == tokens and len(row["tokens_per_expert"]) == 2
        for load in row["tokens_per_expert"]:
            assert len(load) == 8 and sum(load) == tokens * 2, load
    loads = trace[3]["tokens_per_expert"]
    imbalance = sum(max(lo) / (sum(lo) / len(lo)) for lo in loads) / len(loads)
    assert math.isclose(imbalance, steps[0]["expert_imbalance"], rel_tol=1e-6)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data/tinyshakespeare.txt is absent (a user's clone has no ../shared)")
def test_train_tinyshakespeare_fsdp(tmp_path: Path) -> None:
    summary, records = _train(
        tmp_path, "--data.path", str(SHAKESPEARE), "--parallel.dense", "fsdp", "--training.sample_prompt", "ROMEO:"
    )
    assert summary["corpus"] != "stdlib"
    assert summary["steps"] == 12


def test_bad_override_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "system.cli", "train", "--config", str(ROOT / "configs/cpu-tiny.toml"),
         "--moe.num_expertz", "4", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "moe.num_expertz" in proc.stderr and "num_experts" in proc.stderr


def test_experts_not_divisible_by_ep(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "system.cli", "train", "--config", str(ROOT / "configs/cpu-tiny.toml"),
         *SMALL, "--moe.num_experts", "5", "--moe.top_k", "2", "--metrics.run_dir", str(tmp_path / "r")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "num_experts=5 does not divide by the expert-parallel degree parallel.ep=2" in proc.stderr


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_checkpoint_resume_reshards_and_continues(tmp_path: Path) -> None:
    """Checkpoints every 4 steps under EP=2 (async); resuming step 4 in ONE process (same global batch)
    gives the losses of the uninterrupted run; ``latest`` names the last committed checkpoint."""
    common = ["--training.log_interval", "1", "--training.eval_interval", "0"]
    _train(tmp_path, *common, "--checkpoint.interval", "4")
    full = _losses(tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000012"
    assert {p.name for p in root.glob("step_*")} == {"step_00000004", "step_00000008", "step_00000012"}
    resumed_dir = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "system.cli", "train", "--config", str(ROOT / "configs/cpu-tiny.toml"), *SMALL, *common,
           "--nproc-per-node", "1", "--parallel.ep", "1", "--training.batch_size", "8",
           "--checkpoint.resume", str(root / "step_00000004"), "--metrics.run_dir", str(resumed_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = _losses(resumed_dir)
    assert sorted(resumed) == list(range(5, 13))
    for step, loss in resumed.items():
        assert abs(loss - full[step]) <= 1e-5 * abs(full[step]), (step, loss, full[step])


def test_train_mofme_uncertainty_router_logs_router_std(tmp_path: Path) -> None:
    """``moesys train`` with feature-modulated experts and the uncertainty-aware router, EP=2:
    trains, and the router's score spread over its stochastic passes reaches metrics.jsonl."""
    summary, records = _train(
        tmp_path, "--moe.expert_type", "fme", "--moe.router", "uncertainty", "--training.steps", "8",
        "--training.eval_interval", "0",
    )
    assert summary["steps"] == 8 and summary["ep"] == 2
    steps = [r for r in records if "loss" in r]
    assert all(r["router_std"] > 0.0 and math.isfinite(r["router_std"]) for r in steps), steps
