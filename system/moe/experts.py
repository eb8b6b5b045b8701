"""Experts stored with a leading expert axis: the shared contract, and the SwiGLU experts.

Every expert module (:class:`ExpertModule`) holds parameters of shape ``[E_local, ...]`` only, one
row per expert, and records which slice of the layer's global expert axis ``[E, ...]`` it holds
(``expert_offset``, ``num_global_experts``). Its :class:`ExpertKind` describes one expert's
parameters (names and per-expert shapes, in flat-row order) and computes experts from given
weights. That is all the parallelisms and checkpoints rely on: expert parallelism slices every
parameter by expert rows, FSSDP flattens one expert per row of its owned buffer and computes on
gathered rows, checkpoints place each parameter at ``expert_offset`` on the global axis. Expert
types: :class:`GroupedExperts` (SwiGLU FFN experts, here) and
:class:`~system.moe.fme.FeatureModulatedExperts` (MoFME).

SwiGLU experts: ``w1``/``w3`` ``[E_local, d, f]`` and ``w2`` ``[E_local, f, d]``, computed with a
grouped matmul (CUDA, bf16) or the chunked exact kernel (CPU, and other dtypes on CUDA).

Which kernel (:func:`expert_kernel`). ``torch._grouped_mm`` (torch 2.11 to 2.13) has one fused kernel,
CUTLASS, for bf16 on compute capability 9.x and 10.x (Hopper, datacenter Blackwell), with no host
synchronisation. It also accepts fp32 and fp16 on CUDA, but runs them through
``_grouped_mm_fallback``: it copies the offsets to the host (a synchronisation per call, three per
SwiGLU forward and more in backward) and loops over the groups with one ``mm`` each. The chunked
kernel does the same per-expert GEMMs with one synchronisation (``counts.tolist()``, none when the
dispatcher hands host counts) and a hand-written backward, so ``auto`` sends fp32 inference and
training there on a GPU (one chunk per expert: :func:`~system.moe.swiglu.chunk_bytes_for`), and
``torch._grouped_mm`` only where it is fused. ``on`` forces ``torch._grouped_mm`` wherever it accepts
the dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from system.moe.dispatch import to_device_async
from system.moe.swiglu import chunk_bytes_for, swiglu_experts, swiglu_experts_flat


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (``_grouped_mm`` needs it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad.contiguous()


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` accepts this device and dtype (CPU: fp32, bf16; CUDA: bf16, fp16,
    fp32, fused or through its per-group fallback: see :func:`grouped_mm_fused`)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return dtype in (torch.bfloat16, torch.float16, torch.float32)
    return False


def grouped_mm_fused(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs its fused CUDA kernel here: bf16 on compute capability 9.x
    or 10.x (torch 2.11-2.13 ``_grouped_mm_cuda``); elsewhere it loops over groups after a host sync."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def _cuda_grouped_mm_aligned(*mats: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` on CUDA accepts ``mats`` as given: each matrix row-major or
    column-major (a unit stride in one of the last two axes: Hugging Face experts are served as the
    transposed view of their stored ``[f, d]`` bytes, as TorchTitan passes ``w.transpose(-2, -1)``),
    a 16-byte aligned data pointer and every other stride a multiple of 16 bytes (e.g. a bf16 SwiGLU
    hidden size or FME rank not a multiple of 8 fails)."""
    for m in mats:
        size = m.element_size()
        strides = list(m.stride())
        unit = -1 if strides[-1] == 1 else -2 if m.dim() >= 2 and strides[-2] == 1 else None
        if unit is None or m.data_ptr() % 16:
            return False
        if any(s * size % 16 for i, s in enumerate(strides) if i != m.dim() + unit):
            return False
    return True


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool) -> torch.Tensor:
    """Per-group matmul: rows of group g multiply ``w[g]``.

    Args:
        x: ``[M, a]`` rows sorted by group.
        w: ``[G, a, b]``.
        counts: ``[G]`` int rows per group (sum M), on ``x``'s device or the host (then the offsets
            are uploaded without a host sync).
        use_grouped_mm: use ``torch._grouped_mm`` (one kernel); else an exact per-group loop. With no
            rows the loop is used: it keeps the (empty) output connected to ``x`` and ``w`` in autograd.

    Returns:
        ``[M, b]``.
    """
    if use_grouped_mm and x.is_cuda and not _cuda_grouped_mm_aligned(x, w):
        use_grouped_mm = False  # the CUDA kernel rejects these strides/pointers: use the exact loop
    if use_grouped_mm and x.shape[0] > 0:
        offs = to_device_async(torch.cumsum(counts, dim=0, dtype=torch.int32), x.device)
        return _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offs))
    chunks = x.split(counts.tolist(), dim=0)
    return torch.cat([c @ w[g] for g, c in enumerate(chunks)], dim=0)


