"""vsock muxer: routing, establishment, hostile packets, limits, siblings, reset.

Spec: virtio 1.2 §5.10.6 (Device Operation), §5.10.6.2 (Addressing), §5.10.6.7.
"""

import pytest

from test_vsock_support import GUEST_BUF, Harness, pkt
from virtio.vsock.conn import ConnectHost, ConnKey
from virtio.vsock.errors import DuplicateCidError, TableFullError, UnknownCidError
from virtio.vsock.muxer import MuxerConfig
from virtio.vsock.wire import Op, Type, VsockHeader


def test_guest_initiated_connects_uds_path_port_and_responds():
    h = Harness()
    key = h.open_guest_conn(src_port=1234, dst_port=52)
    assert h.connects == [ConnectHost(key, "/run/vm3.vsock_52", Type.STREAM)]
    assert key == ConnKey(3, 52, 1234) and h.socks[key].read
    (row,) = h.mux.connections()
    assert (row.cid, row.local_port, row.peer_port, row.state, row.initiator) == (
        3, 52, 1234, "established", "guest")


def test_guest_initiated_refused_gets_rst():
    h = Harness()
    h.refuse_connect = True
    h.send(pkt(Op.REQUEST, 1234, 52))
    (hdr, _), = h.rx()
    assert (hdr.op, hdr.src_port, hdr.dst_port, hdr.dst_cid) == (Op.RST, 52, 1234, 3)
    assert h.mux.connection_count == 0


def test_host_initiated_establishment_and_leftover_first():
    h = Harness()
    key, actions = h.mux.host_connect_request(3, 5000, h.now, leftover=b"early")
    h.socks[key] = h.socks.get(key) or __import__("test_vsock_support").FakeHostSock()
    h.run(actions)
    assert key.local_port >= 1 << 30 and key.peer_port == 5000
    (req, _), = h.rx()
    assert (req.op, req.src_cid, req.dst_cid, req.dst_port) == (Op.REQUEST, 2, 3, 5000)
    h.send(pkt(Op.RESPONSE, 5000, key.local_port))
    assert h.socks[key].replies == [b"OK %d\n" % key.local_port]
    h.host_sends(key, b"-and-more")
    got = h.rx()
    assert b"".join(d for p, d in got if p.op == Op.RW) == b"early-and-more"


def test_host_initiated_guest_refuses_or_times_out():
    from test_vsock_support import FakeHostSock
    h = Harness()
    k1, a1 = h.mux.host_connect_request(3, 5000, h.now)
    k2, a2 = h.mux.host_connect_request(3, 5001, h.now)
    assert k1.local_port != k2.local_port
    h.socks[k1], h.socks[k2] = FakeHostSock(), FakeHostSock()
    h.run(a1 + a2)
    h.rx()
    h.send(pkt(Op.RST, 5000, k1.local_port))
    assert h.socks[k1].closed and h.socks[k1].replies == []
    h.advance(1.99)
    assert not h.socks[k2].closed
    h.advance(0.02)  # request timeout 2 s
    assert h.socks[k2].closed
    assert [p.op for p, _ in h.rx()] == [Op.RST]
    assert h.mux.connection_count == 0


def test_unknown_connection_gets_rst_but_rst_does_not():
    h = Harness()
    h.send(pkt(Op.RW, 7, 8, payload=b"x"))
    h.send(pkt(Op.RST, 7, 8))
    h.send(pkt(Op.SHUTDOWN, 9, 10, flags=3))
    got = h.rx()
    assert [(p.op, p.dst_port) for p, _ in got] == [(Op.RST, 7), (Op.RST, 9)]
    assert h.mux.stats(3).rst_unknown_connection == 2


@pytest.mark.parametrize("src_cid,dst_cid", [(4, 2), (3, 3), (3, 1), (3, 99), (0, 2)])
def test_wrong_cids_dropped_and_counted(src_cid, dst_cid, caplog):
    h = Harness()
    for _ in range(20):
        h.send(pkt(Op.REQUEST, src_cid=src_cid, dst_cid=dst_cid))
    assert h.rx() == [] and h.connects == []
    assert h.mux.stats(3).dropped_bad_cid == 20
    warnings = [r for r in caplog.records if "dropping" in r.getMessage()]
    assert 1 <= len(warnings) <= 5  # rate-limited


