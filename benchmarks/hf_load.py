"""Loading a multi-shard Hugging Face MoE checkpoint under expert parallelism: ours vs what users do today.

The benchmark writes its own Mixtral-architecture checkpoint (random bf16 weights, per-expert tensors
under the names ``save_pretrained`` writes, several shards plus ``model.safetensors.index.json``; a few GB
by default), then loads it in fresh 2-process Gloo groups. Every peer must end with the same local
tensors on each rank: its half of the experts (EP = 2) and every dense weight.

Peers:

- ``ours``: :class:`~system.models.model.MoETransformer` built on the ``meta`` device (no random init),
  cast to the checkpoint's dtype, ``parallelize_model`` (EP = 2), ``to_empty(device="cpu")``, the rotary
  table recomputed (a non-persistent buffer, not in any checkpoint), then
  :func:`system.checkpoint.model_io.load_model` (each rank ``preadv``s only the byte ranges it holds).
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(dir, dtype=bf16)`` on every rank, then the
  rank's half of the experts sliced out (new parameters) and the rest freed. In transformers v5 this is
  already the low-memory path: the model is built on ``meta`` and ``low_cpu_mem_usage`` is ignored.
- ``transformers_ep``: transformers' own expert parallelism, ``from_pretrained(dir, dtype=bf16,
  distributed_config=DistributedConfig(tp_size=2, ep_size=2, tp_plan={every TP rule: "replicate"}))``:
  experts as ``DTensor(Shard(0))``, dense weights replicated.
- ``accelerate``: ``init_empty_weights`` + ``load_checkpoint_and_dispatch(model, dir,
  device_map={"": "cpu"})`` (its documented way), then the slice. The model is a module tree with the
  checkpoint's own names (transformers 4.x's Mixtral layout, per-expert ``nn.Linear``s): transformers v5's
  ``MixtralForCausalLM`` fuses the experts (``mlp.experts.gate_up_proj``) and renames the block
  (``block_sparse_moe`` -> ``mlp``), so accelerate, which matches names, leaves its experts and routers on
  ``meta`` (the benchmark counts them; the JSON records the count).

Measured per rank, for each run (a fresh process group; peers rotated every repeat; warm page cache:
every shard is read once right before each run):

- wall time of the load step: from building the model to the rank's tensors in place (sliced), imports
  and process-group start-up excluded; then, timed apart, a first touch of every page of every local
  tensor (a peer may leave its tensors as unread views of the checkpoint ``mmap``);
- tensor bytes read: ours ``load_model``'s return; the others the bytes of the tensors safetensors
  hands out (``get_tensor(s)`` / slices of ``get_slice``, counted by wrapping ``safe_open``: they read
  through ``mmap``, which ``/proc/self/io`` does not see), or for a peer whose tensors are all views of
  the mapping, the resident size of its mappings of the checkpoint after the first touch; ``rchar`` from
  ``/proc/self/io`` for all (every ``read``/``preadv``: for ours it checks ``load_model``'s count, plus
  headers and JSON);
- read amplification = tensor bytes read / bytes of the tensors the rank holds;
- peak RSS: ``VmHWM`` reset just before the load step, minus the RSS then (the baseline: after imports,
  process-group start and a ``gc``), and the peak of ``RssAnon`` (sampled every 10 ms), since mapped
  checkpoint pages count in ``VmHWM``;
- agreement: a crc32 of every local tensor, compared across every run of every peer, and on the first
  repeat ``torch.equal`` of every tensor against ours loaded in the same process.

Usage (from the repository root)::

    python benchmarks/hf_load.py                         # ~2 GB checkpoint, 4 peers x 3 repeats (a few minutes)
    python benchmarks/hf_load.py --size-gb 0.02 --shard-mb 4 --repeats 1 --tag _smoke
    python benchmarks/hf_load.py --checkpoint /data/mixtral_bench      # written there once, reused later

Writes ``<out>/hf_load_cpu<tag>.json`` (configuration, every sample, summaries, versions, host, command)
and ``<out>/hf_load_cpu<tag>.md`` (the tables).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    format_bytes,
    free_port,
    markdown_table,
    median,
    paired_ratio_summary,
    provenance,
    provenance_markdown,
    setup_logging,
    summarize,
    write_json,
    write_text,
)
from benchmarks.hf_load_peers import DTYPE, PEERS, WORLD, spawned_rank  # noqa: E402

logger = logging.getLogger("benchmarks.hf_load")

RSS_SLACK = 0.10  # goal: ours' peak RSS <= baseline + (1 + slack) x (held bytes + largest tensor)


# --------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=2.0,
                   help="checkpoint size to aim for, GB (1e9 bytes); sets the number of layers (2.0)")
    p.add_argument("--shard-mb", type=float, default=256.0, help="largest shard, MB (256: 8 shards at 2 GB)")
    p.add_argument("--dim", type=int, default=None, help="hidden size (1024, or 256 below 0.5 GB)")
    p.add_argument("--ffn", type=int, default=None, help="expert hidden size (3.5 x dim, as Mixtral)")
    p.add_argument("--experts", type=int, default=8, help="experts per layer (8)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (32000, or 4096 below 0.5 GB)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma list from {','.join(PEERS)}")
    p.add_argument("--repeats", type=int, default=3, help="runs per peer, order rotated every repeat (3)")
    p.add_argument("--verify", choices=("first", "all", "none"), default="first",
                   help="repeats whose peers compare every tensor with torch.equal against ours loaded in the "
                   "same process (crc32 fingerprints are compared on every run regardless)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank (1: 2 ranks, 2 cores)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint folder: reused when it holds one, else written there; never deleted")
    p.add_argument("--dir", default=None, help="parent of a checkpoint the benchmark creates (default $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep a checkpoint the benchmark created")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-timeout", type=float, default=600.0, help="seconds one 2-process run may take")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    args.peer_list = [s.strip() for s in args.peers.split(",") if s.strip()]
    errors = []
    if not args.peer_list or set(args.peer_list) - set(PEERS) or len(set(args.peer_list)) != len(args.peer_list):
        errors.append(f"--peers: distinct names from {list(PEERS)}, got {args.peers!r}")
    if "ours" not in args.peer_list:
        errors.append("--peers must include ours (the reference every peer is checked and compared against)")
    if args.experts % WORLD:
        errors.append(f"--experts {args.experts} must divide by the EP degree {WORLD}")
    if args.repeats < 1 or args.size_gb <= 0 or args.shard_mb <= 0:
        errors.append("--repeats, --size-gb and --shard-mb must be positive")
    if importlib.util.find_spec("transformers") is None:  # the checkpoint's config.json is its MixtralConfig
        errors.append("transformers is not installed (pip install 'moe-system[test]')")
    if "accelerate" in args.peer_list and importlib.util.find_spec("accelerate") is None:
        errors.append("accelerate is not installed (pip install 'moe-system[peers]'), or leave it out of --peers")
    if errors:
        raise SystemExit("hf_load benchmark: " + "; ".join(errors))
    return args


# --------------------------------------------------------------------------------------------
# the checkpoint


def model_shape(args: argparse.Namespace) -> dict[str, int]:
    """Mixtral shape whose bf16 size is closest to ``--size-gb`` (layers from the size; at least one)."""
    small = args.size_gb < 0.5  # a d=1024, vocab-32000 model cannot be that small
    dim = args.dim or (256 if small else 1024)
    ffn = args.ffn or int(round(3.5 * dim / 64)) * 64
    heads = max(1, dim // 64)
    kv = max(1, heads // 4)
    vocab = args.vocab or (4096 if small else 32000)
    e, b = args.experts, DTYPE.itemsize
    per_layer = b * (3 * e * dim * ffn + dim * dim * 2 + 2 * kv * (dim // heads) * dim + e * dim + 2 * dim)
    fixed = b * (2 * vocab * dim + dim)
    layers = max(1, round((args.size_gb * 1e9 - fixed) / per_layer))
    return dict(dim=dim, ffn=ffn, heads=heads, kv_heads=kv, vocab=vocab, experts=e, top_k=args.top_k,
                layers=layers)


def shape_from_config(path: Path) -> dict[str, int]:
    """The shape of a Mixtral checkpoint from its ``config.json``.

    Raises:
        SystemExit: the folder's model is not a Mixtral (the peers' slicing knows that layout only).
    """
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") != "mixtral":
        raise SystemExit(f"hf_load: {path} holds a {raw.get('model_type')!r} model; this benchmark loads Mixtral")
    heads = raw["num_attention_heads"]
    return dict(dim=raw["hidden_size"], ffn=raw["intermediate_size"], heads=heads,
                kv_heads=raw.get("num_key_value_heads") or heads, vocab=raw["vocab_size"],
                experts=raw["num_local_experts"], top_k=raw["num_experts_per_tok"], layers=raw["num_hidden_layers"])


def hf_tensors(shape: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor, in model order, named as transformers' ``save_pretrained`` names them."""
    d, f, v, e = shape["dim"], shape["ffn"], shape["vocab"], shape["experts"]
    kvd = shape["kv_heads"] * (d // shape["heads"])
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, d))]
    for i in range(shape["layers"]):
        pre = f"model.layers.{i}."
        out += [(pre + "input_layernorm.weight", (d,)), (pre + "self_attn.q_proj.weight", (d, d)),
                (pre + "self_attn.k_proj.weight", (kvd, d)), (pre + "self_attn.v_proj.weight", (kvd, d)),
                (pre + "self_attn.o_proj.weight", (d, d)), (pre + "block_sparse_moe.gate.weight", (e, d))]
        for x in range(e):
            ex = f"{pre}block_sparse_moe.experts.{x}."
            out += [(ex + "w1.weight", (f, d)), (ex + "w2.weight", (d, f)), (ex + "w3.weight", (f, d))]
        out.append((pre + "post_attention_layernorm.weight", (d,)))
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    return out


