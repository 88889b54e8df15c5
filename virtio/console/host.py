"""Host side of console ports: the I/O adapter that owns host sockets and the terminal.

One :class:`HostEndpoint` per port. It gives the device a connected byte stream as a pair of
non-blocking fds (``read_fd`` for host → guest, ``write_fd`` for guest → host; the same
socket for socket endpoints) and tells it when a host peer comes and goes, through
``on_state(connected: bool)``. The device moves the bytes itself (``Virtqueue.rx_from_fd`` /
``tx_to_fd``); this module never touches guest data.

Kinds (DESIGN.md "The console device", issue 3 point 4):

``listen:PATH`` — :class:`ListenEndpoint`
    We create the socket file with mode 0600 (a leftover *socket* file is unlinked, any other
    file is refused with :class:`HostEndpointError`) and serve one host client at a time.
    **A second client waits**: while a client is attached we do not ``accept()``, so further
    clients sit in the listen backlog (their ``connect()`` succeeds and what they write stays
    in their socket buffer) and the next one is accepted when the current client leaves. No
    byte of either client is lost or mixed with the other's. This is what QEMU's socket
    chardev does (it stops watching the listener while connected), minus its habit of
    dropping guest output while nobody is connected: we keep that in the guest's ring.
``connect:PATH`` — :class:`ConnectEndpoint`
    We connect to a host service, retrying with exponential back-off (``retry_s`` doubling up
    to ``max_retry_s``) until it appears, and reconnect the same way after it goes away.
``stdio`` — :class:`StdioEndpoint`
    The back-end's own stdin/stdout, for a console port. When stdin is a terminal it is put
    in raw mode (signals kept, so Ctrl-C still stops the process) and its window size is
    reported through ``on_resize(cols, rows)`` at start and on every SIGWINCH (only when the
    loop runs in the main thread, where Python delivers signals). When stdin is not a
    terminal there is no size and no resize. EOF on stdin counts as the host side leaving.

Spec: virtio 1.2 §5.3.6.2 (PORT_OPEN reflects the host side); STYLE R1 (the package's one
I/O adapter module), R13.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import struct
import sys
import termios
import threading
import tty
from typing import Any, Callable

from vhost_user.unix_socket import file_identity, listen_unix, unlink_if_ours
from virtio.config import Endpoint

from .errors import ConsoleError

__all__ = [
    "ConnectEndpoint",
    "HostEndpoint",
    "HostEndpointError",
    "ListenEndpoint",
    "StdioEndpoint",
    "make_endpoint",
]

log = logging.getLogger(__name__)

StateCallback = Callable[[bool], None]
ResizeCallback = Callable[[int, int], None]


class HostEndpointError(ConsoleError, OSError):
    """A host endpoint cannot be set up (socket path taken by a non-socket, bind failed).

    Also an ``OSError``, so callers that report failing paths at start-up catch it."""

    def __init__(self, path: str, reason: str) -> None:
        ConsoleError.__init__(self, f"{path}: {reason}")
        self.path = path
        self.reason = reason


class HostEndpoint:
    """Base: the current connection (``read_fd``/``write_fd``, None when nobody is attached)
    and the state callback. ``disconnect()`` is called by the device when the stream failed
    (EOF, EPIPE); the endpoint then waits for (or makes) the next connection."""

    kind = "none"

    def __init__(self, loop: Any, description: str, on_state: StateCallback) -> None:
        self.loop = loop
        self.description = description
        self.on_state = on_state
        self.read_fd: int | None = None
        self.write_fd: int | None = None
        self.closed = False
        self.connections = 0  # host peers attached so far (statistics, tests)

    @property
    def connected(self) -> bool:
        return self.read_fd is not None

    def start(self) -> None:
        """Begin listening/connecting (after the device has registered the port)."""

    def disconnect(self) -> None:
        """Drop the current host peer (EOF or error seen by the device)."""

    def close(self) -> None:
        """Stop everything and release every fd. Idempotent."""
        self.closed = True

    def __str__(self) -> str:
        return self.description


HOST_SOCKET_BUFFER_BYTES = int(os.environ.get("VMCHANNEL_HOST_SNDBUF", 1 << 20))
"""``SO_SNDBUF`` asked for on every host port socket (Linux doubles it, capped by
``net.core.wmem_max``). On a UNIX stream socket the *sender's* send buffer is the only
queue between the two ends, so it decides how many guest bytes one ``writev`` (one
``tx_to_fd`` batch, one Python round) can move before the host peer must run: with the
~208 KiB default a 32 KiB-chain port yields to the event loop every ~6 chains. A larger
buffer means fewer, larger batches (fixed cost per batch paid less often) at no cost while
idle: the memory is only used by bytes the host peer has not read yet, at most this much per
port. (``SO_RCVBUF`` does nothing for UNIX stream sockets; the host → guest direction is
bounded by the host peer's own send buffer.) ``VMCHANNEL_HOST_SNDBUF`` overrides it (0 keeps
the system default)."""


def _nonblocking_cloexec(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.set_inheritable(False)
    if HOST_SOCKET_BUFFER_BYTES > 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HOST_SOCKET_BUFFER_BYTES)
        except OSError as exc:  # a smaller buffer only costs speed
            log.debug("SO_SNDBUF %d: %s", HOST_SOCKET_BUFFER_BYTES, exc)


class _SocketEndpoint(HostEndpoint):
    """What listen and connect share: one connected stream socket at a time."""

    def __init__(self, loop: Any, description: str, on_state: StateCallback) -> None:
        super().__init__(loop, description, on_state)
        self.sock: socket.socket | None = None

    def _attach(self, sock: socket.socket) -> None:
        _nonblocking_cloexec(sock)
        self.sock = sock
        self.read_fd = self.write_fd = sock.fileno()
        self.connections += 1
        log.info("%s: host peer connected", self.description)
        self.on_state(True)

    def _detach(self) -> socket.socket | None:
        sock, self.sock = self.sock, None
        self.read_fd = self.write_fd = None
        return sock

    def disconnect(self) -> None:
        """The device saw EOF or an error: tell it (it stops watching the fds first), then
        close the socket and wait for / make the next connection."""
        sock = self._detach()
        if sock is None:
            return
        log.info("%s: host peer disconnected", self.description)
        try:
            self.on_state(False)
        finally:
            sock.close()
        if not self.closed:
            self._after_disconnect()

    def _after_disconnect(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        sock = self._detach()
        if sock is not None:
            sock.close()


class ListenEndpoint(_SocketEndpoint):
    """``listen:PATH`` (module docstring): we create the socket; one client at a time, the
    next waits in the backlog."""

    kind = "listen"
    BACKLOG = 8

    def __init__(self, loop: Any, path: str, on_state: StateCallback) -> None:
        super().__init__(loop, f"listen:{path}", on_state)
        self.path = path
        self.listener: socket.socket | None = None
        self._accepting = False

    def start(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise HostEndpointError(self.path, "directory does not exist")
        try:
            sock = listen_unix(self.path, self.BACKLOG)
        except OSError as exc:
            raise HostEndpointError(self.path, f"cannot listen: {exc}") from exc
        self.listener = sock
        self._identity = file_identity(self.path)
        self._watch_accept(True)

    def _watch_accept(self, on: bool) -> None:
        if self.listener is None or on == self._accepting:
            return
        if on:
            self.loop.add_reader(self.listener.fileno(), self._on_accept)
        else:
            self.loop.remove_reader(self.listener.fileno())
        self._accepting = on

    def _on_accept(self) -> None:
        if self.listener is None or self.sock is not None:
            self._watch_accept(False)
            return
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("%s: accept failed: %s", self.description, exc)
            return
        # One client at a time: further clients wait in the backlog until this one leaves.
        self._watch_accept(False)
        self._attach(conn)

    def _after_disconnect(self) -> None:
        self._watch_accept(True)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self.listener is not None:
            self._watch_accept(False)
            self.listener.close()
            self.listener = None
            unlink_if_ours(self.path, self._identity)


class ConnectEndpoint(_SocketEndpoint):
    """``connect:PATH`` (module docstring): connect, retry with exponential back-off,
    reconnect after the service goes away."""

    kind = "connect"

    def __init__(self, loop: Any, path: str, on_state: StateCallback, *,
                 retry_s: float = 0.05, max_retry_s: float = 2.0) -> None:
        super().__init__(loop, f"connect:{path}", on_state)
        self.path = path
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.attempts = 0
        self._delay = retry_s
        self._timer = None

    def start(self) -> None:
        self._try_connect()

    def _try_connect(self) -> None:
        self._timer = None
        if self.closed or self.sock is not None:
            return
        self.attempts += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                log.warning("%s: %s", self.description, exc)
            self._schedule()
            return
        self._delay = self.retry_s
        self._attach(sock)

    def _schedule(self) -> None:
        self._timer = self.loop.call_later(self._delay, self._try_connect)
        self._delay = min(self._delay * 2, self.max_retry_s)

    def _after_disconnect(self) -> None:
        self._delay = self.retry_s
        self._schedule()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().close()


_WINSIZE = struct.Struct("HHHH")


def terminal_size(fd: int) -> tuple[int, int] | None:
    """(cols, rows) of the terminal on ``fd``, or None if it is not a terminal."""
    try:
        rows, cols, _, _ = _WINSIZE.unpack(fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    except OSError:
        return None
    return cols, rows


class StdioEndpoint(HostEndpoint):
    """``stdio`` (module docstring): stdin → guest, guest → stdout, window size → RESIZE."""

    kind = "stdio"

    def __init__(self, loop: Any, on_state: StateCallback,
                 on_resize: ResizeCallback | None = None, *, stdin_fd: int | None = None,
                 stdout_fd: int | None = None) -> None:
        super().__init__(loop, "stdio", on_state)
        self.on_resize = on_resize
        self._in = sys.stdin.fileno() if stdin_fd is None else stdin_fd
        self._out = sys.stdout.fileno() if stdout_fd is None else stdout_fd
        self._saved_tty: list | None = None
        self._saved_flags: dict[int, int] = {}
        self._old_winch: Any = None
        self.is_tty = os.isatty(self._in)

    def start(self) -> None:
        for fd in {self._in, self._out}:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            self._saved_flags[fd] = flags
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        if self.is_tty:
            self._saved_tty = termios.tcgetattr(self._in)
            tty.setraw(self._in)
            attrs = termios.tcgetattr(self._in)
            attrs[3] |= termios.ISIG  # keep Ctrl-C
            termios.tcsetattr(self._in, termios.TCSANOW, attrs)
            if threading.current_thread() is threading.main_thread():
                self._old_winch = signal.signal(
                    signal.SIGWINCH, lambda *_: self.loop.call_soon(self.refresh_size))
            self.refresh_size()
        self.read_fd, self.write_fd = self._in, self._out
        self.connections += 1
        self.on_state(True)

    def refresh_size(self) -> None:
        """Read the terminal size and report it (SIGWINCH handler; callable directly)."""
        if not self.is_tty or self.on_resize is None or self.closed:
            return
        size = terminal_size(self._in)
        if size is not None:
            self.on_resize(*size)

    def disconnect(self) -> None:
        if self.read_fd is None:
            return
        self.read_fd = self.write_fd = None
        log.info("stdio: end of input")
        self.on_state(False)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.read_fd = self.write_fd = None
        if self._old_winch is not None:
            signal.signal(signal.SIGWINCH, self._old_winch)
            self._old_winch = None
        if self._saved_tty is not None:
            termios.tcsetattr(self._in, termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None
        for fd, flags in self._saved_flags.items():
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            except OSError:
                pass


def make_endpoint(loop: Any, endpoint: Endpoint, on_state: StateCallback,
                  on_resize: ResizeCallback | None = None) -> HostEndpoint:
    """The adapter for a configured :class:`virtio.config.Endpoint` (not started yet)."""
    if endpoint.kind == "listen":
        return ListenEndpoint(loop, endpoint.path, on_state)
    if endpoint.kind == "connect":
        return ConnectEndpoint(loop, endpoint.path, on_state)
    if endpoint.kind == "stdio":
        return StdioEndpoint(loop, on_state, on_resize)
    raise ValueError(f"unknown endpoint kind {endpoint.kind!r}")


def ensure_socket_dir(path: str) -> None:
    """Create a managed socket directory (mode 0700) if it does not exist."""
    os.makedirs(path, mode=0o700, exist_ok=True)
