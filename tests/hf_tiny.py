"""Tiny random Hugging Face MoE models of every supported family, built with ``transformers`` itself.

Nothing is downloaded: each model is made from a config (a few layers, a few experts, random weights)
and saved with ``save_pretrained``, as the hub's checkpoints are (per-expert tensors, an index and
shards when ``max_shard_size`` is given).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

VOCAB = 128

FAMILY_KWARGS: dict[str, dict] = {
    "mixtral": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6),
    "qwen3_moe": dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=True),
    "qwen2_moe": dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    "olmoe": dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, eos_token_id=2, pad_token_id=1),
    "deepseek_v3": dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3,
                        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                        n_group=4, topk_group=2, num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=16,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                        routed_scaling_factor=2.5),
}
FAMILIES = tuple(FAMILY_KWARGS)


def make_config(family: str, **overrides):
    """The ``transformers`` config of the tiny ``family`` model (``overrides`` replace fields)."""
    kwargs = dict(FAMILY_KWARGS[family], vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False)
    kwargs.update(overrides)
    return transformers.AutoConfig.for_model(family, **kwargs)


def make_model(family: str, seed: int = 0, **overrides):
    """A tiny random ``transformers`` model of ``family`` in float32, in eval mode.

    Norm weights, biases and DeepSeek's expert-score correction bias are randomised too (their
    initial values, ones and zeros, would hide a wrong mapping).
    """
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(family, **overrides))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    return model.eval()


def save_model(family: str, path: Path, seed: int = 0, dtype=None, max_shard_size=None, **overrides) -> Path:
    """Save a tiny ``family`` model to ``path`` (``dtype``: cast first; ``max_shard_size``: e.g. ``"20KB"``
    for several shards and an index). Returns ``path``."""
    model = make_model(family, seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return Path(path)


def hf_logits(path: Path, tokens):
    """Logits ``[B, S, V]`` float32 of the saved model at ``path`` computed by ``transformers``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def hf_greedy(path: Path, tokens, max_new_tokens: int):
    """Greedy continuation ids ``[B, max_new_tokens]`` by ``transformers.generate`` (no EOS stop)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(tokens, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[:, tokens.shape[1]:]


def read_config(path: Path) -> dict:
    """The saved ``config.json``."""
    return json.loads((Path(path) / "config.json").read_text())
