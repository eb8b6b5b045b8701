"""Ring-offload inference (SE-MoE, arXiv 2205.10034, sec. 3.3.2): equality with the resident model,
ring order invariants from the event log, generation stamps, the checked plan, the memory budget, the CLI.

Every ring / experts run is compared with ``torch.equal`` to the resident engine, which runs the same
decode code with every weight in memory; the resident engine itself is checked against the model's
full (uncached) forward pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh

from system.checkpoint.model_io import CONFIG_FILE, MODEL_FILE, save_model
from system.cli import main as cli_main
from system.config import JobConfig, config_to_dict
from system.inference import OffloadEngine, PlanError, Sampler, SamplingConfig, StaleSlotError, ThreadTransport
from system.inference.decoder import default_ffn, forward_step
from system.inference.kv_cache import KVCache, left_pad
from system.inference.mmap_file import MmapCheckpoint
from system.inference.plan import make_plan
from system.inference.sections import build_skeleton, split_model
from system.models import MoETransformer

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[5, 9, 2, 7, 1], [3, 4], [8, 6, 6, 1, 2, 3, 4, 5]]

# name: (model overrides, moe overrides); "mixed5" has dense and MoE blocks: sections of unequal size.
MODELS = {
    "moe3": ({"n_layers": 3, "n_kv_heads": 2}, {"num_experts": 4, "num_shared_experts": 1}),
    "mixed5": ({"n_layers": 5, "ffn_dim": 40}, {"num_experts": 6, "first_dense_layers": 1, "interleave": 2}),
}


def make_job(model: dict | None = None, moe: dict | None = None) -> JobConfig:
    """A tiny job: d=32, 4 heads, byte tokenizer (vocab 320), untied head, a large init so tokens vary."""
    job = JobConfig()
    base = {"dim": 32, "n_layers": 3, "n_heads": 4, "ffn_dim": 48, "vocab_size": 320, "max_seq_len": 64,
            "tie_embeddings": False, "init_std": 0.3}
    for k, v in {**base, **(model or {})}.items():
        setattr(job.model, k, v)
    for k, v in {"num_experts": 4, "top_k": 2, "expert_dim": 24, **(moe or {})}.items():
        setattr(job.moe, k, v)
    job.training.seq_len = job.model.max_seq_len
    job.validate()
    return job


def save_checkpoint(job: JobConfig, path: Path, seed: int = 0) -> MoETransformer:
    """Build, initialise and ``save_model`` a model (one-process Gloo group for the mesh)."""
    model = MoETransformer(job.model, job.moe)
    model.init_weights(seed)
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "ep"))
        save_model(model, mesh, path, config_to_dict(job))
    finally:
        if own:
            dist.destroy_process_group()
    return model.eval()


def write_random_checkpoint(job: JobConfig, path: Path, std: float = 0.02) -> None:
    """A large checkpoint, fast: the ``save_model`` names and layout, N(0, std) weights, unit norms."""
    skeleton = build_skeleton(job.model, job.moe)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.ones(t.shape) if "norm" in name else torch.randn(t.shape, generator=gen) * std
               for name, t in skeleton.state_dict().items()}
    path.mkdir(parents=True)
    save_file(tensors, str(path / MODEL_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(config_to_dict(job)))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offload")
    out = {}
    for name, (model, moe) in MODELS.items():
        out[name] = root / name
        save_checkpoint(make_job(model, moe), out[name])
    return out


class Recorder:
    """A sampler that keeps every logits tensor it sees."""

    def __init__(self, cfg: SamplingConfig | None = None):
        self.inner = Sampler(cfg or SamplingConfig(), vocab_limit=257)
        self.logits: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self.logits.append(logits.clone())
        return self.inner(logits)


def run(ckpt: Path, new: int = 5, batch_size: int = 2, sampling: SamplingConfig | None = None,
        prompts=PROMPTS, **kw):
    """Generate with an engine; returns ``(tokens, logits list, stats, engine)`` (engine closed)."""
    rec = Recorder(sampling)
    with OffloadEngine(ckpt, max_batch_size=batch_size, max_seq_len=max(map(len, prompts)) + new, **kw) as eng:
        out, stats = eng.generate_ids(prompts, new, rec, batch_size=batch_size)
    return out, rec.logits, stats, eng


def assert_same(a, b) -> None:
    assert a[0] == b[0]
    assert len(a[1]) == len(b[1])
    for x, y in zip(a[1], b[1]):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# KV cache and the resident path


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_decoding_matches_full_forward(name: str) -> None:
    """Prefill + one column per step equals the uncached full forward, per row, padded batch included."""
    job = make_job(*MODELS[name])
    model = MoETransformer(job.model, job.moe)
    model.init_weights(1)
    model.eval()
    tokens, pad = left_pad(PROMPTS, 0)
    cfg = job.model
    cache = KVCache(cfg.n_layers, len(PROMPTS), cfg.n_kv_heads or cfg.n_heads, cfg.dim // cfg.n_heads,
                    tokens.shape[1] + 4, pad, torch.float32, "cpu")
    seqs = [list(p) for p in PROMPTS]
    logits = forward_step(model, tokens, cache)
    for _ in range(4):
        with torch.no_grad():
            for row, seq in enumerate(seqs):
                full = model(torch.tensor([seq]))[0, -1]
                torch.testing.assert_close(logits[row], full, rtol=1e-4, atol=1e-4)
        nxt = logits.argmax(-1)
        for row, seq in enumerate(seqs):
            seq.append(int(nxt[row]))
        logits = forward_step(model, nxt[:, None], cache)


@pytest.mark.parametrize("name", list(MODELS))
def test_resident_engine_is_the_saved_model(tmp_path: Path, name: str) -> None:
    """The resident engine (loaded from the saved file) equals the in-memory model's cached path bitwise."""
    model = save_checkpoint(make_job(*MODELS[name]), tmp_path / "m", seed=3)
    prompts = PROMPTS[:2]
    tokens, pad = left_pad(prompts, 0)
    cfg = model.cfg
    cache = KVCache(cfg.n_layers, 2, cfg.n_kv_heads or cfg.n_heads, cfg.dim // cfg.n_heads, tokens.shape[1] + 3,
                    pad, torch.float32, "cpu")
    rec = Recorder()
    ref_tokens = [rec(forward_step(model, tokens, cache))]
    for _ in range(2):
        ref_tokens.append(rec(forward_step(model, ref_tokens[-1][:, None], cache)))
    out, logits, _, _ = run(tmp_path / "m", new=3, prompts=prompts, offload="none")
    assert out == torch.stack(ref_tokens, 1).tolist()
    for a, b in zip(logits, rec.logits):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# ring == resident


