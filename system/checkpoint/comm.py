"""The checkpoint's own Gloo process group (ByteCheckpoint section 4.2).

Checkpoint collectives (plan exchange, the commit barrier) run on a dedicated Gloo group, never on
the training group: an asynchronous save issues them from a background thread while training issues
its own collectives on the main thread, and two threads must never share a communicator. Gloo also
keeps this traffic off the GPU interconnect.
"""

from __future__ import annotations

import logging
import threading

import torch.distributed as dist

logger = logging.getLogger(__name__)

_SHARED: dict[tuple, tuple] = {}
_SHARED_LOCK = threading.Lock()


class Comm:
    """Rank, world size and object collectives of the checkpoint group (a single process when ``pg`` is None)."""

    def __init__(self, pg=None):
        self.pg = pg
        self.rank = dist.get_rank(pg) if pg is not None else 0
        self.world = dist.get_world_size(pg) if pg is not None else 1

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable, small), indexed by group rank."""
        if self.pg is None:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def broadcast(self, obj, src: int = 0):
        """Group rank ``src``'s ``obj`` on every rank."""
        if self.pg is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.pg, src), group=self.pg)
        return box[0]

    def destroy(self) -> None:
        if self.pg is not None:
            try:
                dist.destroy_process_group(self.pg)
            except Exception as e:  # noqa: BLE001 - best effort at shutdown
                logger.debug("checkpoint: could not destroy the checkpoint group: %s", e)
            self.pg = None


def make_comm(group=None, *, no_dist: bool = False, dedicated: bool = False) -> Comm:
    """A :class:`Comm` over the ranks of ``group`` (default: the world) on a Gloo group.

    Must be called by every rank of ``group`` at the same point (creating a group is collective).

    Args:
        group: the ranks taking part; None for the default group.
        no_dist: run as a single process even if a process group is initialised.
        dedicated: create a new group owned by the caller (an :class:`AsyncCheckpointer`); otherwise
            reuse one cached group per rank set, for synchronous save and load on the calling thread.
    """
    if no_dist or not dist.is_available() or not dist.is_initialized():
        return Comm(None)
    if group is None:
        ranks = tuple(range(dist.get_world_size()))
    else:
        ranks = tuple(sorted(dist.get_process_group_ranks(group)))
    whole = len(ranks) == dist.get_world_size()

    def create():
        if whole:
            return dist.new_group(backend="gloo")
        return dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)

    if dedicated:
        return Comm(create())
    world_pg = dist.group.WORLD
    key = (id(world_pg), ranks)  # a re-initialised default group invalidates cached groups
    with _SHARED_LOCK:
        if key not in _SHARED or _SHARED[key][0] is not world_pg:
            _SHARED[key] = (world_pg, create())
        return Comm(_SHARED[key][1])
