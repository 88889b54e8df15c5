"""Zero-copy transmit across a transmitq stop while the host peer stays (vhost-user
GET_VRING_BASE: QEMU's ``stop``/``cont``): a chain whose bytes the socket still refers to by
page reference never goes back to the guest before the peer has read them.

The stop keeps such chains in flight (the ring's base counts them consumed: the device still
holds them); the same ring going on gets them back through its used ring once the peer has
read their bytes; another ring (a reset) never sees their stale heads; a new host peer frees
them at once. The device's part (its ``carry``: the pipe's bytes and a partly sent chain's
rest, written by Python before the ring runs again) is played here by ``Device``.

Found by tests/property/test_zero_copy_staged.py's author: the stop returned every waiting
chain, the guest reused the buffers after ``cont`` and the peer read what the guest wrote
since instead of the stream.

Guest RAM is a shared memfd (tests/unit/test_zero_copy_pump.py ``ZcPort``): page references
only mean something on shared pages.

Spec: virtio 1.2 §2.7.8 (a buffer goes to the used ring once the device is done with it),
§2.4 (device reset), §5.3.6 (console transmitq); vhost-user VHOST_USER_GET_VRING_BASE,
VHOST_USER_SET_VRING_BASE.
"""

from __future__ import annotations

import fcntl
import os
import socket

import pytest

from ring.cring import Virtqueue
from ring.pump import PumpFlag
from tests.support.driver import Allocator, make_driver
from tests.unit.test_zero_copy_pump import BIG, RAM, ZcPort, pattern

SCRIBBLE = 0xEE


class Device:
    """What the console device does around its port pump: stop the transmitq (keep what the
    pump gives back unsent as ``carry``), start a ring, and pump with the carry written
    first, outside the C path (virtio/console/device.py ``_salvage_tx``, ``_pump_tx``)."""

    def __init__(self, port: ZcPort) -> None:
        self.p = port
        self.carry = bytearray()

    def stop(self, guest: "Guest | None" = None) -> int:
        """GET_VRING_BASE: detach the queue; the ring's base. Every posted chain must have
        been taken: ``guest``'s chains then need only the bytes that reached the socket
        read (the rest are copies in the carry)."""
        p = self.p
        vq = p.pump.tx
        p.pump.tx = None
        self.carry += p.pump.take_unsent()
        if guest is not None:
            assert vq.last_avail_idx == len(guest.ends)
            guest.stopped(len(guest.stream) - len(self.carry))
        return vq.get_base()

    def ring_going_on(self, base: int) -> Virtqueue:
        """SET_VRING_NUM/ADDR/BASE/KICK of the same ring after ``cont``: a new queue object
        at the same addresses and base, as the vhost-user session builds it."""
        old = self.p.tx
        vq = Virtqueue(old.memory, old.size, packed=old.packed, event_idx=old.event_idx,
                       index=old.index)
        vq.configure(*self.p.txd.ring_addresses)
        vq.set_base(base)
        vq.call_fd = self.p.call
        self.p.pump.tx = vq
        self.p.tx = vq
        return vq

    def pump(self) -> int:
        fd = self.p.pump.write_fd
        if self.carry:
            try:
                del self.carry[:os.write(fd, self.carry)]
            except BlockingIOError:
                pass
            if self.carry:
                return PumpFlag.TX_BLOCKED
        return self.p.pump.pump_tx()


