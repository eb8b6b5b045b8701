"""The MoE feed-forward layer: router -> permute -> dispatch -> grouped experts -> combine.

Two expert types (``moe.expert_type``): ``"ffn"``, E SwiGLU experts that read the token rows
``[T, d]``; ``"fme"`` (MoFME, :mod:`system.moe.fme`), one shared SwiGLU block whose gate features
``a = x W1`` ``[T, f]`` are computed once per token and dispatched to per-expert feature modulations,
the weighted sum of their outputs being finished by the shared ``W2`` once per token. Two routers
(``moe.router``): :class:`~system.moe.router.TopKRouter` and the uncertainty-aware
:class:`~system.moe.router.UncertaintyRouter`.

Dropless by default (every token reaches its k experts; uneven all-to-all under expert
parallelism). With ``capacity_factor > 0`` each expert accepts at most
``ceil(capacity_factor * T * k / E)`` of a group's ``T`` tokens, in GShard's priority order (all
first choices before second choices, then token order; GShard sec. 2.2, Algorithm 1); dropped
assignments contribute nothing and the token passes through the residual connection.

Load balancing (``moe.load_balance``): ``"aux"``, the auxiliary loss of
:func:`~system.moe.router.load_balancing_loss`; ``"bias"``, DeepSeek-V3's auxiliary-loss-free
balancing (arXiv 2412.19437, sec. 2.1.2: a selection bias in the router, updated after each
optimizer step by :func:`system.moe.balance.update_expert_bias`); ``"none"``. With ``"bias"`` and
``"none"`` the layer's ``aux_loss`` is a constant 0. Shared experts (DeepSeek-V2/V3, Qwen2-MoE) are
one SwiGLU of hidden ``moe.shared_hidden_dim()`` run on every token, optionally scaled by
``sigmoid(x w_g)`` (Qwen2-MoE's ``shared_expert_gate``).

Host synchronisation on CUDA: the layer itself adds none in dropless mode (expert counts by
``scatter_add_``, not ``bincount``, which reads the maximum id back); the capacity mode reads the
number of drops, and the dispatchers read their split sizes once (see :mod:`system.moe.dispatch`).

Determinism (:attr:`MoELayer.deterministic`, set from ``training.deterministic``): the weighted sum
of each token's k expert rows is an ``index_add`` on CPU (sequential: deterministic) and, by
default, on CUDA too, where it is done with atomic adds whose order varies from run to run (for
``k <= 2`` the float result is the same anyway: ``0 + a + b == a + b == b + a``; from ``k = 3`` on the
last bits vary). With ``deterministic`` the CUDA sum places each row at its assignment slot and sums
over the k slots in a fixed order (:func:`combine_by_token`). On CPU with several threads the backward
of the token gather ``rows[token_of]`` accumulates repeated indices with parallel atomics (PyTorch's
``index_put_``): :mod:`system.train.determinism` covers it with ``torch.use_deterministic_algorithms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from system.config.moe import MoEConfig
from system.moe.dispatch import LocalDispatcher
from system.moe.experts import FeedForward, GroupedExperts
from system.moe.fme import FeatureModulatedExperts
from system.moe.router import RouterOutput, build_router, load_balancing_loss, router_z_loss


@dataclass
class MoEStats:
    """What one MoE forward pass measured.

    Attributes:
        aux_loss: scalar load-balancing loss (differentiable); a constant 0 unless ``load_balance = "aux"``.
        z_loss: scalar router z-loss (differentiable).
        tokens_per_expert: ``[E]`` float assignments per expert over the global micro-batch.
        dropped: assignments dropped by the capacity limit on this rank.
        assignments: assignments made on this rank (``T * k``).
        expert_tokens: token copies this rank's experts computed (after dispatch): its expert load.
        router_std: scalar, mean standard deviation of the chosen experts' scores over the
            uncertainty router's passes (detached); ``None`` for a deterministic routing.
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped: int
    assignments: int
    expert_tokens: int = 0
    router_std: torch.Tensor | None = None


