"""The C stream loop (virtio/vsock/stream_loop.py, csrc/vsock_stream.c) end to end: a
host->guest stream in its steady state is served by C until anything else happens, and
everything around it must look exactly as without it: every byte in order, never beyond the
guest's credit, the counters and stats the device reports equal to what the guest saw, and
each event that ends the loop (guest data, host EOF, the credit used up, another
connection, a queue stop) handled by the general path.

The back-end runs on its own thread (`BackendThread`: ``run_once(0.05)``, so every call
into the C loop also ends at the turn's 50 ms budget and is re-entered later) and the guest
model (`VsockGuest`, the Linux driver's behaviour) on the test thread.
``stream_loop_after=0`` arms the loop from the first byte; ``-1`` never.

Spec: virtio 1.2 §5.10.6 (one packet per RX buffer), §5.10.6.3 (credit), §5.10.6.4 (stream
data in order, without loss).
"""

from __future__ import annotations

import socket
import threading

import pytest

from tests.integration.test_vsock_device import (Setup, host_connects_and_guest_accepts,
                                                 pattern,
                                                 read_exactly_in_thread, recv_line, vm_config)
from virtio.vsock.wire import Op, ShutdownFlag

MIB = 1 << 20


@pytest.fixture
def short_dir(tmp_path_factory):
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="vsl-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _send_paced(sock: socket.socket, data: bytes, piece: int = 32 * 1024,
                pause_s: float = 0.002) -> None:
    """Send ``data`` slower than this guest model reads, so its socket drains between
    pieces: the steady state the C loop serves (a host that outruns the guest keeps the
    connection at zero credit with bytes waiting, which the general path serves)."""
    import time

    try:
        for at in range(0, len(data), piece):
            sock.sendall(data[at:at + piece])
            time.sleep(pause_s)
    except OSError:
        pass  # the test ended first


def _setup(d: str, after: int, ring: str = "c", **guest_kw) -> Setup:
    return Setup(d, ring=ring, configs=[vm_config(d, stream_loop_after=after)], **guest_kw)


def _device(s: Setup):
    return s.backend.call(lambda: s.backend.backend.device(3))


def _loop_figures(s: Setup) -> tuple[int, int]:
    dev = _device(s)
    return s.backend.call(lambda: (dev.stream_loop_runs, dev.stream_loop_bytes))


def _conn_row(s: Setup) -> dict:
    rows = s.backend.call(lambda: s.backend.backend.muxer.connections(3))
    assert len(rows) == 1
    return rows[0]


def _rx_packets(s: Setup) -> int:
    return s.backend.call(lambda: s.backend.backend.muxer.stats(3).rx_packets)


def _guest_rw_packets(s: Setup) -> int:
    return sum(1 for h in s.guest.packets if h.op == Op.RW)


@pytest.mark.parametrize("after", [0, -1])
def test_a_host_stream_arrives_byte_for_byte_and_the_counters_match_the_guest(
        short_dir, after):
    s = _setup(short_dir, after)
    try:
        client, conn = host_connects_and_guest_accepts(s)
        assert recv_line(client) == b"OK 1234\n"
        size = 4 * MIB
        data = pattern(size, 3)
        threading.Thread(target=_send_paced, args=(client, data), daemon=True).start()
        s.guest.run_until(lambda: len(conn.received) >= size, 60)
        assert bytes(conn.received) == data
        runs, moved = _loop_figures(s)
        if after == 0:
            assert runs > 0 and moved > size // 4
        else:
            assert (runs, moved) == (0, 0)
        row = _conn_row(s)
        assert row.bytes_to_guest == size
        # every packet the device counted is one the guest received, and no more
        assert _rx_packets(s) == len(s.guest.packets)
        assert _guest_rw_packets(s) >= size // s.guest.rx_buf_size
        # and no packet ever went beyond the guest's credit (the guest model checks it
        # too): the device's view of tx_cnt is the guest's rx_cnt
        assert conn.rx_cnt == size
    finally:
        s.close()


