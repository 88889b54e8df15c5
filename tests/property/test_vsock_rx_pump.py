"""The vsock RX pump: the pure-Python reference (``virtio.vsock.rx_pump.rx_pump_py`` over
``ring.pyring``) against the C one (``vs_rx_pump``, csrc/vsock_path.c, over ``ring.cring``).

Fed the same RX chains (one buffer or a header buffer + a payload buffer, buffers too small
for a header, none) and the same host socket contents (less than the credit, more, none,
EOF), both must read the same bytes, fill the same chains with the same headers, leave
byte-identical guest memory (dirty log included) and queue state, leave the same bytes in
the socket and signal the call eventfd the same number of times. Fed hostile rings
(``tests.property.rings``), both must report the same broken state.

Spec: virtio 1.2 §5.10.6 (one packet per RX buffer, header then payload), §5.10.6.3
(RW within the guest's credit; every header carries buf_alloc/fwd_cnt), §2.7.7.
"""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.property.ringpair import RingPair, make_memory, require_pair
from tests.property.test_vsock_tx_lane import _Host
from tests.property.rings import RawRing, raw_rings, start_pair
from tests.support.driver import PackedDriver, SplitDriver, bytearray_memory
from virtio.vsock.rx_pump import CRxPump, rx_pump_py
from virtio.vsock.wire import Op, Type, VsockHeader

CID, HOST_PORT, GUEST_PORT = 3, 80, 1000
BUF_ALLOC, FWD_CNT = 262144, 12345
HDR = VsockHeader.SIZE


@pytest.fixture(scope="module")
def impls():
    return require_pair()


def _source(data: bytes, eof: bool) -> _Host:
    """A host socket pair and call eventfd (the TX lane tests' ``_Host``): the pump reads
    ``b``, which holds ``data``, then EOF if ``eof``; ``_drain()`` is what it left."""
    src = _Host("open")
    if data:
        src.a.sendall(data)
    if eof:
        src.a.shutdown(socket.SHUT_WR)
    return src


def _pump_both(pair: RingPair, data: bytes, eof: bool, credits: list[int]) -> list:
    """Run the pump with each credit in turn on every side; assert equal outcomes,
    memories, queue states, signals and socket leftovers. The reference's results."""
    pumps = {"py": rx_pump_py, "c": CRxPump()}
    sources = {side.name: _source(data, eof) for side in pair.sides}
    try:
        for side in pair.sides:
            side.vq.call_fd = sources[side.name].call
        out = []
        for credit in credits:
            keys = []
            for side in pair.sides:
                src = sources[side.name]
                res = pumps[side.name](side.vq, src.b.fileno(), CID, HOST_PORT, GUEST_PORT,
                                       BUF_ALLOC, FWD_CNT, credit)
                keys.append((tuple(res), src.calls()))
            assert keys[1:] == keys[:1] * (len(keys) - 1), keys
            pair.check("rx pump")
            out.append(keys[0])
        lefts = [sources[side.name]._drain() for side in pair.sides]
        assert lefts[1:] == lefts[:1] * (len(lefts) - 1)
        return out
    finally:
        for src in sources.values():
            src.close()


@settings(max_examples=80, deadline=None)
@given(packed=st.booleans(), event_idx=st.booleans(), log=st.booleans(),
       chains=st.lists(st.sampled_from([(HDR + 4096,), (HDR, 4096), (20, 4096), (HDR,),
                                        (16,), (HDR + 100, 60)]), max_size=6),
       size=st.integers(0, 30000), eof=st.booleans(),
       credits=st.lists(st.sampled_from([0, 1, 100, 4096, 5000, 1 << 20]), min_size=1,
                        max_size=3))
def test_pump_c_matches_reference(impls, packed, event_idx, log, chains, size, eof, credits):
    mem = make_memory(log=log)
    driver = (PackedDriver if packed else SplitDriver)(mem, 16, event_idx=event_idx)
    for in_sizes in chains:
        driver.add_buf(in_sizes=list(in_sizes))
    pair = RingPair(impls, mem)
    pair.build(16, packed=packed, event_idx=event_idx)
    pair.call("configure", *driver.ring_addresses)
    data = bytes((i * 7 + 3) & 0xFF for i in range(size))
    _pump_both(pair, data, eof, credits)