class MoELayer(nn.Module):
    """Mixture-of-Experts layer ``[B, S, d] -> [B, S, d]`` (SwiGLU FFN or feature-modulated experts).

    Holds all E experts until :func:`system.parallel.apply_ep` slices them; the ``dispatcher``
    (local or all-to-all) and ``stats_group`` (the group over which routing statistics are
    summed for the load-balancing loss) are set by the parallelisms, so this code reads like
    single-device code.

    Attributes:
        experts: the sharded expert parameters (:class:`~system.moe.experts.ExpertModule`).
        fme_shared: the shared SwiGLU block of FME experts (a dense module), else ``None``.
        shared_experts: the always-active SwiGLU ``[T, d] -> [T, d]`` of hidden
            ``cfg.shared_hidden_dim()``, or ``None``.
        shared_expert_gate: ``nn.Linear(d, 1, bias=False)`` whose sigmoid scales the shared experts'
            output (``cfg.shared_expert_gate``, Qwen2-MoE), or ``None``.
        capacity_groups: in capacity mode, the tokens of one forward are split into this many equal
            groups, each with its own capacity (a single-process reference of an N-rank job uses N).
        deterministic: sum each token's expert rows in a fixed order on CUDA (see the module
            docstring); default False. No effect on CPU, whose combine is sequential anyway.
        last_stats: :class:`MoEStats` of the latest forward.

    Raises:
        ValueError: an unknown ``cfg.expert_type``, ``cfg.shared_expert_gate`` without shared experts,
            or an out-of-range routing option (:func:`~system.moe.router.build_router`).
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.expert_type = cfg.expert_type
        self.load_balance = cfg.load_balance
        self.router = build_router(dim, cfg)
        if cfg.expert_type == "fme":
            self.experts = FeatureModulatedExperts(cfg.num_experts, cfg.expert_dim, cfg.fme_modulation, cfg.fme_rank,
                                                   grouped_mm=cfg.grouped_mm)
            self.fme_shared = FeedForward(dim, cfg.expert_dim)
        elif cfg.expert_type == "ffn":
            self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_dim, grouped_mm=cfg.grouped_mm)
            self.fme_shared = None
        else:
            raise ValueError(f"moe.expert_type must be 'ffn' or 'fme', got {cfg.expert_type!r}")
        shared_dim = cfg.shared_hidden_dim()
        self.shared_experts = FeedForward(dim, shared_dim) if shared_dim else None
        if cfg.shared_expert_gate and self.shared_experts is None:
            raise ValueError("moe.shared_expert_gate needs shared experts (moe.num_shared_experts >= 1), got "
                             f"moe.num_shared_experts={cfg.num_shared_experts}")
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_expert_gate else None
        self.dispatcher = LocalDispatcher()
        self.stats_group = None
        self.capacity_groups = 1
        self.deterministic = False
        self.last_stats: MoEStats | None = None

    def init_weights(self, std: float, out_std: float) -> None:
        """Initialise router, experts, shared experts and their gate (FME: the shared block like an FFN
        expert, the modulations with ``std``, see :meth:`~system.moe.fme.FeatureModulatedExperts.init_weights`).
        The router's ``expert_bias`` (if any) is reset to 0."""
        nn.init.trunc_normal_(self.router.gate.weight, std=std)
        if self.router.expert_bias is not None:
            self.router.expert_bias.zero_()
        if self.fme_shared is not None:
            self.fme_shared.init_weights(std, out_std)
            self.experts.init_weights(std)
        else:
            self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
        if self.shared_expert_gate is not None:
            nn.init.trunc_normal_(self.shared_expert_gate.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route, dispatch, compute and combine ``x`` ``[B, S, d]``; sets :attr:`last_stats`."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        num_tokens = xf.shape[0]
        route = self.router(xf)
        flat_expert = route.indices.flatten()  # [T*k], assignment a = t*k + j

        counts = count_per_expert(flat_expert, self.num_experts)
        global_counts = counts.float()
        global_tokens = num_tokens
        if self.stats_group is not None:
            dist.all_reduce(global_counts, group=self.stats_group)
            global_tokens = num_tokens * dist.get_world_size(self.stats_group)
        if self.load_balance == "aux":
            aux = load_balancing_loss(route.scores, global_counts, global_tokens, self.top_k)
        else:  # "bias" / "none": no balancing loss; a constant keeps aux_loss() summable
            aux = route.scores.new_zeros(())
        zloss = router_z_loss(route.logits)

        dropped = 0
        sort_key = flat_expert
        if self.capacity_factor > 0:
            keep = self._capacity_mask(route.indices)
            dropped = int((~keep).sum())
            sort_key = torch.where(keep, flat_expert, self.num_experts)  # dropped sort last
            counts = count_per_expert(flat_expert[keep], self.num_experts)
        order = torch.argsort(sort_key, stable=True)
        num_kept = flat_expert.numel() - dropped
        order = order[:num_kept]
        token_of = order // self.top_k

        rows, ctx = self.expert_inputs(xf)
        x_local, local_counts = self.dispatcher.dispatch(rows[token_of], counts)
        y_local = self.experts(x_local, local_counts)
        y = self.dispatcher.combine(y_local)
        # Weighted sum over each token's k experts, accumulated in float32 (y may be bf16).
        w = route.weights.flatten()[order]
        acc = combine_by_token(y.float() * w[:, None], token_of, order, num_tokens, self.top_k, self.deterministic)
        out = self.expert_outputs(acc, ctx)
        if self.shared_experts is not None:
            out = out + self.shared_output(xf)
        self.last_stats = MoEStats(
            aux_loss=aux,
            z_loss=zloss,
            tokens_per_expert=global_counts.detach(),
            dropped=dropped,
            assignments=flat_expert.numel(),
            expert_tokens=x_local.shape[0],
            router_std=_router_std(route),
        )
        return out.to(x.dtype).view(shape)

    def shared_output(self, xf: torch.Tensor) -> torch.Tensor:
        """The shared experts' output ``[T, d]`` for tokens ``xf`` ``[T, d]``, scaled by
        ``sigmoid(shared_expert_gate(xf))`` ``[T, 1]`` when the layer has that gate (Qwen2-MoE).
        Call only when :attr:`shared_experts` is not ``None``."""
        out = self.shared_experts(xf)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(xf)) * out
        return out

    def expert_inputs(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token rows the experts read, and what :meth:`expert_outputs` needs.

        FFN experts read the tokens ``xf`` ``[T, d]`` (context ``None``). FME experts read the shared
        block's gate features ``a = xf W1`` ``[T, f]`` (computed once per token, before dispatch);
        the context is ``b = xf W3`` ``[T, f]``, which stays on this rank.
        """
        if self.fme_shared is None:
            return xf, None
        return self.fme_shared.w1(xf), self.fme_shared.w3(xf)

    def expert_outputs(self, acc: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        """Float32 ``[T, d]`` layer output from ``acc`` ``[T, out_features]``, the float32 router-weighted
        sum of each token's expert rows: ``acc`` itself for FFN experts, ``W2 (acc * b)`` for FME."""
        if ctx is None:
            return acc
        return self.fme_shared.w2(acc.to(ctx.dtype) * ctx).float()

    def _capacity_mask(self, indices: torch.Tensor) -> torch.Tensor:
        """``[T*k]`` bool: which assignments fit their expert's capacity within their group.

        Priority inside a (group, expert) bucket: choice rank j first, then token position.
        """
        num_tokens, k = indices.shape
        groups = self.capacity_groups
        if num_tokens % groups:
            raise ValueError(f"capacity_groups={groups} does not divide the {num_tokens} tokens of the batch")
        group_tokens = num_tokens // groups
        capacity = math.ceil(self.capacity_factor * group_tokens * k / self.num_experts)
        t = torch.arange(num_tokens, device=indices.device).repeat_interleave(k)
        j = torch.arange(k, device=indices.device).repeat(num_tokens)
        bucket = (t // group_tokens) * self.num_experts + indices.flatten()
        key = (bucket * k + j) * num_tokens + t
        order = torch.argsort(key)
        sorted_bucket = bucket[order]
        bucket_sizes = count_per_expert(sorted_bucket, groups * self.num_experts)
        bucket_start = torch.cumsum(bucket_sizes, 0) - bucket_sizes
        position = torch.arange(order.numel(), device=indices.device) - bucket_start[sorted_bucket]
        keep = torch.empty_like(position, dtype=torch.bool)
        keep[order] = position < capacity
        return keep


def count_per_expert(flat_expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` int64 assignments per expert of ``flat_expert`` ``[N]`` (ids in ``[0, E)``), on its device.

    ``torch.bincount`` on CPU; on other devices an integer ``scatter_add_`` (exact, and deterministic
    in value), because CUDA ``bincount`` reads the largest id back to size its output: a host sync.
    """
    if flat_expert.device.type == "cpu":
        return torch.bincount(flat_expert, minlength=num_experts)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_expert.device)
    return counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert, dtype=torch.int64))


def combine_by_token(contrib: torch.Tensor, token_of: torch.Tensor, order: torch.Tensor, num_tokens: int,
                     top_k: int, deterministic: bool = False) -> torch.Tensor:
    """Sum the weighted expert rows of each token: ``[N, w]`` -> ``[T, w]`` (the MoE combine).

    Row ``i`` of ``contrib`` is the weighted output of assignment ``order[i]`` (``= t * k + j``: token
    ``t = token_of[i]``, choice ``j``); assignments not in ``order`` (dropped at capacity) add nothing.
    By default an ``index_add`` into zeros, in ``contrib``'s dtype: sequential in row order on CPU,
    atomic on CUDA (see :mod:`system.moe.layer` on determinism). With ``deterministic`` on a non-CPU
    device, the rows are copied to their assignment slots ``[T * k, w]`` (zeros elsewhere) and summed
    over ``k`` in a fixed order: no atomics. CPU always takes the ``index_add``.

    Args:
        contrib: ``[N, w]`` rows (N = kept assignments).
        token_of: ``[N]`` int64, ``order // top_k``.
        order: ``[N]`` int64 distinct assignment indices in ``[0, T * k)``.
        num_tokens: T.
        top_k: k.
        deterministic: use the fixed-order sum on CUDA.

    Returns:
        ``[T, w]``, differentiable in ``contrib``.
    """
    if deterministic and contrib.device.type != "cpu":
        slots = contrib.new_zeros(num_tokens * top_k, contrib.shape[-1]).index_copy(0, order, contrib)
        return slots.view(num_tokens, top_k, contrib.shape[-1]).sum(dim=1)
    return contrib.new_zeros(num_tokens, contrib.shape[-1]).index_add(0, token_of, contrib)


def _router_std(route: RouterOutput) -> torch.Tensor | None:
    """Mean standard deviation of the chosen experts' scores over the router's passes, or None."""
    if route.uncertainty is None:
        return None
    return route.uncertainty.detach().gather(1, route.indices).mean()
