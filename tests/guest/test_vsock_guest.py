"""The vsock device against a real guest: Debian QEMU 7.2 ``vhost-user-vsock-pci`` (2 queues,
shared memfd RAM) and a Linux 6.1 guest under TCG, served by our back-end on a thread.

One boot for the module. Covers: guest→host and host→guest streams of 16 MiB checked by
CRC-32, 64 concurrent connections, guest listens + host CONNECTs, host listens + guest
connects, seqpacket boundaries up to 64 KiB, and the real qemu-ga answering guest-ping and
guest-info through the back-end.

Spec: virtio 1.2 §5.10; hybrid vsock (``CONNECT <port>\\n`` / ``OK <port>\\n``).
"""

from __future__ import annotations

import json
import selectors
import shutil
import socket
import tempfile
import threading
import time
import zlib
from pathlib import Path

import pytest

from tests.guest.pattern import crc32, message, parse_helper_output, stream_pattern
from tests.guest.vm import GuestVM
from tests.support.vsock_guest import BackendThread
from virtio.config import VsockConfig

pytestmark = pytest.mark.guest

GUEST_CID = 3
MIB16 = 16 << 20


@pytest.fixture(scope="module")
def vsock_vm(guest_image):
    """Our back-end (thread) + one guest with vhost-user-vsock-pci attached to it."""
    workdir = Path(tempfile.mkdtemp(prefix="gvs-"))
    cfg = VsockConfig(guest_cid=GUEST_CID, socket=str(workdir / "vu.sock"),
                      uds_path=str(workdir / "v"))
    backend = BackendThread([cfg])
    vm = GuestVM(guest_image.kernel, guest_image.initramfs, workdir=workdir / "vm")
    (workdir / "vm").mkdir()
    vm.add_vhost_user_vsock(cfg.socket, GUEST_CID)
    try:
        with vm:
            assert vm.local_cid() == GUEST_CID  # read from our config space (GET_CONFIG)
            yield vm, cfg, backend
    finally:
        backend.close()
    shutil.rmtree(workdir, ignore_errors=True)


def host_listen(cfg: VsockConfig, port: int, kind=socket.SOCK_STREAM) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(f"{cfg.uds_path}_{port}")
    s.listen(128)
    s.settimeout(60)
    return s


def host_connect(cfg: VsockConfig, port: int, timeout: float = 30) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(timeout)
    c.connect(cfg.uds_path)
    c.sendall(b"CONNECT %d\n" % port)
    line = b""
    while not line.endswith(b"\n"):
        b = c.recv(1)
        assert b, f"back-end closed the connection to guest port {port} (refused?)"
        line += b
    assert line == b"OK %d\n" % port  # vhost-device-vsock convention (the default)
    return c


def test_guest_to_host_stream_16mib(vsock_vm):
    vm, cfg, _ = vsock_vm
    server = host_listen(cfg, 5000)
    try:
        helper = vm.vsock_helper("connect", "-c", 2, "-p", 5000, "-a", "send", "-n", MIB16,
                                 "-s", 3, "-w", 120)
        peer, _ = server.accept()
        peer.settimeout(120)
        crc, total, started = 0, 0, time.monotonic()
        while True:
            chunk = peer.recv(1 << 20)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            total += len(chunk)
        elapsed = time.monotonic() - started
        peer.close()
        status, out = helper.wait(timeout=60)
        assert status == 0, out
        assert total == MIB16
        assert crc == crc32(stream_pattern(MIB16, seed=3))
        print(f"guest->host 16 MiB in {elapsed:.1f} s ({MIB16 / elapsed / 1e6:.1f} MB/s)")
    finally:
        server.close()


def test_host_connects_guest_listens_stream_16mib(vsock_vm):
    vm, cfg, _ = vsock_vm
    helper = vm.vsock_helper("listen", "-p", 5001, "-a", "recv", "-n", MIB16, "-s", 4,
                             "-w", 120)
    helper.wait_for_output("LISTENING")
    client = host_connect(cfg, 5001)
    started = time.monotonic()
    client.sendall(stream_pattern(MIB16, seed=4))
    client.shutdown(socket.SHUT_WR)
    status, out = helper.wait(timeout=120)
    elapsed = time.monotonic() - started
    client.close()
    assert status == 0, out
    report = parse_helper_output(out)
    assert report.ok and report.conns[0].rcvd == MIB16
    assert report.conns[0].crc32_rx == crc32(stream_pattern(MIB16, seed=4))
    print(f"host->guest 16 MiB in {elapsed:.1f} s ({MIB16 / elapsed / 1e6:.1f} MB/s)")


