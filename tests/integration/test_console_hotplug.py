"""Hot-plugging console ports while data flows: through the management socket (QEMU's
qemu.qmp client) and through the library API; removing a port the guest has open;
re-adding a removed name; name validation errors.

Spec: virtio 1.2 §5.3.6.2 (DEVICE_ADD / DEVICE_REMOVE at run time); QEMU's VSERPORT_CHANGE.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading

import pytest

from tests.support.console_frontend import ConsoleBackend, ConsoleGuest
from virtio.config import Config, ConsoleConfig, PortConfig
from virtio.console.errors import DuplicatePortName, InvalidPortName, NoFreePortId

qmp = pytest.importorskip("qemu.qmp")

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env(tmp_path):
    config = Config(
        consoles=(ConsoleConfig(socket=str(tmp_path / "vu.sock"), max_ports=4,
                                socket_dir=str(tmp_path / "ports"),
                                ports=(PortConfig("busy"),)),),
        mgmt_socket=str(tmp_path / "mgmt.sock"))
    with ConsoleBackend(config) as be:
        guest = ConsoleGuest.attach(str(tmp_path / "vu.sock"), ram_bytes=64 << 20)
        try:
            guest.driver_ok()
            guest.run_until(lambda: "busy" in guest.port_names(), 5, "busy port")
            yield be, guest, tmp_path
        finally:
            guest.close()


class QmpThread:
    """A qemu.qmp QMPClient on its own asyncio loop in a thread (the guest pumps here)."""

    def __init__(self, path: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = qmp.QMPClient("test")
        self.events: list[dict] = []
        self.run(self.client.connect(path))

        async def listen() -> None:
            async for event in self.client.events:
                self.events.append(dict(event))

        self.listener = asyncio.run_coroutine_threadsafe(listen(), self.loop)

    def run(self, coro, timeout_s: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def execute(self, cmd: str, args: dict | None = None):
        return self.run(self.client.execute(cmd, args))

    def close(self) -> None:
        self.listener.cancel()
        self.run(self.client.disconnect())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Stream:
    """Host side of the busy port: echo-free counting reader + writer threads."""

    def __init__(self, path, total: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.total = total
        self.data = bytes(hashlib.shake_256(b"busy").digest(total))
        self.received = hashlib.sha256()
        self.count = 0
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _write(self) -> None:
        try:
            self.sock.sendall(self.data)
        except OSError:
            pass  # the test failed and tore the port down

    def _read(self) -> None:
        while self.count < self.total:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return
            self.received.update(chunk)
            self.count += len(chunk)


def _start_busy(guest, tmp_path, total=8 << 20):
    stream = Stream(tmp_path / "ports" / "busy.sock", total)
    guest.run_until(lambda: guest.port("busy").host_connected, 5, "busy connected")
    guest.open("busy")
    guest.write("busy", stream.data)
    return stream


def _finish_busy(guest, stream) -> None:
    io = guest.io[guest.port_id("busy")]
    digest = hashlib.sha256()
    got = 0

    def done() -> bool:
        nonlocal got
        if io.inbox:
            digest.update(io.inbox)
            got += len(io.inbox)
            io.inbox.clear()
        return got >= stream.total and stream.count >= stream.total

    guest.run_until(done, 30, "busy stream")
    assert digest.digest() == hashlib.sha256(stream.data).digest()
    assert stream.received.digest() == hashlib.sha256(stream.data).digest()


def test_hotplug_through_qmp_under_traffic(env):
    be, guest, tmp_path = env
    client = QmpThread(str(tmp_path / "mgmt.sock"))
    try:
        stream = _start_busy(guest, tmp_path)
        hot_path = tmp_path / "hot.sock"
        added = client.execute("port-add", {"name": "hot.0", "host": f"listen:{hot_path}"})
        assert added["name"] == "hot.0" and added["id"] == 2
        dflt = client.execute("port-add", {"name": "hot.1"})
        assert dflt["host"] == f"listen:{tmp_path / 'ports' / 'hot.1.sock'}"
        guest.run_until(lambda: {"hot.0", "hot.1"} <= guest.port_names(), 5, "hot ports")
        # Use the new port while the busy one streams.
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.connect(str(hot_path))
        host.settimeout(5)
        guest.run_until(lambda: guest.port("hot.0").host_connected, 5, "hot connected")
        guest.open("hot.0")
        guest.write("hot.0", b"from the guest")
        assert host.recv(64) == b"from the guest"
        ports = {p["name"]: p for p in client.execute("query-ports")}
        assert ports["hot.0"]["guest-open"] and ports["hot.0"]["host-connected"]
        assert set(ports["hot.0"]) >= {"id", "name", "console", "guest-open", "host-connected",
                                       "bytes-to-guest", "bytes-from-guest"}
        # Remove it while the guest has it open.
        assert client.execute("port-remove", {"name": "hot.0"}) == {}
        guest.run_until(lambda: "hot.0" not in guest.port_names(), 5, "hot.0 removed")
        assert host.recv(16) == b""  # the host peer is disconnected
        assert not hot_path.exists()
        # Errors are precise.
        for args, fragment in (({"name": "busy"}, "already exists"),
                               ({"name": "../evil"}, "invalid port name"),
                               ({"name": "x" * 251}, "longer than 250")):
            with pytest.raises(qmp.ExecuteError) as info:
                client.execute("port-add", args)
            assert fragment in str(info.value)
        with pytest.raises(qmp.ExecuteError) as info:
            client.execute("port-remove", {"name": "nope"})
        assert info.value.error_class == "DeviceNotFound"
        # Re-adding the removed name works (a fresh port; full table is a clear error).
        client.execute("port-add", {"name": "hot.0", "host": f"listen:{hot_path}"})
        with pytest.raises(qmp.ExecuteError) as info:
            client.execute("port-add", {"name": "one.too.many"})
        assert "in use" in str(info.value)
        guest.run_until(lambda: "hot.0" in guest.port_names(), 5, "hot.0 re-added")
        guest.open("hot.0")
        _finish_busy(guest, stream)
        guest.run_for(0.1)
        names = [e["event"] for e in client.events]
        assert "PORT_ADDED" in names and "PORT_REMOVED" in names
        changes = [e["data"] for e in client.events if e["event"] == "VSERPORT_CHANGE"]
        assert {"id": "hot.0", "open": True} in [{k: c[k] for k in ("id", "open")}
                                                for c in changes]
        assert {"id": "hot.0", "open": False} in [{k: c[k] for k in ("id", "open")}
                                                 for c in changes]
        assert all(io.discarded == 0 for io in guest.io.values())
    finally:
        client.close()


def test_hotplug_through_the_library_api(env):
    be, guest, tmp_path = env
    dev = be.console
    stream = _start_busy(guest, tmp_path)
    port = be.call(lambda: dev.add_port("lib.0"))
    guest.run_until(lambda: "lib.0" in guest.port_names(), 5, "lib.0")
    guest.open("lib.0")
    assert guest.port("lib.0").id == port.id
    for bad, exc in (("busy", DuplicatePortName), ("a/b", InvalidPortName), ("", InvalidPortName)):
        with pytest.raises(exc):
            be.call(lambda: dev.add_port(bad))
    be.call(lambda: dev.add_port("lib.1"))
    with pytest.raises(NoFreePortId):
        be.call(lambda: dev.add_port("lib.2"))
    be.call(lambda: dev.remove_port("lib.0"))  # open in the guest
    guest.run_until(lambda: "lib.0" not in guest.port_names(), 5, "lib.0 gone")
    assert be.events_named("VSERPORT_CHANGE")[-1]["open"] is False
    be.call(lambda: dev.add_port("lib.0"))
    guest.run_until(lambda: "lib.0" in guest.port_names(), 5, "lib.0 back")
    _finish_busy(guest, stream)


def test_removed_port_stale_transmit_buffers_come_back_empty(env):
    """Guest bytes queued on a port whose host side never connected are returned with used
    length 0 when the port is removed, before the guest hears of the removal."""
    be, guest, tmp_path = env
    be.call(lambda: be.console.add_port("stale"))
    guest.run_until(lambda: "stale" in guest.port_names(), 5, "stale port")
    guest.open("stale")
    port_id = guest.port_id("stale")
    tx = guest.drivers[2 * port_id + 3]
    # Post directly (Linux would block the writer while the host is away; a hostile or
    # racing guest might not).
    for _ in range(3):
        tx.add_buf(out=[b"queued bytes"])
    guest._kick(2 * port_id + 3)
    guest.run_for(0.1)
    assert tx.outstanding == 3  # no host peer: the device keeps them
    be.call(lambda: be.console.remove_port("stale"))
    guest.run_until(lambda: tx.outstanding == 0, 5, "stale buffers returned")
    guest.run_until(lambda: "stale" not in guest.port_names(), 5, "removed")
