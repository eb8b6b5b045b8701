"""``benchmarks/expert_parallel.py`` end to end at toy size (2 Gloo processes), and its abort on a disagreement.

Each test runs the script in a subprocess into ``tmp_path``: the first with every default system on a balanced
and a skewed workload, checking the JSON's systems, numbers, verdicts, drop rates and provenance stamp; the
second makes one system compute something else (the hidden ``--perturb-system``) and expects the run to stop
with a non-zero exit code and a line naming both systems.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ["ep", "fssdp", "deepspeed", "deepspeed_cf1.0", "deepspeed_cf1.25"]
VERDICTS = {"met", "not met", "not distinguishable"}


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "benchmarks/expert_parallel.py", "--smoke", "--out", str(tmp_path), "--log-level", "WARNING",
           "--warmup", "3", "--repeats", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_expert_parallel_smoke(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    proc = _run(tmp_path, "--workloads", "balanced", "one_hot", "--systems", ",".join(SYSTEMS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "expert_parallel_cpu_smoke.json").read_text())
    assert (tmp_path / "expert_parallel_cpu_smoke.md").read_text().count("Commit:") == 1
    stamp = result["provenance"]
    assert stamp["command"] and stamp["versions"]["torch"] and "dirty" in stamp and "commit" in stamp
    assert result["config"]["world_size"] == 2 and result["config"]["oversubscribed"] in (True, False)
    assert result["method"]["fssdp_overlap_budget"]["t"] >= 0
    for name in ("balanced", "one_hot"):
        w = result["workloads"][name]
        assert set(w["systems"]) == set(SYSTEMS), name
        for system, s in w["systems"].items():
            assert s["step_ms_slowest_rank"]["median"] > 0, (name, system)
            assert s["tokens_per_s"]["median"] > 0, (name, system)
            assert 0 <= s["drop_rate"] <= 1, (name, system)
        for system in ("deepspeed_cf1.0", "deepspeed_cf1.25"):
            assert system in w["agreement"]["capacity_modes"], (name, system)
        assert w["systems"]["deepspeed"]["drop_rate"] == 0 and w["systems"]["ep"]["drop_rate"] == 0
        for key, r in w["ratios"].items():
            assert r["verdict"] in VERDICTS, (name, key, r["verdict"])
            assert r["n"] == 2 and math.isfinite(r["median"]), (name, key)
        assert {"fssdp/ep", "deepspeed/ep", "fssdp/deepspeed", "deepspeed_cf1.25/ep"} <= set(w["ratios"])
    # one_hot's hot expert takes 50% of the assignments: capacity 1.0 must drop some, the matched systems none
    assert result["workloads"]["one_hot"]["systems"]["deepspeed_cf1.0"]["drop_rate"] > 0
    assert {g["workload"] for g in result["goals"]} == {"balanced", "one_hot"}
    assert all(g["verdict"] in VERDICTS for g in result["goals"])


def test_expert_parallel_disagreement_aborts(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--workloads", "balanced", "--systems", "ep,fssdp", "--fssdp-overlap-budget", "1",
                "--warmup", "1", "--perturb-system", "fssdp")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "ABORTED" in line]
    assert lines, proc.stderr[-4000:]
    assert "fssdp" in lines[0] and "ep" in lines[0] and "first step" in lines[0]
    assert not (tmp_path / "expert_parallel_cpu_smoke.json").exists()
