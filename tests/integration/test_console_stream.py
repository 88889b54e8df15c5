"""Console ports streaming over real sockets: 64 MiB each way verified byte for byte, and a
port whose host peer never reads stalls only itself.

The daemon runs in a thread with the default ring implementation (the C ring when built);
the guest is tests/support/console_frontend.ConsoleGuest (PAGE_SIZE receive buffers, as
Linux posts them). Spec: virtio 1.2 §5.3.6 (Device Operation), DESIGN.md "The data plane".
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import pytest

from tests.support.console_frontend import ConsoleBackend, ConsoleGuest
from virtio.config import Config, ConsoleConfig, PortConfig

pytestmark = pytest.mark.timeout(120)

STREAM_BYTES = 64 << 20


def pattern(n: int, seed: int) -> bytes:
    """Deterministic non-repeating-looking bytes (blocks of a hash chain)."""
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    piece = hashlib.shake_256(block).digest(1 << 20)
    while len(out) < n:
        out += piece
        piece = bytes(piece[1:] + piece[:1])
    return bytes(out[:n])


@pytest.fixture
def backend(tmp_path):
    config = Config(consoles=(ConsoleConfig(
        socket=str(tmp_path / "vu.sock"), max_ports=4, socket_dir=str(tmp_path / "ports"),
        ports=(PortConfig("stream0"), PortConfig("stream1"))),))
    with ConsoleBackend(config) as be:
        yield be, tmp_path


def connect_host(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock


def test_64mib_each_way_byte_for_byte(backend, capsys):
    be, tmp = backend
    guest = ConsoleGuest.attach(str(tmp / "vu.sock"), ram_bytes=256 << 20)
    try:
        guest.driver_ok()
        guest.run_until(lambda: {"stream0"} <= guest.port_names(), 5, "port names")
        host = connect_host(tmp / "ports" / "stream0.sock")
        guest.run_until(lambda: guest.port("stream0").host_connected, 5, "PORT_OPEN 1")
        guest.open("stream0")
        to_guest = pattern(STREAM_BYTES, 1)
        to_host = pattern(STREAM_BYTES, 2)

        got_host = hashlib.sha256()
        host_count = [0]

        def host_reader() -> None:
            while host_count[0] < STREAM_BYTES:
                data = host.recv(1 << 20)
                if not data:
                    break
                got_host.update(data)
                host_count[0] += len(data)

        def host_writer() -> None:
            host.sendall(to_guest)

        start = time.monotonic()
        reader = threading.Thread(target=host_reader, daemon=True)
        writer = threading.Thread(target=host_writer, daemon=True)
        reader.start()
        writer.start()
        guest.write("stream0", to_host)
        got_guest = hashlib.sha256()
        io = guest.io[guest.port_id("stream0")]
        received = 0
        deadline = time.monotonic() + 90
        while received < STREAM_BYTES or host_count[0] < STREAM_BYTES:
            assert time.monotonic() < deadline, (received, host_count[0])
            guest.pump(0.01)
            if io.inbox:
                got_guest.update(io.inbox)
                received += len(io.inbox)
                io.inbox.clear()
        elapsed = time.monotonic() - start
        reader.join(5)
        writer.join(5)
        assert received == STREAM_BYTES and host_count[0] == STREAM_BYTES
        assert got_guest.digest() == hashlib.sha256(to_guest).digest()
        assert got_host.digest() == hashlib.sha256(to_host).digest()
        assert io.discarded == 0
        ports = {p["name"]: p for p in be.call(be.console.query_ports)}
        assert ports["stream0"]["bytes-to-guest"] == STREAM_BYTES
        assert ports["stream0"]["bytes-from-guest"] == STREAM_BYTES
        with capsys.disabled():
            print(f"\n64 MiB each way concurrently in {elapsed:.2f}s: "
                  f"{2 * STREAM_BYTES / elapsed / (1 << 20):.0f} MiB/s total")
        host.close()
    finally:
        guest.close()


def test_host_peer_that_never_reads_stalls_only_its_port(backend):
    be, tmp = backend
    guest = ConsoleGuest.attach(str(tmp / "vu.sock"), ram_bytes=128 << 20)
    try:
        guest.driver_ok()
        guest.run_until(lambda: {"stream0", "stream1"} <= guest.port_names(), 5, "names")
        stuck = connect_host(tmp / "ports" / "stream0.sock")  # never reads
        live = connect_host(tmp / "ports" / "stream1.sock")
        guest.run_until(lambda: guest.port("stream0").host_connected
                        and guest.port("stream1").host_connected, 5, "both connected")
        guest.open("stream0")
        guest.open("stream1")
        blocked = pattern(8 << 20, 3)
        flowing = pattern(16 << 20, 4)
        guest.write("stream0", blocked)
        guest.write("stream1", flowing)
        digest = hashlib.sha256()
        count = [0]

        def drain() -> None:
            while count[0] < len(flowing):
                data = live.recv(1 << 20)
                if not data:
                    break
                digest.update(data)
                count[0] += len(data)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        guest.run_until(lambda: count[0] >= len(flowing), 60, "the flowing port to finish")
        reader.join(5)
        assert digest.digest() == hashlib.sha256(flowing).digest()
        # The stuck port: the device took only what its socket buffer holds; the rest waits
        # in the guest (no byte dropped, no busy loop on the other port).
        stuck_port = next(p for p in be.call(be.console.query_ports) if p["name"] == "stream0")
        assert 0 < stuck_port["bytes-from-guest"] < len(blocked)
        assert guest.pending_out("stream0") > 0
        # The host side still receives data from the guest port after it starts reading.
        got = bytearray()
        stuck.settimeout(5)
        while len(got) < len(blocked):
            guest.pump(0.001)
            try:
                stuck.setblocking(False)
                got += stuck.recv(1 << 20)
            except BlockingIOError:
                pass
        assert bytes(got) == blocked
    finally:
        guest.close()
