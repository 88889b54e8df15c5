"""Packed virtqueue: walk, wrap counters, hostile rings, event suppression, bases.

Spec: virtio 1.2 §2.8.
"""

from __future__ import annotations

import pytest

from ring.errors import ChainError, DriverError
from ring.wire import DescFlag, PackedEventFlag
from tests.support import RING_IMPLS, changed_gpas, ring_impl_class, snapshot
from tests.support.driver import PackedDriver, bytearray_memory

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
AVAIL, USED = int(DescFlag.AVAIL), int(DescFlag.USED)
SIZE = 5  # packed sizes need not be powers of two
DATA = 0x8000


@pytest.fixture(params=RING_IMPLS)
def vq_cls(request):
    return ring_impl_class(request.param)


def setup(vq_cls, size=SIZE, event_idx=False):
    mem = bytearray_memory((0, 0x10000))
    drv = PackedDriver(mem, size, event_idx=event_idx, desc_gpa=0x1000,
                       driver_event_gpa=0x2000, device_event_gpa=0x2100)
    return mem, drv, drv.attach(vq_cls)


def test_chain_and_used_descriptor(vq_cls):
    _, drv, vq = setup(vq_cls)
    buf = drv.add_buf(out=[b"ab", b"cd"], in_sizes=[3])
    chain = vq.pop()
    assert (chain.head, chain.ring_slots) == (buf, 3)
    assert chain.read_all() == b"abcd" and chain.writable_bytes == 3
    vq.fill(chain, b"xyz")
    vq.push(chain.head, 3, chain.ring_slots)
    _addr, length, buf_id, flags = drv.read_desc(0)
    assert (length, buf_id) == (3, buf)
    assert flags == AVAIL | USED | WRITE  # used wrap counter 1, len > 0
    assert drv.get_buf().data == b"xyz"
    assert vq.used_idx == 3 and vq.used_wrap


def test_spec_2_8_wrap_counters_flip_at_ring_end(vq_cls):
    _, drv, vq = setup(vq_cls)
    for i in range(40):
        buf = drv.add_buf(out=[bytes([i])] * (1 + i % 3), indirect=(i % 4 == 0))
        chain = vq.pop()
        assert chain.head == buf and chain.read_all() == bytes([i]) * (1 + i % 3)
        assert vq.pop() is None
        vq.push(chain.head, 0, chain.ring_slots)
        used = drv.get_buf()
        assert used.id == buf
    assert (vq.last_avail_idx, vq.avail_wrap) == (drv.next_avail_idx, drv.avail_wrap_counter)
    assert (vq.used_idx, vq.used_wrap) == (drv.last_used_idx, drv.used_wrap_counter)


def test_batch_publication_out_of_order(vq_cls):
    _, drv, vq = setup(vq_cls)
    a = drv.add_buf(out=[b"a"])
    b = drv.add_buf(out=[b"b"], in_sizes=[2])
    ca, cb = vq.pop_batch(2)
    vq.push_batch([(cb.head, 1, cb.ring_slots), (ca.head, 0, ca.ring_slots)])
    assert [u.id for u in drv.get_bufs()] == [b, a]


def assert_broken(vq_cls, build, code, written_id=None, slots=0):
    mem, drv, vq = setup(vq_cls)
    build(drv)
    before = snapshot(mem)
    with pytest.raises(DriverError) as info:
        vq.pop()
    assert info.value.code == code and vq.broken == code
    assert info.value.head == written_id
    changed = changed_gpas(mem, before)
    if written_id is None:
        assert changed == [] and vq.last_avail_idx == 0
    else:
        _a, length, buf_id, flags = drv.read_desc(0)
        assert (length, buf_id, flags & (AVAIL | USED)) == (0, written_id, AVAIL | USED)
        assert all(0x1000 + 8 <= g < 0x1000 + 16 for g in changed)
        assert vq.last_avail_idx == slots and vq.used_idx == slots
    with pytest.raises(DriverError) as again:
        vq.pop()
    assert again.value.code == ChainError.BROKEN


