"""The batched generation loop: prefill the left-padded prompts, then one column per decode step."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from system.inference.decoder import FfnRunner, default_ffn, forward_step
from system.inference.kv_cache import KVCache, left_pad
from system.models.model import MoETransformer


@dataclass
class GenerationStats:
    """Counters and timings of one or more generated batches.

    Attributes:
        sequences: prompts generated for.
        prompt_tokens: real (unpadded) prompt tokens.
        new_tokens: tokens generated (up to and including EOS where it stopped a row).
        prefill_s, decode_s: wall time of the prefill passes and of the decode steps (seconds).
        decode_tokens: tokens produced by decode steps (batch rows x steps, finished rows included).
        forward_passes: prefill passes + decode steps.
        bytes_streamed: bytes moved from the host tier into device slots (0 when resident).
    """

    sequences: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0
    forward_passes: int = 0
    bytes_streamed: int = 0

    def add(self, other: "GenerationStats") -> None:
        """Accumulate ``other`` into this."""
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode throughput: tokens of the decode steps per second of decoding."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """End-to-end throughput: generated tokens per second of prefill + decode."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0

    @property
    def bytes_per_token(self) -> float:
        """Bytes streamed per generated token."""
        return self.bytes_streamed / self.new_tokens if self.new_tokens else 0.0

    def as_dict(self) -> dict:
        """Fields and derived rates as a plain dict."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out.update(decode_tokens_per_s=self.decode_tokens_per_s, tokens_per_s=self.tokens_per_s,
                   bytes_per_token=self.bytes_per_token)
        return out


@torch.inference_mode()
def generate_batch(
    model: MoETransformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampler: Callable[[torch.Tensor], torch.Tensor],
    *,
    run_ffn: FfnRunner = default_ffn,
    eos_id: int | Collection[int] | None = None,
    pad_id: int = 0,
    dtype: torch.dtype | None = None,
    sync: Callable[[], None] | None = None,
) -> tuple[list[list[int]], GenerationStats]:
    """Generate up to ``max_new_tokens`` for each prompt of one batch, with a KV cache.

    The prompts are left-padded (:mod:`system.inference.kv_cache`), prefilled in one forward pass,
    then each decode step feeds the B sampled tokens as one new column. A row stops at ``eos_id``
    (any of them when several; kept in its output); the loop ends when every row has stopped or
    after ``max_new_tokens``.

    Args:
        model: the decoder (weights resident, or bound by ``run_ffn``); its ``rope`` buffer gives
            the device.
        prompts: token ids per row (each non-empty).
        max_new_tokens: tokens to generate per row (>= 1).
        sampler: ``logits [B, V] -> [B]`` (:class:`system.inference.sampling.Sampler`).
        run_ffn: how each block's FFN runs (resident, ring, expert cache).
        eos_id: stop a row at this id, or at any of these ids (``None``: never).
        pad_id: id of the left padding (any valid id; pads are masked).
        dtype: KV cache dtype (default: the embedding weight's).
        sync: called before reading the clock (``torch.cuda.synchronize`` on GPU).

    Returns:
        ``(new token ids per row, stats)``.

    Raises:
        ValueError: ``max_new_tokens < 1``, an empty prompt, or prompt + new tokens beyond
            ``model.max_seq_len``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokens, pad = left_pad(prompts, pad_id)
    bsz, width = tokens.shape
    device = model.rope.device
    if width + max_new_tokens > model.rope.shape[0]:
        raise ValueError(
            f"prompt of {width} tokens + {max_new_tokens} new tokens exceeds model.max_seq_len {model.rope.shape[0]}"
        )
    cfg = model.cfg
    attn = model.layers[0].attention
    cache = KVCache(cfg.n_layers, bsz, attn.n_kv_heads, attn.head_dim, width + max_new_tokens,
                    pad, dtype or model.tok_embeddings.weight.dtype, device, v_head_dim=attn.v_head_dim)
    stats = GenerationStats(sequences=bsz, prompt_tokens=sum(len(p) for p in prompts))
    sync = sync or (lambda: None)
    stop = frozenset() if eos_id is None else frozenset([eos_id] if isinstance(eos_id, int) else eos_id)

    sync()
    t0 = time.perf_counter()
    nxt = sampler(forward_step(model, tokens.to(device), cache, run_ffn))
    sync()
    t1 = time.perf_counter()
    out: list[list[int]] = [[] for _ in range(bsz)]
    done = [False] * bsz
    steps = 0
    while True:
        for row, tok in enumerate(nxt.tolist()):
            if not done[row]:
                out[row].append(tok)
                done[row] = tok in stop or len(out[row]) >= max_new_tokens
        if all(done):
            break
        nxt = sampler(forward_step(model, nxt[:, None], cache, run_ffn))
        steps += 1
    sync()
    t2 = time.perf_counter()
    stats.prefill_s, stats.decode_s = t1 - t0, t2 - t1
    stats.decode_tokens, stats.forward_passes = steps * bsz, steps + 1
    stats.new_tokens = sum(len(o) for o in out)
    return out, stats
