"""Zero-copy transmit through the real console device: the daemon in a thread, the
project's front-end and Linux-like guest (tests/support/console_frontend.py), a host peer on
the port's UNIX socket driven from the test.

* a slow peer gets several MiB of 32 KiB guest writes intact, and every transmit buffer comes
  back with no further kick (the device's edge watch on the socket does the releasing);
* a peer that stops reading while chains wait costs the device loop no CPU, and once it
  reads everything all chains come back; one that hangs up gets them released, and a new
  peer the rest of the stream;
* ``zero_copy = false`` keeps the port pump copying; the TOML key is accepted and checked.

The zero-copy assertions hold where the daemon's rings are the C ones (the default when
built, and CI's VMCHANNEL_RING=c); the Python pump always copies, and the same tests then
check that the copy path gives the same outcome.

Spec: virtio 1.2 §2.7.8 (a buffer is used once the device is done with it), §5.3.6 (console
transmitq), §2.7.10 (the guest kicks only for new buffers).
"""

from __future__ import annotations

import hashlib
import socket
import time

import pytest

from tests.support.console_frontend import ConsoleBackend, ConsoleGuest
from virtio.config import Config, ConfigError, ConsoleConfig, PortConfig, load_toml
from virtio.console.wire import port_queues

pytestmark = pytest.mark.timeout(120)

CHUNK = 32 << 10
PORT = "zc0"


