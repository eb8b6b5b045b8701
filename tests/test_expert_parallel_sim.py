"""The step model of ``benchmarks/expert_parallel_sim.py``: engine semantics, routing and placement
mirrors against the system's functions, the imbalance behaviour, and the ``--smoke`` run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.sim.step_model import (
    DeviceCosts,
    FSSDPMirror,
    Shape,
    Timeline,
    ds_capacity,
    ep_routing,
    fssdp_routing,
    ps_finish,
    simulate,
)
from system.config.fssdp import FSSDPConfig
from system.parallel.fssdp import LoadTracker, Ownership, route_tokens, sparse_materialization

ROOT = Path(__file__).resolve().parent.parent


def _hardware(name: str = "nvlink"):
    from benchmarks.expert_parallel_sim import hardware

    return hardware(name, 0.6, 0.8)


SHAPE = Shape(dim=1024, expert_dim=4096, experts=32, top_k=2, layers=2, tokens=4096, dense_params=4 * 1024 * 1024 * 2)


def _costs(world: int, name: str = "nvlink") -> DeviceCosts:
    return DeviceCosts(_hardware(name), SHAPE, 2048, world)


def _loads(world: int, hot_share: float | None):
    """Every rank routes T*k assignments: uniform, or expert 0 taking ``hot_share`` of them."""
    E, total = SHAPE.experts, SHAPE.tokens * SHAPE.top_k
    if hot_share is None:
        counts = np.full(E, total / E)
    else:
        counts = np.full(E, total * (1 - hot_share) / (E - 1))
        counts[0] = total * hot_share
    counts = np.round(counts)
    return lambda step, layer: np.broadcast_to(counts, (world, E))


# --------------------------------------------------------------------------------------------
# engine


def test_collective_waits_for_the_slowest_rank() -> None:
    tl = Timeline(3)
    tl.compute(np.array([1.0, 2.0, 3.0]))
    tl.collective(0.5, "x")
    assert tl.clock.tolist() == [3.5, 3.5, 3.5]
    assert tl.wait_s.tolist() == [2.0, 1.0, 0.0]
    # an async collective overlaps compute; a later one on the same channel queues behind it
    h = tl.collective(2.0, "async", async_op=True)
    tl.compute(1.0)
    tl.collective(0.1, "y")
    assert tl.now() == pytest.approx(3.5 + 2.0 + 0.1)
    tl.compute(np.array([0.0, 0.0, 4.0]))
    assert tl.now() == pytest.approx(5.6 + 4.0)
    tl.wait(h)  # already done: no effect


def test_processor_sharing_when_ranks_outnumber_cores() -> None:
    assert ps_finish(np.zeros(4), np.array([1.0, 1.0, 2.0, 2.0]), 2).tolist() == [2.0, 2.0, 3.0, 3.0]
    assert ps_finish(np.zeros(2), np.array([1.0, 2.0]), math.inf).tolist() == [1.0, 2.0]
    # a late start shares only while it runs
    assert ps_finish(np.array([0.0, 1.0]), np.array([2.0, 1.0]), 1).tolist() == [3.0, 3.0]


def test_step_time_is_the_slowest_rank() -> None:
    """EP with one overloaded rank: the step equals the busiest rank's work, not the average."""
    world = 4
    costs = _costs(world)
    even = simulate("ep", SHAPE, costs, _loads(world, None), world, 3, 1)
    skew = simulate("ep", SHAPE, costs, _loads(world, 0.45), world, 3, 1)
    rows_even = SHAPE.tokens * SHAPE.top_k  # per rank and layer
    hot_rank_rows = world * SHAPE.tokens * SHAPE.top_k * (0.45 + 7 * 0.55 / 31)
    assert skew.busiest_rows_over_even == pytest.approx(hot_rank_rows / rows_even, rel=2e-3)
    extra = costs.expert(np.array([hot_rank_rows]), False)[0] - costs.expert(np.array([rows_even]), False)[0]
    assert skew.step_mean_s - even.step_mean_s > SHAPE.layers * extra  # at least the forward GEMMs of the hot rank


