"""bench.guest.stream against an in-process fake device: byte counts, re-posting, interrupts.

Spec: virtio 1.2 §2.7.13 (supplying buffers), §2.7.14 (used ring), §2.7.10 (event idx).
"""

from __future__ import annotations

import os
import struct
import threading

from bench.guest import GuestLayout, StreamQueue, need_event, stream


def _fake_device(q: StreamQueue, lens: list[int],
                 stop: threading.Event) -> tuple[list[int], threading.Thread]:
    """Use every available chain in order, with lengths cycling over ``lens``; signal the
    call eventfd when used_event asks for it. Returns the used lengths (in order, filled
    while it runs) and the thread."""
    raw = q.used_ring.data.cast("B")
    done: list[int] = []

    def run() -> None:
        used = 0
        while not stop.is_set():
            avail = q._avail_idx[0]
            if avail == used:
                continue
            old = used
            batch = 5  # uneven batches, so the guest's reaps start anywhere and wrap
            while used != avail and batch:
                batch -= 1
                slot = used & (q.size - 1)
                head = ((used % q.chains) * q.segs) & 0xFFFF
                length = lens[len(done) % len(lens)]
                struct.pack_into("<II", raw, 8 * slot, head, length)
                done.append(length)
                used = (used + 1) & 0xFFFF
            q._used_idx[0] = used
            if need_event(q._used_event[0], used, old):
                os.write(q.call_fd, (1).to_bytes(8, "little"))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return done, t


def test_stream_counts_used_lengths_across_ring_wraps() -> None:
    ram = bytearray(1 << 20)
    q = StreamQueue(GuestLayout(memoryview(ram)), 0, 16, [4096], writable=True)
    stop = threading.Event()
    done, t = _fake_device(q, [4096, 100, 1, 4095], stop)
    try:
        r = stream([q], 0.2, count_lens=True)
    finally:
        stop.set()
        t.join()
        q.close()
    _, rest = q.reap()  # what the device used after stream()'s final reap
    assert len(done) > 3 * q.size  # the ring wrapped several times
    # Every used length is counted once, across wraps (two unpacks) and partial batches.
    assert sum(r["per_port"]) + rest == sum(done)
    assert q.completed == len(done)


def test_stream_counts_chains_on_transmit_queues() -> None:
    ram = bytearray(1 << 21)
    q = StreamQueue(GuestLayout(memoryview(ram)), 1, 8, [32768])
    stop = threading.Event()
    done, t = _fake_device(q, [0], stop)
    try:
        r = stream([q], 0.1, count_lens=False)
    finally:
        stop.set()
        t.join()
        q.close()
    assert r["per_port"][0] == q.completed * 32768 == len(done) * 32768
    assert r["per_port"][0] > 0
