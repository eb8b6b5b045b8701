"""``moesys launch`` on Ray: planning and validation (no Ray), and real runs on a two-raylet cluster.

The cluster tests start ``ray.cluster_utils.Cluster`` (head + one more node, one CPU each, everything
on 127.0.0.1, no dashboard) and a 2-worker Gloo job of the tiny config; a test-only fault injection
(``MOESYS_FAULT_INJECT``) kills a worker, or pauses the job while the test removes a node. The losses
are compared, step by step, with one uninterrupted process of the same global batch.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from system.cli import main as cli_main
from system.cluster.ray_launch import RayLaunchSpec, check_storage_writable, plan_launch
from system.cluster.ray_worker import FAULT_ENV, FaultInjection, adapt_to_world, newest_checkpoint
from system.config.loader import load_config
from system.distributed.init import check_existing_group, init_distributed

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "cpu-tiny.toml")
INTERVAL = 4
STEPS = 12
SMALL = [
    "--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.expert_dim", "64",
    "--training.seq_len", "64", "--training.batch_size", "4", "--training.steps", str(STEPS),
    "--training.log_interval", "1", "--training.eval_interval", "0", "--training.eval_batches", "2",
    "--training.sample_tokens", "0", "--training.warmup_steps", "2", "--training.threads_per_rank", "1",
    "--metrics.tensorboard", "false", "--metrics.progress", "false", "--checkpoint.interval", str(INTERVAL),
]
RTOL = 1e-5  # EP=2 over 2 Gloo ranks vs one process: same arithmetic up to summation order


# ----------------------------------------------------------------------------------- no Ray needed
def test_adapt_to_world_keeps_global_batch_and_shrinks_ep() -> None:
    cfg = load_config(CONFIG, SMALL)  # ep=2, dp=1, batch 4 per rank at 2 ranks
    one = adapt_to_world(cfg, 1, 2)
    assert (one.parallel.ep, one.parallel.dp, one.training.batch_size) == (1, 1, 8)
    same = adapt_to_world(cfg, 2, 2)
    assert (same.parallel.ep, same.parallel.dp, same.training.batch_size) == (2, 1, 4)
    assert cfg.training.batch_size == 4, "adapt_to_world must not change its input"
    four = load_config(CONFIG, [*SMALL, "--parallel.ep", "4", "--parallel.dp", "-1"])
    six = adapt_to_world(four, 6, 6)
    assert (six.parallel.ep, six.parallel.dp) == (2, 3)
    with pytest.raises(ValueError, match="does not divide over 3 ranks"):
        adapt_to_world(cfg, 3, 2)


def test_plan_launch_validates_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = str(tmp_path / "store")
    plan = plan_launch(RayLaunchSpec(CONFIG, SMALL, num_nodes="2", workers_per_node=1, storage_path=store, name="a"))
    assert plan.num_workers == 2 and plan.resources_per_worker == {"CPU": 1.0}
    assert plan.cfg.checkpoint.dir == f"{store}/a/checkpoints" and plan.cfg.metrics.run_dir == f"{store}/a"
    assert plan.report_checkpoints and not plan.cfg.metrics.progress
    elastic = plan_launch(RayLaunchSpec(CONFIG, SMALL, num_nodes="1:2", storage_path=store, name="b"))
    assert elastic.num_workers == (1, 2)

    with pytest.raises(ValueError, match=r"parallel.dp=1 x parallel.ep=2 = 2 ranks, but .* = 4 workers"):
        plan_launch(RayLaunchSpec(CONFIG, SMALL, num_nodes="2", workers_per_node=2, storage_path=store))
    with pytest.raises(ValueError, match="does not divide by parallel.ep=2"):
        plan_launch(RayLaunchSpec(CONFIG, [*SMALL, "--parallel.dp", "-1"], num_nodes="3", storage_path=store))
    with pytest.raises(ValueError, match=r"does not divide over \[3\] workers"):
        plan_launch(RayLaunchSpec(CONFIG, [*SMALL, "--parallel.dp", "-1"], num_nodes="2:4", storage_path=store))
    with pytest.raises(ValueError, match="--storage-path is required"):
        plan_launch(RayLaunchSpec(CONFIG, SMALL, num_nodes="2"))
    with pytest.raises(ValueError, match="needs --gpus-per-worker"):
        plan_launch(RayLaunchSpec(CONFIG, [*SMALL, "--parallel.device", "cuda"], num_nodes="2", storage_path=store))
    with pytest.raises(ValueError, match="nnodes must be"):
        plan_launch(RayLaunchSpec(CONFIG, SMALL, num_nodes="2:1", storage_path=store))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot be written"):
        plan_launch(RayLaunchSpec(CONFIG, SMALL, num_nodes="2", storage_path=str(blocker / "sub")))
    check_storage_writable("memory://moesys-probe")
    monkeypatch.setenv(FAULT_ENV, "explode:3:0:/tmp/x")
    with pytest.raises(ValueError, match=FAULT_ENV):
        plan_launch(RayLaunchSpec(CONFIG, SMALL, num_nodes="2", storage_path=store))
    assert FaultInjection.parse("kill:7:1:/tmp/a:b") == FaultInjection("kill", 7, 1, "/tmp/a:b")


@pytest.fixture
def restore_logging():
    """``moesys launch`` configures the root logger on the (captured) stderr; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_cli_launch_dry_run_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture, restore_logging) -> None:
    args = ["launch", "--config", CONFIG, "--num-nodes", "2", "--workers-per-node", "1",
            "--storage-path", str(tmp_path), "--name", "dry", "--dry-run", *SMALL]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "workers        2 x {'CPU': 1.0}" in out and f"{tmp_path}/dry/checkpoints every {INTERVAL} steps" in out
    assert not (tmp_path / "dry").exists(), "a dry run must not create the run"
    assert cli_main(["launch", "--config", CONFIG, "--num-nodes", "2", "--workers-per-node", "2", "--dry-run",
                     "--storage-path", str(tmp_path)]) == 2
    assert "= 4 workers" in capsys.readouterr().err


