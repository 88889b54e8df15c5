"""Guest memory: a table of regions and guest-physical address translation.

A :class:`Region` is one piece of guest RAM the front-end shared with us (vhost-user
``SET_MEM_TABLE`` / ``ADD_MEM_REG``); :class:`GuestMemory` holds the regions sorted by
guest-physical address and translates ``(gpa, length)`` ranges into memoryviews, splitting at
region boundaries (a range may run from one region into an adjacent one, never into a gap).
:class:`DirtyLog` is the vhost-user dirty-page bitmap (``VHOST_USER_SET_LOG_BASE``).

Nothing here calls ``mmap``; :mod:`ring.mapping` does.

Spec: vhost-user "Memory regions description", VHOST_USER_SET_MEM_TABLE, VHOST_USER_ADD_MEM_REG,
"Migration" (dirty page logging).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any

from ring.errors import GuestAddressError, MemoryMapError

__all__ = ["DirtyLog", "GuestMemory", "Region", "PAGE_SHIFT"]

PAGE_SHIFT = 12  # dirty log granularity: one bit per 4 KiB page (vhost-user VHOST_LOG_PAGE)


@dataclasses.dataclass(frozen=True, slots=True)
class Region:
    """One guest memory region.

    ``gpa`` guest-physical start, ``size`` bytes, ``uva`` the front-end's user virtual address
    of the start ("userspace address"), ``mmap_offset`` the offset of the region in the fd the
    front-end passed (informational here: ``buffer`` already starts at the region start),
    ``buffer`` any writable buffer of at least ``size`` bytes. ``view`` is a byte memoryview of
    exactly ``size`` bytes over ``buffer``.

    Spec: vhost-user "Memory region description".
    """

    gpa: int
    size: int
    uva: int
    mmap_offset: int
    buffer: Any = dataclasses.field(repr=False, compare=False)
    view: memoryview = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise MemoryMapError(f"region at gpa {self.gpa:#x}: size {self.size} <= 0")
        if self.gpa < 0 or self.gpa + self.size > 1 << 64:
            raise MemoryMapError(f"region at gpa {self.gpa:#x}: outside 64-bit space")
        view = memoryview(self.buffer)
        if view.readonly:
            raise MemoryMapError(f"region at gpa {self.gpa:#x}: buffer is read-only")
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if len(view) < self.size:
            raise MemoryMapError(
                f"region at gpa {self.gpa:#x}: buffer has {len(view)} bytes, need {self.size}"
            )
        object.__setattr__(self, "view", view[: self.size])

    @property
    def end(self) -> int:
        """First guest-physical address after the region."""
        return self.gpa + self.size

    def contains(self, gpa: int, length: int) -> bool:
        """Whether ``[gpa, gpa + length)`` lies wholly inside this region."""
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size


class DirtyLog:
    """The dirty-page bitmap: bit ``n % 8`` of byte ``n // 8`` marks page ``n = gpa >> 12``.

    Pages beyond the bitmap are ignored (QEMU sizes the log for all of guest RAM).

    Spec: vhost-user "Migration", VHOST_USER_SET_LOG_BASE ("dirty page log").
    """

    __slots__ = ("buffer", "_view")

    def __init__(self, buffer: Any) -> None:
        view = memoryview(buffer)
        if view.readonly:
            raise MemoryMapError("dirty log buffer is read-only")
        self.buffer = buffer
        self._view = view.cast("B") if view.format != "B" or view.ndim != 1 else view

    @property
    def size_bytes(self) -> int:
        return len(self._view)

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page touched by ``[gpa, gpa + length)`` dirty (no-op for length 0)."""
        if length <= 0:
            return
        view = self._view
        limit = len(view) * 8
        first = gpa >> PAGE_SHIFT
        last = min((gpa + length - 1) >> PAGE_SHIFT, limit - 1)
        for page in range(first, last + 1):
            view[page >> 3] |= 1 << (page & 7)

    def is_dirty(self, gpa: int) -> bool:
        """Whether the page holding ``gpa`` is marked (False beyond the bitmap)."""
        page = gpa >> PAGE_SHIFT
        if page >= len(self._view) * 8:
            return False
        return bool(self._view[page >> 3] & (1 << (page & 7)))

    def dirty_pages(self) -> list[int]:
        """Sorted page numbers whose bit is set (tests and debugging)."""
        pages = []
        for index, byte in enumerate(self._view):
            if byte:
                pages.extend(index * 8 + bit for bit in range(8) if byte & (1 << bit))
        return pages


