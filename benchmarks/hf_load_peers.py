"""Worker side of ``benchmarks/hf_load.py``: one rank of one run (a fresh 2-process Gloo group).

Each peer builds its model, loads the Hugging Face checkpoint and keeps what this rank holds under
EP = 2 (every dense tensor, half of the experts); :func:`run_rank` times that step and measures it
(bytes read, ``/proc/self/io``, peak RSS), then fingerprints the local tensors and, when asked, compares
them with ``torch.equal`` against ours loaded in the same process. Every peer returns its tensors as
``{HF checkpoint name: tensor}`` in the checkpoint's layout (experts ``[f, d]`` / ``[d, f]``, views where
the peer's layout is transposed or fused), so they compare name by name.

Imported by the spawned ranks only; ``transformers`` and ``accelerate`` are imported inside the peers
that use them.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import _proc_status_kib, current_rss_bytes, peak_rss_bytes, reset_peak_rss

PEERS = ("ours", "transformers", "transformers_ep", "accelerate")
WORLD = 2  # EP degree = world size: each rank holds half of the experts
DTYPE = torch.bfloat16
SAMPLE_S = 0.010  # RssAnon sampling period
PREIMPORT = (
    "torch._dynamo",  # imported lazily by the first initialisation on ``meta`` (4-5 s here)
    # what ours imports inside load_model (system.hf.weights pulls in system.inference): imports are not the load
    "system.checkpoint.model_io", "system.hf.config", "system.hf.weights", "system.models.parallelize",
    "system.distributed", "system.config.parallel", "system.moe.experts",
)
"""Modules every rank imports before the clock (with ``transformers``/``accelerate`` for those peers)."""

# --------------------------------------------------------------------------------------------
# measuring inside a rank


def proc_io() -> dict[str, int]:
    """``/proc/self/io`` counters (all threads of this process)."""
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


def mapped_checkpoint(folder: str) -> tuple[int, list[tuple[int, int]]]:
    """Resident bytes of this process's mappings of files in ``folder`` (``/proc/self/smaps`` ``Rss``) and
    their address ranges: the checkpoint pages a peer that keeps ``mmap`` views has touched."""
    folder = os.path.realpath(folder) + os.sep
    rss, ranges, current = 0, [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's header line
                current = len(head) >= 6 and os.path.realpath(head[5]).startswith(folder)
                if current:
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    ranges.append((lo, hi))
            elif current and head[0] == "Rss:":
                rss += int(head[1]) * 1024
    return rss, ranges


def is_view_of(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether ``t``'s data lies in one of the address ``ranges``."""
    ptr = t.data_ptr()
    return any(lo <= ptr < hi for lo, hi in ranges)


class AnonPeak:
    """Samples ``RssAnon`` every :data:`SAMPLE_S` seconds on a thread; ``peak`` is the largest sample (bytes),
    ``bytes_read`` what its reads of ``/proc/self/status`` added to this process's ``rchar``."""

    def __init__(self):
        self.peak = 0
        self.bytes_read = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        with open("/proc/self/status", "rb") as f:
            text = f.read()
        self.bytes_read += len(text)
        for line in text.splitlines():
            if line.startswith(b"RssAnon:"):
                self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> "AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class SafetensorsCounter:
    """Counts the tensor bytes safetensors hands out in this process: ``safe_open`` is replaced, in the
    modules that call it, by a wrapper whose ``get_tensor`` and ``get_slice(...)[...]`` add the size of
    what they return (the library reads through ``mmap``, invisible to ``/proc/self/io``)."""

    def __init__(self):
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, t) -> Any:
        if isinstance(t, torch.Tensor):
            with self._lock:
                self.bytes += t.numel() * t.element_size()
        return t

    def install(self) -> None:
        import safetensors

        counter, real = self, safetensors.safe_open

        class _Slice:
            def __init__(self, s):
                self._s = s

            def __getitem__(self, idx):
                return counter.add(self._s[idx])

            def __getattr__(self, name):
                return getattr(self._s, name)

        class _File:
            def __init__(self, *a, **k):
                self._f = real(*a, **k)

            def __enter__(self):
                self._f.__enter__()
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

            def get_tensor(self, name):
                return counter.add(self._f.get_tensor(name))

            def get_tensors(self):  # safetensors.torch.load_file (accelerate's path)
                out = self._f.get_tensors()
                for t in out.values():
                    counter.add(t)
                return out

            def get_slice(self, name):
                return _Slice(self._f.get_slice(name))

            def __getattr__(self, name):
                return getattr(self._f, name)

        for mod in ("safetensors", "safetensors.torch", "transformers.modeling_utils", "accelerate.utils.modeling"):
            try:
                m = importlib.import_module(mod)
            except ImportError:
                continue
            if getattr(m, "safe_open", None) is real:
                m.safe_open = _File