def test_existing_process_group_is_used_and_checked() -> None:
    """A group made by the launcher (here: by hand, like Ray) is reused; a backend unfit for the device is an error."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert init_distributed(torch.device("cpu")) == (0, 1)
        with pytest.raises(ValueError, match="already initialised with backend 'gloo'.*needs 'nccl'"):
            check_existing_group(torch.device("cuda", 0))
        with pytest.raises(ValueError, match="needs CUDA devices"):
            check_existing_group(torch.device("cpu"), "nccl")
    finally:
        dist.destroy_process_group()


def test_newest_checkpoint_ignores_uncommitted(tmp_path: Path) -> None:
    from system.checkpoint import save

    root = tmp_path / "ckpt"
    assert newest_checkpoint(str(root)) is None
    save({"w": torch.ones(3)}, root / "step_00000004")
    (root / "step_00000008").mkdir()  # a save that never committed: no metadata.json
    assert newest_checkpoint(str(root)).endswith("step_00000004")


# ------------------------------------------------------------------------------- Ray cluster runs
def _losses_by_attempt(run_dir: Path) -> list[dict[int, float]]:
    """Per-step losses of metrics.jsonl (appended to by every attempt), split where the step goes back."""
    attempts: list[dict[int, float]] = []
    last = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" not in rec:
            continue
        if last is None or rec["step"] <= last:
            attempts.append({})
        attempts[-1][rec["step"]] = rec["loss"]
        last = rec["step"]
    return attempts


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Losses of the uninterrupted job in ONE process with the same global batch (8 sequences)."""
    run_dir = tmp_path_factory.mktemp("reference")
    cmd = [sys.executable, "-m", "system.train.main", "--config", CONFIG, *SMALL, "--parallel.ep", "1",
           "--training.batch_size", "8", "--checkpoint.interval", "0", "--checkpoint.save_final", "false",
           "--metrics.run_dir", str(run_dir)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (losses,) = _losses_by_attempt(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch):
    """A head and one more raylet on 127.0.0.1 (1 CPU each), the driver connected; torn down, leaving nothing."""
    ray = pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # Ray rewrites 127.0.0.1 to the NIC's address unless cluster mode is off (ray-project/ray#1556);
    # the GCS listens on 127.0.0.1 only, so the driver must keep 127.0.0.1.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    session = cluster.head_node.session_name
    try:
        worker_node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address)
        yield cluster, worker_node
    finally:
        started = [p for p in me.children(recursive=True) if p.pid not in before]
        ray.shutdown()
        cluster.shutdown()
        _, alive = psutil.wait_procs(started, timeout=30)
        strays = [p for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])]
        for p in {*alive, *strays}:
            p.kill()  # do not let a failure here leave processes behind for the next test
        assert not alive and not strays, f"Ray processes left running: {alive + strays}"


