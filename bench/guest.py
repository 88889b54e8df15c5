"""A cheap guest driver for streaming benchmarks: split rings with pre-built descriptors.

The general guest-driver model (``tests/support/driver.py``) allocates, fills and frees
buffers and descriptors per chain, as Linux does; at a few µs of Python per chain it would
be the bottleneck of every bulk scenario. This driver moves the per-chain work out of the
measured loop, so what is measured is the back-end:

- the descriptor table is written once: chain ``k`` of a queue always uses descriptors
  ``k*segs .. k*segs+segs-1``, each pointing at its own fixed data buffer (pre-filled for
  transmit queues, never read back for receive queues);
- the avail ring is written once too: slot ``s`` holds head ``segs * (s mod chains)``;
- the back-end completes chains in order (the batched data path does), so publishing is
  "advance ``avail->idx`` by the number of chains completed": O(1) Python per batch, not
  per chain. Received byte counts come from the used ring's ``len`` fields (one ``struct``
  unpack per batch in :func:`stream`, numpy in :meth:`StreamQueue.reap`).
  :meth:`StreamQueue.check_in_order` verifies the in-order assumption (tests and warm-up).

The measured loops are module functions with everything inlined: :func:`stream` (bulk and
many ports) and :func:`round_trips` (64-byte echo).

Guest memory is the front-end's memfd (``vhost_user.frontend.GuestRam``), one region.

Spec: virtio 1.2 §2.7.13 (supplying buffers), §2.7.14 (receiving used buffers), §2.7.10
(used_event / avail_event with VIRTIO_F_EVENT_IDX).
"""

from __future__ import annotations

import gc
import os
import select
import signal
import struct
import sys
import time

import numpy as np

from ring.wire import DescFlag

__all__ = ["GuestLayout", "StreamQueue", "need_event", "round_trips", "stream"]

