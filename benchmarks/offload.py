"""Offloaded inference: our ring (SE-MoE, arXiv 2205.10034, sec. 3.3.2) against Accelerate's offloading.

One MoE decoder (fp32, created locally from a seed, saved as ``model.safetensors`` + ``config.json`` like
:func:`system.checkpoint.model_io.save_model`) generates ``--new-tokens`` tokens for ``B`` prompts of
``--prompt-len`` random byte tokens, greedily, with a KV cache, through the same decode code
(:func:`system.inference.loop.generate_batch`) in every peer:

- ``resident``: every weight in memory (``OffloadEngine(offload="none")``): the compute bound.
- ``ring1``, ``ring2``, ``ring3``: ``OffloadEngine(offload="ring", slots=K)``: attention, norms, routers,
  embeddings and head resident; each block's FFN (its experts: a "section") streamed from the mmap'd
  checkpoint into K preallocated slots by a copier thread, through a :class:`system.inference.Link`
  throttled to the link bandwidth. K = 1 is the no-prefetch baseline.
- ``acc_cpu``, ``acc_disk``: Accelerate as documented for a model larger than the device,
  ``accelerate.cpu_offload(model, execution_device, state_dict=...)`` and
  ``accelerate.disk_offload(model, offload_dir, execution_device)``: every module's weights are moved
  to the execution device by its pre-forward hook and dropped after (attention and head included).
- ``acc_cpu_matched``, ``acc_disk_matched``: ``accelerate.dispatch_model`` with a ``device_map`` that puts
  exactly the ring's resident modules on the execution device and the ring's sections (the expert
  modules, by :func:`system.inference.sections.section_index`) on ``"cpu"`` / ``"disk"``: the same bytes
  streamed per forward pass as the ring.
- ``<acc peer>_fresh``: the same, but every weight a hook loads goes into a fresh tensor (see below).

Same link for every peer: on a CPU-only machine Accelerate's "move to the execution device" is a
no-op, so the benchmark wraps ``accelerate.hooks.set_module_tensor_to_device``: every value a hook
loads is copied through the same :class:`~system.inference.Link` as the ring. The copy goes into a
buffer taken from a pool keyed by size, to which the buffer returns when the hook drops the weight
(moves it to ``meta``), i.e. the memory reuse a GPU caching allocator gives; the ``_fresh`` peers
allocate a fresh tensor per weight per forward instead (on CPU that costs page faults for every
tensor above glibc's mmap threshold; on a GPU Accelerate itself calls ``torch.cuda.empty_cache()``
after every weight it moves, so the pool is the generous case). ``TopKRouter`` reads its gate weight without calling the
``Linear`` module, so it is in Accelerate's ``preload_module_classes``.

Method: for each cell (batch size, link) one worker process per peer is started (forked from a
server that has imported torch), loads its model and runs one warm-up generation of
``--warmup-tokens`` (the same for every peer); then, for each repeat, the peers run one timed
generation of ``--new-tokens`` each, one at a time, in the order :func:`benchmarks.common.rotated`
gives. Every worker uses ``--threads`` intra-op threads (1 by default). A peer's figure for a repeat
is its median decode-step time (a clock read after each sampler call); tokens/s = B / that.
Every repeat the tokens of every peer must equal the resident peer's (else the run aborts with
:class:`~benchmarks.common.NumericalDisagreement`). Ratios are medians of per-repeat paired ratios
with bootstrap intervals (:func:`~benchmarks.common.ratio_goal`); the ring's efficiency per repeat is
``eta = tokens/s / (B / max(bytes per step / measured link bandwidth, resident step time))`` with
the resident step time of the same repeat (:func:`~benchmarks.common.efficiency_goal`).

Usage (from the repository root)::

    python benchmarks/offload.py                 # 0.42 GiB model, B = 8, links unthrottled and 2 GB/s, 5 repeats
    python benchmarks/offload.py --smoke         # toy model, 2 repeats: an end-to-end check
    python benchmarks/offload.py --links none,1e9,4e9 --batch-sizes 1,8 --peers resident,ring2,acc_cpu_matched
    python benchmarks/offload.py --device cuda   # GPU: pinned host tier and copy stream; links not throttled

Writes ``<out>/offload_<device>[_smoke]<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    NumericalDisagreement, check_agreement, efficiency_goal, fill_defaults, format_bytes, markdown_table, median,
    paired_ratio_summary, provenance, provenance_markdown, ratio_goal, rotated, setup_logging, summarize, write_json,
    write_text,
)

logger = logging.getLogger("benchmarks.offload")
ACC_BASE = ("acc_cpu", "acc_disk", "acc_cpu_matched", "acc_disk_matched")
PEERS = ("resident", "ring1", "ring2", "ring3") + ACC_BASE + tuple(f"{p}_fresh" for p in ACC_BASE)
DEFAULT_PEERS = ("resident", "ring1", "ring2") + ACC_BASE + ("acc_cpu_matched_fresh",)
SUBJECT = "ring2"  # the configuration the goals are about: K = 2 (one section prefetched while one computes)
PRELOAD = ["TopKRouter"]  # reads router.gate.weight without calling the Linear

FULL_DEFAULTS = dict(dim=512, layers=8, heads=8, experts=8, expert_dim=1024, prompt_len=32, new_tokens=10,
                     warmup_tokens=2, batch_sizes="8", links="none,2e9", repeats=5, threads=1, device_memory="0.5x")
SMOKE_DEFAULTS = dict(dim=64, layers=4, heads=4, experts=4, expert_dim=128, prompt_len=8, new_tokens=6,
                      warmup_tokens=2, batch_sizes="2", links="none,2e9", repeats=2, threads=1, device_memory="64MiB")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``--smoke``-dependent defaults are filled in afterwards."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy model, B = 2, 2 repeats: an end-to-end check")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dim", type=int, help="model width (512; smoke 64)")
    p.add_argument("--layers", type=int, help="blocks, all MoE (8; smoke 4)")
    p.add_argument("--heads", type=int, help="attention heads (8; smoke 4)")
    p.add_argument("--experts", type=int, help="experts per block (8; smoke 4)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-dim", type=int, help="SwiGLU expert hidden size (1024; smoke 128)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (32; smoke 8)")
    p.add_argument("--new-tokens", type=int,
                   help="tokens of each timed generation: new-tokens - 1 decode steps (10; smoke 6)")
    p.add_argument("--warmup-tokens", type=int, help="tokens of the warm-up generation each worker runs once (2)")
    p.add_argument("--batch-sizes", help="comma separated (8; smoke 2)")
    p.add_argument("--links", help="link bandwidths in bytes/s, comma separated; none = unthrottled (none,2e9)")
    p.add_argument("--peers", default=",".join(DEFAULT_PEERS), help=f"comma list from {','.join(PEERS)}")
    p.add_argument("--repeats", type=int, help="timed generations per peer and cell, order rotated (5; smoke 2)")
    p.add_argument("--device-memory",
                   help="budget of the ring peers' device tier: bytes ('512MiB') or a fraction of the checkpoint's "
                   "bytes (default '0.5x'; smoke 64MiB: the plan's fixed activation reserve exceeds the toy model); "
                   "every ring peer gets the same, and a goal checks ring2's peak against it")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads in every worker (1: on 2 cores the ring's copier thread then has the "
                   "other core, and no OpenMP team waits on a descheduled thread; 0 = torch's default)")
    p.add_argument("--malloc-cache", action="store_true",
                   help="set MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ high in every worker, so glibc reuses "
                   "freed heap memory for large tensors instead of mmap/munmap per allocation")
    p.add_argument("--goal-eta", type=float, default=0.9, help="ring2 efficiency on throttled links (>=)")
    p.add_argument("--goal-speedup-vs-acc-cpu", type=float, default=1.4,
                   help="ring2 tokens/s over each acc_cpu* peer on the same link (>=)")
    p.add_argument("--goal-speedup-vs-acc-disk", type=float, default=3.0,
                   help="ring2 tokens/s over each acc_disk* peer, unthrottled link (>=)")
    p.add_argument("--goal-memory", type=float, default=1.0, help="ring2 peak device memory over the budget (<=)")
    p.add_argument("--model-dir", default=None, help="where the model is created/reused (default: benchmarks/.cache)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    fill_defaults(args, SMOKE_DEFAULTS if args.smoke else FULL_DEFAULTS)
    args.peer_list = [x for x in args.peers.split(",") if x]
    args.batch_list = [int(b) for b in str(args.batch_sizes).split(",")]
    args.link_list = [_parse_link(x) for x in str(args.links).split(",")] if args.device == "cpu" else [None]
    bad = sorted(set(args.peer_list) - set(PEERS))
    if bad or "resident" not in args.peer_list or len(set(args.peer_list)) != len(args.peer_list):
        raise SystemExit(f"--peers: distinct names from {PEERS}, 'resident' included (the bound); got {args.peers}")
    if args.new_tokens < 3 or args.warmup_tokens < 1 or args.repeats < 1:
        raise SystemExit("--new-tokens >= 3 (two decode steps), --warmup-tokens >= 1, --repeats >= 1")
    return args


def _parse_link(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "0", "") else float(text)


def link_name(link: float | None) -> str:
    return "unthrottled" if link is None else f"{link / 1e9:g} GB/s"


# ---------------------------------------------------------------------------------------------
# the model


def job_config(args: argparse.Namespace):
    from system.config import JobConfig

    job = JobConfig()
    m, e = job.model, job.moe
    m.dim, m.n_layers, m.n_heads, m.ffn_dim, m.vocab_size = args.dim, args.layers, args.heads, 4 * args.dim, 320
    m.max_seq_len, m.tie_embeddings = max(256, args.prompt_len + args.new_tokens), False
    e.num_experts, e.top_k, e.expert_dim = args.experts, args.top_k, args.expert_dim
    job.training.seq_len = m.max_seq_len
    job.validate()
    return job


def ensure_model(args: argparse.Namespace) -> Path:
    """Create (or reuse) the checkpoint folder and Accelerate's disk-offload folder next to it."""
    from safetensors.torch import save_file

    from system.config import config_to_dict
    from system.models import MoETransformer

    job = job_config(args)
    name = f"offload_d{args.dim}_l{args.layers}_e{args.experts}_f{args.expert_dim}"
    root = Path(args.model_dir or Path(__file__).resolve().parent / ".cache") / name
    ckpt, acc = root / "model", root / "accelerate"
    if not (ckpt / "model.safetensors").is_file():
        logger.info("creating the model in %s", ckpt)
        model = MoETransformer(job.model, job.moe)
        model.init_weights(seed=0)
        ckpt.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt", "producer": "moe-system"})
        (ckpt / "config.json").write_text(json.dumps(config_to_dict(job), indent=2, sort_keys=True))
        del model
    if not (acc / "index.json").is_file():
        from accelerate.utils import offload_state_dict
        from safetensors.torch import load_file

        offload_state_dict(str(acc), load_file(str(ckpt / "model.safetensors")))
    return root


