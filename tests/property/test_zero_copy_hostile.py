"""Zero-copy transmit (ring.cpump, csrc/zerocopy.c) on hostile rings keeps the bookkeeping
of the copying pump: same bytes, same used ring, same queue state, nothing left waiting.

Each example is a hostile ring from :func:`tests.property.rings.raw_rings` (loops, ``next``
out of range, nested indirect, huge lengths, buffers in the gap or past RAM, avail idx
jumps, packed wrap bits) in which some descriptors are replaced by large benign readable
buffers in the data area (``DATA_GPA`` up to the end of R1, 44 KiB contiguous over the
R0/R1 boundary), so that rounds reach ``ZERO_COPY_MIN_BYTES`` (16 KiB) often. The ring is
laid into guest memory filled with a recognisable pattern; two C queues run over two
copies of that memory, one pump with zero copy enabled and one without, each writing to its
own AF_UNIX socketpair. The same steps run on both sides: ``pump_tx``, then the host peer
reads a drawn number of bytes (or all), repeated; finally the peer reads everything and
``pump_tx`` runs until it returns neither TX_DEFERRED nor TX_BLOCKED nor TX_MORE (a bounded
loop: a valid chain's readable bytes all translate, so each descriptor is at most the 96 KiB
of guest RAM and the whole stream is bounded by ring size x descriptors x RAM; ``drain``
fails with a message after rounds that move nothing, or too many rounds for the chains'
bytes). Then:

* neither side raised anything but the ring's typed errors (ring.errors), and both raised
  the same ones in the same order;
* both peers received the same number of bytes, and the same bytes;
* both guest memories are byte-identical (the used ring's elements and idx, packed used
  descriptors, event areas, the dirty log), the queue states agree (last_avail_idx,
  used_idx, wraps, in_flight, broken, pending, base) and the zero-copy pump has
  ``deferred == 0``;
* (split rings) no chain went back to the guest from the zero-copy side before its peer had
  read the chain's last byte, for every chain some of whose bytes were taken by a pump call
  that sent *all* it took by page reference (``bytes_by_reference`` grew by exactly
  ``bytes_from_guest``). This is the checkable approximation: a call that mixes a copied
  round with a by-reference one is not attributed. Used elements are matched to chains first
  in, first out per head (chains complete in the order taken); when the queue breaks, chains
  the walk returns untouched jump ahead, so then heads must be unique. Chain boundaries come
  from popping a third copy of the ring with a plain queue.

Excluded comparisons ("racy" examples, reported with ``event``): the zero-copy side returns
chains later than the copying side, so its used-ring writes happen later. A by-reference
byte is read by the peer after those writes, a copied one before, so a readable buffer (or
an indirect table) that lies in an area the device writes — the split used ring with
``avail_event`` (``USED_GPA``), the packed descriptor ring (used descriptors are written in
place) and device event struct — legitimately gives different bytes or chains; so does a
packed ring whose used position starts away from its avail position (used writes land on
descriptors not yet popped). For those only the error types, the final drain and
``deferred == 0`` are checked. Bytes are never compared against a queue that raised.

A broken queue may also differ, and then ``check_broken_apart`` checks what still holds.
When a round pops the breaking chain, the copying pump returns the chains it popped with it
that the full socket had no room for unsent (csrc/vring.c cannot rewind across a broken
chain and keeps at most one chain pending), while the zero-copy pump's pipe may already have
taken them, in this round or an earlier call; and the breaking chain (published by the walk
itself) and those unsent chains go back ahead of chains still waiting for the peer. So each
stream must be whole chains from the start of the chains' bytes, the used ring must hold the
same elements (split; packed: the same memory outside the descriptor ring) and the rest of
guest memory and the queue states must be equal.

C rings only (zero copy is a C-pump feature). Guest memory is ``make_memory``'s bytearrays:
private anonymous memory, on which vmsplice takes page references as well; the test is about
the pump's bookkeeping, not page sharing with a guest.

Spec: virtio 1.2 §2.7.8 (a buffer goes to the used ring once the device is done with it),
§2.7.5.2 and §2.7.13 (hostile chains: the device stops and returns the chain), §2.8.6 (packed
used descriptors), §5.3.6 (console transmitq: used length 0).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Sequence

import pytest
from hypothesis import event, given, target
from hypothesis import strategies as st

from ring import cpump
from ring.cring import Virtqueue
from ring.errors import DriverError, RingError
from ring.pump import PumpFlag
from tests.property.profiles import scaled
from tests.property.ringpair import (
    END, R1, RingPair, clone_memory, exc_key, make_memory, memory_bytes, queue_state)
from tests.property.rings import (
    AVAIL, AVAIL_GPA, DATA_GPA, DESC_GPA, NEXT, USED, USED_GPA, Desc, RawRing, raw_rings)
from tests.support.host_socket import host_socket_pair, read_available

MIN_BYTES, MIN_PIECE = cpump.ZERO_COPY_MIN_BYTES, cpump.ZERO_COPY_MIN_PIECE
DATA_END = R1[0] + R1[1]  # R0 from DATA_GPA and R1 are contiguous guest RAM
FINAL_ROUNDS = 2000  # final drain rounds, plus one per ROUND_BYTES of the chains' bytes
ROUND_BYTES = 512  # less than one round moves through the smallest SO_SNDBUF (4608)
STUCK_ROUNDS = 64  # final drain rounds in a row that move nothing: the pump is stuck
ALL = 1 << 30
USED_ELEM = struct.Struct("<II")
U16 = struct.Struct("<H")
LATER = PumpFlag.TX_DEFERRED | PumpFlag.TX_BLOCKED | PumpFlag.TX_MORE
# queue_state fields compared; signalled_used{,_valid} are left out: the zero-copy side
# publishes in other batches, so its notification decisions are made at other moments.
STATE_FIELDS = ("last_avail_idx", "used_idx", "avail_wrap", "used_wrap", "in_flight", "broken",
                "pending", "base")


Writes = Sequence[tuple[int, bytes]]  # guest writes: (gpa, bytes)


@dataclasses.dataclass(frozen=True)
class Staging:
    """How the guest posts the ring's chains in stages (tests/property/test_zero_copy_staged):
    ``hide`` makes none available; ``post(before, after)`` takes the guest from ``before`` to
    ``after`` of ``units`` posted; ``last`` is written once all are posted and drained (a
    hostile write that must meet both pumps in the same state); ``areas`` ([start, end)) is
    what those writes change."""

    units: int
    hide: Writes
    post: Callable[[int, int], Writes]
    last: Writes
    areas: tuple[tuple[int, int], ...]


def guest_write(mem, writes: Writes) -> None:
    """The guest's writes into ``mem`` (not dirty-logged: the device did not write them)."""
    for gpa, data in writes:
        pos = 0
        for view in mem.translate(gpa, len(data)):
            view[:] = data[pos: pos + len(view)]
            pos += len(view)


