"""``benchmarks/parallel_layouts.py`` end to end at toy size (2 Gloo processes), and its abort on a disagreement.

Each test runs the script in a subprocess into ``tmp_path``: the first with the EP baseline and PP+EP (the two
step functions, ``train_step`` and ``pipeline_train_step``), checking the JSON's layouts, timings, per-rank
memory, the planner's predictions and the provenance stamp; the second makes one layout compute something else
(the hidden ``--perturb-layout``) and expects the run to stop with a non-zero exit code and a line naming both
layouts, before anything is written.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERDICTS = {"met", "not met", "not distinguishable"}


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "benchmarks/parallel_layouts.py", "--smoke", "--nproc", "2", "--out", str(tmp_path),
           "--log-level", "WARNING", "--warmup", "2", "--peak-steps", "1", "--repeats", "1", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_parallel_layouts_smoke(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--layouts", "ep,pp_ep")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "parallel_layouts_cpu_smoke.json").read_text())
    assert (tmp_path / "parallel_layouts_cpu_smoke.md").read_text().count("Commit:") == 1
    stamp = result["provenance"]
    assert stamp["command"] and stamp["versions"]["torch"] and "dirty" in stamp and "commit" in stamp
    assert result["benchmark"] == "parallel_layouts" and result["config"]["world_size"] == 2
    model = result["models"]["toy"]
    assert set(model["layouts"]) == {"ep", "pp_ep"}
    assert model["calibration"]["matmul"]["flops_used"] > 0
    assert model["calibration"]["collectives"]["all_reduce"]["bus_bytes_per_s"] > 0
    losses = model["agreement"]["first_step_loss"]
    assert set(losses) == {"ep", "pp_ep"} and abs(losses["pp_ep"] - losses["ep"]) <= 1e-4 * losses["ep"]
    for name, lay in model["layouts"].items():
        assert len(lay["samples_s_per_repeat"]) == 1 and lay["tokens_per_s"]["median"] > 0, name
        mem = lay["memory"]
        assert len(mem["live_peak_bytes_per_rank"]) == 2 and len(mem["peak_rss_bytes_per_rank"]) == 2, name
        assert min(mem["peak_rss_bytes_per_rank"]) > max(mem["live_peak_bytes_per_rank"]) > 0, name
        part = mem["breakdown_fullest_rank"]  # AdamW keeps two moments per parameter
        assert part["params"] > 0 and part["optimizer"] >= 1.9 * part["params"], (name, part)
        assert part["total"] == mem["live_peak_bytes_fullest_rank"], name
        plan = lay["planner"]
        assert plan["step_s"] > 0 and plan["tokens_per_s"] > 0, name
        assert 0.5 < plan["peak_bytes"] / mem["live_peak_bytes_fullest_rank"] < 2, (name, plan["peak_bytes"])
        assert lay["planner_memory_vs_measured"]["verdict"] in VERDICTS, name
    assert model["layouts"]["pp_ep"]["planner"]["bubble"] > 0 and model["layouts"]["ep"]["planner"]["bubble"] == 0
    ratio = model["layouts"]["pp_ep"]["tokens_per_s_vs_ep"]
    assert ratio["verdict"] == "no goal" and ratio["n"] == 1 and math.isfinite(ratio["median"])
    assert ratio["predicted"] > 0
    assert "tokens_per_s_vs_ep" not in model["layouts"]["ep"]


def test_parallel_layouts_disagreement_aborts(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--layouts", "ep,ep_ac_full", "--perturb-layout", "ep_ac_full")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "ABORTED" in line]
    assert lines, proc.stderr[-4000:]
    assert "ep_ac_full" in lines[0] and "differs from ep" in lines[0] and "first step" in lines[0]
    assert not (tmp_path / "parallel_layouts_cpu_smoke.json").exists()
