"""Expert-granular offload: stream only the experts the router picked, through an LRU cache of expert slots.

A variant of the ring (SE-MoE, arXiv 2205.10034, sec. 3.3.2, which streams whole layers): in each
MoE block, after the (resident) router has chosen the top-k experts of every token, the union of
the chosen experts over the batch's real tokens is what the block needs. Each needed expert is
taken from a pool of ``C`` preallocated expert slots when it is there (a hit: it was used recently,
by this or an earlier step), else copied from the host tier into the least recently used slot (a
miss). Experts are computed one at a time right after they are present, so ``C = 1`` works (every
expert is then streamed every time); experts already cached are computed first so that a load never
evicts an expert the block still needs.

The loads are synchronous: which experts a block needs is known only after its router ran, so
there is nothing to prefetch on a per-block basis. Dense FFN blocks and shared experts stay
resident in this mode (as is the shared block of FME experts: only their per-expert modulations stream).

Arithmetic: the same dropless routing, sorting and weighted combine as
:meth:`system.moe.layer.MoELayer.forward` (its :meth:`~system.moe.layer.MoELayer.expert_inputs` and
:meth:`~system.moe.layer.MoELayer.expert_outputs`), and each expert's rows go through the expert
kind's :meth:`~system.moe.experts.ExpertKind.compute` with that expert's weights. On CPU (the
chunked kernels, SwiGLU and FME, walk each expert's rows separately anyway) the outputs are bitwise
those of the resident layer; on CUDA the resident layer uses one grouped GEMM, so they agree to
rounding only.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from system.inference.sections import Section, align_up, typed_view
from system.inference.transport import Link
from system.moe.experts import autocast_inputs
from system.moe.layer import MoELayer, combine_by_token, count_per_expert

ExpertHost = dict[tuple[int, int], list[tuple[torch.Tensor, int, int]]]
"""``(block, expert) -> [(src uint8 [n], offset in the expert slot, n)]`` for each expert tensor (``w1``, ``w2``, ``w3``)."""


SlotEntry = tuple[str, torch.dtype, tuple[int, ...], bool, int, int]
"""One expert tensor in an expert slot: ``(weight name, dtype, per-expert shape (ours), transposed, offset,
nbytes)``."""


def expert_slot_layout(section: Section) -> tuple[list[SlotEntry], int]:
    """Layout of one expert of a MoE section in an expert slot.

    Each tensor is one expert's stored bytes, as the checkpoint holds them (``transposed``: Hugging
    Face's orientation, bound through :func:`~system.inference.sections.typed_view`).

    Returns:
        ``([(weight name (w1|w2|w3, or the FME tensors), dtype, per-expert shape, transposed, offset, nbytes)],
        slot bytes)``.
    """
    layout, offset = [], 0
    for t in section.tensors:
        if ".moe.experts." not in t.name:
            continue
        nbytes = t.nbytes // t.shape[0]
        layout.append((t.name.rsplit(".", 1)[1], t.dtype, t.shape[1:], t.transposed, offset, nbytes))
        offset = align_up(offset + nbytes)
    return layout, (layout[-1][4] + layout[-1][5]) if layout else 0


class ExpertCache:
    """``C`` expert slots with LRU replacement, and the MoE forward that streams into them.

    Args:
        sections: the model's sections (the MoE ones define the expert layout; all MoE blocks
            must have experts of one shape).
        host: host-tier pieces of each ``(block, expert)``.
        capacity: C, expert slots.
        slot_bytes: bytes per expert slot (>= one expert).
        device: the device tier.
        link: the copy path (throttled on CPU if asked); counts the bytes.

    Attributes:
        hits, misses: expert lookups served from the pool / streamed.
    """

    def __init__(self, sections: list[Section], host: ExpertHost, capacity: int, slot_bytes: int,
                 device: torch.device | str, link: Link):
        moe_sections = [s for s in sections if s.kind == "moe"]
        self.layout, _ = expert_slot_layout(moe_sections[0]) if moe_sections else ([], 0)
        self.pool = torch.empty(capacity, slot_bytes, dtype=torch.uint8, device=device)
        self.views = [
            {name: typed_view(self.pool[s, off : off + n], dtype, shape, tr)
             for name, dtype, shape, tr, off, n in self.layout}
            for s in range(capacity)
        ]
        self.host = host
        self.link = link
        self.lru: OrderedDict[tuple[int, int], int] = OrderedDict()
        self.free = list(range(capacity - 1, -1, -1))
        self.hits = self.misses = 0

    @property
    def bytes_moved(self) -> int:
        """Bytes streamed into expert slots so far."""
        return self.link.bytes_moved

    def _slot_of(self, block: int, expert: int) -> int:
        key = (block, expert)
        if key in self.lru:
            self.lru.move_to_end(key)
            self.hits += 1
            return self.lru[key]
        self.misses += 1
        slot = self.free.pop() if self.free else self.lru.popitem(last=False)[1]
        for src, offset, n in self.host[key]:
            self.link.copy(self.pool[slot, offset : offset + n], src)
        self.lru[key] = slot
        return slot

    def moe_forward(self, block: int, moe: MoELayer, x: torch.Tensor) -> torch.Tensor:
        """Dropless MoE of ``x`` ``[B, S, d]`` with block ``block``'s experts streamed on demand -> ``[B, S, d]``."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        route = moe.router(xf)
        flat = route.indices.flatten()
        counts = count_per_expert(flat, moe.num_experts)
        order = torch.argsort(flat, stable=True)
        token_of = order // moe.top_k
        rows, ctx = moe.expert_inputs(xf)
        xs = rows[token_of]
        kind = moe.experts.kind()
        ys = xs.new_empty(xs.shape[0], kind.out_features)
        sizes = counts.tolist()  # the block's one host sync: which experts it needs
        host_counts = torch.tensor(sizes, dtype=torch.int64)
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        needed = [e for e, n in enumerate(sizes) if n > 0]
        needed.sort(key=lambda e: (block, e) not in self.lru)  # hits first: a miss never evicts a needed hit
        for e in needed:
            w = self.views[self._slot_of(block, e)]
            lo, hi = starts[e], starts[e + 1]
            xe, we = autocast_inputs(xs[lo:hi], {name: t[None] for name, t in w.items()})
            with torch.autocast(xe.device.type, enabled=False):
                ys[lo:hi] = kind.compute(xe, host_counts[e : e + 1], we)
        weights = route.weights.flatten()[order]
        acc = combine_by_token(ys.float() * weights[:, None], token_of, order, xf.shape[0], moe.top_k,
                               moe.deterministic)
        out = moe.expert_outputs(acc, ctx)
        if moe.shared_experts is not None:
            out = out + moe.shared_output(xf)
        return out.to(x.dtype).view(shape)

    def run_ffn(self, i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``run_ffn`` for :func:`system.inference.decoder.forward_step`: MoE blocks through the cache,
        dense blocks with their resident FFN."""
        if block.moe is None:
            return block.mlp(x)
        return self.moe_forward(i, block.moe, x)