# -- the rings -----------------------------------------------------------------------------
@st.composite
def big_descs(draw, packed: bool, size: int, avail_flag: int) -> Desc:
    """A large readable buffer in the data area (often ≥ ZERO_COPY_MIN_BYTES by itself)."""
    addr = draw(st.integers(DATA_GPA, DATA_GPA + 0x4000).map(lambda a: a & ~0xF))
    room = DATA_END - addr
    length = draw(st.one_of(st.integers(MIN_BYTES, room), st.integers(MIN_PIECE, room),
                            st.just(room)))
    flags = draw(st.sampled_from([0, 0, 0, NEXT]))
    if packed:  # usually available under the ring's wrap counter
        flags |= draw(st.sampled_from([avail_flag, avail_flag, avail_flag, AVAIL ^ USED
                                       ^ avail_flag]))
    return Desc(addr, length, flags, draw(st.integers(0, size - 1)))


@st.composite
def zc_rings(draw) -> RawRing:
    """A hostile ring with large benign buffers mixed in (see the module docstring)."""
    raw = draw(raw_rings(packed=draw(st.sampled_from([False, False, True]))))
    base = raw.base
    if raw.packed and draw(st.integers(0, 3)) < 3:
        base = (base & 0xFFFF) | ((base & 0xFFFF) << 16)  # used position == avail position
    avail_flag = AVAIL if base & (1 << 15) else USED
    descs = list(raw.descs)
    for i in range(raw.size):
        if draw(st.integers(0, 9)) < 4:
            descs[i] = draw(big_descs(raw.packed, raw.size, avail_flag))
    return dataclasses.replace(raw, descs=tuple(descs), base=base)


