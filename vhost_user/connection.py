"""The vhost-user I/O adapter: UNIX stream sockets with SCM_RIGHTS on the event loop.

The only module of ``vhost_user`` that touches sockets and eventfds. It reads front-end
messages with ``recvmsg`` (never past a message boundary, so fds stay with their message),
feeds a :class:`~vhost_user.session.BackendSession`, sends its replies with ``sendmsg``,
watches the kick eventfd of every started queue (drains it, then ``session.on_kick``),
polls queues started without a kick fd, writes call eventfds for ``QueueHandle.notify`` and
flushes back-end channel messages (CONFIG_CHANGE_MSG).

Two ways to meet the front-end:

- :class:`Listener` — we bind ``path`` (mode 0600) and QEMU connects (QEMU's
  ``-chardev socket,path=...``). One front-end at a time; after it disconnects the device
  is reset and the next one is served.
- :class:`Connector` — QEMU listens (``server=on``) and we connect, retrying with back-off,
  and reconnect after a disconnect.

A malformed or unknown message costs one ERROR log line and that connection only (its fds
closed, its memory unmapped); the process and other devices keep running.

Spec: vhost-user "Introduction" (client or server), "Communication"; STYLE R13.
"""

from __future__ import annotations

import array
import errno
import functools
import logging
import os
import socket
import sys
from typing import Any, Callable

from vhost_user.channel import MAX_FDS_PER_MESSAGE, close_fds
from vhost_user.device import VhostUserDevice
from vhost_user.errors import FrontendProtocolError, HostIOError, StateError
from vhost_user.session import BackendSession, Reply
from vhost_user.unix_socket import file_identity, listen_unix, unlink_if_ours

__all__ = ["Connection", "Connector", "Listener", "signal_eventfd"]

log = logging.getLogger(__name__)

_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)
_CMSG_BYTES = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)


def signal_eventfd(fd: int) -> None:
    """Add 1 to an eventfd (a "call"). A full counter (EAGAIN) already means "signalled"."""
    try:
        os.write(fd, _EVENTFD_ONE)
    except BlockingIOError:
        pass
    except OSError as exc:
        log.warning("call eventfd %d: %s", fd, exc)


def _set_nonblocking(fd: int) -> None:
    try:
        os.set_blocking(fd, False)
    except OSError as exc:  # not ours to fix: the read/write paths tolerate errors
        log.warning("cannot make fd %d non-blocking: %s", fd, exc)


class _KickWatch:
    """The reader of one queue's kick eventfd: drain it and run the device, in one call.

    Registered as a bound method so a kick costs one Python call before the device's own
    work (no lambda, no generic guard layers). Kicks never queue back-end channel output
    (``notify_config`` wakes the connection itself), so nothing else runs here.

    Spec: vhost-user "Ring states" (a kick on a started ring means "process it").
    """

    __slots__ = ("fd", "_index", "_on_kick", "_read", "device_reader", "reader")

    def __init__(self, session: BackendSession, index: int, fd: int,
                 device_reader: Callable[[int], None] | None = None) -> None:
        self.fd = fd
        self._index = index
        self._on_kick = session.on_kick
        self._read = os.read
        self.device_reader = device_reader
        # What the loop calls: the device's own reader (QueueHandle.kick_reader), bound to
        # the fd, or ours.
        self.reader = (self.on_readable if device_reader is None
                       else functools.partial(device_reader, fd))

    def stop(self) -> None:
        """The watch was dropped: a call already queued (call_soon) does nothing."""
        self._on_kick = None

    def on_readable(self) -> None:
        on_kick = self._on_kick
        if on_kick is None:
            return
        if self.device_reader is not None:
            self.device_reader(self.fd)
            return
        try:
            self._read(self.fd, 8)
        except (BlockingIOError, InterruptedError):
            pass
        on_kick(self._index)


