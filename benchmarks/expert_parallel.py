"""Training-step throughput under routing imbalance: expert parallelism vs FSSDP vs DeepSpeed-MoE.

The same small :class:`~system.models.model.MoETransformer`, the same text, the same initial weights
and the *same expert assignments* are trained by three systems on the same ranks:

- ``ep``: our expert parallelism (``parallel.ep = W``, ``expert_mode = "ep"``): rank j keeps experts
  ``[j*E/W, (j+1)*E/W)``, uneven all-to-all, dropless, no padding.
- ``fssdp``: our FSSDP (Hecate, arXiv 2502.02581; ``expert_mode = "fssdp"``, ``ep = 1``, ``dp = W``)
  with the paper defaults of :class:`~system.config.fssdp.FSSDPConfig` (load window w=5, memory
  budget m=2, overlap budget t estimated at step 2, re-sharding every R=100 steps), driven by
  ``controller.begin_step()`` / ``controller.end_step(optimizer)`` exactly as the trainer does.
- ``deepspeed``: the same model with each MoE layer's expert computation replaced by
  ``deepspeed.moe.layer.MoE`` (``ep_size = W``, ``drop_tokens=False``, ``use_rts=False``, no
  Gumbel sampling), router and experts copied from ours. Its gate is forced to the workload's
  assignments (see :class:`ForcedDeepSpeedGate`); everything after the choice of experts is
  DeepSpeed's own code: its dropless gating sets the capacity C to the largest per-rank expert load
  over the EP group and pads every expert to C, and its all-to-alls move dense ``[E, C, d]`` buffers.
  Its load-balancing loss is DeepSpeed's definition, and it has no router z-loss.

A step is the real training step of :meth:`system.train.trainer.Trainer.train_step` (one micro-batch):
forward, cross-entropy + MoE auxiliary losses, backward, gradient synchronisation (dense gradients
averaged over all ranks; expert gradients divided by W), global-norm clipping, AdamW, LR schedule,
and for FSSDP the controller calls around it.

Routing workloads. Every MoE router's choice is overridden (``TopKRouter.forced_indices``) by a
seeded generator that gives, for each (workload, seed, step, layer, rank), ``[T, k]`` expert ids with
k distinct experts per token and *exact* per-expert counts (largest-remainder rounding of the
workload's expert shares): ``balanced`` (uniform), ``one_hot`` (one expert per layer takes
``--one-hot-share`` of the assignments, 50%), ``hot_rank`` (the experts of EP rank 0 take
``--hot-rank-share``, 80%), ``zipf<s>`` (expert popularity ~ 1/rank^s over a seeded per-layer
permutation, e.g. ``zipf1.0``, ``zipf1.5``), ``rotating`` (like ``one_hot``, but the hot expert moves
to the next expert every ``--rotate-every`` steps). No expert can take more than 1/k of the
assignments (each token picks it at most once); shares above that are capped and the excess spread
proportionally over the other experts. Data: real text (the default corpus of ``system.data``,
byte tokenizer, packed windows), identical batches for every system.

Method: all systems of a workload are built in the same W-process run (one process per CPU core,
one intra-op thread, Gloo), checked to give the same first-step loss, warmed up (``--warmup`` steps,
long enough for FSSDP's moving-average load to settle), then timed in interleaved repeats
(ep, fssdp, deepspeed, ep, ...). A repeat times ``--iters`` steps between two barriers; its time is
the slowest rank's. Every system sees the same step-indexed sequence of batches and assignments.
Reported per workload: median tokens/s and slowest-rank step time, ratios, peak RSS per rank,
expert rows computed per rank, FSSDP placement and traffic, DeepSpeed's capacity and padding.

Usage (from the repository root)::

    python benchmarks/expert_parallel.py                       # CPU default: all workloads, 2 processes
    python benchmarks/expert_parallel.py --workloads one_hot zipf1.5 --repeats 3
    python benchmarks/expert_parallel.py --smoke               # tiny config, well under a minute
    python benchmarks/expert_parallel.py --device cuda --nproc 8   # NCCL, bf16 autocast (UNTESTED)
    torchrun --standalone --nproc-per-node 2 benchmarks/expert_parallel.py

Writes ``<out>/expert_parallel_<device><tag>.json`` and ``.md`` (``--smoke`` adds the tag ``_smoke``).

The CUDA path (NCCL, bf16 autocast, CUDA synchronisation around timing, peak GPU memory) is
UNTESTED ON GPU: it was written without access to one and may need small fixes on first use.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import hashlib
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Stopwatch,
    current_rss_bytes,
    fill_defaults,
    format_bytes,
    free_port,
    host_info,
    markdown_table,
    package_versions,
    peak_rss_bytes,
    reset_peak_rss,
    setup_logging,
    summarize,
    write_json,
    write_text,
)
from benchmarks.moe_layer import SwiGLU, _importable, _pin_cpu  # noqa: E402

logger = logging.getLogger("benchmarks.expert_parallel")

SYSTEMS = ("ep", "fssdp", "deepspeed")
ALL_WORKLOADS = ("balanced", "one_hot", "hot_rank", "zipf1.0", "zipf1.5", "rotating")
_ZIPF = re.compile(r"^zipf(\d+(?:\.\d+)?)$")

# Goals of the issue (printed with met / not met).
GOAL_SKEW_SPEEDUP = 1.5  # skewed: FSSDP tokens/s >= 1.5x EP
GOAL_SKEW_FLAT = 1.2  # skewed: FSSDP slowest-rank step time <= 1.2x its balanced step time
GOAL_BALANCED_TOL = 0.05  # balanced: FSSDP within 5% of EP

CPU_DEFAULTS = dict(dim=256, layers=2, heads=4, expert_dim=1024, seq_len=256, batch_size=8,
                    warmup=8, repeats=5, iters=3)
SMOKE_DEFAULTS = dict(dim=64, layers=2, heads=2, expert_dim=128, seq_len=64, batch_size=2,
                      warmup=6, repeats=2, iters=2)
CUDA_DEFAULTS = dict(dim=1024, layers=8, heads=16, expert_dim=2816, seq_len=1024, batch_size=8,
                     warmup=10, repeats=7, iters=10)


# --------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; device- and smoke-dependent defaults are filled in afterwards."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workloads", nargs="+", default=None,
                   help=f"routing workloads (space or comma separated; default all: {' '.join(ALL_WORKLOADS)}); "
                   "zipf<s> takes any exponent s")
    p.add_argument("--systems", default="ep,fssdp,deepspeed", help=f"comma list from {','.join(SYSTEMS)}")
    p.add_argument("--smoke", action="store_true", help="tiny model and few steps (end-to-end check, < 1 min)")
    p.add_argument("--repeats", type=int, help="timed repeats per system (interleaved); cpu 5, smoke 2, cuda 7")
    p.add_argument("--iters", type=int, help="training steps per repeat; cpu 3, smoke 2, cuda 10")
    p.add_argument("--warmup", type=int, help="untimed steps per system first (>= fssdp load window + 1); cpu 8")
    p.add_argument("--nproc", type=int, default=None, help="processes = EP degree = FSSDP ranks (cpu 2, cuda: GPUs)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process on CPU")
    p.add_argument("--dim", type=int, help="model width (cpu 256)")
    p.add_argument("--layers", type=int, help="transformer blocks, all MoE (cpu 2)")
    p.add_argument("--heads", type=int, help="attention heads (cpu 4)")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (DeepSpeed: 1 or 2)")
    p.add_argument("--expert-dim", type=int, help="SwiGLU expert hidden size (cpu 1024 = 4x dim)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (cpu 256)")
    p.add_argument("--batch-size", type=int, help="sequences per rank per step (cpu 8: 2048 tokens/rank)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (constant after step 0)")
    p.add_argument("--data", default="", help="corpus path for system.data.load_corpus ('' = embedded default)")
    p.add_argument("--seed", type=int, default=1234, help="model init, data order and workload seed")
    p.add_argument("--one-hot-share", type=float, default=0.5, help="one_hot/rotating: share of the hot expert")
    p.add_argument("--hot-rank-share", type=float, default=0.8, help="hot_rank: share of EP rank 0's experts")
    p.add_argument("--rotate-every", type=int, default=4, help="rotating: steps between hotspot moves")
    p.add_argument("--fssdp-memory-budget", type=int, help="override FSSDPConfig.memory_budget (m, paper 2)")
    p.add_argument("--fssdp-overlap-budget", type=int, help="override FSSDPConfig.overlap_budget (t; -1 estimate)")
    p.add_argument("--fssdp-reshard-interval", type=int, help="override FSSDPConfig.reshard_interval (R, paper 100)")
    p.add_argument("--fssdp-rematerialize", action="store_true", help="FSSDPConfig.rematerialize = True")
    p.add_argument("--fssdp-set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any other FSSDPConfig field (repeatable), e.g. --fssdp-set prefetch=false")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="time the systems even when their first-step losses disagree (recorded in the JSON)")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")
    p.add_argument("--tag", default=None, help="suffix of the result files (default '' or '_smoke')")
    p.add_argument("--no-pin", action="store_true", help="do not pin CPU ranks to one core each")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    fill_defaults(args, CUDA_DEFAULTS if args.device == "cuda" else (SMOKE_DEFAULTS if args.smoke else CPU_DEFAULTS))
    if args.nproc is None:
        args.nproc = max(torch.cuda.device_count(), 1) if args.device == "cuda" else 2
    if args.tag is None:
        args.tag = "_smoke" if args.smoke else ""
    names = [w for item in (args.workloads or list(ALL_WORKLOADS)) for w in item.split(",") if w]
    args.workload_list = list(dict.fromkeys(names))
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Raise ``SystemExit`` with a clear message for impossible settings or missing peers."""
    from system.config.fssdp import FSSDPConfig

    errors = []
    for w in args.workload_list:
        if w not in ("balanced", "one_hot", "hot_rank", "rotating") and not _ZIPF.match(w):
            errors.append(f"unknown workload {w!r}; choose from {', '.join(ALL_WORKLOADS)} (zipf<s> for any s)")
    unknown = [s for s in args.system_list if s not in SYSTEMS]
    if unknown or not args.system_list or len(set(args.system_list)) != len(args.system_list):
        errors.append(f"--systems {args.systems!r}: a comma list of distinct names from {list(SYSTEMS)}")
    if args.experts % args.nproc:
        errors.append(f"--experts {args.experts} must divide by --nproc {args.nproc} (the EP degree)")
    if not 1 <= args.top_k <= args.experts:
        errors.append(f"--top-k must be in [1, {args.experts}]")
    if "deepspeed" in args.system_list:
        if args.top_k not in (1, 2):
            errors.append("DeepSpeed-MoE's forced gate supports top-1 and top-2 (--top-k 1|2)")
        if not _importable("deepspeed"):
            errors.append("system 'deepspeed' needs DeepSpeed: pip install 'moe-system[peers]' (or drop it from --systems)")
    if args.dim % args.heads:
        errors.append(f"--dim {args.dim} must divide by --heads {args.heads}")
    if not 0 < args.one_hot_share <= 1 or not 0 < args.hot_rank_share <= 1:
        errors.append("--one-hot-share and --hot-rank-share must be in (0, 1]")
    if args.rotate_every < 1:
        errors.append("--rotate-every must be >= 1")
    if args.repeats < 1 or args.iters < 1 or args.warmup < 1:
        errors.append("--repeats, --iters and --warmup must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda but torch.cuda.is_available() is False")
    if args.device == "cuda" and torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
        errors.append(f"--nproc {args.nproc} > {torch.cuda.device_count()} visible GPUs")
    if args.nproc < 2:
        errors.append("--nproc must be >= 2 (expert parallelism and FSSDP need several ranks)")
    if errors:
        raise SystemExit("expert_parallel benchmark: " + "; ".join(errors))
    try:
        fssdp_config(args)
    except ValueError as e:
        raise SystemExit(f"expert_parallel benchmark: {e}") from e
    if "fssdp" in args.system_list and args.warmup < FSSDPConfig().load_window + 1:
        logging.getLogger(__name__).warning(
            "--warmup %d is shorter than FSSDP's load window + 1 (%d): its placement has not settled when timing starts",
            args.warmup, FSSDPConfig().load_window + 1,
        )


