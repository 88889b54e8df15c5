"""Batched data path: tx_to_fd (writev, partial writes, backpressure) and rx_from_fd (readv,
EOF, starvation), over real socketpairs.

Spec: virtio 1.2 §2.7.13 / §2.8.21 (device side), §5.3.6 (console data flow).
"""

from __future__ import annotations

import os
import socket

import pytest

from ring.errors import ChainError
from ring.memory import DirtyLog
from tests.support import RING_IMPLS, ring_impl_class
from tests.support.driver import make_driver, bytearray_memory


@pytest.fixture(params=RING_IMPLS)
def vq_cls(request):
    return ring_impl_class(request.param)


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request):
    return request.param


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def setup(vq_cls, packed, size=16):
    mem = bytearray_memory((0, 1 << 22))
    drv = make_driver(mem, size, packed=packed)
    return mem, drv, drv.attach(vq_cls)


def drain(sock) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def test_tx_writes_all_chains_in_order(vq_cls, packed, pair):
    a, b = pair
    _, drv, vq = setup(vq_cls, packed)
    drv.add_buf(out=[b"hello ", b"world"])
    drv.add_buf(out=[b"!"], in_sizes=[4])  # writable part ignored
    res = vq.tx_to_fd(a.fileno())
    assert (res.bytes, res.chains, res.blocked, res.error) == (12, 2, False, None)
    assert res.notify
    assert drain(b) == b"hello world!"
    assert [u.len_ for u in drv.get_bufs()] == [0, 0]
    assert vq.in_flight == 0 and vq.pending is None


