"""Inference: KV-cached batched generation, resident or ring-offloaded (SE-MoE, arXiv 2205.10034, sec. 3.3.2).

- :mod:`~system.inference.engine`: :class:`OffloadEngine` and :func:`generate` (the ``moesys generate`` path).
- :mod:`~system.inference.loop`, :mod:`~system.inference.decoder`, :mod:`~system.inference.kv_cache`,
  :mod:`~system.inference.sampling`: the decode loop, the cached forward pass, the cache, token choice.
- :mod:`~system.inference.sections`, :mod:`~system.inference.mmap_file`, :mod:`~system.inference.plan`:
  resident weights vs streamed sections, the mmap'd host tier, the checked memory plan.
- :mod:`~system.inference.ring`, :mod:`~system.inference.transport`, :mod:`~system.inference.expert_cache`:
  the K-slot ring and its scheduler, the CPU-thread and CUDA-stream transports, expert-granular streaming.
- :func:`greedy_generate`: the plain loop without a cache (used by the trainer's samples).
"""

# The submodule ``generate`` (the cache-less loop) is imported first: the package attribute
# ``generate`` must end up as the engine's function, not that module.
from system.inference.generate import greedy_generate  # noqa: I001
from system.inference.engine import GenerationOutput, OffloadEngine, generate, load_job_config
from system.inference.loop import GenerationStats, generate_batch
from system.inference.plan import MemoryPlan, PlanError, parse_bytes
from system.inference.ring import EventLog, RingScheduler, SlotRing, StaleSlotError
from system.inference.sampling import Sampler, SamplingConfig
from system.inference.transport import CudaTransport, Link, ThreadTransport

__all__ = [
    "CudaTransport",
    "EventLog",
    "GenerationOutput",
    "GenerationStats",
    "Link",
    "MemoryPlan",
    "OffloadEngine",
    "PlanError",
    "RingScheduler",
    "Sampler",
    "SamplingConfig",
    "SlotRing",
    "StaleSlotError",
    "ThreadTransport",
    "generate",
    "generate_batch",
    "greedy_generate",
    "load_job_config",
    "parse_bytes",
]