def _nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPE.itemsize


def write_checkpoint(path: Path, shape: dict[str, int], shard_bytes: int, seed: int) -> dict[str, Any]:
    """Write the checkpoint: ``config.json`` (``transformers.MixtralConfig``), shards, the index.

    One tensor is in memory at a time (generated, written, freed); shards are filled greedily in model
    order up to ``shard_bytes`` (a larger tensor gets a shard of its own) and fsynced, so no writeback
    runs during the measurements.
    """
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    cfg = transformers.MixtralConfig(
        vocab_size=shape["vocab"], hidden_size=shape["dim"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], num_local_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"], max_position_embeddings=4096, tie_word_embeddings=False,
    )
    cfg.dtype = "bfloat16"
    cfg.architectures = ["MixtralForCausalLM"]
    cfg.to_json_file(str(path / "config.json"))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    for name, shp in hf_tensors(shape):
        if shards[-1] and sum(_nbytes(s) for _, s in shards[-1]) + _nbytes(shp) > shard_bytes:
            shards.append([])
        shards[-1].append((name, shp))
    n = len(shards)
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shp in tensors:
            header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [off, off + _nbytes(shp)]}
            off += _nbytes(shp)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
        with open(path / fname, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for name, shp in tensors:
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                if len(shp) == 1:  # norms: around 1, not all ones (a wrong mapping must show)
                    t = (1.0 + 0.1 * torch.randn(shp, generator=g)).to(DTYPE)
                else:
                    t = torch.randn(shp, generator=g).mul_(0.02).to(DTYPE)
                fh.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
                weight_map[name] = fname
                del t
            fh.flush()
            os.fsync(fh.fileno())
        total += off
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    logger.info("wrote %s: %d shards, %s of tensors in %.1f s", path, n, format_bytes(total), time.perf_counter() - t0)
    return describe_checkpoint(path)


def describe_checkpoint(path: Path) -> dict[str, Any]:
    """Shards, sizes, header bytes and tensor shapes of the checkpoint at ``path`` (read from its headers)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    tensors: dict[str, dict[str, Any]] = {}
    header_bytes = 0
    for s in shards:
        with open(path / s, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(hlen))
        header_bytes += 8 + hlen
        for name, info in header.items():
            if name != "__metadata__":
                tensors[name] = {"shape": info["shape"], "nbytes": info["data_offsets"][1] - info["data_offsets"][0],
                                 "shard": s}
    sizes = [os.path.getsize(path / s) for s in shards]
    json_bytes = sum(os.path.getsize(path / f) for f in ("config.json", "model.safetensors.index.json"))
    return {"path": str(path), "shards": len(shards), "shard_bytes": sizes, "file_bytes": sum(sizes),
            "tensor_bytes": sum(t["nbytes"] for t in tensors.values()), "header_bytes": header_bytes,
            "json_bytes": json_bytes, "tensors": len(tensors), "shapes": {k: v["shape"] for k, v in tensors.items()},
            "nbytes": {k: v["nbytes"] for k, v in tensors.items()}}


def warm_page_cache(path: Path) -> float:
    """Read every file of the checkpoint once (so every run starts from a warm page cache); returns GB/s."""
    total, t0 = 0, time.perf_counter()
    buf = bytearray(16 << 20)
    for f in sorted(path.iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
    return total / max(time.perf_counter() - t0, 1e-9) / 1e9


def expected_local_names(ckpt: dict[str, Any], experts: int, rank: int) -> set[str]:
    """HF names of the tensors rank ``rank`` holds: every dense tensor, its half of every layer's experts."""
    lo, hi = rank * experts // WORLD, (rank + 1) * experts // WORLD
    keep = set()
    for name in ckpt["shapes"]:
        if ".experts." in name:
            if lo <= int(name.split(".experts.")[1].split(".")[0]) < hi:
                keep.add(name)
        else:
            keep.add(name)
    return keep


# --------------------------------------------------------------------------------------------
# runs


def run_once(peer: str, path: Path, verify: bool, shape: dict[str, int], args: argparse.Namespace) -> list[dict]:
    """One fresh 2-process group loading with ``peer``; the per-rank samples."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="hf_load_run_") as out_dir:
        port = free_port()
        procs = [ctx.Process(target=spawned_rank, args=(r, port, peer, str(path), verify, shape, args.threads, out_dir))
                 for r in range(WORLD)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.run_timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        samples = []
        for r, p in enumerate(procs):
            f = Path(out_dir) / f"rank{r}.json"
            if not f.exists():
                raise RuntimeError(f"{peer}: rank {r} wrote no result (exit code {p.exitcode}; timeout "
                                   f"{args.run_timeout:.0f} s)")
            data = json.loads(f.read_text())
            if not data["ok"]:
                raise RuntimeError(f"{peer}: rank {r} failed:\n{data['error']}")
            samples.append(data["sample"])
        return samples


# --------------------------------------------------------------------------------------------
# summaries


def check_agreement(runs: list[dict], ckpt: dict[str, Any], experts: int) -> dict[str, Any]:
    """Every run of every peer holds, per rank, the expected tensor names with identical crc32s; raises otherwise."""
    ref: dict[int, dict[str, int]] = {}
    for run in runs:
        for s in run["samples"]:
            r = s["rank"]
            want = expected_local_names(ckpt, experts, r)
            if set(s["crc32"]) != want:
                raise SystemExit(f"hf_load: {run['peer']} repeat {run['repeat']} rank {r} holds the wrong tensors: "
                                 f"missing {sorted(want - set(s['crc32']))[:5]}, extra {sorted(set(s['crc32']) - want)[:5]}")
            if r not in ref:
                ref[r] = s["crc32"]
            bad = [n for n in want if s["crc32"][n] != ref[r][n]]
            if bad:
                raise SystemExit(f"hf_load: {run['peer']} repeat {run['repeat']} rank {r}: {len(bad)} tensors differ "
                                 f"from the first run's (crc32), e.g. {bad[:5]}")
    return {"runs_compared": len(runs), "tensors_per_rank": {str(r): len(v) for r, v in ref.items()}, "ok": True}


def summarize_peer(runs: list[dict], ckpt: dict[str, Any]) -> dict[str, Any]:
    """Medians over the repeats of one peer (wall: the slowest rank of each run; the rest per rank)."""
    per_rank: dict[str, dict[str, Any]] = {}
    for r in range(WORLD):
        ss = [s for run in runs for s in run["samples"] if s["rank"] == r]
        held = ss[0]["held_bytes"]
        per_rank[str(r)] = {
            "wall_s": summarize([s["wall_s"] for s in ss]),
            "touch_s": summarize([s["touch_s"] for s in ss]),
            "held_bytes": held,
            "largest_tensor_bytes": ss[0]["largest_tensor_bytes"],
            "held_tensors": ss[0]["held_tensors"],
            "bytes_read": median(s["bytes_read"] for s in ss),
            "bytes_handed_out": median(s["bytes_handed_out"] for s in ss),
            "mapped_checkpoint_rss_bytes": median(s["mapped_checkpoint_rss_bytes"] for s in ss),
            "read_amplification": median(s["bytes_read"] / held for s in ss),
            "rchar": median(s["rchar"] for s in ss),
            "rchar_minus_bytes_read": median(s["rchar"] - s["bytes_read"] for s in ss),
            "read_bytes_device": median(s["read_bytes_device"] for s in ss),
            "baseline_rss_bytes": median(s["baseline_rss_bytes"] for s in ss),
            "peak_rss_over_baseline_bytes": summarize([s["peak_rss_over_baseline_bytes"] for s in ss]),
            "peak_anon_bytes": median(s["peak_anon_bytes"] for s in ss),
            "peak_anon_over_baseline_bytes": median(s["peak_anon_bytes"] - s["baseline_anon_bytes"] for s in ss),
            "rss_bound_over_baseline_bytes": (1 + RSS_SLACK) * (held + ss[0]["largest_tensor_bytes"]),
        }
    ss = [s for run in runs for s in run["samples"]]
    split = {k: median(s[k] for s in ss) for k in ("load_model_s", "preadv_s") if all(k in s for s in ss)}
    return {
        **split,
        "wall_s_slowest_rank": summarize([max(s["wall_s"] for s in run["samples"]) for run in runs]),
        "wall_resident_s_slowest_rank": summarize([max(s["wall_resident_s"] for s in run["samples"]) for run in runs]),
        "per_rank": per_rank,
        "zero_copy": all(s["zero_copy"] for run in runs for s in run["samples"]),
        "views_of_mapping": max(s["tensors_viewing_mapping"] for run in runs for s in run["samples"]),
        "peak_rss_over_baseline_max_rank": median(max(s["peak_rss_over_baseline_bytes"] for s in run["samples"])
                                                  for run in runs),
    }


def non_tensor_allowance(ckpt: dict[str, Any]) -> int:
    """Non-tensor bytes ours may read: every shard's header, read through a buffered file (its first ``read``
    fetches a 4 KiB block), ``config.json`` + the index up to 3 times (the folder check, the config, the
    checkpoint), and 16 KiB of system files the process reads while building the mesh (``/proc/cpuinfo``, the
    CPU lists in ``/sys``), as seen with ``strace``."""
    return ckpt["header_bytes"] + 4096 * ckpt["shards"] + 3 * ckpt["json_bytes"] + (16 << 10)


def evaluate_goals(summary: dict[str, Any], ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    ours = summary["peers"]["ours"]["per_rank"]
    goals = []
    allowance = non_tensor_allowance(ckpt)
    for r, pr in ours.items():
        goals.append({"rank": int(r), "goal": "read amplification 1.0 (tensor bytes read = bytes held)",
                      "value": pr["read_amplification"], "target": 1.0, "met": pr["bytes_read"] == pr["held_bytes"]})
        goals.append({"rank": int(r), "goal": "other bytes read (rchar - tensor bytes) <= headers + one 4 KiB block per "
                      "shard + 3 x the JSON files + 16 KiB",
                      "value": pr["rchar_minus_bytes_read"], "target": allowance,
                      "met": 0 <= pr["rchar_minus_bytes_read"] <= allowance})
        bound = pr["rss_bound_over_baseline_bytes"]
        value = pr["peak_rss_over_baseline_bytes"]["max"]
        goals.append({"rank": int(r), "goal": f"peak RSS over baseline <= {1 + RSS_SLACK:.1f} x (held + largest tensor), "
                      "worst repeat", "value": value, "target": bound, "met": value <= bound})
    return goals


def render_markdown(result: dict[str, Any]) -> str:
    cfg, ck, sh, host = result["config"], result["checkpoint"], result["config"]["shape"], result["provenance"]["host"]
    peers = result["summary"]["peers"]
    lines = [
        "# Loading a Hugging Face MoE checkpoint under EP = 2: ours vs transformers / accelerate",
        "",
        f"Mixtral architecture (d={sh['dim']}, {sh['layers']} layers, {sh['experts']} experts of hidden {sh['ffn']}, "
        f"vocab {sh['vocab']}), bf16, {format_bytes(ck['tensor_bytes'])} of tensors in {ck['shards']} shards "
        f"(largest {format_bytes(max(ck['shard_bytes']))}) + index; 2 processes (Gloo), each must end holding every "
        f"dense tensor and its half of the experts. {cfg['repeats']} repeats, peer order rotated, a fresh process "
        f"group per run; warm page cache (every shard read right before each run). torch {result['versions']['torch']}, "
        f"transformers {result['versions']['transformers']}, accelerate {result['versions']['accelerate']}; "
        f"{host['cpu_model']}, {host['logical_cpus']} CPUs.",
        "",
    ]
    headers = ["peer", "load s", "load + first touch s", "tensor bytes read / rank", "read amplification",
               "rchar / rank", "peak RSS over baseline / rank", "peak RssAnon over baseline / rank"]
    rows = []
    for name, s in peers.items():
        pr = s["per_rank"]
        w, wr = s["wall_s_slowest_rank"], s["wall_resident_s_slowest_rank"]
        per = lambda f: " / ".join(f(pr[r]) for r in sorted(pr))  # noqa: E731
        rows.append([
            name, f"{w['median']:.2f} [{w['min']:.2f}, {w['max']:.2f}]",
            f"{wr['median']:.2f} [{wr['min']:.2f}, {wr['max']:.2f}]",
            per(lambda x: format_bytes(x["bytes_read"])), per(lambda x: f"{x['read_amplification']:.4f}"),
            per(lambda x: format_bytes(x["rchar"])),
            per(lambda x: format_bytes(x["peak_rss_over_baseline_bytes"]["median"])),
            per(lambda x: format_bytes(x["peak_anon_over_baseline_bytes"])),
        ])
    held = peers["ours"]["per_rank"]
    bound = " / ".join(format_bytes(held[r]["rss_bound_over_baseline_bytes"]) for r in sorted(held))
    lines += ["Times: medians [min, max] over the repeats of the slowest rank. Per-rank columns: rank 0 / rank 1, "
              "medians.", "", markdown_table(headers, rows),
              f"Bytes held per rank: {' / '.join(format_bytes(held[r]['held_bytes']) for r in sorted(held))}; ours' "
              f"RSS bound over baseline ({1 + RSS_SLACK:.1f} x (held + largest tensor)): {bound}; process baseline RSS "
              f"(ours): {' / '.join(format_bytes(held[r]['baseline_rss_bytes']) for r in sorted(held))}.",
              ""]
    o = peers["ours"]
    if "load_model_s" in o:
        lines += [f"ours, inside the load (medians over ranks and repeats): `load_model` {o['load_model_s']:.2f} s, of "
                  f"which {o['preadv_s']:.2f} s in `os.preadv` (the reads) and {o['load_model_s'] - o['preadv_s']:.2f} s "
                  "in the rest: bookkeeping and the copy of each expert from the read buffer, transposed from the "
                  "checkpoint's `[f, d]` to our `[d, f]`.", ""]
    headers = ["peer", "load s ours/peer", "load + first touch s ours/peer", "peak RSS over baseline ours/peer",
               "tensor bytes read ours/peer"]
    rows = []
    ci = lambda x: f"{x['median']:.2f} [{x['ci_low']:.2f}, {x['ci_high']:.2f}]"  # noqa: E731
    for name, ra in result["summary"]["ratios"].items():
        rows.append([name, ci(ra["wall_s"]), ci(ra["wall_resident_s"]), ci(ra["peak_rss_over_baseline"]),
                     f"{ra['bytes_read']:.3f}"])
    lines += ["Ratios ours/peer (below 1: ours faster / smaller): medians of the paired per-repeat ratios (repeat r "
              "of ours with repeat r of the peer; times of the slowest rank, memory of the larger rank), "
              "percentile-bootstrap 95% interval (with 3 repeats it spans about the smallest and largest ratio).", "",
              markdown_table(headers, rows)]
    lines += ["## Goals of the issue", ""]
    for g in result["goals"]:
        v, t = g["value"], g["target"]
        if "amplification 1.0" in g["goal"]:
            shown = f"{v:.4f} (target {t})"
        else:
            shown = f"{format_bytes(v)} (target <= {format_bytes(t)})"
        lines.append(f"- ours, rank {g['rank']}: {g['goal']}: {shown} -> **{'met' if g['met'] else 'not met'}**")
    acc = result.get("accelerate_v5_check")
    zero_copy = [p for p, sm in peers.items() if sm["zero_copy"]]
    both = lambda sm, key: " / ".join(format_bytes(sm["per_rank"][r][key]) for r in sorted(sm["per_rank"]))  # noqa: E731
    handed = "; ".join(f"{p} {both(sm, 'bytes_handed_out')} per rank" for p, sm in peers.items() if sm["zero_copy"])
    partial = "; ".join(f"{p} keeps {sm['views_of_mapping']} of its {sm['per_rank']['0']['held_tensors']} local tensors "
                        "as views of the mapping (copies the rest)" for p, sm in peers.items()
                        if not sm["zero_copy"] and sm["views_of_mapping"])
    lines += [
        "",
        "Notes:",
        "",
        "- load: from building the model to the rank's local tensors in place (the full model sliced to its half of "
        "the experts for transformers and accelerate); imports and process-group start excluded. ours: built on "
        "`meta`, `parallelize_model`, `to_empty`, rotary table recomputed, `load_model` (no random init). "
        "first touch: then one byte of every 4 KiB page of every local tensor is read, so tensors a peer left as "
        "views of its checkpoint `mmap` are faulted in (a peer that copied pays only the read).",
        "- tensor bytes read: ours `load_model`'s return (`os.preadv` of the byte ranges it holds); the peers read "
        "through `mmap`, which `/proc/self/io` does not see, so their count is the bytes of the tensors safetensors "
        "hands out (`get_tensor`, `get_tensors`, `get_slice(...)[...]`, counted by wrapping `safe_open`), except for a "
        "peer whose every local tensor is a view of its checkpoint mapping (zero copy: "
        f"{', '.join(zero_copy) or 'none'}): it reads only the pages it touches, so its figure is the resident size "
        "of its mappings of the checkpoint after the first touch (`/proc/self/smaps`: the pages read plus the "
        "kernel's fault-around)" + (f"; safetensors handed out (as views) {handed}" if handed else "") + ". "
        + (f"Partly zero copy: {partial}. " if partial else "") + "rchar: `/proc/self/io` "
        "(every `read`/`preadv`; for ours the tensor bytes plus headers and JSON; the checkpoint's headers are "
        f"{format_bytes(ck['header_bytes'])} and its JSON files {format_bytes(ck['json_bytes'])}).",
        "- peak RSS: `VmHWM` reset (`/proc/self/clear_refs`) just before the load step, read after the first touch, "
        "minus the RSS then (the baseline: after imports, process-group start and `gc`). It includes checkpoint "
        "pages a peer maps and touches (page cache: shared between the ranks, reclaimable), so the peak of "
        "`RssAnon` over its value at the baseline (sampled every 10 ms) is shown too. rchar excludes the sampler's "
        "own reads of `/proc/self/status`.",
        "- agreement: every run's local tensors fingerprinted (crc32 per tensor) and compared across all runs of all "
        "peers, per rank; on the first repeat each peer also compared every tensor with `torch.equal` against ours "
        "loaded in the same process. All agreed (a disagreement aborts the benchmark).",
        "- transformers: v5 builds the model on `meta` and loads into it (`low_cpu_mem_usage` is ignored, this is "
        "the default), 2 loader threads (its `min(4, cpus)`). transformers_ep: `DistributedConfig(tp_size=2, "
        "ep_size=2, tp_plan={every TP rule: 'replicate'})`, its own expert parallelism.",
    ]
    if acc:
        lines.append(
            f"- accelerate: the model is a module tree with the checkpoint's names (transformers 4.x's Mixtral layout). "
            f"transformers v5's `MixtralForCausalLM` has {acc['v5_params_without_checkpoint_tensor']} of its "
            f"{acc['v5_params']} parameters under names the checkpoint does not hold (fused experts, `mlp` for "
            f"`block_sparse_moe`); `load_checkpoint_and_dispatch` matches names only, so with that model they stay on "
            f"`meta` (it warns about unused checkpoint tensors, then fails moving a meta tensor).")
    lines += [
        f"- Load average (1, 5, 15 min) at the end: {', '.join(f'{v:.1f}' for v in result['loadavg_1_5_15_at_end'])} "
        f"on {host['logical_cpus']} CPUs (shared VM: see min/max and every sample in the JSON).",
        provenance_markdown(result["provenance"]),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging(None, logging.getLevelName(args.log_level.upper()))
    shape = model_shape(args)
    created = None
    if args.checkpoint and (Path(args.checkpoint) / "model.safetensors.index.json").is_file():
        path = Path(args.checkpoint)
        logger.info("reusing the checkpoint at %s", path)
        shape = shape_from_config(path)
    else:
        if args.checkpoint:
            path = Path(args.checkpoint)
        else:
            if args.dir:
                os.makedirs(args.dir, exist_ok=True)
            created = path = Path(tempfile.mkdtemp(prefix="hf_load_ckpt_", dir=args.dir))
        write_checkpoint(path, shape, int(args.shard_mb * 1e6), args.seed)
    try:
        ckpt = describe_checkpoint(path)
        if ckpt["shards"] < 2:
            logger.warning("the checkpoint has a single shard: lower --shard-mb for a multi-shard load")
        runs: list[dict[str, Any]] = []
        warm = []
        for rep in range(args.repeats):
            k = rep % len(args.peer_list)
            order = args.peer_list[k:] + args.peer_list[:k]
            for peer in order:
                warm.append(warm_page_cache(path))
                verify = args.verify == "all" or (args.verify == "first" and rep == 0)
                t0 = time.perf_counter()
                samples = run_once(peer, path, verify, shape, args)
                logger.info("repeat %d %-15s wall %s s, bytes read %s, peak RSS over baseline %s (%.0f s with start-up)",
                            rep, peer, " / ".join(f"{s['wall_s']:.2f}" for s in samples),
                            " / ".join(format_bytes(s["bytes_read"]) for s in samples),
                            " / ".join(format_bytes(s["peak_rss_over_baseline_bytes"]) for s in samples),
                            time.perf_counter() - t0)
                runs.append({"repeat": rep, "peer": peer, "position": order.index(peer), "samples": samples})
        agreement = check_agreement(runs, ckpt, shape["experts"])
        result = build_result(args, shape, ckpt, runs, agreement, warm)
    finally:
        if created is not None and not args.keep:
            shutil.rmtree(created, ignore_errors=True)
        elif created is not None:
            logger.info("kept the checkpoint at %s", created)
    out_dir = Path(args.out)
    stem = f"hf_load_cpu{args.tag}"
    write_json(out_dir / f"{stem}.json", result)
    md = render_markdown(result)
    write_text(out_dir / f"{stem}.md", md)
    logger.info("wrote %s/%s.json and .md", out_dir, stem)
    print(md)
    return result


def build_result(args, shape, ckpt, runs, agreement, warm) -> dict[str, Any]:
    peers = {p: summarize_peer([r for r in runs if r["peer"] == p], ckpt) for p in args.peer_list}
    ratios = {}
    ours_runs = sorted((r for r in runs if r["peer"] == "ours"), key=lambda r: r["repeat"])
    for p in args.peer_list:
        if p == "ours":
            continue
        pr = sorted((r for r in runs if r["peer"] == p), key=lambda r: r["repeat"])
        slow = lambda rs, key="wall_s": [max(s[key] for s in r["samples"]) for r in rs]  # noqa: E731
        mem = lambda rs: [max(s["peak_rss_over_baseline_bytes"] for s in r["samples"]) for r in rs]  # noqa: E731
        ratios[p] = {
            "wall_s": paired_ratio_summary(slow(ours_runs), slow(pr), seed=args.seed),
            "wall_resident_s": paired_ratio_summary(slow(ours_runs, "wall_resident_s"), slow(pr, "wall_resident_s"),
                                                    seed=args.seed),
            "peak_rss_over_baseline": paired_ratio_summary(mem(ours_runs), mem(pr), seed=args.seed),
            "bytes_read": peers["ours"]["per_rank"]["0"]["bytes_read"] / (peers[p]["per_rank"]["0"]["bytes_read"] or math.nan),
        }
    acc = next((s for r in runs if r["peer"] == "accelerate" for s in r["samples"]), None)
    config = {k: v for k, v in vars(args).items()}
    config["shape"] = shape
    ck = {k: v for k, v in ckpt.items() if k not in ("shapes", "nbytes")}
    for run in runs:  # the fingerprints were compared above; keep the JSON small
        for s in run["samples"]:
            s["crc32_tensors"] = len(s.pop("crc32"))
    summary = {"peers": peers, "ratios": ratios}
    result = {
        "benchmark": "hf_load",
        "description": "loading a multi-shard Hugging Face Mixtral checkpoint under EP=2: system.checkpoint.model_io."
                       "load_model vs transformers (full load + slice, and its own EP) and accelerate",
        "config": config,
        "checkpoint": ck,
        "provenance": provenance(),
        "method": {
            "runs": "every (repeat, peer) is a fresh 2-process Gloo group; peer order rotated every repeat",
            "page_cache": "warm: every file of the checkpoint read right before each run",
            "wall": "from building the model to local tensors in place (slice included); imports, process-group "
                    "start excluded; per run the slowest rank",
            "bytes_read": "ours: load_model's return; peers: tensor bytes handed out by safetensors (safe_open wrapped), "
                          "or, when every local tensor is a view of the checkpoint mmap (zero copy), the RSS of the "
                          "process's mappings of the checkpoint after the first touch (/proc/self/smaps)",
            "first_touch": "after the load, one byte of every 4 KiB page of every local tensor is read (timed apart)",
            "rchar": "/proc/self/io rchar delta over the load step",
            "peak_rss": "VmHWM reset via /proc/self/clear_refs before the load step, minus RSS then (the baseline)",
            "peak_anon": "RssAnon sampled every 10 ms during the load step",
            "agreement": "crc32 of every local tensor compared across all runs per rank; torch.equal vs ours in the "
                         f"same process on {args.verify} repeat(s)",
            "ratios": "median of paired per-repeat ratios ours/peer, percentile bootstrap 95% interval (10000 resamples)",
        },
        "page_cache_warm_read_gbps": warm,
        "agreement": agreement,
        "accelerate_v5_check": ({k: acc[k] for k in ("v5_params", "v5_params_without_checkpoint_tensor")}
                                if acc else None),
        "runs": runs,
        "summary": summary,
        "loadavg_1_5_15_at_end": list(os.getloadavg()),
    }
    result["goals"] = evaluate_goals(summary, ckpt)
    return result


if __name__ == "__main__":
    main()
