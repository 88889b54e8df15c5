"""vsock connection: credit, flow control, shutdown, timeouts, seqpacket.

Spec: virtio 1.2 §5.10.6.3 (buffer space management), §5.10.6.5, §5.10.6.6.
"""

import pytest
from hypothesis import given, strategies as st

from test_vsock_support import GUEST_BUF, Harness, pkt
from virtio.vsock.conn import (CloseHost, ConnConfig, ConnKey, Connection, ConnState,
                               WriteHost)
from virtio.vsock.muxer import MuxerConfig
from virtio.vsock.wire import Op, SeqpacketFlag, ShutdownFlag, Type, VsockHeader

U32 = 2**32


def make_conn(*, tx_cnt=0, peer_buf_alloc=GUEST_BUF, peer_fwd_cnt=0, state=ConnState.ESTABLISHED,
              cfg=ConnConfig()):
    conn = Connection(ConnKey(3, 80, 1000), Type.STREAM, cfg, local_init=False)
    conn.state, conn.host_open = state, True
    conn.tx_cnt, conn.peer_buf_alloc, conn.peer_fwd_cnt = tx_cnt, peer_buf_alloc, peer_fwd_cnt
    return conn


# --- credit arithmetic ----------------------------------------------------------------------


@given(st.integers(0, U32 - 1), st.integers(0, GUEST_BUF), st.integers(1, 2**31))
def test_peer_free_wraps_u32(base, in_flight, buf):
    conn = make_conn(tx_cnt=(base + in_flight) % U32, peer_fwd_cnt=base, peer_buf_alloc=buf)
    assert conn.peer_free == max(0, buf - in_flight)


def test_peer_free_never_negative_when_guest_shrinks_buffer_or_fwd_runs_ahead():
    assert make_conn(tx_cnt=1000, peer_fwd_cnt=0, peer_buf_alloc=500).peer_free == 0
    assert make_conn(tx_cnt=10, peer_fwd_cnt=20, peer_buf_alloc=500).peer_free == 0


def test_spec_5_10_6_3_never_send_beyond_guest_credit():
    h = Harness()
    key = h.open_guest_conn(buf_alloc=3000)
    h.host_sends(key, b"x" * 10_000)
    got = h.rx(max_payload=4096)
    assert sum(p.len_ for p, _ in got if p.op == Op.RW) == 3000
    assert got[-1][0].op == Op.RW  # blocked on zero credit: the guest may update first
    delay = h.mux.connection(key).cfg.credit_request_delay_s
    h.advance(delay)  # it stayed silent: ask once
    assert [p.op for p, _ in h.rx()] == [Op.CREDIT_REQUEST]
    h.advance(delay)
    assert h.rx() == []  # not again until the guest says something
    # the guest consumed 3000 bytes: the rest flows, within the new credit
    h.send(pkt(Op.CREDIT_UPDATE, buf_alloc=3000, fwd_cnt=3000))
    got = h.rx(max_payload=4096)
    assert sum(p.len_ for p, _ in got if p.op == Op.RW) == 3000


def test_spec_5_10_6_3_no_credit_request_when_the_guest_updates_by_itself():
    """A Linux guest sends CREDIT_UPDATE unprompted once its application has read enough
    (free space under 64 KiB, so always at zero credit): when it does so within
    credit_request_delay_s, no CREDIT_REQUEST is ever sent and the timer is dropped."""
    h = Harness()
    key = h.open_guest_conn(buf_alloc=3000)
    conn = h.mux.connection(key)
    h.host_sends(key, b"x" * 6000)
    assert sum(p.len_ for p, _ in h.rx(max_payload=4096) if p.op == Op.RW) == 3000
    assert conn.deadline is not None  # the request timer runs
    h.advance(conn.cfg.credit_request_delay_s / 2)
    h.send(pkt(Op.CREDIT_UPDATE, buf_alloc=3000, fwd_cnt=3000))
    assert conn.deadline is None  # the guest spoke first: no request
    got = h.rx(max_payload=4096)
    assert [p.op for p, _ in got] == [Op.RW] and got[0][0].len_ == 3000
    h.send(pkt(Op.CREDIT_UPDATE, buf_alloc=3000, fwd_cnt=6000))  # it read that too
    assert h.rx() == []  # the host socket is empty
    h.advance(1.0)
    assert not any(p.op == Op.CREDIT_REQUEST for p, _ in h.rx())
    assert conn.deadline is None


def test_credit_request_delay_zero_asks_at_once():
    """credit_request_delay_s = 0: the request goes out with the packet that used up the
    credit (Spec: virtio 1.2 §5.10.6.3)."""
    h = Harness(MuxerConfig(conn=ConnConfig(credit_request_delay_s=0)))
    key = h.open_guest_conn(buf_alloc=3000)
    h.host_sends(key, b"x" * 10_000)
    got = h.rx(max_payload=4096)
    assert [p.op for p, _ in got][-1] == Op.CREDIT_REQUEST
    assert h.mux.connection(key).deadline is None


