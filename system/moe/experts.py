"""SwiGLU experts stored with a leading expert axis and computed with a grouped matmul.

Each weight is one parameter of shape ``[E_local, ...]``: ``w1``/``w3`` ``[E_local, d, f]`` and
``w2`` ``[E_local, f, d]``. The module records which slice of the layer's global expert axis
``[E, ...]`` it holds (``expert_offset``, ``num_global_experts``), so that saving and loading can
use global expert indices whatever the expert-parallel degree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from system.moe.swiglu import swiglu_experts


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (``_grouped_mm`` needs it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad.contiguous()


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` can run for this device and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    return False


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool) -> torch.Tensor:
    """Per-group matmul: rows of group g multiply ``w[g]``.

    Args:
        x: ``[M, a]`` rows sorted by group.
        w: ``[G, a, b]``.
        counts: ``[G]`` int rows per group (sum M).
        use_grouped_mm: use ``torch._grouped_mm`` (one kernel); else an exact per-group loop. With no
            rows the loop is used: it keeps the (empty) output connected to ``x`` and ``w`` in autograd.

    Returns:
        ``[M, b]``.
    """
    if use_grouped_mm and x.shape[0] > 0:
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offs))
    chunks = x.split(counts.tolist(), dim=0)
    return torch.cat([c @ w[g] for g, c in enumerate(chunks)], dim=0)


def expert_kernel(device: torch.device, dtype: torch.dtype, mode: str = "auto") -> str:
    """Which kernel :func:`expert_swiglu` uses: ``"grouped_mm"`` or ``"chunked"`` (see there).

    Raises:
        RuntimeError: ``mode="on"`` where ``torch._grouped_mm`` cannot run for this device/dtype.
    """
    available = grouped_mm_available(device, dtype)
    if mode == "on" and not available:
        raise RuntimeError(f"moe.grouped_mm='on' but torch._grouped_mm cannot run on {device} / {dtype}")
    use = mode == "on" or (mode == "auto" and available and device.type != "cpu")
    return "grouped_mm" if use else "chunked"


def expert_swiglu(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, counts: torch.Tensor, mode: str = "auto"
) -> torch.Tensor:
    """SwiGLU experts ``(silu(x W1[g]) * (x W3[g])) W2[g]`` on rows sorted by expert.

    Args:
        x: ``[M, d]`` rows sorted by expert; ``w1``/``w3`` ``[G, d, f]``, ``w2`` ``[G, f, d]``.
        counts: ``[G]`` int64 rows per expert (sums to M).
        mode: ``"on"``: ``torch._grouped_mm`` (one kernel per projection); ``"off"``: the fused,
            chunked exact kernel :func:`system.moe.swiglu.swiglu_experts`; ``"auto"``: grouped_mm on
            CUDA where it runs, the chunked kernel on CPU (faster there: it keeps the ``[rows, f]``
            intermediates cache-sized, see that module) and wherever grouped_mm is unavailable.

    Returns:
        ``[M, d]``.

    Raises:
        RuntimeError: ``mode="on"`` where ``torch._grouped_mm`` cannot run for this device/dtype.
    """
    use = expert_kernel(x.device, x.dtype, mode) == "grouped_mm"
    # With no rows the chunked kernel still connects the (empty) output to x and the weights, so the
    # backward all-to-all runs on every rank of the EP group (a collective must not be skipped).
    if use and x.shape[0] > 0:
        h = F.silu(grouped_matmul(x, w1, counts, True)) * grouped_matmul(x, w3, counts, True)
        return grouped_matmul(h, w2, counts, True)
    return swiglu_experts(x, w1, w2, w3, counts)


class GroupedExperts(nn.Module):
    """``E_local`` SwiGLU experts ``y = (silu(x W1) * (x W3)) W2`` over rows grouped by expert.

    Args:
        num_experts: experts held by this module (``E_local``).
        dim: model width d.
        hidden_dim: expert hidden size f.
        grouped_mm: ``"auto"`` (use ``torch._grouped_mm`` where it is available), ``"on"`` or ``"off"``.
        num_global_experts: experts in the layer over all ranks (default ``num_experts``).
        expert_offset: global index of this module's first expert (default 0).
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        grouped_mm: str = "auto",
        num_global_experts: int | None = None,
        expert_offset: int = 0,
    ):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.grouped_mm = grouped_mm
        self.num_global_experts = num_global_experts or num_experts
        self.expert_offset = expert_offset

    @property
    def num_local_experts(self) -> int:
        return self.w1.shape[0]

    def init_weights(self, std: float, out_std: float) -> None:
        """Normal init: ``w1``/``w3`` with ``std``, the output projection ``w2`` with ``out_std``."""
        nn.init.trunc_normal_(self.w1, std=std)
        nn.init.trunc_normal_(self.w3, std=std)
        nn.init.trunc_normal_(self.w2, std=out_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply expert g to its rows.

        Args:
            x: ``[M, d]`` tokens sorted by local expert.
            counts: ``[E_local]`` int64 tokens per local expert (sums to M).

        Returns:
            ``[M, d]`` expert outputs, same order as ``x``.
        """
        w1, w2, w3 = self.w1, self.w2, self.w3
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w1, w2, w3 = x.to(dtype), w1.to(dtype), w2.to(dtype), w3.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return expert_swiglu(x, w1, w2, w3, counts, self.grouped_mm)


class FeedForward(nn.Module):
    """Dense SwiGLU FFN ``[..., d] -> [..., d]`` (dense blocks and shared experts)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        """Normal init of the input projections with ``std`` and the output one with ``out_std``."""
        nn.init.trunc_normal_(self.w1.weight, std=std)
        nn.init.trunc_normal_(self.w3.weight, std=std)
        nn.init.trunc_normal_(self.w2.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def expert_init_std(std: float, n_layers: int) -> float:
    """Output-projection std scaled by ``1/sqrt(2 * n_layers)`` (GPT-2 style residual scaling)."""
    return std / math.sqrt(2 * n_layers)
