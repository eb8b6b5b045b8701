"""Resharding checkpoint save and load: ``system.checkpoint`` against PyTorch DCP (default and tuned).

Every system saves and loads the *same* seeded MoE training state: our ``MoETransformer`` under
expert parallelism over all ranks (experts split on their global expert axis, dim 0; dense weights
replicated) plus AdamW's ``exp_avg`` / ``exp_avg_sq`` (``ensure_optimizer_state`` then a seeded random
fill), described once by :func:`system.checkpoint.train_state.sharded_train_state`. For DCP the same
tensors are wrapped as ``DTensor``s (``Shard(0)`` over a 1-D mesh of all ranks for the experts, plain
tensors for the replicated weights): no copy, so both systems read and write the same memory.

Systems:

- ``ours``: one persistent :class:`system.checkpoint.AsyncCheckpointer` (``save`` -> ``handle.wait()``),
  ``system.checkpoint.load`` (4 reader threads, crc verification on).
- ``dcp``: DCP as most code calls it: ``dcp.async_save(state, checkpoint_id=path, process_group=pg)``
  (a fresh ``DefaultStager`` copy of the state every call, one writer thread, ``sync_files=True``).
- ``dcp_tuned``: ``dcp.async_save`` with a persistent ``DefaultStager`` reused across calls (its cached CPU
  storages are refilled in place), ``FileSystemWriter(path, thread_count=2, sync_files=True)`` and
  ``DefaultSavePlanner(enable_plan_caching=True)``.
- Loads of DCP checkpoints: ``dcp.load`` with a ``FileSystemReader`` (it has no tuning knobs in torch
  2.13; ``dcp`` and ``dcp_tuned`` differ only in the files they read).

Metrics, per world size (2 and 4 processes by default, smoke 2; Gloo, CPU). After one warm-up save per system (the same
for every system; its figures are kept as "first save"), every repeat measures the physical limits and then runs
the saves, then the loads, each in the order :func:`benchmarks.common.rotated` gives for that repeat; a repeat's
figure is the slowest rank's:

- blocking stall: wall time of the ``save()`` / ``async_save()`` call (training may modify its tensors
  when it returns);
- time to a durable committed checkpoint: from the call until it is committed and fsynced on every
  rank. Ours fsyncs its data files, ``metadata.json`` and the directory. DCP uses its own
  ``sync_files=True`` (fsync of every data file and of ``.metadata.tmp`` before the rename); the benchmark
  adds one ``fsync`` of the checkpoint directory on rank 0 after the rename (inside the timed interval) so
  that both commits are equally durable;
- cold load: every file of the checkpoint is fsynced and evicted from the page cache
  (``posix_fadvise(POSIX_FADV_DONTNEED)``) before each load, on the same layout (into the live state, as a
  resume does) and resharded (experts loaded split on dim 1 instead of dim 0: every rank needs a 1/W
  slice of every expert, as with tensor parallelism inside the experts; the case where DCP reads whole
  saved chunks and narrows them);
- bytes read per byte needed (read amplification): ``LoadResult.bytes_read`` for ours, the bytes DCP's
  reader pulls through its file views for DCP; ``/proc/self/io`` ``read_bytes`` (bytes fetched from the
  block device) for both;
- peak memory: VmHWM reset before each operation, minus the RSS before it (transient), and the RSS a system
  keeps after its first save (persistent staging buffers).

Physical limits, measured in the same run, once per repeat: disk write (every rank writes its share of the
checkpoint bytes from memory in 64 MiB pieces, starting each piece's writeback with ``posix_fadvise``, then
fsyncs, concurrently: on this VM that is faster and far steadier than one big ``write`` + ``fsync``), cold
read (those files, evicted, read back with ``os.preadv`` by ``--io-threads`` threads per rank), memcpy (every
rank copies its snapshot bytes with ``Tensor.copy_`` into pre-faulted memory, concurrently). Each figure is
paired with the limit of its own repeat.

Statistics: every ratio (DCP time over ours, ours over a limit) is the median of the per-repeat paired ratios
with a 95% bootstrap interval (:func:`benchmarks.common.ratio_goal`); a goal (a ``--goal-*`` threshold) is
"met" only when the whole interval clears it, and an efficiency against a limit whose interval reaches above
1.02 is a "measurement error" (:func:`benchmarks.common.efficiency_goal`). Every load, every repeat, is checked
bit-exact (CRC-32 fingerprints of the loaded tensors against the saved ones; resharded targets against the
all-gathered saved tensors, and every system's against the first): a mismatch aborts the run
(:class:`benchmarks.common.NumericalDisagreement`, non-zero exit).

Usage (from the repository root)::

    python benchmarks/checkpoint.py                 # ~2.5 GB state, 2 and 4 processes, 5 repeats (~5 min)
    python benchmarks/checkpoint.py --smoke         # ~40 MB state, 2 processes, 2 repeats: end-to-end check
    python benchmarks/checkpoint.py --nproc 2 --repeats 9 --dir /mnt/nvme/tmp
    torchrun --standalone --nproc-per-node 4 benchmarks/checkpoint.py   # one world size, torchrun-launched

Writes ``<out>/checkpoint_cpu<tag>.json`` (provenance stamp, configuration, every sample per rank, summaries,
goals, load average) and ``<out>/checkpoint_cpu<tag>.md`` (the tables); ``--smoke`` uses the tag ``_smoke``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import gc
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    NumericalDisagreement,
    current_rss_bytes,
    efficiency_goal,
    fill_defaults,
    format_bytes,
    free_port,
    markdown_table,
    paired_ratio_summary,
    peak_rss_bytes,
    provenance,
    provenance_markdown,
    ratio_goal,
    reset_peak_rss,
    rotated,
    setup_logging,
    summarize,
    write_json,
    write_text,
)

logger = logging.getLogger("benchmarks.checkpoint")

SYSTEMS = ("ours", "dcp", "dcp_tuned")
LABEL = {"ours": "ours", "dcp": "DCP default", "dcp_tuned": "DCP tuned"}

# Shapes: per-expert tensors of 16 MiB split W ways on dim 1 stay aligned to our 4 MiB crc chunks for W <= 4.
FULL_DEFAULTS = dict(nproc="2,4", dim=1024, layers=2, heads=8, experts=8, expert_dim=4096, repeats=5,
                     crc_chunk_kib=4096)
SMOKE_DEFAULTS = dict(nproc="2", dim=128, layers=2, heads=4, experts=8, expert_dim=512, repeats=2, crc_chunk_kib=64)


# --------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; smoke-dependent defaults are filled in afterwards."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny state (~40 MB), 2 processes, 2 repeats: end-to-end check")
    p.add_argument("--nproc", help="world sizes to run, comma separated, each a separate spawn (2,4; smoke 2)")
    p.add_argument("--repeats", type=int, help="timed repeats per system, order rotated per repeat (5; smoke 2)")
    p.add_argument("--dim", type=int, help="model width (1024; smoke 128)")
    p.add_argument("--layers", type=int, help="transformer blocks, all MoE (2)")
    p.add_argument("--heads", type=int, help="attention heads (8; smoke 4)")
    p.add_argument("--experts", type=int, help="experts per MoE layer (8); must divide by every world size")
    p.add_argument("--expert-dim", type=int, help="SwiGLU expert hidden size (4096; smoke 512)")
    p.add_argument("--crc-chunk-kib", type=int,
                   help="our crc32 granularity in KiB (library default 4096; smoke 64 so the tiny shards stay aligned)")
    p.add_argument("--save-systems", default="ours,dcp,dcp_tuned", help=f"comma list from {','.join(SYSTEMS)}")
    p.add_argument("--load-systems", default="ours,dcp_tuned",
                   help="systems whose checkpoints are loaded (DCP's reader has no tuning knobs: add 'dcp' to also "
                   "load default DCP's files)")
    p.add_argument("--io-threads", type=int, default=4, help="reader threads per rank: ours and the cold-read limit (4)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (1)")
    p.add_argument("--pin", action="store_true", help="pin each rank to one core when there are enough cores")
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a fresh dir under $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint directory at the end")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--goal-stall-over-memcpy", type=float, default=1.5,
                   help="ours' stall over the memcpy floor of the same repeat (<=)")
    p.add_argument("--goal-stall-vs-dcp", type=float, default=3.0, help="default DCP's stall over ours (>=)")
    p.add_argument("--goal-durable-of-disk", type=float, default=0.8,
                   help="ours' durable-save bandwidth over the disk-write limit of the same repeat (>=)")
    p.add_argument("--goal-durable-vs-dcp-tuned", type=float, default=1.0,
                   help="tuned DCP's durable time over ours (>=)")
    p.add_argument("--goal-reshard-amplification", type=float, default=1.0,
                   help="ours' bytes read over bytes needed, resharded load (<=)")
    p.add_argument("--goal-reshard-vs-dcp-tuned", type=float, default=1.5,
                   help="tuned DCP's resharded cold-load time over ours (>=)")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")
    p.add_argument("--tag", default=None, help="suffix of the result files (default '' or '_smoke')")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    fill_defaults(args, SMOKE_DEFAULTS if args.smoke else FULL_DEFAULTS)
    if args.tag is None:
        args.tag = "_smoke" if args.smoke else ""
    args.world_list = [int(x) for x in str(args.nproc).split(",") if x.strip()]
    args.save_list = [s.strip() for s in args.save_systems.split(",") if s.strip()]
    args.load_list = [s.strip() for s in args.load_systems.split(",") if s.strip()]
    args.skipped = {}
    reason = dcp_tuned_unsupported()
    if reason and "dcp_tuned" in args.save_list:
        if args.save_systems != p.get_default("save_systems") or args.load_systems != p.get_default("load_systems"):
            p.error(f"dcp_tuned: {reason}")
        # the default lists: DCP default takes the tuned one's place in the loads
        args.save_list.remove("dcp_tuned")
        args.load_list = ["dcp" if x == "dcp_tuned" else x for x in args.load_list]
        args.skipped["dcp_tuned"] = reason
    return args


def dcp_tuned_unsupported() -> str | None:
    """Why the tuned DCP configuration cannot run with this torch, or ``None`` when it can."""
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if (major, minor) < (2, 13):
        return (f"torch {torch.__version__}: DCP's DefaultStager fails staging a DTensor (KeyError in its deepcopy; "
                "seen with torch 2.11, works with 2.13)")
    return None


def validate_args(args: argparse.Namespace) -> None:
    """Raise ``SystemExit`` with a clear message for impossible settings."""
    errors = []
    for name, lst in (("--save-systems", args.save_list), ("--load-systems", args.load_list)):
        if any(s not in SYSTEMS for s in lst) or len(set(lst)) != len(lst):
            errors.append(f"{name}: a comma list of distinct names from {list(SYSTEMS)}")
    if any(s not in args.save_list for s in args.load_list):
        errors.append("every system in --load-systems must also be in --save-systems (its checkpoint is loaded)")
    if not args.world_list or min(args.world_list) < 2:
        errors.append("--nproc: world sizes >= 2")
    for w in args.world_list:
        if args.experts % w:
            errors.append(f"--experts {args.experts} must divide by the world size {w} (EP over all ranks)")
        if args.dim % w or args.expert_dim % w:
            errors.append(f"--dim and --expert-dim must divide by the world size {w} (the resharded load splits dim 1)")
    if args.dim % args.heads:
        errors.append(f"--dim {args.dim} must divide by --heads {args.heads}")
    if args.repeats < 1:
        errors.append("--repeats must be >= 1")
    if args.crc_chunk_kib < 1:
        errors.append("--crc-chunk-kib must be >= 1")
    if errors:
        raise SystemExit("checkpoint benchmark: " + "; ".join(errors))


# --------------------------------------------------------------------------------------------
# the training state


def model_configs(args: argparse.Namespace):
    """ModelConfig and MoEConfig of the benchmark model (every block MoE)."""
    from system.config.model import ModelConfig
    from system.config.moe import MoEConfig
    from system.data import ByteTokenizer

    vocab = -(-ByteTokenizer.vocab_size // 64) * 64
    model = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, ffn_dim=args.expert_dim,
                        vocab_size=vocab, max_seq_len=64)
    moe = MoEConfig(num_experts=args.experts, top_k=2, expert_dim=args.expert_dim, capacity_factor=0.0)
    model.validate()
    moe.validate()
    return model, moe


def _pieces(value) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """``(local tensor, global offsets)`` of a state entry (a plain tensor is one piece at the origin)."""
    from system.checkpoint import ShardedEntry

    if isinstance(value, ShardedEntry):
        return [(s.tensor, tuple(int(o) for o in s.offsets)) for s in value.shards]
    return [(value, (0,) * value.dim())]


def build_state(args: argparse.Namespace, rank: int, world: int):
    """The seeded training state on this rank: ``(model, optimizer, {name: Tensor | ShardedEntry})``.

    Weights: ``init_weights(seed)`` (identical on every rank), then expert parallelism over all ranks.
    AdamW moments: ``ensure_optimizer_state`` then a random fill seeded by (name, global offsets), so
    replicated moments are identical on every rank and expert moments depend only on the expert.
    """
    from system.checkpoint.train_state import ensure_optimizer_state, sharded_train_state
    from system.config.parallel import ParallelConfig
    from system.distributed import ParallelDims
    from system.models.model import MoETransformer
    from system.models.parallelize import parallelize_model

    model_cfg, moe_cfg = model_configs(args)
    torch.manual_seed(args.seed)
    model = MoETransformer(model_cfg, moe_cfg)
    model.init_weights(seed=args.seed)
    mesh = ParallelDims.from_config(dp=1, ep=world, world_size=world).build_mesh("cpu")
    parallelize_model(model, mesh, ParallelConfig(dp=1, ep=world, expert_mode="ep"))
    gc.collect()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    ensure_optimizer_state(opt)
    state = sharded_train_state(model, opt)
    with torch.no_grad():
        for name, value in state.items():
            if not name.startswith("optim."):
                continue
            for tensor, offsets in _pieces(value):
                g = torch.Generator().manual_seed(args.seed + zlib.crc32(f"{name}@{offsets}".encode()))
                if ".exp_avg_sq." in name:
                    tensor.uniform_(0.0, 1e-6, generator=g)
                else:
                    tensor.normal_(0.0, 1e-3, generator=g)
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p]["step"].fill_(2.0)
    return model, opt, state


def local_bytes(tree: dict) -> int:
    """Bytes of the local tensors of a state / target dict (ours' entries or DCP's DTensors)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for value in tree.values():
        if isinstance(value, DTensor):
            value = value.to_local()
        for tensor, _ in _pieces(value):
            total += tensor.numel() * tensor.element_size()
    return total