@pytest.mark.parametrize("name", list(MODELS))
def test_ring_equals_resident_for_every_k(ckpts, name: str) -> None:
    """K in {1, 2, 3, N, N+1}; batches of 2 prompts of different lengths; 6 tokens wrap the ring many times."""
    n = make_job(*MODELS[name]).model.n_layers
    ref = run(ckpts[name], new=6, offload="none")
    assert len({tuple(t) for t in ref[0]}) > 1, "degenerate model: every row generates the same tokens"
    for k in sorted({1, 2, 3, n, n + 1}):
        got = run(ckpts[name], new=6, offload="ring", slots=k, event_log=True)
        assert_same(got, ref)
        eng, stats = got[3], got[2]
        sizes = [s.nbytes for s in eng.layout.sections]
        assert eng.plan.slots == min(k, n) and eng.scheduler.counter == stats.forward_passes * n
        if k < n:  # every visit streams its section: priming, then one load K visits ahead per visit
            assert eng.scheduler.bytes_issued == sum(sizes[c % n] for c in range(eng.scheduler.counter + k))
            assert stats.bytes_streamed > 0
        else:  # every section stays in its slot after the first pass
            assert eng.scheduler.bytes_issued == sum(sizes) and stats.bytes_streamed == 0
        check_ring_invariants(eng.log.events, min(k, n))


def test_ring_equals_resident_top_p(ckpts) -> None:
    cfg = SamplingConfig("top-p", top_p=0.8, temperature=1.3, seed=7)
    ref = run(ckpts["mixed5"], new=5, batch_size=3, sampling=cfg, offload="none")
    assert_same(run(ckpts["mixed5"], new=5, batch_size=3, sampling=cfg, offload="ring", slots=2), ref)


@pytest.mark.parametrize("capacity", [1, 3, 1000])
def test_expert_granular_equals_resident(ckpts, capacity: int) -> None:
    """Streaming only the routed experts (LRU of C expert slots) gives the resident outputs bitwise."""
    ref = run(ckpts["mixed5"], new=5, offload="none")
    got = run(ckpts["mixed5"], new=5, offload="experts", expert_cache=capacity)
    assert_same(got, ref)
    cache, stats = got[3].expert_cache, got[2]
    assert stats.bytes_streamed == cache.misses * sum(n for *_, n in cache.layout)
    assert stats.bytes_per_token > 0
    if capacity == 1000:  # nothing is evicted: each (layer, expert) streams once at most
        assert cache.misses <= 2 * 6 and cache.hits > 0


