"""A guest-driver model of virtqueues, after Linux ``drivers/virtio/virtio_ring.c``.

Shared by unit, property, fuzz and bench code. It plays the guest: it owns guest memory
(``bytearray`` regions for unit tests, a shared ``memfd`` for integration tests), allocates the
ring areas and data buffers, adds chains (optionally indirect), publishes them the way Linux
does, decides whether to kick, reaps used buffers and reads the device's data back. It can
also write raw descriptors and indices to build hostile rings.

Typical use::

    mem = bytearray_memory((0, 1 << 20))
    drv = SplitDriver(mem, size=8, event_idx=True)
    vq = drv.attach(Virtqueue)              # a configured device-side queue
    head = drv.add_buf(out=[b"hello"])      # a readable chain
    assert drv.kick_prepare()
    chain = vq.pop(); vq.push(chain.head, 0)
    used = drv.get_buf()                    # Used(id=head, len_=0, ...)

Spec: virtio 1.2 §2.7.13 (split: supplying buffers, receiving used buffers), §2.8.13–§2.8.22
(packed), §2.7.10 / §2.8.10 (notification suppression).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Sequence

from ring.mapping import map_region
from ring.memory import GuestMemory, Region
from ring.wire import AvailFlag, DescFlag, PackedEventFlag, UsedFlag, need_event

__all__ = [
    "Allocator",
    "GuestDriver",
    "MemfdRam",
    "PackedDriver",
    "RegionSpec",
    "SplitDriver",
    "Used",
    "bytearray_memory",
    "make_driver",
    "memfd_memory",
]

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
USED_ELEM = struct.Struct("<II")
EVENT = struct.Struct("<HH")
NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
AVAIL, USED = int(DescFlag.AVAIL), int(DescFlag.USED)
UVA_BASE = 0x7F00_0000_0000  # where the pretend front-end "mapped" guest RAM


# -- guest memory builders -------------------------------------------------------------------
def bytearray_memory(*regions: tuple[int, int], uva_base: int = UVA_BASE) -> GuestMemory:
    """A GuestMemory of ``(gpa, size)`` regions, each backed by its own zeroed bytearray.

    The front-end address of each region is ``uva_base + gpa`` (so uva_to_gpa is testable).
    """
    return GuestMemory([Region(gpa, size, uva_base + gpa, 0, bytearray(size))
                        for gpa, size in regions])


@dataclasses.dataclass(frozen=True, slots=True)
class RegionSpec:
    """What a front-end sends for one region (vhost-user memory region description)."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int


