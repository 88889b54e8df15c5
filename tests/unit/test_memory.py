"""Guest memory: regions, translation, uva→gpa, dirty log, wire sizes, fd mapping."""

from __future__ import annotations

import dataclasses
import os

import pytest

from ring.errors import GuestAddressError, MemoryMapError
from ring.mapping import map_region, unmap_region
from ring.memory import DirtyLog, GuestMemory, Region
from ring.wire import PackedDesc, PackedEventSuppress, VirtqDesc, VirtqUsedElem
from tests.support.driver import Allocator, bytearray_memory, memfd_memory


def two_adjacent():
    return bytearray_memory((0x1000, 0x1000), (0x2000, 0x1000))


def test_translate_within_one_region_is_one_view():
    mem = two_adjacent()
    views = mem.translate(0x1010, 16)
    assert [len(v) for v in views] == [16]


def test_translate_splits_across_adjacent_regions():
    mem = two_adjacent()
    mem.write(0x1ff8, b"ABCDEFGHIJKLMNOP")
    views = mem.translate(0x1ff8, 16)
    assert [len(v) for v in views] == [8, 8]
    assert b"".join(bytes(v) for v in views) == b"ABCDEFGHIJKLMNOP"
    assert bytes(mem.regions[0].view[-8:]) == b"ABCDEFGH"
    assert bytes(mem.regions[1].view[:8]) == b"IJKLMNOP"


def test_translate_into_gap_fails():
    mem = bytearray_memory((0x1000, 0x1000), (0x3000, 0x1000))
    with pytest.raises(GuestAddressError) as info:
        mem.translate(0x1ff0, 0x20)
    assert (info.value.gpa, info.value.length) == (0x1ff0, 0x20)
    with pytest.raises(GuestAddressError):
        mem.translate(0x2000, 1)
    with pytest.raises(GuestAddressError):
        mem.translate(0x0fff, 2)  # starts before the first region


def test_translate_bounds_exact_end_ok_one_past_fails():
    mem = bytearray_memory((0, 0x100))
    assert len(mem.translate(0xF0, 0x10)[0]) == 0x10
    with pytest.raises(GuestAddressError):
        mem.translate(0xF0, 0x11)
    with pytest.raises(GuestAddressError):
        mem.translate(1 << 64, 1)


def test_translate_zero_length_is_empty_even_unmapped():
    mem = bytearray_memory((0, 0x100))
    assert mem.translate(0x5000, 0) == []


def test_overlapping_region_refused():
    mem = bytearray_memory((0x1000, 0x1000))
    with pytest.raises(MemoryMapError):
        mem.add(Region(0x1800, 0x1000, 0, 0, bytearray(0x1000)))
    assert len(mem.regions) == 1


def test_regions_sorted_and_generation_bumps():
    mem = GuestMemory()
    g0 = mem.generation
    mem.add(Region(0x5000, 0x1000, 0, 0, bytearray(0x1000)))
    mem.add(Region(0x1000, 0x1000, 0, 0, bytearray(0x1000)))
    assert [r.gpa for r in mem.regions] == [0x1000, 0x5000]
    assert mem.generation == g0 + 2


def test_remove_region_makes_range_unmapped():
    mem = two_adjacent()
    removed = mem.remove(0x2000, 0x1000)
    assert removed.gpa == 0x2000
    with pytest.raises(GuestAddressError):
        mem.translate(0x1ff8, 16)
    with pytest.raises(MemoryMapError):
        mem.remove(0x2000, 0x1000)


def test_uva_to_gpa_requires_one_region():
    mem = two_adjacent()
    uva0 = mem.regions[0].uva
    assert mem.uva_to_gpa(uva0 + 0x10, 0x10) == 0x1010
    assert mem.uva_to_gpa(mem.regions[1].uva, 0x1000) == 0x2000
    with pytest.raises(GuestAddressError):
        mem.uva_to_gpa(uva0 + 0xff8, 16)  # straddles into the next region
    with pytest.raises(GuestAddressError):
        mem.uva_to_gpa(0x10, 1)


def test_region_buffer_too_small_or_readonly_refused():
    with pytest.raises(MemoryMapError):
        Region(0, 0x100, 0, 0, bytearray(0x80))
    with pytest.raises(MemoryMapError):
        Region(0, 0x10, 0, 0, bytes(0x10))


def test_dirty_log_bits_and_out_of_range_pages_ignored():
    log = DirtyLog(bytearray(2))  # 16 pages
    log.mark(0x1fff, 2)  # pages 1 and 2
    log.mark(0x20000, 0x1000)  # page 32: beyond the bitmap, ignored
    log.mark(0x5000, 0)  # nothing
    assert log.dirty_pages() == [1, 2]
    assert log.buffer[0] == 0b110
    assert log.is_dirty(0x2000) and not log.is_dirty(0x3000) and not log.is_dirty(0x20000)


def test_memory_write_marks_log():
    mem = bytearray_memory((0, 0x10000))
    mem.log = DirtyLog(bytearray(4))
    mem.write(0x3ffe, b"abcd")
    assert mem.log.dirty_pages() == [3, 4]


@pytest.mark.parametrize("cls,size", [(VirtqDesc, 16), (PackedDesc, 16), (VirtqUsedElem, 8),
                                      (PackedEventSuppress, 4)])
def test_wire_sizes(cls, size):
    assert cls.FMT.size == size
    fields = [1] * len(dataclasses.fields(cls))
    obj = cls(*fields)
    assert cls.unpack(obj.pack()) == obj


def test_map_region_exposes_bytes_after_offset():
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 0x3000)
        os.pwrite(fd, b"XY", 0x1000)
        region = map_region(fd, gpa=0x10000, size=0x2000, uva=0x7000, mmap_offset=0x1000)
        assert region.size == 0x2000 and bytes(region.view[:2]) == b"XY"
        region.view[2:4] = b"ZW"
        assert os.pread(fd, 2, 0x1002) == b"ZW"
        assert unmap_region(region)
    finally:
        os.close(fd)


def test_map_region_failure_is_memory_map_error():
    with pytest.raises(MemoryMapError):
        map_region(-1, 0, 0x1000, 0, 0)


def test_memfd_ram_backend_view_shares_bytes():
    with memfd_memory((0, 0x4000), (0x4000, 0x4000)) as ram:
        backend = ram.backend_memory()
        ram.memory.write(0x3ffc, b"12345678")
        assert backend.read(0x3ffc, 8) == b"12345678"


def test_allocator_never_hands_out_gaps_and_reuses_freed():
    mem = bytearray_memory((0, 0x100), (0x1000, 0x100))
    alloc = Allocator(mem)
    a = alloc.alloc(0xF0)
    b = alloc.alloc(0x20)
    assert a == 0 and b == 0x1000
    alloc.free(a)
    assert alloc.alloc(0x10) == 0
