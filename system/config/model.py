"""``[model]`` section: the decoder's shape."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key when a value is out of range."""
        for key in ("dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must divide by model.n_heads ({self.n_heads})")
        if self.n_kv_heads < 0:
            raise ValueError(f"model.n_kv_heads must be >= 0, got {self.n_kv_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"model.n_heads ({self.n_heads}) must divide by model.n_kv_heads ({kv})")
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size must be >= 0, got {self.vocab_size}")
