"""The stream pump (ring.pump / ring.cpump): one console-port event in one call, over real
socketpairs and eventfds, for both ring implementations; and the two pumps against each
other on the same event sequences.

Spec: virtio 1.2 §5.3.6 (console port data), §2.7.7 (used buffer notification).
"""

from __future__ import annotations

import os
import random
import socket

import pytest

from ring.pump import PumpFlag, StreamPump, stream_pump_for
from ring.errors import ChainError
from tests.support import RING_IMPLS, ring_impl_class
from tests.support.driver import Allocator, bytearray_memory, make_driver
from tests.support.host_socket import host_socket_pair, read_available

RAM = 1 << 22


@pytest.fixture(params=RING_IMPLS)
def vq_cls(request):
    return ring_impl_class(request.param)


class Port:
    """A guest (tx + rx driver over one memory), the device's pump, a host socket peer and
    the two call eventfds."""

    def __init__(self, vq_cls, *, packed=False, size=16, event_idx=False, sndbuf=None):
        self.mem = bytearray_memory((0, RAM))
        self.txd = make_driver(self.mem, size, packed=packed, event_idx=event_idx,
                               allocator=Allocator(self.mem, 0, RAM // 2), index=1)
        self.rxd = make_driver(self.mem, size, packed=packed, event_idx=event_idx,
                               allocator=Allocator(self.mem, RAM // 2, RAM), index=0)
        self.tx, self.rx = self.txd.attach(vq_cls), self.rxd.attach(vq_cls)
        self.tx_call = os.eventfd(0, os.EFD_NONBLOCK)
        self.rx_call = os.eventfd(0, os.EFD_NONBLOCK)
        self.tx.call_fd, self.rx.call_fd = self.tx_call, self.rx_call
        self.dev, self.host = host_socket_pair(sndbuf)
        self.pump = stream_pump_for(self.tx)
        self.pump.tx, self.pump.rx = self.tx, self.rx
        self.pump.write_fd = self.pump.read_fd = self.dev.fileno()

    def calls(self) -> tuple[int, int]:
        out = []
        for fd in (self.tx_call, self.rx_call):
            try:
                out.append(int.from_bytes(os.read(fd, 8), "little"))
            except BlockingIOError:
                out.append(0)
        return tuple(out)

    def host_read(self) -> bytes:
        return read_available(self.host)

    def guest_received(self) -> bytes:
        return b"".join(u.data for u in self.rxd.get_bufs())

    def close(self) -> None:
        for fd in (self.tx_call, self.rx_call):
            os.close(fd)
        self.dev.close()
        self.host.close()


@pytest.fixture
def port(vq_cls):
    p = Port(vq_cls)
    yield p
    p.close()


def test_the_pump_matches_the_ring_implementation(vq_cls):
    p = Port(vq_cls)
    try:
        expected = "ring.cpump" if "cring" in vq_cls.__module__ else "ring.pump"
        assert type(p.pump).__module__ == expected
    finally:
        p.close()


def test_tx_moves_the_chains_and_calls_the_guest(port):
    port.txd.add_buf(out=[b"hello ", b"world"])
    port.txd.add_buf(out=[b"!"])
    assert port.pump.pump_tx() == 0
    assert port.host_read() == b"hello world!"
    assert port.calls() == (1, 0)
    assert [u.len_ for u in port.txd.get_bufs()] == [0, 0]
    assert port.pump.bytes_from_guest == 12
    assert not port.pump.ran_rx  # follow_rx_max is 0 by default


def test_a_small_write_reads_the_answer_already_there(port):
    port.pump.follow_rx_max = 4096
    port.rxd.add_buf(in_sizes=[4096])
    port.host.sendall(b"pong")  # the host answered before the device looked
    port.txd.add_buf(out=[b"ping"])
    assert port.pump.pump_tx() == 0
    assert port.pump.ran_rx
    assert port.host_read() == b"ping"
    assert port.guest_received() == b"pong"
    assert port.calls() == (1, 1)
    assert (port.pump.bytes_from_guest, port.pump.bytes_to_guest) == (4, 4)


def test_follow_rx_max_is_inclusive(port):
    port.pump.follow_rx_max = 4
    port.rxd.add_buf(in_sizes=[64])
    port.host.sendall(b"ok")
    port.txd.add_buf(out=[b"1234"])
    assert port.pump.pump_tx() == 0
    assert port.pump.ran_rx and port.guest_received() == b"ok"


def test_a_large_write_does_not_read(port):
    port.pump.follow_rx_max = 4
    port.rxd.add_buf(in_sizes=[64])
    port.host.sendall(b"answer")
    port.txd.add_buf(out=[b"12345"])
    assert port.pump.pump_tx() == 0
    assert not port.pump.ran_rx
    assert port.guest_received() == b""
    assert port.pump.pump_rx() == 0
    assert port.guest_received() == b"answer"


def test_no_host_peer_leaves_the_bytes_in_the_ring(port):
    port.pump.write_fd = -1
    port.txd.add_buf(out=[b"wait for me"])
    assert port.pump.pump_tx() == 0
    assert port.calls() == (0, 0)
    assert port.txd.get_bufs() == []
    port.pump.write_fd = port.dev.fileno()
    assert port.pump.pump_tx() == 0
    assert port.host_read() == b"wait for me"


def test_no_live_queue_does_nothing(port):
    port.txd.add_buf(out=[b"x"])
    port.host.sendall(b"y")
    port.rxd.add_buf(in_sizes=[8])
    port.pump.tx = port.pump.rx = None
    assert port.pump.pump_tx() == 0 and port.pump.pump_rx() == 0
    assert port.host_read() == b"" and port.calls() == (0, 0)


def test_a_full_socket_blocks_and_resumes_without_loss(vq_cls):
    p = Port(vq_cls, sndbuf=4096)
    try:
        payload = [os.urandom(50_000), os.urandom(30_000)]
        for data in payload:
            p.txd.add_buf(out=[data])
        assert p.pump.pump_tx() & PumpFlag.TX_BLOCKED
        received = p.host_read()
        for _ in range(200):
            flags = p.pump.pump_tx()
            received += p.host_read()
            if not flags:
                break
            assert flags == PumpFlag.TX_BLOCKED
        assert received == b"".join(payload)
        assert p.pump.bytes_from_guest == 80_000
    finally:
        p.close()


def test_the_budget_asks_to_come_back(port):
    port.pump.tx_budget = 1000
    port.txd.add_buf(out=[bytes(600)])
    port.txd.add_buf(out=[bytes(600)])
    assert port.pump.pump_tx() == PumpFlag.TX_MORE
    assert port.pump.pump_tx() == 0
    assert len(port.host_read()) == 1200


def test_host_eof_and_starvation(port):
    port.host.sendall(b"data")
    assert port.pump.pump_rx() == PumpFlag.RX_STARVED  # no guest buffers posted
    port.rxd.add_buf(in_sizes=[16])
    port.rxd.add_buf(in_sizes=[16])
    assert port.pump.pump_rx() == 0
    port.host.shutdown(socket.SHUT_WR)
    assert port.pump.pump_rx() == PumpFlag.RX_EOF
    assert port.guest_received() == b"data"


def test_a_write_error_is_reported(port):
    port.host.close()
    port.txd.add_buf(out=[b"lost peer"])
    flags = port.pump.pump_tx()
    assert flags & PumpFlag.TX_ERROR
    assert port.pump.tx_result.error in (32, 104)  # EPIPE, ECONNRESET


def test_a_hostile_chain_breaks_only_its_queue(vq_cls):
    p = Port(vq_cls)
    try:
        p.txd.add_buf(out=[b"ok"])
        p.txd.write_avail_slot(1, 99)  # a head beyond the table
        p.txd.write_avail_idx(2)
        flags = p.pump.pump_tx()
        assert flags & PumpFlag.TX_BROKEN
        assert p.pump.tx_result.broken is ChainError.HEAD_RANGE
        assert p.host_read() == b"ok"
        p.host.sendall(b"still fine")
        p.rxd.add_buf(in_sizes=[64])
        assert p.pump.pump_rx() == 0
        assert p.guest_received() == b"still fine"
    finally:
        p.close()


def test_a_bad_call_fd_is_reported_not_raised(port):
    r, w = os.pipe()
    try:
        port.tx.call_fd = r  # writing a pipe's read end fails with EBADF
        port.txd.add_buf(out=[b"x"])
        flags = port.pump.pump_tx()
        assert flags == PumpFlag.CALL_ERROR
        assert port.pump.call_errno == 9
        assert port.host_read() == b"x"
    finally:
        os.close(r)
        os.close(w)


def test_the_pump_follows_guest_memory_changes(vq_cls):
    """A region added after the pump took the queues is usable at the next call (the C pump
    rebuilds the rings' region tables when the memory generation moved)."""
    p = Port(vq_cls)
    try:
        from ring.memory import Region
        extra = 0x10_000_000
        p.mem.add(Region(extra, 4096, 0x7000_0000_0000, 0, bytearray(4096)))
        p.mem.write(extra, b"from the new region")
        p.txd.add_buf(out=[b"old, "])
        p.txd.write_desc(15, extra, 19, 0, 0)  # a chain whose buffer is in the new region
        p.txd.expose(15)
        assert p.pump.pump_tx() == 0
        assert p.host_read() == b"old, from the new region"
    finally:
        p.close()


def _script(seed: int):
    rnd = random.Random(seed)
    steps = []
    for _ in range(40):
        kind = rnd.choice(["tx", "tx", "rx", "host", "post", "budget", "drain"])
        if kind == "tx":
            steps.append(("tx", [rnd.randbytes(rnd.choice([1, 64, 3000, 20_000]))
                                 for _ in range(rnd.randint(1, 4))]))
        elif kind == "host":
            steps.append(("host", rnd.randbytes(rnd.choice([1, 100, 5000, 40_000]))))
        elif kind == "post":
            steps.append(("post", [rnd.choice([16, 512, 4096]) for _ in range(rnd.randint(1, 6))]))
        elif kind == "budget":
            steps.append(("budget", rnd.choice([100, 4096, 1 << 20]), rnd.choice([0, 64, 4096])))
        else:
            steps.append((kind,))
    return steps


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_c_and_python_pumps_agree(seed, packed):
    """The same event script on both implementations: same flags, totals, results, bytes on
    the wire and in the guest, and calls."""
    ports = [Port(ring_impl_class(impl), packed=packed, event_idx=bool(seed % 2),
                  sndbuf=8192) for impl in RING_IMPLS]
    try:
        assert type(ports[0].pump) is not type(ports[1].pump)
        assert any(isinstance(p.pump, StreamPump) for p in ports)
        log = [[] for _ in ports]
        for step in _script(seed):
            for p, out in zip(ports, log):
                if step[0] == "tx":
                    try:
                        p.txd.add_buf(out=step[1])
                    except MemoryError:  # the ring is full: the pump must empty it
                        pass
                    p.txd.kick_prepare()
                    out.append(("tx", p.pump.pump_tx(), p.pump.ran_rx, p.pump.tx_result))
                elif step[0] == "rx":
                    out.append(("rx", p.pump.pump_rx(), p.pump.rx_result))
                elif step[0] == "host":
                    try:
                        p.host.send(step[1])
                    except BlockingIOError:
                        pass
                elif step[0] == "post":
                    for size in step[1]:
                        try:
                            p.rxd.add_buf(in_sizes=[size])
                        except MemoryError:
                            break
                    p.rxd.kick_prepare()
                elif step[0] == "budget":
                    p.pump.tx_budget = p.pump.rx_budget = step[1]
                    p.pump.follow_rx_max = step[2]
                else:
                    out.append(("drain", p.host_read(), p.guest_received(), p.calls()))
        for p, out in zip(ports, log):
            out.append(("end", p.pump.bytes_from_guest, p.pump.bytes_to_guest, p.host_read(),
                        p.guest_received()))
        assert log[0] == log[1]
        assert any(entry[0] == "tx" and entry[3].bytes for entry in log[0])
        assert log[0][-1][2], "the script moved host bytes into the guest"
    finally:
        for p in ports:
            p.close()


def test_pump_tx_drains_the_kick_eventfd(port):
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        os.write(kick, (3).to_bytes(8, "little"))
        port.txd.add_buf(out=[b"kicked"])
        assert port.pump.pump_tx(kick) == 0
        assert port.host_read() == b"kicked"
        with pytest.raises(BlockingIOError):
            os.read(kick, 8)  # drained
        assert port.pump.pump_tx(kick) == 0  # nothing to drain: EAGAIN is not an error
    finally:
        os.close(kick)


def test_a_bad_kick_fd_is_reported_and_the_ring_still_served(port):
    r, w = os.pipe()
    try:
        port.txd.add_buf(out=[b"served"])
        flags = port.pump.pump_tx(w)  # reading a pipe's write end fails with EBADF
        assert flags == PumpFlag.KICK_ERROR and port.pump.kick_errno == 9
        assert port.host_read() == b"served"
    finally:
        os.close(r)
        os.close(w)


def test_pump_flags_are_the_c_constants():
    """ring.pump.PumpFlag and csrc/vring.h VR_PUMP_* are one set of numbers (the C pump's
    return value is read as PumpFlag)."""
    from ring.cring import lib  # an ImportError fails the test: the C module is required
    for flag in PumpFlag:
        assert getattr(lib, f"VR_PUMP_{flag.name}") == flag.value
