"""Inference: generation loops."""

from system.inference.generate import greedy_generate

__all__ = ["greedy_generate"]
