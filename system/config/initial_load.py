"""``checkpoint.initial_load_path``: the model folder the initial weights come from decides the model shape.

:func:`merge_initial_load` (called by :func:`~system.config.loader.load_config`, so the launcher and
every worker merge the same way) reads the folder's config, a Hugging Face ``config.json``
(:func:`system.hf.config.read_hf_config`) or the job config of a model folder we exported
(``model.safetensors`` + ``config.json``), and:

- every ``[model]``/``[moe]`` key the TOML and the command line leave unset takes the folder's value;
- a key set explicitly to a different value is an error naming the key, both values and where each
  came from, except the training-only keys of :data:`FREE_KEYS`, which a fine-tuning job may choose
  (``model.max_seq_len`` at most the folder's);
- ``data.tokenizer`` left unset becomes the folder when it holds a ``tokenizer.json``.

Values that mean the same model are the same here: ``model.head_dim = 0`` and ``dim / n_heads``,
``model.n_kv_heads = 0`` and ``n_heads``, ``moe.shared_expert_dim = 0`` and ``num_shared_experts x
expert_dim``, group-limited routing off as 0 or 1 groups; rotary-scaling knobs compare only when a
scaling is on, MLA sizes only under MLA.

``system.hf.config`` (which depends on this package for the section dataclasses) is imported where it
is used, so that importing ``system.config`` never imports ``system.hf``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from system.config.job import JobConfig
from system.config.model import ModelConfig
from system.config.moe import MoEConfig

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
"""What makes a folder with our job ``config.json`` one of our exported models (the names
:mod:`system.checkpoint.model_io` writes)."""

FREE_KEYS: dict[str, frozenset[str]] = {
    # Training-only choices a fine-tuning job may make whatever the folder says. None changes a
    # weight's shape or what the loaded model computes at inference:
    # - model.max_seq_len: the rotary table's length; checked to be <= the folder's (the positions the
    #   weights were trained for); model.init_std: overwritten by the loaded weights.
    # - moe: token dropping (capacity_factor), the balancing regime and its coefficients (aux_loss_coef,
    #   z_loss_coef, load_balance, bias_update_rate), the expert kernel (grouped_mm), and the
    #   training-time router variant (router, router_*: MoFME's uncertainty router is top-k in eval).
    "model": frozenset({"max_seq_len", "init_std"}),
    "moe": frozenset({"capacity_factor", "aux_loss_coef", "z_loss_coef", "load_balance", "bias_update_rate",
                      "grouped_mm", "router", "router_dropout", "router_passes", "router_uncertainty_scale"}),
}
"""``[model]``/``[moe]`` keys that may differ from the initial-load folder's values."""

_HF_FIELDS: dict[str, tuple[str, ...]] = {
    "model.dim": ("hidden_size",), "model.n_layers": ("num_hidden_layers",),
    "model.n_heads": ("num_attention_heads",), "model.n_kv_heads": ("num_key_value_heads",),
    "model.vocab_size": ("vocab_size",), "model.max_seq_len": ("max_position_embeddings",),
    "model.norm_eps": ("rms_norm_eps",), "model.tie_embeddings": ("tie_word_embeddings",),
    "model.ffn_dim": ("intermediate_size",), "model.head_dim": ("head_dim",), "model.hf_model_type": ("model_type",),
    "model.q_lora_rank": ("q_lora_rank",), "model.kv_lora_rank": ("kv_lora_rank",),
    "model.qk_nope_head_dim": ("qk_nope_head_dim",), "model.qk_rope_head_dim": ("qk_rope_head_dim",),
    "model.v_head_dim": ("v_head_dim",),
    "moe.num_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "moe.top_k": ("num_experts_per_tok",), "moe.expert_dim": ("moe_intermediate_size", "intermediate_size"),
    "moe.norm_topk_prob": ("norm_topk_prob",), "moe.route_scale": ("routed_scaling_factor",),
    "moe.num_expert_groups": ("n_group",), "moe.num_limited_groups": ("topk_group",),
    "moe.num_shared_experts": ("n_shared_experts",), "moe.shared_expert_dim": ("shared_expert_intermediate_size",),
}
"""Our key -> the Hugging Face ``config.json`` field it is read from, to name it in messages (the first
one present). Keys not listed are derived (``qk_norm`` from the family, ``rope_*`` from the rotary
settings) and named as our reading of the file."""


@dataclass
class InitialModel:
    """The model of a ``checkpoint.initial_load_path`` folder.

    Attributes:
        folder: the folder.
        config_file: its ``config.json``.
        kind: ``"hf"`` (a Hugging Face model folder), ``"export"`` (one we exported) or ``"checkpoint"``
            (one of our training checkpoints, e.g. written by ``moesys ckpt import-hf``: its model tensors).
        model, moe: its ``[model]`` and ``[moe]`` sections.
        raw: the ``config.json`` object (the Hugging Face one, to name its fields in messages).
    """

    folder: Path
    config_file: Path
    kind: str
    model: ModelConfig
    moe: MoEConfig
    raw: dict


