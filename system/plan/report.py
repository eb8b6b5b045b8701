"""What ``moesys plan`` prints: a table of the fastest layouts that fit (or one line when none does), or JSON."""

from __future__ import annotations

from system.plan.activations import AC_MODES
from system.plan.estimate import Cluster, LayoutPlan, PlanResult
from system.plan.memory import StepShape

GIB = 2**30


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def no_fit_line(config: str, result: PlanResult, cluster: Cluster) -> str:
    """The one line printed when no layout fits."""
    where = f"{cluster.world} x {cluster.device.name} ({_gib(cluster.usable_bytes)} GiB usable per GPU)"
    if result.nearest is None:
        return f"no layout of {config} fits {where}: none of the candidate layouts is valid for this model and batch"
    n = result.nearest
    mode = min(n.memory, key=lambda m: n.memory[m].peak)
    return (f"no layout of {config} fits {where}: the smallest peak is {_gib(n.peak)} GiB per rank "
            f"({n.name}, activation checkpointing {mode})")


def header_lines(config: str, result: PlanResult, cluster: Cluster, step: StepShape) -> list[str]:
    """The lines above the table: cluster, device (with sources), model, step and assumptions."""
    d = cluster.device
    nodes = -(-cluster.world // cluster.gpus_per_node)
    rejected = ", ".join(f"{n} {why}" for why, n in result.rejected.most_common(4))
    return [
        f"moesys plan: {config} on {cluster.world} GPUs ({nodes} nodes x {cluster.gpus_per_node})",
        f"device: {d.describe()}",
        *(f"  source: {s}" for s in d.sources),
        f"model: {_count(result.total_params)} parameters, {_count(result.active_params)} active per token; step: "
        f"{step.global_batch} sequences x {step.seq_len} tokens = {result.tokens_per_step / 1e6:.2f}M tokens, "
        f"micro-batches of {step.micro_batch} sequence(s) per data stream, "
        f"{'bf16' if step.cb == 2 else 'fp32'} compute",
        f"assumptions: {cluster.memory_fraction:.0%} of memory usable ({_gib(cluster.usable_bytes)} GiB); matmuls at "
        f"{cluster.compute_efficiency:.0%} of peak; links at {cluster.link_efficiency:.0%}; TP, all-to-all and "
        f"pipeline transfers not overlapped, FSDP2 overlapped; balanced routing; 1F1B bubble",
        f"layouts: {result.considered} valid candidates, {len(result.fits)} fit"
        + (f" (left out before estimating: {rejected})" if rejected else ""),
    ]


def table_lines(result: PlanResult, top: int) -> list[str]:
    """The ranked table (memory per rank in GiB, communication per rank and step in GB), each row followed by
    its collectives."""
    head = (f"{'#':>3}  {'layout':<34} {'AC':<9} {'peak':>6} {'params':>6} {'grads':>6} {'optim':>6} {'work':>5} "
            f"{'act none/sel/full':>17} {'a2a':>5} {'nvlink':>7} {'net':>7} {'step s':>7} {'MFU':>6}")
    lines = [head]
    for i, lp in enumerate(result.fits[:top], 1):
        m = lp.memory[lp.ac]
        acts = "/".join(_gib(lp.memory[mode].activations) for mode in ("none", "selective", "full"))
        intra = sum(c.intra_bytes for c in lp.time.collectives)
        inter = sum(c.inter_bytes for c in lp.time.collectives)
        lines.append(f"{i:>3}  {lp.name:<34} {lp.ac:<9} {_gib(m.peak):>6} {_gib(m.params):>6} {_gib(m.grads):>6} "
                     f"{_gib(m.optimizer):>6} {_gib(m.working):>5} {acts:>17} {_gib(m.a2a):>5} {_gb(intra):>7} "
                     f"{_gb(inter):>7} {lp.time.step:>7.3f} {lp.time.mfu:>6.1%}")
        lines.append("     " + collectives_line(lp))
    return lines


def collectives_line(lp: LayoutPlan) -> str:
    """``name: X GB nvlink + Y GB net`` for each collective of the layout's step."""
    parts = []
    for c in lp.time.collectives:
        links = [f"{_gb(b)} GB {where}" for b, where in ((c.intra_bytes, "nvlink"), (c.inter_bytes, "net")) if b]
        parts.append(f"{c.name} x{c.calls}: {' + '.join(links) or '0 GB'}")
    return "comm/step: " + ("; ".join(parts) if parts else "none")


def legend_lines() -> list[str]:
    return [
        "columns: memory per rank in GiB (peak = the largest moment of the step, not the sum of the columns; act = "
        "activations kept under each activation-checkpointing mode; a2a = one MoE layer's all-to-all buffers); "
        "nvlink/net = GB each rank sends per step; AC = the fastest mode that fits",
    ]


def as_json(config: str, result: PlanResult, cluster: Cluster, step: StepShape, top: int, message: str | None) -> dict:
    """The plan as a JSON-ready object (bytes as integers, times in seconds)."""
    d = cluster.device
    return {
        "config": config,
        "cluster": {"world": cluster.world, "gpus_per_node": cluster.gpus_per_node},
        "device": {"name": d.name, "memory_bytes": int(d.memory_bytes), "peak_flops": d.peak_flops,
                   "tf32_flops": d.tf32_flops, "intra_node_bytes_per_s": d.intra_node_bps,
                   "inter_node_bytes_per_s": d.inter_node_bps, "sources": list(d.sources)},
        "assumptions": {"memory_fraction": cluster.memory_fraction, "compute_efficiency": cluster.compute_efficiency,
                        "link_efficiency": cluster.link_efficiency},
        "step": {"global_batch": step.global_batch, "seq_len": step.seq_len, "micro_batch": step.micro_batch,
                 "compute_bytes": step.cb, "tokens": result.tokens_per_step,
                 "model_flops": result.model_flops_per_step},
        "considered": result.considered,
        "rejected": dict(result.rejected),
        "fits": bool(result.fits),
        "message": message,
        "layouts": [layout_json(lp) for lp in result.fits[:top]],
        "nearest": layout_json(result.nearest) if result.nearest is not None else None,
    }


def layout_json(lp: LayoutPlan) -> dict:
    lay = lp.layout
    return {
        "name": lp.name,
        "layout": {"pp": lay.pp, "dp_replicate": lay.dp_replicate, "dp_shard": lay.dp_shard, "tp": lay.tp,
                   "ep": lay.ep, "expert_tp": lay.expert_tp, "expert_mode": lay.expert_mode, "dense": lay.dense,
                   "expert_dp": lay.expert_dp},
        "activation_checkpoint": lp.ac,
        "memory": {mode: lp.memory[mode].as_dict() for mode in AC_MODES},
        "time": {"compute_s": lp.time.compute, "comm_exposed_s": lp.time.comm_exposed, "bubble": lp.time.bubble,
                 "step_s": lp.time.step, "mfu": lp.time.mfu, "tokens_per_s": lp.time.tokens_per_s},
        "collectives": [c.as_dict() for c in lp.time.collectives],
    }
