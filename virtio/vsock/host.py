"""The vsock I/O adapter: host UNIX sockets on the event loop, executing the muxer's actions.

The only module of ``virtio.vsock`` that touches sockets. It

* listens on each VM's ``uds_path`` (``SOCK_STREAM``, mode 0600) and runs the hybrid-vsock
  handshake of every accepted client (``CONNECT <port>\\n``, parsed by
  `virtio.vsock.handshake.HandshakeParser`; a malformed line, EOF or no line within
  ``handshake_timeout_s`` closes that client only); a complete line becomes
  ``muxer.host_connect_request``;
* connects, non-blocking, to ``<uds_path>_<port>`` for a guest's connection request
  (``SOCK_STREAM`` or ``SOCK_SEQPACKET`` by the connection's type). A full listen backlog
  (``EAGAIN`` on an ``AF_UNIX`` socket) is retried every ``connect_retry_s`` until the VM's
  connect timeout; any other failure is reported at once (the guest gets an RST);
* executes the muxer's actions (``ConnectHost``, ``WriteHost``, ``ShutdownHost``,
  ``CloseHost``, ``ReplyHost``, ``SetHostInterest``, ``SetTimer``, ``RxReady``) in order,
  reporting the results back to the muxer at once (``host_write_done`` before the caller
  completes the TX chain a ``WriteHost`` points into);
* watches host sockets level-triggered, only while the muxer wants it (``SetHostInterest``):
  once a socket is known readable the muxer drops the read interest until the guest has
  consumed it, so a guest that posts no RX buffers costs no CPU.

Reading host sockets into guest RX buffers is the device's job (`virtio.vsock.device`); it
asks here for the socket of a connection (`VsockHost.sock`) and whether the peer hung up
(`VsockHost.hung_up`).

Spec: the hybrid-vsock convention (Firecracker ``docs/vsock.md``, rust-vmm vhost-device-vsock
README); virtio 1.2 §5.10.6 (Device Operation). STYLE R1/R13: the one I/O module here.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable

from vhost_user.unix_socket import file_identity, listen_unix, unlink_if_ours

from .conn import (Action, CloseHost, ConnectHost, ConnKey, ReplyHost, RxReady,
                   SetHostInterest, SetTimer, ShutdownHost, WriteHost)
from .errors import HandshakeError, TableFullError, UnknownConnectionError
from .handshake import HANDSHAKE_TIMEOUT_S, MAX_LINE_BYTES, HandshakeParser
from .muxer import VsockMuxer
from .wire import Type

log = logging.getLogger(__name__)

#: Most buffers in one sendmsg (IOV_MAX is 1024 on Linux).
IOV_MAX = 1024
#: Clients accepted per listener wake-up (other fds get their turn).
ACCEPT_BATCH = 64
_SEND_FLAGS = socket.MSG_NOSIGNAL
_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)


@dataclass(slots=True)
class _HostSock:
    """The host socket of one connection and the events we watch it for."""

    sock: socket.socket
    read: bool = False
    write: bool = False


@dataclass(slots=True)
class _Handshake:
    """An accepted client still writing its ``CONNECT <port>`` line."""

    cid: int
    sock: socket.socket
    parser: HandshakeParser
    timer: Any = None


@dataclass(slots=True)
class _Connecting:
    """A guest-initiated connect waiting for room in the host service's backlog."""

    sock: socket.socket
    path: str
    give_up_at: float
    timer: Any = None


@dataclass(slots=True)
class _Listener:
    cid: int
    path: str
    sock: socket.socket
    identity: tuple[int, int, int]
    handshakes: dict[int, _Handshake] = field(default_factory=dict)  # fd -> client


@dataclass(slots=True)
class HostStats:
    """Counters of the host side of one VM (``query-vsock-stats``)."""

    clients_accepted: int = 0
    handshakes_failed: int = 0
    handshakes_timed_out: int = 0
    handshakes_refused_busy: int = 0
    connects_refused: int = 0


