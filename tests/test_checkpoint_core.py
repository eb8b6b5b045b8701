"""Resharding checkpoint core (ByteCheckpoint, arXiv 2407.20143): save on 4 ranks, load on 2 and 1.

Covers: row-sharded, FSSDP-like scattered rows, column-sharded non-contiguous views, dp-replicated
boxes, replicated and 0-d tensors, several dtypes; write-once and balanced writers; async snapshot
semantics; memory:// storage; corruption, truncation, missing files, mismatches, uncommitted
directories, a SIGKILL during a save; import of a torch.distributed.checkpoint directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from _dist import run_workers
from system.checkpoint import (
    AsyncCheckpointer, ChecksumError, CheckpointError, DataFileError, FormatVersionError, MissingTensorError,
    SavePlanError, Shard, ShardedEntry, TensorMismatchError, UncommittedCheckpointError, capture_rng,
    commit_latest, decode_rng_state, encode_rng_state, import_dcp, inspect, list_checkpoints, load, prune,
    read_latest, resolve_checkpoint, restore_rng, save, step_dir_name, verify,
)
from system.checkpoint import writer as ckpt_writer
from system.checkpoint.planner import TensorDecl, build_save_plan

REPLICATED = ("emb", "norm", "h", "mask", "step", "count")
ROW_SPLIT4 = [(0, 3), (3, 5), (5, 8), (8, 10)]


def _globals() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "emb": torch.randn(12, 16, generator=g),
        "norm": torch.randn(16, generator=g).bfloat16(),
        "h": torch.randn(4, 4, generator=g).half(),
        "mask": torch.rand(9, generator=g) > 0.5,
        "step": torch.tensor(7.0),
        "count": torch.tensor(123456789012, dtype=torch.int64),
        "rows": torch.randn(10, 6, generator=g),
        "experts": torch.randn(8, 4, 6, generator=g).bfloat16(),
        "cols": torch.randn(6, 8, generator=g),
        "dup": torch.randint(-(2**40), 2**40, (8, 5), generator=g),
    }


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` stored transposed (a non-contiguous view with ``t``'s values)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _state4(rank: int, g: dict[str, torch.Tensor]) -> dict:
    """Rank ``rank`` of 4: row shards, FSSDP-like experts {r, r+4}, column views, dp-replicated rows."""
    state = {k: g[k].clone() for k in REPLICATED}
    r0, r1 = ROW_SPLIT4[rank]
    state["rows"] = ShardedEntry([10, 6], [Shard(g["rows"][r0:r1].clone(), (r0, 0))])
    state["experts"] = ShardedEntry(
        [8, 4, 6], [Shard(_noncontig(g["experts"][e : e + 1]), (e, 0, 0)) for e in (rank, rank + 4)]
    )
    cols_full = g["cols"].clone()  # each rank's shard is a strided view into its own full copy
    state["cols"] = ShardedEntry([6, 8], [Shard(cols_full[:, 2 * rank : 2 * rank + 2], (0, 2 * rank))])
    half = rank // 2  # dp replicas: ranks 0,1 hold rows [0,4); ranks 2,3 hold rows [4,8)
    state["dup"] = ShardedEntry([8, 5], [Shard(g["dup"][4 * half : 4 * half + 4].clone(), (4 * half, 0))])
    state["absent"] = ShardedEntry([3], [Shard(torch.arange(3.0), (0,))] if rank == 2 else [])
    return state


def _mutate(state: dict) -> None:
    """What an optimizer step does to the source tensors right after a save returns."""
    for v in state.values():
        tensors = [s.tensor for s in v.shards] if isinstance(v, ShardedEntry) else [v]
        for t in tensors:
            t.logical_not_() if t.dtype == torch.bool else t.add_(1000)


def _save4(rank: int, world: int, root: str) -> dict:
    g = _globals()
    state = _state4(rank, g)
    layout = {"world_size": world, "ep": 4, "dp": 1, "expert_mode": "fssdp"}
    save(state, f"{root}/{step_dir_name(1)}", extra={"step": 1, "config": {"d": 16}},
         rank_extra={"rank": rank, "rng": capture_rng()}, layout=layout, update_latest=True)
    with AsyncCheckpointer() as ckpt:
        h2 = ckpt.save(state, f"{root}/{step_dir_name(2)}", extra={"step": 2}, layout=layout)
        _mutate(state)  # training goes on: must not leak into step 2
        h3 = ckpt.save(state, f"{root}/{step_dir_name(3)}", extra={"step": 3}, layout=layout)
        first_done_when_second_returned = h2.done()
        h3.wait()
        return {"h2": h2.wait(), "ordered": first_done_when_second_returned, "blocking_s": ckpt.last_blocking_s}


def _load2(rank: int, world: int, root: str) -> dict:
    g = _globals()
    rows = [(0, 7), (7, 10)][rank]
    experts = torch.zeros(6, 4, 4, dtype=torch.bfloat16).permute(2, 1, 0)  # non-contiguous [4, 4, 6]
    targets = {k: torch.zeros_like(g[k]) for k in REPLICATED}
    targets["rows"] = ShardedEntry([10, 6], [Shard(torch.zeros(rows[1] - rows[0], 6), (rows[0], 0))])
    targets["experts"] = ShardedEntry([8, 4, 6], [Shard(experts, (4 * rank, 0, 0))])
    targets["cols"] = ShardedEntry([6, 8], [Shard(torch.zeros(3, 8), (3 * rank, 0))])
    dup = [(2, 4), (0, 8)][rank]
    targets["dup"] = ShardedEntry([8, 5], [Shard(torch.zeros(dup[1], 5, dtype=torch.int64), (dup[0], 0))])
    result = load(targets, root)  # resolves root/latest -> step 1
    checks = {k: torch.equal(targets[k], g[k]) for k in REPLICATED}
    checks["rows"] = torch.equal(targets["rows"].shards[0].tensor, g["rows"][rows[0] : rows[1]])
    checks["experts"] = torch.equal(experts, g["experts"][4 * rank : 4 * rank + 4])
    checks["cols"] = torch.equal(targets["cols"].shards[0].tensor, g["cols"][3 * rank : 3 * rank + 3])
    checks["dup"] = torch.equal(targets["dup"].shards[0].tensor, g["dup"][dup[0] : dup[0] + dup[1]])
    return {"checks": checks, "extra": result.extra, "rank_extras": sorted(result.rank_extras), "path": result.path,
            "unexpected": result.unexpected}


def _full_targets(like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in like.items()}


@pytest.fixture(scope="module")
def saved4(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("ckpt4")
    return root, run_workers(_save4, 4, str(root))


def test_save_on_4_load_on_2_ranks(saved4):
    root, _ = saved4
    results = run_workers(_load2, 2, str(root))
    for r, res in enumerate(results):
        assert all(res["checks"].values()), (r, res["checks"])
        assert res["extra"] == {"step": 1, "config": {"d": 16}}
        assert res["rank_extras"] == [0, 1, 2, 3]
        assert res["path"].endswith(step_dir_name(1))
        assert res["unexpected"] == ["absent"]


def test_load_on_one_process_and_snapshot_semantics(saved4):
    root, results = saved4
    g = _globals()
    g["absent"] = torch.arange(3.0)
    targets = _full_targets(g)
    res = load(targets, root / step_dir_name(1))
    assert all(torch.equal(targets[k], g[k]) for k in g), [k for k in g if not torch.equal(targets[k], g[k])]
    assert res.rank_extras[3]["rank"] == 3
    restore_rng(res.rank_extras[0]["rng"])
    # step 2 was saved before the in-place update: it must hold the pre-update values
    targets = _full_targets(g)
    load(targets, root / step_dir_name(2))
    assert all(torch.equal(targets[k], g[k]) for k in g)
    state = {k: v.clone() for k, v in g.items()}
    _mutate(state)
    load(targets, root / step_dir_name(3))
    assert all(torch.equal(targets[k], state[k]) for k in g)
    assert all(r["ordered"] for r in results), "a second save must wait for the first"
    assert verify(root / step_dir_name(3)) == []


def test_replicated_written_once_and_writers_balanced(saved4):
    root, _ = saved4
    meta = json.loads((root / step_dir_name(1) / "metadata.json").read_text())
    tensors = meta["tensors"]
    for k in REPLICATED:
        assert len(tensors[k]["boxes"]) == 1, k
    assert len(tensors["dup"]["boxes"]) == 2  # two distinct dp-replicated boxes, each written once
    assert len(tensors["experts"]["boxes"]) == 8
    replicated_writers = {int(b["file"][5:10]) for k in REPLICATED for b in tensors[k]["boxes"]}
    assert len(replicated_writers) > 1, "replicated tensors all went to one rank (DCP-style)"
    payload = [0, 0, 0, 0]
    for t in tensors.values():
        for b in t["boxes"]:
            payload[meta["files"][b["file"]]["rank"]] += b["nbytes"]
    biggest_shared = tensors["emb"]["boxes"][0]["nbytes"]
    assert max(payload) - min(payload) <= biggest_shared, payload
    info = inspect(root)
    assert info["layout"]["expert_mode"] == "fssdp" and info["world_size"] == 4
    assert info["tensors"]["experts"] == {"dtype": "bfloat16", "shape": [8, 4, 6], "nbytes": 384, "boxes": 8}
    assert info["total_bytes"] == sum(info["files"].values())


def test_plan_balances_and_rejects_bad_layouts():
    full = (((0,), (16,)),)
    decls = [[TensorDecl(f"r{i}", "float32", (16,), full) for i in range(8)] for _ in range(4)]
    plan = build_save_plan(decls)
    assert len(plan.writes) == 8 and plan.bytes_per_rank(4) == [128] * 4
    # every rank numbering its local experts from 0: boxes collide and leave rows uncovered
    bad = [[TensorDecl("w", "float32", (8, 2), (((0, 0), (2, 2)),))] for _ in range(4)]
    with pytest.raises(SavePlanError, match="w .*cover 4 of 16"):
        build_save_plan(bad)
    overlap = [[TensorDecl("w", "float32", (4,), (((0,), (3,)),))], [TensorDecl("w", "float32", (4,), (((2,), (2,)),))]]
    with pytest.raises(SavePlanError, match="overlaps"):
        build_save_plan(overlap)
    mixed = [[TensorDecl("w", "float32", (4,), full[:0])], [TensorDecl("w", "bfloat16", (4,), full[:0])]]
    with pytest.raises(SavePlanError, match="rank 0 has \\[4\\] float32 but rank 1 has \\[4\\] bfloat16"):
        build_save_plan(mixed)


def _small_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"a": torch.randn(4, 6, generator=g), "b": torch.randn(300, generator=g).bfloat16(), "s": torch.tensor(2)}


def test_memory_fs_round_trip_and_latest():
    root = f"memory://ckpt-{os.getpid()}-{time.time_ns()}"
    state = _small_state()
    save(state, f"{root}/{step_dir_name(5)}", extra={"step": 5}, no_dist=True, update_latest=True, crc_chunk_bytes=64)
    assert read_latest(root) == step_dir_name(5)
    targets = {"a": ShardedEntry([4, 6], [Shard(torch.zeros(2, 3), (1, 2))]), "b": torch.zeros(300, dtype=torch.bfloat16)}
    res = load(targets, root, no_dist=True)
    assert torch.equal(targets["a"].shards[0].tensor, state["a"][1:3, 2:5]) and torch.equal(targets["b"], state["b"])
    assert res.extra == {"step": 5} and res.unexpected == ["s"]
    assert list_checkpoints(root) == [f"{root}/{step_dir_name(5)}"] and verify(root) == []


def test_async_second_save_waits_and_rng_helpers(tmp_path, monkeypatch):
    release = threading.Event()
    monkeypatch.setitem(ckpt_writer._TEST_HOOKS, "after_data", lambda rank: release.wait(60))
    state = _small_state()
    with AsyncCheckpointer(no_dist=True) as ckpt:
        h1 = ckpt.save(state, tmp_path / "one")
        assert not h1.done()  # the background write is held in the hook: save returned after the snapshot
        timer = threading.Timer(0.3, release.set)
        timer.start()
        h2 = ckpt.save(state, tmp_path / "two")  # must wait for the first save (shared staging buffer)
        assert release.is_set() and h1.done()
        h2.wait()
        timer.join()
    rng = torch.get_rng_state()
    assert torch.equal(decode_rng_state(encode_rng_state(rng)), rng)
    json.dumps(capture_rng())


@pytest.fixture
def one(tmp_path) -> tuple[Path, Path, dict]:
    state = _small_state()
    path = Path(save(state, tmp_path / step_dir_name(1), no_dist=True, update_latest=True, crc_chunk_bytes=64))
    return tmp_path, path, state


def _box(path: Path, fqn: str) -> dict:
    return json.loads((path / "metadata.json").read_text())["tensors"][fqn]["boxes"][0]


def test_flipped_byte_names_tensor_and_file(one):
    _, path, state = one
    box = _box(path, "b")
    data = path / box["file"]
    raw = bytearray(data.read_bytes())
    raw[box["byte_offset"] + 500] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=r"tensor b: file .*data-00000\.bin"):
        load({"b": torch.zeros(300, dtype=torch.bfloat16)}, path, no_dist=True)
    load({"a": torch.zeros(4, 6)}, path, no_dist=True)  # other tensors still load
    target = ShardedEntry([300], [Shard(torch.zeros(10, dtype=torch.bfloat16), (0,))])
    load({"b": target}, path, no_dist=True)  # only the chunks read are verified: the first is intact
    problems = verify(path)
    assert problems and all("tensor b" in p for p in problems)


def test_truncated_and_missing_file(one):
    _, path, _ = one
    data = path / _box(path, "b")["file"]
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(DataFileError, match=r"data-00000\.bin is truncated.*tensor b"):
        load({"b": torch.zeros(300, dtype=torch.bfloat16)}, path, no_dist=True)
    assert any("has 100 bytes" in p for p in verify(path))
    data.unlink()
    with pytest.raises(DataFileError, match=r"data-00000\.bin is missing.*tensor a"):
        load({"a": torch.zeros(4, 6)}, path, no_dist=True)


def test_mismatches_and_bad_metadata(one):
    root, path, _ = one
    expected = r"tensor a: checkpoint .* has \[4, 6\] float32, the target expects \[4, 7\] float32"
    with pytest.raises(TensorMismatchError, match=expected):
        load({"a": torch.zeros(4, 7)}, path, no_dist=True)
    with pytest.raises(TensorMismatchError, match=r"\[4, 6\] float32.*\[4, 6\] bfloat16"):
        load({"a": torch.zeros(4, 6, dtype=torch.bfloat16)}, path, no_dist=True)
    with pytest.raises(MissingTensorError, match="tensor nope is not in checkpoint"):
        load({"nope": torch.zeros(1)}, path, no_dist=True)
    assert load({"nope": torch.zeros(1)}, path, no_dist=True, strict=False).missing == ["nope"]
    with pytest.raises(CheckpointError, match="already holds a committed checkpoint"):
        save(_small_state(), path, no_dist=True)
    meta = json.loads((path / "metadata.json").read_text())
    meta["version"] = 99
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(FormatVersionError, match="version 99"):
        load({"a": torch.zeros(4, 6)}, path, no_dist=True)


def test_uncommitted_dir_and_prune(one):
    root, path, state = one
    second = save(state, root / step_dir_name(2), no_dist=True)
    os.remove(Path(second) / "metadata.json")
    with pytest.raises(UncommittedCheckpointError, match="metadata.json is missing"):
        load({"a": torch.zeros(4, 6)}, second, no_dist=True)
    with pytest.raises(UncommittedCheckpointError):
        commit_latest(root, step_dir_name(2))
    assert list_checkpoints(root) == [str(path)]
    assert resolve_checkpoint(root) == str(path) and read_latest(root) == step_dir_name(1)
    for step in (3, 4):
        save(state, root / step_dir_name(step), no_dist=True)
    assert prune(root, keep_last=1) == [str(root / step_dir_name(3))]  # latest (step 1) is kept
    assert list_checkpoints(root) == [str(path), str(root / step_dir_name(4))]
    assert (root / step_dir_name(2)).exists()  # uncommitted: maybe a save in flight, left alone


_CRASH_SCRIPT = """
import sys, time, torch
from system.checkpoint import save, step_dir_name, writer
root = sys.argv[1]
save({"w": torch.arange(4096.0)}, f"{root}/{step_dir_name(1)}", no_dist=True, update_latest=True)
def hook(rank):
    print("WRITING", flush=True)
    time.sleep(60)
