"""Shared set-up of the expert-parallel equivalence tests: tiny configs, data, a training step.

The reference is the plain single-process model (no process group, ``torch.nn.utils`` clipping);
the distributed run applies ``parallelize_model`` and the trainer's gradient functions.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from system.config.fssdp import FSSDPConfig
from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.config.parallel import ParallelConfig
from system.config.training import TrainingConfig
from system.models.model import MoETransformer
from system.train.optim import build_optimizer

SEQ, BATCH_PER_RANK, STEPS, SEED = 16, 2, 3, 7

SCENARIOS: dict[str, dict] = {
    "ep2": dict(world=2, ep=2),
    "ep4": dict(world=4, ep=4),
    "dp2_ep2": dict(world=4, ep=2, dp=2, shared=1),
    "fsdp_ep2": dict(world=2, ep=2, dense="fsdp"),
    "fsdp_dp2_ep2": dict(world=4, ep=2, dp=2, dense="fsdp", tie=False),
    "idle_expert": dict(world=2, ep=2, routing="skip3"),
    "one_expert": dict(world=2, ep=2, top_k=1, routing="all5"),
    "capacity": dict(world=2, ep=2, capacity=1.0, routing="skew"),
    # FSSDP (Hecate): skewed routing so hot experts get replicas; re-sharding after step 2 of 3.
    "fssdp2": dict(world=2, ep=1, mode="fssdp", routing="skew"),
    "fssdp2_rm": dict(world=2, ep=1, mode="fssdp", routing="skew", rm=True, prefetch=False),
    "fssdp4": dict(world=4, ep=1, mode="fssdp", routing="skew"),
    "fssdp4_rm_fsdp": dict(world=4, ep=1, mode="fssdp", routing="skew", rm=True, dense="fsdp"),
    # MoFME feature-modulated experts (modulations sharded, shared block dense).
    "fme_ep2": dict(world=2, ep=2, expert_type="fme"),
    "fme_lowrank_fsdp_ep2": dict(world=2, ep=2, expert_type="fme", modulation="lowrank", dense="fsdp"),
    "fme_fssdp2": dict(world=2, ep=1, mode="fssdp", routing="skew", expert_type="fme", modulation="lowrank"),
}


def configs(s: dict) -> tuple[ModelConfig, MoEConfig, ParallelConfig, TrainingConfig]:
    model = ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=SEQ,
                        tie_embeddings=s.get("tie", True))
    moe = MoEConfig(num_experts=8, top_k=s.get("top_k", 2), expert_dim=48, num_shared_experts=s.get("shared", 0),
                    capacity_factor=s.get("capacity", 0.0), aux_loss_coef=0.01, z_loss_coef=0.001,
                    expert_type=s.get("expert_type", "ffn"), fme_modulation=s.get("modulation", "vector"), fme_rank=4)
    par = ParallelConfig(dp=s.get("dp", -1), ep=s["ep"], dense=s.get("dense", "replicate"),
                         expert_mode=s.get("mode", "ep"))
    train = TrainingConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=0.5, warmup_steps=0, steps=STEPS)
    return model, moe, par, train


def fssdp_config(s: dict) -> FSSDPConfig:
    return FSSDPConfig(load_window=2, overlap_budget=1, memory_budget=2, reshard_interval=2,
                       rematerialize=s.get("rm", False), ranks_per_node=2, prefetch=s.get("prefetch", True))


def build(s: dict) -> MoETransformer:
    model_cfg, moe_cfg, _, _ = configs(s)
    model = MoETransformer(model_cfg, moe_cfg)
    model.init_weights(seed=SEED)
    return model


def global_batches(s: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED)
    rows = BATCH_PER_RANK * s["world"]
    return [(torch.randint(0, 64, (rows, SEQ), generator=g), torch.randint(0, 64, (rows, SEQ), generator=g))
            for _ in range(STEPS)]


def forced_routing(s: dict, step: int, num_tokens: int) -> torch.Tensor | None:
    """Global forced expert choices ``[T, k]`` for the scenario (same for every MoE layer)."""
    routing = s.get("routing")
    k = s.get("top_k", 2)
    g = torch.Generator().manual_seed(100 + step)
    if routing is None:
        return None
    if routing == "all5":
        return torch.full((num_tokens, k), 5, dtype=torch.long)
    if routing == "skip3":
        choices = torch.tensor([0, 1, 2, 4, 5, 6, 7])
        return choices[torch.randint(0, 7, (num_tokens, k), generator=g)]
    if routing == "skew":  # expert 0 hot: at capacity 1.0 it must drop
        idx = torch.randint(0, 8, (num_tokens, k), generator=g)
        idx[: num_tokens * 3 // 4, 0] = 0
        return idx
    raise ValueError(routing)


def set_routing(model: MoETransformer, forced: torch.Tensor | None) -> None:
    for moe in model.moe_layers():
        moe.router.forced_indices = forced


def reference_run(s: dict) -> dict:
    """Single process, global batch, plain PyTorch clipping."""
    model = build(s)
    _, moe_cfg, _, train_cfg = configs(s)
    for moe in model.moe_layers():
        moe.capacity_groups = s["world"]
    opt = build_optimizer(model, train_cfg)
    out = {"loss": [], "grad_norm": [], "dropped": 0}
    for step, (x, y) in enumerate(global_batches(s)):
        set_routing(model, forced_routing(s, step, x.numel()))
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        (ce + model.aux_loss()).backward()
        out["dropped"] += sum(m.last_stats.dropped for m in model.moe_layers())
        if step == 0:
            out["logits"] = logits.detach().clone()
            out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        out["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)))
        opt.step()
        out["loss"].append(ce.item())
    out["params"] = copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})
    return out
