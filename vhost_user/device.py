"""What the vhost-user back-end asks of a device model, and what it gives it.

The session owns the vhost-user protocol; a device only sees started/stopped queues (each a
:class:`QueueHandle`), kicks and config-space access (docs/internals.md, "vhost_user/ — what
the back-end asks of a device").

Spec: vhost-user "Ring states" (a queue handed to the device is started and enabled).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

__all__ = ["QueueHandle", "VhostUserDevice"]


@runtime_checkable
class VhostUserDevice(Protocol):
    """A virtio device model served over vhost-user (contract in docs/internals.md).

    Optional attribute ``max_queue_size``: the largest ring the device accepts
    (VHOST_USER_SET_VRING_NUM beyond it is refused); default 32768 (virtio 1.2 §2.7).
    """

    device_id: int
    num_queues: int

    def device_features(self) -> int: ...

    def config_read(self, offset: int, size: int) -> bytes: ...

    def config_write(self, offset: int, data: bytes) -> None: ...

    def set_features(self, features: int) -> None: ...

    def queue_started(self, handle: "QueueHandle") -> None: ...

    def queue_stopped(self, index: int) -> None: ...

    def kick(self, index: int) -> None: ...

    def reset(self) -> None: ...

    def snapshot(self) -> dict: ...

    def restore(self, state: dict) -> None: ...


class QueueHandle:
    """A live queue given to the device: ``index``, ``vq`` (a ``ring`` Virtqueue) and
    ``notify()``, which signals the guest through the queue's *current* call eventfd,
    ``vq.call_fd`` (the front-end may replace it while the ring runs, e.g. when QEMU masks
    interrupts; the session keeps it current), or does nothing when there is none (polling,
    SET_VRING_CALL with the no-fd flag).

    ``kick_reader`` (settable by the device in ``queue_started``): when set, the loop calls
    ``kick_reader(kick_fd)`` directly whenever the queue's kick eventfd is readable, instead
    of draining it and calling ``device.kick(index)``; the device then drains the eventfd
    itself (one ``read`` of 8 bytes, EAGAIN meaning nothing to drain) and serves the queue.
    It is called only while the queue is live, always with the current kick fd; polled
    queues (no kick fd) still go through ``device.kick``.

    ``kick_fd``: the queue's current kick eventfd (None: polled), kept current by the session
    when the front-end replaces it while the ring runs; only for a device that serves the
    queue's kicks itself for a while (virtio/vsock/stream_loop.py).

    Spec: vhost-user VHOST_USER_SET_VRING_CALL, VHOST_USER_SET_VRING_KICK.
    """

    __slots__ = ("index", "vq", "_signal", "kick_reader", "kick_fd")

    def __init__(self, index: int, vq: Any, signal: Callable[[int], None],
                 kick_fd: int | None = None) -> None:
        self.index = index
        self.vq = vq
        self._signal = signal
        self.kick_reader: Callable[[int], None] | None = None
        self.kick_fd = kick_fd

    def notify(self) -> None:
        """Interrupt the guest for this queue (write the call eventfd)."""
        fd = self.vq.call_fd
        if fd is not None:
            self._signal(fd)

    def notify_if_needed(self) -> bool:
        """``vq.should_notify()`` and, if so, :meth:`notify`; returns whether it signalled."""
        if self.vq.should_notify():
            self.notify()
            return True
        return False

    def __repr__(self) -> str:
        return f"QueueHandle(index={self.index})"
