"""``[checkpoint]`` section: what is saved at the end of a run."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CheckpointConfig:
    """Model saving. The final model is written to ``<run_dir>/model`` unless disabled."""

    save_final: bool = field(default=True, metadata={"help": "Save the trained model at the end of the run."})
    folder: str = field(default="model", metadata={"help": "Folder under the run directory for the saved model."})
