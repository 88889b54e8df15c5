"""virtio-vsock wire formats: the packet header, codes, flags, event and config.

Spec: virtio 1.2 §5.10 (Socket Device). Everything here is little-endian (virtio 1.x
device-specific structures are le). A guest header is copied once into a frozen
`VsockHeader` and never re-read from guest memory (TOCTOU).

Layout of ``struct virtio_vsock_hdr`` (44 bytes, §5.10.6):

    le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port; le32 len;
    le16 type; le16 op; le32 flags; le32 buf_alloc; le32 fwd_cnt;
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace
from typing import ClassVar

from .errors import HeaderError

U32_MASK = 0xFFFFFFFF
U64_MASK = 0xFFFFFFFFFFFFFFFF

#: vsock device id (Spec: virtio 1.2 §5.10.1).
VIRTIO_ID_VSOCK = 19

#: Largest payload a Linux driver puts in one packet (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); we use it
#: as the upper bound of what we put in one RX packet too.
MAX_PKT_PAYLOAD_BYTES = 64 * 1024


class Queue(enum.IntEnum):
    """Virtqueue indices. Spec: virtio 1.2 §5.10.2."""

    RX = 0
    TX = 1
    EVENT = 2


class WellKnownCid(enum.IntEnum):
    """Reserved context ids. Spec: virtio 1.2 §5.10.4 (CIDs 0, 1, 2 and 0xffffffff reserved)."""

    HYPERVISOR = 0
    LOCAL = 1
    HOST = 2
    ANY = 0xFFFFFFFF  # VMADDR_CID_ANY


#: The host's CID as seen by the guest.
HOST_CID = WellKnownCid.HOST


def cid_is_valid_guest(cid: int) -> bool:
    """A CID a guest may be given: not reserved, fits the 32 bits Linux uses for CIDs.

    Spec: virtio 1.2 §5.10.4: guest_cid is 64 bits but only the low 32 are used; 0, 1, 2 and
    0xffffffff are reserved.
    """
    return 3 <= cid < WellKnownCid.ANY


class VsockFeature(enum.IntFlag):
    """Device feature masks. Spec: virtio 1.2 §5.10.3."""

    VIRTIO_VSOCK_F_STREAM = 1 << 0
    VIRTIO_VSOCK_F_SEQPACKET = 1 << 1


class Type(enum.IntEnum):
    """Socket types (``hdr.type``). Spec: virtio 1.2 §5.10.6.2 (Addressing)."""

    STREAM = 1
    SEQPACKET = 2


class Op(enum.IntEnum):
    """Operations (``hdr.op``). Spec: virtio 1.2 §5.10.6."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class ShutdownFlag(enum.IntFlag):
    """``hdr.flags`` for OP_SHUTDOWN. Spec: virtio 1.2 §5.10.6.5 (Stream Sockets)."""

    RCV = 1  # the sender will receive no more data
    SEND = 2  # the sender will send no more data
    BOTH = 3


class SeqpacketFlag(enum.IntFlag):
    """``hdr.flags`` for OP_RW on SEQPACKET. Spec: virtio 1.2 §5.10.6.6 (message/record bounds)."""

    EOM = 1  # VIRTIO_VSOCK_SEQ_EOM: last packet of a message
    EOR = 2  # VIRTIO_VSOCK_SEQ_EOR: the message ends a record (MSG_EOR)


class EventId(enum.IntEnum):
    """Event queue event ids. Spec: virtio 1.2 §5.10.6.7 (Device Events)."""

    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0


@dataclass(frozen=True, slots=True)
class VsockHeader:
    """``struct virtio_vsock_hdr``. Spec: virtio 1.2 §5.10.6.

    ``unpack`` checks syntax only (size); semantic checks (cids, op, type, len against the
    buffer) are the muxer's, in a fixed order.
    """

    FMT: ClassVar[struct.Struct] = struct.Struct("<QQIIIHHIII")
    SIZE: ClassVar[int] = 44

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len_: int
    type_: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> "VsockHeader":
        """Copy the first 44 bytes of ``data`` into a header; shorter input → `HeaderError`."""
        if len(data) < cls.SIZE:
            raise HeaderError(f"vsock header needs {cls.SIZE} bytes, got {len(data)}",
                              raw=bytes(data))
        return cls(*cls.FMT.unpack_from(data, 0))

    def pack(self) -> bytes:
        return self.FMT.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port,
                             self.len_, self.type_, self.op, self.flags, self.buf_alloc,
                             self.fwd_cnt)

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        self.FMT.pack_into(buf, offset, self.src_cid, self.dst_cid, self.src_port,
                           self.dst_port, self.len_, self.type_, self.op, self.flags,
                           self.buf_alloc, self.fwd_cnt)

    def with_(self, **changes: int) -> "VsockHeader":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)

    def describe(self) -> str:
        """Short human form for logs: ``RW 3:1234 -> 2:80 len=10``."""
        try:
            op = Op(self.op).name
        except ValueError:
            op = f"op{self.op}"
        return (f"{op} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} "
                f"type={self.type_} len={self.len_} flags={self.flags:#x} "
                f"buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt}")


@dataclass(frozen=True, slots=True)
class VsockEvent:
    """``struct virtio_vsock_event`` (le32 id). Spec: virtio 1.2 §5.10.6.7."""

    FMT: ClassVar[struct.Struct] = struct.Struct("<I")
    SIZE: ClassVar[int] = 4

    id: int

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> "VsockEvent":
        if len(data) < cls.SIZE:
            raise HeaderError(f"vsock event needs {cls.SIZE} bytes, got {len(data)}",
                              raw=bytes(data))
        return cls(*cls.FMT.unpack_from(data, 0))

    def pack(self) -> bytes:
        return self.FMT.pack(self.id)

    @classmethod
    def transport_reset(cls) -> "VsockEvent":
        return cls(EventId.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)


@dataclass(frozen=True, slots=True)
class VsockConfig:
    """``struct virtio_vsock_config`` (le64 guest_cid). Spec: virtio 1.2 §5.10.4."""

    FMT: ClassVar[struct.Struct] = struct.Struct("<Q")
    SIZE: ClassVar[int] = 8

    guest_cid: int

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> "VsockConfig":
        if len(data) < cls.SIZE:
            raise HeaderError(f"vsock config needs {cls.SIZE} bytes, got {len(data)}",
                              raw=bytes(data))
        return cls(*cls.FMT.unpack_from(data, 0))

    def pack(self) -> bytes:
        return self.FMT.pack(self.guest_cid)
