"""Packed virtqueue: chain walk, used publication and the notification decision.

Functions take the owning :class:`ring.pyring.Virtqueue` (its state and ring addresses).

Spec: virtio 1.2 §2.8 (Packed Virtqueues).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ring._chain import DESC, ChainBuilder, WalkError, copy_indirect_table
from ring.errors import ChainError
from ring.types import Chain
from ring.wire import DescFlag, PackedEventFlag, need_event

if TYPE_CHECKING:
    from ring.pyring import Virtqueue

_NEXT, _WRITE, _INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
_AVAIL, _USED = int(DescFlag.AVAIL), int(DescFlag.USED)
_ID_LEN = struct.Struct("<IH")  # len (u32 at +8), id (u16 at +12)
_FLAGS = struct.Struct("<H")  # flags (u16 at +14)
_EVENT = struct.Struct("<HH")  # off_wrap, flags


def is_available(flags: int, wrap: bool) -> bool:
    """Spec: virtio 1.2 §2.8.1: available when AVAIL equals the driver's wrap counter and
    USED does not."""
    return bool(flags & _AVAIL) == wrap and bool(flags & _USED) != wrap


def pop(vq: "Virtqueue") -> Chain | None:
    """Walk the chain at ``last_avail_idx``; None if that descriptor is not available.

    Spec: virtio 1.2 §2.8.6 (next flag), §2.8.4 (buffer id in the last descriptor), §2.8.7
    (indirect).
    """
    size = vq.size
    pos = vq._last_avail_idx
    wrap = vq._avail_wrap
    addr, length, buf_id, flags = DESC.unpack(vq._read(vq.desc_gpa + 16 * pos, 16))
    if not is_available(flags, wrap):
        return None
    builder = ChainBuilder(vq.memory)
    slots = 0
    while True:
        slots += 1
        if slots > size:
            raise vq._fail(ChainError.LOOP, None, 0)
        if slots > 1:
            addr, length, buf_id, flags = DESC.unpack(vq._read(vq.desc_gpa + 16 * pos, 16))
            if not is_available(flags, wrap):
                raise vq._fail(ChainError.PACKED_WRAP, None, 0)
        last = not flags & _NEXT  # an INDIRECT descriptor must be last (INDIRECT_NEXT)
        try:
            if flags & _INDIRECT:
                table = copy_indirect_table(vq.memory, addr, length, False,
                                            bool(flags & _NEXT))
                for entry in range(length // 16):
                    e_addr, e_len, _e_id, e_flags = DESC.unpack_from(table, 16 * entry)
                    builder.add(e_addr, e_len, bool(e_flags & _WRITE))
            else:
                builder.add(addr, length, bool(flags & _WRITE))
        except WalkError as exc:
            # The buffer id sits in the last descriptor: known only if this one is last.
            if last and buf_id < size:
                raise vq._fail(exc.code, buf_id, slots) from None
            raise vq._fail(exc.code, None, 0) from None
        pos += 1
        if pos >= size:
            pos = 0
            wrap = not wrap
        if last:
            break
    if buf_id >= size:
        raise vq._fail(ChainError.HEAD_RANGE, None, 0)
    vq._last_avail_idx = pos
    vq._avail_wrap = wrap
    vq._in_flight += 1
    return builder.build(buf_id, slots)


def publish(vq: "Virtqueue", items) -> None:
    """Write each used descriptor's id and len, then the flags; the first element's flags go
    last so the whole batch becomes visible at once (QEMU ``virtqueue_packed_flush``).

    Spec: virtio 1.2 §2.8.21.1 / §2.8.1: a used descriptor has AVAIL and USED both equal to
    the device's used wrap counter; "The device MUST write the flags ... after ... id and len"
    (ordering requirement of §2.8.21).
    """
    base = vq.desc_gpa
    size = vq.size
    pos, wrap = vq._used_idx, vq._used_wrap
    flag_writes = []
    for head, used_len, slots in items:
        vq._write(base + 16 * pos + 8, _ID_LEN.pack(used_len, head))
        flags = (_AVAIL | _USED) if wrap else 0
        if used_len:
            flags |= _WRITE
        flag_writes.append((base + 16 * pos + 14, _FLAGS.pack(flags)))
        pos += slots
        if pos >= size:
            pos -= size
            wrap = not wrap
    for gpa, data in flag_writes[1:]:
        vq._write(gpa, data)
    vq._write(*flag_writes[0])
    vq._used_idx, vq._used_wrap = pos, wrap


def should_notify(vq: "Virtqueue") -> bool:
    """QEMU ``virtio_packed_should_notify``.

    Spec: virtio 1.2 §2.8.10 (driver event suppression: ENABLE, DISABLE, DESC with
    off_wrap).
    """
    off_wrap, flags = _EVENT.unpack(vq._read(vq.driver_gpa, 4))
    old, new, valid = vq._event_shadow()
    if flags == PackedEventFlag.DISABLE:
        return False
    if flags == PackedEventFlag.ENABLE:
        return True
    off = off_wrap & 0x7FFF
    if bool(off_wrap >> 15) != vq._used_wrap:
        off -= vq.size
    return (not valid) or need_event(off, new, old)