def fssdp_config(args: argparse.Namespace):
    """Paper defaults of :class:`FSSDPConfig`, with the command line's overrides."""
    from system.config.fssdp import FSSDPConfig

    cfg = FSSDPConfig()
    if args.fssdp_rematerialize:
        cfg.rematerialize = True
    for key in ("memory_budget", "overlap_budget", "reshard_interval"):
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
            value = text.lower() in ("1", "true", "yes", "on")
        else:
            value = type(default)(text)
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


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
    unchanged: softmax gates, normalised top-2 weights, locations, the dropless capacity (max expert
    load over the EP group), its aux loss.
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

    Installed as the instance's ``forward``; records the capacity C of each call.
    """

    def __init__(self, gate: nn.Module):
        from deepspeed.moe import sharded_moe

        self.gate = gate
        self.module = sharded_moe
        self.original = type(gate).forward
        self.forced_indices: torch.Tensor | None = None
        self.last_capacity = 0
        gate.forward = self.forward

    def forward(self, input: torch.Tensor, used_token=None, sparse_routes: bool = False, use_tutel: bool = False):  # noqa: A002
        forced = self.forced_indices
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
        if sparse_routes:  # (l_aux, capacity, E, indices, locations, gates, exp_counts)
            self.last_capacity = int(out[1])
        return out


class DeepSpeedFFN(nn.Module):
    """A block's FFN as ``deepspeed.moe.layer.MoE``; quacks like :class:`MoELayer` for the model.

    ``last_stats`` carries DeepSpeed's ``l_aux`` as ``aux_loss`` (its definition) and a zero z-loss
    (DeepSpeed has none), so :meth:`MoETransformer.aux_loss` works unchanged.
    """

    def __init__(self, moe: nn.Module, gate: ForcedDeepSpeedGate):
        super().__init__()
        self.moe = moe
        self._gate = gate
        self.last_stats: SimpleNamespace | None = None

    @property
    def forced_indices(self) -> torch.Tensor | None:
        return self._gate.forced_indices

    @forced_indices.setter
    def forced_indices(self, value: torch.Tensor | None) -> None:
        self._gate.forced_indices = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out, l_aux, exp_counts = self.moe(x)
        self.last_stats = SimpleNamespace(aux_loss=l_aux, z_loss=l_aux.new_zeros(()), exp_counts=exp_counts,
                                          capacity=self._gate.last_capacity)
        return out


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
    meshes: dict[str, Any] = field(default_factory=dict)


@dataclass
class System:
    """One system under test for one workload: model, optimizer, how to route and to sync."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    mesh: Any
    controller: Any = None  # FSSDPController under FSSDP
    step: int = 0
    resharded: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    rows: list[list[int]] = field(default_factory=list)  # per timed step: expert rows computed here, per MoE layer
    losses: list[float] = field(default_factory=list)  # local cross-entropy of the warm-up steps

    def moe_modules(self) -> list[nn.Module]:
        return self.model.moe_layers()