def test_credit_wraparound_end_to_end():
    h = Harness()
    key = h.open_guest_conn(buf_alloc=4096)
    conn = h.mux.connection(key)
    conn.tx_cnt = conn.peer_fwd_cnt = U32 - 100  # counters about to wrap
    h.send(pkt(Op.CREDIT_UPDATE, buf_alloc=4096, fwd_cnt=U32 - 100))
    h.host_sends(key, b"y" * 5000)
    got = h.rx(max_payload=4096)
    assert sum(p.len_ for p, _ in got if p.op == Op.RW) == 4096
    assert conn.tx_cnt == (U32 - 100 + 4096) % U32
    h.send(pkt(Op.CREDIT_UPDATE, buf_alloc=4096, fwd_cnt=conn.tx_cnt))
    got = h.rx(max_payload=4096)
    assert sum(p.len_ for p, _ in got if p.op == Op.RW) == 904


def test_credit_request_answered_with_credit_update():
    h = Harness()
    h.open_guest_conn()
    h.send(pkt(Op.RW, payload=b"abc"))
    h.send(pkt(Op.CREDIT_REQUEST))
    (hdr, _), = h.rx()
    assert hdr.op == Op.CREDIT_UPDATE and hdr.fwd_cnt == 3 and hdr.buf_alloc == 256 * 1024


def test_credit_update_sent_when_free_space_grew_enough():
    cfg = MuxerConfig(conn=ConnConfig(buf_alloc_bytes=64 * 1024))  # threshold 16 KiB
    h = Harness(cfg)
    key = h.open_guest_conn()
    sent = 0
    for _ in range(11):  # 44 KiB: guest's view of our free space still >= 16 KiB
        h.send(pkt(Op.RW, payload=b"z" * 4096, fwd_cnt=0))
        sent += 4096
    assert h.rx() == []
    h.send(pkt(Op.RW, payload=b"z" * 4096))  # 48 KiB in flight → view 16 KiB... 
    h.send(pkt(Op.RW, payload=b"z" * 4096))  # 52 KiB: view 12 KiB < 16 KiB → update
    (hdr, _), = h.rx()
    assert hdr.op == Op.CREDIT_UPDATE and hdr.fwd_cnt == 13 * 4096
    assert len(h.socks[key].received) == 13 * 4096


def test_guest_exceeding_credit_resets_only_that_connection():
    cfg = MuxerConfig(conn=ConnConfig(buf_alloc_bytes=8192))
    h = Harness(cfg)
    k1 = h.open_guest_conn(src_port=1000)
    k2 = h.open_guest_conn(src_port=1001)
    h.socks[k1].capacity = 0  # host not reading: bytes stay buffered
    h.send(pkt(Op.RW, 1000, payload=b"a" * 8192))
    assert h.mux.connection(k1).buffered_g2h == 8192
    h.send(pkt(Op.RW, 1000, payload=b"b"))  # one byte over the credit we gave
    got = h.rx()
    assert [(p.op, p.dst_port) for p, _ in got] == [(Op.RST, 1000)]
    assert h.socks[k1].closed and not h.socks[k2].closed
    h.send(pkt(Op.RW, 1001, payload=b"still fine"))
    assert h.socks[k2].received == b"still fine"
    assert [c.peer_port for c in h.mux.connections()] == [1001]


def test_slow_host_buffers_at_most_buf_alloc_and_flushes_in_order():
    h = Harness()
    key = h.open_guest_conn()
    s = h.socks[key]
    s.capacity = 100
    h.send(pkt(Op.RW, payload=bytes(range(256)) * 4))
    assert s.write and len(s.received) == 100
    h.send(pkt(Op.RW, payload=b"tail"))
    conn = h.mux.connection(key)
    assert conn.buffered_g2h == 1024 + 4 - 100
    h.writable(key, capacity=500)
    h.writable(key)
    assert bytes(s.received) == bytes(range(256)) * 4 + b"tail"
    assert conn.buffered_g2h == 0 and not s.write


def test_write_host_hands_out_guest_buffers_without_copy():
    h = Harness()
    h.open_guest_conn()
    payload = bytearray(pkt(Op.RW, payload=b"q" * 1000))
    actions = h.mux.guest_tx(3, [memoryview(payload)], 0.0)
    (w,) = [a for a in actions if isinstance(a, WriteHost)]
    assert isinstance(w.data[0], memoryview) and w.data[0].obj is payload


# --- shutdown / reset / timeouts ---------------------------------------------------------------


