"""Zero-copy transmit (ring.cpump, csrc/zerocopy.c) never lets the guest reuse a buffer the
host peer has not read yet.

A guest posts chains (split or packed ring; some under, most over ZERO_COPY_MIN_BYTES; one to four pieces of
random sizes at 16-byte, not page, alignment) on a transmitq in shared memfd RAM; the C
pump with zero copy enabled sends them to a socketpair whose SO_SNDBUF is sometimes tiny
(the socket fills, the pipe keeps leftovers); a host peer reads random amounts (partial
messages included). The moment the guest takes a chain back from the used ring it
overwrites the chain's buffers with their complement, as a guest reusing them would. The
properties:

* the peer reads exactly the concatenation of the chains' original contents in posting
  order (a chain released before the peer read it would show up complemented);
* a chain fully taken by a pump call that sent all its bytes by page reference is back in
  the guest's hands only once the peer has read up to its end;
* a first round that zero copy must take (at most half a queue of chains,
  ZERO_COPY_MAX_WAITING_PERCENT; only pieces of ZERO_COPY_MIN_PIECE or more; at least
  ZERO_COPY_MIN_BYTES) goes by reference, so the test cannot pass on the copy path alone;
* at the end (the peer reads all, the pump runs again) every chain is used,
  ``deferred == 0`` and TX_DEFERRED is no longer returned;
* the same steps with zero copy off deliver the same bytes.

C rings only: zero copy is a C-pump feature (the Python pump always copies, see
tests/unit/test_zero_copy_pump.py), so the queue is ``ring.cring.Virtqueue`` whatever
VMCHANNEL_RING says.

Spec: virtio 1.2 §2.7.8 (a buffer is used once the device is done with it), §2.7.13 /
§2.7.14 (the driver supplies buffers and takes used ones back), §5.3.6 (console transmitq).
"""

from __future__ import annotations

import dataclasses
import random

from hypothesis import example, given
from hypothesis import strategies as st

from ring import cpump
from ring.pump import PumpFlag
from tests.property.profiles import scaled
from tests.unit.test_zero_copy_pump import ZcPort

QUEUE_SIZE = 16
MIN_BYTES, MIN_PIECE = cpump.ZERO_COPY_MIN_BYTES, cpump.ZERO_COPY_MIN_PIECE
MAX_WAITING = QUEUE_SIZE * cpump.ZERO_COPY_MAX_WAITING_PERCENT // 100
FINAL_ROUNDS = 400
COMPLEMENT = bytes(255 - b for b in range(256))  # every byte changes

small_chain = st.lists(st.integers(1, 4000), min_size=1, max_size=3)
large_chain = st.lists(st.integers(MIN_PIECE, 40000), min_size=1, max_size=4).map(
    lambda sizes: sizes if sum(sizes) >= MIN_BYTES else sizes + [MIN_BYTES])
step = st.one_of(
    st.tuples(st.just("post"), st.integers(1, 4)),
    st.just(("pump",)),
    st.tuples(st.just("read"), st.integers(1, 150_000)),
    st.just(("reclaim",)),
)


@dataclasses.dataclass(frozen=True)
class Plan:
    chains: tuple[tuple[int, ...], ...]  # piece sizes, in posting order
    sndbuf: int | None
    steps: tuple[tuple, ...]
    packed: bool = False


plans = st.builds(
    Plan,
    chains=st.lists(st.one_of(large_chain, large_chain, large_chain, small_chain).map(tuple),
                    min_size=1, max_size=24).map(tuple),
    sndbuf=st.sampled_from([None, None, 4096, 32768]),
    steps=st.lists(step, max_size=30).map(tuple),
    packed=st.booleans(),
)


def contents(index: int, sizes: tuple[int, ...]) -> list[bytes]:
    rng = random.Random(index)
    return [rng.randbytes(n) for n in sizes]


@dataclasses.dataclass
class _Chain:
    pieces: list[bytes]
    end: int  # stream position just past its last byte
    gpas: list[int]  # where each piece is in guest memory
    by_reference: bool = False  # fully taken by a pump call that sent all by reference