def model_configs(args: argparse.Namespace):
    """ModelConfig, MoEConfig and TrainingConfig of the benchmark model."""
    from system.config.model import ModelConfig
    from system.config.moe import MoEConfig
    from system.config.training import TrainingConfig
    from system.data import ByteTokenizer

    vocab = -(-ByteTokenizer.vocab_size // 64) * 64  # as resolve_vocab does
    model = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, ffn_dim=args.expert_dim,
                        vocab_size=vocab, max_seq_len=args.seq_len)
    moe = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_dim=args.expert_dim, capacity_factor=0.0)
    steps = args.warmup + args.repeats * args.iters
    train = TrainingConfig(steps=steps, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len,
                           lr=args.lr, warmup_steps=0)
    for cfg in (model, moe, train):
        cfg.validate()
    return model, moe, train


def build_base(s: Setup):
    """The initialised model every system starts from (identical on every rank)."""
    from system.models.model import MoETransformer

    model_cfg, moe_cfg, _ = model_configs(s.args)
    torch.manual_seed(s.args.seed)
    with torch.device(s.device):
        model = MoETransformer(model_cfg, moe_cfg)
    model.init_weights(seed=s.args.seed)
    return model


def _optimizer(model: nn.Module, args: argparse.Namespace):
    from system.train.optim import build_lr_scheduler, build_optimizer

    _, _, train_cfg = model_configs(args)
    opt = build_optimizer(model, train_cfg)
    return opt, build_lr_scheduler(opt, train_cfg)


def build_ep(s: Setup, base: nn.Module) -> System:
    """Our expert parallelism over all ranks (``parallel.ep = W``)."""
    from system.config.parallel import ParallelConfig
    from system.models.parallelize import parallelize_model
    from system.moe.experts import expert_kernel

    model = copy.deepcopy(base)
    par = ParallelConfig(dp=1, ep=s.world, expert_mode="ep")
    parallelize_model(model, s.meshes["ep"], par, param_dtype=s.amp_dtype)
    opt, sched = _optimizer(model, s.args)
    moe = model.moe_layers()[0]
    info = {
        "impl": "system MoETransformer + parallelize_model(parallel.ep=W): uneven all-to-all, dropless, no padding",
        "parallel": {"dp": 1, "ep": s.world, "expert_mode": "ep"},
        "expert_kernel": expert_kernel(s.device, s.amp_dtype or torch.float32, moe.experts.grouped_mm),
        "local_experts": moe.experts.num_local_experts,
    }
    return System("ep", model, opt, sched, s.meshes["ep"], info=info)


def build_fssdp(s: Setup, base: nn.Module) -> System:
    """Our FSSDP over all ranks (``expert_mode = "fssdp"``, ``ep = 1``, ``dp = W``)."""
    from dataclasses import asdict

    from system.config.parallel import ParallelConfig
    from system.models.parallelize import parallelize_model

    model = copy.deepcopy(base)
    par = ParallelConfig(dp=s.world, ep=1, expert_mode="fssdp")
    cfg = fssdp_config(s.args)
    controller = parallelize_model(model, s.meshes["fssdp"], par, param_dtype=s.amp_dtype, fssdp=cfg)
    opt, sched = _optimizer(model, s.args)
    info = {
        "impl": "system MoETransformer + parallelize_model(expert_mode='fssdp'): Hecate FSSDP (spAG/spRS, "
        "sparse materialization, topology-aware dispatch, heterogeneous re-sharding)",
        "parallel": {"dp": s.world, "ep": 1, "expert_mode": "fssdp"},
        "fssdp_config": asdict(cfg),
    }
    return System("fssdp", model, opt, sched, s.meshes["fssdp"], controller=controller, info=info)


