"""Asynchronous saving: snapshot into reusable host buffers, write and commit in the background.

ByteCheckpoint section 4.1 (asynchronous pipeline) and 4.3 (commit). A save has three stages:

1. *plan* (calling thread, on the checkpoint's own Gloo group): ranks exchange a digest of their
   layout; when it matches a cached plan the plan is reused, otherwise ranks exchange their boxes and
   every rank computes the same :class:`~system.checkpoint.planner.SavePlan`;
2. *snapshot* (calling thread, the only blocking part): the boxes this rank writes are copied into a
   reusable host staging buffer (pinned when any source lives on CUDA) laid out exactly like the data
   file. Afterwards training may modify its tensors freely;
3. *write + commit* (background thread): the data file (fsynced) while a second thread computes the
   crc32s, then a gather of crcs and per-rank extras that is also the barrier, then rank 0 writes
   ``metadata.json`` last, and a broadcast tells every rank whether the checkpoint committed.

A new save first waits for the previous one (the staging buffer is reused, and checkpoint collectives
must not interleave).

Test-only fault injection (the sibling of ``MOESYS_FAULT_INJECT`` in :mod:`system.cluster.ray_worker`):
``MOESYS_FAULT_CKPT_WRITE_DELAY_S=SECONDS`` in a rank's environment makes stage 3 sleep that long after
the rank's data file is written and before the commit barrier, on every save;
``SECONDS@NAME[,NAME...]`` only on saves to a directory named ``NAME`` (e.g. ``1.5@step_00000040``).
For that long the step directory holds data files and no ``metadata.json`` (uncommitted), so a chaos
controller (``benchmarks/chaos.py``) can observe a save in flight and kill a worker during it,
deterministically. Unset or empty: no delay. Never set it outside tests and benchmarks.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping

import torch

from system.checkpoint.checksum import crc32
from system.checkpoint.comm import Comm, make_comm
from system.checkpoint.errors import CheckpointError
from system.checkpoint.metadata import (
    ALIGN, DEFAULT_CRC_CHUNK_BYTES, METADATA_FILE, CheckpointMetadata, SavedBox, TensorMeta, dtype_from_name,
    dtype_name,
)
from system.checkpoint.planner import PlannedWrite, SavePlan, TensorDecl, build_save_plan, data_file_name
from system.checkpoint.sharding import Box, ShardedEntry, box_of, volume
from system.checkpoint.storage import Storage, commit_latest

logger = logging.getLogger(__name__)

_TEST_HOOKS: dict[str, Callable[[int], None]] = {}
"""Test-only hooks, called with the rank: ``"after_data"`` once this rank's data file is written."""

FAULT_WRITE_DELAY_ENV = "MOESYS_FAULT_CKPT_WRITE_DELAY_S"
"""Test-only: ``SECONDS[@NAME,...]`` to sleep between writing this rank's data file and the commit
barrier, on every save or on saves to the directories named (module docstring)."""


def _fault_write_delay_s(url: str) -> float:
    """The delay :data:`FAULT_WRITE_DELAY_ENV` asks for a save to ``url`` (0 when unset, empty or not named).

    Raises:
        ValueError: not ``SECONDS`` or ``SECONDS@NAME[,NAME...]`` with a finite number of seconds >= 0 (the
            save then fails on every rank, uncommitted).
    """
    text = os.environ.get(FAULT_WRITE_DELAY_ENV, "").strip()
    if not text:
        return 0.0
    seconds, at, names = text.partition("@")
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf") or (at and not names.strip()):
        raise ValueError(f"{FAULT_WRITE_DELAY_ENV} must be SECONDS or SECONDS@NAME[,NAME...] with SECONDS >= 0, "
                         f"got {text!r}")
    if at and _parent(url)[1] not in {n.strip() for n in names.split(",")}:
        return 0.0
    return value


State = Mapping[str, "ShardedEntry | torch.Tensor"]


