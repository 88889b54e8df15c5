"""What the two virtqueue implementations share: construction checks, identity, the used
element checks, ``push``, ``fill`` and ``from_state``.

``ring.pyring.Virtqueue`` and ``ring.cring.Virtqueue`` keep their state differently (Python
attributes vs a caller-owned C struct) and implement the ring walk themselves; everything
here is the same for both by construction, so it lives once.

Spec: virtio 1.2 §2.7 (split), §2.8 (packed).
"""

from __future__ import annotations

import logging

from ring.errors import ChainError, DriverError, RingError
from ring.memory import GuestMemory
from ring.types import Chain, Pending
from ring.wire import MAX_QUEUE_SIZE, MAX_SEGMENTS, SplitLayout

log = logging.getLogger("ring")


class VirtqueueBase:
    """The implementation-independent half of a device-side virtqueue.

    Both implementations also carry ``call_fd``: the eventfd that signals this queue's used
    buffer notifications (virtio 1.2 §2.7.7; vhost-user VHOST_USER_SET_VRING_CALL), or None.
    The owner keeps it current; the ring calls never write it, the stream pump
    (:mod:`ring.pump`) and ``QueueHandle.notify`` do.
    """

    def __init__(self, memory: GuestMemory, size: int, *, packed: bool, event_idx: bool,
                 notify_on_empty: bool = False, index: int = 0, logger: logging.Logger = log
                 ) -> None:
        if not 1 <= size <= MAX_QUEUE_SIZE:
            raise ValueError(f"queue size {size} outside 1..{MAX_QUEUE_SIZE}")
        if not packed and size & (size - 1):
            # Spec: virtio 1.2 §2.7 "Queue Size value is always a power of 2" (split).
            raise ValueError(f"split queue size {size} is not a power of two")
        self.memory = memory
        self.size = size
        self.packed = bool(packed)
        self.event_idx = bool(event_idx)
        self.notify_on_empty = bool(notify_on_empty)
        self.index = index
        self.log = logger.getChild(str(index))
        self.layout = SplitLayout(size)
        self.desc_gpa: int | None = None
        self.driver_gpa: int | None = None
        self.device_gpa: int | None = None

    @property
    def configured(self) -> bool:
        return self.desc_gpa is not None

    def __repr__(self) -> str:
        kind = "packed" if self.packed else "split"
        return (f"<Virtqueue {self.index} {kind} size={self.size} "
                f"last_avail={self.last_avail_idx} used={self.used_idx} "
                f"in_flight={self.in_flight} broken={self.broken}>")

    @classmethod
    def from_state(cls, memory: GuestMemory, state: dict, *, event_idx: bool,
                   notify_on_empty: bool = False, index: int = 0):
        """Build a queue and load ``state`` into it (call :meth:`configure` afterwards only if
        ``used_idx`` should be re-read from guest memory; otherwise configure first)."""
        vq = cls(memory, state["size"], packed=state["packed"], event_idx=event_idx,
                 notify_on_empty=notify_on_empty, index=index)
        vq.load_state(state)
        return vq

    # -- state save / restore (restart, SET_DEVICE_STATE_FD) --------------------------------
    def state(self) -> dict:
        """A JSON-able snapshot of the device-side ring state, read through the public
        properties (so both implementations produce the same dict)."""
        pending = self.pending
        return {
            "packed": self.packed,
            "size": self.size,
            "last_avail_idx": self.last_avail_idx,
            "used_idx": self.used_idx,
            "avail_wrap": self.avail_wrap,
            "used_wrap": self.used_wrap,
            "in_flight": self.in_flight,
            "signalled_used": self.signalled_used,
            "signalled_used_valid": self.signalled_used_valid,
            "broken": None if self.broken is None else int(self.broken),
            "pending": None if pending is None else {
                "head": pending.head, "ring_slots": pending.ring_slots,
                "offset": pending.offset, "segments": [list(s) for s in pending.segments]},
        }

    def load_state(self, state: dict) -> None:
        """Restore a :meth:`state` snapshot (same ``packed`` and ``size``)."""
        if state["packed"] != self.packed or state["size"] != self.size:
            raise ValueError("state is for a different queue shape")
        p = state["pending"]
        if p is not None and len(p["segments"]) > MAX_SEGMENTS:
            raise ValueError(f"pending chain has more than {MAX_SEGMENTS} segments")
        pending = None if p is None else Pending(
            int(p["head"]), int(p["ring_slots"]), int(p["offset"]),
            tuple((int(g), int(n)) for g, n in p["segments"]))
        self._unpop_mark = None
        self._restore(
            last_avail_idx=int(state["last_avail_idx"]), used_idx=int(state["used_idx"]),
            avail_wrap=bool(state["avail_wrap"]), used_wrap=bool(state["used_wrap"]),
            in_flight=int(state["in_flight"]), signalled_used=int(state["signalled_used"]),
            signalled_used_valid=bool(state["signalled_used_valid"]),
            broken=None if state["broken"] is None else ChainError(state["broken"]),
            pending=pending)

    def pending_rest(self) -> tuple[bytes, int]:
        """``(data, lost)``: a copy of the partly written chain's bytes after its offset
        (``pending``; ``b""`` when there is none) and how many of them could not be read
        (a segment whose memory went away). For a queue that stops with the chain pending:
        its rest, written on by whoever keeps the stream going, must not change when the
        guest reuses the buffer."""
        pending = self.pending
        if pending is None:
            return b"", 0
        data, lost, skip = bytearray(), 0, pending.offset
        for gpa, length in pending.segments:
            if skip < length:
                try:
                    data += self.memory.read(gpa + skip, length - skip)
                except RingError:
                    lost += length - skip
            skip = max(0, skip - length)
        return bytes(data), lost

    def push(self, head: int, used_len: int, ring_slots: int = 1) -> None:
        """Return one chain to the driver: write the used element, then publish it.

        Spec: virtio 1.2 §2.7.8.2 / §2.8.21 (the device updates the used ring / descriptor).
        """
        self.push_batch([(head, used_len, ring_slots)])

    def _check_used(self, items: list) -> None:
        """Shared preconditions of ``push_batch``: configured, and every used element in
        range (a packed element may not cover more slots than the ring has)."""
        if not self.configured:
            raise DriverError(ChainError.NOT_READY, self.index)
        mark = self._unpop_mark
        if mark is not None and any(item[0] == mark[0] for item in items):
            self._unpop_mark = None
        for head, used_len, ring_slots in items:
            if (not 0 <= head < self.size or not 0 <= used_len <= 0xFFFFFFFF
                    or not 1 <= ring_slots <= self.size):
                raise ValueError(f"bad used element ({head}, {used_len}, {ring_slots})")

    def fill(self, chain: Chain, data, offset: int = 0) -> int:
        """Copy ``data`` into the chain's writable buffers starting ``offset`` bytes in, marking
        the dirty log; returns the bytes copied (at most the writable space)."""
        data = memoryview(data).cast("B")
        copied = 0
        skip = offset
        for view, (gpa, length) in zip(chain.writable, chain.writable_gpas):
            if skip >= length:
                skip -= length
                continue
            n = min(length - skip, len(data) - copied)
            if n <= 0:
                break
            view[skip : skip + n] = data[copied : copied + n]
            self.memory.mark_dirty(gpa + skip, n)
            copied += n
            skip = 0
        return copied
