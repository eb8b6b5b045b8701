"""Top-k gating with the auxiliary load-balancing loss and the router z-loss.

- Top-k softmax gating: Shazeer et al. 2017; GShard (Lepikhin et al. 2020, sec. 2.2).
- Auxiliary load-balancing loss ``E * sum_e f_e * P_e``: Switch Transformer (Fedus et al. 2021,
  eq. 4-6), generalised to top-k as in GShard / Megatron-Core.
- Router z-loss ``mean(logsumexp(logits)^2)``: ST-MoE (Zoph et al. 2022, sec. 3.5).
- Auxiliary-loss-free balancing (DeepSeek-V3, arXiv 2412.19437, sec. 2.1.2, eq. 16): a per-expert
  bias added to the scores for top-k selection only (:attr:`TopKRouter.expert_bias`; its update is
  :func:`system.moe.balance.update_expert_bias`).
- Group-limited routing (DeepSeek-V3 sec. 2.1.2 / DeepSeek-V2 sec. 2.1.3 "device-limited routing"):
  experts in G contiguous groups, a group scored by the sum of its top-2 scores, each token picking
  its k experts from the best ``num_limited_groups`` groups (:func:`limit_groups`).
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

    For tokens ``x`` ``[T, d]``::

        s      = softmax(x W_g^T)  (or sigmoid)                        # [T, E] scores
        c      = s + b                    # with expert_bias b [E], else c = s (selection only)
        c      = limit_groups(c, G, M)    # when num_groups G > 1: experts outside the M best groups -inf
        I      = top-k of c                                            # [T, k], or forced_indices
        w      = s[I]                     # combine weights: the un-biased scores (DeepSeek-V3 eq. 16)
        w      = w / sum(w)               # norm_topk_prob and k > 1
        w      = route_scale * w

    This is Hugging Face's ``DeepseekV3TopkRouter`` (sigmoid, bias, groups, scale) and
    ``Qwen2MoeTopKRouter`` / Mixtral (softmax, no bias, no groups, scale 1). With ``k = 1`` the
    weight is not re-normalised (it would be the constant 1, cutting the router's gradient), where
    Hugging Face's DeepSeek-V3 would give exactly 1.

    ``forced_indices`` (``[T, k]`` int64, or ``None``) overrides the choice for the next forward
    passes while keeping the router's weights for the chosen experts: the forced-routing knob used
    by benchmarks so that every system sees identical assignments.

    Attributes:
        gate: ``nn.Linear(d, E, bias=False)``, weight ``[E, d]``.
        expert_bias: persistent float32 buffer ``[E]`` (zeros at start) when ``expert_bias=True``,
            else ``None`` (and absent from the state dict). Updated outside autograd by
            :func:`system.moe.balance.update_expert_bias`; Hugging Face's
            ``mlp.gate.e_score_correction_bias``.
        bias_update_rate: gamma of that update.

    Args:
        dim: model width d.
        num_experts: E.
        top_k: k experts per token.
        score_func: ``"softmax"`` or ``"sigmoid"``.
        norm_topk_prob: renormalise the k weights of each token to sum to 1.
        route_scale: factor applied to the final weights (DeepSeek-V3 ``routed_scaling_factor``).
        num_groups: G expert groups for group-limited routing; 0 or 1: off.
        limited_groups: groups each token may choose from (``1 <= M <= G`` when G > 1).
        expert_bias: register the selection bias buffer (``moe.load_balance = "bias"``).
        bias_update_rate: gamma >= 0 of the bias update.

    Raises:
        ValueError: an unknown ``score_func``, ``route_scale <= 0``, groups that do not divide E, M
            out of ``[1, G]``, or k above the experts of M groups.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, score_func: str = "softmax",
                 norm_topk_prob: bool = True, *, route_scale: float = 1.0, num_groups: int = 0,
                 limited_groups: int = 0, expert_bias: bool = False, bias_update_rate: float = 1e-3):
        super().__init__()
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        if route_scale <= 0:
            raise ValueError(f"route_scale must be > 0, got {route_scale}")
        if num_groups > 1:
            if num_experts % num_groups:
                raise ValueError(f"num_experts ({num_experts}) must divide by num_groups ({num_groups})")
            if not 1 <= limited_groups <= num_groups:
                raise ValueError(f"limited_groups must be in [1, num_groups={num_groups}], got {limited_groups}")
            if top_k > limited_groups * (num_experts // num_groups):
                raise ValueError(f"top_k ({top_k}) exceeds the {limited_groups * (num_experts // num_groups)} "
                                 f"experts of limited_groups={limited_groups} groups")
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.norm_topk_prob = norm_topk_prob
        self.route_scale = route_scale
        self.num_groups = num_groups if num_groups > 1 else 0
        self.limited_groups = limited_groups
        self.bias_update_rate = bias_update_rate
        # A None buffer is not in the state dict: only bias-balanced routers save expert_bias.
        self.register_buffer("expert_bias", torch.zeros(num_experts) if expert_bias else None)
        self.forced_indices: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route ``x`` of shape ``[T, d]``; see :class:`RouterOutput`.

        The gate runs in fp32 also under autocast (as DeepSeek-V3 and TorchTitan do): a bf16 gate would
        round near-tied logits together and route tokens differently from an fp32 run.
        """
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())
        scores = self._score(logits)
        indices, weights = self._select(scores)
        return RouterOutput(indices=indices, weights=self._finish(weights), scores=scores, logits=logits)

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1) if self.score_func == "softmax" else torch.sigmoid(logits)

    def _select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [T, k], their scores [T, k])``: the top-k of ``scores`` ``[T, E]`` (biased and
        group-limited for the choice only), or the forced choice."""
        if self.forced_indices is None:
            choice = scores if self.expert_bias is None else scores + self.expert_bias.float()
            if self.num_groups:
                choice = limit_groups(choice, self.num_groups, self.limited_groups)
            indices = torch.topk(choice, self.top_k, dim=-1).indices
            return indices, scores.gather(1, indices)
        indices = self.forced_indices.to(device=scores.device, dtype=torch.int64)
        if indices.shape != (scores.shape[0], self.top_k):
            raise ValueError(
                f"forced_indices has shape {tuple(indices.shape)}, expected ({scores.shape[0]}, {self.top_k})"
            )
        return indices, scores.gather(1, indices)

    def _finish(self, weights: torch.Tensor) -> torch.Tensor:
        """Final combine weights ``[T, k]``: re-normalised (``norm_topk_prob``, k > 1), times ``route_scale``."""
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return weights * self.route_scale if self.route_scale != 1.0 else weights

    def extra_repr(self) -> str:
        parts = [f"top_k={self.top_k}", f"score_func={self.score_func}"]
        if self.route_scale != 1.0:
            parts.append(f"route_scale={self.route_scale}")
        if self.num_groups:
            parts.append(f"groups={self.limited_groups}/{self.num_groups}")
        return ", ".join(parts)


def limit_groups(choice: torch.Tensor, num_groups: int, limited_groups: int) -> torch.Tensor:
    """Group-limited selection scores (DeepSeek-V3, arXiv 2412.19437, sec. 2.1.2; Hugging Face
    ``DeepseekV3TopkRouter``).

    The E experts form ``G`` contiguous groups of ``E/G``; a group's score is the sum of its two
    best selection scores (its one score when ``E/G = 1``); the ``M`` best groups of each token are
    kept and every expert of the other groups gets ``-inf``, so a following top-k picks only there.

    Args:
        choice: ``[T, E]`` float selection scores (possibly biased).
        num_groups: G > 1, dividing E.
        limited_groups: M in ``[1, G]``.

    Returns:
        ``[T, E]``: ``choice`` with the experts of the ``G - M`` worst groups of each token at ``-inf``.
    """
    tokens, num_experts = choice.shape
    grouped = choice.view(tokens, num_groups, num_experts // num_groups)  # [T, G, E/G]
    group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # [T, G]
    best = group_scores.topk(limited_groups, dim=-1).indices  # [T, M]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [T, G]
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(tokens, num_experts)


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
        w   = route_scale * w

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
        **routing: the keyword options of :class:`TopKRouter` (route scale, groups, expert bias):
            they act on the choice from ``mu`` and on the final weights as there.
        dropout: p, dropout probability of the router input in training, in ``[0, 1)``.
        passes: M >= 1 stochastic passes.
        scale: alpha >= 0, strength of the calibration (0: weights are the MC mean scores).

    Raises:
        ValueError: a value out of range (named).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, score_func: str = "softmax",
                 norm_topk_prob: bool = True, dropout: float = 0.1, passes: int = 4, scale: float = 1.0,
                 **routing):
        super().__init__(dim, num_experts, top_k, score_func, norm_topk_prob, **routing)
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
        with torch.autocast(x.device.type, enabled=False):  # fp32 gate, as in TopKRouter.forward
            logits = torch.matmul(dropped, self.gate.weight.float().t())  # [M, T, E]
        mu, var = mc_moments(self._score(logits))
        mean_logits, _ = mc_moments(logits)
        indices, chosen_mu = self._select(mu)
        weights = uncertainty_weights(chosen_mu, var.gather(1, indices), self.scale)
        return RouterOutput(indices=indices, weights=self._finish(weights), scores=mu, logits=mean_logits,
                            uncertainty=var.detach().sqrt())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.dropout}, passes={self.passes}, scale={self.scale}"


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
    """The router ``cfg.router`` (a :class:`~system.config.moe.MoEConfig`) asks for, with its route
    scale, expert groups and (``load_balance = "bias"``) selection bias.

    Raises:
        ValueError: an unknown ``cfg.router``, or an out-of-range routing option (see :class:`TopKRouter`).
    """
    common = (dim, cfg.num_experts, cfg.top_k, cfg.score_func, cfg.norm_topk_prob)
    routing = dict(route_scale=cfg.route_scale, num_groups=cfg.num_expert_groups,
                   limited_groups=cfg.num_limited_groups, expert_bias=cfg.load_balance == "bias",
                   bias_update_rate=cfg.bias_update_rate)
    if cfg.router == "topk":
        return TopKRouter(*common, **routing)
    if cfg.router == "uncertainty":
        return UncertaintyRouter(*common, dropout=cfg.router_dropout, passes=cfg.router_passes,
                                 scale=cfg.router_uncertainty_scale, **routing)
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
