"""Models: the reference MoE decoder and the function that parallelises it."""

from system.models.model import MoETransformer

__all__ = ["MoETransformer"]
