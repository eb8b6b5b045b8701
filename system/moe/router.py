"""Top-k gating with the auxiliary load-balancing loss and the router z-loss.

- Top-k softmax gating: Shazeer et al. 2017; GShard (Lepikhin et al. 2020, sec. 2.2).
- Auxiliary load-balancing loss ``E * sum_e f_e * P_e``: Switch Transformer (Fedus et al. 2021,
  eq. 4-6), generalised to top-k as in GShard / Megatron-Core.
- Router z-loss ``mean(logsumexp(logits)^2)``: ST-MoE (Zoph et al. 2022, sec. 3.5).
- Uncertainty-aware router (MoFME, Zhang et al., AAAI'24, arXiv 2312.16610): Monte Carlo dropout
  passes of the gate, top-k on their mean, weights calibrated by their spread
  (:class:`UncertaintyRouter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RouterOutput:
    """One routing decision for ``T`` tokens.

    Attributes:
        indices: ``[T, k]`` int64 expert ids (global numbering ``0..E-1``).
        weights: ``[T, k]`` float32 combine weights.
        scores: ``[T, E]`` float32 router scores (softmax probabilities or sigmoid scores).
        logits: ``[T, E]`` float32 raw router logits.
        uncertainty: ``[T, E]`` float32 standard deviation of the scores over the stochastic passes
            of an :class:`UncertaintyRouter` in training; ``None`` for a deterministic routing.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor
    uncertainty: torch.Tensor | None = None


class TopKRouter(nn.Module):
    """Linear router ``d -> E`` followed by top-k selection, computed in float32.

    ``forced_indices`` (``[T, k]`` int64, or ``None``) overrides the choice for the next forward
    passes while keeping the router's weights for the chosen experts: the forced-routing knob used
    by benchmarks so that every system sees identical assignments.

    Args:
        dim: model width d.
        num_experts: E.
        top_k: k experts per token.
        score_func: ``"softmax"`` or ``"sigmoid"``.
        norm_topk_prob: renormalise the k weights of each token to sum to 1.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, score_func: str = "softmax", norm_topk_prob: bool = True):
        super().__init__()
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.norm_topk_prob = norm_topk_prob
        self.forced_indices: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route ``x`` of shape ``[T, d]``; see :class:`RouterOutput`."""
        logits = F.linear(x.float(), self.gate.weight.float())
        scores = self._score(logits)
        indices, weights = self._select(scores)
        return RouterOutput(indices=indices, weights=self._normalise(weights), scores=scores, logits=logits)

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1) if self.score_func == "softmax" else torch.sigmoid(logits)

    def _select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [T, k], their scores [T, k])``: the top-k of ``scores`` ``[T, E]``, or the forced choice."""
        if self.forced_indices is None:
            weights, indices = torch.topk(scores, self.top_k, dim=-1)
            return indices, weights
        indices = self.forced_indices.to(device=scores.device, dtype=torch.int64)
        if indices.shape != (scores.shape[0], self.top_k):
            raise ValueError(
                f"forced_indices has shape {tuple(indices.shape)}, expected ({scores.shape[0]}, {self.top_k})"
            )
        return indices, scores.gather(1, indices)

    def _normalise(self, weights: torch.Tensor) -> torch.Tensor:
        if self.norm_topk_prob and self.top_k > 1:
            return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return weights


class UncertaintyRouter(TopKRouter):
    """Uncertainty-aware router (MoFME, arXiv 2312.16610, sec. "Uncertainty-aware Router").

    In training, with dropout ``p > 0``, the gate runs ``M`` times on independently dropped-out
    inputs (Monte Carlo dropout, Gal & Ghahramani 2016), all in float32::

        l_m = W_g dropout_m(x),  s_m = softmax(l_m) (or sigmoid),           m = 1..M
        mu  = mean_m s_m,  var = mean_m (s_m - mu)^2                        # per expert (diagonal)
        I   = top-k of mu                                                   # or forced_indices
        c_e = 1 / (1 + alpha * var_e / mu_e^2)                              # e in I
        w~_e = mu_e * c_e;  w_e = w~_e * (sum_I mu) / (sum_I w~)            # re-normalised to mu's mass
        w   = w / sum_I w   when norm_topk_prob and k > 1                   # as the plain router

    ``sigma_e / mu_e`` is the spread of expert e's score over the passes in units of its mean (its
    whitened deviation): a routing decision the dropout passes disagree on is down-weighted against
    the token's other chosen experts, and the router is trained through ``mu`` and ``var`` to make
    confident decisions. The load-balancing loss reads ``scores = mu``, the z-loss the mean logits
    ``mean_m l_m``. In evaluation (``module.eval()``), or with ``p = 0``, the router is exactly
    :class:`TopKRouter` (dropout off makes every pass the deterministic one: ``var = 0``, ``c = 1``,
    ``mu = s``; that case is computed as one pass). With ``k = 1`` the re-normalisation gives
    ``w = mu``: the calibration only shifts weight between a token's chosen experts.

    Departures from the paper: it re-weights the experts' outputs by the estimated uncertainty but
    does not fix a formula for sparse top-k routing; the one above (re-scaling of the chosen mean
    weights by ``1 / (1 + alpha * (sigma/mu)^2)`` and re-normalisation) is ours, chosen so that
    weights stay finite, non-negative and sum to 1 and so that ``p = 0`` or ``alpha = 0`` gives back
    the plain mean router. Dropout is applied to the router's input (the gate is one linear map).

    Args:
        dim, num_experts, top_k, score_func, norm_topk_prob: as :class:`TopKRouter`.
        dropout: p, dropout probability of the router input in training, in ``[0, 1)``.
        passes: M >= 1 stochastic passes.
        scale: alpha >= 0, strength of the calibration (0: weights are the MC mean scores).

    Raises:
        ValueError: a value out of range (named).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, score_func: str = "softmax",
                 norm_topk_prob: bool = True, dropout: float = 0.1, passes: int = 4, scale: float = 1.0):
        super().__init__(dim, num_experts, top_k, score_func, norm_topk_prob)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"router dropout must be in [0, 1), got {dropout}")
        if passes < 1:
            raise ValueError(f"router passes M must be >= 1, got {passes}")
        if scale < 0:
            raise ValueError(f"router uncertainty scale must be >= 0, got {scale}")
        self.dropout, self.passes, self.scale = dropout, passes, scale

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route ``x`` ``[T, d]``: Monte Carlo passes in training with dropout, else the plain router."""
        if not self.training or self.dropout == 0.0:
            return super().forward(x)
        xf = x.float()
        dropped = F.dropout(xf.unsqueeze(0).expand(self.passes, *xf.shape), self.dropout, training=True)
        logits = torch.matmul(dropped, self.gate.weight.float().t())  # [M, T, E]
        mu, var = mc_moments(self._score(logits))
        mean_logits, _ = mc_moments(logits)
        indices, chosen_mu = self._select(mu)
        weights = uncertainty_weights(chosen_mu, var.gather(1, indices), self.scale)
        return RouterOutput(indices=indices, weights=self._normalise(weights), scores=mu, logits=mean_logits,
                            uncertainty=var.detach().sqrt())

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, passes={self.passes}, scale={self.scale}"


def mc_moments(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance over the leading axis of ``samples`` ``[M, ...]``.

    The mean is computed as ``s_0 + mean_m (s_m - s_0)``: identical samples give back ``s_0``
    bit-exactly and a variance of exactly 0.
    """
    first = samples[0]
    mean = first + (samples - first).mean(dim=0)
    var = (samples - mean).square().mean(dim=0)
    return mean, var


