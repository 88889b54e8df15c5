"""Zero-copy guest → host transmit of the vsock device: the I/O side of it.

The TX lane (csrc/vsock_path.c ``vs_tx_lane``) can hand a run of a connection's RW payloads
to its host socket by page reference (vmsplice into a pipe, splice into the AF_UNIX stream
socket), so the host peer's ``read`` is the only copy the back-end causes. A TX chain with a
byte that went that way stays with the device until the peer has read that byte
(``SIOCOUTQ``); the other chains go back at once, so the TX queue completes chains out of
order, which virtio allows without VIRTIO_F_IN_ORDER.

This module owns what that needs outside the lane call, per connection (:class:`TxZeroCopy`):

* the ``struct vr_zc`` state: a pipe (empty between calls: what the socket does not take is
  read back out into the lane's tail, a copy as without zero copy) and the kept chains;
* the return of kept chains: while the guest streams, each lane run first returns what the
  peer has read since the last one (one ``SIOCOUTQ``), so a streaming connection costs no
  wake-up of its own; a check :data:`IDLE_CHECK_S` after a run that left chains kept finds
  out whether runs went on, and if none did, watches the socket with an edge-triggered
  writer: each peer read that frees queued bytes is then a wake-up, and the chains it made
  readable go back (``vs_zc_release``); a peer that stops reading costs no CPU;
* a connection that ends while chains are kept: the socket is shut down both ways (the peer
  reads what is queued, then end of stream, as after a close) and kept open on a duplicate
  until the peer has read those bytes or gone, then closed and the chains returned;
* a TX queue stop (GET_VRING_BASE) keeps the chains in flight: the same ring going on (same
  areas, size and indices: QEMU's ``cont``) takes them over; another ring (a reset) forgets
  them, as does a device reset.

Bounds, so that host peers that stop reading cannot starve the guest's TX queue, which all
connections share: zero copy serves at most :data:`MAX_CONNECTIONS` connections at a time,
and one of them keeps at most :data:`MAX_WAITING_PERCENT` of the queue; past that, runs are
copied as without zero copy (the lane's ``zc_wants``).

Spec: virtio 1.2 §2.7.8 (the device uses a buffer once it is done with it, in any order
without VIRTIO_F_IN_ORDER), §5.10.6.1 (TX buffers are used without being written);
vhost-user "Ring states", VHOST_USER_GET_VRING_BASE (a stopped ring's kept chains stay in
flight).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from ring.cpump import is_unix_stream, ring_position

log = logging.getLogger(__name__)

__all__ = ["TxZeroCopy", "MAX_CONNECTIONS", "MAX_WAITING_PERCENT", "MIN_BYTES", "PIPE_BYTES"]

#: Connections zero copy serves at once (each one: a pipe, and chains it may keep).
MAX_CONNECTIONS = 4
#: One connection keeps at most this share of the TX queue's chains, so
#: MAX_CONNECTIONS * MAX_WAITING_PERCENT <= 100 leaves the guest half its queue.
MAX_WAITING_PERCENT = 12
#: Runs of fewer payload bytes are copied (page references do not pay for small ones).
MIN_BYTES = 64 * 1024
#: ... and runs of fewer bytes per gathered piece on average.
MIN_PIECE = 2048
#: After a lane run leaves chains kept, this long without another run and the socket is
#: watched for the peer's reads (a wake-up per read) instead of waiting for the next run.
IDLE_CHECK_S = 0.005
#: Pipe size asked for: a whole lane run (LANE_TAIL_MAX at most) fits at once.
PIPE_BYTES = 1 << 20


@dataclass(slots=True, eq=False)
class _ConnZeroCopy:
    """One connection's zero-copy state."""

    z: Any  # struct vr_zc *
    fifo: Any  # its kept-chain ring (struct vr_zc_chain[])
    fd: int  # the socket SIOCOUTQ asks: the host socket, or our duplicate once it ended
    watched: int = -1  # the fd with our edge writer, -1: none
    ended: bool = False  # the connection is gone; the duplicate lives until the peer read
    runs: int = 0  # lane runs since the last idle check
    timer: Any = None  # the pending idle check
    pipe: tuple[int, int] = field(default=(-1, -1))


