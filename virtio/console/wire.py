"""Wire formats of the virtio console device: control messages, config space, RESIZE.

Spec: virtio 1.2 §5.3 (Console Device): §5.3.2 virtqueues, §5.3.3 feature bits, §5.3.4
configuration layout, §5.3.6.2 multiport control messages. Everything is little-endian (the
device is modern-only, VIRTIO_F_VERSION_1; the legacy native-endian rule of §5.3.4.1 and
§5.3.6.3 does not apply).

RESIZE payload field order
--------------------------
The spec (§5.3.6.2) defines ``struct virtio_console_resize { le16 cols; le16 rows; }`` after
the 8-byte control header. Linux read it the other way round for fifteen years:
``handle_control_message()`` in drivers/char/virtio_console.c declared
``struct { __u16 rows; __u16 cols; } size`` from v2.6.35 (commit 8345adbf96fc, 2010) until
commit 5326ab737a47 "virtio_console: fix order of fields cols and rows" (v6.15, 2025), which
was backported to the stable trees (5.4, 5.10, 5.15, 6.1, 6.6, 6.12): for 6.1 it is in
6.1.160. A revert was proposed upstream in September 2025 and dropped again, so upstream
keeps the spec order. Commit fbd3039a64b0 (same series, also in stable) made the fields
``__virtio16``; that only matters for big-endian legacy guests.

So, by guest kernel:

* Linux 2.6.35 .. 6.14, and stable kernels before the backport (6.1.0 .. 6.1.159,
  Debian 12 before ``linux 6.1.162-1``): **rows, cols**;
* Linux 6.15+, 6.1.160+ (Debian 12 ``6.1.162-1`` and later, including the kernel this
  project boots in its guest tests), and the spec: **cols, rows**.

We send the spec order by default (:attr:`ResizeOrder.SPEC`), because that is what current
Debian 12 (6.1) guests, current upstream and the spec agree on; a device can be configured
with :attr:`ResizeOrder.LINUX_LEGACY` for older guests. With the wrong order a guest swaps
its terminal's width and height; square sizes are unaffected. The config space fields
(§5.3.4, used by non-multiport guests) have always been ``cols, rows`` in both Linux and the
spec.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar

from .errors import ControlProtocolError

__all__ = [
    "BAD_ID",
    "CONFIG_SIZE",
    "CONTROL_RX_QUEUE",
    "CONTROL_TX_QUEUE",
    "ConsoleConfig",
    "ConsoleFeature",
    "ConsoleResize",
    "ControlEvent",
    "ControlHeader",
    "ControlMessage",
    "ResizeOrder",
    "num_queues",
    "port_queues",
    "queue_port",
]

BAD_ID = 0xFFFFFFFF
"""``VIRTIO_CONSOLE_BAD_ID``: the id Linux puts in DEVICE_READY (the id is unused there)."""

CONTROL_RX_QUEUE = 2
"""Control receiveq (device → driver). Spec: virtio 1.2 §5.3.2."""
CONTROL_TX_QUEUE = 3
"""Control transmitq (driver → device). Spec: virtio 1.2 §5.3.2."""


class ControlEvent(enum.IntEnum):
    """``event`` of a control message. Spec: virtio 1.2 §5.3.6.2.

    The spec names 1 and 2 DEVICE_ADD / DEVICE_REMOVE; Linux's uapi header calls them
    PORT_ADD / PORT_REMOVE (aliases here).
    """

    DEVICE_READY = 0  # driver → device: value 1 ok, 0 failure; id unused
    DEVICE_ADD = 1  # device → driver: create port `id`
    DEVICE_REMOVE = 2  # device → driver: remove port `id`
    PORT_READY = 3  # driver → device: port `id` added (value 1) or failed (0)
    CONSOLE_PORT = 4  # device → driver: port `id` is a console
    RESIZE = 5  # device → driver: ConsoleResize follows the header
    PORT_OPEN = 6  # both ways: value 1 open, 0 closed
    PORT_NAME = 7  # device → driver: UTF-8 name follows the header (no NUL)
    PORT_ADD = 1  # Linux name of DEVICE_ADD
    PORT_REMOVE = 2  # Linux name of DEVICE_REMOVE


class ConsoleFeature(enum.IntFlag):
    """Device feature bits (``VIRTIO_CONSOLE_F_*``). Spec: virtio 1.2 §5.3.3."""

    F_SIZE = 1 << 0  # cols/rows valid (Linux also needs it to apply RESIZE to the hvc)
    F_MULTIPORT = 1 << 1  # max_nr_ports valid, control queues used
    F_EMERG_WRITE = 1 << 2  # emerg_wr valid


class ResizeOrder(enum.Enum):
    """Field order of the RESIZE payload sent to the guest (see the module docstring)."""

    SPEC = "cols,rows"  # virtio 1.2 §5.3.6.2; Linux >= 6.15, 6.1.160+
    LINUX_LEGACY = "rows,cols"  # Linux 2.6.35 .. 6.14 and stable kernels before the backport


@dataclass(frozen=True, slots=True)
class ControlHeader:
    """``struct virtio_console_control``. Spec: virtio 1.2 §5.3.6.2."""

    FMT: ClassVar[struct.Struct] = struct.Struct("<IHH")
    id: int
    event: int
    value: int

    @classmethod
    def unpack(cls, data: bytes) -> "ControlHeader":
        """Decode exactly ``FMT.size`` (8) bytes."""
        if len(data) != cls.FMT.size:
            raise ControlProtocolError(
                f"control header needs {cls.FMT.size} bytes, got {len(data)}", data
            )
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(self.id, self.event, self.value)


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """One control message: the header plus what follows it in the same buffer.

    ``payload`` is the name for PORT_NAME, a :class:`ConsoleResize` for RESIZE, else empty.
    """

    header: ControlHeader
    payload: bytes = b""

    @classmethod
    def parse(cls, data: bytes) -> "ControlMessage":
        """Split a whole control buffer. Raises only :class:`ControlProtocolError`."""
        size = ControlHeader.FMT.size
        if len(data) < size:
            raise ControlProtocolError(
                f"control message of {len(data)} bytes is shorter than the "
                f"{size}-byte header",
                data,
            )
        return cls(ControlHeader.unpack(bytes(data[:size])), bytes(data[size:]))

    @classmethod
    def build(cls, port_id: int, event: int, value: int = 0, payload: bytes = b"") -> bytes:
        """The bytes of a control message (header + payload)."""
        return ControlHeader(port_id, int(event), value).pack() + payload

    def pack(self) -> bytes:
        return self.header.pack() + self.payload


@dataclass(frozen=True, slots=True)
class ConsoleResize:
    """``struct virtio_console_resize``, the payload of RESIZE. Spec: virtio 1.2 §5.3.6.2.

    The order on the wire depends on :class:`ResizeOrder` (module docstring).
    """

    FMT: ClassVar[struct.Struct] = struct.Struct("<HH")
    cols: int
    rows: int

    def pack(self, order: ResizeOrder = ResizeOrder.SPEC) -> bytes:
        if order is ResizeOrder.SPEC:
            return self.FMT.pack(self.cols, self.rows)
        return self.FMT.pack(self.rows, self.cols)

    @classmethod
    def unpack(cls, data: bytes, order: ResizeOrder = ResizeOrder.SPEC) -> "ConsoleResize":
        if len(data) < cls.FMT.size:
            raise ControlProtocolError(
                f"RESIZE payload needs {cls.FMT.size} bytes, got {len(data)}", data
            )
        first, second = cls.FMT.unpack(bytes(data[: cls.FMT.size]))
        if order is ResizeOrder.SPEC:
            return cls(cols=first, rows=second)
        return cls(cols=second, rows=first)


CONFIG_SIZE = 12
"""Size of ``struct virtio_console_config`` (the device's config space)."""


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """``struct virtio_console_config``. Spec: virtio 1.2 §5.3.4."""

    FMT: ClassVar[struct.Struct] = struct.Struct("<HHII")
    cols: int
    rows: int
    max_nr_ports: int
    emerg_wr: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> "ConsoleConfig":
        if len(data) != cls.FMT.size:
            raise ControlProtocolError(
                f"console config needs {cls.FMT.size} bytes, got {len(data)}", data
            )
        return cls(*cls.FMT.unpack(data))

    def pack(self) -> bytes:
        return self.FMT.pack(self.cols, self.rows, self.max_nr_ports, self.emerg_wr)


def port_queues(port_id: int) -> tuple[int, int]:
    """(receiveq, transmitq) indices of a port. Spec: virtio 1.2 §5.3.2.

    Port 0 uses queues 0/1; the control queues are 2/3; port n >= 1 uses 2n+2 / 2n+3.
    """
    if port_id < 0:
        raise ValueError(f"negative port id {port_id}")
    if port_id == 0:
        return 0, 1
    return 2 * port_id + 2, 2 * port_id + 3


def queue_port(index: int) -> int | None:
    """The port a queue index belongs to, or ``None`` for the control queues."""
    if index < 0:
        raise ValueError(f"negative queue index {index}")
    if index in (CONTROL_RX_QUEUE, CONTROL_TX_QUEUE):
        return None
    if index < 2:
        return 0
    return (index - 2) // 2


def num_queues(max_nr_ports: int, multiport: bool = True) -> int:
    """Queues a device with ``max_nr_ports`` ports exposes: 2 × (max_nr_ports + 1)."""
    return 2 * (max_nr_ports + 1) if multiport else 2
