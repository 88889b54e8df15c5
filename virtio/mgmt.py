"""The management socket: a UNIX-socket QMP server on the event loop (the I/O adapter).

Spec: QEMU docs/interop/qmp-spec.rst — the protocol itself lives in ``virtio.qmp``
(sans-I/O); this module only accepts clients, moves bytes and reads the wall clock for event
timestamps.

Usage by the daemon::

    registry = CommandRegistry()
    registry.register("query-ports", handler, args_schema={"*device": "str"})
    server = ManagementServer(loop, "/run/vmchannel/mgmt.sock", registry,
                              on_quit=loop.stop)          # omit on_quit: no "quit" command
    server.emit("VSERPORT_CHANGE", {"id": "port1", "open": True})
    ...
    server.close()

Resources are bounded: at most ``max_clients`` clients; per client at most
``max_output_bytes`` of unsent output. While a client's unsent output is above half that
limit its input is not read (backpressure on commands); a client whose output still
overflows the limit (it stopped reading while events kept coming) is disconnected. Writes are
non-blocking; a slow client never blocks the loop.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Callable, Mapping

from vhost_user.unix_socket import file_identity, listen_unix, unlink_if_ours
from virtio.loop import EventLoop
from virtio.qmp import (
    MAX_MESSAGE_BYTES,
    CommandRegistry,
    JsonValue,
    QmpServerProtocol,
    ServerVersion,
    encode_event,
)

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 64 * 1024
MAX_OUTPUT_BYTES = 1 << 20
MAX_CLIENTS = 16


class _Client:
    """One accepted connection: its socket, its protocol object and its unsent output."""

    def __init__(self, server: "ManagementServer", sock: socket.socket, number: int) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.log = log.getChild(f"client{number}")
        self.protocol = QmpServerProtocol(
            server.registry, version=server.version, quit_allowed=server.on_quit is not None,
            max_message_bytes=server.max_message_bytes, logger=self.log)
        self.output = bytearray()
        self.reading = False
        self.writing = False
        self.closed = False

    # -- reading ------------------------------------------------------------------------
    def start(self) -> None:
        self.queue(self.protocol.greeting())
        self._update_reading()

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(READ_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.log.info("read failed: %s", exc)
            self.close()
            return
        if not data:
            self.log.info("client closed the connection")
            self.protocol.receive(b"")
            self.close()
            return
        self.queue(self.protocol.receive(data))
        if self.protocol.quit_requested and not self.closed:
            self.log.info("client executed quit")
            self._update_reading()
            self._maybe_finish_quit()

    def _update_reading(self) -> None:
        want = (not self.closed and not self.protocol.quit_requested
                and len(self.output) <= self.server.max_output_bytes // 2)
        if want and not self.reading:
            self.server.loop.add_reader(self.fd, self.on_readable)
        elif not want and self.reading:
            self.server.loop.remove_reader(self.fd)
        self.reading = want

    # -- writing ------------------------------------------------------------------------
    def queue(self, data: bytes) -> None:
        if not data or self.closed:
            return
        self.output += data
        self.flush()
        if self.closed:
            return
        if len(self.output) > self.server.max_output_bytes:
            self.log.warning("client does not read its output (%d bytes pending); "
                             "disconnecting it", len(self.output))
            self.close()
            return
        self._update_reading()

    def flush(self) -> None:
        while self.output:
            try:
                sent = self.sock.send(self.output)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.log.info("write failed: %s", exc)
                self.close()
                return
            del self.output[:sent]
        want = bool(self.output)
        if want and not self.writing:
            self.server.loop.add_writer(self.fd, self.on_writable)
        elif not want and self.writing:
            self.server.loop.remove_writer(self.fd)
        self.writing = want

    def on_writable(self) -> None:
        self.flush()
        if not self.closed:
            self._update_reading()
            self._maybe_finish_quit()

    def _maybe_finish_quit(self) -> None:
        if self.protocol.quit_requested and not self.output:
            self.close()

    # -- closing ------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.reading:
            self.server.loop.remove_reader(self.fd)
        if self.writing:
            self.server.loop.remove_writer(self.fd)
        self.reading = self.writing = False
        self.sock.close()
        self.server._forget(self)
        if self.protocol.quit_requested and self.server.on_quit is not None:
            # the answer is flushed (or the client went away): now ask the owner
            self.server.loop.call_soon(self.server.on_quit)


class ManagementServer:
    """A QMP server on a UNIX socket, serving many clients on ``loop``.

    ``path``: created with mode 0600. A stale socket file (nobody listening) is replaced; a
    socket someone still listens on, or any other kind of file, is refused with
    ``FileExistsError``. ``registry``: the commands beyond the QMP built-ins.
    ``on_quit``: if given, clients may execute ``quit``; the answer is flushed, the client
    is closed, then ``on_quit()`` runs from the loop (the daemon decides what stopping
    means). ``clock``: Unix time for event timestamps (``time.time``).
    """

    def __init__(self, loop: EventLoop, path: str, registry: CommandRegistry, *,
                 on_quit: Callable[[], None] | None = None,
                 version: ServerVersion = ServerVersion(),
                 max_clients: int = MAX_CLIENTS,
                 max_output_bytes: int = MAX_OUTPUT_BYTES,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        self.loop = loop
        self.path = path
        self.registry = registry
        self.on_quit = on_quit
        self.version = version
        self.max_clients = max_clients
        self.max_output_bytes = max_output_bytes
        self.max_message_bytes = max_message_bytes
        self._clock = clock
        self._clients: dict[int, _Client] = {}
        self._accepted = 0
        self._sock = listen_unix(path, 16)
        self._identity = file_identity(path)
        self._closed = False
        loop.add_reader(self._sock.fileno(), self._on_accept)
        log.info("management socket listening on %s", path)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def emit(self, event_name: str, data: Mapping[str, JsonValue] | None = None) -> None:
        """Send an asynchronous event to every client in command mode.

        Spec: qmp-spec.rst "Asynchronous events"; clients still negotiating capabilities do
        not get it ("Asynchronous messages are not delivered either"). Call from the loop's
        thread (other threads: ``loop.call_soon(lambda: server.emit(...))``).
        """
        if self._closed:
            return
        try:
            timestamp_s: float | None = self._clock()
        except OSError:
            timestamp_s = None               # the spec's "-1" timestamp
        encoded = encode_event(event_name, data, timestamp_s)
        for client in list(self._clients.values()):
            client.queue(client.protocol.event(encoded))

    def close(self) -> None:
        """Stop listening, remove the socket file (if still ours), drop every client after
        one last non-blocking attempt to send what they have pending."""
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self._sock.fileno())
        self._sock.close()
        unlink_if_ours(self.path, self._identity)
        for client in list(self._clients.values()):
            client.flush()
            client.close()

    # -- internals ----------------------------------------------------------------------
    def _on_accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("accept on %s failed: %s", self.path, exc)
                return
            if len(self._clients) >= self.max_clients:
                log.warning("refusing a management client: %d clients already connected",
                            len(self._clients))
                sock.close()
                continue
            sock.setblocking(False)
            self._accepted += 1
            client = _Client(self, sock, self._accepted)
            self._clients[client.fd] = client
            client.log.info("management client connected")
            client.start()

    def _forget(self, client: _Client) -> None:
        if self._clients.get(client.fd) is client:
            del self._clients[client.fd]


