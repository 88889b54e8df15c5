"""The stream pump: one port of a stream device served in one call per event.

A console port (virtio 1.2 §5.3.6) is a transmitq/receiveq pair bridged to a host fd pair.
Every guest kick of the transmitq runs the same steps: write the available chains to the
host fd (``tx_to_fd``), interrupt the guest if the ring asks, and, when the write was small
(likely a request), read the host's answer into the receiveq right away (``rx_from_fd``) and
interrupt again. Every readable host fd runs the second half. A :class:`StreamPump` does
one such event in one call and returns what the caller must still do as :class:`PumpFlag`
bits (0 on the fast path), so the caller's per-event Python is one call; the C twin
(:mod:`ring.cpump`) does it in one crossing into C with the same semantics.

The pump holds no policy: which fds and queues are live is the owner's to keep current
(``tx``/``rx`` are None while a queue is not live, the fds are -1 while not wanted). Byte
totals of both directions accumulate in ``bytes_from_guest`` / ``bytes_to_guest``; the
last step's :class:`~ring.types.TxResult` / :class:`~ring.types.RxResult` stay in
``tx_result`` / ``rx_result`` for the details behind a flag.

:func:`stream_pump_for` picks the implementation matching a queue's.

Spec: virtio 1.2 §5.3.6 (console device operation: port data), §2.7.7 (used buffer
notification, here the queue's ``call_fd``); vhost-user VHOST_USER_SET_VRING_CALL.
"""

from __future__ import annotations

import enum
import errno
import os
import sys
from typing import Any

__all__ = ["PumpFlag", "StreamPump", "stream_pump_for", "DEFAULT_TX_BUDGET",
           "DEFAULT_RX_BUDGET"]

DEFAULT_TX_BUDGET = 1 << 20
DEFAULT_RX_BUDGET = 256 * 1024
_ONE = (1).to_bytes(8, sys.byteorder)


class PumpFlag(enum.IntFlag):
    """What a pump call leaves to the caller (values are csrc/vring.h ``VR_PUMP_*``)."""

    TX_BLOCKED = 1    # the write fd took fewer bytes than offered: watch it for writability
    TX_MORE = 2       # the tx budget was used up: pump again after others had their turn
    TX_ERROR = 4      # a write failed (tx_result.error)
    TX_BROKEN = 8     # a hostile chain broke the transmitq (tx_result.broken)
    RX_STARVED = 16   # the guest posted no receive buffers while the fd may have data
    RX_EOF = 32       # the read fd reached end of file
    RX_ERROR = 64     # a read failed (rx_result.error)
    RX_BROKEN = 128   # a hostile chain broke the receiveq (rx_result.broken)
    CALL_ERROR = 256  # a call eventfd write failed, not with EAGAIN (call_errno)
    KICK_ERROR = 512  # draining the kick eventfd failed, not with EAGAIN (kick_errno)
    TX_DEFERRED = 1024  # zero copy: chains wait for the host peer to read their bytes; pump
    #                     again when the write fd turns writable (edge-triggered)


# plain ints for the data path (IntFlag arithmetic costs a Python call per operation)
_TX_BLOCKED, _TX_MORE, _TX_ERROR, _TX_BROKEN = (int(PumpFlag.TX_BLOCKED), int(PumpFlag.TX_MORE),
                                                int(PumpFlag.TX_ERROR), int(PumpFlag.TX_BROKEN))
_RX_STARVED, _RX_EOF, _RX_ERROR, _RX_BROKEN = (int(PumpFlag.RX_STARVED), int(PumpFlag.RX_EOF),
                                               int(PumpFlag.RX_ERROR), int(PumpFlag.RX_BROKEN))
_CALL_ERROR, _KICK_ERROR = int(PumpFlag.CALL_ERROR), int(PumpFlag.KICK_ERROR)