def test_spec_2_8_wrong_wrap_in_chain_is_packed_wrap(vq_cls):
    def build(drv):
        drv.write_desc(1, DATA, 4, 3, USED)  # previous-lap flags: not available
        drv.write_desc(0, DATA, 4, 3, NEXT | AVAIL)
    assert_broken(vq_cls, build, ChainError.PACKED_WRAP)


def test_buffer_id_out_of_range(vq_cls):
    def build(drv):
        drv.write_desc(0, DATA, 4, SIZE, AVAIL)
    assert_broken(vq_cls, build, ChainError.HEAD_RANGE)


def test_chain_longer_than_ring_is_loop(vq_cls):
    def build(drv):
        # every slot available on this lap and the next: NEXT all the way round
        for pos in range(SIZE):
            drv.write_desc(pos, DATA, 1, 0, NEXT | AVAIL | USED * 0)
    # After a full lap the expected wrap flips, so slot 0 is not available under the new
    # counter: the wrap check guards it, but LOOP is checked first.
    assert_broken(vq_cls, build, ChainError.LOOP)


def test_bad_address_in_last_descriptor_returns_id(vq_cls):
    def build(drv):
        drv.write_desc(0, 0x20000, 4, 2, AVAIL)
    assert_broken(vq_cls, build, ChainError.ADDR, written_id=2, slots=1)


def test_indirect_with_next_is_refused(vq_cls):
    def build(drv):
        drv.write_desc(0, 0x5000, 16, 1, INDIRECT | NEXT | AVAIL)
    assert_broken(vq_cls, build, ChainError.INDIRECT_NEXT)


def test_indirect_bad_len_returns_id(vq_cls):
    def build(drv):
        drv.write_desc(0, 0x5000, 20, 1, INDIRECT | AVAIL)
    assert_broken(vq_cls, build, ChainError.INDIRECT_LEN, written_id=1, slots=1)


def test_spec_2_8_10_driver_event_suppression(vq_cls):
    _, drv, vq = setup(vq_cls, event_idx=True)
    drv.add_buf(out=[b"a"])
    drv.add_buf(out=[b"b"])
    c1, c2 = vq.pop_batch(2)
    drv.write_driver_event(0, PackedEventFlag.DISABLE)
    vq.push(c1.head, 0)
    assert not vq.should_notify()
    drv.write_driver_event(1 | (1 << 15), PackedEventFlag.DESC)  # notify when used passes 1
    vq.push(c2.head, 0)
    assert vq.should_notify()
    drv.write_driver_event(0, PackedEventFlag.ENABLE)
    assert vq.should_notify()


def test_packed_kick_decision_follows_device_event(vq_cls):
    _, drv, vq = setup(vq_cls)
    drv.add_buf(out=[b"a"])
    assert drv.kick_prepare()  # the device never suppresses (ENABLE)
    drv.write_device_event(0, PackedEventFlag.DISABLE)
    drv.add_buf(out=[b"b"])
    assert not drv.kick_prepare()


def test_get_set_base_packed_encoding(vq_cls):
    mem, drv, vq = setup(vq_cls)
    for _ in range(4):
        drv.add_buf(out=[b"x"])
    chains = vq.pop_batch(4)
    for c in chains:
        vq.push(c.head, 0)
    drv.get_bufs()
    drv.add_buf(out=[b"y"])
    drv.add_buf(out=[b"z"])  # wraps: position 1, wrap counter 0
    c = vq.pop_batch(2)
    base = vq.get_base()
    assert base == (1 | (0 << 15)) | (4 << 16) | (1 << 31)
    other = vq_cls(mem, SIZE, packed=True, event_idx=False)
    other.set_base(base)
    other.configure(*drv.ring_addresses)
    assert (other.last_avail_idx, other.avail_wrap, other.used_idx, other.used_wrap) == \
        (1, False, 4, True)
    assert other.get_base() == base
    assert len(c) == 2
