"""A generic test device: whatever the guest transmits comes back on its receive queue.

It exists to exercise the foundation end to end (vhost-user session, guest memory, both ring
layouts and implementations, the batched data path) before the real devices, and as the
simplest example of a device. Queue 0 is receive (device writes), queue 1 is transmit
(device reads), like virtio-console's port 0 (virtio 1.2 §5.3.2).

The echo goes through a real host socket pair: guest TX chains are ``writev``-ed into one end
by ``tx_to_fd`` and the other end is ``readv``-ed into guest RX buffers by ``rx_from_fd``.
So it has the same backpressure a console port has: a guest that posts no RX buffers fills
the socket pair, and then its TX queue stops being drained (no byte is dropped).
"""

from __future__ import annotations

import logging
import socket

from ring.errors import DriverError

log = logging.getLogger(__name__)

ECHO_DEVICE_ID = 0xECE0 & 0xFFFF
RX_QUEUE = 0
TX_QUEUE = 1


class EchoDevice:
    """The VhostUserDevice protocol (docs/internals.md) for the echo test device."""

    device_id = ECHO_DEVICE_ID
    num_queues = 2

    def __init__(self, loop, name: str = "echo") -> None:
        self._loop = loop
        self._log = log.getChild(name)
        self._queues: dict[int, object] = {}
        self._tx_end: socket.socket | None = None
        self._rx_end: socket.socket | None = None
        self._rx_watched = False
        self._tx_waiting_writable = False
        self.bytes_echoed = 0
        self.config = bytearray(8)

    # -- VhostUserDevice --------------------------------------------------------------
    def device_features(self) -> int:
        return 0

    def config_read(self, offset: int, size: int) -> bytes:
        return bytes(self.config[offset:offset + size]).ljust(size, b"\0")

    def config_write(self, offset: int, data: bytes) -> None:
        end = min(len(self.config), offset + len(data))
        self.config[offset:end] = data[: end - offset]

    def set_features(self, features: int) -> None:
        pass

    def queue_started(self, handle) -> None:
        self._queues[handle.index] = handle
        if self._tx_end is None:
            self._tx_end, self._rx_end = socket.socketpair()
            self._tx_end.setblocking(False)
            self._rx_end.setblocking(False)
        if handle.index == RX_QUEUE:
            self._watch_rx(True)
        self.kick(handle.index)

    def queue_stopped(self, index: int) -> None:
        self._queues.pop(index, None)
        if index == RX_QUEUE:
            self._watch_rx(False)
        if index == TX_QUEUE:
            self._watch_tx_writable(False)

    def kick(self, index: int) -> None:
        if index == TX_QUEUE:
            self._drain_tx()
        elif index == RX_QUEUE:
            self._watch_rx(True)
            self._fill_rx()

    def reset(self) -> None:
        self._watch_rx(False)
        self._watch_tx_writable(False)
        self._queues.clear()
        for end in (self._tx_end, self._rx_end):
            if end is not None:
                end.close()
        self._tx_end = self._rx_end = None

    def snapshot(self) -> dict:
        return {"bytes_echoed": self.bytes_echoed}

    def restore(self, state: dict) -> None:
        self.bytes_echoed = int(state.get("bytes_echoed", 0))

    # -- data path ----------------------------------------------------------------------
    def _drain_tx(self) -> None:
        handle = self._queues.get(TX_QUEUE)
        if handle is None or self._tx_end is None:
            return
        try:
            result = handle.vq.tx_to_fd(self._tx_end.fileno())
        except DriverError as exc:
            self._log.error("transmit queue broken: %s", exc)
            handle.notify()
            return
        if result.broken is not None:
            self._log.error("transmit queue broken by the guest: %s", result.broken.name)
        if result.notify:
            handle.notify()
        self._watch_tx_writable(result.blocked)

    def _fill_rx(self) -> None:
        handle = self._queues.get(RX_QUEUE)
        if handle is None or self._rx_end is None:
            return
        try:
            result = handle.vq.rx_from_fd(self._rx_end.fileno())
        except DriverError as exc:
            self._log.error("receive queue broken: %s", exc)
            handle.notify()
            return
        self.bytes_echoed += result.bytes
        if result.broken is not None:
            self._log.error("receive queue broken by the guest: %s", result.broken.name)
        if result.notify:
            handle.notify()
        # No guest buffers: stop watching the socket until the guest kicks RX again, so an
        # idle guest costs no CPU (no busy loop on a readable socket).
        if result.starved:
            self._watch_rx(False)
        # Room freed in the socket pair: the transmit side may continue.
        if result.bytes and self._tx_waiting_writable:
            self._drain_tx()

    def _watch_rx(self, on: bool) -> None:
        if self._rx_end is None or on == self._rx_watched:
            return
        if on:
            self._loop.add_reader(self._rx_end.fileno(), self._fill_rx)
        else:
            self._loop.remove_reader(self._rx_end.fileno())
        self._rx_watched = on

    def _watch_tx_writable(self, on: bool) -> None:
        if self._tx_end is None or on == self._tx_waiting_writable:
            return
        if on:
            self._loop.add_writer(self._tx_end.fileno(), self._drain_tx)
        else:
            self._loop.remove_writer(self._tx_end.fileno())
        self._tx_waiting_writable = on
