"""Parallel layouts side by side: tokens/s and peak memory per rank, measured and as ``moesys plan`` predicts them.

The same :class:`~system.models.model.MoETransformer` (same seed, same initial weights), the same global batches
and the same step are trained under each layout on the same ranks, in one run. Every layout is built as the
trainer builds it (``ParallelDims`` -> ``parallelize_model``, or ``build_pipeline`` with ``parallelize_model`` on
each stage) and every step is the trainer's (:func:`system.train.step.train_step`, or
:func:`~system.train.step.pipeline_train_step` under pipeline parallelism). Layouts (``--layouts``, W ranks):

- ``ep``: expert parallelism over all ranks (``parallel.ep = W``), dense weights replicated: the baseline;
- ``fsdp_ep``: the same experts, dense weights sharded by FSDP2 (``parallel.dense = "fsdp"``);
- ``tp_ep``: tensor parallelism (``parallel.tp = 2``, sequence parallel) with experts folded onto all W ranks;
- ``pp_ep``: two pipeline stages (``parallel.pp = 2``, 1F1B, 2 micro-batches), EP over each stage's W/2 ranks;
- ``ep_ac_full``, ``ep_ac_selective``: ``ep`` with ``training.activation_checkpoint`` full / selective;
- ``ep_compile`` (not in the default list): ``ep`` with ``training.compile`` (per-block ``torch.compile``; the
  compilation happens in the warm-up; its LivePeak steps run eagerly, as ``torch.compile`` does under a
  ``TorchDispatchMode``, so its memory columns are those of eager execution).

Models (``--models``): ``cpu-tiny`` (``configs/cpu-tiny.toml``'s ``[model]``/``[moe]``, untied embeddings so that
pipeline parallelism can split it), ``large`` (the same with d 512, 8 layers, 8 heads, 16 experts of hidden 512),
``toy`` (the smoke model). Every layout reads the same global batch of ``--global-batch`` sequences per step: its
``dp_degree`` data streams each take their slice (``PackedLoader`` with the layout's data rank, as the trainer).

Method, per model: the layouts are built from one initialised model; each runs ``--warmup`` steps (the last
``--peak-steps`` of them measured with :class:`system.plan.measure.LivePeak`, the bytes of live tensor storages
over the step, per rank); the cross-entropy of the first step (mean over ranks: the global batch's) must agree
across layouts (relative 1e-4 in fp32, 2e-2 under bf16) or the run aborts (:func:`benchmarks.common.check_agreement`).
Then ``--repeats`` repeats, the layouts' order rotated per repeat (:func:`benchmarks.common.rotated`); a repeat times
``--iters`` steps between barriers and its time is the slowest rank's; peak RSS (VmHWM, reset before each repeat)
is recorded per rank. Every ratio to ``ep`` is the median of the paired per-repeat ratios with a 95% bootstrap
interval (:func:`benchmarks.common.paired_ratio_summary`); the issue sets no goal for these ratios. All layouts stay
built for the rotated repeats; between its turns a layout's gradients are freed (``zero_grad(set_to_none=True)``, what
its next step does first), so idle layouts hold parameters and AdamW state only.

The planner's prediction (:mod:`system.plan`) of each layout, from the same job config: peak memory of the fullest
rank (:func:`system.plan.memory.rank_memory`; compared with the measured peak of the fullest rank,
:func:`benchmarks.common.band_goal` within 15% over the measured steps) and step time
(:func:`system.plan.estimate.step_time`) on explicit figures measured in this run: the matmul throughput of one rank
while every rank multiplies (compute efficiency 1) and the Gloo (NCCL) all-reduce bus bandwidth (link efficiency 1),
every rank on one "node". The planner counts matmul FLOPs and collective bytes only, so its absolute step times
are lower than the measured ones on CPU; what is compared is each layout's tokens/s relative to ``ep``.

Usage (from the repository root)::

    python benchmarks/parallel_layouts.py                      # CPU: 4 Gloo ranks, cpu-tiny and large (~12 min)
    python benchmarks/parallel_layouts.py --smoke              # toy model, end-to-end check
    python benchmarks/parallel_layouts.py --layouts ep,tp_ep --models cpu-tiny --repeats 3
    python benchmarks/parallel_layouts.py --device cuda        # NCCL, one process per GPU (4), bf16 autocast

Writes ``<out>/parallel_layouts_<device><tag>.json`` and ``.md`` (``--smoke`` adds the tag ``_smoke``).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    NumericalDisagreement,
    Stopwatch,
    band_goal,
    check_agreement,
    current_rss_bytes,
    fill_defaults,
    free_port,
    markdown_table,
    paired_ratio_summary,
    peak_rss_bytes,
    provenance,
    provenance_markdown,
    reset_peak_rss,
    rotated,
    setup_logging,
    summarize,
    write_json,
    write_text,
)

logger = logging.getLogger("benchmarks.parallel_layouts")

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "cpu-tiny.toml"
UNTIED = ["--model.tie_embeddings", "false"]  # pipeline parallelism puts the head on another stage
MODELS: dict[str, list[str]] = {  # name: overrides of configs/cpu-tiny.toml's [model]/[moe]
    "cpu-tiny": UNTIED,
    "large": UNTIED + ["--model.dim", "512", "--model.n_layers", "8", "--model.n_heads", "8", "--model.ffn_dim", "1024",
                       "--moe.num_experts", "16", "--moe.expert_dim", "512"],
    "toy": UNTIED + ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "2", "--model.ffn_dim", "128",
                     "--model.max_seq_len", "64", "--moe.num_experts", "4", "--moe.expert_dim", "128"],
}
BASELINE = "ep"
DEFAULT_LAYOUTS = ("ep", "fsdp_ep", "tp_ep", "pp_ep", "ep_ac_full", "ep_ac_selective")
ALL_LAYOUTS = DEFAULT_LAYOUTS + ("ep_compile",)
TOLERANCE = 0.15  # planner vs measured peak memory

# Sized so the default CPU run (2 models x 6 layouts, 4 ranks on 2 quiet cores) takes about 12-13 min.
CPU_DEFAULTS = dict(models="cpu-tiny,large", global_batch=8, seq_len=256, warmup=3, peak_steps=2, repeats=6, iters=1)
SMOKE_DEFAULTS = dict(models="toy", global_batch=8, seq_len=64, warmup=3, peak_steps=2, repeats=2, iters=1)
CUDA_DEFAULTS = dict(models="cpu-tiny,large", global_batch=32, seq_len=256, warmup=5, peak_steps=2, repeats=7, iters=5)


# --------------------------------------------------------------------------------------------
# layouts


@dataclass(frozen=True)
class Layout:
    """One layout under test: ``[parallel]`` keys (for ``world`` ranks) and the training options it changes."""

    name: str
    parallel: dict[str, Any]
    activation_checkpoint: str = "none"
    compile: bool = False

    def overrides(self) -> list[str]:
        """``--section.key value`` overrides of the job config for this layout."""
        out = [x for k, v in self.parallel.items() for x in (f"--parallel.{k}", str(v))]
        return out + ["--training.activation_checkpoint", self.activation_checkpoint,
                      "--training.compile", str(self.compile).lower()]


def layout(name: str, world: int) -> Layout:
    """The layout ``name`` on ``world`` ranks (see the module docstring).

    Raises:
        ValueError: an unknown name, or one that needs an even world (``tp_ep``, ``pp_ep``).
    """
    ep = dict(ep=world, dp=1)
    if name in ("tp_ep", "pp_ep") and world % 2:
        raise ValueError(f"layout {name!r} needs an even number of ranks, got {world}")
    table = {
        "ep": Layout("ep", ep),
        "fsdp_ep": Layout("fsdp_ep", dict(ep, dense="fsdp")),
        "tp_ep": Layout("tp_ep", dict(tp=2, ep=world, dp=-1)),
        "pp_ep": Layout("pp_ep", dict(pp=2, ep=world // 2, dp=-1, pp_schedule="1F1B", pp_microbatches=2)),
        "ep_ac_full": Layout("ep_ac_full", ep, "full"),
        "ep_ac_selective": Layout("ep_ac_selective", ep, "selective"),
        "ep_compile": Layout("ep_compile", ep, compile=True),
    }
    if name not in table:
        raise ValueError(f"unknown layout {name!r}; choose from {', '.join(table)}")
    return table[name]


def job_config(args: argparse.Namespace, model: str, lay: Layout, world: int):
    """The validated :class:`~system.config.job.JobConfig` of ``model`` under ``lay`` (vocabulary resolved).

    ``training.batch_size`` is the layout's per-stream batch: ``--global-batch / dp_degree`` sequences.

    Raises:
        ConfigError: the layout does not fit the model or the world (the message names the key).
    """
    from system.config.loader import load_config
    from system.data import ByteTokenizer
    from system.distributed.parallel_dims import ParallelDims
    from system.train.trainer import resolve_vocab

    dims = ParallelDims.from_config(lay.parallel.get("dp", -1), lay.parallel["ep"], world, pp=lay.parallel.get("pp", 1),
                                    tp=lay.parallel.get("tp", 1))
    steps = args.warmup + args.repeats * args.iters
    overrides = MODELS[model] + lay.overrides() + [
        "--training.batch_size", str(args.global_batch // dims.dp_degree), "--training.seq_len", str(args.seq_len),
        "--training.mixed_precision", "bf16" if args.device == "cuda" else "fp32", "--training.steps", str(steps),
        "--training.seed", str(args.seed)]
    cfg = load_config(BASE_CONFIG, overrides)
    resolve_vocab(cfg, ByteTokenizer.vocab_size)
    return cfg


# --------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; device- and smoke-dependent defaults are filled in afterwards."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--smoke", action="store_true", help="toy model, few steps (end-to-end check)")
    p.add_argument("--models", help=f"comma list from {', '.join(MODELS)} (cpu/cuda: cpu-tiny,large; smoke: toy)")
    p.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS),
                   help=f"comma list from {', '.join(ALL_LAYOUTS)}; {BASELINE} is always included "
                   "(default %(default)s)")
    p.add_argument("--nproc", type=int, default=None, help="ranks (cpu 4; cuda: 4 GPUs, one process each)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank on CPU (every layout alike)")
    p.add_argument("--global-batch", type=int,
                   help="sequences per step over all ranks, the same for every layout (cpu 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (cpu 256)")
    p.add_argument("--warmup", type=int, help="untimed steps per layout, the same for all (cpu 3)")
    p.add_argument("--peak-steps", type=int, help="last warm-up steps measured with LivePeak (cpu 2; >= 1, < warmup)")
    p.add_argument("--repeats", type=int, help="timed repeats, order rotated per repeat (cpu 6, smoke 2, cuda 7)")
    p.add_argument("--iters", type=int, help="training steps per repeat (cpu 1, cuda 5)")
    p.add_argument("--calib-seconds", type=float, default=0.5, help="duration of each throughput calibration")
    p.add_argument("--data", default="", help="corpus path for system.data.load_corpus ('' = embedded default)")
    p.add_argument("--seed", type=int, default=1234, help="model init and data order seed")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")
    p.add_argument("--tag", default=None, help="suffix of the result files (default '' or '_smoke')")
    p.add_argument("--log-level", default="INFO")
    # Testing only: scale one layout's final norm so that the agreement check must abort the run.
    p.add_argument("--perturb-layout", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    fill_defaults(args, CUDA_DEFAULTS if args.device == "cuda" else (SMOKE_DEFAULTS if args.smoke else CPU_DEFAULTS))
    if args.nproc is None:
        args.nproc = 4
    if args.tag is None:
        args.tag = "_smoke" if args.smoke else ""
    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    args.layout_list = list(dict.fromkeys([BASELINE] + names))
    args.model_list = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Raise ``SystemExit`` naming every impossible setting (unknown names, sizes, layouts that do not fit)."""
    errors = [f"unknown model {m!r}; choose from {', '.join(MODELS)}" for m in args.model_list if m not in MODELS]
    if args.nproc < 2:
        errors.append("--nproc must be >= 2")
    if args.global_batch % args.nproc:
        errors.append(f"--global-batch {args.global_batch} must divide by --nproc {args.nproc} (one slice per stream)")
    if args.repeats < 1 or args.iters < 1 or not 1 <= args.peak_steps < args.warmup:
        errors.append("--repeats, --iters >= 1 and 1 <= --peak-steps < --warmup (the first step is never measured)")
    if args.perturb_layout is not None and args.perturb_layout not in args.layout_list:
        errors.append(f"--perturb-layout {args.perturb_layout!r} is not among --layouts")
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        errors.append(f"--device cuda needs {args.nproc} GPUs (one process each), {torch.cuda.device_count()} visible")
    if not errors:
        for model in args.model_list:
            for name in args.layout_list:
                try:
                    job_config(args, model, layout(name, args.nproc), args.nproc)
                except ValueError as e:
                    errors.append(f"{model} / {name}: {e}")
    if errors:
        raise SystemExit("parallel_layouts benchmark: " + "; ".join(errors))


