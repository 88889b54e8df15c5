"""vhost-user wire formats: request codes, feature bits, the header and every payload.

All vhost-user numbers are in the machine's native byte order (struct prefix ``"="``, no
alignment padding except where the C structure has it and QEMU sends it, noted per class).
Every payload is a frozen slotted dataclass with a class-level ``struct.Struct`` ``FMT``, an
``unpack()`` that checks syntax (exact size, reserved bits, ranges) and raises
:class:`~vhost_user.errors.FrontendProtocolError`, and a ``pack()``.

Spec: vhost-user "Message Specification" (QEMU revision pinned in docs/spec-refs.md).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from typing import ClassVar

from vhost_user.errors import FrontendProtocolError

__all__ = [
    "BackendReq",
    "ConfigFlag",
    "ConfigSpace",
    "DEVICE_FEATURE_MASK",
    "DeviceStateDirection",
    "DeviceStatePhase",
    "FrontendReq",
    "Header",
    "HeaderFlag",
    "Inflight",
    "IotlbMsg",
    "IotlbType",
    "LogDescription",
    "MAX_CONFIG_SIZE",
    "MAX_PAYLOAD_BYTES",
    "MEMORY_BASELINE_NREGIONS",
    "MemRegMsg",
    "MemoryRegion",
    "MemoryTable",
    "SharedObject",
    "TransferDeviceState",
    "U64",
    "VERSION",
    "VhostUserProtocolFeature",
    "VirtioFeature",
    "VringAddr",
    "VringArea",
    "VringAddrFlag",
    "VringFd",
    "VringState",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "inflight_queue_region_bytes",
]

VERSION = 0x1  # "Lower 2 bits are the version (currently 0x01)"
MAX_CONFIG_SIZE = 256  # QEMU VHOST_USER_MAX_CONFIG_SIZE
MEMORY_BASELINE_NREGIONS = 8  # QEMU VHOST_MEMORY_BASELINE_NREGIONS: regions in SET_MEM_TABLE
MAX_PAYLOAD_BYTES = 4096  # our bound; the largest payload QEMU sends is < 1 KiB (crypto)
VRING_IDX_MASK = 0xFF  # SET_VRING_KICK/CALL/ERR: bits 0-7 the vring index
VRING_NOFD_MASK = 0x100  # bit 8: no fd in the ancillary data


def _syntax(request: int, message: str, raw: bytes = b"") -> FrontendProtocolError:
    return FrontendProtocolError(message, request=request, raw=raw, should_disconnect=True)


class FrontendReq(enum.IntEnum):
    """Front-end → back-end request codes (``VHOST_USER_`` prefix dropped).

    Spec: vhost-user "Front-end message types".
    """

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # previous name SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendReq(enum.IntEnum):
    """Back-end → front-end request codes, sent on the back-end channel.

    Spec: vhost-user "Back-end message types".
    """

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class HeaderFlag(enum.IntFlag):
    """Header ``flags`` bits. Spec: vhost-user "Header"."""

    VERSION_MASK = 0x3
    REPLY = 0x4
    NEED_REPLY = 0x8


class VhostUserProtocolFeature(enum.IntFlag):
    """Protocol feature *masks* (``1 << VHOST_USER_PROTOCOL_F_*``).

    Spec: vhost-user "Protocol features".
    """

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


class VirtioFeature(enum.IntFlag):
    """Transport feature *masks* the back-end deals with (device-specific bits are 0..23).

    Spec: virtio 1.2 §6 "Reserved Feature Bits"; vhost-user "Communication"
    (``VHOST_USER_F_PROTOCOL_FEATURES``), "Migration" (``VHOST_F_LOG_ALL``).
    """

    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
    VHOST_F_LOG_ALL = 1 << 26
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33  # VIRTIO_F_IOMMU_PLATFORM in vhost-user text
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    RING_RESET = 1 << 40


DEVICE_FEATURE_MASK = (1 << 24) - 1  # virtio 1.2 §6: bits 0..23 are device type specific


class VringAddrFlag(enum.IntFlag):
    """``vhost_vring_addr.flags``. Spec: vhost-user "Migration" (``VHOST_VRING_F_LOG``)."""

    VHOST_VRING_F_LOG = 1 << 0


class ConfigFlag(enum.IntEnum):
    """``VhostUserConfig.flags``. Spec: vhost-user "Virtio device config space"."""

    WRITABLE_FIELDS = 0
    LIVE_MIGRATION = 1


class DeviceStateDirection(enum.IntEnum):
    """Spec: vhost-user "Device state transfer parameters"."""

    SAVE = 0
    LOAD = 1


class DeviceStatePhase(enum.IntEnum):
    """Spec: vhost-user "Device state transfer parameters"."""

    STOPPED = 0


class IotlbType(enum.IntEnum):
    """``vhost_iotlb_msg.type``. Spec: vhost-user "An IOTLB message"."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


