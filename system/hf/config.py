"""A Hugging Face model folder's ``config.json`` as our ``[model]`` and ``[moe]`` sections.

Supported families (``model_type``): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3. The mapping
is written once, per field, and every field we cannot honour is an error naming it (sliding-window
attention, q/k/v clipping, quantized weights, an activation other than SiLU, an unknown rope scaling):
a model that loads computes what ``transformers`` computes.

Both the current (``rope_parameters``) and the older (``rope_theta`` + ``rope_scaling``) spellings of
the rotary settings are read, as are the older expert-count names, so checkpoints written by any
transformers version load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.errors import MoesysError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

FAMILIES: dict[str, str] = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
"""``model_type`` -> the ``transformers`` causal-LM class of every family we read and write."""


class HFCheckpointError(MoesysError, ValueError):
    """A Hugging Face model folder cannot be used: not one, an unsupported architecture or config field,
    a missing shard, a tensor of the wrong shape or dtype (names the file, field or tensor)."""


@dataclass
class HFModelConfig:
    """What a Hugging Face ``config.json`` says, in our terms.

    Attributes:
        family: the ``model_type`` (a key of :data:`FAMILIES`).
        model: the ``[model]`` section (``vocab_size`` set, ``hf_model_type = family``).
        moe: the ``[moe]`` section.
        raw: the ``config.json`` object as read.
        bos_token_id, eos_token_ids: special token ids (``generation_config.json``, else ``config.json``).
    """

    family: str
    model: ModelConfig
    moe: MoEConfig
    raw: dict
    bos_token_id: int | None
    eos_token_ids: list[int]


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a Hugging Face ``config.json`` (one with a ``model_type``)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model_type"), str)


def read_json(file: Path) -> dict:
    """A JSON object from ``file``.

    Raises:
        HFCheckpointError: the file is missing, unreadable, not JSON or not an object (named).
    """
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFCheckpointError(f"{file} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFCheckpointError(f"{file} cannot be read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise HFCheckpointError(f"{file} holds a JSON {type(data).__name__}, not an object")
    return data


def read_hf_config(path: str | Path) -> HFModelConfig:
    """Map ``path/config.json`` onto our config sections.

    Raises:
        HFCheckpointError: ``path`` is not a folder with a ``config.json`` naming a ``model_type``; the
            architecture is not one of :data:`FAMILIES` (the supported ones are listed); a field we
            cannot honour (named with its value); a required field missing.
    """
    folder = Path(path)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise HFCheckpointError(f"Hugging Face model folder {folder} {what}")
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise HFCheckpointError(f"{folder} is not a Hugging Face model folder: no {CONFIG_FILE}")
    raw = read_json(file)
    family = raw.get("model_type")
    if not isinstance(family, str):
        raise HFCheckpointError(f"{file} has no model_type: not a Hugging Face model config")
    if family not in FAMILIES:
        arch = ", ".join(raw.get("architectures") or []) or family
        raise HFCheckpointError(
            f"{file}: architecture {arch} (model_type {family!r}) is not supported; supported: "
            + ", ".join(f"{cls} ({mt})" for mt, cls in FAMILIES.items())
        )
    reader = _Fields(raw, file)
    _check_unsupported(reader, family)
    model = _model_section(reader, family)
    moe = _moe_section(reader, family)
    try:
        model.validate()
        moe.validate()
    except ValueError as e:
        raise HFCheckpointError(f"{file}: {e}") from None
    bos, eos = _special_ids(folder, raw)
    return HFModelConfig(family, model, moe, raw, bos, eos)


class _Fields:
    """Typed access to the fields of one ``config.json`` with errors naming the file and field."""

    def __init__(self, raw: dict, file: Path):
        self.raw, self.file = raw, file

    def get(self, *names: str, default=None, kind: type = int):
        for name in names:
            value = self.raw.get(name)
            if value is None:
                continue
            ok = isinstance(value, kind) and not isinstance(value, bool) if kind in (int, float) else \
                isinstance(value, kind)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok, value = True, float(value)
            if not ok:
                raise HFCheckpointError(f"{self.file}: field {name} = {value!r} is not a {kind.__name__}")
            return value
        return default

    def need(self, *names: str, kind: type = int):
        value = self.get(*names, kind=kind)
        if value is None:
            raise HFCheckpointError(f"{self.file}: required field {' or '.join(names)} is missing")
        return value


def _check_unsupported(f: _Fields, family: str) -> None:
    """Fields whose value would change the math in a way we do not implement."""
    raw = f.raw
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise HFCheckpointError(f"{f.file}: hidden_act = {act!r} is not supported (only silu, SwiGLU experts)")
    window = raw.get("sliding_window")
    if window and (family != "qwen2_moe" and family != "qwen3_moe" or raw.get("use_sliding_window")):
        raise HFCheckpointError(f"{f.file}: sliding_window = {window} (sliding-window attention) is not supported; "
                                f"only full causal attention")
    if raw.get("clip_qkv") is not None:
        raise HFCheckpointError(f"{f.file}: clip_qkv = {raw['clip_qkv']} (q/k/v clipping) is not supported")
    if raw.get("quantization_config"):
        method = (raw["quantization_config"] or {}).get("quant_method", "?")
        raise HFCheckpointError(f"{f.file}: quantization_config ({method}) is not supported: give bf16, fp16 or "
                                f"fp32 weights (dequantize the checkpoint first)")
    if family == "deepseek_v3":
        if raw.get("scoring_func", "sigmoid") != "sigmoid":
            raise HFCheckpointError(f"{f.file}: scoring_func = {raw['scoring_func']!r} is not supported for "
                                    f"deepseek_v3 (sigmoid)")
        if raw.get("topk_method", "noaux_tc") != "noaux_tc":
            raise HFCheckpointError(f"{f.file}: topk_method = {raw['topk_method']!r} is not supported (noaux_tc)")
        if raw.get("attention_bias"):
            raise HFCheckpointError(f"{f.file}: attention_bias = true is not supported for deepseek_v3 (MLA)")
    if raw.get("partial_rotary_factor", 1.0) not in (1, 1.0):
        raise HFCheckpointError(f"{f.file}: partial_rotary_factor = {raw['partial_rotary_factor']} is not supported")


def _rope(f: _Fields, model: ModelConfig) -> None:
    """Rotary base and scaling, from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``."""
    params = f.raw.get("rope_parameters")
    scaling = f.raw.get("rope_scaling")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
        scaling = params
    else:
        theta = f.raw.get("rope_theta", 10000.0)
    model.rope_theta = float(theta)
    if not scaling:
        return
    if not isinstance(scaling, dict):
        raise HFCheckpointError(f"{f.file}: rope_scaling = {scaling!r} is not an object")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return
    if kind not in ("linear", "yarn", "llama3"):
        raise HFCheckpointError(f"{f.file}: rope scaling {kind!r} is not supported (default, linear, yarn, llama3)")
    model.rope_scaling = kind
    model.rope_factor = float(scaling.get("factor", 1.0))
    orig = scaling.get("original_max_position_embeddings")
    if orig is not None:
        model.rope_original_max_seq_len = int(orig)
    if kind == "yarn":
        if scaling.get("attention_factor") is not None:
            raise HFCheckpointError(f"{f.file}: rope attention_factor = {scaling['attention_factor']} is not "
                                    f"supported (it is derived from factor, mscale and mscale_all_dim)")
        if scaling.get("truncate", True) is False:
            raise HFCheckpointError(f"{f.file}: rope truncate = false is not supported")
        model.rope_beta_fast = float(scaling.get("beta_fast") or 32.0)
        model.rope_beta_slow = float(scaling.get("beta_slow") or 1.0)
        model.rope_mscale = float(scaling.get("mscale") or 0.0)
        model.rope_mscale_all_dim = float(scaling.get("mscale_all_dim") or 0.0)
        if not model.rope_original_max_seq_len:
            raise HFCheckpointError(f"{f.file}: yarn rope scaling needs original_max_position_embeddings")
    if kind == "llama3":
        model.rope_low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        model.rope_high_freq_factor = float(scaling.get("high_freq_factor", 4.0))


def _model_section(f: _Fields, family: str) -> ModelConfig:
    m = ModelConfig()
    m.hf_model_type = family
    m.dim = f.need("hidden_size")
    m.n_layers = f.need("num_hidden_layers")
    m.n_heads = f.need("num_attention_heads")
    m.n_kv_heads = f.get("num_key_value_heads", default=m.n_heads)
    m.vocab_size = f.need("vocab_size")
    m.max_seq_len = f.get("max_position_embeddings", default=m.max_seq_len)
    m.norm_eps = f.get("rms_norm_eps", default=1e-6, kind=float)
    m.tie_embeddings = bool(f.raw.get("tie_word_embeddings", False))
    m.ffn_dim = f.get("intermediate_size", default=m.ffn_dim)
    m.rope_style = "half"
    _rope(f, m)
    if family == "deepseek_v3":
        m.attention_type = "mla"
        m.q_lora_rank = f.get("q_lora_rank", default=0)
        m.kv_lora_rank = f.need("kv_lora_rank")
        m.qk_nope_head_dim = f.need("qk_nope_head_dim")
        m.qk_rope_head_dim = f.need("qk_rope_head_dim")
        m.v_head_dim = f.need("v_head_dim")
        m.rope_style = "interleaved" if f.raw.get("rope_interleave", True) else "half"
        return m
    head_dim = f.get("head_dim", default=0)
    if head_dim and head_dim * m.n_heads == m.dim and family != "qwen3_moe":
        head_dim = 0
    m.head_dim = head_dim
    if family == "qwen2_moe":
        m.qkv_bias = bool(f.raw.get("qkv_bias", True))
    elif family != "mixtral":  # transformers' Mixtral has no attention biases (a stray field is ignored there too)
        m.qkv_bias = m.o_bias = bool(f.raw.get("attention_bias", False))
    m.qk_norm = {"qwen3_moe": "head", "olmoe": "full"}.get(family, "none")
    return m


def _moe_section(f: _Fields, family: str) -> MoEConfig:
    e = MoEConfig()
    e.num_experts = f.need("num_local_experts", "num_experts", "n_routed_experts")
    e.top_k = f.need("num_experts_per_tok")
    e.expert_dim = f.get("moe_intermediate_size", default=None) or f.need("intermediate_size")
    e.norm_topk_prob = True if family == "mixtral" else bool(f.raw.get("norm_topk_prob", False))
    e.aux_loss_coef = f.get("router_aux_loss_coef", default=0.0, kind=float)
    e.z_loss_coef = f.get("router_z_loss_coef", default=0.0, kind=float)
    if family == "deepseek_v3":
        e.score_func = "sigmoid"
        e.load_balance = "bias"
        e.aux_loss_coef = 0.0
        e.route_scale = f.get("routed_scaling_factor", default=1.0, kind=float)
        groups = f.get("n_group", default=1)
        if groups > 1:
            e.num_expert_groups, e.num_limited_groups = groups, f.need("topk_group")
        e.first_dense_layers = f.get("first_k_dense_replace", default=0)
        e.num_shared_experts = f.get("n_shared_experts", default=0)
        return e
    if family in ("qwen2_moe", "qwen3_moe"):
        step = f.get("decoder_sparse_step", default=1)
        only_dense = f.raw.get("mlp_only_layers") or []
        if step < 1:
            raise HFCheckpointError(f"{f.file}: decoder_sparse_step = {step} must be >= 1")
        if only_dense:
            if step != 1 or sorted(only_dense) != list(range(len(only_dense))):
                raise HFCheckpointError(
                    f"{f.file}: mlp_only_layers = {only_dense} with decoder_sparse_step = {step} is not supported "
                    f"(only leading dense layers: [0, 1, ..., k-1] with step 1)")
            e.first_dense_layers = len(only_dense)
        else:
            e.first_dense_layers, e.interleave = step - 1, step
    if family == "qwen2_moe":
        shared = f.get("shared_expert_intermediate_size", default=0)
        if shared:
            e.num_shared_experts, e.shared_expert_dim, e.shared_expert_gate = 1, shared, True
    return e


def _special_ids(folder: Path, raw: dict) -> tuple[int | None, list[int]]:
    """BOS id and EOS ids: ``generation_config.json`` first (what ``generate`` uses), then ``config.json``
    (:func:`system.data.tokenizer.config_token_ids`); none when a file is malformed (the tokenizer, when
    there is one, reports it)."""
    from system.data.tokenizer import config_token_ids
    from system.errors import DataError

    try:
        ids = config_token_ids(folder)
    except DataError:
        return None, []
    bos = ids["bos_token_id"]
    return (bos[0] if bos else None), ids["eos_token_id"] or []


def config_sections(hf: HFModelConfig) -> dict[str, dict]:
    """``{"model": {...}, "moe": {...}}``: every field of the two sections, as plain values."""
    return {"model": {fl.name: getattr(hf.model, fl.name) for fl in fields(hf.model)},
            "moe": {fl.name: getattr(hf.moe, fl.name) for fl in fields(hf.moe)}}
