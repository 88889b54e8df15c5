"""The console device's host adapters and state without a front-end: the stdio endpoint on
a pseudo-terminal (raw mode, window size, SIGWINCH) and on a pipe (no resize); snapshot and
restore of the port table.

Spec: issue 3 point 5 (console ports, RESIZE on window-size changes); DESIGN.md "Restart
without a guest reset".
"""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import termios

from virtio.config import ConsoleConfig, Endpoint, PortConfig
from virtio.console.device import ConsoleDevice
from virtio.console.host import StdioEndpoint
from virtio.loop import EventLoop


def set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_stdio_on_a_terminal_reports_size_and_sigwinch():
    loop = EventLoop()
    master, slave = pty.openpty()
    states, sizes = [], []
    set_winsize(slave, 120, 50)
    endpoint = StdioEndpoint(loop, states.append, lambda c, r: sizes.append((c, r)),
                             stdin_fd=slave, stdout_fd=slave)
    try:
        endpoint.start()
        assert states == [True] and endpoint.connected
        assert sizes == [(120, 50)]
        assert not termios.tcgetattr(slave)[3] & termios.ICANON  # raw mode
        set_winsize(slave, 90, 30)
        os.kill(os.getpid(), signal.SIGWINCH)
        for _ in range(20):
            loop.run_once(0.01)
            if len(sizes) > 1:
                break
        assert sizes[-1] == (90, 30)
    finally:
        endpoint.close()
        loop.close()
    assert termios.tcgetattr(slave)[3] & termios.ICANON  # terminal restored
    os.close(master)
    os.close(slave)


def test_stdio_on_a_pipe_has_no_size():
    loop = EventLoop()
    r, w = os.pipe()
    sizes = []
    endpoint = StdioEndpoint(loop, lambda c: None, lambda c, r_: sizes.append((c, r_)),
                             stdin_fd=r, stdout_fd=w)
    try:
        endpoint.start()
        assert not endpoint.is_tty
        endpoint.refresh_size()
        assert sizes == []
    finally:
        endpoint.close()
        loop.close()
        os.close(r)
        os.close(w)


def test_snapshot_and_restore_keep_ports_and_endpoints(tmp_path):
    loop = EventLoop()
    cfg = ConsoleConfig(socket=str(tmp_path / "vu.sock"), max_ports=8,
                        socket_dir=str(tmp_path / "ports"),
                        console=Endpoint("listen", str(tmp_path / "con.sock")),
                        ports=(PortConfig("a"), PortConfig("b")))
    device = ConsoleDevice(loop, cfg)
    device.add_port("c", f"listen:{tmp_path / 'c.sock'}")
    device.remove_port("a")
    state = device.snapshot()
    device.close()
    other = ConsoleDevice(loop, ConsoleConfig(socket=str(tmp_path / "vu2.sock"), max_ports=8,
                                              socket_dir=str(tmp_path / "ports2")))
    other.restore(state)
    try:
        ports = {p["name"]: p for p in other.query_ports()}
        assert set(ports) == {"console", "b", "c"}
        assert ports["c"]["host"] == f"listen:{tmp_path / 'c.sock'}"
        assert ports["console"]["console"] and ports["console"]["id"] == 0
        assert (tmp_path / "c.sock").exists()
        # A new port does not reuse the id freed by "a" first (ids spread out).
        assert other.add_port("d").id not in {ports["b"]["id"], ports["c"]["id"]}
    finally:
        other.close()
        loop.close()