writer._TEST_HOOKS["after_data"] = hook
save({"w": -torch.arange(4096.0)}, f"{root}/{step_dir_name(2)}", no_dist=True, update_latest=True)
"""


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        assert (tmp_path / step_dir_name(2) / "data-00000.bin").exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert read_latest(tmp_path) == step_dir_name(1)
    assert list_checkpoints(tmp_path) == [str(tmp_path / step_dir_name(1))]
    w = torch.zeros(4096)
    load({"w": w}, tmp_path, no_dist=True)
    assert torch.equal(w, torch.arange(4096.0))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_import_dcp(tmp_path, caplog):
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(2)
    state = {"model": {"w": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g).bfloat16()},
             "step": torch.tensor(11), "note": {"epoch": 3}}
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    out = import_dcp(tmp_path / "dcp", tmp_path / "ours")
    targets = {"model.w": torch.zeros(5, 3), "model.b": torch.zeros(7, dtype=torch.bfloat16), "step": torch.tensor(0)}
    res = load(targets, out, no_dist=True)
    assert torch.equal(targets["model.w"], state["model"]["w"]) and torch.equal(targets["model.b"], state["model"]["b"])
    assert targets["step"].item() == 11
    assert res.extra["imported_from"]["skipped"] == ["note.epoch"]
    assert "skipping 1 non-tensor" in caplog.text


def _grid(shape: tuple[int, ...], cuts: list[list[int]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Boxes of the grid that cuts each dim at the given points."""
    import itertools

    edges = [[0, *c, n] for c, n in zip(cuts, shape)]
    spans = [list(zip(e[:-1], e[1:])) for e in edges]
    return [(tuple(a for a, _ in combo), tuple(b - a for a, b in combo)) for combo in itertools.product(*spans)]


