"""Differential properties: the pure-Python reference ring and the C ring, fed the same
(often hostile) rings, return equal outcomes and leave byte-identical guest memory.

Each example lays one generated :class:`~tests.property.rings.RawRing` into guest memory,
clones the memory, configures one queue per implementation, applies a generated sequence of
operations (pop, pop_batch, push, should_notify, set_base, guest writes between device steps,
region removal) and after every step asserts equal outcomes — the same chains, or the same
``(type(exc), code, queue, head, chains)`` — equal queue state and identical memory and
dirty log (:class:`~tests.property.ringpair.RingPair`).

Spec: virtio 1.2 §2.7.5.2, §2.7.13.2 (split chain rules), §2.8 (packed), §2.7.10 / §2.8.10
(notification decisions); docs/internals.md "Chain walk", "Reconciled details".
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ring.errors import ChainError
from tests.property.profiles import scaled
from tests.property.ringpair import R0, R1, RingPair, require_pair
from tests.property.rings import (INDIRECT, NEXT, WRITE, Desc, RawRing, operations, raw_rings,
                                  start_pair)


@pytest.fixture(scope="module")
def impls():
    return require_pair()


def run_ops(pair: RingPair, ops, size: int) -> list:
    """Apply ``ops`` in lock step; returns the list of reference outcomes (for tests that
    want to look at what happened)."""
    in_flight: list = []  # (head, slots, writable_bytes) of chains popped, not pushed
    popped: dict = {side.name: [] for side in pair.sides}  # every side's chains, in pop order

    def record(chains_by_side) -> None:
        for side, chains in zip(pair.sides, chains_by_side):
            popped[side.name].extend(chains)

    seen = []
    for op in ops:
        name = op[0]
        if name == "pop":
            kind, value = pair.call("pop")
            if kind == "ok" and value is not None:
                in_flight.append((value.head, value.ring_slots, value.writable_bytes))
                record([v] for v in pair.last_values)
            elif kind == "exc":
                in_flight.extend((c.head, c.ring_slots, c.writable_bytes)
                                 for c in value.chains)
                record(v.chains for v in pair.last_values)
        elif name == "pop_batch":
            kind, value = pair.call("pop_batch", op[1])
            chains = value if kind == "ok" else value.chains
            in_flight.extend((c.head, c.ring_slots, c.writable_bytes) for c in chains)
            record(v if kind == "ok" else v.chains for v in pair.last_values)
        elif name == "unpop":  # op[1] = 0: the last popped chain; 1, 2: older ones (refused)
            back = op[1]
            if len(popped[pair.ref.name]) <= back:
                continue
            kind, value = pair.apply(lambda side: side.vq.unpop(popped[side.name][-1 - back]),
                                     f"unpop(-{1 + back})")
            if kind == "ok":
                chain = popped[pair.ref.name][-1 - back]
                in_flight.remove((chain.head, chain.ring_slots, chain.writable_bytes))
        elif name == "push_some":
            count, seed = op[1], op[2]
            rng = random.Random(seed)
            rng.shuffle(in_flight)
            batch, in_flight = in_flight[:count], in_flight[count:]
            items = [(h, rng.randint(0, w), s) for h, s, w in batch]
            if len(items) == 1:
                kind, value = pair.call("push", *items[0])
            else:
                kind, value = pair.call("push_batch", items)
        elif name == "push_raw":
            kind, value = pair.call("push", op[1], op[2], op[3])
        elif name == "should_notify":
            kind, value = pair.call("should_notify")
        elif name == "guest_write":
            pair.guest_write(op[1], op[2])
            kind, value = "guest", None
        elif name == "set_base_same":
            kind, value = pair.apply(lambda side: side.vq.set_base(side.vq.get_base()),
                                     "set_base(get_base())")
            if kind == "ok":
                in_flight.clear()
        elif name == "remove_region":
            gpa, size_ = op[1]
            for side in pair.sides:
                if any(r.gpa == gpa for r in side.memory.regions):
                    side.memory.remove(gpa, size_)
            kind, value = "guest", None
        else:  # pragma: no cover - a typo in a strategy
            raise AssertionError(op)
        seen.append((name, kind, value))
        for side in pair.sides:
            assert side.vq.in_flight <= size, f"{side.name}: in_flight > size"
    return seen


def all_operations(packed: bool, size: int):
    removal = st.tuples(st.just("remove_region"), st.sampled_from([R0, R1]))
    return st.one_of(operations(packed, size),
                     st.tuples(operations(packed, size), st.just([]), removal,
                               operations(packed, size))
                     .map(lambda t: t[0] + [t[2]] + t[3]))


@scaled(4.0)
@given(data=st.data())
def test_split_rings_walk_identically(impls, data):
    raw = data.draw(raw_rings(packed=False), label="ring")
    ops = data.draw(all_operations(False, raw.size), label="ops")
    run_ops(start_pair(impls, raw)[0], ops, raw.size)


@scaled(4.0)
@given(data=st.data())
def test_packed_rings_walk_identically(impls, data):
    raw = data.draw(raw_rings(packed=True), label="ring")
    ops = data.draw(all_operations(True, raw.size), label="ops")
    run_ops(start_pair(impls, raw)[0], ops, raw.size)


@scaled(1.5)
@given(raw=raw_rings(), batch=st.integers(1, 20))
def test_pop_batch_equals_pops(impls, raw, batch):
    """pop_batch(n) consumes exactly what n pops would (same chains, same error, same
    state), within one implementation too."""
    one = start_pair(impls, raw)[0]
    many = start_pair(impls, raw)[0]
    kind, value = one.call("pop_batch", batch)
    popped = value if kind == "ok" else value.chains
    results = []
    for _ in range(batch):
        k, v = many.call("pop")
        if k == "exc":
            results.append(("exc", v.code, v.head))
            break
        if v is None:
            break
        results.append(("ok", v.head, v.ring_slots))
    expected = [("ok", c.head, c.ring_slots) for c in popped]
    if kind == "exc":
        expected.append(("exc", value.code, value.head))
    assert results == expected
    for a, b in zip(one.sides, many.sides):
        assert bytes(a.memory.regions[0].view) == bytes(b.memory.regions[0].view)


# -- regressions and pinned hostile shapes ---------------------------------------------------
def _split_ring(descs, *, heads=(0,), size=4, tables=(), base=0, event_idx=False,
                pending=None, log=False) -> RawRing:
    descs = tuple(descs) + tuple(Desc(0, 0, 0, 0) for _ in range(size - len(descs)))
    heads = tuple(heads) + (0,) * (size - len(heads))
    pending = len([h for h in heads]) if pending is None else pending
    return RawRing(False, size, event_idx, False, base, descs, tuple(tables),
                   (base + pending) & 0xFFFF, heads, 0, base, base, (0, 0), log)


def _packed_ring(descs, *, size=4, tables=(), base=0x8000_8000, driver_event=(0, 0),
                 log=False) -> RawRing:
    descs = tuple(descs) + tuple(Desc(0, 0, 0, 0) for _ in range(size - len(descs)))
    return RawRing(True, size, False, False, base, descs, tuple(tables), 0, (), 0, 0, 0,
                   driver_event, log)


A, U = 1 << 7, 1 << 15  # packed AVAIL / USED


def PD(addr: int, len_: int, buf_id: int, flags: int) -> Desc:  # noqa: N802 - reads like Desc
    """A packed descriptor in its wire order (addr, len, id, flags)."""
    return Desc(addr, len_, flags, buf_id)
D = 0x9000  # data area
PINNED = {
    "loop": _split_ring([Desc(D, 4, NEXT, 1), Desc(D, 4, NEXT, 0)]),
    "next_out_of_range": _split_ring([Desc(D, 4, NEXT, 4)]),
    "nested_indirect": _split_ring([Desc(0x2000, 16, INDIRECT, 0)],
                                   tables=[(Desc(0x2000, 16, INDIRECT, 0),)]),
    "indirect_len_zero": _split_ring([Desc(0x2000, 0, INDIRECT, 0)]),
    "indirect_len_odd": _split_ring([Desc(0x2000, 24, INDIRECT, 0)]),
    "indirect_with_next": _split_ring([Desc(0x2000, 16, INDIRECT | NEXT, 1)]),
    "readable_after_writable": _split_ring([Desc(D, 4, WRITE | NEXT, 1), Desc(D, 4, 0, 0)]),
    # TOTAL_LEN is checked before ADDR for the same descriptor: the second one overflows
    "over_4gib": _split_ring([Desc(D, 0x10, NEXT, 1), Desc(D, 0xFFFFFFFF, 0, 0)]),
    "straddle_into_gap": _split_ring([Desc(0x13FF0, 0x20, 0, 0)]),
    "straddle_adjacent": _split_ring([Desc(0xFFF0, 0x20, WRITE, 0)]),
    "past_end": _split_ring([Desc(0x1BFF0, 0x20, 0, 0)]),
    "addr_wraps_2_64": _split_ring([Desc((1 << 64) - 8, 0x20, 0, 0)]),
    "avail_jump": _split_ring([Desc(D, 4, 0, 0)], pending=5),
    "head_out_of_range": _split_ring([Desc(D, 4, 0, 0)], heads=(9,)),
    "zero_length": _split_ring([Desc(D, 0, NEXT, 1), Desc(D, 0, WRITE, 0)]),
    "too_many_segments": _split_ring([Desc(0x4000, 16 * 1025, INDIRECT, 0)]),
    "max_segments_then_next_range": _split_ring([Desc(0x4000, 16 * 1024, INDIRECT, 0)]),
    "wrap_base": _split_ring([Desc(D, 4, 0, 0), Desc(D + 8, 4, WRITE, 0)], heads=(0, 1),
                             base=0xFFFF, event_idx=True, log=True),
    "packed_wrap_confusion": _packed_ring([PD(D, 4, 0, A | NEXT), PD(D, 4, 1, U)]),
    "packed_id_out_of_range": _packed_ring([PD(D, 4, 7, A)]),
    "packed_indirect_next": _packed_ring([PD(0x2000, 16, 0, A | INDIRECT | NEXT),
                                          PD(D, 4, 0, A)], tables=[(PD(D, 4, 0, 0),)]),
    "packed_indirect_writes": _packed_ring([PD(0x2000, 32, 2, A | INDIRECT)],
                                           tables=[(PD(D, 4, 0, 0), PD(D, 9, 0, WRITE))],
                                           log=True),
    "packed_chain_wraps_ring": _packed_ring(
        [PD(D, 1, 0, U), PD(D, 1, 0, 0), PD(D, 1, 0, 0), PD(D, 4, 0, A | NEXT)],
        base=0x8000_8003),
    "packed_loop_all_next": _packed_ring([PD(D, 1, 0, A | NEXT)] * 4),
    "packed_event_desc": _packed_ring([PD(D, 4, 1, A)], driver_event=(0x8001, 2)),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_hostile_shapes(impls, name):
    raw = PINNED[name]
    ops = [("pop",), ("should_notify",), ("pop_batch", 3), ("push_some", 3, 7),
           ("should_notify",), ("set_base_same",), ("pop",), ("should_notify",)]
    run_ops(start_pair(impls, raw)[0], ops, raw.size)


def test_pinned_shapes_hit_their_error_codes():
    """The pinned shapes mean what their names say (checked on the reference alone, so a
    typo in a shape cannot make the differential test vacuous)."""
    from tests.property.ringpair import available_impls
    impls = {"py": available_impls()["py"]}
    expect = {"loop": ChainError.LOOP, "next_out_of_range": ChainError.NEXT_RANGE,
              "nested_indirect": ChainError.INDIRECT_NESTED,
              "indirect_len_zero": ChainError.INDIRECT_LEN,
              "indirect_len_odd": ChainError.INDIRECT_LEN,
              "indirect_with_next": ChainError.INDIRECT_NEXT,
              "readable_after_writable": ChainError.ORDER,
              "over_4gib": ChainError.TOTAL_LEN, "straddle_into_gap": ChainError.ADDR,
              "past_end": ChainError.ADDR, "addr_wraps_2_64": ChainError.ADDR,
              "avail_jump": ChainError.AVAIL_IDX, "head_out_of_range": ChainError.HEAD_RANGE,
              "too_many_segments": ChainError.TOO_MANY_SEGMENTS,
              "max_segments_then_next_range": ChainError.NEXT_RANGE,
              "packed_wrap_confusion": ChainError.PACKED_WRAP,
              "packed_id_out_of_range": ChainError.HEAD_RANGE,
              "packed_indirect_next": ChainError.INDIRECT_NEXT,
              "packed_loop_all_next": ChainError.LOOP}
    for name, code in expect.items():
        kind, value = start_pair(impls, PINNED[name])[0].call("pop")
        assert kind == "exc" and value.code == code, (name, kind, value)
    for name in ("straddle_adjacent", "zero_length", "wrap_base", "packed_indirect_writes",
                 "packed_chain_wraps_ring", "packed_event_desc"):
        kind, value = start_pair(impls, PINNED[name])[0].call("pop")
        assert kind == "ok" and value is not None, (name, kind, value)

