"""Public entry points: synchronous ``save``, ``load``, ``inspect`` and ``verify`` (ByteCheckpoint, arXiv 2407.20143).

Usage (every rank)::

    state = {"tok_emb.weight": emb,                                    # replicated
             "layers.0.moe.w1": ShardedEntry([E, d, f], [Shard(w1_local, (e0, 0, 0))])}
    save(state, f"{root}/{step_dir_name(step)}", extra={"step": step}, update_latest=True)
    ...
    result = load(targets, root)   # resolves root/latest; any world size / layout
"""

from __future__ import annotations

import math
import os

from system.checkpoint.checksum import crc32
from system.checkpoint.errors import CheckpointError
from system.checkpoint.metadata import DEFAULT_CRC_CHUNK_BYTES
from system.checkpoint.reader import LoadResult, load
from system.checkpoint.sharding import find_overlaps
from system.checkpoint.storage import Storage, read_metadata, resolve_checkpoint
from system.checkpoint.writer import AsyncCheckpointer, State

__all__ = ["AsyncCheckpointer", "LoadResult", "inspect", "load", "load_full", "save", "verify"]


def save(state: State, path: str | os.PathLike, *, extra: dict | None = None, rank_extra: dict | None = None,
         layout: dict | None = None, group=None, storage_options: dict | None = None, overwrite: bool = False,
         update_latest: bool = False, crc_chunk_bytes: int = DEFAULT_CRC_CHUNK_BYTES, no_dist: bool = False) -> str:
    """Save ``state`` to ``path`` and wait until it is committed (a collective over ``group``).

    Same arguments as :meth:`AsyncCheckpointer.save`; uses a Gloo group cached per rank set rather
    than a dedicated one. For saves that overlap training keep one :class:`AsyncCheckpointer`.

    Returns:
        The URL of the committed checkpoint directory.

    Raises:
        CheckpointError (and subclasses), TypeError, ValueError: see :meth:`AsyncCheckpointer.save`.
    """
    ckpt = AsyncCheckpointer(group=group, storage_options=storage_options, crc_chunk_bytes=crc_chunk_bytes,
                             no_dist=no_dist, _shared_group=True)
    try:
        return ckpt.save(state, path, extra=extra, rank_extra=rank_extra, layout=layout, overwrite=overwrite,
                         update_latest=update_latest).wait()
    finally:
        ckpt.close()


def inspect(path: str | os.PathLike, *, storage_options: dict | None = None) -> dict:
    """A JSON-able summary of a committed checkpoint (no tensor data is read).

    Returns:
        ``{"path", "version", "world_size", "layout", "extra", "total_bytes", "files": {name: bytes},
        "tensors": {fqn: {"dtype", "shape", "nbytes", "boxes"}}}`` (sizes in bytes).

    Raises:
        UncommittedCheckpointError, FormatVersionError: see :func:`load`.
    """
    url = resolve_checkpoint(path, storage_options=storage_options)
    meta = read_metadata(Storage(url, storage_options))
    return {
        "path": url, "version": meta.version, "world_size": meta.world_size, "layout": meta.layout,
        "extra": meta.extra, "created_unix_s": meta.created_unix_s,
        "total_bytes": sum(f["nbytes"] for f in meta.files.values()),
        "files": {name: f["nbytes"] for name, f in sorted(meta.files.items())},
        "tensors": {
            fqn: {"dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes, "boxes": len(t.boxes)}
            for fqn, t in sorted(meta.tensors.items())
        },
    }


def load_full(path: str | os.PathLike, *, prefix: str = "", storage_options: dict | None = None
              ) -> tuple[dict[str, "torch.Tensor"], LoadResult]:
    """Every tensor of a checkpoint (or those whose name starts with ``prefix``) in full, in this
    process only (no process group), as CPU tensors of the saved dtype and global shape.

    Returns:
        ``({fqn: tensor}, LoadResult)``.

    Raises:
        The errors of :func:`load` (corruption, missing files, uncommitted checkpoint).
    """
    import torch

    from system.checkpoint.metadata import dtype_from_name

    url = resolve_checkpoint(path, storage_options=storage_options)
    meta = read_metadata(Storage(url, storage_options))
    targets = {fqn: torch.empty(t.shape, dtype=dtype_from_name(t.dtype))
               for fqn, t in meta.tensors.items() if fqn.startswith(prefix)}
    result = load(targets, url, storage_options=storage_options, no_dist=True)
    return targets, result


def verify(path: str | os.PathLike, *, storage_options: dict | None = None) -> list[str]:
    """Re-read every byte of a checkpoint and return the problems found (empty list: healthy).

    Checks file sizes, that boxes lie inside their files, that each tensor's boxes are disjoint and
    cover it, and the crc32 of every box and chunk. Reads one chunk (``crc_chunk_bytes``) at a time.

    Raises:
        UncommittedCheckpointError, FormatVersionError: the metadata itself is unusable.
    """
    url = resolve_checkpoint(path, storage_options=storage_options)
    storage = Storage(url, storage_options)
    meta = read_metadata(storage)
    problems, sizes = [], {}
    for name, info in sorted(meta.files.items()):
        try:
            sizes[name] = storage.size(name)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if sizes[name] != info["nbytes"]:
            problems.append(f"data file {storage.path(name)} has {sizes[name]} bytes, the metadata says {info['nbytes']}")
    chunk = meta.crc_chunk_bytes
    for fqn, t in sorted(meta.tensors.items()):
        boxes = [(b.offsets, b.lengths) for b in t.boxes]
        covered = sum(math.prod(b[1]) for b in boxes)
        if covered != math.prod(t.shape) or find_overlaps(boxes) is not None:
            problems.append(f"tensor {fqn}: saved boxes cover {covered} of {math.prod(t.shape)} elements or overlap")
        for b in t.boxes:
            if b.file not in sizes or b.byte_offset + b.nbytes > sizes[b.file]:
                problems.append(f"tensor {fqn}: box at offsets {list(b.offsets)} lies outside file {storage.path(b.file)}")
                continue
            whole = 0
            with storage.fs.open(storage.path(b.file), "rb") as f:
                f.seek(b.byte_offset)
                for k, expected in enumerate(b.chunk_crcs(chunk)):
                    data = f.read(min(chunk, b.nbytes - k * chunk))
                    whole = crc32(data, whole)
                    if crc32(data) != expected:
                        problems.append(
                            f"checksum mismatch in tensor {fqn}: file {storage.path(b.file)} chunk {k} of the box at "
                            f"offsets {list(b.offsets)}"
                        )
            if whole != b.crc32:
                problems.append(
                    f"checksum mismatch in tensor {fqn}: file {storage.path(b.file)} box at offsets {list(b.offsets)}"
                )
    return problems