# ----------------------------------------------------------------------------- header


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    """Message header: request u32, flags u32, size u32. Spec: vhost-user "Header"."""

    FMT: ClassVar[struct.Struct] = struct.Struct("=III")
    request: int
    flags: int
    size: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "Header":
        if len(data) != cls.FMT.size:
            raise _syntax(0, f"header needs {cls.FMT.size} bytes, got {len(data)}", bytes(data))
        request, flags, size = cls.FMT.unpack(data)
        if flags & HeaderFlag.VERSION_MASK != VERSION:
            raise _syntax(request, f"unsupported vhost-user version {flags & 3}", bytes(data))
        return cls(request, flags, size)

    def pack(self) -> bytes:
        return self.FMT.pack(self.request, self.flags, self.size)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.REPLY)


# ----------------------------------------------------------------------------- payloads


def _check_size(cls, request: int, data: bytes | memoryview) -> None:
    if len(data) != cls.FMT.size:
        raise _syntax(
            request, f"{cls.__name__} needs {cls.FMT.size} bytes, got {len(data)}", bytes(data)
        )


@dataclasses.dataclass(frozen=True, slots=True)
class U64:
    """A single 64-bit integer. Spec: vhost-user "A single 64-bit integer"."""

    FMT: ClassVar[struct.Struct] = struct.Struct("=Q")
    u64: int

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = 0) -> "U64":
        _check_size(cls, request, data)
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(self.u64)


@dataclasses.dataclass(frozen=True, slots=True)
class VringState:
    """index u32, num u32. Spec: vhost-user "A vring state description" (also the split and
    packed "vring descriptor index/indices" of SET/GET_VRING_BASE)."""

    FMT: ClassVar[struct.Struct] = struct.Struct("=II")
    index: int
    num: int

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = 0) -> "VringState":
        _check_size(cls, request, data)
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(self.index, self.num)


@dataclasses.dataclass(frozen=True, slots=True)
class VringFd:
    """The u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 vring index, bit 8 "no fd" (polling).

    Spec: vhost-user VHOST_USER_SET_VRING_KICK ("Bits (0-7) of the payload contain the vring
    index. Bit 8 is the invalid FD flag."). Other bits must be zero (syntax error otherwise).
    """

    FMT: ClassVar[struct.Struct] = struct.Struct("=Q")
    index: int
    nofd: bool

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = 0) -> "VringFd":
        _check_size(cls, request, data)
        (value,) = cls.FMT.unpack(data)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise _syntax(request, f"reserved bits set in vring fd payload {value:#x}", bytes(data))
        return cls(value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK))

    def pack(self) -> bytes:
        return self.FMT.pack(self.index | (VRING_NOFD_MASK if self.nofd else 0))