# --------------------------------------------------------------------------------------------
# the peers: each loads, slices, and returns {HF name: local tensor in the checkpoint's layout}


def load_ours(path: str, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Ours: meta build, EP, ``to_empty``, ``load_model``."""
    from system.checkpoint.model_io import load_model
    from system.config.parallel import ParallelConfig
    from system.distributed import ParallelDims
    from system.hf.config import read_hf_config
    from system.models.model import MoETransformer, precompute_rope
    from system.models.parallelize import parallelize_model

    hf = read_hf_config(path)
    with torch.device("meta"):
        model = MoETransformer(hf.model, hf.moe)
    model.to(DTYPE)  # the checkpoint's dtype (on meta: nothing allocated)
    mesh = ParallelDims.from_config(1, WORLD, WORLD).build_mesh("cpu")
    parallelize_model(model, mesh, ParallelConfig(dp=1, ep=WORLD))
    model.to_empty(device="cpu")  # allocated, not touched: load_model writes every byte
    model.rope = precompute_rope(model.cfg)  # non-persistent buffer (float32), in no checkpoint
    t0 = time.perf_counter()
    nbytes = load_model(model, path)
    return {"model": model}, {"bytes_read_reported": nbytes, "load_model_s": time.perf_counter() - t0}


class PreadTimer:
    """Time spent in ``HFCheckpoint._pread`` (the ``os.preadv`` of each byte range) in this process: the rest
    of ``load_model`` is the bookkeeping and the copies from the read buffer (an expert's transpose)."""

    def __init__(self):
        self.seconds = 0.0

    def install(self) -> None:
        from system.hf.weights import HFCheckpoint

        timer, real = self, HFCheckpoint._pread

        def timed(reader, piece, start, dst):
            t0 = time.perf_counter()
            try:
                return real(reader, piece, start, dst)
            finally:
                timer.seconds += time.perf_counter() - t0

        HFCheckpoint._pread = timed


def ours_local(model, path: str) -> dict[str, torch.Tensor]:
    """Our model's tensors under their HF names, in the checkpoint's layout (expert ``[f, d]`` views)."""
    from system.checkpoint.model_io import open_weights
    from system.moe.experts import ExpertModule

    reader = open_weights(model, path)
    out = {}
    try:
        for name, t in model.state_dict().items():
            if name not in reader:
                continue
            src = reader.sources[name]
            owner = model.get_submodule(name.rpartition(".")[0])
            if isinstance(owner, ExpertModule):
                for r in range(t.shape[0]):
                    out[src.pieces[owner.expert_offset + r].hf_name] = t[r].transpose(0, 1)
            else:
                out[src.pieces[0].hf_name] = t
    finally:
        reader.close()
    return out


def _hf_name(name: str) -> str:
    return name.replace(".mlp.gate.", ".block_sparse_moe.gate.")  # v5 renames the block on load


def _fused_local(name: str, gate_up: torch.Tensor, down: torch.Tensor, lo: int) -> dict[str, torch.Tensor]:
    """Per-expert HF tensors of a v5 fused experts module's local rows ``[El, 2f, d]`` / ``[El, d, f]``."""
    pre = _hf_name(name).replace(".mlp.experts", ".block_sparse_moe.experts")
    f = gate_up.shape[1] // 2
    out = {}
    for r in range(gate_up.shape[0]):
        out[f"{pre}.{lo + r}.w1.weight"] = gate_up[r, :f]
        out[f"{pre}.{lo + r}.w3.weight"] = gate_up[r, f:]
        out[f"{pre}.{lo + r}.w2.weight"] = down[r]
    return out


def load_transformers(path: str, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers: the whole model on every rank, then this rank's experts sliced out."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE)
    for m in model.modules():
        if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj"):
            e = m.gate_up_proj.shape[0]
            lo, hi = rank * e // WORLD, (rank + 1) * e // WORLD
            # new parameters of this rank's rows; the full tensors are freed here (their last reference goes)
            m.gate_up_proj = nn.Parameter(m.gate_up_proj.detach()[lo:hi].clone(), requires_grad=False)
            m.down_proj = nn.Parameter(m.down_proj.detach()[lo:hi].clone(), requires_grad=False)
            m.expert_offset = lo
    return {"model": model}, {}


def transformers_local(model, rank: int) -> dict[str, torch.Tensor]:
    """A transformers Mixtral's tensors under the checkpoint's names (experts: the rank's rows, per expert)."""
    out = {}
    for mname, m in model.named_modules():
        if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj"):
            gu, dn = m.gate_up_proj, m.down_proj
            if hasattr(gu, "to_local"):  # transformers' EP: Shard(0) DTensors, rank r holds rows [r E/2, (r+1) E/2)
                lo = rank * gu.shape[0] // WORLD
                gu, dn = gu.to_local(), dn.to_local()
            else:
                lo = m.expert_offset  # set by load_transformers' slice
            out.update(_fused_local(mname, gu.detach(), dn.detach(), lo))
    for name, p in model.named_parameters():
        if not (name.endswith("gate_up_proj") or name.endswith("down_proj")):
            out[_hf_name(name)] = p.detach().to_local() if hasattr(p, "to_local") else p.detach()
    return out


def _replicate_plan(config) -> dict[str, str]:
    """transformers' TP rules of the model, every one set to "replicate" (the experts' rules are EP's)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return {k: "replicate" for k in skeleton.tp_plan if ".experts" not in k}


def load_transformers_ep(path: str, rank: int, plan: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers' own expert parallelism: experts ``DTensor(Shard(0))`` over 2 ranks, dense replicated."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    dc = DistributedConfig(tp_size=WORLD, ep_size=WORLD, tp_plan=plan)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE, distributed_config=dc)
    return {"model": model}, {}


def accelerate_skeleton(shape: dict[str, int]):
    """A module tree with the checkpoint's names and shapes (transformers 4.x's Mixtral layout), bf16."""
    from torch import nn

    class Weight(nn.Module):  # a norm: one ``weight`` vector
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(n, dtype=DTYPE))

    def lin(i, o):
        return nn.Linear(i, o, bias=False, dtype=DTYPE)

    d, f, v, e = shape["dim"], shape["ffn"], shape["vocab"], shape["experts"]
    kvd = shape["kv_heads"] * (d // shape["heads"])
    layers = nn.ModuleList()
    for _ in range(shape["layers"]):
        layer = nn.Module()
        layer.input_layernorm, layer.post_attention_layernorm = Weight(d), Weight(d)
        layer.self_attn = nn.Module()
        layer.self_attn.q_proj, layer.self_attn.k_proj = lin(d, d), lin(d, kvd)
        layer.self_attn.v_proj, layer.self_attn.o_proj = lin(d, kvd), lin(d, d)
        layer.block_sparse_moe = nn.Module()
        layer.block_sparse_moe.gate = lin(d, e)
        experts = nn.ModuleList()
        for _ in range(e):
            ex = nn.Module()
            ex.w1, ex.w2, ex.w3 = lin(d, f), lin(f, d), lin(d, f)
            experts.append(ex)
        layer.block_sparse_moe.experts = experts
        layers.append(layer)
    root = nn.Module()
    root.model = nn.Module()
    root.model.embed_tokens = nn.Embedding(v, d, dtype=DTYPE)
    root.model.layers, root.model.norm = layers, Weight(d)
    root.lm_head = lin(d, v)
    return root


def load_accelerate(path: str, rank: int, shape: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """accelerate: ``init_empty_weights`` + ``load_checkpoint_and_dispatch``, then the slice."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from torch import nn

    with init_empty_weights():
        model = accelerate_skeleton(shape)
    model = load_checkpoint_and_dispatch(model, path, device_map={"": "cpu"}, dtype=DTYPE)
    e = shape["experts"]
    lo, hi = rank * e // WORLD, (rank + 1) * e // WORLD
    for layer in model.model.layers:
        for x in range(e):
            if not lo <= x < hi:
                layer.block_sparse_moe.experts[x] = nn.Module()  # drops that expert's weights (freed here)
    return {"model": model}, {}


def accelerate_local(model) -> dict[str, torch.Tensor]:
    """The skeleton's parameters: already under the checkpoint's names and layout."""
    return {n: p.detach() for n, p in model.named_parameters()}


def v5_unmatched(path: str, names: set[str]) -> dict[str, int]:
    """How many parameters of transformers v5's model (built from ``config.json`` on meta) have no tensor of
    that name in the checkpoint: what accelerate's name matching would leave on ``meta``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    params = [n for n, _ in skeleton.named_parameters()]
    return {"v5_params": len(params), "v5_params_without_checkpoint_tensor": sum(n not in names for n in params)}


# --------------------------------------------------------------------------------------------
# one rank of one run


def _byte_span(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``'s storage from its first to its last element, as a flat ``uint8`` tensor."""
    start = t.storage_offset() * t.element_size()
    extent = (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())[start : start + extent]


def touch_pages(local: dict[str, torch.Tensor]) -> int:
    """Read one byte of every 4 KiB page of every local tensor (faults in pages a peer left mapped but
    unread, e.g. tensors that are views of a checkpoint ``mmap``); returns the pages read."""
    pages = 0
    for t in local.values():
        if t.numel():
            span = _byte_span(t)[::4096]
            span.sum()
            pages += span.numel()
    return pages


def crc_fingerprint(local: dict[str, torch.Tensor]) -> dict[str, int]:
    return {n: zlib.crc32(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())) for n, t in local.items()}


def run_rank(rank: int, peer: str, path: str, verify: bool, shape: dict[str, int], threads: int,
             out_file: str) -> None:
    """Measure one load on this rank; write the sample (or the error) to ``out_file``."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        extra_info: dict[str, Any] = {}
        counter = SafetensorsCounter()
        if peer != "ours":  # imports (and the modeling module transformers would import lazily) before the clock
            import transformers
            from transformers import MixtralForCausalLM  # noqa: F401
            from transformers.distributed import DistributedConfig  # noqa: F401
            if peer == "accelerate":
                import accelerate  # noqa: F401
            counter.install()
        for mod in PREIMPORT:
            importlib.import_module(mod)
        pread = PreadTimer()
        if peer == "ours":
            pread.install()

        if peer == "transformers_ep":
            plan = _replicate_plan(transformers.AutoConfig.from_pretrained(path))
            extra_info["tp_plan"] = plan
            loader = lambda: load_transformers_ep(path, rank, plan)  # noqa: E731
        elif peer == "transformers":
            loader = lambda: load_transformers(path, rank)  # noqa: E731
        elif peer == "accelerate":
            names = set(json.loads((Path(path) / "model.safetensors.index.json").read_text())["weight_map"])
            extra_info.update(v5_unmatched(path, names))
            loader = lambda: load_accelerate(path, rank, shape)  # noqa: E731
        else:
            loader = lambda: load_ours(path, rank)  # noqa: E731
        gc.collect()
        dist.barrier()
        baseline, anon_baseline = current_rss_bytes(), (_proc_status_kib("RssAnon") or 0) * 1024
        peak_reset = reset_peak_rss()
        io0, counted0 = proc_io(), counter.bytes
        with AnonPeak() as anon:
            t0 = time.perf_counter()
            held, info = loader()
            wall = time.perf_counter() - t0
            io1, sampler_bytes = proc_io(), anon.bytes_read
            model = held["model"]
            if peer == "ours":  # views under the checkpoint's names; not timed (ours re-reads the headers here)
                local = ours_local(model, path)
            elif peer.startswith("transformers"):
                local = transformers_local(model, rank)
            else:
                local = accelerate_local(model)
            t1 = time.perf_counter()
            pages = touch_pages(local)
            touch = time.perf_counter() - t1
        peak = peak_rss_bytes()
        rss_after = current_rss_bytes()
        mapped_rss, ranges = mapped_checkpoint(path)
        views = sum(is_view_of(t, ranges) for t in local.values())
        dist.barrier()
        handed_out = info["bytes_read_reported"] if peer == "ours" else counter.bytes - counted0
        # A peer whose tensors are views of its checkpoint mapping read only the pages it touched: the mapping's RSS.
        bytes_read = mapped_rss if views == len(local) else handed_out
        if peer == "ours":
            info["preadv_s"] = pread.seconds
        sizes = [t.numel() * t.element_size() for t in local.values()]
        sample = {
            "bytes_handed_out": handed_out, "mapped_checkpoint_rss_bytes": mapped_rss, "tensors_viewing_mapping": views,
            "zero_copy": views == len(local),
            "rank": rank, "wall_s": wall, "touch_s": touch, "wall_resident_s": wall + touch, "pages_touched": pages,
            "bytes_read": bytes_read,
            "rchar": io1["rchar"] - io0["rchar"] - sampler_bytes, "rchar_sampler": sampler_bytes,
            "read_bytes_device": io1["read_bytes"] - io0["read_bytes"], "syscr": io1["syscr"] - io0["syscr"],
            "held_bytes": sum(sizes), "held_tensors": len(local), "largest_tensor_bytes": max(sizes),
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "peak_reset": peak_reset,
            "peak_rss_over_baseline_bytes": peak - baseline, "peak_anon_bytes": anon.peak,
            "baseline_anon_bytes": anon_baseline,
            "rss_after_bytes": rss_after, "dtypes": sorted({str(t.dtype) for t in local.values()}),
            **info, **extra_info,
        }
        sample["crc32"] = crc_fingerprint(local)
        if verify and peer != "ours":
            sample["torch_equal_vs_ours"] = compare_with_ours(local, path, rank)
        del held, model, local
    except BaseException:  # noqa: BLE001 - reported to the parent
        Path(out_file).write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))
        dist.destroy_process_group()
        raise
    from system.distributed.init import shutdown_distributed

    shutdown_distributed()  # success path only (see its docstring)
    Path(out_file).write_text(json.dumps({"ok": True, "sample": sample}))


def compare_with_ours(local: dict[str, torch.Tensor], path: str, rank: int) -> dict[str, Any]:
    """``torch.equal`` of every tensor against ours loaded here (same names, same layout); raises on a difference."""
    held, _ = load_ours(path, rank)
    ref = ours_local(held["model"], path)
    if set(ref) != set(local):
        raise AssertionError(f"rank {rank}: tensor names differ from ours: only ours "
                             f"{sorted(set(ref) - set(local))[:5]}, only the peer {sorted(set(local) - set(ref))[:5]}")
    bad = [n for n in ref if ref[n].dtype != local[n].dtype or not torch.equal(ref[n], local[n])]
    if bad:
        raise AssertionError(f"rank {rank}: {len(bad)} tensors differ from ours, e.g. {bad[:5]}")
    return {"tensors": len(ref), "equal": True}


def spawned_rank(rank: int, port: int, peer: str, path: str, verify: bool, shape: dict[str, int], threads: int,
             out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' loading progress bar
    logging.getLogger("transformers").setLevel(logging.ERROR)
    run_rank(rank, peer, path, verify, shape, threads, os.path.join(out_dir, f"rank{rank}.json"))