def _error(message: str):
    from system.config.loader import ConfigError

    return ConfigError(message)


def read_initial_model(path: str | Path) -> InitialModel:
    """Read the model folder at ``path`` (see the module docstring).

    Raises:
        ConfigError: ``path`` does not exist, is not a folder, holds no ``config.json``, or is neither a
            Hugging Face model folder (``config.json`` with a ``model_type``, safetensors weights), one
            of our exported model folders (``model.safetensors`` + our job ``config.json``) nor one of our
            committed training checkpoints (``metadata.json`` with the job config, or a root with ``latest``); an
            unsupported architecture or field, or a bad value in the saved config (each names the path).
    """
    key = "checkpoint.initial_load_path"
    folder = Path(path).expanduser()
    if not folder.exists():
        raise _error(f"{key} {folder} does not exist")
    if not folder.is_dir():
        raise _error(f"{key} {folder} is a file, not a model folder (a Hugging Face model folder or one exported "
                     f"with `moesys ckpt export`)")
    file = folder / CONFIG_FILE
    if not file.is_file() and ((folder / "metadata.json").is_file() or (folder / "latest").is_file()):
        return _read_checkpoint(folder)
    if not file.is_file():
        raise _error(f"{key} {folder} is not a model folder: no {CONFIG_FILE}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(f"{key}: {file} cannot be read as JSON: {e}") from None
    if isinstance(raw, dict) and isinstance(raw.get("model_type"), str):
        return _read_hf(folder, file, raw)
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        return _read_export(folder, file, raw)
    raise _error(f"{key} {folder} is neither a Hugging Face model folder ({CONFIG_FILE} with a model_type) nor a "
                 f"model folder we exported ({CONFIG_FILE} with a [model] section beside model.safetensors)")


def _read_hf(folder: Path, file: Path, raw: dict) -> InitialModel:
    from system.hf.config import HFCheckpointError, read_hf_config

    try:
        hf = read_hf_config(folder)
    except HFCheckpointError as e:
        raise _error(f"checkpoint.initial_load_path: {e}") from None
    if not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").is_file():
        raise _error(f"checkpoint.initial_load_path {folder} holds {CONFIG_FILE} but no safetensors weights "
                     f"(.bin/.pt weights are not read)")
    return InitialModel(folder, file, "hf", hf.model, hf.moe, raw)


def _read_checkpoint(folder: Path) -> InitialModel:
    """One of our training checkpoints (a step folder, or a root with ``latest``; e.g. what ``moesys ckpt
    import-hf`` wrote): the model of its saved job config; only its ``model.*`` tensors are loaded."""
    from system.checkpoint.errors import CheckpointError
    from system.checkpoint.storage import METADATA_FILE, Storage, read_metadata, resolve_checkpoint

    try:
        url = resolve_checkpoint(str(folder))
        extra = read_metadata(Storage(url)).extra
    except CheckpointError as e:
        raise _error(f"checkpoint.initial_load_path: {e}") from None
    saved_cfg = extra.get("config") if isinstance(extra, dict) else None
    file = Path(url) / METADATA_FILE
    if not isinstance(saved_cfg, dict) or not isinstance(saved_cfg.get("model"), dict):
        raise _error(f"checkpoint.initial_load_path: {file} carries no job config (extra.config) to take the model "
                     f"shape from")
    return _saved_model(Path(url), file, "checkpoint", saved_cfg)


def _read_export(folder: Path, file: Path, raw: dict) -> InitialModel:
    if not any((folder / name).is_file() for name in EXPORT_WEIGHTS):
        raise _error(f"checkpoint.initial_load_path {folder} holds our job {CONFIG_FILE} but no {EXPORT_WEIGHTS[0]}")
    return _saved_model(folder, file, "export", raw)


def _saved_model(folder: Path, file: Path, kind: str, saved_cfg: dict) -> InitialModel:
    """The model of one of our saved job configs (its ``[model]``/``[moe]``, validated)."""
    from system.config.loader import apply_dict

    saved = JobConfig()
    apply_dict(saved, {k: saved_cfg[k] for k in ("model", "moe") if k in saved_cfg}, source=str(file))
    try:
        saved.model.validate()
        saved.moe.validate()
    except ValueError as e:
        raise _error(f"checkpoint.initial_load_path: {file}: {e}") from None
    return InitialModel(folder, file, kind, saved.model, saved.moe, saved_cfg)


def merge_initial_load(cfg: JobConfig, explicit: dict[str, str], *, missing_ok: bool = False) -> InitialModel | None:
    """Fill ``cfg`` from its ``checkpoint.initial_load_path`` folder in place (see the module docstring).

    Args:
        cfg: the config with the TOML and command line applied (not yet validated).
        explicit: ``{"section.key": source}`` of every key the TOML or command line set
            (:func:`~system.config.loader.apply_dict`'s ``record``).
        missing_ok: a folder that does not exist leaves ``cfg`` as it is (``moesys train --dry-run``).

    Returns:
        The folder's model, or None when ``checkpoint.initial_load_path`` is empty (or missing and
        ``missing_ok``).

    Raises:
        ConfigError: the folder cannot be used (:func:`read_initial_model`); explicit keys that
            contradict it, all listed in one line with both values; ``model.max_seq_len`` above the
            folder's.
    """
    path = cfg.checkpoint.initial_load_path
    if not path or (missing_ok and not Path(path).expanduser().exists()):
        return None
    src = read_initial_model(path)
    for section in ("model", "moe"):
        ours, theirs = getattr(cfg, section), getattr(src, section)
        for f in dataclasses.fields(ours):
            if f"{section}.{f.name}" not in explicit:
                setattr(ours, f.name, getattr(theirs, f.name))
    problems = []
    for section in ("model", "moe"):
        ours, theirs = getattr(cfg, section), getattr(src, section)
        for f in dataclasses.fields(ours):
            key = f"{section}.{f.name}"
            if key not in explicit or f.name in FREE_KEYS[section]:
                continue
            if not _compared(key, cfg, src) or _same(_effective(key, ours), _effective(key, theirs)):
                continue
            problems.append(f"{key} = {_toml(getattr(ours, f.name))} ({explicit[key]}) contradicts "
                            f"{_theirs(key, src)}")
    if "model.max_seq_len" in explicit and cfg.model.max_seq_len > src.model.max_seq_len:
        problems.append(f"model.max_seq_len = {cfg.model.max_seq_len} ({explicit['model.max_seq_len']}) exceeds "
                        f"{_theirs('model.max_seq_len', src)} (the positions the weights were trained for)")
    if problems:
        raise _error(f"checkpoint.initial_load_path: {'; '.join(problems)}; leave a key unset to take the folder's "
                     f"value")
    if "data.tokenizer" not in explicit and (src.folder / TOKENIZER_FILE).is_file():
        cfg.data.tokenizer = str(src.folder)
    return src


def _compared(key: str, cfg: JobConfig, src: InitialModel) -> bool:
    """Whether ``key`` matters for the model both sides describe (MLA sizes under MLA only, rotary
    scaling knobs with a scaling on only, the group count with group-limited routing only)."""
    section, name = key.split(".")
    if section == "model" and name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                       "v_head_dim"):
        return "mla" in (cfg.model.attention_type, src.model.attention_type)
    if section == "model" and name.startswith("rope_") and name not in ("rope_theta", "rope_style", "rope_scaling"):
        return (cfg.model.rope_scaling, src.model.rope_scaling) != ("none", "none")
    if key == "moe.num_limited_groups":
        return max(cfg.moe.num_expert_groups, src.moe.num_expert_groups) > 1
    return True