def _echo_server(server: socket.socket, n_conns: int, stop: threading.Event,
                 seqpacket: bool = False) -> threading.Thread:
    """Accept ``n_conns`` clients and echo everything (message by message for seqpacket)."""

    def run() -> None:
        sel = selectors.DefaultSelector()
        server.setblocking(False)
        sel.register(server, selectors.EVENT_READ)
        accepted = open_ = 0
        pending: dict[socket.socket, bytearray] = {}
        while not stop.is_set() and (accepted < n_conns or open_):
            for key, _ev in sel.select(0.1):
                s = key.fileobj
                if s is server:
                    try:
                        peer, _ = server.accept()
                    except BlockingIOError:
                        continue
                    peer.setblocking(True)
                    peer.settimeout(60)
                    accepted += 1
                    open_ += 1
                    sel.register(peer, selectors.EVENT_READ)
                    continue
                data = s.recv(70000)
                if not data:
                    sel.unregister(s)
                    s.close()
                    open_ -= 1
                    continue
                s.sendall(data)  # blocking; the guest reads concurrently
        sel.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sixty_four_concurrent_connections_guest_connects(vsock_vm):
    vm, cfg, _ = vsock_vm
    server = host_listen(cfg, 5002)
    stop = threading.Event()
    echo = _echo_server(server, 64, stop)
    try:
        helper = vm.vsock_helper("connect", "-c", 2, "-p", 5002, "-k", 64, "-a", "roundtrip",
                                 "-n", 100_000, "-s", 20, "-w", 120)
        status, out = helper.wait(timeout=150)
        assert status == 0, out
        report = parse_helper_output(out)
        assert report.ok and len(report.conns) == 64
        for conn in report.conns:
            assert conn.rcvd == 100_000
            assert conn.crc32_rx == crc32(stream_pattern(100_000, seed=20 + conn.idx))
    finally:
        stop.set()
        echo.join(10)
        server.close()


def test_seqpacket_boundaries_guest_to_host_and_back(vsock_vm):
    vm, cfg, _ = vsock_vm
    server = host_listen(cfg, 5003, socket.SOCK_SEQPACKET)
    stop = threading.Event()
    echo = _echo_server(server, 1, stop, seqpacket=True)
    try:
        helper = vm.vsock_helper("connect", "-t", "seqpacket", "-c", 2, "-p", 5003,
                                 "-a", "roundtrip", "-m", 40, "-z", 65536, "-s", 7, "-w", 120)
        status, out = helper.wait(timeout=150)
        assert status == 0, out
        report = parse_helper_output(out)
        # The helper checks every echoed message's size and content (boundaries intact).
        assert report.ok and report.conns[0].msgs_rcvd == 40
        sizes = [len(message(7, j, 65536)) for j in range(40)]
        assert max(sizes) > 32768
    finally:
        stop.set()
        echo.join(10)
        server.close()


def test_seqpacket_host_to_guest_boundaries(vsock_vm):
    """Host SOCK_SEQPACKET service accepts the guest's connection and sends messages; the
    guest helper checks each message's size and content."""
    vm, cfg, _ = vsock_vm
    server = host_listen(cfg, 5004, socket.SOCK_SEQPACKET)
    try:
        helper = vm.vsock_helper("connect", "-t", "seqpacket", "-c", 2, "-p", 5004,
                                 "-a", "recv", "-m", 30, "-z", 65536, "-s", 9, "-w", 120)
        peer, _ = server.accept()
        peer.settimeout(60)
        for j in range(30):
            peer.send(message(9, j, 65536))
        peer.shutdown(socket.SHUT_WR)
        status, out = helper.wait(timeout=120)
        peer.close()
        assert status == 0, out
        report = parse_helper_output(out)
        assert report.ok and report.conns[0].msgs_rcvd == 30
    finally:
        server.close()


def test_qemu_guest_agent_over_vsock(vsock_vm):
    vm, cfg, backend = vsock_vm
    port = 1234
    qga = vm.start_qga(port=port)
    # qemu-ga 7.2 writes --pidfile only when it daemonizes (-d), so "ready" is "accepts":
    # until it listens the guest answers our CONNECT with RST and the back-end closes us.
    client = None
    deadline = time.monotonic() + 30
    while client is None:
        try:
            client = host_connect(cfg, port, timeout=30)
        except AssertionError:
            assert qga.running(), qga.output()
            assert time.monotonic() < deadline, "qemu-ga never accepted: " + qga.output()
            time.sleep(0.3)
    try:
        f = client.makefile("rwb")
        f.write(b'{"execute": "guest-ping"}\n')
        f.flush()
        assert json.loads(f.readline()) == {"return": {}}
        f.write(b'{"execute": "guest-info"}\n')
        f.flush()
        info = json.loads(f.readline())["return"]
        assert info["version"]
        assert any(c["name"] == "guest-ping" for c in info["supported_commands"])
        rows = backend.call(lambda: backend.backend.muxer.connections(GUEST_CID))
        assert any(r.peer_port == port and r.initiator == "host" for r in rows)
    finally:
        client.close()
        qga.kill()


def test_pause_and_resume_keep_the_device_working(vsock_vm):
    """QMP ``stop`` then ``cont``: QEMU stops the vhost-user rings (GET_VRING_BASE) and starts
    them again from the bases we gave, with the same kick and call eventfds. The back-end
    keeps the front-end connection and a stream after the resume arrives intact. (Runs
    last: a failure here would leave the module's VM without its device.)

    Spec: vhost-user VHOST_USER_GET_VRING_BASE, "Ring states"; virtio 1.2 §5.10."""
    vm, cfg, backend = vsock_vm
    vm.qmp("stop")
    assert vm.qmp("query-status")["status"] == "paused"
    vm.qmp("cont")
    server = host_listen(cfg, 5009)
    try:
        helper = vm.vsock_helper("connect", "-c", 2, "-p", 5009, "-a", "send", "-n", 1 << 20,
                                 "-s", 9, "-w", 60)
        peer, _ = server.accept()
        peer.settimeout(60)
        data = bytearray()
        while chunk := peer.recv(1 << 20):
            data += chunk
        peer.close()
        status, out = helper.wait(timeout=60)
        assert status == 0, out
        assert len(data) == 1 << 20 and crc32(bytes(data)) == crc32(stream_pattern(1 << 20, seed=9))
    finally:
        server.close()
