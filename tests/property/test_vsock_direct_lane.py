"""The vsock TX direct lane (``VsockDevice._rw_group``) against the ordinary path.

The device writes a batch of guest RW packets of one connection straight to the host socket
when `Connection.direct_tx_ok` holds; otherwise ``muxer.guest_rw_batch`` produces a
``WriteHost`` that the adapter executes and reports with ``host_write_done``. Both must give
the same bytes to the host in the same order, the same credit counters, the same fd
interest, RX scheduling and the same packets to the guest, whatever the host socket accepts
(everything, part, nothing) and whatever the guest sends (credit kept or exceeded).

Spec: virtio 1.2 §5.10.6.3 (Buffer Space Management), §5.10.6.3.1 (credit: RW only within
the peer's free space).
"""

import sys
from pathlib import Path

from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))

from test_vsock_support import Harness  # noqa: E402
from virtio.vsock.device import VsockDevice  # noqa: E402

KEY_PORTS = (80, 1000)  # host port, guest port
BUF = 256 * 1024  # the muxer's default buf_alloc


class _Sock:
    """A host socket taking at most ``capacity`` bytes (then EAGAIN), recording them in
    the harness's FakeHostSock, as ``Harness.run`` does for WriteHost."""

    def __init__(self, fake) -> None:
        self.fake = fake

    def sendmsg(self, data, _anc, _flags):
        total = sum(len(b) for b in data)
        n = min(total, self.fake.capacity)
        if total and n == 0:
            raise BlockingIOError
        self.fake.capacity -= n
        self.fake.received += b"".join(bytes(b) for b in data)[:n]
        return n


class _Host:
    def __init__(self, h: Harness) -> None:
        self.h = h
        self.run = h.run

    def sock(self, key):
        fake = self.h.socks.get(key)
        return None if fake is None else _Sock(fake)


class _Device:
    """What ``VsockDevice._rw_group`` uses of its device."""

    def __init__(self, h: Harness) -> None:
        self.cid, self.muxer, self.host = 3, h.mux, _Host(h)
        self.log = h.mux._vms[3].log


def _state(h: Harness, key):
    """Everything the two paths must agree on. Fd interest is compared as the
    connection's ``wants_read``/``wants_write``, which ``VsockHost._interest`` applies
    (the harness applies SetHostInterest values literally, and the ordinary path's list
    can end with a stale one, see that method)."""
    conn = h.mux._lookup(key)
    s = h.socks[key]
    c = None if conn is None else (
        conn.state, conn.recv_cnt, conn.fwd_cnt, conn.adv_fwd_cnt, conn.peer_buf_alloc,
        conn.peer_fwd_cnt, conn._credit_requested, conn.buffered_g2h, conn.wants_read,
        conn.wants_write, conn.has_rx, conn.deadline, conn.bytes_to_host)
    return (c, bytes(s.received), s.closed, sorted(h.rx_ready), h.mux.stats(3).tx_packets,
            list(h.mux._vms[3].rxq))


packet = st.tuples(st.sampled_from([0, 1, 100, 4096, 65536, 70000]),  # len
                   st.sampled_from([0, 1, 3]),  # flags (ignored for streams)
                   st.sampled_from([BUF, 4096, 0]),  # buf_alloc
                   st.integers(0, 3))  # fwd_cnt
step = st.one_of(
    st.tuples(st.just("batch"), st.lists(packet, min_size=1, max_size=6),
              st.sampled_from([0, 1, 5000, 65536, 1 << 30])),
    st.tuples(st.just("writable"), st.sampled_from([0, 7, 65536, 1 << 30])),
    st.tuples(st.just("rx"), st.just(0)),
    st.tuples(st.just("host_data"), st.sampled_from([1, 5000])),  # credit requests matter
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, min_size=1, max_size=12))
def test_direct_lane_matches_guest_rw_batch(steps):
    ordinary, direct = Harness(), Harness()
    key = ordinary.open_guest_conn(src_port=KEY_PORTS[1], dst_port=KEY_PORTS[0])
    assert direct.open_guest_conn(src_port=KEY_PORTS[1], dst_port=KEY_PORTS[0]) == key
    device = _Device(direct)
    sent = 0
    for kind, *args in steps:
        if kind == "batch":
            items, capacity = args
            group = []
            for n, flags, ba, fc in items:
                data = bytes((sent + i) % 251 for i in range(n))
                sent += n
                # payload split in two buffers, as a header+payload chain may give it
                group.append((n, flags, ba, fc, [memoryview(data)[:n // 2],
                                                 memoryview(data)[n // 2:]]))
            for h in (ordinary, direct):
                h.socks[key].capacity = capacity
            ordinary.run(ordinary.mux.guest_rw_batch(3, *KEY_PORTS, group, ordinary.now))
            VsockDevice._rw_group(device, KEY_PORTS, group, direct.now)
        elif kind == "writable":
            for h in (ordinary, direct):
                if not h.socks[key].closed:
                    h.writable(key, args[0])
        elif kind == "host_data":
            for h in (ordinary, direct):
                if not h.socks[key].closed:
                    h.host_sends(key, b"y" * args[0])
        else:
            assert ordinary.rx() == direct.rx()
        assert _state(ordinary, key) == _state(direct, key)
    assert ordinary.rx() == direct.rx()
    assert _state(ordinary, key) == _state(direct, key)


def test_direct_lane_is_taken_and_writes_in_order():
    """The common case really takes the lane (one sendmsg for the batch, no WriteHost)."""
    h = Harness()
    key = h.open_guest_conn(src_port=KEY_PORTS[1], dst_port=KEY_PORTS[0])
    device = _Device(h)
    calls = []
    real = _Sock.sendmsg

    def counting(self, data, anc, flags):
        calls.append(len(data))
        return real(self, data, anc, flags)

    _Sock.sendmsg = counting
    try:
        group = [(3, 0, BUF, 0, [memoryview(b"abc")]), (2, 0, BUF, 0, [memoryview(b"de")])]
        VsockDevice._rw_group(device, KEY_PORTS, group, h.now)
    finally:
        _Sock.sendmsg = real
    assert calls == [2]
    assert bytes(h.socks[key].received) == b"abcde"
    assert not any(type(a).__name__ == "WriteHost" for a in h.log)
    assert h.mux.connection(key).fwd_cnt == 5
