"""Our model as a Hugging Face model folder: ``config.json`` of its family and the hub's tensor layout.

:func:`to_hf_config` is the inverse of :func:`system.hf.config.read_hf_config`: every field that
reads back into our ``[model]``/``[moe]`` sections is written, and a setting the family cannot state
(shared experts in Mixtral, a sigmoid router outside DeepSeek-V3, ...) is an error naming it, rather
than a folder that loads in ``transformers`` and computes something else. The JSON is plain: no
``transformers`` import at run time.

:func:`write_hf_checkpoint` writes the tensors as ``transformers`` saves them: every non-expert tensor
renamed (:func:`system.hf.weights.hf_tensor_map`), each routed expert ``e`` of our ``w1``/``w3``
``[E, d, f]`` and ``w2`` ``[E, f, d]`` as its own transposed ``[f, d]``/``[d, f]`` tensor
(:func:`system.hf.weights.expert_names`), in ``model.safetensors`` or, past ``max_shard_size``,
``model-0000k-of-0000N.safetensors`` shards with ``model.safetensors.index.json``. Tensors arrive one at
a time and a shard is written as soon as it is full, so peak memory is one of our tensors plus one
shard. The folder is built and put in place under the export rules of
:func:`system.checkpoint.model_io.build_export`. A multi-head-attention model of ours with interleaved
rotary has its query/key rows permuted per head for Hugging Face's half pairing (:func:`rope_to_half`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from system.checkpoint.model_io import build_export
from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.hf.config import CONFIG_FILE, FAMILIES, HFCheckpointError, _special_ids, read_json
from system.hf.weights import FLOAT_DTYPES, _expected_shapes, _is_routed_expert, expert_names, hf_tensor_map

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""Copied from ``tokenizer_from`` when present (``tokenizer.json`` is required there)."""
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9

Pairs = Iterable[tuple[str, torch.Tensor]]
Tensors = Mapping[str, torch.Tensor] | Pairs | Callable[[], Pairs]
"""``{our name: tensor}``, ``(name, tensor)`` pairs, or a callable returning the pairs."""