class Guest:
    """The guest side of a ZcPort: posts chains, remembers each one's place in the stream,
    and scribbles over a buffer the moment it comes back (as a guest reusing it would)."""

    def __init__(self, port: ZcPort) -> None:
        self.p = port
        self.ends: dict[int, int] = {}  # head -> stream position just past its last byte
        self.buffers: dict[int, list[tuple[int, int]]] = {}  # head -> its (gpa, length)s
        self.stream = bytearray()
        self.back: list[int] = []

    def post(self, *pieces: bytes) -> int:
        head = self.p.post(*pieces)
        assert head not in self.ends
        gpas = self.p.txd._outstanding[head].buffers
        self.buffers[head] = [(gpa, len(piece)) for gpa, piece in zip(gpas, pieces)]
        for piece in pieces:
            self.stream += piece
        self.ends[head] = len(self.stream)
        return head

    def stopped(self, in_socket: int) -> None:
        """The queue stopped with the stream's first ``in_socket`` bytes in the socket."""
        for head, end in self.ends.items():
            self.ends[head] = min(end, in_socket)

    def reclaim(self, read_so_far: int) -> list[int]:
        heads = self.p.reclaim()  # raises on a head that is not outstanding (twice, stale)
        for head in heads:
            assert read_so_far >= self.ends[head], (
                f"head {head} came back at {read_so_far} before the peer read up to "
                f"{self.ends[head]}")
            for gpa, length in self.buffers.pop(head):
                self.p.ram.memory.write(gpa, bytes([SCRIBBLE]) * length)
        self.back += heads
        return heads


def _read_to_the_end(p: ZcPort, dev: Device, guest: Guest, got: bytearray,
                     piece: int = 7000, rounds: int = 5000) -> None:
    """The peer reads ``piece`` bytes at a time; after each read the device pumps (the
    socket's writable edge) and the guest takes back what it gets."""
    for _ in range(rounds):
        if len(got) >= len(guest.stream) and not p.txd._outstanding:
            return
        got += p.host_read(piece)
        dev.pump()
        guest.reclaim(len(got))
    raise AssertionError((len(got), len(guest.stream), sorted(p.txd._outstanding)))


def _sent(chains: int, *, packed: bool = False) -> tuple[ZcPort, Device, Guest]:
    """A port (small SO_SNDBUF) whose guest posted ``chains`` chains of BIG bytes, all taken
    by one pump call: the socket holds what it takes, the pipe the rest."""
    p = ZcPort(sndbuf=4096, packed=packed)
    dev, guest = Device(p), Guest(p)
    for i in range(chains):
        guest.post(pattern(BIG, i))
    p.pump.pump_tx()
    return p, dev, guest


def _read_up_to(p: ZcPort, dev: Device, guest: Guest, got: bytearray, position: int) -> None:
    """The peer reads until it has ``position`` bytes of the stream; the device pumps after
    each read."""
    for _ in range(1000):
        if len(got) >= position:
            return
        got += p.host_read(position - len(got))
        dev.pump()
        guest.reclaim(len(got))
    raise AssertionError((len(got), position))


