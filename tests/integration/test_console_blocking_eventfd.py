"""A front-end that passes *blocking* kick and call eventfds must not hang the back-end.

The back-end reads every new kick eventfd once when it starts watching it (a kick may have
come before the watch). QEMU passes non-blocking eventfds, but nothing in vhost-user says
so; a blocking one used to freeze the whole back-end in that read. The back-end now sets
O_NONBLOCK on every kick and call fd it receives.

Spec: vhost-user VHOST_USER_SET_VRING_KICK, VHOST_USER_SET_VRING_CALL.
"""

from __future__ import annotations

import os
import socket

import pytest

import vhost_user.frontend as frontend_module
from tests.support.console_frontend import ConsoleBackend, ConsoleGuest
from virtio.config import Config, ConsoleConfig, PortConfig

pytestmark = pytest.mark.timeout(30)


def test_blocking_eventfds_from_the_frontend_do_not_hang_the_backend(tmp_path, monkeypatch):
    created = []
    real_eventfd = os.eventfd

    def blocking_eventfd(initval=0, flags=0):
        fd = real_eventfd(initval, flags & ~os.EFD_NONBLOCK)
        created.append(fd)
        return fd

    config = Config(consoles=(ConsoleConfig(
        socket=str(tmp_path / "vu.sock"), max_ports=2, socket_dir=str(tmp_path / "ports"),
        ports=(PortConfig("p0"),)),))
    with ConsoleBackend(config):
        monkeypatch.setattr(frontend_module.os, "eventfd", blocking_eventfd)
        guest = ConsoleGuest.attach(str(tmp_path / "vu.sock"), port_queue_size=16)
        monkeypatch.undo()
        try:
            assert created and all(os.get_blocking(fd) is False for fd in created), \
                "the back-end shares the fds' open file description: it made them non-blocking"
            guest.driver_ok()
            guest.run_until(lambda: "p0" in guest.port_names(), 5, "port name")
            host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            host.connect(str(tmp_path / "ports" / "p0.sock"))
            host.settimeout(5)
            guest.run_until(lambda: guest.port("p0").host_connected, 5, "PORT_OPEN 1")
            guest.open("p0")
            guest.write("p0", b"through blocking eventfds")
            got = b""
            while len(got) < 25:
                guest.pump(0.01)
                try:
                    got += host.recv(100)
                except TimeoutError:
                    break
            assert got == b"through blocking eventfds"
            host.sendall(b"and back")
            guest.run_until(lambda: guest.io[guest.port_id("p0")].received >= 8, 5, "rx")
            assert guest.read("p0") == b"and back"
            host.close()
        finally:
            guest.close()
