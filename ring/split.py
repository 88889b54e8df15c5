"""Split virtqueue: chain walk, used publication and the notification decision.

Functions take the owning :class:`ring.pyring.Virtqueue` (its state and ring addresses).

Spec: virtio 1.2 §2.7 (Split Virtqueues).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ring._chain import DESC, U16, USED_ELEM, ChainBuilder, WalkError, copy_indirect_table
from ring.errors import ChainError, DriverError
from ring.types import Chain
from ring.wire import AvailFlag, DescFlag, need_event

if TYPE_CHECKING:
    from ring.pyring import Virtqueue

_NEXT, _WRITE, _INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)


def read_avail_idx(vq: "Virtqueue") -> int:
    return U16.unpack(vq._read(vq.driver_gpa + 2, 2))[0]


def read_used_idx(vq: "Virtqueue") -> int:
    return U16.unpack(vq._read(vq.device_gpa + 2, 2))[0]


def _pending_count(vq: "Virtqueue", avail_idx: int) -> int:
    """Spec: virtio 1.2 §2.7.13.2 — the driver never gets more than ``size`` ahead."""
    pending = (avail_idx - vq._last_avail_idx) & 0xFFFF
    if pending > vq.size:
        vq._broken = ChainError.AVAIL_IDX
        vq.log.warning("avail idx %d moved %d past last_avail %d (size %d): queue broken",
                       avail_idx, pending, vq._last_avail_idx, vq.size)
        raise DriverError(ChainError.AVAIL_IDX, vq.index)
    return pending


def pop(vq: "Virtqueue") -> Chain | None:
    """Check order per docs/internals.md "Chain walk, split ring".

    Spec: virtio 1.2 §2.7.13.2, §2.7.10 (avail_event written before reporting empty).
    """
    pending = _pending_count(vq, read_avail_idx(vq))
    if pending == 0:
        if not vq.event_idx:
            return None
        # Spec: virtio 1.2 §2.7.10: the device writes avail_event to ask for a kick when the
        # driver adds the next buffer; re-check once to close the race with the driver.
        vq._write(vq.device_gpa + vq.layout.avail_event_offset(),
                  U16.pack(vq._last_avail_idx))
        pending = _pending_count(vq, read_avail_idx(vq))
        if pending == 0:
            return None
    slot = vq._last_avail_idx % vq.size
    head = U16.unpack(vq._read(vq.driver_gpa + 4 + 2 * slot, 2))[0]
    if head >= vq.size:
        vq._broken = ChainError.HEAD_RANGE
        vq.log.warning("avail ring head %d >= size %d: queue broken", head, vq.size)
        raise DriverError(ChainError.HEAD_RANGE, vq.index)
    try:
        chain = walk(vq, head)
    except WalkError as exc:
        raise vq._fail(exc.code, head, 1) from None
    vq._last_avail_idx = (vq._last_avail_idx + 1) & 0xFFFF
    vq._in_flight += 1
    return chain


def walk(vq: "Virtqueue", head: int) -> Chain:
    """Walk the chain starting at descriptor ``head``; WalkError on the first broken rule.

    Spec: virtio 1.2 §2.7.5.2 "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes
    in total; this implies that loops in the descriptor chain are forbidden!"
    """
    builder = ChainBuilder(vq.memory)
    table: bytes | None = None  # the copied indirect table, when inside one
    table_len = vq.size
    idx = head
    count = 0
    desc_gpa = vq.desc_gpa
    while True:
        count += 1
        if count > table_len:
            raise WalkError(ChainError.LOOP)
        if table is None:
            addr, length, flags, nxt = DESC.unpack(vq._read(desc_gpa + 16 * idx, 16))
        else:
            addr, length, flags, nxt = DESC.unpack_from(table, 16 * idx)
        if flags & _INDIRECT:
            table = copy_indirect_table(vq.memory, addr, length, table is not None,
                                        bool(flags & _NEXT))
            table_len = length // 16
            idx = 0
            count = 0
            continue
        builder.add(addr, length, bool(flags & _WRITE))
        if not flags & _NEXT:
            return builder.build(head, 1)
        if nxt >= table_len:
            raise WalkError(ChainError.NEXT_RANGE)
        idx = nxt


def publish(vq: "Virtqueue", items) -> None:
    """Write used elements at ``used_idx``, then ``used->idx`` once.

    Spec: virtio 1.2 §2.7.8.2 "The device MUST set len prior to updating the used idx."
    """
    base = vq.device_gpa
    used_idx = vq._used_idx
    for head, used_len, _slots in items:
        slot = used_idx % vq.size
        vq._write(base + 4 + 8 * slot, USED_ELEM.pack(head, used_len))
        used_idx = (used_idx + 1) & 0xFFFF
    vq._write(base + 2, U16.pack(used_idx))
    vq._used_idx = used_idx


def should_notify(vq: "Virtqueue") -> bool:
    """libvhost-user ``vu_should_notify`` / QEMU ``virtio_split_should_notify``.

    Spec: virtio 1.2 §2.7.7.2 (Device Requirements: Used Buffer Notification Suppression):
    "If the idx field in the used ring (which determined where that descriptor index was
    placed) was equal to used_event, the device MUST send a notification."; §6.3
    (VIRTIO_F_NOTIFY_ON_EMPTY, a legacy reserved feature bit).
    """
    if vq.notify_on_empty and vq._in_flight == 0 and \
            read_avail_idx(vq) == vq._last_avail_idx:
        return True
    if not vq.event_idx:
        flags = U16.unpack(vq._read(vq.driver_gpa, 2))[0]
        return not flags & AvailFlag.VRING_AVAIL_F_NO_INTERRUPT
    old, new, valid = vq._event_shadow()
    used_event = U16.unpack(vq._read(vq.driver_gpa + vq.layout.used_event_offset(), 2))[0]
    return (not valid) or need_event(used_event, new, old)