def pattern(n: int, seed: int) -> bytes:
    block = hashlib.shake_256(seed.to_bytes(8, "little")).digest(1 << 16)
    return (block * (n // len(block) + 1))[:n]


class ZcConsole:
    """A console device with one port (``PORT``), a guest that writes in 32 KiB chunks, a
    connected host peer (``host``, non-blocking) and the guest's transmitq kicks counted."""

    def __init__(self, tmp_path, *, zero_copy: bool = True) -> None:
        config = Config(consoles=(ConsoleConfig(
            socket=str(tmp_path / "vu.sock"), max_ports=2, socket_dir=str(tmp_path / "ports"),
            ports=(PortConfig(PORT),), zero_copy=zero_copy),))
        self.be = ConsoleBackend(config)
        self.guest = ConsoleGuest.attach(str(tmp_path / "vu.sock"), tx_chunk=CHUNK)
        self.guest.driver_ok()
        self.guest.run_until(lambda: PORT in self.guest.port_names(), 5, "port name")
        self.host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.host.connect(str(tmp_path / "ports" / f"{PORT}.sock"))
        self.guest.run_until(lambda: self.guest.port(PORT).host_connected, 5, "PORT_OPEN 1")
        self.guest.open(PORT)
        self.host.setblocking(False)
        self.port_id = self.guest.port_id(PORT)
        self.txq = port_queues(self.port_id)[1]
        self.kicks = 0
        kick = self.guest._kick

        def counting_kick(index: int) -> None:
            if index == self.txq and self.guest.drivers[index].num_added:
                self.kicks += 1
            kick(index)

        self.guest._kick = counting_kick

    def pump_attr(self, name: str):
        """An attribute of the port's stream pump, read on the daemon's loop thread."""
        return self.be.call(lambda: getattr(self.be.console._io[self.port_id].pump, name))

    @property
    def c_pump(self) -> bool:
        return self.be.call(
            lambda: type(self.be.console._io[self.port_id].pump).__module__ == "ring.cpump")

    def edge_watched(self) -> set[int]:
        """The fds the daemon's loop watches with an edge-triggered writer."""
        return self.be.call(self.be.daemon.loop.edge_writers)

    def outstanding(self) -> int:
        return self.guest.pending_out(PORT)

    def read(self, limit: int) -> bytes:
        try:
            return self.host.recv(limit)
        except BlockingIOError:
            return b""

    def read_all(self, expected: int, piece: int = 1 << 20, pause_s: float = 0.0,
                 timeout_s: float = 60.0) -> bytes:
        """The peer reads until ``expected`` bytes came, ``piece`` at a time, pausing
        ``pause_s`` after each read while the guest handles its interrupts."""
        got = bytearray()
        deadline = time.monotonic() + timeout_s
        while len(got) < expected:
            assert time.monotonic() < deadline, (len(got), expected)
            got += self.read(piece)
            self.guest.pump(pause_s)
        return bytes(got)

    def close(self) -> None:
        self.host.close()
        self.guest.close()
        self.be.close()


@pytest.fixture
def console(tmp_path):
    c = ZcConsole(tmp_path)
    yield c
    c.close()


def test_a_slow_peer_gets_every_byte_and_the_guest_every_buffer_without_a_kick(console):
    c = console
    data = pattern(6 << 20, 1)  # 192 writes of 32 KiB: all posted at once (256-entry queue)
    c.guest.write(PORT, data)
    assert c.guest.io[c.port_id].out_bytes == 0 and c.kicks == 1
    got = c.read_all(len(data), piece=7000, pause_s=0.0005)
    assert got == data
    c.guest.run_until(lambda: c.outstanding() == 0, 10, "every transmit buffer back")
    assert c.kicks == 1  # the device released the last chains on its own
    if c.c_pump:
        assert c.pump_attr("bytes_by_reference") > 0
        assert c.pump_attr("deferred") == 0
    assert c.edge_watched() == set()  # nothing waits: the watch is gone


@pytest.mark.parametrize("total, read_first", [
    (CHUNK, 0),  # the socket keeps room: a level-triggered writer would fire non-stop
    (4 << 20, 256 << 10),  # the peer reads a little, then stops with the socket full
])
def test_a_peer_that_stops_reading_costs_no_cpu(console, total, read_first):
    c = console
    data = pattern(total, 2)
    c.guest.write(PORT, data)
    got = bytearray(c.read_all(read_first))
    c.guest.run_for(0.3)  # the device fills the socket and settles
    outstanding = c.outstanding()
    if c.c_pump:  # chains wait for the peer (the Python pump completed a lone chunk at once)
        assert c.pump_attr("deferred") > 0 and outstanding > 0
        assert c.edge_watched()  # the port's socket
    calls = []
    device = c.be.console
    real = device._pump_tx
    c.be.call(lambda: setattr(device, "_pump_tx", lambda io: (calls.append(1), real(io))))
    cpu_before = c.be.call(time.thread_time)
    time.sleep(0.5)
    cpu_used = c.be.call(time.thread_time) - cpu_before
    assert len(calls) <= 2, len(calls)  # no writer spinning on a socket with room
    assert cpu_used < 0.1, cpu_used
    assert c.outstanding() == outstanding
    got += c.read_all(len(data) - len(got))
    assert bytes(got) == data
    c.guest.run_until(lambda: c.outstanding() == 0, 10, "every transmit buffer back")
    assert c.kicks == 1
    if c.c_pump:
        assert c.pump_attr("deferred") == 0
    assert c.edge_watched() == set()


def test_a_peer_that_hangs_up_while_chains_wait_gets_them_released(console, tmp_path):
    """The hang-up disconnects the port; its waiting chains come back (their bytes went with
    the connection, as a closed socket's queue does) and a new peer gets the rest of the
    stream, intact."""
    c = console
    data = pattern(4 << 20, 5)
    c.guest.write(PORT, data)
    got = c.read_all(256 << 10, piece=64 << 10)
    c.guest.run_for(0.2)
    before = c.outstanding()
    if c.c_pump:
        assert c.pump_attr("deferred") > 0
    c.host.close()
    c.guest.run_until(lambda: not c.guest.port(PORT).host_connected, 5, "PORT_OPEN 0")
    c.guest.run_for(0.1)
    assert c.edge_watched() == set()  # (its duplicate would keep the dead socket open)
    if c.c_pump:  # the taken chains came back, the rest wait in the ring
        assert c.pump_attr("deferred") == 0 and c.outstanding() < before
    c.host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.host.connect(str(tmp_path / "ports" / f"{PORT}.sock"))
    c.host.setblocking(False)
    c.guest.run_until(lambda: c.guest.port(PORT).host_connected, 5, "PORT_OPEN 1")
    rest = bytearray()
    deadline = time.monotonic() + 30
    while c.outstanding():
        assert time.monotonic() < deadline, c.outstanding()
        rest += c.read(1 << 20)
        c.guest.pump(0.001)
    # every buffer is back, but the socket may still hold its last bytes: read until the
    # stream ends where the guest's did
    while not (rest and data.endswith(bytes(rest))):
        assert time.monotonic() < deadline, (len(rest), data.endswith(bytes(rest)))
        rest += c.read(1 << 20)
        c.guest.pump(0.001)
    assert data.startswith(got)
    assert c.kicks == 1


def test_zero_copy_false_keeps_the_port_copying(tmp_path):
    c = ZcConsole(tmp_path, zero_copy=False)
    try:
        data = pattern(2 << 20, 3)
        c.guest.write(PORT, data)
        assert c.read_all(len(data)) == data
        c.guest.run_until(lambda: c.outstanding() == 0, 10, "every transmit buffer back")
        assert c.pump_attr("zero_copy") is False
        assert c.pump_attr("bytes_by_reference") == 0
    finally:
        c.close()


def test_the_toml_key_zero_copy(tmp_path):
    path = tmp_path / "vmchannel.toml"
    body = '[[console]]\nsocket = "/tmp/vu.sock"\n'
    path.write_text(body)
    assert load_toml(path).consoles[0].zero_copy is True  # the default
    path.write_text(body + "zero_copy = false\n")
    assert load_toml(path).consoles[0].zero_copy is False
    for bad in ('"no"', "0", "1"):
        path.write_text(body + f"zero_copy = {bad}\n")
        with pytest.raises(ConfigError) as info:
            load_toml(path)
        assert info.value.key == "console.zero_copy"
        assert "console.zero_copy" in str(info.value)
