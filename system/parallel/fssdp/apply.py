"""Apply FSSDP to a model, and drive it once per iteration (placement, loads, re-sharding).

``apply_fssdp`` replaces every MoE layer's experts by :class:`FSSDPExperts` (uniform initial
ownership) and its dispatcher by :class:`FSSDPDispatcher`. The returned :class:`FSSDPController`
is called by the trainer: ``begin_step()`` before the forward pass computes each layer's placement
from the moving-average loads (Hecate Algorithm 1); ``end_step(optimizer)`` after the optimizer
step records the iteration's loads and, every ``reshard_interval`` iterations, re-assigns owners by
load (Algorithm 2), moving parameters and AdamW state with ownership, exactly.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from system.config.fssdp import FSSDPConfig
from system.moe.layer import MoELayer
from system.parallel.fssdp.layer import FSSDPDispatcher, FSSDPExperts, FSSDPLayerState
from system.parallel.fssdp.ownership import Ownership
from system.parallel.fssdp.placement import LoadTracker, estimate_overlap_budget, sparse_materialization
from system.parallel.fssdp.resharding import heterogeneous_sharding, reshard
from system.parallel.layout import FSSDPRows, ParamLayout, layout_of, record

logger = logging.getLogger(__name__)


def owner_only_placement(ownership: Ownership, world_size: int) -> torch.Tensor:
    """``[E, W]`` placement where each expert is materialized on its owner only."""
    placement = torch.zeros(ownership.owner.numel(), world_size, dtype=torch.bool)
    placement[torch.arange(ownership.owner.numel()), ownership.owner] = True
    return placement


def apply_fssdp(model: nn.Module, cfg: FSSDPConfig, group=None, *, grad_divisor: int | None = None) -> "FSSDPController":
    """Shard every MoE layer's experts FSSDP-style over the ranks of ``group`` (default: world).

    Call after the weights are initialised identically on every rank and before the optimizer is
    built (the owned rows are new parameters). Each owned buffer's layout record
    (:class:`~system.parallel.layout.ParamLayout`, kind ``"fssdp"``) points at its module's current
    owners; its gradient, summed on the owner by SparseReduceScatter, is divided by ``grad_divisor``
    (default: the ranks of ``group``, each reading its own batch).

    Returns:
        The :class:`FSSDPController` the training loop must call every iteration.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    rpn = cfg.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    states = []
    for moe in (m for m in model.modules() if isinstance(m, MoELayer)):
        ownership = Ownership.uniform(moe.num_experts, world)
        state = FSSDPLayerState(
            ownership=ownership, placement=owner_only_placement(ownership, world),
            tracker=LoadTracker(cfg.load_window, moe.num_experts), rank=rank, world_size=world, ranks_per_node=rpn,
            group=group, rematerialize=cfg.rematerialize,
        )
        moe.experts = FSSDPExperts(moe.experts, state)
        record(moe.experts.owned, ParamLayout("fssdp", tuple(moe.experts.owned.shape), rows=FSSDPRows(moe.experts),
                                              grad_divisor=grad_divisor or world))
        moe.dispatcher = FSSDPDispatcher(state, moe.num_experts)
        if world > 1:
            moe.stats_group = group if group is not None else dist.group.WORLD
        states.append(state)
    if cfg.prefetch:
        for block in getattr(model, "layers", []):
            if isinstance(getattr(block, "moe", None), MoELayer) and isinstance(block.moe.experts, FSSDPExperts):
                block.register_forward_pre_hook(_prefetch_hook(block.moe.experts))
    return FSSDPController(model, states, cfg)


def _prefetch_hook(experts: FSSDPExperts):
    """Forward pre-hook of a transformer block: start its MoE layer's SparseAllGather early."""

    def hook(module: nn.Module, args) -> None:
        experts.prefetch()

    return hook