def device_budget(text: str, model_bytes: int) -> int:
    """``"0.5x"`` -> half the checkpoint's bytes; anything else through :func:`system.inference.parse_bytes`."""
    from system.inference import parse_bytes

    if text.strip().lower().endswith("x"):
        return int(float(text.strip()[:-1]) * model_bytes)
    return int(parse_bytes(text))


# ---------------------------------------------------------------------------------------------
# the worker: one peer, loaded once per cell, asked for one timed generation per repeat


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class AnonSampler:
    """Peak ``RssAnon`` of this process, sampled every ``period`` s in a thread while :attr:`active` is set
    (cleared while the worker waits, so idle workers do not take CPU from the one being timed)."""

    def __init__(self, period: float = 0.005):
        self.peak = _status_kib("RssAnon") * 1024
        self.active = threading.Event()
        self.active.set()
        self._period = period
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.active.wait()
            self.peak = max(self.peak, _status_kib("RssAnon") * 1024)
            time.sleep(self._period)

    def read(self) -> int:
        self.peak = max(self.peak, _status_kib("RssAnon") * 1024)
        return self.peak


class DeviceBuffers:
    """Buffers on the execution device for the weights Accelerate's hooks load.

    ``reuse=True``: a buffer is taken from a free list of its byte size and goes back to it when the hook
    drops the weight (moves it to ``meta``), as a GPU caching allocator reuses freed blocks. ``False``:
    a fresh ``torch.empty`` per weight per forward.
    """

    def __init__(self, device: torch.device, reuse: bool):
        self.device, self.reuse = device, reuse
        self.free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.lent: dict[tuple[int, str], torch.Tensor] = {}

    def take(self, key: tuple[int, str], nbytes: int) -> torch.Tensor:
        if not self.reuse:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        pool = self.free[nbytes]
        buf = pool.pop() if pool else torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.lent[key] = buf
        return buf

    def give_back(self, key: tuple[int, str]) -> None:
        buf = self.lent.pop(key, None)
        if buf is not None:
            self.free[buf.numel()].append(buf)


