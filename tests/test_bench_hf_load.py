"""End-to-end smoke run of ``benchmarks/hf_load.py`` (slow: real processes, a real checkpoint on disk)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
