"""Run a function on N real processes joined in a Gloo process group (CPU), collect results."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()
        raise
    from system.distributed.init import shutdown_distributed

    shutdown_distributed()


def run_workers(fn, world: int, *args, timeout: float = 300.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes; return the per-rank results.

    Raises:
        RuntimeError: with the worker's traceback when any rank fails.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, out_dir, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        results = []
        for r in range(world):
            f = Path(out_dir) / f"rank{r}.pt"
            if not f.exists():
                raise RuntimeError(f"rank {r} produced no result (exit code {procs[r].exitcode})")
            data = torch.load(f, weights_only=False)
            if not data["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{data['error']}")
            results.append(data["result"])
        return results


def full_grads(model) -> dict:
    """Every parameter's gradient in its single-device name and global shape (a collective over the ranks
    that hold parts of it), read from the layout records: FSSDP rows gathered from their owners, DTensors with
    ``full_tensor()``, plain sharded blocks gathered over their shard group."""
    from torch.distributed.tensor import DTensor

    from system.checkpoint.model_io import gather_box
    from system.parallel.layout import layout_of

    out = {}
    for name, p in model.named_parameters():
        g, lay = p.grad, layout_of(p)
        if lay.rows is not None:  # FSSDP: gather the owners' rows into the global [E, ...] layout
            module = lay.rows.module
            saved = module.owned.data
            module.owned.data = g
            for wname, w in lay.rows.full_weights().items():
                out[name.rpartition(".")[0] + "." + wname] = w.clone()
            module.owned.data = saved
            continue
        if isinstance(g, DTensor):
            g = g.full_tensor()
        elif lay.offsets is not None and tuple(g.shape) != tuple(lay.global_shape):
            g = gather_box(g, lay)
        out[name] = g.detach().clone()
    return out
