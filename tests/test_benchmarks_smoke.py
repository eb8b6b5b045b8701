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