def collect(state: State) -> tuple[list[TensorDecl], dict[tuple[str, Box], torch.Tensor]]:
    """This rank's announcement and its local tensors, keyed by ``(fqn, box)``.

    A plain tensor is replicated: its box is the whole tensor. Empty boxes are dropped.

    Raises:
        TypeError: a value that is neither a tensor nor a :class:`ShardedEntry` (non-tensor state
            belongs in ``extra``), or a DTensor (convert it to a :class:`ShardedEntry` first).
        ValueError: a shard outside its global shape, mixed dtypes in one entry, unsupported dtype.
    """
    from torch.distributed.tensor import DTensor

    decls, local = [], {}
    for fqn, value in state.items():
        if isinstance(value, DTensor):
            raise TypeError(f"{fqn}: a DTensor must be given as a ShardedEntry of its local shards")
        if isinstance(value, torch.Tensor):
            shape = tuple(value.shape)
            pieces = [((tuple(0 for _ in shape), shape), value)]
            dtype = dtype_name(value.dtype)
        elif isinstance(value, ShardedEntry):
            shape = tuple(int(s) for s in value.global_shape)
            pieces = [(box_of(shape, s, fqn), s.tensor) for s in value.shards]
            dtypes = {s.tensor.dtype for s in value.shards}
            if len(dtypes) > 1:
                raise ValueError(f"{fqn}: shards have different dtypes {sorted(map(str, dtypes))}")
            if not dtypes:
                continue  # this rank holds nothing of the tensor; others announce it
            dtype = dtype_name(dtypes.pop())
        else:
            raise TypeError(
                f"{fqn}: checkpoint state values must be tensors or ShardedEntry, got {type(value).__name__} "
                "(put JSON state in `extra`)"
            )
        boxes = []
        for box, tensor in pieces:
            if volume(box[1]) == 0 or (fqn, box) in local:
                continue
            local[(fqn, box)] = tensor
            boxes.append(box)
        decls.append(TensorDecl(fqn, dtype, shape, tuple(boxes)))
    return decls, local


def _check_json(name: str, value) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint `{name}` must be JSON-serialisable: {e}") from e


def _crcs(buf: memoryview, chunk: int) -> tuple[int, list[int]]:
    """crc32 of ``buf`` and of each ``chunk``-byte slice of it."""
    whole, parts = 0, []
    for k in range(0, len(buf), chunk):
        piece = buf[k : k + chunk]
        parts.append(crc32(piece))
        whole = crc32(piece, whole)
    return whole, parts or [0]


def _parent(url: str) -> tuple[str, str]:
    url = url.rstrip("/")
    return (url.rsplit("/", 1)[0] or "/", url.rsplit("/", 1)[1]) if "/" in url else (".", url)


