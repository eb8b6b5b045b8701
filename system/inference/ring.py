"""The ring of K device slots and its scheduler (SE-MoE, arXiv 2205.10034, sec. 3.3.2).

The N sections (one per block, :mod:`system.inference.sections`) live in the host tier; the device
holds ``K`` fixed slots, each a flat byte buffer the size of the largest section. A section's weights
are views into its slot, bound to the model's parameters only while its block computes, so nothing
is allocated for weights while generating and slots never fragment.

Schedule. Forward passes visit blocks ``0..N-1``; a global counter ``c`` numbers the block visits
across passes (prefill, then every decode step). Visit ``c`` computes section ``c mod N`` in slot
``c mod K``. When its compute has released the slot, section ``(c + K) mod N`` (the section of
visit ``c + K``) is loaded into the same slot, so with ``K >= 2`` the next ``K - 1`` sections are in
flight while a block computes; ``K = 1`` is the no-prefetch baseline. The wrap mod N carries the
prefetch from the last block of one step into the first blocks of the next. With ``K >= N`` only
``N`` slots are used and every section stays in its slot after the first pass (nothing is
re-streamed: a load is skipped when the slot already holds the section).

Protocol with the transport (:mod:`system.inference.transport`), per visit ``c`` in slot ``s``:
``wait_ready(s)`` (the load of this visit's section has landed), ``load(ticket, section, s)`` of visit
``c + K``'s section (issued at once; the transport starts writing only after the next ``release(s)``),
compute, ``release(s)``. On the CPU the copier thread's ``free[s]`` semaphore carries that rule, on
CUDA the copy stream waits on the event ``free[s]`` recorded by ``release`` and records ``ready[s]``,
which the compute stream waits on: no host synchronisation.

Generation stamps. Each load has a ticket (``c + 1`` of the visit it serves); the transport writes
``-ticket`` into the slot's stamp when the copy starts and ``ticket`` when it ends. The scheduler
checks the stamp before and after each compute: a missing ``wait_ready`` (the copy has not ended)
or a load that did not wait for the release (the slot was overwritten during the compute) raises
:class:`StaleSlotError` instead of silently computing with the wrong weights.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from system.inference.sections import Section, get_parameter, section_views


class StaleSlotError(RuntimeError):
    """A slot's generation stamp is not the ticket the compute expects (a missing wait in the protocol)."""


@dataclass(frozen=True)
class Event:
    """One entry of the :class:`EventLog`; ``seq`` orders events across threads."""

    seq: int
    kind: str  # load_start | load_end | compute_start | compute_end
    section: int
    slot: int
    ticket: int
    time: float


class EventLog:
    """Thread-safe, append-only record of loads and computes (for tests and benchmarks).

    On CUDA the entries are the host's issue order, not the device's execution order.
    """

    def __init__(self):
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def record(self, kind: str, section: int, slot: int, ticket: int) -> None:
        """Append an event with the next sequence number."""
        with self._lock:
            self.events.append(Event(len(self.events), kind, section, slot, ticket, time.perf_counter()))

    def of_kind(self, kind: str) -> list[Event]:
        """The events of one kind, in order."""
        with self._lock:
            return [e for e in self.events if e.kind == kind]


class SlotRing:
    """``K`` preallocated flat ``uint8`` slots of ``slot_bytes`` and the weight views of each section in each slot.

    Args:
        model: the model whose section parameters are bound to slot views (they hold empty
            placeholders otherwise).
        sections: the N sections.
        num_slots: K (already clamped to N by the plan).
        slot_bytes: bytes per slot (>= every section).
        device: where the slots live (the device tier).

    Attributes:
        stamps: per-slot generation stamp (host ints; written by the CPU transport).
    """

    def __init__(self, model: nn.Module, sections: Sequence[Section], num_slots: int, slot_bytes: int,
                 device: torch.device | str):
        self.sections = list(sections)
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(num_slots)]
        self.views = [[section_views(buf, sec) for sec in self.sections] for buf in self.buffers]
        self.params = [[(t.name, get_parameter(model, t.name)) for t in sec.tensors] for sec in self.sections]
        self.placeholders = {
            t.dtype: torch.empty(0, dtype=t.dtype, device=device) for sec in self.sections for t in sec.tensors
        }
        self.stamps = [0] * num_slots

    def bind(self, section: int, slot: int) -> None:
        """Point section ``section``'s parameters at their views in ``slot``."""
        views = self.views[slot][section]
        for name, p in self.params[section]:
            p.data = views[name]

    def unbind(self, section: int) -> None:
        """Point section ``section``'s parameters back at empty placeholders (any stray use fails loudly)."""
        for _, p in self.params[section]:
            p.data = self.placeholders[p.dtype]