class MemfdRam:
    """Guest RAM in one shared memfd, cut into regions (what QEMU's memory-backend-memfd
    with share=on gives a vhost-user back-end).

    ``memory`` is the guest's own view (this model writes through it); ``fd`` and ``specs``
    are what a front-end passes to the back-end, which maps them with
    :func:`ring.mapping.map_region` (see :meth:`backend_memory`).
    """

    def __init__(self, regions: Sequence[tuple[int, int]], uva_base: int = UVA_BASE) -> None:
        total = sum(size for _, size in regions)
        self.fd = os.memfd_create("vmchannel-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, total)
        self.specs: list[RegionSpec] = []
        self._regions: list[Region] = []
        offset = 0
        for gpa, size in regions:
            spec = RegionSpec(gpa, size, uva_base + gpa, offset)
            self.specs.append(spec)
            self._regions.append(map_region(self.fd, gpa, size, spec.uva, offset))
            offset += size
        self.memory = GuestMemory(self._regions)

    def backend_memory(self) -> GuestMemory:
        """A second, independent mapping of the same RAM, as the back-end would make it."""
        return GuestMemory([map_region(self.fd, s.gpa, s.size, s.uva, s.mmap_offset)
                            for s in self.specs])

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "MemfdRam":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def memfd_memory(*regions: tuple[int, int]) -> MemfdRam:
    """Shortcut for :class:`MemfdRam`."""
    return MemfdRam(regions)


# -- a simple guest buffer allocator ----------------------------------------------------------
class Allocator:
    """First-fit allocator over the guest-physical ranges of a GuestMemory.

    Adjacent regions merge into one range, so a buffer may straddle a region boundary (as
    contiguous guest RAM split by the front-end does); gaps are never handed out.
    """

    def __init__(self, memory: GuestMemory, start: int = 0, end: int | None = None) -> None:
        ranges: list[list[int]] = []
        for region in memory.regions:
            lo, hi = max(region.gpa, start), region.end if end is None else min(region.end, end)
            if lo >= hi:
                continue
            if ranges and ranges[-1][1] == lo:
                ranges[-1][1] = hi
            else:
                ranges.append([lo, hi])
        self._free = ranges  # sorted, disjoint [lo, hi)
        self._sizes: dict[int, tuple[int, int]] = {}  # gpa -> (block start, block size)

    def alloc(self, size: int, align: int = 16) -> int:
        """Allocate ``size`` bytes (≥ 1 byte is reserved) aligned to ``align``; MemoryError
        when full."""
        need = max(size, 1)
        for i, (lo, hi) in enumerate(self._free):
            gpa = -(-lo // align) * align
            if gpa + need <= hi:
                block = (lo, gpa + need - lo)
                if gpa + need == hi:
                    del self._free[i]
                else:
                    self._free[i][0] = gpa + need
                self._sizes[gpa] = block
                return gpa
        raise MemoryError(f"guest allocator: no room for {size} bytes")

    def free(self, gpa: int) -> None:
        lo, size = self._sizes.pop(gpa)
        hi = lo + size
        self._free.append([lo, hi])
        self._free.sort()
        merged: list[list[int]] = []
        for a, b in self._free:
            if merged and merged[-1][1] == a:
                merged[-1][1] = b
            else:
                merged.append([a, b])
        self._free = merged

    @property
    def free_bytes(self) -> int:
        return sum(hi - lo for lo, hi in self._free)


# -- completions ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class Used:
    """One reaped used buffer: ``id`` (head / buffer id), ``len_`` as the device wrote it,
    ``data`` the first ``len_`` bytes of the writable buffers (clipped to their size),
    ``token`` what the caller passed to ``add_buf``."""

    id: int
    len_: int
    data: bytes
    token: Any = None


@dataclasses.dataclass(slots=True)
class _Outstanding:
    """Driver bookkeeping of one added chain (Linux ``vring_desc_state``/``desc_extra``)."""

    buffers: list[int]  # gpas allocated for data (freed on reap)
    writable: list[tuple[int, int]]  # (gpa, len) device-writable pieces, in order
    slots: int  # ring descriptors used (split: descriptors taken from the free list)
    descs: list[int]  # split: ring descriptor indices; packed: unused
    indirect_gpa: int | None
    token: Any


class GuestDriver:
    """What split and packed drivers share: memory, allocator, data buffers, bookkeeping.

    ``indirect`` allows ``add_buf(..., indirect=True)`` (VIRTIO_F_RING_INDIRECT_DESC);
    ``event_idx`` follows VIRTIO_F_RING_EVENT_IDX.
    """

    packed: bool = False

    def __init__(self, memory: GuestMemory, size: int, *, event_idx: bool = False,
                 allocator: Allocator | None = None, index: int = 0) -> None:
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self.index = index
        self.alloc = allocator if allocator is not None else Allocator(memory)
        self.num_added = 0  # chains added since the last kick decision
        self._outstanding: dict[int, _Outstanding] = {}
        self.desc_gpa = self.driver_gpa = self.device_gpa = 0

    # raw memory helpers
    def read(self, gpa: int, length: int) -> bytes:
        return self.memory.read(gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        self.memory.write(gpa, data)

    def _u16(self, gpa: int) -> int:
        return U16.unpack(self.memory.read(gpa, 2))[0]

    @property
    def ring_addresses(self) -> tuple[int, int, int]:
        """(desc, driver, device) guest-physical addresses, for ``Virtqueue.configure``."""
        return self.desc_gpa, self.driver_gpa, self.device_gpa

    def attach(self, vq_cls, memory: GuestMemory | None = None, *, notify_on_empty=False,
               **kwargs):
        """Build and configure the device-side queue for this ring (``vq_cls`` is a
        ``Virtqueue`` class: ``ring.pyring.Virtqueue`` or ``ring.cring.Virtqueue``)."""
        vq = vq_cls(self.memory if memory is None else memory, self.size, packed=self.packed,
                    event_idx=self.event_idx, notify_on_empty=notify_on_empty,
                    index=self.index, **kwargs)
        vq.configure(*self.ring_addresses)
        return vq

    def _place_buffers(self, out: Sequence[bytes], in_sizes: Sequence[int]):
        """Allocate and fill data buffers; returns ([(gpa, len, is_write)], gpas)."""
        pieces, gpas = [], []
        for data in out:
            gpa = self.alloc.alloc(len(data))
            self.memory.write(gpa, data)
            pieces.append((gpa, len(data), False))
            gpas.append(gpa)
        for size in in_sizes:
            gpa = self.alloc.alloc(size)
            pieces.append((gpa, size, True))
            gpas.append(gpa)
        return pieces, gpas

    def _complete(self, buf_id: int, length: int) -> Used:
        state = self._outstanding.pop(buf_id)
        data = bytearray()
        remaining = length
        for gpa, size in state.writable:
            if remaining <= 0:
                break
            n = min(size, remaining)
            data += self.memory.read(gpa, n)
            remaining -= n
        for gpa in state.buffers:
            self.alloc.free(gpa)
        if state.indirect_gpa is not None:
            self.alloc.free(state.indirect_gpa)
        self._release(buf_id, state)
        return Used(buf_id, length, bytes(data), state.token)

    def _release(self, buf_id: int, state: _Outstanding) -> None:
        raise NotImplementedError

    def get_bufs(self) -> list[Used]:
        """Reap every used buffer currently published."""
        out = []
        while (used := self.get_buf()) is not None:
            out.append(used)
        return out

    def get_buf(self) -> Used | None:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def outstanding(self) -> int:
        """Chains added and not yet reaped."""
        return len(self._outstanding)


class SplitDriver(GuestDriver):
    """Driver side of a split ring (Linux ``virtqueue_add_split`` & co).

    Ring areas are allocated from the allocator unless given (``desc_gpa`` etc.).
    Spec: virtio 1.2 §2.7.13 (Supplying Buffers to The Device), §2.7.14 (Receiving Used
    Buffers From The Device).
    """

    packed = False

    def __init__(self, memory: GuestMemory, size: int, *, event_idx: bool = False,
                 allocator: Allocator | None = None, index: int = 0,
                 desc_gpa: int | None = None, avail_gpa: int | None = None,
                 used_gpa: int | None = None) -> None:
        super().__init__(memory, size, event_idx=event_idx, allocator=allocator, index=index)
        a = self.alloc
        self.desc_gpa = a.alloc(16 * size, 16) if desc_gpa is None else desc_gpa
        self.driver_gpa = a.alloc(6 + 2 * size, 2) if avail_gpa is None else avail_gpa
        self.device_gpa = a.alloc(6 + 8 * size, 4) if used_gpa is None else used_gpa
        self.avail_gpa, self.used_gpa = self.driver_gpa, self.device_gpa
        # Zero the areas (a fresh ring), then link the free list: desc[i].next = i + 1.
        self.write(self.desc_gpa, bytes(16 * size))
        self.write(self.avail_gpa, bytes(6 + 2 * size))
        self.write(self.used_gpa, bytes(6 + 8 * size))
        self.free_head = 0
        self.num_free = size
        self._next = list(range(1, size + 1))  # shadow of desc[i].next for free entries
        self.avail_idx_shadow = 0
        self.avail_flags_shadow = 0
        self.last_used_idx = 0

    # -- adding buffers -----------------------------------------------------------------------
    def add_buf(self, out: Sequence[bytes] = (), in_sizes: Sequence[int] = (), *,
                indirect: bool = False, token: Any = None) -> int:
        """Add one chain: readable buffers holding ``out``, then writable buffers of
        ``in_sizes`` bytes; publish it in the avail ring (Linux writes avail->idx on every
        add). Returns the head. ``MemoryError`` when descriptors or memory run out.
        """
        n = len(out) + len(in_sizes)
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        pieces, gpas = self._place_buffers(out, in_sizes)
        writable = [(g, l) for g, l, w in pieces if w]
        if indirect:
            table_gpa = self.alloc.alloc(16 * n, 16)
            table = b"".join(
                DESC.pack(g, l, (WRITE if w else 0) | (NEXT if i + 1 < n else 0), i + 1)
                for i, (g, l, w) in enumerate(pieces))
            self.write(table_gpa, table)
            ring_pieces = [(table_gpa, 16 * n, INDIRECT)]
        else:
            table_gpa = None
            ring_pieces = [(g, l, WRITE if w else 0) for g, l, w in pieces]
        if len(ring_pieces) > self.num_free:
            for g in gpas:
                self.alloc.free(g)
            if table_gpa is not None:
                self.alloc.free(table_gpa)
            raise MemoryError("no free descriptors")
        head = self.free_head
        idx = head
        descs = []
        for i, (g, l, flags) in enumerate(ring_pieces):
            descs.append(idx)
            nxt = self._next[idx]
            last = i + 1 == len(ring_pieces)
            self.write_desc(idx, g, l, flags | (0 if last else NEXT), 0 if last else nxt)
            idx = nxt
        self.free_head = idx
        self.num_free -= len(ring_pieces)
        self._outstanding[head] = _Outstanding(gpas, writable, len(ring_pieces), descs,
                                               table_gpa, token)
        self.expose(head)
        return head

    def expose(self, head: int) -> None:
        """Put ``head`` in the next avail ring slot and publish avail->idx (no checks: may
        expose any value, for hostile tests)."""
        slot = self.avail_idx_shadow & (self.size - 1)
        self.write(self.avail_gpa + 4 + 2 * slot, U16.pack(head & 0xFFFF))
        self.avail_idx_shadow = (self.avail_idx_shadow + 1) & 0xFFFF
        self.write(self.avail_gpa + 2, U16.pack(self.avail_idx_shadow))
        self.num_added += 1

    def _release(self, head: int, state: _Outstanding) -> None:
        # Return the chain's descriptors to the free list (Linux detach_buf_split).
        for idx in reversed(state.descs):
            self._next[idx] = self.free_head
            self.free_head = idx
        self.num_free += state.slots

    # -- notifications ----------------------------------------------------------------------
    def kick_prepare(self) -> bool:
        """Whether to notify the device about chains added since the last call
        (Linux ``virtqueue_kick_prepare_split``).

        Spec: virtio 1.2 §2.7.10 (avail_event), §2.7.7 (VRING_USED_F_NO_NOTIFY).
        """
        new = self.avail_idx_shadow
        old = (new - self.num_added) & 0xFFFF
        self.num_added = 0
        if self.event_idx:
            avail_event = self._u16(self.used_gpa + 4 + 8 * self.size)
            return need_event(avail_event, new, old)
        return not self._u16(self.used_gpa) & UsedFlag.VRING_USED_F_NO_NOTIFY

    def disable_cb(self) -> None:
        """Ask for no interrupts (Linux ``virtqueue_disable_cb_split``)."""
        self.avail_flags_shadow |= AvailFlag.VRING_AVAIL_F_NO_INTERRUPT
        if not self.event_idx:
            self.write(self.avail_gpa, U16.pack(self.avail_flags_shadow))

    def enable_cb(self) -> None:
        """Ask for interrupts again; with EVENT_IDX write used_event = last_used_idx."""
        self.avail_flags_shadow &= ~AvailFlag.VRING_AVAIL_F_NO_INTERRUPT
        if not self.event_idx:
            self.write(self.avail_gpa, U16.pack(self.avail_flags_shadow))
        self.write_used_event(self.last_used_idx)

    def write_used_event(self, value: int) -> None:
        self.write(self.avail_gpa + 4 + 2 * self.size, U16.pack(value & 0xFFFF))

    # -- reaping ----------------------------------------------------------------------------
    @property
    def used_idx(self) -> int:
        """used->idx as the device last published it."""
        return self._u16(self.used_gpa + 2)

    def get_buf(self) -> Used | None:
        """Reap one used element (Linux ``virtqueue_get_buf_ctx_split``); with EVENT_IDX and
        interrupts enabled, write used_event = last_used_idx afterwards."""
        if self.last_used_idx == self.used_idx:
            return None
        slot = self.last_used_idx & (self.size - 1)
        head, length = USED_ELEM.unpack(self.read(self.used_gpa + 4 + 8 * slot, 8))
        if head not in self._outstanding:
            raise AssertionError(f"device returned head {head} that is not outstanding")
        used = self._complete(head, length)
        self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        if self.event_idx and not self.avail_flags_shadow & AvailFlag.VRING_AVAIL_F_NO_INTERRUPT:
            self.write_used_event(self.last_used_idx)
        return used

    def used_elem(self, slot: int) -> tuple[int, int]:
        """Raw (id, len) at used ring slot ``slot``."""
        return USED_ELEM.unpack(self.read(self.used_gpa + 4 + 8 * slot, 8))

    # -- hostile-ring crafting --------------------------------------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Write descriptor ``index`` of the table verbatim."""
        self.write(self.desc_gpa + 16 * index, DESC.pack(addr, length, flags, next_))

    def write_avail_idx(self, value: int) -> None:
        """Write avail->idx verbatim (the shadow follows it)."""
        self.avail_idx_shadow = value & 0xFFFF
        self.write(self.avail_gpa + 2, U16.pack(value & 0xFFFF))

    def write_avail_slot(self, slot: int, head: int) -> None:
        self.write(self.avail_gpa + 4 + 2 * slot, U16.pack(head))

    def write_avail_flags(self, flags: int) -> None:
        self.avail_flags_shadow = flags
        self.write(self.avail_gpa, U16.pack(flags))

    def write_used_flags(self, flags: int) -> None:
        """(The device's field; tests use it to simulate VRING_USED_F_NO_NOTIFY.)"""
        self.write(self.used_gpa, U16.pack(flags))

    @property
    def avail_event(self) -> int:
        return self._u16(self.used_gpa + 4 + 8 * self.size)


class PackedDriver(GuestDriver):
    """Driver side of a packed ring (Linux ``virtqueue_add_packed`` & co).

    Buffer ids come from a free-id list; every descriptor of a chain carries the id (Linux
    does; the device reads it from the last). The first descriptor's flags are written last.
    Spec: virtio 1.2 §2.8.13 (Supplying Buffers), §2.8.14 (event suppression), §2.8.22.
    """

    packed = True

    def __init__(self, memory: GuestMemory, size: int, *, event_idx: bool = False,
                 allocator: Allocator | None = None, index: int = 0,
                 desc_gpa: int | None = None, driver_event_gpa: int | None = None,
                 device_event_gpa: int | None = None) -> None:
        super().__init__(memory, size, event_idx=event_idx, allocator=allocator, index=index)
        a = self.alloc
        self.desc_gpa = a.alloc(16 * size, 16) if desc_gpa is None else desc_gpa
        self.driver_gpa = a.alloc(4, 4) if driver_event_gpa is None else driver_event_gpa
        self.device_gpa = a.alloc(4, 4) if device_event_gpa is None else device_event_gpa
        self.write(self.desc_gpa, bytes(16 * size))
        self.write(self.driver_gpa, bytes(4))
        self.write(self.device_gpa, bytes(4))
        self.next_avail_idx = 0
        self.avail_wrap_counter = True
        self.last_used_idx = 0
        self.used_wrap_counter = True
        self.num_free = size
        self._free_ids = list(range(size))
        self.event_flags_shadow = PackedEventFlag.ENABLE

    def avail_flags(self, wrap: bool | None = None) -> int:
        """The AVAIL/USED bits that make a descriptor available under ``wrap``."""
        wrap = self.avail_wrap_counter if wrap is None else wrap
        return AVAIL if wrap else USED

    def add_buf(self, out: Sequence[bytes] = (), in_sizes: Sequence[int] = (), *,
                indirect: bool = False, token: Any = None, buf_id: int | None = None) -> int:
        """Add and publish one chain; returns its buffer id. ``MemoryError`` when full."""
        n = len(out) + len(in_sizes)
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        slots = 1 if indirect else n
        if slots > self.num_free or not self._free_ids:
            raise MemoryError("no free descriptors")
        pieces, gpas = self._place_buffers(out, in_sizes)
        writable = [(g, l) for g, l, w in pieces if w]
        if buf_id is None:
            buf_id = self._free_ids.pop(0)
        else:
            self._free_ids.remove(buf_id)
        if indirect:
            table_gpa = self.alloc.alloc(16 * n, 16)
            self.write(table_gpa, b"".join(DESC.pack(g, l, 0, WRITE if w else 0)
                                           for g, l, w in pieces))
            ring_pieces = [(table_gpa, 16 * n, INDIRECT)]
        else:
            table_gpa = None
            ring_pieces = [(g, l, WRITE if w else 0) for g, l, w in pieces]
        first_pos, first_flags = self.next_avail_idx, None
        for i, (g, l, flags) in enumerate(ring_pieces):
            last = i + 1 == len(ring_pieces)
            flags |= (0 if last else NEXT) | self.avail_flags()
            if i == 0:
                first_flags = flags
                self.write(self.desc_gpa + 16 * self.next_avail_idx,
                           struct.pack("<QIH", g, l, buf_id))  # flags later
            else:
                self.write_desc(self.next_avail_idx, g, l, buf_id, flags)
            self._advance()
        self.write(self.desc_gpa + 16 * first_pos + 14, U16.pack(first_flags))
        self.num_free -= slots
        self.num_added += slots
        self._outstanding[buf_id] = _Outstanding(gpas, writable, slots, [], table_gpa, token)
        return buf_id

    def _advance(self) -> None:
        self.next_avail_idx += 1
        if self.next_avail_idx >= self.size:
            self.next_avail_idx = 0
            self.avail_wrap_counter = not self.avail_wrap_counter

    def _release(self, buf_id: int, state: _Outstanding) -> None:
        self._free_ids.append(buf_id)
        self.num_free += state.slots

    def kick_prepare(self) -> bool:
        """Linux ``virtqueue_kick_prepare_packed``: device event suppression decides.

        Spec: virtio 1.2 §2.8.10, §2.8.14.
        """
        off_wrap, flags = EVENT.unpack(self.read(self.device_gpa, 4))
        new = self.next_avail_idx
        old = new - self.num_added
        self.num_added = 0
        if flags == PackedEventFlag.DESC:
            event_idx = off_wrap & 0x7FFF
            if bool(off_wrap >> 15) != self.avail_wrap_counter:
                event_idx -= self.size
            return need_event(event_idx, new, old)
        return flags != PackedEventFlag.DISABLE

    def disable_cb(self) -> None:
        self.event_flags_shadow = PackedEventFlag.DISABLE
        self.write_driver_event(0, PackedEventFlag.DISABLE)

    def enable_cb(self) -> None:
        """ENABLE, or with EVENT_IDX DESC at the next used position."""
        if self.event_idx:
            self.event_flags_shadow = PackedEventFlag.DESC
            self.write_driver_event(self.last_used_idx | (int(self.used_wrap_counter) << 15),
                                    PackedEventFlag.DESC)
        else:
            self.event_flags_shadow = PackedEventFlag.ENABLE
            self.write_driver_event(0, PackedEventFlag.ENABLE)

    def write_driver_event(self, off_wrap: int, flags: int) -> None:
        self.write(self.driver_gpa, EVENT.pack(off_wrap, flags))

    def get_buf(self) -> Used | None:
        """Reap one used descriptor (Linux ``virtqueue_get_buf_ctx_packed``)."""
        _addr, length, buf_id, flags = DESC.unpack(
            self.read(self.desc_gpa + 16 * self.last_used_idx, 16))
        avail, used = bool(flags & AVAIL), bool(flags & USED)
        if not (avail == used == self.used_wrap_counter):
            return None
        if buf_id not in self._outstanding:
            raise AssertionError(f"device returned id {buf_id} that is not outstanding")
        slots = self._outstanding[buf_id].slots
        used_buf = self._complete(buf_id, length)
        self.last_used_idx += slots
        if self.last_used_idx >= self.size:
            self.last_used_idx -= self.size
            self.used_wrap_counter = not self.used_wrap_counter
        if self.event_flags_shadow == PackedEventFlag.DESC:
            self.write_driver_event(self.last_used_idx | (int(self.used_wrap_counter) << 15),
                                    PackedEventFlag.DESC)
        return used_buf

    # -- hostile-ring crafting --------------------------------------------------------------
    def write_desc(self, pos: int, addr: int, length: int, buf_id: int, flags: int) -> None:
        """Write ring descriptor ``pos`` verbatim (packed layout: addr, len, id, flags)."""
        self.write(self.desc_gpa + 16 * pos, DESC.pack(addr, length, buf_id, flags))

    def read_desc(self, pos: int) -> tuple[int, int, int, int]:
        return DESC.unpack(self.read(self.desc_gpa + 16 * pos, 16))

    def write_device_event(self, off_wrap: int, flags: int) -> None:
        """(The device's struct; tests use it to simulate device-side suppression.)"""
        self.write(self.device_gpa, EVENT.pack(off_wrap, flags))


def make_driver(memory: GuestMemory, size: int, *, packed: bool, **kwargs) -> GuestDriver:
    """A SplitDriver or PackedDriver."""
    cls = PackedDriver if packed else SplitDriver
    return cls(memory, size, **kwargs)