@dataclasses.dataclass(frozen=True, slots=True)
class VringAddr:
    """struct vhost_vring_addr (40 bytes): index, flags, then the descriptor, used and
    available ring *user* addresses and the used ring's ``log_guest_addr``.

    Spec: vhost-user "A vring address description" (the table's "size" column has no field in
    the C structure QEMU sends; 4+4+4×8 = 40 bytes).
    """

    FMT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = 0) -> "VringAddr":
        _check_size(cls, request, data)
        addr = cls(*cls.FMT.unpack(data))
        if addr.flags & ~VringAddrFlag.VHOST_VRING_F_LOG:
            raise _syntax(request, f"unknown vring addr flags {addr.flags:#x}", bytes(data))
        return addr

    def pack(self) -> bytes:
        return self.FMT.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryRegion:
    """guest address, size, user address, mmap offset (4 × u64).

    Spec: vhost-user "Memory region description" (without XEN_MMAP, which we do not offer).
    """

    FMT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = 0) -> "MemoryRegion":
        _check_size(cls, request, data)
        region = cls(*cls.FMT.unpack(data))
        region.check(request)
        return region

    def check(self, request: int = 0) -> None:
        """Syntax: non-empty, no 64-bit wrap-around of any of the three ranges."""
        if self.memory_size == 0:
            raise _syntax(request, "memory region of size 0")
        limit = 1 << 64
        if (
            self.guest_phys_addr + self.memory_size > limit
            or self.userspace_addr + self.memory_size > limit
            or self.mmap_offset + self.memory_size > limit
        ):
            raise _syntax(request, f"memory region {self} wraps the 64-bit space")

    def pack(self) -> bytes:
        return self.FMT.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryTable:
    """num regions u32, padding u32, then ``num`` regions (QEMU sends only the used ones:
    size = 8 + 32 × num). At most 8 regions (QEMU VHOST_MEMORY_BASELINE_NREGIONS).

    Spec: vhost-user "Multiple Memory regions description", VHOST_USER_SET_MEM_TABLE.
    """

    FMT: ClassVar[struct.Struct] = struct.Struct("=II")
    regions: tuple[MemoryRegion, ...]

    MIN_SIZE: ClassVar[int] = 8
    MAX_SIZE: ClassVar[int] = 8 + MEMORY_BASELINE_NREGIONS * 32

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = FrontendReq.SET_MEM_TABLE) -> "MemoryTable":
        if len(data) < cls.FMT.size:
            raise _syntax(request, f"memory table of {len(data)} bytes", bytes(data))
        num, _padding = cls.FMT.unpack_from(data)
        if num > MEMORY_BASELINE_NREGIONS:
            raise _syntax(request, f"{num} memory regions > {MEMORY_BASELINE_NREGIONS}", bytes(data))
        rsize = MemoryRegion.FMT.size
        # QEMU sends exactly num regions; a front-end sending the full 8-slot array is
        # accepted too (the unused slots are ignored).
        if len(data) not in (cls.FMT.size + num * rsize, cls.MAX_SIZE):
            raise _syntax(
                request, f"memory table with {num} regions has {len(data)} bytes", bytes(data)
            )
        regions = tuple(
            MemoryRegion.unpack(data[8 + i * rsize : 8 + (i + 1) * rsize], request)
            for i in range(num)
        )
        return cls(regions)

    def pack(self) -> bytes:
        return self.FMT.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)


@dataclasses.dataclass(frozen=True, slots=True)
class MemRegMsg:
    """padding u64 + one region (40 bytes). Spec: vhost-user "Single memory region
    description" (VHOST_USER_ADD_MEM_REG, VHOST_USER_REM_MEM_REG)."""

    FMT: ClassVar[struct.Struct] = struct.Struct("=QQQQQ")
    region: MemoryRegion

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = 0) -> "MemRegMsg":
        _check_size(cls, request, data)
        return cls(MemoryRegion.unpack(data[8:], request))

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()


@dataclasses.dataclass(frozen=True, slots=True)
class LogDescription:
    """mmap size u64, mmap offset u64. Spec: vhost-user "Log description", SET_LOG_BASE."""

    FMT: ClassVar[struct.Struct] = struct.Struct("=QQ")
    mmap_size: int
    mmap_offset: int

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = 0) -> "LogDescription":
        _check_size(cls, request, data)
        log = cls(*cls.FMT.unpack(data))
        if log.mmap_size == 0 or log.mmap_size + log.mmap_offset > 1 << 64:
            raise _syntax(request, f"bad log area {log}", bytes(data))
        return log

    def pack(self) -> bytes:
        return self.FMT.pack(self.mmap_size, self.mmap_offset)


@dataclasses.dataclass(frozen=True, slots=True)
class IotlbMsg:
    """struct vhost_iotlb_msg: iova, size, uaddr (u64), perm u8, type u8, padded to 32 bytes
    as the C structure is. Parsed only (we do not offer ACCESS_PLATFORM).

    Spec: vhost-user "An IOTLB message".
    """

    FMT: ClassVar[struct.Struct] = struct.Struct("=QQQBB6x")
    iova: int
    size: int
    uaddr: int
    perm: int
    type_: int

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = 0) -> "IotlbMsg":
        _check_size(cls, request, data)
        msg = cls(*cls.FMT.unpack(data))
        if msg.perm > 3 or msg.type_ not in tuple(IotlbType):
            raise _syntax(request, f"bad IOTLB message {msg}", bytes(data))
        return msg

    def pack(self) -> bytes:
        return self.FMT.pack(self.iova, self.size, self.uaddr, self.perm, self.type_)


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigSpace:
    """offset u32, size u32, flags u32, then ``size`` payload bytes (≤ 256); QEMU sends
    12 + size bytes. Spec: vhost-user "Virtio device config space", GET_CONFIG, SET_CONFIG."""

    FMT: ClassVar[struct.Struct] = struct.Struct("=III")
    offset: int
    size: int
    flags: int
    payload: bytes

    MIN_SIZE: ClassVar[int] = 12
    MAX_SIZE: ClassVar[int] = 12 + MAX_CONFIG_SIZE

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = 0) -> "ConfigSpace":
        if not cls.MIN_SIZE <= len(data) <= cls.MAX_SIZE:
            raise _syntax(request, f"config message of {len(data)} bytes", bytes(data))
        offset, size, flags = cls.FMT.unpack_from(data)
        if size > MAX_CONFIG_SIZE or len(data) != 12 + size:
            raise _syntax(request, f"config size {size} in {len(data)}-byte payload", bytes(data))
        if offset + size > MAX_CONFIG_SIZE:
            raise _syntax(request, f"config range {offset}+{size} beyond 256 bytes", bytes(data))
        if flags not in tuple(ConfigFlag):
            raise _syntax(request, f"unknown config flags {flags}", bytes(data))
        return cls(offset, size, flags, bytes(data[12:]))

    def pack(self) -> bytes:
        return self.FMT.pack(self.offset, self.size, self.flags) + bytes(self.payload)