class FSSDPController:
    """Per-iteration FSSDP bookkeeping for all MoE layers of one model (see module docstring)."""

    def __init__(self, model: nn.Module, states: list[FSSDPLayerState], cfg: FSSDPConfig):
        self.model = model
        self.states = states
        self.cfg = cfg
        self.step = 0
        self.overlap_budget = cfg.overlap_budget if cfg.overlap_budget >= 0 else cfg.memory_budget
        self._metrics_step = 0
        self._attention_shape: tuple[int, ...] | None = None
        if cfg.overlap_budget < 0:
            blocks = [b for b in getattr(model, "layers", []) if getattr(b, "moe", None) is not None]
            if blocks:
                self._shape_hook = blocks[0].attention.register_forward_pre_hook(self._record_attention_shape)

    def _record_attention_shape(self, module: nn.Module, args) -> None:
        if self._attention_shape is None and args and torch.is_tensor(args[0]):
            self._attention_shape = tuple(args[0].shape)
            self._shape_hook.remove()

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.model.modules() if isinstance(m, MoELayer)]

    def begin_step(self) -> None:
        """Compute every layer's placement for this iteration from its moving-average load."""
        for st in self.states:
            st.placement = sparse_materialization(
                st.tracker.load, st.ownership, st.world_size, st.ranks_per_node,
                self.overlap_budget, self.cfg.memory_budget, self.cfg.replicate_above,
            )

    def end_step(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Record this iteration's loads; re-shard every ``reshard_interval`` steps.

        Returns:
            Whether ownership changed (a re-sharding moved experts).
        """
        self.step += 1
        seen = [(moe.last_stats.tokens_per_expert.detach(), st)
                for moe, st in zip(self.moe_layers(), self.states) if moe.last_stats is not None]
        if seen:  # every layer's loads in one device-to-host copy (one sync per step, not per layer)
            loads = torch.cat([t.to(torch.float64).flatten() for t, _ in seen]).cpu()
            for load, (_, st) in zip(loads.split([t.numel() for t, _ in seen]), seen):
                st.tracker.update(load)
        if self.cfg.overlap_budget < 0 and self.step == 2:
            self._estimate_overlap_budget()
        if self.cfg.reshard_interval and self.step % self.cfg.reshard_interval == 0:
            return self.reshard(optimizer)
        return False

    def reshard(self, optimizer: torch.optim.Optimizer | None) -> bool:
        """Re-assign owners by load (Algorithm 2) and move owned rows and optimizer state."""
        moved = False
        for moe, st in zip(self.moe_layers(), self.states):
            new = heterogeneous_sharding(st.tracker.load, st.world_size, previous=st.ownership)
            if torch.equal(new.owner, st.ownership.owner) and torch.equal(new.slot, st.ownership.slot):
                continue
            experts: FSSDPExperts = moe.experts
            old_param = experts.owned
            opt_state = optimizer.state.get(old_param, {}) if optimizer is not None else {}
            keys = [k for k, v in opt_state.items() if torch.is_tensor(v) and v.shape == old_param.shape]
            tensors = [old_param.detach()] + [opt_state[k] for k in keys]
            moved_tensors = reshard(tensors, st.ownership, new, st.group)
            new_param = nn.Parameter(moved_tensors[0].clone(), requires_grad=old_param.requires_grad)
            record(new_param, layout_of(old_param).with_(global_shape=tuple(new_param.shape)))
            experts.owned = new_param
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["params"] = [new_param if p is old_param else p for p in group["params"]]
                if old_param in optimizer.state:
                    state = optimizer.state.pop(old_param)
                    for k, t in zip(keys, moved_tensors[1:]):
                        state[k] = t
                    optimizer.state[new_param] = state
            st.ownership = new
            st.placement = torch.zeros_like(st.placement)
            st.placement[torch.arange(new.owner.numel()), new.owner] = True
            moved = True
        if moved:
            logger.info("fssdp: re-sharded expert ownership at step %d", self.step)
        return moved

    def _estimate_overlap_budget(self) -> None:
        """t = attention time x gather bandwidth / expert bytes (DESIGN.md sec. 3), agreed by all ranks.

        Times one attention forward of the first MoE block on the real micro-batch shape and one
        SparseAllGather of all its experts on this rank; every rank takes the minimum so
        placements stay identical.
        """
        layers = [b for b in getattr(self.model, "layers", []) if getattr(b, "moe", None) is not None]
        if not layers:
            return
        block = layers[0]
        experts: FSSDPExperts = block.moe.experts
        st = experts.state
        dim = block.attention.wq.in_features
        rope = getattr(self.model, "rope", None)
        # The real micro-batch shape (recorded by a hook in the first forward), else one sequence.
        shape = self._attention_shape or (1, min(256, rope.shape[0]) if rope is not None else 256, dim)
        x = torch.randn(*shape, device=experts.owned.device)
        rope = rope[: shape[1]] if rope is not None else None
        sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        with torch.no_grad():
            block.attention(x, rope)  # warm-up
            sync()
            t0 = time.perf_counter()
            block.attention(x, rope)
            sync()
            t_attn = time.perf_counter() - t0
            full = torch.ones(st.placement.shape, dtype=torch.bool)
            saved, saved_stats, st.placement = st.placement, dict(st.stats), full
            dist.barrier(group=st.group)
            t0 = time.perf_counter()
            experts.gather()
            sync()
            t_gather = time.perf_counter() - t0
            st.placement, st.stats = saved, saved_stats
        remote = max(full.shape[0] - st.ownership.num_owned(st.rank), 1)
        bytes_moved = remote * experts.expert_numel * experts.owned.element_size()
        t = estimate_overlap_budget(t_attn, bytes_moved / max(t_gather, 1e-9), experts.expert_numel * experts.owned.element_size())
        agreed = torch.tensor([t], dtype=torch.long, device=experts.owned.device)  # NCCL needs a device tensor
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=st.group)
        self.overlap_budget = int(agreed.item())
        logger.info("fssdp: estimated overlap budget t=%d experts (memory budget m=%d)",
                    self.overlap_budget, self.cfg.memory_budget)

    def metrics(self) -> dict[str, float]:
        """Scalars for TensorBoard, averaged per step since the last call: materialized replicas per
        expert (mean and max, per layer, current placement), bytes this rank received through
        SparseAllGather and sent through SparseReduceScatter, expert token copies it computed."""
        out: dict[str, float] = {"fssdp/overlap_budget": float(self.overlap_budget)}
        gather = reduce = tokens = prefetched = 0
        for i, st in enumerate(self.states):
            replicas = st.placement.sum(dim=1).float()
            out[f"fssdp/replicas_mean/layer{i}"] = float(replicas.mean())
            out[f"fssdp/replicas_max/layer{i}"] = float(replicas.max())
            gather += st.stats["gather_bytes"]
            reduce += st.stats["reduce_bytes"]
            tokens += st.stats["expert_tokens"]
            prefetched += st.stats["prefetched"]
            st.stats = {"gather_bytes": 0, "reduce_bytes": 0, "expert_tokens": 0, "prefetched": 0}
        steps = max(self.step - self._metrics_step, 1)
        self._metrics_step = self.step
        out["fssdp/gather_bytes_per_step"] = gather / steps
        out["fssdp/reduce_bytes_per_step"] = reduce / steps
        out["fssdp/expert_tokens_per_step"] = tokens / steps
        out["fssdp/prefetched_gathers_per_step"] = prefetched / steps
        return out
