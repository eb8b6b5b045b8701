"""Training-step throughput under routing imbalance: expert parallelism vs FSSDP vs DeepSpeed-MoE.

The same small :class:`~system.models.model.MoETransformer`, the same text, the same initial weights
and the *same expert assignments* are trained by every system on the same ranks. Every step of every
system is :func:`system.train.step.train_step`, the function the trainer runs (forward, cross-entropy +
MoE auxiliary losses, backward, gradient synchronisation, global-norm clipping, AdamW, LR schedule, FSSDP's
``begin_step``/``end_step``). Systems (``--systems``):

- ``ep``: our expert parallelism (``parallel.ep = W``, ``expert_mode = "ep"``): rank j keeps experts
  ``[j*E/W, (j+1)*E/W)``, uneven all-to-all, dropless, no padding.
- ``fssdp``: our FSSDP (Hecate, arXiv 2502.02581; ``expert_mode = "fssdp"``, ``ep = 1``, ``dp = W``) with the
  defaults of :class:`~system.config.fssdp.FSSDPConfig`, except the overlap budget t: one value for the whole
  run, measured before the workloads (the median of ``--fssdp-calibration-runs`` estimates of
  :class:`~system.parallel.fssdp.FSSDPController`, each on the real step's shapes) or fixed by
  ``--fssdp-overlap-budget``.
- ``deepspeed``: each MoE FFN replaced by ``deepspeed.moe.layer.MoE(ep_size=W, drop_tokens=False,
  use_rts=False, top2_2nd_expert_sampling=False)``, router and experts copied from ours: the configuration
  matched to ours (dropless, nothing random). Its dropless gating pads every expert to the largest per-rank
  expert load over the EP group.
- ``deepspeed_cf<x>`` (``deepspeed_cf1.0``, ``deepspeed_cf1.25``): DeepSpeed's recommended configuration, the
  documented defaults of ``deepspeed.moe.layer.MoE`` (``drop_tokens=True``, ``use_rts=True``,
  ``min_capacity=4``, ``top2_2nd_expert_sampling=True``) with ``capacity_factor`` x (1.0 is the default).
  Each expert takes at most ``C = max(ceil(x * T * k / E), 4)`` of a rank's assignments; the rest are dropped.
- ``ep_cf<x>`` (optional): ours with ``moe.capacity_factor = x``, the matched configuration of
  ``deepspeed_cf<x>``: the same capacity and the same priority (all first choices before second choices,
  then token order), so the same assignments are dropped (checked); but DeepSpeed re-normalises a token's
  surviving gate weights to sum to 1 and ours keeps them as they were, so their losses differ.

DeepSpeed's gate is forced to the workload's assignments by answering the ``torch.argmax`` calls of its gating
function (:class:`ForcedDeepSpeedGate`); everything after the choice of experts (capacity, drops, dispatch,
padding, its load-balancing loss) is DeepSpeed's code. Its gradients are synchronised and clipped with
:func:`system.parallel.grads.all_reduce_grads` and :func:`~system.parallel.grads.clip_by_global_norm_`, the
code ours uses.

Routing workloads. Every router's choice is overridden by a seeded generator that gives, for each
(workload, seed, step, layer, rank), ``[T, k]`` expert ids with k distinct experts per token and *exact*
per-expert counts: ``balanced``, ``one_hot`` (one expert per layer takes ``--one-hot-share``), ``hot_rank``
(the experts of EP rank 0 take ``--hot-rank-share``), ``zipf<s>`` (popularity ~ 1/rank^s), ``rotating`` (the
one_hot hotspot moves every ``--rotate-every`` steps). No expert takes more than 1/k of the assignments.

Method. Per workload: every system is built from the same weights and runs ``--warmup`` steps; the matched
systems (``ep``, ``fssdp``, ``deepspeed``) must give the same cross-entropy at the first step and at every
warm-up step (relative 1e-4 in fp32), else the run aborts (:func:`benchmarks.common.check_agreement`). Then
``--repeats`` repeats, the order of the systems rotated per repeat; a repeat times ``--iters`` steps between
barriers, its time is the slowest rank's. Every ratio is the median of the paired per-repeat ratios with a
95% bootstrap interval (:func:`benchmarks.common.ratio_goal`).

Usage (from the repository root)::

    python benchmarks/expert_parallel.py                       # CPU default: 6 workloads x 5 systems, 2 processes
    python benchmarks/expert_parallel.py --workloads balanced one_hot --repeats 20
    python benchmarks/expert_parallel.py --smoke               # tiny model, end-to-end check
    python benchmarks/expert_parallel.py --nproc 4 --tag _4proc   # 4 processes (oversubscribed on 2 cores)
    python benchmarks/expert_parallel.py --device cuda --nproc 8   # NCCL, bf16 autocast (UNTESTED on GPU)

Writes ``<out>/expert_parallel_<device><tag>.json`` and ``.md`` (``--smoke`` adds the tag ``_smoke``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import hashlib
import importlib
import inspect
import logging
import math
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.moe_layer_peers import SwiGLU  # noqa: E402
from benchmarks.common import (  # noqa: E402
    NumericalDisagreement,
    Stopwatch,
    check_agreement,
    fill_defaults,
    format_bytes,
    free_port,
    markdown_table,
    peak_rss_bytes,
    provenance,
    provenance_markdown,
    ratio_goal,
    reset_peak_rss,
    rotated,
    setup_logging,
    summarize,
    write_json,
    write_text,
)

logger = logging.getLogger("benchmarks.expert_parallel")

MATCHED = ("ep", "fssdp", "deepspeed")
DEFAULT_SYSTEMS = ("ep", "fssdp", "deepspeed", "deepspeed_cf1.0", "deepspeed_cf1.25")
ALL_WORKLOADS = ("balanced", "one_hot", "hot_rank", "zipf1.0", "zipf1.5", "rotating")
_ZIPF = re.compile(r"^zipf(\d+(?:\.\d+)?)$")
_CAPACITY = re.compile(r"^(ep|deepspeed)_cf(\d+(?:\.\d+)?)$")
DS_MIN_CAPACITY = 4  # deepspeed.moe.layer.MoE's default min_capacity

# Sized so the default run (6 workloads x 5 systems, 2 processes) takes about 13-15 min on 2 quiet cores:
# (warmup + repeats * iters) steps per system and workload.
CPU_DEFAULTS = dict(dim=256, layers=2, heads=4, expert_dim=1024, seq_len=256, batch_size=8,
                    warmup=6, repeats=12, iters=1, fssdp_calibration_runs=5)
SMOKE_DEFAULTS = dict(dim=64, layers=2, heads=2, expert_dim=128, seq_len=64, batch_size=2,
                      warmup=6, repeats=3, iters=1, fssdp_calibration_runs=1)
CUDA_DEFAULTS = dict(dim=1024, layers=8, heads=16, expert_dim=2816, seq_len=1024, batch_size=8,
                     warmup=10, repeats=15, iters=5, fssdp_calibration_runs=5)
SMOKE_WORKLOADS = ("balanced", "one_hot")


# --------------------------------------------------------------------------------------------
# arguments


@dataclass(frozen=True)
class Spec:
    """A system name parsed: ``kind`` is ``ep``, ``fssdp`` or ``deepspeed``; ``capacity_factor`` 0 = dropless."""

    name: str
    kind: str
    capacity_factor: float = 0.0

    @staticmethod
    def parse(name: str) -> "Spec":
        if name in MATCHED:
            return Spec(name, name)
        m = _CAPACITY.match(name)
        if m is None or float(m.group(2)) <= 0:
            raise ValueError(f"unknown system {name!r}: choose from {', '.join(MATCHED)}, deepspeed_cf<x>, ep_cf<x> (x > 0)")
        return Spec(name, m.group(1), float(m.group(2)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; device- and smoke-dependent defaults are filled in afterwards."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workloads", nargs="+", default=None,
                   help=f"routing workloads, space or comma separated (default: {' '.join(ALL_WORKLOADS)}; smoke: "
                   f"{' '.join(SMOKE_WORKLOADS)}); zipf<s> takes any exponent s")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help="comma list from ep, fssdp, deepspeed, deepspeed_cf<x>, ep_cf<x> (default %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny model and few steps (end-to-end check)")
    p.add_argument("--repeats", type=int, help="timed repeats per system, order rotated per repeat (cpu 12, smoke 3, cuda 15)")
    p.add_argument("--iters", type=int, help="training steps per repeat (cpu 1, smoke 1, cuda 5)")
    p.add_argument("--warmup", type=int, help="untimed steps per system, the same for all (>= FSSDP load window + 1; cpu 6)")
    p.add_argument("--nproc", type=int, default=None, help="processes = EP degree = FSSDP ranks (cpu 2, cuda: GPUs)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process on CPU (every system alike)")
    p.add_argument("--goal-skew-speedup", type=float, default=1.5,
                   help="skewed workloads: goal FSSDP tokens/s >= this x EP's (default %(default)s)")
    p.add_argument("--goal-balanced", type=float, default=0.95,
                   help="balanced workload: goal FSSDP tokens/s >= this x EP's (default %(default)s)")
    p.add_argument("--goal-skew-step", type=float, default=1.2,
                   help="skewed workloads: goal FSSDP step time <= this x its balanced step time (default %(default)s)")
    p.add_argument("--dim", type=int, help="model width (cpu 256)")
    p.add_argument("--layers", type=int, help="transformer blocks, all MoE (cpu 2)")
    p.add_argument("--heads", type=int, help="attention heads (cpu 4)")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (DeepSpeed: 1 or 2)")
    p.add_argument("--expert-dim", type=int, help="SwiGLU expert hidden size (cpu 1024 = 4x dim)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (cpu 256)")
    p.add_argument("--batch-size", type=int, help="sequences per rank per step (cpu 8: 2048 tokens/rank)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (constant after step 0)")
    p.add_argument("--aux-loss-coef", type=float, default=0.0,
                   help="moe.aux_loss_coef (default 0: DeepSpeed's load-balancing loss is another function, so with a "
                   "non-zero coefficient its warm-up losses drift from ours and only the first step is compared)")
    p.add_argument("--z-loss-coef", type=float, default=0.0, help="moe.z_loss_coef (default 0: DeepSpeed has no z-loss)")
    p.add_argument("--data", default="", help="corpus path for system.data.load_corpus ('' = embedded default)")
    p.add_argument("--seed", type=int, default=1234, help="model init, data order and workload seed")
    p.add_argument("--one-hot-share", type=float, default=0.5, help="one_hot/rotating: share of the hot expert")
    p.add_argument("--hot-rank-share", type=float, default=0.8, help="hot_rank: share of EP rank 0's experts")
    p.add_argument("--rotate-every", type=int, default=4, help="rotating: steps between hotspot moves")
    p.add_argument("--fssdp-overlap-budget", type=int,
                   help="FSSDP's t for every workload (default: measured once before the workloads)")
    p.add_argument("--fssdp-calibration-runs", type=int,
                   help="estimates of t whose median is used (each: a fresh FSSDP model, 2 steps; cpu 5, smoke 1)")
    p.add_argument("--fssdp-memory-budget", type=int, help="override FSSDPConfig.memory_budget (m, paper 2)")
    p.add_argument("--fssdp-reshard-interval", type=int, help="override FSSDPConfig.reshard_interval (R, paper 100)")
    p.add_argument("--fssdp-rematerialize", action="store_true", help="FSSDPConfig.rematerialize = True")
    p.add_argument("--fssdp-set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any other FSSDPConfig field (repeatable), e.g. --fssdp-set prefetch=false")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")
    p.add_argument("--tag", default=None, help="suffix of the result files (default '' or '_smoke')")
    p.add_argument("--no-pin", action="store_true", help="do not pin CPU ranks to cores")
    p.add_argument("--log-level", default="INFO")
    # Testing only: scale one system's final norm so that the agreement check must abort the run.
    p.add_argument("--perturb-system", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    fill_defaults(args, CUDA_DEFAULTS if args.device == "cuda" else (SMOKE_DEFAULTS if args.smoke else CPU_DEFAULTS))
    if args.nproc is None:
        args.nproc = max(torch.cuda.device_count(), 1) if args.device == "cuda" else 2
    if args.tag is None:
        args.tag = "_smoke" if args.smoke else ""
    default_workloads = SMOKE_WORKLOADS if args.smoke else ALL_WORKLOADS
    names = [w for item in (args.workloads or list(default_workloads)) for w in item.split(",") if w]
    args.workload_list = list(dict.fromkeys(names))
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Raise ``SystemExit`` with a clear message for impossible settings or missing peers."""
    errors = []
    for w in args.workload_list:
        if w not in ("balanced", "one_hot", "hot_rank", "rotating") and not _ZIPF.match(w):
            errors.append(f"unknown workload {w!r}; choose from {', '.join(ALL_WORKLOADS)} (zipf<s> for any s)")
    try:
        specs = [Spec.parse(n) for n in args.system_list]
    except ValueError as e:
        errors.append(str(e))
        specs = []
    if not args.system_list or len(set(args.system_list)) != len(args.system_list):
        errors.append(f"--systems {args.systems!r}: a comma list of distinct names")
    if args.experts % args.nproc:
        errors.append(f"--experts {args.experts} must divide by --nproc {args.nproc} (the EP degree)")
    if not 1 <= args.top_k <= args.experts:
        errors.append(f"--top-k must be in [1, {args.experts}]")
    if any(x.kind == "deepspeed" for x in specs):
        if args.top_k not in (1, 2):
            errors.append("DeepSpeed-MoE's forced gate supports top-1 and top-2 (--top-k 1|2)")
        if not _importable("deepspeed"):
            errors.append("the deepspeed systems need DeepSpeed: pip install 'moe-system[peers]' (or drop them from --systems)")
    if args.perturb_system is not None and args.perturb_system not in args.system_list:
        errors.append(f"--perturb-system {args.perturb_system!r} is not among --systems")
    if args.dim % args.heads:
        errors.append(f"--dim {args.dim} must divide by --heads {args.heads}")
    if not 0 < args.one_hot_share <= 1 or not 0 < args.hot_rank_share <= 1:
        errors.append("--one-hot-share and --hot-rank-share must be in (0, 1]")
    if args.rotate_every < 1:
        errors.append("--rotate-every must be >= 1")
    if args.repeats < 2 or args.iters < 1 or args.warmup < 1 or args.fssdp_calibration_runs < 1:
        errors.append("--repeats must be >= 2 (paired intervals); --iters, --warmup, --fssdp-calibration-runs >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda but torch.cuda.is_available() is False")
    if args.device == "cuda" and torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
        errors.append(f"--nproc {args.nproc} > {torch.cuda.device_count()} visible GPUs")
    if args.nproc < 2:
        errors.append("--nproc must be >= 2 (expert parallelism and FSSDP need several ranks)")
    if errors:
        raise SystemExit("expert_parallel benchmark: " + "; ".join(errors))
    try:
        cfg = fssdp_config(args)
    except ValueError as e:
        raise SystemExit(f"expert_parallel benchmark: {e}") from e
    if "fssdp" in args.system_list and args.warmup < cfg.load_window + 1:
        logger.warning("--warmup %d is shorter than FSSDP's load window + 1 (%d): its placement has not settled "
                       "when timing starts", args.warmup, cfg.load_window + 1)


