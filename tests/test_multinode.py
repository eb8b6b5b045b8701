"""Two torchrun agents on 127.0.0.1 stand in for two nodes: ``moesys train --nnodes 2
--nproc-per-node 1 --rdzv-endpoint 127.0.0.1:PORT`` run twice (one agent per "node", c10d rendezvous,
Gloo), training EP=2 on real text, must give the losses of a single-node run of the same world size
(``--nproc-per-node 2``, ``--standalone``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.expert_dim", "64",
    "--training.seq_len", "64", "--training.batch_size", "4", "--training.steps", "6",
    "--training.log_interval", "1", "--training.eval_interval", "0", "--training.sample_tokens", "0",
    "--training.warmup_steps", "2", "--metrics.progress", "false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(run_dir: Path, *launch: str) -> list[str]:
    return [sys.executable, "-m", "system.cli", "train", "--config", str(ROOT / "configs/cpu-tiny.toml"),
            *launch, *SMALL, "--metrics.run_dir", str(run_dir)]


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_agents_match_single_node(tmp_path: Path) -> None:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    single = tmp_path / "single"
    proc = subprocess.run(_cmd(single, "--nproc-per-node", "2"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = tmp_path / "multi"
    endpoint = f"127.0.0.1:{_free_port()}"
    launch = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes")
    agents = [subprocess.Popen(_cmd(multi, *launch), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=600)
            outputs.append((agent.returncode, out, err))
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for code, out, err in outputs:
        assert code == 0, err[-3000:]
    # Each agent printed a c10d (not standalone) torchrun command for one node of two.
    for _, _, err in outputs:
        assert "--rdzv-backend c10d" in err and f"--rdzv-endpoint {endpoint}" in err and "--standalone" not in err

    summary = json.loads((multi / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ep"] == 2
    want, got = _losses(single), _losses(multi)
    assert sorted(got) == list(range(1, 7)) == sorted(want)
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