@dataclasses.dataclass(frozen=True, slots=True)
class VringArea:
    """u64 (vring index and flags), size u64, offset u64.
    Spec: vhost-user "Vring area description" (BACKEND_VRING_HOST_NOTIFIER_MSG)."""

    FMT: ClassVar[struct.Struct] = struct.Struct("=QQQ")
    u64: int
    size: int
    offset: int

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = 0) -> "VringArea":
        _check_size(cls, request, data)
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(self.u64, self.size, self.offset)


@dataclasses.dataclass(frozen=True, slots=True)
class Inflight:
    """mmap size u64, mmap offset u64, num queues u16, queue size u16, padded to 24 bytes as
    QEMU's ``VhostUserInflight`` is (``hdr.size = sizeof(msg.payload.inflight)``).

    Spec: vhost-user "Inflight description", GET_INFLIGHT_FD, SET_INFLIGHT_FD.
    """

    FMT: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = 0) -> "Inflight":
        _check_size(cls, request, data)
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)


@dataclasses.dataclass(frozen=True, slots=True)
class SharedObject:
    """16-byte UUID. Spec: vhost-user "VhostUserShared"."""

    FMT: ClassVar[struct.Struct] = struct.Struct("=16s")
    uuid: bytes

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = 0) -> "SharedObject":
        _check_size(cls, request, data)
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(self.uuid)


@dataclasses.dataclass(frozen=True, slots=True)
class TransferDeviceState:
    """transfer direction u32, migration phase u32.
    Spec: vhost-user "Device state transfer parameters", SET_DEVICE_STATE_FD."""

    FMT: ClassVar[struct.Struct] = struct.Struct("=II")
    direction: int
    phase: int

    @classmethod
    def unpack(cls, data: bytes | memoryview, request: int = 0) -> "TransferDeviceState":
        _check_size(cls, request, data)
        state = cls(*cls.FMT.unpack(data))
        if state.direction not in tuple(DeviceStateDirection) or state.phase not in tuple(
            DeviceStatePhase
        ):
            raise _syntax(request, f"bad device state transfer parameters {state}", bytes(data))
        return state

    def pack(self) -> bytes:
        return self.FMT.pack(self.direction, self.phase)


# ----------------------------------------------------------------------------- inflight

INFLIGHT_ALIGNMENT = 64  # QEMU/libvhost-user align every queue region to 64 bytes
DESC_STATE_SPLIT_BYTES = 16  # DescStateSplit: inflight u8, padding[5], next u16, counter u64
QUEUE_REGION_SPLIT_HEADER_BYTES = 16  # features u64, version, desc_num, last_batch_head, used_idx
DESC_STATE_PACKED_BYTES = 32  # inflight, padding, next, last, num, counter, id, flags, len, addr
QUEUE_REGION_PACKED_HEADER_BYTES = 32  # 29 bytes of fields, desc[] aligned to 8


def inflight_queue_region_bytes(queue_size: int, packed: bool) -> int:
    """Bytes of one queue's inflight region, rounded up to 64.

    Spec: vhost-user "Inflight I/O tracking" (QueueRegionSplit / QueueRegionPacked).
    """
    if packed:
        raw = QUEUE_REGION_PACKED_HEADER_BYTES + DESC_STATE_PACKED_BYTES * queue_size
    else:
        raw = QUEUE_REGION_SPLIT_HEADER_BYTES + DESC_STATE_SPLIT_BYTES * queue_size
    return (raw + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT
