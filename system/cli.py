"""The ``moesys`` command line.

``moesys train --config FILE [--nproc-per-node N] [--nnodes N|MIN:MAX --rdzv-endpoint HOST:PORT]
[--max-restarts R] [--dry-run] [--section.key value ...]`` validates the job config, builds one
torchrun command (``--standalone`` on one node, c10d rendezvous across nodes) and runs it (or prints
it with ``--dry-run``). Every node of a multi-node job runs the same command.
"""

from __future__ import annotations

import argparse
import logging
import sys

from system.checkpoint import cli as ckpt_cli
from system.cluster.torchrun import LaunchSpec, build_torchrun_command, format_command, run_command
from system.config.loader import ConfigError, load_config

logger = logging.getLogger("system.cli")


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a MoE model under torchrun",
        description="Train a MoE model. Unknown --section.key value arguments override the TOML config.",
    )
    p.add_argument("--config", required=True, help="TOML job file, e.g. configs/cpu-tiny.toml")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="worker processes per node (default: the config's world size on one node)")
    p.add_argument("--nnodes", default="1", help="nodes: N, or MIN:MAX for an elastic job")
    p.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of the c10d rendezvous (multi-node)")
    p.add_argument("--rdzv-id", default="moesys", help="rendezvous id shared by all nodes of the job")
    p.add_argument("--max-restarts", type=int, default=0, help="worker-group restarts after a failure")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Validate the config, build the torchrun command, print or run it; return the exit code."""
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    nproc = args.nproc_per_node
    if nproc is None:
        if cfg.parallel.dp == -1:
            nproc = cfg.parallel.ep
        else:
            nproc = cfg.parallel.dp * cfg.parallel.ep
    spec = LaunchSpec(
        nproc_per_node=nproc, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id, max_restarts=args.max_restarts,
    )
    try:
        argv, env = build_torchrun_command(spec, ["--config", args.config, *overrides])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    line = format_command(argv, env)
    if args.dry_run:
        print(line)
        return 0
    print(f"+ {line}", file=sys.stderr, flush=True)
    return run_command(argv, env)


def build_parser() -> argparse.ArgumentParser:
    """The ``moesys`` argument parser (subcommands)."""
    parser = argparse.ArgumentParser(prog="moesys", description="moe-system: train and serve MoE models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    ckpt_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moesys`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") and not (a.startswith("--") and "." in a.split("=")[0])]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --section.key value)")
    if args.command == "train":
        return cmd_train(args, extra)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    if args.command == "ckpt":
        return ckpt_cli.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