def route_accelerate_through(link, buffers: DeviceBuffers) -> None:
    """Make every weight an Accelerate hook loads cross ``link`` into a buffer from ``buffers``."""
    import accelerate.hooks as hooks

    original = hooks.set_module_tensor_to_device

    def through_link(module, name, device, value=None, *args, **kwargs):
        key = (id(module), name)
        if str(device) == "meta":
            buffers.give_back(key)
        elif value is not None:
            src = value.contiguous()
            buf = buffers.take(key, src.numel() * src.element_size())
            link.copy(buf, src.view(-1).view(torch.uint8))
            value = buf.view(src.dtype).view(src.shape)
        return original(module, name, device, value, *args, **kwargs)

    hooks.set_module_tensor_to_device = through_link


def matched_device_map(model: torch.nn.Module, tier: str, device: torch.device) -> tuple[dict[str, Any], set[str]]:
    """``({module: device}, streamed modules)``: the ring's resident modules on ``device``, the modules holding
    its sections (:func:`system.inference.sections.section_index`) on ``tier`` (``"cpu"`` or ``"disk"``)."""
    from system.inference.sections import section_index

    placed: dict[str, bool] = {}
    for name, _ in model.named_parameters():
        module, streamed = name.rpartition(".")[0], section_index(name) is not None
        if placed.setdefault(module, streamed) != streamed:
            raise ValueError(f"module {module} holds streamed and resident weights: no device_map matches the ring")
    streamed = {m for m, s in placed.items() if s}
    return {m: tier if m in streamed else str(device) for m in placed}, streamed