class GuestMemory:
    """The guest's memory: non-overlapping regions sorted by guest-physical address.

    ``translate`` gives memoryviews straight into the region buffers (no copies);
    ``generation`` changes on every ``add``/``remove`` so a queue can refresh cached tables;
    ``log`` is ``None`` or the :class:`DirtyLog` the ring marks for every byte it writes.

    Spec: vhost-user "Memory regions description".
    """

    __slots__ = ("_regions", "_starts", "generation", "log")

    def __init__(self, regions: tuple[Region, ...] | list[Region] = ()) -> None:
        self._regions: tuple[Region, ...] = ()
        self._starts: list[int] = []
        self.generation = 0
        self.log: DirtyLog | None = None
        for region in regions:
            self.add(region)

    @property
    def regions(self) -> tuple[Region, ...]:
        return self._regions

    def add(self, region: Region) -> None:
        """Add ``region``; ``MemoryMapError`` if it overlaps an existing one (gpa or uva)."""
        for other in self._regions:
            if region.gpa < other.end and other.gpa < region.end:
                raise MemoryMapError(
                    f"region {region.gpa:#x}+{region.size:#x} overlaps "
                    f"{other.gpa:#x}+{other.size:#x}"
                )
        regions = sorted(self._regions + (region,), key=lambda r: r.gpa)
        self._regions = tuple(regions)
        self._starts = [r.gpa for r in regions]
        self.generation += 1

    def remove(self, gpa: int, size: int) -> Region:
        """Remove the region starting at ``gpa`` of ``size`` bytes and return it.

        ``MemoryMapError`` if there is no such region.
        Spec: vhost-user VHOST_USER_REM_MEM_REG.
        """
        for region in self._regions:
            if region.gpa == gpa and region.size == size:
                self._regions = tuple(r for r in self._regions if r is not region)
                self._starts = [r.gpa for r in self._regions]
                self.generation += 1
                return region
        raise MemoryMapError(f"no region {gpa:#x}+{size:#x} to remove")

    def clear(self) -> tuple[Region, ...]:
        """Remove every region (SET_MEM_TABLE replaces the table) and return them."""
        old = self._regions
        self._regions = ()
        self._starts = []
        self.generation += 1
        return old

    def find(self, gpa: int) -> Region | None:
        """The region holding byte ``gpa``, or None."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self._regions[i]
            if gpa < region.end:
                return region
        return None

    def translate(self, gpa: int, length: int) -> list[memoryview]:
        """Memoryviews over ``[gpa, gpa + length)``, split where it crosses into an adjacent
        region; ``GuestAddressError`` if any byte is not covered. Length 0 gives ``[]``."""
        if length <= 0:
            if length < 0:
                raise GuestAddressError(gpa, length)
            return []
        if gpa < 0:
            raise GuestAddressError(gpa, length)
        starts = self._starts
        regions = self._regions
        i = bisect.bisect_right(starts, gpa) - 1
        if i < 0:
            raise GuestAddressError(gpa, length)
        region = regions[i]
        offset = gpa - region.gpa
        if offset + length <= region.size:  # the common case: one region
            return [region.view[offset : offset + length]]
        views: list[memoryview] = []
        cursor, remaining = gpa, length
        while remaining:
            if i >= len(regions):
                raise GuestAddressError(gpa, length)
            region = regions[i]
            if not region.gpa <= cursor < region.end:
                raise GuestAddressError(gpa, length)
            offset = cursor - region.gpa
            take = min(remaining, region.size - offset)
            views.append(region.view[offset : offset + take])
            cursor += take
            remaining -= take
            i += 1
        return views

    def check(self, gpa: int, length: int) -> None:
        """Raise ``GuestAddressError`` unless ``[gpa, gpa + length)`` is wholly covered."""
        self.translate(gpa, length)

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Translate a front-end virtual address; the range must sit in one region.

        Spec: vhost-user VHOST_USER_SET_VRING_ADDR ("ring addresses ... user addresses").
        """
        for region in self._regions:
            if region.uva <= uva and uva + length <= region.uva + region.size:
                return region.gpa + (uva - region.uva)
        raise GuestAddressError(uva, length)

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` guest bytes at ``gpa``."""
        return b"".join(bytes(v) for v in self.translate(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``gpa`` (marks the dirty log when one is set)."""
        data = memoryview(data).cast("B")
        pos = 0
        for view in self.translate(gpa, len(data)):
            n = len(view)
            view[:] = data[pos : pos + n]
            pos += n
        if self.log is not None:
            self.log.mark(gpa, len(data))

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Mark ``[gpa, gpa + length)`` dirty when a log is set (no-op otherwise)."""
        if self.log is not None:
            self.log.mark(gpa, length)
