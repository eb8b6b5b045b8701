"""The ``moesys`` command line.

``moesys train --config FILE [--nproc-per-node N] [--nnodes N|MIN:MAX --rdzv-endpoint HOST:PORT]
[--max-restarts R] [--dry-run] [--section.key value ...]`` validates the job config, builds one
torchrun command (``--standalone`` on one node, c10d rendezvous across nodes) and runs it (or prints
it with ``--dry-run``, after the mesh, the parameter counts and the per-rank memory of the model state).
Every node of a multi-node job runs the same command.

``moesys launch --config FILE [--ray-address ADDR|auto] [--num-nodes N|MIN:MAX] [--workers-per-node P]
[--gpus-per-worker G] [--storage-path URL] [--max-failures F] [--dry-run] [--section.key value ...]`` runs
the same job on a Ray cluster (Ray Train ``TorchTrainer``), restarting from the newest committed
checkpoint when a worker or node dies (see :mod:`system.cluster.ray_launch`).

``moesys plan --config FILE --world N [--gpus-per-node 8] [--device h100-80gb] [--top N] [--json]
[--section.key value ...]`` lists the parallel layouts of the job that fit a cluster, with memory per rank,
traffic per collective, step time and MFU (:mod:`system.plan.cli`).

``moesys generate --checkpoint DIR --prompt TEXT [--prompt-ids 1,5,9] [--prompts-file FILE]
[--output-format text|json] [--max-new-tokens N] [--batch-size B] [--offload none|ring|experts] [--slots K]
[--expert-cache C] [--device-memory 4GiB] [--link-bandwidth 2GB] [--sampling greedy|top-p --top-p P
--temperature T --seed S] [--device cpu|cuda] [--ignore-eos]`` generates from a saved model
(``model.safetensors`` + ``config.json``, with the folder's ``tokenizer.json`` if any), resident or
streamed through a ring of K slots (SE-MoE). Stdout carries only the generated text (or one JSON object
per prompt); the plan and the throughput go to stderr.
"""

from __future__ import annotations

import argparse
import math
import json
import logging
import os
import sys

from system.checkpoint import cli as ckpt_cli
from system.plan import cli as plan_cli
from system.cluster.torchrun import LaunchSpec, build_torchrun_command, format_command
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
    p.add_argument("--max-restarts", type=int, default=0,
                   help="worker-group restarts after a failure (each resumes from the newest checkpoint)")
    p.add_argument("--dry-run", action="store_true",
                   help="run the launch checks, print the mesh, parameter counts and per-rank memory of the model "
                        "state, then the torchrun command, and exit (a missing checkpoint.initial_load_path only "
                        "warns)")
    p.add_argument("--debug", action="store_true", help="tracebacks for expected errors too (config, data, checkpoint)")


