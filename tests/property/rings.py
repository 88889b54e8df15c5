"""Hypothesis strategies for raw rings, benign and hostile, and a way to lay them into
guest memory (shared by the differential tests and the fuzz harness).

A :class:`RawRing` is plain data: ring geometry, the queue's starting base, every descriptor
of the ring (split table or packed ring) verbatim, up to two indirect tables, the avail ring
(split) or event suppression structs. Fields are drawn from "interesting" value sets — buffer
addresses inside a region, straddling the R0/R1 boundary, running into the gap, past the end
of RAM, near 2^64; lengths 0, small, 16-multiples, ≥ 2^31; flag combinations including
INDIRECT|NEXT and, for packed rings, every AVAIL/USED wrap combination; ``next``/ids at and
beyond the size — so hostile rings are common, not rare.

Spec: virtio 1.2 §2.7.5 (split descriptor table), §2.7.6 (avail ring), §2.8.1–§2.8.7
(packed descriptors, wrap counters, indirect), §2.7.10 / §2.8.10 (event suppression).
"""

from __future__ import annotations

import dataclasses
import struct

from hypothesis import strategies as st

from ring.memory import GuestMemory
from ring.wire import DescFlag
from tests.property.ringpair import END, GAP, R1, RingPair, make_memory

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
AVAIL, USED = int(DescFlag.AVAIL), int(DescFlag.USED)
DESC = struct.Struct("<QIHH")  # split: addr len flags next; packed: addr len id flags
U16 = struct.Struct("<H")
EVENT = struct.Struct("<HH")

# Fixed ring-area addresses in region 0.
DESC_GPA = 0x1000  # descriptor table / ring (≤ 32 entries: 512 bytes)
AVAIL_GPA = 0x0800  # split avail ring / packed driver event struct
USED_GPA = 0x0C00  # split used ring / packed device event struct
TABLE_GPAS = (0x2000, 0x2400)  # indirect tables (≤ 16 entries each)
BIG_TABLE_GPA = 0x4000  # a long indirect table: 1025+ one-byte entries (TOO_MANY_SEGMENTS)
BIG_TABLE_ENTRIES = 1040
DATA_GPA = 0x9000  # data area in region 0 (benign buffers)

ADDRESSES = st.one_of(
    st.integers(DATA_GPA, DATA_GPA + 0x2000),  # inside region 0
    st.integers(R1[0] - 64, R1[0] - 1),  # straddles R0 → R1 (adjacent: valid, 2 views)
    st.integers(GAP[0] - 64, GAP[0] - 1),  # runs into the gap
    st.integers(GAP[0], GAP[1] - 1),  # inside the gap
    st.integers(GAP[1] - 8, GAP[1] + 64),  # starts in the gap / at the start of R2
    st.integers(END - 64, END + 64),  # runs past the end of RAM
    st.sampled_from([0, DESC_GPA, AVAIL_GPA, USED_GPA, (1 << 64) - 1, (1 << 64) - 16,
                     1 << 63]),
)
LENGTHS = st.one_of(
    st.integers(0, 48),
    st.sampled_from([0, 0, 1, 16, 64, 0x100, 0x1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                     0xFFFFFFF0]),
)


def _table_lengths(entries: int) -> st.SearchStrategy[int]:
    """Lengths for an INDIRECT descriptor: the right one, and broken ones."""
    return st.one_of(
        st.just(16 * entries), st.just(16 * entries), st.integers(1, entries).map(lambda n: 16 * n),
        st.sampled_from([0, 8, 16 * entries + 1, 17, 16 * 65537, 0xFFFFFFF0, 16 * 65536]),
    )


@dataclasses.dataclass(frozen=True)
class Desc:
    """One raw descriptor. Split: (addr, len, flags, next). Packed: (addr, len, id, flags)
    — ``other`` is ``next`` for split and ``id`` for packed."""

    addr: int
    len_: int
    flags: int
    other: int

    def pack(self, packed: bool) -> bytes:
        if packed:
            return DESC.pack(self.addr, self.len_, self.other, self.flags)
        return DESC.pack(self.addr, self.len_, self.flags, self.other)


