"""Saving and loading a trained model as one consolidated safetensors file plus its job config.

A plain, correct format: every tensor under its fully qualified name with its *global* shape
(experts on the global expert axis ``[E, ...]``, FSDP2 shards gathered), so the file loads under
any expert-parallel degree or world size. Loading reads only the rows each rank holds
(``safe_open(...).get_slice``). Written to a temporary folder and renamed into place, so a crash
during the save never leaves a half-written model under the final name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from system.moe.experts import ExpertModule
from system.parallel.expert_parallel import gather_experts

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _fssdp_owner(model: nn.Module, name: str):
    """The FSSDP experts module whose ``owned`` buffer ``name`` is, else None."""
    module_name, _, leaf = name.rpartition(".")
    if leaf != "owned":
        return None
    module = model.get_submodule(module_name)
    return module if hasattr(module, "full_weights") else None


def _expert_owner(model: nn.Module, name: str) -> ExpertModule | None:
    module_name, _, _ = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return module if isinstance(module, ExpertModule) else None


@torch.no_grad()
def full_state_dict(model: nn.Module, mesh: DeviceMesh) -> dict[str, torch.Tensor]:
    """Global-shape CPU tensors of every parameter and persistent buffer (a collective: call on all ranks).

    Expert weights are all-gathered over ``mesh["ep"]`` into ``[E, ...]``; FSDP2 DTensors are
    gathered with ``full_tensor()``.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        fssdp = _fssdp_owner(model, name)
        if fssdp is not None:
            prefix = name.rpartition(".")[0]
            for wname, w in fssdp.full_weights().items():
                out[f"{prefix}.{wname}"] = w.detach().to("cpu").contiguous()
            continue
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        elif _expert_owner(model, name) is not None:
            tensor = gather_experts(tensor, mesh)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_model(model: nn.Module, mesh: DeviceMesh, path: str | Path, config: dict) -> Path | None:
    """Write ``path/model.safetensors`` and ``path/config.json`` (a collective; rank 0 writes).

    Args:
        model: the (possibly parallelised) model.
        mesh: the ``("dp", "ep")`` mesh.
        path: destination folder; replaced atomically if it exists.
        config: the job config as a plain dict (saved for inference and resuming).

    Returns:
        The folder on rank 0, ``None`` on other ranks.
    """
    tensors = full_state_dict(model, mesh)
    result = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        result = write_model(tensors, path, config)
    if dist.is_initialized():
        dist.barrier()
    return result


def write_model(tensors: dict[str, torch.Tensor], path: str | Path, config: dict) -> Path:
    """Write full tensors as ``path/model.safetensors`` + ``path/config.json`` (one process).

    The folder is built under a temporary name, fsynced and renamed into place, so a crash never
    leaves a half-written model under ``path``.

    Returns:
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "producer": "moe-system"})
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


@torch.no_grad()
def load_model(model: nn.Module, path: str | Path) -> None:
    """Load ``path/model.safetensors`` into ``model``, each rank reading only what it holds.

    Expert weights take rows ``[expert_offset, expert_offset + E_local)`` of the saved global axis;
    FSDP2 DTensors take their local shard; everything else is copied whole.

    Raises:
        FileNotFoundError: the model file is missing.
        KeyError: a tensor of the model is absent from the file (named).
        ValueError: a saved shape differs from the model's global shape (tensor and shapes named).
    """
    file = Path(path) / MODEL_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no saved model at {file}")
    state = model.state_dict()
    with safe_open(str(file), framework="pt", device="cpu") as f:
        saved = set(f.keys())
        for name, target in state.items():
            fssdp = _fssdp_owner(model, name)
            if fssdp is not None:
                _load_fssdp_rows(f, file, name.rpartition(".")[0], fssdp, target)
                continue
            if name not in saved:
                raise KeyError(f"tensor {name!r} missing from {file}")
            sl = f.get_slice(name)
            saved_shape = tuple(sl.get_shape())
            owner = _expert_owner(model, name)
            if owner is not None:
                global_shape = (owner.num_global_experts,) + tuple(target.shape[1:])
                _check_shape(name, file, saved_shape, global_shape)
                lo = owner.expert_offset
                target.copy_(sl[lo : lo + target.shape[0]])
            elif isinstance(target, DTensor):
                _check_shape(name, file, saved_shape, tuple(target.shape))
                full = sl[:].to(target.dtype)
                local = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
                target.to_local().copy_(local.to_local())
            else:
                _check_shape(name, file, saved_shape, tuple(target.shape))
                target.copy_(sl[:])


def _load_fssdp_rows(f, file: Path, prefix: str, module, target: torch.Tensor) -> None:
    """Fill an FSSDP owned buffer ``[n_owned, P]`` from the saved global expert tensors (kind's layout)."""
    num = module.num_global_experts
    owned = module.state.ownership.owned(module.state.rank).tolist()
    offset = 0
    for wname, per_expert in module.kind.layout:
        key = f"{prefix}.{wname}"
        if key not in f.keys():
            raise KeyError(f"tensor {key!r} missing from {file}")
        sl = f.get_slice(key)
        _check_shape(key, file, tuple(sl.get_shape()), (num, *per_expert))
        width = math.prod(per_expert)
        for row, expert in enumerate(owned):
            target[row, offset : offset + width].copy_(sl[expert : expert + 1].reshape(-1))
        offset += width


def _check_shape(name: str, file: Path, saved: tuple, expected: tuple) -> None:
    if saved != tuple(expected):
        raise ValueError(f"tensor {name!r} in {file} has shape {list(saved)}, the model expects {list(expected)}")


def read_config(path: str | Path) -> dict:
    """The job config dict saved beside a model."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} at {file}")
    return json.loads(file.read_text())
