"""Zero-copy transmit of the C stream pump (ring.cpump, csrc/zerocopy.c): the ways waiting
chains are returned (release_deferred, a new write fd, close; a detached queue keeps them,
test_zero_copy_stop.py), which write fds and rounds are never sent by reference, the pump's
zero-copy properties, a host peer that hangs up while chains wait, and the Python pump's
always-copy stand-ins.

Guest RAM is a shared memfd mapped twice (the guest's view and the back-end's), as real
guest RAM is: vmsplice's page references only mean something on shared pages.

Spec: virtio 1.2 §2.7.8 (a buffer goes to the used ring once the device is done with it),
§2.7.7 (used buffer notification), §5.3.6 (console transmitq buffers, used length 0).
"""

from __future__ import annotations

import os
import socket

import pytest

from ring import cpump, pyring
from ring.cring import Virtqueue
from ring.pump import PumpFlag, StreamPump as PyStreamPump, stream_pump_for
from tests.support.driver import Allocator, memfd_memory, make_driver
from tests.support.host_socket import host_socket_pair, read_available

RAM = 1 << 22
BIG = 3 * cpump.ZERO_COPY_MIN_BYTES  # one chain large enough to go by reference


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed + (i >> 8)) & 0xFF for i in range(n))


class ZcPort:
    """A guest transmitq on shared memfd RAM, the C pump with zero copy enabled writing to
    one end of a socketpair (``dev``), the host peer at the other (``host``), and the
    transmitq's call eventfd."""

    def __init__(self, *, sndbuf: int | None = None, size: int = 16, zero_copy: bool = True,
                 vq_cls=Virtqueue, packed: bool = False) -> None:
        self.ram = memfd_memory((0, RAM))
        self.txd = make_driver(self.ram.memory, size, packed=packed,
                               allocator=Allocator(self.ram.memory, 0, RAM), index=1)
        self.tx = self.txd.attach(vq_cls, self.ram.backend_memory())
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.tx.call_fd = self.call
        self.dev, self.host = host_socket_pair(sndbuf)
        self.pump = stream_pump_for(self.tx)
        self.pump.tx = self.tx
        self.pump.write_fd = self.dev.fileno()
        self.enabled = self.pump.enable_zero_copy() if zero_copy else False

    def post(self, *pieces: bytes) -> int:
        return self.txd.add_buf(out=list(pieces))

    def calls(self) -> int:
        try:
            return int.from_bytes(os.read(self.call, 8), "little")
        except BlockingIOError:
            return 0

    def host_read(self, limit: int = 1 << 30) -> bytes:
        return read_available(self.host, limit)

    def reclaim(self) -> list[int]:
        return [u.id for u in self.txd.get_bufs()]

    def fill_socket(self, total: int = 4 * BIG, chains: int = 4) -> bytes:
        """Post ``chains`` chains of ``total`` bytes that the socket cannot take at once
        (small SO_SNDBUF): the pump defers them all and the pipe keeps the rest."""
        data = pattern(total)
        step = total // chains
        for i in range(chains):
            self.post(data[i * step:(i + 1) * step])
        return data

    def close(self) -> None:
        self.pump.close()
        os.close(self.call)
        self.dev.close()
        self.host.close()
        self.ram.close()


@pytest.fixture
def port():
    p = ZcPort()
    yield p
    p.close()


@pytest.fixture
def small_port():
    p = ZcPort(sndbuf=4096)
    yield p
    p.close()


def test_zero_copy_properties_before_and_after_enabling():
    p = ZcPort(zero_copy=False)
    try:
        assert (p.pump.zero_copy, p.pump.deferred, p.pump.bytes_by_reference,
                p.pump.zero_copy_error) == (False, 0, 0, 0)
        assert p.pump.enable_zero_copy() is True
        assert p.pump.enable_zero_copy() is True  # idempotent
        assert p.pump.zero_copy is True and p.pump.zero_copy_error == 0
        p.pump.write_fd = -1
        assert p.pump.zero_copy is False  # no write fd: nothing to send by reference
    finally:
        p.close()