steps = st.lists(st.one_of(st.just(("pump",)), st.tuples(
    st.just("read"), st.one_of(st.integers(0, 70000), st.just(ALL)))), max_size=12)


def fill_pattern(mem) -> None:
    """Recognisable bytes everywhere (before the ring is laid over them)."""
    for k, region in enumerate(mem.regions):
        n = len(region.view)
        region.view[:] = bytes((i * 13 + (i >> 9) + 31 * k + 5) & 0xFF for i in range(n))


def device_areas(raw: RawRing) -> list[tuple[int, int]]:
    """[start, end) of what the device writes in guest memory."""
    if raw.packed:
        return [(DESC_GPA, DESC_GPA + 16 * raw.size), (USED_GPA, USED_GPA + 4)]
    return [(USED_GPA, USED_GPA + 6 + 8 * raw.size)]


def racy(raw: RawRing, mem, guest_areas: Sequence[tuple[int, int]] = ()) -> str | None:
    """Why the two sides may legitimately differ (module docstring), or None.
    ``guest_areas``: what the guest writes while the pumps run (staged posting)."""
    if raw.packed and (raw.base & 0xFFFF) != (raw.base >> 16):
        return "packed used position away from avail position"
    for d in list(raw.descs) + [d for table in raw.tables for d in table]:
        if d.len_ == 0:
            continue
        try:
            mem.check(d.addr, d.len_)
        except (RingError, ValueError, OverflowError):
            continue  # never translates: the same error on both sides, whenever it is read
        if any(d.addr < hi and lo < d.addr + d.len_ for lo, hi in device_areas(raw)):
            return "a buffer or table lies in a device-written area"
        if any(d.addr < hi and lo < d.addr + d.len_ for lo, hi in guest_areas):
            return "a buffer or table lies in an area the guest writes while it runs"
    return None


# -- the reference chain sequence --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChainSpan:
    head: int
    start: int  # stream position of its first readable byte
    end: int  # just past its last one


@dataclasses.dataclass
class Reference:
    """What a plain queue pops: the chains in order, whether one breaks the queue and its
    head (None: none, or no head), and the chains' readable bytes one after another."""

    spans: list[ChainSpan]
    broken: bool
    broken_head: int | None
    stream: bytes


def chain_spans(raw: RawRing, mem, posts: Sequence[Writes] = ()) -> Reference | None:
    """The chains the pump will take (:class:`Reference`); None when configuring fails.
    ``posts``: the guest's later writes, each stage popped after the one before it."""
    memory = clone_memory(mem)
    vq = Virtqueue(memory, raw.size, packed=raw.packed, event_idx=raw.event_idx,
                   notify_on_empty=raw.notify_on_empty)
    try:
        vq.configure(DESC_GPA, AVAIL_GPA, USED_GPA)
        vq.set_base(raw.base)
    except Exception:  # noqa: BLE001 (the pair compared these outcomes already)
        return None
    spans, pos, broken, broken_head, stream = [], 0, False, None, bytearray()
    for writes in [()] + list(posts):
        for gpa, data in writes:
            memory.write(gpa, data)
        for _ in range(4 * raw.size + 4):
            try:
                chain = vq.pop()
            except DriverError as exc:
                broken, broken_head = True, exc.head
                break
            if chain is None:
                break
            spans.append(ChainSpan(chain.head, pos, pos + chain.readable_bytes))
            pos += chain.readable_bytes
            stream += b"".join(bytes(view) for view in chain.readable)
        if broken:
            break
    return Reference(spans, broken, broken_head, bytes(stream))


