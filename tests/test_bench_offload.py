"""Smoke run of ``benchmarks/offload.py``: every default peer, toy model, end to end through a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERDICTS = {"met", "not met", "not distinguishable", "measurement error"}


def test_offload_smoke(tmp_path: Path) -> None:
    """``--smoke`` loads every default peer, checks their tokens agree, and writes stamped results with verdicts."""
    cmd = [sys.executable, "benchmarks/offload.py", "--smoke", "--out", str(tmp_path),
           "--model-dir", str(tmp_path / "m")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    result = json.loads((tmp_path / "offload_cpu_smoke.json").read_text())
    assert (tmp_path / "offload_cpu_smoke.md").read_text().startswith("# Offloaded inference")

    prov = result["provenance"]
    assert prov["command"].startswith("python") and prov["crc32_implementation"] and "torch" in prov["versions"]
    peers = {"resident", "ring1", "ring2", "acc_cpu", "acc_disk", "acc_cpu_matched", "acc_disk_matched",
             "acc_cpu_matched_fresh"}
    assert [c["link"] for c in result["cells"]] == [None, 2e9]
    for cell in result["cells"]:
        assert set(cell["peers"]) == peers
        for name, p in cell["peers"].items():
            assert p["tokens_per_s"]["n"] == 2 and p["tokens_per_s"]["min"] > 0, name
            assert p["device_peak_bytes"] > 0, name
            if name != "resident":
                assert p["bytes_per_step"] > 0 and p["measured_bandwidth"] > 0, name
                assert cell["speedup_of_ring2"].get(name, {"n": 2})["n"] == 2, name
        # the matched configuration streams exactly the ring's bytes; the recommended one streams attention too
        ring = cell["peers"]["ring2"]["bytes_per_step"]
        assert cell["peers"]["acc_cpu_matched"]["bytes_per_step"] == ring
        assert cell["peers"]["acc_disk_matched"]["bytes_per_step"] == ring
        assert cell["peers"]["acc_cpu"]["bytes_per_step"] > ring
    assert {g["verdict"] for g in result["goals"]} <= VERDICTS
    names = {g["name"] for g in result["goals"]}
    assert names >= {"ring2 efficiency eta", "ring2 tokens/s over acc_cpu_matched", "ring2 tokens/s over acc_disk",
                     "ring2 tokens/s over acc_disk_matched", "ring2 peak device memory over the budget"}