def infer_family(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> str:
    """The Hugging Face ``model_type`` to export as: ``model_cfg.hf_model_type``, else from the architecture
    (MLA: deepseek_v3; per-head q/k norm: qwen3_moe; full q/k norm: olmoe; a gated shared expert:
    qwen2_moe; otherwise mixtral).

    Raises:
        HFCheckpointError: ``hf_model_type`` is not a supported family (the supported ones are listed).
    """
    family = model_cfg.hf_model_type
    if family:
        if family not in FAMILIES:
            raise HFCheckpointError(f"model.hf_model_type = {family!r} is not a supported Hugging Face family; "
                                    f"supported: {', '.join(FAMILIES)}")
        return family
    if model_cfg.attention_type == "mla":
        return "deepseek_v3"
    if model_cfg.qk_norm == "head":
        return "qwen3_moe"
    if model_cfg.qk_norm == "full":
        return "olmoe"
    if moe_cfg.num_shared_experts and moe_cfg.shared_expert_gate:
        return "qwen2_moe"
    return "mixtral"


def _problems(family: str, m: ModelConfig, e: MoEConfig) -> list[str]:
    """What ``family``'s ``config.json`` cannot state about ``m``/``e`` (empty: all of it)."""
    out = []
    deepseek, qwen = family == "deepseek_v3", family in ("qwen2_moe", "qwen3_moe")
    if m.vocab_size <= 0:
        out.append(f"model.vocab_size = {m.vocab_size} (set it to the embedding's rows)")
    if e.expert_type != "ffn":
        out.append(f"moe.expert_type = {e.expert_type!r} (only SwiGLU experts, 'ffn')")
    if (m.attention_type == "mla") != deepseek:
        out.append(f"model.attention_type = {m.attention_type!r} (" + ("deepseek_v3 is MLA)" if deepseek else
                                                                      "MLA is deepseek_v3 only)"))
    want_norm = {"qwen3_moe": "head", "olmoe": "full"}.get(family, "none")
    if m.qk_norm != want_norm:
        out.append(f"model.qk_norm = {m.qk_norm!r} ({family} has {want_norm!r})")
    if family in ("mixtral", "deepseek_v3") and (m.qkv_bias or m.o_bias):
        out.append(f"model.qkv_bias/o_bias = {m.qkv_bias}/{m.o_bias} ({family} has no attention biases)")
    elif family == "qwen2_moe" and m.o_bias:
        out.append("model.o_bias = True (qwen2_moe has biases on q/k/v only)")
    elif family in ("qwen3_moe", "olmoe") and m.qkv_bias != m.o_bias:
        out.append(f"model.qkv_bias = {m.qkv_bias} with o_bias = {m.o_bias} ({family} has one attention_bias)")
    if family == "olmoe" and m.head_dim and m.head_dim * m.n_heads != m.dim:
        out.append(f"model.head_dim = {m.head_dim} (olmoe needs n_heads * head_dim = dim = {m.dim})")
    if deepseek:
        if e.score_func != "sigmoid":
            out.append(f"moe.score_func = {e.score_func!r} (deepseek_v3 routes with sigmoid)")
        if e.interleave != 1:
            out.append(f"moe.interleave = {e.interleave} (deepseek_v3: only leading dense layers)")
        if e.shared_expert_gate:
            out.append("moe.shared_expert_gate = True (deepseek_v3's shared experts are not gated)")
        if e.shared_expert_dim and e.shared_expert_dim != e.num_shared_experts * e.expert_dim:
            out.append(f"moe.shared_expert_dim = {e.shared_expert_dim} (deepseek_v3: n_shared_experts * "
                       f"expert_dim = {e.num_shared_experts * e.expert_dim})")
        return out
    if e.score_func != "softmax":
        out.append(f"moe.score_func = {e.score_func!r} ({family} routes with softmax)")
    if e.route_scale != 1.0:
        out.append(f"moe.route_scale = {e.route_scale} (only deepseek_v3 scales routed outputs)")
    if e.num_expert_groups > 1:
        out.append(f"moe.num_expert_groups = {e.num_expert_groups} (group-limited routing is deepseek_v3 only)")
    if family == "mixtral" and not e.norm_topk_prob:
        out.append("moe.norm_topk_prob = False (mixtral always renormalises the top-k weights)")
    if family == "qwen2_moe":
        if not e.num_shared_experts or not e.shared_expert_gate:
            out.append(f"moe.num_shared_experts = {e.num_shared_experts}, shared_expert_gate = "
                       f"{e.shared_expert_gate} (qwen2_moe has one gated shared expert)")
    elif e.num_shared_experts:
        out.append(f"moe.num_shared_experts = {e.num_shared_experts} ({family} has no shared experts)")
    if not qwen and (e.first_dense_layers or e.interleave != 1):
        out.append(f"moe.first_dense_layers = {e.first_dense_layers}, interleave = {e.interleave} ({family} has "
                   f"MoE in every layer)")
    elif qwen and e.interleave != 1 and e.first_dense_layers != e.interleave - 1:
        out.append(f"moe.first_dense_layers = {e.first_dense_layers} with interleave = {e.interleave} ({family}: "
                   f"leading dense layers, or every interleave-th layer MoE from layer interleave - 1)")
    return out


def _rope(m: ModelConfig) -> dict:
    """``rope_parameters`` (transformers 5) plus the same as ``rope_theta``/``rope_scaling`` (older versions)."""
    params: dict = {"rope_theta": m.rope_theta, "rope_type": "default"}
    if m.rope_scaling != "none":
        params.update(rope_type=m.rope_scaling, factor=m.rope_factor)
        if m.rope_original_max_seq_len:
            params["original_max_position_embeddings"] = m.rope_original_max_seq_len
        if m.rope_scaling == "yarn":
            params.update(beta_fast=m.rope_beta_fast, beta_slow=m.rope_beta_slow)
            if m.rope_mscale:
                params["mscale"] = m.rope_mscale
            if m.rope_mscale_all_dim:
                params["mscale_all_dim"] = m.rope_mscale_all_dim
        if m.rope_scaling == "llama3":
            params.update(low_freq_factor=m.rope_low_freq_factor, high_freq_factor=m.rope_high_freq_factor)
    out = {"rope_theta": m.rope_theta, "rope_parameters": params}
    if m.rope_scaling != "none":
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def _dtype_name(dtype: str | torch.dtype | None) -> str:
    if dtype is None:
        return "float32"
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise HFCheckpointError(f"dtype {dtype} is not one of float32, bfloat16, float16")
    return name


def to_hf_config(model_cfg: ModelConfig, moe_cfg: MoEConfig, *, bos_token_id: int | None = None,
                 eos_token_id: int | list[int] | None = None, dtype: str | torch.dtype | None = None) -> dict:
    """The Hugging Face ``config.json`` object of our model (family: :func:`infer_family`).

    ``read_hf_config`` of the result gives back every field it reads (``moe.expert_dim``, rotary
    scaling, dense layers, ...), with two exceptions that describe the same model: Mixtral and OLMoE
    have one ``intermediate_size``, the experts', so their ``model.ffn_dim`` (unused: no dense layers) is
    not kept (nor MLA's ``n_kv_heads``, which MLA does not use: it has ``n_heads`` key/value heads);
    and a multi-head-attention model with ``rope_style = "interleaved"`` is written as
    Hugging Face's ``half`` pairing, which is right only for weights whose query/key rows are permuted
    per head as :func:`write_hf_checkpoint` does (:func:`rope_to_half`).

    Args:
        bos_token_id, eos_token_id: special ids (``eos_token_id`` an id or a list of ids).
        dtype: the weights' dtype (``dtype``/``torch_dtype``); default float32.

    Raises:
        HFCheckpointError: the family is unknown, or one line listing every setting it cannot state
            (the field, its value and why).
    """
    m, e = model_cfg, moe_cfg
    family = infer_family(m, e)
    problems = _problems(family, m, e)
    if problems:
        raise HFCheckpointError(f"cannot export as {family} ({FAMILIES[family]}): " + "; ".join(problems))
    name = _dtype_name(dtype)
    cfg: dict = {
        "architectures": [FAMILIES[family]], "model_type": family, "hidden_size": m.dim,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_heads if m.attention_type == "mla" else m.n_kv_heads or m.n_heads,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "initializer_range": m.init_std,
        "attention_dropout": 0.0, "use_cache": True, **_rope(m),
        "num_experts_per_tok": e.top_k, "norm_topk_prob": e.norm_topk_prob,
        "router_aux_loss_coef": e.aux_loss_coef, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "dtype": name, "torch_dtype": name,
    }
    if e.z_loss_coef:
        cfg["router_z_loss_coef"] = e.z_loss_coef
    if family in ("mixtral", "olmoe"):
        cfg["intermediate_size"] = e.expert_dim
    else:
        cfg.update(intermediate_size=m.ffn_dim, moe_intermediate_size=e.expert_dim)
    if family == "mixtral":
        cfg.update(num_local_experts=e.num_experts, router_jitter_noise=0.0, sliding_window=None,
                   head_dim=m.head_dim or None)
    elif family == "olmoe":
        cfg.update(num_experts=e.num_experts, attention_bias=m.qkv_bias, clip_qkv=None)
    elif family in ("qwen2_moe", "qwen3_moe"):
        step = e.interleave
        cfg.update(num_experts=e.num_experts, use_sliding_window=False, sliding_window=None,
                   decoder_sparse_step=step, mlp_only_layers=list(range(e.first_dense_layers)) if step == 1 else [])
        if family == "qwen2_moe":
            cfg.update(qkv_bias=m.qkv_bias, shared_expert_intermediate_size=e.shared_hidden_dim())
            if m.head_dim:
                cfg["head_dim"] = m.head_dim
        else:
            cfg.update(attention_bias=m.qkv_bias, head_dim=m.attn_head_dim())
    else:  # deepseek_v3
        groups = e.num_expert_groups if e.num_expert_groups > 1 else 1
        cfg.update(n_routed_experts=e.num_experts, n_shared_experts=e.num_shared_experts,
                   first_k_dense_replace=e.first_dense_layers, n_group=groups,
                   topk_group=e.num_limited_groups if groups > 1 else 1, routed_scaling_factor=e.route_scale,
                   scoring_func="sigmoid", topk_method="noaux_tc", q_lora_rank=m.q_lora_rank or None,
                   kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
                   qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, head_dim=m.qk_rope_head_dim,
                   rope_interleave=m.rope_style == "interleaved", attention_bias=False, num_nextn_predict_layers=0)
    return cfg


def generation_config(bos_token_id: int | None, eos_token_id: int | list[int] | None) -> dict:
    """``generation_config.json``: the special ids ``generate`` uses (``None`` ones left out)."""
    out: dict = {"_from_model_config": True}
    if bos_token_id is not None:
        out["bos_token_id"] = bos_token_id
    if eos_token_id is not None and eos_token_id != []:
        out["eos_token_id"] = eos_token_id
    return out


def special_token_ids(folder: str | Path) -> tuple[int | None, list[int]]:
    """BOS id and EOS ids named by a Hugging Face folder's ``generation_config.json``, else ``config.json``
    (``(None, [])`` when neither names them; our own job ``config.json`` names none)."""
    folder = Path(folder)
    raw = {}
    if (folder / CONFIG_FILE).is_file():
        try:
            raw = read_json(folder / CONFIG_FILE)
        except HFCheckpointError:
            raw = {}
    return _special_ids(folder, raw)


# -- tensors ---------------------------------------------------------------------------------------
def _items(tensors: Tensors) -> Iterator[tuple[str, torch.Tensor]]:
    if callable(tensors) and not isinstance(tensors, Mapping):
        tensors = tensors()
    if isinstance(tensors, Mapping):
        return iter(tensors.items())
    return iter(tensors)


ROPE_PERMUTED = ("attention.wq.weight", "attention.wq.bias", "attention.wk.weight", "attention.wk.bias",
                 "attention.q_norm.weight", "attention.k_norm.weight")
"""The tensors whose rows are queries' or keys' per-head features (what :func:`rope_to_half` reorders)."""


def rope_to_half(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a query/key projection (weight ``[H * Dh, d]``, bias or norm ``[H * Dh]`` or ``[Dh]``) reordered
    so that Hugging Face's ``half`` rotary pairing (dims ``i, i + Dh/2``) computes what our ``interleaved``
    one (dims ``2i, 2i + 1``) did: per head, the even features first, then the odd ones.

    Rotating pair ``(2i, 2i+1)`` by frequency ``i`` is rotating pair ``(i, i + Dh/2)`` of the permuted
    vector; queries and keys permuted alike leave every score ``q . k`` unchanged, and an RMSNorm before
    the rotary (per head or over all heads) commutes with the permutation once its weight is permuted too.
    (The inverse of the ``permute`` of ``transformers``' Llama conversion script.)
    """
    rows = tensor.shape[0]
    return tensor.reshape(rows // head_dim, head_dim // 2, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def hf_tensors(name: str, tensor: torch.Tensor, family: str, model_cfg: ModelConfig,
               moe_cfg: MoEConfig) -> list[tuple[str, torch.Tensor]]:
    """The Hugging Face tensors of our tensor ``name`` (new contiguous CPU tensors, hub layout).

    A routed expert tensor ``[E, ...]`` gives ``E`` per-expert tensors, each the transpose of its
    slice (``w1``/``w3`` ``[d, f]`` -> ``gate_proj``/``up_proj`` ``[f, d]``; ``w2`` ``[f, d]`` ->
    ``down_proj`` ``[d, f]``); any other tensor is renamed, and for a multi-head-attention model with
    interleaved rotary the query/key rows are reordered (:func:`rope_to_half`).

    Raises:
        HFCheckpointError: ``name`` has no Hugging Face counterpart in ``family``.
    """
    if _is_routed_expert(name):
        layer, weight = int(name.split(".")[1]), name.rsplit(".", 1)[1]
        names = expert_names(family, layer, tensor.shape[0])["per_expert"][weight]
        tensor = tensor.detach().to("cpu")
        return [(hf, tensor[i].transpose(0, 1).contiguous()) for i, hf in enumerate(names)]
    hf = hf_tensor_map(model_cfg, moe_cfg, family, [name])[name]
    t = tensor.detach().to("cpu")
    if (model_cfg.attention_type == "mha" and model_cfg.rope_style == "interleaved"
            and name.startswith("layers.") and name.endswith(ROPE_PERMUTED)):
        t = rope_to_half(t, model_cfg.attn_head_dim()).contiguous()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()  # safetensors refuses views into a larger or shared storage
    return [(hf, t)]


class _ShardWriter:
    """Collects Hugging Face tensors into shards of at most ``max_bytes`` (a bigger tensor alone) and
    writes each as soon as the next tensor would not fit; :meth:`finish` names them ``-of-N``."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[list[str]] = []
        self.names: set[str] = set()
        self.total = 0

    def add(self, hf_name: str, tensor: torch.Tensor) -> None:
        if hf_name in self.names:
            raise HFCheckpointError(f"two of our tensors map to the Hugging Face tensor {hf_name}")
        self.names.add(hf_name)
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[hf_name] = tensor
        self.pending_bytes += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self.folder / f".part-{len(self.parts):05d}"), metadata={"format": "pt"})
        self.parts.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Rename the shards, write the index when there are several; returns the file names."""
        self.flush()
        n = len(self.parts)
        if n == 1:
            (self.folder / ".part-00000").rename(self.folder / SINGLE_FILE)
            return [SINGLE_FILE]
        names, weight_map = [], {}
        for k, part in enumerate(self.parts):
            file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f".part-{k:05d}").rename(self.folder / file)
            names.append(file)
            weight_map.update({t: file for t in part})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return names + [INDEX_FILE]


def _check_tensor(name: str, t: torch.Tensor, expected: dict[str, tuple[int, ...]]) -> None:
    if name not in expected:
        sample = ", ".join(list(expected)[:3])
        raise HFCheckpointError(f"tensor {name} is not a tensor of the model the config describes (e.g. {sample})")
    if tuple(t.shape) != expected[name]:
        raise HFCheckpointError(f"tensor {name} has shape {list(t.shape)}, the model (from its config) needs "
                                f"{list(expected[name])}")
    if t.dtype not in FLOAT_DTYPES:
        raise HFCheckpointError(f"tensor {name} has dtype {t.dtype}; only float32, bfloat16 and float16 are written")


def _write_tensors(tensors: Tensors, model_cfg: ModelConfig, moe_cfg: MoEConfig, family: str, shards: _ShardWriter,
                   dtype: torch.dtype | None) -> dict[torch.dtype, int]:
    """Convert and add every tensor; returns bytes per dtype. Checks names, shapes, completeness, and
    drops (or refuses) an expert bias the family has no place for."""
    expected = _expected_shapes(model_cfg, moe_cfg)
    seen: set[str] = set()
    by_dtype: dict[torch.dtype, int] = {}
    for name, tensor in _items(tensors):
        _check_tensor(name, tensor, expected)
        if name in seen:
            raise HFCheckpointError(f"tensor {name} is given twice")
        seen.add(name)
        if name.endswith(".router.expert_bias") and family != "deepseek_v3":
            if torch.count_nonzero(tensor):
                raise HFCheckpointError(
                    f"tensor {name} (auxiliary-loss-free balancing bias) is non-zero and {family} has no expert "
                    f"score bias: the exported model would route differently; export as deepseek_v3 or train "
                    f"with moe.load_balance = 'aux'")
            continue
        if dtype is not None:
            tensor = tensor.to(dtype)
        for hf, t in hf_tensors(name, tensor, family, model_cfg, moe_cfg):
            shards.add(hf, t)
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel() * t.element_size()
        del tensor
    missing = [n for n in expected if n not in seen]
    if family == "deepseek_v3":  # trained with aux-loss balancing (no bias): DeepSeek's score bias is zero
        missing = [n for n in missing if not n.endswith(".router.expert_bias")]
        for gate in [n for n in expected if n.endswith(".moe.router.gate.weight")]:
            bias = gate.removesuffix("gate.weight") + "expert_bias"
            if bias not in seen:
                hf = hf_tensor_map(model_cfg, moe_cfg, family, [bias])[bias]
                shards.add(hf, torch.zeros(moe_cfg.num_experts, dtype=torch.float32))
    if missing:
        raise HFCheckpointError(f"{len(missing)} tensor(s) of the model are missing from the input, e.g. "
                                f"{', '.join(missing[:3])}")
    return by_dtype


def _copy_tokenizer(source: str | Path, folder: Path) -> list[str]:
    src = Path(source)
    if src.is_file():
        files = {"tokenizer.json": src}
        src = src.parent
    elif src.is_dir():
        files = {}
    else:
        raise HFCheckpointError(f"tokenizer source {src} does not exist (give a folder holding tokenizer.json)")
    for name in TOKENIZER_FILES:
        if name not in files and (src / name).is_file():
            files[name] = src / name
    if "tokenizer.json" not in files:
        raise HFCheckpointError(f"tokenizer source {src} holds no tokenizer.json")
    for name, file in files.items():
        shutil.copyfile(file, folder / name)
    return list(files)


def write_hf_checkpoint(tensors: Tensors, model_cfg: ModelConfig, moe_cfg: MoEConfig, out: str | Path, *,
                        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, tokenizer_from: str | Path | None = None,
                        overwrite: bool = False, dtype: torch.dtype | None = None,
                        bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None) -> Path:
    """Write our model as the Hugging Face model folder ``out`` (the family of :func:`infer_family`).

    Files: ``model.safetensors`` (or ``model-0000k-of-0000N.safetensors`` shards of at most
    ``max_shard_size`` bytes, a larger tensor alone, and ``model.safetensors.index.json`` with
    ``metadata.total_size`` and ``weight_map``), ``config.json`` (:func:`to_hf_config`),
    ``generation_config.json``, the tokenizer files of ``tokenizer_from``, and the export marker.
    With tied embeddings there is no ``lm_head.weight`` (Hugging Face ties it). A DeepSeek-V3
    model trained without the expert bias gets a zero ``e_score_correction_bias``.

    Args:
        tensors: ``{our name: tensor}`` (global shapes, CPU; experts ``[E, ...]``), or an iterable of
            ``(name, tensor)`` pairs, or a callable returning one: each is converted and released
            before the next, so a big model is never held twice.
        model_cfg, moe_cfg: the model (``model.vocab_size`` set).
        out: the folder; the rules of :func:`system.checkpoint.model_io.write_model` apply (missing,
            empty, or an earlier export with ``overwrite``).
        max_shard_size: bytes per shard (decimal, as ``transformers``' ``"5GB"``).
        tokenizer_from: a folder (or a ``tokenizer.json``) whose ``tokenizer.json``,
            ``tokenizer_config.json`` and ``special_tokens_map.json`` are copied.
        dtype: cast every tensor to it (default: keep each tensor's dtype).
        bos_token_id, eos_token_id: for ``config.json`` and ``generation_config.json``.

    Returns:
        ``out`` (absolute).

    Raises:
        HFCheckpointError: the family cannot state the model (:func:`to_hf_config`); a tensor that is not
            the model's, of the wrong shape or a non-float dtype, given twice or missing; a non-zero
            expert bias outside DeepSeek-V3; ``tokenizer_from`` missing or without ``tokenizer.json``
            (each named).
        ExportTargetError, CheckpointError: ``out`` must not be replaced, or writing failed.
    """
    if max_shard_size <= 0:
        raise HFCheckpointError(f"max_shard_size must be > 0 bytes, got {max_shard_size}")
    family = infer_family(model_cfg, moe_cfg)
    to_hf_config(model_cfg, moe_cfg)  # refuse what the family cannot state before touching anything

    def write_files(folder: Path) -> list[str]:
        shards = _ShardWriter(folder, max_shard_size)
        by_dtype = _write_tensors(tensors, model_cfg, moe_cfg, family, shards, dtype)
        files = shards.finish()
        main = dtype or max(by_dtype, key=by_dtype.get, default=torch.float32)
        cfg = to_hf_config(model_cfg, moe_cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id, dtype=main)
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = generation_config(bos_token_id, eos_token_id)
        (folder / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
        files += [CONFIG_FILE, GENERATION_CONFIG_FILE]
        if tokenizer_from is not None:
            files += _copy_tokenizer(tokenizer_from, folder)
        return files

    return build_export(out, write_files, fmt=f"hf:{family}", overwrite=overwrite)


__all__ = ["DEFAULT_MAX_SHARD_SIZE", "TOKENIZER_FILES", "generation_config", "hf_tensors",
           "infer_family", "special_token_ids", "to_hf_config", "write_hf_checkpoint"]