def test_the_pure_python_ring_never_enters_the_c_loop(short_dir):
    s = _setup(short_dir, 0, ring="py")
    try:
        client, conn = host_connects_and_guest_accepts(s)
        assert recv_line(client) == b"OK 1234\n"
        data = pattern(MIB, 4)
        threading.Thread(target=_send_paced, args=(client, data), daemon=True).start()
        s.guest.run_until(lambda: len(conn.received) >= MIB, 30)
        assert bytes(conn.received) == data
        assert _loop_figures(s) == (0, 0)
    finally:
        s.close()


def test_guest_data_while_the_host_streams_goes_both_ways(short_dir):
    """Guest RW packets with payload stop the C loop's TX lane untouched: the general path
    writes them to the host while the host->guest stream goes on."""
    s = _setup(short_dir, 0)
    try:
        client, conn = host_connects_and_guest_accepts(s)
        assert recv_line(client) == b"OK 1234\n"
        size = 4 * MIB
        to_guest, to_host = pattern(size, 5), pattern(size, 6)
        threading.Thread(target=_send_paced, args=(client, to_guest), daemon=True).start()
        reader, got = read_exactly_in_thread(client, size)
        s.guest.run_until(lambda: len(conn.received) >= MIB, 30)
        assert _loop_figures(s)[1] > 0  # the loop is serving
        conn.send(to_host)
        s.guest.run_until(lambda: len(conn.received) >= size and not conn.txq, 60)
        reader.join(30)
        assert bytes(conn.received) == to_guest
        assert bytes(got) == to_host
        assert _loop_figures(s)[1] > 0
    finally:
        s.close()


def test_host_eof_mid_stream_reaches_the_guest_after_every_byte(short_dir):
    s = _setup(short_dir, 0)
    try:
        client, conn = host_connects_and_guest_accepts(s)
        assert recv_line(client) == b"OK 1234\n"
        size = 3 * MIB + 12345
        data = pattern(size, 7)

        def send_then_shut() -> None:
            _send_paced(client, data)
            client.shutdown(socket.SHUT_WR)

        threading.Thread(target=send_then_shut, daemon=True).start()
        s.guest.run_until(lambda: conn.peer_shutdown & ShutdownFlag.SEND, 30)
        assert bytes(conn.received) == data
        assert _loop_figures(s)[1] > 0
    finally:
        s.close()


def test_a_guest_that_stops_reading_is_never_sent_beyond_its_credit(short_dir):
    """The credit used up with host bytes left ends the loop; the general path then asks
    for credit once and resumes on the guest's CREDIT_UPDATE."""
    s = _setup(short_dir, 0)
    try:
        client, conn = host_connects_and_guest_accepts(s)
        assert recv_line(client) == b"OK 1234\n"
        total = 2 * MIB
        data = pattern(total, 8)
        threading.Thread(target=_send_paced, args=(client, data), daemon=True).start()
        s.guest.run_until(lambda: len(conn.received) >= MIB, 30)
        assert _loop_figures(s)[1] > 0  # the loop was serving when the guest stopped
        conn.auto_consume = False
        stop_at = len(conn.received) + conn.buf_alloc  # at most one more window
        for _ in range(25):
            s.guest.pump(0.02)
        assert len(conn.received) <= stop_at
        assert (conn.rx_cnt - conn.fwd_cnt) <= conn.buf_alloc  # never beyond the credit
        conn.auto_consume = True
        conn.consume()
        s.guest.run_until(lambda: len(conn.received) >= total, 30)
        assert bytes(conn.received) == data
    finally:
        s.close()


def test_another_connection_mid_stream_is_served_and_the_stream_goes_on(short_dir):
    s = _setup(short_dir, 0)
    try:
        client, conn = host_connects_and_guest_accepts(s)
        assert recv_line(client) == b"OK 1234\n"
        size = 4 * MIB
        data = pattern(size, 9)
        threading.Thread(target=_send_paced, args=(client, data), daemon=True).start()
        s.guest.run_until(lambda: len(conn.received) >= MIB, 30)
        assert _loop_figures(s)[1] > 0
        server = s.host_listen(5000)
        other = s.guest.connect(5000)
        peer, _ = server.accept()
        other.send(b"hello from the second connection")
        peer.settimeout(10)
        got = b""
        while len(got) < 32:
            s.guest.pump(0.02)
            try:
                got += peer.recv(64)
            except socket.timeout:
                break
        assert got == b"hello from the second connection"
        peer.sendall(b"and back")
        s.guest.run_until(lambda: bytes(other.received) == b"and back", 10)
        s.guest.run_until(lambda: len(conn.received) >= size, 60)
        assert bytes(conn.received) == data
    finally:
        s.close()