def uncertainty_weights(mu: torch.Tensor, var: torch.Tensor, scale: float) -> torch.Tensor:
    """Calibrated weights of the chosen experts (see :class:`UncertaintyRouter`).

    Args:
        mu: ``[T, k]`` mean scores of the chosen experts (>= 0).
        var: ``[T, k]`` their variance over the passes (>= 0).
        scale: alpha >= 0.

    Returns:
        ``[T, k]`` finite, non-negative weights with the row sums of ``mu``; ``mu`` itself
        (bit-exactly) where ``var = 0`` or ``scale = 0``. Gradients stay finite for saturated scores
        (``mu`` underflowing to 0): ``c = 1 / (1 + a var / mu^2)`` is evaluated as the bounded
        ``1 - a var / (mu^2 + a var)``.
    """
    if scale == 0.0:
        return mu
    tiny = torch.finfo(mu.dtype).tiny
    spread = scale * var
    calibrated = mu * (1.0 - spread / (mu.square() + spread).clamp_min(tiny))
    return calibrated * (mu.sum(dim=-1, keepdim=True) / calibrated.sum(dim=-1, keepdim=True).clamp_min(tiny))


def build_router(dim: int, cfg) -> TopKRouter:
    """The router ``cfg.router`` (a :class:`~system.config.moe.MoEConfig`) asks for.

    Raises:
        ValueError: an unknown ``cfg.router``.
    """
    common = (dim, cfg.num_experts, cfg.top_k, cfg.score_func, cfg.norm_topk_prob)
    if cfg.router == "topk":
        return TopKRouter(*common)
    if cfg.router == "uncertainty":
        return UncertaintyRouter(*common, dropout=cfg.router_dropout, passes=cfg.router_passes,
                                 scale=cfg.router_uncertainty_scale)
    raise ValueError(f"moe.router must be 'topk' or 'uncertainty', got {cfg.router!r}")


def load_balancing_loss(scores: torch.Tensor, global_counts: torch.Tensor, global_tokens: int, top_k: int) -> torch.Tensor:
    """Auxiliary load-balancing loss ``E * sum_e f_e * P_e`` (Switch Transformer eq. 4).

    ``f_e`` is the fraction of the ``global_tokens * top_k`` assignments that went to expert e,
    counted over the whole global micro-batch (all ranks, a constant); ``P_e`` is the mean router
    score of this rank's tokens. Averaging this loss over ranks (as data-parallel gradient averaging
    does) gives exactly the loss of the global batch: the same value and gradient as one process
    holding every rank's tokens. Equals 1 under perfectly uniform routing.

    Args:
        scores: ``[T, E]`` router scores of the local tokens (differentiable).
        global_counts: ``[E]`` float assignments per expert over all ranks (not differentiable).
        global_tokens: tokens over all ranks.
        top_k: k.
    """
    num_experts = scores.shape[-1]
    f = global_counts.detach().float() / float(max(global_tokens * top_k, 1))
    p = scores.float().mean(dim=0)
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_e logits[t, e])^2`` for ``logits`` ``[T, E]``."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