def test_a_stopped_transmitq_never_hands_back_pages_the_socket_still_refers_to():
    """The reproducer (it failed: the stop returned all four chains, the guest zeroed them,
    and the peer read zeros)."""
    p = ZcPort(sndbuf=4096)
    try:
        data = p.fill_socket()  # four chains of len(data) // 4 bytes, one buffer each
        buffers = {head: out.buffers for head, out in p.txd._outstanding.items()}
        p.pump.pump_tx()
        assert p.pump.deferred == 4 and p.pump.bytes_by_reference > 0
        p.pump.tx = None  # the queue stops; the peer stays
        unsent = p.pump.take_unsent()
        for head in p.reclaim():  # the guest reuses what it got back
            for gpa in buffers[head]:
                p.ram.memory.write(gpa, bytes(len(data) // 4))
        got = p.host_read() + unsent
        assert got == data[: len(got)], "the peer read bytes the guest wrote after the stop"
    finally:
        p.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_stop_and_continue_returns_every_chain_once_in_order_after_its_bytes_are_read(packed):
    """The peer reads nothing before the stop and everything only after the ring went on;
    more chains follow the stop. Every chain comes back exactly once, in order, only once
    the peer has read all its bytes (the carry, written outside the C path, counted in),
    and the peer reads the stream exactly, although the guest scribbles over every buffer
    the moment it comes back."""
    p, dev, guest = _sent(4, packed=packed)
    try:
        assert p.pump.deferred == 4
        base = dev.stop(guest)
        assert dev.carry, "the pipe held bytes at the stop (the test needs a carry)"
        assert guest.reclaim(0) == [] and p.pump.deferred == 4
        assert p.calls() == 0
        vq = dev.ring_going_on(base)
        assert vq.in_flight == 4  # they count in flight in the ring going on
        assert guest.reclaim(0) == []
        guest.post(pattern(BIG, 8))  # after the carry in the stream
        guest.post(pattern(100, 9))  # a small one, copied behind waiting ones
        got = bytearray()
        _read_to_the_end(p, dev, guest, got)
        assert bytes(got) == bytes(guest.stream)
        assert guest.back == sorted(guest.ends)  # each once, in the order posted
        assert p.pump.deferred == 0 and vq.in_flight == 0
        assert p.calls() > 0
    finally:
        p.close()


def test_chains_whose_referenced_bytes_the_peer_has_read_go_back_at_the_stop():
    """The peer has read all the socket holds (no pump call noticed): at the stop no page
    of any chain is referenced any more (what the pipe held is a copy now), so all go back
    at once, in order; the stream continues from the carry."""
    p, dev, guest = _sent(4)
    try:
        got = bytearray(p.host_read())
        assert BIG <= len(got) < 2 * BIG and guest.reclaim(len(got)) == []
        base = dev.stop(guest)
        assert guest.reclaim(len(got)) == [0, 1, 2, 3] and p.pump.deferred == 0
        assert p.calls() == 1
        vq = dev.ring_going_on(base)
        assert vq.in_flight == 0
        _read_to_the_end(p, dev, guest, got)
        assert bytes(got) == bytes(guest.stream) and guest.back == [0, 1, 2, 3]
    finally:
        p.close()


def test_a_partly_sent_chain_stays_in_flight_too():
    """A chain larger than the pipe is pending at the stop, its first bytes in the socket by
    reference: it stays in flight (its unsent rest joins the carry) and comes back only once
    the peer has read all of it."""
    p = ZcPort(sndbuf=4096)
    dev, guest = Device(p), Guest(p)
    try:
        pipe_bytes = fcntl.fcntl(p.pump._zc.pipe_w, fcntl.F_GETPIPE_SZ)
        guest.post(pattern(pipe_bytes + 3 * BIG, 4))
        p.pump.pump_tx()
        assert p.tx.pending is not None and p.pump.bytes_by_reference > 0
        base = dev.stop(guest)
        assert guest.reclaim(0) == [] and p.pump.deferred == 1
        assert p.tx.pending is None  # not the device's to salvage
        dev.ring_going_on(base)
        got = bytearray()
        _read_to_the_end(p, dev, guest, got)
        assert bytes(got) == bytes(guest.stream) and guest.back == [0]
    finally:
        p.close()


def _reset_ring(p: ZcPort, packed: bool) -> tuple:
    """The driver sets the queue up again after a device reset: new ring areas (from the
    top half of RAM, untouched so far), index 0."""
    txd = make_driver(p.ram.memory, 16, packed=packed,
                      allocator=Allocator(p.ram.memory, RAM // 2, RAM), index=1)
    vq = txd.attach(Virtqueue, p.tx.memory)
    vq.call_fd = p.call
    return txd, vq


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_reset_ring_never_gets_the_kept_heads_and_works(packed):
    p = ZcPort(sndbuf=4096, packed=packed)
    dev = Device(p)
    try:
        data = p.fill_socket()
        p.pump.pump_tx()
        dev.stop()
        assert p.pump.deferred == 4
        txd, vq = _reset_ring(p, packed)
        p.pump.tx = vq
        assert p.pump.deferred == 0 and vq.in_flight == 0
        assert txd.get_bufs() == [] and vq.used_idx == 0  # no stale head pushed
        old = p.host_read() + bytes(dev.carry)  # the peer gets the old stream's rest
        dev.carry.clear()
        assert old == data
        more = pattern(BIG, 6)
        head = txd.add_buf(out=[more])
        assert p.pump.pump_tx() & PumpFlag.TX_DEFERRED
        assert txd.get_bufs() == []
        assert p.host_read() == more
        assert not p.pump.pump_tx() & PumpFlag.TX_DEFERRED
        assert [u.id for u in txd.get_bufs()] == [head]
    finally:
        p.close()


def test_a_device_reset_forgets_the_kept_chains_even_for_the_same_ring():
    """virtio 1.2 §2.4: after a reset the driver gave the buffers up; the next ring (here at
    the same place and index: what a reset could look like) never gets their heads."""
    p = ZcPort(sndbuf=4096)
    dev = Device(p)
    try:
        p.fill_socket()
        p.pump.pump_tx()
        base = dev.stop()
        p.pump.forget_stopped()  # the console device's reset()
        assert p.pump.deferred == 0
        vq = dev.ring_going_on(base)
        assert p.reclaim() == [] and vq.in_flight == 0
    finally:
        p.close()


@pytest.mark.parametrize("then", ["continue", "reset"])
def test_a_new_peer_while_stopped_frees_the_kept_chains(then):
    """The host peer changes while the queue is stopped: the old socket's references no
    longer matter, so the kept chains go back at once when the ring goes on (the new peer
    has read nothing), or are forgotten by a reset ring; the new peer gets what comes next
    and its chains wait for its own reads."""
    p = ZcPort(sndbuf=4096)
    dev = Device(p)
    other, peer = socket.socketpair()
    try:
        other.setblocking(False)
        peer.setblocking(False)
        p.fill_socket()
        p.pump.pump_tx()
        base = dev.stop()
        assert p.pump.deferred == 4
        p.pump.write_fd = other.fileno()  # the old peer left, a new one came
        dev.carry.clear()  # (bytes on their way to the old peer)
        assert p.pump.deferred == 4 and p.reclaim() == []  # still nothing to return them to
        if then == "continue":
            dev.ring_going_on(base)
            assert p.reclaim() == [0, 1, 2, 3] and p.pump.deferred == 0
            txd = p.txd
        else:
            txd, vq = _reset_ring(p, False)
            p.pump.tx = vq
            assert txd.get_bufs() == [] and p.pump.deferred == 0
        more = pattern(BIG, 7)
        head = txd.add_buf(out=[more])
        assert p.pump.pump_tx() & PumpFlag.TX_DEFERRED
        assert [u.id for u in txd.get_bufs()] == []  # waits for the new peer's read
        got = b""
        for _ in range(100):
            try:
                got += peer.recv(1 << 20)
            except BlockingIOError:
                pass
            if len(got) == len(more):
                break
        assert got == more
        assert not p.pump.pump_tx() & PumpFlag.TX_DEFERRED
        assert [u.id for u in txd.get_bufs()] == [head]
        p.pump.write_fd = p.dev.fileno()  # before `other` closes
    finally:
        other.close()
        peer.close()
        p.close()


def test_carry_written_outside_the_c_path_never_releases_a_chain_early():
    """SIOCOUTQ counts every unread byte, the carry's too: a chain posted after the restart
    (its position in the C stream ignores the carry ahead of it) comes back only once the
    peer has read past its real end (``Guest.reclaim`` checks each), and never stays out
    once the peer has read everything. The peer stops one byte short of each chain's end
    (the device pumps: nothing may come back), then reads on."""
    p, dev, guest = _sent(3)
    try:
        base = dev.stop(guest)
        carry = len(dev.carry)
        assert carry > 0
        dev.ring_going_on(base)
        late = guest.post(pattern(2 * BIG, 5))
        got = bytearray()
        for head in sorted(guest.ends):
            _read_up_to(p, dev, guest, got, guest.ends[head] - 1)
            for _ in range(3):
                dev.pump()
            assert head not in guest.reclaim(len(got)) + guest.back
        _read_to_the_end(p, dev, guest, got)
        assert late == 3 and bytes(got) == bytes(guest.stream)
        assert guest.back == [0, 1, 2, 3]
    finally:
        p.close()
