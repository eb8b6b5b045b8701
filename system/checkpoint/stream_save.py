"""Write a one-process checkpoint whose tensors are produced one at a time (converters: ``ckpt import-hf``).

:func:`system.checkpoint.api.save` snapshots the whole state into a host staging buffer before writing,
which is right for training (the step must not wait for the disk) but needs the model in memory twice
when the state itself was just read from elsewhere. A converter instead announces every tensor's
dtype and shape up front, and :func:`save_streaming` asks for each tensor in file order, writes its
bytes (and their crc32s) and drops it: peak memory is one tensor. The result is the same format the
asynchronous writer produces (one data file, ``metadata.json`` written last), built like
:func:`~system.checkpoint.dcp_import.import_dcp` builds its checkpoint: in a hidden sibling, renamed
(or swapped) into place, so a failed conversion leaves ``out_path`` as it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping

import torch

from system.checkpoint.dcp_import import _check_out, build_local_checkpoint
from system.checkpoint.errors import CheckpointError
from system.checkpoint.metadata import (
    ALIGN, DEFAULT_CRC_CHUNK_BYTES, METADATA_FILE, CheckpointMetadata, SavedBox, TensorMeta, dtype_name,
)
from system.checkpoint.planner import SavePlan, TensorDecl, build_save_plan
from system.checkpoint.storage import Storage
from system.checkpoint.writer import _crcs

Produce = Callable[[str], torch.Tensor]


def save_streaming(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], produce: Produce,
                   out_path: str | os.PathLike, *, extra: dict | None = None, layout: dict | None = None,
                   overwrite: bool = False, storage_options: dict | None = None,
                   crc_chunk_bytes: int = DEFAULT_CRC_CHUNK_BYTES) -> str:
    """Write a committed checkpoint at ``out_path`` holding ``specs``' tensors, each asked of ``produce`` once.

    One process, no process group. Every tensor is saved whole (one box), as a replicated tensor of
    :func:`~system.checkpoint.api.save` would be, so :func:`~system.checkpoint.api.load` reads it
    under any layout. ``produce(fqn)`` is called in data-file order and its tensor (CPU, any
    strides) is released before the next call. ``out_path`` follows :func:`import_dcp`'s rules: it
    must not exist, be an empty folder, or (with ``overwrite``) be a committed checkpoint holding
    only its own files; it is checked before the first ``produce`` call.

    Args:
        specs: fqn -> ``(dtype, global shape)`` of every tensor.
        produce: fqn -> the tensor (must match its spec).
        out_path: checkpoint folder (local path or fsspec URL).
        extra, layout: JSON saved with the checkpoint (``extra["config"]`` is the job config).
        overwrite, storage_options, crc_chunk_bytes: as for :func:`~system.checkpoint.api.save`.

    Returns:
        The URL of the new checkpoint.

    Raises:
        CheckpointError: ``out_path`` must not be written (see :func:`import_dcp`), writing failed,
            or ``produce`` returned a tensor whose dtype or shape differs from its spec (named).
        ValueError: ``extra``/``layout`` are not JSON-serialisable.
        Whatever ``produce`` raises (the partial checkpoint is removed).
    """
    if crc_chunk_bytes <= 0 or crc_chunk_bytes % ALIGN:
        raise ValueError(f"crc_chunk_bytes must be a positive multiple of {ALIGN}, got {crc_chunk_bytes}")
    out = Storage(out_path, storage_options)
    replace = _check_out(out, overwrite)
    decls = [TensorDecl(fqn, dtype_name(dtype), tuple(shape), ((tuple(0 for _ in shape), tuple(shape)),))
             for fqn, (dtype, shape) in specs.items()]
    plan = build_save_plan([decls])
    meta = CheckpointMetadata(
        tensors={fqn: TensorMeta(dtype, shape) for fqn, (dtype, shape) in plan.tensors.items()},
        files={name: {"rank": 0, "nbytes": n} for name, n in plan.file_sizes.items()}, world_size=1,
        layout=layout or {}, extra=extra or {}, rank_extras={0: None}, crc_chunk_bytes=crc_chunk_bytes,
    )
    meta.to_json()  # fails here (ValueError/TypeError) on non-JSON extras, before any tensor is read
    if not out.is_local:  # no rename on object stores: un-commit, then rewrite in place
        if replace:
            out.remove(METADATA_FILE)
        _write(out, plan, meta, produce)
        return out.url
    return build_local_checkpoint(out, replace, lambda tmp: _write(Storage(tmp), plan, meta, produce))


def _write(storage: Storage, plan: SavePlan, meta: CheckpointMetadata, produce: Produce) -> None:
    """The data file (streamed, fsynced), then ``metadata.json`` (the commit)."""
    storage.makedirs()
    for name in plan.file_sizes:
        writes = [w for w in plan.writes if w.file == name]
        storage.write_file(name, _stream(storage, plan, writes, meta, produce))
    meta.created_unix_s = time.time()
    storage.write_atomic(METADATA_FILE, meta.to_json().encode())


def _stream(storage: Storage, plan: SavePlan, writes: list, meta: CheckpointMetadata,
            produce: Produce) -> Iterator[memoryview]:
    """The bytes of one data file, tensor by tensor, with the zero padding up to each box's offset."""
    pos = 0
    for w in writes:
        if w.byte_offset > pos:
            yield memoryview(bytes(w.byte_offset - pos))
        dtype, shape = plan.tensors[w.fqn]
        t = produce(w.fqn)
        if dtype_name(t.dtype) != dtype or tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {w.fqn}: announced as {list(shape)} {dtype}, produced "
                                  f"{list(t.shape)} {dtype_name(t.dtype)} (writing {storage.path(w.file)})")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        mv = memoryview(data.numpy())
        if len(mv) != w.nbytes:  # pragma: no cover - dtype and shape match, so the sizes do
            raise CheckpointError(f"tensor {w.fqn}: {len(mv)} bytes, the plan says {w.nbytes}")
        crc, chunks = _crcs(mv, meta.crc_chunk_bytes)
        meta.tensors[w.fqn].boxes.append(SavedBox(w.offsets, w.lengths, w.file, w.byte_offset, w.nbytes, crc,
                                                  chunks if len(chunks) > 1 else None))
        yield mv
        pos = w.byte_offset + w.nbytes
        del t, data, mv
    total = plan.file_sizes[writes[0].file] if writes else 0
    if total > pos:  # pragma: no cover - the planner's file size ends at the last box
        yield memoryview(bytes(total - pos))