def build_deepspeed(s: Setup, base: nn.Module) -> System:
    """The same model with every MoE FFN replaced by ``deepspeed.moe.layer.MoE`` (our weights copied)."""
    import inspect

    import deepspeed
    from deepspeed.moe.layer import MoE

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    a = s.args
    model = copy.deepcopy(base)
    kwargs: dict[str, Any] = dict(
        hidden_size=a.dim, num_experts=a.experts, ep_size=s.world, k=a.top_k,
        capacity_factor=1.0, eval_capacity_factor=1.0,  # unused when drop_tokens=False (capacity = max load)
        min_capacity=0, drop_tokens=False, use_rts=False,
    )
    if "top2_2nd_expert_sampling" in inspect.signature(MoE.__init__).parameters:
        kwargs["top2_2nd_expert_sampling"] = False
    ep_rank = None
    for block in model.layers:
        ours = block.moe
        if ours is None:
            continue
        with contextlib.ExitStack() as stack:  # DeepSpeed prints group creation to stdout
            sink = sys.stderr if s.rank == 0 else stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(sink))
            moe = MoE(expert=SwiGLU(a.dim, a.expert_dim), **kwargs)
            moe.set_deepspeed_parallelism()  # deepspeed.initialize() normally does this
        ds = moe.deepspeed_moe
        ep_rank = dist.get_rank(group=ds.ep_group)
        with torch.no_grad():
            ds.gate.wg.weight.copy_(ours.router.gate.weight)
            for i, expert in enumerate(ds.experts.deepspeed_experts):
                e = ep_rank * ds.num_local_experts + i  # DeepSpeed's all-to-all sends experts [j*nl, (j+1)*nl) to rank j
                expert.w1.weight.copy_(ours.experts.w1[e].t())
                expert.w3.weight.copy_(ours.experts.w3[e].t())
                expert.w2.weight.copy_(ours.experts.w2[e].t())
        moe.to(s.device)
        block.moe = DeepSpeedFFN(moe, ForcedDeepSpeedGate(ds.gate))
    opt, sched = _optimizer(model, a)
    info = {
        "impl": "MoETransformer with each MoE FFN = deepspeed.moe.layer.MoE (GShard-style dense [E, C, d] "
        "dispatch, dropless capacity = max expert load over the EP group); gate forced to the workload",
        "kwargs": {k: v for k, v in kwargs.items()},
        "ep_rank": ep_rank,
        "aux_loss": "DeepSpeed top2gating l_aux (its definition; first choices only) x moe.aux_loss_coef; no z-loss",
        "grad_sync": "dense grads averaged over all ranks; expert grads (param.allreduce=False) divided by W; "
        "global-norm clipping over both",
    }
    return System("deepspeed", model, opt, sched, None, info=info)


BUILDERS = {"ep": build_ep, "fssdp": build_fssdp, "deepspeed": build_deepspeed}


