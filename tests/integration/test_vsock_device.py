"""The vsock device end to end through the project's front-end and the guest vsock model.

The daemon serves a vsock VM on a real vhost-user socket and real host UNIX sockets
(``uds_path`` and ``<uds_path>_<port>``); `tests.support.vsock_guest.VsockGuest` plays the
Linux guest driver over memfd guest RAM. Covers hybrid vsock both ways, data byte for byte,
refusal, credit edge cases, the 3-queue event queue, seqpacket boundaries, hostile packets,
management queries.

Spec: virtio 1.2 §5.10 (Socket Device); hybrid vsock (Firecracker, vhost-device-vsock).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from tests.support import ring_impl_class
from vhost_user.frontend import FrontendError
from tests.support.vsock_guest import HDR, BackendThread, VsockGuest
from vhost_user.frontend import GuestRam, VhostUserFrontend
from virtio.config import VsockConfig
from virtio.vsock.wire import Op, ShutdownFlag, Type, VsockHeader

REGIONS = [(0, 24 << 20), (24 << 20, 24 << 20)]  # adjacent: buffers straddle the boundary


def pattern(n: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(b"%d" % seed).digest() * 2048  # 64 KiB, not periodic at 4 KiB
    reps = n // len(block) + 1
    return (block * reps)[:n]


@pytest.fixture
def short_dir():
    path = tempfile.mkdtemp(prefix="vsk-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def vm_config(d: str, cid: int = 3, **kw) -> VsockConfig:
    return VsockConfig(guest_cid=cid, socket=f"{d}/vu{cid}.sock", uds_path=f"{d}/v{cid}", **kw)


class Setup:
    def __init__(self, d: str, *, ring="py", event_queue=False, configs=None, **guest_kw):
        self.configs = configs or [vm_config(d)]
        self.cfg = self.configs[0]
        self.backend = BackendThread(self.configs, virtqueue_factory=ring_impl_class(ring))
        self.ram = GuestRam(REGIONS)
        self.guest = VsockGuest.attach(self.cfg.socket, self.ram, event_queue=event_queue,
                                       **guest_kw)
        self.host_servers: list[socket.socket] = []

    def host_connect(self, port: int) -> socket.socket:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(10)
        c.connect(self.cfg.uds_path)
        c.sendall(b"CONNECT %d\n" % port)
        return c

    def host_listen(self, port: int, kind=socket.SOCK_STREAM) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, kind)
        s.bind(f"{self.cfg.uds_path}_{port}")
        s.listen(1024)
        s.settimeout(10)
        self.host_servers.append(s)
        return s

    def close(self):
        self.guest.close()
        self.backend.close()
        self.ram.close()
        for s in self.host_servers:
            s.close()


@pytest.fixture(params=["py", "c"])
def ring(request):
    return request.param


@pytest.fixture
def setup(short_dir, ring):
    s = Setup(short_dir, ring=ring)
    yield s
    s.close()


def recv_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_exactly_in_thread(sock: socket.socket, n: int) -> tuple[threading.Thread, bytearray]:
    buf = bytearray()

    def run():
        while len(buf) < n:
            chunk = sock.recv(min(1 << 20, n - len(buf)))
            if not chunk:
                return
            buf.extend(chunk)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, buf


def host_connects_and_guest_accepts(s: Setup, port: int = 1234):
    s.guest.listen(port)
    client = s.host_connect(port)
    conn = s.guest.accept(port)
    return client, conn


# -- tests ---------------------------------------------------------------------------------


def test_config_space_and_features(short_dir):
    cfg = vm_config(short_dir, cid=77)
    backend = BackendThread([cfg])
    try:
        fe = VhostUserFrontend.connect(cfg.socket)
        try:
            features = fe.init()
            assert features & (1 << 1)  # VIRTIO_VSOCK_F_SEQPACKET (virtio 1.2 §5.10.3)
            assert fe.get_config(0, 8) == (77).to_bytes(8, "little")
            assert fe.get_queue_num() == 3
        finally:
            fe.close()
    finally:
        backend.close()


def test_queue_size_option_bounds_the_rings_a_frontend_may_set_up(short_dir):
    cfg = vm_config(short_dir, cid=5, queue_size=64)
    backend = BackendThread([cfg])
    try:
        fe = VhostUserFrontend.connect(cfg.socket)
        try:
            fe.init()
            fe.set_vring_num(0, 64)
            with pytest.raises((ConnectionError, OSError, FrontendError)):
                fe.set_vring_num(1, 128)  # refused: the back-end drops the connection
                fe.get_features()  # the refusal shows on the next request at the latest
        finally:
            fe.close()
    finally:
        backend.close()


def test_host_connect_guest_accepts_ok_reply_and_data_both_ways(setup):
    client, conn = host_connects_and_guest_accepts(setup)
    # Default reply convention: the guest port (vhost-device-vsock).
    assert recv_line(client) == b"OK 1234\n"
    client.sendall(b"ping from host")
    setup.guest.run_until(lambda: bytes(conn.received) == b"ping from host")
    conn.send(b"pong from guest")
    setup.guest.run_until(lambda: True, 0.1)
    setup.guest.pump(0.1)
    assert client.recv(100) == b"pong from guest"
    # Host closes: the guest sees SHUTDOWN then the connection ends.
    client.close()
    setup.guest.run_until(lambda: conn.peer_shutdown != 0 or conn.state != "established")


def test_leftover_after_connect_line_reaches_the_guest(setup):
    setup.guest.listen(80)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(10)
    c.connect(setup.cfg.uds_path)
    c.sendall(b"CONNECT 80\nearly bytes")
    conn = setup.guest.accept(80)
    setup.guest.run_until(lambda: bytes(conn.received) == b"early bytes")
    assert recv_line(c) == b"OK 80\n"
    c.close()


def test_sixteen_mib_each_way_byte_for_byte(short_dir, ring):
    s = Setup(short_dir, ring=ring, rx_buf_size=64 * 1024, queue_size=128)
    try:
        client, conn = host_connects_and_guest_accepts(s)
        assert recv_line(client) == b"OK 1234\n"
        size = 16 << 20
        to_guest, to_host = pattern(size, 1), pattern(size, 2)
        writer = threading.Thread(target=_send_quietly, args=(client, to_guest,), daemon=True)
        reader, got = read_exactly_in_thread(client, size)
        started = time.monotonic()
        writer.start()
        conn.send(to_host)
        s.guest.run_until(lambda: len(conn.received) >= size and not conn.txq, 60)
        reader.join(60)
        elapsed = time.monotonic() - started
        assert bytes(conn.received) == to_guest
        assert bytes(got) == to_host
        print(f"32 MiB through the vsock device in {elapsed:.2f} s")
    finally:
        s.close()


def test_guest_connects_to_host_port(setup):
    server = setup.host_listen(5000)
    conn = setup.guest.connect(5000)
    assert conn.state == "established"
    peer, _ = server.accept()
    peer.settimeout(10)
    conn.send(b"hello host")
    setup.guest.pump(0.1)
    assert peer.recv(100) == b"hello host"
    peer.sendall(b"hello guest")
    setup.guest.run_until(lambda: bytes(conn.received) == b"hello guest")
    # Guest closes both ways: the device answers with RST once the host side is done.
    conn.shutdown(ShutdownFlag.BOTH)
    setup.guest.run_until(lambda: conn.state == "closed")
    assert peer.recv(100) == b""
    peer.close()


def test_guest_shutdown_rcv_makes_host_writes_fail_with_epipe(setup):
    """A guest that shuts down receiving (SHUTDOWN RCV) will read nothing more: the host
    peer's writes then fail with EPIPE, as a Linux vsock sender's do once its peer shut
    down receiving, instead of filling the socket and blocking; the guest can still send.

    Spec: virtio 1.2 §5.10.6.5 (SHUTDOWN: the peer will receive no more data)."""
    server = setup.host_listen(5001)
    conn = setup.guest.connect(5001)
    peer, _ = server.accept()
    peer.settimeout(10)
    conn.shutdown(ShutdownFlag.RCV)
    deadline = time.monotonic() + 10
    while True:
        setup.guest.pump(0.01)
        try:
            peer.send(b"unwanted")
        except BrokenPipeError:
            break
        assert time.monotonic() < deadline, "the host peer's writes never failed"
    conn.send(b"still sending")
    setup.guest.pump(0.1)
    assert peer.recv(100) == b"still sending"
    peer.close()


def test_guest_connect_refused_gets_rst(setup):
    conn = setup.guest.connect(5999)  # nobody listens at <uds_path>_5999
    assert conn.state == "reset" and conn.rst_received


def test_guest_refuses_host_connect_closes_client(setup):
    client = setup.host_connect(4321)  # the guest does not listen: it answers RST
    t0 = time.monotonic()
    client.settimeout(0.01)
    while True:
        setup.guest.pump(0.01)
        try:
            assert client.recv(100) == b""
            break
        except socket.timeout:
            assert time.monotonic() - t0 < 1.5, "closed by the timeout, not by the RST"
    assert any(h.op == Op.RST for h in setup.guest.sent)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the test ended first


def test_guest_does_not_answer_then_connect_times_out(short_dir):
    cfg = vm_config(short_dir, connect_timeout_s=0.3)
    s = Setup(short_dir, configs=[cfg])
    try:
        s.guest.on_packet = lambda hdr, payload: None
        s.guest.listening.clear()
        # Swallow the REQUEST: the guest model never answers.
        s.guest._dispatch = lambda hdr, payload: None  # type: ignore[method-assign]
        client = s.host_connect(1234)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:
            s.guest.pump(0.05)
            client.settimeout(0.01)
            try:
                if client.recv(10) == b"":
                    break
            except socket.timeout:
                continue
        assert 0.25 < time.monotonic() - t0 < 2.5
    finally:
        s.close()


def test_malformed_handshake_closes_only_that_client(setup):
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.settimeout(5)
    bad.connect(setup.cfg.uds_path)
    bad.sendall(b"HELLO 12\n")
    assert bad.recv(10) == b""
    client, conn = host_connects_and_guest_accepts(setup)
    assert recv_line(client) == b"OK 1234\n"


def test_seqpacket_boundaries_up_to_64k_both_ways(setup):
    server = setup.host_listen(6000, socket.SOCK_SEQPACKET)
    conn = setup.guest.connect(6000, type_=Type.SEQPACKET)
    assert conn.state == "established"
    peer, _ = server.accept()
    peer.settimeout(10)
    sizes = [1, 44, 4095, 4096, 4097, 65535, 65536, 12345, 3]
    for i, n in enumerate(sizes):
        conn.send(pattern(n, i), eor=bool(i % 2))
    for i, n in enumerate(sizes):
        while True:
            setup.guest.pump(0.01)
            try:
                peer.settimeout(0.05)
                msg = peer.recv(70000)
                break
            except socket.timeout:
                continue
        assert msg == pattern(n, i)
    peer.settimeout(10)
    for i, n in enumerate(sizes):
        peer.send(pattern(n, 100 + i))
    setup.guest.run_until(lambda: len(conn.messages) == len(sizes), 10)
    assert [m for m, _eor in conn.messages] == [pattern(n, 100 + i) for i, n in enumerate(sizes)]
    peer.close()


def test_zero_credit_stalls_and_credit_update_resumes(setup):
    """The guest application stops reading: the device sends no more than buf_alloc, asks
    for credit once, and resumes when the guest frees space (CREDIT_UPDATE)."""
    setup.guest.listen(7000)
    client = setup.host_connect(7000)
    conn = setup.guest.accept(7000)
    conn.auto_consume = False
    assert recv_line(client) == b"OK 7000\n"
    total = conn.buf_alloc * 3
    data = pattern(total, 5)
    writer = threading.Thread(target=_send_quietly, args=(client, data,), daemon=True)
    writer.start()
    setup.guest.run_until(lambda: len(conn.received) == conn.buf_alloc, 10)
    for _ in range(20):
        setup.guest.pump(0.02)
    assert len(conn.received) == conn.buf_alloc  # never beyond the guest's credit
    requests = [h for h in setup.guest.packets if h.op == Op.CREDIT_REQUEST]
    assert len(requests) == 1
    conn.auto_consume = True
    conn.consume()
    setup.guest.run_until(lambda: len(conn.received) == total, 20)
    assert bytes(conn.received) == data
    writer.join(5)


def test_guest_beyond_credit_is_reset_device_keeps_serving(setup):
    server = setup.host_listen(7100)
    conn = setup.guest.connect(7100)
    peer, _ = server.accept()
    # The device's buf_alloc is tx_buffer_size (256 KiB); send 300 KiB ignoring credit, all
    # in the ring before one kick, so no CREDIT_UPDATE can widen the window in between (the
    # device would be right to honour credit it had already sent).
    for i in range(5):
        hdr = VsockHeader(setup.guest.cid, 2, conn.local_port, 7100, 60000, Type.STREAM,
                          Op.RW, 0, conn.buf_alloc, 0)
        setup.guest.send_packet(hdr, pattern(60000, i), kick=False)
    setup.guest.queues[1].kick()
    setup.guest.run_until(lambda: conn.rst_received, 5)
    # Another connection still works.
    server2 = setup.host_listen(7101)
    conn2 = setup.guest.connect(7101)
    assert conn2.state == "established"
    peer2, _ = server2.accept()
    conn2.send(b"still fine")
    setup.guest.pump(0.1)
    peer2.settimeout(5)
    assert peer2.recv(100) == b"still fine"


def test_credit_request_answered_with_credit_update(setup):
    server = setup.host_listen(7200)
    conn = setup.guest.connect(7200)
    peer, _ = server.accept()
    setup.guest.send_control(conn, Op.CREDIT_REQUEST)
    setup.guest.run_until(lambda: any(h.op == Op.CREDIT_UPDATE for h in setup.guest.packets))
    update = [h for h in setup.guest.packets if h.op == Op.CREDIT_UPDATE][-1]
    assert update.buf_alloc == setup.cfg.tx_buffer_size
    assert update.fwd_cnt == 0


def test_credit_counters_wrap_past_2_32(setup):
    """Counters are u32 and wrap (virtio 1.2 §5.10.6.3). Both ends' counters are moved to
    just below 2^32 (as after 4 GiB of traffic), then 3 MiB stream through the wrap each way.
    """
    setup.guest.listen(7300)
    client = setup.host_connect(7300)
    conn = setup.guest.accept(7300)
    assert recv_line(client) == b"OK 7300\n"
    start = (1 << 32) - 1000
    mux = setup.backend.backend.muxer

    def move_device_counters():
        (key,) = [k for k in mux._vms[3].conns]
        dev = mux.connection(key)
        dev.tx_cnt = dev.peer_fwd_cnt = start  # host -> guest
        dev.recv_cnt = dev.fwd_cnt = dev.adv_fwd_cnt = start  # guest -> host
    setup.backend.call(move_device_counters)
    conn.rx_cnt = conn.fwd_cnt = conn.last_fwd_cnt = start
    conn.tx_cnt = conn.peer_fwd_cnt = start
    setup.guest.send_control(conn, Op.CREDIT_UPDATE)
    data = pattern(3 << 20, 9)
    writer = threading.Thread(target=_send_quietly, args=(client, data,), daemon=True)
    reader, got = read_exactly_in_thread(client, len(data))
    writer.start()
    conn.send(data[::-1])
    setup.guest.run_until(lambda: len(conn.received) == len(data) and not conn.txq, 20)
    reader.join(20)
    assert bytes(conn.received) == data
    assert bytes(got) == data[::-1]
    assert conn.fwd_cnt < (4 << 20) and conn.tx_cnt < (4 << 20)  # both wrapped


def test_hostile_packets_are_dropped_or_reset_and_device_keeps_serving(setup):
    g = setup.guest
    cid = g.cid
    server = setup.host_listen(7400)
    conn = g.connect(7400)
    peer, _ = server.accept()
    before = len(g.packets)
    hostile = [
        # unknown op on a live connection -> that connection is reset
        VsockHeader(cid, 2, conn.local_port, 7400, 0, Type.STREAM, 99, 0, 4096, 0).pack(),
        # unknown type -> RST
        VsockHeader(cid, 2, 40001, 7401, 0, 7, Op.REQUEST, 0, 4096, 0).pack(),
        # len beyond the buffer -> dropped
        VsockHeader(cid, 2, 40002, 7402, 1 << 20, Type.STREAM, Op.RW, 0, 4096, 0).pack()
        + b"x" * 10,
        # wrong src_cid -> dropped
        VsockHeader(cid + 1, 2, 40003, 7400, 0, Type.STREAM, Op.REQUEST, 0, 4096, 0).pack(),
        # wrong dst_cid (no such sibling) -> dropped
        VsockHeader(cid, 99, 40004, 7400, 0, Type.STREAM, Op.REQUEST, 0, 4096, 0).pack(),
        # packet for an unknown connection -> RST
        VsockHeader(cid, 2, 40005, 7405, 5, Type.STREAM, Op.RW, 0, 4096, 0).pack() + b"abcde",
        # shorter than a header -> dropped
        b"\x01\x02\x03",
    ]
    for raw in hostile:
        g.send_packet(raw[:HDR] if len(raw) >= HDR else raw, raw[HDR:])
    g.run_until(lambda: conn.rst_received, 5)
    for _ in range(10):
        g.pump(0.02)
    rsts = {(h.dst_port, h.src_port) for h in g.packets[before:] if h.op == Op.RST}
    assert (40001, 7401) in rsts and (40005, 7405) in rsts
    assert not {(40002, 7402), (40003, 7400), (40004, 7400)} & rsts
    stats = setup.backend.call(lambda: setup.backend.backend.muxer.stats(cid))
    assert stats.dropped_bad_len == 1 and stats.dropped_bad_cid == 2
    assert stats.dropped_short_header == 1
    # The device still serves.
    conn2 = g.connect(7400)
    assert conn2.state == "established"


def test_hostile_packets_on_the_tx_lane_connection_give_the_usual_outcome(setup):
    """Once a connection's RW packets took the device's TX lane (virtio/vsock/lane.py), its
    hostile packets still get the general path's outcome: len beyond the buffer is dropped
    (dropped_bad_len), a good packet after it still arrives in order, an unknown op resets
    that connection (Spec: virtio 1.2 §5.10.6: packet = header + payload in one chain)."""
    g = setup.guest
    cid = g.cid
    server = setup.host_listen(7410)
    conn = g.connect(7410)
    peer, _ = server.accept()
    peer.settimeout(5)
    conn.send(b"a" * 70000)  # two RW packets: the second one takes the lane
    g.run_until(lambda: not conn.txq, 5)
    got = b""
    while len(got) < 70000:
        got += peer.recv(1 << 20)
    lane = setup.backend.call(lambda: setup.backend.backend.device(cid)._lane_key)
    assert lane is not None and lane.peer_port == conn.local_port
    ports = (conn.local_port, 7410)
    g.send_packet(VsockHeader(cid, 2, *ports, 1 << 20, Type.STREAM, Op.RW, 0, 262144,
                              0).pack(), b"x" * 10)
    g.send_packet(VsockHeader(cid, 2, *ports, 0, Type.STREAM, Op.RW, 0, 262144, 0).pack()
                  + b"tiny")  # len 0 with four stray bytes: nothing is written
    g.send_packet(VsockHeader(cid, 2, *ports, 5, Type.STREAM, Op.RW, 0, 262144, 0).pack(),
                  b"hello")
    while len(got) < 70005:
        got += peer.recv(1 << 20)
    assert got == b"a" * 70000 + b"hello"
    stats = setup.backend.call(lambda: setup.backend.backend.muxer.stats(cid))
    assert stats.dropped_bad_len == 1
    g.send_packet(VsockHeader(cid, 2, *ports, 0, Type.STREAM, 99, 0, 262144, 0).pack())
    g.run_until(lambda: conn.rst_received, 5)
    assert peer.recv(10) == b""  # the host side was closed
    stats = setup.backend.call(lambda: setup.backend.backend.muxer.stats(cid))
    assert stats.rst_bad_op == 1


def test_credit_window_beyond_the_lane_tail_is_served_byte_for_byte(short_dir, ring):
    """tx_buffer_size above the TX lane's 1 MiB tail buffer: the lane takes what fits and the
    general path the rest, in order, and a guest within its credit is never reset
    (Spec: virtio 1.2 §5.10.6.3.1)."""
    s = Setup(short_dir, ring=ring, configs=[vm_config(short_dir, tx_buffer_size=4 << 20)])
    try:
        server = s.host_listen(7420)
        conn = s.guest.connect(7420)
        peer, _ = server.accept()
        assert conn.peer_buf_alloc == 4 << 20
        data = pattern(6 << 20, 11)
        reader, got = read_exactly_in_thread(peer, len(data))
        conn.send(data)
        s.guest.run_until(lambda: not conn.txq, 30)
        reader.join(30)
        assert bytes(got) == data and conn.state == "established"
    finally:
        s.close()


def test_no_rx_buffers_no_busy_loop_then_data_flows(short_dir):
    """A guest that posts no RX buffers: the host socket is not polled (no read interest),
    the back-end thread stays idle, and data flows once the guest posts buffers."""
    s = Setup(short_dir)
    try:
        client, conn = host_connects_and_guest_accepts(s)
        assert recv_line(client) == b"OK 1234\n"
        # Stop refilling RX: take every posted buffer out of play by letting the device
        # use them up, then post none.
        g = s.guest
        g.fill_rx = lambda kick=True: None  # type: ignore[method-assign]
        writer = threading.Thread(target=_send_quietly, args=(client, pattern(2 << 20, 3)),
                                  daemon=True)
        writer.start()
        g.run_until(lambda: g.rx_posted == 0, 10)
        time.sleep(0.2)
        backend_thread_cpu_before = _thread_cpu(s.backend.thread)
        time.sleep(0.5)
        used_cpu = _thread_cpu(s.backend.thread) - backend_thread_cpu_before
        assert used_cpu < 0.1, f"back-end thread used {used_cpu:.2f} s CPU while starved"
        interest = s.backend.call(lambda: s.backend.daemon.loop.interest())
        host_fd_readers = [fd for fd, mask in interest.items() if mask & 1]
        sock = s.backend.call(lambda: s.backend.backend.host.sock(
            next(iter(s.backend.backend.muxer._vms[3].conns))))
        assert sock.fileno() not in host_fd_readers
        del g.fill_rx
        received_before = len(conn.received)
        g.fill_rx()
        g.run_until(lambda: len(conn.received) > received_before, 5)
    finally:
        s.close()


def _thread_cpu(thread: threading.Thread) -> float:
    tid = thread.native_id
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def test_event_queue_transport_reset_after_frontend_reconnect(short_dir):
    s = Setup(short_dir, event_queue=True)
    try:
        g = s.guest
        server = s.host_listen(8000)
        conn = g.connect(8000)
        peer, _ = server.accept()
        assert conn.state == "established"
        for _ in range(5):
            g.pump(0.02)
        assert g.events == []  # a fresh device owes no reset
        # The front-end goes away (QEMU restart of the vhost-user connection) ...
        g.fe.close()
        time.sleep(0.2)
        # ... and reconnects: the back-end lost the connection state.
        g.restart(VhostUserFrontend.connect(s.cfg.socket))
        g.run_until(lambda: g.events == [0], 5)  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
        assert conn.state == "reset"
        conn2 = g.connect(8000)
        assert conn2.state == "established"
    finally:
        s.close()


def test_two_queue_frontend_like_qemu(short_dir):
    """QEMU's vhost-user-vsock-pci gives the back-end only rx and tx."""
    s = Setup(short_dir, event_queue=False)
    try:
        live = s.backend.call(lambda: s.backend.backend.device(3).live_queues)
        assert live == [0, 1]
        server = s.host_listen(8100)
        conn = s.guest.connect(8100)
        assert conn.state == "established"
        server.close()
    finally:
        s.close()