def accelerate_model(peer: str, spec: dict, link):
    """``MoETransformer`` under Accelerate for ``peer``, every loaded weight fed through ``link``."""
    from accelerate import cpu_offload, disk_offload, dispatch_model
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from safetensors.torch import load_file

    from system.inference import load_job_config
    from system.models import MoETransformer
    from system.models.model import precompute_rope

    device = torch.device(spec["device"])
    route_accelerate_through(link, DeviceBuffers(device, reuse=not peer.endswith("_fresh")))
    kind = peer.removesuffix("_fresh")
    job = load_job_config(spec["ckpt"])
    with torch.device("meta"):
        model = MoETransformer(job.model, job.moe)
    model.rope = precompute_rope(job.model).to(device)
    file = str(Path(spec["ckpt"]) / "model.safetensors")
    if kind == "acc_cpu":
        cpu_offload(model, execution_device=device, state_dict=load_file(file), preload_module_classes=PRELOAD)
    elif kind == "acc_disk":
        disk_offload(model, spec["acc_dir"], execution_device=device, preload_module_classes=PRELOAD)
    else:
        tier = "cpu" if kind == "acc_cpu_matched" else "disk"
        device_map, offloaded = matched_device_map(model, tier, device)
        resident = [n for n, _ in model.named_parameters() if n.rpartition(".")[0] not in offloaded]
        streamed = [n for n, _ in model.named_parameters() if n.rpartition(".")[0] in offloaded]
        with safe_open(file, framework="pt") as f:  # what load_checkpoint_in_model does for on-device modules
            for name in resident:
                set_module_tensor_to_device(model, name, device, value=f.get_tensor(name))
            state = {name: f.get_tensor(name) for name in streamed} if tier == "cpu" else None
        if device.type == "cpu" and tier == "cpu":
            # dispatch_model runs "cpu" modules in place when the main device is the CPU (nothing to move);
            # attach the hooks it attaches for an accelerator main device: offload the "cpu" modules.
            from accelerate.hooks import attach_align_device_hook_on_blocks
            from accelerate.utils import OffloadedWeightsLoader

            attach_align_device_hook_on_blocks(
                model, execution_device={**{k: device for k in device_map}, "": device},
                offload={k: k in offloaded for k in device_map},
                weights_map=OffloadedWeightsLoader(state_dict=state), preload_module_classes=PRELOAD)
        else:
            dispatch_model(model, device_map, main_device=str(device), state_dict=state, offload_dir=spec["acc_dir"],
                           preload_module_classes=PRELOAD)
    return model.eval()


