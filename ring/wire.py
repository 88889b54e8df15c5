"""Virtqueue wire formats: descriptors, used elements, event suppression, flags, layouts.

All virtio ring structures are little-endian.

Spec: virtio 1.2 §2.7 (Split Virtqueues), §2.8 (Packed Virtqueues).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from typing import ClassVar

__all__ = [
    "AvailFlag",
    "DescFlag",
    "MAX_QUEUE_SIZE",
    "MAX_INDIRECT_ENTRIES",
    "MAX_SEGMENTS",
    "MAX_PREFIX",
    "PackedDesc",
    "PackedEventFlag",
    "PackedEventSuppress",
    "SplitLayout",
    "UsedFlag",
    "VirtqDesc",
    "VirtqUsedElem",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "VRING_PACKED_DESC_F_AVAIL",
    "VRING_PACKED_DESC_F_USED",
    "VRING_PACKED_EVENT_FLAG_DESC",
    "VRING_PACKED_EVENT_FLAG_DISABLE",
    "VRING_PACKED_EVENT_FLAG_ENABLE",
    "VRING_USED_F_NO_NOTIFY",
    "VirtioRingFeature",
    "need_event",
    "split_layout",
]

MAX_QUEUE_SIZE = 32768  # Spec: virtio 1.2 §2.7 "Queue Size ... maximum ... 32768"
MAX_SEGMENTS = 1024  # memoryviews per chain (IOV_MAX); more → ChainError.TOO_MANY_SEGMENTS
MAX_PREFIX = 256  # bytes of the per-chain prefix rx_from_fd writes in front of the payload
MAX_INDIRECT_ENTRIES = 65536  # indirect len / 16 above this → ChainError.INDIRECT_LEN
DESC_SIZE = 16


class DescFlag(enum.IntFlag):
    """Descriptor flags, split and packed. Spec: virtio 1.2 §2.7.5, §2.8.1."""

    NEXT = 1  # VIRTQ_DESC_F_NEXT
    WRITE = 2  # VIRTQ_DESC_F_WRITE: device-writable
    INDIRECT = 4  # VIRTQ_DESC_F_INDIRECT
    AVAIL = 1 << 7  # VIRTQ_DESC_F_AVAIL (packed)
    USED = 1 << 15  # VIRTQ_DESC_F_USED (packed)


class AvailFlag(enum.IntFlag):
    """avail->flags. Spec: virtio 1.2 §2.7.6."""

    VRING_AVAIL_F_NO_INTERRUPT = 1


class UsedFlag(enum.IntFlag):
    """used->flags. Spec: virtio 1.2 §2.7.8."""

    VRING_USED_F_NO_NOTIFY = 1


class PackedEventFlag(enum.IntEnum):
    """Packed event suppression ``flags`` (a 2-bit code, not a mask). Spec: virtio 1.2 §2.8.10."""

    ENABLE = 0  # RING_EVENT_FLAGS_ENABLE
    DISABLE = 1  # RING_EVENT_FLAGS_DISABLE
    DESC = 2  # RING_EVENT_FLAGS_DESC (needs VIRTIO_F_RING_EVENT_IDX)


class VirtioRingFeature(enum.IntEnum):
    """Feature *bit numbers* relevant to the ring. Spec: virtio 1.2 §6 (Reserved Feature Bits)."""

    VIRTIO_F_NOTIFY_ON_EMPTY = 24
    VIRTIO_F_RING_INDIRECT_DESC = 28
    VIRTIO_F_RING_EVENT_IDX = 29
    VIRTIO_F_VERSION_1 = 32
    VIRTIO_F_RING_PACKED = 34


VRING_DESC_F_NEXT = DescFlag.NEXT
VRING_DESC_F_WRITE = DescFlag.WRITE
VRING_DESC_F_INDIRECT = DescFlag.INDIRECT
VRING_PACKED_DESC_F_AVAIL = DescFlag.AVAIL
VRING_PACKED_DESC_F_USED = DescFlag.USED
VRING_AVAIL_F_NO_INTERRUPT = AvailFlag.VRING_AVAIL_F_NO_INTERRUPT
VRING_USED_F_NO_NOTIFY = UsedFlag.VRING_USED_F_NO_NOTIFY
VRING_PACKED_EVENT_FLAG_ENABLE = PackedEventFlag.ENABLE
VRING_PACKED_EVENT_FLAG_DISABLE = PackedEventFlag.DISABLE
VRING_PACKED_EVENT_FLAG_DESC = PackedEventFlag.DESC


@dataclasses.dataclass(frozen=True, slots=True)
class VirtqDesc:
    """Split-ring descriptor (16 bytes). Spec: virtio 1.2 §2.7.5."""

    FMT: ClassVar[struct.Struct] = struct.Struct("<QIHH")
    addr: int
    len_: int
    flags: int
    next: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "VirtqDesc":
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(self.addr, self.len_, self.flags, self.next)


@dataclasses.dataclass(frozen=True, slots=True)
class PackedDesc:
    """Packed-ring descriptor (16 bytes). Spec: virtio 1.2 §2.8.13 (struct pvirtq_desc)."""

    FMT: ClassVar[struct.Struct] = struct.Struct("<QIHH")
    addr: int
    len_: int
    id: int
    flags: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "PackedDesc":
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(self.addr, self.len_, self.id, self.flags)


@dataclasses.dataclass(frozen=True, slots=True)
class VirtqUsedElem:
    """Split used-ring element (8 bytes). Spec: virtio 1.2 §2.7.8 (struct virtq_used_elem)."""

    FMT: ClassVar[struct.Struct] = struct.Struct("<II")
    id: int
    len_: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "VirtqUsedElem":
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(self.id, self.len_)


@dataclasses.dataclass(frozen=True, slots=True)
class PackedEventSuppress:
    """Packed event suppression structure (4 bytes). Spec: virtio 1.2 §2.8.10, §2.8.14.

    ``off_wrap``: bits 0–14 descriptor offset, bit 15 wrap counter.
    """

    FMT: ClassVar[struct.Struct] = struct.Struct("<HH")
    off_wrap: int
    flags: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "PackedEventSuppress":
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(self.off_wrap, self.flags)


@dataclasses.dataclass(frozen=True, slots=True)
class SplitLayout:
    """Byte offsets and sizes of the split ring areas for a queue size.

    avail: flags u16, idx u16, ring[size] u16, used_event u16.
    used: flags u16, idx u16, ring[size] {id u32, len u32}, avail_event u16.
    Spec: virtio 1.2 §2.7 (table of part sizes and alignments), §2.7.6, §2.7.8.
    """

    size: int

    @property
    def desc_bytes(self) -> int:
        return DESC_SIZE * self.size

    @property
    def avail_bytes(self) -> int:
        return 6 + 2 * self.size

    @property
    def used_bytes(self) -> int:
        return 6 + 8 * self.size

    # avail ring offsets
    AVAIL_FLAGS: ClassVar[int] = 0
    AVAIL_IDX: ClassVar[int] = 2
    AVAIL_RING: ClassVar[int] = 4

    def used_event_offset(self) -> int:
        return 4 + 2 * self.size

    # used ring offsets
    USED_FLAGS: ClassVar[int] = 0
    USED_IDX: ClassVar[int] = 2
    USED_RING: ClassVar[int] = 4

    def avail_event_offset(self) -> int:
        return 4 + 8 * self.size


def split_layout(size: int) -> SplitLayout:
    return SplitLayout(size)


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event: notify iff ``event_idx`` lies in ``[old, new)`` modulo 2^16.

    Spec: virtio 1.2 §2.7.7 (used_event), §2.7.10 (avail_event).
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
