"""One forward pass of :class:`~system.models.model.MoETransformer` over new columns, with a KV cache.

The same module objects as the training model are called (``block.attention.wq(...)``,
``block.moe(...)``), so the arithmetic is the model's; only attention is rewritten to read and
extend the :class:`~system.inference.kv_cache.KVCache`. Where each block's feed-forward weights
come from is the caller's business: ``run_ffn(i, block, x)`` computes block ``i``'s FFN, and the
ring-offload scheduler uses it to bind the block's weights to a slot for exactly that call. Calling
modules (rather than their tensors) also lets Accelerate's offload hooks fire, so the benchmark
compares weight movement under one decode algorithm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from system.inference.kv_cache import KVCache
from system.models.model import MoETransformer

FfnRunner = Callable[[int, nn.Module, torch.Tensor], torch.Tensor]
"""``run_ffn(i, block, x)``: block ``i``'s feed-forward of ``x`` ``[1 or B, T, d]`` -> same shape."""


def default_ffn(i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Block ``i``'s FFN with the weights it holds (the resident path)."""
    return (block.moe if block.moe is not None else block.mlp)(x)


def cached_attention(attn: nn.Module, x: torch.Tensor, cache: KVCache, layer: int, rope: torch.Tensor,
                     mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Attention of the new columns ``x`` ``[B, S, d]`` over the cached and new keys -> ``[B, S, d]``.

    ``attn`` is the block's attention module (:class:`~system.models.model.Attention` or
    :class:`~system.models.model.MLAttention`); its ``project`` gives the rotated queries, keys and
    values (``rope`` ``[B, S, Dr/2, 2]``, per-row positions). Writes this layer's new keys and values
    into ``cache`` (columns ``[length, length + S)``).
    """
    q, k, v = attn.project(x, rope)
    keys, values = cache.update(layer, k, v)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, is_causal=is_causal, scale=attn.softmax_scale,
        enable_gqa=keys.shape[1] != q.shape[1],
    )
    return attn.wo(out.transpose(1, 2).flatten(2))


@torch.inference_mode()
def forward_step(model: MoETransformer, tokens: torch.Tensor, cache: KVCache,
                 run_ffn: FfnRunner = default_ffn) -> torch.Tensor:
    """Run the new columns ``tokens`` int64 ``[B, S]`` through the model and extend ``cache``.

    Prefill passes the (left-padded) prompts, each decode step one column. Pad tokens are gathered
    out before the FFNs (``run_ffn`` then sees ``[1, T_real, d]``).

    Returns:
        float32 logits ``[B, V]`` of the last column.

    Raises:
        ValueError: the cache would exceed ``model.max_seq_len`` (the rotary table).
    """
    seq = tokens.shape[1]
    if cache.length + seq > model.rope.shape[0]:
        raise ValueError(f"sequence length {cache.length + seq} exceeds model.max_seq_len {model.rope.shape[0]}")
    rope = model.rope[cache.positions(seq)]
    mask, is_causal = cache.attention_mask(seq)
    valid = cache.query_valid(seq)
    h = model.tok_embeddings(tokens)
    for i, block in enumerate(model.layers):
        h = h + cached_attention(block.attention, block.attention_norm(h), cache, i, rope, mask, is_causal)
        x = block.ffn_norm(h)
        if valid is None:
            y = run_ffn(i, block, x)
        else:
            y = torch.zeros_like(x)
            y[valid] = run_ffn(i, block, x[valid][None])[0]
        h = h + y
    cache.advance(seq)
    last = model.norm(h[:, -1])
    logits = F.linear(last, model.tok_embeddings.weight) if model.output is None else model.output(last)
    return logits.float()