class StepClock:
    """A sampler that reads the clock after each call (after a device sync): the end of every forward pass."""

    def __init__(self, sampler, sync):
        self.sampler, self.sync, self.stamps = sampler, sync, []

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        out = self.sampler(logits)
        if self.sync is not None:
            self.sync()
        self.stamps.append(time.perf_counter())
        return out


class Worker:
    """One peer in its own process: load and warm up once, then :meth:`run` a timed generation per request."""

    def __init__(self, spec: dict):
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        from system.inference import Link, OffloadEngine, Sampler, SamplingConfig

        self.spec, peer = spec, spec["peer"]
        self.device = torch.device(spec["device"])
        torch.ones(256, 256) @ torch.ones(256, 256)  # start the intra-op thread pool before the baseline
        self.baseline = _status_kib("RssAnon") * 1024  # the process without the model
        self.mem = AnonSampler()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        gen = torch.Generator().manual_seed(1234)
        self.prompts = torch.randint(0, 256, (spec["batch"], spec["prompt_len"]), generator=gen).tolist()
        self.sampler = Sampler(SamplingConfig("greedy"), vocab_limit=257, device=self.device)
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else None
        self.engine = None
        t0 = time.perf_counter()
        if peer.startswith("acc_"):
            self.link = Link(spec["link"] if self.device.type == "cpu" else None)
            self.model = accelerate_model(peer, spec, self.link)
        else:
            mode, slots = ("none", 1) if peer == "resident" else ("ring", int(peer[4:]))
            self.engine = OffloadEngine(
                spec["ckpt"], offload=mode, slots=slots, device=spec["device"],
                device_memory=spec["budget"] if mode == "ring" else None, max_batch_size=spec["batch"],
                max_seq_len=spec["prompt_len"] + max(spec["new_tokens"], spec["warmup_tokens"]),
                link_bandwidth=spec["link"])
            self.link = self.engine.link
        self.load_s = time.perf_counter() - t0
        # warm-up, once, the same for every peer: pages in the weights, starts the ring, fills Accelerate's pool
        self._generate(spec["warmup_tokens"], self.sampler)
        self.mem.active.clear()

    def _generate(self, n: int, sampler):
        from system.inference import generate_batch

        if self.engine is not None:
            return self.engine.generate_ids(self.prompts, n, sampler)
        before = self.link.bytes_moved
        out, stats = generate_batch(self.model, self.prompts, n, sampler, sync=self.sync)
        stats.bytes_streamed = self.link.bytes_moved - before
        return out, stats

    def run(self) -> dict:
        """One timed generation: its per-step times, bytes, link bandwidth, memory."""
        self.mem.active.set()
        bytes0, busy0 = self.link.bytes_moved, self.link.busy_s
        clock = StepClock(self.sampler, self.sync)
        out, stats = self._generate(self.spec["new_tokens"], clock)
        moved, busy = self.link.bytes_moved - bytes0, self.link.busy_s - busy0
        steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]  # decode steps (the first stamp ends prefill)
        if self.device.type == "cuda":
            device_peak = torch.cuda.max_memory_allocated(self.device)
        else:
            device_peak = self.mem.read() - self.baseline
        self.mem.active.clear()
        return {
            "tokens": out, "step_s": steps, "median_step_s": median(steps),
            "tokens_per_s": self.spec["batch"] / median(steps), "mean_decode_tokens_per_s": stats.decode_tokens_per_s,
            "prefill_s": stats.prefill_s, "forward_passes": stats.forward_passes,
            "bytes_per_step": stats.bytes_streamed / max(stats.forward_passes, 1),
            "measured_bandwidth": moved / busy if busy > 0 else 0.0,
            "device_peak_bytes": device_peak, "baseline_rss_anon_bytes": self.baseline,
            "vm_hwm_bytes": _status_kib("VmHWM") * 1024, "load_s": self.load_s,
            "plan": self.engine.plan.describe() if self.engine is not None and self.engine.mode == "ring" else None,
        }

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _worker_entry(conn, spec: dict) -> None:
    """Process body: load, say ready, then serve ``"run"`` requests until ``"close"``."""
    worker = None
    try:
        worker = Worker(spec)
        conn.send(("ready", None))
        while conn.recv() == "run":
            conn.send(("result", worker.run()))
    except BaseException:  # noqa: BLE001 - reported to the driver, which aborts the run
        conn.send(("error", traceback.format_exc()))
    finally:
        if worker is not None:
            worker.close()
        conn.close()