@torch.no_grad()
def _deepspeed_sync_and_clip(model: nn.Module, world: int, max_norm: float) -> torch.Tensor:
    """Gradient sync and clipping for the DeepSpeed model (what :mod:`system.parallel.grads` does for ours).

    Dense parameters: all-reduce, divide by W. Expert parameters (DeepSpeed marks them
    ``allreduce = False``): each expert lives on one rank (ep_size = W, so no expert data parallelism)
    and its gradient already sums every rank's tokens through the all-to-all backward: divide by W.
    The global norm counts dense gradients locally and expert gradients summed over ranks.
    """
    from system.parallel.grads import _ensure_grads, _flat_all_reduce

    params = [p for p in model.parameters() if p.requires_grad]
    dense = [p for p in params if getattr(p, "allreduce", True)]
    experts = [p for p in params if not getattr(p, "allreduce", True)]
    _flat_all_reduce(_ensure_grads(dense), dist.group.WORLD, 1.0 / world)
    _flat_all_reduce(_ensure_grads(experts), None, 1.0 / world)
    device = params[0].device
    local_sq = torch.zeros((), dtype=torch.float64, device=device)
    shared_sq = torch.zeros((), dtype=torch.float64, device=device)
    for p in dense:
        local_sq += p.grad.double().square().sum()
    for p in experts:
        shared_sq += p.grad.double().square().sum()
    dist.all_reduce(shared_sq)
    total = (local_sq + shared_sq).sqrt().float()
    if max_norm > 0:
        torch._foreach_mul_([p.grad for p in params], torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


# --------------------------------------------------------------------------------------------
# the training step


def set_routing(system: System, forced: list[torch.Tensor]) -> None:
    """Force each MoE layer's expert choices (``forced[layer]`` ``[T, k]``)."""
    for moe, idx in zip(system.moe_modules(), forced):
        if system.name == "deepspeed":
            moe.forced_indices = idx
        else:
            moe.router.forced_indices = idx


def _autocast(s: Setup):
    if s.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(s.device.type, dtype=s.amp_dtype)


def train_step(s: Setup, system: System, batch: tuple[torch.Tensor, torch.Tensor], forced: list[torch.Tensor],
               record_rows: bool = False) -> torch.Tensor:
    """One optimizer step, as :meth:`Trainer.train_step` with ``grad_accum = 1``; returns the local CE (detached)."""
    from system.parallel.grads import clip_grad_norm_, sync_gradients

    model, opt = system.model, system.optimizer
    set_routing(system, forced)
    model.train()
    opt.zero_grad(set_to_none=True)
    if system.controller is not None:
        system.controller.begin_step()
    inputs, targets = batch
    with _autocast(s):
        logits = model(inputs)
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    aux = model.aux_loss()
    (ce + aux).backward()
    if system.name == "deepspeed":
        _deepspeed_sync_and_clip(model, s.world, s.max_grad_norm)
    else:
        sync_gradients(model, system.mesh)
        clip_grad_norm_(model, system.mesh, s.max_grad_norm)
    opt.step()
    system.scheduler.step()
    if system.controller is not None:
        system.resharded += int(system.controller.end_step(opt))
    system.step += 1
    if record_rows:
        if system.name == "deepspeed":  # each rank's experts compute E * C rows (padded)
            system.rows.append([s.args.experts * m.last_stats.capacity for m in system.moe_modules()])
        else:
            system.rows.append([m.last_stats.expert_tokens for m in system.moe_modules()])
    return ce.detach()


# --------------------------------------------------------------------------------------------
# data


def build_batches(s: Setup, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``steps`` batches of real text (default corpus, byte tokenizer, packed windows)."""
    from system.data import ByteTokenizer, PackedLoader, load_corpus, tokenize_docs

    a = s.args
    corpus = load_corpus(a.data)
    tokenizer = ByteTokenizer()
    need = 4 * steps * s.world * a.batch_size * a.seq_len + 1  # a few times what is read: varied windows
    docs, total = [], 0
    for doc in corpus.train_docs:
        docs.append(doc)
        total += len(doc)
        if total >= need:
            break
    tokens = tokenize_docs(docs, tokenizer)
    loader = PackedLoader(tokens, seq_len=a.seq_len, batch_size=a.batch_size, rank=s.rank, world_size=s.world,
                          seed=a.seed)
    batches = [tuple(t.to(s.device) for t in loader.next_batch()) for _ in range(steps)]
    s.args.corpus_info = {"corpus": corpus.name, "tokens_used": int(len(tokens)), "docs_used": len(docs)}
    return batches


# --------------------------------------------------------------------------------------------
# one workload


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def run_workload(s: Setup, workload: str, base: nn.Module, batches: list) -> dict[str, Any]:
    """Build the systems, check agreement, warm up, time interleaved repeats; per-rank results."""
    a = s.args
    tokens = a.batch_size * a.seq_len
    total_steps = a.warmup + a.repeats * a.iters
    params = WorkloadParams(a.experts, a.top_k, s.world, a.seed, a.one_hot_share, a.hot_rank_share, a.rotate_every)
    forced = [[forced_indices(workload, step, layer, s.rank, tokens, params).to(s.device) for layer in range(a.layers)]
              for step in range(total_steps)]

    systems: list[System] = []
    for name in a.system_list:
        systems.append(BUILDERS[name](s, base))
    gc.collect()

    # Warm-up, system by system; the first steps' losses are the agreement check.
    for system in systems:
        for step in range(a.warmup):
            ce = train_step(s, system, batches[step], forced[step])
            system.losses.append(float(ce))
        _sync(s.device)
    check = check_agreement(s, systems, workload, forced[0])

    if "fssdp" in a.system_list:  # reset the per-step averages so they cover the timed steps only
        next(x for x in systems if x.name == "fssdp").controller.metrics()

    sync = (lambda: torch.cuda.synchronize(s.device)) if s.device.type == "cuda" else None
    samples: dict[str, list[float]] = {x.name: [] for x in systems}
    rss_peak = {x.name: 0 for x in systems}
    gpu_peak = {x.name: 0 for x in systems}
    rss_reset_ok = True
    for r in range(a.repeats):
        for system in systems:
            gc.collect()
            rss_reset_ok &= reset_peak_rss()
            if s.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(s.device)
            _sync(s.device)
            dist.barrier()
            with Stopwatch(sync) as watch:
                for _ in range(a.iters):
                    step = system.step
                    train_step(s, system, batches[step], forced[step], record_rows=True)
                _sync(s.device)
                dist.barrier()
            elapsed = torch.tensor([watch.seconds], dtype=torch.float64, device=s.device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
            samples[system.name].append(float(elapsed.item()))
            rss_peak[system.name] = max(rss_peak[system.name], peak_rss_bytes())
            if s.device.type == "cuda":
                gpu_peak[system.name] = max(gpu_peak[system.name], torch.cuda.max_memory_allocated(s.device))
            logger.info("%-9s repeat %d/%d %-9s %8.1f ms/step %9.0f tokens/s", workload, r + 1, a.repeats,
                        system.name, 1e3 * samples[system.name][-1] / a.iters,
                        tokens * s.world * a.iters / samples[system.name][-1])

    per_rank: dict[str, Any] = {"rank": s.rank, "pinned_cpu": getattr(a, "pinned_cpu", None), "rss_peak": rss_peak, "gpu_peak": gpu_peak,
                                "rss_now": current_rss_bytes(), "rss_reset_ok": rss_reset_ok, "systems": {}}
    for system in systems:
        entry: dict[str, Any] = {
            "expert_rows_per_step_per_layer": [sum(col) / len(col) for col in zip(*system.rows)],
            "steps": system.step,
        }
        if system.controller is not None:
            ctl = system.controller
            entry["fssdp_metrics"] = ctl.metrics()
            entry["fssdp_resharded_times"] = system.resharded
            entry["fssdp_replicas_per_expert"] = [st.placement.sum(dim=1).tolist() for st in ctl.states]
            entry["fssdp_owner_per_expert"] = [st.ownership.owner.tolist() for st in ctl.states]
            entry["fssdp_overlap_budget"] = ctl.overlap_budget
        if system.name == "deepspeed":
            entry["deepspeed_capacity_last"] = [m.last_stats.capacity for m in system.moe_modules()]
        per_rank["systems"][system.name] = entry
    info = {x.name: x.info for x in systems}
    del systems
    gc.collect()
    return {"samples": samples, "per_rank": per_rank, "check": check, "info": info}


def check_agreement(s: Setup, systems: list[System], workload: str, forced0: list[torch.Tensor]) -> dict[str, Any]:
    """Same first-step loss for all systems (EP as reference); routing honoured by DeepSpeed.

    fp32: the step-0 cross-entropies must agree within 1e-4 (relative); the later warm-up steps of
    FSSDP vs EP are reported too (same update rule, so they stay close). DeepSpeed's losses after
    step 0 differ slightly by design: its load-balancing loss has another definition and no z-loss,
    so its router receives other gradients.
    """
    a = s.args
    losses = {x.name: _mean_over_ranks(x.losses, s.device) for x in systems}
    tol = 1e-4 if s.amp_dtype is None else 2e-2
    report: dict[str, Any] = {"tolerance_rel": tol, "first_step_loss": {k: v[0] for k, v in losses.items()},
                              "warmup_losses": losses}
    ref = "ep" if "ep" in losses else next(iter(losses))
    ok = True
    for name, v in losses.items():
        if name == ref:
            continue
        rel0 = _rel(v[0], losses[ref][0])
        report[f"{name}_vs_{ref}_first_step_rel_diff"] = rel0
        ok &= rel0 <= tol
        if name == "fssdp":
            report[f"fssdp_vs_{ref}_warmup_max_rel_diff"] = max(_rel(x, y) for x, y in zip(v, losses[ref]))
    ds = next((x for x in systems if x.name == "deepspeed"), None)
    if ds is not None:  # DeepSpeed's per-rank counts of the last step vs the workload's
        step = ds.step - 1
        params = WorkloadParams(a.experts, a.top_k, s.world, a.seed, a.one_hot_share, a.hot_rank_share, a.rotate_every)
        expected = [torch.bincount(forced_indices(workload, step, i, s.rank, a.batch_size * a.seq_len, params).flatten(),
                                   minlength=a.experts) for i in range(a.layers)]
        got = [m.last_stats.exp_counts.detach().cpu().long() for m in ds.moe_modules()]
        same = torch.tensor([float(all(torch.equal(e, g) for e, g in zip(expected, got)))], device=s.device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        report["deepspeed_routing_identical"] = bool(same.item())
        ok &= bool(same.item())
    report["ok"] = bool(ok)
    if not ok:
        msg = f"{workload}: systems disagree on the first training step (or DeepSpeed ignored the forced routing): {report}"
        if not a.allow_mismatch:
            raise RuntimeError(msg + " (rerun with --allow-mismatch to time them anyway)")
        logger.error(msg)
    else:
        logger.info("%s: first-step loss %s; max rel diff vs %s %.1e", workload,
                    ", ".join(f"{k} {v:.6f}" for k, v in report["first_step_loss"].items()), ref,
                    max([v for k, v in report.items() if k.endswith("first_step_rel_diff")], default=0.0))
    return report


# --------------------------------------------------------------------------------------------
# rank body


def run_rank(args: argparse.Namespace) -> None:
    """The body of one rank: init, data, every workload, gather, write (rank 0)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    level = logging.getLevelName(args.log_level.upper()) if rank == 0 else logging.WARNING
    setup_logging(rank if world > 1 else None, level)
    for name in ("system", "system.parallel.fssdp.apply"):  # keep the library quiet on rank 0 unless asked
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=10), device_id=device)
        amp = torch.bfloat16
        args.pinned_cpu = None
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
        args.pinned_cpu = _pin_cpu(local_rank, args) if not args.no_pin else None
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
        amp = None
    s = Setup(args, rank, world, device, amp, max_grad_norm=model_configs(args)[2].max_grad_norm)
    from system.distributed.init import shutdown_distributed

    _run(s)
    shutdown_distributed()  # success only: after an exception torchrun stops the peers