# -- one side ---------------------------------------------------------------------------------
class Side:
    """A queue, its pump (zero copy or not) and the socketpair's host peer."""

    def __init__(self, vq: Virtqueue, zero_copy: bool, sndbuf: int | None = None,
                 tx_budget: int | None = None) -> None:
        self.vq = vq
        self.dev, self.host = host_socket_pair(sndbuf)
        self.pump = cpump.StreamPump()
        if tx_budget is not None:
            self.pump.tx_budget = tx_budget
        self.pump.tx = vq
        self.pump.write_fd = self.dev.fileno()
        self.zero_copy = zero_copy
        if zero_copy:
            assert self.pump.enable_zero_copy()
            assert self.pump.zero_copy
        self.received = bytearray()
        self.errors: list[tuple] = []
        self.calls: list[tuple[int, int, int]] = []  # (bytes before, after, by reference)

    def pump_tx(self) -> int:
        p = self.pump
        before, ref_before = p.bytes_from_guest, p.bytes_by_reference
        try:
            flags = p.pump_tx()
        except RingError as exc:  # anything else fails the test
            key = exc_key(exc, self.vq.memory)
            if not self.errors or self.errors[-1] != key:
                self.errors.append(key)
            flags = 0
        self.calls.append((before, p.bytes_from_guest, p.bytes_by_reference - ref_before))
        assert not flags & (PumpFlag.TX_ERROR | PumpFlag.CALL_ERROR), PumpFlag(flags)
        return flags

    def read(self, limit: int) -> int:
        data = read_available(self.host, limit)
        self.received += data
        return len(data)

    def by_reference(self, span: ChainSpan) -> bool:
        """Some of the chain's bytes were taken by a call that sent all by reference."""
        return span.end > span.start and any(
            b1 > b0 and ref == b1 - b0 and b0 < span.end and span.start < b1
            for b0, b1, ref in self.calls)

    def close(self) -> None:
        self.pump.close()
        self.dev.close()
        self.host.close()


def split_used(side: Side, size: int, first: int, last: int) -> list[tuple[int, int]]:
    """Used elements [first, last) (16-bit indices) of a split used ring."""
    mem, out = side.vq.memory, []
    i = first
    while i != last:
        out.append(USED_ELEM.unpack(mem.read(USED_GPA + 4 + 8 * (i % size), 8)))
        i = (i + 1) & 0xFFFF
    return out


def drain(copy: Side, zc: Side, step: Callable[[str, int], int], stream_bytes: int) -> None:
    """The final drain: the peers read all, the pumps run, until neither pump returns
    TX_DEFERRED, TX_BLOCKED or TX_MORE. Bounded twice, so that a stuck or slow pump fails
    with a message instead of a timeout: rounds in a row that move nothing (no byte read, no
    chain used), and rounds in all (at least ROUND_BYTES, or the budget, move per round)."""
    limit = FINAL_ROUNDS + stream_bytes // min(ROUND_BYTES, copy.pump.tx_budget)
    idle, last = 0, None
    for rounds in range(1, limit + 1):
        step("read", ALL)
        flags = step("pump", 0)
        if not flags & LATER:
            return
        now = tuple((len(s.received), s.vq.used_idx, s.pump.deferred) for s in (copy, zc))
        idle = idle + 1 if now == last else 0
        last = now
        if idle >= STUCK_ROUNDS:
            break
    raise AssertionError(
        f"the pumps do not finish: {rounds} final rounds ({idle} idle), flags "
        f"{PumpFlag(flags)!r}; (received, used idx, deferred) copy/zc {last}, "
        f"{stream_bytes} bytes in the chains")