# --------------------------------------------------------------------------------------------
# the model's answers


def test_balanced_ep_and_fssdp_agree() -> None:
    world = 8
    costs = _costs(world)
    ep = simulate("ep", SHAPE, costs, _loads(world, None), world, 10, 6)
    fs = simulate("fssdp", SHAPE, costs, _loads(world, None), world, 10, 6)
    assert fs.bytes_per_step == 0  # nothing above the mean load: nothing replicated
    assert fs.step_mean_s == pytest.approx(ep.step_mean_s, rel=0.05)


def test_hot_expert_slows_ep_not_fssdp() -> None:
    world = 8
    costs = _costs(world)
    t = {(s, h): simulate(s, SHAPE, costs, _loads(world, h), world, 10, 6).step_mean_s
         for s in ("ep", "fssdp") for h in (0.1, 0.4)}
    assert t["ep", 0.4] / t["ep", 0.1] > 1.5  # EP's step follows the hot expert's load
    assert t["fssdp", 0.4] / t["fssdp", 0.1] < 1.15  # FSSDP replicates it and splits its tokens
    assert t["ep", 0.4] / t["fssdp", 0.4] > 1.3


def test_deepspeed_capacity_and_drops() -> None:
    counts = np.array([[10.0, 2, 2, 2], [4, 4, 4, 4]])
    assert ds_capacity(counts, None, 2) == 10  # dropless: the largest per-rank load
    assert ds_capacity(counts, 1.25, 2) == 5  # ceil(1.25 * 16 / 4)
    world = 4
    r = simulate("deepspeed", SHAPE, _costs(world), _loads(world, 0.4), world, 3, 1, capacity_factor=1.0)
    total = SHAPE.tokens * SHAPE.top_k
    C = math.ceil(total / SHAPE.experts)
    assert r.drop_rate == pytest.approx((0.4 * total - C) / total, abs=2e-3)


# --------------------------------------------------------------------------------------------
# mirrors of the system's decisions