class Run:
    """One run of a plan: the guest side, the pump, the peer and the checks made on the way."""

    def __init__(self, plan: Plan, zero_copy: bool) -> None:
        self.port = ZcPort(sndbuf=plan.sndbuf, size=QUEUE_SIZE, zero_copy=zero_copy,
                           packed=plan.packed)
        self.zero_copy = zero_copy
        self.todo = [contents(i, sizes) for i, sizes in enumerate(plan.chains)]
        self.posted: list[_Chain] = []  # in posting order (the stream's order)
        self.live: dict[int, _Chain] = {}  # head -> chain the guest has not got back
        self.stream = 0  # bytes posted
        self.received = bytearray()
        self.pump_calls = 0
        self.by_reference = 0  # the pump's bytes_by_reference at the end

    # -- the guest ------------------------------------------------------------------------
    def post(self, count: int) -> int:
        posted = 0
        while posted < count and self.todo and self._add(self.todo[0]):
            self.todo.pop(0)
            posted += 1
        if posted:
            self.port.txd.kick_prepare()
        return posted

    def _add(self, pieces: list[bytes]) -> bool:
        try:
            head = self.port.post(*pieces)
        except MemoryError:  # no free descriptors (or room): the chain waits its turn
            return False
        self.stream += sum(map(len, pieces))
        # the driver model's record of where it put the pieces (split or packed alike)
        chain = _Chain(pieces, self.stream, self.port.txd._outstanding[head].buffers)
        self.posted.append(chain)
        self.live[head] = chain
        return True

    def reclaim(self) -> int:
        used = self.port.txd.get_bufs()
        for u in used:
            chain = self.live.pop(u.id)
            if chain.by_reference:
                assert chain.end <= len(self.received), (
                    "a chain sent by reference came back before the peer read it",
                    chain.end, len(self.received))
            for gpa, data in zip(chain.gpas, chain.pieces):
                self.port.txd.write(gpa, data.translate(COMPLEMENT))  # reuse: garbage
        return len(used)

    # -- the device and the peer ----------------------------------------------------------
    def pump(self) -> int:
        pump = self.port.pump
        before, ref_before = pump.bytes_from_guest, pump.bytes_by_reference
        waiting = [c for c in self.posted if before < c.end]
        flags = pump.pump_tx()
        self.pump_calls += 1
        moved = pump.bytes_from_guest - before
        by_reference = moved > 0 and pump.bytes_by_reference - ref_before == moved
        if (self.zero_copy and self.pump_calls == 1 and len(waiting) <= MAX_WAITING
                and all(len(p) >= MIN_PIECE for c in waiting for p in c.pieces)
                and sum(len(p) for c in waiting for p in c.pieces) >= MIN_BYTES):
            # the first round: nothing pending or waiting, an empty pipe, only large pieces,
            # few enough chains (ZERO_COPY_MAX_WAITING_PERCENT)
            assert pump.bytes_by_reference > 0, "a round zero copy must take was copied"
        for chain in waiting:
            if chain.end <= pump.bytes_from_guest:
                chain.by_reference = by_reference
        assert not flags & ~(PumpFlag.TX_BLOCKED | PumpFlag.TX_DEFERRED), PumpFlag(flags)
        return flags

    def read(self, limit: int) -> int:
        data = self.port.host_read(limit)
        self.received += data
        return len(data)

    def finish(self) -> None:
        """The peer reads all, the pump runs, the guest reclaims and posts the rest, until
        every chain is back (no kick or post is needed for the pump to finish what it took:
        tests/unit/test_zero_copy_leftovers.py)."""
        for _ in range(FINAL_ROUNDS):
            self.read(1 << 30)
            self.reclaim()
            self.post(QUEUE_SIZE)
            self.pump()
            if not self.todo and not self.live:
                break
        assert not self.todo and not self.live, (len(self.todo), len(self.live))
        assert not self.pump() & PumpFlag.TX_DEFERRED
        assert self.port.pump.deferred == 0
        assert self.read(1 << 30) == 0

    def expected(self) -> bytes:
        return b"".join(b"".join(c.pieces) for c in self.posted)


def run(plan: Plan, zero_copy: bool) -> Run:
    r = Run(plan, zero_copy)
    try:
        actions = {"post": r.post, "pump": r.pump, "read": r.read, "reclaim": r.reclaim}
        for name, *args in plan.steps:
            actions[name](*args)
            assert r.received == r.expected()[:len(r.received)], "bytes differ mid-run"
        r.finish()
        assert bytes(r.received) == r.expected()
        if zero_copy:
            assert r.port.enabled
        r.by_reference = r.port.pump.bytes_by_reference
        return r
    finally:
        r.port.close()


@scaled(1.5)
@given(plans)
@example(Plan(chains=((40000, 2048), (20000,), (100,), (16384,)) * 3, sndbuf=4096,
              steps=(("post", 4), ("pump",), ("read", 5000), ("pump",), ("reclaim",),
                     ("post", 4), ("pump",), ("read", 70000), ("pump",), ("reclaim",),
                     ("post", 4), ("pump",), ("reclaim",))))
def test_the_peer_reads_every_original_byte_though_the_guest_reuses_used_buffers(plan):
    zc = run(plan, zero_copy=True)
    copied = run(plan, zero_copy=False)
    assert zc.received == copied.received


@scaled(0.5)
@given(st.lists(large_chain.map(tuple), min_size=1, max_size=MAX_WAITING).map(tuple),
       st.sampled_from([None, 4096]), st.booleans())
def test_large_chains_alone_go_by_reference(chains, sndbuf, packed):
    """Posted all before the first pump call, at most half a queue of chains of large pieces
    only: zero copy."""
    plan = Plan(chains, sndbuf, (("post", MAX_WAITING), ("pump",)), packed)
    r = run(plan, zero_copy=True)
    assert r.by_reference > 0
