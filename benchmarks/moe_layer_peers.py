"""The systems that ``benchmarks/moe_layer.py`` times: how each peer is built and configured.

- ``ours`` / ``ours_cf<X>``: :class:`system.moe.layer.MoELayer` with expert parallelism through
  :func:`system.parallel.expert_parallel.apply_ep`, dropless or with ``moe.capacity_factor = X``.
- ``deepspeed`` / ``deepspeed_cf<X>``: ``deepspeed.moe.layer.MoE``, dropless (``drop_tokens=False``) or in
  its recommended configuration (``drop_tokens=True``, ``capacity_factor = X``, ``min_capacity = 4``),
  started from our weights, with ``use_rts=False`` and ``top2_2nd_expert_sampling=False`` so that it
  routes every token exactly as ours.
- ``megatron``: Megatron-Core ``MoELayer`` (CUDA only), its own initialisation.

Each builder returns a :class:`System`: the module, its forward, and a reader of the routing facts of its
latest forward (drops, rows computed), which the agreement check and the drop rates use.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

DS_MIN_CAPACITY = 4  # deepspeed.moe.layer.MoE's documented default


def cf_name(peer: str, cf: float) -> str:
    """System name of ``peer`` at capacity factor ``cf`` (``deepspeed_cf1.0``, ``ours_cf1.25``)."""
    text = f"{cf:g}"
    return f"{peer}_cf{text if '.' in text else text + '.0'}"


class SwiGLU(nn.Module):
    """One dense SwiGLU expert ``w2(silu(w1 x) * w3 x)``, bias-free (the DeepSpeed expert)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class System:
    """One system under test.

    Attributes:
        name: ``ours``, ``ours_cf1.25``, ``deepspeed``, ``deepspeed_cf1.0``, ``megatron``.
        peer: ``ours``, ``deepspeed`` or ``megatron``.
        capacity_factor: 0 for dropless.
        module: the layer.
        forward: ``x -> (out, aux)`` where ``aux`` is the load-balancing loss to add (or ``None``
            when the peer adds it inside autograd itself, as Megatron does).
        routing: ``() -> {"dropped", "assignments", "rows", "kept_whole" [T] bool | None}`` of the
            latest forward on this rank (``rows``: token copies this rank's experts computed,
            padding included); ``None`` where unknown (Megatron).
        info: facts recorded in the results (configuration, implementation).
    """

    name: str
    peer: str
    capacity_factor: float
    module: nn.Module
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    routing: Callable[[], dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Setup:
    """Per-rank run context."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    mesh: Any = None


def build_ours(s: Setup, name: str, cf: float, global_weights: dict[str, torch.Tensor]) -> System:
    """Our :class:`MoELayer` with EP over all ranks; fills ``global_weights`` for the other peers."""
    from system.config.moe import MoEConfig
    from system.moe.experts import expert_kernel
    from system.moe.layer import MoELayer
    from system.parallel.expert_parallel import apply_ep

    a = s.args
    cfg = MoEConfig(num_experts=a.experts, top_k=a.top_k, expert_dim=a.ffn, aux_loss_coef=a.aux_coef,
                    capacity_factor=cf)
    cfg.validate()
    torch.manual_seed(a.seed)  # identical global weights on every rank (and every ours system) before apply_ep
    layer = MoELayer(a.dim, cfg)
    layer.init_weights(std=0.02, out_std=0.02 / math.sqrt(2))
    if not global_weights:
        global_weights.update(router=layer.router.gate.weight.detach().clone(),
                              **{w: getattr(layer.experts, w).detach().clone() for w in ("w1", "w2", "w3")})
    apply_ep(layer, s.mesh)
    layer.to(device=s.device, dtype=s.dtype)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = layer(x)
        return out, layer.last_stats.aux_loss

    def routing() -> dict[str, Any]:
        st = layer.last_stats
        return {"dropped": int(st.dropped), "assignments": int(st.assignments), "rows": int(st.expert_tokens),
                "kept_whole": None, "tokens_per_expert": st.tokens_per_expert.detach().float()}

    configuration = ("dropless (moe.capacity_factor = 0)" if cf == 0 else
                     f"moe.capacity_factor = {cf:g}: at most ceil(cf * T * k / E) tokens per expert and rank, "
                     "GShard priority (first choices, then second, in token order); gate weights kept as routed")
    info = {
        "impl": "system.moe.layer.MoELayer + system.parallel.expert_parallel.apply_ep",
        "label": "dropless" if cf == 0 else f"capacity factor {cf:g}, drops",
        "configuration": configuration,
        "dispatcher": type(layer.dispatcher).__name__,
        "expert_kernel": expert_kernel(torch.device(s.device), s.dtype, layer.experts.grouped_mm),
        "local_experts": layer.experts.num_local_experts,
    }
    return System(name, "ours", cf, layer, forward, routing, info)


def build_deepspeed(s: Setup, name: str, cf: float, global_weights: dict[str, torch.Tensor]) -> System:
    """``deepspeed.moe.layer.MoE`` with EP over all ranks, initialised from our weights.

    ``cf == 0``: ``drop_tokens=False`` (dropless, matched to ours). ``cf > 0``: DeepSpeed's recommended
    ``drop_tokens=True`` with ``capacity_factor=cf`` and its default ``min_capacity``.
    """
    import deepspeed
    from deepspeed.moe.layer import MoE

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    a = s.args
    deepspeed.init_distributed(dist_backend="nccl" if s.device.type == "cuda" else "gloo")
    drop = cf > 0
    kwargs: dict[str, Any] = dict(
        hidden_size=a.dim, expert=SwiGLU(a.dim, a.ffn), num_experts=a.experts, ep_size=s.world, k=a.top_k,
        capacity_factor=cf if drop else 1.0,  # unused when drop_tokens=False (capacity = max expert load)
        eval_capacity_factor=cf if drop else 1.0,
        min_capacity=DS_MIN_CAPACITY if drop else 0,
        drop_tokens=drop,
        use_rts=False,  # top-1 only: random survivors would change which tokens drop; ours keeps token order
    )
    if "top2_2nd_expert_sampling" in inspect.signature(MoE.__init__).parameters:
        kwargs["top2_2nd_expert_sampling"] = False  # deterministic top-2, as ours (its default samples)
    with contextlib.ExitStack() as stack:  # DeepSpeed prints group creation to stdout: rank 0 -> stderr, others muted
        sink = sys.stderr if s.rank == 0 else stack.enter_context(open(os.devnull, "w"))
        stack.enter_context(contextlib.redirect_stdout(sink))
        moe = MoE(**kwargs)
        moe.set_deepspeed_parallelism()  # deepspeed.initialize() normally does this; we use the layer alone
    ds = moe.deepspeed_moe
    ep_rank = dist.get_rank(group=ds.ep_group)
    num_local = ds.num_local_experts
    with torch.no_grad():
        ds.gate.wg.weight.copy_(global_weights["router"])
        for i, expert in enumerate(ds.experts.deepspeed_experts):
            e = ep_rank * num_local + i  # DeepSpeed's all-to-all sends experts [j*nl, (j+1)*nl) to EP rank j
            for w in ("w1", "w2", "w3"):
                getattr(expert, w).weight.copy_(global_weights[w][e].t())
        if a.inject_disagreement:
            ds.experts.deepspeed_experts[0].w2.weight.mul_(1.01)
    moe.to(device=s.device, dtype=s.dtype)

    gate_out: dict[str, Any] = {}
    # The gate's output tells the capacity and which routes survived; a hook reads it without changing it.
    ds.gate.register_forward_hook(lambda _m, _i, out: gate_out.update(out=out))

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, l_aux, _ = moe(x)
        return out, l_aux

    def routing() -> dict[str, Any]:
        out = gate_out["out"]
        if len(out) == 7:  # (l_aux, capacity, E, indices [k, T] (-1: dropped), locations, gates, exp_counts)
            capacity, kept = int(out[1]), (out[3] >= 0).sum(dim=0)
        else:  # older DeepSpeed: (l_aux, combine_weights [T, E, C], dispatch_mask, exp_counts)
            capacity, kept = int(out[1].shape[-1]), out[2].flatten(1).sum(dim=1)
        made = a.tokens * a.top_k
        return {"dropped": made - int(kept.sum()), "assignments": made, "rows": a.experts * capacity,
                "kept_whole": kept == a.top_k, "capacity": capacity,
                "tokens_per_expert_local": ds.exp_counts.detach().float()}

    configuration = ("dropless (drop_tokens=False): capacity = largest expert load over the EP group, every expert "
                     "padded to it" if not drop else
                     f"recommended: drop_tokens=True, capacity_factor={cf:g}, min_capacity={DS_MIN_CAPACITY}: "
                     "capacity max(ceil(cf * T * k / E), min_capacity) per expert and rank, first choices before "
                     "second in token order; gate weights renormalised over the surviving choices")
    info = {
        "impl": "deepspeed.moe.layer.MoE",
        "label": "dropless (matched)" if not drop else
                 f"recommended: drop_tokens, cf {cf:g}, min_capacity {DS_MIN_CAPACITY}",
        "configuration": configuration,
        "kwargs": {k: v for k, v in kwargs.items() if k != "expert"},
        "deviations_from_defaults": "use_rts=False, top2_2nd_expert_sampling=False (same routing as ours)",
        "local_experts": num_local,
        "aux_loss": "DeepSpeed top2gating l_aux = E^2 * mean(me * ce), ce from first choices only (its definition)",
    }
    return System(name, "deepspeed", cf, moe, forward, routing, info)


def build_megatron(s: Setup, name: str, cf: float, global_weights: dict[str, torch.Tensor]) -> System:  # noqa: ARG001
    """Megatron-Core ``MoELayer`` (grouped GEMM, alltoall dispatcher, EP over all ranks), dropless, own init.

    UNTESTED ON GPU (written without access to one). Follows Megatron-LM's own unit tests
    (``tests/unit_tests/transformer/moe/test_moe_layer.py``): initialise model parallel state with
    ``expert_model_parallel_size``, seed the CUDA RNG tracker, build ``MoELayer`` from the MLP
    submodules of the GPT layer spec (Transformer Engine spec when TE is installed, else local).
    Megatron adds the load-balancing loss inside autograd, so ``forward`` returns ``aux=None``.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    a = s.args
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=s.world
        )
    model_parallel_cuda_manual_seed(a.seed)
    cfg = TransformerConfig(
        num_layers=1, hidden_size=a.dim, num_attention_heads=max(1, a.dim // 128), ffn_hidden_size=a.ffn,
        moe_ffn_hidden_size=a.ffn, num_moe_experts=a.experts, moe_router_topk=a.top_k,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=a.aux_coef, moe_grouped_gemm=True,
        moe_token_dispatcher_type="alltoall", expert_model_parallel_size=s.world,
        gated_linear_unit=True, activation_func=F.silu,  # SwiGLU
        add_bias_linear=False, bf16=s.dtype == torch.bfloat16, params_dtype=s.dtype,
    )
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=a.experts, moe_grouped_gemm=True)
        spec_name = "transformer_engine"
    except ImportError:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(num_experts=a.experts, moe_grouped_gemm=True)
        spec_name = "local"
    layer = MegatronMoELayer(cfg, spec.submodules.mlp.submodules).to(device=s.device, dtype=s.dtype)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Megatron's layout is [S, B, d] and it flattens with .view(); an MoE layer is token-wise, so
        # reinterpreting the contiguous [B, S, d] input as [S, B, d] (no copy) gives it the same tokens.
        batch, seq, dim = x.shape
        out, _bias = layer(x.view(seq, batch, dim))
        return out.view(batch, seq, dim), None

    info = {
        "impl": f"megatron.core MoELayer (grouped GEMM, alltoall dispatcher, {spec_name} spec)",
        "label": "dropless, own init",
        "configuration": "dropless (moe_expert_capacity_factor unset), its recommended MoE settings",
        "init": "Megatron's own (routing similar in distribution, not identical to ours)",
    }
    return System(name, "megatron", cf, layer, forward, None, info)


BUILDERS = {"ours": build_ours, "deepspeed": build_deepspeed, "megatron": build_megatron}
