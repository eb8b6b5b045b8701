"""``[metrics]`` section: run directory, TensorBoard, JSONL."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MetricsConfig:
    """Where a run's records go."""

    run_dir: str = field(
        default="", metadata={"help": "Run directory; empty: runs/<config name>-<timestamp>."}
    )
    tensorboard: bool = field(default=True, metadata={"help": "Write TensorBoard events under <run_dir>/tb."})
    progress: bool = field(default=True, metadata={"help": "Rank-0 progress bar."})
