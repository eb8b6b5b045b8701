"""Hugging Face model folders to and from our checkpoints (``moesys ckpt import-hf``, ``export --format hf``).

- :func:`import_hf`: an HF folder -> our resharding checkpoint (``model.<name>`` tensors, the job config
  in ``extra["config"]``, as ``import-dcp`` writes one), read tensor by tensor with
  :class:`~system.hf.weights.HFCheckpoint` and written by
  :func:`~system.checkpoint.stream_save.save_streaming`: peak memory is one tensor.
- :func:`export_hf`: our training checkpoint (or a model folder we exported) -> an HF folder
  (:func:`~system.hf.export.write_hf_checkpoint`), read one layer at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from system.hf.config import TOKENIZER_FILE, HFCheckpointError, is_hf_folder
from system.hf.export import DEFAULT_MAX_SHARD_SIZE, special_token_ids, write_hf_checkpoint
from system.hf.weights import HFCheckpoint

MODEL_PREFIX = "model."
"""Our training checkpoints hold the model's tensors as ``model.<name>`` (and AdamW's as ``optim.*``)."""


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
              storage_options: dict | None = None) -> str:
    """Convert the Hugging Face model folder ``hf_dir`` into a committed checkpoint at ``out``.

    The checkpoint holds ``model.<our name>`` for every tensor (global shapes, the stored dtypes, experts
    ``[E, ...]`` in our layout) and, in ``extra``: ``config`` (a full job config whose ``[model]``/``[moe]``
    come from the HF ``config.json`` and whose ``data.tokenizer`` is ``hf_dir`` when it holds a
    ``tokenizer.json``) and ``imported_from`` (source folder, family, BOS/EOS ids). ``moesys ckpt
    inspect``/``verify``/``export`` read it, as does :func:`system.checkpoint.load`; it has no optimizer
    state, so it is not a training resume point (``checkpoint.initial_load_path`` takes ``hf_dir`` itself).

    ``out`` must not exist, be empty, or (with ``overwrite``) be a committed checkpoint holding only its own
    files (:func:`~system.checkpoint.dcp_import.import_dcp`'s rules).

    Returns:
        The URL of the new checkpoint.

    Raises:
        HFCheckpointError: ``hf_dir`` is not an HF folder, its architecture or a config field is not
            supported (the supported ones are listed), a shard is missing, a tensor missing or of the
            wrong shape or dtype (each named).
        CheckpointError: ``out`` must not be written, or writing failed.
    """
    from system.checkpoint.stream_save import save_streaming
    from system.config.job import JobConfig
    from system.config.loader import config_to_dict

    folder = Path(hf_dir).absolute()
    hf = HFCheckpoint(folder)
    job = JobConfig()
    job.model, job.moe = hf.config.model, hf.config.moe
    if (folder / TOKENIZER_FILE).is_file():
        job.data.tokenizer = str(folder)
    info = {"source": "huggingface", "source_path": str(folder), "family": hf.family,
            "bos_token_id": hf.config.bos_token_id, "eos_token_ids": hf.config.eos_token_ids}
    specs = {MODEL_PREFIX + name: (src.dtype, tuple(src.shape)) for name, src in hf.sources.items()}
    with hf:
        return save_streaming(specs, lambda fqn: hf.read(fqn[len(MODEL_PREFIX):]), out,
                              extra={"config": config_to_dict(job), "imported_from": info},
                              layout={"world_size": 1}, overwrite=overwrite, storage_options=storage_options)


@dataclass
class _Source:
    """A model to export: its job config, where it came from, and its tensors one group at a time."""

    path: str
    config: dict
    extra: dict
    tensors: Iterator[tuple[str, torch.Tensor]] | None = None


def _open_model_folder(folder: Path) -> _Source:
    from safetensors import safe_open

    from system.checkpoint.model_io import MODEL_FILE, read_config

    config = read_config(folder)
    file = folder / MODEL_FILE

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)

    return _Source(str(folder), config, {}, tensors())


def _open_checkpoint(path: str) -> _Source:
    from system.checkpoint import load
    from system.checkpoint.metadata import dtype_from_name
    from system.checkpoint.errors import CheckpointError
    from system.checkpoint.storage import Storage, read_metadata, resolve_checkpoint

    url = resolve_checkpoint(path)
    meta = read_metadata(Storage(url))
    names = [f for f in meta.tensors if f.startswith(MODEL_PREFIX)]
    if not names:
        raise CheckpointError(f"{path} holds no model tensors (names starting with {MODEL_PREFIX!r})")
    groups: dict[str, list[str]] = {}
    for fqn in names:  # one load per layer: one parse of metadata.json per group, one layer in memory
        parts = fqn.split(".")
        key = ".".join(parts[:3]) if len(parts) > 3 and parts[1] == "layers" else ""
        groups.setdefault(key, []).append(fqn)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for group in groups.values():
            targets = {f: torch.empty(meta.tensors[f].shape, dtype=dtype_from_name(meta.tensors[f].dtype))
                       for f in group}
            load(targets, url, no_dist=True)
            for fqn in group:
                yield fqn[len(MODEL_PREFIX):], targets.pop(fqn)

    return _Source(url, meta.extra.get("config") or {}, meta.extra, tensors())


def _open(path: str | os.PathLike) -> _Source:
    """A training checkpoint (a folder with ``metadata.json``, or a root with ``latest``) or our model folder.

    Raises:
        HFCheckpointError: ``path`` is already a Hugging Face folder.
        CheckpointError: not a checkpoint (see :func:`~system.checkpoint.storage.resolve_checkpoint`).
    """
    folder = Path(path)
    if folder.is_dir() and is_hf_folder(folder):
        raise HFCheckpointError(f"{folder} is already a Hugging Face model folder (its config.json has a "
                                f"model_type); import it with `moesys ckpt import-hf` or copy it")
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file() \
            and not (folder / "metadata.json").exists():
        return _open_model_folder(folder)
    return _open_checkpoint(os.fspath(path))


def _sections(source: _Source):
    """``(ModelConfig, MoEConfig, data tokenizer)`` from the job config saved with the model.

    Raises:
        HFCheckpointError: no ``[model]`` section saved (the model's shape is unknown).
        ConfigError: a saved value is unknown or out of range (named).
    """
    from system.config.job import JobConfig
    from system.config.loader import ConfigError, apply_dict

    saved = source.config
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise HFCheckpointError(f"{source.path} holds no job config with a [model] section (checkpoint extra "
                                f"'config' or config.json): the model's shape is unknown")
    job = apply_dict(JobConfig(), {k: saved[k] for k in ("model", "moe", "data") if k in saved},
                     source=f"config saved with {source.path}")
    try:
        job.model.validate()
        job.moe.validate()
    except ValueError as e:
        raise ConfigError(f"config saved with {source.path}: {e}") from None
    return job.model, job.moe, job.data.tokenizer


def _tokenizer_source(spec: str) -> Path | None:
    """The folder (or ``tokenizer.json``) behind ``data.tokenizer`` when it is a Hugging Face tokenizer."""
    if not spec or spec == "byte":
        return None
    p = Path(spec)
    if p.is_dir() and (p / TOKENIZER_FILE).is_file():
        return p
    if p.is_file() and p.suffix == ".json":
        return p
    return None


def export_hf(path: str | os.PathLike, out: str | os.PathLike, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
              tokenizer: str | os.PathLike | None = None, overwrite: bool = False,
              dtype: torch.dtype | None = None) -> tuple[Path, str, str | None]:
    """Export a training checkpoint or a model folder we exported as the Hugging Face folder ``out``.

    The model's shape comes from the job config saved with it; the tokenizer files from ``tokenizer``,
    else from ``data.tokenizer`` when that is a Hugging Face folder (or ``tokenizer.json``); BOS/EOS
    from that folder's ``generation_config.json``/``config.json``, else from an imported checkpoint's
    ``imported_from``. ``out`` is checked before anything is read.

    Returns:
        ``(out, family, tokenizer folder or None)``.

    Raises:
        ExportTargetError: ``out`` must not be replaced.
        CheckpointError: ``path`` is not a checkpoint or cannot be read.
        HFCheckpointError, ConfigError: see :func:`~system.hf.export.write_hf_checkpoint` and :func:`_sections`.
    """
    from system.checkpoint.model_io import check_export_target
    from system.hf.export import infer_family

    check_export_target(out, overwrite)
    source = _open(path)
    model_cfg, moe_cfg, data_tokenizer = _sections(source)
    tok = Path(tokenizer) if tokenizer is not None else _tokenizer_source(data_tokenizer)
    bos, eos = special_token_ids(tok if tok is None or tok.is_dir() else tok.parent) if tok is not None \
        else (None, [])
    imported = source.extra.get("imported_from") or {}
    if bos is None and isinstance(imported.get("bos_token_id"), int):
        bos = imported["bos_token_id"]
    if not eos and isinstance(imported.get("eos_token_ids"), list):
        eos = [i for i in imported["eos_token_ids"] if isinstance(i, int)]
    folder = write_hf_checkpoint(source.tensors, model_cfg, moe_cfg, out, max_shard_size=max_shard_size,
                                 tokenizer_from=tok, overwrite=overwrite, dtype=dtype, bos_token_id=bos,
                                 eos_token_id=eos[0] if len(eos) == 1 else (eos or None))
    return folder, infer_family(model_cfg, moe_cfg), None if tok is None else str(tok)