# ---------------------------------------------------------------------------------------------
# event-log invariants, prefetch overlap, generation stamps


def check_ring_invariants(events, k: int) -> None:
    """Order invariants of a ring run, from the log's sequence numbers (no clocks)."""
    loads: dict[int, dict] = {}
    computes = []
    for e in events:
        if e.kind == "load_start":
            loads[e.ticket] = {"start": e.seq, "end": None, "slot": e.slot, "section": e.section}
        elif e.kind == "load_end":
            loads[e.ticket]["end"] = e.seq
        elif e.kind == "compute_start":
            computes.append({"start": e.seq, "slot": e.slot, "section": e.section, "ticket": e.ticket})
        else:
            assert computes[-1]["slot"] == e.slot and computes[-1]["ticket"] == e.ticket
            computes[-1]["end"] = e.seq
    assert computes and all("end" in c for c in computes)
    for c in computes:  # a section's load ends before its compute starts (and it is the right section)
        load = loads[c["ticket"]]
        assert (load["slot"], load["section"]) == (c["slot"], c["section"])
        assert load["end"] is not None and load["end"] < c["start"]
    for t, load in loads.items():  # a slot is not refilled before the compute that used it ended
        for c in computes:
            if c["slot"] == load["slot"] and c["ticket"] < t:
                assert c["end"] < load["start"], (t, c)
    assert {c["slot"] for c in computes} <= set(range(k))
    last_use: dict[int, int] = {}
    for c in computes:
        last_use[c["ticket"]] = max(last_use.get(c["ticket"], -1), c["end"])
    spans = [(load["start"], last_use.get(t, len(events))) for t, load in loads.items()]  # a tail prefetch lives on
    for seq in sorted({s for s, _ in spans}):  # never more than K sections live
        assert sum(1 for s, e in spans if s <= seq <= e) <= k


def test_k1_has_no_prefetch(ckpts) -> None:
    """With K = 1 the next load starts only after the current compute ended."""
    eng = run(ckpts["moe3"], new=3, offload="ring", slots=1, event_log=True)[3]
    events = eng.log.events
    starts = {e.ticket: e.seq for e in events if e.kind == "load_start"}
    for e in events:
        if e.kind == "compute_end" and e.ticket + 1 in starts:
            assert starts[e.ticket + 1] > e.seq


class GatedTransport(ThreadTransport):
    """A thread transport that announces each copy's start and can hold a copy until a gate opens."""

    def __init__(self, *args, hold: set[int] = frozenset(), **kw):
        super().__init__(*args, **kw)
        self.started: dict[int, threading.Event] = defaultdict(threading.Event)
        self.gates = {t: threading.Event() for t in hold}

    def _copy(self, section, slot) -> None:
        ticket = -self.ring.stamps[slot]
        self.started[ticket].set()
        if ticket in self.gates:
            self.gates[ticket].wait(timeout=60)
        super()._copy(section, slot)

    def open_all(self) -> None:
        for g in self.gates.values():
            g.set()


@pytest.mark.parametrize("k", [2, 3])
def test_next_load_starts_before_current_compute_ends(ckpts, k: int) -> None:
    """With K >= 2, inside each compute we wait for the copier to start the next visit's load:
    it must (no deadlock), and the log shows the load started before the compute ended."""
    transport = GatedTransport()
    ref = run(ckpts["mixed5"], new=3, offload="none")
    with OffloadEngine(ckpts["mixed5"], offload="ring", slots=k, max_batch_size=2, max_seq_len=16,
                       event_log=True, transport=transport) as eng:
        sched = eng.scheduler
        seen = []

        def gated(i, block, x):
            ticket_next = sched.counter + 2  # the load serving visit counter + 1
            seen.append(transport.started[ticket_next].wait(timeout=60))
            return default_ffn(i, block, x)

        eng.run_ffn = sched.ffn_runner(gated)
        rec = Recorder()
        out, _ = eng.generate_ids(PROMPTS, 3, rec, batch_size=2)
    assert out == ref[0] and all(seen) and len(seen) == sched.counter
    events = eng.log.events
    starts = {e.ticket: e.seq for e in events if e.kind == "load_start"}
    ends = [e for e in events if e.kind == "compute_end"]
    for e in ends:  # the load serving the next visit (ticket + 1) started before this compute ended
        assert starts[e.ticket + 1] < e.seq
    check_ring_invariants(events, k)


