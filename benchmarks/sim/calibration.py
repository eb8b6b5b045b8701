"""Calibration of the step model: per-op costs measured on this machine (``expert_parallel_sim.py``).

Two Gloo processes, one pinned core and one intra-op thread each (as ``expert_parallel.py`` runs its
ranks), measure at the same time (a barrier before every repeat), so the costs include the
contention of two busy cores. Per configuration of a measured run (model and batch shape):

- ``expert``: one SwiGLU expert forward and backward vs rows, the system's kernel
  (:func:`system.moe.experts.expert_swiglu`, what EP and FSSDP run);
- ``ds_expert``: the same for DeepSpeed's expert (the ``nn.Linear`` SwiGLU ``expert_parallel.py`` gives it);
- ``model``: the attention block; embedding + final norm + head + cross-entropy; the whole model with
  pass-through experts and forced balanced routing, whence the rest of a MoE layer (norm, router,
  top-k, sort, gathers, weighted combine, aux losses) per layer by difference;
- ``row_copy``: gathering rows of d elements (forward) and scatter-adding them (backward);
- ``optimizer``: grad scaling, the dense-gradient bucket copy, float64 clipping norms and AdamW
  (``system.train.optim.build_optimizer``) per parameter, on the parameters of one of 2 EP ranks.

And once: Gloo all-to-all, all-reduce, all-gather and reduce-scatter vs bytes, fitted as
``alpha + bytes / beta`` (:func:`fit_collective`).

Clocks (the machine is shared with other work): compute is timed in CPU seconds of the calling
thread (:func:`_cpu`), the median over repeats (wall medians are recorded next to them); a
collective is timed in wall seconds, the minimum over repeats. Then the mean of the two ranks.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import free_port, provenance, write_json

logger = logging.getLogger("benchmarks.expert_parallel_sim")

CALIB_KEYS = ("dim", "expert_dim", "experts", "top_k", "layers", "heads", "seq_len", "batch_size")


def config_key(c: dict[str, Any]) -> str:
    """The calibration key of a benchmark configuration (model and batch shape; not the world size)."""
    return ",".join(f"{k}={c[k]}" for k in CALIB_KEYS)


def _cpu() -> float:
    """CPU seconds of the calling thread: the compute clock of the calibration. With one intra-op
    thread, a CPU op (autograd's backward included) runs on the calling thread, so this is the time
    the op takes on a core of its own, whatever else shares the machine at calibration time."""
    return time.thread_time()


def _timed(fn, reps: int) -> tuple[float, float, float]:
    """Median forward and backward CPU seconds of ``fn() -> (fwd_s, bwd_s)`` over ``reps`` runs after
    one warm-up, and the median wall seconds of a run (recorded only: it includes waiting for the
    CPU when the machine is shared). Both ranks start every run together (a barrier), as the
    benchmark's ranks compute together."""
    import torch.distributed as dist

    fn()
    fw, bw, wall = [], [], []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        f, b = fn()
        wall.append(time.perf_counter() - t0)
        fw.append(f)
        bw.append(b)
    return statistics.median(fw), statistics.median(bw), statistics.median(wall)


def _expert_fn(module_or_weights, rows: int, d: int):
    """Forward + backward of one expert on ``rows`` rows: system kernel (weights) or an nn.Module."""
    from system.moe.experts import expert_swiglu

    x = torch.randn(rows, d).requires_grad_()
    g = torch.randn(rows, d)
    counts = torch.tensor([rows])

    def fn():
        t0 = _cpu()
        if isinstance(module_or_weights, torch.nn.Module):
            y = module_or_weights(x)
        else:
            y = expert_swiglu(x, *module_or_weights, counts)
        t1 = _cpu()
        y.backward(g)
        t2 = _cpu()
        x.grad = None
        return t1 - t0, t2 - t1

    return fn


class _LinearSwiGLU(torch.nn.Module):
    """The expert ``expert_parallel.py`` gives ``deepspeed.moe.layer.MoE``: ``w2(silu(w1 x) * w3 x)``,
    three bias-free ``nn.Linear`` (DeepSpeed's ``Experts`` calls it on each local expert's rows)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = torch.nn.Linear(dim, hidden, bias=False)
        self.w2 = torch.nn.Linear(hidden, dim, bias=False)
        self.w3 = torch.nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class _PassThrough(torch.nn.Module):
    """Stands for a layer's experts in the calibration of everything else: ``(x, counts) -> x``."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x * 1.0


def _measure_compute(c: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Per-op compute costs of one configuration on this rank (see the module docstring)."""
    import torch.nn.functional as F

    from benchmarks.expert_parallel import WorkloadParams, forced_indices, model_configs, parse_args
    from system.models.model import MoETransformer
    from system.train.optim import build_optimizer

    # the benchmark's own defaults for everything but the shape (its parser fills them)
    ns = parse_args([f"--{k.replace('_', '-')}={c[k]}" for k in CALIB_KEYS])
    model_cfg, moe_cfg, train_cfg = model_configs(ns)
    d, f, E, k, L = c["dim"], c["expert_dim"], c["experts"], c["top_k"], c["layers"]
    B, S = c["batch_size"], c["seq_len"]
    T = B * S
    reps = 2 if quick else 5
    fractions = (1 / 16, 1 / 2, 1) if quick else (1 / 64, 1 / 16, 1 / 4, 1 / 2, 1)
    grid = sorted({0, *[max(1, int(2 * T * x)) for x in fractions]})
    out: dict[str, Any] = {"config": {k: c[k] for k in CALIB_KEYS}, "key": config_key(c), "reps": reps}
    weights = [(torch.randn(1, d, f) * 0.02).requires_grad_(), (torch.randn(1, f, d) * 0.02).requires_grad_(),
               (torch.randn(1, d, f) * 0.02).requires_grad_()]
    ds = _LinearSwiGLU(d, f)
    for name, impl in (("expert", weights), ("ds_expert", ds)):
        fw, bw, wall = [], [], []
        for rows in grid:
            a, b, w = _timed(_expert_fn(impl, rows, d), reps if rows < T else max(2, reps - 2))
            fw.append(a)
            bw.append(b)
            wall.append(w)
        out[name] = {"rows": grid, "fwd_s": fw, "bwd_s": bw, "wall_s": wall}

    torch.manual_seed(1234)
    model = MoETransformer(model_cfg, moe_cfg)
    model.init_weights(seed=1234)
    params = WorkloadParams(E, k, 2, 1234)
    for i, moe in enumerate(model.moe_layers()):
        moe.experts = _PassThrough()
        moe.router.forced_indices = forced_indices("balanced", 0, i, 0, T, params)
    vocab = model_cfg.vocab_size
    tokens = torch.randint(0, vocab, (B, S))
    targets = torch.randint(0, vocab, (B, S))

    def whole():
        t0 = _cpu()
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()) + model.aux_loss()
        t1 = _cpu()
        loss.backward()
        t2 = _cpu()
        model.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1

    block = model.layers[0]
    xa = torch.randn(B, S, d).requires_grad_()
    ga = torch.randn(B, S, d)
    rope = model.rope[:S]

    def attention():
        t0 = _cpu()
        h = block.attention(block.attention_norm(xa), rope)
        t1 = _cpu()
        h.backward(ga)
        t2 = _cpu()
        model.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1

    def head():
        t0 = _cpu()
        h = model.tok_embeddings(tokens)
        h = model.norm(h)
        logits = F.linear(h, model.tok_embeddings.weight) if model.output is None else model.output(h)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        t1 = _cpu()
        loss.backward()
        t2 = _cpu()
        model.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1

    wf, wb, ww = _timed(whole, reps)
    af, ab, aw = _timed(attention, reps)
    hf, hb, hw = _timed(head, reps)
    out["model"] = {
        "whole_passthrough_fwd_s": wf, "whole_passthrough_bwd_s": wb,
        "attention_fwd_s": af, "attention_bwd_s": ab, "head_fwd_s": hf, "head_bwd_s": hb,
        # the rest of a MoE layer (norm, router, top-k, sort, gathers, combine, losses), per layer
        "moe_other_fwd_s": max(0.0, (wf - hf - L * af) / L), "moe_other_bwd_s": max(0.0, (wb - hb - L * ab) / L),
        "dense_params": sum(p.numel() for p in model.parameters()),
        "wall_s": {"whole_passthrough": ww, "attention": aw, "head": hw},
    }

    n = 2 * T * k
    src = torch.randn(n, d).requires_grad_()
    idx = torch.randperm(n)
    gi = torch.randn(n, d)

    def gather():
        t0 = _cpu()
        y = src.index_select(0, idx)
        t1 = _cpu()
        y.backward(gi)
        t2 = _cpu()
        src.grad = None
        return t1 - t0, t2 - t1

    rf, rb, _ = _timed(gather, reps)
    out["row_copy"] = {"rows": n, "fwd_s_per_row": rf / n, "bwd_s_per_row": rb / n}

    # optimizer: this rank's parameters at W = 2 (dense + E/2 experts per layer), as the trainer updates them
    holder = torch.nn.Module()
    dense = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    el = max(E // 2, 1)
    experts = [torch.nn.Parameter(torch.randn(el, *shape) * 0.02)
               for _ in range(L) for shape in ((d, f), (f, d), (d, f))]
    holder.params = torch.nn.ParameterList(dense + experts)
    for p in holder.params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = build_optimizer(holder, train_cfg)
    grads = [p.grad for p in holder.params]
    dense_grads = grads[: len(dense)]

    def optimizer():
        t0 = _cpu()
        flat = torch.cat([g.reshape(-1) for g in dense_grads])  # sync_gradients' bucket of dense grads
        flat.mul_(0.5)
        off = 0
        for g in dense_grads:
            g.copy_(flat[off: off + g.numel()].view_as(g))
            off += g.numel()
        for g in grads[len(dense):]:
            g.mul_(0.5)
        sq = sum(torch.linalg.vector_norm(g, dtype=torch.float64).square() for g in grads)
        torch._foreach_mul_(grads, torch.clamp(1.0 / (sq.sqrt().float() + 1e-6), max=1.0))
        opt.step()
        return _cpu() - t0, 0.0

    of, _, ow = _timed(optimizer, reps)
    nparams = sum(p.numel() for p in holder.params)
    out["optimizer"] = {"params": nparams, "seconds": of, "s_per_param": of / nparams, "wall_s": ow}
    return out


def _reference_matmul() -> dict[str, float]:
    """GFLOP/s of a 1024^3 fp32 matmul on this rank: CPU-time median and wall-time best of 10."""
    import torch.distributed as dist

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    cpu, wall = [], []
    dist.barrier()
    for _ in range(10):
        t0, c0 = time.perf_counter(), _cpu()
        a @ b
        cpu.append(_cpu() - c0)
        wall.append(time.perf_counter() - t0)
    flops = 2 * 1024 ** 3
    return {"cpu_time": flops / statistics.median(cpu) / 1e9, "wall_best": flops / min(wall) / 1e9}


def _measure_comm(quick: bool) -> dict[str, Any]:
    """Gloo collectives vs bytes between this machine's 2 processes, fitted as ``alpha + bytes / beta``."""
    import torch.distributed as dist

    world = dist.get_world_size()
    sizes = [8, 1 << 18, 1 << 22] if quick else [8, 1 << 16, 1 << 19, 1 << 21, 1 << 23]
    reps = 3 if quick else 7
    raw: dict[str, list[tuple[int, float]]] = {"all_to_all": [], "all_reduce": [], "all_gather": [], "reduce_scatter": []}

    def run(op) -> float:
        """Minimum wall seconds over the repeats: the collective without waits for a busy CPU."""
        op()
        ts = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            op()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    for b in sizes:
        n = max(b // 4, 2)
        send = torch.zeros(world * b, dtype=torch.uint8)
        recv = torch.empty_like(send)
        splits = [b] * world  # b bytes to every rank, this one included: b remote bytes per peer
        raw["all_to_all"].append((b, run(lambda: dist.all_to_all_single(recv, send, splits, splits))))
        t = torch.zeros(n)
        raw["all_reduce"].append((b, run(lambda: dist.all_reduce(t))))
        big = torch.empty(world * n)
        raw["all_gather"].append((b, run(lambda: dist.all_gather_into_tensor(big, t))))
        raw["reduce_scatter"].append((b, run(lambda: dist.reduce_scatter_tensor(t, big))))
    out: dict[str, Any] = {"world": world, "sizes_bytes": sizes, "reps": reps}
    for name, pts in raw.items():
        out[name] = {"samples": [[b, s] for b, s in pts]}
    return out


def fit_collective(samples: list[list[float]]) -> dict[str, float]:
    """``alpha`` = the time of the smallest message; ``bytes_per_s`` = 1 / least-squares slope of the
    remaining time through the origin over the larger messages."""
    pts = sorted(samples)
    alpha = pts[0][1]
    rest = [(b, t - alpha) for b, t in pts[1:]]
    slope = sum(b * t for b, t in rest) / max(sum(b * b for b, _ in rest), 1e-30)
    return {"alpha_s": alpha, "bytes_per_s": 1.0 / max(slope, 1e-15)}


def _mean_tree(items: list[Any]) -> Any:
    """Element-wise mean of identically shaped JSON trees (numbers averaged; other leaves from the first)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _mean_tree([x[k] for x in items]) for k in first}
    if isinstance(first, list):
        return [_mean_tree([x[i] for x in items]) for i in range(len(first))]
    if isinstance(first, float):
        return float(np.mean(items))
    return first


def _calibrate_rank(local_rank: int, world: int, port: int, configs: list[dict[str, Any]], quick: bool,
                    out_path: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pinned = None
    if len(cpus) >= world:
        os.sched_setaffinity(0, [cpus[local_rank]])
        pinned = cpus[local_rank]
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    dist.init_process_group("gloo")
    t0 = time.perf_counter()
    load0 = list(os.getloadavg())
    reference = _reference_matmul()
    entries = [_measure_compute(c, quick) for c in configs]
    comm = _measure_comm(quick)
    mine = {"entries": entries, "comm": comm, "pinned": pinned, "reference": reference}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if local_rank == 0:
        comm_mean = _mean_tree([g["comm"] for g in gathered])
        for name in ("all_to_all", "all_reduce", "all_gather", "reduce_scatter"):
            comm_mean[name]["fit"] = fit_collective(comm_mean[name]["samples"])
        result = {
            "kind": "expert_parallel_sim calibration",
            "method": "2 Gloo processes, one pinned core and one intra-op thread each, measuring at the same time "
                      "(a barrier before every repeat); compute: median thread CPU time over repeats; collectives: "
                      "minimum wall time over repeats; then the mean of the two ranks",
            "quick": quick,
            "configs": {e["key"]: e for e in _mean_tree([g["entries"] for g in gathered])},
            "comm": comm_mean,
            "pinned_cpus": [g["pinned"] for g in gathered],
            # machine speed at calibration time, to compare calibrations (and hosts) with each other
            "reference_matmul_gflops_per_rank": [g["reference"] for g in gathered],
            "seconds": time.perf_counter() - t0,
            "loadavg_1_5_15_at_start": load0,
            "loadavg_1_5_15_at_end": list(os.getloadavg()),
            "provenance": provenance(),
        }
        write_json(out_path, result)
    dist.barrier()
    dist.destroy_process_group()


def calibrate(configs: list[dict[str, Any]], out_path: Path, quick: bool) -> dict[str, Any]:
    """Measure the per-op costs of ``configs`` with 2 spawned processes; write and return the calibration."""
    import torch.multiprocessing as mp

    unique = {config_key(c): {k: c[k] for k in CALIB_KEYS} for c in configs}
    logger.info("calibrating %d configuration(s) with 2 processes%s: %s", len(unique), " (quick)" if quick else "",
                "; ".join(unique))
    t0 = time.perf_counter()
    mp.start_processes(_calibrate_rank, args=(2, free_port(), list(unique.values()), quick, str(out_path)),
                       nprocs=2, start_method="spawn")
    cal = json.loads(Path(out_path).read_text())
    logger.info("calibration written to %s in %.1f s", out_path, time.perf_counter() - t0)
    return cal


def load_calibration(path: str) -> dict[str, Any]:
    """A calibration file, or the ``calibration`` of a results file of this script."""
    data = json.loads(Path(path).read_text())
    return data.get("calibration", data)


def comm_fits(cal: dict[str, Any]) -> dict[str, Any]:
    return {name: cal["comm"][name]["fit"] for name in ("all_to_all", "all_reduce", "all_gather", "reduce_scatter")}
