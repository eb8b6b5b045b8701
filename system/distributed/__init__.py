"""Parallel degrees, DeviceMesh construction and process-group initialisation."""

from system.distributed.init import init_distributed, pick_backend, pick_device, shutdown_distributed
from system.distributed.parallel_dims import ParallelDims

__all__ = ["ParallelDims", "init_distributed", "pick_backend", "pick_device", "shutdown_distributed"]