def dcp_state(state: dict, mesh, rank: int, world: int) -> dict:
    """The same tensors for DCP: experts as ``DTensor(Shard(0))`` over all ranks, the rest plain (no copies)."""
    from torch.distributed.tensor import DTensor, Shard

    from system.checkpoint import ShardedEntry

    out = {}
    for name, value in state.items():
        if isinstance(value, ShardedEntry):
            (local, offsets), = _pieces(value)
            shape = tuple(int(s) for s in value.global_shape)
            if offsets != (rank * shape[0] // world,) + (0,) * (len(shape) - 1) or local.shape[0] * world != shape[0]:
                raise AssertionError(f"{name}: expected an even Shard(0) block, got offsets {offsets} {tuple(local.shape)}")
            out[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape,
                                           stride=_contiguous_strides(shape))
        else:
            out[name] = value
    return out


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def resharded_targets(state: dict, mesh, rank: int, world: int) -> tuple[dict, dict]:
    """Load targets with the experts split on dim 1 (``[E, a/W, b]`` per rank); dense tensors whole.

    Returns ``(ours, dcp)`` describing the same freshly allocated local tensors.
    """
    from torch.distributed.tensor import DTensor, Shard

    from system.checkpoint import Shard as CkptShard
    from system.checkpoint import ShardedEntry

    ours, dcp = {}, {}
    for name, value in state.items():
        if isinstance(value, ShardedEntry):
            shape = tuple(int(s) for s in value.global_shape)
            rows = shape[1] // world
            local = torch.zeros((shape[0], rows, *shape[2:]), dtype=value.shards[0].tensor.dtype)
            ours[name] = ShardedEntry(shape, [CkptShard(local, (0, rank * rows) + (0,) * (len(shape) - 2))])
            dcp[name] = DTensor.from_local(local, mesh, [Shard(1)], run_check=False, shape=shape,
                                           stride=_contiguous_strides(shape))
        else:
            local = torch.zeros_like(value)
            ours[name], dcp[name] = local, local
    return ours, dcp


def fingerprints(tree: dict) -> dict[str, list[int]]:
    """CRC-32 of every local piece (exact and cheap: compares loads without keeping copies)."""
    from system.checkpoint.checksum import crc32

    out = {}
    for name, value in tree.items():
        out[name] = [crc32(memoryview(t.detach().contiguous().view(torch.uint8).numpy())) for t, _ in _pieces(value)]
    return out


def zero_(tree: dict) -> None:
    with torch.no_grad():
        for value in tree.values():
            for t, _ in _pieces(value):
                t.zero_()


# --------------------------------------------------------------------------------------------
# files, page cache, /proc


def proc_io() -> dict[str, int]:
    """``/proc/self/io`` counters of this process (all threads)."""
    out = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                key, value = line.split(":")
                out[key.strip()] = int(value)
    except OSError:
        pass
    return out


def rss_anon_bytes() -> int | None:
    """``RssAnon`` of this process in bytes (``None`` where ``/proc`` is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def files_under(path: str) -> list[str]:
    return sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)


def evict(paths: list[str]) -> None:
    """fsync then drop the page cache of every file (``POSIX_FADV_DONTNEED`` only drops clean pages)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fs_type(path: str) -> str:
    """File system type of the mount holding ``path`` (from /proc/mounts)."""
    best, kind = "", "unknown"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, f"{parts[2]} ({parts[0]} on {mnt})"
    except OSError:
        pass
    return kind


def eviction_check(directory: str, nbytes: int = 64 << 20) -> dict[str, float]:
    """Show that ``posix_fadvise(DONTNEED)`` empties the page cache here: warm vs cold read of one file."""
    path = os.path.join(directory, "evict_check.bin")
    data = os.urandom(1 << 20) * (nbytes >> 20)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    buf = bytearray(nbytes)

    def read() -> tuple[float, int]:
        fd = os.open(path, os.O_RDONLY)
        before = proc_io().get("read_bytes", 0)
        t0 = time.perf_counter()
        done = 0
        while done < nbytes:
            done += os.preadv(fd, [memoryview(buf)[done:]], done)
        dt = time.perf_counter() - t0
        os.close(fd)
        return dt, proc_io().get("read_bytes", 0) - before

    warm_s, warm_disk = read()
    evict([path])
    cold_s, cold_disk = read()
    os.remove(path)
    return {"bytes": nbytes, "warm_read_gbps": nbytes / warm_s / 1e9, "cold_read_gbps": nbytes / cold_s / 1e9,
            "warm_disk_read_bytes": warm_disk, "cold_disk_read_bytes": cold_disk}


# --------------------------------------------------------------------------------------------
# systems


class OursSaver:
    """Our persistent :class:`AsyncCheckpointer`."""

    def __init__(self, state: dict, crc_chunk_bytes: int):
        from system.checkpoint import AsyncCheckpointer

        self.state = state
        self.ckpt = AsyncCheckpointer(crc_chunk_bytes=crc_chunk_bytes)

    def save(self, path: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        handle = self.ckpt.save(self.state, path)
        t1 = time.perf_counter()
        handle.wait()
        return t1 - t0, time.perf_counter() - t0

    def close(self) -> None:
        self.ckpt.close()


class DcpSaver:
    """``dcp.async_save``: default (fresh stager per call) or tuned (persistent stager, 2 threads, plan caching)."""

    def __init__(self, state: dict, pg, rank: int, tuned: bool):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.state, self.pg, self.rank, self.tuned = state, pg, rank, tuned
        # CPU only: no pinned / shared memory, no CUDA stream; staging blocks the caller (training-safe on return).
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                   use_async_staging=False, use_non_blocking_copy=False)) if tuned else None

    def save(self, path: str) -> tuple[float, float]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

        t0 = time.perf_counter()
        if self.tuned:
            fut = dcp.async_save(self.state, storage_writer=FileSystemWriter(path, thread_count=2, sync_files=True),
                                 planner=DefaultSavePlanner(enable_plan_caching=True), process_group=self.pg,
                                 async_stager=self.stager)
        else:
            fut = dcp.async_save(self.state, checkpoint_id=path, process_group=self.pg)
        t1 = time.perf_counter()
        fut.result()
        if self.rank == 0:
            fsync_dir(path)  # DCP renames .metadata.tmp without syncing the directory; ours does
        return t1 - t0, time.perf_counter() - t0

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()