@dataclasses.dataclass(frozen=True)
class RawRing:
    """Everything the guest wrote before the device looks (see module docstring)."""

    packed: bool
    size: int
    event_idx: bool
    notify_on_empty: bool
    base: int  # value for set_base (split: last_avail_idx; packed: the 32-bit encoding)
    descs: tuple  # ring descriptors (Desc), len == size
    tables: tuple  # up to two indirect tables: tuple of Desc each
    avail_idx: int  # split: avail->idx
    avail_ring: tuple  # split: heads
    avail_flags: int  # split: avail->flags
    used_event: int  # split: used_event
    used_idx: int  # split: used->idx the device loads at configure
    driver_event: tuple  # packed: (off_wrap, flags)
    log: bool  # a dirty log is attached

    def lay(self, mem: GuestMemory) -> None:
        """Write the ring into guest memory (no dirty logging: the guest wrote it)."""
        w = _writer(mem)
        for i, d in enumerate(self.descs):
            w(DESC_GPA + 16 * i, d.pack(self.packed))
        for gpa, table in zip(TABLE_GPAS, self.tables):
            w(gpa, b"".join(d.pack(self.packed) for d in table))
        big = []
        for i in range(BIG_TABLE_ENTRIES):
            big.append(Desc(DATA_GPA + i, 1, NEXT if not self.packed else 0,
                            i + 1 if not self.packed else 0).pack(self.packed))
        w(BIG_TABLE_GPA, b"".join(big))
        if self.packed:
            w(AVAIL_GPA, EVENT.pack(*self.driver_event))
            w(USED_GPA, bytes(4))
        else:
            w(AVAIL_GPA, U16.pack(self.avail_flags) + U16.pack(self.avail_idx)
              + b"".join(U16.pack(h) for h in self.avail_ring) + U16.pack(self.used_event))
            w(USED_GPA, U16.pack(0) + U16.pack(self.used_idx) + bytes(8 * self.size + 2))
        # recognisable data bytes, so readable contents are compared meaningfully
        w(DATA_GPA, bytes((i * 7 + 3) & 0xFF for i in range(0x3000)))


def _writer(mem: GuestMemory):
    def write(gpa: int, data: bytes) -> None:
        pos = 0
        for view in mem.translate(gpa, len(data)):
            view[:] = data[pos: pos + len(view)]
            pos += len(view)
    return write


def _flags(packed: bool) -> st.SearchStrategy[int]:
    base = st.sets(st.sampled_from([NEXT, WRITE, INDIRECT]), max_size=3).map(sum)
    extra = st.sampled_from([0, 0, 0, 0x8, 0x40, 0x100])  # undefined bits: ignored
    if packed:
        wrap_bits = st.sampled_from([AVAIL, AVAIL, USED, USED, 0, AVAIL | USED])
        return st.tuples(base, extra, wrap_bits).map(sum)
    return st.tuples(base, extra).map(sum)


def _benign_bias(packed: bool, size: int, data: st.DataObject | None = None):
    """Descriptors that usually make a valid chain: short buffers in region 0."""
    flags = st.sampled_from([0, NEXT, WRITE, WRITE | NEXT])
    if packed:
        flags = st.tuples(flags, st.sampled_from([AVAIL, AVAIL, USED])).map(sum)
    return st.builds(Desc, st.integers(DATA_GPA, DATA_GPA + 0x1000), st.integers(0, 40), flags,
                     st.integers(0, size - 1))


@st.composite
def descs(draw, packed: bool, size: int, table_entries: tuple = ()) -> Desc:
    """One descriptor: benign-biased or fully hostile."""
    if draw(st.integers(0, 9)) < 5:
        return draw(_benign_bias(packed, size))
    flags = draw(_flags(packed))
    if flags & INDIRECT and draw(st.booleans()):
        which = draw(st.integers(0, len(table_entries)))  # == len: the big table
        if which < len(table_entries):
            addr = TABLE_GPAS[which]
            length = draw(_table_lengths(max(1, table_entries[which])))
        else:
            addr = BIG_TABLE_GPA
            length = 16 * draw(st.sampled_from([1024, 1025, 1030]))
    else:
        addr, length = draw(ADDRESSES), draw(LENGTHS)
    other = draw(st.one_of(st.integers(0, size - 1), st.integers(size, size + 2),
                           st.sampled_from([0xFFFF, 0x8000])))
    return Desc(addr, length, flags, other)


