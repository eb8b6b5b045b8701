"""Save plans (who writes which box, where) and load plans (which byte ranges fill which target).

Save (ByteCheckpoint section 3.3): every rank announces the boxes it holds; identical boxes held by
several ranks (replicated tensors, data-parallel replicas of an expert shard) are written exactly
once, by the holder with the fewest bytes assigned so far (greedy, largest boxes first), so writes
spread over all ranks instead of piling onto rank 0 as in PyTorch DCP. The plan is a pure function of
all ranks' announcements, so every rank computes the same plan without a broadcast.

Load (section 3.4): for each box a rank needs x each saved box that overlaps it, compute the byte
ranges of the overlap in the saved box's file. A contiguous overlap whose destination is contiguous
CPU memory is read straight into the destination; anything else is read (bounding span, split to at
most ``max_span_bytes``) into a staging buffer and copied out with strides. Small staged reads close
together in one file are coalesced. With verification on, reads are widened to whole crc chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from system.checkpoint.errors import CoverageError, SavePlanError
from system.checkpoint.metadata import ALIGN, SavedBox, TensorMeta, itemsize
from system.checkpoint.sharding import Box, find_overlaps, flat_span, intersect, row_major_strides, slices_in, volume

# ----------------------------------------------------------------------------------------------- save


@dataclass(frozen=True)
class TensorDecl:
    """What one rank announces about one tensor: dtype name, global shape, the boxes it holds."""

    fqn: str
    dtype: str
    shape: tuple[int, ...]
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class PlannedWrite:
    """One box written once: by ``rank``, into ``file`` at ``byte_offset`` (``nbytes`` long)."""

    fqn: str
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    rank: int
    file: str
    byte_offset: int
    nbytes: int


@dataclass
class SavePlan:
    """The global save plan (identical on every rank).

    Attributes:
        tensors: fqn -> ``(dtype name, global shape)``.
        writes: every unique box, grouped by writer rank, in file order.
        file_sizes: data file name -> size in bytes.
    """

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    writes: list[PlannedWrite]
    file_sizes: dict[str, int]

    def for_rank(self, rank: int) -> list[PlannedWrite]:
        """The boxes ``rank`` writes, in file order."""
        return [w for w in self.writes if w.rank == rank]

    def bytes_per_rank(self, world_size: int) -> list[int]:
        """Bytes each rank writes (payload, without alignment padding)."""
        out = [0] * world_size
        for w in self.writes:
            out[w.rank] += w.nbytes
        return out


def data_file_name(rank: int) -> str:
    """Name of the data file written by ``rank``."""
    return f"data-{rank:05d}.bin"


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def build_save_plan(decls: list[list[TensorDecl]]) -> SavePlan:
    """Deduplicate and assign every announced box to one writer.

    Args:
        decls: ``decls[r]`` is rank ``r``'s announcement.

    Raises:
        SavePlanError: ranks disagree on a tensor's dtype or global shape; two different boxes of a
            tensor overlap; or the boxes leave part of a tensor uncovered (the classic bug of every
            rank numbering its local experts from 0 shows up here).
    """
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    first_rank: dict[str, int] = {}
    holders: dict[str, dict[Box, list[int]]] = {}
    for rank, rank_decls in enumerate(decls):
        for d in rank_decls:
            if d.fqn not in tensors:
                tensors[d.fqn], first_rank[d.fqn] = (d.dtype, tuple(d.shape)), rank
                holders[d.fqn] = {}
            elif tensors[d.fqn] != (d.dtype, tuple(d.shape)):
                dt, sh = tensors[d.fqn]
                raise SavePlanError(
                    f"tensor {d.fqn}: rank {first_rank[d.fqn]} has {list(sh)} {dt} but rank {rank} has "
                    f"{list(d.shape)} {d.dtype}"
                )
            for box in d.boxes:
                ranks = holders[d.fqn].setdefault(box, [])
                if rank not in ranks:
                    ranks.append(rank)
    candidates = []
    for fqn, boxes in holders.items():
        dtype, shape = tensors[fqn]
        unique = list(boxes)
        clash = find_overlaps(unique)
        if clash is not None:
            a, b = unique[clash[0]], unique[clash[1]]
            raise SavePlanError(
                f"tensor {fqn}: box offsets={list(a[0])} lengths={list(a[1])} (ranks {boxes[a]}) overlaps "
                f"box offsets={list(b[0])} lengths={list(b[1])} (ranks {boxes[b]}) without being identical"
            )
        covered, total = sum(volume(b[1]) for b in unique), volume(shape)
        if covered != total:
            raise SavePlanError(
                f"tensor {fqn} {list(shape)}: the ranks' boxes cover {covered} of {total} elements; every "
                "element must be held by some rank (are local shards given their global offsets?)"
            )
        size = itemsize(dtype)
        candidates += [(volume(b[1]) * size, fqn, b, ranks) for b, ranks in boxes.items()]
    world = len(decls)
    assigned = [0] * world
    chosen: dict[int, list[tuple[str, Box, int]]] = {r: [] for r in range(world)}
    for nbytes, fqn, box, ranks in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
        writer = min(ranks, key=lambda r: (assigned[r], r))
        assigned[writer] += nbytes
        chosen[writer].append((fqn, box, nbytes))
    writes, file_sizes = [], {}
    for rank in range(world):
        if not chosen[rank]:
            continue
        name, offset = data_file_name(rank), 0
        for fqn, box, nbytes in sorted(chosen[rank], key=lambda c: (c[0], c[1])):
            writes.append(PlannedWrite(fqn, box[0], box[1], rank, name, offset, nbytes))
            offset = _align(offset + nbytes)
        file_sizes[name] = writes[-1].byte_offset + writes[-1].nbytes
    return SavePlan(tensors, writes, file_sizes)


# ----------------------------------------------------------------------------------------------- load


@dataclass
class Fill:
    """Copy staged bytes into a destination view.

    The source is the ``shape``-shaped, ``strides``-strided (elements) array of ``dtype`` whose first
    element is at absolute file byte ``src_abs``.
    """

    src_abs: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dest: torch.Tensor

    def apply(self, buf: torch.Tensor, buf_abs: int) -> None:
        """Copy from ``buf`` (uint8 bytes of the file starting at absolute byte ``buf_abs``)."""
        rel = self.src_abs - buf_abs
        span = (sum((n - 1) * s for n, s in zip(self.shape, self.strides)) + 1) * self.dtype.itemsize
        flat = buf[rel : rel + span].view(self.dtype)
        self.dest.copy_(flat.as_strided(self.shape, self.strides, flat.storage_offset()))


@dataclass
class ChunkCheck:
    """A crc chunk that lies wholly inside a read: absolute bytes ``[start, end)`` must hash to ``crc``."""

    fqn: str
    box: SavedBox
    index: int
    start: int
    end: int
    crc: int


@dataclass
class ReadOp:
    """One read of ``file[start:end]`` (absolute bytes).

    Either ``direct`` (a contiguous uint8 CPU view of the destination, ``end - start`` bytes) is read
    in place, or the bytes go to a staging buffer and ``fills`` copy them out.
    """

    file: str
    start: int
    end: int
    fqns: set[str]
    direct: torch.Tensor | None = None
    fills: list[Fill] = field(default_factory=list)
    checks: list[ChunkCheck] = field(default_factory=list)


def plan_overlaps(
    fqn: str, meta: TensorMeta, targets: list[tuple[Box, torch.Tensor]]
) -> list[tuple[SavedBox, Box, torch.Tensor]]:
    """``(saved box, overlap region, destination view)`` for every target box x overlapping saved box.

    Raises:
        CoverageError: a target box is not fully covered by saved boxes.
    """
    out = []
    for tbox, tensor in targets:
        need, got = volume(tbox[1]), 0
        for sb in meta.boxes:
            region = intersect(tbox, (sb.offsets, sb.lengths))
            if region is None:
                continue
            got += volume(region[1])
            out.append((sb, region, tensor[slices_in(tbox, region)]))
        if got != need:
            files = sorted({b.file for b in meta.boxes}) or ["(none)"]
            raise CoverageError(
                f"tensor {fqn}: the region offsets={list(tbox[0])} lengths={list(tbox[1])} this rank needs is "
                f"covered for {got} of {need} elements by the saved boxes (files {', '.join(files)})"
            )
    return out


def _split(box: Box, region: Box, size: int, max_bytes: int) -> list[Box]:
    """Halve ``region`` along its outermost dimension of length > 1 until each bounding span fits."""
    first, end = flat_span(box, region)
    if (end - first) * size <= max_bytes or volume(region[1]) <= 1:
        return [region]
    d = next(i for i, n in enumerate(region[1]) if n > 1)
    offs, lens, half = region[0], region[1], region[1][d] // 2
    lo = (offs, lens[:d] + (half,) + lens[d + 1 :])
    hi = (offs[:d] + (offs[d] + half,) + offs[d + 1 :], lens[:d] + (lens[d] - half,) + lens[d + 1 :])
    return _split(box, lo, size, max_bytes) + _split(box, hi, size, max_bytes)


def _checks(fqn: str, sb: SavedBox, start: int, end: int, chunk: int) -> list[ChunkCheck]:
    crcs, bo = sb.chunk_crcs(chunk), sb.byte_offset
    k0, k1 = (start - bo) // chunk, -(-(end - bo) // chunk)
    return [
        ChunkCheck(fqn, sb, k, bo + k * chunk, min(bo + (k + 1) * chunk, bo + sb.nbytes), crcs[k]) for k in range(k0, k1)
    ]


def contiguous_runs(box: Box, region: Box, *, min_gap_elems: int, max_runs: int) -> list[Box] | None:
    """Split ``region`` into sub-boxes that are each contiguous in the row-major ``box``, or None.

    The runs are the rows of ``region`` over its outer dimensions: with ``k`` the innermost dimension
    where ``region`` does not span ``box``, each index of the dimensions before ``k`` is one run
    (e.g. the experts' slices of a ``[E, a, b]`` box cut on dim 1). Returns None (read the bounding
    span instead) when the region is already contiguous, when consecutive runs are closer than
    ``min_gap_elems`` on average (then one span read wastes little), or when there would be more than
    ``max_runs`` runs.
    """
    import itertools

    lengths = region[1]
    k = len(lengths) - 1
    while k > 0 and lengths[k] == box[1][k]:
        k -= 1
    if k <= 0 or volume(lengths[:k]) <= 1:
        return None
    count = volume(lengths[:k])
    first, end = flat_span(box, region)
    if count > max_runs or (end - first - volume(lengths)) < min_gap_elems * (count - 1):
        return None
    ranges = [range(o, o + n) for o, n in zip(region[0][:k], lengths[:k])]
    return [(tuple(idx) + region[0][k:], (1,) * k + lengths[k:]) for idx in itertools.product(*ranges)]


def plan_reads(
    fqn: str,
    meta: TensorMeta,
    overlaps: list[tuple[SavedBox, Box, torch.Tensor]],
    *,
    chunk_bytes: int,
    verify: bool,
    max_span_bytes: int = 32 << 20,
    min_gap_bytes: int = 64 << 10,
    max_runs: int = 4096,
) -> list[ReadOp]:
    """Byte-range reads that fill every overlap (before coalescing; see :func:`coalesce`).

    An overlap that is not contiguous in its saved box (a slice of every expert when the experts were
    saved split on dim 0 and are loaded split on dim 1) is read as its contiguous runs when the gaps
    between runs are at least ``min_gap_bytes`` on average (see :func:`contiguous_runs`), so the bytes
    between runs are not read; otherwise as bounding spans of at most ``max_span_bytes``.
    """
    size = itemsize(meta.dtype)
    ops: list[ReadOp] = []
    todo = list(reversed(overlaps))
    while todo:
        sb, region, dest = todo.pop()
        box = (sb.offsets, sb.lengths)
        bo, n = sb.byte_offset, sb.nbytes
        floor_c = (lambda x: bo + (x - bo) // chunk_bytes * chunk_bytes) if verify else (lambda x: x)
        ceil_c = (lambda x: min(bo + -(-(x - bo) // chunk_bytes) * chunk_bytes, bo + n)) if verify else (lambda x: x)
        first, end = flat_span(box, region)
        if end - first == volume(region[1]) and dest.device.type == "cpu" and dest.is_contiguous():
            a, b = bo + first * size, bo + end * size
            u8 = dest.as_strided((dest.numel(),), (1,), dest.storage_offset()).view(torch.uint8)
            lo, hi = ceil_c(a), floor_c(b)
            if lo >= hi:  # no whole crc chunk inside: one staged read of the chunk(s) around it
                ops.append(_staged_bytes(fqn, sb, floor_c(a), ceil_c(b), a, u8, verify, chunk_bytes))
                continue
            if a < lo:
                ops.append(_staged_bytes(fqn, sb, floor_c(a), lo, a, u8[: lo - a], verify, chunk_bytes))
            part = max(chunk_bytes, max_span_bytes // chunk_bytes * chunk_bytes) if verify else max_span_bytes
            for s in range(lo, hi, part):
                e = min(s + part, hi)
                ops.append(ReadOp(sb.file, s, e, {fqn}, direct=u8[s - a : e - a],
                                  checks=_checks(fqn, sb, s, e, chunk_bytes) if verify else []))
            if hi < b:
                ops.append(_staged_bytes(fqn, sb, hi, ceil_c(b), hi, u8[hi - a :], verify, chunk_bytes))
            continue
        runs = contiguous_runs(box, region, min_gap_elems=-(-min_gap_bytes // size), max_runs=max_runs)
        if runs is not None:
            todo.extend((sb, run, dest[slices_in(region, run)]) for run in reversed(runs))
            continue
        strides = row_major_strides(sb.lengths)
        for sub in _split(box, region, size, max_span_bytes):
            f, e = flat_span(box, sub)
            s_abs, e_abs = bo + f * size, bo + e * size
            fill = Fill(s_abs, dest.dtype, sub[1], strides, dest[slices_in(region, sub)])
            s, e2 = floor_c(s_abs), ceil_c(e_abs)
            ops.append(ReadOp(sb.file, s, e2, {fqn}, fills=[fill],
                              checks=_checks(fqn, sb, s, e2, chunk_bytes) if verify else []))
    return ops


def _staged_bytes(fqn, sb, start, end, src_abs, dest_u8, verify, chunk) -> ReadOp:
    fill = Fill(src_abs, torch.uint8, (dest_u8.numel(),), (1,), dest_u8)
    return ReadOp(sb.file, start, end, {fqn}, fills=[fill], checks=_checks(fqn, sb, start, end, chunk) if verify else [])


def coalesce(ops: list[ReadOp], *, gap_bytes: int = 64 << 10, max_bytes: int = 16 << 20) -> list[ReadOp]:
    """Merge staged reads of one file that overlap or lie within ``gap_bytes``, up to ``max_bytes`` each.

    Direct reads are left alone, and a gap that a direct read covers in part is never merged over (its
    bytes are read anyway). Merged reads start at a multiple of :data:`ALIGN`, so every staged
    element stays aligned for ``Tensor.view(dtype)``.
    """
    import bisect

    direct = [op for op in ops if op.direct is not None]
    taken: dict[str, tuple[list[int], list[int]]] = {}  # file -> (sorted starts, running max of ends)
    for op in sorted(direct, key=lambda op: (op.file, op.start)):
        starts, ends = taken.setdefault(op.file, ([], []))
        starts.append(op.start)
        ends.append(max(op.end, ends[-1]) if ends else op.end)

    def gap_is_free(file: str, lo: int, hi: int) -> bool:
        starts, ends = taken.get(file, ((), ()))
        i = bisect.bisect_left(starts, hi)  # direct reads starting before the gap's end
        return hi <= lo or i == 0 or ends[i - 1] <= lo

    staged = sorted((op for op in ops if op.direct is None), key=lambda op: (op.file, op.start))
    merged: list[ReadOp] = []
    for op in staged:
        cur = merged[-1] if merged else None
        if (cur is not None and cur.file == op.file and op.start - cur.end <= gap_bytes
                and max(cur.end, op.end) - cur.start <= max_bytes and gap_is_free(op.file, cur.end, op.start)):
            cur.end = max(cur.end, op.end)
            cur.fills += op.fills
            cur.checks += op.checks
            cur.fqns |= op.fqns
        else:
            merged.append(ReadOp(op.file, op.start // ALIGN * ALIGN, op.end, set(op.fqns),
                                 fills=list(op.fills), checks=list(op.checks)))
    return direct + merged
