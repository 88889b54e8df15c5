"""``Virtqueue.unpop(chain)``: the most recently popped, unpushed chain goes back to the
available ring (both implementations; the differential property test
tests/property/test_ring_differential.py mixes ``unpop`` into random operation sequences).

Spec: virtio 1.2 §2.7.13.2 / §2.8.21 (the device reads available buffers in order).
"""

from __future__ import annotations

import socket

import pytest

from ring.errors import DriverError
from tests.support import RING_IMPLS, ring_impl_class
from tests.support.driver import bytearray_memory, make_driver


@pytest.fixture(params=RING_IMPLS)
def vq_cls(request):
    return ring_impl_class(request.param)


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request):
    return request.param


def setup(vq_cls, packed, size=4):
    mem = bytearray_memory((0, 1 << 20))
    drv = make_driver(mem, size, packed=packed)
    return drv, drv.attach(vq_cls)


def test_unpop_gives_the_same_chain_back(vq_cls, packed):
    drv, vq = setup(vq_cls, packed)
    first = drv.add_buf(in_sizes=[100, 28], indirect=False)
    drv.add_buf(in_sizes=[8])
    chain = vq.pop()
    assert chain.head == first and vq.in_flight == 1
    before = vq.last_avail_idx
    vq.unpop(chain)
    assert vq.in_flight == 0 and vq.last_avail_idx != before
    again = vq.pop()
    assert (again.head, again.ring_slots, again.writable_bytes) == (first, chain.ring_slots,
                                                                      128)
    vq.push(again.head, 5, again.ring_slots)
    assert [(u.id, u.len_) for u in drv.get_bufs()] == [(first, 5)]


def test_unpop_across_the_packed_wrap(vq_cls, packed):
    """Popping and pushing around the ring several times, then unpopping the chain that
    crosses the end of the ring: the wrap counter steps back too."""
    drv, vq = setup(vq_cls, packed, size=4)
    for _ in range(3):
        drv.add_buf(in_sizes=[4])
        c = vq.pop()
        vq.push(c.head, 0, c.ring_slots)
        drv.get_bufs()
    head = drv.add_buf(in_sizes=[4, 4, 4], indirect=False)  # three slots: crosses the end
    base = vq.get_base()
    chain = vq.pop()
    vq.unpop(chain)
    assert vq.get_base() == base
    assert vq.pop().head == head


def test_unpop_refuses_anything_but_the_last_unpushed_chain(vq_cls, packed):
    drv, vq = setup(vq_cls, packed)
    drv.add_buf(in_sizes=[8])
    drv.add_buf(in_sizes=[8])
    a = vq.pop()
    b = vq.pop()
    with pytest.raises(ValueError):
        vq.unpop(a)  # not the most recent
    vq.unpop(b)
    with pytest.raises(ValueError):
        vq.unpop(b)  # only once
    with pytest.raises(ValueError):
        vq.unpop(a)  # the one before is not known to be last any more
    b = vq.pop()
    vq.push(b.head, 0, b.ring_slots)
    with pytest.raises(ValueError):
        vq.unpop(b)  # pushed
    assert vq.in_flight == 1


def test_unpop_after_pop_batch_and_not_after_a_datapath_call(vq_cls, packed):
    drv, vq = setup(vq_cls, packed)
    for _ in range(3):
        drv.add_buf(in_sizes=[8])
    chains = vq.pop_batch(2)
    with pytest.raises(ValueError):
        vq.unpop(chains[0])
    vq.unpop(chains[1])
    last = vq.pop()
    assert last.head == chains[1].head
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        res = vq.rx_from_fd(b.fileno())  # nothing waiting: the third chain is given back
        assert res.drained and res.chains == 0
        with pytest.raises(ValueError):
            vq.unpop(last)  # a data-path call ran since the pop
    finally:
        a.close()
        b.close()
    assert vq.in_flight == 2


def _batch_fails_after_one_good_chain(vq_cls, bad_head_in_range: bool):
    """A split ring holding one good chain, then a bad one: a descriptor whose next is
    itself (the head is known, so the ring consumes the chain and returns it used), or an
    avail entry naming a head beyond the ring (nothing to consume)."""
    drv, vq = setup(vq_cls, False, size=4)
    good = drv.add_buf(in_sizes=[8])
    if bad_head_in_range:
        drv.write_desc(3, 0x9000, 8, 1, 3)  # VIRTQ_DESC_F_NEXT, next = itself
        drv.write_avail_slot(1, 3)
    else:
        drv.write_avail_slot(1, 7)  # head 7 >= size 4
    drv.write_avail_idx(2)
    with pytest.raises(DriverError) as caught:
        vq.pop_batch(4)
    [chain] = caught.value.chains
    assert chain.head == good
    return vq, chain


def test_unpop_after_a_batch_that_consumed_a_bad_chain_is_refused(vq_cls):
    """The bad chain after the good one was consumed (and returned used), so the good one
    is no longer the last the ring popped: giving it back would step the ring back over the
    bad chain. The C ring accepted it (found by the nightly differential property run)."""
    vq, chain = _batch_fails_after_one_good_chain(vq_cls, bad_head_in_range=True)
    base = vq.get_base()
    with pytest.raises(ValueError):
        vq.unpop(chain)
    assert vq.get_base() == base


def test_unpop_after_a_batch_that_stopped_at_an_unknown_head_gives_the_chain_back(vq_cls):
    """Nothing was consumed after the good chain (the head was out of range), so it is
    still the last popped one and goes back, in both implementations."""
    vq, chain = _batch_fails_after_one_good_chain(vq_cls, bad_head_in_range=False)
    base = vq.get_base()
    vq.unpop(chain)
    assert vq.get_base() == (base - 1) & 0xFFFF