# --------------------------------------------------------------------------------------------
# one layout, built as the trainer builds it


@dataclass
class Built:
    """One layout of one model on this rank: what the trainer's step needs, and what was measured."""

    lay: Layout
    cfg: Any
    dims: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    pipe: Any = None
    controller: Any = None
    step: int = 0
    losses: list[float] = field(default_factory=list)
    live_peaks: list[int] = field(default_factory=list)  # LivePeak bytes of each measured warm-up step
    breakdown: dict[str, int] = field(default_factory=dict)  # of the largest measured step


@dataclass
class Setup:
    """Per-rank run context."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    amp: torch.dtype | None


def build_layout(s: Setup, model_name: str, lay: Layout, base: torch.nn.Module, tokens) -> Built:
    """``lay`` applied to a copy of ``base`` (the trainer's ``_build``), its optimizer, and this rank's batches."""
    from system.data import PackedLoader
    from system.distributed.parallel_dims import ParallelDims
    from system.models.parallelize import parallelize_model
    from system.parallel.pp import build_pipeline, check_microbatches
    from system.train.optim import build_lr_scheduler, build_optimizer

    a = s.args
    cfg = job_config(a, model_name, lay, s.world)
    dims = ParallelDims.from_parallel_config(cfg.parallel, s.world)
    dims.check_experts(cfg.moe.num_experts)
    dims.build_mesh(s.device.type)
    model = copy.deepcopy(base)
    if a.perturb_layout == lay.name:  # testing the abort: this layout computes something else
        with torch.no_grad():
            model.norm.weight.mul_(2.0)
    t = cfg.training

    def parallelize(part: torch.nn.Module):
        return parallelize_model(part, dims, cfg.parallel, param_dtype=s.amp, fssdp=cfg.fssdp,
                                 activation_checkpoint=t.activation_checkpoint, compile=t.compile)

    pipe = controller = None
    if dims.pp > 1:
        pipe = build_pipeline(model, dims, cfg.parallel, s.device, parallelize=parallelize)
        check_microbatches(t.batch_size, pipe.n_microbatches)
        model = pipe.model
    else:
        controller = parallelize(model)
    loader = PackedLoader(tokens, seq_len=t.seq_len, batch_size=t.batch_size, rank=dims.dp_rank(s.rank),
                          world_size=dims.dp_degree, seed=t.seed)
    batches = [tuple(x.to(s.device) for x in loader.next_batch()) for _ in range(t.steps)]
    opt = build_optimizer(model, t)
    return Built(lay, cfg, dims, model, opt, build_lr_scheduler(opt, t), batches, pipe, controller)


def run_step(s: Setup, b: Built):
    """One training step of ``b`` on its next batch: the trainer's :func:`train_step` / :func:`pipeline_train_step`."""
    from system.train.step import pipeline_train_step, train_step

    t = b.cfg.training
    batch = [b.batches[b.step]]
    b.step += 1
    if b.pipe is not None:
        return pipeline_train_step(b.pipe, b.optimizer, b.scheduler, batch, max_grad_norm=t.max_grad_norm,
                                   autocast_dtype=s.amp, load_balance=b.cfg.moe.load_balance)
    return train_step(b.model, b.optimizer, b.scheduler, batch, mesh=b.dims.mesh, max_grad_norm=t.max_grad_norm,
                      autocast_dtype=s.amp, fssdp=b.controller, load_balance=b.cfg.moe.load_balance)


def warm_up(s: Setup, b: Built) -> None:
    """``--warmup`` steps; the last ``--peak-steps`` under :class:`LivePeak` (not timed: it slows every op)."""
    from system.plan.measure import LivePeak, step_state

    a = s.args
    for i in range(a.warmup):
        if i < a.warmup - a.peak_steps:
            st = run_step(s, b)
        else:
            x, y = b.batches[b.step]
            peak = LivePeak(*step_state(b.model, b.optimizer, x, y))
            with peak:
                st = run_step(s, b)
            b.live_peaks.append(peak.peak)
            if peak.peak >= max(b.live_peaks):
                b.breakdown = peak.breakdown(b.model, b.optimizer)
            del peak
        b.losses.append(st.loss)
    _sync(s.device)


# --------------------------------------------------------------------------------------------
# calibration: the planner's explicit figures, measured on these ranks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_loop(s: Setup, fn, seconds: float) -> tuple[int, float]:
    """Run ``fn`` on every rank at once, the same number of times everywhere (``fn`` may be a collective), for
    about ``seconds``; return (iterations, this rank's time)."""
    for _ in range(2):  # warm-up
        fn()
    _sync(s.device)
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    _sync(s.device)
    probe = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=s.device)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX)  # one count for every rank
    n = max(1, min(100_000, math.ceil(seconds / max(float(probe), 1e-9))))
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(s.device)
    return n, time.perf_counter() - t0