class PeerProcess:
    """The driver's handle on one worker process."""

    def __init__(self, ctx, spec: dict):
        self.peer = spec["peer"]
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_entry, args=(child, spec), name=f"offload-{self.peer}", daemon=True)
        self.proc.start()
        child.close()
        self._reply("ready")

    def _reply(self, kind: str) -> Any:
        try:
            got, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"worker {self.peer} died (exit code {self.proc.exitcode})") from None
        if got != kind:
            raise RuntimeError(f"worker {self.peer} failed:\n{payload}")
        return payload

    def run(self) -> dict:
        self.conn.send("run")
        return self._reply("result")

    def close(self) -> None:
        try:
            self.conn.send("close")
        except OSError:
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()


def worker_context(args: argparse.Namespace):
    """Processes for the workers: on CPU forked from a server that imported torch and Accelerate once (cheap
    starts); on CUDA spawned (a CUDA context does not survive a fork)."""
    if args.malloc_cache:  # read by glibc when a process starts: set before the server / workers start
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 40)
        os.environ["MALLOC_TRIM_THRESHOLD_"] = str(1 << 40)
    if args.device == "cuda":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # torch._refs / torch._dynamo: imported lazily by the first module built on the meta device (seconds)
    ctx.set_forkserver_preload(["__main__", "torch", "torch._refs", "torch._dynamo", "accelerate", "safetensors.torch",
                                "system.inference"])
    return ctx


# ---------------------------------------------------------------------------------------------
# the driver


def run_cell(ctx, args: argparse.Namespace, base_spec: dict, batch: int, link: float | None) -> dict[str, list[dict]]:
    """Start every peer for (batch, link), run the rotated repeats, check the tokens agree; samples per peer."""
    peers = args.peer_list
    procs: dict[str, PeerProcess] = {}
    samples: dict[str, list[dict]] = {p: [] for p in peers}
    try:
        for peer in peers:  # one at a time: load times are not disturbed by a neighbour's load
            procs[peer] = PeerProcess(ctx, {**base_spec, "peer": peer, "batch": batch, "link": link})
            logger.info("B=%d %s: %s loaded", batch, link_name(link), peer)
        for rep in range(args.repeats):
            for peer in rotated(peers, rep):
                r = procs[peer].run()
                r["repeat"] = rep
                samples[peer].append(r)
                logger.info("rep %d B=%d %-11s %-22s %8.2f tok/s  %s/step", rep, batch, link_name(link), peer,
                            r["tokens_per_s"], format_bytes(r["bytes_per_step"]))
            tokens = {p: torch.tensor(samples[p][-1]["tokens"]) for p in peers}
            check_agreement(f"greedy tokens, B={batch}, {link_name(link)}, repeat {rep}", tokens, rtol=0.0, atol=0.0)
    finally:
        for proc in procs.values():
            proc.close()
    return samples


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    root = ensure_model(args)
    ckpt = root / "model"
    model_bytes = (ckpt / "model.safetensors").stat().st_size
    budget = device_budget(args.device_memory, model_bytes)
    logger.info("model %s, ring budget %s (%s)", format_bytes(model_bytes), format_bytes(budget), args.device_memory)
    base = {"ckpt": str(ckpt), "acc_dir": str(root / "accelerate"), "device": args.device, "budget": budget,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "warmup_tokens": args.warmup_tokens,
            "threads": args.threads}
    ctx = worker_context(args)
    t0 = time.perf_counter()
    cells = []
    try:
        for batch in args.batch_list:
            for link in args.link_list:
                cells.append({"batch": batch, "link": link, "samples": run_cell(ctx, args, base, batch, link)})
    except NumericalDisagreement as e:
        raise SystemExit(f"offload benchmark aborted: {e}") from None
    result = summarize_results(args, cells, budget, model_bytes, time.perf_counter() - t0)
    stem = f"offload_{args.device}{'_smoke' if args.smoke else ''}{args.tag}"
    out = Path(args.out)
    write_json(out / f"{stem}.json", result)
    md = render_markdown(result)
    write_text(out / f"{stem}.md", md)
    print(md)


