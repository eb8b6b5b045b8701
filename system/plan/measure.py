"""Measured memory of a training step: the peak of the bytes of live tensor storages over a region.

The planner's estimate (:mod:`system.plan.memory`) is checked against this measurement (``tests/test_plan.py``)
and ``benchmarks/parallel_layouts.py`` reports it per rank for every layout. :class:`LivePeak` counts what
``torch.distributed._tools.mem_tracker.MemTracker`` counts (checked equal in ``tests/test_plan.py``), but it also
accepts modules that run more than once per step (FSSDP's layers, which ``MemTracker`` refuses) and it works
on any device: it sees tensor storages, not an allocator, so allocator caching and fragmentation are not in it.

Use::

    peak = LivePeak(*step_state(model, optimizer, inputs, targets))
    with peak:
        train_step(...)
    peak.peak                          # bytes
    peak.breakdown(model, optimizer)   # {"params", "grads", "optimizer", "other", "total"}
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LivePeak", "step_state"]


def step_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               *inputs: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that exist before a training step and are live during it: the parameters, buffers and
    gradients of ``model``, the optimizer's state tensors, and ``inputs``.

    Pass them to :class:`LivePeak` as ``external`` and then drop the list: holding it would keep the old
    gradients alive past the step's ``zero_grad(set_to_none=True)``.
    """
    out: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    out += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        out += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return out + list(inputs)


class LivePeak(TorchDispatchMode):
    """Peak of the bytes of live tensor storages over a region, and which storages were live at the peak.

    Mechanism: every storage an op returns (seen through ``__torch_dispatch__``) is counted from then until
    it is freed (a weak-reference callback on the storage); ``external`` tensors (parameters, gradients,
    optimizer state, inputs made before the region) are counted from the start. DTensor ops are let through
    (``NotImplemented``) so that their local ops, which allocate, are seen instead. ``UntypedStorage.resize_``
    (FSDP2 frees and re-allocates its unsharded parameters that way, outside the dispatcher) is patched for the
    duration of the region and followed too, as ``MemTracker`` does. A storage is keyed by its ``id`` and a
    serial number, so that a later storage reusing a freed one's ``id`` is not taken for it.

    Rules of use: enter it on the thread that runs the step; nothing else may patch ``UntypedStorage.resize_``
    meanwhile. Every op of the region pays a Python callback, so do not time a step measured with it.

    Args:
        external: tensors that exist before the region (see :func:`step_state`).

    Attributes:
        peak: the largest total of live storage bytes seen in the region (bytes).
        current: live storage bytes now (bytes).
        at_peak: ``{(id, serial): bytes}`` of the storages live at the peak.
    """

    def __init__(self, *external: torch.Tensor):
        super().__init__()
        self.live: dict[tuple[int, int], int] = {}  # (id, serial) -> bytes
        self.serial: dict[int, int] = {}  # id of a live storage -> its serial
        self.count = 0
        self.current = self.peak = 0
        self.at_peak: dict[tuple[int, int], int] = {}
        for t in external:
            self._track(t)

    def _key(self, st) -> tuple[int, int]:
        """The key of a storage, registering it (with a free callback) when it is new."""
        if id(st) not in self.serial:
            self.count += 1
            self.serial[id(st)] = self.count
            self.live[(id(st), self.count)] = 0
            weakref.finalize(st, self._free, (id(st), self.count))
        return id(st), self.serial[id(st)]

    def _set(self, st) -> None:
        key = self._key(st)
        self.current += st.nbytes() - self.live[key]
        self.live[key] = st.nbytes()

    def _track(self, t: torch.Tensor) -> None:
        for st in get_untyped_storages(t):
            if id(st) not in self.serial:
                self._set(st)

    def _free(self, key: tuple[int, int]) -> None:
        self.current -= self.live.pop(key, 0)
        if self.serial.get(key[0]) == key[1]:
            del self.serial[key[0]]

    def _note(self) -> None:
        if self.current > self.peak:
            self.peak, self.at_peak = self.current, dict(self.live)

    def __enter__(self):
        self._resize = torch.UntypedStorage.resize_
        tracker, resize = self, self._resize

        def resize_(st, size):
            resize(st, size)
            tracker._set(st)
            tracker._note()

        torch.UntypedStorage.resize_ = resize_
        self._note()
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):  # let DTensor run its local ops, which are then seen here
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        self._note()
        return out

    def breakdown(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Bytes live at the peak by category: the storages of the parameters, of their gradients and of the
        optimizer state (as they are after the step), and everything else (activations, temporaries, cast
        and gathered weights, buffers, inputs).

        Returns:
            ``{"params", "grads", "optimizer", "other", "total"}`` in bytes (``total`` is :attr:`peak`).
        """
        def keys(tensors: Iterable) -> set[tuple[int, int | None]]:
            return {(id(st), self.serial.get(id(st))) for t in tensors if isinstance(t, torch.Tensor)
                    for st in get_untyped_storages(t)}

        params = keys(model.parameters())
        grads = keys(p.grad for p in model.parameters())
        state = keys(v for s in optimizer.state.values() for v in s.values())
        out = {"params": 0, "grads": 0, "optimizer": 0, "other": 0}
        for key, n in self.at_peak.items():
            cat = "params" if key in params else "grads" if key in grads else "optimizer" if key in state else "other"
            out[cat] += n
        out["total"] = self.peak
        return out