def test_a_large_chain_waits_for_the_peer_read_then_comes_back(port):
    """virtio 1.2 §2.7.8: the chain goes to the used ring only once the peer read it."""
    data = pattern(BIG)
    head = port.post(data[:1000], data[1000:])
    assert port.pump.pump_tx() == PumpFlag.TX_DEFERRED
    assert port.pump.deferred == 1 and port.pump.bytes_by_reference == BIG
    assert port.reclaim() == [] and port.calls() == 0
    got = port.host_read(BIG // 2)
    assert port.pump.pump_tx() == PumpFlag.TX_DEFERRED  # half read: still referenced
    assert port.reclaim() == []
    got += port.host_read()
    assert got == data
    assert port.pump.pump_tx() == 0
    assert port.reclaim() == [head] and port.calls() == 1
    assert port.pump.deferred == 0


def test_release_deferred_returns_every_chain_and_empties_the_pipe(small_port):
    p = small_port
    data = p.fill_socket()
    assert p.pump.pump_tx() & PumpFlag.TX_DEFERRED
    assert p.pump.deferred == 4
    assert p.pump.release_deferred() == 0
    assert p.pump.deferred == 0
    assert sorted(p.reclaim()) == [0, 1, 2, 3]
    assert p.calls() == 1  # the ring asked (no EVENT_IDX, no NO_INTERRUPT)
    # The socket keeps what it had taken; what the pipe still held was dropped, not sent later.
    in_socket = p.host_read()
    assert 0 < len(in_socket) < len(data) and data.startswith(in_socket)
    assert p.pump.pump_tx() == 0 and p.host_read() == b""
    # The stream goes on from the next chain, by reference again.
    more = pattern(BIG, 9)
    p.post(more)
    assert p.pump.pump_tx() & PumpFlag.TX_DEFERRED
    assert p.host_read() == more


def test_release_deferred_with_nothing_waiting_does_nothing(port):
    assert port.pump.release_deferred() == 0
    assert port.reclaim() == [] and port.calls() == 0


def test_release_deferred_respects_no_interrupt(small_port):
    """virtio 1.2 §2.7.7: no call while the driver set VRING_AVAIL_F_NO_INTERRUPT."""
    small_port.fill_socket()
    small_port.pump.pump_tx()
    small_port.txd.disable_cb()
    small_port.pump.release_deferred()
    assert len(small_port.reclaim()) == 4 and small_port.calls() == 0


def test_a_new_write_fd_releases_the_waiting_chains(small_port):
    p = small_port
    p.fill_socket()
    p.pump.pump_tx()
    assert p.pump.deferred == 4
    other, peer = socket.socketpair()
    try:
        other.setblocking(False)
        p.pump.write_fd = other.fileno()
        assert p.pump.deferred == 0 and sorted(p.reclaim()) == [0, 1, 2, 3]
        assert p.calls() == 1
        more = pattern(BIG, 5)
        p.post(more)  # the new peer gets only what comes next
        assert p.pump.pump_tx() & PumpFlag.TX_DEFERRED
        peer.setblocking(False)
        assert peer.recv(1 << 20) == more
        p.pump.write_fd = p.dev.fileno()  # before `other` closes
    finally:
        other.close()
        peer.close()


def test_the_same_write_fd_again_keeps_them(port):
    port.post(pattern(BIG))
    port.pump.pump_tx()
    port.pump.write_fd = port.dev.fileno()
    assert port.pump.deferred == 1 and port.reclaim() == []


def test_detaching_the_queue_keeps_the_chains_the_peer_has_not_read(small_port):
    """A queue stop keeps them in flight (tests/unit/test_zero_copy_stop.py: they go back
    through the same ring going on)."""
    p = small_port
    p.fill_socket()
    p.pump.pump_tx()
    p.pump.tx = None
    assert p.pump.deferred == 4 and p.reclaim() == [] and p.calls() == 0
    assert p.pump.zero_copy is False  # no queue
    p.pump.tx = p.tx
    assert p.pump.zero_copy is True


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_releases_them_and_closes_the_pipe():
    before = _open_fds()
    pump = cpump.StreamPump()
    assert pump.enable_zero_copy()
    assert _open_fds() == before + 2
    pump.close()
    assert _open_fds() == before
    pump.close()  # twice is fine
    assert pump.zero_copy is False and pump.deferred == 0

    p = ZcPort(sndbuf=4096)
    try:
        p.fill_socket()
        p.pump.pump_tx()
        fds = _open_fds()
        p.pump.close()
        assert _open_fds() == fds - 2
        assert sorted(p.reclaim()) == [0, 1, 2, 3] and p.pump.deferred == 0
        # Afterwards the pump copies: a chain completes once the socket took it all.
        p.host_read()
        assert p.pump.zero_copy is False
        more = pattern(BIG, 3)
        head = p.post(more)
        got = b""
        for _ in range(100):
            assert not p.pump.pump_tx() & PumpFlag.TX_DEFERRED
            got += p.host_read()
            if len(got) == len(more):
                break
        assert got == more and p.reclaim() == [head] and p.pump.bytes_by_reference == 0
    finally:
        p.close()


@pytest.mark.parametrize("kind", ["pipe", "file"])
def test_a_write_fd_that_is_not_a_unix_stream_socket_is_copied(kind, tmp_path):
    p = ZcPort()
    if kind == "pipe":
        r, w = os.pipe2(os.O_NONBLOCK)
    else:
        w = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
        r = os.open(tmp_path / "out", os.O_RDONLY)
    try:
        p.pump.write_fd = w
        assert p.pump.zero_copy is False
        data = pattern(BIG)
        p.post(data[:20000], data[20000:])
        assert p.pump.pump_tx() == 0
        assert p.reclaim() == [0] and p.pump.deferred == 0
        assert p.pump.bytes_by_reference == 0
        assert os.read(r, 2 * BIG) == data
        p.pump.write_fd = p.dev.fileno()
    finally:
        os.close(r)
        os.close(w)
        p.close()


def test_a_datagram_socket_is_copied():
    p = ZcPort()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        p.pump.write_fd = a.fileno()
        assert p.pump.zero_copy is False
        p.pump.write_fd = p.dev.fileno()
    finally:
        a.close()
        b.close()
        p.close()


def test_small_chains_are_copied_and_complete_at_once(port):
    """64-byte messages: rounds under ZERO_COPY_MIN_BYTES are written with writev."""
    heads = [port.post(pattern(64, i)) for i in range(8)]
    assert port.pump.pump_tx() == 0
    assert port.reclaim() == heads and port.pump.deferred == 0
    assert port.pump.bytes_by_reference == 0
    assert port.host_read() == b"".join(pattern(64, i) for i in range(8))


def test_a_large_round_of_small_pieces_is_copied():
    """Under ZERO_COPY_MIN_PIECE bytes per iovec on average: copied."""
    port = ZcPort(size=64)
    try:
        pieces = [pattern(1024, i) for i in range(cpump.ZERO_COPY_MIN_BYTES // 1024 * 2)]
        for i in range(0, len(pieces), 8):
            port.post(*pieces[i:i + 8])
        assert port.pump.pump_tx() == 0
        assert port.pump.deferred == 0 and port.pump.bytes_by_reference == 0
        assert len(port.reclaim()) == len(pieces) // 8
        assert port.host_read() == b"".join(pieces)
    finally:
        port.close()


def test_many_small_chains_adding_up_go_by_reference(port):
    """The threshold is per round: eight 4 KiB chains make one 32 KiB round."""
    chunks = [pattern(4096, i) for i in range(8)]
    for chunk in chunks:
        port.post(chunk)
    assert port.pump.pump_tx() == PumpFlag.TX_DEFERRED
    assert port.pump.deferred == 8 and port.pump.bytes_by_reference == 8 * 4096
    assert port.host_read() == b"".join(chunks)
    assert port.pump.pump_tx() == 0 and len(port.reclaim()) == 8


def test_a_peer_that_hangs_up_frees_the_chains_and_the_next_write_fails(port):
    """After the peer closes, its unread messages are freed (SIOCOUTQ 0): the next pump_tx
    returns the chains without an error; a write after that reports EPIPE."""
    data = pattern(2 * BIG)
    port.post(data[:BIG])
    port.post(data[BIG:])
    assert port.pump.pump_tx() == PumpFlag.TX_DEFERRED
    port.host.close()
    assert port.pump.pump_tx() == 0
    assert port.reclaim() == [0, 1] and port.pump.deferred == 0
    port.post(pattern(BIG))
    assert port.pump.pump_tx() & PumpFlag.TX_ERROR
    assert port.pump.tx_result.error == 32  # EPIPE
    assert port.pump.deferred == 0


def test_a_peer_that_hangs_up_with_bytes_in_the_pipe_never_hangs(small_port):
    """Chains whose bytes the pipe still holds when the peer hangs up: the next write
    attempt reports EPIPE, and release_deferred (the owner's answer to the error: a new write
    fd) returns them all."""
    p = small_port
    p.fill_socket()
    assert p.pump.pump_tx() & PumpFlag.TX_DEFERRED
    p.host.close()
    p.pump.pump_tx()
    assert p.pump.deferred > 0  # the pipe's chains end past what reached the socket
    p.post(pattern(64))
    assert p.pump.pump_tx() & PumpFlag.TX_ERROR
    p.pump.write_fd = -1
    assert p.pump.deferred == 0
    assert sorted(p.reclaim()) == [0, 1, 2, 3]


def test_the_python_pump_never_zero_copies():
    p = ZcPort(vq_cls=pyring.Virtqueue, zero_copy=False)
    try:
        assert isinstance(p.pump, PyStreamPump)
        assert p.pump.enable_zero_copy() is False
        assert (p.pump.zero_copy, p.pump.deferred, p.pump.bytes_by_reference) == (False, 0, 0)
        data = pattern(BIG)
        p.post(data)
        assert p.pump.pump_tx() == 0
        assert p.reclaim() == [0] and p.calls() == 1
        assert p.host_read() == data
        assert p.pump.release_deferred() == 0
    finally:
        p.close()