# ---------------------------------------------------------------------------------------------
# statistics and goals


def _eta_inputs(cell: dict, peer: str) -> tuple[list[float], list[float]]:
    """Per repeat: (achieved tokens/s, bound tokens/s) of ``peer``, the bound from the same repeat's resident step."""
    res, ss = cell["samples"]["resident"], cell["samples"][peer]
    achieved, bound = [], []
    for s, r in zip(ss, res):
        if s["measured_bandwidth"] <= 0:
            continue
        achieved.append(s["tokens_per_s"])
        bound.append(cell["batch"] / max(s["bytes_per_step"] / s["measured_bandwidth"], r["median_step_s"]))
    return achieved, bound


def summarize_results(args, cells, budget, model_bytes, wall_s) -> dict[str, Any]:
    """Per cell and peer: summaries; ring2's goals; paired speedups of ring2 over every peer."""
    goals, out_cells = [], []
    for cell in cells:
        batch, link, samples = cell["batch"], cell["link"], cell["samples"]
        where = f"B={batch}, {link_name(link)}"
        peers = {}
        for peer, ss in samples.items():
            entry = {
                "tokens_per_s": summarize([s["tokens_per_s"] for s in ss]),
                "mean_decode_tokens_per_s": summarize([s["mean_decode_tokens_per_s"] for s in ss]),
                "median_step_s": summarize([s["median_step_s"] for s in ss]),
                "prefill_s": median(s["prefill_s"] for s in ss),
                "bytes_per_step": median(s["bytes_per_step"] for s in ss),
                "measured_bandwidth": median(s["measured_bandwidth"] for s in ss),
                "device_peak_bytes": max(s["device_peak_bytes"] for s in ss),
                "vm_hwm_bytes": max(s["vm_hwm_bytes"] for s in ss), "load_s": ss[0]["load_s"], "plan": ss[0]["plan"],
            }
            if peer != "resident":
                entry["eta"] = paired_ratio_summary(*_eta_inputs(cell, peer))
            peers[peer] = entry
        speedups = {}
        if SUBJECT in samples:
            mine = [s["tokens_per_s"] for s in samples[SUBJECT]]
            for peer, ss in samples.items():
                if peer != SUBJECT:
                    speedups[peer] = paired_ratio_summary(mine, [s["tokens_per_s"] for s in ss])
            if link is not None:
                g = efficiency_goal(f"{SUBJECT} efficiency eta", *_eta_inputs(cell, SUBJECT), args.goal_eta)
                goals.append({**g, "cell": where})
            for peer in samples:
                base = peer.removesuffix("_fresh").removesuffix("_matched")
                if base == "acc_cpu" or (base == "acc_disk" and link is None):
                    goal = args.goal_speedup_vs_acc_cpu if base == "acc_cpu" else args.goal_speedup_vs_acc_disk
                    g = ratio_goal(f"{SUBJECT} tokens/s over {peer}", mine, [s["tokens_per_s"] for s in samples[peer]],
                                   goal)
                    goals.append({**g, "cell": where})
            mem = [s["device_peak_bytes"] for s in samples[SUBJECT]]
            g = ratio_goal(f"{SUBJECT} peak device memory over the budget", mem, [budget] * len(mem), args.goal_memory,
                           higher_is_better=False)
            goals.append({**g, "cell": where})
        out_cells.append({"batch": batch, "link": link, "peers": peers, "speedup_of_ring2": speedups})
    return {
        "benchmark": "offload", "smoke": args.smoke, "provenance": provenance(),
        "config": {k: v for k, v in vars(args).items()}, "model_bytes": model_bytes, "device_budget_bytes": budget,
        "wall_s": wall_s, "cells": out_cells, "goals": goals,
        "samples": [{"batch": c["batch"], "link": c["link"], "peer": p, **s}
                    for c in cells for p, ss in c["samples"].items() for s in ss],
    }


