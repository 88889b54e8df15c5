"""Console start-up with 1, 31 and 127 ports (127 = the vhost-user maximum), seen by a
Linux-like guest; 128 is refused with a clear error.

Spec: virtio 1.2 §5.3.6.2 (DEVICE_READY → DEVICE_ADD → PORT_READY → CONSOLE_PORT /
PORT_NAME / PORT_OPEN); vhost-user carries ring indices in 8 bits (queues 0..255).
"""

from __future__ import annotations

import os
import socket
import stat

import pytest

from tests.support.console_frontend import ConsoleBackend, ConsoleGuest
from virtio.config import Config, ConfigError, ConsoleConfig, Endpoint, PortConfig
from virtio.console.wire import port_queues

pytestmark = pytest.mark.timeout(60)


def make_config(tmp_path, nports: int) -> Config:
    """``nports`` ports: port 0 a console on a socket, the rest named ports."""
    ports = tuple(PortConfig(f"org.example.port.{i}") for i in range(1, nports))
    return Config(consoles=(ConsoleConfig(
        socket=str(tmp_path / "vu.sock"), max_ports=nports,
        socket_dir=str(tmp_path / "ports"),
        console=Endpoint("listen", str(tmp_path / "console.sock")), ports=ports),))


@pytest.mark.parametrize("nports", [1, 31, 127])
def test_startup_announces_every_port(tmp_path, nports):
    with ConsoleBackend(make_config(tmp_path, nports)) as be:
        queue_size = 16 if nports > 31 else 64
        guest = ConsoleGuest.attach(str(tmp_path / "vu.sock"), ram_bytes=64 << 20,
                                    port_queue_size=queue_size, control_queue_size=64)
        try:
            assert guest.max_nr_ports == nports
            assert guest.num_queues == 2 * (nports + 1)
            guest.driver_ok()
            expected = {"console"} | {f"org.example.port.{i}" for i in range(1, nports)}
            guest.run_until(lambda: guest.port_names() == expected, 20, "every port name")
            # The guest sees what /sys/class/virtio-ports/vport0pN/name shows.
            names = guest.model.sysfs_names()
            assert names["vport0p0"] == "console\n"
            assert len(names) == nports
            console = guest.model.ports[0]
            assert console.is_console and console.guest_connected
            assert not guest.model.dropped and not guest.model.warnings
            ports = be.call(be.console.query_ports)
            assert [p["id"] for p in ports] == list(range(nports))
            assert all(p["guest-ready"] for p in ports)
            assert ports[0]["console"] and ports[0]["guest-open"]
            for p in ports[1:]:
                path = tmp_path / "ports" / f"{p['name']}.sock"
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
                assert stat.S_ISSOCK(os.stat(path).st_mode)
            # The highest port works end to end (its queues are the last ones).
            last = f"org.example.port.{nports - 1}" if nports > 1 else "console"
            last_id = nports - 1
            if nports > 1:
                assert port_queues(last_id)[1] == guest.num_queues - 1
            path = (tmp_path / "ports" / f"{last}.sock" if nports > 1
                    else tmp_path / "console.sock")
            host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            host.connect(str(path))
            host.settimeout(5)
            guest.run_until(lambda: guest.model.ports[last_id].host_connected, 5, "PORT_OPEN")
            if nports > 1:
                guest.open(last)
            host.sendall(b"ping")
            guest.run_until(lambda: guest.io[last_id].received >= 4, 5, "host bytes")
            assert guest.read(last) == b"ping"
            guest.write(last, b"pong")
            assert host.recv(16) == b"pong"
            host.close()
        finally:
            guest.close()


def test_128_ports_are_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        ConsoleConfig(socket=str(tmp_path / "vu.sock"), max_ports=128)
    assert "127" in str(info.value) and "8 bits" in str(info.value)
    from virtio.cli import main

    assert main(["console", "--socket", str(tmp_path / "vu.sock"), "--max-ports", "128"]) == 2
