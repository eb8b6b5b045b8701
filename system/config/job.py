"""The whole job: one dataclass per TOML section."""

from __future__ import annotations

from dataclasses import dataclass, field

from system.config.checkpoint import CheckpointConfig
from system.config.comm import CommConfig
from system.config.data import DataConfig
from system.config.fssdp import FSSDPConfig
from system.config.metrics import MetricsConfig
from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.config.parallel import ParallelConfig
from system.config.training import TrainingConfig


@dataclass
class JobConfig:
    """A training job. Each field is a TOML section (``[model]``, ``[moe]``, ...)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fssdp: FSSDPConfig = field(default_factory=FSSDPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    name: str = field(default="job", metadata={"help": "Job name: the prefix of the default run directory runs/<name>-<time>."})

    def validate(self) -> None:
        """Validate every section; raises ``ValueError`` naming the offending key."""
        for section in (self.model, self.moe, self.parallel, self.fssdp, self.data, self.training, self.checkpoint,
                        self.comm):
            section.validate()
        if self.parallel.expert_mode == "ep" and self.moe.num_experts % self.parallel.ep:
            raise ValueError(
                f"moe.num_experts={self.moe.num_experts} does not divide by the expert-parallel degree "
                f"parallel.ep={self.parallel.ep}"
            )
        if self.parallel.expert_mode == "fssdp" and self.parallel.ep != 1:
            raise ValueError(
                f"parallel.expert_mode='fssdp' shards every expert over all ranks and needs parallel.ep=1, "
                f"got parallel.ep={self.parallel.ep}; use expert_mode='ep' for expert parallelism"
            )
        self._check_model_parallel()
        if self.training.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"training.seq_len ({self.training.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )

    def _check_model_parallel(self) -> None:
        """The divisibility rules of tensor and pipeline parallelism, checked once from the config (every rank
        would otherwise fail in its own way after the model is built).

        Raises:
            ValueError: naming the model key and ``parallel.tp`` / ``parallel.pp`` it does not divide by.
        """
        p, m = self.parallel, self.model
        if p.tp > 1:
            sizes = [("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads or m.n_heads),
                     ("model.ffn_dim", m.ffn_dim)]
            if m.vocab_size and p.loss_parallel:
                sizes.append(("model.vocab_size", m.vocab_size))
            if p.expert_tp:
                sizes.append(("moe.expert_dim", self.moe.expert_dim))
            for key, value in sizes:
                if value % p.tp:
                    raise ValueError(f"{key}={value} does not divide by the tensor-parallel degree parallel.tp={p.tp}")
        stages = p.pp * p.stages_per_rank()
        if p.pp > 1 and m.n_layers < stages:
            raise ValueError(f"model.n_layers={m.n_layers} is fewer than the pipeline's parallel.pp={p.pp} x "
                             f"{p.stages_per_rank()} stages per rank = {stages} stages")
        if p.pp > 1 and m.tie_embeddings:
            raise ValueError(f"model.tie_embeddings=true shares the embedding with the output head, which "
                             f"parallel.pp={p.pp} puts on different pipeline stages: set model.tie_embeddings=false")
        micro = p.pp_microbatches or stages
        if p.pp > 1 and self.training.batch_size % micro:
            raise ValueError(f"training.batch_size={self.training.batch_size} does not divide into {micro} pipeline "
                             f"micro-batches (parallel.pp_microbatches, 0 meaning the number of stages)")
