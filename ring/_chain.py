"""Descriptor chain walking shared by split and packed rings (pure Python reference).

Spec: virtio 1.2 §2.7.5.2 / §2.7.5.3.2 (descriptor requirements), §2.8.19 (packed indirect).
"""

from __future__ import annotations

import struct

from ring.errors import ChainError, GuestAddressError
from ring.memory import GuestMemory
from ring.types import Chain
from ring.wire import MAX_INDIRECT_ENTRIES, MAX_SEGMENTS

DESC = struct.Struct("<QIHH")  # split: addr, len, flags, next; packed: addr, len, id, flags
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
TOTAL_LEN_MAX = 0xFFFFFFFF


class WalkError(Exception):
    """Internal: a chain rule was broken; ``code`` says which. Converted to DriverError."""

    def __init__(self, code: ChainError) -> None:
        super().__init__(code)
        self.code = code


class RingAccessError(Exception):
    """Internal: a ring area (desc table, avail/used ring, event struct) is not mapped."""


class ChainBuilder:
    """Accumulates the buffers of one chain, enforcing the per-buffer rules in the order
    docs/internals.md fixes: ORDER, TOTAL_LEN, ADDR, TOO_MANY_SEGMENTS.

    Spec: virtio 1.2 §2.7.4.2 "The driver MUST place any device-writable descriptor elements
    after any device-readable descriptor elements."
    """

    __slots__ = ("memory", "readable", "writable", "readable_gpas", "writable_gpas",
                 "readable_bytes", "writable_bytes", "total", "segments", "seen_write")

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.readable: list = []
        self.writable: list = []
        self.readable_gpas: list = []
        self.writable_gpas: list = []
        self.readable_bytes = 0
        self.writable_bytes = 0
        self.total = 0
        self.segments = 0
        self.seen_write = False  # a WRITE descriptor was seen (even of length 0)

    def add(self, addr: int, length: int, is_write: bool) -> None:
        """Add one buffer descriptor; raise WalkError on the first rule it breaks."""
        if is_write:
            self.seen_write = True
        elif self.seen_write:
            raise WalkError(ChainError.ORDER)
        self.total += length
        if self.total > TOTAL_LEN_MAX:
            raise WalkError(ChainError.TOTAL_LEN)
        try:
            views = self.memory.translate(addr, length)
        except GuestAddressError:
            raise WalkError(ChainError.ADDR) from None
        self.segments += len(views)
        if self.segments > MAX_SEGMENTS:
            raise WalkError(ChainError.TOO_MANY_SEGMENTS)
        if is_write:
            out, gpas = self.writable, self.writable_gpas
            self.writable_bytes += length
        else:
            out, gpas = self.readable, self.readable_gpas
            self.readable_bytes += length
        gpa = addr
        for view in views:
            out.append(view)
            gpas.append((gpa, len(view)))
            gpa += len(view)

    def build(self, head: int, ring_slots: int) -> Chain:
        return Chain(head, ring_slots, self.readable, self.writable, self.readable_bytes,
                     self.writable_bytes, tuple(self.readable_gpas), tuple(self.writable_gpas))


def copy_indirect_table(memory: GuestMemory, addr: int, length: int, nested: bool,
                        has_next: bool) -> bytes:
    """Validate an INDIRECT descriptor and copy its table once (TOCTOU: never re-read).

    Spec: virtio 1.2 §2.7.5.3.1 "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within
    an indirect descriptor (ie. only one table per descriptor)" and "... MUST NOT set both
    VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT in flags".
    """
    if nested:
        raise WalkError(ChainError.INDIRECT_NESTED)
    if has_next:
        raise WalkError(ChainError.INDIRECT_NEXT)
    if length == 0 or length % 16:
        raise WalkError(ChainError.INDIRECT_LEN)
    if length // 16 > MAX_INDIRECT_ENTRIES:
        raise WalkError(ChainError.INDIRECT_LEN)
    try:
        return memory.read(addr, length)
    except GuestAddressError:
        raise WalkError(ChainError.ADDR) from None
