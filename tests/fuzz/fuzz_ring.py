"""Fuzz harness for the virtqueue walk: bytes → a ring in guest memory → both ring
implementations in lock step.

``one_input(data)`` decodes ``data`` into a raw ring (geometry, base, descriptors, indirect
tables, avail ring or event structs — the shapes of ``tests.property.rings``) and a list of
operations, runs them on the pure-Python and the C ring (or the reference alone if the C ring
is not built) and fails on any divergence (outcome, guest memory, dirty log, queue state) or
on any exception other than the ring's typed errors (R5: guest input never escapes as
anything else).

Run under atheris (coverage-guided)::

    python3 tests/fuzz/fuzz_ring.py [-atheris_runs=100000] [corpus_dir]

or as a short pytest over a generated corpus: ``tests/fuzz/test_fuzz_corpus.py``.

Spec: virtio 1.2 §2.7.5.2, §2.7.13.2, §2.8 (what a hostile driver may write).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

from tests.property.ringpair import RingPair, available_impls, make_memory  # noqa: E402
from tests.property.rings import (AVAIL, AVAIL_GPA, BIG_TABLE_GPA, DATA_GPA,  # noqa: E402
                                  DESC_GPA, INDIRECT, NEXT, TABLE_GPAS, USED, USED_GPA,
                                  WRITE, Desc, RawRing)
from tests.property.ringpair import END, GAP, R0, R1  # noqa: E402

ADDRS = (DATA_GPA, DATA_GPA + 0x100, R1[0] - 8, GAP[0] - 8, GAP[0] + 8, GAP[1] - 4, END - 8,
         END, 0, DESC_GPA, AVAIL_GPA, USED_GPA, TABLE_GPAS[0], TABLE_GPAS[1], BIG_TABLE_GPA,
         (1 << 64) - 8)
LENS = (0, 1, 4, 16, 32, 48, 64, 0x100, 0x1000, 16 * 1024, 16 * 1025, 0x7FFFFFFF, 0xFFFFFFFF,
        0xFFFFFFF0, 8, 17)


class Reader:
    """Consumes fuzz bytes; past the end it yields zeros (so every input decodes)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.byte() | self.byte() << 8

    def pick(self, seq):
        return seq[self.byte() % len(seq)]

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


def decode_desc(r: Reader, packed: bool, size: int) -> Desc:
    b = r.byte()
    addr = (r.pick(ADDRS) + (r.byte() if b & 1 else 0)) & ((1 << 64) - 1)
    length = r.pick(LENS) if b & 2 else r.byte()
    flags = r.byte() & (NEXT | WRITE | INDIRECT | 0x8)
    if packed:
        flags |= (AVAIL, USED, 0, AVAIL | USED)[(b >> 2) & 3]
    other = r.byte() % (size + 3)
    return Desc(addr, length, flags, other)


def decode(data: bytes) -> tuple[RawRing, list]:
    """A RawRing and an operation list from fuzz bytes."""
    r = Reader(data)
    head = r.byte()
    packed = bool(head & 1)
    size = (1, 2, 4, 8)[(head >> 1) & 3] if not packed else (1, 2, 3, 4, 5, 8)[(head >> 1) % 6]
    event_idx, notify_on_empty, log = bool(head & 0x10), bool(head & 0x20), bool(head & 0x40)
    ntables = r.byte() % 3
    tables = tuple(tuple(decode_desc(r, packed, 4) for _ in range(1 + r.byte() % 4))
                   for _ in range(ntables))
    descs = tuple(decode_desc(r, packed, size) for _ in range(size))
    if packed:
        pos, used_pos = r.byte() % size, r.byte() % size
        w = r.byte()
        base = pos | (w & 1) << 15 | used_pos << 16 | (w >> 1 & 1) << 31
        raw = RawRing(True, size, event_idx, False, base, descs, tables, 0, (), 0, 0, 0,
                      (r.u16(), r.byte() % 4), log)
    else:
        base = r.u16()
        pending = r.byte()
        pending = pending % (size + 1) if pending < 0xF0 else r.u16()
        heads = tuple(r.byte() % (size + 2) for _ in range(size))
        raw = RawRing(False, size, event_idx, notify_on_empty, base, descs, tables,
                      (base + pending) & 0xFFFF, heads, r.byte() & 1, r.u16(), base, (0, 0),
                      log)
    ops = []
    while not r.done and len(ops) < 16:
        kind = r.byte() % 8
        if kind == 0:
            ops.append(("pop",))
        elif kind == 1:
            ops.append(("pop_batch", r.byte() % (size + 3)))
        elif kind == 2:
            ops.append(("push_some", r.byte() % 4, r.u16()))
        elif kind == 3:
            ops.append(("should_notify",))
        elif kind == 4:
            gpa = (AVAIL_GPA + r.byte() % (6 + 2 * size) if not packed
                   else DESC_GPA + r.byte() % (16 * size))
            ops.append(("guest_write", gpa, bytes([r.byte(), r.byte()])))
        elif kind == 5:
            ops.append(("push_raw", r.byte() % (size + 2), r.u16(), 1 + r.byte() % 2))
        elif kind == 6:
            ops.append(("set_base_same",))
        else:
            ops.append(("remove_region", (R0, R1)[r.byte() & 1]))
    return raw, ops


def one_input(data: bytes) -> None:
    """The fuzz target: decode, run in lock step, fail on divergence or untyped errors."""
    from tests.property.rings import start_pair
    from tests.property.test_ring_differential import run_ops
    raw, ops = decode(data)
    pair, _started = start_pair(available_impls(), raw)
    run_ops(pair, ops, raw.size)


def main(argv: list[str]) -> None:
    import atheris  # only needed for coverage-guided runs

    import logging

    logging.disable(logging.WARNING)  # hostile rings log a warning per input
    # The walk's modules are imported by the helpers above; instrument_all() would also
    # instrument hypothesis & co (minutes of start-up), so instrument the ring's functions.
    import ring._chain
    import ring.packed
    import ring.pyring
    import ring.split
    for module in (ring._chain, ring.packed, ring.split, ring.pyring):
        for name, obj in vars(module).items():
            if callable(obj) and getattr(obj, "__module__", None) == module.__name__:
                if isinstance(obj, type):
                    for attr, fn in vars(obj).items():
                        if callable(fn) and hasattr(fn, "__code__"):
                            setattr(obj, attr, atheris.instrument_func(fn))
                elif hasattr(obj, "__code__"):
                    setattr(module, name, atheris.instrument_func(obj))
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


__all__ = ["decode", "one_input", "RingPair", "make_memory"]

if __name__ == "__main__":
    main(sys.argv)