def assert_whole_chains(received: bytearray, ref: Reference) -> None:
    """What a broken queue's peer got: the first chains' bytes, whole (see the docstring)."""
    ends = {0} | {span.end for span in ref.spans}
    assert len(received) in ends and ref.stream.startswith(received), (
        "a broken queue's stream is not whole chains from the start", len(received))


def check_broken_apart(raw: RawRing, copy: Side, zc: Side, ref: Reference) -> None:
    """A broken queue on which the two sides legitimately differ (module docstring): each
    stream is whole chains from the start of the chains' bytes, and the used ring holds the
    same elements (split rings; packed: the same memory outside the descriptor ring)."""
    event("broken queue: the sides differ as allowed")
    for side in (copy, zc):
        assert_whole_chains(side.received, ref)
    (regions_a, log_a), (regions_b, log_b) = (memory_bytes(s.vq.memory) for s in (copy, zc))
    assert log_a == log_b, "the dirty logs differ"
    assert copy.vq.memory.regions[0].gpa == 0  # ring areas are offsets into region 0
    if raw.packed:
        lo, hi = DESC_GPA, DESC_GPA + 16 * raw.size
    else:
        lo, hi = USED_GPA + 4, USED_GPA + 4 + 8 * raw.size
        elems = [sorted(r[0][i: i + 8] for i in range(lo, hi, 8)) for r in (regions_a, regions_b)]
        assert elems[0] == elems[1], "the used rings hold different elements"

    def outside(regions: tuple) -> tuple:
        return (regions[0][:lo] + regions[0][hi:],) + regions[1:]

    assert outside(regions_a) == outside(regions_b), (
        "guest memory outside the used elements differs")


@dataclasses.dataclass
class Outcome:
    by_reference: int
    racy: str | None
    copy_bytes: int
    released_checked: int = 0  # by-reference chains whose release was checked


def post_writes(plan: list[tuple], staging: Staging | None) -> list[Writes]:
    """The guest's writes at each ``("post", n)`` step of ``plan`` (n more units), then the
    writes that post every unit before the final drain."""
    if staging is None:
        return []
    out, posted = [], 0
    for name, *args in plan:
        if name == "post":
            now = min(staging.units, posted + args[0])
            out.append(staging.post(posted, now))
            posted = now
    return out + [staging.post(posted, staging.units), staging.last]