def test_guest_half_close_send_then_host_eof():
    h = Harness()
    key = h.open_guest_conn()
    h.send(pkt(Op.RW, payload=b"req"))
    h.send(pkt(Op.SHUTDOWN, flags=ShutdownFlag.SEND))
    assert h.socks[key].shut_wr and not h.socks[key].closed
    h.host_sends(key, b"resp", eof=True)
    got = h.rx()
    assert [(p.op, p.flags) for p, _ in got] == [(Op.RW, 0), (Op.SHUTDOWN, 3)]
    assert h.socks[key].closed
    assert h.mux.connection(key).state is ConnState.CLOSING
    h.send(pkt(Op.RST))
    assert h.mux.connections() == []


def test_host_eof_is_half_close_guest_can_still_send():
    h = Harness()
    key = h.open_guest_conn()
    h.host_sends(key, eof=True)
    (hdr, _), = h.rx()
    assert (hdr.op, hdr.flags) == (Op.SHUTDOWN, ShutdownFlag.SEND)
    h.send(pkt(Op.RW, payload=b"late"))
    assert h.socks[key].received == b"late"
    assert "half-closed" in h.mux.connections()[0].state


def test_host_hangup_shutdown_both_then_rst_after_timeout():
    h = Harness()
    key = h.open_guest_conn()
    h.host_sends(key, eof=True, hangup=True)
    (hdr, _), = h.rx()
    assert (hdr.op, hdr.flags) == (Op.SHUTDOWN, 3) and h.socks[key].closed
    h.send(pkt(Op.RW, payload=b"discarded"))  # host is gone: dropped, credit still counted
    assert h.mux.connection(key).fwd_cnt == 9
    h.advance(1.9)
    assert h.rx() == []
    h.advance(0.2)  # shutdown timeout (2 s): we reset
    (hdr, _), = h.rx()
    assert hdr.op == Op.RST and h.mux.connections() == []


def test_guest_full_shutdown_waits_for_drain_then_rst():
    h = Harness()
    key = h.open_guest_conn()
    h.socks[key].capacity = 0
    h.send(pkt(Op.RW, payload=b"pending"))
    h.send(pkt(Op.SHUTDOWN, flags=3))
    assert h.rx() == [] and h.mux.connection(key).state is ConnState.CLOSING
    h.writable(key)
    (hdr, _), = h.rx()
    assert hdr.op == Op.RST and h.socks[key].received == b"pending" and h.socks[key].closed


def test_shutdown_timeout_when_host_never_drains():
    h = Harness(MuxerConfig(conn=ConnConfig(shutdown_timeout_s=5.0)))
    key = h.open_guest_conn()
    h.socks[key].capacity = 0
    h.send(pkt(Op.RW, payload=b"stuck"))
    h.send(pkt(Op.SHUTDOWN, flags=3))
    assert h.timers[key] == pytest.approx(5.0)
    h.advance(5.0)
    (hdr, _), = h.rx()
    assert hdr.op == Op.RST and h.socks[key].closed and key not in h.timers


def test_guest_shutdown_rcv_stops_host_reads():
    h = Harness()
    key = h.open_guest_conn()
    h.send(pkt(Op.SHUTDOWN, flags=ShutdownFlag.RCV))
    assert not h.socks[key].read
    h.host_sends(key, b"unwanted")
    assert h.rx() == []


def test_guest_shutdown_rcv_shuts_the_host_socket_for_reading_only():
    """The host peer's later writes must fail (EPIPE), as a Linux vsock sender's do once
    its peer shut down receiving, not fill the socket; the guest may still send."""
    h = Harness()
    key = h.open_guest_conn()
    h.send(pkt(Op.SHUTDOWN, flags=ShutdownFlag.RCV))
    assert h.socks[key].shut_rd and not h.socks[key].shut_wr and not h.socks[key].closed
    h.send(pkt(Op.RW, payload=b"still"))
    assert h.socks[key].received == b"still"


def test_guest_rst_closes_host_without_reply():
    h = Harness()
    key = h.open_guest_conn()
    h.send(pkt(Op.RST))
    assert h.socks[key].closed and h.rx() == [] and h.mux.connection_count == 0


def test_data_after_guest_shutdown_send_resets():
    h = Harness()
    h.open_guest_conn()
    h.send(pkt(Op.SHUTDOWN, flags=ShutdownFlag.SEND))
    h.send(pkt(Op.RW, payload=b"x"))
    assert [p.op for p, _ in h.rx()] == [Op.RST]


