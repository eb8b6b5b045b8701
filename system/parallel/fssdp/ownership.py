"""Who owns each expert under FSSDP, and where its rows sit in the owner's flat buffer.

Hecate (arXiv 2502.02581, sec. 3; DESIGN.md section 3) shards an MoE layer by whole experts: every
expert has exactly one owner rank, which keeps its parameters and its optimizer state in one flat
buffer ``[n_owned, P]`` (one row per owned expert). :class:`Ownership` is that map: ``owner[e]`` is
the rank, ``slot[e]`` the row of expert ``e`` in the owner's buffer. Every rank holds the same
(replicated) object; it changes only when heterogeneous sharding re-assigns owners
(:func:`system.parallel.fssdp.resharding.heterogeneous_sharding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Ownership:
    """Expert -> (owner rank, row in the owner's flat buffer).

    Attributes:
        owner: ``[E]`` int64, the rank (in the FSSDP process group) owning each expert.
        slot: ``[E]`` int64, the row of each expert in its owner's flat buffer; the experts of one
            owner use rows ``0 .. n-1`` exactly once.

    A rank may own no expert at all (when ``E < W``, or after heterogeneous sharding); its flat
    buffer then has zero rows. Call :meth:`validate` on objects built by hand.
    """

    owner: torch.Tensor
    slot: torch.Tensor

    @classmethod
    def uniform(cls, num_experts: int, world_size: int) -> Ownership:
        """Contiguous blocks of experts, as even as possible.

        Rank ``r`` owns a contiguous range of expert ids; the first ``E % W`` ranks own
        ``ceil(E / W)`` experts and the others ``floor(E / W)``. ``E`` need not divide by ``W``;
        when ``E < W`` the ranks ``E .. W-1`` own nothing. Slots follow expert ids.

        Raises:
            ValueError: when ``num_experts < 1`` or ``world_size < 1``.
        """
        if num_experts < 1 or world_size < 1:
            raise ValueError(f"Ownership.uniform needs num_experts >= 1 and world_size >= 1, "
                             f"got num_experts={num_experts}, world_size={world_size}")
        base, extra = divmod(num_experts, world_size)
        sizes = torch.tensor([base + (r < extra) for r in range(world_size)], dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(world_size, dtype=torch.int64), sizes)
        starts = torch.cumsum(sizes, 0) - sizes
        slot = torch.arange(num_experts, dtype=torch.int64) - starts[owner]
        return cls(owner=owner, slot=slot)

    @property
    def num_experts(self) -> int:
        """E, the number of experts of the layer."""
        return int(self.owner.numel())

    def owned(self, rank: int) -> torch.Tensor:
        """Expert ids owned by ``rank`` (int64, ``[num_owned(rank)]``), ordered by slot."""
        ids = torch.nonzero(self.owner == rank).flatten()
        return ids[torch.argsort(self.slot[ids])]

    def num_owned(self, rank: int) -> int:
        """Number of experts owned by ``rank`` (rows of its flat buffer)."""
        return int((self.owner == rank).sum())

    def validate(self, world_size: int) -> None:
        """Check that every expert has one owner in ``[0, world_size)`` and that the slots of each
        owner are a permutation of ``0 .. n-1``.

        Raises:
            ValueError: naming the first offending expert (or the shapes / dtypes).
        """
        if self.owner.dim() != 1 or self.owner.shape != self.slot.shape:
            raise ValueError(f"Ownership.owner and .slot must be 1-D of the same length, got "
                             f"{tuple(self.owner.shape)} and {tuple(self.slot.shape)}")
        if self.owner.dtype != torch.int64 or self.slot.dtype != torch.int64:
            raise ValueError(f"Ownership.owner and .slot must be int64, got {self.owner.dtype} and {self.slot.dtype}")
        for e in range(self.num_experts):
            o = int(self.owner[e])
            if not 0 <= o < world_size:
                raise ValueError(f"expert {e} has owner {o}, outside [0, {world_size})")
        for r in range(world_size):
            ids = torch.nonzero(self.owner == r).flatten()
            seen: dict[int, int] = {}
            for e in ids.tolist():
                s = int(self.slot[e])
                if not 0 <= s < ids.numel():
                    raise ValueError(f"expert {e} has slot {s} on rank {r}, which owns {ids.numel()} experts "
                                     f"(slots must be 0..{ids.numel() - 1})")
                if s in seen:
                    raise ValueError(f"expert {e} and expert {seen[s]} share slot {s} on rank {r}")
                seen[s] = e

    def to_dict(self) -> dict[str, list[int]]:
        """Plain lists (JSON-safe), for checkpoint metadata."""
        return {"owner": self.owner.tolist(), "slot": self.slot.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Ownership:
        """Inverse of :meth:`to_dict`."""
        return cls(owner=torch.tensor(d["owner"], dtype=torch.int64), slot=torch.tensor(d["slot"], dtype=torch.int64))
