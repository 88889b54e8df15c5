"""Exceptions raised by the ring package (guest memory and virtqueues).

Tree::

    RingError                      base of everything raised here
    ├── DriverError                guest broke a ring rule       .code, .queue, .head, .chains
    ├── GuestAddressError          guest address not mapped      .gpa, .length
    └── MemoryMapError             bad region table              .reason

``ChainError`` numbers every way a guest ring can be hostile; the C implementation mirrors it
one-to-one as ``VR_E_*`` in ``csrc/vring.h`` and returns the negative value. The numeric
values are part of that ABI: never renumber.

Spec: virtio 1.2 §2.7.5.2 / §2.7.13 (device requirements on descriptors).
"""

from __future__ import annotations

import enum

__all__ = [
    "ChainError",
    "DriverError",
    "GuestAddressError",
    "MemoryMapError",
    "RingError",
]


class ChainError(enum.IntEnum):
    """Why a chain walk failed (``VR_E_*`` in csrc/vring.h, negated in C)."""

    BROKEN = 1  # queue latched broken by an earlier error
    AVAIL_IDX = 2  # avail->idx moved by more than the queue size
    HEAD_RANGE = 3  # head (split) or buffer id (packed) >= queue size
    LOOP = 4  # more descriptors than the table holds
    NEXT_RANGE = 5  # next >= table length
    INDIRECT_NESTED = 6  # INDIRECT inside an indirect table
    INDIRECT_NEXT = 7  # INDIRECT together with NEXT
    INDIRECT_LEN = 8  # indirect len 0, not a multiple of 16, or > 65536 entries
    ORDER = 9  # readable descriptor after a writable one
    TOTAL_LEN = 10  # chain total length above 0xFFFFFFFF
    ADDR = 11  # buffer (or indirect table) outside guest memory
    TOO_MANY_SEGMENTS = 12  # more than MAX_SEGMENTS memoryviews
    PACKED_WRAP = 13  # packed: a later descriptor not available with the expected wrap
    NOT_READY = 14  # queue used before configure()


class RingError(Exception):
    """Base class of every exception raised by ``ring``."""


class DriverError(RingError):
    """The guest driver broke a virtqueue rule; the queue is now broken.

    ``code`` is the :class:`ChainError`; ``queue`` the queue index; ``head`` the chain head
    (split) or buffer id (packed) when known, else ``None``; ``chains`` the chains a
    ``pop_batch`` had already popped before the failing one (they are in flight and must
    still be pushed).
    """

    def __init__(
        self,
        code: ChainError,
        queue: int = 0,
        head: int | None = None,
        chains: list | None = None,
    ) -> None:
        self.code = ChainError(code)
        self.queue = queue
        self.head = head
        self.chains = list(chains) if chains else []
        where = f"queue {queue}" + ("" if head is None else f" head {head}")
        super().__init__(f"{where}: {self.code.name}")

    def __reduce__(self):  # keep attributes across pickling (multiprocessing, hypothesis)
        return (type(self), (self.code, self.queue, self.head, self.chains))


class GuestAddressError(RingError):
    """``[gpa, gpa + length)`` is not wholly covered by guest memory regions."""

    def __init__(self, gpa: int, length: int) -> None:
        self.gpa = gpa
        self.length = length
        super().__init__(f"guest address range {gpa:#x}+{length:#x} not mapped")

    def __reduce__(self):
        return (type(self), (self.gpa, self.length))


class MemoryMapError(RingError):
    """The region table is invalid (overlap, unknown region, failed mapping)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

    def __reduce__(self):
        return (type(self), (self.reason,))