def test_unknown_op_and_type_get_rst():
    h = Harness()
    key = h.open_guest_conn()
    h.send(pkt(42, 1000, 80))  # unknown op on a live connection: it is reset
    assert [p.op for p, _ in h.rx()] == [Op.RST] and h.socks[key].closed
    h.send(pkt(Op.REQUEST, 2000, 80, type_=7))
    h.send(pkt(Op.REQUEST, 2001, 80, type_=Type.SEQPACKET))  # not negotiated
    h.send(pkt(Op.INVALID, 2002, 80))
    got = h.rx()
    assert [(p.op, p.dst_port) for p, _ in got] == [(Op.RST, 2000), (Op.RST, 2001),
                                                    (Op.RST, 2002)]
    assert h.mux.connection_count == 0


def test_short_header_and_bad_len_dropped_and_counted():
    h = Harness()
    key = h.open_guest_conn()
    h.send(b"\0" * 43)
    h.send(pkt(Op.RW, payload=b"abc", len_=4))
    h.send([pkt(Op.RW, payload=b"abc")[:20], pkt(Op.RW, payload=b"abc")[20:]])  # split header
    st = h.mux.stats(3)
    assert (st.dropped_short_header, st.dropped_bad_len) == (1, 1)
    assert h.socks[key].received == b"abc"


def test_thousand_connections_in_one_muxer():
    h = Harness()
    keys = [h.open_guest_conn(src_port=10_000 + i, dst_port=80) for i in range(1000)]
    assert h.mux.connection_count == 1000 and len(h.mux.connections(3)) == 1000
    for i, key in enumerate(keys):
        h.host_sends(key, b"%d" % i)
    got = h.rx(max_payload=4096)
    assert sorted((p.dst_port, d) for p, d in got) == sorted(
        (10_000 + i, b"%d" % i) for i in range(1000))
    for i in range(1000):
        h.send(pkt(Op.RST, 10_000 + i, 80))
    assert h.mux.connection_count == 0 and all(s.closed for s in h.socks.values())


def test_table_limit_rst_and_refusal():
    h = Harness(MuxerConfig(max_connections=2))
    h.open_guest_conn(src_port=1)
    h.open_guest_conn(src_port=2)
    h.send(pkt(Op.REQUEST, 3, 80))
    assert [p.op for p, _ in h.rx()] == [Op.RST] and h.mux.stats(3).rst_table_full == 1
    with pytest.raises(TableFullError):
        h.mux.host_connect_request(3, 5000, h.now)


def test_duplicate_and_unknown_cid():
    h = Harness()
    with pytest.raises(DuplicateCidError):
        h.mux.add_vm(3, "/x")
    with pytest.raises(UnknownCidError):
        h.mux.guest_tx(9, pkt(Op.REQUEST, src_cid=9), 0.0)
    with pytest.raises(ValueError):
        h.mux.add_vm(2, "/x")


def test_round_robin_between_connections():
    h = Harness()
    k1 = h.open_guest_conn(src_port=1)
    k2 = h.open_guest_conn(src_port=2)
    h.host_sends(k1, b"a" * 8192)
    h.host_sends(k2, b"b" * 8192)
    got = h.rx(max_payload=4096)
    assert [p.dst_port for p, _ in got if p.op == Op.RW][:4] == [1, 2, 1, 2]


def test_reset_drops_all_connections_and_closes_hosts():
    h = Harness()
    keys = [h.open_guest_conn(src_port=p) for p in (1, 2, 3)]
    h.run(h.mux.reset(3, h.now))
    assert h.mux.connection_count == 0 and all(h.socks[k].closed for k in keys)
    assert h.rx() == []