class SaveHandle:
    """A save in flight. ``wait()`` returns the committed checkpoint URL or raises its error."""

    def __init__(self, future: cf.Future, url: str):
        self._future, self.url, self._observed = future, url, False

    def done(self) -> bool:
        """True once the save committed or failed."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> str:
        """Block until committed (``timeout`` in seconds); returns the checkpoint URL.

        Raises:
            CheckpointError: the save failed on some rank; the directory is not committed.
            TimeoutError: ``timeout`` passed first.
        """
        try:
            return self._future.result(timeout)
        except cf.TimeoutError:
            raise
        except BaseException:
            self._observed = True
            raise


class AsyncCheckpointer:
    """Persistent asynchronous checkpoint writer (create once, call :meth:`save` every N steps).

    Owns a dedicated Gloo group over the ranks of ``group`` (created on the first save, a collective),
    a host staging buffer per rank reused across saves, a cache of save plans keyed by the layout,
    and one background writer thread. Every rank of ``group`` must call :meth:`save` with the same
    path in the same order.

    Args:
        group: ranks taking part (default: the world). Only its ranks are used: checkpoint traffic
            goes over a separate Gloo group.
        storage_options: fsspec options for every path.
        crc_chunk_bytes: granularity of the stored crc32s (bytes, a multiple of 64): a load verifies
            what it reads by reading whole chunks.
        no_dist: single-process save even if a process group is initialised.
    """

    def __init__(self, *, group=None, storage_options: dict | None = None,
                 crc_chunk_bytes: int = DEFAULT_CRC_CHUNK_BYTES, no_dist: bool = False, _shared_group: bool = False):
        if crc_chunk_bytes <= 0 or crc_chunk_bytes % ALIGN:
            raise ValueError(f"crc_chunk_bytes must be a positive multiple of {ALIGN}, got {crc_chunk_bytes}")
        self._group, self._no_dist, self._shared = group, no_dist, _shared_group
        self._storage_options = storage_options
        self._chunk = crc_chunk_bytes
        self._comm: Comm | None = None
        self._plans: dict[tuple, SavePlan] = {}
        self._staging: torch.Tensor | None = None
        self._pending: SaveHandle | None = None
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        self._crc_pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-crc")
        self.last_blocking_s = 0.0
        """Seconds the last :meth:`save` blocked the caller (plan + snapshot)."""

    # ------------------------------------------------------------------------------------- public
    def save(self, state: State, path: str | os.PathLike, *, extra: dict | None = None,
             rank_extra: dict | None = None, layout: dict | None = None, overwrite: bool = False,
             update_latest: bool = False) -> SaveHandle:
        """Snapshot ``state`` and write it to ``path`` in the background.

        Args:
            state: fqn -> tensor (replicated: every rank holds the same whole tensor) or
                :class:`ShardedEntry` (this rank's boxes of a global tensor).
            path: checkpoint directory (local path or fsspec URL), e.g. ``root/step_00000100``.
            extra: JSON state from rank 0 (config, step, scheduler, data position); ignored elsewhere.
            rank_extra: JSON state of this rank (RNG...), returned at load keyed by saved rank.
            layout: JSON description of the parallel layout (rank 0's is stored).
            overwrite: replace an existing committed checkpoint at ``path`` (it is un-committed first).
            update_latest: after committing, point ``<parent of path>/latest`` at it.

        Returns:
            A :class:`SaveHandle`; the snapshot is complete when this returns.

        Raises:
            CheckpointError: the previous save failed (and nobody waited on it), or ``path`` is
                already committed and ``overwrite`` is False.
            SavePlanError: the ranks' boxes are inconsistent (see :func:`build_save_plan`).
            TypeError, ValueError: invalid state or non-JSON extras.
        """
        self._wait_previous()
        t0 = time.perf_counter()
        self.connect()
        comm = self._comm
        local_error = None
        try:  # a bad state on one rank must fail every rank, not leave the others in a collective
            for name, value in (("extra", extra), ("rank_extra", rank_extra), ("layout", layout)):
                _check_json(name, value)
            decls, local = collect(state)
        except (TypeError, ValueError) as e:
            local_error, decls, local = e, [], {}
        storage = Storage(path, self._storage_options)
        plan = self._plan(comm, decls, storage, overwrite, local_error)
        writes = plan.for_rank(comm.rank)
        buf = self._snapshot(plan, writes, local, comm.rank)
        self.last_blocking_s = time.perf_counter() - t0
        job = self._pool.submit(self._write_and_commit, storage, plan, writes, buf, comm,
                                extra or {}, rank_extra, layout or {}, update_latest)
        self._pending = SaveHandle(job, storage.url)
        return self._pending

    def connect(self) -> None:
        """Create the checkpoint's Gloo group now instead of at the first save (collective: every rank).

        Making a group goes through the rendezvous store, which lives in the launcher's agent; a
        save that follows the launcher's death (the SIGTERM its workers get then) finds no store. With
        the group made up front, a save needs only the group's own connections.
        """
        if self._comm is None:
            self._comm = make_comm(self._group, no_dist=self._no_dist, dedicated=not self._shared)

    def wait(self) -> str | None:
        """Wait for the save in flight, if any; returns its URL."""
        return self._pending.wait() if self._pending is not None else None

    def close(self) -> None:
        """Finish the save in flight, stop the writer thread, release the group and the buffer."""
        try:
            if self._pending is not None and not self._pending._observed:
                self._pending.wait()
        finally:
            self._pool.shutdown(wait=True)
            self._crc_pool.shutdown(wait=True)
            if self._comm is not None and not self._shared:
                self._comm.destroy()
            self._comm, self._staging = None, None

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ stages
    def _wait_previous(self) -> None:
        prev = self._pending
        if prev is None:
            return
        err = prev._future.exception()
        if err is not None and not prev._observed:
            prev._observed = True
            raise CheckpointError(f"the previous asynchronous save to {prev.url} failed: {err}") from err

    def _plan(self, comm: Comm, decls: list[TensorDecl], storage: Storage, overwrite: bool,
              local_error: Exception | None) -> SavePlan:
        problem = f"rank {comm.rank}: {local_error}" if local_error is not None else None
        if comm.rank == 0 and problem is None:
            try:
                if storage.exists(METADATA_FILE):
                    if not overwrite:
                        raise CheckpointError(f"{storage.url} already holds a committed checkpoint (pass overwrite=True)")
                    storage.remove(METADATA_FILE)
            except CheckpointError as e:
                problem = str(e)
        digest = hashlib.sha256(repr(decls).encode()).hexdigest()
        gathered = comm.all_gather((digest, problem))  # also orders rank 0's un-commit before any write
        problems = [p for _, p in gathered if p]
        if local_error is not None:
            raise local_error
        if problems:
            raise CheckpointError(f"save to {storage.url} refused: {problems[0]}")
        key = tuple(d for d, _ in gathered)
        plan = self._plans.get(key)
        if plan is None:
            plan = build_save_plan(comm.all_gather(decls))
            if len(self._plans) >= 8:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
            per_rank = plan.bytes_per_rank(comm.world)
            logger.info("checkpoint: new save plan, %d boxes, bytes per rank %s", len(plan.writes), per_rank)
        return plan

    @torch.no_grad()
    def _snapshot(self, plan: SavePlan, writes: list[PlannedWrite],
                  local: dict[tuple[str, Box], torch.Tensor], rank: int) -> torch.Tensor | None:
        if not writes:
            return None
        size = plan.file_sizes[data_file_name(rank)]
        sources = [local[(w.fqn, (w.offsets, w.lengths))] for w in writes]
        cuda = any(s.is_cuda for s in sources)
        buf = self._staging
        if buf is None or buf.numel() < size or (cuda and not buf.is_pinned()):
            buf = torch.zeros(_align_up(size), dtype=torch.uint8, pin_memory=cuda and torch.cuda.is_available())
            self._staging = buf
        devices = set()
        for w, src in zip(writes, sources):
            dtype = dtype_from_name(plan.tensors[w.fqn][0])
            dst = buf[w.byte_offset : w.byte_offset + w.nbytes].view(dtype).view(w.lengths)
            dst.copy_(src, non_blocking=src.is_cuda)
            buf[w.byte_offset + w.nbytes : _align_up(w.byte_offset + w.nbytes)].zero_()
            if src.is_cuda:
                devices.add(src.device)
        for dev in devices:
            torch.cuda.current_stream(dev).synchronize()
        return buf

    def _write_and_commit(self, storage: Storage, plan: SavePlan, writes: list[PlannedWrite],
                          buf: torch.Tensor | None, comm: Comm, extra: dict, rank_extra, layout: dict,
                          update_latest: bool) -> str:
        crcs, error = {}, None
        try:
            storage.makedirs()
            if writes:
                mv = memoryview(buf.numpy())

                def checksums() -> dict:
                    return {(w.fqn, w.offsets): _crcs(mv[w.byte_offset : w.byte_offset + w.nbytes], self._chunk)
                            for w in writes}

                # crc32 (CPU) on a second thread while this one writes and fsyncs (disk); both only read
                # the staging buffer and release the GIL, so the save costs max(crc, write) instead of the sum.
                crc_job = self._crc_pool.submit(checksums)
                name = data_file_name(comm.rank)
                try:
                    storage.write_file(name, [mv[: plan.file_sizes[name]]])
                finally:
                    crcs = crc_job.result()  # never leave the thread reading a buffer the next save refills
            if "after_data" in _TEST_HOOKS:
                _TEST_HOOKS["after_data"](comm.rank)
            delay = _fault_write_delay_s(storage.url)
            if delay:  # test-only: hold the save uncommitted (data files written, no metadata.json)
                logger.warning("checkpoint: %s=%g: rank %d holds %s uncommitted", FAULT_WRITE_DELAY_ENV, delay,
                               comm.rank, storage.url)
                time.sleep(delay)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            logger.exception("checkpoint: rank %d failed writing %s", comm.rank, storage.url)
            error = f"rank {comm.rank}: {type(e).__name__}: {e}"
        gathered = comm.all_gather((crcs, rank_extra, error))  # barrier: every data file is written
        status = None
        if comm.rank == 0:
            errors = [g[2] for g in gathered if g[2]]
            try:
                if errors:
                    raise CheckpointError("; ".join(errors))
                meta = self._metadata(plan, gathered, comm.world, extra, layout)
                storage.write_atomic(METADATA_FILE, meta.to_json().encode())
                if update_latest:
                    root, name = _parent(storage.url)
                    commit_latest(root, name, storage_options=self._storage_options)
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                status = f"{type(e).__name__}: {e}"
        status = comm.broadcast(status)
        if status:
            raise CheckpointError(f"checkpoint {storage.url} was not committed: {status}")
        logger.info("checkpoint: committed %s", storage.url)
        return storage.url

    def _metadata(self, plan: SavePlan, gathered: list, world: int, extra: dict, layout: dict) -> CheckpointMetadata:
        tensors = {fqn: TensorMeta(dtype, shape) for fqn, (dtype, shape) in plan.tensors.items()}
        for w in plan.writes:
            crc, chunks = gathered[w.rank][0][(w.fqn, w.offsets)]
            tensors[w.fqn].boxes.append(
                SavedBox(w.offsets, w.lengths, w.file, w.byte_offset, w.nbytes, crc, chunks if len(chunks) > 1 else None)
            )
        writer = {w.file: w.rank for w in plan.writes}
        files = {name: {"rank": writer[name], "nbytes": n} for name, n in plan.file_sizes.items()}
        return CheckpointMetadata(
            tensors=tensors, files=files, world_size=world, layout=layout, extra=extra,
            rank_extras={r: g[1] for r, g in enumerate(gathered)}, crc_chunk_bytes=self._chunk,
            created_unix_s=time.time(),
        )


def _align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