def calibrate(s: Setup, cfg) -> dict[str, Any]:
    """Matmul throughput of one rank while all multiply, and collective bus bandwidth, for ``cfg``'s shapes.

    - matmul: ``[T, d] @ [d, F]`` (T = tokens of one EP rank's step, F = ``moe.expert_dim``) in the compute dtype;
      FLOP/s = ``2 T d F`` x iterations / seconds, per rank (median over ranks used);
    - all-reduce of the fp32 gradients of the dense weights: bus bytes per rank ``2 B (n-1)/n`` per second;
    - all-to-all of one MoE dispatch (``T k d`` fp32): ``B (n-1)/n`` per second (reported, not used).

    A collective's time is the slowest rank's (one all-reduce of the times).
    """
    a = s.args
    dtype = s.amp or torch.float32
    T = a.global_batch // s.world * a.seq_len
    d, f = cfg.model.dim, cfg.moe.expert_dim
    g = torch.Generator(device=s.device).manual_seed(s.rank)
    x = torch.randn(T, d, generator=g, device=s.device, dtype=dtype)
    w = torch.randn(d, f, generator=g, device=s.device, dtype=dtype)
    n, secs = _timed_loop(s, lambda: torch.mm(x, w), a.calib_seconds)
    flops = torch.tensor([2.0 * T * d * f * n / secs], dtype=torch.float64, device=s.device)
    per_rank = [torch.zeros_like(flops) for _ in range(s.world)]
    dist.all_gather(per_rank, flops)
    dense = sum(p.numel() for n_, p in _dense_params_meta(cfg))
    ar = torch.ones(min(dense, 16 << 20), device=s.device)  # fp32, at most 64 MiB
    a2a_in = torch.ones(T * cfg.moe.top_k * d // s.world * s.world, device=s.device)  # equal splits
    a2a_out = torch.empty_like(a2a_in)
    bus = {}
    for name, fn, nbytes, factor in (
            ("all_reduce", lambda: dist.all_reduce(ar), ar.numel() * 4, 2.0),
            ("all_to_all", lambda: dist.all_to_all_single(a2a_out, a2a_in), a2a_in.numel() * 4, 1.0)):
        n, secs = _timed_loop(s, fn, a.calib_seconds)
        t = torch.tensor([secs / n], dtype=torch.float64, device=s.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        bus[name] = {"bytes": nbytes, "seconds": float(t),
                     "bus_bytes_per_s": factor * nbytes * (s.world - 1) / s.world / float(t)}
    values = sorted(float(v) for v in per_rank)
    return {"matmul": {"shape": [T, d, f], "dtype": str(dtype), "flops_per_rank": values,
                       "flops_used": values[len(values) // 2]},
            "collectives": bus, "link_used": "all_reduce"}


def _dense_params_meta(cfg):
    """Named dense (non-expert) parameters of ``cfg``'s model, built on the meta device."""
    from system.models.model import MoETransformer

    with torch.device("meta"):
        m = MoETransformer(cfg.model, cfg.moe)
    experts = {id(p) for layer in m.moe_layers() for p in layer.experts.parameters()}
    return [(n, p) for n, p in m.named_parameters() if id(p) not in experts]


# --------------------------------------------------------------------------------------------
# the planner's prediction


def predict(s: Setup, cfg, calib: dict[str, Any]) -> dict[str, Any]:
    """``moesys plan``'s memory and step time of ``cfg``'s layout on these ranks, with the calibrated figures.

    The step shape is the one this benchmark runs: ``--global-batch`` sequences, per-stream micro-batches
    (a pipeline micro-batch under PP), the compute dtype, and the expert kernel of the device (CPU: the chunked
    kernel's 4 MiB chunks, as ``tests/test_plan.py`` estimates it).
    """
    from system.moe.experts import grouped_mm_fused
    from system.moe.swiglu import chunk_bytes_for
    from system.plan.devices import resolve_device
    from system.plan.estimate import Cluster, step_time
    from system.plan.memory import StepShape, rank_memory
    from system.train.memory import ModelCensus, layout_of_config

    a = s.args
    lay = layout_of_config(cfg, s.world)
    m = (cfg.parallel.pp_microbatches or lay.pp * lay.stages_per_rank) if lay.pp > 1 else 1
    dtype = s.amp or torch.float32
    step = StepShape(cfg.training.batch_size // m, a.seq_len, a.global_batch, cb=dtype.itemsize, flash=True,
                     grouped_mm=grouped_mm_fused(s.device, dtype), chunk_bytes=chunk_bytes_for(s.device),
                     pp_microbatches=m if lay.pp > 1 else 0, pp_schedule=cfg.parallel.pp_schedule)
    census = ModelCensus.from_config(cfg)
    mode = cfg.training.activation_checkpoint
    mem = rank_memory(cfg, census, lay, step, mode)[mode]
    gbps = calib["collectives"][calib["link_used"]]["bus_bytes_per_s"] * 8 / 1e9
    host = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2**30
    device = resolve_device(None, memory_gib=host / s.world, peak_tflops=calib["matmul"]["flops_used"] / 1e12,
                            intra_node_gbps=gbps, inter_node_gbps=gbps)
    cluster = Cluster(s.world, s.world, device, memory_fraction=1.0, compute_efficiency=1.0, link_efficiency=1.0)
    t = step_time(cfg, census, lay, step, mode, cluster)
    return {"peak_bytes": int(mem.peak), "memory": mem.as_dict(), "step_s": t.step, "tokens_per_s": t.tokens_per_s,
            "compute_s": t.compute, "comm_exposed_s": t.comm_exposed, "bubble": t.bubble,
            "collectives": [c.as_dict() for c in t.collectives],
            "step_shape": {"micro_batch": step.micro_batch, "seq_len": step.seq_len, "global_batch": step.global_batch,
                           "cb": step.cb, "pp_microbatches": step.pp_microbatches, "chunk_bytes": step.chunk_bytes}}


# --------------------------------------------------------------------------------------------
# one model: build, warm up, agree, time


def run_model(s: Setup, model_name: str) -> dict[str, Any]:
    """Every layout of ``model_name``: this rank's samples and measurements, plus the (collective) calibration."""
    from system.models.model import MoETransformer

    a = s.args
    names = a.layout_list
    cfg0 = job_config(a, model_name, layout(BASELINE, s.world), s.world)
    calib = calibrate(s, cfg0)
    tokens = corpus_tokens(a, cfg0.training.steps)
    torch.manual_seed(a.seed)
    with torch.device(s.device):
        base = MoETransformer(cfg0.model, cfg0.moe)
    base.init_weights(seed=a.seed)
    n_params, n_active = base.num_params()
    built = {n: build_layout(s, model_name, layout(n, s.world), base, tokens) for n in names}
    del base, tokens
    gc.collect()
    _trim_heap()
    for n in names:  # the same warm-up steps for every layout
        t0 = time.perf_counter()
        warm_up(s, built[n])
        logger.info("%s %-16s warm-up %.1f s, LivePeak %s MB", model_name, n, time.perf_counter() - t0,
                    "/".join(f"{v / 1e6:.1f}" for v in built[n].live_peaks))
        drop_grads(built[n])
    agreement = check_layouts_agree(s, model_name, built)

    sync = (lambda: torch.cuda.synchronize(s.device)) if s.device.type == "cuda" else None
    samples: dict[str, list[float]] = {n: [] for n in names}
    rss = {n: {"peak": 0, "rise": 0} for n in names}
    gpu_peak = {n: 0 for n in names}
    rss_reset_ok = True
    for r in range(a.repeats):
        for n in rotated(names, r):
            b = built[n]
            gc.collect()
            rss_reset_ok &= reset_peak_rss()
            before = current_rss_bytes() or 0
            if s.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(s.device)
            _sync(s.device)
            dist.barrier()
            with Stopwatch(sync) as watch:
                for _ in range(a.iters):
                    run_step(s, b)
                _sync(s.device)
                dist.barrier()
            elapsed = torch.tensor([watch.seconds], dtype=torch.float64, device=s.device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
            samples[n].append(float(elapsed))
            peak = peak_rss_bytes()
            rss[n] = {"peak": max(rss[n]["peak"], peak), "rise": max(rss[n]["rise"], peak - before)}
            if s.device.type == "cuda":
                gpu_peak[n] = max(gpu_peak[n], torch.cuda.max_memory_allocated(s.device))
            drop_grads(b)
            logger.info("%s repeat %d/%d %-16s %8.1f ms/step", model_name, r + 1, a.repeats, n,
                        1e3 * samples[n][-1] / a.iters)
    mine = {n: {"live_peaks": built[n].live_peaks, "breakdown": built[n].breakdown, "rss_peak": rss[n]["peak"],
                "rss_rise": rss[n]["rise"], "gpu_peak": gpu_peak[n] if s.device.type == "cuda" else None}
            for n in names}
    gathered: list[Any] = [None] * s.world
    dist.all_gather_object(gathered, mine)
    out = {"samples": samples, "per_rank": gathered, "agreement": agreement, "calibration": calib,
           "rss_reset_ok": rss_reset_ok, "params": (n_params, n_active),
           "configs": {n: built[n].cfg for n in names}}
    del built
    gc.collect()
    return out


def corpus_tokens(a: argparse.Namespace, steps: int):
    """Byte tokens of the first documents of the corpus: enough windows for ``steps`` global batches (the same on
    every rank; the rest of the corpus is released on return)."""
    from system.data import ByteTokenizer, load_corpus, tokenize_docs

    corpus = load_corpus(a.data)
    need = 2 * steps * a.global_batch * a.seq_len + 1
    docs, total = [], 0
    for doc in corpus.train_docs:
        docs.append(doc)
        total += len(doc)
        if total >= need:
            break
    return tokenize_docs(docs, ByteTokenizer())


def drop_grads(b: Built) -> None:
    """Free ``b``'s gradients between its steps (what its next step's ``zero_grad(set_to_none=True)`` does first),
    so that the layouts waiting for their turn do not hold them: a job runs one layout, not six."""
    b.optimizer.zero_grad(set_to_none=True)


def _trim_heap() -> None:
    """Hand the heap pages freed since the build (the initial model, the copies each layout sliced) back to the
    OS (glibc ``malloc_trim``), so that the peak RSS of the repeats does not carry them; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_layouts_agree(s: Setup, model_name: str, built: dict[str, Built]) -> dict[str, Any]:
    """Abort (:class:`NumericalDisagreement`) unless every layout's first-step cross-entropy of the global batch
    (mean over ranks: each data stream counted by all its TP/PP ranks alike) equals the baseline's within rtol."""
    rtol = 1e-4 if s.amp is None else 2e-2
    t = torch.tensor([b.losses[0] for b in built.values()], dtype=torch.float64, device=s.device)
    dist.all_reduce(t)
    first = {n: float(v) / s.world for n, v in zip(built, t.tolist())}
    diff = check_agreement(f"{model_name}: cross-entropy at the first step", first, rtol=rtol)
    logger.info("%s: first-step cross-entropy %s", model_name, ", ".join(f"{n} {v:.6f}" for n, v in first.items()))
    return {"rtol": rtol, "first_step_loss": first, "first_step_abs_diff": diff}


# --------------------------------------------------------------------------------------------
# results


def summarize_model(s: Setup, name: str, res: dict[str, Any]) -> dict[str, Any]:
    """Per-layout summaries, the planner's predictions, and the ratios to the baseline."""
    a = s.args
    tokens = a.global_batch * a.seq_len * a.iters
    tps = {n: [tokens / t for t in secs] for n, secs in res["samples"].items()}
    ranks = res["per_rank"]
    pred = {n: predict(s, cfg, res["calibration"]) for n, cfg in res["configs"].items()}
    layouts: dict[str, Any] = {}
    for n, secs in res["samples"].items():
        lay = layout(n, s.world)
        live = [r[n]["live_peaks"] for r in ranks]  # [rank][measured step]
        fullest = [max(step) for step in zip(*live)]  # per measured step: the fullest rank
        worst_rank = max(range(s.world), key=lambda i: max(live[i]))
        est = pred[n]["peak_bytes"]
        entry = {
            "parallel": lay.parallel, "activation_checkpoint": lay.activation_checkpoint, "compile": lay.compile,
            "tokens_per_s": summarize(tps[n]),
            "step_ms_slowest_rank": summarize([1e3 * t / a.iters for t in secs]),
            "samples_s_per_repeat": secs,
            "memory": {
                "live_peak_bytes_per_rank": [max(x) for x in live],
                "live_peak_bytes_per_rank_per_step": live,
                "live_peak_bytes_fullest_rank": max(fullest),
                "breakdown_fullest_rank": ranks[worst_rank][n]["breakdown"],
                "peak_rss_bytes_per_rank": [r[n]["rss_peak"] for r in ranks],
                "rss_rise_bytes_per_rank": [r[n]["rss_rise"] for r in ranks],
                "peak_gpu_bytes_per_rank": [r[n]["gpu_peak"] for r in ranks] if s.device.type == "cuda" else None,
            },
            "planner": pred[n],
            "planner_memory_vs_measured": band_goal(f"{n}: planner peak / measured peak (fullest rank)",
                                                    [est] * len(fullest), fullest, TOLERANCE),
        }
        if n != BASELINE:
            r = paired_ratio_summary(tps[n], tps[BASELINE])
            predicted = pred[n]["tokens_per_s"] / pred[BASELINE]["tokens_per_s"]
            r.update(name=f"{n}/{BASELINE} tokens/s", goal=None, verdict="no goal", predicted=predicted,
                     predicted_in_interval=bool(r["ci_low"] <= predicted <= r["ci_high"]))
            entry["tokens_per_s_vs_ep"] = r
            entry["memory_vs_ep"] = {
                "measured": max(fullest) / layouts[BASELINE]["memory"]["live_peak_bytes_fullest_rank"],
                "predicted": est / pred[BASELINE]["peak_bytes"]}
        layouts[n] = entry
    cfg0 = res["configs"][BASELINE]
    return {"model": {k: getattr(cfg0.model, k) for k in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size",
                                                           "tie_embeddings")}
            | {k: getattr(cfg0.moe, k) for k in ("num_experts", "top_k", "expert_dim")},
            "params_total": res["params"][0], "params_active": res["params"][1],
            "calibration": res["calibration"], "agreement": res["agreement"], "layouts": layouts}


def write_results(s: Setup, models: dict[str, Any], load_at_start: list[float], rss_reset_ok: bool) -> None:
    """Write ``parallel_layouts_<device><tag>.json`` and ``.md`` (rank 0)."""
    a = s.args
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    config = {k: v for k, v in vars(a).items() if k not in ("perturb_layout",)}
    config.update(world_size=s.world, tokens_per_step=a.global_batch * a.seq_len,
                  amp_dtype=str(s.amp) if s.amp else "fp32", cpus_available=cpus,
                  oversubscribed=s.device.type == "cpu" and s.world * a.threads > (cpus or 1))
    result = {
        "benchmark": "parallel_layouts",
        "description": "tokens/s and peak memory per rank of EP, FSDP2+EP, TP+EP, PP+EP and the AC modes, measured "
                       "and as moesys plan predicts them",
        "provenance": provenance(),
        "config": config,
        "loadavg_1_5_15": {"start": load_at_start, "end": list(os.getloadavg())},
        "method": {
            "step": "system.train.step.train_step (pipeline_train_step under PP) on layouts built as the trainer "
                    "builds them (ParallelDims, parallelize_model, build_pipeline)",
            "data": "the same global batch per step for every layout; each data stream its PackedLoader slice",
            "timing": "the same warm-up for every layout, then repeats with the order rotated per repeat; a repeat "
                      "times --iters steps between barriers; its time is the slowest rank's",
            "agreement": "first-step cross-entropy of the global batch equal across layouts within rtol, else abort",
            "idle_layouts": "every layout stays built for the rotated repeats; after each of its steps outside the "
                            "timed region its gradients are freed (zero_grad(set_to_none=True), what its next step "
                            "does first), so that idle layouts hold parameters and AdamW state only",
            "live_peak": "system.plan.measure.LivePeak over each of the last --peak-steps warm-up steps: bytes of live "
                         "tensor storages (parameters, gradients, AdamW state, activations, buffers, inputs)",
            "peak_rss": "VmHWM reset before each repeat of a layout, max over repeats; includes the process baseline "
                        "(interpreter, libraries, every layout's model state); rss_rise = peak minus RSS at the reset"
                        + ("" if rss_reset_ok else " [reset unavailable: peak since process start]"),
            "planner": "system.plan.memory.rank_memory (fullest rank) and system.plan.estimate.step_time with explicit "
                       "figures measured here (matmul FLOP/s of one rank while all multiply, efficiency 1; Gloo/NCCL "
                       "all-reduce bus bandwidth, efficiency 1; all ranks on one node)",
            "statistics": "tokens/s ratios to ep: median of paired per-repeat ratios, 95% percentile bootstrap "
                          "(no goal set); planner memory: band_goal within 15% of the measured fullest-rank peak, "
                          "one pair per measured step",
        },
        "models": models,
    }
    out_dir = Path(a.out)
    stem = f"parallel_layouts_{a.device}{a.tag}"
    json_path = write_json(out_dir / f"{stem}.json", result)
    md_path = write_text(out_dir / f"{stem}.md", render_markdown(s, result))
    logger.info("wrote %s and %s", json_path, md_path)


def _mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 1e6:.1f}"


def _x(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def render_markdown(s: Setup, result: dict[str, Any]) -> str:
    """The markdown report: stamp, setup, then per model the throughput, memory and planner tables."""
    a, cfg = s.args, result["config"]
    oversub = (f" **Oversubscribed: {s.world} processes x {a.threads} thread(s) on {cfg['cpus_available']} cores.**"
               if cfg["oversubscribed"] else "")
    lines = [f"# Parallel layouts: tokens/s and peak memory per rank ({a.device}, {s.world} processes)", "",
             provenance_markdown(result["provenance"]),
             f"{a.global_batch} x {a.seq_len} tokens per step (all ranks, the same batches for every layout), "
             f"{cfg['amp_dtype']}; {a.warmup} warm-up steps per layout (the last {a.peak_steps} measured with "
             f"LivePeak), then {a.repeats} repeats x {a.iters} step(s), order rotated per repeat; a repeat's time is "
             f"the slowest rank's. {'NCCL, 1 GPU' if s.device.type == 'cuda' else f'Gloo, {a.threads} thread(s)'} per "
             f"rank.{oversub} Ratios to `ep`: median of paired per-repeat ratios, 95% bootstrap interval; no goal is "
             "set for them. MB = 1e6 bytes.", ""]
    for name, m in result["models"].items():
        c, lays = m["calibration"], m["layouts"]
        mm = c["matmul"]
        lines += [f"## {name}", "",
                  f"d {m['model']['dim']}, {m['model']['n_layers']} layers, {m['model']['n_heads']} heads, "
                  f"{m['model']['num_experts']} experts (hidden {m['model']['expert_dim']}), "
                  f"top-{m['model']['top_k']}; "
                  f"{m['params_total'] / 1e6:.1f}M parameters ({m['params_active'] / 1e6:.1f}M active). Planner "
                  f"figures measured here: matmul {mm['flops_used'] / 1e9:.1f} GFLOP/s per rank ({mm['dtype']}, "
                  f"{'x'.join(map(str, mm['shape']))}, median of ranks), all-reduce bus "
                  f"{c['collectives']['all_reduce']['bus_bytes_per_s'] / 1e9:.2f} GB/s (used), all-to-all "
                  f"{c['collectives']['all_to_all']['bus_bytes_per_s'] / 1e9:.2f} GB/s. First-step cross-entropy "
                  f"agrees within {_x(max(m['agreement']['first_step_abs_diff'].values()))} (abs).", ""]
        rows = []
        for n, e in lays.items():
            r = e.get("tokens_per_s_vs_ep")
            rows.append([n, _parallel(e), f"{e['tokens_per_s']['median']:,.0f}",
                         f"{e['step_ms_slowest_rank']['median']:.0f}",
                         f"{_x(r['median'])} [{_x(r['ci_low'])}, {_x(r['ci_high'])}]" if r else "1 (baseline)",
                         _x(r["predicted"]) if r else "1", ("yes" if r["predicted_in_interval"] else "no") if r else "",
                         f"{e['planner']['step_s'] * 1e3:.0f}"])
        lines += [markdown_table(["layout", "parallel", "tokens/s", "step ms", "tokens/s vs ep [95%]",
                                  "planner vs ep", "planner in interval", "planner step ms"], rows,
                                 align=["l", "l", "r", "r", "r", "r", "l", "r"]), ""]
        rows = []
        for n, e in lays.items():
            mem, g = e["memory"], e["planner_memory_vs_measured"]
            vs = e.get("memory_vs_ep")
            rows.append([n, " / ".join(_mb(v) for v in mem["live_peak_bytes_per_rank"]),
                         _mb(mem["live_peak_bytes_fullest_rank"]), _mb(e["planner"]["peak_bytes"]),
                         f"{_x(g['median'])} [{_x(g['ci_low'])}, {_x(g['ci_high'])}]", g["verdict"],
                         f"{_x(vs['measured'])} / {_x(vs['predicted'])}" if vs else "1 / 1",
                         " / ".join(_mb(v) for v in mem["peak_rss_bytes_per_rank"]),
                         _mb(max(mem["rss_rise_bytes_per_rank"]))])
        lines += [markdown_table(["layout", "LivePeak MB per rank", "fullest", "planner MB", "planner / measured",
                                  f"within {TOLERANCE:.0%}", "vs ep measured / planner", "peak RSS MB per rank",
                                  "max RSS rise MB"], rows), ""]
    lines += ["Notes:", "",
              "- LivePeak: bytes of live tensor storages over a steady-state step (`system.plan.measure.LivePeak`); "
              "the planner's figure is its estimate of the fullest rank (`system.plan.memory.rank_memory`). Peak RSS "
              "includes the process baseline and every layout's model state (all layouts stay built for the rotated "
              "repeats); the RSS rise is the step's growth over the RSS at the reset.",
              "- The planner's step time counts matmul FLOPs at the measured throughput and collective bytes at the "
              "measured bandwidth; it leaves out elementwise work, routing, the optimizer and Python overheads, so "
              "its absolute times are lower than measured on CPU: compare the ratios to `ep`."
              + (" With more processes than cores, a rank idle in a pipeline bubble or a collective gives its core "
                 "to the others, so part of what the planner charges as idle time is not lost here."
                 if cfg["oversubscribed"] else ""),
              f"- Load average (1, 5, 15 min) at start {_loads(result['loadavg_1_5_15']['start'])}, at end "
              f"{_loads(result['loadavg_1_5_15']['end'])}.", ""]
    return "\n".join(lines)


def _loads(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _parallel(e: dict[str, Any]) -> str:
    p = ", ".join(f"{k}={v}" for k, v in e["parallel"].items() if k not in ("pp_schedule", "pp_microbatches"))
    extra = [f"AC {e['activation_checkpoint']}"] if e["activation_checkpoint"] != "none" else []
    return "; ".join([p] + extra + (["compile"] if e["compile"] else []))


# --------------------------------------------------------------------------------------------
# launch


def run_rank(args: argparse.Namespace) -> None:
    """The body of one rank: init, every model, gather, write (rank 0).

    A numerical disagreement ends every rank with exit code 3 after rank 0 printed one line naming it.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    level = logging.getLevelName(args.log_level.upper()) if rank == 0 else logging.WARNING
    setup_logging(rank if world > 1 else None, level)
    logging.getLogger("system").setLevel(max(level, logging.WARNING))  # keep the library quiet unless asked
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=10), device_id=device)
        amp = torch.bfloat16
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
        amp = None
    s = Setup(args, rank, world, device, amp)
    from system.distributed.init import shutdown_distributed

    try:
        load_at_start = list(os.getloadavg())
        results = {m: run_model(s, m) for m in args.model_list}
        if rank == 0:
            models = {m: summarize_model(s, m, r) for m, r in results.items()}
            write_results(s, models, load_at_start, all(r["rss_reset_ok"] for r in results.values()))
    except NumericalDisagreement as e:
        if rank == 0:
            print(f"parallel_layouts benchmark ABORTED: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    shutdown_distributed()  # success only: after an exception the launcher stops the peers


def _spawned_rank(local_rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    """Entry of a process started by :func:`main` (``torch.multiprocessing`` spawn)."""
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run_rank(args)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark: under torchrun (env set) run this rank; else spawn ``--nproc`` ranks."""
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.nproc = int(os.environ["WORLD_SIZE"])
        validate_args(args)
        run_rank(args)
        return
    validate_args(args)
    setup_logging(None, logging.getLevelName(args.log_level.upper()))
    logger.info("spawning %d processes (%s): layouts %s, models %s", args.nproc, args.device,
                ",".join(args.layout_list), ",".join(args.model_list))
    import torch.multiprocessing as mp

    try:
        mp.start_processes(_spawned_rank, args=(args.nproc, free_port(), args), nprocs=args.nproc, start_method="spawn")
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        raise SystemExit(f"parallel_layouts benchmark failed: {str(e).strip().splitlines()[0]}") from None


if __name__ == "__main__":
    main()