def _check_continues(result, reference: dict[int, float], fault_step: int, world_after: int) -> None:
    assert result.error is None, result.error
    assert result.summary is not None and result.summary["steps"] == STEPS, "the run did not finish all steps"
    assert len(result.attempts) == 2, f"expected exactly one restart, got attempts {result.attempts}"
    first, second = result.attempts
    assert first["start_step"] == 0 and first["world_size"] == 2 and first["ep"] == 2
    assert second["world_size"] == world_after and second["ep"] == min(2, world_after)
    resumed = second["start_step"]
    assert 0 < resumed <= fault_step and fault_step - resumed <= INTERVAL, f"lost {fault_step - resumed} steps"
    assert second["resumed_from"].endswith(f"step_{resumed:08d}")

    before, after = _losses_by_attempt(Path(result.run_dir))
    assert sorted(before) == list(range(1, fault_step + 1))
    assert sorted(after) == list(range(resumed + 1, STEPS + 1)), "the restart did not continue from the checkpoint"
    for losses in (before, after):
        for step, loss in losses.items():
            assert abs(loss - reference[step]) <= RTOL * abs(reference[step]), (step, loss, reference[step])
    root = Path(result.checkpoint_root)
    assert (root / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert result.checkpoint is not None and result.checkpoint.endswith(f"step_{STEPS:08d}")


@pytest.mark.peers
@pytest.mark.timeout(420)
def test_killed_worker_restarts_from_checkpoint(ray_cluster, reference, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker SIGKILLs itself at step 7 (once); Ray restarts both workers, which resume from step 4
    (committed asynchronously, before ``latest`` moved) and reproduce the uninterrupted losses."""
    from system.cluster.ray_launch import launch

    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"kill:7:1:{marker}")
    t0 = time.perf_counter()
    result = launch(RayLaunchSpec(CONFIG, SMALL, num_nodes="2", workers_per_node=1,
                                  storage_path=str(tmp_path / "store"), name="kill", max_failures=2))
    print(f"ray run with one restart: {time.perf_counter() - t0:.1f} s")
    assert marker.read_text().startswith("kill at step 7 on rank 1")
    _check_continues(result, reference, fault_step=7, world_after=2)


@pytest.mark.peers
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_node_removed_resumes_on_fewer_workers(ray_cluster, reference, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Elastic 1..2 workers: the job pauses at step 6, the test removes the second node, and Ray
    restarts on the one left: EP=2 saved at step 4, resumed as EP=1 with batch 8 on one worker."""
    from system.cluster.ray_launch import launch

    cluster, worker_node = ray_cluster
    marker = tmp_path / "paused"
    monkeypatch.setenv(FAULT_ENV, f"pause:6:0:{marker}")
    # Ray's resource view refreshes every 20 s: the first restart may wait for 2 workers that never come.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")

    def remove_when_paused() -> None:
        deadline = time.monotonic() + 300
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        cluster.remove_node(worker_node)

    remover = threading.Thread(target=remove_when_paused, daemon=True)
    remover.start()
    t0 = time.perf_counter()
    result = launch(RayLaunchSpec(CONFIG, SMALL, num_nodes="1:2", workers_per_node=1,
                                  storage_path=str(tmp_path / "store"), name="shrink", max_failures=2))
    print(f"elastic ray run with one node removed: {time.perf_counter() - t0:.1f} s")
    remover.join(timeout=60)
    assert marker.exists()
    _check_continues(result, reference, fault_step=6, world_after=1)
