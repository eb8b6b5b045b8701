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
    routing_trace: bool = field(
        default=False,
        metadata={"help": "Write <run_dir>/routing_trace.jsonl: per step, each MoE layer's global tokens per "
                  "expert (the input of benchmarks/expert_parallel_sim.py)."},
    )