def _counting_reader(path: str, counter: list[int]):
    """A DCP ``FileSystemReader`` that counts the bytes its file views hand to ``torch.load``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.utils import _ReaderView

    class CountingView(_ReaderView):
        def readinto(self, b):  # noqa: D102
            n = super().readinto(b)
            counter[0] += n or 0
            return n

        def read(self, size=-1):  # noqa: D102
            data = super().read(size)
            counter[0] += len(data)
            return data

    class CountingReader(FileSystemReader):
        def _slice_file(self, file, sinfo):  # noqa: D102
            return CountingView(file, sinfo.offset, sinfo.length)

    return CountingReader(path)


def load_ours(targets: dict, path: str, io_threads: int) -> int:
    from system.checkpoint import load

    return load(targets, path, num_threads=io_threads).bytes_read


def load_dcp(targets: dict, path: str, pg) -> int:
    import torch.distributed.checkpoint as dcp

    counter = [0]
    dcp.load(targets, storage_reader=_counting_reader(path, counter), process_group=pg)
    return counter[0]


# --------------------------------------------------------------------------------------------
# physical limits


def measure_limits(s: "Setup", directory: str, file_bytes: int, snapshot_bytes: int) -> dict[str, Any]:
    """Disk write + fsync, cold read and memcpy, every rank at once (this rank's times).

    Each rank writes ``file_bytes`` (its share of the checkpoint) from a random buffer and fsyncs, evicts
    the file, reads it back with ``--io-threads`` threads, and copies ``snapshot_bytes`` with ``copy_``
    into pre-faulted memory.
    """
    src, dst = s.scratch
    src_u8 = memoryview(src.view(torch.uint8).numpy())
    chunk = len(src_u8)
    path = os.path.join(directory, f"limit-{s.rank:05d}.bin")
    out: dict[str, Any] = {"file_bytes": file_bytes, "snapshot_bytes": snapshot_bytes}

    dist.barrier()
    t0 = time.perf_counter()
    piece = 64 << 20
    with open(path, "wb", buffering=0) as f:  # the fastest way found here: pieces, writeback started per piece
        fd, done = f.fileno(), 0
        while done < file_bytes:
            n = min(piece, chunk, file_bytes - done)
            k = f.write(src_u8[:n])
            os.posix_fadvise(fd, done, k, os.POSIX_FADV_DONTNEED)
            if done > piece:
                os.posix_fadvise(fd, 0, done - piece, os.POSIX_FADV_DONTNEED)
            done += k
        os.fsync(fd)
    out["write_s"] = time.perf_counter() - t0
    dist.barrier()

    evict([path])
    dist.barrier()
    dst_u8 = memoryview(dst.view(torch.uint8).numpy())
    piece = 16 << 20
    ranges = [(o, min(piece, file_bytes - o)) for o in range(0, file_bytes, piece)]
    fd = os.open(path, os.O_RDONLY)
    io0 = proc_io().get("read_bytes", 0)

    def read(rng: tuple[int, int]) -> int:
        off, n = rng
        slot = (off // piece) % max(1, len(dst_u8) // piece)
        view = dst_u8[slot * piece : slot * piece + n]
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], off + got)
            if k <= 0:
                raise OSError(f"short read of {path}")
            got += k
        return got

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(s.args.io_threads) as pool:
        total = sum(pool.map(read, ranges))
    out["read_s"] = time.perf_counter() - t0
    out["read_disk_bytes"] = proc_io().get("read_bytes", 0) - io0
    os.close(fd)
    assert total == file_bytes
    os.remove(path)
    dist.barrier()

    numel = src.numel()
    t0 = time.perf_counter()
    done = 0
    while done < snapshot_bytes:
        n = min(numel, (snapshot_bytes - done) // src.element_size() or 1)
        dst[:n].copy_(src[:n])
        done += n * src.element_size()
    out["memcpy_s"] = time.perf_counter() - t0
    dist.barrier()
    return out


# --------------------------------------------------------------------------------------------
# rank body


@dataclass
class Setup:
    """Per-rank run context."""

    args: argparse.Namespace
    rank: int
    world: int
    root: str
    scratch: tuple[torch.Tensor, torch.Tensor] = field(default_factory=tuple)


def _max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _timed(s: Setup, fn) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` between barriers; returns its result and this rank's time, memory and I/O counters."""
    gc.collect()
    reset_ok = reset_peak_rss()
    rss0 = current_rss_bytes() or 0
    io0 = proc_io()
    dist.barrier()
    t0 = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t0
    io1 = proc_io()
    peak = peak_rss_bytes()
    dist.barrier()
    return result, {
        "seconds": dt, "rss_before": rss0, "peak_rss": peak, "peak_extra": max(0, peak - rss0),
        "rss_reset_ok": reset_ok, "disk_read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0),
        "disk_write_bytes": io1.get("write_bytes", 0) - io0.get("write_bytes", 0),
    }


def _check_resharded_sample(s: Setup, state: dict, targets: dict, names: list[str]) -> list[str]:
    """Compare resharded targets with the saved tensors (gathered from every rank) for ``names``."""
    problems = []
    for name in names:
        (local, _), = _pieces(state[name])
        parts = [torch.empty_like(local) for _ in range(s.world)]
        dist.all_gather(parts, local.contiguous())
        full = torch.cat(parts, dim=0)
        rows = full.shape[1] // s.world
        (got, _), = _pieces(targets[name])
        if not torch.equal(full[:, s.rank * rows : (s.rank + 1) * rows], got):
            problems.append(f"rank {s.rank}: resharded {name} differs from the saved tensor")
        del full, parts
    return problems


def run_rank(args: argparse.Namespace) -> None:
    """The body of one rank: init, state, measurements, gather, rank 0 writes this world's results."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    level = logging.getLevelName(args.log_level.upper()) if rank == 0 else logging.WARNING
    setup_logging(rank, level)
    for name in ("system", "torch.distributed.checkpoint"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    torch.set_num_threads(args.threads)
    pinned = None
    if args.pin and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= world:
            os.sched_setaffinity(0, [cpus[rank]])
            pinned = cpus[rank]
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    from system.distributed.init import shutdown_distributed

    _run(Setup(args, rank, world, args.run_root), pinned)
    shutdown_distributed()  # success only: after an exception torchrun stops the peers


def _run(s: Setup, pinned: int | None) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from system.checkpoint.planner import build_save_plan, data_file_name
    from system.checkpoint.writer import collect

    a = s.args
    t_start = time.perf_counter()
    model, opt, state = build_state(a, s.rank, s.world)
    params_total, _ = model.num_params()  # of the full model (the experts' global count)
    mesh = init_device_mesh("cpu", (s.world,), mesh_dim_names=("ckpt",))
    dcp_pg = dist.new_group(backend="gloo")  # DCP's collectives on their own group, as ours
    dstate = dcp_state(state, mesh, s.rank, s.world)
    re_ours, re_dcp = resharded_targets(state, mesh, s.rank, s.world)

    decls, _ = collect(state)
    plan = build_save_plan([list(d) for d in _all_gather(decls)])
    ours_file_bytes = plan.file_sizes.get(data_file_name(s.rank), 0)
    ours_snapshot = plan.bytes_per_rank(s.world)[s.rank]
    bytes_info = {
        "state_local_bytes": local_bytes(state),
        "ours_snapshot_bytes": ours_snapshot,
        "ours_file_bytes": ours_file_bytes,
        "dcp_staged_bytes": local_bytes(dstate),
        "needed_same_layout_bytes": local_bytes(state),
        "needed_resharded_bytes": local_bytes(re_ours),
    }
    scratch_bytes = max(16 << 20, min(128 << 20, ours_snapshot))
    src = torch.randn(scratch_bytes // 4)
    dst = torch.randn(scratch_bytes // 4)  # pre-faulted
    s.scratch = (src, dst)
    expected = fingerprints(state)
    expert_names = sorted(n for n, v in state.items() if not isinstance(v, torch.Tensor))
    sample = expert_names[: 3]
    logger.info("world %d: state %s per rank (%s in total), built in %.1f s; checkpoint dir %s", s.world,
                format_bytes(bytes_info["state_local_bytes"]), format_bytes(sum(plan.file_sizes.values())),
                time.perf_counter() - t_start, s.root)

    evict_info = eviction_check(s.root) if s.rank == 0 else None
    # Everything alive now (modules, the state) stays: keep it out of the gc.collect() before each measurement,
    # which would otherwise walk torch's, DCP's and sympy's objects every time (~0.1-0.4 s each here).
    gc.collect()
    gc.freeze()
    savers = {}
    for name in a.save_list:
        savers[name] = (OursSaver(state, a.crc_chunk_kib << 10) if name == "ours"
                        else DcpSaver(dstate, dcp_pg, s.rank, tuned=name == "dcp_tuned"))

    # Warm-up: one save per system (allocates staging buffers, builds and caches plans); its numbers are kept.
    first: dict[str, Any] = {}
    for name, saver in savers.items():
        path = os.path.join(s.root, f"warmup_{name}")
        gc.collect()
        rss0 = current_rss_bytes() or 0
        anon0 = rss_anon_bytes() or 0
        (stall, durable), info = _timed(s, lambda saver=saver, path=path: saver.save(path))
        gc.collect()
        first[name] = {"stall_s": stall, "durable_s": durable, "peak_extra": info["peak_extra"],
                       "persistent_rss": max(0, (current_rss_bytes() or 0) - rss0),
                       "persistent_rss_anon": max(0, (rss_anon_bytes() or 0) - anon0)}
        dist.barrier()
        if s.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        logger.info("warm-up save %-9s stall %.3f s, durable %.2f s", name, _max_over_ranks(stall), _max_over_ranks(durable))

    samples: dict[str, dict[str, list]] = {}

    def add(metric: str, system: str, value: Any) -> None:
        samples.setdefault(metric, {}).setdefault(system, []).append(value)

    limits: list[dict[str, Any]] = []
    resharded_reference: dict[str, list[int]] | None = None
    load_at_start = list(os.getloadavg())
    for r in range(a.repeats):
        rdir = os.path.join(s.root, f"repeat_{r}")
        if s.rank == 0:
            os.makedirs(rdir, exist_ok=True)
        dist.barrier()
        limits.append(measure_limits(s, rdir, ours_file_bytes, ours_snapshot))
        for name in rotated(a.save_list, r):
            path = os.path.join(rdir, name)
            (stall, durable), info = _timed(s, lambda name=name, path=path: savers[name].save(path))
            add("stall_s", name, stall)
            add("durable_s", name, durable)
            add("save_peak_extra", name, info["peak_extra"])
            add("save_disk_write_bytes", name, info["disk_write_bytes"])
            if s.rank == 0:
                add("files_bytes", name, sum(os.path.getsize(f) for f in files_under(path)))
                evict(files_under(path))  # keep the page cache small between measurements
            dist.barrier()
            logger.info("repeat %d/%d save %-9s stall %7.3f s  durable %6.2f s", r + 1, a.repeats, name,
                        _max_over_ranks(stall), _max_over_ranks(durable))
        for name in rotated(a.load_list, r):
            path = os.path.join(rdir, name)
            for kind, targets in (("same", state if name == "ours" else dstate),
                                  ("resharded", re_ours if name == "ours" else re_dcp)):
                zero_(state if kind == "same" else re_ours)  # the same memory as DCP's DTensor views
                if s.rank == 0:
                    evict(files_under(path))
                dist.barrier()
                if name == "ours":
                    nbytes, info = _timed(s, lambda t=targets, p=path: load_ours(t, p, a.io_threads))
                else:
                    nbytes, info = _timed(s, lambda t=targets, p=path: load_dcp(t, p, dcp_pg))
                add(f"load_{kind}_s", name, info["seconds"])
                add(f"load_{kind}_bytes_read", name, nbytes)
                add(f"load_{kind}_disk_read_bytes", name, info["disk_read_bytes"])
                add(f"load_{kind}_peak_extra", name, info["peak_extra"])
                # correctness, every load (outside the timed interval): bit-exact or the run aborts
                problems: list[str] = []
                if kind == "same":
                    got = fingerprints(state)
                    bad = [k for k in expected if got[k] != expected[k]]
                    if bad:
                        problems.append(f"rank {s.rank}: {name} same-layout load differs from the saved state in "
                                        f"{len(bad)} tensors, e.g. {bad[0]}")
                else:
                    got = fingerprints(re_ours)
                    if resharded_reference is None:
                        problems += _check_resharded_sample(s, state, re_ours, sample)
                        resharded_reference = got
                    bad = [k for k in got if got[k] != resharded_reference[k]]
                    if bad:
                        problems.append(f"rank {s.rank}: {name} resharded load differs from the first resharded load "
                                        f"in {len(bad)} tensors, e.g. {bad[0]}")
                abort_on_mismatch(problems, f"repeat {r + 1}, {LABEL[name]} {kind}-layout load")
                logger.info("repeat %d/%d load %-9s %-9s %6.2f s  read %s (needed %s on rank 0)", r + 1, a.repeats,
                            name, kind, _max_over_ranks(info["seconds"]), format_bytes(nbytes),
                            format_bytes(bytes_info[f"needed_{'same_layout' if kind == 'same' else 'resharded'}_bytes"]))
        # the live state was reloaded by the same-layout loads; make sure it is intact for the next repeat
        intact = fingerprints(state) == expected
        abort_on_mismatch([] if intact else [f"rank {s.rank}: live state differs"], f"after repeat {r + 1}")
        dist.barrier()
        if s.rank == 0:
            shutil.rmtree(rdir, ignore_errors=True)
        dist.barrier()
    for saver in savers.values():
        saver.close()

    per_rank = {
        "rank": s.rank, "pinned_cpu": pinned, "bytes": bytes_info, "first_save": first, "samples": samples,
        "limits": limits, "rss_end": current_rss_bytes(), "rss_anon_end": rss_anon_bytes(),
    }
    gathered = _all_gather(per_rank)
    if s.rank == 0:
        world_result = {
            "world_size": s.world, "ranks": gathered, "eviction_check": evict_info, "params_total": params_total,
            "total_checkpoint_bytes_ours": sum(plan.file_sizes.values()),
            "loadavg_1_5_15_at_start": load_at_start, "loadavg_1_5_15_at_end": list(os.getloadavg()),
            "wall_s": time.perf_counter() - t_start,
        }
        Path(s.args.partial_path).write_text(json.dumps(world_result))


def abort_on_mismatch(problems: list[str], when: str) -> None:
    """Collective (every rank calls it at the same point): raise on every rank when any rank found a mismatch.

    Raises:
        NumericalDisagreement: the message names the load and the first problems found.
    """
    found = [p for g in _all_gather(problems) for p in g]
    if found:
        raise NumericalDisagreement(f"{when}: not bit-exact ({len(found)} problem(s)): " + "; ".join(found[:3]))


def _all_gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------
# results


def _per_repeat(ranks: list[dict], metric: str, system: str, how: str = "max") -> list[float]:
    """One value per repeat over ranks: ``max`` (times) or ``sum`` (bytes)."""
    columns = [r["samples"].get(metric, {}).get(system) for r in ranks]
    if any(c is None for c in columns):
        return []
    agg = max if how == "max" else sum
    return [agg(vals) for vals in zip(*columns)]


def _med(xs: list[float]) -> float:
    return summarize(xs)["median"] if xs else math.nan


def _paired(num: list[float], den: list[float]) -> dict[str, Any]:
    """Median of the per-repeat ratios ``num[i] / den[i]`` with its 95% bootstrap interval."""
    r = paired_ratio_summary(num, den)
    return {k: r[k] for k in ("median", "ci_low", "ci_high", "n", "ratios")}


def summarize_world(w: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per system: medians, and paired per-repeat ratios to the limits and between systems."""
    ranks = w["ranks"]
    world = w["world_size"]
    b = [r["bytes"] for r in ranks]
    total_file = w["total_checkpoint_bytes_ours"]
    needed_same = sum(x["needed_same_layout_bytes"] for x in b)
    needed_re = sum(x["needed_resharded_bytes"] for x in b)
    n_rep = len(ranks[0]["limits"])
    lim = {
        "write_s": [max(r["limits"][i]["write_s"] for r in ranks) for i in range(n_rep)],
        "read_s": [max(r["limits"][i]["read_s"] for r in ranks) for i in range(n_rep)],
        "memcpy_s": [max(r["limits"][i]["memcpy_s"] for r in ranks) for i in range(n_rep)],
        "read_disk_bytes": [sum(r["limits"][i]["read_disk_bytes"] for r in ranks) for i in range(n_rep)],
    }
    write_s, read_s, memcpy_s = _med(lim["write_s"]), _med(lim["read_s"]), _med(lim["memcpy_s"])
    disk_bw = [total_file / t for t in lim["write_s"]]  # per repeat
    read_bw = [total_file / t for t in lim["read_s"]]
    limits = {
        "disk_write_gbps": total_file / write_s / 1e9,
        "cold_read_gbps": total_file / read_s / 1e9,
        "memcpy_gbps_per_rank": max(x["ours_snapshot_bytes"] for x in b) / memcpy_s / 1e9,
        "memcpy_floor_s": memcpy_s,
        "disk_write_s": write_s,
        "cold_read_s": read_s,
        "cold_read_disk_bytes_over_file_bytes": _med(lim["read_disk_bytes"]) / total_file if total_file else None,
        "samples": lim,
    }
    systems: dict[str, Any] = {}
    for name in args.save_list:
        stall = _per_repeat(ranks, "stall_s", name)
        durable = _per_repeat(ranks, "durable_s", name)
        files = ranks[0]["samples"].get("files_bytes", {}).get(name, [])
        per_repeat = {"stall_s": stall, "durable_s": durable, "files_bytes": files}
        sm: dict[str, Any] = {
            "stall_s": summarize(stall),
            "durable_s": summarize(durable),
            "first_save_stall_s": max(r["first_save"][name]["stall_s"] for r in ranks),
            "first_save_durable_s": max(r["first_save"][name]["durable_s"] for r in ranks),
            "checkpoint_bytes": _med(files) if files else math.nan,
            "staged_bytes_per_rank_max": max(x["ours_snapshot_bytes"] if name == "ours" else x["dcp_staged_bytes"] for x in b),
            "stall_over_memcpy_floor": _paired(stall, lim["memcpy_s"]),
            "durable_gbps": summarize([f / t / 1e9 for f, t in zip(files, durable)])["median"],
            "durable_of_disk_write": _paired([f / t for f, t in zip(files, durable)], disk_bw),
            "save_peak_extra_bytes_max_rank": max(max(r["samples"]["save_peak_extra"][name]) for r in ranks),
            "persistent_rss_bytes_max_rank": max(r["first_save"][name]["persistent_rss"] for r in ranks),
            "persistent_rss_anon_bytes_max_rank": max(r["first_save"][name]["persistent_rss_anon"] for r in ranks),
        }
        if name in args.load_list:
            for kind, needed in (("same", needed_same), ("resharded", needed_re)):
                t = _per_repeat(ranks, f"load_{kind}_s", name)
                nread = _per_repeat(ranks, f"load_{kind}_bytes_read", name, "sum")
                disk = _per_repeat(ranks, f"load_{kind}_disk_read_bytes", name, "sum")
                per_repeat[f"load_{kind}_s"] = t
                per_repeat[f"load_{kind}_bytes_read"] = nread
                sm[f"load_{kind}_s"] = summarize(t)
                sm[f"load_{kind}_bytes_read"] = _med(nread)
                sm[f"load_{kind}_disk_read_bytes"] = _med(disk)
                sm[f"load_{kind}_bytes_needed"] = needed
                sm[f"load_{kind}_read_amplification"] = _paired(nread, [needed] * len(nread))
                sm[f"load_{kind}_disk_read_amplification"] = _paired(disk, [needed] * len(disk))
                sm[f"load_{kind}_effective_gbps"] = summarize([needed / x / 1e9 for x in t])["median"]
                sm[f"load_{kind}_of_cold_read"] = _paired([needed / x for x in t], read_bw)
                sm[f"load_{kind}_peak_extra_bytes_max_rank"] = max(max(r["samples"][f"load_{kind}_peak_extra"][name])
                                                                   for r in ranks)
        sm["per_repeat"] = per_repeat
        systems[name] = sm
    ratios: dict[str, Any] = {}  # DCP time / ours time, paired per repeat
    if "ours" in systems:
        o = systems["ours"]["per_repeat"]
        for other in ("dcp", "dcp_tuned"):
            if other not in systems:
                continue
            d = systems[other]["per_repeat"]
            for metric in ("stall_s", "durable_s", "load_same_s", "load_resharded_s"):
                if metric in d and metric in o:
                    ratios[f"{other}_{metric[:-2]}_over_ours"] = _paired(d[metric], o[metric])
    return {
        "world_size": world, "bytes_per_rank": b, "total_checkpoint_bytes_ours": total_file,
        "bytes_needed_same_layout_total": needed_same, "bytes_needed_resharded_total": needed_re,
        "limits": limits, "systems": systems, "ratios": ratios, "eviction_check": w["eviction_check"],
        "loadavg_1_5_15_at_start": w["loadavg_1_5_15_at_start"], "loadavg_1_5_15_at_end": w["loadavg_1_5_15_at_end"],
        "wall_s": w["wall_s"], "pinned_cpus": [r["pinned_cpu"] for r in ranks],
        "samples_per_rank": [{"rank": r["rank"], "samples": r["samples"], "first_save": r["first_save"],
                              "limits": r["limits"]} for r in ranks],
    }


def evaluate_goals(worlds: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The goals per world size, each a :func:`ratio_goal` / :func:`efficiency_goal` on per-repeat pairs."""
    goals = []
    for key, w in worlds.items():
        sy = w["systems"]
        if "ours" not in sy:
            continue
        o = sy["ours"]["per_repeat"]
        lim = w["limits"]["samples"]

        def add(g: dict[str, Any]) -> None:
            goals.append({**g, "world_size": key})

        add(ratio_goal("ours' stall over the memcpy floor", o["stall_s"], lim["memcpy_s"], args.goal_stall_over_memcpy,
                       higher_is_better=False))
        if "dcp" in sy:
            add(ratio_goal("default DCP's stall over ours", sy["dcp"]["per_repeat"]["stall_s"], o["stall_s"],
                           args.goal_stall_vs_dcp))
        total = w["total_checkpoint_bytes_ours"]
        add(efficiency_goal("ours' durable-save bandwidth over the disk-write limit",
                            [f / t for f, t in zip(o["files_bytes"], o["durable_s"])],
                            [total / t for t in lim["write_s"]], args.goal_durable_of_disk))
        if "dcp_tuned" in sy:
            add(ratio_goal("tuned DCP's durable-save time over ours", sy["dcp_tuned"]["per_repeat"]["durable_s"],
                           o["durable_s"], args.goal_durable_vs_dcp_tuned))
        if "load_resharded_s" in o:
            needed = w["bytes_needed_resharded_total"]
            add(ratio_goal("ours' bytes read over bytes needed, resharded load", o["load_resharded_bytes_read"],
                           [needed] * len(o["load_resharded_bytes_read"]), args.goal_reshard_amplification,
                           higher_is_better=False))
            d = sy.get("dcp_tuned", {}).get("per_repeat", {})
            if "load_resharded_s" in d:
                add(ratio_goal("tuned DCP's resharded cold-load time over ours", d["load_resharded_s"],
                               o["load_resharded_s"], args.goal_reshard_vs_dcp_tuned))
    return goals


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _ci(r: dict[str, Any] | None, spec: str = ".2f", suffix: str = "") -> str:
    """``median [low, high]`` of a paired-ratio summary."""
    if not r or not r.get("n"):
        return "n/a"
    return f"{r['median']:{spec}}{suffix} [{r['ci_low']:{spec}}, {r['ci_high']:{spec}}]"


def _digits(g: dict[str, Any]) -> int:
    return 4 if "bytes read" in g["name"] else 3  # read amplification: 1.0000 vs 1.0003 matters


def _interval(g: dict[str, Any], digits: int) -> str:
    return f"[{g['ci_low']:.{digits}f}, {g['ci_high']:.{digits}f}]"


def render_markdown(result: dict[str, Any]) -> str:
    """The markdown report: provenance, setup, per-world tables, goals, notes."""
    cfg = result["config"]
    host = result["provenance"]["host"]
    lines = [
        "# Checkpoint save / load: ours vs PyTorch DCP (cpu)",
        "",
        provenance_markdown(result["provenance"]),
        f"MoETransformer d={cfg['dim']}, {cfg['layers']} layers (all MoE), E={cfg['experts']} SwiGLU experts "
        f"(hidden {cfg['expert_dim']}), {cfg['params_total'] / 1e6:.1f}M params; state = weights + AdamW exp_avg + "
        f"exp_avg_sq, fp32, {format_bytes(cfg['state_bytes_total'])} in total. Saved under EP over all ranks (experts "
        f"split on dim 0, dense replicated); resharded load: experts split on dim 1. Gloo, CPU, "
        f"{cfg['threads']} intra-op thread(s) per rank; one warm-up save per system, then {cfg['repeats']} repeats "
        f"(limits, saves, loads; system order rotated per repeat); a repeat's time is the slowest rank's. Times: "
        f"median [min, max] over repeats. Ratios: median of the per-repeat paired ratios [95% bootstrap interval]. "
        f"Every load of every repeat was bit-exact (checked; a mismatch aborts the run). Checkpoints on "
        f"{cfg['fs_type']}.",
        "",
    ]
    for key, w in result["worlds"].items():
        lim, sy = w["limits"], w["systems"]
        lines += [
            f"## {key} processes",
            "",
            f"Limits (same run, medians): disk write + fsync {lim['disk_write_gbps']:.2f} GB/s "
            f"({lim['disk_write_s']:.2f} s for {format_bytes(w['total_checkpoint_bytes_ours'])}), cold read "
            f"{lim['cold_read_gbps']:.2f} GB/s (disk bytes read / file bytes {_fmt(lim['cold_read_disk_bytes_over_file_bytes'])}), "
            f"memcpy {lim['memcpy_gbps_per_rank']:.2f} GB/s per rank with all ranks copying: memcpy floor "
            f"{1e3 * lim['memcpy_floor_s']:.0f} ms for the {format_bytes(sy['ours']['staged_bytes_per_rank_max'] if 'ours' in sy else 0)} "
            f"ours snapshots on its busiest rank.",
            "",
        ]
        headers = ["system", "staged / rank", "stall ms", "stall / memcpy floor", "first save stall ms",
                   "durable s", "durable GB/s", "durable / disk-write limit", "save peak extra / rank",
                   "persistent RSS / rank"]
        rows = []
        for name, sm in sy.items():
            st, du = sm["stall_s"], sm["durable_s"]
            rows.append([
                LABEL[name], format_bytes(sm["staged_bytes_per_rank_max"]),
                f"{1e3 * st['median']:.0f} [{1e3 * st['min']:.0f}, {1e3 * st['max']:.0f}]",
                _ci(sm["stall_over_memcpy_floor"], suffix="x"), f"{1e3 * sm['first_save_stall_s']:.0f}",
                f"{du['median']:.2f} [{du['min']:.2f}, {du['max']:.2f}]", _fmt(sm["durable_gbps"]),
                _ci(sm["durable_of_disk_write"]),
                format_bytes(sm["save_peak_extra_bytes_max_rank"]), format_bytes(sm["persistent_rss_bytes_max_rank"]),
            ])
        lines += ["Save:", "", markdown_table(headers, rows)]
        headers = ["system", "layout", "cold load s", "GB/s needed", "/ cold-read limit", "bytes read / needed",
                   "disk bytes read / needed", "load peak extra / rank"]
        rows = []
        for name, sm in sy.items():
            if "load_same_s" not in sm:
                continue
            for kind in ("same", "resharded"):
                t = sm[f"load_{kind}_s"]
                rows.append([
                    LABEL[name], "same (dim 0)" if kind == "same" else "resharded (dim 1)",
                    f"{t['median']:.2f} [{t['min']:.2f}, {t['max']:.2f}]", _fmt(sm[f"load_{kind}_effective_gbps"]),
                    _ci(sm[f"load_{kind}_of_cold_read"]), _ci(sm[f"load_{kind}_read_amplification"], ".4f"),
                    _ci(sm[f"load_{kind}_disk_read_amplification"], ".3f"),
                    format_bytes(sm[f"load_{kind}_peak_extra_bytes_max_rank"]),
                ])
        lines += [f"Cold load (bytes needed: same layout {format_bytes(w['bytes_needed_same_layout_total'])}, resharded "
                  f"{format_bytes(w['bytes_needed_resharded_total'])}, all ranks):", "", markdown_table(headers, rows)]
        if w["ratios"]:
            rows = [[k.replace("_over_ours", "").replace("dcp_tuned_", "DCP tuned ").replace("dcp_", "DCP default "),
                     _ci(v, suffix="x")] for k, v in w["ratios"].items()]
            lines += ["DCP time over ours (paired per repeat):", "", markdown_table(["quantity", "ratio"], rows)]
    lines += ["## Goals", "", markdown_table(
        ["processes", "goal", "target", "median", "95% interval", "verdict"],
        [[g["world_size"], g["name"], f"{g['direction']} {g['goal']:g}",
          f"{g['median']:.{_digits(g)}f}", _interval(g, _digits(g)), g["verdict"]] for g in result["goals"]])]
    notes = [f"- {g['world_size']} processes, {g['name']}: {g['note']}" for g in result["goals"] if g.get("note")]
    if notes:
        lines += ["", *notes]
    ev = next((w["eviction_check"] for w in result["worlds"].values() if w.get("eviction_check")), None)
    lines += [
        "",
        "Notes:",
        "",
        "- stall = wall time of `save()` / `async_save()` (the snapshot: training may change its tensors once it "
        "returns); durable = from that call until the checkpoint is committed and fsynced on every rank (ours: data "
        "files, metadata.json, directory; DCP: its `sync_files=True` fsyncs of the data files and `.metadata.tmp`, "
        "plus one directory fsync added by the benchmark after its rename). The caller waits right after the call, "
        "so no training competes with the background writer here.",
        "- memcpy floor = time for every rank to `copy_` the bytes ours snapshots on that rank (replicated tensors are "
        "written once, so ranks snapshot different amounts) into pre-faulted memory, all ranks at once; DCP stages "
        "its whole local state dict (replicated tensors on every rank), hence the larger `staged / rank`.",
        "- disk-write limit: every rank writes its share of the checkpoint bytes from memory (64 MiB pieces, writeback "
        "started per piece with `posix_fadvise(DONTNEED)`, as our writer does) and fsyncs, concurrently; "
        "cold-read limit: those files evicted and read back with `os.preadv`, "
        f"{cfg['io_threads']} threads per rank. Both are measured in every repeat and paired with that repeat's "
        "figures; loads are compared by bytes needed / time.",
        "- Cold loads: every file of the checkpoint is fsynced and evicted with `posix_fadvise(POSIX_FADV_DONTNEED)` "
        "before each load"
        + (f"; check: a 64 MiB file read {ev['warm_read_gbps']:.1f} GB/s warm and {ev['cold_read_gbps']:.2f} GB/s after "
           f"eviction, {ev['cold_disk_read_bytes'] / ev['bytes']:.2f}x its size fetched from the device" if ev else "")
        + ". 'bytes read' is what the reader asked for (ours: `LoadResult.bytes_read`; DCP: bytes its file views hand "
        "to `torch.load`), summed over ranks. 'disk bytes read' is `/proc/self/io` read_bytes summed over ranks: all "
        "ranks share one page cache here, so a chunk several ranks read comes from the device once (about the file "
        "bytes); DCP's over-read then costs memory copies and `torch.load` time rather than disk time, whereas with one "
        "node per rank or a remote store every over-read byte crosses the network or the disk. Same-layout loads go "
        "into the live state (as a resume).",
        "- Resharded: DCP's `FileSystemReader` loads every saved chunk that overlaps a request whole (`torch.load` of "
        "the chunk, then `narrow`), so each rank reads all W expert chunks to keep 1/W of them; ours reads only the "
        "byte ranges of the rows it needs (CRC-verified: reads are widened to whole CRC chunks of "
        f"{format_bytes(cfg['crc_chunk_kib'] << 10)}, which these shapes keep aligned).",
        "- peak extra = VmHWM during the operation (reset before it) minus RSS before it; persistent RSS = RSS kept "
        "after the first save (staging buffers: ours' reusable buffer, tuned DCP's cached stager storages).",
        "- Load average (1, 5, 15 min) at the end: "
        + "; ".join(f"{k} procs {', '.join(f'{v:.1f}' for v in w['loadavg_1_5_15_at_end'])}" for k, w in result['worlds'].items())
        + f" on {host['logical_cpus']} CPUs (shared VM: other processes show up as noise; see min/max).",
        "",
    ]
    return "\n".join(lines)


def write_results(args: argparse.Namespace, worlds_raw: dict[int, dict[str, Any]], root: str) -> dict[str, Any]:
    """Summarise every world size and write ``checkpoint_cpu<tag>.json`` and ``.md``."""
    from dataclasses import asdict

    model_cfg, moe_cfg = model_configs(args)
    params_total = next(iter(worlds_raw.values()))["params_total"]
    worlds = {str(w): summarize_world(raw, args) for w, raw in sorted(worlds_raw.items())}
    goals = evaluate_goals(worlds, args)
    config = {k: v for k, v in vars(args).items() if k not in ("run_root", "partial_path")}
    config.update(model=asdict(model_cfg), moe=asdict(moe_cfg), params_total=params_total,
                  state_bytes_total=3 * 4 * params_total, fs_type=fs_type(root), checkpoint_dir=root)
    result = {
        "benchmark": "checkpoint",
        "description": "resharding checkpoint save/load: system.checkpoint vs torch.distributed.checkpoint (default, tuned)",
        "provenance": provenance(["fsspec"]),
        "config": config,
        "skipped_systems": args.skipped,
        "method": {
            "state": "MoETransformer.init_weights(seed) + EP over all ranks; AdamW moments from ensure_optimizer_state "
            "then a random fill seeded by (name, global offsets); sharded_train_state describes it for ours, DTensor "
            "views of the same tensors for DCP",
            "dcp_default": "dcp.async_save(state, checkpoint_id=path, process_group=pg): fresh DefaultStager per call "
            "(StagingOptions all False on CPU), FileSystemWriter defaults (thread_count=1, sync_files=True)",
            "dcp_tuned": "persistent DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False, "
            "use_async_staging=False, use_non_blocking_copy=False)) passed as async_stager, "
            "FileSystemWriter(path, thread_count=2, sync_files=True), DefaultSavePlanner(enable_plan_caching=True)",
            "durable": "ours: handle.wait(); DCP: future.result() then fsync of the checkpoint directory on rank 0",
            "timing": "one warm-up save per system; every operation between barriers; per repeat the slowest rank's "
            "time; system order rotated every repeat (benchmarks.common.rotated); ratios are medians of per-repeat "
            "paired ratios with 95% bootstrap intervals",
            "agreement": "every load of every repeat checked bit-exact by CRC-32 fingerprints; a mismatch aborts",
            "cold": "fsync + posix_fadvise(DONTNEED) on every file of the checkpoint before each load",
            "read_amplification": "bytes read (all ranks) / bytes of the load targets (all ranks)",
            "peak_memory": "VmHWM reset via /proc/self/clear_refs before each operation, minus RSS before it",
        },
        "worlds": worlds,
        "goals": goals,
    }
    out_dir = Path(args.out)
    stem = f"checkpoint_cpu{args.tag}"
    json_path = write_json(out_dir / f"{stem}.json", result)
    md = render_markdown(result)
    md_path = write_text(out_dir / f"{stem}.md", md)
    logger.info("wrote %s and %s", json_path, md_path)
    print(md)
    return result


# --------------------------------------------------------------------------------------------
# launch


def _spawned_rank(local_rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    """Entry of a process started by :func:`main` (``torch.multiprocessing`` spawn)."""
    os.environ.update(
        RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    run_rank(args)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark: spawn each world size of ``--nproc`` in turn (or, under torchrun, this one)."""
    args = parse_args(argv)
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_launcher:
        args.world_list = [int(os.environ["WORLD_SIZE"])]
    validate_args(args)
    setup_logging(None, logging.getLevelName(args.log_level.upper()))
    if under_launcher:
        rank = int(os.environ["RANK"])
        base = args.dir or os.environ.get("CKPT_BENCH_DIR") or tempfile.gettempdir()
        root = os.path.join(base, f"ckpt_bench_torchrun_{os.environ.get('MASTER_PORT', 'x')}")
        os.makedirs(root, exist_ok=True)
        args.run_root, args.partial_path = root, os.path.join(root, "partial.json")
        try:
            run_rank(args)
        except NumericalDisagreement as e:
            raise SystemExit(f"checkpoint benchmark aborted: {e}") from None
        if rank == 0:
            write_results(args, {args.world_list[0]: json.loads(Path(args.partial_path).read_text())}, root)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        return
    import torch.multiprocessing as mp

    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.dir)
    kind = fs_type(root)
    if kind.startswith(("tmpfs", "ramfs")):
        logger.warning("%s is on %s: disk limits and cold loads will measure memory, not a disk (use --dir)", root, kind)
    worlds: dict[int, dict[str, Any]] = {}
    try:
        for world in args.world_list:
            args.run_root = os.path.join(root, f"w{world}")
            os.makedirs(args.run_root, exist_ok=True)
            args.partial_path = os.path.join(root, f"w{world}.json")
            logger.info("spawning %d processes; checkpoints under %s (%s)", world, args.run_root, kind)
            try:
                mp.start_processes(_spawned_rank, args=(world, free_port(), args), nprocs=world, start_method="spawn")
            except mp.ProcessRaisedException as e:
                line = next((ln for ln in str(e).splitlines() if "NumericalDisagreement:" in ln), None)
                if line is None:
                    raise
                reason = line.split("NumericalDisagreement:", 1)[1].strip()
                raise SystemExit(f"checkpoint benchmark aborted: {reason}") from None
            worlds[world] = json.loads(Path(args.partial_path).read_text())
        write_results(args, worlds, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
