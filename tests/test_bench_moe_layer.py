"""Smoke test of ``benchmarks/moe_layer.py`` (default suite): a tiny EP=2 run of ours and DeepSpeed-MoE,
dropless and with token drops at capacity factor 1.0, end to end through the script's command line.

It checks the result file's shape (systems, positive numbers, provenance, verdicts of record, the
agreement of the matched pairs, drop rates), not any timing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERDICTS = {"met", "not met", "not distinguishable"}


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed ('moe-system[peers]')")
def test_moe_layer_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "benchmarks/moe_layer.py", "--smoke", "--ds-capacity-factors", "1.0",
           "--ours-capacity-factors", "1.0", "--log-level", "WARNING", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    result = json.loads((tmp_path / "moe_layer_cpu_smoke.json").read_text())
    md = (tmp_path / "moe_layer_cpu_smoke.md").read_text()

    systems = {"ours", "ours_cf1.0", "deepspeed", "deepspeed_cf1.0"}
    assert set(result["summary"]) == systems
    for sm in result["summary"].values():
        assert sm["tokens_per_s"]["median"] > 0 and sm["step_ms"]["median"] > 0
        assert sm["achieved_tflops_total"] > 0 and 0 <= sm["drop_rate"] < 1
    assert result["summary"]["ours"]["drop_rate"] == 0 and result["summary"]["deepspeed"]["drop_rate"] == 0
    # The matched capacity pair drops exactly the same assignments (checked per rank before timing).
    assert result["summary"]["ours_cf1.0"]["drop_rate"] == result["summary"]["deepspeed_cf1.0"]["drop_rate"]
    assert result["agreement"]["ours_vs_deepspeed"]["tokens_per_expert_max_abs_diff"] == 0
    assert result["agreement"]["ours_cf1.0_vs_deepspeed_cf1.0"]["dropped_assignments_max_abs_diff"] == 0

    goals = {(g["ours"], g["peer"]): g for g in result["goals"]}
    assert set(goals) == {("ours", "deepspeed"), ("ours_cf1.0", "deepspeed_cf1.0"), ("ours", "deepspeed_cf1.0")}
    for g in goals.values():
        assert g["verdict"] in VERDICTS and g["n"] == 2 and g["ci_low"] <= g["median"] <= g["ci_high"]
        assert g["verdict"] in md
    prov = result["provenance"]
    assert prov["commit"] and "moe_layer.py" in prov["command"] and prov["versions"]["deepspeed"]
    assert len(result["order_per_repeat"]) == 2 and result["order_per_repeat"][0] != result["order_per_repeat"][1]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
def test_moe_layer_disagreement_aborts(tmp_path: Path) -> None:
    """A matched pair that computes different outputs stops the run with one line and exit code 3."""
    cmd = [sys.executable, "benchmarks/moe_layer.py", "--smoke", "--nproc", "1", "--inject-disagreement",
           "--ds-capacity-factors", "", "--ours-capacity-factors", "", "--log-level", "WARNING", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-8000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if "NumericalDisagreement" in ln]
    assert len(lines) == 1 and "ours vs deepspeed" in lines[0]
    assert not (tmp_path / "moe_layer_cpu_smoke.json").exists()
