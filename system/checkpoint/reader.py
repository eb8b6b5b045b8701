"""Loading with resharding: fill target tensors in place from any saved layout (ByteCheckpoint section 3.4).

Every rank describes what it now needs (a tensor it holds whole, or boxes of global tensors: a
different world size, EP degree or FSSDP ownership than at save time is fine), intersects each needed
box with the saved boxes, and reads only those byte ranges (see :mod:`system.checkpoint.planner`)
with a thread pool. A contiguous overlap lands straight in the destination (``os.preadv`` into the
tensor's memory on a local FS); other overlaps go through a small staging buffer. No collective is
needed to read; one small gather at the end makes every rank fail if any rank failed, so no rank
trains on while another is stuck.

Verification (``verify=True``, the default) is exact and cheap: every byte read is checked against
the stored crc32 of the chunk it belongs to (``crc_chunk_bytes``, 4 MiB by default). Reads are
widened to whole chunks, so a partial read costs at most one extra chunk at each end of a range.
Use :func:`system.checkpoint.api.verify` to check every byte of a checkpoint.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from system.checkpoint.checksum import crc32
from system.checkpoint.comm import make_comm
from system.checkpoint.errors import ChecksumError, CheckpointError, DataFileError, MissingTensorError, TensorMismatchError
from system.checkpoint.metadata import CheckpointMetadata, dtype_name
from system.checkpoint.planner import ReadOp, coalesce, plan_overlaps, plan_reads
from system.checkpoint.sharding import Box, ShardedEntry, box_of, volume
from system.checkpoint.storage import RangeReader, Storage, read_metadata, resolve_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class LoadResult:
    """What a load returns besides the filled tensors.

    Attributes:
        path: URL of the checkpoint directory that was read.
        extra: rank 0's JSON state at save time.
        rank_extras: saved rank -> its JSON state (the saving world may differ from this one).
        metadata: the parsed ``metadata.json``.
        missing: target fqns absent from the checkpoint (only when ``strict=False``).
        unexpected: checkpoint fqns the targets did not ask for.
        bytes_read: bytes this rank read from storage.
        seconds: wall time of the load on this rank.
    """

    path: str
    extra: dict
    rank_extras: dict[int, dict | None]
    metadata: CheckpointMetadata
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0


def _target(fqn: str, value) -> tuple[torch.dtype | None, tuple[int, ...], list[tuple[Box, torch.Tensor]]]:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        raise TypeError(f"{fqn}: a DTensor target must be given as a ShardedEntry of its local shards")
    if isinstance(value, torch.Tensor):
        shape = tuple(value.shape)
        return value.dtype, shape, [((tuple(0 for _ in shape), shape), value.detach())]
    if isinstance(value, ShardedEntry):
        shape = tuple(int(s) for s in value.global_shape)
        pieces = [(box_of(shape, s, fqn), s.tensor.detach()) for s in value.shards]
        dtypes = {t.dtype for _, t in pieces}
        if len(dtypes) > 1:
            raise ValueError(f"{fqn}: target shards have different dtypes {sorted(map(str, dtypes))}")
        return (dtypes.pop() if dtypes else None), shape, pieces
    raise TypeError(f"{fqn}: load targets must be tensors or ShardedEntry, got {type(value).__name__}")


def _plan(targets: Mapping, meta: CheckpointMetadata, url: str, strict: bool, verify: bool):
    ops, missing = [], []
    for fqn, value in targets.items():
        dtype, shape, pieces = _target(fqn, value)
        tmeta = meta.tensors.get(fqn)
        if tmeta is None:
            if strict:
                sample = ", ".join(sorted(meta.tensors)[:5])
                raise MissingTensorError(
                    f"tensor {fqn} is not in checkpoint {url} ({len(meta.tensors)} tensors, e.g. {sample})"
                )
            missing.append(fqn)
            continue
        want_dtype = dtype_name(dtype) if dtype is not None else tmeta.dtype
        if tuple(tmeta.shape) != shape or want_dtype != tmeta.dtype:
            files = sorted({b.file for b in tmeta.boxes})
            raise TensorMismatchError(
                f"tensor {fqn}: checkpoint {url} has {list(tmeta.shape)} {tmeta.dtype}, the target expects "
                f"{list(shape)} {want_dtype} (files {', '.join(files) or '(none)'})"
            )
        pieces = [(b, t) for b, t in pieces if volume(b[1]) > 0]
        ops += plan_reads(fqn, tmeta, plan_overlaps(fqn, tmeta, pieces), chunk_bytes=meta.crc_chunk_bytes, verify=verify)
    return coalesce(ops), missing


def _run(op: ReadOp, reader: RangeReader, storage: Storage) -> int:
    names = ", ".join(sorted(op.fqns))
    data = op.direct if op.direct is not None else torch.empty(op.end - op.start, dtype=torch.uint8)
    mv = memoryview(data.numpy())
    try:
        reader.read_into(op.file, op.start, mv)
    except DataFileError as e:
        raise DataFileError(f"{e} (while loading tensor {names})") from e
    seen = set()
    for c in op.checks:
        if c.start in seen:
            continue
        seen.add(c.start)
        got = crc32(mv[c.start - op.start : c.end - op.start])
        if got != c.crc:
            raise ChecksumError(
                f"checksum mismatch in tensor {c.fqn}: file {storage.path(op.file)} bytes [{c.start}, {c.end}) "
                f"(crc chunk {c.index} of the box at offsets {list(c.box.offsets)}) hash to {got:#010x}, the "
                f"metadata says {c.crc:#010x}: the data file is corrupt"
            )
    for f in op.fills:
        f.apply(data, op.start)
    return op.end - op.start


@torch.no_grad()
def load(targets: Mapping[str, ShardedEntry | torch.Tensor], path: str | os.PathLike, *, group=None,
         storage_options: dict | None = None, strict: bool = True, verify: bool = True, num_threads: int = 4,
         no_dist: bool = False) -> LoadResult:
    """Fill ``targets`` in place from the checkpoint at ``path`` (a collective over ``group``).

    Args:
        targets: fqn -> tensor (this rank wants the whole tensor) or :class:`ShardedEntry` (this
            rank's boxes). Any layout works, whatever layout saved the checkpoint.
        path: a checkpoint directory, a root holding ``latest``, or that ``latest`` file.
        group: ranks loading together (default: the world); used only to agree on failure.
        storage_options: fsspec options.
        strict: raise when a target is not in the checkpoint (else skip it and list it in
            ``LoadResult.missing``). Checkpoint tensors that no target asks for are never an error.
        verify: check every byte read against the stored chunk crc32s (see the module docstring).
        num_threads: parallel reads per rank.
        no_dist: load on this process alone even if a process group is initialised.

    Returns:
        :class:`LoadResult` with ``extra`` (rank 0's JSON state) and ``rank_extras``.

    Raises:
        UncommittedCheckpointError: ``path`` has no committed ``metadata.json``.
        FormatVersionError: unknown format version.
        MissingTensorError: a target fqn is not in the checkpoint (``strict``).
        TensorMismatchError: global shape or dtype differ ("checkpoint has [8, 256, 512] float32, the
            target expects ...").
        CoverageError: the saved boxes do not cover a needed region.
        ChecksumError: bytes read do not match their crc32 (names tensor and file).
        DataFileError: a data file is missing or truncated (names file and tensor).
        CheckpointError: another rank of ``group`` failed.
    """
    t0 = time.perf_counter()
    comm = make_comm(group, no_dist=no_dist)
    error: BaseException | None = None
    result = None
    try:
        url = resolve_checkpoint(path, storage_options=storage_options)
        storage = Storage(url, storage_options)
        meta = read_metadata(storage)
        ops, missing = _plan(targets, meta, url, strict, verify)
        reader = RangeReader(storage)
        try:
            with cf.ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="ckpt-reader") as pool:
                futures = [pool.submit(_run, op, reader, storage) for op in sorted(ops, key=lambda o: o.start - o.end)]
                cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
                failed = [f for f in futures if f.done() and f.exception() is not None]
                if failed:
                    for f in futures:
                        f.cancel()
                    raise failed[0].exception()
                nbytes = sum(f.result() for f in futures)
        finally:
            reader.close()
        result = LoadResult(url, meta.extra, meta.rank_extras, meta, missing,
                            sorted(set(meta.tensors) - set(targets)), nbytes, time.perf_counter() - t0)
    except (CheckpointError, TypeError, ValueError, OSError) as e:
        error = e
    statuses = comm.all_gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, status in enumerate(statuses):
        if status:
            raise CheckpointError(f"loading {path} failed on rank {rank}: {status}")
    logger.info("checkpoint: loaded %s (%d bytes read in %.3f s)", result.path, result.bytes_read, result.seconds)
    return result