def run(raw: RawRing, plan: list[tuple], *, sndbuf: int | None = None,
        tx_budget: int | None = None, staging: Staging | None = None) -> Outcome | None:
    """Both sides through ``plan`` and the final drain; asserts every property. With
    ``staging`` the ring starts with nothing available and ``("post", n)`` steps post more
    (all of it before the final drain); ``sndbuf`` is both device ends' SO_SNDBUF and
    ``tx_budget`` both pumps' bytes per call (None: the defaults)."""
    mem = make_memory(log=raw.log)
    fill_pattern(mem)
    raw.lay(mem)
    posts = post_writes(plan, staging)
    if staging is not None:
        guest_write(mem, staging.hide)
    why = racy(raw, mem, staging.areas if staging is not None else ())
    spans = chain_spans(raw, mem, posts)
    pair = RingPair({"copy": Virtqueue, "zc": Virtqueue}, mem)
    pair.build(raw.size, packed=raw.packed, event_idx=raw.event_idx,
               notify_on_empty=raw.notify_on_empty)
    configured = pair.call("configure", DESC_GPA, AVAIL_GPA, USED_GPA)[0] == "ok"
    based = pair.call("set_base", raw.base)[0] == "ok"
    if not (configured and based):
        event("configure or set_base refused")
        return None
    assert spans is not None
    spans_list, broken, broken_head = spans.spans, spans.broken, spans.broken_head
    heads = [s.head for s in spans_list]
    # Split rings only (a used element names its head). Chains that a broken walk returns
    # untouched jump ahead of waiting ones: then heads must be unique for a used element to
    # name one chain.
    precise = not raw.packed and why is None and (
        not broken or len(set(heads)) == len(heads) and broken_head not in heads)
    waiting: dict[int, list[ChainSpan]] = {}
    for span in spans_list:
        waiting.setdefault(span.head, []).append(span)
    checked: list[ChainSpan] = []
    copy, zc = (Side(pair.sides[0].vq, False, sndbuf, tx_budget),
                Side(pair.sides[1].vq, True, sndbuf, tx_budget))
    next_post = iter(posts)

    def post(writes: Writes) -> None:
        for gpa, data in writes:
            pair.guest_write(gpa, data)
    try:
        used_seen = zc.vq.used_idx

        def check_released(broke_now: bool = False) -> None:
            nonlocal used_seen
            now = zc.vq.used_idx
            elems = split_used(zc, raw.size, used_seen, now) if precise else []
            if broke_now and broken_head is not None and elems:
                # the breaking chain is published by the walk itself, before the call's batch
                assert elems[0] == (broken_head, 0), (elems, broken_head)
                elems = elems[1:]
            for head, used_len in elems:
                assert used_len == 0  # virtio 1.2 §5.3.6: transmitq buffers are only read
                span = waiting[head].pop(0)  # chains complete in the order they were taken
                if zc.by_reference(span):
                    checked.append(span)
                    assert span.end <= len(zc.received), (
                        "a chain sent by reference went back before its peer read it",
                        span, len(zc.received))
            used_seen = now

        def step(name: str, arg: int) -> int:
            flags, was_broken = 0, zc.vq.broken is not None
            for side in (copy, zc):
                if name == "pump":
                    flags |= side.pump_tx()
                else:
                    side.read(arg)
            check_released(not was_broken and zc.vq.broken is not None)
            return flags

        for name, *args in plan:
            if name == "post":
                post(next(next_post))
                continue
            step(name, args[0] if args else 0)
            n = min(len(copy.received), len(zc.received))
            if why is None:
                assert zc.received[:n] == copy.received[:n], "the streams differ mid-run"
        if staging is not None:
            post(next(next_post))
        drain(copy, zc, step, sum(s.end - s.start for s in spans_list))
        if staging is not None and staging.last:
            post(staging.last)
            drain(copy, zc, step, sum(s.end - s.start for s in spans_list))
        step("read", ALL)
        assert zc.pump.deferred == 0
        assert not zc.pump_tx() & PumpFlag.TX_DEFERRED
        assert copy.errors == zc.errors
        if why is not None:
            event(f"racy: {why}")
            return Outcome(zc.pump.bytes_by_reference, why, len(copy.received))
        a, b = queue_state(copy.vq), queue_state(zc.vq)
        assert {k: a[k] for k in STATE_FIELDS} == {k: b[k] for k in STATE_FIELDS}
        if copy.vq.broken is not None and (zc.received != copy.received or memory_bytes(
                copy.vq.memory) != memory_bytes(zc.vq.memory)):
            check_broken_apart(raw, copy, zc, spans)
            return Outcome(zc.pump.bytes_by_reference, None, len(copy.received), len(checked))
        assert len(zc.received) == len(copy.received)
        assert zc.received == copy.received
        if not copy.errors:
            if copy.vq.broken is None:
                assert copy.received == spans.stream, "the stream is not the chains' bytes"
            else:
                assert_whole_chains(copy.received, spans)
        assert memory_bytes(copy.vq.memory) == memory_bytes(zc.vq.memory), (
            "guest memory (used ring) differs")
        event("by reference" if zc.pump.bytes_by_reference else "copied only")
        event("release checked on a by-reference chain" if checked else "no release checked")
        target(float(zc.pump.bytes_by_reference), label="bytes by reference")
        return Outcome(zc.pump.bytes_by_reference, None, len(copy.received), len(checked))
    finally:
        copy.close()
        zc.close()