@st.composite
def raw_rings(draw, packed: bool | None = None, sizes=(1, 2, 4, 8, 16)) -> RawRing:
    """A whole ring as the guest left it; hostile details are frequent."""
    if packed is None:
        packed = draw(st.booleans())
    size = draw(st.sampled_from(sizes if not packed else sizes + (3, 5)))
    table_entries = tuple(draw(st.lists(st.integers(1, 6), max_size=2)))
    tables = tuple(
        tuple(draw(st.lists(descs(packed, n), min_size=n, max_size=n)))
        for n in table_entries)
    ring = tuple(draw(st.lists(descs(packed, size, table_entries), min_size=size,
                               max_size=size)))
    event_idx = draw(st.booleans())
    if packed:
        pos = draw(st.integers(0, size - 1))
        used_pos = draw(st.integers(0, size - 1))
        base = (pos | (draw(st.booleans()) << 15) | (used_pos << 16)
                | (draw(st.booleans()) << 31))
        flags = draw(st.sampled_from([0, 1, 2, 2, 3]))
        off_wrap = draw(st.integers(0, 0xFFFF))
        return RawRing(True, size, event_idx, False, base, ring, tables, 0, (), 0, 0, 0,
                       (off_wrap, flags), draw(st.booleans()))
    base = draw(st.one_of(st.integers(0, 4), st.integers(0xFFF0, 0xFFFF),
                          st.integers(0, 0xFFFF)))
    pending = draw(st.one_of(st.integers(0, size), st.integers(0, size),
                             st.integers(size + 1, 0xFFFF)))  # > size: AVAIL_IDX
    heads = tuple(draw(st.lists(st.one_of(st.integers(0, size - 1), st.integers(0, size - 1),
                                          st.integers(size, 0xFFFF)),
                                min_size=size, max_size=size)))
    used_idx = draw(st.one_of(st.just(base), st.integers(0, 0xFFFF)))
    used_event = draw(st.one_of(st.just(base), st.integers(0, 0xFFFF)))
    return RawRing(False, size, event_idx, draw(st.booleans()), base, ring, tables,
                   (base + pending) & 0xFFFF, heads, draw(st.sampled_from([0, 0, 1])),
                   used_event, used_idx, (0, 0), draw(st.booleans()))


# -- operations applied to a pair of queues ----------------------------------------------------
def ring_area_writes(raw_packed: bool, size: int):
    """Guest writes between device operations: a TOCTOU-style change of a ring field."""
    if raw_packed:
        targets = st.one_of(
            st.tuples(st.just(DESC_GPA + 14), st.integers(0, size - 1).map(lambda i: 16 * i))
            .map(sum),  # a descriptor's flags
            st.just(AVAIL_GPA), st.just(AVAIL_GPA + 2))
    else:
        targets = st.one_of(st.just(AVAIL_GPA + 2), st.just(AVAIL_GPA),
                            st.just(AVAIL_GPA + 4 + 2 * size),
                            st.integers(0, size - 1).map(lambda i: AVAIL_GPA + 4 + 2 * i))
    return st.tuples(st.just("guest_write"), targets,
                     st.integers(0, 0xFFFF).map(U16.pack))


def operations(raw_packed: bool, size: int):
    """A list of device (and occasional guest) operations."""
    op = st.one_of(
        st.just(("pop",)),
        st.tuples(st.just("pop_batch"), st.integers(0, size + 2)),
        st.tuples(st.just("push_some"), st.integers(0, 3), st.integers(0, 1 << 16)),
        st.just(("should_notify",)),
        ring_area_writes(raw_packed, size),
        st.tuples(st.just("push_raw"), st.integers(0, size + 1), st.integers(0, 0x1_0000_0001),
                  st.integers(0, 2)),
        st.just(("set_base_same",)),
        st.tuples(st.just("unpop"), st.sampled_from([0, 0, 0, 1, 2])),
    )
    return st.lists(op, min_size=1, max_size=12)


def start_pair(impls: dict[str, type], raw: RawRing) -> tuple[RingPair, bool]:
    """Both queue implementations over clones of ``raw`` laid into fresh guest memory,
    configured at the ring's addresses and set to ``raw.base`` (both calls always made and
    compared); True when both succeeded. Hostile rings may fail either call."""
    mem = make_memory(log=raw.log)
    raw.lay(mem)
    pair = RingPair(impls, mem)
    pair.build(raw.size, packed=raw.packed, event_idx=raw.event_idx,
               notify_on_empty=raw.notify_on_empty)
    configured = pair.call("configure", DESC_GPA, AVAIL_GPA, USED_GPA)[0] == "ok"
    based = pair.call("set_base", raw.base)[0] == "ok"
    return pair, configured and based
