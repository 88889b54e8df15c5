"""The stream pump over C rings: ``vr_pump_tx`` / ``vr_pump_rx`` (csrc/vring.c).

Same attributes, flags and totals as the reference :class:`ring.pump.StreamPump`; one
event costs one Python method and one crossing into C. The attributes live in an
``ffi.new``'d ``struct vr_pump``; ``tx`` / ``rx`` must be :class:`ring.cring.Virtqueue`
objects over one :class:`~ring.memory.GuestMemory`. Before each call the pump checks that
memory's generation once (the rings' region tables are rebuilt when it moved, as their own
data-path calls do), so C never walks a stale table.

Zero-copy transmit (:meth:`StreamPump.enable_zero_copy`, csrc/zerocopy.c): large rounds
go from guest memory to an AF_UNIX stream write fd by page reference (vmsplice + splice), so
the host peer's read is the only copy, and their chains return to the guest only once the
peer has read them (``deferred``; :attr:`PumpFlag.TX_DEFERRED` asks the owner to pump again
when the write fd turns writable). Any other write fd, and small rounds, are copied. A
transmitq that stops while they wait keeps them in flight until the same ring goes on
(:attr:`StreamPump.tx`); a new write fd frees them; a reset ring never sees them.

Spec: virtio 1.2 §5.3.6, §2.7.7 (as ring.pump), §2.7.8 (a buffer is used once the device is
done with it); STYLE R7 (the cffi boundary).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import Any

from ring.cring import Virtqueue, _BROKEN, _raise_for, ffi, lib
from ring.pump import DEFAULT_RX_BUDGET, DEFAULT_TX_BUDGET, PumpFlag
from ring.types import RxResult, TxResult

__all__ = ["StreamPump", "ZERO_COPY_PIPE_BYTES", "ZERO_COPY_MIN_BYTES", "ZERO_COPY_MIN_PIECE",
           "ZERO_COPY_MAX_WAITING_PERCENT"]

ZERO_COPY_PIPE_BYTES = 256 * 1024
"""Pipe size asked for (F_SETPIPE_SZ): bytes one vmsplice can take. 126 ports of it stay
under Linux's default per-user pipe allowance (pipe-user-pages-soft, 64 MiB)."""
ZERO_COPY_MIN_BYTES = 16 * 1024
"""Rounds smaller than this are copied: page references cost more than copying few bytes,
and a request/answer exchange should not wait for the peer's read to get its buffer back."""
ZERO_COPY_MIN_PIECE = 2048
"""... and so are rounds of smaller pieces on average (each piece takes a pipe slot)."""
ZERO_COPY_MAX_WAITING_PERCENT = 50
"""... and rounds that would leave more than this share of the queue's chains waiting for the
host peer's reads: the guest keeps the rest of its ring to write into meanwhile."""

_vr_pump_tx = lib.vr_pump_tx
_vr_pump_rx = lib.vr_pump_rx