def fssdp_config(args: argparse.Namespace, overlap_budget: int | None = None):
    """Defaults of :class:`FSSDPConfig` with the command line's overrides (and ``overlap_budget`` if given)."""
    from system.config.fssdp import FSSDPConfig

    cfg = FSSDPConfig()
    cfg.rematerialize = cfg.rematerialize or args.fssdp_rematerialize
    for key in ("memory_budget", "reshard_interval", "overlap_budget"):
        value = getattr(args, f"fssdp_{key}")
        if value is not None:
            setattr(cfg, key, value)
    for item in args.fssdp_set:
        key, sep, text = item.partition("=")
        if not sep or not hasattr(cfg, key):
            raise SystemExit(f"--fssdp-set {item!r}: expected KEY=VALUE with KEY a field of FSSDPConfig")
        default = getattr(FSSDPConfig(), key)
        if isinstance(default, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise SystemExit(f"--fssdp-set {item!r}: {key} takes true or false")
            setattr(cfg, key, text.lower() in ("1", "true", "yes", "on"))
        else:
            setattr(cfg, key, type(default)(text))
    if overlap_budget is not None:
        cfg.overlap_budget = overlap_budget
    cfg.validate()
    return cfg


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _pin_cpu(local_rank: int, threads: int, nproc: int) -> list[int] | None:
    """Pin this rank to ``threads`` cores of its own when there are ``nproc * threads`` cores; else ``None``."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < nproc * threads:
        return None
    mine = cpus[local_rank * threads : (local_rank + 1) * threads]
    os.sched_setaffinity(0, mine)
    return mine

# --------------------------------------------------------------------------------------------
# routing workloads


@dataclass(frozen=True)
class WorkloadParams:
    """Everything the assignment generator depends on besides (workload, step, layer, rank)."""

    num_experts: int
    top_k: int
    ep: int
    seed: int
    one_hot_share: float = 0.5
    hot_rank_share: float = 0.8
    rotate_every: int = 4


def _generator(*key: Any) -> torch.Generator:
    """A CPU generator seeded by a stable hash of ``key`` (independent of Python's hash seed)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def cap_shares(shares: torch.Tensor, cap: float) -> torch.Tensor:
    """Water-filling: clip shares at ``cap`` and spread the excess proportionally over the others.

    Keeps the sum (1) and the order; requires ``cap * E >= 1``.
    """
    s = shares.double() / shares.double().sum()
    for _ in range(s.numel()):
        over = s > cap + 1e-12
        if not over.any():
            break
        excess = float((s[over] - cap).sum())
        s[over] = cap
        free = ~over & (s < cap - 1e-12)
        if not free.any():
            break
        s[free] += excess * s[free] / s[free].sum()
    return s


def hot_expert(workload: str, layer: int, step: int, p: WorkloadParams) -> int:
    """The hot expert of ``one_hot`` (fixed per layer) and ``rotating`` (moves every ``rotate_every`` steps)."""
    base = int(torch.randint(0, p.num_experts, (1,), generator=_generator("hot", workload, p.seed, layer)))
    if workload == "rotating":
        return (base + step // p.rotate_every) % p.num_experts
    return base


def expert_shares(workload: str, layer: int, step: int, p: WorkloadParams) -> torch.Tensor:
    """``[E]`` float64 fraction of the layer's assignments that go to each expert (sums to 1, <= 1/k)."""
    E = p.num_experts
    if workload == "balanced":
        s = torch.full((E,), 1.0 / E, dtype=torch.float64)
    elif workload in ("one_hot", "rotating"):
        hot = hot_expert(workload, layer, step, p)
        s = torch.full((E,), (1.0 - p.one_hot_share) / (E - 1), dtype=torch.float64)
        s[hot] = p.one_hot_share
    elif workload == "hot_rank":  # the experts of EP rank 0 ([0, E/ep)) take hot_rank_share together
        per = E // p.ep
        s = torch.full((E,), (1.0 - p.hot_rank_share) / (E - per), dtype=torch.float64)
        s[:per] = p.hot_rank_share / per
    else:
        m = _ZIPF.match(workload)
        if m is None:
            raise ValueError(f"unknown workload {workload!r}")
        exponent = float(m.group(1))
        perm = torch.randperm(E, generator=_generator("zipf", workload, p.seed, layer))
        s = torch.empty(E, dtype=torch.float64)
        s[perm] = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** exponent
    return cap_shares(s, 1.0 / p.top_k)


def assignment_counts(shares: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """``[E]`` int64 assignments per expert: largest-remainder rounding of ``shares * T * k``; each <= T."""
    total = num_tokens * top_k
    exact = shares.double() * total
    counts = exact.floor().long()
    short = total - int(counts.sum())
    if short:
        order = torch.argsort(exact - counts.double(), descending=True, stable=True)
        counts[order[:short]] += 1
    if int(counts.max()) > num_tokens:  # impossible for shares <= 1/k, kept as a guard
        raise ValueError(f"an expert would need {int(counts.max())} > {num_tokens} assignments")
    return counts


def forced_indices(workload: str, step: int, layer: int, rank: int, num_tokens: int, p: WorkloadParams) -> torch.Tensor:
    """``[T, k]`` int64 expert ids for this (workload, step, layer, rank), k distinct experts per token.

    Per-expert counts are exactly :func:`assignment_counts`; which tokens get which experts is a
    seeded shuffle. Construction: the assignments sorted by expert fill a ``[k, T]`` table row by row,
    so token t gets entries t, t+T, ...; every expert occupies a contiguous run of at most T entries,
    hence never twice the same column (token). Then tokens are permuted and each token's k choices.
    """
    k = p.top_k
    counts = assignment_counts(expert_shares(workload, layer, step, p), num_tokens, k)
    flat = torch.repeat_interleave(torch.arange(p.num_experts, dtype=torch.int64), counts)
    idx = flat.view(k, num_tokens).t()
    g = _generator("tokens", workload, p.seed, step, layer, rank)
    idx = idx[torch.randperm(num_tokens, generator=g)]
    if k > 1:
        idx = idx.gather(1, torch.rand(num_tokens, k, generator=g).argsort(dim=1))
    return idx.contiguous()


def workload_stats(workload: str, steps: range, layers: int, num_tokens: int, world: int, p: WorkloadParams) -> dict[str, Any]:
    """Imbalance of a workload over the given steps and all layers (global counts = W x per-rank counts)."""
    max_over_mean, rank_share = [], []
    for step in steps:
        for layer in range(layers):
            c = assignment_counts(expert_shares(workload, layer, step, p), num_tokens, p.top_k).double() * world
            max_over_mean.append(float(c.max() / c.mean()))
            rank_share.append(float(c.view(p.ep, -1).sum(1).max() / c.sum()))
    shares0 = expert_shares(workload, 0, 0, p)
    return {
        "load_max_over_mean": sum(max_over_mean) / len(max_over_mean),
        # Under EP the busiest rank holds this fraction of the expert rows (1/ep when even).
        "ep_busiest_rank_share": sum(rank_share) / len(rank_share),
        "ep_busiest_rank_over_even": sum(rank_share) / len(rank_share) * p.ep,
        "shares_layer0_step0": [round(float(v), 6) for v in shares0],
        "counts_per_rank_layer0_step0": assignment_counts(shares0, num_tokens, p.top_k).tolist(),
    }


WORKLOAD_DESCRIPTIONS = {
    "balanced": "uniform: every expert gets T*k/E assignments",
    "one_hot": "one expert per layer (seeded) takes {one_hot_share:.0%} of the assignments, the rest uniform",
    "hot_rank": "the experts of EP rank 0 take {hot_rank_share:.0%} of the assignments together (uniform among them)",
    "rotating": "one hot expert with {one_hot_share:.0%} of the assignments, moving to the next expert every {rotate_every} steps",
    "zipf": "Zipf popularity ~ 1/rank^{s} over a seeded permutation of the experts per layer (capped at 1/k)",
}


def describe_workload(name: str, args: argparse.Namespace) -> str:
    m = _ZIPF.match(name)
    if m:
        return WORKLOAD_DESCRIPTIONS["zipf"].format(s=m.group(1))
    return WORKLOAD_DESCRIPTIONS[name].format(**vars(args))



# --------------------------------------------------------------------------------------------
# DeepSpeed-MoE in our model


class _ForcedArgmaxTorch:
    """Stand-in for the ``torch`` module inside ``deepspeed.moe.sharded_moe`` during one gate call.

    DeepSpeed's gating picks experts with ``torch.argmax`` (top-1: once; top-2: the first choice,
    then the best of the others). This object answers those calls with the forced choices, column
    by column, and forwards every other attribute to ``torch``, so DeepSpeed's own gating code runs
    unchanged: softmax gates, capacity, drops, locations, normalised top-2 weights, its aux loss.
    """

    def __init__(self, forced: torch.Tensor):
        self.forced = forced
        self.calls = 0

    def argmax(self, input: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:  # noqa: A002
        j = self.calls
        self.calls += 1
        if dim != 1 or keepdim or input.dim() != 2 or input.shape[0] != self.forced.shape[0] or j >= self.forced.shape[1]:
            raise RuntimeError(
                f"unexpected torch.argmax call #{j + 1} in DeepSpeed gating (input {tuple(input.shape)}, dim={dim}); "
                "this DeepSpeed version's top-k gating differs from the one the forced gate was written for"
            )
        return self.forced[:, j]

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class ForcedDeepSpeedGate:
    """Makes a ``TopKGate`` choose the experts in ``forced_indices`` (``[T, k]``), when set.

    Installed as the gate instance's ``forward``. Reads from each call's sparse routes (DeepSpeed's
    dispatch input) the capacity C and the assignments evicted by it (expert index -1).
    """

    def __init__(self, gate: nn.Module):
        from deepspeed.moe import sharded_moe

        self.gate = gate
        self.module = sharded_moe
        self.original = type(gate).forward
        self.forced_indices: torch.Tensor | None = None
        self.last_capacity = 0
        self.last_dropped = 0
        gate.forward = self.forward

    def forward(self, input: torch.Tensor, used_token=None, sparse_routes: bool = False, use_tutel: bool = False):  # noqa: A002
        forced = self.forced_indices
        if not sparse_routes:
            raise RuntimeError("this DeepSpeed's MOELayer does not ask its gate for sparse routes; the benchmark reads "
                               "capacity and drops from them (DeepSpeed >= 0.19)")
        if forced is None:
            out = self.original(self.gate, input, used_token, sparse_routes, use_tutel)
        else:
            proxy = _ForcedArgmaxTorch(forced.to(device=input.device, dtype=torch.int64))
            saved, self.module.torch = self.module.torch, proxy
            try:
                out = self.original(self.gate, input, used_token, sparse_routes, use_tutel)
            finally:
                self.module.torch = saved
            if proxy.calls != forced.shape[1]:
                raise RuntimeError(f"DeepSpeed gating called torch.argmax {proxy.calls} times, expected {forced.shape[1]}")
        # out = (l_aux, capacity, E, indices [k, T] (-1: evicted by the capacity), locations, gates, exp_counts)
        self.last_capacity = int(out[1])
        self.last_dropped = int((out[3] < 0).sum())  # host sync, like DeepSpeed's own int(capacity)
        return out


class DeepSpeedFFN(nn.Module):
    """A block's FFN as ``deepspeed.moe.layer.MoE``; looks like :class:`~system.moe.layer.MoELayer` to the model.

    ``router`` is the :class:`ForcedDeepSpeedGate` (its ``forced_indices`` as on our router).
    ``last_stats`` is a :class:`~system.moe.layer.MoEStats`: ``aux_loss`` DeepSpeed's ``l_aux`` (its
    definition), ``z_loss`` 0 (it has none), ``tokens_per_expert`` this rank's ``exp_counts`` (DeepSpeed
    does not sum them over ranks; adding a collective would charge the peer for our bookkeeping),
    ``dropped`` the assignments its capacity evicted, ``assignments`` ``T * k``, ``expert_tokens`` the rows its
    experts compute: ``E * C`` (``E / W`` local experts x C slots x W ranks, padding included).
    """

    def __init__(self, moe: nn.Module, gate: ForcedDeepSpeedGate, num_experts: int, top_k: int):
        super().__init__()
        self.moe = moe
        self.router = gate
        self.num_experts = num_experts
        self.top_k = top_k
        self.last_stats = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        from system.moe.layer import MoEStats

        out, l_aux, exp_counts = self.moe(x)
        self.last_stats = MoEStats(
            aux_loss=l_aux, z_loss=l_aux.new_zeros(()), tokens_per_expert=exp_counts.detach().float(),
            dropped=self.router.last_dropped, assignments=x.numel() // x.shape[-1] * self.top_k,
            expert_tokens=self.num_experts * self.router.last_capacity,
        )
        return out


def deepspeed_kwargs(spec: Spec, args: argparse.Namespace, world: int) -> dict[str, Any]:
    """``deepspeed.moe.layer.MoE`` arguments: dropless matched configuration, or its defaults with a capacity factor."""
    from deepspeed.moe.layer import MoE

    kw: dict[str, Any] = dict(hidden_size=args.dim, num_experts=args.experts, ep_size=world, k=args.top_k)
    if spec.capacity_factor:  # recommended: DeepSpeed's documented defaults, capacity factor as named
        kw.update(capacity_factor=spec.capacity_factor, eval_capacity_factor=spec.capacity_factor,
                  min_capacity=DS_MIN_CAPACITY, drop_tokens=True, use_rts=True)
        sampling = True
    else:  # matched to ours: dropless, nothing random (the capacity arguments are unused when dropless)
        kw.update(capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=DS_MIN_CAPACITY, drop_tokens=False,
                  use_rts=False)
        sampling = False
    if "top2_2nd_expert_sampling" in inspect.signature(MoE.__init__).parameters:
        kw["top2_2nd_expert_sampling"] = sampling
    return kw


def deepspeed_defaults() -> dict[str, Any]:
    """The defaults of ``deepspeed.moe.layer.MoE``'s arguments, as installed (recorded with the results)."""
    from deepspeed.moe.layer import MoE

    return {k: p.default for k, p in inspect.signature(MoE.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty and isinstance(p.default, (bool, int, float, str, type(None)))}


def deepspeed_sync_and_clip(model: nn.Module, world: int, max_norm: float) -> Callable[[], torch.Tensor]:
    """Gradient sync and clipping of the DeepSpeed model, with our gradient code (``train_step(sync_and_clip=)``).

    Dense parameters: summed over all ranks, divided by W. Expert parameters (DeepSpeed marks them
    ``allreduce = False``): each expert lives on one rank (ep_size = W, no expert data parallelism) and its
    gradient already sums every rank's tokens through the all-to-all backward: divided by W. The global
    norm counts dense gradients locally and expert gradients summed over ranks, as ours does.
    """
    from system.parallel.grads import all_reduce_grads, clip_by_global_norm_

    params = [p for p in model.parameters() if p.requires_grad]
    dense = [p for p in params if getattr(p, "allreduce", True)]
    experts = [p for p in params if not getattr(p, "allreduce", True)]

    def sync_and_clip() -> torch.Tensor:
        all_reduce_grads(dense, dist.group.WORLD, 1.0 / world)
        all_reduce_grads(experts, None, 1.0 / world)
        return clip_by_global_norm_([p.grad for p in dense], [(p.grad, 1) for p in experts], dist.group.WORLD, max_norm)

    return sync_and_clip


# --------------------------------------------------------------------------------------------
# systems


@dataclass
class Setup:
    """Per-rank run context."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    max_grad_norm: float = 1.0
    load_balance: str = "aux"
    overlap_budget: int | None = None  # FSSDP's t for every workload, once measured
    meshes: dict[str, Any] = field(default_factory=dict)


@dataclass
class System:
    """One system under test for one workload: model, optimizer, and what :func:`train_step` needs for it."""

    spec: Spec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    mesh: Any = None
    controller: Any = None  # FSSDPController under FSSDP
    sync_and_clip: Callable[[], torch.Tensor] | None = None  # DeepSpeed: its gradients through our gradient code
    info: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    losses: list[float] = field(default_factory=list)  # local cross-entropy of the warm-up steps
    warmup_dropped: list[int] = field(default_factory=list)  # local dropped assignments per warm-up step
    rows: list[list[int]] = field(default_factory=list)  # per timed step and MoE layer: expert rows computed here
    dropped: list[list[int]] = field(default_factory=list)  # per timed step and MoE layer: assignments dropped here
    assignments: list[int] = field(default_factory=list)  # per timed step: assignments made here

    @property
    def name(self) -> str:
        return self.spec.name


def model_configs(args: argparse.Namespace):
    """ModelConfig, MoEConfig and TrainingConfig of the benchmark model."""
    from system.config.model import ModelConfig
    from system.config.moe import MoEConfig
    from system.config.training import TrainingConfig
    from system.data import ByteTokenizer

    vocab = -(-ByteTokenizer.vocab_size // 64) * 64  # as resolve_vocab does
    model = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, ffn_dim=args.expert_dim,
                        vocab_size=vocab, max_seq_len=args.seq_len)
    moe = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_dim=args.expert_dim, capacity_factor=0.0,
                    aux_loss_coef=args.aux_loss_coef, z_loss_coef=args.z_loss_coef)
    steps = args.warmup + args.repeats * args.iters
    train = TrainingConfig(steps=steps, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len,
                           lr=args.lr, warmup_steps=0)
    for cfg in (model, moe, train):
        cfg.validate()
    return model, moe, train


def build_base(s: Setup) -> nn.Module:
    """The initialised model every system starts from (identical on every rank)."""
    from system.models.model import MoETransformer

    model_cfg, moe_cfg, _ = model_configs(s.args)
    torch.manual_seed(s.args.seed)
    with torch.device(s.device):
        model = MoETransformer(model_cfg, moe_cfg)
    model.init_weights(seed=s.args.seed)
    return model


def build_system(s: Setup, spec: Spec, base: nn.Module, overlap_budget: int | None = None) -> System:
    """A copy of ``base`` parallelised as ``spec`` says, with its optimizer and scheduler."""
    from system.config.parallel import ParallelConfig
    from system.models.parallelize import parallelize_model
    from system.train.optim import build_lr_scheduler, build_optimizer

    model = copy.deepcopy(base)
    if s.args.perturb_system == spec.name:  # testing the abort: this system computes something else
        with torch.no_grad():
            model.norm.weight.mul_(2.0)
    system = System(spec, model, None, None)  # type: ignore[arg-type]
    if spec.kind == "deepspeed":
        _replace_ffns_by_deepspeed(s, spec, system)
    elif spec.kind == "fssdp":
        cfg = fssdp_config(s.args, s.overlap_budget if overlap_budget is None else overlap_budget)
        par = ParallelConfig(dp=s.world, ep=1, expert_mode="fssdp")
        system.mesh = s.meshes["fssdp"]
        system.controller = parallelize_model(model, system.mesh, par, param_dtype=s.amp_dtype, fssdp=cfg)
        system.info = {"impl": "MoETransformer + parallelize_model(expert_mode='fssdp'): Hecate FSSDP (spAG/spRS, sparse "
                       "materialization, topology-aware dispatch, heterogeneous re-sharding)",
                       "parallel": asdict(par), "fssdp_config": asdict(cfg)}
    else:
        par = ParallelConfig(dp=1, ep=s.world, expert_mode="ep")
        system.mesh = s.meshes["ep"]
        parallelize_model(model, system.mesh, par, param_dtype=s.amp_dtype)
        for moe in model.moe_layers():
            moe.capacity_factor = spec.capacity_factor  # 0: dropless
        system.info = {"impl": "MoETransformer + parallelize_model(parallel.ep=W): uneven all-to-all, no padding, "
                       + (f"capacity factor {spec.capacity_factor} (GShard priority, drops)" if spec.capacity_factor
                          else "dropless"), "parallel": asdict(par), "moe.capacity_factor": spec.capacity_factor}
    _, _, train_cfg = model_configs(s.args)
    system.optimizer = build_optimizer(model, train_cfg)
    system.scheduler = build_lr_scheduler(system.optimizer, train_cfg)
    return system


def _replace_ffns_by_deepspeed(s: Setup, spec: Spec, system: System) -> None:
    """Replace every MoE FFN of ``system.model`` by ``deepspeed.moe.layer.MoE`` holding our router and experts."""
    from deepspeed.moe.layer import MoE

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    a = s.args
    kwargs = deepspeed_kwargs(spec, a, s.world)
    for block in system.model.layers:
        ours = block.moe
        if ours is None:
            continue
        with contextlib.ExitStack() as stack:  # DeepSpeed prints group creation to stdout
            sink = sys.stderr if s.rank == 0 else stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(sink))
            moe = MoE(expert=SwiGLU(a.dim, a.expert_dim), **kwargs)  # the expert moe_layer.py gives DeepSpeed
            moe.set_deepspeed_parallelism()  # deepspeed.initialize() normally does this
        ds = moe.deepspeed_moe
        ep_rank = dist.get_rank(group=ds.ep_group)
        with torch.no_grad():
            ds.gate.wg.weight.copy_(ours.router.gate.weight)
            for i, expert in enumerate(ds.experts.deepspeed_experts):
                e = ep_rank * ds.num_local_experts + i  # its all-to-all sends experts [j*nl, (j+1)*nl) to rank j
                expert.w1.weight.copy_(ours.experts.w1[e].t())
                expert.w3.weight.copy_(ours.experts.w3[e].t())
                expert.w2.weight.copy_(ours.experts.w2[e].t())
        moe.to(s.device)
        block.moe = DeepSpeedFFN(moe, ForcedDeepSpeedGate(ds.gate), a.experts, a.top_k)
    system.sync_and_clip = deepspeed_sync_and_clip(system.model, s.world, s.max_grad_norm)
    system.info = {
        "impl": "MoETransformer with each MoE FFN = deepspeed.moe.layer.MoE (GShard-style [E, C, d] dispatch); gate "
        "forced to the workload; " + (f"capacity factor {spec.capacity_factor}, tokens beyond C dropped" if spec.capacity_factor
                                      else "dropless: C = the largest per-rank expert load over the EP group"),
        "configuration": "recommended (DeepSpeed's defaults)" if spec.capacity_factor else "matched to ours (dropless)",
        "kwargs": kwargs,
        "deepspeed_moe_defaults": deepspeed_defaults(),
        "aux_loss": "DeepSpeed's l_aux (its definition) x moe.aux_loss_coef; no z-loss",
        "grad_sync": "system.parallel.grads.all_reduce_grads (dense over all ranks / W; experts, allreduce=False, / W) "
        "and clip_by_global_norm_ (dense locally, experts summed over ranks)",
    }


def set_routing(system: System, forced: list[torch.Tensor]) -> None:
    """Force each MoE layer's expert choices (``forced[layer]`` ``[T, k]``)."""
    for moe, idx in zip(system.model.moe_layers(), forced):
        moe.router.forced_indices = idx


def run_step(s: Setup, system: System, batch: tuple[torch.Tensor, torch.Tensor], forced: list[torch.Tensor]):
    """One training step of ``system``: :func:`system.train.step.train_step` on the forced routing."""
    from system.train.step import train_step

    set_routing(system, forced)
    stats = train_step(system.model, system.optimizer, system.scheduler, [batch], mesh=system.mesh,
                       max_grad_norm=s.max_grad_norm, autocast_dtype=s.amp_dtype, fssdp=system.controller,
                       load_balance=s.load_balance, sync_and_clip=system.sync_and_clip)
    system.step += 1
    return stats


# --------------------------------------------------------------------------------------------
# data and FSSDP's overlap budget


def build_batches(s: Setup, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``steps`` batches of real text (default corpus, byte tokenizer, packed windows)."""
    from system.data import ByteTokenizer, PackedLoader, load_corpus, tokenize_docs

    a = s.args
    corpus = load_corpus(a.data)
    need = 4 * steps * s.world * a.batch_size * a.seq_len + 1  # a few times what is read: varied windows
    docs, total = [], 0
    for doc in corpus.train_docs:
        docs.append(doc)
        total += len(doc)
        if total >= need:
            break
    tokens = tokenize_docs(docs, ByteTokenizer())
    loader = PackedLoader(tokens, seq_len=a.seq_len, batch_size=a.batch_size, rank=s.rank, world_size=s.world, seed=a.seed)
    batches = [tuple(t.to(s.device) for t in loader.next_batch()) for _ in range(steps)]
    a.corpus_info = {"corpus": corpus.name, "tokens_used": int(len(tokens)), "docs_used": len(docs)}
    return batches


def measure_overlap_budget(s: Setup, base: nn.Module, batches: list) -> dict[str, Any]:
    """FSSDP's overlap budget t for the whole run: fixed by ``--fssdp-overlap-budget``, or measured here once.

    Each calibration run builds a fresh FSSDP model with ``overlap_budget = -1`` and trains it two steps on the
    balanced routing and the real batches: at step 2 :class:`FSSDPController` times one attention forward of
    the real micro-batch shape and one SparseAllGather of all experts, and sets
    t = floor(attention time x gather bandwidth / expert bytes) (the minimum over ranks). The run uses the
    median of ``--fssdp-calibration-runs`` such estimates, for every workload.
    """
    a = s.args
    fixed = fssdp_config(a).overlap_budget
    if fixed >= 0:
        return {"t": fixed, "source": "--fssdp-overlap-budget", "estimates": []}
    params = _workload_params(s)
    tokens = a.batch_size * a.seq_len
    forced = [[forced_indices("balanced", step, layer, s.rank, tokens, params).to(s.device) for layer in range(a.layers)]
              for step in range(2)]
    estimates = []
    for _ in range(a.fssdp_calibration_runs):
        system = build_system(s, Spec("fssdp", "fssdp"), base, overlap_budget=-1)
        for step in range(2):
            run_step(s, system, batches[step], forced[step])
        estimates.append(int(system.controller.overlap_budget))
        del system
        gc.collect()
    t = int(statistics.median_low(estimates))
    logger.info("FSSDP overlap budget t=%d for every workload (estimates %s)", t, estimates)
    return {"t": t, "source": f"median of {len(estimates)} FSSDPController estimates at step 2 (balanced routing, "
            "real step shapes), measured once before the workloads", "estimates": estimates}


# --------------------------------------------------------------------------------------------
# one workload


def _workload_params(s: Setup) -> WorkloadParams:
    a = s.args
    return WorkloadParams(a.experts, a.top_k, s.world, a.seed, a.one_hot_share, a.hot_rank_share, a.rotate_every)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _max_rel(xs: list[float], ref: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(xs, ref))


def run_workload(s: Setup, workload: str, base: nn.Module, batches: list) -> dict[str, Any]:
    """Build the systems, warm up, check agreement, time rotated repeats; this rank's results."""
    a = s.args
    tokens = a.batch_size * a.seq_len
    total_steps = a.warmup + a.repeats * a.iters
    params = _workload_params(s)
    forced = [[forced_indices(workload, step, layer, s.rank, tokens, params).to(s.device) for layer in range(a.layers)]
              for step in range(total_steps)]
    systems = {name: build_system(s, Spec.parse(name), base) for name in a.system_list}
    gc.collect()

    for system in systems.values():  # the same warm-up steps for every system
        for step in range(a.warmup):
            st = run_step(s, system, batches[step], forced[step])
            system.losses.append(st.loss)
            system.warmup_dropped.append(st.dropped)
        _sync(s.device)
    agreement = check_systems_agree(s, list(systems.values()), workload, forced[a.warmup - 1])
    fssdp = systems.get("fssdp")
    if fssdp is not None:  # reset the per-step averages so they cover the timed steps only
        fssdp.controller.metrics()

    sync = (lambda: torch.cuda.synchronize(s.device)) if s.device.type == "cuda" else None
    samples: dict[str, list[float]] = {n: [] for n in systems}
    rss_peak = {n: 0 for n in systems}
    gpu_peak = {n: 0 for n in systems}
    rss_reset_ok = True
    for r in range(a.repeats):
        for name in rotated(a.system_list, r):
            system = systems[name]
            gc.collect()
            rss_reset_ok &= reset_peak_rss()
            if s.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(s.device)
            _sync(s.device)
            dist.barrier()
            with Stopwatch(sync) as watch:
                for _ in range(a.iters):
                    step = system.step
                    st = run_step(s, system, batches[step], forced[step])
                    layers = system.model.moe_layers()
                    system.rows.append([m.last_stats.expert_tokens for m in layers])
                    system.dropped.append([m.last_stats.dropped for m in layers])
                    system.assignments.append(st.assignments)
                _sync(s.device)
                dist.barrier()
            elapsed = torch.tensor([watch.seconds], dtype=torch.float64, device=s.device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
            samples[name].append(float(elapsed.item()))
            rss_peak[name] = max(rss_peak[name], peak_rss_bytes())
            if s.device.type == "cuda":
                gpu_peak[name] = max(gpu_peak[name], torch.cuda.max_memory_allocated(s.device))
            logger.info("%-9s repeat %2d/%d %-17s %8.1f ms/step", workload, r + 1, a.repeats, name,
                        1e3 * samples[name][-1] / a.iters)

    per_rank: dict[str, Any] = {"rss_peak": rss_peak, "gpu_peak": gpu_peak, "rss_reset_ok": rss_reset_ok, "systems": {}}
    for name, system in systems.items():
        entry: dict[str, Any] = {
            "expert_rows_per_step_per_layer": [sum(col) / len(col) for col in zip(*system.rows)],
            "dropped_per_step": sum(map(sum, system.dropped)) / len(system.dropped),
            "assignments_per_step": sum(system.assignments) / len(system.assignments),
        }
        if system.controller is not None:
            ctl = system.controller
            entry["fssdp"] = {"metrics": ctl.metrics(), "overlap_budget": ctl.overlap_budget,
                              "replicas_per_expert": [st.placement.sum(dim=1).tolist() for st in ctl.states],
                              "owner_per_expert": [st.ownership.owner.tolist() for st in ctl.states]}
        if system.spec.kind == "deepspeed":
            entry["capacity_last_step_per_layer"] = [m.router.last_capacity for m in system.model.moe_layers()]
        per_rank["systems"][name] = entry
    info = {n: x.info for n, x in systems.items()}
    del systems
    gc.collect()
    return {"samples": samples, "per_rank": per_rank, "agreement": agreement, "info": info}


def check_systems_agree(s: Setup, systems: list[System], workload: str, forced_last: list[torch.Tensor]) -> dict[str, Any]:
    """Abort (:class:`NumericalDisagreement`) unless the systems compute the same thing; report the differences.

    - Matched systems (``ep``, ``fssdp``, ``deepspeed``): the cross-entropy (mean over ranks) of the first step and
      of every warm-up step within relative ``rtol`` (1e-4 fp32, 2e-2 bf16). With a non-zero
      ``--aux-loss-coef``/``--z-loss-coef`` DeepSpeed optimises another auxiliary loss, so only its first step is
      compared.
    - DeepSpeed honoured the forced routing: its per-expert counts of the last warm-up step equal the workload's.
    - ``ep_cf<x>`` and ``deepspeed_cf<x>``: the same number of dropped assignments at every warm-up step.
    - Capacity modes drop tokens, so their losses differ by design: their difference from ``ep`` is reported.
    """
    a = s.args
    rtol = 1e-4 if s.amp_dtype is None else 2e-2
    by_name = {x.name: x for x in systems}
    losses = {x.name: _mean_over_ranks(x.losses, s.device) for x in systems}
    report: dict[str, Any] = {"rtol": rtol, "first_step_loss": {n: v[0] for n, v in losses.items()}, "warmup_losses": losses}
    matched = [n for n in MATCHED if n in losses]
    if len(matched) > 1:
        report["first_step_abs_diff"] = check_agreement(
            f"{workload}: cross-entropy at the first step", {n: losses[n][0] for n in matched}, rtol=rtol)
        same_objective = a.aux_loss_coef == 0 and a.z_loss_coef == 0
        warm = [n for n in matched if same_objective or n != "deepspeed"]
        report["warmup_compared"] = warm
        if len(warm) > 1:
            report["warmup_abs_diff"] = check_agreement(
                f"{workload}: cross-entropy at the {a.warmup} warm-up steps", {n: losses[n] for n in warm}, rtol=rtol)
    routed = [x for x in systems if x.spec.kind == "deepspeed"]
    if routed:
        params = _workload_params(s)
        expected = [torch.bincount(idx.flatten().cpu(), minlength=a.experts).float() for idx in forced_last]
        ok = all(torch.equal(m.last_stats.tokens_per_expert.cpu(), e) for x in routed for m, e in
                 zip(x.model.moe_layers(), expected))
        flag = torch.tensor([float(ok)], device=s.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not flag.item():
            raise NumericalDisagreement(f"{workload}: DeepSpeed's per-expert counts differ from the forced routing "
                                        f"({params}); its gate did not follow the workload")
        report["deepspeed_routing_identical"] = True
    report["capacity_modes"] = {}
    for x in systems:
        if not x.spec.capacity_factor:
            continue
        entry: dict[str, Any] = {"dropped_per_warmup_step_all_ranks": [v * s.world for v in _mean_over_ranks(
            [float(d) for d in x.warmup_dropped], s.device)]}
        if "ep" in losses:
            entry["first_step_rel_diff_vs_ep"] = abs(losses[x.name][0] - losses["ep"][0]) / abs(losses["ep"][0])
            entry["warmup_max_rel_diff_vs_ep"] = _max_rel(losses[x.name], losses["ep"])
        report["capacity_modes"][x.name] = entry
    for x in systems:  # ours with a capacity vs DeepSpeed with the same capacity factor: the same drops
        twin = f"deepspeed_cf{x.name[len('ep_cf'):]}" if x.spec.kind == "ep" and x.spec.capacity_factor else None
        if twin in by_name:
            modes = report["capacity_modes"]
            check_agreement(f"{workload}: assignments dropped per warm-up step at capacity factor {x.spec.capacity_factor}",
                            {x.name: modes[x.name]["dropped_per_warmup_step_all_ranks"],
                             twin: modes[twin]["dropped_per_warmup_step_all_ranks"]}, rtol=0.0, atol=0.0)
            modes[x.name][f"warmup_max_rel_diff_vs_{twin}"] = _max_rel(losses[x.name], losses[twin])
    logger.info("%s: first-step cross-entropy %s", workload,
                ", ".join(f"{n} {v:.6f}" for n, v in report["first_step_loss"].items()))
    return report


# --------------------------------------------------------------------------------------------
# rank body


def run_rank(args: argparse.Namespace) -> None:
    """The body of one rank: init, data, FSSDP's t, every workload, gather, write (rank 0).

    A numerical disagreement ends every rank with exit code 3 after rank 0 printed one line naming it.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    level = logging.getLevelName(args.log_level.upper()) if rank == 0 else logging.WARNING
    setup_logging(rank if world > 1 else None, level)
    for name in ("system", "system.parallel.fssdp.apply"):  # keep the library quiet unless asked
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=10), device_id=device)
        amp = torch.bfloat16
        args.pinned_cpus = None
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
        args.pinned_cpus = None if args.no_pin else _pin_cpu(local_rank, args.threads, world)
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
        amp = None
    _, moe_cfg, train_cfg = model_configs(args)
    s = Setup(args, rank, world, device, amp, max_grad_norm=train_cfg.max_grad_norm, load_balance=moe_cfg.load_balance)
    from system.distributed.init import shutdown_distributed

    try:
        _run(s)
    except NumericalDisagreement as e:
        if rank == 0:
            print(f"expert_parallel benchmark ABORTED: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    shutdown_distributed()  # success only: after an exception the launcher stops the peers


def _run(s: Setup) -> None:
    from system.distributed import ParallelDims

    a = s.args
    importlib.import_module("system.models.parallelize")  # its imports happen before gc.freeze() below
    if any(Spec.parse(n).kind == "deepspeed" for n in a.system_list):
        import deepspeed
        import deepspeed.moe.layer  # noqa: F401

        deepspeed.init_distributed(dist_backend="nccl" if s.device.type == "cuda" else "gloo")
    s.meshes["ep"] = ParallelDims.from_config(dp=1, ep=s.world, world_size=s.world).build_mesh(s.device.type)
    s.meshes["fssdp"] = ParallelDims.from_config(dp=s.world, ep=1, world_size=s.world).build_mesh(s.device.type)
    t0 = time.perf_counter()
    batches = build_batches(s, a.warmup + a.repeats * a.iters)
    base = build_base(s)
    n_params, n_active = base.num_params()
    logger.info("model %.2fM params (%.2fM active), %d tokens/rank/step; data ready in %.1f s",
                n_params / 1e6, n_active / 1e6, a.batch_size * a.seq_len, time.perf_counter() - t0)
    # Every gc.collect() before a timed repeat would otherwise walk the libraries' objects (0.1-0.5 s each).
    gc.collect()
    gc.freeze()
    load_at_start = list(os.getloadavg())
    overlap = measure_overlap_budget(s, base, batches) if "fssdp" in a.system_list else None
    s.overlap_budget = overlap["t"] if overlap else None
    results: dict[str, Any] = {}
    for workload in a.workload_list:
        t_w = time.perf_counter()
        results[workload] = run_workload(s, workload, base, batches)
        logger.info("%s done in %.1f s", workload, time.perf_counter() - t_w)
    gathered: list[Any] = [None] * s.world
    dist.all_gather_object(gathered, {"pinned_cpus": a.pinned_cpus,
                                      "workloads": {w: r["per_rank"] for w, r in results.items()}})
    if s.rank == 0:
        write_results(s, results, gathered, (n_params, n_active), load_at_start, overlap)


# --------------------------------------------------------------------------------------------
# results


def summarize_workload(s: Setup, workload: str, res: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-system summaries and per-rank facts of one workload (ratios are added by :func:`add_ratios`)."""
    a = s.args
    global_tokens = a.batch_size * a.seq_len * s.world
    params = _workload_params(s)
    timed = range(a.warmup, a.warmup + a.repeats * a.iters)
    stats = workload_stats(workload, timed, a.layers, a.batch_size * a.seq_len, s.world, params)
    if workload == "rotating":
        stats["hot_expert_layer0_timed_steps"] = [hot_expert(workload, 0, t, params) for t in timed]
    useful = a.batch_size * a.seq_len * a.top_k * a.layers  # T*k per layer per rank: the even share of expert rows
    systems: dict[str, Any] = {}
    for name, secs in res["samples"].items():
        mine = [r["workloads"][workload] for r in ranks]
        per_layer = [r["systems"][name]["expert_rows_per_step_per_layer"] for r in mine]  # [rank][layer]
        dropped = sum(r["systems"][name]["dropped_per_step"] for r in mine)
        made = sum(r["systems"][name]["assignments_per_step"] for r in mine)
        entry: dict[str, Any] = {
            "tokens_per_s": summarize([global_tokens * a.iters / t for t in secs]),
            "step_ms_slowest_rank": summarize([1e3 * t / a.iters for t in secs]),
            "samples_s_per_repeat": secs,
            "peak_rss_bytes_per_rank": [r["rss_peak"][name] for r in mine],
            "peak_gpu_bytes_per_rank": [r["gpu_peak"][name] for r in mine] if s.device.type == "cuda" else None,
            "expert_rows_per_step_per_rank_per_layer": per_layer,
            # Each layer's all-to-all waits for its busiest rank: sum over layers of the max, over the even share.
            "busiest_rank_rows_over_even": sum(max(col) for col in zip(*per_layer)) / useful,
            "dropped_assignments_per_step_all_ranks": dropped,
            "assignments_per_step_all_ranks": made,
            "drop_rate": dropped / made if made else math.nan,
        }
        first = mine[0]["systems"][name]
        if "fssdp" in first:
            metrics = [r["systems"][name]["fssdp"]["metrics"] for r in mine]
            gather = [m["fssdp/gather_bytes_per_step"] for m in metrics]
            reduce = [m["fssdp/reduce_bytes_per_step"] for m in metrics]
            entry["fssdp"] = {
                "overlap_budget_t": first["fssdp"]["overlap_budget"],
                "replicas_per_expert_end": first["fssdp"]["replicas_per_expert"],
                "owner_per_expert_end": first["fssdp"]["owner_per_expert"],
                "reshard_points_passed": (a.warmup + a.repeats * a.iters) // fssdp_config(a).reshard_interval
                if fssdp_config(a).reshard_interval else 0,
                "gather_bytes_per_step_per_rank": gather,
                "reduce_bytes_per_step_per_rank": reduce,
                "bytes_moved_per_step_total": sum(gather) + sum(reduce),
                "metrics_per_rank": metrics,
            }
        if "capacity_last_step_per_layer" in first:
            entry["deepspeed_capacity_last_step_per_layer"] = first["capacity_last_step_per_layer"]
        systems[name] = entry
    return {"description": describe_workload(workload, a), "workload": stats, "agreement": res["agreement"],
            "systems": systems, "ratios": {}}


def add_ratios(s: Setup, workloads: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ratio of every workload, from paired per-repeat samples; returns the goals (a subset).

    Goals (thresholds from the command line): FSSDP/EP tokens/s ``>= --goal-balanced`` on ``balanced`` and
    ``>= --goal-skew-speedup`` on the others; FSSDP's step time on a skewed workload over its step time on
    ``balanced`` ``<= --goal-skew-step``, paired by repeat index (repeat i of both workloads). The other ratios
    are comparisons against parity (1.0: "met" = the numerator is faster with 95% confidence).
    """
    a = s.args
    names = a.system_list
    goals = []
    for wname, w in workloads.items():
        tps = {n: _per_repeat_tps(s, w, n) for n in names}
        pairs: list[tuple[str, str, float, bool]] = []  # (num, den, goal, is_goal)
        if "fssdp" in names and "ep" in names:
            pairs.append(("fssdp", "ep", a.goal_balanced if wname == "balanced" else a.goal_skew_speedup, True))
        for ds in (n for n in names if Spec.parse(n).kind == "deepspeed"):
            if "ep" in names:
                pairs.append((ds, "ep", 1.0, False))
            if "fssdp" in names:
                pairs.append(("fssdp", ds, 1.0, False))
        for ours in (n for n in names if Spec.parse(n).kind == "ep" and Spec.parse(n).capacity_factor):
            twin = "deepspeed_cf" + ours[len("ep_cf"):]
            pairs += [(ours, "ep", 1.0, False)] + ([(ours, twin, 1.0, False)] if twin in names else [])
        for num, den, goal, is_goal in pairs:
            r = ratio_goal(f"{num}/{den} tokens/s", tps[num], tps[den], goal)
            r["kind"] = "goal" if is_goal else "comparison"
            w["ratios"][f"{num}/{den}"] = r
            if is_goal:
                goals.append({"workload": wname, **r})
        bal = workloads.get("balanced")
        if wname != "balanced" and bal is not None and "fssdp" in names:
            step = [1e3 * t / a.iters for t in w["systems"]["fssdp"]["samples_s_per_repeat"]]
            bal_step = [1e3 * t / a.iters for t in bal["systems"]["fssdp"]["samples_s_per_repeat"]]
            r = ratio_goal("fssdp step time / fssdp balanced step time (paired by repeat index)", step, bal_step,
                           a.goal_skew_step, higher_is_better=False)
            r["kind"] = "goal"
            w["ratios"]["fssdp_step/fssdp_balanced_step"] = r
            goals.append({"workload": wname, **r})
    return goals


def _per_repeat_tps(s: Setup, w: dict[str, Any], name: str) -> list[float]:
    a = s.args
    return [a.batch_size * a.seq_len * s.world * a.iters / t for t in w["systems"][name]["samples_s_per_repeat"]]


def write_results(s: Setup, results: dict[str, Any], gathered: list[dict[str, Any]], params: tuple[int, int],
                  load_at_start: list[float], overlap: dict[str, Any] | None) -> None:
    """Summarise every workload and write ``expert_parallel_<device><tag>.json`` and ``.md``."""
    a = s.args
    workloads = {w: summarize_workload(s, w, res, gathered) for w, res in results.items()}
    goals = add_ratios(s, workloads)
    model_cfg, moe_cfg, train_cfg = model_configs(a)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    config = {k: v for k, v in vars(a).items() if k not in ("pinned_cpus", "corpus_info", "perturb_system")}
    config.update(
        world_size=s.world, tokens_per_rank_per_step=a.batch_size * a.seq_len,
        global_tokens_per_step=a.batch_size * a.seq_len * s.world, amp_dtype=str(s.amp_dtype) if s.amp_dtype else "fp32",
        model=asdict(model_cfg), moe=asdict(moe_cfg), training=asdict(train_cfg),
        fssdp=asdict(fssdp_config(a, s.overlap_budget)) if s.overlap_budget is not None else asdict(fssdp_config(a)),
        params_total=params[0], params_active=params[1], data=getattr(a, "corpus_info", None),
        pinned_cpus=[r["pinned_cpus"] for r in gathered],
        cpus_available=a.cpus_available,
        oversubscribed=s.device.type == "cpu" and s.world * a.threads > (a.cpus_available or cpus),
    )
    first_info = next(iter(results.values()))["info"] if results else {}
    rss_reset_ok = all(r["workloads"][w]["rss_reset_ok"] for r in gathered for w in r["workloads"])
    result = {
        "benchmark": "expert_parallel",
        "description": "training-step throughput under routing imbalance: EP vs FSSDP (Hecate) vs DeepSpeed-MoE",
        "provenance": provenance(["deepspeed"]),
        "config": config,
        "loadavg_1_5_15": {"start": load_at_start, "end": list(os.getloadavg())},
        "method": {
            "step": "system.train.step.train_step for every system (forward, CE + MoE aux losses, backward, gradient "
            "sync, global-norm clipping, AdamW, LR schedule; FSSDP begin/end_step); DeepSpeed through "
            "train_step(sync_and_clip=) built from system.parallel.grads.all_reduce_grads + clip_by_global_norm_",
            "routing": "forced [T, k] expert ids per (workload, seed, step, layer, rank), exact per-expert counts, "
            "k distinct experts per token; identical for every system",
            "timing": "per workload: systems built from the same initial weights, the same warm-up steps, agreement "
            "check, then repeats with the order of the systems rotated per repeat (benchmarks.common.rotated); each "
            "repeat times --iters steps between barriers; the repeat's time is the slowest rank's",
            "statistics": "every ratio: median of the paired per-repeat ratios with a 95% percentile-bootstrap "
            "interval (benchmarks.common.ratio_goal); verdict 'met' only when the whole interval clears the goal",
            "skew_step_pairing": "FSSDP's skewed/balanced step time pairs repeat i of the skewed workload with repeat i "
            "of balanced: the same position in each workload's run, not the same moment (workloads run one after "
            "another), so a drift of the machine between workloads is not removed",
            "agreement": "matched systems (ep, fssdp, deepspeed): cross-entropy of the first and of every warm-up step "
            "within rtol (else the run aborts); capacity modes: loss difference and drops reported, not checked",
            "fssdp_overlap_budget": overlap,
            "peak_rss": "VmHWM reset before each repeat of a system; max over its repeats; includes the process "
            "baseline (interpreter, libraries, data, all systems' models of the workload)"
            + ("" if rss_reset_ok else " [reset unavailable: peak since process start]"),
            "expert_rows": "token copies the experts of a rank computed per step; DeepSpeed: E*C per layer (padded)",
            "drop_rate": "assignments evicted by the capacity (DeepSpeed: its sparse routes' index -1; ours: "
            "MoEStats.dropped) over all assignments, timed steps, all ranks",
        },
        "systems": first_info,
        "workloads": workloads,
        "goals": goals,
    }
    out_dir = Path(a.out)
    stem = f"expert_parallel_{a.device}{a.tag}"
    json_path = write_json(out_dir / f"{stem}.json", result)
    md_path = write_text(out_dir / f"{stem}.md", render_markdown(s, result))
    logger.info("wrote %s and %s", json_path, md_path)


def _x(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _e(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1e}"


def _interval(r: dict[str, Any]) -> str:
    return f"[{_x(r['ci_low'])}, {_x(r['ci_high'])}] (width {_x(r['ci_high'] - r['ci_low'])})"


def render_markdown(s: Setup, result: dict[str, Any]) -> str:
    """The markdown report: stamp, setup, throughput, goals, comparisons, capacity modes, details, notes."""
    a = s.args
    cfg = result["config"]
    wl = result["workloads"]
    names = a.system_list
    fcfg = cfg["fssdp"]
    over = result["method"]["fssdp_overlap_budget"]
    rows = []
    for w, r in wl.items():
        sy = r["systems"]
        rows.append([w, f"{r['workload']['load_max_over_mean']:.2f}", f"{r['workload']['ep_busiest_rank_over_even']:.2f}"]
                    + [f"{sy[n]['tokens_per_s']['median']:,.0f}" for n in names]
                    + [f"{sy[n]['step_ms_slowest_rank']['median']:.0f}" for n in names])
    headers = ["workload", "max/mean expert load", "EP busiest rank / even"]
    headers += [f"{n} tokens/s" for n in names] + [f"{n} step ms" for n in names]
    goal_rows = [[g["workload"], f"{g['name']} {g['direction']} {g['goal']:g}", _x(g["median"]), _interval(g),
                  f"**{g['verdict']}**", g["note"]] for g in result["goals"]]
    cmp_rows = [[w, k, _x(r["median"]), _interval(r), r["verdict"]]
                for w, d in wl.items() for k, r in d["ratios"].items() if r["kind"] == "comparison"]
    cap_rows = []
    for w, d in wl.items():
        modes = d["agreement"].get("capacity_modes", {})
        for n, m in modes.items():
            sy = d["systems"][n]
            cap = sy.get("deepspeed_capacity_last_step_per_layer")
            twin = [f"{k[len('warmup_max_rel_diff_vs_'):]} {_e(v)}" for k, v in m.items()
                    if k.startswith("warmup_max_rel_diff_vs_") and not k.endswith("_vs_ep")]
            cap_rows.append([w, n, f"{sy['drop_rate']:.2%}", _e(m.get("first_step_rel_diff_vs_ep")),
                             _e(m.get("warmup_max_rel_diff_vs_ep")) + (f" ({', '.join(twin)})" if twin else ""),
                             " ".join(map(str, cap)) if cap else "n/a"])
    d_rows = []
    for w, d in wl.items():
        sy = d["systems"]
        fs = sy.get("fssdp", {}).get("fssdp")
        row = [w] + [format_bytes(max(sy[n]["peak_rss_bytes_per_rank"])) for n in names]
        row += [f"{sy[n]['busiest_rank_rows_over_even']:.2f}" for n in names]
        row += ([" ".join(str(int(v)) for v in fs["replicas_per_expert_end"][0]), f"{fs['bytes_moved_per_step_total'] / 2**20:.1f}"]
                if fs else ["n/a", "n/a"])
        ag = d["agreement"]
        row.append(", ".join(f"{k} {v:.0e}" for k, v in (ag.get("warmup_abs_diff") or ag.get("first_step_abs_diff") or {}).items()))
        d_rows.append(row)
    d_headers = ["workload"] + [f"{n} peak RSS/rank" for n in names] + [f"{n} expert rows, busiest rank / even" for n in names]
    d_headers += ["FSSDP replicas/expert (layer 0, end)", "FSSDP MiB moved/step (all ranks)", "max abs CE diff vs ep (warm-up)"]
    oversub = (f" **Oversubscribed: {s.world} processes x {a.threads} thread(s) on {cfg['cpus_available']} cores; "
               "ranks time-share cores, so step times include waiting for a core.**" if cfg["oversubscribed"] else "")
    fssdp_line = ""
    if over:
        est = f"; estimates {over['estimates']}" if over["estimates"] else ""
        fssdp_line = (f"FSSDP: w={fcfg['load_window']}, m={fcfg['memory_budget']}, t={fcfg['overlap_budget']} for every "
                      f"workload ({over['source']}{est}), R={fcfg['reshard_interval']}, "
                      f"RM={'on' if fcfg['rematerialize'] else 'off'}, prefetch {'on' if fcfg.get('prefetch') else 'off'}.")
    lines = [
        f"# Training step under routing imbalance: {', '.join(names)} ({a.device}, {s.world} processes)",
        "",
        provenance_markdown(result["provenance"]),
        f"MoETransformer d={a.dim}, {a.layers} layers (all MoE), {a.heads} heads, E={a.experts} SwiGLU experts "
        f"(hidden {a.expert_dim}), top-{a.top_k}; {cfg['params_total'] / 1e6:.1f}M params ({cfg['params_active'] / 1e6:.1f}M "
        f"active); {a.batch_size}x{a.seq_len} = {cfg['tokens_per_rank_per_step']} tokens/rank/step x {s.world} ranks; "
        f"{cfg['amp_dtype']}; aux/z loss coefficients {a.aux_loss_coef:g}/{a.z_loss_coef:g}. Every step is "
        f"`system.train.step.train_step`. {a.warmup} warm-up steps per system, then {a.repeats} repeats x {a.iters} "
        f"step(s), order rotated per repeat; a repeat's time is the slowest rank's. "
        f"{'NCCL, 1 GPU' if s.device.type == 'cuda' else f'Gloo, {a.threads} thread(s)'} per rank.{oversub} "
        + fssdp_line,
        "",
        "Median tokens/s and slowest-rank step time per repeat:",
        "",
        markdown_table(headers, rows),
        "Goals (median of paired per-repeat ratios, 95% bootstrap interval; met only when the whole interval clears "
        "the goal):",
        "",
        markdown_table(["workload", "goal", "median", "95% interval", "verdict", "note"], goal_rows,
                       align=["l", "l", "r", "l", "l", "l"]),
        "Comparisons (paired per-repeat tokens/s ratios against parity 1.0; met = the numerator is faster):",
        "",
        markdown_table(["workload", "ratio", "median", "95% interval", "verdict"], cmp_rows, align=["l", "l", "r", "l", "l"]),
    ]
    if cap_rows:
        lines += ["Capacity modes (they drop assignments, so their loss differs by design; not an agreement check):", "",
                  markdown_table(["workload", "system", "drop rate", "first-step CE rel. diff vs ep",
                                  "warm-up max CE rel. diff vs ep (vs its twin)", "DeepSpeed capacity C per layer (last step)"],
                                 cap_rows, align=["l", "l", "r", "r", "r", "r"])]
    lines += [markdown_table(d_headers, d_rows), "Notes:", "",
              "- Workloads: " + "; ".join(f"`{w}`: {r['description']}" for w, r in wl.items()) + ". 'EP busiest rank / "
              "even' is the busiest EP rank's share of the expert rows over 1/W; 'expert rows, busiest rank / even' is "
              "measured (per layer the busiest rank's rows, summed over layers, over the even share T*k; DeepSpeed: E*C "
              "padded rows).",
              "- " + result["method"]["skew_step_pairing"] + ".",
              "- A verdict 'not distinguishable' means the interval straddles the goal: more repeats (or a quieter "
              "machine) were needed to decide.",
              "- DeepSpeed: `deepspeed` is the configuration matched to ours (dropless; every expert padded to the "
              "largest per-rank load over the EP group); `deepspeed_cf<x>` are its recommended defaults with capacity "
              "factor x. Their gates are forced to the same assignments; gradients go through our gradient code.",
              f"- Load average (1, 5, 15 min) at start {', '.join(f'{v:.1f}' for v in result['loadavg_1_5_15']['start'])}, "
              f"at end {', '.join(f'{v:.1f}' for v in result['loadavg_1_5_15']['end'])}.",
              ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# launch


def _spawned_rank(local_rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    """Entry of a process started by :func:`main` (``torch.multiprocessing`` spawn)."""
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run_rank(args)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark: under torchrun (env set) run this rank; else spawn ``--nproc`` ranks."""
    args = parse_args(argv)
    args.cpus_available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.nproc = int(os.environ["WORLD_SIZE"])
        validate_args(args)
        run_rank(args)
        return
    validate_args(args)
    setup_logging(None, logging.getLevelName(args.log_level.upper()))
    logger.info("spawning %d processes (%s): systems %s, workloads %s", args.nproc, args.device,
                ",".join(args.system_list), " ".join(args.workload_list))
    import torch.multiprocessing as mp

    try:
        mp.start_processes(_spawned_rank, args=(args.nproc, free_port(), args), nprocs=args.nproc, start_method="spawn")
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        raise SystemExit(f"expert_parallel benchmark failed: {str(e).strip().splitlines()[0]}") from None


if __name__ == "__main__":
    main()
