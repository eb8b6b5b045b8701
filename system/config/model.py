"""``[model]`` section: the decoder's shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    """Shape of the decoder-only transformer (``system.models.model.MoETransformer``)."""

    dim: int = field(default=256, metadata={"help": "Hidden size d of the residual stream."})
    n_layers: int = field(default=4, metadata={"help": "Number of transformer blocks."})
    n_heads: int = field(default=4, metadata={"help": "Attention heads (dim must divide by it)."})
    n_kv_heads: int = field(
        default=0, metadata={"help": "Key/value heads for grouped-query attention; 0 means n_heads."}
    )
    ffn_dim: int = field(default=512, metadata={"help": "Hidden size of the dense SwiGLU FFN blocks."})
    vocab_size: int = field(
        default=0, metadata={"help": "Vocabulary size; 0 takes the tokenizer's, rounded up to a multiple of 64."}
    )
    max_seq_len: int = field(default=1024, metadata={"help": "Longest sequence the rotary table covers."})
    rope_theta: float = field(default=10000.0, metadata={"help": "Rotary embedding base."})
    norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon."})
    tie_embeddings: bool = field(default=True, metadata={"help": "Share the input embedding and output head."})
    init_std: float = field(default=0.02, metadata={"help": "Std of the normal weight initialisation."})
    head_dim: int = field(
        default=0, metadata={"help": "Per-head size of queries/keys/values (attention_type = mha); 0: dim / n_heads "
                             "(Qwen3-MoE sets it independently of dim)."}
    )
    attention_type: Literal["mha", "mla"] = field(
        default="mha", metadata={"help": "mha: multi-head attention (grouped-query with n_kv_heads < n_heads). mla: "
                                 "DeepSeek Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, sec. 2.1)."}
    )
    qkv_bias: bool = field(default=False, metadata={"help": "Bias on the q/k/v projections (Qwen2-MoE)."})
    o_bias: bool = field(default=False, metadata={"help": "Bias on the attention output projection."})
    qk_norm: Literal["none", "head", "full"] = field(
        default="none", metadata={"help": "RMSNorm of queries and keys before rotary: head = per head over head_dim "
                                  "(Qwen3-MoE); full = over the whole projection (OLMoE)."}
    )
    rope_style: Literal["interleaved", "half"] = field(
        default="interleaved", metadata={"help": "Rotary pairing: interleaved = dims (2i, 2i+1) (RoFormer, Meta, "
                                         "DeepSeek); half = dims (i, i + Dh/2) (Hugging Face rotate_half)."}
    )
    rope_scaling: Literal["none", "linear", "yarn", "llama3"] = field(
        default="none", metadata={"help": "Rotary frequency scaling for long context (none, linear position "
                                  "interpolation, YaRN arXiv 2309.00071, Llama-3.1)."}
    )
    rope_factor: float = field(default=1.0, metadata={"help": "Rotary scaling factor (rope_scaling != none)."})
    rope_original_max_seq_len: int = field(
        default=0, metadata={"help": "Context length the rotary base was trained for (yarn, llama3)."}
    )
    rope_beta_fast: float = field(default=32.0, metadata={"help": "YaRN beta_fast (rotations, high-frequency edge)."})
    rope_beta_slow: float = field(default=1.0, metadata={"help": "YaRN beta_slow (rotations, low-frequency edge)."})
    rope_mscale: float = field(default=1.0, metadata={"help": "YaRN mscale (DeepSeek)."})
    rope_mscale_all_dim: float = field(default=0.0, metadata={"help": "YaRN mscale_all_dim (DeepSeek); 0: unset."})
    rope_low_freq_factor: float = field(default=1.0, metadata={"help": "Llama-3 rope scaling low_freq_factor."})
    rope_high_freq_factor: float = field(default=4.0, metadata={"help": "Llama-3 rope scaling high_freq_factor."})
    q_lora_rank: int = field(default=0, metadata={"help": "MLA query low-rank size; 0: a full-rank query projection."})
    kv_lora_rank: int = field(default=512, metadata={"help": "MLA compressed key/value size."})
    qk_nope_head_dim: int = field(default=128, metadata={"help": "MLA per-head query/key size without rotary."})
    qk_rope_head_dim: int = field(default=64, metadata={"help": "MLA per-head query/key size with (decoupled) rotary."})
    v_head_dim: int = field(default=128, metadata={"help": "MLA per-head value size."})
    hf_model_type: str = field(
        default="", metadata={"help": "Hugging Face model_type this model was read from (mixtral, qwen3_moe, "
                              "qwen2_moe, olmoe, deepseek_v3); `ckpt export --format hf` writes that family. Empty: "
                              "inferred from the architecture."}
    )

    def attn_head_dim(self) -> int:
        """Per-head query/key size: ``head_dim`` (or ``dim // n_heads``), MLA ``qk_nope + qk_rope``."""
        if self.attention_type == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim or self.dim // self.n_heads

    def rope_dim(self) -> int:
        """Width the rotary table covers: the head size, MLA ``qk_rope_head_dim``."""
        return self.qk_rope_head_dim if self.attention_type == "mla" else self.attn_head_dim()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key when a value is out of range."""
        for key in ("dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")
        if self.head_dim < 0:
            raise ValueError(f"model.head_dim must be >= 0 (0: dim / n_heads), got {self.head_dim}")
        if self.attention_type == "mha" and not self.head_dim and self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must divide by model.n_heads ({self.n_heads}) "
                             f"(or set model.head_dim)")
        if self.attention_type == "mla":
            for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, key) <= 0:
                    raise ValueError(f"model.{key} must be > 0 with model.attention_type = 'mla', got "
                                     f"{getattr(self, key)}")
            if self.q_lora_rank < 0:
                raise ValueError(f"model.q_lora_rank must be >= 0 (0: full rank), got {self.q_lora_rank}")
            if self.qk_norm != "none":
                raise ValueError("model.qk_norm applies to attention_type = 'mha' only (MLA normalises its "
                                 "compressed q and kv instead)")
        if self.rope_dim() % 2:
            raise ValueError(f"the rotary width ({self.rope_dim()}) must be even")
        if self.rope_scaling != "none":
            if self.rope_factor < 1.0:
                raise ValueError(f"model.rope_factor must be >= 1 with rope_scaling = {self.rope_scaling!r}, got "
                                 f"{self.rope_factor}")
            if self.rope_scaling in ("yarn", "llama3") and self.rope_original_max_seq_len <= 0:
                raise ValueError(f"model.rope_original_max_seq_len must be > 0 with rope_scaling = "
                                 f"{self.rope_scaling!r}")
        if self.n_kv_heads < 0:
            raise ValueError(f"model.n_kv_heads must be >= 0, got {self.n_kv_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"model.n_heads ({self.n_heads}) must divide by model.n_kv_heads ({kv})")
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size must be >= 0, got {self.vocab_size}")