@scaled(1.0)
@given(zc_rings(), steps)
def test_zero_copy_and_copy_agree_on_hostile_rings(raw, plan):
    run(raw, plan)


def test_the_rings_often_reach_zero_copy():
    """The strategy is worth its name: a good share of examples send by reference."""
    outcomes: list[Outcome | None] = []

    @scaled(0.3)
    @given(zc_rings(), steps)
    def sample(raw, plan):
        outcomes.append(run(raw, plan))

    sample()
    ran = [o for o in outcomes if o is not None]
    assert len(ran) >= len(outcomes) // 3, (len(ran), len(outcomes))
    assert sum(o.by_reference > 0 for o in ran) * 5 >= len(ran), [o.by_reference for o in ran]


# -- deterministic: a large valid chain, then a broken one ---------------------------------
@pytest.mark.parametrize("second_next", [1, 9], ids=["loop", "next_out_of_range"])
def test_a_broken_chain_after_a_large_one_by_reference(second_next):
    """virtio 1.2 §2.7.5.2 / §2.7.8: the first chain (32 KiB) goes by reference and waits for
    the peer's read, the second (a descriptor whose ``next`` is itself, or out of range)
    breaks the queue and goes back at once with length 0; once the peer has read, the first
    comes back too, and the used ring and queue state equal the copy side's."""
    big = 0x8000
    descs = (Desc(DATA_GPA, big, 0, 0), Desc(DATA_GPA, 64, NEXT, second_next),
             Desc(DATA_GPA, 16, 0, 0), Desc(DATA_GPA, 16, 0, 0))
    raw = RawRing(False, 4, False, False, 0, descs, (), 2, (0, 1, 2, 3), 0, 0, 0, (0, 0), False)
    mem = make_memory()
    fill_pattern(mem)
    raw.lay(mem)
    pair = RingPair({"copy": Virtqueue, "zc": Virtqueue}, mem)
    pair.build(raw.size, packed=False, event_idx=False)
    assert pair.call("configure", DESC_GPA, AVAIL_GPA, USED_GPA)[0] == "ok"
    assert pair.call("set_base", 0)[0] == "ok"
    copy, zc = Side(pair.sides[0].vq, False), Side(pair.sides[1].vq, True)
    try:
        copy_flags, zc_flags = copy.pump_tx(), zc.pump_tx()
        assert copy_flags & PumpFlag.TX_BROKEN and zc_flags & PumpFlag.TX_BROKEN
        assert zc_flags & PumpFlag.TX_DEFERRED and not copy_flags & PumpFlag.TX_DEFERRED
        assert zc.pump.bytes_by_reference == big and zc.pump.deferred == 1
        assert copy.vq.broken is not None and zc.vq.broken == copy.vq.broken
        assert copy.vq.used_idx == 2 and zc.vq.used_idx == 1  # only the broken one so far
        assert split_used(zc, 4, 0, 1) == [(1, 0)]
        zc.read(big - 1)
        zc.pump_tx()
        assert zc.vq.used_idx == 1 and zc.pump.deferred == 1  # one byte still unread
        zc.read(ALL)
        copy.read(ALL)
        assert not zc.pump_tx() & PumpFlag.TX_DEFERRED
        assert zc.pump.deferred == 0 and zc.vq.used_idx == 2
        assert zc.received == copy.received == mem.read(DATA_GPA, big)
        assert split_used(zc, 4, 0, 2) == split_used(copy, 4, 0, 2) == [(1, 0), (0, 0)]
        a, b = queue_state(copy.vq), queue_state(zc.vq)
        assert {k: a[k] for k in STATE_FIELDS} == {k: b[k] for k in STATE_FIELDS}
        assert memory_bytes(copy.vq.memory) == memory_bytes(zc.vq.memory)
        assert copy.errors == zc.errors == []
    finally:
        copy.close()
        zc.close()