class VsockHost:
    """Host sockets of every VM of one muxer (see module docstring).

    ``on_rx_ready(cid)`` is called for ``RxReady``: the device should serve its RX queue.
    """

    def __init__(self, loop: Any, muxer: VsockMuxer, *, on_rx_ready: Callable[[int], None],
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 max_pending_handshakes: int = 128, connect_retry_s: float = 0.01,
                 on_readable: Callable[[ConnKey, socket.socket], bool] | None = None
                 ) -> None:
        self.loop = loop
        self.muxer = muxer
        self.on_rx_ready = on_rx_ready
        #: ``on_readable(key, sock)``: host socket ``sock`` of ``key`` became readable: the
        #: device's RX pump may serve it at once (True) instead of `muxer.host_readable`
        #: (the general path)
        self.on_readable = on_readable
        self.handshake_timeout_s = handshake_timeout_s
        self.max_pending_handshakes = max_pending_handshakes
        self.connect_retry_s = connect_retry_s
        self._socks: dict[ConnKey, _HostSock] = {}
        self._timers: dict[ConnKey, tuple[Any, float]] = {}  # loop timer, due at
        self._connecting: dict[ConnKey, _Connecting] = {}
        self._listeners: dict[int, _Listener] = {}
        self.stats: dict[int, HostStats] = {}
        self.closed = False

    # -- listeners ------------------------------------------------------------------------
    def listen(self, cid: int, uds_path: str) -> None:
        """Listen for hybrid-vsock clients of VM ``cid`` at ``uds_path`` (a stale socket
        file there is replaced; any other file is refused with ``FileExistsError``)."""
        sock = listen_unix(uds_path, 128)
        listener = _Listener(cid, uds_path, sock, file_identity(uds_path))
        self._listeners[cid] = listener
        self.stats.setdefault(cid, HostStats())
        self.loop.add_reader(sock.fileno(), lambda: self._accept(listener))
        log.info("vsock cid %d: hybrid-vsock clients on %s", cid, uds_path)

    def unlisten(self, cid: int) -> None:
        listener = self._listeners.pop(cid, None)
        if listener is None:
            return
        for hs in list(listener.handshakes.values()):
            self._drop_handshake(listener, hs)
        self.loop.remove_reader(listener.sock.fileno())
        listener.sock.close()
        unlink_if_ours(listener.path, listener.identity)

    def _accept(self, listener: _Listener) -> None:
        stats = self.stats[listener.cid]
        for _ in range(ACCEPT_BATCH):
            try:
                client, _addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE & co: keep the listener, try again later
                log.warning("vsock cid %d: accept on %s failed: %s", listener.cid,
                            listener.path, exc)
                return
            stats.clients_accepted += 1
            if len(listener.handshakes) >= self.max_pending_handshakes:
                stats.handshakes_refused_busy += 1
                log.warning("vsock cid %d: %d handshakes pending: closing a new client",
                            listener.cid, len(listener.handshakes))
                client.close()
                continue
            client.setblocking(False)
            hs = _Handshake(listener.cid, client,
                            HandshakeParser(started_at=self.loop.time(),
                                            timeout_s=self.handshake_timeout_s))
            fd = client.fileno()
            listener.handshakes[fd] = hs
            hs.timer = self.loop.call_later(self.handshake_timeout_s,
                                            lambda: self._handshake_expired(listener, hs))
            self.loop.add_reader(fd, lambda: self._handshake_readable(listener, hs))

    def _handshake_readable(self, listener: _Listener, hs: _Handshake) -> None:
        try:
            data = hs.sock.recv(MAX_LINE_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("vsock cid %d: handshake client failed: %s", hs.cid, exc)
            self._drop_handshake(listener, hs)
            return
        try:
            request = hs.parser.feed(data)
        except HandshakeError as exc:
            self.stats[hs.cid].handshakes_failed += 1
            log.info("vsock cid %d: %s: closing that client", hs.cid, exc)
            self._drop_handshake(listener, hs)
            return
        if request is None:
            return
        self._forget_handshake(listener, hs)
        now = self.loop.time()
        try:
            key, actions = self.muxer.host_connect_request(hs.cid, request.port, now,
                                                           request.leftover)
        except TableFullError as exc:
            log.warning("vsock cid %d: %s: closing the client for port %d", hs.cid, exc,
                        request.port)
            hs.sock.close()
            return
        self._socks[key] = _HostSock(hs.sock)
        self._size_send_buffer(key, hs.sock)
        self.run(actions)

    def _handshake_expired(self, listener: _Listener, hs: _Handshake) -> None:
        if listener.handshakes.get(hs.sock.fileno()) is hs:
            self.stats[hs.cid].handshakes_timed_out += 1
            log.info("vsock cid %d: no CONNECT line within %.1f s: closing the client",
                     hs.cid, self.handshake_timeout_s)
            self._drop_handshake(listener, hs)

    def _forget_handshake(self, listener: _Listener, hs: _Handshake) -> None:
        fd = hs.sock.fileno()
        listener.handshakes.pop(fd, None)
        self.loop.remove_reader(fd)
        if hs.timer is not None:
            hs.timer.cancel()

    def _drop_handshake(self, listener: _Listener, hs: _Handshake) -> None:
        self._forget_handshake(listener, hs)
        hs.sock.close()

    # -- what the device needs ---------------------------------------------------------
    def sock(self, key: ConnKey) -> socket.socket | None:
        """The host socket of connection ``key`` (None when it has none)."""
        hs = self._socks.get(key)
        return None if hs is None else hs.sock

    def hung_up(self, key: ConnKey) -> bool:
        """After a read returned EOF: did the peer close both ways (POLLHUP), not just
        ``shutdown(SHUT_WR)``? For seqpacket also tells an empty message from EOF
        (POLLRDHUP)."""
        hs = self._socks.get(key)
        if hs is None:
            return True
        poller = select.poll()
        poller.register(hs.sock.fileno(), select.POLLIN | _POLLRDHUP)
        events = sum(ev for _fd, ev in poller.poll(0))
        return bool(events & (select.POLLHUP | select.POLLERR))

    def peer_shut_write(self, key: ConnKey) -> bool:
        """Whether the peer will send nothing more (POLLRDHUP or POLLHUP)."""
        hs = self._socks.get(key)
        if hs is None:
            return True
        poller = select.poll()
        poller.register(hs.sock.fileno(), select.POLLIN | _POLLRDHUP)
        events = sum(ev for _fd, ev in poller.poll(0))
        return bool(events & (select.POLLHUP | select.POLLERR | _POLLRDHUP))

    @property
    def connection_count(self) -> int:
        return len(self._socks) + len(self._connecting)

    # -- executing actions ----------------------------------------------------------------
    def run(self, actions: Iterable[Action]) -> None:
        """Execute the muxer's actions in order (results are fed back at once)."""
        for action in actions:
            kind = type(action)
            if kind is WriteHost:
                self._write(action)
            elif kind is SetHostInterest:
                self._interest(action)
            elif kind is RxReady:
                self.on_rx_ready(action.cid)
            elif kind is SetTimer:
                self._set_timer(action)
            elif kind is ConnectHost:
                self._connect(action)
            elif kind is ReplyHost:
                self._reply(action)
            elif kind is ShutdownHost:
                self._shutdown(action)
            elif kind is CloseHost:
                self._close(action.key)
            else:  # pragma: no cover - the muxer has no other actions
                raise TypeError(f"unknown vsock action {action!r}")

    def _write(self, action: WriteHost) -> None:
        key = action.key
        hs = self._socks.get(key)
        now = self.loop.time()
        if hs is None:
            self.run(self.muxer.host_error(key, now, errno.EBADF))
            return
        data = action.data if len(action.data) <= IOV_MAX else action.data[:IOV_MAX]
        try:
            n: int | None = hs.sock.sendmsg(data, (), _SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            n = None
        except OSError as exc:
            log.info("%s: host write failed: %s", key, exc)
            self.run(self.muxer.host_error(key, now, exc.errno))
            return
        self.run(self.muxer.host_write_done(key, n, now))

    def _reply(self, action: ReplyHost) -> None:
        hs = self._socks.get(action.key)
        if hs is None:
            return
        try:
            n = hs.sock.send(action.data, _SEND_FLAGS)
        except OSError as exc:
            n = -1
            log.info("%s: cannot send the handshake reply: %s", action.key, exc)
        if n != len(action.data):
            self.run(self.muxer.host_error(action.key, self.loop.time(),
                                           errno.EPIPE if n < 0 else errno.EAGAIN))

    def _shutdown(self, action: ShutdownHost) -> None:
        hs = self._socks.get(action.key)
        if hs is None or not (action.read or action.write):
            return
        how = (socket.SHUT_RDWR if action.read and action.write
               else socket.SHUT_RD if action.read else socket.SHUT_WR)
        try:
            hs.sock.shutdown(how)
        except OSError:
            pass

    def _current(self, key: ConnKey):
        try:
            return self.muxer.connection(key)
        except UnknownConnectionError:
            return None

    def _interest(self, action: SetHostInterest) -> None:
        """Apply the connection's *current* interest, not the action's values.

        Actions are executed in order and feed results back at once, so an action later in
        a list can be stale: in ``[WriteHost, SetHostInterest(read, write=False)]`` the write
        runs first, finds EAGAIN, and the nested ``host_write_done`` already asked for
        write interest; applying the stale ``write=False`` afterwards would stall the
        connection for good. Re-reading ``wants_read``/``wants_write`` is always right."""
        hs = self._socks.get(action.key)
        if hs is None:
            return
        conn = self._current(action.key)
        read, write = (conn.wants_read, conn.wants_write) if conn is not None else (False, False)
        fd = hs.sock.fileno()
        key = action.key
        if read != hs.read:
            if read:
                # no Python frame; the socket bound in: its reader goes before it closes
                self.loop.add_reader(fd, partial(self._readable, key, hs.sock))
            else:
                self.loop.remove_reader(fd)
            hs.read = read
        if write != hs.write:
            if write:
                self.loop.add_writer(fd, partial(self._writable, key))
            else:
                self.loop.remove_writer(fd)
            hs.write = write

    def _readable(self, key: ConnKey, sock: socket.socket) -> None:
        fast = self.on_readable
        if fast is not None and fast(key, sock):
            return
        self.run(self.muxer.host_readable(key, self.loop.time()))

    def _writable(self, key: ConnKey) -> None:
        self.run(self.muxer.host_writable(key, self.loop.time()))

    def _set_timer(self, action: SetTimer) -> None:
        """Keep a loop timer armed no later than the connection's *current* deadline (a
        SetTimer can be stale, see `_interest`).

        One loop timer per connection is kept while it fires no later than the deadline:
        a deadline that moves later changes nothing here, and the timer, firing early,
        re-arms for what is then due (`_timer_due`). An earlier deadline, a deadline gone
        (an idle connection must cost no wake-up: issue 5's idle target) or a connection
        gone cancels it."""
        key = action.key
        conn = self._current(key)
        deadline = None if conn is None else conn.deadline
        armed = self._timers.get(key)
        if armed is not None:
            if deadline is not None and armed[1] <= deadline:
                return  # fires first; _timer_due re-arms for the rest
            del self._timers[key]
            armed[0].cancel()
        if deadline is not None:
            self._arm_timer(key, deadline)

    def _arm_timer(self, key: ConnKey, deadline: float) -> None:
        at = deadline + 1e-6
        self._timers[key] = (self.loop.call_later(max(0.0, at - self.loop.time()),
                                                  lambda: self._timer_due(key)), at)

    def _timer_due(self, key: ConnKey) -> None:
        """The connection's loop timer fired: its deadline, if reached, goes to the
        muxer; a later one is armed again; none (or no connection) ends it."""
        self._timers.pop(key, None)
        conn = self._current(key)
        deadline = None if conn is None else conn.deadline
        if deadline is None:
            return
        now = self.loop.time()
        if now < deadline:
            self._arm_timer(key, deadline)
            return
        self.run(self.muxer.timer_fired(key, now))

    def _connect(self, action: ConnectHost) -> None:
        kind = socket.SOCK_SEQPACKET if action.type_ == Type.SEQPACKET else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        timeout = self.muxer.conn_config(action.key.cid).request_timeout_s
        pending = _Connecting(sock, action.path, self.loop.time() + timeout)
        self._connecting[action.key] = pending
        self._try_connect(action.key, pending)

    def _try_connect(self, key: ConnKey, pending: _Connecting) -> None:
        if self._connecting.get(key) is not pending:
            return  # closed meanwhile
        now = self.loop.time()
        try:
            pending.sock.connect(pending.path)
        except (BlockingIOError, InterruptedError):
            if now < pending.give_up_at:  # the service's backlog is full: try again soon
                pending.timer = self.loop.call_later(
                    self.connect_retry_s, lambda: self._try_connect(key, pending))
                return
            ok = False
            log.info("%s: %s kept its backlog full: giving up", key, pending.path)
        except OSError as exc:
            ok = False
            log.info("%s: guest connection to %s refused: %s", key, pending.path, exc)
        else:
            ok = True
        del self._connecting[key]
        if ok:
            self._socks[key] = _HostSock(pending.sock)
            self._size_send_buffer(key, pending.sock)
        else:
            stats = self.stats.get(key.cid)
            if stats is not None:
                stats.connects_refused += 1
            pending.sock.close()
        self.run(self.muxer.host_connected(key, now, ok))

    def _size_send_buffer(self, key: ConnKey, sock: socket.socket) -> None:
        """Let the host socket hold the guest's whole credit window (``buf_alloc``), so the
        direct ``writev`` from guest memory normally takes a whole TX batch and nothing is
        copied or left for a writability event. The kernel caps the value
        (``net.core.wmem_max``); failure is harmless (the copy path covers it)."""
        want = self.muxer.conn_config(key.cid).buf_alloc_bytes
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < want:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
        except OSError:
            pass

    def _close(self, key: ConnKey) -> None:
        pending = self._connecting.pop(key, None)
        if pending is not None:
            if pending.timer is not None:
                pending.timer.cancel()
            pending.sock.close()
        hs = self._socks.pop(key, None)
        if hs is None:
            return
        fd = hs.sock.fileno()
        if hs.read:
            self.loop.remove_reader(fd)
        if hs.write:
            self.loop.remove_writer(fd)
        hs.sock.close()

    # -- life cycle -----------------------------------------------------------------------
    def close_cid(self, cid: int) -> None:
        """Forget every host socket and timer of VM ``cid`` (after ``muxer.reset``)."""
        for key in [k for k in self._socks if k.cid == cid]:
            self._close(key)
        for key in [k for k in self._connecting if k.cid == cid]:
            self._close(key)
        for key in [k for k in self._timers if k.cid == cid]:
            self._timers.pop(key)[0].cancel()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for cid in list(self._listeners):
            self.unlisten(cid)
        for key in list(self._socks) + list(self._connecting):
            self._close(key)
        for timer, _at in self._timers.values():
            timer.cancel()
        self._timers.clear()
