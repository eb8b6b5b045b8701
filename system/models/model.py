"""The reference MoE decoder: RMSNorm, rotary causal attention, MoE or dense SwiGLU FFNs.

Written as single-device code; parallelisms are applied by ``system.parallel`` functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.moe.experts import FeedForward, expert_init_std
from system.moe.layer import MoELayer


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[Dr/2]`` float32 of the rotary width ``Dr = cfg.rope_dim()`` and the factor
    the cos/sin tables are multiplied by.

    ``rope_scaling``: ``none`` (RoFormer, Su et al. 2021: ``theta^(-2i/Dr)``); ``linear`` (position
    interpolation, Chen et al. 2023: frequencies divided by ``rope_factor``); ``yarn`` (YaRN, Peng et
    al. 2023, arXiv 2309.00071, sec. 3.2-3.4: a linear ramp between interpolated and original
    frequencies over the correction range of ``beta_fast``..``beta_slow`` rotations, and the attention
    factor ``0.1 ln(s) + 1``, DeepSeek's ``mscale``/``mscale_all_dim`` variant); ``llama3``
    (Llama 3.1: low frequencies divided by the factor, a smooth blend in between). These are the
    definitions Hugging Face transformers uses, so imported models compute the same angles.
    """
    dim, base = cfg.rope_dim(), cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind, factor = cfg.rope_scaling, cfg.rope_factor
    if kind == "none":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old = cfg.rope_original_max_seq_len
        low_wavelen, high_wavelen = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, blended, scaled), 1.0
    # yarn
    attention_factor = _yarn_mscale(factor, cfg.rope_mscale) / _yarn_mscale(factor, cfg.rope_mscale_all_dim) \
        if cfg.rope_mscale and cfg.rope_mscale_all_dim else _yarn_mscale(factor)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    orig = cfg.rope_original_max_seq_len

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original (extrapolated) frequency, 0: the interpolated one
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 for ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def precompute_rope(cfg: ModelConfig, max_seq_len: int | None = None) -> torch.Tensor:
    """Rotary tables ``[max_seq_len, Dr/2, 2]`` (cos, sin) in float32 for ``cfg`` (see :func:`rope_frequencies`);
    ``max_seq_len`` defaults to ``cfg.max_seq_len``."""
    inv_freq, attention_factor = rope_frequencies(cfg)
    angles = torch.outer(torch.arange(max_seq_len or cfg.max_seq_len, dtype=torch.float32), inv_freq)
    return torch.stack((angles.cos() * attention_factor, angles.sin() * attention_factor), dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, style: str = "interleaved") -> torch.Tensor:
    """Rotate ``x`` ``[B, S, H, Dr]`` by ``rope`` ``[S, Dr/2, 2]`` (one table for the batch) or ``[B, S, Dr/2, 2]``
    (per-row positions).

    ``style="interleaved"`` pairs dims ``(2i, 2i+1)``; ``"half"`` pairs ``(i, i + Dr/2)`` (Hugging Face's
    ``rotate_half``). Computed in float32, returned in ``x``'s dtype.
    """
    cos, sin = rope[..., 0].unsqueeze(-2), rope[..., 1].unsqueeze(-2)  # [.., S, 1, Dr/2]
    xf = x.float()
    if style == "half":
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)
    xf = xf.reshape(*x.shape[:-1], -1, 2)
    out = torch.stack((xf[..., 0] * cos - xf[..., 1] * sin, xf[..., 0] * sin + xf[..., 1] * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal multi-head (grouped-query) attention with rotary embeddings, via SDPA.

    Options (``ModelConfig``): ``head_dim`` (per-head size, independent of ``dim`` when set),
    ``qkv_bias`` / ``o_bias``, and ``qk_norm``: RMSNorm of queries and keys before the rotation,
    per head over ``head_dim`` (``"head"``, Qwen3) or over the whole projection (``"full"``, OLMoE).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.attn_head_dim()
        self.v_head_dim = self.head_dim
        self.rope_style = cfg.rope_style
        self.softmax_scale = self.head_dim ** -0.5
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "none":
            self.q_norm = self.k_norm = None
        else:
            q_width = self.head_dim if cfg.qk_norm == "head" else self.n_heads * self.head_dim
            k_width = self.head_dim if cfg.qk_norm == "head" else self.n_kv_heads * self.head_dim
            self.q_norm = nn.RMSNorm(q_width, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(k_width, eps=cfg.norm_eps)

    def init_weights(self, std: float, out_std: float) -> None:
        """Normal init; the output projection with the residual-scaled ``out_std``; biases 0, norms 1."""
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, std=std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std)
        for lin in (self.wq, self.wk, self.wv, self.wo):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def project(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries ``[B, H, S, Dh]``, keys ``[B, H_kv, S, Dh]`` and values ``[B, H_kv, S, Dv]`` of
        ``x`` ``[B, S, d]``; ``rope`` as :func:`apply_rope` takes it."""
        bsz, seq, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(bsz, seq, self.n_heads, self.head_dim)
        k = k.view(bsz, seq, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seq, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope, self.rope_style), apply_rope(k, rope, self.rope_style)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, S, d]`` -> ``[B, S, d]``; ``rope`` ``[S, Dr/2, 2]``."""
        q, k, v = self.project(x, rope)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=k.shape[1] != q.shape[1])
        return self.wo(out.transpose(1, 2).flatten(2))


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, sec. 2.1; DeepSeek-V3, arXiv 2412.19437, sec. 2.1.1).

    Queries ``q = W_qb norm(W_qa x)`` (or ``W_q x`` with ``q_lora_rank = 0``) ``[B, S, H, Dn + Dr]``;
    keys and values from the compressed latent ``c = norm(W_kva x)[:kv_lora_rank]`` ``[B, S, Dc]``:
    ``[k_nope, v] = W_kvb c`` per head, and one decoupled rotary key ``k_rope = rope(W_kva x)[Dc:]``
    ``[B, S, Dr]`` shared by all heads. Scores use ``1 / sqrt(Dn + Dr)``, times YaRN's ``mscale^2`` when
    the rotary table is YaRN-scaled with ``rope_mscale_all_dim``. Keys and values are expanded per
    head (the KV cache holds them expanded; caching the latent is an inference optimisation not done
    here).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_heads
        self.nope_dim, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.head_dim = self.nope_dim + self.rope_dim
        self.v_head_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_style = cfg.rope_style
        self.softmax_scale = self.head_dim ** -0.5
        if cfg.rope_scaling == "yarn" and cfg.rope_mscale_all_dim:
            self.softmax_scale *= _yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
        if cfg.q_lora_rank:
            self.wq = None
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
            self.wq_a = self.q_norm = self.wq_b = None
        self.wkv_a = nn.Linear(cfg.dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, cfg.dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        """Normal init; the output projection with the residual-scaled ``out_std``; norms 1."""
        for lin in (self.wq, self.wq_a, self.wq_b, self.wkv_a, self.wkv_b):
            if lin is not None:
                nn.init.trunc_normal_(lin.weight, std=std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std)
        for norm in (self.q_norm, self.kv_norm):
            if norm is not None:
                norm.reset_parameters()

    def project(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys ``[B, H, S, Dn + Dr]`` and values ``[B, H, S, Dv]`` of ``x`` ``[B, S, d]``."""
        bsz, seq, _ = x.shape
        q = self.wq(x) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(bsz, seq, self.n_heads, self.head_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(bsz, seq, self.n_heads, self.nope_dim + self.v_head_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, rope, self.rope_style)
        k_rope = apply_rope(k_rope.unsqueeze(2), rope, self.rope_style).expand(-1, -1, self.n_heads, -1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope), dim=-1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, S, d]`` -> ``[B, S, d]``; ``rope`` ``[S, Dr/2, 2]``."""
        q, k, v = self.project(x, rope)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return self.wo(out.transpose(1, 2).flatten(2))


def build_attention(cfg: ModelConfig) -> nn.Module:
    """The attention module ``cfg.attention_type`` names (:class:`Attention` or :class:`MLAttention`)."""
    return MLAttention(cfg) if cfg.attention_type == "mla" else Attention(cfg)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``h + ffn(norm(h))``.

    ``ffn`` is a :class:`MoELayer` (attribute ``moe``) or a dense :class:`FeedForward`
    (attribute ``mlp``).
    """

    def __init__(self, layer_id: int, cfg: ModelConfig, moe_cfg: MoEConfig, is_moe: bool):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = build_attention(cfg)
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
        self.register_buffer("rope", precompute_rope(cfg), persistent=False)

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
        for block in self.blocks():
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
        return [b.moe for b in self.blocks() if b.moe is not None]

    def blocks(self) -> list[Block]:
        """The transformer blocks this model holds, in depth order: all of them, or a pipeline stage's
        (``layers`` is then a ``ModuleDict`` keyed by the original block index, so parameter names do not change)."""
        return list(self.layers.values()) if isinstance(self.layers, nn.ModuleDict) else list(self.layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` int64 ``[B, S]`` (``S <= max_seq_len``) -> logits ``[B, S, V]``.

        A pipeline stage (:mod:`system.parallel.pp`) without the embedding (``tok_embeddings`` None) takes hidden
        states ``[B, S, d]`` instead of tokens, and one without the head (``norm`` None) returns hidden states.
        """
        seq = tokens.shape[1]
        if seq > self.rope.shape[0]:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len {self.rope.shape[0]}")
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        rope = self.rope[:seq]
        for block in self.blocks():
            h = block(h, rope)
        if self.norm is None:
            return h
        h = self.norm(h)
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    def aux_loss(self) -> torch.Tensor:
        """Sum over MoE layers of ``aux_loss_coef * aux + z_loss_coef * z`` of the latest forward."""
        total = torch.zeros((), device=self.rope.device)
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
