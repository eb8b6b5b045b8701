"""Shards of global tensors and the n-d box arithmetic the planner uses (ByteCheckpoint section 3.1).

A *box* is a region of a global tensor given by per-dimension ``offsets`` and ``lengths`` (both in
elements). A 0-d tensor has the empty box ``((), ())`` holding one element. Saved boxes are stored
row-major contiguous, so element ``idx`` (n-d, relative to the box) lives at flat position
``sum(idx[d] * strides[d])`` with :func:`row_major_strides`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

Box = tuple[tuple[int, ...], tuple[int, ...]]
"""``(offsets, lengths)`` of a region of a global tensor, in elements."""


@dataclass
class Shard:
    """This rank's piece of a global tensor.

    Attributes:
        tensor: the local data, shape ``lengths`` of the box (any strides, any device; a
            non-contiguous view is fine: it is copied out at save and filled in place at load).
        offsets: position of ``tensor[0, ..., 0]`` in the global tensor, one int per dimension.
    """

    tensor: torch.Tensor
    offsets: Sequence[int]


@dataclass
class ShardedEntry:
    """A global tensor of which this rank holds zero, one or several disjoint boxes.

    Attributes:
        global_shape: shape of the whole tensor, e.g. ``[E, d, f]`` for one layer's experts.
        shards: this rank's boxes (an FSSDP owner holds non-contiguous expert rows: one shard per
            expert or per run of consecutive experts). Several ranks may hold the *same* box
            (data-parallel replicas); it is then written once.
    """

    global_shape: Sequence[int]
    shards: list[Shard] = field(default_factory=list)


def box_of(global_shape: Sequence[int], shard: Shard, fqn: str) -> Box:
    """The validated box of ``shard`` inside a tensor of ``global_shape``.

    Raises:
        ValueError: wrong number of offsets, or the shard sticks out of the global tensor.
    """
    shape = tuple(int(s) for s in global_shape)
    offsets = tuple(int(o) for o in shard.offsets)
    lengths = tuple(shard.tensor.shape)
    if len(offsets) != len(shape) or len(lengths) != len(shape):
        raise ValueError(
            f"{fqn}: shard of shape {list(lengths)} at offsets {list(offsets)} does not match the "
            f"{len(shape)}-d global shape {list(shape)}"
        )
    for d, (o, n, s) in enumerate(zip(offsets, lengths, shape)):
        if o < 0 or o + n > s:
            raise ValueError(
                f"{fqn}: shard of shape {list(lengths)} at offsets {list(offsets)} exceeds the global "
                f"shape {list(shape)} in dim {d}"
            )
    return offsets, lengths


def volume(lengths: Sequence[int]) -> int:
    """Number of elements of a box (1 for a 0-d box)."""
    return math.prod(lengths)


def row_major_strides(lengths: Sequence[int]) -> tuple[int, ...]:
    """Element strides of a contiguous row-major array of shape ``lengths``."""
    strides, acc = [], 1
    for n in reversed(lengths):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def intersect(a: Box, b: Box) -> Box | None:
    """The common region of two boxes of the same tensor, or None when they do not overlap."""
    offs, lens = [], []
    for oa, na, ob, nb in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(oa, ob), min(oa + na, ob + nb)
        if hi <= lo:
            return None
        offs.append(lo)
        lens.append(hi - lo)
    return tuple(offs), tuple(lens)


def slices_in(box: Box, region: Box) -> tuple[slice, ...]:
    """Index of ``region`` inside a tensor that holds ``box`` (``region`` must lie within ``box``)."""
    return tuple(slice(ro - bo, ro - bo + rn) for bo, ro, rn in zip(box[0], region[0], region[1]))


def flat_span(box: Box, region: Box) -> tuple[int, int]:
    """``[first, last + 1)`` flat element positions of ``region`` inside row-major ``box``.

    The region is contiguous in the box iff ``last + 1 - first == volume(region[1])``.
    """
    strides = row_major_strides(box[1])
    first = sum((ro - bo) * s for bo, ro, s in zip(box[0], region[0], strides))
    last = sum((ro - bo + rn - 1) * s for bo, ro, rn, s in zip(box[0], region[0], region[1], strides))
    return first, last + 1


def find_overlaps(boxes: Sequence[Box]) -> tuple[int, int] | None:
    """Indices of two overlapping boxes among ``boxes`` (distinct boxes expected), else None.

    A sweep on dimension 0: O(n log n + pairs whose dim-0 ranges intersect).
    """
    if not boxes or not boxes[0][0]:
        return (0, 1) if len(boxes) > 1 else None
    order = sorted(range(len(boxes)), key=lambda i: boxes[i][0][0])
    active: list[int] = []
    for i in order:
        start = boxes[i][0][0]
        active = [j for j in active if boxes[j][0][0] + boxes[j][1][0] > start]
        for j in active:
            if intersect(boxes[i], boxes[j]) is not None:
                return j, i
        active.append(i)
    return None