@pytest.mark.parametrize("seed", range(6))
def test_fssdp_routing_matches_route_tokens(seed: int) -> None:
    rng = np.random.default_rng(seed)
    W = int(rng.choice([2, 4, 8]))
    E = W * int(rng.choice([1, 2, 3]))
    rpn = int(rng.choice([1, 2, W]))
    counts = rng.integers(0, 12, size=(W, E)).astype(float)
    placement = np.zeros((E, W), dtype=bool)
    placement[np.arange(E), np.arange(E) // (E // W)] = True
    placement |= rng.random((E, W)) < 0.3
    rows, traffic = fssdp_routing(counts, placement, rpn)
    want_rows, want_traffic = np.zeros((W, E)), np.zeros((W, W))
    for s in range(W):
        experts = torch.repeat_interleave(torch.arange(E), torch.as_tensor(counts[s]).long())
        dest = route_tokens(experts, s, torch.as_tensor(placement), rpn)
        for e, d in zip(experts.tolist(), dest.tolist()):
            want_rows[d, e] += 1
            want_traffic[s, d] += 1
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(traffic, want_traffic)


def test_ep_routing_blocks() -> None:
    counts = np.array([[1.0, 2, 3, 4], [5, 6, 7, 8]])
    rows, traffic = ep_routing(counts, 2)
    np.testing.assert_array_equal(rows, [[6, 8, 0, 0], [0, 0, 10, 12]])
    np.testing.assert_array_equal(traffic, [[3, 7], [11, 15]])


def test_placement_mirror_follows_the_controller_rules() -> None:
    """The mirror = LoadTracker + sparse_materialization with t = m until step 2, then the estimate;
    heterogeneous re-sharding every R steps."""
    E, W, m = 8, 4, 2
    cfg = FSSDPConfig(reshard_interval=4)
    mirror = FSSDPMirror(cfg, E, W, layers=1, ranks_per_node=W, estimated_t=5)
    tracker, own = LoadTracker(cfg.load_window, E), Ownership.uniform(E, W)
    rng = np.random.default_rng(0)
    for step in range(9):
        t = m if step < 2 else 5
        want = sparse_materialization(tracker.load, own, W, W, t, m, cfg.replicate_above).numpy()
        got, _ = mirror.begin_step()
        np.testing.assert_array_equal(got[0], want)
        load = rng.integers(0, 100, size=E).astype(float) * np.where(np.arange(E) < 2, 10, 1)
        mirror.end_step([load])
        tracker.update(torch.as_tensor(load))
        if (step + 1) % 4 == 0:
            from system.parallel.fssdp import heterogeneous_sharding

            own = heterogeneous_sharding(tracker.load, W, previous=own)
        assert torch.equal(mirror.owners[0].owner, own.owner)
    assert mirror.resharded >= 1


def test_trace_loads_keep_the_imbalance() -> None:
    from benchmarks.expert_parallel_sim import TraceLoads

    rows = [{"step": 1, "tokens": 100, "tokens_per_expert": [[80, 40, 40, 40], [50, 50, 50, 50]]}]
    loads = TraceLoads(rows, experts=16, top_k=2, world=4, tokens=1000, seed=0)
    c0, c1 = loads(0, 0), loads(0, 1)
    assert c0.shape == (4, 16) and c0[0].sum() == 2000
    assert c0[0].max() / c0[0].mean() == pytest.approx(80 / 50, rel=0.02)
    assert c1[0].max() - c1[0].min() <= 1
    assert np.array_equal(loads(0, 2), c0)  # layer 2 replays trace layer 0


# --------------------------------------------------------------------------------------------
# end to end


def test_smoke_run_writes_every_cell(tmp_path: Path) -> None:
    from benchmarks import expert_parallel_sim as sim

    cal = ROOT / "benchmarks/results/expert_parallel_sim_calibration.json"
    measured = ROOT / "benchmarks/results/expert_parallel_cpu.json"
    trace = ROOT / "benchmarks/results/routing_trace_cpu_tiny.jsonl"
    if not cal.exists():
        pytest.skip("no shipped calibration (benchmarks/results/expert_parallel_sim_calibration.json)")
    args = ["--smoke", "--out", str(tmp_path), "--calibration", str(cal), "--measured", str(measured)]
    if trace.exists():
        args += ["--trace", str(trace)]
    sim.main(args)
    out = json.loads((tmp_path / "expert_parallel_sim_smoke.json").read_text())
    md = (tmp_path / "expert_parallel_sim_smoke.md").read_text()
    names = list(sim.WORKLOADS) + (["trace"] if trace.exists() else [])
    cells = {(c["profile"], c["world"], c["workload"]) for c in out["scale"]["cells"]}
    assert cells == {(p, w, n) for p in ("nvlink", "ib") for w in (8, 16) for n in names}
    for c in out["scale"]["cells"]:
        for key in ("ep_ms", "fssdp_ms", "deepspeed_ms", "deepspeed_cf_ms"):
            assert c[key] > 0, (c["workload"], key)
        assert isinstance(c["goal_met"], bool) and 0 <= c["deepspeed_cf_drop_rate"] < 1
    (val,) = out["validation"]
    assert "skipped" not in val, val.get("skipped")
    ran = json.loads(measured.read_text())["workloads"]  # one row per (workload, system) the measured run timed
    assert len(val["rows"]) == sum(len(w["systems"]) for w in ran.values())
    assert all(r["predicted_ms"] > 0 for r in val["rows"])
    assert out["provenance"]["commit"] and out["goal"]["fssdp_over_ep_at_least"] == 1.5
    assert "FSSDP/EP" in md and "Validation" in md