def test_siblings_forward_by_cid_and_split_to_rx_buffer():
    h = Harness(cids=(3, 4), group="g")
    h.send(pkt(Op.REQUEST, 1000, 7000, src_cid=3, dst_cid=4), cid=3)
    (req, _), = h.rx(cid=4)
    assert (req.op, req.src_cid, req.dst_cid, req.dst_port) == (Op.REQUEST, 3, 4, 7000)
    h.send(pkt(Op.RESPONSE, 7000, 1000, src_cid=4, dst_cid=3), cid=4)
    assert [p.op for p, _ in h.rx(cid=3)] == [Op.RESPONSE]
    big = bytes(range(256)) * 40  # 10240 bytes, guest RX buffers of 4096
    h.send(pkt(Op.RW, 1000, 7000, src_cid=3, dst_cid=4, payload=big), cid=3)
    got = h.rx(cid=4, max_payload=4096)
    assert [p.len_ for p, _ in got] == [4096, 4096, 2048]
    assert b"".join(d for _, d in got) == big
    (row,) = h.mux.connections()
    assert row.state == "established" and row.bytes_to_host == len(big)
    # removing one VM resets the other side
    h.run(h.mux.remove_vm(4, h.now))
    assert [(p.op, p.dst_port) for p, _ in h.rx(cid=3)] == [(Op.RST, 1000)]
    assert h.mux.connection_count == 0


def test_non_sibling_vms_cannot_talk():
    h = Harness(cids=(3, 4))  # no group
    h.send(pkt(Op.REQUEST, 1000, 7000, src_cid=3, dst_cid=4), cid=3)
    assert h.rx(cid=4) == [] and h.mux.stats(3).dropped_bad_cid == 1


def test_interest_follows_credit():
    h = Harness()
    key = h.open_guest_conn(buf_alloc=100)
    assert h.socks[key].read
    h.host_sends(key, b"x" * 100)
    assert not h.socks[key].read  # readable pending: no busy polling
    h.rx()
    assert not h.socks[key].read  # zero credit: stop polling the host socket
    h.rx_ready.clear()
    h.send(pkt(Op.CREDIT_UPDATE, buf_alloc=100, fwd_cnt=100))
    assert h.rx_ready == {3}  # credit again: scheduled to try the read it had pending
    assert h.rx() == []  # the read finds EAGAIN ...
    assert h.socks[key].read  # ... so the host socket is polled again


