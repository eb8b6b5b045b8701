"""``training.deterministic``: bit-reproducible training, on CUDA and on CPU.

Some kernels sum floats in an order that varies from run to run, so the last bits of the gradients,
and from there of the losses, may differ between two identical runs (or a run and its resume): on
CUDA, atomic additions (the MoE combine's ``index_add`` from top-3 on, attention backward) and
cuBLAS's split-K reductions; on CPU, the backward of a gather with repeated indices such as the MoE
layer's ``rows[token_of]`` (``index_put_`` with ``accumulate=True``), which PyTorch runs with parallel
atomic adds when there are several threads and at least 32768 elements (measured: the input gradient
of a top-3 layer then differs in the last bit between calls). The differences are rounding-sized
(equivalence tests hold to 1e-5) but not zero. ``training.deterministic = true``
(default false, as TorchTitan's ``debug.deterministic``, because some kernels get slower) makes runs
reproducible on the same hardware and software:

- :func:`enable_deterministic_algorithms`: ``torch.use_deterministic_algorithms(True)`` (PyTorch picks
  deterministic kernels, serial ones for those CPU accumulations, and raises on an operation that has
  none), ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (required by cuBLAS for deterministic GEMMs) and no cuDNN
  autotuning;
- :func:`set_moe_deterministic`: every :class:`~system.moe.layer.MoELayer` sums each token's expert rows
  in a fixed order on CUDA (:func:`~system.moe.layer.combine_by_token`) rather than by atomics.

The trainer calls both when the key is set: the first before any CUDA matmul (cuBLAS reads its
workspace configuration once per process), the second once the model is built.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from system.moe.layer import MoELayer

logger = logging.getLogger(__name__)

CUBLAS_WORKSPACE_CONFIG = ":4096:8"
"""cuBLAS workspace setting that makes its GEMMs deterministic (CUDA >= 10.2; PyTorch's reproducibility notes)."""


def enable_deterministic_algorithms() -> None:
    """Make PyTorch pick deterministic kernels, process-wide (call before the first CUDA matmul).

    Sets ``CUBLAS_WORKSPACE_CONFIG`` unless it already holds one of cuBLAS's deterministic settings
    (``:4096:8`` or ``:16:8``), turns off cuDNN autotuning and calls
    ``torch.use_deterministic_algorithms(True)``: from then on an operation with no deterministic
    CUDA kernel raises ``RuntimeError`` naming it instead of running nondeterministically.
    """
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)
    logger.info("deterministic algorithms on (CUBLAS_WORKSPACE_CONFIG=%s)", os.environ["CUBLAS_WORKSPACE_CONFIG"])


def set_moe_deterministic(model: nn.Module, enabled: bool) -> int:
    """Set :attr:`~system.moe.layer.MoELayer.deterministic` on every MoE layer of ``model``.

    Returns:
        The number of MoE layers set.
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        layer.deterministic = enabled
    return len(layers)
