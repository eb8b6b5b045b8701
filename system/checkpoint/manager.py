"""Periodic, asynchronous, resumable training checkpoints for the :class:`~system.train.trainer.Trainer`.

Wraps the library API (:mod:`system.checkpoint.api`) with the trainer's policy: a checkpoint every
``checkpoint.interval`` steps under ``checkpoint.dir`` (default ``<run_dir>/checkpoints``, any
fsspec URL), saved in the background while training goes on, ``latest`` moved only after a
checkpoint is committed, the oldest pruned beyond ``checkpoint.keep_last``; and resuming from
``checkpoint.resume`` (``latest`` or a path) under any parallel layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from system.checkpoint.reader import load
from system.checkpoint.rng import capture_rng, restore_rng
from system.checkpoint.errors import CheckpointError
from system.checkpoint.storage import prune, read_latest, resolve_checkpoint, step_dir_name
from system.checkpoint.writer import AsyncCheckpointer
from system.checkpoint.train_state import load_optimizer_extra, optimizer_extra, sharded_train_state

logger = logging.getLogger(__name__)


@dataclass
class Resumed:
    """What :meth:`CheckpointManager.load` restored."""

    path: str
    step: int
    extra: dict[str, Any]


class CheckpointManager:
    """Saves and restores model, AdamW, LR schedule, data position, RNG and step (ByteCheckpoint sec. 3).

    Args:
        root: checkpoint root (local path or fsspec URL); step folders ``step_00000100`` go under it.
        model, optimizer, scheduler, loader: the live training objects (``loader`` needs
            ``state_dict``/``load_state_dict``).
        layout: the parallel layout, recorded in the metadata (``world_size``, ``dp``, ``ep``, ...).
        async_save: write in a background thread (the step only waits for the host snapshot).
        keep_last: committed checkpoints kept (older ones pruned); 0 keeps all.
        extra_fn: called at save time; returns JSON-able data saved with the checkpoint (the config).
    """

    def __init__(self, root: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loader,
                 layout: dict, async_save: bool = True, keep_last: int = 3, extra_fn=None):
        self.root = str(root)
        self.model, self.optimizer, self.scheduler, self.loader = model, optimizer, scheduler, loader
        self.layout = layout
        self.async_save = async_save
        self.keep_last = keep_last
        self.extra_fn = extra_fn or (lambda: {})
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.checkpointer = AsyncCheckpointer()
        self.checkpointer.connect()  # collective; a later save then needs no rendezvous store
        self._pending: tuple[Any, int] | None = None

    # ------------------------------------------------------------------ save
    def save(self, step: int) -> None:
        """Start saving the state after ``step`` optimizer steps (waits for the previous save first).

        Blocking part: the device-to-host snapshot. The rest (serialising, writing, committing,
        moving ``latest``, pruning) finishes in the background, or here when ``async_save`` is off.
        """
        self.wait()
        extra = {
            "step": step,
            "optimizer": optimizer_extra(self.optimizer),
            "scheduler": _jsonable(self.scheduler.state_dict()),
            "loader": self.loader.state_dict(),
            "layout": self.layout,
            **self.extra_fn(),
        }
        path = f"{self.root.rstrip('/')}/{step_dir_name(step)}"
        state = sharded_train_state(self.model, self.optimizer)
        # ``latest`` moves in the background the moment the checkpoint commits (not at the next save), so
        # a crash between two saves resumes from the newest committed step.
        handle = self.checkpointer.save(state, path, extra=extra, rank_extra={"rng": capture_rng()},
                                        layout=self.layout, update_latest=True)
        self._pending = (handle, step)
        if not self.async_save:
            self.wait()

    def wait(self) -> None:
        """Wait for the pending save to be committed (``latest`` already moved at commit), then prune (rank 0)."""
        if self._pending is None:
            return
        handle, step = self._pending
        self._pending = None
        path = handle.wait()
        if self.rank == 0:
            removed = prune(self.root, self.keep_last) if self.keep_last else []
            logger.info("checkpoint: step %d committed at %s%s", step, path,
                        f" (pruned {len(removed)})" if removed else "")
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        """Finish the pending save and stop the background writer."""
        self.wait()
        self.checkpointer.close()

    # ------------------------------------------------------------------ load
    def resolve(self, resume: str) -> str | None:
        """The checkpoint folder for ``resume`` (``latest`` under the root, or a path); see :meth:`resolve_in`."""
        return self.resolve_in(self.root, resume)

    @staticmethod
    def resolve_in(root: str, resume: str) -> str | None:
        """The committed checkpoint folder for ``resume``: ``latest`` under ``root``, or a path.

        Returns ``None`` for ``latest`` when no checkpoint was committed yet (a fresh start).

        Raises:
            CheckpointError: an explicit path that is missing or not committed; a ``latest`` naming a
                folder that is not committed.
        """
        if resume == "latest":
            name = read_latest(root)
            return None if name is None else resolve_checkpoint(f"{root.rstrip('/')}/{name}")
        return resolve_checkpoint(resume)

    def load(self, resume: str) -> Resumed | None:
        """Restore everything from ``resume`` into the live objects, resharding as needed.

        Returns:
            What was loaded, or ``None`` when ``resume == "latest"`` and there is none yet.

        Raises:
            CheckpointError: a missing, uncommitted, corrupted or mismatched checkpoint (the
                message names the tensor and file).
        """
        path = self.resolve(resume)
        if path is None:
            logger.info("checkpoint: nothing under %s yet, starting from step 0", self.root)
            return None
        result = load(sharded_train_state(self.model, self.optimizer), path)
        extra = result.extra
        load_optimizer_extra(self.optimizer, extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        self.loader.load_state_dict(extra["loader"])
        world = dist.get_world_size() if dist.is_initialized() else 1
        extras = result.rank_extras
        rng = extras[self.rank] if len(extras) == world and self.rank in extras else extras[min(extras)]
        restore_rng(rng["rng"])
        logger.info("checkpoint: resumed step %d from %s (saved layout %s, now world %d)",
                    extra["step"], path, extra.get("layout"), world)
        return Resumed(path, int(extra["step"]), extra)


def _jsonable(value):
    """``value`` with tuples as lists and non-JSON leaves (functions) dropped."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if _is_jsonable_leaf(v)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _is_jsonable_leaf(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, list, tuple, dict))


__all__ = ["CheckpointError", "CheckpointManager", "Resumed"]
