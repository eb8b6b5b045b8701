"""Degrees of parallelism, their validation, and every DeviceMesh of a job: the one place meshes are built.

Modelled on TorchTitan's ``ParallelDims``. The world is the grid ``pp x dp_replicate x dp_shard x tp``
(row-major, ``tp`` innermost: rank ``r`` has coordinates ``unravel(r, (pp, dp_replicate, dp_shard, tp))``),
the **world mesh** with those four names (size-1 dimensions included, so every name always exists).

Expert parallelism folds onto the ranks of one pipeline stage (Megatron-Core's "parallel folding",
Liu et al. 2025, arXiv 2504.14960, sec. 3): the **expert mesh** ``("pp", "dp", "ep", "etp")`` views the same
ranks as ``pp x edp x ep x etp``, where ``etp = tp`` with ``parallel.expert_tp`` (each expert's FFN split over
the tensor-parallel ranks) and 1 otherwise (expert parallelism borrows the ``dp_shard x tp`` ranks), and
``edp`` (``parallel.dp``) is what is left: the replicas of each expert shard. With ``pp = tp = 1`` and no
``expert_tp`` this is the original ``("dp", "ep")`` layout: rank ``r`` is ``(dp_rank, ep_rank) = divmod(r, ep)``,
EP groups contiguous (intra-node where possible).

::

    world mesh   pp x dp_replicate x dp_shard x tp      attention / dense FFN: TP over "tp", FSDP2 over
                                                         ("dp_replicate", "dp_shard"), stages over "pp"
    expert mesh  pp x dp x ep x etp                      experts: EP over "ep", replicas over "dp",
                                                         expert TP over "etp"

Data: every rank with the same ``(dp_replicate, dp_shard)`` coordinates reads the same batch (its TP and PP
peers); :attr:`ParallelDims.dp_degree` streams in all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from system.config.loader import ConfigError

WORLD_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
EXPERT_DIMS = ("pp", "dp", "ep", "etp")


@dataclass
class ParallelDims:
    """Parallel degrees of a job, validated against the world size, and the meshes built from them.

    Attributes:
        dp: expert data-parallel degree (replicas of each expert shard): ``world / (pp * ep * etp)``.
        ep: expert-parallel degree (ranks the experts of a layer are split over).
        world_size: total ranks: ``pp * dp_replicate * dp_shard * tp``.
        pp: pipeline stages' ranks.
        dp_replicate: replicas of the dense parameters (HSDP's outer dimension).
        dp_shard: ranks the dense parameters are sharded over (FSDP2), data-parallel otherwise.
        tp: tensor-parallel degree.
        expert_tp: experts are split within each expert over the ``tp`` ranks (``etp = tp``).
    """

    dp: int
    ep: int
    world_size: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    expert_tp: bool = False
    _world_mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _expert_mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _groups: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_config(cls, dp: int, ep: int, world_size: int, *, pp: int = 1, dp_replicate: int = 1,
                    dp_shard: int = -1, tp: int = 1, expert_tp: bool = False) -> "ParallelDims":
        """Build and validate; ``dp = -1`` and ``dp_shard = -1`` are derived from the others.

        Raises:
            ConfigError: (a ``ValueError``) a degree below 1, degrees that do not multiply to the world size, an EP
                degree that does not divide the ranks it folds onto, or a ``dp`` that differs from the derived one;
                the message names every ``parallel.*`` key involved.
        """
        for key, v in (("ep", ep), ("pp", pp), ("tp", tp), ("dp_replicate", dp_replicate)):
            if v < 1:
                raise ConfigError(f"parallel.{key} must be >= 1, got {v}")
        outer = pp * dp_replicate * tp
        if dp_shard == -1:
            if world_size % outer:
                raise ConfigError(
                    f"world size {world_size} does not divide by parallel.pp={pp} x parallel.dp_replicate={dp_replicate}"
                    f" x parallel.tp={tp} = {outer} (parallel.dp_shard would be {world_size / outer:g})"
                )
            dp_shard = world_size // outer
        dims = cls(dp=dp, ep=ep, world_size=world_size, pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp,
                   expert_tp=expert_tp)
        dims._derive_expert_dp()
        dims.validate()
        return dims

    @classmethod
    def from_parallel_config(cls, p, world_size: int) -> "ParallelDims":
        """:meth:`from_config` from a :class:`~system.config.parallel.ParallelConfig`."""
        return cls.from_config(p.dp, p.ep, world_size, pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard,
                               tp=p.tp, expert_tp=p.expert_tp)

    @property
    def etp(self) -> int:
        """Expert tensor-parallel degree: ``tp`` with ``expert_tp``, else 1."""
        return self.tp if self.expert_tp else 1

    def _fold(self) -> tuple[int, str]:
        """Ranks expert parallelism folds onto, and their keys for messages."""
        if self.expert_tp:
            return self.dp_shard, f"parallel.dp_shard={self.dp_shard}"
        return self.dp_shard * self.tp, f"parallel.dp_shard={self.dp_shard} x parallel.tp={self.tp}"

    def _derive_expert_dp(self) -> None:
        per_stage = self.world_size // self.pp if self.pp and self.world_size % self.pp == 0 else 0
        denom = self.ep * self.etp
        derived = per_stage // denom if per_stage and per_stage % denom == 0 else None
        if self.dp == -1:
            if derived is None:
                raise ConfigError(
                    f"world size {self.world_size} does not divide by parallel.pp={self.pp} x parallel.ep={self.ep}"
                    + (f" x parallel.tp={self.tp} (expert_tp)" if self.expert_tp else "")
                    + f" (dp would be {self.world_size / (self.pp * denom):g})"
                )
            self.dp = derived
        elif derived is not None and self.dp != derived:
            raise ConfigError(
                f"parallel.dp={self.dp} x parallel.ep={self.ep} = {self.dp * self.ep} ranks per pipeline stage, but "
                f"the world of {self.world_size} ranks gives {per_stage} per stage (expert dp {derived}); "
                f"set --parallel.dp -1 (derived) or change the process count"
            )

    def validate(self) -> None:
        """Raise ``ConfigError`` (a ``ValueError``) naming every degree when they do not fit the world size."""
        degrees = (self.dp, self.ep, self.pp, self.dp_replicate, self.dp_shard, self.tp)
        if min(degrees) < 1:
            raise ConfigError(f"degrees must be >= 1: dp={self.dp}, ep={self.ep}, pp={self.pp}, "
                              f"dp_replicate={self.dp_replicate}, dp_shard={self.dp_shard}, tp={self.tp}")
        grid = self.pp * self.dp_replicate * self.dp_shard * self.tp
        if grid != self.world_size:
            raise ConfigError(
                f"parallel degrees pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x "
                f"tp={self.tp} = {grid} do not match the world size {self.world_size}"
            )
        if self.pp * self.dp * self.ep * self.etp != self.world_size:
            raise ConfigError(
                f"parallel degrees dp={self.dp} x ep={self.ep} = {self.dp * self.ep} do not match the world size "
                f"{self.world_size}" if self.pp == 1 and self.etp == 1 else
                f"parallel degrees pp={self.pp} x dp={self.dp} x ep={self.ep} x expert tp={self.etp} = "
                f"{self.pp * self.dp * self.ep * self.etp} do not match the world size {self.world_size}"
            )
        fold, keys = self._fold()
        if fold % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} does not divide the ranks expert parallelism folds onto, {keys} "
                              f"= {fold}")

    def check_experts(self, num_experts: int) -> None:
        """Raise ``ConfigError`` when ``num_experts`` does not divide by the EP degree."""
        if num_experts % self.ep:
            raise ConfigError(
                f"moe.num_experts={num_experts} does not divide by the expert-parallel degree parallel.ep={self.ep}"
            )

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def dp_degree(self) -> int:
        """Data streams: ranks reading different batches (``dp_replicate * dp_shard``)."""
        return self.dp_replicate * self.dp_shard

    def world_coords(self, rank: int) -> dict[str, int]:
        """``{"pp", "dp_replicate", "dp_shard", "tp"}`` coordinates of a global rank."""
        out, r = {}, rank
        for name, size in zip(reversed(WORLD_DIMS), (self.tp, self.dp_shard, self.dp_replicate, self.pp)):
            r, out[name] = divmod(r, size)
        return {k: out[k] for k in WORLD_DIMS}

    def dp_rank(self, rank: int) -> int:
        """Index ``0 .. dp_degree - 1`` of the batch stream ``rank`` reads."""
        c = self.world_coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def coords(self, rank: int) -> tuple[int, int]:
        """``(dp_rank, ep_rank)`` of a global rank on the expert mesh (within its pipeline stage)."""
        within = rank % (self.world_size // self.pp)
        dp_i, rest = divmod(within, self.ep * self.etp)
        return dp_i, rest // self.etp

    def _check_world(self) -> None:
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"process group has {dist.get_world_size()} ranks but ParallelDims expects {self.world_size}"
            )

    def build_world_mesh(self, device_type: str) -> DeviceMesh:
        """Create (once) the world mesh ``("pp", "dp_replicate", "dp_shard", "tp")``; needs an initialised
        default process group of ``world_size`` ranks."""
        if self._world_mesh is None:
            self._check_world()
            self._world_mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                                                mesh_dim_names=WORLD_DIMS)
        return self._world_mesh

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Create (once) the expert mesh (see the module docstring) and the world mesh; return the expert mesh.

        Its ``"dp"`` and ``"ep"`` dimensions are what expert parallelism, FSSDP and expert gradient
        reduction use; with ``pp = 1`` and no ``expert_tp`` it has the shape ``(1, dp, ep, 1)``.
        """
        if self._expert_mesh is None:
            world = self.build_world_mesh(device_type)
            ranks = torch.arange(self.world_size).view(self.pp, self.dp, self.ep, self.etp)
            self._expert_mesh = DeviceMesh(world.device_type, ranks, mesh_dim_names=EXPERT_DIMS)
        return self._expert_mesh

    @property
    def mesh(self) -> DeviceMesh:
        """The expert mesh (:meth:`build_mesh`)."""
        if self._expert_mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        return self._expert_mesh

    @property
    def world_mesh(self) -> DeviceMesh:
        """The world mesh (:meth:`build_world_mesh`)."""
        if self._world_mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        return self._world_mesh

    def submesh(self, *names: str) -> DeviceMesh:
        """The world mesh's dimensions ``names`` as one (flattened when several) 1-D mesh, e.g.
        ``submesh("dp_replicate", "dp_shard")`` for the data-parallel ranks of this rank's stage and TP slot."""
        world = self.world_mesh
        if len(names) == 1:
            return world[names[0]]
        return world[names]._flatten("_".join(names))

    def group(self, *names: str):
        """Process group of :meth:`submesh` (cached); ``None`` when it has one rank."""
        if names not in self._groups:
            sub = self.submesh(*names)
            self._groups[names] = sub.get_group() if sub.size() > 1 else None
        return self._groups[names]
