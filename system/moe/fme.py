"""Feature Modulated Experts (MoFME: Zhang et al., AAAI'24, arXiv 2312.16610, sec. "Feature Modulated Expert").

One shared SwiGLU block is computed once per token; expert i is a feature-wise linear modulation
(FiLM: a per-feature scale and shift, Perez et al. 2018) of that block's hidden features. With
``(a, b) = (x W1, x W3)`` the shared block's two input projections (``[T, f]`` each):

    z_i   = (1 + s_i) * a + t_i                       # "vector" modulation (2f parameters per expert)
    z_i   = (1 + s_i) * a + t_i + (a D_i) U_i         # "lowrank": + a rank-r linear map (2f + 2fr)
    e_i(x) = W2 (silu(z_i) * b)

``s_i`` (``scale``), ``t_i`` (``shift``), ``D_i`` (``down``, ``[f, r]``) and ``U_i`` (``up``, ``[r, f]``)
are expert i's parameters; ``W1``, ``W3``, ``W2`` are shared. The MoE output of a token routed to
experts ``j = 1..k`` with weights ``w_j`` is

    y = sum_j w_j e_j(x) = W2 ((sum_j w_j silu(z_j)) * b)

because ``W2`` and the product with ``b`` are linear and shared: the weighted sum is taken in the
hidden space and ``W2`` runs once per token. So per token: one dense SwiGLU (``3 d f`` MACs), plus
``k`` modulations (``O(k f)`` element-wise, ``+ 2 k f r`` MACs for ``lowrank``), against ``k`` SwiGLU
experts (``3 k d f`` MACs) for FFN experts; and ``2f (+2fr)`` parameters per expert instead of ``3 d f``.

Choices and where they depart from the paper:

- Placement: the modulation acts on the shared block's gate pre-activation ``a`` (inside the
  expert, before the non-linearity), the paper's "modulate the hidden features of the shared
  expert". Applied after the non-linearity (or on the block's output) the k modulations of a token
  would collapse to one token-wise affine map; before it, the experts stay distinct non-linear
  functions.
- Sparse: only the top-k modulations of each token are computed (tokens grouped by expert, as for
  FFN experts). The paper's released code runs every expert densely; we do not.
- Parametrisation ``1 + s_i`` (identity at ``s_i = 0``), so weight decay pulls an expert towards the
  shared block rather than towards zero.
- Expert parallelism: ``a`` is computed before dispatch (the shared block runs once per token, the
  paper's cost argument) and ``silu(z_i)`` comes back, so the all-to-all moves ``f``-wide rows
  instead of ``d``-wide ones; ``b`` never leaves the token's rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from system.moe.experts import ExpertKind, ExpertModule, expert_kernel, grouped_matmul
from system.moe.fme_kernel import fme_modulate, fme_modulate_reference

MODULATIONS = ("vector", "lowrank")


@dataclass(frozen=True)
class FMEKind(ExpertKind):
    """Feature-modulation experts over ``f``-wide shared features: ``scale [f]``, ``shift [f]``
    (and ``down [f, r]``, ``up [r, f]`` for ``lowrank``) per expert; rows in and out are ``f`` wide.

    Raises:
        ValueError: an unknown ``modulation`` or a rank < 1 for ``lowrank``.
    """

    hidden_dim: int
    modulation: str = "vector"
    rank: int = 0
    grouped_mm: str = "auto"

    def __post_init__(self) -> None:
        if self.modulation not in MODULATIONS:
            raise ValueError(f"FME modulation must be one of {MODULATIONS}, got {self.modulation!r}")
        if self.modulation == "lowrank" and self.rank < 1:
            raise ValueError(f"FME 'lowrank' modulation needs rank >= 1, got {self.rank}")

    @property
    def layout(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        f, r = self.hidden_dim, self.rank
        base = (("scale", (f,)), ("shift", (f,)))
        return base + ((("down", (f, r)), ("up", (r, f))) if self.modulation == "lowrank" else ())

    @property
    def in_features(self) -> int:
        return self.hidden_dim

    @property
    def out_features(self) -> int:
        return self.hidden_dim

    def compute(self, x: torch.Tensor, counts: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """``silu(z_g)`` of the shared gate features ``x`` (``a`` rows ``[M, f]``) grouped by expert.

        Args:
            x: ``[M, f]`` rows sorted by expert.
            counts: ``[G]`` int64 rows per expert (sums to M), on ``x``'s device or the host.
            weights: ``scale``/``shift`` ``[G, f]`` (and ``down`` ``[G, f, r]``, ``up`` ``[G, r, f]``).

        Returns:
            ``[M, f]``. Differentiable in ``x`` and every weight; empty rows give an empty output
            that is still connected to them (zero gradients), so a collective backward never skips.
            On CPU the element-wise part is the fused, chunked :func:`~system.moe.fme_kernel.fme_modulate`
            (page-fault- and cache-friendly); elsewhere plain vectorised ops.
        """
        # Host counts (what the EP and FSSDP dispatchers hand over) stay on the host: the kernels read
        # them there or upload them without a sync; only a list is turned into a tensor.
        counts_t = counts.long() if isinstance(counts, torch.Tensor) else torch.as_tensor(counts, dtype=torch.long)
        extra = None
        if self.modulation == "lowrank":
            use = expert_kernel(x.device, x.dtype, self.grouped_mm) == "grouped_mm"
            extra = grouped_matmul(grouped_matmul(x, weights["down"], counts_t, use), weights["up"], counts_t, use)
        modulate = fme_modulate if x.device.type == "cpu" else fme_modulate_reference
        return modulate(x, weights["scale"], weights["shift"], counts_t, extra)


class FeatureModulatedExperts(ExpertModule):
    """``E_local`` feature-modulation experts (the sharded part of a MoFME layer), see the module docstring.

    Parameters: ``scale`` and ``shift`` ``[E_local, f]``; for ``lowrank`` also ``down``
    ``[E_local, f, r]`` and ``up`` ``[E_local, r, f]``. The shared block is a dense module of the layer
    (:attr:`system.moe.layer.MoELayer.fme_shared`), not part of this one.

    Args:
        num_experts: experts held by this module (``E_local``).
        hidden_dim: f, the width of the shared block's hidden features.
        modulation: ``"vector"`` or ``"lowrank"``.
        rank: r of the low-rank map (``lowrank`` only).
        grouped_mm: kernel of the low-rank products (see :func:`system.moe.experts.expert_kernel`).
        num_global_experts: experts in the layer over all ranks (default ``num_experts``).
        expert_offset: global index of this module's first expert (default 0).

    Raises:
        ValueError: an unknown modulation or a rank < 1 for ``lowrank``.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        modulation: str = "vector",
        rank: int = 0,
        grouped_mm: str = "auto",
        num_global_experts: int | None = None,
        expert_offset: int = 0,
    ):
        super().__init__(num_global_experts or num_experts, expert_offset)
        self._kind = FMEKind(hidden_dim, modulation, rank if modulation == "lowrank" else 0, grouped_mm)
        for name, shape in self._kind.layout:
            setattr(self, name, nn.Parameter(torch.empty(num_experts, *shape)))

    def kind(self) -> FMEKind:  # noqa: D102
        return self._kind

    def init_weights(self, std: float) -> None:
        """``scale``, ``shift`` and ``down`` ~ N(0, std) (truncated); ``up`` = 0 (the low-rank map starts at 0).

        Small random scales and shifts make the experts differ from the start, so tokens routed to
        different experts pull them apart; with ``s = t = 0`` every expert equals the shared block.
        """
        for name, _ in self._kind.layout:
            p = getattr(self, name)
            if name == "up":
                nn.init.zeros_(p)
            else:
                nn.init.trunc_normal_(p, std=std)

    def extra_repr(self) -> str:
        k = self._kind
        rank = f", rank={k.rank}" if k.modulation == "lowrank" else ""
        experts = f"{self.num_local_experts}/{self.num_global_experts}"
        return f"experts={experts}, hidden={k.hidden_dim}, {k.modulation}{rank}"
