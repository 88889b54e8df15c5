"""Split virtqueue: chain walk (hostile rings included), publication, notifications, bases.

Every hostile case asserts the exact ChainError, that the queue latches broken, what was
written to the used ring, and that nothing else in guest memory changed.
Spec: virtio 1.2 §2.7.
"""

from __future__ import annotations

import struct

import pytest

from ring.errors import ChainError, DriverError, GuestAddressError
from ring.memory import DirtyLog
from ring.wire import AvailFlag, DescFlag
from tests.support import RING_IMPLS, changed_gpas, ring_impl_class, snapshot
from tests.support.driver import SplitDriver, bytearray_memory

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
SIZE = 8
DATA = 0x8000  # scratch data area inside the region


@pytest.fixture(params=RING_IMPLS)
def vq_cls(request):
    return ring_impl_class(request.param)


def setup(vq_cls, size=SIZE, event_idx=False, regions=((0, 0x10000),), **kw):
    mem = bytearray_memory(*regions)
    drv = SplitDriver(mem, size, event_idx=event_idx, desc_gpa=0x1000, avail_gpa=0x2000,
                      used_gpa=0x3000)
    vq = drv.attach(vq_cls, **kw)
    return mem, drv, vq


def expose_raw(drv, head=0):
    drv.expose(head)


def assert_hostile(vq_cls, build, code, *, head=0, regions=((0, 0x10000),), written=True):
    """Build a hostile ring with ``build(drv)``, pop, check the error contract."""
    mem, drv, vq = setup(vq_cls, regions=regions)
    build(drv)
    before = snapshot(mem)
    with pytest.raises(DriverError) as info:
        vq.pop()
    err = info.value
    assert err.code == code
    assert vq.broken == code
    used_area = set(range(0x3000 + 2, 0x3000 + 4)) | set(range(0x3000 + 4, 0x3000 + 12))
    changed = set(changed_gpas(mem, before))
    if written:
        assert err.head == head
        assert vq.last_avail_idx == 1 and vq.used_idx == 1
        assert drv.used_idx == 1 and drv.used_elem(0) == (head, 0)
        assert changed <= used_area
    else:
        assert err.head is None
        assert vq.last_avail_idx == 0 and vq.used_idx == 0
        assert changed == set()
    # latched: the next pop fails with BROKEN and touches nothing
    before = snapshot(mem)
    with pytest.raises(DriverError) as again:
        vq.pop()
    assert again.value.code == ChainError.BROKEN
    assert changed_gpas(mem, before) == []
    return vq


# -- well-formed chains -------------------------------------------------------------------
def test_pop_empty_returns_none(vq_cls):
    _, _, vq = setup(vq_cls)
    assert vq.pop() is None
    assert vq.in_flight == 0


def test_pop_readable_and_writable_chain(vq_cls):
    _, drv, vq = setup(vq_cls)
    head = drv.add_buf(out=[b"abc", b"", b"defg"], in_sizes=[5, 3])
    chain = vq.pop()
    assert chain.head == head and chain.ring_slots == 1
    assert [bytes(v) for v in chain.readable] == [b"abc", b"defg"]  # zero-length: no view
    assert [len(v) for v in chain.writable] == [5, 3]
    assert (chain.readable_bytes, chain.writable_bytes) == (7, 8)
    assert vq.in_flight == 1 and vq.last_avail_idx == 1
    assert vq.fill(chain, b"12345678") == 8
    vq.push(chain.head, 8)
    assert vq.in_flight == 0
    used = drv.get_buf()
    assert (used.id, used.len_, used.data) == (head, 8, b"12345678")


def test_pop_indirect_chain(vq_cls):
    _, drv, vq = setup(vq_cls)
    head = drv.add_buf(out=[b"hdr", b"body"], in_sizes=[4], indirect=True)
    chain = vq.pop()
    assert chain.head == head
    assert chain.read_all() == b"hdrbody" and chain.writable_bytes == 4


def test_buffer_straddling_adjacent_regions_gives_two_views(vq_cls):
    _, drv, vq = setup(vq_cls, regions=((0, 0x8000), (0x8000, 0x8000)))
    drv.write(0x7FFC, b"12345678")
    drv.write_desc(0, 0x7FFC, 8, 0, 0)
    drv.expose(0)
    chain = vq.pop()
    assert [bytes(v) for v in chain.readable] == [b"1234", b"5678"]
    assert chain.readable_gpas == ((0x7FFC, 4), (0x8000, 4))


def test_pop_batch_returns_good_chains_with_error(vq_cls):
    _, drv, vq = setup(vq_cls)
    drv.add_buf(out=[b"a"])
    drv.add_buf(out=[b"b"])
    bad = 5
    drv.write_desc(bad, DATA, 1, NEXT, bad)  # self loop
    drv.expose(bad)
    with pytest.raises(DriverError) as info:
        vq.pop_batch(10)
    assert info.value.code == ChainError.LOOP
    assert [c.read_all() for c in info.value.chains] == [b"a", b"b"]
    assert vq.in_flight == 2


