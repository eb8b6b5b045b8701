"""Transports that move sections from the host tier into ring slots (SE-MoE, arXiv 2205.10034, sec. 3.3.2).

Both implement the protocol the :class:`~system.inference.ring.RingScheduler` drives:
``start(ring, host)``, ``load(ticket, section, slot)`` (asynchronous), ``wait_ready(slot)``,
``release(slot)``, ``check_stamp(slot, ticket, where)``, ``close()``, plus byte/time counters.

- :class:`ThreadTransport` (CPU): a copier thread takes load requests in order; for each it waits on
  the slot's ``free`` semaphore, copies the section's tensors from the mmap'd checkpoint into the
  slot through a :class:`Link` (optionally throttled to a bandwidth in bytes/s, standing in for
  PCIe), and releases the slot's ``ready`` semaphore.
- :class:`CudaTransport` (GPU): copies from pinned host buffers on a dedicated copy stream that waits
  on the event ``free[s]`` recorded by the compute stream and records ``ready[s]``, which the
  compute stream waits on: no host synchronisation in the steady state. Its stamp checks are
  host-side (a protocol error raises :class:`~system.inference.ring.StaleSlotError` at once), with a
  device-side count of stamp mismatches read at :meth:`CudaTransport.verify` (never a device-side
  assertion, which would leave the CUDA context unusable). Exercised by ``tests/test_cuda.py``.

``host`` is the host tier: for each section, a list of ``(src, offset, nbytes)`` copies, ``src`` a
flat ``uint8`` tensor (a zero-copy view of the mmap'd file on CPU, a pinned buffer on CUDA) and
``offset`` the destination byte offset in the slot.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections.abc import Sequence

import torch

from system.inference.ring import EventLog, SlotRing, StaleSlotError
from system.inference.sections import Section

logger = logging.getLogger(__name__)

HostTier = Sequence[Sequence[tuple[torch.Tensor, int, int]]]
"""Per section: ``(src uint8 [n], slot offset, n)`` copies."""


class Link:
    """A host-to-device link: copies bytes, optionally throttled, and counts them.

    On CPU the copy is a single-threaded ``memmove`` (the GIL is released, and no OpenMP team is
    spun up in the copier thread); with ``bandwidth`` it proceeds in ``chunk_bytes`` pieces and
    sleeps so that ``n`` bytes take at least ``n / bandwidth`` seconds (back-to-back copies share one
    schedule). Copies that involve a GPU use ``Tensor.copy_(non_blocking=True)`` on the current stream,
    not throttled, between two CUDA timing events: their time is the device's (the copy itself, not
    its enqueue), read when :attr:`busy_s` is asked for.

    Args:
        bandwidth: bytes/s; ``None`` or 0: as fast as memory allows.
        chunk_bytes: pacing granularity of a throttled copy.

    Attributes:
        bytes_moved: bytes copied so far.
    """

    def __init__(self, bandwidth: float | None = None, chunk_bytes: int = 1 << 20):
        self.bandwidth = bandwidth or None
        self.chunk_bytes = chunk_bytes
        self.bytes_moved = 0
        self._host_s = 0.0  # CPU copies: host time, throttling included
        self._device_s = 0.0  # GPU copies whose end events have been read
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # GPU copies not read yet
        self._schedule_end = self._last_end = -1.0
        self._lock = threading.Lock()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy flat ``uint8`` ``src`` into ``dst`` (same length)."""
        n = src.numel()
        if dst.numel() != n:
            raise ValueError(f"copy of {n} bytes into a destination of {dst.numel()} bytes")
        t0 = time.perf_counter()
        if dst.device.type == "cpu" and src.device.type == "cpu":
            dptr, sptr = dst.data_ptr(), src.data_ptr()
            step = n if self.bandwidth is None else self.chunk_bytes
            # A copy that follows the previous one back to back (no idle link in between) continues its
            # schedule, so the oversleep of one copy is made up by the next (small tensors would
            # otherwise each pay it); idle time is never banked.
            back_to_back = t0 - self._last_end < 1e-4 and self._schedule_end <= t0
            start = self._schedule_end if back_to_back else t0
            done = 0
            while done < n:
                m = min(step, n - done)
                ctypes.memmove(dptr + done, sptr + done, m)
                done += m
                if self.bandwidth is not None:
                    ahead = start + done / self.bandwidth - time.perf_counter()
                    if ahead > 0:
                        time.sleep(ahead)
            if self.bandwidth is not None:
                self._schedule_end = start + n / self.bandwidth
            self._last_end = time.perf_counter()
            with self._lock:
                self.bytes_moved += n
                self._host_s += time.perf_counter() - t0
            return
        device = dst.device if dst.device.type == "cuda" else src.device
        stream = torch.cuda.current_stream(device)
        start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_ev.record(stream)
        dst.copy_(src, non_blocking=True)
        end_ev.record(stream)
        with self._lock:
            self.bytes_moved += n
            self._events.append((start_ev, end_ev))
            while self._events and self._events[0][1].query():  # fold the finished ones (no sync)
                done_start, done_end = self._events.pop(0)
                self._device_s += done_start.elapsed_time(done_end) / 1e3

    @property
    def busy_s(self) -> float:
        """Seconds spent in copies: host time of CPU copies (throttling included) plus device time of
        GPU copies (reading it waits for the GPU copies issued so far to finish)."""
        with self._lock:
            while self._events:
                done_start, done_end = self._events.pop(0)
                done_end.synchronize()
                self._device_s += done_start.elapsed_time(done_end) / 1e3
            return self._host_s + self._device_s

    @property
    def measured_bandwidth(self) -> float:
        """bytes/s over the copies so far (0 before any; see :attr:`busy_s`)."""
        busy = self.busy_s
        return self.bytes_moved / busy if busy > 0 else 0.0