def _effective(key: str, section: ModelConfig | MoEConfig) -> Any:
    """The value of ``key`` with its "0 means derived" spelling resolved."""
    if key == "model.head_dim":
        return section.attn_head_dim() if section.attention_type == "mha" else section.head_dim
    if key == "model.n_kv_heads":
        return section.n_kv_heads or section.n_heads
    if key == "moe.shared_expert_dim":
        return section.shared_hidden_dim()
    if key == "moe.num_expert_groups":
        return max(section.num_expert_groups, 1)
    return getattr(section, key.split(".")[1])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _toml(value: Any) -> str:
    """``value`` as TOML spells it (``true``, ``"half"``, ``1e-05``)."""
    return json.dumps(value) if isinstance(value, (bool, str)) else repr(value)


def _theirs(key: str, src: InitialModel) -> str:
    """The folder's side of a message: ``hidden_size = 32 in /m/config.json``."""
    value = getattr(getattr(src, key.split(".")[0]), key.split(".")[1])
    if src.kind == "hf":
        name = next((n for n in _HF_FIELDS.get(key, ()) if src.raw.get(n) is not None), None)
        if name is not None:
            return f"{name} = {json.dumps(src.raw[name])} in {src.config_file}"
        return f"{key} = {_toml(value)} as read from {src.config_file} (model_type {src.raw.get('model_type')})"
    return f"{key} = {_toml(value)} in {src.config_file}"