@pytest.mark.parametrize("verify_reads", [True, False])
@pytest.mark.parametrize("split_runs", [False, True])
def test_random_resharding_is_bit_exact(tmp_path, monkeypatch, verify_reads, split_runs):
    """Random saved grids x random target grids, tiny crc chunks, strided destinations.

    ``split_runs``: every non-contiguous overlap is read as its contiguous runs (no minimum gap).
    """
    if split_runs:
        import functools

        import system.checkpoint.reader as reader
        from system.checkpoint.planner import plan_reads

        monkeypatch.setattr(reader, "plan_reads", functools.partial(plan_reads, min_gap_bytes=0))
    gen = torch.Generator().manual_seed(3)
    for trial in range(6):
        shape = tuple(int(n) for n in torch.randint(1, 9, (trial % 3 + 1,), generator=gen))
        dtype = [torch.float32, torch.bfloat16, torch.int16, torch.float64][trial % 4]
        full = (torch.randn(shape, generator=gen) * 100).to(dtype)

        def cuts():
            return [sorted({int(c) for c in torch.randint(1, n, (2,), generator=gen)}) if n > 1 else [] for n in shape]

        saved = _grid(shape, cuts())
        state = {"t": ShardedEntry(shape, [Shard(full[tuple(slice(o, o + n) for o, n in zip(*b))], b[0]) for b in saved])}
        path = save(state, tmp_path / f"t{trial}", no_dist=True, crc_chunk_bytes=64 * (1 + trial % 2))
        shards = []
        for offs, lens in _grid(shape, cuts()):
            dest = torch.zeros(tuple(reversed(lens)), dtype=dtype).permute(*reversed(range(len(lens))))
            shards.append(Shard(dest, offs))
        load({"t": ShardedEntry(shape, shards)}, path, no_dist=True, verify=verify_reads)
        for s in shards:
            assert torch.equal(s.tensor, full[tuple(slice(o, o + n) for o, n in zip(s.offsets, s.tensor.shape))]), trial