class ThreadTransport:
    """CPU transport: one copier thread, ``ready``/``free`` semaphores per slot, a :class:`Link`.

    Args:
        link: the (optionally throttled) link; a fresh unthrottled one by default.
        log: records ``load_start``/``load_end`` events (after the ``free`` wait, around the copy).

    Raises:
        RuntimeError: (from :meth:`wait_ready`) the copier thread failed; its exception is chained.
    """

    def __init__(self, link: Link | None = None, log: EventLog | None = None):
        self.link = link or Link()
        self.log = log
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, ring: SlotRing, host: HostTier) -> None:
        """Bind to ``ring`` and its host tier and start the copier thread (every slot starts free)."""
        self.ring, self.host = ring, host
        self.ready = [threading.Semaphore(0) for _ in range(ring.num_slots)]
        self.free = [threading.Semaphore(1) for _ in range(ring.num_slots)]
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="ring-copier", daemon=True)
        self._thread.start()

    def load(self, ticket: int, section: Section, slot: int) -> None:
        """Queue the load of ``section`` into ``slot`` (returns at once; the copier starts it after the
        slot's ``free`` semaphore is released: initially, or by the next :meth:`release`)."""
        self._queue.put((ticket, section, slot))

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                ticket, section, slot = item
                self._wait_free(slot)
                if self._stop:
                    return
                self.ring.stamps[slot] = -ticket
                if self.log is not None:
                    self.log.record("load_start", section.index, slot, ticket)
                self._copy(section, slot)
                self.ring.stamps[slot] = ticket
                if self.log is not None:
                    self.log.record("load_end", section.index, slot, ticket)
                self.ready[slot].release()
        except BaseException as e:  # noqa: BLE001 - surfaced in wait_ready
            self._error = e

    def _wait_free(self, slot: int) -> None:
        """Block until the compute that used ``slot`` has released it."""
        self.free[slot].acquire()

    def _copy(self, section: Section, slot: int) -> None:
        buf = self.ring.buffers[slot]
        for src, offset, nbytes in self.host[section.index]:
            self.link.copy(buf[offset : offset + nbytes], src)

    def wait_ready(self, slot: int) -> None:
        """Block until the load queued for ``slot`` has ended."""
        while not self.ready[slot].acquire(timeout=0.05):
            if self._error is not None or self._thread is None or not self._thread.is_alive():
                raise RuntimeError("the ring copier thread stopped") from self._error

    def release(self, slot: int) -> None:
        """The compute on ``slot`` has ended: the next load may overwrite it."""
        self.free[slot].release()

    def check_stamp(self, slot: int, ticket: int, where: str) -> None:
        """Raise :class:`StaleSlotError` unless ``slot`` holds the completed load ``ticket``."""
        stamp = self.ring.stamps[slot]
        if stamp != ticket:
            state = f"load {-stamp} in progress" if stamp < 0 else f"load {stamp} completed"
            raise StaleSlotError(f"slot {slot} {where}: expected load {ticket}, found {state}")

    @property
    def bytes_moved(self) -> int:
        """Bytes streamed into slots so far."""
        return self.link.bytes_moved

    @property
    def measured_bandwidth(self) -> float:
        """Link bytes/s measured over the copies so far."""
        return self.link.measured_bandwidth

    def close(self) -> None:
        """Stop the copier thread (pending loads are dropped)."""
        if self._thread is None:
            return
        self._stop = True
        self._queue.put(None)
        for sem in self.free:
            sem.release()
        self._thread.join(timeout=10)
        self._thread = None


