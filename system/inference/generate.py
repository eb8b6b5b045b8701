"""Greedy decoding from a (possibly expert-parallel) model.

Under expert parallelism every rank of the EP group must run the same forward passes (the
all-to-all is collective), so all ranks call :func:`greedy_generate` with the same prompt.
"""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def greedy_generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, max_seq_len: int) -> torch.Tensor:
    """Append ``max_new_tokens`` argmax tokens to ``prompt`` (int64 ``[B, S0]``).

    Re-runs the model on the last ``max_seq_len`` tokens each step (no KV cache).

    Returns:
        int64 ``[B, S0 + max_new_tokens]``.
    """
    tokens = prompt
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = model(tokens[:, -max_seq_len:])
            nxt = logits[:, -1].float().argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
    finally:
        model.train(was_training)
    return tokens