@pytest.mark.parametrize("verify_reads", [True, False])
def test_resharded_load_reads_only_the_rows_needed(tmp_path, verify_reads):
    """Experts saved split on dim 0 and loaded split on dim 1: only each expert's rows are read."""
    e, a, b = 8, 128, 512  # 256 KiB per expert; a quarter of its rows is one 64 KiB run, 192 KiB apart
    full = torch.randn(e, a, b)
    state = {"w": ShardedEntry((e, a, b), [Shard(full[i * 2 : (i + 1) * 2], (i * 2, 0, 0)) for i in range(4)])}
    path = save(state, tmp_path / "c", no_dist=True, crc_chunk_bytes=64 << 10)
    rows = a // 4
    for r in range(4):
        dest = torch.zeros(e, rows, b)
        res = load({"w": ShardedEntry((e, a, b), [Shard(dest, (0, r * rows, 0))])}, path, no_dist=True,
                   verify=verify_reads)
        assert torch.equal(dest, full[:, r * rows : (r + 1) * rows])
        assert res.bytes_read == dest.numel() * dest.element_size()
    strided = torch.zeros(b, rows, e).permute(2, 1, 0)  # a non-contiguous destination goes through staging
    res = load({"w": ShardedEntry((e, a, b), [Shard(strided, (0, rows, 0))])}, path, no_dist=True, verify=verify_reads)
    assert torch.equal(strided, full[:, rows : 2 * rows])
    assert res.bytes_read == strided.numel() * strided.element_size()


def test_coalesce_never_merges_over_a_direct_read():
    """Two small staged reads on either side of a direct read stay apart (their gap is read anyway)."""
    from system.checkpoint.planner import ReadOp, coalesce

    def staged(start, end):
        return ReadOp("f", start, end, {"s"})

    direct = ReadOp("f", 128, 1152, {"d"}, direct=torch.empty(1024, dtype=torch.uint8))
    ops = coalesce([staged(0, 100), direct, staged(1152, 1200)])
    assert sorted((op.start, op.end) for op in ops) == [(0, 100), (128, 1152), (1152, 1200)]
    merged = coalesce([staged(0, 100), staged(1152, 1200), ReadOp("g", 128, 1152, {"d"}, direct=direct.direct)])
    assert sorted((op.file, op.start, op.end) for op in merged) == [("f", 0, 1200), ("g", 128, 1152)]