def test_tx_partial_write_resumes_and_pushes_only_after_bytes_left(vq_cls, packed, pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    _, drv, vq = setup(vq_cls, packed)
    payload = [os.urandom(100_000), os.urandom(50_000), os.urandom(7)]
    for p in payload:
        drv.add_buf(out=[p[:1000], p[1000:]])
    received = bytearray()
    completed = 0
    for _ in range(1000):
        res = vq.tx_to_fd(a.fileno())
        completed += res.chains
        reaped = drv.get_bufs()
        assert len(reaped) == res.chains
        received += drain(b)
        # a chain is used only once every one of its bytes is in the socket
        assert len(received) >= sum(len(p) for p in payload[:completed])
        if completed == 3:
            break
        assert res.blocked and vq.pending is not None
        assert len(received) < sum(len(p) for p in payload[:completed + 1])
    received += drain(b)
    assert bytes(received) == b"".join(payload)
    assert vq.pending is None and vq.in_flight == 0


def test_tx_pending_is_part_of_state(vq_cls, pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    mem, drv, vq = setup(vq_cls, False)
    drv.add_buf(out=[os.urandom(200_000)])
    res = vq.tx_to_fd(a.fileno())
    assert res.blocked and res.chains == 0 and vq.pending is not None
    head, offset = vq.pending.head, vq.pending.offset
    assert offset == res.bytes > 0
    state = vq.state()
    assert state["pending"]["head"] == head and state["pending"]["offset"] == offset
    other = vq_cls(mem, 16, packed=False, event_idx=False)
    other.configure(*drv.ring_addresses)
    other.load_state(state)
    got = bytearray(drain(b))
    while other.pending is not None:
        other.tx_to_fd(a.fileno())
        got += drain(b)
    assert len(got) == 200_000 and drv.get_buf().id == head


def test_tx_max_bytes_limits_and_keeps_partial(vq_cls, packed, pair):
    a, b = pair
    _, drv, vq = setup(vq_cls, packed)
    drv.add_buf(out=[b"0123456789"])
    drv.add_buf(out=[b"abcdef"])
    res = vq.tx_to_fd(a.fileno(), max_bytes=13)
    assert (res.bytes, res.chains) == (13, 1)
    assert drain(b) == b"0123456789abc"
    res = vq.tx_to_fd(a.fileno())
    assert (res.bytes, res.chains) == (3, 1) and drain(b) == b"def"


def test_tx_peer_closed_reports_error_and_pushes_nothing(vq_cls, packed, pair):
    a, b = pair
    b.close()
    _, drv, vq = setup(vq_cls, packed)
    drv.add_buf(out=[b"lost?"])
    res = vq.tx_to_fd(a.fileno())
    assert res.error is not None and res.chains == 0 and not res.notify
    assert drv.get_bufs() == [] and vq.in_flight == 0  # given back: popped again later
    assert vq.pop() is not None


def test_tx_hostile_chain_reports_broken(vq_cls, pair):
    a, b = pair
    _, drv, vq = setup(vq_cls, False)
    drv.add_buf(out=[b"good"])
    drv.write_desc(9, 0x7FFF_0000, 4, 0, 0)
    drv.expose(9)
    res = vq.tx_to_fd(a.fileno())
    assert res.broken == ChainError.ADDR and vq.broken == ChainError.ADDR
    assert drain(b) == b"good"
    assert drv.used_idx == 2
    assert sorted([drv.used_elem(0), drv.used_elem(1)]) == [(0, 0), (9, 0)]


def test_rx_fills_chains_and_gives_back_untouched(vq_cls, packed, pair):
    a, b = pair
    _, drv, vq = setup(vq_cls, packed)
    for _ in range(4):
        drv.add_buf(in_sizes=[8])
    b.sendall(b"0123456789ab")  # 12 bytes: one full chain, one partial
    res = vq.rx_from_fd(a.fileno())
    assert (res.bytes, res.chains, res.eof, res.starved) == (12, 2, False, False)
    assert res.drained and res.notify
    assert [(u.len_, u.data) for u in drv.get_bufs()] == [(8, b"01234567"), (4, b"89ab")]
    assert vq.in_flight == 0
    b.sendall(b"XY")
    res = vq.rx_from_fd(a.fileno())
    assert res.chains == 1 and drv.get_buf().data == b"XY"


def test_rx_starved_when_no_buffers(vq_cls, packed, pair):
    a, b = pair
    _, drv, vq = setup(vq_cls, packed)
    drv.add_buf(in_sizes=[4])
    b.sendall(b"123456")
    res = vq.rx_from_fd(a.fileno())
    assert (res.bytes, res.chains, res.starved) == (4, 1, True)
    assert drain(a) == b"56"  # the rest stayed in the socket


def test_rx_eof(vq_cls, packed, pair):
    a, b = pair
    _, drv, vq = setup(vq_cls, packed)
    drv.add_buf(in_sizes=[16])
    drv.add_buf(in_sizes=[16])
    b.sendall(b"bye")
    b.close()
    res = vq.rx_from_fd(a.fileno())  # a short read ends the call (no readv to see EOF)
    assert (res.bytes, res.chains, res.eof, res.drained) == (3, 1, False, True)
    res = vq.rx_from_fd(a.fileno())  # the fd stays readable: this call sees EOF
    assert (res.bytes, res.chains, res.eof, res.drained) == (0, 0, True, False)
    assert vq.pop() is not None  # the second chain was given back


def test_rx_max_bytes(vq_cls, packed, pair):
    a, b = pair
    _, drv, vq = setup(vq_cls, packed)
    drv.add_buf(in_sizes=[16])
    b.sendall(b"abcdefgh")
    res = vq.rx_from_fd(a.fileno(), max_bytes=5)
    assert (res.bytes, res.chains) == (5, 1)
    assert drv.get_buf().data == b"abcde"


def test_rx_data_marks_dirty_log(vq_cls, pair):
    a, b = pair
    mem, drv, vq = setup(vq_cls, False)
    drv.add_buf(in_sizes=[0x3000])
    mem.log = DirtyLog(bytearray(1 << 10))
    b.sendall(b"z" * 0x1001)
    vq.rx_from_fd(a.fileno())
    pages = set(mem.log.dirty_pages())
    _, _, _ = drv.ring_addresses
    buf_page = None
    for page in pages:
        if mem.read(page << 12, 1) == b"z":
            buf_page = page
            break
    assert buf_page is not None
    assert (drv.device_gpa >> 12) in pages