def test_pop_batch_limits_count(vq_cls):
    _, drv, vq = setup(vq_cls)
    for _ in range(5):
        drv.add_buf(out=[b"x"])
    assert len(vq.pop_batch(3)) == 3
    assert len(vq.pop_batch(10)) == 2


# -- hostile rings: virtio 1.2 §2.7.5.2, §2.7.5.3, §2.7.6 --------------------------------
def test_spec_2_7_5_2_descriptor_loop_is_refused(vq_cls):
    def build(drv):
        drv.write_desc(0, DATA, 4, NEXT, 1)
        drv.write_desc(1, DATA, 4, NEXT, 0)
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.LOOP)


def test_next_out_of_range_is_refused(vq_cls):
    def build(drv):
        drv.write_desc(0, DATA, 4, NEXT, SIZE)
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.NEXT_RANGE)


def test_spec_2_7_5_3_1_nested_indirect_is_refused(vq_cls):
    def build(drv):
        drv.write(0x5000, struct.pack("<QIHH", 0x5100, 16, INDIRECT, 0))
        drv.write_desc(0, 0x5000, 16, INDIRECT, 0)
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.INDIRECT_NESTED)


def test_spec_2_7_5_3_1_indirect_with_next_is_refused(vq_cls):
    def build(drv):
        drv.write_desc(0, 0x5000, 16, INDIRECT | NEXT, 1)
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.INDIRECT_NEXT)


@pytest.mark.parametrize("length", [0, 17, 8])
def test_indirect_bad_length_is_refused(vq_cls, length):
    def build(drv):
        drv.write_desc(0, 0x5000, length, INDIRECT, 0)
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.INDIRECT_LEN)


def test_indirect_table_over_65536_entries_is_refused(vq_cls):
    def build(drv):
        drv.write_desc(0, 0x5000, 16 * 65537, INDIRECT, 0)
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.INDIRECT_LEN)


def test_indirect_table_outside_memory_is_addr(vq_cls):
    def build(drv):
        drv.write_desc(0, 0xFFF0, 32, INDIRECT, 0)  # runs past the region end
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.ADDR)


def test_indirect_loop_is_refused(vq_cls):
    def build(drv):
        drv.write(0x5000, struct.pack("<QIHH", DATA, 4, NEXT, 1)
                  + struct.pack("<QIHH", DATA, 4, NEXT, 0))
        drv.write_desc(0, 0x5000, 32, INDIRECT, 0)
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.LOOP)


def test_indirect_next_beyond_table_is_refused(vq_cls):
    def build(drv):
        drv.write(0x5000, struct.pack("<QIHH", DATA, 4, NEXT, 2) + bytes(16))
        drv.write_desc(0, 0x5000, 32, INDIRECT, 0)
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.NEXT_RANGE)


def test_chain_longer_than_queue_is_loop(vq_cls):
    def build(drv):
        for i in range(SIZE):
            drv.write_desc(i, DATA, 1, NEXT, (i + 1) % SIZE)
        drv.expose(3)
    assert_hostile(vq_cls, build, ChainError.LOOP, head=3)


def test_spec_2_7_5_2_chain_over_4gib_stops(vq_cls):
    def build(drv):
        drv.write_desc(0, DATA, 16, NEXT, 1)
        drv.write_desc(1, DATA, 0xFFFFFFFF, 0, 0)  # total 2^32 + 15: refused before translate
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.TOTAL_LEN)


def test_buffer_outside_regions_is_addr(vq_cls):
    def build(drv):
        drv.write_desc(0, 0x20000, 4, 0, 0)
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.ADDR)


def test_buffer_straddling_region_end_into_gap_is_addr(vq_cls):
    def build(drv):
        drv.write_desc(0, 0xFFFC, 8, WRITE, 0)  # 4 bytes mapped, then a gap
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.ADDR,
                   regions=((0, 0x10000), (0x20000, 0x1000)))


def test_spec_2_7_4_2_readable_after_writable_is_refused(vq_cls):
    def build(drv):
        drv.write_desc(0, DATA, 4, WRITE | NEXT, 1)
        drv.write_desc(1, DATA + 16, 4, 0, 0)
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.ORDER)


def test_readable_after_zero_length_writable_is_refused(vq_cls):
    def build(drv):
        drv.write_desc(0, DATA, 0, WRITE | NEXT, 1)
        drv.write_desc(1, DATA + 16, 4, 0, 0)
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.ORDER)