class RingScheduler:
    """Drives the slots of a :class:`SlotRing` through a transport, one block visit at a time.

    Use: :meth:`run` is called for blocks ``0..N-1`` in order in every forward pass (through
    :meth:`ffn_runner`); the first K loads are issued at construction. Not thread-safe: one
    generating thread.

    Args:
        ring: the slots.
        transport: a :class:`~system.inference.transport.ThreadTransport` or
            :class:`~system.inference.transport.CudaTransport`, already started on ``ring``.
        log: optional :class:`EventLog` of compute events (the transport logs the loads).
        check_stamps: verify the slot's generation stamp before and after each compute.

    Attributes:
        counter: block visits so far.
        bytes_issued: bytes of the loads issued so far (priming included): what the ring streams.

    Raises:
        RuntimeError: (from :meth:`run`) blocks visited out of order.
        StaleSlotError: (from :meth:`run`) a stamp check failed.
    """

    def __init__(self, ring: SlotRing, transport, *, log: EventLog | None = None, check_stamps: bool = True):
        self.ring = ring
        self.transport = transport
        self.log = log
        self.check_stamps = check_stamps
        self.num_slots = ring.num_slots
        self.num_sections = len(ring.sections)
        self.counter = 0
        self.bytes_issued = 0
        self.content = [-1] * self.num_slots  # section each slot holds (or is loading)
        self.ticket = [0] * self.num_slots  # ticket of that content
        self.pending = [False] * self.num_slots  # a load was issued that the next visit must wait for
        for c in range(self.num_slots):
            self._issue(c)

    def _issue(self, c: int) -> None:
        """Load the section of visit ``c`` into its slot, unless the slot already holds it."""
        slot, section = c % self.num_slots, c % self.num_sections
        if self.content[slot] == section:
            self.pending[slot] = False
            return
        self.content[slot], self.ticket[slot], self.pending[slot] = section, c + 1, True
        self.bytes_issued += self.ring.sections[section].nbytes
        self.transport.load(c + 1, self.ring.sections[section], slot)

    def run(self, block: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Compute block ``block``'s FFN with its section bound to its slot, and queue the slot's next load.

        Args:
            block: the block index; must be ``counter mod N`` (blocks in order, wrapping).
            compute: runs the FFN (it reads the block's parameters, bound to slot views meanwhile).
        """
        c = self.counter
        slot, section = c % self.num_slots, c % self.num_sections
        if block != section:
            raise RuntimeError(f"ring visit {c} expects block {section}, got block {block} (blocks must run in order)")
        if self.pending[slot]:
            self.transport.wait_ready(slot)
        ticket = self.ticket[slot]
        if self.check_stamps:
            self.transport.check_stamp(slot, ticket, f"before computing section {section} (visit {c})")
        self._issue(c + self.num_slots)  # the transport waits for release(slot) before writing
        reload = self.pending[slot]
        if self.log is not None:
            self.log.record("compute_start", section, slot, ticket)
        self.ring.bind(section, slot)
        try:
            out = compute()
        finally:
            self.ring.unbind(section)
        if self.check_stamps:
            self.transport.check_stamp(slot, ticket, f"after computing section {section} (visit {c})")
        if self.log is not None:
            self.log.record("compute_end", section, slot, ticket)
        self.counter += 1
        if reload:
            self.transport.release(slot)
        return out

    def ffn_runner(self, inner: Callable[[int, nn.Module, torch.Tensor], torch.Tensor]):
        """An ``run_ffn(i, block, x)`` for :func:`system.inference.decoder.forward_step` that runs
        ``inner`` under :meth:`run`."""

        def run_ffn(i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return self.run(i, lambda: inner(i, block, x))

        return run_ffn
