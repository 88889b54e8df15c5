"""Micro-benchmarks of the ring per implementation: pop/push, translate, tx_to_fd batch.

Run with ``python -m pytest bench`` (pytest-benchmark). Each benchmark also asserts what
it measured happened, so a broken ring fails instead of looking fast.

Spec: virtio 1.2 §2.7.13 (split ring), §2.7.8 (used ring).
"""

from __future__ import annotations

import os
import socket

from bench.guest import GuestLayout, StreamQueue
from ring.memory import GuestMemory, Region

BATCH = 64


def _memory(size: int = 16 << 20) -> GuestMemory:
    return GuestMemory([Region(0, size, 0x7F00_0000_0000, 0, bytearray(size))])


def _queue(ring_impl, chunk: int, qsize: int = 256):
    mem = _memory()
    layout = GuestLayout(mem.regions[0].view, 0)
    drv = StreamQueue(layout, 1, qsize, [chunk])
    vq = ring_impl(mem, qsize, packed=False, event_idx=True, index=1)
    vq.configure(*drv.ring_addresses)
    return mem, drv, vq


def test_pop_push_batch(benchmark, ring_impl):
    """Pop and push back a batch of 64 one-descriptor chains."""
    _mem, drv, vq = _queue(ring_impl, 256)

    def once():
        drv.reap()
        drv.publish(BATCH)
        chains = vq.pop_batch(BATCH)
        vq.push_batch([(c.head, 0, 1) for c in chains])
        return len(chains)

    assert benchmark(once) == BATCH


def test_translate(benchmark, ring_impl):
    """GuestMemory.translate of a 4 KiB buffer (shared by both implementations' callers)."""
    mem = _memory()
    views = benchmark(mem.translate, 0x1000, 4096)
    assert sum(len(v) for v in views) == 4096


def test_tx_to_fd_batch(benchmark, ring_impl):
    """tx_to_fd of 64 × 1 KiB chains into a socket that is drained between rounds."""
    _mem, drv, vq = _queue(ring_impl, 1024)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    sink = bytearray(1 << 20)

    def once():
        drv.reap()
        drv.publish(BATCH)
        result = vq.tx_to_fd(a.fileno())
        while True:
            try:
                if not b.recv_into(sink):
                    break
            except BlockingIOError:
                break
        return result.chains

    try:
        assert benchmark(once) == BATCH
    finally:
        a.close()
        b.close()


def test_rx_from_fd_batch(benchmark, ring_impl):
    """rx_from_fd of 64 KiB from a socket into 4 KiB guest buffers."""
    mem = _memory()
    layout = GuestLayout(mem.regions[0].view, 0)
    drv = StreamQueue(layout, 0, 256, [4096], writable=True)
    vq = ring_impl(mem, 256, packed=False, event_idx=True, index=0)
    vq.configure(*drv.ring_addresses)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    data = os.urandom(64 * 1024)

    def once():
        drv.reap()
        drv.publish()
        b.sendall(data)
        return vq.rx_from_fd(a.fileno()).bytes

    try:
        assert benchmark(once) == len(data)
    finally:
        a.close()
        b.close()


def test_pump_round_trip(benchmark, ring_impl):
    """One console-port round trip through the stream pump: a kick drained, a 64-byte
    request written to the host socket, the host's answer read back into a guest buffer
    (the follow-up read), both calls made."""
    from ring.pump import stream_pump_for

    mem = _memory()
    layout = GuestLayout(mem.regions[0].view, 0)
    txd = StreamQueue(layout, 1, 256, [64])
    rxd = StreamQueue(layout, 0, 256, [4096], writable=True)
    tx = ring_impl(mem, 256, packed=False, event_idx=True, index=1)
    rx = ring_impl(mem, 256, packed=False, event_idx=True, index=0)
    tx.configure(*txd.ring_addresses)
    rx.configure(*rxd.ring_addresses)
    tx.call_fd, rx.call_fd = txd.call_fd, rxd.call_fd
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    pump = stream_pump_for(tx)
    pump.tx, pump.rx = tx, rx
    pump.write_fd = pump.read_fd = a.fileno()
    pump.follow_rx_max = 4096
    answer = bytes(64)

    def once():
        txd.reap()
        rxd.reap()
        txd.publish(1)
        rxd.publish()
        os.write(txd.kick_fd, (1).to_bytes(8, "little"))
        b.send(answer)  # the host answered before the device looked
        flags = pump.pump_tx(txd.kick_fd)
        b.recv(4096)
        return flags, pump.ran_rx, pump.rx_result.bytes

    try:
        assert benchmark(once) == (0, True, 64)
    finally:
        a.close()
        b.close()