# ---------------------------------------------------------------------------------------------
# markdown


def _ci(r: dict, spec: str = ".2f") -> str:
    if not r or not r.get("n"):
        return "n/a"
    return f"{r['median']:{spec}} [{r['ci_low']:{spec}}, {r['ci_high']:{spec}}]"


def render_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    budget = format_bytes(result["device_budget_bytes"])
    lines = [
        f"# Offloaded inference: ring vs Accelerate ({cfg['device']}{', smoke' if result['smoke'] else ''})\n",
        provenance_markdown(result["provenance"]),
        f"Model {format_bytes(result['model_bytes'])}: d={cfg['dim']}, {cfg['layers']} MoE blocks, {cfg['experts']} "
        f"experts top-{cfg['top_k']}, expert dim {cfg['expert_dim']}, fp32; prompts {cfg['prompt_len']} tokens; one "
        f"warm-up generation of {cfg['warmup_tokens']} tokens per worker, then per repeat a timed one of "
        f"{cfg['new_tokens']} tokens ({cfg['new_tokens'] - 1} decode steps), greedy, KV cache; ring budget {budget} "
        f"(`--device-memory {cfg['device_memory']}`); {cfg['repeats']} repeats, peer order rotated per repeat; "
        f"{cfg['threads'] or 'default'} intra-op thread(s) per worker"
        + ("; glibc malloc thresholds raised in every worker" if cfg["malloc_cache"] else "") + ".\n",
        "Accelerate's weights go into reused buffers (a caching allocator's behaviour), `_fresh` peers into a fresh "
        "tensor per weight per forward. tokens/s = B / median decode-step time of a repeat; the table gives the "
        "median over repeats [min, max]. eta and speedups: median of per-repeat paired ratios [95% bootstrap "
        "interval]. Every peer's tokens equal the resident peer's in every repeat (checked; a difference aborts "
        "the run).\n",
    ]
    for cell in result["cells"]:
        lines.append(f"## B = {cell['batch']}, link {link_name(cell['link'])}\n")
        rows = []
        for peer, p in cell["peers"].items():
            t = p["tokens_per_s"]
            sp = cell["speedup_of_ring2"].get(peer)
            rows.append([peer, f"{t['median']:.2f} [{t['min']:.2f}, {t['max']:.2f}]",
                         f"{p['mean_decode_tokens_per_s']['median']:.2f}", f"{p['prefill_s']:.3f}",
                         format_bytes(p["bytes_per_step"]), f"{p['measured_bandwidth'] / 1e9:.2f} GB/s",
                         _ci(p.get("eta")), _ci(sp), format_bytes(p["device_peak_bytes"]), f"{p['load_s']:.1f}"])
        lines.append(markdown_table(["peer", "tokens/s", "mean decode tok/s", "prefill s", "bytes/step", "link bw",
                                     "eta", "ring2 speedup", "peak device mem", "load s"], rows))
    lines.append("\n## Goals\n")
    lines.append(markdown_table(
        ["goal", "cell", "target", "median", "95% interval", "verdict"],
        [[g["name"], g["cell"], f"{g['direction']} {g['goal']:g}", f"{g['median']:.3f}",
          f"[{g['ci_low']:.3f}, {g['ci_high']:.3f}]", g["verdict"]] for g in result["goals"]]))
    notes = [f"- {g['name']} ({g['cell']}): {g['note']}" for g in result["goals"] if g.get("note")]
    lines += ["", *notes, ""] if notes else [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