def _run(s: Setup) -> None:
    from system.distributed import ParallelDims

    a = s.args
    if "deepspeed" in a.system_list:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if s.device.type == "cuda" else "gloo")
    s.meshes["ep"] = ParallelDims.from_config(dp=1, ep=s.world, world_size=s.world).build_mesh(s.device.type)
    s.meshes["fssdp"] = ParallelDims.from_config(dp=s.world, ep=1, world_size=s.world).build_mesh(s.device.type)
    total_steps = a.warmup + a.repeats * a.iters
    t0 = time.perf_counter()
    batches = build_batches(s, total_steps)
    base = build_base(s)
    n_params, n_active = base.num_params()
    logger.info("model %.2fM params (%.2fM active), %d tokens/rank/step; data ready in %.1f s",
                n_params / 1e6, n_active / 1e6, a.batch_size * a.seq_len, time.perf_counter() - t0)
    load_at_start = list(os.getloadavg())
    results: dict[str, Any] = {}
    for workload in a.workload_list:
        t_w = time.perf_counter()
        results[workload] = run_workload(s, workload, base, batches)
        logger.info("%s done in %.1f s", workload, time.perf_counter() - t_w)
    gathered: list[Any] = [None] * s.world
    dist.all_gather_object(gathered, {w: r["per_rank"] for w, r in results.items()})
    if s.rank == 0:
        write_results(s, results, gathered, (n_params, n_active), load_at_start)


# --------------------------------------------------------------------------------------------
# results


def _ratio(x: float | None, y: float | None) -> float | None:
    if x is None or y is None or not y or math.isnan(x) or math.isnan(y):
        return None
    return x / y