# --- seqpacket ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4096, 64 * 1024, 100_000])
def test_seqpacket_guest_to_host_message_boundaries(size):
    h = Harness(seqpacket=True)
    key = h.open_guest_conn(type_=Type.SEQPACKET)
    msg = bytes(i % 251 for i in range(size))
    pieces = [msg[i:i + 4096] for i in range(0, size, 4096)] or [b""]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        flags = (SeqpacketFlag.EOM | SeqpacketFlag.EOR) if last else 0
        h.send(pkt(Op.RW, payload=piece, type_=Type.SEQPACKET, flags=flags))
    h.send(pkt(Op.RW, payload=b"second", type_=Type.SEQPACKET, flags=SeqpacketFlag.EOM))
    assert h.socks[key].messages == [(msg, True), (b"second", False)]


def test_seqpacket_host_busy_keeps_messages_queued():
    h = Harness(seqpacket=True)
    key = h.open_guest_conn(type_=Type.SEQPACKET)
    h.socks[key].capacity = 0
    for m in (b"one", b"two"):
        h.send(pkt(Op.RW, payload=m, type_=Type.SEQPACKET, flags=SeqpacketFlag.EOM))
    h.writable(key)
    h.writable(key)
    assert [m for m, _ in h.socks[key].messages] == [b"one", b"two"]


@pytest.mark.parametrize("size", [1, 4096, 64 * 1024])
def test_seqpacket_host_to_guest_split_with_eom_on_last(size):
    h = Harness(seqpacket=True)
    key = h.open_guest_conn(type_=Type.SEQPACKET)
    msg = bytes(i % 253 for i in range(size))
    h.host_sends(key, msgs=[msg, b"next"])
    got = h.rx(max_payload=4096)
    rw = [(p, d) for p, d in got if p.op == Op.RW]
    data, flags = b"".join(d for _, d in rw), [p.flags for p, _ in rw]
    assert data == msg + b"next"
    assert all(p.len_ <= 4096 and p.type_ == Type.SEQPACKET for p, _ in rw)
    eoms = [i for i, f in enumerate(flags) if f & SeqpacketFlag.EOM]
    assert eoms == [len(rw) - 2, len(rw) - 1]


def test_seqpacket_oversized_host_message_resets():
    h = Harness(seqpacket=True)
    key = h.open_guest_conn(type_=Type.SEQPACKET)
    h.host_sends(key, msgs=[b"m" * (64 * 1024 + 1)])
    assert [p.op for p, _ in h.rx()] == [Op.RST] and h.socks[key].closed


# --- the batched data paths (device fast paths) ---------------------------------------------


def _rw(n, fill=b"a", ba=GUEST_BUF, fc=0):
    return (n, 0, ba, fc, [memoryview(fill * n)] if n else [])


def test_rw_batch_one_write_for_all_payloads_same_credit_as_one_by_one():
    a, b = make_conn(), make_conn()
    packets = [_rw(10, b"x"), _rw(0), _rw(20, b"y", fc=5)]
    acts = a.on_rw_batch(packets, 0.0)
    assert [type(x) for x in acts] == [WriteHost]
    assert b"".join(bytes(v) for v in acts[0].data) == b"x" * 10 + b"y" * 20
    b._rw_one_by_one(packets, 0.0)
    assert (a.recv_cnt, a.peer_fwd_cnt, a.peer_buf_alloc) == (b.recv_cnt, b.peer_fwd_cnt,
                                                               b.peer_buf_alloc) == (30, 5,
                                                                                     GUEST_BUF)


def test_rw_batch_credit_violation_resets_like_per_packet():
    """Spec: virtio 1.2 §5.10.6.3.1: RW beyond the credit we gave: the connection is reset."""
    cfg = ConnConfig(buf_alloc_bytes=4096)
    conn = make_conn(cfg=cfg)
    acts = conn.on_rw_batch([_rw(3000), _rw(2000)], 0.0)
    assert conn.state is ConnState.KILLED
    assert any(type(x) is CloseHost for x in acts)


def test_rw_batch_while_a_write_is_in_flight_buffers_a_copy():
    conn = make_conn()
    first = conn.on_rw_batch([_rw(5, b"p")], 0.0)
    assert conn.on_rw_batch([_rw(3, b"q")], 0.0) == []
    conn.host_write_done(5, 0.0)
    again = conn.host_writable(0.0)
    assert b"".join(bytes(v) for v in again[0].data) == b"qqq" and first


def test_rx_burst_template_and_accounting():
    conn = make_conn(peer_buf_alloc=10000)
    assert conn.rx_burst() is None  # host not known readable: nothing to read
    conn.host_readable = True
    template, credit = conn.rx_burst()
    hdr = VsockHeader.unpack(template)
    assert (hdr.op, hdr.type_, hdr.len_, hdr.src_port, hdr.dst_port, hdr.dst_cid) == (
        Op.RW, Type.STREAM, 0, 80, 1000, 3) and credit == 10000
    conn.rx_burst_done(6000, True)
    assert conn.tx_cnt == 6000 and conn.peer_free == 4000 and not conn.host_readable
    assert conn.adv_fwd_cnt == conn.fwd_cnt
