"""Smoke test of ``benchmarks/mofme.py`` (default suite): a tiny model, two seeds, end to end through the
script's command line; checks the result file's shape, not the goals' outcome. Also the two-sided
verdict of :func:`benchmarks.common.band_goal` that judges the validation-loss goal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import band_goal

ROOT = Path(__file__).resolve().parents[1]
VERDICTS = {"met", "not met", "not distinguishable"}


def test_mofme_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "benchmarks/mofme.py", "--smoke", "--corpora", "stdlib", "--log-level", "WARNING",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    result = json.loads((tmp_path / "mofme_cpu_smoke.json").read_text())
    md = (tmp_path / "mofme_cpu_smoke.md").read_text()

    assert result["config"]["threads"] == result["config"]["torch_threads"] == 1
    entry = result["corpora"]["stdlib"]["experts"]["4"]
    assert [s["seed"] for s in entry["seeds"]] == [1234, 1235]
    for seed in entry["seeds"]:
        moe, fme = seed["moe"], seed["mofme"]
        assert 0 < fme["moe_layer_params"] < moe["moe_layer_params"]
        for s in (moe, fme):
            assert len(s["train_losses"]) == 8 and s["train_tokens_per_s"] > 0 and 0 < s["val_loss"] < 10
            assert s["inference"]["forward_s"] and min(s["inference"]["forward_s"]) > 0
            assert set(s["val_loss_at_step"]) == {"4", "8"}
            assert "last_10pct_mean" in s["train_loss_tail"]
    goals = entry["comparison"]["goals"]
    assert [g["verdict"] in VERDICTS for g in goals] == [True] * 3
    assert goals[2]["direction"] == "within" and goals[2]["n"] == 2
    for g in goals:
        assert g["name"] in md and g["verdict"] in md
    prov = result["provenance"]
    assert prov["commit"] and "mofme.py" in prov["command"] and prov["versions"]["torch"]


def test_band_goal_is_two_sided() -> None:
    """Better or worse by more than the tolerance is 'not met'; inside is 'met'; an interval on an edge is neither."""
    den = [2.0, 2.0, 2.0]
    assert band_goal("x", [2.02, 2.01, 1.99], den, 0.03)["verdict"] == "met"
    assert band_goal("x", [1.80, 1.82, 1.81], den, 0.03)["verdict"] == "not met"  # 9% better: outside the band
    assert band_goal("x", [2.20, 2.18, 2.22], den, 0.03)["verdict"] == "not met"
    assert band_goal("x", [1.90, 2.00, 2.02], den, 0.03)["verdict"] == "not distinguishable"
    assert band_goal("x", [], [], 0.03)["verdict"] == "not distinguishable"
    assert band_goal("x", [2.0], [2.0], 0.03)["verdict"] == "not distinguishable"  # one seed: no interval
