"""``[checkpoint]`` section: periodic resharding checkpoints, resuming, and the final model export."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CheckpointConfig:
    """Training checkpoints (ByteCheckpoint-style, :mod:`system.checkpoint`) and the final model."""

    interval: int = field(default=0, metadata={"help": "Save a training checkpoint every N steps; 0: never periodically."})
    dir: str = field(
        default="", metadata={"help": "Checkpoint root (path or fsspec URL); empty: <run_dir>/checkpoints."}
    )
    keep_last: int = field(default=3, metadata={"help": "Committed checkpoints kept; older ones are pruned. 0: keep all."})
    resume: str = field(
        default="",
        metadata={"help": "Resume from 'latest' (under checkpoint.dir; a fresh start if there is none) or a checkpoint path."},
    )
    initial_load_path: str = field(
        default="",
        metadata={"help": "Folder the initial weights come from at step 0: a Hugging Face model folder (config.json "
                  "with a model_type + safetensors), a model folder we exported (model.safetensors + our "
                  "config.json) or one of our training checkpoints (its model tensors, e.g. from ckpt import-hf). Its model shape fills the [model]/[moe] keys the config leaves unset; a key set to "
                  "a different value is an error, except the training-only ones (docs/guides/fine-tuning.md). "
                  "Ignored when a resume finds a checkpoint: a resume wins. Empty: random initialisation."},
    )
    async_save: bool = field(default=True, metadata={"help": "Write checkpoints in the background (the step only waits for the host snapshot)."})
    save_final: bool = field(
        default=True, metadata={"help": "At the end: a training checkpoint (when interval > 0) and the exported model."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Start a fresh run (no checkpoint.resume) in a run folder that holds an earlier run: "
                  "its checkpoints (step_* and latest under checkpoint.dir), metrics.jsonl, tb/, summary.json "
                  "and exported model are deleted first. Without it such a start is refused."},
    )
    folder: str = field(default="model", metadata={"help": "Folder under the run directory for the exported model (safetensors)."})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key when a value is out of range."""
        for key in ("interval", "keep_last"):
            if getattr(self, key) < 0:
                raise ValueError(f"checkpoint.{key} must be >= 0, got {getattr(self, key)}")
