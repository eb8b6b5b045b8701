"""Process-group initialisation: backend and device selection for torchrun-launched ranks."""

from __future__ import annotations

import datetime
import gc
import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> torch.device:
    """The compute device of this rank: ``cuda:LOCAL_RANK`` on CUDA, else ``cpu``.

    Raises:
        ValueError: ``device="cuda"`` without a CUDA device.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("parallel.device='cuda' but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ValueError(f"parallel.device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device("cpu")


def pick_backend(device: torch.device, backend: str = "auto") -> str:
    """``nccl`` for CUDA devices, ``gloo`` for CPU, unless overridden."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"parallel.backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("parallel.backend='nccl' needs CUDA devices; use 'gloo' on CPU")
    return backend


def init_distributed(device: torch.device, backend: str = "auto", timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (idempotent).

    A single process without ``RANK``/``WORLD_SIZE`` set gets a one-rank group on a free local port,
    so the same code path runs under plain ``python``. A default group that already exists (one a
    launcher made, e.g. Ray Train's ``TorchTrainer``, which sets ``MASTER_ADDR``/``RANK``/``WORLD_SIZE``
    and picks ``gloo`` for CPU workers, ``nccl`` for GPU ones) is used as it is, after checking that
    its backend can carry ``device``'s tensors (see :func:`check_existing_group`).

    Returns:
        ``(rank, world_size)``.

    Raises:
        ValueError: an existing group whose backend does not fit ``device`` or ``backend``.
    """
    if dist.is_initialized():
        check_existing_group(device, backend)
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    name = pick_backend(device, backend)
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(name, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    logger.info("process group: backend=%s world_size=%d", name, dist.get_world_size())
    return dist.get_rank(), dist.get_world_size()


def check_existing_group(device: torch.device, backend: str = "auto") -> None:
    """Check that the already-initialised default process group suits ``device`` and ``backend``.

    ``backend="auto"`` expects ``nccl`` for CUDA devices and ``gloo`` for CPU (:func:`pick_backend`);
    an explicit ``nccl`` or ``gloo`` must be the group's backend. A group of several backends (such as
    ``cpu:gloo,cuda:nccl``) passes when it has the one expected for the device.

    Raises:
        ValueError: naming the group's backend, the device and the expected backend.
    """
    expected = pick_backend(device, backend)
    actual = str(dist.get_backend()).lower()
    parts = {p.split(":")[-1] for p in actual.split(",")}
    if expected not in parts:
        raise ValueError(
            f"the default process group was already initialised with backend {actual!r} (by the launcher), "
            f"but device {device} with parallel.backend={backend!r} needs {expected!r}; "
            + ("give the workers GPUs (moesys launch --gpus-per-worker 1) or set --parallel.device cpu"
               if expected == "nccl" else "set --parallel.backend to the launcher's backend")
        )
    logger.info("process group: using the existing group (backend=%s, world_size=%d)", actual, dist.get_world_size())


def shutdown_distributed() -> None:
    """End a job that finished cleanly on every rank: barrier, then destroy all process groups.

    The barrier holds each rank until all ranks are done with their last collective, so no rank
    tears down its Gloo/NCCL connections (and then the interpreter) while a peer, or one of its own
    backend worker threads, is still finishing the previous operation. Without it a rank that left
    first was seen once in CI to abort at interpreter exit ("terminate called without an active
    exception"), the symptom of the Gloo teardown race in pytorch/pytorch#179291.
    Call it only on the success path: after an exception the peers may be stuck in a collective and
    the barrier would wait out the group's timeout (TorchTitan makes the same choice). A no-op when
    no default group exists.
    """
    if not dist.is_initialized():
        return
    gc.collect()  # drop modules, meshes and work handles that still reference the groups
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
