"""MoE layer forward+backward throughput: ``system.moe.MoELayer`` against DeepSpeed-MoE (and Megatron-Core).

Every system gets the same problem: E SwiGLU experts ``d -> F -> d``, top-k softmax gating with the k
weights renormalised, the same tokens per rank, expert parallelism over all ranks (EP = processes), the
same dtype. A step is forward + backward of ``sum(out * g) + aux_coef * aux_loss`` with a fixed ``g`` and
an input that requires grad; gradients are set to ``None`` between steps; no optimizer (this times the
layer, not a training step).

Systems, each peer in the configuration matched to ours and in its recommended one:
``ours`` (dropless, :func:`system.parallel.expert_parallel.apply_ep`) and ``ours_cf<X>``
(``moe.capacity_factor = X``, token drops); ``deepspeed`` (``deepspeed.moe.layer.MoE(drop_tokens=False)``,
matched to ``ours``) and ``deepspeed_cf<X>`` (its recommended ``drop_tokens=True``, ``capacity_factor = X``,
``min_capacity = 4``; ``deepspeed_cf1.25`` is matched to ``ours_cf1.25``); ``megatron`` (CUDA only,
Megatron-Core ``MoELayer``, grouped GEMM, ``alltoall`` dispatcher, its own initialisation). DeepSpeed starts
from our weights with ``use_rts=False`` and ``top2_2nd_expert_sampling=False`` (both deviate from its
defaults) so that it routes exactly as ours.

Before timing, the matched pairs must agree (else the run aborts: one line, exit code 3): ``ours`` vs
``deepspeed`` on outputs, input gradients and tokens-per-expert; ``ours_cf<X>`` vs ``deepspeed_cf<X>`` on the
dropped assignments of every rank and, for top-2, on outputs and input gradients of the tokens that kept
both choices (a token that lost one choice differs by design: DeepSpeed renormalises the gate weights over
the surviving choice, ours keeps the routed weight). Every system is warmed up with the same steps, then
timed in repeats whose order is rotated per repeat; a repeat's time is the slowest rank's. Ratios are
medians of paired per-repeat ratios with a bootstrap 95% interval, judged against ``--goal-speedup``,
``--goal-speedup-recommended`` and ``--goal-speedup-megatron`` (``benchmarks/README.md`` has the details).

Usage (from the repository root)::

    python benchmarks/moe_layer.py                      # default CPU run: 2 processes, Gloo, fp32 (~4 min)
    python benchmarks/moe_layer.py --smoke --out /tmp/x # tiny shape, end to end
    python benchmarks/moe_layer.py --device cuda --nproc 8 --peers ours,deepspeed,megatron
    torchrun --standalone --nproc-per-node 2 benchmarks/moe_layer.py

Writes ``<out>/moe_layer_<device><tag>.json`` and ``.md`` (``--profile``: also operator tables per system).
The CUDA path has not been run on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    NumericalDisagreement, Stopwatch, check_agreement, current_rss_bytes, fill_defaults, format_bytes, free_port,
    markdown_table, paired_ratio_summary, peak_rss_bytes, provenance, provenance_markdown, ratio_goal,
    reset_peak_rss, rotated, setup_logging, summarize, write_json, write_text,
)
from benchmarks.moe_layer_peers import BUILDERS, Setup, System, cf_name  # noqa: E402

logger = logging.getLogger("benchmarks.moe_layer")

PEERS = ("ours", "deepspeed", "megatron")
EXIT_DISAGREEMENT = 3

# glibc tunables for ``--malloc tuned``: keep large blocks on the heap and never trim it, so a tensor
# freed in one step is reused in the next instead of being unmapped and page-faulted in again.
MALLOC_TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}

CPU_DEFAULTS = dict(nproc=2, dtype="fp32", dim=512, ffn=1024, experts=8, tokens=4096, repeats=10, iters=3, warmup=2)
CUDA_DEFAULTS = dict(nproc=1, dtype="bf16", dim=4096, ffn=14336, experts=8, tokens=16384, repeats=7, iters=10,
                     warmup=5)
SMOKE_DEFAULTS = dict(nproc=2, dtype="fp32", dim=32, ffn=64, experts=4, tokens=256, repeats=2, iters=1, warmup=1)


# --------------------------------------------------------------------------------------------
# arguments


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; device-dependent defaults are filled in afterwards."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shape, 2 repeats: an end-to-end check, no timing value")
    p.add_argument("--dim", type=int, help="model width d (cpu 512, cuda 4096)")
    p.add_argument("--ffn", type=int, help="expert hidden size F (cpu 1024, cuda 14336)")
    p.add_argument("--experts", type=int, help="experts E (8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (DeepSpeed supports 1 or 2)")
    p.add_argument("--tokens", type=int, help="tokens per rank (cpu 4096, cuda 16384)")
    p.add_argument("--seq-len", type=int, default=1024, help="input is [tokens/seq_len, seq_len, d]")
    p.add_argument("--repeats", type=int, help="timed repeats per system, order rotated per repeat (cpu 10, cuda 7)")
    p.add_argument("--iters", type=int, help="fwd+bwd steps per repeat (cpu 3, cuda 10)")
    p.add_argument("--warmup", type=int, help="untimed steps per system before timing (cpu 2, cuda 5)")
    p.add_argument("--nproc", type=int, help="processes = EP degree (cpu 2, cuda 1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process on CPU (same for all systems)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="cpu fp32, cuda bf16")
    p.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss coefficient")
    p.add_argument("--peers", default="ours,deepspeed", help=f"comma list from {','.join(PEERS)}")
    p.add_argument("--ds-capacity-factors", default="1.0,1.25",
                   help="DeepSpeed's recommended configuration: drop_tokens=True at each of these capacity factors "
                        "(empty: none); timed as deepspeed_cf<X>")
    p.add_argument("--ours-capacity-factors", default="1.25",
                   help="ours with moe.capacity_factor X (token drops), timed as ours_cf<X> (empty: none)")
    p.add_argument("--goal-speedup", type=float, default=1.0,
                   help="goal on ours / DeepSpeed tokens/s in the matched pairs (dropless; same capacity factor)")
    p.add_argument("--goal-speedup-recommended", type=float, default=1.0,
                   help="goal on ours (dropless) / DeepSpeed tokens/s in its recommended drop configurations")
    p.add_argument("--goal-speedup-megatron", type=float, default=1.0, help="goal on ours / Megatron-Core tokens/s")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")
    p.add_argument("--tag", default=None, help="suffix for the result file names (moe_layer_<device><tag>.*)")
    p.add_argument("--profile", action="store_true", help="also write a torch.profiler table per system (rank 0)")
    p.add_argument("--no-pin", action="store_true", help="do not pin CPU ranks to their own cores")
    p.add_argument(
        "--malloc",
        choices=("default", "tuned"),
        default="default",
        help="glibc malloc of the spawned CPU ranks: 'tuned' sets MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ "
        "high so large freed tensors are reused instead of unmapped and page-faulted again (same for all systems)",
    )
    p.add_argument("--peak-tflops", type=float,
                   help="override the per-device peak used for MFU (TFLOP/s); default: system.train.flops.peak_flops "
                        "for the device and dtype")
    p.add_argument("--inject-disagreement", action="store_true",
                   help="testing only: perturb DeepSpeed's copy of one expert so the agreement check must abort")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    fill_defaults(args, SMOKE_DEFAULTS if args.smoke else CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS)
    if args.tag is None:
        args.tag = "_smoke" if args.smoke else ""
    args.peer_list = [s.strip() for s in args.peers.split(",") if s.strip()]
    args.ds_cfs = _floats(args.ds_capacity_factors)
    args.ours_cfs = _floats(args.ours_capacity_factors)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Raise ``SystemExit`` with a clear message for impossible settings or missing peers."""
    errors = []
    unknown = [s for s in args.peer_list if s not in PEERS]
    if unknown:
        errors.append(f"unknown peer(s) {unknown}; choose from {list(PEERS)}")
    if len(set(args.peer_list)) != len(args.peer_list):
        errors.append(f"duplicate peers in --peers {args.peers!r}")
    if args.experts % args.nproc:
        errors.append(f"--experts {args.experts} must divide by --nproc {args.nproc} (the EP degree)")
    if "deepspeed" in args.peer_list and args.top_k not in (1, 2):
        errors.append("DeepSpeed-MoE supports top-1 and top-2 gating only (--top-k 1|2)")
    if any(cf <= 0 for cf in args.ds_cfs + args.ours_cfs):
        errors.append(f"capacity factors must be > 0, got --ds-capacity-factors {args.ds_capacity_factors!r} "
                      f"--ours-capacity-factors {args.ours_capacity_factors!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda but torch.cuda.is_available() is False")
    if args.device == "cuda" and torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
        errors.append(f"--nproc {args.nproc} > {torch.cuda.device_count()} visible GPUs")
    if "deepspeed" in args.peer_list and not _importable("deepspeed"):
        errors.append("peer 'deepspeed' needs DeepSpeed: pip install 'moe-system[peers]' (or drop it from --peers)")
    if "megatron" in args.peer_list:
        if args.device != "cuda":
            errors.append("peer 'megatron' runs on CUDA only (Megatron-Core has no CPU path); use --device cuda")
        elif not _importable("megatron.core"):
            errors.append(
                "peer 'megatron' needs Megatron-Core, which is not installed: "
                "pip install 'moe-system[cuda]' (megatron-core; Transformer Engine recommended for grouped GEMM)"
            )
    if args.repeats < 1 or args.iters < 1 or args.warmup < 0 or args.tokens < 1:
        errors.append("--repeats and --iters must be >= 1, --warmup >= 0, --tokens >= 1")
    if errors:
        raise SystemExit("moe_layer benchmark: " + "; ".join(errors))


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def plan_systems(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    """``(name, peer, capacity_factor)`` of every timed system; capacity 0 means dropless."""
    plan = []
    if "ours" in args.peer_list:
        plan += [("ours", "ours", 0.0)] + [(cf_name("ours", cf), "ours", cf) for cf in args.ours_cfs]
    if "deepspeed" in args.peer_list:
        plan += [("deepspeed", "deepspeed", 0.0)] + [(cf_name("deepspeed", cf), "deepspeed", cf) for cf in args.ds_cfs]
    if "megatron" in args.peer_list:
        plan.append(("megatron", "megatron", 0.0))
    return plan


def plan_goals(args: argparse.Namespace, names: list[str]) -> list[tuple[str, str, float, str]]:
    """``(ours system, peer system, goal, what)`` for every ratio of record among the timed ``names``."""
    pairs = [("ours", "deepspeed", args.goal_speedup, "matched: both dropless")]
    pairs += [(cf_name("ours", cf), cf_name("deepspeed", cf), args.goal_speedup,
               f"matched: both capacity factor {cf:g}, tokens dropped") for cf in args.ours_cfs]
    pairs += [("ours", cf_name("deepspeed", cf), args.goal_speedup_recommended,
               f"ours dropless vs DeepSpeed recommended (drop_tokens, capacity factor {cf:g})") for cf in args.ds_cfs]
    pairs.append(("ours", "megatron", args.goal_speedup_megatron, "ours vs Megatron-Core (own init)"))
    return [p for p in pairs if p[0] in names and p[1] in names]


# --------------------------------------------------------------------------------------------
# measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _zero_grads(system: System, x: torch.Tensor) -> None:
    system.module.zero_grad(set_to_none=True)
    x.grad = None


def fwd_bwd(system: System, x: torch.Tensor, g: torch.Tensor, aux_coef: float) -> torch.Tensor:
    """One forward+backward of ``sum(out * g) + aux_coef * aux``; returns the (detached) loss."""
    _zero_grads(system, x)
    out, aux = system.forward(x)
    loss = (out * g).sum()
    if aux is not None:
        loss = loss + aux_coef * aux
    loss.backward()
    return loss.detach()


def agree(s: Setup, what: str, values: dict[str, Any], *, rtol: float, atol: float) -> dict[str, float]:
    """:func:`check_agreement` on every rank; all ranks abort together when any rank disagrees.

    Returns:
        system -> the largest absolute difference from the first system over all ranks.

    Raises:
        NumericalDisagreement: on every rank; the message is the lowest failing rank's (empty elsewhere,
            so that the run prints one line).
    """
    message = ""
    try:
        diffs = check_agreement(what, values, rtol=rtol, atol=atol)
    except NumericalDisagreement as e:
        message, diffs = f"{e} (rank {s.rank})", {name: math.inf for name in values}
    worst_rank = torch.tensor([s.rank if message else s.world], dtype=torch.int64, device=s.device)
    dist.all_reduce(worst_rank, op=dist.ReduceOp.MIN)
    if int(worst_rank) < s.world:
        raise NumericalDisagreement(message if int(worst_rank) == s.rank else "")
    worst = torch.tensor([diffs[n] for n in values], dtype=torch.float64, device=s.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return dict(zip(values, worst.tolist()))


def probe(s: Setup, systems: dict[str, System], x: torch.Tensor, g: torch.Tensor) -> dict[str, dict[str, Any]]:
    """One forward+backward of ``sum(out * g)`` per system on the timing input: outputs, input gradients,
    and routing facts (drops, rows computed, padding), summed or maxed over ranks where global."""
    a = s.args
    found: dict[str, dict[str, Any]] = {}
    for name, system in systems.items():
        _zero_grads(system, x)
        out, _ = system.forward(x)
        (out * g).sum().backward()
        found[name] = {"out": out.detach().float().clone(), "dx": x.grad.detach().float().clone()}
        _zero_grads(system, x)
        if system.routing is None:
            continue
        r = system.routing()
        totals = torch.tensor([r["dropped"], r["assignments"]], dtype=torch.float64, device=s.device)
        dist.all_reduce(totals)
        rows = torch.tensor([r["rows"]], dtype=torch.float64, device=s.device)
        dist.all_reduce(rows, op=dist.ReduceOp.MAX)
        found[name].update(r)
        found[name]["routing"] = {
            "dropped_global": int(totals[0]), "assignments_global": int(totals[1]),
            "drop_rate": float(totals[0] / totals[1]),
            # rows the busiest rank's experts computed over its T * k useful routed rows (DeepSpeed: padded E * C)
            "rows_factor_busiest_rank": float(rows) / (a.tokens * a.top_k),
            **({"capacity": r["capacity"]} if "capacity" in r else {}),
        }
        if "tokens_per_expert_local" in r:  # DeepSpeed counts per rank; ours are global already
            tpe = r["tokens_per_expert_local"].clone()
            dist.all_reduce(tpe)
            found[name]["tokens_per_expert"] = tpe
    return found


def check_systems(s: Setup, systems: dict[str, System], x: torch.Tensor, g: torch.Tensor) -> dict[str, Any]:
    """Probe every system, then abort on a disagreement within the matched pairs (see the module docstring).

    Tolerance: ``|a - b| <= tol * (max|b| + |b|)`` elementwise with ``tol`` 1e-4 in fp32, 5e-2 in bf16
    (the two compute the same sums in a different order); tokens-per-expert and drop counts exactly.
    """
    a = s.args
    found = probe(s, systems, x, g)
    tol = 1e-4 if s.dtype == torch.float32 else 5e-2
    report: dict[str, Any] = {"tolerance": {"rtol": tol, "atol": f"{tol:g} * max|reference|", "counts": "exact"},
                              "routing": {n: f["routing"] for n, f in found.items() if "routing" in f}}
    pairs = [("ours", "deepspeed")] + [(cf_name("ours", cf), cf_name("deepspeed", cf)) for cf in a.ours_cfs]
    for ours, ds in pairs:
        if ours not in found or ds not in found:
            continue
        fo, fd = found[ours], found[ds]
        entry: dict[str, Any] = {}
        if systems[ours].capacity_factor == 0:
            rows = torch.ones(fo["out"].numel() // a.dim, dtype=torch.bool, device=s.device)
            counts = {ours: fo["tokens_per_expert"], ds: fd["tokens_per_expert"]}
            entry["tokens_per_expert_max_abs_diff"] = agree(s, f"tokens per expert, {ours} vs {ds}", counts,
                                                            rtol=0.0, atol=0.0)[ds]
            entry["tokens_per_expert_global"] = [int(v) for v in fo["tokens_per_expert"].tolist()]
        else:
            dropped = {ours: float(fo["dropped"]), ds: float(fd["dropped"])}
            entry["dropped_assignments_max_abs_diff"] = agree(s, f"dropped assignments on this rank, {ours} vs {ds}",
                                                              dropped, rtol=0.0, atol=0.0)[ds]
            if a.top_k != 2:  # DeepSpeed's top-1 picks an expert's survivors by torch.topk over a 0/1 mask
                report[f"{ours}_vs_{ds}"] = entry
                continue
            rows = fd["kept_whole"].to(s.device)  # tokens that kept every choice (in DeepSpeed)
            entry["tokens_compared_rank0"] = f"{int(rows.sum())} of {rows.numel()} (those that kept every choice)"
        for key, label in (("out", "output"), ("dx", "input gradient")):
            ref, val = fd[key].view(-1, a.dim)[rows], fo[key].view(-1, a.dim)[rows]
            scale = float(ref.abs().max()) if ref.numel() else 0.0
            entry[f"{key}_max_abs_diff"] = agree(s, f"{label}, {ours} vs {ds}", {ds: ref, ours: val},
                                                 rtol=tol, atol=tol * scale)[ours]
        report[f"{ours}_vs_{ds}"] = entry
    logger.info("agreement: %s", {k: v for k, v in report.items() if k != "routing"})
    return report


def moe_flops(tokens: int, dim: int, ffn: int, experts: int, top_k: float) -> float:
    """Useful FLOPs of one forward+backward for ``tokens`` tokens (backward = 2x forward).

    Forward: ``2 * tokens * top_k * 3 * dim * ffn`` (three SwiGLU matmuls per routed copy) plus the
    router ``2 * tokens * dim * experts``. Padding rows are not useful work and are not counted; with
    token drops ``top_k`` is the mean number of kept choices per token.
    """
    forward = 2.0 * tokens * top_k * 3 * dim * ffn + 2.0 * tokens * dim * experts
    return 3.0 * forward


def peak_per_device(s: Setup) -> tuple[float | None, str]:
    """Peak FLOP/s of one device for this run's dtype (``--peak-tflops`` wins) and its source."""
    from system.train.flops import peak_flops

    if s.args.peak_tflops:
        return s.args.peak_tflops * 1e12, "--peak-tflops"
    found = peak_flops(s.device, s.dtype)
    if found is None:
        return None, "no peak known for this device (CPU, or a GPU not in system.train.flops.PEAKS): no MFU"
    return found


def profile_system(s: Setup, system: System, x: torch.Tensor, g: torch.Tensor, out_dir: Path) -> list[dict[str, Any]]:
    """Profile a few steps with torch.profiler; rank 0 writes the operator table (by self time).

    Returns (rank 0; other ranks an empty list) the top operators by self time as
    ``{"op", "self_ms_per_step", "calls_per_step", "share"}`` (CPU time on CPU, device time on CUDA).
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = s.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = 3
    dist.barrier()
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            fwd_bwd(system, x, g, s.args.aux_coef)
        _sync(s.device)
    _zero_grads(system, x)
    dist.barrier()
    if s.rank != 0:
        return []
    averages = prof.key_averages()
    table = averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=30,
                           max_name_column_width=60)
    path = out_dir / f"moe_layer_{s.args.device}{s.args.tag}_profile_{system.name}.txt"
    write_text(path, f"# {system.name}: torch.profiler over {steps} fwd+bwd steps on rank 0 (totals)\n" + table)

    def self_us(evt: Any) -> float:
        if cuda:
            return float(getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0)))
        return float(evt.self_cpu_time_total)

    total = sum(self_us(e) for e in averages) or 1.0
    return [{"op": e.key, "self_ms_per_step": self_us(e) / 1e3 / steps, "calls_per_step": e.count / steps,
             "share": self_us(e) / total} for e in sorted(averages, key=self_us, reverse=True)[:12]]


def time_systems(s: Setup, timed: list[System], x: torch.Tensor, g: torch.Tensor) -> dict[str, Any]:
    """Warm up every system, then ``--repeats`` repeats in rotated order; each repeat's time is the slowest rank's."""
    a = s.args
    for system in timed:  # warm-up (allocator, kernel selection, lazy init): the same steps for every system
        for _ in range(a.warmup):
            fwd_bwd(system, x, g, a.aux_coef)
        _zero_grads(system, x)
        _sync(s.device)
    logger.info("warm-up done (%d steps per system); timing %d repeats x %d steps", a.warmup, a.repeats, a.iters)
    sync = (lambda: torch.cuda.synchronize(s.device)) if s.device.type == "cuda" else None
    names = [t.name for t in timed]
    by_name = {t.name: t for t in timed}
    samples: dict[str, list[float]] = {n: [] for n in names}
    rss_peak, rss_before, gpu_peak = ({n: 0 for n in names} for _ in range(3))
    orders, rss_reset_ok = [], True
    for r in range(a.repeats):
        order = rotated(names, r)
        orders.append(order)
        for name in order:
            system = by_name[name]
            gc.collect()
            rss_reset_ok &= reset_peak_rss()
            rss_before[name] = max(rss_before[name], current_rss_bytes() or 0)
            if s.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(s.device)
            _sync(s.device)
            dist.barrier()
            with Stopwatch(sync) as watch:  # synchronises the device at both ends
                for _ in range(a.iters):
                    fwd_bwd(system, x, g, a.aux_coef)
                _sync(s.device)
                dist.barrier()
            elapsed = torch.tensor([watch.seconds], dtype=torch.float64, device=s.device)
            if s.device.type == "cuda":
                gpu_peak[name] = max(gpu_peak[name], torch.cuda.max_memory_allocated(s.device))
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
            rss_peak[name] = max(rss_peak[name], peak_rss_bytes())
            _zero_grads(system, x)
            samples[name].append(float(elapsed.item()))
            logger.info("repeat %d/%d %-17s %8.1f ms/step  %10.0f tokens/s", r + 1, a.repeats, name,
                        1e3 * samples[name][-1] / a.iters, a.tokens * s.world * a.iters / samples[name][-1])
    return {"samples": samples, "orders": orders, "rss_peak": rss_peak, "rss_before": rss_before,
            "gpu_peak": gpu_peak, "rss_reset_ok": rss_reset_ok}


def _run(s: Setup) -> None:
    from system.distributed import ParallelDims

    a = s.args
    s.mesh = ParallelDims.from_config(dp=1, ep=s.world, world_size=s.world).build_mesh(s.device.type)
    global_weights: dict[str, torch.Tensor] = {}
    systems: dict[str, System] = {}
    # "ours" (dropless) is built first even when not timed: it defines the weights the others copy.
    plan = plan_systems(a)
    for name, peer, cf in [("ours", "ours", 0.0)] + [p for p in plan if p[0] != "ours"]:
        systems[name] = BUILDERS[peer](s, name, cf, global_weights)
        logger.info("built %s: %s", name, systems[name].info["configuration"])

    seq = a.seq_len if a.tokens % a.seq_len == 0 else a.tokens
    gen = torch.Generator().manual_seed(a.seed + 1 + s.rank)  # different tokens on every rank
    x = torch.randn(a.tokens // seq, seq, a.dim, generator=gen).to(device=s.device, dtype=s.dtype).requires_grad_(True)
    g = (torch.randn(a.tokens // seq, seq, a.dim, generator=gen) / math.sqrt(a.tokens * a.dim)).to(s.device, s.dtype)

    load_at_start = list(os.getloadavg())
    agreement = check_systems(s, systems, x, g)
    timed = [systems[name] for name, _, _ in plan]
    timing = time_systems(s, timed, x, g)
    profiles = {t.name: profile_system(s, t, x, g, Path(a.out)) for t in timed} if a.profile else {}
    per_rank = {"rank": s.rank, "pinned_cpus": getattr(a, "pinned_cpus", None),
                **{k: timing[k] for k in ("rss_peak", "rss_before", "gpu_peak")},
                "info": {t.name: t.info for t in timed}}
    gathered: list[Any] = [None] * s.world
    dist.all_gather_object(gathered, per_rank)
    if s.rank == 0:
        write_results(s, timed, timing, gathered, agreement, profiles, load_at_start)


# --------------------------------------------------------------------------------------------
# results


def summarize_systems(s: Setup, timed: list[System], timing: dict[str, Any], ranks: list[dict[str, Any]],
                      agreement: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per system: tokens/s and step-time summaries, useful TFLOP/s, MFU, memory, drop rate."""
    a = s.args
    global_tokens = a.tokens * s.world
    peak, _ = peak_per_device(s)
    from system.train.flops import mfu

    out: dict[str, dict[str, Any]] = {}
    for t in timed:
        secs = timing["samples"][t.name]
        routing = agreement["routing"].get(t.name, {})
        drop = routing.get("drop_rate", 0.0)
        step_ms = [1e3 * v / a.iters for v in secs]
        achieved = moe_flops(global_tokens, a.dim, a.ffn, a.experts, a.top_k * (1 - drop)) / (
            summarize(step_ms)["median"] / 1e3)
        out[t.name] = {
            "peer": t.peer,
            "capacity_factor": t.capacity_factor,
            "tokens_per_s": summarize([global_tokens * a.iters / v for v in secs]),
            "step_ms": summarize(step_ms),
            "drop_rate": drop,
            "rows_factor_busiest_rank": routing.get("rows_factor_busiest_rank"),
            "achieved_tflops_total": achieved / 1e12,
            "mfu": mfu(achieved, peak, s.world) if peak else None,
            "peak_rss_bytes_per_rank": [r["rss_peak"][t.name] for r in ranks],
            "rss_before_bytes_per_rank": [r["rss_before"][t.name] for r in ranks],
            "peak_gpu_bytes_per_rank": [r["gpu_peak"][t.name] for r in ranks] if s.device.type == "cuda" else None,
        }
    return out


def write_results(s: Setup, timed: list[System], timing: dict[str, Any], ranks: list[dict[str, Any]],
                  agreement: dict[str, Any], profiles: dict[str, list[dict[str, Any]]],
                  load_at_start: list[float]) -> None:
    """Summarise the samples, judge the goals, write ``moe_layer_<device><tag>.json`` and ``.md``."""
    a = s.args
    global_tokens = a.tokens * s.world
    samples = timing["samples"]
    tps = {n: [global_tokens * a.iters / v for v in secs] for n, secs in samples.items()}
    summary = summarize_systems(s, timed, timing, ranks, agreement)
    goals = []
    for ours, peer, goal, what in plan_goals(a, list(samples)):
        r = ratio_goal(f"{ours} / {peer} tokens/s", tps[ours], tps[peer], goal)
        r.update(ours=ours, peer=peer, what=what)
        goals.append(r)
    if "deepspeed" in samples:  # every system against DeepSpeed dropless, paired per repeat (no goal)
        for name in samples:
            if name != "deepspeed":
                summary[name]["paired_ratio_vs_deepspeed"] = paired_ratio_summary(tps[name], tps["deepspeed"])
    peak, peak_source = peak_per_device(s)
    config = {k: v for k, v in vars(a).items() if k not in ("peer_list", "pinned_cpus", "ds_cfs", "ours_cfs")}
    config.update(world_size=s.world, ep=s.world, global_tokens=global_tokens, dtype_torch=str(s.dtype),
                  flops_per_step_dropless=moe_flops(global_tokens, a.dim, a.ffn, a.experts, a.top_k),
                  peak_flops_per_device=peak, peak_source=peak_source,
                  device_name=torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else None,
                  malloc_env={k: os.environ.get(k) for k in MALLOC_TUNED_ENV})
    result = {
        "benchmark": "moe_layer",
        "description": "MoE layer forward+backward throughput, expert parallel over all ranks",
        "provenance": provenance(["megatron-core", "transformer-engine"]),
        "config": config,
        "load_average_1_5_15": {"start": load_at_start, "end": list(os.getloadavg())},
        "method": {
            "timing": "warm-up of --warmup steps per system, then --repeats repeats with the order of systems "
                      "rotated per repeat; a repeat times --iters fwd+bwd steps between barriers and its time is "
                      "the slowest rank's (all_reduce MAX)",
            "tokens_per_s": "global tokens * iters / repeat time",
            "ratios": "median of paired per-repeat ratios with a bootstrap 95% interval (benchmarks.common.ratio_goal)",
            "loss": "sum(out * g) + aux_coef * aux_loss, fixed g, input requires grad; grads set to None each step",
            "peak_rss": "VmHWM reset before each repeat of a system; max over its repeats; includes the process "
                        "baseline (interpreter, libraries, every system's weights)"
                        + ("" if timing["rss_reset_ok"] else " [reset unavailable: peak since process start]"),
            "flops": "3 * (2*T*k_kept*3*d*F + 2*T*d*E) per step: useful work, padding and dropped copies excluded",
        },
        "systems": {t.name: {"peer": t.peer, "capacity_factor": t.capacity_factor, **ranks[0]["info"][t.name]}
                    for t in timed},
        "agreement": agreement,
        "ranks": [{"rank": r["rank"], "pinned_cpus": r["pinned_cpus"]} for r in ranks],
        "profile_top_ops_rank0": profiles,
        "order_per_repeat": timing["orders"],
        "samples_s_per_repeat": samples,
        "summary": summary,
        "goals": goals,
    }
    stem = f"moe_layer_{a.device}{a.tag}"
    md = render_markdown(s, result)
    json_path = write_json(Path(a.out) / f"{stem}.json", result)
    md_path = write_text(Path(a.out) / f"{stem}.md", md)
    print(md)
    logger.info("wrote %s and %s", json_path, md_path)


def render_markdown(s: Setup, result: dict[str, Any]) -> str:
    """The markdown report: setup, provenance, the systems table, the goals table, agreement and notes."""
    a = s.args
    summ, cfg = result["summary"], result["config"]
    cuda = s.device.type == "cuda"
    headers = ["system", "configuration", "tokens/s (median)", "step ms (median) [p25, p75]", "drop rate",
               "rows computed / T*k (busiest rank)", "peak RSS / rank"]
    headers += ["peak GPU mem / rank", "TFLOP/s per GPU (useful)", "MFU"] if cuda else ["GFLOP/s (useful)"]
    rows = []
    for name, sm in summ.items():
        rf = sm["rows_factor_busiest_rank"]
        row = [name, result["systems"][name]["label"], f"{sm['tokens_per_s']['median']:,.0f}",
               f"{sm['step_ms']['median']:.1f} [{sm['step_ms']['p25']:.1f}, {sm['step_ms']['p75']:.1f}]",
               f"{100 * sm['drop_rate']:.2f}%", f"{rf:.3f}" if rf is not None else "n/a",
               format_bytes(max(sm["peak_rss_bytes_per_rank"]))]
        if cuda:
            row += [format_bytes(max(sm["peak_gpu_bytes_per_rank"])), f"{sm['achieved_tflops_total'] / s.world:.1f}",
                    f"{100 * sm['mfu']:.1f}%" if sm["mfu"] is not None else "n/a"]
        else:
            row += [f"{1e3 * sm['achieved_tflops_total']:.1f}"]
        rows.append(row)
    goal_rows = [[g["name"], g["what"], f"{g['direction']} {g['goal']:g}", f"{g['median']:.3f}",
                  f"[{g['ci_low']:.3f}, {g['ci_high']:.3f}]", g["verdict"]] for g in result["goals"]]
    lines = [
        f"# MoE layer fwd+bwd: {', '.join(summ)} ({a.device}{a.tag})",
        "",
        provenance_markdown(result["provenance"]),
        f"E={a.experts}, top-{a.top_k}, d={a.dim}, F={a.ffn} (SwiGLU), {a.tokens} tokens/rank x {s.world} ranks, "
        f"EP={s.world}, {a.dtype}; {a.repeats} repeats x {a.iters} steps (+{a.warmup} warm-up steps per system), "
        f"order of systems rotated per repeat, time of the slowest rank. {'NCCL' if cuda else 'Gloo'}, "
        f"{'1 GPU' if cuda else f'{a.threads} thread(s)'} per rank{'' if cuda else f', glibc malloc {a.malloc}'}. "
        f"MFU peak: {cfg['peak_source']}.",
        "",
        markdown_table(headers, rows),
        "## Goals",
        "",
        "Each ratio is the median of per-repeat ratios (systems timed in the same repeat) with a bootstrap 95% "
        "interval; 'met' only when the whole interval clears the goal.",
        "",
        markdown_table(["ratio", "pair", "goal", "median", "95% interval", "verdict"], goal_rows),
    ]
    lines += [f"- {g['name']}: {g['note']}" for g in result["goals"] if g["note"]]
    lines += ["", "## Agreement (checked before timing; a disagreement aborts the run)", ""]
    ag = result["agreement"]
    for key, entry in ag.items():
        if key in ("tolerance", "routing"):
            continue
        facts = ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k}: {v}" for k, v in entry.items()
                          if k != "tokens_per_expert_global")
        lines.append(f"- {key.replace('_vs_', ' vs ')}: {facts} (tolerance rtol {ag['tolerance']['rtol']:g}, "
                     f"atol {ag['tolerance']['atol']}; counts exact).")
    for name, r in ag["routing"].items():
        if "capacity" in r:
            lines.append(f"- {name}: capacity C = {r['capacity']} rows per expert and rank (a mean load is "
                         f"{a.tokens * a.top_k / a.experts:g}); its experts compute E*C = "
                         f"{r['rows_factor_busiest_rank']:.3f}x the T*k routed rows; "
                         f"drop rate {100 * r['drop_rate']:.2f}%.")
    for name, ops in result.get("profile_top_ops_rank0", {}).items():
        if ops:
            top = ", ".join(f"{o['op']} {o['self_ms_per_step']:.0f} ms ({100 * o['share']:.0f}%)" for o in ops[:6])
            lines.append(f"- Profile of {name} (rank 0, self time per step): {top}.")
    lines += [
        "- Drop rate = assignments dropped / assignments made (T*k per rank), on the timing input. ours_cf and "
        "deepspeed_cf use the same drop rule (capacity ceil(cf*T*k/E), DeepSpeed also at least min_capacity; first "
        "choices before second, in token order); they differ in the combine weight of a token that lost one "
        "choice: DeepSpeed renormalises over the surviving choice, ours keeps the routed weight.",
        "- DeepSpeed systems: use_rts=False and top2_2nd_expert_sampling=False (its defaults are True) so that "
        "they route exactly as ours; weights copied from ours.",
        "- Peak RSS is VmHWM while that system ran (reset before each repeat), so it includes the process baseline "
        "(interpreter, libraries, every system's weights).",
        "- Load average (1, 5, 15 min) at the end: "
        f"{', '.join(f'{v:.1f}' for v in result['load_average_1_5_15']['end'])} "
        f"on {result['provenance']['host']['logical_cpus']} CPUs.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# launch


def run_rank(args: argparse.Namespace) -> None:
    """The body of one rank: init, build, check agreement, warm up, time, gather, write (rank 0).

    A :class:`NumericalDisagreement` ends every rank with exit code 3 after the lowest failing rank
    printed its one-line message.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    level = logging.getLevelName(args.log_level.upper()) if rank == 0 else logging.WARNING
    setup_logging(rank if world > 1 else None, level)
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=10), device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
        args.pinned_cpus = _pin_cpu(local_rank, args) if not args.no_pin else None
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    s = Setup(args, rank, world, device, torch.float32 if args.dtype == "fp32" else torch.bfloat16)
    from system.distributed.init import shutdown_distributed

    try:
        _run(s)
    except NumericalDisagreement as e:
        if str(e):
            print(f"moe_layer benchmark: NumericalDisagreement: {e}", file=sys.stderr, flush=True)
        dist.destroy_process_group()  # every rank got here together (the check is collective)
        sys.exit(EXIT_DISAGREEMENT)
    shutdown_distributed()  # success only: after another exception torchrun stops the peers


def _pin_cpu(local_rank: int, args: argparse.Namespace) -> list[int] | None:
    """Pin this rank to its own ``--threads`` cores when there are at least ``nproc * threads`` available."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < args.nproc * args.threads:
        return None
    mine = cpus[local_rank * args.threads : (local_rank + 1) * args.threads]
    os.sched_setaffinity(0, mine)
    return mine


def _spawned_rank(local_rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    """Entry of a process started by :func:`main` (``torch.multiprocessing`` spawn)."""
    os.environ.update(
        RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    run_rank(args)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark: under torchrun (env set) run this rank; else spawn ``--nproc`` ranks."""
    args = parse_args(argv)
    validate_args(args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under a launcher
        world = int(os.environ["WORLD_SIZE"])
        if args.malloc == "tuned" and any(os.environ.get(k) != v for k, v in MALLOC_TUNED_ENV.items()):
            logger.warning("--malloc tuned under a launcher: export %s before starting it (glibc reads them at start)",
                           " ".join(f"{k}={v}" for k, v in MALLOC_TUNED_ENV.items()))
        if world != args.nproc:
            args.nproc = world
            validate_args(args)
        run_rank(args)
        return
    setup_logging(None, logging.getLevelName(args.log_level.upper()))
    if args.malloc == "tuned":
        os.environ.update(MALLOC_TUNED_ENV)  # read by glibc at start-up of the spawned ranks
    logger.info("spawning %d processes (%s, %s)", args.nproc, args.device, args.dtype)
    import torch.multiprocessing as mp

    try:
        mp.start_processes(_spawned_rank, args=(args.nproc, free_port(), args), nprocs=args.nproc,
                           start_method="spawn")
    except mp.ProcessExitedException as e:  # the rank printed why; do not add a traceback
        raise SystemExit(e.exit_code) from None


if __name__ == "__main__":
    main()
