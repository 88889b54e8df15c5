"""Test helpers for vhost-user: a tiny echo device and session/front-end builders.

``EchoDevice`` (device id 0x7E57, test only): every chain popped from a live queue gets its
readable bytes copied into its writable buffers (as far as they fit); it is pushed with the
number of bytes written and the guest is notified when the ring says so. It records every
device-interface call in ``events`` so tests can assert the order.
"""

from __future__ import annotations

from typing import Any

from ring.errors import DriverError
from vhost_user.device import QueueHandle

__all__ = ["EchoDevice"]


class EchoDevice:
    """A VhostUserDevice that echoes each chain's readable bytes into its writable part."""

    device_id = 0x7E57

    def __init__(self, num_queues: int = 2, config: bytes = bytes(range(12)),
                 features: int = 0) -> None:
        self.num_queues = num_queues
        self.config = bytearray(config)
        self._features = features
        self.handles: dict[int, QueueHandle] = {}
        self.events: list[tuple] = []
        self.negotiated = None

    def device_features(self) -> int:
        return self._features

    def config_read(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.config):
            raise ValueError(f"config read {offset}+{size} beyond {len(self.config)}")
        return bytes(self.config[offset : offset + size])

    def config_write(self, offset: int, data: bytes) -> None:
        if offset + len(data) > len(self.config):
            raise ValueError("config write out of range")
        self.config[offset : offset + len(data)] = data
        self.events.append(("config_write", offset, bytes(data)))

    def set_features(self, features: int) -> None:
        self.negotiated = features
        self.events.append(("set_features", features))

    def queue_started(self, handle: QueueHandle) -> None:
        self.handles[handle.index] = handle
        self.events.append(("started", handle.index))
        self.kick(handle.index)  # buffers may already be waiting

    def queue_stopped(self, index: int) -> None:
        self.handles.pop(index, None)
        self.events.append(("stopped", index))

    def kick(self, index: int) -> None:
        handle = self.handles.get(index)
        if handle is None:
            return
        vq = handle.vq
        completed = 0
        try:
            while True:
                chain = vq.pop()
                if chain is None:
                    break
                data = chain.read_all()
                written = vq.fill(chain, data) if chain.writable_bytes else 0
                vq.push(chain.head, written, chain.ring_slots)
                completed += 1
        except DriverError as exc:  # a hostile ring: the queue is broken, the device goes on
            self.events.append(("broken", index, exc.code))
            completed += exc.head is not None
        if completed and vq.should_notify():
            handle.notify()

    def reset(self) -> None:
        self.handles.clear()
        self.events.append(("reset",))

    def snapshot(self) -> dict:
        return {"config": self.config.hex()}

    def restore(self, state: dict) -> None:
        self.config = bytearray.fromhex(state["config"])


def make_echo(**kwargs: Any) -> EchoDevice:
    return EchoDevice(**kwargs)