_DESC = struct.Struct("<QIHH")
_ONE = (1).to_bytes(8, sys.byteorder)
_NEXT, _WRITE = int(DescFlag.NEXT), int(DescFlag.WRITE)


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event (virtio 1.2 §2.7.10): notify iff event_idx is in [old, new)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class GuestLayout:
    """A bump allocator over one guest RAM region (``region.view``, guest-physical ``gpa``)."""

    def __init__(self, view: memoryview, gpa: int = 0) -> None:
        self.view = view
        self.base = gpa
        self.next = gpa
        self.end = gpa + len(view)

    def alloc(self, size: int, align: int = 64) -> int:
        gpa = -(-self.next // align) * align
        if gpa + size > self.end:
            raise MemoryError(f"bench guest RAM exhausted ({size} bytes more wanted)")
        self.next = gpa + size
        return gpa

    def mv(self, gpa: int, size: int) -> memoryview:
        off = gpa - self.base
        return self.view[off:off + size]


class StreamQueue:
    """The guest side of one split virtqueue with fixed chains (see the module docstring).

    ``segments``: the byte sizes of the descriptors of every chain (e.g. ``[32768]``, or a
    vsock ``[44, 65536]`` header + payload); ``writable``: device-writable buffers (receive
    queues) instead of readable ones; ``fill``: bytes repeated into readable buffers.
    ``kick_fd`` / ``call_fd`` are the eventfds handed to the front-end.
    """

    def __init__(self, layout: GuestLayout, index: int, size: int, segments: list[int], *,
                 writable: bool = False, fill: bytes = b"\x5a") -> None:
        if size & (size - 1):
            raise ValueError("split queue size must be a power of two")
        segs = len(segments)
        if size % segs or size // segs < 1:
            raise ValueError("descriptors per chain must divide the queue size")
        self.index = index
        self.size = size
        self.segs = segs
        self.chains = size // segs
        self.chain_bytes = sum(segments)
        self.writable = writable
        self.layout = layout
        self.desc_gpa = layout.alloc(16 * size, 16)
        self.avail_gpa = layout.alloc(6 + 2 * size, 2)
        self.used_gpa = layout.alloc(6 + 8 * size, 4)
        # Data buffers, one set per chain; readable ones are filled once.
        self.buffers: list[list[int]] = []
        table = bytearray(16 * size)
        for k in range(self.chains):
            gpas = []
            for j, length in enumerate(segments):
                gpa = layout.alloc(length, 64)
                gpas.append(gpa)
                if not writable:
                    mv = layout.mv(gpa, length)
                    mv[:] = (fill * (length // len(fill) + 1))[:length]
                d = k * segs + j
                flags = (_WRITE if writable else 0) | (_NEXT if j + 1 < segs else 0)
                _DESC.pack_into(table, 16 * d, gpa, length, flags,
                                d + 1 if j + 1 < segs else 0)
            self.buffers.append(gpas)
        layout.mv(self.desc_gpa, 16 * size)[:] = table
        avail = bytearray(6 + 2 * size)
        ring = np.frombuffer(avail, dtype="<u2", count=size, offset=4)
        ring[:] = (np.arange(size) % self.chains) * segs
        layout.mv(self.avail_gpa, len(avail))[:] = avail
        layout.mv(self.used_gpa, 6 + 8 * size)[:] = bytes(6 + 8 * size)
        # Scalar views (u16) of the indices and event fields.
        self._avail_idx = layout.mv(self.avail_gpa + 2, 2).cast("H")
        self._used_event = layout.mv(self.avail_gpa + 4 + 2 * size, 2).cast("H")
        self._used_idx = layout.mv(self.used_gpa + 2, 2).cast("H")
        self._avail_event = layout.mv(self.used_gpa + 4 + 8 * size, 2).cast("H")
        self.used_ring = np.frombuffer(layout.mv(self.used_gpa + 4, 8 * size), dtype="<u4") \
            .reshape(size, 2)
        self._used_words = layout.mv(self.used_gpa + 4, 8 * size).cast("I")  # id, len, ...
        self.avail_idx = 0
        self.last_used = 0
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kicks = 0
        self.completed = 0  # chains reaped since creation

    # -- addresses for the front-end ------------------------------------------------------
    @property
    def ring_addresses(self) -> tuple[int, int, int]:
        return self.desc_gpa, self.avail_gpa, self.used_gpa

    def chain_buffer(self, k: int, j: int = 0) -> memoryview:
        """The bytes of descriptor ``j`` of chain ``k`` (to prepare special chains)."""
        return self.layout.mv(self.buffers[k][j], 0x7FFFFFFF)  # clipped by the region

    # -- driver operations ------------------------------------------------------------------
    @property
    def outstanding(self) -> int:
        return (self.avail_idx - self.last_used) & 0xFFFF

    def reap(self) -> tuple[int, int]:
        """Take every used chain: ``(chains, bytes)`` where bytes sums the used lengths
        (meaningful for receive queues)."""
        used = self._used_idx[0]
        n = (used - self.last_used) & 0xFFFF
        if n == 0:
            return 0, 0
        total = 0
        if self.writable and n <= 8:
            # A few chains (round trips): plain indexing; numpy's call overhead (~µs) is
            # more than the sum.
            words, mask, first = self._used_words, self.size - 1, self.last_used
            for k in range(n):
                total += words[2 * ((first + k) & mask) + 1]
        elif self.writable:
            start = self.last_used & (self.size - 1)
            end = start + n
            lens = self.used_ring[:, 1]
            if end <= self.size:
                total = int(lens[start:end].sum())
            else:
                total = int(lens[start:].sum()) + int(lens[:end - self.size].sum())
        self.last_used = used
        self.completed += n
        return n, total

    def publish(self, max_chains: int | None = None) -> int:
        """Make every free chain (at most ``max_chains``) available; kick if the device asked
        for it (avail_event). Returns the number of chains published."""
        free = self.chains - self.outstanding
        if max_chains is not None:
            free = min(free, max_chains)
        if free <= 0:
            return 0
        old = self.avail_idx
        self.avail_idx = new = (old + free) & 0xFFFF
        self._avail_idx[0] = new
        if need_event(self._avail_event[0], new, old):
            os.write(self.kick_fd, _ONE)
            self.kicks += 1
        return free

    def kick(self) -> None:
        """Notify unconditionally (a rescue after a timeout; see the module docstring)."""
        os.write(self.kick_fd, _ONE)
        self.kicks += 1

    def want_interrupt_after(self, chains: int) -> None:
        """used_event: interrupt once ``chains`` more chains were used (≥ 1)."""
        self._used_event[0] = (self.last_used + max(1, chains) - 1) & 0xFFFF

    def no_interrupts(self) -> None:
        """used_event just behind: the device signals only after ~65535 completions."""
        self._used_event[0] = (self.last_used - 1) & 0xFFFF

    def check_in_order(self, first_index: int, count: int) -> None:
        """Assert that used elements ``[first_index, first_index+count)`` carry the heads
        published at those positions (the in-order assumption of this driver)."""
        for i in range(count):
            pos = (first_index + i) & 0xFFFF
            head = int(self.used_ring[pos & (self.size - 1), 0])
            want = (pos % self.chains) * self.segs
            if head != want:
                raise AssertionError(f"queue {self.index}: used element {pos} is head {head}, "
                                     f"expected {want} (back-end completed out of order)")

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def round_trips(rx: StreamQueue, tx: StreamQueue, iterations: int,
                warm: int) -> tuple[list[int], int]:
    """Time ``iterations`` one-chain round trips (after ``warm`` untimed ones): publish one
    ``tx`` chain, block in read() on ``rx``'s call eventfd until a used ``rx`` chain appears.

    What the guest does per round trip is the minimum a driver must do, inlined with no
    method calls and no allocation but the latency itself (the real guest is the kernel and
    the raw limit it is compared with is C, so the harness guest must cost as little as it
    can): arm ``rx``'s used_event for the next completion, advance ``tx``'s avail idx (the
    chains are pre-built, see the module docstring), kick if avail_event asks for it
    (Spec: virtio 1.2 §2.7.10), read() the call eventfd until ``rx``'s used idx moved. Receive
    buffers are re-posted in batches (half the ring at a time), outside the timed interval;
    ``tx`` is reaped once at the end (each transmit chain is used before its echo can come
    back, so it never holds more than one chain).

    The call eventfd is put in blocking mode for the loop (the flag belongs to the open file
    description the back-end shares, which only writes it; restored afterwards). Lost
    notifications are rescued by a 1 s interval timer (SIGALRM): if ``rx`` made no progress
    since the previous tick it kicks ``tx`` and wakes the read. Returns ``(latencies_ns,
    rescues)``.
    """
    rx.reap()
    tx.reap()
    rx.publish()
    tx.no_interrupts()
    call_fd, kick_fd, rx_kick_fd = rx.call_fd, tx.kick_fd, rx.kick_fd
    tx_avail, tx_avail_event = tx._avail_idx, tx._avail_event
    rx_used, rx_used_event = rx._used_idx, rx._used_event
    rx_avail, rx_avail_event = rx._avail_idx, rx._avail_event
    ta, rl, ra = tx.avail_idx, rx.last_used, rx.avail_idx
    refill_below = max(1, rx.chains // 2)
    one, read, write, clock = _ONE, os.read, os.write, time.perf_counter_ns
    lat: list[int] = []
    append = lat.append
    rescues = [0]
    seen = [rx_used[0]]

    def watchdog(_signum, _frame) -> None:
        now = rx_used[0]
        if now == seen[0]:  # no round trip completed for a whole tick: rescue
            rescues[0] += 1
            write(kick_fd, one)
            write(call_fd, one)
        seen[0] = now

    old_handler = signal.signal(signal.SIGALRM, watchdog)
    signal.setitimer(signal.ITIMER_REAL, 1.0, 1.0)
    os.set_blocking(call_fd, True)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(iterations + warm):
            rx_used_event[0] = rl  # interrupt on the next used rx chain
            t0 = clock()
            old, ta = ta, (ta + 1) & 0xFFFF
            tx_avail[0] = ta
            if tx_avail_event[0] == old:  # need_event(event, old + 1, old)
                write(kick_fd, one)
            while rx_used[0] == rl:
                read(call_fd, 8)
            append(clock() - t0)
            rl = rx_used[0]
            if ((ra - rl) & 0xFFFF) < refill_below:  # re-post the used receive buffers
                old, ra = ra, (rl + rx.chains) & 0xFFFF
                rx_avail[0] = ra
                if need_event(rx_avail_event[0], ra, old):
                    write(rx_kick_fd, one)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        os.set_blocking(call_fd, False)
        if gc_was_enabled:
            gc.enable()
        done = (rl - rx.last_used) & 0xFFFF
        rx.last_used, rx.avail_idx = rl, ra
        rx.completed += done
        tx.avail_idx = ta
        tx.reap()
    return lat[warm:], rescues[0]


def _len_sums(size: int) -> list[struct.Struct]:
    """``sums[n]`` unpacks the ``len`` fields of ``n`` consecutive used elements (8 bytes
    each: id, len) in one call: ``sum(sums[n].unpack_from(used, 8 * first + 4))``."""
    return [struct.Struct("<" + "I4x" * (n - 1) + "I" if n else "<") for n in range(size + 1)]


def stream(queues: list[StreamQueue], seconds: float, count_lens: bool,
           interrupt_every: int = 4) -> dict:
    """Keep every queue full for ``seconds``; return ``{"per_port": bytes per queue,
    "seconds", "rescues", "guest_cpu_s"}``. Bytes are the used lengths (``count_lens``,
    receive queues) or chains × chain bytes (transmit queues).

    The minimum a driver does per interrupt, inlined (no method calls, no per-chain Python
    objects; the real guest is the kernel): read ``used->idx``; sum the used lengths of the
    new elements with one precompiled ``struct`` unpack (receive queues); re-post every used
    chain with one ``avail->idx`` store (descriptors and avail entries are pre-built, see the
    module docstring) and kick only if ``avail_event`` asks for it (Spec: virtio 1.2
    §2.7.10); arm ``used_event`` ``chains // interrupt_every`` completions ahead, and re-check
    ``used->idx`` after arming (Linux ``virtqueue_enable_cb_prepare`` + ``virtqueue_poll``).

    Only queues whose call eventfd fired are touched: one ``epoll_wait`` per wake-up, the
    call eventfds registered edge-triggered and never read (an eventfd write re-arms an
    edge-triggered watch even when its counter is non-zero), so a wake-up costs one
    system call whatever the number of queues. A 0.2 s silence rescues: kick every queue.
    """
    n_q = len(queues)
    used_idx = [q._used_idx for q in queues]
    used_event = [q._used_event for q in queues]
    avail_idx = [q._avail_idx for q in queues]
    avail_event = [q._avail_event for q in queues]
    used_raw = [q.used_ring.data.cast("B") for q in queues]
    kick_fds = [q.kick_fd for q in queues]
    for q in queues:
        q.reap()
    last = [q.last_used for q in queues]
    avail = [q.avail_idx for q in queues]
    size, chains = queues[0].size, queues[0].chains
    if any(q.size != size or q.chains != chains or q.segs != 1 for q in queues):
        raise ValueError("stream() wants one-descriptor chains on queues of one size")
    mask = size - 1
    ahead = max(1, chains // interrupt_every)
    chunk = queues[0].chain_bytes
    sums = _len_sums(size) if count_lens else None
    per = [0] * n_q
    kicks = wakeups = 0
    rescues = 0
    by_fd = {q.call_fd: i for i, q in enumerate(queues)}
    ep = select.epoll()
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN | select.EPOLLET)
    write, one, clock = os.write, _ONE, time.perf_counter
    cpu0 = time.process_time()
    start = clock()
    deadline = start + seconds
    todo = range(n_q)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while True:
            again = []
            for i in todo:
                used = used_idx[i][0]
                old_used = last[i]
                n = (used - old_used) & 0xFFFF
                if n > size:
                    raise RuntimeError(
                        f"queue {queues[i].index}: used->idx moved by {n} (> ring size "
                        f"{size}): used {used}, last seen {old_used}, avail {avail[i]}")
                if n:
                    if sums is None:
                        per[i] += n * chunk
                    else:
                        first = old_used & mask
                        if first + n <= size:
                            per[i] += sum(sums[n].unpack_from(used_raw[i], 8 * first + 4))
                        else:
                            k = size - first
                            per[i] += sum(sums[k].unpack_from(used_raw[i], 8 * first + 4)) \
                                + sum(sums[n - k].unpack_from(used_raw[i], 4))
                    last[i] = used
                # Re-post: every chain is available again (in-order completion).
                old = avail[i]
                new = (used + chains) & 0xFFFF
                if new != old:
                    avail[i] = new
                    avail_idx[i][0] = new
                    if ((new - avail_event[i][0] - 1) & 0xFFFF) < ((new - old) & 0xFFFF):
                        write(kick_fds[i], one)
                        kicks += 1
                used_event[i][0] = (used + ahead - 1) & 0xFFFF
                if ((used_idx[i][0] - used) & 0xFFFF) >= ahead:
                    again.append(i)  # already past the event: no call will come
            if clock() >= deadline:
                break
            if again:
                todo = again
                continue
            events = ep.poll(0.2)
            wakeups += 1
            if events:
                todo = [by_fd[fd] for fd, _ev in events]
            else:
                rescues += 1
                for fd in kick_fds:
                    write(fd, one)
                todo = range(n_q)
    finally:
        ep.close()
        if gc_was_enabled:
            gc.enable()
        for i, q in enumerate(queues):
            q.completed += (last[i] - q.last_used) & 0xFFFF
            q.last_used, q.avail_idx = last[i], avail[i]
        queues[0].kicks += kicks
    for i, q in enumerate(queues):  # count what completed up to the deadline
        n, b = q.reap()
        per[i] += b if count_lens else n * chunk
    return {"per_port": per, "seconds": clock() - start, "rescues": rescues,
            "guest_cpu_s": time.process_time() - cpu0, "wakeups": wakeups, "kicks": kicks}
