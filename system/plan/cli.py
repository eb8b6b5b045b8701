"""``moesys plan``: the parallel layouts of a job that fit a cluster, with memory, traffic, step time and MFU.

``moesys plan --config configs/X.toml --world 1024 [--gpus-per-node 8] [--device h100-80gb] [--memory-gib G
--peak-tflops F --intra-node-gbps B --inter-node-gbps B] [--global-batch N] [--top N] [--json]
[--section.key value ...]``. Exit codes: 0 layouts fit; 1 none fits (one line says so, with the nearest);
2 a bad argument or config.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> None:
    """Register ``plan`` on the ``moesys`` sub-command parsers."""
    from system.plan.devices import DEVICES

    p = sub.add_parser(
        "plan",
        help="list the parallel layouts of a job that fit a cluster: memory, traffic, step time, MFU",
        description="Estimate, for a job config and a cluster, every parallel layout (pp x dp_replicate x dp_shard x "
                    "tp, EP or FSSDP, replicated or FSDP2 dense, each activation-checkpointing mode): memory per rank, "
                    "bytes per collective on NVLink and the network, step time and MFU; print the fastest that fit. "
                    "Unknown --section.key value arguments override the TOML config.",
    )
    p.add_argument("--config", required=True, help="TOML job file, e.g. configs/qwen3-30b-a3b-ft.toml")
    p.add_argument("--world", type=int, required=True, help="GPUs (ranks) of the job")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node sharing NVLink (default 8)")
    p.add_argument("--device", choices=sorted(DEVICES), default=None,
                   help="device profile (memory, bf16 peak, NVLink and network per GPU; sources printed)")
    p.add_argument("--memory-gib", type=float, default=None, help="device memory, GiB (overrides the profile)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak of the job's math, TFLOP/s")
    p.add_argument("--intra-node-gbps", type=float, default=None,
                   help="NVLink per GPU and direction, Gb/s (gigabits; 3600 = 450 GB/s)")
    p.add_argument("--inter-node-gbps", type=float, default=None,
                   help="network per GPU and direction, Gb/s (400 for NDR InfiniBand)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per optimizer step (default: training.batch_size x training.grad_accum x --world)")
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of device memory the job may use (default 0.9: CUDA context, NCCL, fragmentation)")
    p.add_argument("--compute-efficiency", type=float, default=0.5,
                   help="fraction of the dense peak the matmuls reach (default 0.5)")
    p.add_argument("--link-efficiency", type=float, default=0.8,
                   help="fraction of a link's bandwidth a collective reaches (default 0.8)")
    p.add_argument("--top", type=int, default=10, help="layouts to print (default 10)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def _check(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the option when an argument is out of range."""
    for option, value in (("--world", args.world), ("--gpus-per-node", args.gpus_per_node), ("--top", args.top)):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    if args.global_batch is not None and args.global_batch < 1:
        raise ValueError(f"--global-batch must be >= 1, got {args.global_batch}")
    for option, value in (("--memory-fraction", args.memory_fraction),
                          ("--compute-efficiency", args.compute_efficiency),
                          ("--link-efficiency", args.link_efficiency)):
        if not 0 < value <= 1:
            raise ValueError(f"{option} must be in (0, 1], got {value}")


def build(args: argparse.Namespace, overrides: list[str]):
    """The job config (vocabulary resolved), the cluster and the step shape of a ``plan`` command line.

    Raises:
        ValueError: a bad option (named) or config (:class:`~system.config.loader.ConfigError`).
        FileNotFoundError: the config file or the tokenizer is missing.
    """
    from system.config.loader import load_config
    from system.plan.devices import resolve_device
    from system.plan.estimate import Cluster
    from system.plan.memory import StepShape
    from system.train.memory import compute_bytes

    _check(args)
    device = resolve_device(args.device, memory_gib=args.memory_gib, peak_tflops=args.peak_tflops,
                            intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps)
    cfg = load_config(args.config, overrides, initial_load_missing_ok=True)
    if cfg.model.vocab_size == 0:
        from system.data import build_tokenizer
        from system.train.trainer import resolve_vocab

        resolve_vocab(cfg, build_tokenizer(cfg.data.tokenizer).vocab_size)
    t = cfg.training
    cb = compute_bytes(t.mixed_precision, cuda=True)
    step = StepShape(micro_batch=t.batch_size, seq_len=t.seq_len,
                     global_batch=args.global_batch or t.batch_size * t.grad_accum * args.world, cb=cb, flash=True,
                     grouped_mm=device.grouped_mm and cb == 2, chunk_bytes=None,
                     pp_microbatches=cfg.parallel.pp_microbatches, pp_schedule=cfg.parallel.pp_schedule)
    cluster = Cluster(args.world, args.gpus_per_node, device, args.memory_fraction, args.compute_efficiency,
                      args.link_efficiency)
    return cfg, cluster, step


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Plan and print; return the exit code (0 layouts fit, 1 none fits, 2 a bad argument or config)."""
    from system.errors import MoesysError
    from system.plan import report
    from system.plan.estimate import plan

    try:
        cfg, cluster, step = build(args, overrides)
        result = plan(cfg, cluster, step)
    except (MoesysError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    message = None if result.fits else report.no_fit_line(args.config, result, cluster)
    if args.json:
        print(json.dumps(report.as_json(args.config, result, cluster, step, args.top, message)))
    elif message:
        print(message)
    else:
        lines = report.header_lines(args.config, result, cluster, step)
        print("\n".join([*lines, *report.legend_lines(), *report.table_lines(result, args.top)]))
    return 0 if result.fits else 1