class TxZeroCopy:
    """Zero-copy transmit state of one vsock device's connections (module docstring).

    ``tx_queue()`` returns the TX queue's live ``ring.cring.Virtqueue`` (None while it is
    stopped); ``loop`` is the event loop (``add_edge_writer``/``remove_edge_writer``)."""

    def __init__(self, loop: Any, tx_queue: Callable[[], Any], logger: logging.Logger = log,
                 *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.loop = loop
        self._tx_queue = tx_queue
        self.log = logger
        self.max_connections = max_connections
        self._conns: dict[Any, _ConnZeroCopy] = {}
        self._refused: set[Any] = set()  # not AF_UNIX streams, or pipes refused
        self._stopped_ring: tuple | None = None
        self._release = None  # struct vs_zc_release * (made on first use)
        #: running totals
        self.chains_returned_late = 0
        self.bytes_by_reference_closed = 0

    # -- the lane's side -----------------------------------------------------------------
    def for_lane(self, key: Any, sock: socket.socket, vq: Any) -> Any:
        """The ``struct vr_zc *`` for a lane run of connection ``key`` on TX queue ``vq``,
        or None (copy): not an AF_UNIX stream socket, zero copy refused by the kernel, or
        :data:`MAX_CONNECTIONS` other connections hold it."""
        state = self._conns.get(key)
        if state is None:
            if key in self._refused or len(self._conns) >= self.max_connections:
                return None
            state = self._open(key, sock.fileno(), vq.size)
            if state is None:
                return None
        z = state.z
        if z.failed:
            return None
        if z.cap < vq.size and z.count == 0:
            self._size_fifo(state, vq.size)
        z.max_waiting = min(z.cap, max(1, vq.size * MAX_WAITING_PERCENT // 100))
        return z

    def after_lane(self, key: Any) -> None:
        """After a lane run with this connection's state: while chains wait for the peer,
        make sure an idle check is due (module docstring)."""
        state = self._conns.get(key)
        if state is None:
            return
        state.runs += 1
        if state.z.count and state.timer is None and state.watched < 0:
            state.runs = 0
            state.timer = self.loop.call_later(IDLE_CHECK_S, lambda: self._idle_check(key))

    def _idle_check(self, key: Any) -> None:
        """IDLE_CHECK_S after a run left chains kept: return what the peer read; if lane
        runs went on meanwhile, check again later, else watch the socket."""
        state = self._conns.get(key)
        if state is None:
            return
        state.timer = None
        self._release_read(state)
        if state.z.count == 0:
            return
        if state.runs and not state.ended:
            state.runs = 0
            state.timer = self.loop.call_later(IDLE_CHECK_S, lambda: self._idle_check(key))
        else:
            self._watch(key, state)

    # -- connection life ------------------------------------------------------------------
    def host_closing(self, key: Any, sock: socket.socket) -> None:
        """The host adapter is about to close ``key``'s socket (VsockHost ``before_close``).
        Chains whose bytes the peer has not read keep a shut-down duplicate open until it
        has; otherwise the state goes now."""
        self._refused.discard(key)
        state = self._conns.get(key)
        if state is None:
            return
        self._unwatch(state)
        self._release_read(state)
        if state.z.count == 0:
            self._drop(key, state)
            return
        try:
            dup = os.dup(sock.fileno())
        except OSError as exc:  # out of fds: the chains go back now, as for a gone peer
            self.log.warning("%s: cannot keep the socket until its peer read %d chains' "
                             "bytes (%s): returning them", key, state.z.count, exc)
            from ring.cring import lib
            lib.vr_zc_unpin(state.z)  # they wait for no read now
            state.fd, state.ended = -1, True
            self._release_read(state)
            if state.z.count == 0:
                self._drop(key, state)
            return
        try:
            _shutdown(dup)
        except OSError:
            pass  # the peer is gone already: the next release sees nothing queued
        state.fd, state.ended = dup, True
        state.z.min_bytes = 1 << 63  # nothing new goes by reference on an ended connection
        self._watch(key, state)

    # -- queue life ------------------------------------------------------------------------
    def tx_stopped(self, vq: Any) -> None:
        """The TX queue stops (GET_VRING_BASE): the kept chains stay in flight; remember the
        ring to tell its continuation from a reset."""
        if any(s.z.count for s in self._conns.values()):
            self._stopped_ring = ring_position(vq)
        for state in self._conns.values():
            self._unwatch(state)

    def tx_started(self, vq: Any) -> None:
        """A TX queue starts: the stopped ring going on takes the kept chains over (they go
        back once read); another ring forgets them (its driver gave them up)."""
        stopped, self._stopped_ring = self._stopped_ring, None
        continuing = stopped is not None and stopped == ring_position(vq)
        from ring.cring import lib
        q = vq.c_state()[0] if continuing else None
        for key, state in list(self._conns.items()):
            if state.z.count == 0:
                continue
            if q is None:
                lib.vs_zc_forget(state.z)
            else:
                lib.vs_zc_adopt(q, state.z)
                self._release_read(state)
            if state.ended and state.z.count == 0:
                self._drop(key, state)
            else:
                self._watch(key, state)

    def reset(self) -> None:
        """Device reset: every kept chain is forgotten, every pipe and duplicate closed."""
        from ring.cring import lib
        self._stopped_ring = None
        for key, state in list(self._conns.items()):
            lib.vs_zc_forget(state.z)
            self._drop(key, state)
        self._refused.clear()

    def close(self) -> None:
        self.reset()

    # -- totals ------------------------------------------------------------------------------
    def waiting_chains(self) -> int:
        """Chains kept now until their peers read them."""
        return sum(int(s.z.count) for s in self._conns.values())

    def bytes_by_reference(self) -> int:
        """Guest bytes sent by page reference so far (connections still open)."""
        return sum(int(s.z.piped) for s in self._conns.values())

    def lingering(self) -> int:
        """Ended connections whose sockets stay open until their peers read."""
        return sum(1 for s in self._conns.values() if s.ended)

    # -- internals ----------------------------------------------------------------------------
    def _open(self, key: Any, fd: int, size: int) -> _ConnZeroCopy | None:
        from ring.cring import ffi
        if not is_unix_stream(fd):
            self._refused.add(key)
            return None
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self.log.info("%s: no pipe for zero copy (%s): copying", key, exc)
            self._refused.add(key)
            return None
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # over the pipe allowance: smaller rounds, the rest read back and copied
        z = ffi.new("struct vr_zc *")
        z.pipe_r, z.pipe_w = r, w
        z.min_bytes, z.min_piece = MIN_BYTES, MIN_PIECE
        state = _ConnZeroCopy(z=z, fifo=None, fd=fd, pipe=(r, w))
        self._size_fifo(state, size)
        self._conns[key] = state
        return state

    @staticmethod
    def _size_fifo(state: _ConnZeroCopy, size: int) -> None:
        from ring.cring import ffi
        fifo = ffi.new("struct vr_zc_chain[]", max(1, size))
        state.z.fifo, state.z.cap, state.z.first = fifo, max(1, size), 0
        state.fifo = fifo

    def _watch(self, key: Any, state: _ConnZeroCopy) -> None:
        if state.z.count and state.fd >= 0 and self._tx_queue() is not None:
            if state.watched != state.fd:
                self._unwatch(state)
                self.loop.add_edge_writer(state.fd, lambda: self._on_read(key))
                state.watched = state.fd
        else:
            self._unwatch(state)

    def _unwatch(self, state: _ConnZeroCopy) -> None:
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        if state.watched >= 0:
            self.loop.remove_edge_writer(state.watched)
            state.watched = -1

    def _on_read(self, key: Any) -> None:
        """The socket became writable (the peer read, or went away): return what it read."""
        state = self._conns.get(key)
        if state is None:
            return
        self._release_read(state)
        if state.ended and state.z.count == 0:
            self._drop(key, state)
        elif state.z.count == 0:
            self._unwatch(state)

    def _release_read(self, state: _ConnZeroCopy) -> None:
        vq = self._tx_queue()
        if vq is None or state.z.count == 0:
            return  # a stopped queue: tx_started decides
        from ring.cring import _raise_for, ffi, lib
        r = self._release
        if r is None:
            r = self._release = ffi.new("struct vs_zc_release *")
        r.fd = state.fd
        rc = lib.vs_zc_release(vq.c_state()[0], state.z, r)
        if rc < 0:
            raise _raise_for(rc, vq.index)
        if r.released:
            self.chains_returned_late += int(r.released)
        if r.call_errno:
            self.log.warning("TX call eventfd: %s", os.strerror(r.call_errno))

    def _drop(self, key: Any, state: _ConnZeroCopy) -> None:
        self._unwatch(state)
        self._conns.pop(key, None)
        if state.ended and state.fd >= 0:
            try:
                os.close(state.fd)
            except OSError:
                pass
        for fd in state.pipe:
            try:
                os.close(fd)
            except OSError:
                pass
        state.z.pipe_r = state.z.pipe_w = -1


def _shutdown(fd: int) -> None:
    """End the stream both ways on ``fd`` as a close would, while the socket stays open: the
    peer reads what is queued, then end of stream; its writes fail."""
    probe = socket.socket(fileno=os.dup(fd))
    try:
        probe.shutdown(socket.SHUT_RDWR)
    finally:
        probe.close()