def _config_world_size(cfg) -> int:
    """Ranks of the config's layout on one node when ``--nproc-per-node`` is not given: the smallest world
    its degrees fit, ``pp x dp_replicate x dp_shard x tp`` with every derived degree (``-1``) at its minimum
    (``dp x ep`` per stage when ``parallel.dp`` is set)."""
    p = cfg.parallel
    etp = p.tp if p.expert_tp else 1
    if p.dp != -1:
        return p.pp * p.dp * p.ep * etp
    if p.dp_shard != -1:
        return p.pp * p.dp_replicate * p.dp_shard * p.tp
    fold = p.ep if p.expert_tp else max(1, p.ep // math.gcd(p.ep, p.tp))  # ep must divide dp_shard (x tp)
    return p.pp * p.dp_replicate * fold * p.tp


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Check the job (:func:`system.train.preflight.preflight`), then run torchrun's agent here.

    Exit codes: 0 done; 2 a problem found before start (config, data, checkpoint, run folder) or an
    expected error in a worker; 143 preempted (a checkpoint of the last step was committed); 1 a bug
    in a worker; ``128 + N`` the launcher was stopped by signal ``N``.
    """
    from system.cluster.agent import run_agent
    from system.train.lifecycle import PREEMPTED_EXIT
    from system.cluster.torchrun import parse_nnodes
    from system.errors import MoesysError
    from system.train.preflight import default_run_dir, missing_initial_load, preflight

    try:
        cfg = load_config(args.config, overrides, initial_load_missing_ok=args.dry_run)
        nproc = args.nproc_per_node if args.nproc_per_node is not None else _config_world_size(cfg)
        spec = LaunchSpec(
            nproc_per_node=nproc, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint,
            rdzv_id=args.rdzv_id, max_restarts=args.max_restarts,
        )
        lo, hi = parse_nnodes(args.nnodes)
        standalone = hi == 1 and not args.rdzv_endpoint
        run_dir = default_run_dir(cfg)
        job_args = ["--config", args.config, *overrides]
        if not cfg.metrics.run_dir:  # pin it: every restart of the workers must find the same folder
            job_args += ["--metrics.run_dir", run_dir]
        argv, env = build_torchrun_command(spec, job_args)
        how = f"--nproc-per-node {nproc} x --nnodes {args.nnodes}"
        tokenizer = preflight(cfg, run_dir, world_sizes=[nproc * n for n in range(lo, hi + 1)], how=how,
                              nproc_per_node=nproc, job_id=None if standalone else args.rdzv_id,
                              initial_load_missing_ok=args.dry_run)
        plan = _dry_run_plan(cfg, nproc * lo, tokenizer.vocab_size) if args.dry_run else []
    except (MoesysError, ValueError, FileNotFoundError) as e:
        _error(str(e))
        return 2
    line = format_command(argv, env)
    if args.dry_run:
        warning = missing_initial_load(cfg)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        print("\n".join([*plan, line]))
        return 0
    print(f"+ {line}", file=sys.stderr, flush=True)
    result = run_agent(argv, env, debug=args.debug)
    if result.exit_code == PREEMPTED_EXIT or (result.exit_code and not result.failures):
        # Preempted, or the launcher itself was stopped: say where the workers' checkpoint is.
        latest = _latest_checkpoint(cfg, run_dir)
        _error(f"{result.message}; newest checkpoint: {latest or 'none'}"
               + ("; continue with --checkpoint.resume latest" if latest and "continue with" not in result.message else ""))
    elif result.exit_code:
        failed = len(result.failures)
        _error(f"{result.message} (rank {result.failures[0].rank}; {failed} rank(s) failed)")
    return result.exit_code


def _dry_run_plan(cfg, world_size: int, tokenizer_vocab: int) -> list[str]:
    """What ``--dry-run`` prints before the command: the mesh, the parameter counts and the per-rank
    memory of the model state (:func:`system.train.memory.estimate_memory`) at ``world_size`` ranks
    (the fewest an elastic range allows: the most per rank)."""
    import copy

    from system.train.memory import estimate_memory
    from system.train.trainer import resolve_vocab

    resolved = copy.deepcopy(cfg)
    resolve_vocab(resolved, tokenizer_vocab)
    return estimate_memory(resolved, world_size).describe()


def _latest_checkpoint(cfg, run_dir: str) -> str | None:
    """The checkpoint ``latest`` names under the job's checkpoint root, if it can be read from here."""
    from system.checkpoint.storage import read_latest
    from system.train.preflight import checkpoint_root

    root = checkpoint_root(cfg, run_dir)
    try:
        name = read_latest(root)
    except (OSError, ValueError):
        return None
    return f"{root.rstrip('/')}/{name}" if name else None


def _launch_parser(sub) -> None:
    p = sub.add_parser(
        "launch",
        help="train on a Ray cluster (TorchTrainer), restarting from checkpoints after failures",
        description="Train on a Ray cluster with Ray Train's TorchTrainer; workers that die (or nodes that "
                    "go) restart the job from its newest committed checkpoint. Unknown --section.key value "
                    "arguments override the TOML config.",
    )
    p.add_argument("--config", required=True, help="TOML job file, e.g. configs/cpu-tiny.toml")
    p.add_argument("--ray-address", default=None,
                   help="HOST:PORT of the cluster's head, or auto; omitted: start a local Ray instance on 127.0.0.1")
    p.add_argument("--num-nodes", default="1", help="nodes: N, or MIN:MAX for an elastic run")
    p.add_argument("--workers-per-node", type=int, default=None,
                   help="workers (ranks) per node (default: the config's world size on one node)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0: CPU workers, Gloo)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker")
    p.add_argument("--storage-path", default="",
                   help="shared storage (path or URL) for checkpoints and the run; default runs/ray (one node only)")
    p.add_argument("--name", default="", help="run name under the storage path; reuse it to continue a run")
    p.add_argument("--max-failures", type=int, default=3, help="restarts after worker or node failures (-1: unlimited)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan, start nothing")


def cmd_launch(args: argparse.Namespace, overrides: list[str]) -> int:
    """Validate, then run the job on Ray (or print the plan); return the exit code (1: the run failed)."""
    from system.cluster.ray_launch import RayLaunchSpec, launch, plan_launch  # Ray only when launching
    from system.errors import MoesysError
    from system.train.log import init_logging

    init_logging(0)
    workers = args.workers_per_node
    if workers is None:
        try:
            cfg = load_config(args.config, overrides)
        except (ConfigError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        workers = _config_world_size(cfg)
    spec = RayLaunchSpec(
        config=args.config, overrides=overrides, ray_address=args.ray_address, num_nodes=args.num_nodes,
        workers_per_node=workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        storage_path=args.storage_path, name=args.name, max_failures=args.max_failures,
    )
    try:
        plan = plan_launch(spec, check_storage=not args.dry_run)
        print(plan.describe(), flush=True)
        if args.dry_run:
            return 0
        result = launch(plan)
    except (MoesysError, ValueError, FileNotFoundError, RuntimeError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"== ray run {result.experiment}: {len(result.attempts)} attempt(s), {result.restarts} restart(s) ==")
    for a in result.attempts:
        print(f"attempt {a['attempt']}: {a['world_size']} workers (dp {a['dp']} x ep {a['ep']}), "
              f"from step {a['start_step']}" + (f" ({a['resumed_from']})" if a.get("resumed_from") else ""))
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    print(f"steps {result.summary.get('steps')}, val loss {result.summary.get('val_bpb', float('nan')):.3f} bits/byte; "
          f"checkpoint {result.checkpoint}; metrics {result.run_dir}")
    return 0


def _generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a saved model (resident or ring-offloaded)",
        description="Generate text with a KV cache, batched prompts, and optional ring offload (SE-MoE).",
    )
    p.add_argument("--checkpoint", required=True,
                   help="folder with model.safetensors and config.json (and tokenizer.json, if the model has one)")
    p.add_argument("--prompt", action=_PromptAction, const="text", dest="prompts", metavar="TEXT",
                   help="prompt text (repeat for several; BOS is added as the model's tokenizer does)")
    p.add_argument("--prompt-ids", action=_PromptAction, const="ids", dest="prompts", metavar="IDS",
                   help="a prompt as comma-separated token ids, e.g. 1,5,9 (repeat for several; no tokenizer "
                        "needed; kept in order with --prompt)")
    p.add_argument("--prompts-file", default=None,
                   help="throughput mode: one prompt per non-empty line (run after --prompt/--prompt-ids)")
    p.add_argument("--output-format", choices=("text", "json"), default="text",
                   help="text: the generated text of each prompt on stdout; json: one object per prompt and "
                        "line, {prompt_ids, generated_ids, text} (text null without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (>= 1)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (>= 1)")
    p.add_argument("--offload", choices=("none", "ring", "experts"), default="none",
                   help="none: all weights on the device; ring: FFN sections streamed through K slots; "
                        "experts: only the routed experts streamed through an LRU of C expert slots")
    p.add_argument("--slots", type=int, default=2, help="K, ring slots (>= 1; 1: no prefetch)")
    p.add_argument("--expert-cache", type=int, default=None,
                   help="C, expert slots of --offload experts (>= 1; above the model's routed experts: clamped)")
    p.add_argument("--device-memory", default=None, help="device-memory budget, e.g. 4GiB (checked before running)")
    p.add_argument("--link-bandwidth", default=None, help="CPU link throttle in bytes/s, e.g. 2GB (stands in for PCIe)")
    p.add_argument("--sampling", choices=("greedy", "top-p"), default="greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass, in (0, 1]")
    p.add_argument("--temperature", type=float, default=1.0, help="logits divisor, > 0")
    p.add_argument("--seed", type=int, default=0, help="seed of the top-p sampler")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (N below the visible GPU count)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")


class _PromptAction(argparse.Action):
    """Append ``(kind, value)`` to ``namespace.prompts`` (``kind`` is this option's ``const``: ``"text"``
    or ``"ids"``), so that ``--prompt`` and ``--prompt-ids`` keep the order they were given in."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), (self.const, values)])


def _read_prompts(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 prompts file.

    Raises:
        DataError: the file cannot be read, is not UTF-8 text, or holds no prompt (each names the file).
    """
    from system.errors import DataError

    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"prompts file {path!r} is not UTF-8 text (an invalid byte {e.object[e.start]:#04x}); "
                        f"give one prompt per line") from None
    except OSError as e:
        raise DataError(f"prompts file {path!r} cannot be read: {e.strerror or e}") from None
    if not prompts:
        raise DataError(f"prompts file {path!r} has no prompts: it is empty or holds only blank lines")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    """Run :func:`system.inference.generate` and print what was generated; return the exit code.

    Every argument is checked (:func:`system.inference.engine.check_request`, the ``--prompt-ids``
    syntax) before a file is read, and the ids against the model's vocabulary before its weights
    are. Prompts run in the order ``--prompt``/``--prompt-ids`` were given, then the prompts file.
    Stdout gets only the output (see :func:`_print_generated`); the prompt headers, the throughput
    and the plan go to stderr, so ``moesys generate ... --output-format json | jq`` works.

    Raises:
        MoesysError: a bad argument, prompt, prompts file, model folder, tokenizer or plan (``main``
            prints it, exit 2).
    """
    from system.inference.engine import check_request, generate  # imported here: the train path does not need it
    from system.inference.plan import PlanError
    from system.inference.prompts import parse_prompt_ids

    check_request(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, offload=args.offload,
                  slots=args.slots, expert_cache=args.expert_cache, sampling=args.sampling, top_p=args.top_p,
                  temperature=args.temperature, device=args.device, device_memory=args.device_memory,
                  link_bandwidth=args.link_bandwidth)
    if args.offload == "experts" and args.expert_cache is None:
        raise PlanError("--offload experts needs --expert-cache C (expert slots, >= 1)")
    prompts: list = [value if kind == "text" else parse_prompt_ids(value) for kind, value in args.prompts or []]
    if args.prompts_file:
        prompts += _read_prompts(args.prompts_file)
    if not prompts:
        raise PlanError("give --prompt TEXT, --prompt-ids 1,5,9 or --prompts-file FILE")
    try:
        result = generate(
            args.checkpoint, prompts, args.max_new_tokens, args.batch_size, offload=args.offload, slots=args.slots,
            device_memory=args.device_memory, sampling=args.sampling, top_p=args.top_p,
            temperature=args.temperature, seed=args.seed, device=args.device, link_bandwidth=args.link_bandwidth,
            expert_cache=args.expert_cache, stop_at_eos=not args.ignore_eos,
        )
    except OSError as e:  # a model file that cannot be opened or mapped (permissions, I/O): named by the OS
        print(f"error: cannot read the model in {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    _print_generated(result, args.output_format)
    st = result.stats
    print(f"--- {st.sequences} prompts, {st.new_tokens} new tokens: {st.tokens_per_s:.1f} tokens/s "
          f"(decode {st.decode_tokens_per_s:.1f} tokens/s; prefill {st.prefill_s:.3f} s, decode {st.decode_s:.3f} s); "
          f"streamed {st.bytes_streamed} B ({st.bytes_per_token:.0f} B/token)", file=sys.stderr)
    print(f"--- plan: {result.plan}", file=sys.stderr)
    return 0


def _print_generated(result, output_format: str) -> None:
    """Print each prompt's output on stdout, nothing else there.

    ``json``: one line per prompt, ``{"prompt_ids": [...], "generated_ids": [...], "text": ...}`` (the
    ids as run: BOS included, the EOS that stopped the row included; ``text`` the decoded new tokens,
    ``null`` without a tokenizer). ``text``: the generated text of each prompt, one ``print`` each,
    after a ``--- prompt N ---`` header on stderr; without a tokenizer, the new ids as ``1,5,9``.
    """
    rows = zip(result.prompt_ids, result.tokens, result.texts)
    if output_format == "json":
        for prompt_ids, new_ids, text in rows:
            print(json.dumps({"prompt_ids": prompt_ids, "generated_ids": new_ids, "text": text}))
        return
    if any(t is None for t in result.texts):
        print("--- the model has no tokenizer: printing the generated token ids", file=sys.stderr)
    for i, (_, new_ids, text) in enumerate(rows):
        print(f"--- prompt {i + 1} ---", file=sys.stderr, flush=True)
        print(text if text is not None else ",".join(map(str, new_ids)), flush=True)


def _is_number(text: str) -> bool:
    """True for a numeric override value such as ``-1`` or ``-1e-3`` (not an option)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    """The ``moesys`` argument parser (subcommands)."""
    parser = argparse.ArgumentParser(prog="moesys", description="moe-system: train and serve MoE models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _launch_parser(sub)
    _generate_parser(sub)
    ckpt_cli.add_parser(sub)
    plan_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moesys`` console script; returns the exit code.

    An expected error (:class:`system.errors.MoesysError`) escaping a sub-command is printed as one line,
    ``error: <message>``, without a traceback: exit code 1 for ``moesys ckpt``, 2 otherwise. A reader of
    stdout that goes away early (``moesys ckpt inspect PATH | head``) ends the command quietly with 141
    (128 + SIGPIPE, as a shell reports it).
    """
    from system.errors import MoesysError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        code = _dispatch(parser, args, extra)
        sys.stdout.flush()  # a closed pipe shows up here rather than at interpreter exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except MoesysError as e:
        if getattr(args, "debug", False):  # --debug: the traceback of expected errors too
            raise
        message = " ".join(str(e).split("\n")) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1 if args.command == "ckpt" else 2


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> int:
    """Run the sub-command ``args.command``; returns its exit code."""
    if args.command == "generate":
        if extra:
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
        return cmd_generate(args)
    bad = [a for a in extra if a.startswith("-") and not (a.startswith("--") and "." in a.split("=")[0])
           and not _is_number(a)]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --section.key value)")
    if args.command == "train":
        return cmd_train(args, extra)
    if args.command == "launch":
        return cmd_launch(args, extra)
    if args.command == "plan":
        return plan_cli.run(args, extra)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    if args.command == "ckpt":
        return ckpt_cli.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _silence_stdout() -> None:
    """Point the process's stdout at ``/dev/null`` after its reader went away, so that the interpreter's
    final flush of what is still buffered does not fail again (the recipe of the Python docs, "Note on
    SIGPIPE"). Only the real stdout is redirected; a replaced ``sys.stdout`` (tests) is left alone."""
    try:
        if sys.stdout is not None and sys.stdout is sys.__stdout__:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
