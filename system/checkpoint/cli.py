"""``moesys ckpt``: inspect, verify, export and import checkpoints (no process group needed).

- ``moesys ckpt inspect PATH [--json]``: tensors, dtypes, global shapes, boxes, the layout it was
  saved under, step and size.
- ``moesys ckpt verify PATH``: recompute every checksum and file size; exit code 1 on any problem.
- ``moesys ckpt export PATH --format safetensors --out DIR [--overwrite]``: one consolidated Hugging Face
  style ``model.safetensors`` (+ ``config.json``) of the model weights, for inference or sharing. ``DIR``
  must not exist or be empty; ``--overwrite`` replaces an earlier export (never any other folder or file).
- ``moesys ckpt export PATH --format hf --out DIR [--max-shard-size 5GB] [--tokenizer DIR] [--dtype bfloat16]
  [--overwrite]``: a Hugging Face model folder of the model's family (``model.hf_model_type``, else inferred
  from the architecture): per-expert tensors, shards + ``model.safetensors.index.json`` past
  ``--max-shard-size``, ``config.json``, ``generation_config.json`` and the tokenizer files of ``--tokenizer``
  (default: ``data.tokenizer`` when it is a Hugging Face folder). ``PATH`` may also be a model folder we
  exported (``model.safetensors`` + our ``config.json``).
- ``moesys ckpt import-dcp DCP_DIR --out PATH [--overwrite]``: convert a PyTorch DCP checkpoint (TorchTitan,
  Megatron ``torch_dist``) into this format. DCP's metadata is a pickle: import trusted ones only.
- ``moesys ckpt import-hf HF_DIR --out PATH [--overwrite]``: convert a Hugging Face MoE model folder
  (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3; safetensors) into this format, one tensor at a time;
  the job config saved with it names the model and ``data.tokenizer = HF_DIR`` when it has a tokenizer.

``PATH`` is a checkpoint folder, or a root holding ``latest``.
"""

from __future__ import annotations

import argparse
import json
import sys

MODEL_PREFIX = "model."


def add_parser(sub) -> None:
    """Register ``ckpt`` and its sub-commands on the ``moesys`` sub-parser."""
    p = sub.add_parser("ckpt", help="inspect, verify, export or import checkpoints",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="ckpt_command", required=True)
    i = cmds.add_parser("inspect", help="tensors, shapes, layout saved, size")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    v = cmds.add_parser("verify", help="recompute checksums and file sizes")
    v.add_argument("path")
    e = cmds.add_parser("export", help="consolidated safetensors model, or a Hugging Face model folder")
    e.add_argument("path")
    e.add_argument("--format", choices=["safetensors", "hf"], default="safetensors",
                   help="safetensors: model.safetensors + our config.json; hf: a Hugging Face model folder")
    e.add_argument("--out", required=True,
                   help="output folder; must not exist, be empty, or be an earlier export (with --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out (nothing else)")
    e.add_argument("--max-shard-size", default="5GB",
                   help="--format hf: bytes per safetensors shard (5GB = 5e9, 2GiB = 2^31) [default: 5GB]")
    e.add_argument("--tokenizer", default=None,
                   help="--format hf: folder whose tokenizer.json, tokenizer_config.json and "
                        "special_tokens_map.json are copied [default: data.tokenizer when it is one]")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="--format hf: cast the weights [default: as saved]")
    d = cmds.add_parser("import-dcp", help="convert a torch.distributed.checkpoint folder")
    d.add_argument("dcp_dir")
    d.add_argument("--out", required=True, help="checkpoint folder to write")
    d.add_argument("--overwrite", action="store_true",
                   help="replace a committed checkpoint at --out (never a folder that is not a checkpoint)")
    h = cmds.add_parser("import-hf", help="convert a Hugging Face MoE model folder")
    h.add_argument("hf_dir")
    h.add_argument("--out", required=True, help="checkpoint folder to write")
    h.add_argument("--overwrite", action="store_true",
                   help="replace a committed checkpoint at --out (never a folder that is not a checkpoint)")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def cmd_inspect(path: str, as_json: bool) -> int:
    """Print :func:`system.checkpoint.inspect`'s summary."""
    from system.checkpoint import inspect

    info = inspect(path)
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    extra = info.get("extra") or {}
    print(f"checkpoint   {info['path']}")
    print(f"step         {extra.get('step', '?')}   format v{info['version']}")
    print(f"saved by     world size {info['world_size']}, layout {json.dumps(info['layout'])}")
    print(f"size         {_size(info['total_bytes'])} in {len(info['files'])} data files")
    print(f"tensors      {len(info['tensors'])}")
    width = max((len(k) for k in info["tensors"]), default=10)
    for fqn, t in info["tensors"].items():
        print(f"  {fqn:<{width}}  {t['dtype']:<9} {str(t['shape']):<18} {t['boxes']:>3} box(es)  {_size(t['nbytes'])}")
    return 0