class StreamPump:
    """Pure-Python reference pump over any ``ring`` Virtqueue (module docstring).

    Attributes the owner sets: ``tx`` / ``rx`` (queues or None), ``write_fd`` / ``read_fd``
    (non-blocking fds or -1), ``tx_budget`` / ``rx_budget`` (bytes per call),
    ``follow_rx_max`` (after a tx step that wrote 1 .. this many bytes, also read up to this
    many bytes for the guest; 0: never).
    """

    def __init__(self) -> None:
        self.tx: Any = None
        self.rx: Any = None
        self.write_fd = -1
        self.read_fd = -1
        self.tx_budget = DEFAULT_TX_BUDGET
        self.rx_budget = DEFAULT_RX_BUDGET
        self.follow_rx_max = 0
        self.bytes_from_guest = 0
        self.bytes_to_guest = 0
        self.call_errno = 0
        self.kick_errno = 0
        self.ran_rx = False
        self.tx_result = None
        self.rx_result = None

    # Zero-copy transmit is a C pump feature (ring.cpump: vmsplice(2) needs C); this pump
    # always copies and has the same methods so owners need not tell them apart.
    zero_copy = False
    deferred = 0
    bytes_by_reference = 0
    unsent_lost = 0  # never keeps a stopped queue's partly sent chain

    def enable_zero_copy(self) -> bool:
        """Always False: the Python pump copies (see :meth:`ring.cpump.StreamPump.enable_zero_copy`)."""
        return False

    def release_deferred(self) -> int:
        """Nothing is ever deferred here: 0."""
        return 0

    def take_unsent(self) -> bytes:
        """Nothing is ever left unsent here: b""."""
        return b""

    def forget_stopped(self) -> None:
        """No chain is ever kept across a queue stop here: nothing to forget."""

    def close(self) -> None:
        """The Python pump holds no fds."""

    def _signal(self, vq: Any) -> int:
        fd = vq.call_fd
        if fd is None:
            return 0
        try:
            os.write(fd, _ONE)
        except BlockingIOError:  # a full counter already means "signalled"
            return 0
        except OSError as exc:
            self.call_errno = exc.errno or errno.EIO
            return _CALL_ERROR
        return 0

    def pump_rx(self) -> int:
        """Host → guest: one ``rx_from_fd`` into ``rx``, the call if the ring asks."""
        if self.rx is None or self.read_fd < 0:
            return 0
        return self._rx_step(self.rx_budget)

    def _rx_step(self, budget: int) -> int:
        result = self.rx.rx_from_fd(self.read_fd, budget)
        self.rx_result = result
        self.bytes_to_guest += result.bytes
        flags = self._signal(self.rx) if result.notify else 0
        if result.broken is not None:
            flags |= _RX_BROKEN
        if result.error is not None:
            flags |= _RX_ERROR
        elif result.eof:
            flags |= _RX_EOF
        elif result.starved:
            flags |= _RX_STARVED
        return flags

    def pump_tx(self, kick_fd: int = -1) -> int:
        """Guest → host: drain ``kick_fd`` (the kick eventfd that woke the caller, -1:
        none), one ``tx_to_fd`` from ``tx``, the call if the ring asks, then the rx step
        after a small write (``follow_rx_max``)."""
        self.ran_rx = False
        flags = 0
        if kick_fd >= 0:
            try:
                os.read(kick_fd, 8)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                self.kick_errno = exc.errno or errno.EIO
                flags = _KICK_ERROR
        if self.tx is None or self.write_fd < 0:
            return flags
        result = self.tx.tx_to_fd(self.write_fd, self.tx_budget)
        self.tx_result = result
        self.bytes_from_guest += result.bytes
        if result.notify:
            flags |= self._signal(self.tx)
        if result.broken is not None:
            flags |= _TX_BROKEN
        if result.error is not None:
            return flags | _TX_ERROR
        if result.blocked:
            return flags | _TX_BLOCKED
        if result.bytes >= self.tx_budget:
            return flags | _TX_MORE
        if (0 < result.bytes <= self.follow_rx_max and self.rx is not None
                and self.read_fd >= 0):
            self.ran_rx = True
            flags |= self._rx_step(self.follow_rx_max)  # the answer, up to as many bytes
        return flags


def stream_pump_for(vq: Any) -> Any:
    """A new pump of the implementation ``vq`` belongs to (C rings get the C pump)."""
    try:
        from ring.cring import Virtqueue as CVirtqueue
    except ImportError:
        return StreamPump()
    if isinstance(vq, CVirtqueue):
        from ring.cpump import StreamPump as CStreamPump
        return CStreamPump()
    return StreamPump()