@settings(max_examples=200, deadline=None)
@given(raw=raw_rings(), credit=st.sampled_from([0, 4096, 1 << 20]))
def test_pump_on_hostile_rings_matches_reference(impls, raw: RawRing, credit):
    """Hostile descriptor tables (loops, bad next, nested indirect, buffers past RAM, ...):
    the same broken report, memory and queue state; the second call on a broken queue does
    nothing on either side."""
    pair, started = start_pair(impls, raw)
    if not started:
        return
    _pump_both(pair, b"x" * 10000, False, [credit, credit])


@pytest.mark.parametrize("name", ["py", "c"])
def test_pump_fills_chains_with_rw_packets_within_credit(impls, name):
    """Spec: virtio 1.2 §5.10.6.3: the device sends no more than the guest's credit: 10,000
    host bytes, 6,000 of credit, 4 KiB buffers -> two packets (4,052 + 1,948 bytes), each
    header an RW of this connection carrying buf_alloc/fwd_cnt; the rest stays in the
    socket; one call eventfd signal."""
    pump = rx_pump_py if name == "py" else CRxPump()
    mem = bytearray_memory((0, 1 << 20))
    driver = SplitDriver(mem, 8)
    for _ in range(4):
        driver.add_buf(in_sizes=[4096])
    vq = driver.attach(impls[name])
    data = bytes(range(256)) * 40
    src = _source(data[:10000], False)
    try:
        vq.call_fd = src.call
        res = pump(vq, src.b.fileno(), CID, HOST_PORT, GUEST_PORT, BUF_ALLOC, FWD_CNT, 6000)
        assert (res.bytes, res.chains, res.notify, res.call_errno) == (6000, 2, True, None)
        assert src.calls() == 1
        used = driver.get_bufs()
        got = b""
        for u, n in zip(used, (4096 - HDR, 6000 - (4096 - HDR))):
            h = VsockHeader.unpack(u.data[:HDR])
            assert (h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (2, CID, HOST_PORT,
                                                                        GUEST_PORT)
            assert (h.op, h.type_, h.len_, h.buf_alloc, h.fwd_cnt) == (
                Op.RW, Type.STREAM, n, BUF_ALLOC, FWD_CNT)
            assert u.len_ == HDR + n
            got += u.data[HDR:HDR + n]
        assert got == data[:6000]
        assert src._drain() == data[6000:10000]
    finally:
        src.close()


@pytest.mark.parametrize("name", ["py", "c"])
def test_pump_with_no_credit_reads_nothing(impls, name):
    pump = rx_pump_py if name == "py" else CRxPump()
    mem = bytearray_memory((0, 1 << 20))
    driver = SplitDriver(mem, 8)
    driver.add_buf(in_sizes=[4096])
    vq = driver.attach(impls[name])
    src = _source(b"abc", False)
    try:
        res = pump(vq, src.b.fileno(), CID, HOST_PORT, GUEST_PORT, BUF_ALLOC, FWD_CNT, 0)
        assert (res.bytes, res.chains, res.notify) == (0, 0, False)
        assert driver.get_bufs() == [] and src._drain() == b"abc"
    finally:
        src.close()


@pytest.mark.parametrize("name", ["py", "c"])
def test_one_pump_serves_queues_in_turn(impls, name):
    """Spec: virtio 1.2 §5.10.6: one pump object over two RX queues in turn (a device
    reset makes a new queue; CRxPump binds its queue's methods once per queue): each
    call fills the chains of the queue it is given, from its own socket, within credit."""
    pump = rx_pump_py if name == "py" else CRxPump()
    queues = []
    for fill in (b"A", b"B"):
        mem = bytearray_memory((0, 1 << 20))
        driver = SplitDriver(mem, 8)
        for _ in range(4):
            driver.add_buf(in_sizes=[HDR + 1000])
        vq = driver.attach(impls[name])
        src = _source(fill * 5000, False)
        vq.call_fd = src.call
        queues.append((driver, vq, src, fill))
    try:
        for driver, vq, src, fill in queues + queues:
            res = pump(vq, src.b.fileno(), CID, HOST_PORT, GUEST_PORT, BUF_ALLOC, FWD_CNT,
                       1500)
            assert (res.bytes, res.chains, res.drained) == (1500, 2, False)
            used = driver.get_bufs()
            assert [u.len_ for u in used] == [HDR + 1000, HDR + 500]
            assert b"".join(u.data[HDR:u.len_] for u in used) == fill * 1500
    finally:
        for _driver, _vq, src, _fill in queues:
            src.close()