def cmd_verify(path: str) -> int:
    """Check every checksum; print the problems; 0 when there are none."""
    from system.checkpoint import verify

    problems = verify(path)
    for p in problems:
        print(f"problem: {p}")
    print("ok: every checksum and file size matches" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_export(path: str, out: str, overwrite: bool = False) -> int:
    """Write the model weights of a checkpoint as ``out/model.safetensors`` + ``out/config.json``.

    Raises:
        CheckpointError: the checkpoint cannot be read or holds no model tensors;
            ``ExportTargetError`` when ``out`` must not be replaced (see
            :func:`system.checkpoint.model_io.write_model`).
    """
    from system.checkpoint import load_full
    from system.checkpoint.errors import CheckpointError
    from system.checkpoint.model_io import check_export_target, write_model

    check_export_target(out, overwrite)  # before reading the checkpoint: fail fast
    tensors, result = load_full(path, prefix=MODEL_PREFIX)
    if not tensors:
        raise CheckpointError(f"{path} holds no model tensors (names starting with {MODEL_PREFIX!r})")
    model = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items()}
    config = result.extra.get("config", {})
    write_model(model, out, config, overwrite=overwrite)
    total = sum(t.numel() * t.element_size() for t in model.values())
    print(f"wrote {out}/model.safetensors ({len(model)} tensors, {_size(total)}) and config.json")
    return 0


def cmd_export_hf(path: str, out: str, *, max_shard_size: str, tokenizer: str | None, dtype: str | None,
                  overwrite: bool = False) -> int:
    """Write the model of a checkpoint (or of an exported model folder) as a Hugging Face folder ``out``.

    Raises:
        ExportTargetError, CheckpointError, HFCheckpointError, ConfigError, PlanError (a bad
            ``--max-shard-size``): see :func:`system.hf.convert.export_hf`.
    """
    import torch

    from system.hf.convert import export_hf
    from system.inference.plan import parse_bytes

    shard = parse_bytes(max_shard_size)
    folder, family, tok = export_hf(path, out, max_shard_size=shard or 0, tokenizer=tokenizer, overwrite=overwrite,
                                    dtype=getattr(torch, dtype) if dtype else None)
    weights = sorted(f.name for f in folder.glob("*.safetensors"))
    total = sum((folder / w).stat().st_size for w in weights)
    print(f"wrote {folder} ({family}: {len(weights)} safetensors file(s), {_size(total)}; config.json, "
          f"generation_config.json" + (f"; tokenizer from {tok}" if tok else "; no tokenizer") + ")")
    return 0


def cmd_import_hf(hf_dir: str, out: str, overwrite: bool) -> int:
    """Convert a Hugging Face model folder into this format."""
    from system.hf.convert import import_hf

    path = import_hf(hf_dir, out, overwrite=overwrite)
    print(f"imported {hf_dir} -> {path}")
    return 0


def cmd_import_dcp(dcp_dir: str, out: str, overwrite: bool) -> int:
    """Convert a DCP checkpoint into this format."""
    from system.checkpoint import import_dcp

    path = import_dcp(dcp_dir, out, overwrite=overwrite)
    print(f"imported {dcp_dir} -> {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch ``moesys ckpt ...``; expected errors (any ``MoesysError``) become exit code 1 with the message."""
    from system.errors import MoesysError

    try:
        if args.ckpt_command == "inspect":
            return cmd_inspect(args.path, args.json)
        if args.ckpt_command == "verify":
            return cmd_verify(args.path)
        if args.ckpt_command == "export" and args.format == "hf":
            return cmd_export_hf(args.path, args.out, max_shard_size=args.max_shard_size, tokenizer=args.tokenizer,
                                 dtype=args.dtype, overwrite=args.overwrite)
        if args.ckpt_command == "export":
            hf_only = [f for f, v in (("--tokenizer", args.tokenizer), ("--dtype", args.dtype),
                                      ("--max-shard-size", args.max_shard_size != "5GB")) if v]
            if hf_only:
                raise ValueError(f"{', '.join(hf_only)} apply to --format hf only")
            return cmd_export(args.path, args.out, args.overwrite)
        if args.ckpt_command == "import-dcp":
            return cmd_import_dcp(args.dcp_dir, args.out, args.overwrite)
        if args.ckpt_command == "import-hf":
            return cmd_import_hf(args.hf_dir, args.out, args.overwrite)
    except (MoesysError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 2
