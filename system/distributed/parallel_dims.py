"""Degrees of parallelism, their validation, and the named DeviceMesh.

Modelled on TorchTitan's ``ParallelDims``: a small dataclass whose ``build_mesh`` gives named
dimensions. Expert parallelism borrows its ranks from data parallelism: every rank reads its own
data; the ``ep`` dimension splits the experts of each MoE layer, the ``dp`` dimension replicates
those splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from system.config.loader import ConfigError


@dataclass
class ParallelDims:
    """Parallel degrees of a job. Mesh layout: ``("dp", "ep")``, ``ep`` innermost.

    Rank ``r`` has coordinates ``(dp_rank, ep_rank) = divmod(r, ep)``, so the ranks of one EP
    group are contiguous (intra-node where possible).

    Attributes:
        dp: expert data-parallel degree (replicas of each expert shard).
        ep: expert-parallel degree (ranks the experts of a layer are split over).
        world_size: total ranks; must equal ``dp * ep``.
    """

    dp: int
    ep: int
    world_size: int
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_config(cls, dp: int, ep: int, world_size: int) -> "ParallelDims":
        """Build and validate; ``dp = -1`` means ``world_size // ep``.

        Raises:
            ConfigError: (a ``ValueError``) when the degrees do not multiply to the world size (naming every degree).
        """
        if ep < 1:
            raise ConfigError(f"parallel.ep must be >= 1, got {ep}")
        if dp == -1:
            if world_size % ep:
                raise ConfigError(
                    f"world size {world_size} does not divide by parallel.ep={ep} (dp would be {world_size / ep:g})"
                )
            dp = world_size // ep
        dims = cls(dp=dp, ep=ep, world_size=world_size)
        dims.validate()
        return dims

    def validate(self) -> None:
        """Raise ``ValueError`` naming every degree when ``dp * ep != world_size``."""
        if self.dp < 1 or self.ep < 1:
            raise ConfigError(f"degrees must be >= 1: dp={self.dp}, ep={self.ep}")
        if self.dp * self.ep != self.world_size:
            raise ConfigError(
                f"parallel degrees dp={self.dp} x ep={self.ep} = {self.dp * self.ep} "
                f"do not match the world size {self.world_size}"
            )

    def check_experts(self, num_experts: int) -> None:
        """Raise ``ValueError`` when ``num_experts`` does not divide by the EP degree."""
        if num_experts % self.ep:
            raise ConfigError(
                f"moe.num_experts={num_experts} does not divide by the expert-parallel degree parallel.ep={self.ep}"
            )

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def coords(self, rank: int) -> tuple[int, int]:
        """``(dp_rank, ep_rank)`` of a global rank."""
        return divmod(rank, self.ep)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Create (once) the 2-D DeviceMesh with dimension names ``("dp", "ep")``.

        Requires an initialised default process group of ``world_size`` ranks.
        """
        if self._mesh is None:
            if dist.get_world_size() != self.world_size:
                raise ValueError(
                    f"process group has {dist.get_world_size()} ranks but ParallelDims expects {self.world_size}"
                )
            self._mesh = init_device_mesh(device_type, (self.dp, self.ep), mesh_dim_names=("dp", "ep"))
        return self._mesh

    @property
    def mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        return self._mesh