def _credit_update_due(h: Harness):
    """A guest connection whose host drained 3/4 of buf_alloc: a CREDIT_UPDATE is due."""
    key = h.open_guest_conn()
    h.rx()  # the RESPONSE
    conn = h.mux.connection(key)
    h.send(pkt(Op.RW, payload=b"z" * (3 * conn.buf_alloc // 4 + 1)))
    return key, conn


def test_lone_credit_update_is_what_poll_rx_sends():
    """Spec: virtio 1.2 §5.10.6.3: the TX path's shortcut sends the very CREDIT_UPDATE
    (same header, same bookkeeping) the next poll_rx would have produced."""
    h, ref = Harness(), Harness()
    key, conn = _credit_update_due(h)
    _, ref_conn = _credit_update_due(ref)
    packet = h.mux.lone_credit_update(conn)
    assert packet is not None and conn.has_rx  # nothing changed yet
    (expected, _payload), = ref.rx()
    assert VsockHeader.unpack(packet) == expected and expected.op == Op.CREDIT_UPDATE
    h.mux.credit_update_sent(conn)
    assert not conn.has_rx and conn.adv_fwd_cnt == ref_conn.adv_fwd_cnt
    assert h.mux.stats(3).rx_packets == ref.mux.stats(3).rx_packets
    assert h.mux.lone_credit_update(conn) is None  # sent: no longer due


def test_lone_credit_update_only_when_nothing_comes_first():
    """A queued control packet (RST for an unknown connection) or another connection
    scheduled comes first in poll_rx order: no shortcut."""
    h = Harness()
    key, conn = _credit_update_due(h)
    h.send(pkt(Op.RW, src_port=4242, payload=b"?"))  # unknown connection: RST queued
    assert h.mux.lone_credit_update(conn) is None
    h.rx()
    assert h.mux.lone_credit_update(conn) is None  # the RST went out, then the update
    h2 = Harness()
    other = h2.open_guest_conn(src_port=1001)
    key2, conn2 = _credit_update_due(h2)
    assert h2.mux.lone_credit_update(conn2) is not None
    h2.host_sends(other, b"data for the guest")  # the other connection is scheduled
    assert other != key2 and h2.mux.lone_credit_update(conn2) is None


@pytest.mark.parametrize("setup", ["established", "host_data", "killed", "no_conn",
                                   "local_init", "requested"])
@pytest.mark.parametrize("fields", [(GUEST_BUF, 0), (GUEST_BUF, 4096), (0, 0), (3000, 7)])
def test_guest_credit_update_fast_path_matches_guest_tx(setup, fields):
    """The device's CREDIT_UPDATE fast path (plain ints) has guest_tx's outcome: the same
    actions, connection state, packets for the guest and counters; or declines (None)
    where guest_tx answers something else (no such stream connection).
    Spec: virtio 1.2 §5.10.6.3."""
    def build():
        h = Harness()
        if setup == "local_init":
            key, _ = h.mux.host_connect_request(3, 1000, h.now)
            h.run(_)
            return h, key
        key = h.open_guest_conn()
        if setup == "host_data":
            h.host_sends(key, b"q" * 5000)
        elif setup == "killed":
            h.run(h.mux.host_error(key, h.now, 104))
        elif setup == "no_conn":
            key = ConnKey(3, 81, 1000)
        elif setup == "requested":
            h.host_sends(key, b"q" * (GUEST_BUF + 10))
            h.rx(max_payload=1 << 20)
            h.advance(1.0)  # the guest stays silent: CREDIT_REQUEST
            assert [p.op for p, _ in h.rx()] == [Op.CREDIT_REQUEST]
        return h, key

    def state(h, key):
        conn = h.mux._vms[3].conns.get(key)
        c = None if conn is None else (conn.state, conn.peer_buf_alloc, conn.peer_fwd_cnt,
                                      conn._credit_requested, conn.deadline, conn.has_rx)
        return c, h.mux.stats(3), list(h.mux._vms[3].rxq), h.rx(max_payload=1 << 20)

    ref, key = build()
    fast, _ = build()
    ba, fc = fields
    expected = ref.mux.guest_tx(3, pkt(Op.CREDIT_UPDATE, src_port=key.peer_port,
                                       dst_port=key.local_port, buf_alloc=ba, fwd_cnt=fc),
                                ref.now)
    got = fast.mux.guest_credit_update(3, key.local_port, key.peer_port, ba, fc, fast.now)
    if got is None:
        assert setup == "no_conn"
        return
    assert got == expected
    ref.run(expected)
    fast.run(got)
    assert state(fast, key) == state(ref, key)


@pytest.mark.parametrize("outcome", ["drained", "more_than_credit", "credit_used_up",
                                     "eof", "nothing"])
def test_rx_lane_matches_host_readable_then_burst(outcome):
    """The device's RX pump path (``rx_lane_conn`` + ``rx_lane_done``, no reconcile on the
    common path) leaves the state the general path leaves (``host_readable``, then the
    burst: ``rx_burst_next`` + ``rx_burst_done``): counters, interest, timers, RX
    scheduling, statistics, and the same packets for the guest afterwards.
    Spec: virtio 1.2 §5.10.6.3 (RW within the guest's credit; headers carry fwd_cnt)."""
    credit = GUEST_BUF
    sent, drained, clean = {"drained": (5000, True, True),
                            "more_than_credit": (credit, False, False),
                            "credit_used_up": (credit, True, True),
                            "eof": (3000, False, False),
                            "nothing": (0, True, True)}[outcome]

    def build():
        h = Harness()
        key = h.open_guest_conn()
        h.send(pkt(Op.RW, key.peer_port, key.local_port, payload=b"g" * 100))  # fwd_cnt
        return h, key

    def state(h, key):
        conn = h.mux._vms[3].conns[key]
        s = h.socks[key]
        return ((conn.tx_cnt, conn.bytes_to_guest, conn.adv_fwd_cnt, conn.host_readable,
                 conn.wants_read, conn.deadline, conn.has_rx, conn._pending),
                (s.read, s.write), dict(h.timers), list(h.mux._vms[3].rxq), h.mux.stats(3))

    ref, key = build()
    ref.run(ref.mux.host_readable(key, ref.now))
    nxt = ref.mux.rx_burst_next(3)
    assert nxt is not None and nxt[0] == key and nxt[2] == credit
    ref.run(ref.mux.rx_burst_done(key, sent, -(-sent // 4052), drained, ref.now))

    fast, _ = build()
    lane = fast.mux.rx_lane_conn(key)
    assert lane is not None and lane[1] == credit
    fast.run(fast.mux.rx_lane_done(lane[0], sent, -(-sent // 4052), clean, fast.now))
    assert state(fast, key) == state(ref, key)
    fast.socks[key].eof = ref.socks[key].eof = outcome == "eof"
    assert fast.rx(max_payload=1 << 20) == ref.rx(max_payload=1 << 20)
    assert state(fast, key) == state(ref, key)


def test_rx_lane_declines_when_something_else_is_owed_to_the_guest():
    """Control packets first (poll_rx order), no credit, data already queued: the general
    path. Spec: virtio 1.2 §5.10.6.3."""
    h = Harness()
    key = h.open_guest_conn()
    assert h.mux.rx_lane_conn(key) is not None
    h.send(pkt(Op.CREDIT_REQUEST, key.peer_port, key.local_port))  # owes a CREDIT_UPDATE
    assert h.mux.rx_lane_conn(key) is None
    h.rx()
    assert h.mux.rx_lane_conn(key) is not None
    h.send(pkt(Op.CREDIT_UPDATE, key.peer_port, key.local_port, buf_alloc=0))
    assert h.mux.rx_lane_conn(key) is None  # no credit
    h.send(pkt(Op.CREDIT_UPDATE, key.peer_port, key.local_port))
    h.host_sends(key, b"x")  # known readable: the general path reads it
    assert h.mux.rx_lane_conn(key) is None


@pytest.mark.parametrize("outcome", ["drained", "credit_used_up", "eof", "nothing"])
def test_credit_reopens_rx_matches_credit_update_then_burst(outcome):
    """A guest CREDIT_UPDATE re-opening credit while the host socket is known readable
    goes straight to the RX pump (``credit_reopens_rx`` + ``credit_reopen_done``, one
    reconcile) and leaves the state the general path leaves (``guest_credit_update``, then
    ``rx_burst_next`` + ``rx_burst_done``): counters, interest, timers, RX scheduling,
    statistics, and the same packets for the guest afterwards.
    Spec: virtio 1.2 §5.10.6.3 (a CREDIT_UPDATE re-opens the window)."""
    credit = GUEST_BUF
    sent, drained, clean = {"drained": (5000, True, True),
                            "credit_used_up": (credit, False, False),
                            "eof": (3000, False, False),
                            "nothing": (0, True, True)}[outcome]

    def build():
        h = Harness()
        key = h.open_guest_conn()
        h.host_sends(key, b"q" * (GUEST_BUF + 10))
        h.rx(max_payload=1 << 20)  # the guest's credit used up, the socket still readable
        h.advance(0.001)  # a CREDIT_REQUEST timer armed, not yet due
        conn = h.mux._vms[3].conns[key]
        assert conn.host_readable and conn.peer_free == 0 and conn.deadline is not None
        return h, key

    def state(h, key):
        conn = h.mux._vms[3].conns[key]
        s = h.socks[key]
        return ((conn.tx_cnt, conn.bytes_to_guest, conn.adv_fwd_cnt, conn.host_readable,
                 conn.peer_buf_alloc, conn.peer_fwd_cnt, conn._credit_requested,
                 conn.wants_read, conn.deadline, conn.has_rx, conn._pending),
                (s.read, s.write), dict(h.timers), list(h.mux._vms[3].rxq), h.mux.stats(3))

    ref, key = build()
    fwd = ref.mux._vms[3].conns[key].tx_cnt  # the guest read everything
    ref.run(ref.mux.guest_credit_update(3, key.local_port, key.peer_port, GUEST_BUF, fwd,
                                        ref.now))
    nxt = ref.mux.rx_burst_next(3)
    assert nxt is not None and nxt[0] == key and nxt[2] == credit
    ref.run(ref.mux.rx_burst_done(key, sent, -(-sent // 4052), drained, ref.now))

    fast, _ = build()
    snap = fast.mux.snapshot(fast.mux._vms[3].conns[key])
    lane = fast.mux.credit_reopens_rx(3, key.local_port, key.peer_port, GUEST_BUF, fwd,
                                      fast.now)
    assert lane is not None and lane[1] == credit
    assert lane[2] == snap  # the state before, derived from the conditions
    fast.run(fast.mux.credit_reopen_done(lane[0], sent, -(-sent // 4052), clean, fast.now,
                                         lane[2]))
    assert state(fast, key) == state(ref, key)
    fast.socks[key].eof = ref.socks[key].eof = outcome == "eof"
    assert fast.rx(max_payload=1 << 20) == ref.rx(max_payload=1 << 20)
    assert state(fast, key) == state(ref, key)


def test_credit_reopens_rx_declines_and_changes_nothing():
    """No credit re-opened, something else owed to the guest, socket not known readable:
    None and nothing changed (the general path answers). Spec: virtio 1.2 §5.10.6.3."""
    h = Harness()
    key = h.open_guest_conn()
    conn = h.mux._vms[3].conns[key]
    assert h.mux.credit_reopens_rx(3, key.local_port, key.peer_port, GUEST_BUF, 0,
                                   h.now) is None  # not known readable
    h.host_sends(key, b"q" * (GUEST_BUF + 10))
    h.rx(max_payload=1 << 20)
    fwd = conn.tx_cnt
    snap = (conn.peer_buf_alloc, conn.peer_fwd_cnt, h.mux.stats(3))
    assert h.mux.credit_reopens_rx(3, key.local_port, key.peer_port, GUEST_BUF, 0,
                                   h.now) is None  # still no credit
    assert h.mux.credit_reopens_rx(3, key.local_port + 1, key.peer_port, GUEST_BUF, fwd,
                                   h.now) is None  # no such connection
    h.send(pkt(Op.RW, src_port=4242, payload=b"?"))  # unknown connection: RST queued
    assert h.mux.credit_reopens_rx(3, key.local_port, key.peer_port, GUEST_BUF, fwd,
                                   h.now) is None
    assert (conn.peer_buf_alloc, conn.peer_fwd_cnt) == snap[:2]
    h.rx()
    assert h.mux.credit_reopens_rx(3, key.local_port, key.peer_port, GUEST_BUF, fwd,
                                   h.now) is not None


def _conn_for_lane_run(owed_before: bool):
    """A harness with one established guest connection; ``owed_before``: a CREDIT_REQUEST
    made a CREDIT_UPDATE owed."""
    h = Harness()
    key = h.open_guest_conn()
    conn = h.mux._vms[3].conns[key]
    if owed_before:
        h.send(pkt(Op.CREDIT_REQUEST, key.peer_port, key.local_port))
    return h, key, conn


def _lane_state(h, key, conn):
    """What a TX lane run's settling may change, and the packets the guest gets next."""
    s = h.socks[key]
    return ((conn.recv_cnt, conn.fwd_cnt, conn.adv_fwd_cnt, conn._pending,
             conn.bytes_to_host, conn.wants_read, conn.wants_write, conn.deadline,
             conn.has_rx),
            (s.read, s.write), dict(h.timers), list(h.mux._vms[3].rxq), h.mux.stats(3),
            h.rx(max_payload=1 << 20))


@pytest.mark.parametrize("window", [1000, GUEST_BUF - 1000, GUEST_BUF])
@pytest.mark.parametrize("put", [True, False])
@pytest.mark.parametrize("owed_before", [False, True])
def test_settle_quiet_matches_settle(window, put, owed_before):
    """After a TX lane run without tail, write error or credit-field change, the quiet
    settle (no snapshot; a reconcile only when a CREDIT_UPDATE became owed or went out)
    leaves what the full settle leaves: actions, interest, timers, RX scheduling,
    statistics, the packets the guest gets next. ``put``: the device put the update
    straight into an RX buffer (lone_credit_update); ``owed_before``: an update was
    already owed before the run. Spec: virtio 1.2 §5.10.6.3 (credit)."""
    def lane(h, conn, settle):
        conn.rw_lane(window, window, b"", conn.peer_buf_alloc, conn.peer_fwd_cnt, False)
        if put and h.mux.lone_credit_update(conn) is not None:
            h.mux.credit_update_sent(conn)
        actions = settle()
        h.run(actions)
        return actions

    ref, key, rconn = _conn_for_lane_run(owed_before)
    before = ref.mux.snapshot(rconn)
    want = lane(ref, rconn, lambda: ref.mux.settle(rconn, before, 4, ref.now))
    fast, _, fconn = _conn_for_lane_run(owed_before)
    pending = fconn._pending
    got = lane(fast, fconn, lambda: fast.mux.settle_quiet(fconn, pending, 4, fast.now))
    assert got == want
    assert _lane_state(fast, key, fconn) == _lane_state(ref, key, rconn)


@pytest.mark.parametrize("window, owed_before", [
    (GUEST_BUF, False), (GUEST_BUF - 1000, False),  # the run made the update due
    (GUEST_BUF, True), (1000, True)])  # owed already (a CREDIT_REQUEST came first)
def test_update_sent_in_one_step_matches_rw_lane_then_credit_update_sent(window,
                                                                         owed_before):
    """When a quiet TX lane run put our CREDIT_UPDATE (due after the run, or owed before
    it), ``Connection.rw_lane_update_sent`` + ``settle_update_sent`` leave what
    ``rw_lane``, ``credit_update_sent`` and the full ``settle`` leave: actions, counters,
    interest, timers, RX scheduling, statistics, the packets the guest gets next.
    Spec: virtio 1.2 §5.10.6.3 (credit)."""
    ref, key, rconn = _conn_for_lane_run(owed_before)
    before = ref.mux.snapshot(rconn)
    rconn.rw_lane(window, window, b"", rconn.peer_buf_alloc, rconn.peer_fwd_cnt, False)
    assert ref.mux.lone_credit_update(rconn) is not None  # the lane would have put it
    ref.mux.credit_update_sent(rconn)
    want = ref.mux.settle(rconn, before, 4, ref.now)
    ref.run(want)
    fast, _, fconn = _conn_for_lane_run(owed_before)
    changed = fconn.rw_lane_update_sent(window, window)
    assert changed == owed_before
    got = fast.mux.settle_update_sent(fconn, 4, changed, fast.now)
    fast.run(got)
    assert got == want
    assert _lane_state(fast, key, fconn) == _lane_state(ref, key, rconn)


@pytest.mark.parametrize("used", [0, 1000, GUEST_BUF])
@pytest.mark.parametrize("guest_read", [True, False])
@pytest.mark.parametrize("packets", [1, 3])
@pytest.mark.parametrize("armed", [False, True])
def test_credit_only_quiet_matches_rw_lane_and_settle(used, guest_read, packets, armed):
    """A TX lane run of the guest's CREDIT_UPDATEs for a connection in the RX pump's state
    (``credit_only_quiet``: no snapshot, a reconcile only when read interest or the
    CREDIT_REQUEST timer changes) leaves what ``rw_lane`` + ``settle`` leave: actions,
    counters, interest, timers, RX scheduling, statistics, the guest's next packets.
    ``used``: credit the pump used before (all of it: read interest off, the update turns
    it back on); ``guest_read``: the update moves fwd_cnt (else the same pair again);
    ``armed``: a CREDIT_REQUEST timer left armed (the update drops it: none is wanted in
    that state, and the deadline changes).
    Spec: virtio 1.2 §5.10.6.3 (every packet carries the sender's credit)."""
    def build():
        h = Harness()
        key = h.open_guest_conn()
        conn = h.mux._vms[3].conns[key]
        lane = h.mux.rx_lane_conn(key)
        assert lane is not None
        h.run(h.mux.rx_lane_done(conn, used, -(-used // 4052), True, h.now))
        assert conn.rx_lane_state() and conn.wants_read == (used < GUEST_BUF)
        if armed:
            conn._credit_request_at = h.now + 0.005
        fwd = conn.tx_cnt if guest_read else conn.peer_fwd_cnt
        return h, key, conn, fwd

    def state(h, key, conn):
        s = h.socks[key]
        return ((conn.tx_cnt, conn.peer_buf_alloc, conn.peer_fwd_cnt, conn.recv_cnt,
                 conn.fwd_cnt, conn.adv_fwd_cnt, conn._pending, conn._credit_requested,
                 conn.wants_read, conn.wants_write, conn.deadline, conn.has_rx),
                (s.read, s.write), dict(h.timers), list(h.mux._vms[3].rxq), h.mux.stats(3))

    ref, key, rconn, fwd = build()
    changed = fwd != rconn.peer_fwd_cnt
    before = ref.mux.snapshot(rconn)
    rconn.rw_lane(0, 0, b"", GUEST_BUF, fwd, changed)
    want = ref.mux.settle(rconn, before, packets, ref.now)
    ref.run(want)

    fast, _, fconn, _ = build()
    got = fast.mux.credit_only_quiet(fconn, packets, GUEST_BUF, fwd, changed, fast.now)
    assert got == want
    fast.run(got)
    assert (got != []) == (armed or (used == GUEST_BUF and guest_read))  # interest back on
    assert _lane_state(fast, key, fconn) == _lane_state(ref, key, rconn)
    ref.host_sends(key, b"h" * 5000)
    fast.host_sends(key, b"h" * 5000)
    assert fast.rx(max_payload=1 << 20) == ref.rx(max_payload=1 << 20)
    assert _lane_state(fast, key, fconn) == _lane_state(ref, key, rconn)


def test_credit_only_quiet_declines_and_changes_nothing():
    """Something owed to the guest (a CREDIT_UPDATE it asked for), or the host socket
    known readable: None, nothing changed (the full path answers).
    Spec: virtio 1.2 §5.10.6.3."""
    h = Harness()
    key = h.open_guest_conn()
    conn = h.mux._vms[3].conns[key]
    h.send(pkt(Op.CREDIT_REQUEST, key.peer_port, key.local_port))  # owes a CREDIT_UPDATE
    snap = (conn.peer_buf_alloc, conn.peer_fwd_cnt, conn._pending, h.mux.stats(3))
    assert h.mux.credit_only_quiet(conn, 1, GUEST_BUF, 7, True, h.now) is None
    assert (conn.peer_buf_alloc, conn.peer_fwd_cnt, conn._pending, h.mux.stats(3)) == snap
    h.rx()
    h.host_sends(key, b"x" * 10)  # known readable
    assert not conn.rx_lane_state()
    snap = (conn.peer_buf_alloc, conn.peer_fwd_cnt, conn._pending, h.mux.stats(3))
    assert h.mux.credit_only_quiet(conn, 1, GUEST_BUF, 7, True, h.now) is None
    assert (conn.peer_buf_alloc, conn.peer_fwd_cnt, conn._pending, h.mux.stats(3)) == snap
    h.rx(max_payload=1 << 20)
    assert conn.rx_lane_state()
    assert h.mux.credit_only_quiet(conn, 1, GUEST_BUF, 7, True, h.now) == []
    assert conn.peer_fwd_cnt == 7


@pytest.mark.parametrize("setup", ["fresh", "update_owed", "host_data", "other_conn_rx",
                                   "rst_queued"])
def test_lone_update_possible_means_the_update_goes_next(setup):
    """``lone_update_possible`` (asked before a TX lane run with a `LaneUpdate`) is True
    only when, after a quiet run that makes a CREDIT_UPDATE due, ``lone_credit_update``
    hands out exactly that update: the lane's own put then changes nothing the general
    path would have done differently. Spec: virtio 1.2 §5.10.6.3."""
    h = Harness()
    key = h.open_guest_conn()
    conn = h.mux._vms[3].conns[key]
    expected = {"fresh": True, "update_owed": True, "host_data": False,
                "other_conn_rx": False, "rst_queued": False}[setup]
    if setup == "update_owed":
        h.send(pkt(Op.CREDIT_REQUEST, key.peer_port, key.local_port))
    elif setup == "host_data":
        h.host_sends(key, b"x" * 10)
    elif setup == "other_conn_rx":
        other = h.open_guest_conn(src_port=1001)
        h.host_sends(other, b"y" * 10)
    elif setup == "rst_queued":
        h.send(pkt(Op.RW, src_port=4242, payload=b"?"))  # unknown connection: RST queued
    assert h.mux.lone_update_possible(conn) is expected
    conn.rw_lane(GUEST_BUF, GUEST_BUF, b"", conn.peer_buf_alloc, conn.peer_fwd_cnt, False)
    assert conn.credit_update_owed  # the quiet run made one due
    packet = h.mux.lone_credit_update(conn)
    assert packet == (conn.credit_update_packet() if expected else None)