def test_missing_ready_wait_trips_the_stamp(ckpts) -> None:
    """Skip ``wait_ready`` and hold the first copy: the compute finds the slot's stamp stale."""

    class NoReadyWait(GatedTransport):
        def wait_ready(self, slot: int) -> None:  # the bug: compute does not wait for the copy
            pass

    transport = NoReadyWait(hold={1})
    eng = OffloadEngine(ckpts["moe3"], offload="ring", slots=2, max_batch_size=2, max_seq_len=16, transport=transport)
    try:
        with pytest.raises(StaleSlotError, match="expected load 1"):
            eng.generate_ids(PROMPTS[:2], 2, Recorder())
    finally:
        transport.open_all()
        eng.close()
    # the same gate with the wait in place: compute blocks until the copy is released, outputs are right
    ok = GatedTransport(hold={1})
    threading.Timer(0.2, ok.open_all).start()
    assert_same(run(ckpts["moe3"], new=2, offload="ring", slots=2, transport=ok),
                run(ckpts["moe3"], new=2, offload="none"))


def test_missing_free_wait_trips_the_stamp(ckpts) -> None:
    """Skip the copier's wait for ``release``: the next load overwrites the slot during the compute."""

    class NoFreeWait(GatedTransport):
        def _wait_free(self, slot: int) -> None:  # the bug: the copier does not wait for release(slot)
            pass

    transport = NoFreeWait()
    with OffloadEngine(ckpts["moe3"], offload="ring", slots=2, max_batch_size=2, max_seq_len=16,
                       transport=transport) as eng:
        sched = eng.scheduler

        def slow(i, block, x):  # let the copier begin the slot's next load while we compute
            transport.started[sched.counter + 1 + 2].wait(timeout=60)
            return default_ffn(i, block, x)

        eng.run_ffn = sched.ffn_runner(slow)
        with pytest.raises(StaleSlotError, match="after computing section 0"):
            eng.generate_ids(PROMPTS[:2], 2, Recorder())


# ---------------------------------------------------------------------------------------------
# the plan


def test_plan_errors_name_the_numbers(ckpts, tmp_path: Path) -> None:
    ck = ckpts["mixed5"]
    with pytest.raises(PlanError, match=r"slots \(K\) = 0"):
        OffloadEngine(ck, offload="ring", slots=0)
    with pytest.raises(PlanError, match=r"budget 1048576 B .* below the plan: .*resident \d+ B .* 2 slots x \d+ B"):
        OffloadEngine(ck, offload="ring", slots=2, device_memory="1MiB")
    with pytest.raises(PlanError, match=r"expert_cache \(C\) = 0"):
        OffloadEngine(ck, offload="experts", expert_cache=0)
    job = make_job(*MODELS["mixed5"])
    skel = build_skeleton(job.model, job.moe)
    layout = split_model(skel, MmapCheckpoint(ck))
    moe_bytes = max(s.nbytes for s in layout.sections)
    with pytest.raises(PlanError, match=rf"section 1 \(moe FFN of layer 1, {moe_bytes} B; largest tensor "
                                        r"'layers.1.moe.experts.w\d' \[6, \d+, \d+\] \d+ B\) is larger than a slot of 20000 B"):
        make_plan(layout, job.model, job.moe, mode="ring", slots=2, batch=1, seq=8, elem=4, slot_bytes=20000)
    # a tensor missing from the checkpoint
    bad = tmp_path / "missing"
    bad.mkdir()
    tensors = load_file(str(ck / MODEL_FILE))
    del tensors["layers.3.moe.experts.w2"]
    save_file(tensors, str(bad / MODEL_FILE))
    (bad / CONFIG_FILE).write_text((ck / CONFIG_FILE).read_text())
    with pytest.raises(PlanError, match=r"'layers.3.moe.experts.w2' \(shape \[6, 24, 32\]\) is missing"):
        OffloadEngine(bad, offload="ring")
    # a tensor shaped differently from the config
    cfg = json.loads((ck / CONFIG_FILE).read_text())
    cfg["moe"]["expert_dim"] = 20
    (bad / CONFIG_FILE).write_text(json.dumps(cfg))
    save_file(load_file(str(ck / MODEL_FILE)), str(bad / MODEL_FILE))
    with pytest.raises(PlanError, match=r"'layers.1.moe.experts.w1' .* shape \[6, 32, 24\] \(18432 B\), the model "
                                        r"config expects \[6, 32, 20\] \(15360 B\)"):
        OffloadEngine(bad, offload="none")