def test_too_many_segments_is_refused(vq_cls):
    def build(drv):
        table = b"".join(struct.pack("<QIHH", DATA + i, 1, NEXT, i + 1) for i in range(1024))
        table += struct.pack("<QIHH", DATA, 1, 0, 0)
        drv.write(0x4000, table)  # 1025 entries
        drv.write_desc(0, 0x4000, len(table), INDIRECT, 0)
        drv.expose(0)
    assert_hostile(vq_cls, build, ChainError.TOO_MANY_SEGMENTS)


def test_spec_2_7_6_avail_idx_jump_over_size_breaks_queue_writes_nothing(vq_cls):
    def build(drv):
        drv.write_avail_idx(SIZE + 1)
    assert_hostile(vq_cls, build, ChainError.AVAIL_IDX, written=False)


def test_head_out_of_range_breaks_queue_writes_nothing(vq_cls):
    def build(drv):
        drv.expose(SIZE)
    assert_hostile(vq_cls, build, ChainError.HEAD_RANGE, written=False)


def test_not_configured_is_not_ready(vq_cls):
    mem = bytearray_memory((0, 0x10000))
    vq = vq_cls(mem, SIZE, packed=False, event_idx=False)
    with pytest.raises(DriverError) as info:
        vq.pop()
    assert info.value.code == ChainError.NOT_READY
    assert vq.broken is None


def test_configure_checks_areas(vq_cls):
    mem = bytearray_memory((0, 0x10000))
    vq = vq_cls(mem, SIZE, packed=False, event_idx=False)
    with pytest.raises(GuestAddressError):
        vq.configure(0x1000, 0x2000, 0x10000 - 8)  # used ring runs past the end


def test_split_size_must_be_power_of_two(vq_cls):
    with pytest.raises(ValueError):
        vq_cls(bytearray_memory((0, 0x1000)), 6, packed=False, event_idx=False)


def test_ring_area_removed_breaks_queue(vq_cls):
    mem, drv, vq = setup(vq_cls, regions=((0, 0x2000), (0x2000, 0xE000)))
    drv.add_buf(out=[b"x"])
    mem.remove(0x2000, 0xE000)  # avail and used rings gone
    with pytest.raises(DriverError) as info:
        vq.pop()
    assert info.value.code == ChainError.ADDR and vq.broken == ChainError.ADDR


def test_set_base_clears_broken(vq_cls):
    _, drv, vq = setup(vq_cls)
    drv.write_avail_idx(SIZE + 1)
    with pytest.raises(DriverError):
        vq.pop()
    vq.set_base(SIZE + 1)
    assert vq.broken is None and vq.pop() is None


def test_reset_clears_state(vq_cls):
    _, drv, vq = setup(vq_cls)
    drv.add_buf(out=[b"x"])
    vq.pop()
    vq.reset()
    assert (vq.last_avail_idx, vq.used_idx, vq.in_flight, vq.broken) == (0, 0, 0, None)
    with pytest.raises(DriverError) as info:
        vq.pop()
    assert info.value.code == ChainError.NOT_READY


# -- 16-bit wrap ----------------------------------------------------------------------------
def test_indices_wrap_past_65536(vq_cls):
    _, drv, vq = setup(vq_cls, size=4)
    for i in range(65536 + 10):
        head = drv.add_buf(out=[bytes([i & 0xFF])])
        chain = vq.pop()
        assert chain.head == head
        vq.push(chain.head, 0)
        assert drv.get_buf().id == head
    assert vq.last_avail_idx == 10 and vq.used_idx == 10 and drv.used_idx == 10


def test_avail_idx_wrapped_below_last_avail_counts_mod_2_16(vq_cls):
    _, drv, vq = setup(vq_cls)
    vq.set_base(0xFFFF)
    drv.avail_idx_shadow = 0xFFFF
    drv.write_avail_idx(0xFFFF)
    drv.add_buf(out=[b"a"])
    drv.add_buf(out=[b"b"])
    assert drv.avail_idx_shadow == 1
    assert [c.read_all() for c in vq.pop_batch(4)] == [b"a", b"b"]
    assert vq.last_avail_idx == 1


# -- notifications: virtio 1.2 §2.7.7, §2.7.10 --------------------------------------------------
def test_no_event_idx_respects_no_interrupt(vq_cls):
    _, drv, vq = setup(vq_cls)
    drv.add_buf(out=[b"x"])
    vq.push(vq.pop().head, 0)
    assert vq.should_notify()
    drv.write_avail_flags(AvailFlag.VRING_AVAIL_F_NO_INTERRUPT)
    assert not vq.should_notify()


def test_notify_on_empty_overrides_no_interrupt(vq_cls):
    _, drv, vq = setup(vq_cls, notify_on_empty=True)
    drv.write_avail_flags(AvailFlag.VRING_AVAIL_F_NO_INTERRUPT)
    drv.add_buf(out=[b"x"])
    drv.add_buf(out=[b"y"])
    vq.push(vq.pop().head, 0)
    assert not vq.should_notify()  # one chain still available
    vq.push(vq.pop().head, 0)
    assert vq.should_notify()  # ring empty, nothing in flight


