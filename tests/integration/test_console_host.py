"""Host side and life-cycle of console ports over real sockets: host reconnect, guest
reopen, connect:PATH retrying until the service appears, a second host client waiting,
emergency write, resize, control messages held while the guest posts no control buffers,
and a new front-end session attaching to the same process.

Spec: virtio 1.2 §5.3.5.1 (emerg_wr), §5.3.6.2 (PORT_OPEN, RESIZE); DESIGN.md "The console
device".
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from tests.support.console_frontend import ConsoleBackend, ConsoleGuest
from virtio.config import Config, ConsoleConfig, Endpoint, PortConfig
from virtio.console.wire import ControlEvent

pytestmark = pytest.mark.timeout(60)


def config(tmp_path, **kw) -> Config:
    base = dict(socket=str(tmp_path / "vu.sock"), max_ports=8,
                socket_dir=str(tmp_path / "ports"), ports=(PortConfig("p1"),))
    base.update(kw)
    return Config(consoles=(ConsoleConfig(**base),))


def host_connect(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.settimeout(5)
    return sock


def start_guest(tmp_path, names=("p1",), **kw) -> ConsoleGuest:
    guest = ConsoleGuest.attach(str(tmp_path / "vu.sock"), ram_bytes=32 << 20, **kw)
    guest.driver_ok()
    guest.run_until(lambda: set(names) <= guest.port_names(), 5, "port names")
    return guest


def port_open_values(guest, port_id) -> list[int]:
    out = []
    for raw in guest.control_received:
        pid, event, value = struct.unpack_from("<IHH", raw)
        if pid == port_id and event == ControlEvent.PORT_OPEN:
            out.append(value)
    return out


def test_host_reconnect_sends_port_open_0_then_1_and_data_continues(tmp_path):
    with ConsoleBackend(config(tmp_path)) as be:
        guest = start_guest(tmp_path)
        try:
            pid = guest.port_id("p1")
            path = tmp_path / "ports" / "p1.sock"
            first = host_connect(path)
            guest.run_until(lambda: guest.port("p1").host_connected, 5, "connected")
            guest.open("p1")
            first.sendall(b"one")
            guest.run_until(lambda: guest.io[pid].received >= 3, 5, "first data")
            first.close()
            guest.run_until(lambda: not guest.port("p1").host_connected, 5, "PORT_OPEN 0")
            second = host_connect(path)
            guest.run_until(lambda: guest.port("p1").host_connected, 5, "PORT_OPEN 1")
            assert port_open_values(guest, pid) == [0, 1, 0, 1]  # initial 0, then 1, 0, 1
            second.sendall(b"two")
            guest.run_until(lambda: guest.io[pid].received >= 6, 5, "second data")
            assert guest.read("p1") == b"onetwo"
            guest.write("p1", b"back")
            assert second.recv(16) == b"back"
            names = [n for n, d in be.events if n.startswith("PORT_HOST")]
            assert names == ["PORT_HOST_CONNECTED", "PORT_HOST_DISCONNECTED",
                             "PORT_HOST_CONNECTED"]
        finally:
            guest.close()


def test_second_host_client_waits_for_the_first_without_losing_bytes(tmp_path):
    with ConsoleBackend(config(tmp_path)):
        guest = start_guest(tmp_path)
        try:
            pid = guest.port_id("p1")
            path = tmp_path / "ports" / "p1.sock"
            first = host_connect(path)
            guest.run_until(lambda: guest.port("p1").host_connected, 5, "connected")
            guest.open("p1")
            second = host_connect(path)  # connect() succeeds: it waits in the backlog
            second.sendall(b"second client")
            first.sendall(b"first client|")
            guest.run_for(0.2)
            assert guest.read("p1") == b"first client|"
            first.close()
            guest.run_until(lambda: guest.io[pid].received >= 26, 5, "second client data")
            assert guest.read("p1") == b"second client"
            guest.write("p1", b"to second")
            assert second.recv(32) == b"to second"
        finally:
            guest.close()


def test_guest_reopen(tmp_path):
    with ConsoleBackend(config(tmp_path)) as be:
        guest = start_guest(tmp_path)
        try:
            pid = guest.port_id("p1")
            host = host_connect(tmp_path / "ports" / "p1.sock")
            guest.run_until(lambda: guest.port("p1").host_connected, 5, "connected")
            guest.open("p1")
            with pytest.raises(OSError):
                guest.open("p1")  # one opener per port (EBUSY)
            host.sendall(b"a")
            guest.run_until(lambda: guest.io[pid].received >= 1, 5, "a")
            guest.close_port("p1")
            host.sendall(b"while closed")
            guest.run_for(0.2)
            assert guest.io[pid].discarded == 0  # not read while nobody listens
            assert be.call(be.console.query_ports)[0]["bytes-to-guest"] == 1
            guest.open("p1")
            guest.run_until(lambda: guest.io[pid].received >= 13, 5, "held bytes")
            assert guest.read("p1") == b"awhile closed"
            opens = [d["open"] for d in be.events_named("VSERPORT_CHANGE") if d["id"] == "p1"]
            assert opens == [True, False, True]
        finally:
            guest.close()


def test_connect_port_retries_until_the_host_service_appears(tmp_path):
    service_path = tmp_path / "service.sock"
    cfg = config(tmp_path, ports=(PortConfig("svc", Endpoint("connect", str(service_path))),))
    with ConsoleBackend(cfg) as be:
        guest = start_guest(tmp_path, names=("svc",))
        try:
            guest.run_for(0.3)
            assert not guest.port("svc").host_connected
            service = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            service.bind(str(service_path))
            service.listen(1)
            service.settimeout(5)
            conn, _ = service.accept()  # the back-end's retry finds it
            conn.settimeout(5)
            guest.run_until(lambda: guest.port("svc").host_connected, 5, "connected")
            guest.open("svc")
            guest.write("svc", b"hello service")
            assert conn.recv(64) == b"hello service"
            conn.close()  # the service restarts: we reconnect
            guest.run_until(lambda: not guest.port("svc").host_connected, 5, "gone")
            conn2, _ = service.accept()
            conn2.settimeout(5)
            guest.run_until(lambda: guest.port("svc").host_connected, 5, "reconnected")
            conn2.sendall(b"again")
            pid = guest.port_id("svc")
            guest.run_until(lambda: guest.io[pid].received >= 5, 5, "data")
            assert guest.read("svc") == b"again"
            assert be.call(lambda: be.console._io[pid].endpoint.attempts) >= 2
        finally:
            guest.close()


def test_emergency_write_and_resize_reach_the_console_port(tmp_path):
    cfg = config(tmp_path, console=Endpoint("listen", str(tmp_path / "console.sock")),
                 cols=100, rows=40)
    with ConsoleBackend(cfg) as be:
        guest = start_guest(tmp_path, names=("console", "p1"))
        try:
            host = host_connect(tmp_path / "console.sock")
            guest.run_until(lambda: guest.model.ports[0].host_connected, 5, "connected")
            # The initial size went out with the port (RESIZE after PORT_OPEN).
            assert (guest.model.ports[0].cols, guest.model.ports[0].rows) == (100, 40)
            assert guest.fe.get_config(0, 4) == struct.pack("<HH", 100, 40)
            for ch in b"SOS":
                guest.emergency_write(ch)
            data = b""
            while len(data) < 3:
                data += host.recv(16)
            assert data == b"SOS"
            be.call(lambda: be.console.resize("console", 132, 43))
            guest.run_until(lambda: guest.model.ports[0].cols == 132, 5, "RESIZE")
            assert guest.model.ports[0].rows == 43
            assert guest.fe.get_config(0, 4) == struct.pack("<HH", 132, 43)
            # The console port streams like any other (the guest's hvc has it open).
            host.sendall(b"login: ")
            guest.run_until(lambda: guest.io[0].received >= 7, 5, "console input")
            assert bytes(guest.io[0].inbox) == b"login: "
        finally:
            guest.close()


def test_control_messages_wait_for_guest_buffers_and_keep_their_order(tmp_path):
    with ConsoleBackend(config(tmp_path)) as be:
        guest = ConsoleGuest.attach(str(tmp_path / "vu.sock"), ram_bytes=32 << 20,
                                    control_rx_buffers=1)
        try:
            guest.driver_ok()
            guest.run_until(lambda: len(guest.control_received) >= 1, 5, "first message")
            guest.run_for(0.1)
            assert len(guest.control_received) == 1  # PORT_ADD p1, then no more buffers
            for i in range(5):
                be.call(lambda i=i: be.console.add_port(f"late.{i}"))
            host = host_connect(tmp_path / "ports" / "p1.sock")
            guest.run_for(0.2)
            assert len(guest.control_received) == 1
            pending = be.call(lambda: be.console.control.pending)
            assert pending >= 5
            guest.auto_control_rx = True
            guest.post_control_rx(64)
            names = {"p1"} | {f"late.{i}" for i in range(5)}
            guest.run_until(lambda: names <= guest.port_names(), 5, "every port")
            guest.run_until(lambda: guest.port("p1").host_connected, 5, "p1 host")
            adds = [struct.unpack_from("<IHH", m)[0] for m in guest.control_received
                    if struct.unpack_from("<IHH", m)[1] == ControlEvent.DEVICE_ADD]
            assert adds == [1, 2, 3, 4, 5, 6]  # in the order the host made them
            host.close()
        finally:
            guest.close()


def test_new_frontend_session_attaches_to_the_same_process(tmp_path):
    with ConsoleBackend(config(tmp_path)) as be:
        host = None
        guest = start_guest(tmp_path)
        try:
            host = host_connect(tmp_path / "ports" / "p1.sock")
            guest.run_until(lambda: guest.port("p1").host_connected, 5, "connected")
            guest.open("p1")
            guest.write("p1", b"first session")
            assert host.recv(64) == b"first session"
        finally:
            guest.close()  # the front-end disconnects (QEMU quit)
        deadline = time.monotonic() + 5
        while not be.events_named("FRONTEND_DISCONNECTED"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert be.events_named("VSERPORT_CHANGE")[-1]["open"] is False
        guest = start_guest(tmp_path)  # a new session, a freshly booted guest
        try:
            pid = guest.port_id("p1")
            # The host peer stayed attached; the new guest is told so.
            guest.run_until(lambda: guest.port("p1").host_connected, 5, "host state")
            guest.open("p1")
            host.sendall(b"second session")
            guest.run_until(lambda: guest.io[pid].received >= 14, 5, "data")
            assert guest.read("p1") == b"second session"
            guest.write("p1", b"ok")
            assert host.recv(8) == b"ok"
            assert len(be.events_named("FRONTEND_CONNECTED")) == 2
        finally:
            guest.close()
            host.close()


def test_listen_socket_refuses_a_non_socket_file(tmp_path):
    (tmp_path / "ports").mkdir(mode=0o700)
    (tmp_path / "ports" / "p1.sock").write_text("not a socket")
    from virtio.console.host import HostEndpointError

    with pytest.raises(HostEndpointError):
        ConsoleBackend(config(tmp_path))
    assert (tmp_path / "ports" / "p1.sock").read_text() == "not a socket"
    assert os.stat(tmp_path / "ports").st_mode & 0o777 == 0o700
