"""Offloaded inference: our ring (SE-MoE, arXiv 2205.10034, sec. 3.3.2) against Accelerate's offloading.

One MoE decoder of about 1 GB (fp32, created locally from a seed, saved as ``model.safetensors`` +
``config.json`` like :func:`system.checkpoint.model_io.save_model`) generates ``--new-tokens`` tokens
for ``B`` prompts of ``--prompt-len`` random byte tokens, greedily, with a KV cache, through the same
decode code (:func:`system.inference.loop.generate_batch`) in every peer:

- ``resident``: every weight in memory (the compute bound).
- ``ring1``, ``ring2``, ``ring3``: :class:`system.inference.OffloadEngine` with ``offload="ring"`` and
  K = 1 (no prefetch), 2, 3 slots; FFN sections stream from the mmap'd checkpoint through a copier
  thread and a :class:`system.inference.Link` throttled to the link bandwidth.
- ``acc_cpu``: ``accelerate.cpu_offload`` (the whole state dict in host memory, each module's
  weights moved to the execution device by its pre-forward hook and dropped after).
- ``acc_disk``: ``accelerate.disk_offload`` (weights in Accelerate's ``.dat`` memmaps, read per
  module per forward, then moved like ``acc_cpu``).

Same link for every peer: on a CPU-only machine Accelerate's "move to the execution device" is a
no-op (cpu -> cpu returns the same tensor), so the benchmark wraps
``accelerate.hooks.set_module_tensor_to_device``: every value a hook loads first goes through the
same :class:`~system.inference.Link` as the ring (a throttled copy into a fresh tensor, as a
host-to-device copy would allocate on the device). ``TopKRouter`` reads its gate weight without
calling the ``Linear`` module, so it is listed in Accelerate's ``preload_module_classes``.

Method: every (repeat, batch size, link, peer) runs in a fresh subprocess, interleaved (repeat r runs
every configuration before repeat r+1); a worker warms up with a 2-token generation, then times one
generation: decode tokens/s (the B x (new tokens - 1) tokens of the decode steps over their time),
prefill time, bytes streamed per forward pass ("per step"), the link bandwidth measured during the
timed generation (bytes / time in copies, throttling included), peak anonymous memory (``RssAnon`` sampled every 5 ms; ``VmHWM`` is reported too but
counts the mmap'd checkpoint's page-cache pages) and its baseline before loading the model.
Medians over repeats. Efficiency ``eta = tokens/s / (B / max(bytes per step / bandwidth, resident
step time))`` with the bandwidth measured in the same run and the resident peer's median decode
step time for that batch size. Every peer's generated tokens are checked against the resident's.

Usage (from the repository root)::

    python benchmarks/offload.py                   # ~1 GB model, links unthrottled/1/2/4 GB/s, B = 1, 8 (long)
    python benchmarks/offload.py --smoke           # tiny model, one repeat: an end-to-end check
    python benchmarks/offload.py --links none,2e9 --batch-sizes 4 --peers resident,ring2,acc_cpu
    python benchmarks/offload.py --device cuda     # GPU: pinned host memory, copy stream (UNTESTED)

Writes ``<out>/offload_<device>[_smoke]<tag>.json`` and ``.md``. The CUDA path was written without a
GPU and is untested: there the ring uses :class:`system.inference.CudaTransport` and links are not
throttled (the real PCIe link is measured).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    format_bytes, host_info, markdown_table, median, package_versions, summarize, write_json, write_text,
)

logger = logging.getLogger("benchmarks.offload")
PEERS = ("resident", "acc_disk", "acc_cpu", "ring1", "ring2", "ring3")
RESULT_PREFIX = "RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-dim", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--batch-sizes", default="1,8", help="comma separated")
    p.add_argument("--links", default="none,1e9,2e9,4e9", help="bytes/s, comma separated; none = unthrottled")
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device-memory", default="auto", help="ring budget; auto: the K=3 plan of the largest batch + 10%%")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per worker (default: torch's)")
    p.add_argument("--model-dir", default=None, help="where the model is created/reused (default: benchmarks/.cache)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, one repeat, links none and 1e9, B = 2, one thread per worker")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.dim, args.layers, args.heads, args.experts, args.expert_dim = 64, 4, 4, 4, 128
        args.prompt_len, args.new_tokens, args.batch_sizes, args.links, args.repeats = 8, 4, "2", "none,1e9", 1
        args.threads = args.threads or 1  # tiny shapes: one thread is steadier on a shared machine
    return args


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


# ---------------------------------------------------------------------------------------------
# the worker (one measurement in a fresh process)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class AnonSampler:
    """Peak ``RssAnon`` of this process, sampled every ``period`` seconds in a thread."""

    def __init__(self, period: float = 0.005):
        self.peak = _status_kib("RssAnon") * 1024
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self.peak = max(self.peak, _status_kib("RssAnon") * 1024)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("RssAnon") * 1024)
        return self.peak


def _accelerate_model(spec: dict, link):
    """``MoETransformer`` under Accelerate ``cpu_offload`` / ``disk_offload``, fed through ``link``."""
    import accelerate.hooks as hooks
    from accelerate import cpu_offload, disk_offload
    from safetensors.torch import load_file

    from system.inference import load_job_config
    from system.models import MoETransformer
    from system.models.model import precompute_rope

    original = hooks.set_module_tensor_to_device

    def through_link(module, name, device, value=None, *a, **kw):
        if value is not None and str(device) != "meta":
            moved = torch.empty(value.shape, dtype=value.dtype, device=device)
            link.copy(moved.view(-1).view(torch.uint8), value.contiguous().view(-1).view(torch.uint8))
            value = moved
        return original(module, name, device, value, *a, **kw)

    hooks.set_module_tensor_to_device = through_link
    job = load_job_config(spec["ckpt"])
    with torch.device("meta"):
        model = MoETransformer(job.model, job.moe)
    cfg = job.model
    device = torch.device(spec["device"])
    model.rope = precompute_rope(cfg).to(device)
    if spec["peer"] == "acc_cpu":
        state = load_file(str(Path(spec["ckpt"]) / "model.safetensors"))
        cpu_offload(model, execution_device=device, state_dict=state, preload_module_classes=["TopKRouter"])
    else:
        disk_offload(model, spec["acc_dir"], execution_device=device, preload_module_classes=["TopKRouter"])
    return model.eval()


def run_worker(spec: dict) -> dict:
    """Load one peer, warm up, time one generation; return the measurements."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from system.inference import Link, OffloadEngine, Sampler, SamplingConfig, generate_batch

    peer, device = spec["peer"], torch.device(spec["device"])
    if peer.startswith("acc_"):
        import accelerate  # noqa: F401  (imported before the baseline is taken)
    importlib.import_module("torch._dynamo")  # imported lazily by meta-device module init: ~60 MB of objects
    torch.ones(256, 256) @ torch.ones(256, 256)  # start the intra-op thread pool
    baseline = _status_kib("RssAnon") * 1024  # the process without the model: Python, torch, libraries
    sampler_mem = AnonSampler()
    gen = torch.Generator().manual_seed(1234)
    prompts = torch.randint(0, 256, (spec["batch"], spec["prompt_len"]), generator=gen).tolist()
    seq = spec["prompt_len"] + spec["new_tokens"]
    sampler = Sampler(SamplingConfig("greedy"), vocab_limit=257, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    link = Link(spec["link"] if device.type == "cpu" else None)
    engine = None
    t0 = time.perf_counter()
    if peer.startswith("acc_"):
        model = _accelerate_model(spec, link)

        def generate(n: int):
            before = link.bytes_moved
            out, stats = generate_batch(model, prompts, n, sampler, sync=sync)
            stats.bytes_streamed = link.bytes_moved - before
            return out, stats

    else:
        mode, slots = ("none", 1) if peer == "resident" else ("ring", int(peer[4:]))
        engine = OffloadEngine(spec["ckpt"], offload=mode, slots=slots, device=spec["device"],
                               device_memory=spec["budget"] if mode == "ring" else None,
                               max_batch_size=spec["batch"], max_seq_len=seq, link_bandwidth=spec["link"])
        link = engine.link

        def generate(n: int):
            return engine.generate_ids(prompts, n, sampler)

    load_s = time.perf_counter() - t0
    generate(2)  # warm-up: page in the checkpoint, start threads, size the allocator
    bytes0, busy0 = link.bytes_moved, link.busy_s  # the CPU link of every peer (the ring's copier uses it too)
    out, stats = generate(spec["new_tokens"])
    if device.type == "cpu":  # bandwidth of the timed generation only (the warm-up pays page faults)
        busy = link.busy_s - busy0
        bandwidth = (link.bytes_moved - bytes0) / busy if busy > 0 else 0.0
    else:
        bandwidth = engine.measured_bandwidth if engine is not None else 0.0
    peak = sampler_mem.stop()
    decode_steps = stats.forward_passes - 1
    result = {
        "peer": peer, "batch": spec["batch"], "link": spec["link"], "load_s": load_s,
        "decode_tokens_per_s": stats.decode_tokens_per_s, "prefill_s": stats.prefill_s, "decode_s": stats.decode_s,
        "decode_steps": decode_steps, "bytes_per_step": stats.bytes_streamed / max(stats.forward_passes, 1),
        "measured_bandwidth": bandwidth, "peak_rss_anon_bytes": peak, "baseline_rss_anon_bytes": baseline,
        "vm_hwm_bytes": _status_kib("VmHWM") * 1024, "tokens": out[0],
    }
    if engine is not None:
        result["plan"] = engine.plan.describe()
        result["plan_total_bytes"] = engine.plan.total_bytes
        engine.close()
    return result


# ---------------------------------------------------------------------------------------------
# the driver


def _parse_link(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "0", "") else float(text)


def auto_budget(args: argparse.Namespace, ckpt: Path, batch: int) -> int:
    """The K=3 ring plan of the largest batch, + 10%."""
    from system.inference import OffloadEngine

    seq = args.prompt_len + args.new_tokens
    with OffloadEngine(ckpt, offload="ring", slots=3, max_batch_size=batch, max_seq_len=seq) as eng:
        return int(eng.plan.total_bytes * 1.1)


def run_subprocess(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['peer']} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)][-1]
    return json.loads(line[len(RESULT_PREFIX):])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise SystemExit(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    links = [_parse_link(x) for x in args.links.split(",")] if args.device == "cpu" else [None]
    root = ensure_model(args)
    ckpt = root / "model"
    model_bytes = (ckpt / "model.safetensors").stat().st_size
    budget = auto_budget(args, ckpt, max(batches)) if args.device_memory == "auto" else args.device_memory
    logger.info("model %s, ring budget %s", format_bytes(model_bytes), budget)
    samples: list[dict] = []
    for rep in range(args.repeats):
        for batch in batches:
            for link in links:
                for peer in peers:
                    if peer == "resident" and link != links[0]:
                        continue  # the resident peer streams nothing: one run per batch size
                    spec = {"peer": peer, "batch": batch, "link": link, "ckpt": str(ckpt), "acc_dir": str(root / "accelerate"),
                            "device": args.device, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                            "budget": budget, "threads": args.threads}
                    r = run_subprocess(spec)
                    r["repeat"] = rep
                    samples.append(r)
                    logger.info("rep %d B=%d link=%s %-8s %8.2f tok/s  %s/step", rep, batch, link, peer,
                                r["decode_tokens_per_s"], format_bytes(r["bytes_per_step"]))
    result = summarize_results(args, samples, peers, batches, links, budget, model_bytes)
    stem = f"offload_{args.device}{'_smoke' if args.smoke else ''}{args.tag}"
    out = Path(args.out)
    write_json(out / f"{stem}.json", result)
    write_text(out / f"{stem}.md", render_markdown(result))
    print(render_markdown(result))


def summarize_results(args, samples, peers, batches, links, budget, model_bytes) -> dict[str, Any]:
    """Medians per (batch, link, peer), eta, ratios, goals."""
    rows = []
    for batch in batches:
        res = [s for s in samples if s["peer"] == "resident" and s["batch"] == batch]
        res_step = batch / median(s["decode_tokens_per_s"] for s in res) if res else None
        ref_tokens = res[0]["tokens"] if res else None
        for link in links:
            by_peer = {}
            for peer in peers:
                ss = [s for s in samples if s["peer"] == peer and s["batch"] == batch
                      and (s["link"] == link or peer == "resident")]
                if not ss:
                    continue
                tps = median(s["decode_tokens_per_s"] for s in ss)
                bps = median(s["bytes_per_step"] for s in ss)
                bw = median(s["measured_bandwidth"] for s in ss)
                eta = None
                if res_step and peer != "resident" and bw > 0:
                    eta = tps / (batch / max(bps / bw, res_step))
                by_peer[peer] = {
                    "tokens_per_s": summarize([s["decode_tokens_per_s"] for s in ss]), "bytes_per_step": bps,
                    "measured_bandwidth": bw, "eta": eta, "prefill_s": median(s["prefill_s"] for s in ss),
                    "peak_rss_anon_bytes": max(s["peak_rss_anon_bytes"] for s in ss),
                    "model_rss_anon_bytes": max(s["peak_rss_anon_bytes"] - s["baseline_rss_anon_bytes"] for s in ss),
                    "vm_hwm_bytes": max(s["vm_hwm_bytes"] for s in ss),
                    "same_tokens_as_resident": all(s["tokens"] == ref_tokens for s in ss) if ref_tokens else None,
                    "plan_total_bytes": ss[0].get("plan_total_bytes"),
                }
            rows.append({"batch": batch, "link": link, "peers": by_peer})
    goals = []
    budget_bytes = None
    if budget is not None:
        from system.inference import parse_bytes

        budget_bytes = parse_bytes(budget)
    for row in rows:
        p = row["peers"]
        ring2 = p.get("ring2")
        if ring2 is None:
            continue
        tps = ring2["tokens_per_s"]["median"]
        if row["link"] is not None and ring2["eta"] is not None:
            goals.append({"goal": "eta >= 0.9 at K=2", "batch": row["batch"], "link": row["link"],
                          "value": ring2["eta"], "met": ring2["eta"] >= 0.9})
        if "acc_cpu" in p:
            ratio = tps / p["acc_cpu"]["tokens_per_s"]["median"]
            goals.append({"goal": ">= 1.4x acc_cpu tokens/s (same link)", "batch": row["batch"], "link": row["link"],
                          "value": ratio, "met": ratio >= 1.4})
        if row["link"] is None and "acc_disk" in p:
            ratio = tps / p["acc_disk"]["tokens_per_s"]["median"]
            goals.append({"goal": ">= 3x acc_disk tokens/s (unthrottled)", "batch": row["batch"], "link": None,
                          "value": ratio, "met": ratio >= 3.0})
        if budget_bytes:
            goals.append({"goal": "ring2 peak anon memory (minus baseline) within the budget", "batch": row["batch"],
                          "link": row["link"], "value": ring2["model_rss_anon_bytes"],
                          "met": ring2["model_rss_anon_bytes"] <= budget_bytes})
    return {
        "benchmark": "offload", "smoke": args.smoke, "config": {k: v for k, v in vars(args).items() if k != "worker"},
        "model_bytes": model_bytes, "ring_budget": budget, "rows": rows, "goals": goals, "samples": samples,
        "host": host_info(), "versions": package_versions(["torch", "accelerate", "safetensors", "numpy"]),
    }


def render_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"# Offloaded inference ({cfg['device']}{', smoke' if result['smoke'] else ''})\n",
        f"Model {format_bytes(result['model_bytes'])}: d={cfg['dim']}, {cfg['layers']} layers, {cfg['experts']} experts "
        f"top-{cfg['top_k']}, expert dim {cfg['expert_dim']}, fp32; prompts {cfg['prompt_len']} tokens, "
        f"{cfg['new_tokens']} new tokens (greedy, KV cache); ring budget {result['ring_budget']}; "
        f"{cfg['repeats']} repeats, medians. tokens/s are decode tokens/s.\n",
    ]
    headers = ["B", "link", "peer", "tokens/s", "prefill s", "bytes/step", "measured bw", "eta",
               "peak anon (model)", "VmHWM", "same tokens"]
    table = []
    for row in result["rows"]:
        link = "unthrottled" if row["link"] is None else f"{row['link'] / 1e9:g} GB/s"
        for peer, p in row["peers"].items():
            table.append([row["batch"], link, peer, f"{p['tokens_per_s']['median']:.2f}", f"{p['prefill_s']:.3f}",
                          format_bytes(p["bytes_per_step"]), f"{p['measured_bandwidth'] / 1e9:.2f} GB/s",
                          "" if p["eta"] is None else f"{p['eta']:.2f}", format_bytes(p["model_rss_anon_bytes"]),
                          format_bytes(p["vm_hwm_bytes"]), p["same_tokens_as_resident"]])
    lines.append(markdown_table(headers, table))
    lines.append("\n## Goals\n")
    lines.append(markdown_table(
        ["goal", "B", "link", "value", "met"],
        [[g["goal"], g["batch"], "unthrottled" if g["link"] is None else f"{g['link'] / 1e9:g} GB/s",
          format_bytes(g["value"]) if "memory" in g["goal"] else f"{g['value']:.2f}", "met" if g["met"] else "NOT met"]
         for g in result["goals"]]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