def summarize_workload(s: Setup, workload: str, res: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Summaries, ratios and per-rank facts of one workload."""
    a = s.args
    global_tokens = a.batch_size * a.seq_len * s.world
    params = WorkloadParams(a.experts, a.top_k, s.world, a.seed, a.one_hot_share, a.hot_rank_share, a.rotate_every)
    timed = range(a.warmup, a.warmup + a.repeats * a.iters)
    stats = workload_stats(workload, timed, a.layers, a.batch_size * a.seq_len, s.world, params)
    if workload == "rotating":
        stats["hot_expert_layer0_timed_steps"] = [hot_expert(workload, 0, t, params) for t in timed]
    systems: dict[str, Any] = {}
    for name, secs in res["samples"].items():
        step_ms = [1e3 * t / a.iters for t in secs]
        tps = [global_tokens * a.iters / t for t in secs]
        per_layer = [r[workload]["systems"][name]["expert_rows_per_step_per_layer"] for r in ranks]  # [rank][layer]
        rows = [sum(x) for x in per_layer]
        useful = a.batch_size * a.seq_len * a.top_k * a.layers  # T*k per layer per rank on average
        # Each layer's all-to-all waits for its busiest rank: the critical path is the sum over layers of the max.
        critical = sum(max(col) for col in zip(*per_layer))
        entry: dict[str, Any] = {
            "tokens_per_s": summarize(tps),
            "step_ms_slowest_rank": summarize(step_ms),
            "samples_s_per_repeat": secs,
            "peak_rss_bytes_per_rank": [r[workload]["rss_peak"][name] for r in ranks],
            "peak_gpu_bytes_per_rank": [r[workload]["gpu_peak"][name] for r in ranks] if s.device.type == "cuda" else None,
            "expert_rows_per_step_per_rank": rows,
            "expert_rows_per_step_per_rank_per_layer": per_layer,
            # sum over layers of the busiest rank's expert rows, over the even share of the useful rows
            # (T*k per layer and rank): > 1 means ranks wait for an overloaded (or padded) one
            "busiest_rank_rows_over_even": critical / useful,
        }
        first = ranks[0][workload]["systems"][name]
        if name == "fssdp":
            metrics = [r[workload]["systems"][name]["fssdp_metrics"] for r in ranks]
            gather = [m["fssdp/gather_bytes_per_step"] for m in metrics]
            reduce = [m["fssdp/reduce_bytes_per_step"] for m in metrics]
            entry["fssdp"] = {
                "overlap_budget_t": first["fssdp_overlap_budget"],
                "replicas_per_expert_end": first["fssdp_replicas_per_expert"],
                "replicas_mean_per_layer": [v for k, v in metrics[0].items() if k.startswith("fssdp/replicas_mean")],
                "replicas_max_per_layer": [v for k, v in metrics[0].items() if k.startswith("fssdp/replicas_max")],
                "owner_per_expert_end": first["fssdp_owner_per_expert"],
                "resharded_times": first["fssdp_resharded_times"],
                "gather_bytes_per_step_per_rank": gather,
                "reduce_bytes_per_step_per_rank": reduce,
                "bytes_moved_per_step_total": sum(gather) + sum(reduce),
                "metrics_per_rank": metrics,
            }
        if name == "deepspeed":
            entry["deepspeed"] = {
                "capacity_last_step_per_layer": first["deepspeed_capacity_last"],
                # rows its experts compute (E*C per layer, every rank alike) over the useful T*k
                "padding_factor": critical / useful,
            }
        systems[name] = entry

    def med(name: str, key: str) -> float | None:
        return systems[name][key]["median"] if name in systems else None

    def paired(num: str, den: str) -> dict[str, float] | None:
        """Median over repeats of den's time / num's time in the same repeat (= num's speed-up)."""
        if num not in res["samples"] or den not in res["samples"]:
            return None
        return summarize([d / n for n, d in zip(res["samples"][num], res["samples"][den])])

    ratios = {
        "fssdp_over_ep_tokens_per_s": _ratio(med("fssdp", "tokens_per_s"), med("ep", "tokens_per_s")),
        "fssdp_over_ep_paired": paired("fssdp", "ep"),
        "deepspeed_over_ep_tokens_per_s": _ratio(med("deepspeed", "tokens_per_s"), med("ep", "tokens_per_s")),
        "fssdp_over_deepspeed_tokens_per_s": _ratio(med("fssdp", "tokens_per_s"), med("deepspeed", "tokens_per_s")),
        "ep_over_deepspeed_tokens_per_s": _ratio(med("ep", "tokens_per_s"), med("deepspeed", "tokens_per_s")),
        "fssdp_over_deepspeed_paired": paired("fssdp", "deepspeed"),
    }
    return {
        "description": describe_workload(workload, a),
        "workload": stats,
        "agreement": res["check"],
        "systems": systems,
        "ratios": ratios,
    }


def evaluate_goals(workloads: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals per workload: value, target, met (None when a system or balanced is missing)."""
    goals = []
    bal = workloads.get("balanced")
    bal_fssdp = bal["systems"]["fssdp"]["step_ms_slowest_rank"]["median"] if bal and "fssdp" in bal["systems"] else None
    for name, w in workloads.items():
        r = w["ratios"]["fssdp_over_ep_tokens_per_s"]
        if name == "balanced":
            goals.append({"workload": name, "goal": f"FSSDP tokens/s within {GOAL_BALANCED_TOL:.0%} of EP",
                          "value": r, "target": f">= {1 - GOAL_BALANCED_TOL:.2f}x EP",
                          "met": None if r is None else r >= 1 - GOAL_BALANCED_TOL})
            continue
        goals.append({"workload": name, "goal": f"FSSDP tokens/s >= {GOAL_SKEW_SPEEDUP}x EP", "value": r,
                      "target": f">= {GOAL_SKEW_SPEEDUP:.2f}x", "met": None if r is None else r >= GOAL_SKEW_SPEEDUP})
        mine = w["systems"]["fssdp"]["step_ms_slowest_rank"]["median"] if "fssdp" in w["systems"] else None
        flat = _ratio(mine, bal_fssdp)
        w["ratios"]["fssdp_step_over_fssdp_balanced_step"] = flat
        goals.append({"workload": name, "goal": f"FSSDP slowest-rank step time <= {GOAL_SKEW_FLAT}x its balanced step time",
                      "value": flat, "target": f"<= {GOAL_SKEW_FLAT:.2f}x", "met": None if flat is None else flat <= GOAL_SKEW_FLAT})
    if bal is not None:
        bal["ratios"]["fssdp_step_over_fssdp_balanced_step"] = 1.0 if bal_fssdp else None
    return goals


def write_results(s: Setup, results: dict[str, Any], gathered: list[dict[str, Any]], params: tuple[int, int],
                  load_at_start: list[float]) -> None:
    """Summarise every workload and write ``expert_parallel_<device><tag>.json`` and ``.md``."""
    a = s.args
    workloads = {w: summarize_workload(s, w, res, gathered) for w, res in results.items()}
    goals = evaluate_goals(workloads)
    model_cfg, moe_cfg, train_cfg = model_configs(a)
    from dataclasses import asdict

    config = {k: v for k, v in vars(a).items() if k not in ("pinned_cpu", "corpus_info")}
    config.update(
        world_size=s.world, tokens_per_rank_per_step=a.batch_size * a.seq_len,
        global_tokens_per_step=a.batch_size * a.seq_len * s.world, amp_dtype=str(s.amp_dtype) if s.amp_dtype else "fp32",
        model=asdict(model_cfg), moe=asdict(moe_cfg), training=asdict(train_cfg), fssdp=asdict(fssdp_config(a)),
        params_total=params[0], params_active=params[1], data=getattr(a, "corpus_info", None),
        pinned_cpus=[next(iter(r.values()))["pinned_cpu"] if r else None for r in gathered],
    )
    first_info = next(iter(results.values()))["info"] if results else {}
    rss_reset_ok = all(r[w]["rss_reset_ok"] for r in gathered for w in r)
    result = {
        "benchmark": "expert_parallel",
        "description": "training-step throughput under routing imbalance: EP vs FSSDP (Hecate) vs DeepSpeed-MoE",
        "config": config,
        "versions": package_versions(["torch", "deepspeed", "moe-system", "numpy"]),
        "host": {**host_info(), "loadavg_1_5_15_at_start": load_at_start, "loadavg_1_5_15_at_end": list(os.getloadavg())},
        "method": {
            "step": "forward + CE + MoE aux losses, backward, gradient sync (dense averaged over ranks, experts / W), "
            "global-norm clipping, AdamW, LR schedule; FSSDP: controller.begin_step() before and end_step(optimizer) after",
            "routing": "forced [T, k] expert ids per (workload, seed, step, layer, rank), exact per-expert counts, "
            "k distinct experts per token; identical for every system",
            "timing": "per workload: systems built from the same initial weights, warm-up steps, then interleaved repeats; "
            "each repeat times --iters steps between barriers; the repeat's time is the slowest rank's",
            "tokens_per_s": "global tokens per step * iters / repeat time",
            "step_ms_slowest_rank": "repeat time / iters",
            "peak_rss": "VmHWM reset before each repeat of a system; max over its repeats; includes the process "
            "baseline (interpreter, libraries, data, all systems' models of the workload)"
            + ("" if rss_reset_ok else " [reset unavailable: peak since process start]"),
            "expert_rows": "token copies the experts of a rank computed per step (all MoE layers); DeepSpeed: E*C per "
            "layer (padded)",
        },
        "systems": first_info,
        "workloads": workloads,
        "goals": goals,
    }
    out_dir = Path(a.out)
    stem = f"expert_parallel_{a.device}{a.tag}"
    json_path = write_json(out_dir / f"{stem}.json", result)
    md = render_markdown(s, result)
    md_path = write_text(out_dir / f"{stem}.md", md)
    logger.info("wrote %s and %s", json_path, md_path)
    print(md)


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "x") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def render_markdown(s: Setup, result: dict[str, Any]) -> str:
    """The markdown report: setup, throughput table, details table, goals, notes."""
    a = s.args
    cfg = result["config"]
    wl = result["workloads"]
    names = [n for n in SYSTEMS if n in a.system_list]
    label = {"ep": "EP", "fssdp": "FSSDP", "deepspeed": "DS"}
    headers = ["workload", "max/mean expert load", "EP busiest rank / even"]
    headers += [f"{label[n]} tokens/s" for n in names] + [f"{label[n]} step ms" for n in names]
    headers += ["FSSDP/EP", "FSSDP/EP paired", "FSSDP step / FSSDP balanced", "DS/EP", "FSSDP/DS"]
    rows = []
    for w, r in wl.items():
        sy, ra = r["systems"], r["ratios"]
        row = [w, f"{r['workload']['load_max_over_mean']:.2f}", f"{r['workload']['ep_busiest_rank_over_even']:.2f}"]
        row += [f"{sy[n]['tokens_per_s']['median']:,.0f}" for n in names]
        row += [f"{sy[n]['step_ms_slowest_rank']['median']:.0f}" for n in names]
        pr = ra.get("fssdp_over_ep_paired")
        row += [_fmt(ra["fssdp_over_ep_tokens_per_s"]), _fmt(pr["median"]) if pr else "n/a",
                _fmt(ra.get("fssdp_step_over_fssdp_balanced_step")), _fmt(ra["deepspeed_over_ep_tokens_per_s"]),
                _fmt(ra["fssdp_over_deepspeed_tokens_per_s"])]
        rows.append(row)
    d_headers = ["workload"] + [f"{label[n]} peak RSS/rank" for n in names]
    d_headers += [f"{label[n]} expert rows, busiest rank / even" for n in names]
    d_headers += ["FSSDP t", "FSSDP replicas/expert (layer 0, end)", "FSSDP MiB moved/step (all ranks)", "FSSDP re-shardings",
                  "first-step loss agree"]
    d_rows = []
    for w, r in wl.items():
        sy = r["systems"]
        row = [w] + [format_bytes(max(sy[n]["peak_rss_bytes_per_rank"])) for n in names]
        row += [f"{sy[n]['busiest_rank_rows_over_even']:.2f}" for n in names]
        fs = sy.get("fssdp", {}).get("fssdp")
        if fs:
            row += [str(fs["overlap_budget_t"]), " ".join(str(int(v)) for v in fs["replicas_per_expert_end"][0]),
                    f"{fs['bytes_moved_per_step_total'] / 2**20:.1f}", str(fs["resharded_times"])]
        else:
            row += ["n/a"] * 4
        ag = r["agreement"]
        row.append(("yes" if ag["ok"] else "NO") + " (" + ", ".join(
            f"{k.split('_vs_')[0]} {v:.0e}" for k, v in ag.items() if k.endswith("first_step_rel_diff")) + ")")
        d_rows.append(row)
    g_lines = []
    for g in result["goals"]:
        status = "n/a" if g["met"] is None else ("met" if g["met"] else "not met")
        g_lines.append(f"- {g['workload']}: {g['goal']} (target {g['target']}): {_fmt(g['value'])} -> **{status}**")
    fcfg = cfg["fssdp"]
    loads = result["host"]
    lines = [
        f"# Training step under routing imbalance: {', '.join(label[n] for n in names)} ({a.device})",
        "",
        f"MoETransformer d={a.dim}, {a.layers} layers (all MoE), {a.heads} heads, E={a.experts} SwiGLU experts "
        f"(hidden {a.expert_dim}), top-{a.top_k}, dropless; vocab {cfg['model']['vocab_size']} (bytes of the "
        f"{(cfg.get('data') or {}).get('corpus', 'default')} corpus); {cfg['params_total'] / 1e6:.1f}M params "
        f"({cfg['params_active'] / 1e6:.1f}M active); {a.batch_size}x{a.seq_len} = {cfg['tokens_per_rank_per_step']} "
        f"tokens/rank/step x {s.world} ranks; {cfg['amp_dtype']}. Step = fwd + bwd + grad sync + clip + AdamW "
        f"(+ FSSDP begin/end_step). {a.warmup} warm-up steps, then {a.repeats} interleaved repeats x {a.iters} steps; "
        f"medians; time of the slowest rank. {'NCCL' if s.device.type == 'cuda' else 'Gloo'}, "
        f"{'1 GPU' if s.device.type == 'cuda' else f'{a.threads} thread(s)'} per rank. FSSDP: w={fcfg['load_window']}, "
        f"m={fcfg['memory_budget']}, t={'estimated' if fcfg['overlap_budget'] < 0 else fcfg['overlap_budget']}, "
        f"R={fcfg['reshard_interval']}, RM={'on' if fcfg['rematerialize'] else 'off'}"
        + (f", prefetch {'on' if fcfg['prefetch'] else 'off'}" if "prefetch" in fcfg else "") + ". "
        f"torch {result['versions']['torch']}, deepspeed {result['versions']['deepspeed']}; {loads['cpu_model']}.",
        "",
        markdown_table(headers, rows),
        markdown_table(d_headers, d_rows),
        "Goals of the issue:",
        "",
        *g_lines,
        "",
        "Notes:",
        "",
        "- Workloads: " + "; ".join(f"`{w}`: {r['description']}" for w, r in wl.items()) + ". "
        "Assignments are forced per (workload, seed, step, layer, rank) with exact per-expert counts and k distinct "
        "experts per token, identical for every system. max/mean expert load is over experts, averaged over the timed "
        "steps and layers; 'EP busiest rank / even' is the share of expert rows on the busiest EP rank over 1/W. "
        "'expert rows, busiest rank / even' is measured: per layer the rows (token copies) the busiest rank's experts "
        "computed, summed over layers, over the even share T*k per layer (DeepSpeed: E*C, its padded rows).",
        "- Ratios: X/Y = median tokens/s of X over Y's; 'paired' = median over repeats of EP's repeat time over FSSDP's "
        "in the same repeat. 'FSSDP step / FSSDP balanced' divides medians of separate (sequential) workload runs.",
        "- DeepSpeed: `deepspeed.moe.layer.MoE(drop_tokens=False, use_rts=False)` in our model, weights copied from ours, "
        "gate forced to the same assignments by answering its `torch.argmax` calls (its gating, dispatch and padding code "
        "run unchanged). Its dropless capacity C is the largest per-rank expert load over the EP group and every expert "
        "is padded to C, so under skew its experts compute E*C rows (the 'DS expert rows' column) and its "
        "all-to-alls move dense [E, C, d] buffers. Its load-balancing loss is its own definition and it has no z-loss, "
        "so only its first-step cross-entropy is compared.",
        f"- FSSDP runs {a.warmup + a.repeats * a.iters} steps per workload; re-sharding (Algorithm 2) happens every "
        f"R={fcfg['reshard_interval']} steps"
        + (" and is therefore not exercised here (use --fssdp-reshard-interval)." if fcfg["reshard_interval"] == 0
           or fcfg["reshard_interval"] > a.warmup + a.repeats * a.iters else "."),
        "- Peak RSS is VmHWM while that system ran (reset before each repeat); it includes the process baseline and "
        "every system's model of the workload.",
        f"- Load average (1, 5, 15 min) at start {', '.join(f'{v:.1f}' for v in loads['loadavg_1_5_15_at_start'])}, "
        f"at end {', '.join(f'{v:.1f}' for v in loads['loadavg_1_5_15_at_end'])} on {loads['logical_cpus']} CPUs.",
        "- Command: `" + " ".join(["python benchmarks/expert_parallel.py", *sys.argv[1:]]) + "`",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# launch


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
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_launcher:
        args.nproc = int(os.environ["WORLD_SIZE"])
        validate_args(args)
        run_rank(args)
        return
    validate_args(args)
    setup_logging(None, logging.getLevelName(args.log_level.upper()))
    logger.info("spawning %d processes (%s): systems %s, workloads %s", args.nproc, args.device,
                ",".join(args.system_list), " ".join(args.workload_list))
    import torch.multiprocessing as mp

    mp.start_processes(_spawned_rank, args=(args.nproc, free_port(), args), nprocs=args.nproc, start_method="spawn")


if __name__ == "__main__":
    main()