def expert_kernel(device: torch.device, dtype: torch.dtype, mode: str = "auto") -> str:
    """Which kernel :func:`expert_swiglu` uses: ``"grouped_mm"`` or ``"chunked"`` (see there and the
    module docstring): ``auto`` picks ``torch._grouped_mm`` only where it is fused (:func:`grouped_mm_fused`).

    Raises:
        RuntimeError: ``mode="on"`` where ``torch._grouped_mm`` cannot run for this device/dtype.
    """
    if mode == "on" and not grouped_mm_available(device, dtype):
        raise RuntimeError(f"moe.grouped_mm='on' but torch._grouped_mm cannot run on {device} / {dtype}")
    use = mode == "on" or (mode == "auto" and grouped_mm_fused(device, dtype))
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
            CUDA where it is fused (bf16, compute capability 9.x/10.x), the chunked kernel on CPU
            (faster there: it keeps the ``[rows, f]`` intermediates cache-sized, see that module) and
            elsewhere on CUDA (one chunk per expert there).

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
    return swiglu_experts(x, w1, w2, w3, counts, chunk_bytes=chunk_bytes_for(x.device))


class ExpertKind:
    """What one expert of a type is: its parameters and how experts are computed from them.

    Subclasses are small frozen dataclasses (no tensors), so FSSDP can keep one without keeping the
    full expert weights alive. ``layout`` lists ``(name, per-expert shape)`` in flat-row order: a
    flat row ``[P]`` is the concatenation of the flattened per-expert tensors in that order.

    Attributes (properties of subclasses):
        layout: ``((name, shape), ...)``; the module's parameters are ``name: [E_local, *shape]``.
        in_features: width of the rows the experts read.
        out_features: width of the rows the experts return.
    """

    layout: tuple[tuple[str, tuple[int, ...]], ...]
    in_features: int
    out_features: int

    @property
    def numel(self) -> int:
        """P: parameters of one expert (the width of a flat row)."""
        return sum(math.prod(shape) for _, shape in self.layout)

    def flatten(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{name: [n, *shape]}`` -> flat rows ``[n, P]`` (a copy).

        Raises:
            KeyError: a tensor of the layout is missing.
        """
        return torch.cat([weights[name].reshape(weights[name].shape[0], -1) for name, _ in self.layout], dim=1)

    def unflatten(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat rows ``[n, P]`` -> ``{name: view [n, *shape]}`` in layout order.

        Raises:
            ValueError: ``rows`` is not ``[n, P]``.
        """
        if rows.dim() != 2 or rows.shape[1] != self.numel:
            raise ValueError(f"expert rows must be [n, {self.numel}], got {list(rows.shape)}")
        out, start, n = {}, 0, rows.shape[0]
        for name, shape in self.layout:
            width = math.prod(shape)
            out[name] = rows[:, start : start + width].view(n, *shape)
            start += width
        return out

    def compute(self, x: torch.Tensor, counts: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Experts on rows grouped by expert: ``x`` ``[M, in]``, ``counts`` ``[G]`` (sum M),
        ``weights`` ``{name: [G, *shape]}`` -> ``[M, out]``. Autocast is off; inputs share one dtype."""
        raise NotImplementedError

    def compute_flat(self, x: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`compute` with the weights as flat rows ``[G, P]`` (FSSDP's gathered buffer)."""
        return self.compute(x, counts, self.unflatten(rows))


def autocast_inputs(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cast ``x`` and ``tensors`` to the autocast dtype when autocast is on (experts then run with it off)."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, tensors
    dtype = torch.get_autocast_dtype(x.device.type)
    return x.to(dtype), {k: v.to(dtype) for k, v in tensors.items()}


class ExpertModule(nn.Module):
    """Base of the expert modules of a MoE layer: parameters ``[E_local, ...]`` on a global expert axis.

    Subclasses register their expert parameters directly on themselves (no submodules, no other
    parameters) with the names and per-expert shapes of their :meth:`kind`'s layout; everything
    else (EP slicing, FSSDP flattening, gradient classification, checkpoints) is generic.

    Args:
        num_global_experts: experts in the layer over all ranks.
        expert_offset: global index of this module's first expert.
    """

    def __init__(self, num_global_experts: int, expert_offset: int = 0):
        super().__init__()
        self.num_global_experts = num_global_experts
        self.expert_offset = expert_offset

    def kind(self) -> ExpertKind:
        """The :class:`ExpertKind` of these experts."""
        raise NotImplementedError

    @property
    def num_local_experts(self) -> int:
        return next(iter(self._parameters.values())).shape[0]

    def expert_weights(self) -> dict[str, torch.Tensor]:
        """``{name: parameter [E_local, *shape]}`` in layout order."""
        return {name: getattr(self, name) for name, _ in self.kind().layout}

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply local expert g to its rows.

        Args:
            x: ``[M, in_features]`` rows sorted by local expert.
            counts: ``[E_local]`` int64 rows per local expert (sums to M).

        Returns:
            ``[M, out_features]``, same order as ``x`` (computed in the autocast dtype when autocast is on).
        """
        x, weights = autocast_inputs(x, self.expert_weights())
        with torch.autocast(x.device.type, enabled=False):
            return self.kind().compute(x, counts, weights)

    @torch.no_grad()
    def keep_experts_(self, lo: int, hi: int) -> None:
        """Keep global experts ``[lo, hi)`` only (new parameters, copies of those rows); sets ``expert_offset``.

        Raises:
            ValueError: the range is not inside the experts this module holds.
        """
        start = lo - self.expert_offset
        if not 0 <= start <= start + (hi - lo) <= self.num_local_experts:
            raise ValueError(f"experts [{lo}, {hi}) are not inside the held [{self.expert_offset}, "
                             f"{self.expert_offset + self.num_local_experts})")
        for name, p in list(self._parameters.items()):
            rows = p.detach()[start : start + hi - lo].clone()
            setattr(self, name, nn.Parameter(rows, requires_grad=p.requires_grad))
        self.expert_offset = lo


@dataclass(frozen=True)
class SwiGLUKind(ExpertKind):
    """SwiGLU FFN experts ``(silu(x W1) * (x W3)) W2``: ``w1 [d, f]``, ``w2 [f, d]``, ``w3 [d, f]`` per expert."""

    dim: int
    hidden_dim: int
    grouped_mm: str = "auto"

    @property
    def layout(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        d, f = self.dim, self.hidden_dim
        return (("w1", (d, f)), ("w2", (f, d)), ("w3", (d, f)))

    @property
    def in_features(self) -> int:
        return self.dim

    @property
    def out_features(self) -> int:
        return self.dim

    def compute(self, x: torch.Tensor, counts: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """:func:`expert_swiglu` of rows ``x`` ``[M, d]`` grouped by expert -> ``[M, d]``."""
        return expert_swiglu(x, weights["w1"], weights["w2"], weights["w3"], counts, self.grouped_mm)

    def compute_flat(self, x: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The fused flat-row kernel on CPU (one flat weight gradient), else :meth:`compute`."""
        if expert_kernel(x.device, x.dtype, self.grouped_mm) == "chunked":
            return swiglu_experts_flat(x, rows, self.dim, self.hidden_dim, counts,
                                       chunk_bytes=chunk_bytes_for(x.device))
        return self.compute(x, counts, self.unflatten(rows))


class GroupedExperts(ExpertModule):
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
        super().__init__(num_global_experts or num_experts, expert_offset)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.grouped_mm = grouped_mm

    def kind(self) -> SwiGLUKind:  # noqa: D102
        return SwiGLUKind(self.w1.shape[1], self.w1.shape[2], self.grouped_mm)

    def init_weights(self, std: float, out_std: float) -> None:
        """Normal init: ``w1``/``w3`` with ``std``, the output projection ``w2`` with ``out_std``."""
        nn.init.trunc_normal_(self.w1, std=std)
        nn.init.trunc_normal_(self.w3, std=std)
        nn.init.trunc_normal_(self.w2, std=out_std)


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