def _fds_from_ancillary(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            usable = len(data) - len(data) % arr.itemsize
            arr.frombytes(data[:usable])
            fds.extend(arr)
    return fds


class Connection:
    """One front-end connection: a connected socket, its session, kick watches and timers.

    ``on_close(connection)`` runs once when the connection ends for any reason.
    Extra keyword arguments go to :class:`BackendSession` (e.g. ``virtqueue_factory``).
    """

    def __init__(
        self,
        loop: Any,
        sock: socket.socket,
        device: VhostUserDevice,
        *,
        on_close: Callable[["Connection"], None] | None = None,
        name: str = "vhost-user",
        poll_interval_s: float = 0.001,
        **session_kwargs: Any,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.name = name
        self.log = log.getChild(name)
        self.on_close = on_close
        self.poll_interval_s = poll_interval_s
        self.closed = False
        sock.setblocking(False)
        self.session = BackendSession(device, signal=signal_eventfd, name=name, **session_kwargs)
        self.session.before_kick_close = self._unwatch_kick_fd
        self.session.wakeup = lambda: self.loop.call_soon(self._flush_backend)
        self._out: list[Reply] = []
        self._writing = False
        self._kick_watch: dict[int, _KickWatch] = {}  # queue -> its watched kick eventfd
        self._call_fds: dict[int, int] = {}  # queue -> call fd already made non-blocking
        self._poll_timers: dict[int, Any] = {}
        loop.add_reader(sock.fileno(), self._on_readable)
        self.log.info("front-end connected")

    # ---------------------------------------------------------------- front-end socket

    def _on_readable(self) -> None:
        if self.closed:
            return
        try:
            for _ in range(64):  # bounded work per wake-up: other fds get their turn
                wanted = self.session.channel.wanted_bytes()
                try:
                    data, ancdata, flags, _addr = self.sock.recvmsg(
                        wanted, _CMSG_BYTES, getattr(socket, "MSG_CMSG_CLOEXEC", 0)
                    )
                except (BlockingIOError, InterruptedError):
                    break
                fds = _fds_from_ancillary(ancdata)
                if flags & socket.MSG_CTRUNC:
                    close_fds(fds)
                    raise FrontendProtocolError("too many fds on one message (truncated)")
                self.session.receive(data, fds)
                replies, eof = self.session.process()
                self._send(replies)
                self._after_message()
                if eof:
                    self.log.info("front-end disconnected")
                    self.close()
                    return
        except FrontendProtocolError as exc:
            self.log.error("dropping front-end connection: %s", exc)
            self.log.debug("protocol error detail", exc_info=True)
            self.close()
        except (ConnectionError, OSError, StateError) as exc:
            self.log.error("front-end connection failed: %s", exc)
            self.log.debug("connection failure detail", exc_info=True)
            self.close()

    def _send(self, replies: list[Reply]) -> None:
        self._out.extend(replies)
        self._flush_out()

    def _flush_out(self) -> None:
        while self._out:
            reply = self._out[0]
            try:
                if reply.fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", reply.fds))]
                    sent = self.sock.sendmsg([reply.data], anc)
                else:
                    sent = self.sock.send(reply.data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent < len(reply.data):
                # fds went with the first byte; the rest is plain data.
                self._out[0] = Reply(reply.data[sent:], ())
                if not self._writing:
                    self._writing = True
                    self.loop.add_writer(self.sock.fileno(), self._on_writable)
                return
            self._out.pop(0)
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    def _on_writable(self) -> None:
        try:
            self._flush_out()
        except OSError as exc:
            self.log.error("front-end connection failed while writing: %s", exc)
            self.close()

    # ---------------------------------------------------------------- kicks and polling

    def _after_message(self) -> None:
        """Reconcile kick watches and poll timers with the session's started queues."""
        wanted = self.session.kick_fds()
        reader_of = self.session.kick_reader
        for index, watch in list(self._kick_watch.items()):
            if wanted.get(index) != watch.fd or watch.device_reader is not reader_of(index):
                watch.stop()
                self.loop.remove_reader(watch.fd)
                del self._kick_watch[index]
        for index, fd in wanted.items():
            if index not in self._kick_watch:
                # The front-end may pass a blocking eventfd; our read of it must never wait.
                _set_nonblocking(fd)
                watch = _KickWatch(self.session, index, fd, reader_of(index))
                self.loop.add_reader(fd, watch.reader)
                self._kick_watch[index] = watch
                # A kick may have arrived before we watched the fd: look once now.
                self.loop.call_soon(watch.on_readable)
        for vring in self.session.vrings:
            fd = vring.call_fd
            if fd is not None and self._call_fds.get(vring.index) != fd:
                _set_nonblocking(fd)  # a full counter must not block the loop
                self._call_fds[vring.index] = fd
        polled = set(self.session.polled_queues())
        for index in list(self._poll_timers):
            if index not in polled:
                self._poll_timers.pop(index).cancel()
        for index in polled:
            if index not in self._poll_timers:
                self._schedule_poll(index)
        self._flush_backend()

    def _unwatch_kick_fd(self, fd: int) -> None:
        """The session is about to close ``fd``: drop its watch first (while the fd is open,
        so epoll really forgets it)."""
        for index, watch in list(self._kick_watch.items()):
            if watch.fd == fd:
                watch.stop()
                self.loop.remove_reader(fd)
                del self._kick_watch[index]

    def _schedule_poll(self, index: int) -> None:
        def poll() -> None:
            if self.closed or index not in self._poll_timers:
                return
            self.session.on_kick(index)
            self._poll_timers[index] = self.loop.call_later(self.poll_interval_s, poll)

        self._poll_timers[index] = self.loop.call_later(self.poll_interval_s, poll)

    # ---------------------------------------------------------------- back-end channel

    def _flush_backend(self) -> None:
        if self.closed:
            return
        out = self.session.take_backend_output()
        fd = self.session.backend_fd
        for data in out:
            if fd is None:
                break
            try:
                os.write(fd, data)  # a few bytes; the front-end reads its channel promptly
            except OSError as exc:
                self.log.warning("back-end channel write failed: %s", exc)
                break

    # ---------------------------------------------------------------- teardown

    def close(self) -> None:
        """End the connection: stop watching, reset the device, close fds, unmap memory."""
        if self.closed:
            return
        self.closed = True
        for watch in self._kick_watch.values():
            watch.stop()
            self.loop.remove_reader(watch.fd)
        self._kick_watch.clear()
        for timer in self._poll_timers.values():
            timer.cancel()
        self._poll_timers.clear()
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        self.loop.remove_reader(self.sock.fileno())
        try:
            self.session.close()
        except Exception:  # the device's reset failed: still release the socket
            self.log.exception("device reset failed")
        finally:
            self.sock.close()
            if self.on_close is not None:
                self.on_close(self)


class Listener:
    """Serve ``device`` on a UNIX socket we create at ``path`` (mode 0600).

    One front-end at a time: a second one is refused (accepted and closed) while the first
    is connected. When a front-end goes, the device is reset and the next one is served.
    ``connection`` is the current :class:`Connection` or None.
    """

    def __init__(self, loop: Any, path: str, device: VhostUserDevice, *,
                 name: str | None = None,
                 on_frontend: Callable[[bool], None] | None = None,
                 **connection_kwargs: Any) -> None:
        self.loop = loop
        self.path = path
        self.device = device
        self.name = name or os.path.basename(path)
        self.log = log.getChild(self.name)
        self.connection: Connection | None = None
        self.on_frontend = on_frontend
        self._kwargs = connection_kwargs
        try:
            self.sock = listen_unix(path, 1)
        except OSError as exc:
            raise HostIOError(f"cannot listen on {path}: {exc}") from exc
        self._identity = file_identity(path)
        loop.add_reader(self.sock.fileno(), self._on_accept)
        self.log.info("listening on %s", path)

    def _on_accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.log.error("accept on %s failed: %s", self.path, exc)
            return
        if self.connection is not None:
            self.log.warning("refusing a second front-end on %s", self.path)
            conn.close()
            return
        self.connection = _open_connection(self, conn)

    def _on_connection_closed(self, connection: Connection) -> None:
        _connection_closed(self, connection)

    def close(self) -> None:
        """Stop listening, drop the current front-end and remove the socket file."""
        if self.connection is not None:
            self.connection.close()
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        unlink_if_ours(self.path, self._identity)


class Connector:
    """Connect to a front-end listening at ``path`` (QEMU ``server=on``), retrying with
    exponential back-off (``retry_s`` doubling up to ``max_retry_s``), and reconnect after a
    disconnect."""

    def __init__(self, loop: Any, path: str, device: VhostUserDevice, *,
                 name: str | None = None, retry_s: float = 0.05, max_retry_s: float = 2.0,
                 on_frontend: Callable[[bool], None] | None = None,
                 **connection_kwargs: Any) -> None:
        self.loop = loop
        self.path = path
        self.device = device
        self.name = name or os.path.basename(path)
        self.log = log.getChild(self.name)
        self.on_frontend = on_frontend
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.connection: Connection | None = None
        self._kwargs = connection_kwargs
        self._delay = retry_s
        self._timer = None
        self._closed = False
        self._try_connect()

    def _try_connect(self) -> None:
        self._timer = None
        if self._closed:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                self.log.warning("connect to %s: %s", self.path, exc)
            self._timer = self.loop.call_later(self._delay, self._try_connect)
            self._delay = min(self._delay * 2, self.max_retry_s)
            return
        self._delay = self.retry_s
        self.connection = _open_connection(self, sock)

    def _on_connection_closed(self, connection: Connection) -> None:
        _connection_closed(self, connection)
        if not self._closed:
            self._timer = self.loop.call_later(self._delay, self._try_connect)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.connection is not None:
            self.connection.close()


def _open_connection(endpoint: "Listener | Connector", sock: socket.socket) -> Connection:
    """Start serving a front-end on ``sock`` and tell the endpoint's owner."""
    connection = Connection(
        endpoint.loop, sock, endpoint.device, on_close=endpoint._on_connection_closed,
        name=endpoint.name, **endpoint._kwargs,
    )
    if endpoint.on_frontend is not None:
        endpoint.on_frontend(True)
    return connection


def _connection_closed(endpoint: "Listener | Connector", connection: Connection) -> None:
    if endpoint.connection is connection:
        endpoint.connection = None
    if endpoint.on_frontend is not None:
        endpoint.on_frontend(False)