class CudaTransport:
    """GPU transport: a copy stream, events ``ready[s]`` and ``free[s]``, pinned host buffers.

    A load enqueues on the copy stream: wait ``free[s]``, one ``cudaMemcpyAsync`` per host piece
    (one per section when the host tier is packed), write the stamp, record ``ready[s]``; a load
    requested while the slot is computing is enqueued by the slot's :meth:`release`, right after it
    records ``free[s]`` on the compute stream. ``wait_ready`` makes the compute stream wait
    ``ready[s]``. The host never blocks.

    Stamp checks (:meth:`check_stamp`). The event protocol is decided on the host, so it is checked
    there, at once and without a sync: the slot's last enqueued load must be the expected ticket (no
    other load was enqueued into it, before or during the compute) and the compute stream must have
    waited for that load's ``ready`` event; otherwise :class:`~system.inference.ring.StaleSlotError`.
    The device stamps (written by the copy stream after each load) are compared too, on the compute
    stream, into a mismatch counter that :meth:`verify` reads (one sync) and :meth:`close` logs: a
    device-side ``torch._assert_async`` would instead leave the whole CUDA context unusable.

    Args:
        device: the CUDA device.
        log: records the host's issue order of loads (``load_start`` at issue, no ``load_end``).
        timing: record CUDA timing events around each load (for :attr:`measured_bandwidth`).
    """

    def __init__(self, device: torch.device | str, log: EventLog | None = None, timing: bool = True):
        self.device = torch.device(device)
        self.log = log
        self.timing = timing
        self._bytes = 0
        self._timings: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []
        self._stale: torch.Tensor | None = None  # set by start()

    def start(self, ring: SlotRing, host: HostTier) -> None:  # noqa: D102
        self.ring, self.host = ring, host
        self.copy_stream = torch.cuda.Stream(self.device)
        self.compute_stream = torch.cuda.current_stream(self.device)
        self.ready = [torch.cuda.Event() for _ in range(ring.num_slots)]
        self.free = [torch.cuda.Event() for _ in range(ring.num_slots)]
        self.stamps = torch.zeros(ring.num_slots, dtype=torch.int64, device=self.device)
        self._stale = torch.zeros((), dtype=torch.int64, device=self.device)  # device stamp mismatches
        self._enqueued = [0] * ring.num_slots  # ticket of the last load enqueued into each slot
        self._waited = [0] * ring.num_slots  # ticket whose ready event the compute stream last waited for
        self._busy = [False] * ring.num_slots
        self._deferred: list[list[tuple[int, Section]]] = [[] for _ in range(ring.num_slots)]

    def load(self, ticket: int, section: Section, slot: int) -> None:
        """Enqueue the copy now if ``slot`` is idle, else at its next :meth:`release` (after ``free[s]``
        is recorded there, so the copy stream's wait covers the compute that is using the slot)."""
        if self._busy[slot]:
            self._deferred[slot].append((ticket, section))
        else:
            self._enqueue(ticket, section, slot)

    def _enqueue(self, ticket: int, section: Section, slot: int) -> None:
        if self.log is not None:
            self.log.record("load_start", section.index, slot, ticket)
        buf = self.ring.buffers[slot]
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.free[slot])  # no-op before the first record
            start = end = None
            if self.timing:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self.copy_stream)
            nbytes = 0
            for src, offset, n in self.host[section.index]:
                buf[offset : offset + n].copy_(src, non_blocking=True)
                nbytes += n
            self.stamps[slot].fill_(ticket)
            if self.timing:
                end.record(self.copy_stream)
                self._timings.append((start, end, nbytes))
                if len(self._timings) > 1024:  # keep the recent loads only
                    del self._timings[:512]
            self.ready[slot].record(self.copy_stream)
        self._enqueued[slot] = ticket
        self._bytes += nbytes

    def wait_ready(self, slot: int) -> None:  # noqa: D102
        self.compute_stream.wait_event(self.ready[slot])
        self._waited[slot] = self._enqueued[slot]
        self._busy[slot] = True

    def release(self, slot: int) -> None:  # noqa: D102
        self.free[slot].record(self.compute_stream)
        self._busy[slot] = False
        pending, self._deferred[slot] = self._deferred[slot], []
        for ticket, section in pending:
            self._enqueue(ticket, section, slot)

    def check_stamp(self, slot: int, ticket: int, where: str) -> None:
        """Raise :class:`StaleSlotError` unless load ``ticket`` is the last one enqueued into ``slot`` and
        the compute stream waited for it; count a device stamp mismatch for :meth:`verify` (no sync)."""
        if self._enqueued[slot] != ticket:
            raise StaleSlotError(f"slot {slot} {where}: expected load {ticket}, found load {self._enqueued[slot]} "
                                 "enqueued into it")
        if self._waited[slot] != ticket:
            raise StaleSlotError(f"slot {slot} {where}: expected load {ticket}, but the compute stream did not "
                                 "wait for it (wait_ready missing)")
        self._stale.add_(self.stamps[slot].ne(ticket).to(torch.int64))

    def verify(self) -> None:
        """Read the device-side stamp checks so far (synchronises).

        Raises:
            StaleSlotError: some compute saw a slot whose device stamp was not its ticket.
        """
        stale = int(self._stale.item())
        self._stale.zero_()
        if stale:
            raise StaleSlotError(f"{stale} ring stamp check(s) found a slot on the device not holding the load "
                                 "its compute expected")

    @property
    def bytes_moved(self) -> int:  # noqa: D102
        return self._bytes

    @property
    def measured_bandwidth(self) -> float:
        """Pinned host-to-device bytes/s over the timed loads (synchronises the copy stream)."""
        if not self._timings:
            return 0.0
        self.copy_stream.synchronize()
        secs = sum(s.elapsed_time(e) for s, e, _ in self._timings) / 1e3
        return sum(n for _, _, n in self._timings) / secs if secs > 0 else 0.0

    def close(self) -> None:
        """Wait for the device; log (not raise: close runs in ``finally``/``__exit__``) a failed device
        stamp check that :meth:`verify` has not reported."""
        torch.cuda.synchronize(self.device)
        stale = int(self._stale.item()) if self._stale is not None else 0
        if stale:
            logger.error("ring: %d device stamp check(s) failed: a slot was not holding the load its compute "
                         "expected", stale)