class StreamPump:
    """C stream pump (see :class:`ring.pump.StreamPump` for the contract)."""

    __slots__ = ("_p", "_tx", "_rx", "_memory", "_generation", "_log", "_zc", "_zc_keep",
                 "_zc_fits", "_unsent", "_stopped_ring", "unsent_lost")

    def __init__(self) -> None:
        p = ffi.new("struct vr_pump *")
        p.write_fd = p.read_fd = -1
        p.tx_budget = DEFAULT_TX_BUDGET
        p.rx_budget = DEFAULT_RX_BUDGET
        self._p = p
        self._tx: Virtqueue | None = None
        self._rx: Virtqueue | None = None
        self._memory = None
        self._generation = -1
        self._log = None
        self._zc = None  # struct vr_zc * once enable_zero_copy() made the pipe
        self._zc_keep = None  # its fifo
        self._zc_fits = False  # write_fd is an AF_UNIX stream socket
        self._unsent = bytearray()  # the pipe's bytes kept when tx was detached
        self._stopped_ring: tuple | None = None  # the stopped transmitq of the kept chains
        self.unsent_lost = 0  # bytes of a partly sent chain unreadable at a stop (running)

    # -- the queues -----------------------------------------------------------------------
    def _attach(self, vq: Virtqueue | None) -> tuple[Any, Any]:
        """``(struct vr_queue *, struct vr_scratch *)`` for ``vq`` (NULLs for None)."""
        if vq is None:
            return ffi.NULL, ffi.NULL
        if not isinstance(vq, Virtqueue):
            raise TypeError(f"the C pump needs ring.cring queues, not {type(vq).__name__}")
        other = self._rx if vq is not self._rx else self._tx
        if other is not None and other.memory is not vq.memory:
            raise ValueError("the pump's queues must share one GuestMemory")
        state = vq.c_state()  # region table current, scratch made
        self._memory = vq.memory
        self._generation = vq.memory.generation
        self._log = vq.memory.log
        return state

    @property
    def tx(self) -> Virtqueue | None:
        return self._tx

    @tx.setter
    def tx(self, vq: Virtqueue | None) -> None:
        """Attach the transmitq, or detach it (None: the queue stopped, GET_VRING_BASE).

        A detach keeps the host peer's stream whole: the pipe's bytes and the unsent rest of a
        partly sent chain become copies (:meth:`take_unsent`), and the chains whose bytes the
        socket still refers to stay in flight (:meth:`_stop_tx`). The next attach returns them
        through the same ring going on, or forgets them for another ring (:meth:`_resume_tx`).

        Spec: vhost-user VHOST_USER_GET_VRING_BASE, VHOST_USER_SET_VRING_BASE; virtio 1.2
        §2.7.8."""
        if vq is self._tx:
            return
        if self._tx is not None:
            self._stop_tx()
        self._p.tx_zc = ffi.NULL
        self._p.tx, self._p.tx_scratch = self._attach(vq)
        self._tx = vq
        self._forget_memory()
        if vq is not None:
            self._resume_tx(vq)
        self._apply_zero_copy()

    def _stop_tx(self) -> None:
        """The transmitq stops while the host peer may stay. Zero copy: the pipe's bytes and
        the rest of a partly sent chain go to ``_unsent`` (copies: the guest may change its
        buffers from now on without changing them); the chains the peer has read go back
        now; every other waiting chain stays in flight, waiting for the bytes that reached
        the socket by reference (vr_pump_tx_stop). Waiting for the peer here instead would
        hang the front-end's GET_VRING_BASE on a peer that never reads."""
        z, vq = self._zc, self._tx
        if z is None or self._p.tx_zc == ffi.NULL:
            return  # nothing went by reference on this ring: nothing waits
        self._keep_unsent()
        pending = vq.pending
        rest, lost = vq.pending_rest()  # read before the stop lets go of the chain
        self._check_memory()
        rc = lib.vr_pump_tx_stop(self._p, z)
        if rc < 0:
            raise _raise_for(rc, vq.index)
        if pending is not None and vq.pending is None:  # kept: its rest follows the pipe's
            self._unsent += rest
            self.unsent_lost += lost
        if z.count:
            self._stopped_ring = _ring_position(vq)

    def _resume_tx(self, vq: Virtqueue) -> None:
        """A transmitq starts: if it is the stopped ring going on (QEMU's ``cont``: the same
        areas, size and indices; a reset ring restarts at index 0 with its used ring zeroed,
        so while chains are kept the used index tells it apart even at the same addresses)
        the kept chains count in flight there and go back once the peer has read their bytes;
        otherwise they are forgotten (vr_pump_tx_resume)."""
        stopped, self._stopped_ring = self._stopped_ring, None
        z = self._zc
        if z is None or z.count == 0:
            return
        continuing = stopped is not None and stopped == _ring_position(vq)
        rc = lib.vr_pump_tx_resume(self._p, z, int(continuing))
        if rc < 0:
            raise _raise_for(rc, vq.index)

    def forget_stopped(self) -> None:
        """The device was reset: the chains a stopped transmitq kept are forgotten now (the
        driver gave up those buffers; their heads mean nothing in its next ring).

        Spec: virtio 1.2 §2.4 (Device Reset)."""
        self._stopped_ring = None
        if self._tx is None and self._zc is not None and self._zc.count:
            lib.vr_pump_tx_resume(self._p, self._zc, 0)

    @property
    def rx(self) -> Virtqueue | None:
        return self._rx

    @rx.setter
    def rx(self, vq: Virtqueue | None) -> None:
        self._p.rx, self._p.rx_scratch = self._attach(vq)
        self._rx = vq
        self._forget_memory()

    def _forget_memory(self) -> None:
        if self._tx is None and self._rx is None:
            self._memory = None

    def _check_memory(self) -> None:
        memory = self._memory
        if memory is not None and (memory.generation != self._generation
                                   or memory.log is not self._log):
            self._resync()

    def _resync(self) -> None:
        """Guest memory changed: rebuild the rings' region tables before C runs."""
        for vq in (self._tx, self._rx):
            if vq is not None:
                vq._datapath_slow()
        memory = self._memory
        self._generation = memory.generation
        self._log = memory.log

    # -- plain settings and totals ----------------------------------------------------------
    def _field(name: str, doc: str):  # noqa: N805 (a class-body helper)
        return property(lambda self: int(getattr(self._p, name)),
                        lambda self, value: setattr(self._p, name, value), doc=doc)

    @property
    def write_fd(self) -> int:
        """Where the guest's bytes go, -1: no host peer."""
        return int(self._p.write_fd)

    @write_fd.setter
    def write_fd(self, fd: int) -> None:
        if fd == self._p.write_fd:
            return
        if self._tx is None and self._zc is not None and self._zc.count:
            lib.vr_zc_unpin(self._zc)  # kept by a stopped queue: they wait for no read now
        else:
            self.release_deferred()  # the chains waited for the old peer's reads
        self._unsent.clear()  # and these bytes were on their way to it
        self._p.tx_zc = ffi.NULL
        self._p.write_fd = fd
        self._zc_fits = fd >= 0 and _is_unix_stream(fd)
        self._apply_zero_copy()

    read_fd = _field("read_fd", "what is read for the guest, -1: not wanted now")
    tx_budget = _field("tx_budget", "bytes per tx step")
    rx_budget = _field("rx_budget", "bytes per rx step")
    follow_rx_max = _field("follow_rx_max", "run the rx step after a tx step of 1..this bytes")
    bytes_from_guest = _field("bytes_from_guest", "running total, guest → host")
    bytes_to_guest = _field("bytes_to_guest", "running total, host → guest")
    call_errno = _field("call_errno", "errno of the last failed call eventfd write")
    kick_errno = _field("kick_errno", "errno of the last failed kick eventfd read")
    del _field

    @property
    def ran_rx(self) -> bool:
        return bool(self._p.ran_rx)

    @property
    def tx_result(self) -> TxResult:
        out = self._p.tx_out
        return TxResult(out.bytes, out.chains, out.notify != 0, out.blocked != 0,
                        out.error or None, _BROKEN[out.broken] if out.broken else None)

    @property
    def rx_result(self) -> RxResult:
        out = self._p.rx_out
        return RxResult(out.bytes, out.chains, out.notify != 0, out.eof != 0,
                        out.starved != 0, out.error or None, out.drained != 0,
                        _BROKEN[out.broken] if out.broken else None)

    # -- zero-copy transmit ------------------------------------------------------------------
    def enable_zero_copy(self) -> bool:
        """Send large transmit rounds by page reference from now on, whenever the write fd is
        an AF_UNIX stream socket (csrc/zerocopy.c). True once enabled; False when no pipe
        could be made (the pump keeps copying)."""
        if self._zc is not None:
            return True
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, ZERO_COPY_PIPE_BYTES)
        except OSError:
            pass  # over the user's pipe allowance: the default pipe works, in smaller rounds
        z = ffi.new("struct vr_zc *")
        z.pipe_r, z.pipe_w = r, w
        z.min_bytes = ZERO_COPY_MIN_BYTES
        z.min_piece = ZERO_COPY_MIN_PIECE
        self._zc = z
        self._apply_zero_copy()
        return True

    @property
    def zero_copy(self) -> bool:
        """Zero copy applies to the next transmit round (enabled, write fd fits, queue set,
        and vmsplice has not been refused)."""
        return self._p.tx_zc != ffi.NULL and self._zc.failed == 0

    @property
    def zero_copy_error(self) -> int:
        """errno with which the kernel refused vmsplice (zero copy then stays off), or 0."""
        return 0 if self._zc is None else int(self._zc.failed)

    @property
    def deferred(self) -> int:
        """Chains waiting for the host peer to read their bytes."""
        return 0 if self._zc is None else int(self._zc.count)

    @property
    def bytes_by_reference(self) -> int:
        """Running total of guest bytes sent by page reference."""
        return 0 if self._zc is None else int(self._zc.piped)

    def _apply_zero_copy(self) -> None:
        z, tx = self._zc, self._tx
        if z is None or tx is None or not self._zc_fits:
            return
        if z.cap < tx.size:
            fifo = ffi.new("struct vr_zc_chain[]", tx.size)  # z.count is 0 (released)
            z.fifo, z.cap, z.first = fifo, tx.size, 0
            self._zc_keep = fifo
        z.max_waiting = max(1, tx.size * ZERO_COPY_MAX_WAITING_PERCENT // 100)
        self._p.tx_zc = z

    def _keep_unsent(self) -> None:
        """Read what the pipe holds (bytes taken from chains about to be returned) into
        ``_unsent``, so that the returned buffers may change without changing them."""
        z = self._zc
        if z is None:
            return
        left = z.taken - z.in_socket
        while left > 0:
            try:
                chunk = os.read(z.pipe_r, min(left, 1 << 16))
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                break
            self._unsent += chunk
            left -= len(chunk)
        z.taken = z.in_socket

    def take_unsent(self) -> bytes:
        """The bytes a detached transmitq left unsent (zero copy's pipe), which
        :meth:`pump_tx` would otherwise write first; the caller now owns them."""
        data, self._unsent = bytes(self._unsent), bytearray()
        return data

    def _write_unsent(self, kick_fd: int) -> int:
        """pump_tx while ``_unsent`` waits: write it first; the ring waits until it is gone."""
        if kick_fd >= 0:
            try:
                os.read(kick_fd, 8)
            except OSError:
                pass  # the ring is served on the next call anyway
        try:
            n = os.write(self._p.write_fd, self._unsent)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._p.tx_out.error = exc.errno or errno.EIO
            return int(PumpFlag.TX_ERROR)
        del self._unsent[:n]
        self._p.bytes_from_guest += n
        return int(PumpFlag.TX_BLOCKED) if self._unsent else 0

    def release_deferred(self) -> int:
        """Return every waiting chain to the transmitq now (used length 0) and drop what the
        pipe holds unsent: before the write fd goes away (a stopping queue keeps them
        instead: :attr:`tx`). :class:`PumpFlag` bits (CALL_ERROR at most)."""
        if self._zc is None or self._zc.count == 0 and self._zc.taken == self._zc.in_socket:
            return 0
        self._check_memory()
        rc = lib.vr_pump_tx_release(self._p)
        if rc < 0:
            raise _raise_for(rc, self._tx.index)
        return rc

    def close(self) -> None:
        """Release the waiting chains and close the pipe (the pump copies afterwards)."""
        z = self._zc
        if z is None:
            return
        self.release_deferred()
        self._p.tx_zc = ffi.NULL
        self._zc = self._zc_keep = None
        os.close(z.pipe_r)
        os.close(z.pipe_w)

    # -- the events -----------------------------------------------------------------------
    def pump_tx(self, kick_fd: int = -1) -> int:
        """Drain ``kick_fd`` (-1: none), guest → host, then the rx step after a small write;
        :class:`PumpFlag` bits."""
        memory = self._memory
        if memory is None:
            return _vr_pump_tx(self._p, kick_fd) if kick_fd >= 0 else 0
        if memory.generation != self._generation or memory.log is not self._log:
            self._resync()
        tx, rx = self._tx, self._rx
        if self._unsent and tx is not None and self._p.write_fd >= 0:
            flags = self._write_unsent(kick_fd)
            if flags:
                return flags
            kick_fd = -1
        if tx is not None:
            tx._unpop_mark = None  # a pop before this call can no longer be given back
        if rx is not None:
            rx._unpop_mark = None
        rc = _vr_pump_tx(self._p, kick_fd)
        if rc < 0:
            raise _raise_for(rc, tx.index if self._p.ran_rx == 0 or rx is None else rx.index)
        return rc

    def pump_rx(self) -> int:
        """Host → guest; :class:`PumpFlag` bits."""
        memory = self._memory
        rx = self._rx
        if memory is None or rx is None:
            return 0
        if memory.generation != self._generation or memory.log is not self._log:
            self._resync()
        rx._unpop_mark = None
        rc = _vr_pump_rx(self._p)
        if rc < 0:
            raise _raise_for(rc, rx.index)
        return rc


def _ring_position(vq: Virtqueue) -> tuple:
    """What tells a ring going on after a stop from another one: its areas, shape and
    indices (a continuation's SET_VRING_BASE gives back the stopped ring's base)."""
    return (vq.desc_gpa, vq.driver_gpa, vq.device_gpa, vq.size, vq.packed,
            vq.last_avail_idx, vq.avail_wrap, vq.used_idx, vq.used_wrap)


def _is_unix_stream(fd: int) -> bool:
    """Whether fd is an AF_UNIX stream socket (zero copy relies on its SIOCOUTQ meaning the
    bytes its peer has not read)."""
    try:
        copy = os.dup(fd)
    except OSError:
        return False
    try:
        probe = socket.socket(fileno=copy)
    except OSError:  # not a socket
        os.close(copy)
        return False
    try:
        return (probe.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_UNIX
                and probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM)
    except OSError:
        return False
    finally:
        probe.close()