def test_the_front_end_going_away_mid_stream_resets_the_device_and_it_serves_again(
        short_dir):
    """A vhost-user event (here the front-end's connection closing) while the C loop serves:
    the loop returns at once (the event loop's fd is readable), the device is reset as
    usual (the host peer sees its connection end), and a new front-end gets a working
    device."""
    from tests.support.vsock_guest import VsockGuest
    from vhost_user.frontend import GuestRam

    s = _setup(short_dir, 0)
    try:
        client, conn = host_connects_and_guest_accepts(s)
        assert recv_line(client) == b"OK 1234\n"
        data = pattern(8 * MIB, 10)
        threading.Thread(target=_send_paced, args=(client, data), daemon=True).start()
        s.guest.run_until(lambda: len(conn.received) >= MIB, 30)
        assert _loop_figures(s)[1] > 0
        s.guest.close()  # the front-end goes away while the host keeps writing
        client.settimeout(10)
        with pytest.raises((ConnectionResetError, BrokenPipeError, socket.timeout, OSError)):
            while True:  # the back-end closes the host side: reads end, or writes fail
                if not client.recv(1 << 16):
                    raise ConnectionResetError("EOF")
        ram = GuestRam([(0, 24 << 20), (24 << 20, 24 << 20)])
        guest = VsockGuest.attach(s.cfg.socket, ram)
        try:
            guest.listen(1234)
            client2 = s.host_connect(1234)
            conn2 = guest.accept(1234)
            assert recv_line(client2) == b"OK 1234\n"
            more = pattern(2 * MIB, 11)
            threading.Thread(target=_send_paced, args=(client2, more), daemon=True).start()
            guest.run_until(lambda: len(conn2.received) >= len(more), 30)
            assert bytes(conn2.received) == more
        finally:
            guest.close()
            ram.close()
    finally:
        s.backend.close()
        s.ram.close()


@pytest.mark.parametrize("after", [0, -1])
def test_guest_control_packets_while_the_loop_serves_get_the_usual_answers(short_dir, after):
    """A CREDIT_REQUEST, then an unknown op, on the streaming connection while the C loop
    serves it: the loop hands each to the general path, which answers the request with a
    CREDIT_UPDATE and resets the connection on the unknown op (RST to the guest, the host
    side closed); the device then serves a new connection."""
    from virtio.vsock.wire import Type, VsockHeader

    s = _setup(short_dir, after)
    try:
        client, conn = host_connects_and_guest_accepts(s)
        assert recv_line(client) == b"OK 1234\n"
        data = pattern(8 * MIB, 12)
        threading.Thread(target=_send_paced, args=(client, data), daemon=True).start()
        s.guest.run_until(lambda: len(conn.received) >= MIB, 30)
        assert (_loop_figures(s)[1] > 0) == (after == 0)
        updates_before = sum(1 for h in s.guest.packets if h.op == Op.CREDIT_UPDATE)
        s.guest.send_control(conn, Op.CREDIT_REQUEST)
        s.guest.run_until(lambda: sum(1 for h in s.guest.packets
                                      if h.op == Op.CREDIT_UPDATE) > updates_before, 10)
        received = len(conn.received)
        assert bytes(conn.received) == data[:received]  # nothing lost or reordered so far
        s.guest.send_packet(VsockHeader(s.guest.cid, 2, conn.local_port, conn.peer_port, 0,
                                        Type.STREAM, 99, 0, conn.buf_alloc, conn.fwd_cnt))
        s.guest.run_until(lambda: conn.rst_received, 10)
        client.settimeout(10)
        with pytest.raises(OSError):
            while True:
                if not client.recv(1 << 16):
                    raise ConnectionResetError("EOF")
        s.guest.listen(1235)
        client2 = s.host_connect(1235)
        conn2 = s.guest.accept(1235)
        assert recv_line(client2) == b"OK 1235\n"
        client2.sendall(b"still serving")
        s.guest.run_until(lambda: bytes(conn2.received) == b"still serving", 10)
    finally:
        s.close()
