"""``[training]`` section: the optimisation loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrainingConfig:
    """Steps, batch shape, optimizer and schedule."""

    steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    seed: int = field(default=1234, metadata={"help": "Seed for initialisation and data order."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per micro-batch per rank."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per sequence."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches accumulated per optimizer step."})
    lr: float = field(default=3e-3, metadata={"help": "Peak learning rate (AdamW)."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Final LR as a fraction of the peak (cosine)."})
    warmup_steps: int = field(default=30, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay (matrices only)."})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip to this global L2 norm; 0 disables."})
    eval_interval: int = field(default=50, metadata={"help": "Steps between validation-loss evaluations; 0: end only."})
    eval_batches: int = field(default=8, metadata={"help": "Micro-batches per validation evaluation (per rank)."})
    log_interval: int = field(default=10, metadata={"help": "Steps between metric records."})
    mixed_precision: str = field(
        default="auto", metadata={"help": "'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16' or 'fp32'."}
    )
    threads_per_rank: int = field(
        default=0, metadata={"help": "torch intra-op threads per rank on CPU; 0: cores / local ranks."}
    )
    deterministic: bool = field(
        default=False,
        metadata={"help": "Bit-reproducible runs (reruns and resumes on the same hardware and software): "
                  "torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8, and the MoE combine summed "
                  "in a fixed order instead of by atomic index_add on CUDA; some kernels get slower. Off: CUDA "
                  "atomics and multithreaded CPU scatter-adds may change the last bits from run to run "
                  "(see system.train.determinism)."},
    )
    activation_checkpoint: Literal["none", "full", "selective"] = field(
        default="none",
        metadata={"help": "Activation checkpointing per transformer block: none; full (recompute each block in "
                  "backward); selective (TorchTitan's op-level policy: keep matmul and attention outputs, "
                  "recompute the rest)."},
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile each transformer block (inductor; CPU needs a C compiler)."},
    )
    sample_prompt: str = field(default="def ", metadata={"help": "Prompt of the greedy sample printed at the end."})
    sample_tokens: int = field(default=64, metadata={"help": "Tokens of the greedy sample (0 disables it)."})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key when a value is out of range."""
        for key in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_interval"):
            if getattr(self, key) < 1:
                raise ValueError(f"training.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_interval", "max_grad_norm", "weight_decay", "lr", "sample_tokens"):
            if getattr(self, key) < 0:
                raise ValueError(f"training.{key} must be >= 0, got {getattr(self, key)}")
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(
                f"training.mixed_precision must be one of 'auto', 'bf16', 'fp32', got {self.mixed_precision!r}"
            )
