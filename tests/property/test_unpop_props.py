"""``Virtqueue.unpop`` over well-formed rings filled by the driver model, both
implementations in lock step (hostile rings: tests/property/test_ring_differential.py, whose
operation lists include ``unpop`` too).

Random pops, pop_batches, unpops of the last (or an older, refused) chain and pushes; after
every step the queue state and guest memory must be identical in both implementations, and
at the end every chain the driver posted comes back exactly once with the length pushed.

Spec: virtio 1.2 §2.7.13.2 / §2.8.21.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.property.profiles import scaled
from tests.property.ringpair import RingPair, make_memory, require_pair
from tests.support.driver import Allocator, make_driver

OPS = st.lists(st.one_of(
    st.just(("pop",)), st.just(("pop",)),
    st.tuples(st.just("pop_batch"), st.integers(1, 5)),
    st.tuples(st.just("unpop"), st.sampled_from([0, 0, 0, 1])),
    st.tuples(st.just("unpop"), st.just(0)),
    st.tuples(st.just("push"), st.integers(0, 3)),
    st.just(("post",)),
), min_size=4, max_size=30).map(lambda ops: [("pop",)] + ops)


@pytest.fixture(scope="module")
def impls():
    return require_pair()


@scaled(1.5)
@given(packed=st.booleans(), size=st.sampled_from([2, 4, 8]), event_idx=st.booleans(),
       sizes=st.lists(st.lists(st.integers(1, 300), min_size=1, max_size=3), min_size=1,
                      max_size=12),
       ops=OPS)
def test_unpop_lock_step(impls, packed, size, event_idx, sizes, ops):
    pair = RingPair(impls, make_memory())
    drivers = []
    for side in pair.sides:
        drv = make_driver(side.memory, size, packed=packed, event_idx=event_idx,
                          allocator=Allocator(side.memory, start=0x1000))
        side.vq = drv.attach(impls[side.name])
        drivers.append(drv)
    backlog = list(sizes)
    posted: dict = {}  # head -> writable bytes (the same in every side)
    popped: list = [[] for _ in pair.sides]  # per side: chains in pop order
    in_flight: list = []  # heads popped, not pushed (reference side)
    returned: list = []
    total = [0]  # chains posted

    def post():
        while backlog:
            heads = []
            for drv in drivers:
                try:
                    heads.append(drv.add_buf(in_sizes=backlog[0]))
                except MemoryError:
                    heads.append(None)
            assert len(set(heads)) == 1
            if heads[0] is None:
                return
            posted[heads[0]] = sum(backlog.pop(0))
            total[0] += 1

    post()
    for op in ops:
        name = op[0]
        if name == "post":
            post()
        elif name in ("pop", "pop_batch"):
            kind, value = pair.call(*op)
            assert kind == "ok"
            for i, v in enumerate(pair.last_values):
                chains = [v] if name == "pop" else v
                popped[i].extend(c for c in chains if c is not None)
            got = [value] if name == "pop" else value
            for c in got:
                if c is not None:
                    assert c.writable_bytes == posted[c.head]
                    in_flight.append(c.head)
        elif name == "unpop":
            back = op[1]
            if len(popped[0]) <= back:
                continue
            kind, _value = pair.apply(lambda side: side.vq.unpop(
                popped[pair.sides.index(side)][-1 - back]), f"unpop(-{1 + back})")
            chain = popped[0][-1 - back]
            if kind == "ok":
                in_flight.remove(chain.head)
        elif name == "push":
            if not in_flight:
                continue
            head = in_flight.pop(op[1] % len(in_flight))
            slots = next(c.ring_slots for c in reversed(popped[0]) if c.head == head)
            kind, _ = pair.call("push", head, posted[head] // 2, slots)
            assert kind == "ok"
            for drv in drivers:
                returned.extend((u.id, u.len_) for u in drv.get_bufs())
    # Drain: push everything in flight, then pop and push the rest: every posted chain
    # comes back once per side.
    for head in list(in_flight):
        slots = next(c.ring_slots for c in reversed(popped[0]) if c.head == head)
        pair.call("push", head, posted[head] // 2, slots)
    while True:
        kind, chain = pair.call("pop")
        if chain is None:
            break
        pair.call("push", chain.head, posted[chain.head] // 2, chain.ring_slots)
    for drv in drivers:
        returned.extend((u.id, u.len_) for u in drv.get_bufs())
    # every posted chain came back exactly once per side, with the length pushed for it
    assert len(returned) == total[0] * len(pair.sides)
    pair.check("end")
    assert all(vq.in_flight == 0 for vq in (s.vq for s in pair.sides))
