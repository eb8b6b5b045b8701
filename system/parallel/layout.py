"""Where each parameter lives: one record per parameter, written by the ``apply_*`` function that placed it.

Every parallelism that changes a parameter's layout records it on the parameter (attribute
``_moesys_layout``, a :class:`ParamLayout`); gradient synchronisation and clipping
(:mod:`system.parallel.grads`), the checkpoint's shard description (:mod:`system.checkpoint.train_state`)
and model export (:mod:`system.checkpoint.model_io`) read only this record, never the module type.

The record uses DTensor placements wherever they fit:

- a parameter that *is* a ``DTensor`` (tensor parallelism, FSDP2, or both) carries its mesh and
  placements itself; the record adds how its gradient is reduced beyond what DTensor/FSDP2 do;
- an expert-parallel slice is a plain tensor (the expert kernels run on local tensors) recorded as
  ``Shard(0)`` over the expert mesh's ``"ep"`` dimension (``Replicate()`` over ``"dp"``), with its global
  shape and the offset of its block;
- FSSDP's owned rows move between ranks as the load changes, which no placement describes: the record
  points at the :class:`FSSDPRows` view of the module, which reads the current owners when asked.

A parameter without a record is replicated on every rank of its pipeline stage (:func:`record_replicated`
writes that explicitly for whatever the ``apply_*`` functions left unrecorded).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

ATTR = "_moesys_layout"

Kind = Literal["dense", "expert", "fssdp"]


@dataclass(frozen=True)
class FSSDPRows:
    """FSSDP's flat owned buffer ``[n_owned, P]`` of one MoE layer: row ``i`` is global expert ``owned()[i]``,
    flattened by ``layout`` (``[(name, per-expert shape)]``, e.g. SwiGLU's ``w1``/``w2``/``w3``).

    Attributes:
        module: the :class:`~system.parallel.fssdp.layer.FSSDPExperts` holding the buffer.
    """

    module: nn.Module

    def owned(self) -> list[int]:
        """Global expert ids this rank owns now, in row order."""
        st = self.module.state
        return [int(e) for e in st.ownership.owned(st.rank).tolist()]

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return list(self.module.kind.layout)

    @property
    def num_experts(self) -> int:
        return int(self.module.num_global_experts)

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Every expert tensor ``[E, ...]`` of the layer, gathered from the owners (a collective)."""
        return self.module.full_weights()


@dataclass(frozen=True)
class ParamLayout:
    """Where one parameter lives and how its gradient becomes the gradient of the global mean loss.

    Attributes:
        kind: ``"dense"`` (attention, norms, embeddings, dense FFNs, routers), ``"expert"`` (routed expert
            weights) or ``"fssdp"`` (FSSDP's owned rows).
        global_shape: shape in the single-device model (for ``fssdp``: the buffer's own local shape; the
            global tensors are described by ``rows``).
        offsets: global offset of this rank's block when the parameter is a plain tensor holding part of the
            global one (expert-parallel slices); ``None`` when it holds all of it, or is a ``DTensor`` (which
            knows its own offset).
        placements: ``((mesh dim name, Placement), ...)`` of a plain sharded tensor, e.g.
            ``(("dp", Replicate()), ("ep", Shard(0)))`` for an expert slice; a ``DTensor``'s are its own.
        replicas: ranks of the world holding this same block (the norm divides its squares by this).
        grad_group: process group the training step all-reduces this parameter's (local) gradient over: the
            ranks that hold the same block and read different data, where nothing else (FSDP2's reduce-scatter,
            DTensor's partial reduction, FSSDP's sparse reduce-scatter) already summed it. ``None``: no
            all-reduce.
        grad_divisor: the gradient is divided by this after the sum: the data-parallel streams (ranks reading
            different batches) whose losses the global loss averages, when nothing else divided it (1 when
            FSDP2 already averaged it).
        shard_group: for a plain sharded tensor, the process group of ranks holding one copy of each block
            (equal-shaped blocks that tile ``global_shape``), over which an export gathers the whole tensor.
        rows: FSSDP's owned rows (``kind == "fssdp"``).
    """

    kind: Kind = "dense"
    global_shape: tuple[int, ...] = ()
    offsets: tuple[int, ...] | None = None
    placements: tuple[tuple[str, Placement], ...] = ()
    replicas: int = 1
    grad_group: object | None = None
    grad_divisor: int = 1
    shard_group: object | None = None
    rows: FSSDPRows | None = field(default=None, compare=False)

    def with_(self, **changes) -> "ParamLayout":
        """A copy with ``changes`` applied."""
        return replace(self, **changes)


def record(p: nn.Parameter, layout: ParamLayout) -> nn.Parameter:
    """Record ``layout`` on ``p`` (replacing an earlier record) and return ``p``."""
    setattr(p, ATTR, layout)
    return p


def layout_of(p: torch.Tensor) -> ParamLayout:
    """The record of ``p``.

    Raises:
        LookupError: ``p`` has none (a parameter the ``apply_*`` functions never saw: call
            :func:`record_replicated` after applying the parallelisms).
    """
    lay = getattr(p, ATTR, None)
    if lay is None:
        raise LookupError(f"parameter of shape {tuple(p.shape)} has no layout record; "
                          "system.parallel.layout.record_replicated() records the untouched ones")
    return lay


def has_layout(p: torch.Tensor) -> bool:
    return getattr(p, ATTR, None) is not None


def record_replicated(model: nn.Module, *, replicas: int, grad_group, grad_divisor: int) -> None:
    """Record every parameter of ``model`` that has no record yet as a replicated dense parameter.

    Args:
        replicas: ranks holding it (the ranks of its pipeline stage).
        grad_group: the group its gradient is summed over (those ranks; ``None`` for one rank).
        grad_divisor: data-parallel streams.
    """
    for p in model.parameters():
        if not has_layout(p):
            record(p, ParamLayout("dense", tuple(p.shape), replicas=replicas, grad_group=grad_group,
                                  grad_divisor=grad_divisor))


def single_process_layout(model: nn.Module) -> None:
    """Record every unrecorded parameter as held whole by this one process (no parallelism)."""
    record_replicated(model, replicas=1, grad_group=None, grad_divisor=1)


def named_layouts(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, ParamLayout]]:
    """``(fqn, parameter, record)`` of every parameter, in ``named_parameters()`` order.

    Raises:
        LookupError: a parameter without a record.
    """
    for name, p in model.named_parameters():
        yield name, p, layout_of(p)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local part of ``t`` (``to_local()`` for a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def dtensor_box(p: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(local shape, global offset)`` of this rank's block of a DTensor (any placements, incl. uneven shards)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(shape), tuple(offset)


def dtensor_replicas(p: DTensor, world_size: int, pp: int = 1) -> int:
    """Ranks of the world holding this same block of ``p``: ``world / (pp * product of the sizes of the mesh
    dimensions ``p`` is sharded over)``."""
    shards = math.prod(p.device_mesh.size(i) for i, pl in enumerate(p.placements) if not pl.is_replicate()
                       and not pl.is_partial())
    return max(1, world_size // (pp * shards))


__all__ = [
    "FSSDPRows", "ParamLayout", "Placement", "Replicate", "Shard", "dtensor_box", "dtensor_replicas", "has_layout",
    "layout_of", "local_tensor", "named_layouts", "record", "record_replicated",
    "single_process_layout",
]
