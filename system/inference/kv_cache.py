"""Key/value cache for incremental decoding of a batch of left-padded prompts.

Batching choice: prompts of different lengths are **left-padded** to the longest one, so every row's
next token is at the same column and one decode step appends one column for the whole batch. Pad
columns are excluded from attention by a key mask, and each row's rotary positions start at 0 at
its first real token (``position = column - pad``), so a padded row computes what the same prompt
computes alone (up to floating-point reassociation). Pad tokens are also kept out of the MoE
feed-forward layers (:mod:`system.inference.decoder` gathers the real tokens), so they neither cost
expert compute nor influence which experts a batch needs.

A padded query row may see no real key at all (a pad column before the prompt starts); it is
allowed to attend to itself so its softmax stays finite: a NaN there would leak into the cached
values of pad columns and, through ``0 * NaN``, into real rows.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys ``[L, B, H_kv, S_max, Dh]`` and values ``[L, B, H_kv, S_max, Dv]`` for a batch of
    left-padded rows.

    Args:
        n_layers, batch, n_kv_heads, head_dim: shape.
        v_head_dim: value size ``Dv`` (MLA); ``None``: ``head_dim``.
        max_len: columns to allocate (longest prompt + new tokens).
        pad: left-pad length of each row (``B`` ints).
        dtype, device: of the cache.

    Attributes:
        length: columns filled so far (the next forward writes columns ``[length, length + S)``).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 pad: list[int], dtype: torch.dtype, device: torch.device | str, v_head_dim: int | None = None):
        if len(pad) != batch:
            raise ValueError(f"pad has {len(pad)} entries for a batch of {batch}")
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape[:-1] + (v_head_dim or head_dim,), dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.pad = torch.tensor(pad, dtype=torch.int64, device=device)
        self.padded = any(p > 0 for p in pad)
        cols = torch.arange(max_len, device=device)
        self.key_valid = cols[None, :] >= self.pad[:, None]  # [B, S_max]

    def positions(self, seq: int) -> torch.Tensor:
        """Rotary positions ``[B, seq]`` of the next ``seq`` columns (0 at each row's first real token)."""
        cols = torch.arange(self.length, self.length + seq, device=self.pad.device)
        return (cols[None, :] - self.pad[:, None]).clamp_min(0)

    def query_valid(self, seq: int) -> torch.Tensor | None:
        """``[B, seq]`` bool, which of the next ``seq`` columns hold real tokens; ``None`` when all do."""
        if not self.padded or self.length >= int(self.pad.max()):
            return None
        return self.key_valid[:, self.length : self.length + seq]

    def attention_mask(self, seq: int) -> tuple[torch.Tensor | None, bool]:
        """``(mask, is_causal)`` for SDPA over the next ``seq`` columns.

        ``mask`` is ``[B, 1, seq, length + seq]`` bool (True: attend), or ``None`` with
        ``is_causal=True`` for an unpadded prefill from column 0, or ``None`` and ``False`` for an
        unpadded decode step (one query attends to every filled column).
        """
        end = self.length + seq
        if not self.padded:
            if self.length == 0 and seq > 1:
                return None, True
            if seq == 1:
                return None, False
        q_cols = torch.arange(self.length, end, device=self.pad.device)
        k_cols = torch.arange(end, device=self.pad.device)
        causal = k_cols[None, :] <= q_cols[:, None]  # [seq, end]
        diag = k_cols[None, :] == q_cols[:, None]
        mask = causal[None] & (self.key_valid[:, None, :end] | diag[None])
        return mask[:, None], False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` ``[B, H_kv, seq, Dh]`` at the next columns of ``layer``; return the filled
        keys and values ``[B, H_kv, length + seq, Dh]`` (views)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} columns cannot take {end}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, seq: int) -> None:
        """Mark ``seq`` more columns filled (after every layer has called :meth:`update`)."""
        self.length += seq


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Left-pad token lists to the longest: ``(tokens int64 [B, S], pad per row)``.

    Raises:
        ValueError: an empty batch or an empty prompt.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (and the batch at least one prompt)")
    width = max(len(p) for p in prompts)
    pad = [width - len(p) for p in prompts]
    rows = [[pad_id] * n + list(p) for p, n in zip(prompts, pad)]
    return torch.tensor(rows, dtype=torch.int64), pad