def test_query_vsock_connections_via_registry(setup):
    server = setup.host_listen(9000)
    conn = setup.guest.connect(9000)
    peer, _ = server.accept()
    conn.send(b"12345")
    setup.guest.pump(0.1)
    peer.settimeout(5)
    assert peer.recv(10) == b"12345"
    registry = setup.backend.daemon.registry
    rows = setup.backend.call(
        lambda: _execute(registry, "query-vsock-connections", {}))
    assert len(rows) == 1
    row = rows[0]
    assert row["cid"] == 3 and row["local-port"] == 9000 and row["peer-port"] == conn.local_port
    assert row["state"] == "established" and row["initiator"] == "guest"
    assert row["bytes-to-host"] == 5 and row["type"] == "stream"
    stats = setup.backend.call(lambda: _execute(registry, "query-vsock-stats", {"cid": 3}))
    assert stats[0]["connections"] == 1 and stats[0]["queues"] == [0, 1]
    with pytest.raises(Exception) as err:
        setup.backend.call(lambda: _execute(registry, "query-vsock-stats", {"cid": 99}))
    assert "DeviceNotFound" in repr(getattr(err.value, "error_class", err.value))


def _execute(registry, name, args):
    """What the QMP server does for ``execute``: validate, then call the handler."""
    command = registry.get(name)
    return command.handler(command.validate(args))
