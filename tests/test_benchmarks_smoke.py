"""End-to-end smoke runs of the benchmark scripts in ``benchmarks/`` (slow: real processes, real steps)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_expert_parallel_smoke(tmp_path: Path) -> None:
    """``benchmarks/expert_parallel.py --smoke`` runs every workload on every system and writes positive numbers."""
    systems = ["ep", "fssdp"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") is not None else [])
    cmd = [sys.executable, "benchmarks/expert_parallel.py", "--smoke", "--systems", ",".join(systems),
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    result = json.loads((tmp_path / "expert_parallel_cpu_smoke.json").read_text())
    assert (tmp_path / "expert_parallel_cpu_smoke.md").exists()

    expected = {"balanced", "one_hot", "hot_rank", "zipf1.0", "zipf1.5", "rotating"}
    assert set(result["workloads"]) == expected
    for name, w in result["workloads"].items():
        assert w["agreement"]["ok"], f"{name}: first-step losses disagree: {w['agreement']}"
        assert set(w["systems"]) == set(systems), name
        for system, s in w["systems"].items():
            assert s["tokens_per_s"]["median"] > 0, (name, system)
            assert s["step_ms_slowest_rank"]["median"] > 0, (name, system)
            assert len(s["peak_rss_bytes_per_rank"]) == 2 and min(s["peak_rss_bytes_per_rank"]) > 0, (name, system)
            assert min(s["expert_rows_per_step_per_rank"]) >= 0 and max(s["expert_rows_per_step_per_rank"]) > 0
        fssdp = w["systems"]["fssdp"]["fssdp"]
        assert fssdp["overlap_budget_t"] >= 0
        assert len(fssdp["replicas_per_expert_end"]) == result["config"]["layers"]
        assert w["ratios"]["fssdp_over_ep_tokens_per_s"] > 0
        assert w["workload"]["load_max_over_mean"] >= 1.0
    # The skewed workloads really are skewed, the balanced one is not.
    assert result["workloads"]["balanced"]["workload"]["load_max_over_mean"] == pytest.approx(1.0)
    assert result["workloads"]["one_hot"]["workload"]["load_max_over_mean"] == pytest.approx(4.0, rel=1e-2)
    assert result["workloads"]["hot_rank"]["workload"]["ep_busiest_rank_over_even"] > 1.5
    assert {g["workload"] for g in result["goals"]} == expected


@pytest.mark.slow
def test_checkpoint_smoke(tmp_path: Path) -> None:
    """``benchmarks/checkpoint.py --smoke`` saves and loads with ours and DCP at 2 and 4 ranks, bit-exactly."""
    cmd = [sys.executable, "benchmarks/checkpoint.py", "--smoke", "--out", str(tmp_path), "--dir", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    result = json.loads((tmp_path / "checkpoint_cpu_smoke.json").read_text())
    assert (tmp_path / "checkpoint_cpu_smoke.md").exists()
    assert not list((tmp_path / "ckpt").iterdir()), "checkpoints left behind"

    assert set(result["worlds"]) == {"2", "4"}
    for key, w in result["worlds"].items():
        lim = w["limits"]
        assert lim["disk_write_gbps"] > 0 and lim["cold_read_gbps"] > 0 and lim["memcpy_gbps_per_rank"] > 0
        assert set(w["systems"]) == {"ours", "dcp", "dcp_tuned"}
        for name, sm in w["systems"].items():
            assert 0 < sm["stall_s"]["median"] <= sm["durable_s"]["median"], (key, name)
            assert sm["checkpoint_bytes"] > 0, (key, name)
        ours, dcp = w["systems"]["ours"], w["systems"]["dcp_tuned"]
        for kind in ("same", "resharded"):
            assert ours[f"load_{kind}_s"]["median"] > 0 and dcp[f"load_{kind}_s"]["median"] > 0
        # ours reads exactly the bytes it needs; DCP reads whole saved expert chunks when resharding
        assert ours["load_same_read_amplification"] == pytest.approx(1.0, abs=1e-4)
        assert ours["load_resharded_read_amplification"] == pytest.approx(1.0, abs=1e-4)
        assert dcp["load_resharded_read_amplification"] > 1.5
    assert len(result["goals"]) == 12 and all("met" in g for g in result["goals"])


@pytest.mark.slow
def test_mofme_smoke(tmp_path: Path) -> None:
    """``benchmarks/mofme.py --smoke`` compares MoFME with the conventional MoE for E in {8, 16, 32} and writes the goals."""
    cmd = [sys.executable, "benchmarks/mofme.py", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    result = json.loads((tmp_path / "mofme_cpu_smoke.json").read_text())
    assert (tmp_path / "mofme_cpu_smoke.md").exists()
    corpora = result["corpora"]
    assert "stdlib" in corpora
    assert ("tinyshakespeare" in corpora) != bool(result["skipped"])
    for corpus in corpora.values():
        assert set(corpus["experts"]) == {"8", "16", "32"}
        for entry in corpus["experts"].values():
            moe, fme = entry["moe"], entry["mofme"]
            assert 0 < fme["moe_layer_params"] < moe["moe_layer_params"]
            for s in (moe, fme):
                assert s["inference"]["tokens_per_s"] > 0 and s["train"]["tokens_per_s"] > 0
                assert 0 < s["val_loss"] < 10
            assert entry["comparison"]["moe_layer_param_reduction"] >= 0.72
    goals = result["goals"]
    assert len(goals) == 3 * 3 * len(corpora) and all(isinstance(g["met"], bool) for g in goals)


@pytest.mark.slow
def test_hf_load_smoke(tmp_path: Path) -> None:
    """``benchmarks/hf_load.py`` tiny: every peer loads the same local tensors; ours reads each byte it holds once."""
    pytest.importorskip("transformers")
    peers = ["ours", "transformers", "transformers_ep"] + (
        ["accelerate"] if importlib.util.find_spec("accelerate") is not None else [])
    cmd = [sys.executable, "benchmarks/hf_load.py", "--size-gb", "0.02", "--shard-mb", "4", "--repeats", "1",
           "--peers", ",".join(peers), "--dir", str(tmp_path / "ckpt"), "--out", str(tmp_path), "--tag", "_smoke"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    result = json.loads((tmp_path / "hf_load_cpu_smoke.json").read_text())
    assert (tmp_path / "hf_load_cpu_smoke.md").exists()
    assert not list((tmp_path / "ckpt").iterdir()), "the checkpoint it wrote was left behind"

    assert result["checkpoint"]["shards"] > 1 and result["agreement"]["ok"]
    assert {r["peer"] for r in result["runs"]} == set(peers)
    for run in result["runs"]:
        assert len(run["samples"]) == 2
        for s in run["samples"]:
            assert s["wall_s"] > 0 and s["peak_rss_bytes"] > 0 and s["crc32_tensors"] == s["held_tensors"]
            if run["peer"] != "ours":
                assert s["torch_equal_vs_ours"]["equal"], run["peer"]
    sm = result["summary"]["peers"]
    held = sm["ours"]["per_rank"]["0"]["held_bytes"]
    for r in ("0", "1"):
        assert sm["ours"]["per_rank"][r]["bytes_read"] == held  # read amplification exactly 1
        assert 0 <= sm["ours"]["per_rank"][r]["rchar_minus_bytes_read"] < 256 << 10
        assert sm["transformers"]["per_rank"][r]["read_amplification"] > 1.4  # the whole checkpoint on every rank
        assert sm["transformers_ep"]["per_rank"][r]["read_amplification"] == pytest.approx(1.0)
    goals = result["goals"]
    assert len(goals) == 6 and all(g["met"] for g in goals if "amplification" in g["goal"])
