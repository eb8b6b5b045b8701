"""Saving and loading a trained model as one consolidated safetensors file plus its job config.

A plain, correct format: every tensor under its fully qualified name with its *global* shape
(experts on the global expert axis ``[E, ...]``, FSDP2 shards gathered), so the file loads under
any expert-parallel degree or world size. Loading reads only the rows each rank holds
(``safe_open(...).get_slice``). Written to a temporary folder and renamed into place, so a crash
during the save never leaves a half-written model under the final name, and never deletes or
replaces anything it did not write (see :func:`write_model`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from system.checkpoint.errors import CheckpointError, ExportTargetError, ModelFileError, ModelNotFoundError
from system.checkpoint.storage import apply_umask, fsync_path, swap_in_dir
from system.parallel.layout import FSSDPRows, ParamLayout, has_layout, named_layouts, single_process_layout

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_MARKER = ".moesys-export.json"
"""Written into every export folder: ``{"producer", "format", "created_unix_s", "files"}``; only a folder
carrying it (and holding nothing beyond ``files``) may be replaced by a later export."""
EXPORT_PRODUCER = "moe-system"


def _layouts(model: nn.Module) -> dict[str, ParamLayout]:
    """``{fqn: layout record}`` of every parameter (a model never parallelised is recorded as held whole)."""
    if not all(has_layout(p) for p in model.parameters()):
        single_process_layout(model)
    return {name: lay for name, _, lay in named_layouts(model)}


@torch.no_grad()
def gather_box(local: torch.Tensor, lay: ParamLayout) -> torch.Tensor:
    """The global tensor ``lay.global_shape`` assembled from the equal-shaped blocks the ranks of
    ``lay.shard_group`` hold at their ``lay.offsets`` (a collective over that group)."""
    local = local.detach().contiguous()
    if lay.shard_group is None or dist.get_world_size(lay.shard_group) == 1:
        return local.clone()
    n = dist.get_world_size(lay.shard_group)
    blocks = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(blocks, local, group=lay.shard_group)
    offs = torch.tensor(lay.offsets, dtype=torch.int64, device=local.device)
    all_offs = [torch.empty_like(offs) for _ in range(n)]
    dist.all_gather(all_offs, offs, group=lay.shard_group)
    full = local.new_empty(lay.global_shape)
    for block, off in zip(blocks, all_offs):
        full[tuple(slice(o, o + s) for o, s in zip(off.tolist(), block.shape))] = block
    return full


@torch.no_grad()
def full_state_dict(model: nn.Module, mesh: DeviceMesh | None = None) -> dict[str, torch.Tensor]:
    """Global-shape CPU tensors of every parameter and persistent buffer (a collective: call on all ranks).

    Read from each parameter's layout record: FSSDP rows gathered from their owners into ``[E, ...]``,
    DTensors (FSDP2, TP) with ``full_tensor()``, expert-parallel blocks all-gathered over their shard group
    (:func:`gather_box`). ``mesh`` is unused (kept for callers of the earlier signature).
    """
    layouts = _layouts(model)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        lay = layouts.get(name)
        if lay is not None and lay.rows is not None:
            prefix = name.rpartition(".")[0]
            for wname, w in lay.rows.full_weights().items():
                out[f"{prefix}.{wname}"] = w.detach().to("cpu").contiguous()
            continue
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        elif lay is not None and lay.offsets is not None and tuple(tensor.shape) != tuple(lay.global_shape):
            tensor = gather_box(tensor, lay)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_model(model: nn.Module, mesh: DeviceMesh, path: str | Path, config: dict, *,
               overwrite: bool = False, pp_group=None) -> Path | None:
    """Write ``path/model.safetensors`` and ``path/config.json`` (a collective; rank 0 writes).

    Args:
        model: the (possibly parallelised) model, or under pipeline parallelism this rank's stages
            (:class:`~system.parallel.pp.PipelineParts`).
        mesh: the ``("dp", "ep")`` mesh.
        path: destination folder (see :func:`write_model` for what may already be there).
        config: the job config as a plain dict (saved for inference and resuming).
        overwrite: replace an earlier export at ``path`` (never anything else).
        pp_group: under pipeline parallelism, this rank's pp process group: the stages' tensors of the
            ranks in rank 0's pp group (one rank of every stage) are gathered to rank 0.

    Returns:
        The folder on rank 0, ``None`` on other ranks.

    Raises:
        ExportTargetError, CheckpointError: on rank 0, see :func:`write_model` (the other ranks
            still reach the barrier, so none is left waiting).
    """
    tensors = full_state_dict(model, mesh)
    if pp_group is not None:
        tensors = _gather_stages(tensors, pp_group)
    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = write_model(tensors, path, config, overwrite=overwrite)
        except CheckpointError as e:
            error = e
    if dist.is_initialized():
        dist.barrier()
    if error is not None:
        raise error
    return result


def _gather_stages(tensors: dict[str, torch.Tensor], pp_group) -> dict[str, torch.Tensor]:
    """Rank 0's pp group holds one rank of every pipeline stage: their (CPU) tensors are pickled to rank 0
    (``gather_object``) and merged there; other ranks keep their own."""
    if dist.get_process_group_ranks(pp_group)[0] != 0:
        return tensors
    parts = [None] * dist.get_world_size(pp_group) if dist.get_rank() == 0 else None
    dist.gather_object(tensors, parts, dst=0, group=pp_group)
    if parts is None:
        return tensors
    return {name: t for part in parts for name, t in part.items()}


def _read_marker(path: Path) -> dict | None:
    """The export marker of folder ``path`` (``None`` when there is none).

    Raises:
        ExportTargetError: the marker exists but is not one this code wrote.
    """
    marker = path / EXPORT_MARKER
    if not marker.exists() and not marker.is_symlink():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportTargetError(f"{marker} cannot be read as an export marker ({e}); not replacing {path}") from None
    files = data.get("files") if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("producer") != EXPORT_PRODUCER or not isinstance(files, list)
            or not all(isinstance(f, str) for f in files)):
        raise ExportTargetError(f"{marker} is not a {EXPORT_PRODUCER} export marker; not replacing {path}")
    return data


def check_export_target(path: str | Path, overwrite: bool) -> bool:
    """Whether ``path`` may become an export (:func:`write_model`'s rules; nothing is touched): True when
    an earlier export is to be replaced, False when there is nothing there (or an empty folder).

    Raises:
        ExportTargetError: ``path`` is a file, a link or anything not a folder; a non-empty folder
            without the export marker; an earlier export and ``overwrite`` is False; an earlier
            export holding files its marker does not list (they would be lost).
    """
    path = Path(os.path.abspath(path))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ExportTargetError(f"cannot examine the export target {path}: {e}") from None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file" if stat.S_ISREG(st.st_mode) else \
            "not a folder"
        raise ExportTargetError(f"export target {path} exists and is {kind}; not replacing it: choose another --out")
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        raise ExportTargetError(f"cannot list the export target {path}: {e}") from None
    if not entries:
        return False
    marker = _read_marker(path)
    if marker is None:
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise ExportTargetError(
            f"export target {path} is a non-empty folder that is not an earlier export (no {EXPORT_MARKER}; it "
            f"holds {shown}); not replacing it, even with --overwrite: choose another --out"
        )
    if not overwrite:
        raise ExportTargetError(f"export target {path} holds an earlier export; pass --overwrite to replace it")
    extra = sorted(set(entries) - set(marker["files"]) - {EXPORT_MARKER})
    if extra:
        raise ExportTargetError(
            f"export target {path} holds an earlier export plus files it did not write ({', '.join(extra)}); "
            f"they would be lost: move them away or choose another --out"
        )
    return True


def write_model(tensors: dict[str, torch.Tensor], path: str | Path, config: dict, *, overwrite: bool = False) -> Path:
    """Write full tensors as ``path/model.safetensors`` + ``path/config.json`` (one process).

    The folder also gets :data:`EXPORT_MARKER` (producer, format, creation time, the files written),
    which is how a later export recognises what it may replace. Nothing this function did not create
    is ever deleted or replaced:

    - ``path`` missing or an empty folder: the export is built in a unique hidden sibling
      (``.<name>.tmp-XXXX``), fsynced and renamed into place;
    - ``path`` an earlier export (marker present) and ``overwrite``: built the same way, then swapped in
      (the old folder is renamed to a unique hidden sibling, the new one renamed to ``path``, the old
      one deleted), so ``path`` never holds half a model;
    - anything else (a file, a link, a folder without the marker, an export holding other files, or an
      export without ``overwrite``): :class:`ExportTargetError` and nothing is touched.

    On any failure only the temporary sibling is removed.

    Returns:
        ``path``.

    Raises:
        ExportTargetError: ``path`` must not be replaced (the reason and the way out are named).
        CheckpointError: writing failed (the OS error and the folder are named).
    """
    def write_files(tmp: Path) -> list[str]:
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "producer": EXPORT_PRODUCER})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        return [MODEL_FILE, CONFIG_FILE]

    return build_export(path, write_files, fmt="safetensors", overwrite=overwrite)


def build_export(path: str | Path, write_files: Callable[[Path], list[str]], *, fmt: str,
                 overwrite: bool = False) -> Path:
    """Make the export folder ``path`` under :func:`write_model`'s safety rules; ``write_files`` fills it.

    ``path`` is checked (:func:`check_export_target`), then ``write_files(tmp)`` writes the export
    into a fresh hidden sibling ``tmp`` and returns the names of the files it wrote there; this adds
    :data:`EXPORT_MARKER` (``fmt`` and those names), gives the files the umask's modes, fsyncs every
    file and the folder, and renames (for an earlier export and ``overwrite``: swaps) it into place.
    On any failure, including one raised by ``write_files``, only ``tmp`` is removed.

    Returns:
        ``path`` (absolute).

    Raises:
        ExportTargetError: ``path`` must not be replaced, or its parent cannot be created.
        CheckpointError: writing failed with an ``OSError`` (the folder is named).
        Whatever ``write_files`` raises.
    """
    path = Path(os.path.abspath(path))
    replace = check_export_target(path, overwrite)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.tmp-"))
    except OSError as e:
        raise ExportTargetError(f"cannot create the export folder {path}: {e}") from None
    try:
        files = list(write_files(tmp))
        marker = {"producer": EXPORT_PRODUCER, "format": fmt, "created_unix_s": time.time(), "files": files}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2))
        apply_umask(tmp)
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        if replace:
            swap_in_dir(tmp, path)
        else:
            os.rename(tmp, path)  # fails (ENOTEMPTY/ENOTDIR) rather than clobber anything created meanwhile
        fsync_path(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write the export {path}: {e}") from e
        raise
    return path


class SafetensorsReader:
    """Our consolidated ``model.safetensors`` behind the reader interface :func:`load_weights` uses
    (``shape(name)``, ``read_into(name, dst, start)``, ``bytes_read``), through ``safe_open(...).get_slice``.

    Raises:
        ModelFileError: the file is not valid safetensors.
    """

    def __init__(self, file: Path):
        self.file = file
        self.bytes_read = 0
        try:
            self._cm = safe_open(str(file), framework="pt", device="cpu")
            self._f = self._cm.__enter__()
        except SafetensorError as e:
            raise ModelFileError(f"{file} is not a valid safetensors file: {e}") from None
        self._keys = set(self._f.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def shape(self, name: str) -> tuple[int, ...]:
        """Saved global shape of ``name`` (``KeyError`` naming the file when absent)."""
        if name not in self._keys:
            raise KeyError(f"tensor {name!r} missing from {self.file}")
        return tuple(self._f.get_slice(name).get_shape())

    def read_into(self, name: str, dst: torch.Tensor, start: int = 0) -> None:
        """Copy rows ``[start, start + dst.shape[0])`` (axis 0) of ``name`` into ``dst`` (all of it for a 0-d tensor)."""
        sl = self._f.get_slice(name)
        value = sl[start : start + dst.shape[0]] if dst.dim() else sl[:]
        self.bytes_read += value.numel() * value.element_size()
        dst.copy_(value)

    def close(self) -> None:
        """Close the file."""
        self._cm.__exit__(None, None, None)


def open_weights(model: nn.Module, path: str | Path):
    """The reader of the weights at ``path`` for ``model``: a Hugging Face folder
    (:class:`system.hf.weights.HFCheckpoint`, ``config.json`` with a ``model_type``) or our model folder
    (:class:`SafetensorsReader`).

    Raises:
        ModelNotFoundError: the folder or its weights file is missing.
        ModelFileError: the file is not valid safetensors.
        HFCheckpointError: a Hugging Face folder that cannot be read (see :class:`~system.hf.weights.HFCheckpoint`).
    """
    from system.hf.config import is_hf_folder

    if is_hf_folder(path):
        from system.hf.weights import HFCheckpoint

        layouts = _layouts(model)
        shapes = {name: _global_shape(layouts.get(name), t) for name, t in model.state_dict().items()
                  if layouts.get(name) is None or layouts[name].rows is None}
        for name, lay in layouts.items():
            if lay.rows is not None:
                for wname, per_expert in lay.rows.layout:
                    shapes[f"{name.rpartition('.')[0]}.{wname}"] = (lay.rows.num_experts, *per_expert)
        return HFCheckpoint(path, model.cfg, model.moe_cfg, expected=shapes)
    file = Path(path) / MODEL_FILE
    if not file.is_file():
        where = f"{path} does not exist" if not Path(path).exists() else f"{file} is missing"
        raise ModelNotFoundError(f"no saved model: {where}")
    return SafetensorsReader(file)


def _global_shape(lay: ParamLayout | None, tensor: torch.Tensor) -> tuple[int, ...]:
    if lay is not None and lay.offsets is not None:
        return tuple(lay.global_shape)
    return tuple(tensor.shape)


@torch.no_grad()
def load_model(model: nn.Module, path: str | Path) -> int:
    """Load the weights at ``path`` into ``model``, each rank reading only what it holds.

    ``path`` is our model folder (``model.safetensors``, global shapes), a Hugging Face model folder
    (read in place, :mod:`system.hf.weights`) or one of our training checkpoints (a step folder with
    ``metadata.json``, or a root holding ``latest``; its ``model.*`` tensors only, through the resharding
    reader, :func:`system.checkpoint.reader.load`). Expert weights take rows ``[expert_offset, expert_offset
    + E_local)`` of the global expert axis; FSSDP owned buffers their owned experts; FSDP2 DTensors
    sharded on dim 0 the rows of their local shard; everything else is copied whole. A rank's peak
    extra memory is one tensor (a Hugging Face expert is read and transposed one at a time).

    Returns:
        Bytes this rank read from the files.

    Raises:
        ModelNotFoundError: the folder or the model file is missing (a ``FileNotFoundError``).
        ModelFileError: the file is not valid safetensors (a header or offsets beyond the file, bad
            JSON; the file and safetensors' reason are named).
        HFCheckpointError: a Hugging Face folder that cannot be used (unsupported architecture, missing
            shard or tensor, wrong shape or dtype; named).
        KeyError: a tensor of the model is absent from the file (named).
        ValueError: a saved shape differs from the model's global shape (tensor and shapes named).
    """
    if (Path(path) / "metadata.json").is_file() or (Path(path) / "latest").is_file():
        from system.checkpoint.reader import load
        from system.checkpoint.train_state import sharded_train_state

        return load(sharded_train_state(model), str(path)).bytes_read
    reader = open_weights(model, path)
    try:
        load_weights(model, reader)
        return reader.bytes_read
    finally:
        reader.close()


OPTIONAL_TENSORS = ("router.expert_bias",)
"""Tensors a checkpoint may lack (left as initialised): the expert-bias of auxiliary-loss-free
balancing when a model trained without it is fine-tuned with ``moe.load_balance = "bias"``."""


def load_weights(model: nn.Module, reader) -> None:
    """Fill every parameter and persistent buffer of ``model`` from ``reader`` (see :func:`load_model`).

    ``reader`` provides ``shape(name)`` or ``sources[name].shape`` (global shape), ``read_into(name, dst,
    start)`` (rows ``[start, start + len(dst))`` of axis 0) and ``__contains__``.
    """
    where = getattr(reader, "file", None) or getattr(reader, "path", "")
    layouts = _layouts(model)
    for name, target in model.state_dict().items():
        lay = layouts.get(name)
        if lay is not None and lay.rows is not None:
            _load_fssdp_rows(reader, where, name.rpartition(".")[0], lay.rows, target)
            continue
        if name not in reader:
            if name.endswith(OPTIONAL_TENSORS):
                continue
            raise KeyError(f"tensor {name!r} missing from {where}")
        saved_shape = _saved_shape(reader, name)
        if isinstance(target, DTensor):
            _check_shape(name, where, saved_shape, tuple(target.shape))
            _load_dtensor(reader, name, target)
        elif lay is not None and lay.offsets is not None:
            _check_shape(name, where, saved_shape, tuple(lay.global_shape))
            _read_box(reader, name, target, lay.offsets, tuple(lay.global_shape))
        else:
            _check_shape(name, where, saved_shape, tuple(target.shape))
            reader.read_into(name, target)


def _read_box(reader, name: str, target: torch.Tensor, offsets: tuple[int, ...], global_shape: tuple[int, ...]) -> None:
    """Fill ``target`` with the block of tensor ``name`` at ``offsets``: its rows read directly when the block
    spans every other dimension, else those rows read whole and sliced."""
    if tuple(target.shape[1:]) == tuple(global_shape[1:]) and not any(offsets[1:]):
        reader.read_into(name, target, start=offsets[0])
        return
    rows = torch.empty((target.shape[0], *global_shape[1:]), dtype=target.dtype)
    reader.read_into(name, rows, start=offsets[0])
    target.copy_(rows[(slice(None),) + tuple(slice(o, o + s) for o, s in zip(offsets[1:], target.shape[1:]))])


def _saved_shape(reader, name: str) -> tuple[int, ...]:
    return tuple(reader.shape(name)) if hasattr(reader, "shape") else tuple(reader.sources[name].shape)


def _load_dtensor(reader, name: str, target: DTensor) -> None:
    """A DTensor's local shard: the rows of its dim-0 shard read directly; any other placement via the full tensor."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = target.to_local()
    if all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in target.placements):
        shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
        if tuple(shape) == tuple(local.shape):
            if local.numel():
                reader.read_into(name, local, start=offset[0] if offset else 0)
            return
    full = torch.empty(target.shape, dtype=local.dtype)
    reader.read_into(name, full)
    local.copy_(distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local())


def _load_fssdp_rows(reader, where, prefix: str, rows: FSSDPRows, target: torch.Tensor) -> None:
    """Fill an FSSDP owned buffer ``[n_owned, P]`` from the saved global expert tensors (kind's layout)."""
    num = rows.num_experts
    owned = rows.owned()
    offset = 0
    for wname, per_expert in rows.layout:
        key = f"{prefix}.{wname}"
        if key not in reader:
            raise KeyError(f"tensor {key!r} missing from {where}")
        _check_shape(key, where, _saved_shape(reader, key), (num, *per_expert))
        width = math.prod(per_expert)
        for row, expert in enumerate(owned):
            reader.read_into(key, target[row, offset : offset + width].view(1, *per_expert), start=expert)
        offset += width


def _check_shape(name: str, file: Path, saved: tuple, expected: tuple) -> None:
    if saved != tuple(expected):
        raise ValueError(f"tensor {name!r} in {file} has shape {list(saved)}, the model expects {list(expected)}")


def read_config(path: str | Path) -> dict:
    """The job config dict saved beside a model.

    Raises:
        ModelNotFoundError: no ``config.json`` in ``path`` (a ``FileNotFoundError``).
        ModelFileError: it is not a JSON object (the file is named).
    """
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ModelNotFoundError(f"no {CONFIG_FILE} at {file}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{file} holds {type(data).__name__}, not a JSON object")
    return data