def test_spec_2_7_10_used_event_suppresses_until_reached(vq_cls):
    _, drv, vq = setup(vq_cls, event_idx=True)
    for _ in range(3):
        drv.add_buf(out=[b"x"])
    drv.write_used_event(1)  # interrupt when used idx passes 1 (i.e. after the 2nd)
    chains = vq.pop_batch(3)
    vq.push(chains[0].head, 0)
    assert vq.should_notify()  # first decision: shadow not valid yet
    vq.push(chains[1].head, 0)
    assert vq.should_notify()  # used idx went 1 -> 2, crossing used_event 1
    vq.push(chains[2].head, 0)
    assert not vq.should_notify()  # 2 -> 3 does not cross 1
    assert vq.signalled_used == 3 and vq.signalled_used_valid


def test_driver_get_buf_rearms_used_event(vq_cls):
    _, drv, vq = setup(vq_cls, event_idx=True)
    drv.add_buf(out=[b"x"])
    vq.push(vq.pop().head, 0)
    assert vq.should_notify()
    drv.get_buf()  # writes used_event = 1
    drv.add_buf(out=[b"y"])
    vq.push(vq.pop().head, 0)
    assert vq.should_notify()


def test_spec_2_7_10_avail_event_written_when_empty(vq_cls):
    mem, drv, vq = setup(vq_cls, event_idx=True)
    drv.add_buf(out=[b"x"])
    drv.add_buf(out=[b"y"])
    assert drv.kick_prepare()  # avail_event 0 is in [0, 2)
    vq.pop_batch(5)
    assert drv.avail_event == 2  # written when the ring was found empty
    drv.add_buf(out=[b"z"])
    assert drv.kick_prepare()  # 2 in [2, 3)
    drv.add_buf(out=[b"w"])
    assert not drv.kick_prepare()  # device has not caught up: 2 not in [3, 4)


def test_no_event_idx_device_never_suppresses_kicks(vq_cls):
    _, drv, vq = setup(vq_cls)
    drv.add_buf(out=[b"x"])
    assert vq.pop() is not None and vq.pop() is None
    drv.add_buf(out=[b"y"])
    assert drv.kick_prepare()


# -- bases and state: vhost-user GET/SET_VRING_BASE -----------------------------------------
def test_get_set_base_round_trip_restores_used_idx_from_guest(vq_cls):
    mem, drv, vq = setup(vq_cls)
    for _ in range(5):
        drv.add_buf(out=[b"x"])
    chains = vq.pop_batch(5)
    for c in chains[:3]:
        vq.push(c.head, 0)
    base = vq.get_base()
    assert base == 5
    other = vq_cls(mem, SIZE, packed=False, event_idx=False)
    other.set_base(base)
    other.configure(*drv.ring_addresses)
    assert (other.last_avail_idx, other.used_idx, other.in_flight) == (5, 3, 0)
    other.set_base(base)  # configured now: used idx re-read
    assert other.used_idx == 3 and not other.signalled_used_valid


def test_state_round_trip(vq_cls):
    mem, drv, vq = setup(vq_cls)
    drv.add_buf(out=[b"x"])
    vq.push(vq.pop().head, 0)
    state = vq.state()
    other = vq_cls(mem, SIZE, packed=False, event_idx=False)
    other.configure(*drv.ring_addresses)
    other.load_state(state)
    assert other.state() == state


def test_load_state_refuses_what_the_queue_cannot_hold(vq_cls):
    mem, drv, vq = setup(vq_cls)
    state = vq.state()
    too_many = dict(state, pending={"head": 0, "ring_slots": 1, "offset": 0,
                                    "segments": [[0, 1]] * 1025})
    with pytest.raises(ValueError, match="more than 1024 segments"):
        vq.load_state(too_many)
    with pytest.raises(ValueError, match="different queue shape"):
        vq.load_state(dict(state, size=SIZE * 2))
    assert vq.state() == state  # nothing half-applied


# -- dirty logging (vhost-user LOG_SHMFD) ----------------------------------------------------
def test_used_writes_and_avail_event_mark_dirty_pages(vq_cls):
    mem, drv, vq = setup(vq_cls, event_idx=True)
    drv.add_buf(out=[b"x"])
    mem.log = DirtyLog(bytearray(4))  # after the driver's own writes (same memory object)
    chain = vq.pop()
    assert vq.pop() is None  # writes avail_event in the used ring page
    assert mem.log.dirty_pages() == [3]
    vq.push(chain.head, 0)
    assert mem.log.dirty_pages() == [3]
    mem.log = DirtyLog(bytearray(4))
    vq.push(0, 0)
    assert mem.log.dirty_pages() == [3]