# ---------------------------------------------------------------------------------------------
# memory budget (RLIMIT_DATA) and the CLI

_BUDGET_CHILD = r"""
import gc, json, resource, sys, torch
from system.inference import OffloadEngine, Sampler, SamplingConfig
import torch._dynamo  # noqa: F401  (imported lazily by meta-device init; large)
torch.ones(64, 64) @ torch.ones(64, 64)  # start the intra-op thread pool before measuring
ckpt, extra = sys.argv[1], int(sys.argv[2])
vm_data = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData:"))
resource.setrlimit(resource.RLIMIT_DATA, (vm_data + extra, resource.RLIM_INFINITY))
result = {}
for mode in ("ring", "none"):
    logits = []
    def sampler(x, inner=Sampler(SamplingConfig(), vocab_limit=257)):
        logits.append(x.tolist())
        return inner(x)
    try:
        kw = {"slots": 2, "device_memory": "32MiB"} if mode == "ring" else {}
        with OffloadEngine(ckpt, offload=mode, max_batch_size=2, max_seq_len=16, **kw) as eng:
            out, stats = eng.generate_ids([[1, 2, 3], [4, 5]], 3, sampler)
        result[mode] = {"ok": True, "tokens": out, "logits": logits, "streamed": stats.bytes_streamed}
    except (MemoryError, RuntimeError) as e:
        result[mode] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    eng = None
    gc.collect()
print(json.dumps(result))
"""


def test_ring_runs_under_a_data_limit_the_resident_model_exceeds(tmp_path: Path) -> None:
    """A ~100 MB model, in a process whose RLIMIT_DATA allows 48 MiB more than it uses at start: the
    ring (K=2, 32 MiB plan budget) generates the resident outputs; loading it resident then fails."""
    job = make_job({"n_layers": 16, "dim": 64, "n_heads": 4}, {"num_experts": 8, "expert_dim": 1024})
    write_random_checkpoint(job, tmp_path / "big")
    size = (tmp_path / "big" / MODEL_FILE).stat().st_size
    assert size > 3 * 32 * 2**20
    proc = subprocess.run([sys.executable, "-c", _BUDGET_CHILD, str(tmp_path / "big"), str(48 * 2**20)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ring, resident = result["ring"], result["none"]
    assert ring["ok"], ring
    assert ring["streamed"] > size  # the model went through the ring more than once
    assert not resident["ok"] and ("alloc" in resident["error"] or "Memory" in resident["error"]), resident
    # and the ring's outputs are the resident model's (run here, without a limit)
    rec = Recorder()
    with OffloadEngine(tmp_path / "big", offload="none", max_batch_size=2, max_seq_len=16) as eng:
        out, _ = eng.generate_ids([[1, 2, 3], [4, 5]], 3, rec)
    assert ring["tokens"] == out
    assert all(torch.equal(torch.tensor(a, dtype=torch.float32), b) for a, b in zip(ring["logits"], rec.logits))


def test_cli_generate(ckpts, tmp_path: Path, capsys) -> None:
    ck = ckpts["moe3"]
    rc = cli_main(["generate", "--checkpoint", str(ck), "--prompt", "def f(", "--max-new-tokens", "4",
                   "--offload", "ring", "--slots", "2", "--link-bandwidth", "1GB"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.count("\n") >= 1 and "tokens/s" not in out and "tokens/s" in err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\nclass A:\n\nx = 1\n")
    rc = cli_main(["generate", "--checkpoint", str(ck), "--prompts-file", str(prompts), "--batch-size", "2",
                   "--max-new-tokens", "3", "--sampling", "top-p", "--top-p", "0.9", "--offload", "none"])
    out, err = capsys.readouterr()
    assert rc == 0 and err.count("--- prompt") == 3 and "tokens/s" in err and "plan:" not in out
    rc = cli_main(["generate", "--checkpoint", str(ck), "--prompt", "x", "--slots", "0", "--offload", "ring"])
    assert rc == 2 and "slots (K) = 0" in capsys.readouterr().err

