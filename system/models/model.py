"""The reference MoE decoder: RMSNorm, rotary causal attention, MoE or dense SwiGLU FFNs.

Written as single-device code; parallelisms are applied by ``system.parallel`` functions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.moe.experts import FeedForward, expert_init_std
from system.moe.layer import MoELayer


def precompute_rope(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """Rotary tables ``[max_seq_len, head_dim // 2, 2]`` (cos, sin) in float32 (RoFormer, Su et al. 2021)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, S, H, Dh]`` by the table rows ``rope`` ``[S, Dh/2, 2]``."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    out = torch.stack((xf[..., 0] * cos - xf[..., 1] * sin, xf[..., 0] * sin + xf[..., 1] * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal multi-head (grouped-query) attention with rotary embeddings, via SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        """Normal init; the output projection with the residual-scaled ``out_std``."""
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, std=std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, S, d]`` -> ``[B, S, d]``; ``rope`` ``[S, Dh/2, 2]``."""
        bsz, seq, _ = x.shape
        q = self.wq(x).view(bsz, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seq, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``h + ffn(norm(h))``.

    ``ffn`` is a :class:`MoELayer` (attribute ``moe``) or a dense :class:`FeedForward`
    (attribute ``mlp``).
    """

    def __init__(self, layer_id: int, cfg: ModelConfig, moe_cfg: MoEConfig, is_moe: bool):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.moe = MoELayer(cfg.dim, moe_cfg) if is_moe else None
        self.mlp = None if is_moe else FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h = x + self.attention(self.attention_norm(x), rope)
        ffn = self.moe if self.moe is not None else self.mlp
        return h + ffn(self.ffn_norm(h))


def is_moe_layer(layer_id: int, moe_cfg: MoEConfig) -> bool:
    """Whether block ``layer_id`` has a MoE FFN (after ``first_dense_layers``, every ``interleave``-th)."""
    if layer_id < moe_cfg.first_dense_layers:
        return False
    return (layer_id - moe_cfg.first_dense_layers) % moe_cfg.interleave == 0


class MoETransformer(nn.Module):
    """Decoder-only MoE language model ``tokens [B, S] -> logits [B, S, V]``.

    Args:
        cfg: model shape; ``cfg.vocab_size`` must be set (> 0).
        moe_cfg: MoE layers.

    Raises:
        ValueError: ``cfg.vocab_size`` is 0 (resolve it from the tokenizer first).
    """

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (> 0) before building the model")
        self.cfg, self.moe_cfg = cfg, moe_cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            Block(i, cfg, moe_cfg, is_moe_layer(i, moe_cfg)) for i in range(cfg.n_layers)
        )
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer(
            "rope", precompute_rope(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta), persistent=False
        )

    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every weight (normal, residual projections scaled by ``1/sqrt(2 L)``).

        With ``seed`` the initialisation is reproducible and independent of the global RNG.
        """
        gen_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        std = self.cfg.init_std
        out_std = expert_init_std(std, self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers:
            block.attention.init_weights(std, out_std)
            (block.moe or block.mlp).init_weights(std, out_std)
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)
        if seed is not None:
            torch.random.set_rng_state(gen_state)

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, in depth order."""
        return [b.moe for b in self.layers if b.moe is not None]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` int64 ``[B, S]`` (``S <= max_seq_len``) -> logits ``[B, S, V]``."""
        seq = tokens.shape[1]
        if seq > self.rope.shape[0]:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len {self.rope.shape[0]}")
        h = self.tok_embeddings(tokens)
        rope = self.rope[:seq]
        for block in self.layers:
            h = block(h, rope)
        h = self.norm(h)
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    def aux_loss(self) -> torch.Tensor:
        """Sum over MoE layers of ``aux_loss_coef * aux + z_loss_coef * z`` of the latest forward."""
        total = torch.zeros((), device=self.tok_embeddings.weight.device)
        for moe in self.moe_layers():
            if moe.last_stats is None:
                raise RuntimeError("aux_loss() called before forward()")
            total = total + self.moe_cfg.aux_loss_coef * moe.last_stats.aux_loss
            total = total + self.moe_cfg.z_loss_coef * moe.last_stats.z_loss
        return total

    def num_params(self) -> tuple[int, int]:
        """``(total, active)`` parameter counts of the full (unsharded) model.

        Active counts ``top_k`` of the E routed experts per MoE layer.
        """
        total = active = 0
        for name, p in self.named_parameters():
            n = p.numel()
            if ".experts." in name:
                mod = self.get_submodule(name.rsplit(".", 1)[0])
                per_expert = n // mod.num_local_experts
                total += per_expert * mod.num_global_experts
                active += per_expert * self.moe_cfg.top_k
            else:
                total += n
                active += n
        return total, active
