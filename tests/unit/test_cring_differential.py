"""ring.cring against the reference ring.pyring: the same scenario on both, compared byte for
byte — chains, errors, guest memory, dirty log, queue state and notify decisions — hostile
rings included.

Spec: virtio 1.2 §2.7 (split), §2.8 (packed); docs/internals.md (the contract both follow).
"""

from __future__ import annotations

import importlib
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ring import pyring
from ring.errors import ChainError, DriverError
from ring.memory import DirtyLog, GuestMemory, Region
from ring.types import Chain

ROOT = Path(__file__).resolve().parents[2]
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
NEXT, WRITE, INDIRECT, AVAIL, USED = 1, 2, 4, 1 << 7, 1 << 15
D, A, U = 0x1000, 0x3000, 0x5000  # ring areas (desc, driver, device)
DATA = 0x10000


@pytest.fixture(scope="session")
def cring():
    """ring.cring, building the C module in place first when it is missing."""
    try:
        return importlib.import_module("ring.cring")
    except ImportError:
        subprocess.run([sys.executable, str(ROOT / "ring" / "_vring_build.py")], check=True)
        importlib.invalidate_caches()
        return importlib.import_module("ring.cring")


def norm(value):
    """A comparable form of whatever a queue operation returned or raised."""
    if isinstance(value, Chain):
        return ("chain", value.head, value.ring_slots, [bytes(v) for v in value.readable],
                [bytes(v) for v in value.writable], value.readable_bytes,
                value.writable_bytes, value.readable_gpas, value.writable_gpas)
    if isinstance(value, list):
        return [norm(v) for v in value]
    if isinstance(value, DriverError):
        return ("DriverError", value.code, value.queue, value.head, norm(value.chains))
    if isinstance(value, BaseException):
        return (type(value).__name__, str(value))
    return value


class Twin:
    """Identical guest memories, one queue per implementation; every step runs on both and
    must give equal results, memory, dirty log and state."""

    def __init__(self, cring, size, *, packed=False, event_idx=False, notify_on_empty=False,
                 regions=((0, 0x40000),), areas=(D, A, U), log=True):
        self.size, self.packed = size, packed
        self.mems = [GuestMemory([Region(g, n, 0x7F00_0000_0000 + g, 0, bytearray(n))
                                  for g, n in regions]) for _ in range(2)]
        if log:
            for mem in self.mems:
                mem.log = DirtyLog(bytearray(64))
        self.vqs = [cls(mem, size, packed=packed, event_idx=event_idx,
                        notify_on_empty=notify_on_empty, index=3)
                    for cls, mem in zip((pyring.Virtqueue, cring.Virtqueue), self.mems)]
        self.areas = areas
        self.step(lambda vq: vq.configure(*areas))

    # guest side (no dirty logging: the guest is not the device)
    def write(self, gpa, data):
        for mem in self.mems:
            log, mem.log = mem.log, None
            mem.write(gpa, data)
            mem.log = log

    def desc(self, i, addr, length, flags, nxt_or_id=0, table=D):
        self.write(table + 16 * i, DESC.pack(addr, length, flags, nxt_or_id))

    def avail(self, slot, head):
        self.write(A + 4 + 2 * slot, U16.pack(head))

    def avail_idx(self, value):
        self.write(A + 2, U16.pack(value & 0xFFFF))

    def step(self, op):
        results = []
        for vq in self.vqs:
            try:
                results.append(norm(op(vq)))
            except Exception as exc:  # noqa: BLE001 - compared, not swallowed
                results.append(norm(exc))
        assert results[0] == results[1]
        self.check()
        return results[0]

    def check(self):
        py, c = self.vqs
        assert py.state() == c.state()
        assert [bytes(r.view) for r in self.mems[0].regions] == \
            [bytes(r.view) for r in self.mems[1].regions]
        logs = [m.log.dirty_pages() if m.log else None for m in self.mems]
        assert logs[0] == logs[1]

    def used(self, slot):
        return struct.unpack_from("<II", self.mems[0].read(U + 4 + 8 * slot, 8))


def split_twin(cring, size=8, **kw):
    return Twin(cring, size, **kw)


def test_cring_exports_abi_and_mirrors_chain_errors(cring):
    assert cring.lib.VR_ABI_VERSION == cring.ABI_VERSION
    for code in ChainError:
        assert getattr(cring.lib, f"VR_E_{code.name}") == -int(code)


def test_split_simple_chains_and_used_bytes(cring):
    t = split_twin(cring)
    t.write(DATA, b"hello world")
    t.desc(0, DATA, 5, NEXT, 1)
    t.desc(1, DATA + 5, 6, NEXT, 2)
    t.desc(2, DATA + 0x100, 16, WRITE)
    t.avail(0, 0)
    t.avail_idx(1)
    chain = t.step(lambda vq: vq.pop())
    assert chain[3] == [b"hello", b" world"] and chain[6] == 16
    assert t.step(lambda vq: vq.pop()) is None
    t.step(lambda vq: vq.push(0, 3))
    assert t.used(0) == (0, 3)
    assert t.step(lambda vq: vq.should_notify()) is True


@pytest.mark.parametrize("name, build, code", [
    ("loop", lambda t: (t.desc(0, DATA, 1, NEXT, 1), t.desc(1, DATA, 1, NEXT, 0)), "LOOP"),
    ("next_range", lambda t: t.desc(0, DATA, 4, NEXT, 8), "NEXT_RANGE"),
    ("readable_after_writable",
     lambda t: (t.desc(0, DATA, 4, WRITE | NEXT, 1), t.desc(1, DATA, 4, 0)), "ORDER"),
    ("zero_len_writable_then_readable",
     lambda t: (t.desc(0, DATA, 0, WRITE | NEXT, 1), t.desc(1, DATA, 4, 0)), "ORDER"),
    ("over_4gib", lambda t: (t.desc(0, DATA, 0x20, NEXT, 1), t.desc(1, DATA, 0xFFFFFFFF, 0)),
     "TOTAL_LEN"),
    ("outside_memory", lambda t: t.desc(0, 0x100000, 4, 0), "ADDR"),
    ("straddles_end", lambda t: t.desc(0, 0x40000 - 2, 4, 0), "ADDR"),
    ("u64_overflow", lambda t: t.desc(0, (1 << 64) - 8, 16, 0), "ADDR"),
    ("indirect_nested", lambda t: (t.desc(0, 0x8000, 32, INDIRECT),
                                   t.desc(0, 0x9000, 16, INDIRECT, table=0x8000)),
     "INDIRECT_NESTED"),
    ("indirect_next", lambda t: t.desc(0, 0x8000, 16, INDIRECT | NEXT, 1), "INDIRECT_NEXT"),
    ("indirect_zero", lambda t: t.desc(0, 0x8000, 0, INDIRECT), "INDIRECT_LEN"),
    ("indirect_misaligned", lambda t: t.desc(0, 0x8000, 24, INDIRECT), "INDIRECT_LEN"),
    ("indirect_huge", lambda t: t.desc(0, 0x8000, 16 * 65537, INDIRECT), "INDIRECT_LEN"),
    ("indirect_outside", lambda t: t.desc(0, 0x3FFF0, 32, INDIRECT), "ADDR"),
    ("indirect_loop", lambda t: (t.desc(0, 0x8000, 32, INDIRECT),
                                 t.desc(0, DATA, 1, NEXT, 1, table=0x8000),
                                 t.desc(1, DATA, 1, NEXT, 0, table=0x8000)), "LOOP"),
    ("indirect_next_range", lambda t: (t.desc(0, 0x8000, 32, INDIRECT),
                                       t.desc(0, DATA, 1, NEXT, 2, table=0x8000)),
     "NEXT_RANGE"),
    ("too_many_segments", lambda t: (t.desc(0, 0x20000, 16 * 1025, INDIRECT), [
        t.desc(i, DATA + i, 1, NEXT, i + 1, table=0x20000) for i in range(1024)],
        t.desc(1024, DATA, 1, 0, table=0x20000)), "TOO_MANY_SEGMENTS"),
])
def test_split_hostile_chain_same_error_and_writes(cring, name, build, code):
    t = split_twin(cring)
    build(t)
    t.avail(0, 0)
    t.avail_idx(1)
    err = t.step(lambda vq: vq.pop())
    assert err[0] == "DriverError" and err[1] == ChainError[code] and err[3] == 0
    assert t.used(0) == (0, 0)
    assert t.step(lambda vq: vq.pop())[1] == ChainError.BROKEN  # latched
    t.step(lambda vq: vq.set_base(vq.get_base()))  # vhost-user re-init clears it
    assert t.vqs[1].broken is None


@pytest.mark.parametrize("avail_idx, head, code", [(9, 0, "AVAIL_IDX"), (0x8000, 0, "AVAIL_IDX"),
                                                    (1, 8, "HEAD_RANGE"),
                                                    (1, 0xFFFF, "HEAD_RANGE")])
def test_split_avail_errors_write_nothing(cring, avail_idx, head, code):
    t = split_twin(cring)
    t.avail(0, head)
    t.avail_idx(avail_idx)
    err = t.step(lambda vq: vq.pop())
    assert err[1] == ChainError[code] and err[3] is None
    assert t.vqs[0].used_idx == 0


def test_split_zero_length_and_straddling_regions(cring):
    t = split_twin(cring, regions=((0, 0x20000), (0x20000, 0x20000), (0x50000, 0x1000)))
    t.write(0x1FFFC, b"abcdefgh")
    t.desc(0, DATA, 0, NEXT, 1)
    t.desc(1, 0x1FFFC, 8, NEXT, 2)  # crosses into the adjacent region: two views
    t.desc(2, 0x4FFF0, 0x20, WRITE)  # runs into the gap: ADDR
    t.avail(0, 0)
    t.avail_idx(1)
    assert t.step(lambda vq: vq.pop())[1] == ChainError.ADDR
    t2 = split_twin(cring, regions=((0, 0x20000), (0x20000, 0x20000)))
    t2.write(0x1FFFC, b"abcdefgh")
    t2.desc(0, DATA, 0, NEXT, 1)
    t2.desc(1, 0x1FFFC, 8, 0)
    t2.avail(0, 0)
    t2.avail_idx(1)
    chain = t2.step(lambda vq: vq.pop())
    assert chain[3] == [b"abcd", b"efgh"]


def test_split_ring_area_crossing_regions_and_region_removal(cring):
    # the used ring crosses from one region into the next; then the region goes away
    t = split_twin(cring, regions=((0, 0x5010), (0x5010, 0x20000)), event_idx=True)
    t.write(DATA, b"x" * 8)
    t.desc(0, DATA, 8, 0)
    t.avail(0, 0)
    t.avail_idx(1)
    t.step(lambda vq: vq.pop())
    t.step(lambda vq: vq.push(0, 0))
    assert t.used(0) == (0, 0)
    t.step(lambda vq: vq.memory.remove(0x5010, 0x20000))
    # empty ring + EVENT_IDX: avail_event lives in the removed region → ring area error
    assert t.step(lambda vq: vq.pop())[1:4] == (ChainError.ADDR, 3, None)
    assert t.vqs[1].broken == ChainError.ADDR


def test_split_wrap_past_2_16_with_event_idx(cring):
    t = split_twin(cring, size=4, event_idx=True)
    start = 0xFFFA
    t.write(U + 2, U16.pack(start))  # the used idx a reconnecting back-end finds
    t.step(lambda vq: vq.set_base(start))
    t.write(DATA, bytes(range(64)))
    idx = start
    for i in range(14):
        for k in range(2):
            t.desc(k, DATA + 4 * k + i, 4, 0)
            t.avail((idx + k) % 4, k)
        t.avail_idx(idx + 2)
        t.write(A + 4 + 2 * 4, U16.pack((idx + i % 3) & 0xFFFF))  # used_event moves
        chains = t.step(lambda vq: vq.pop_batch(8))
        assert len(chains) == 2
        assert t.step(lambda vq: vq.pop()) is None  # writes avail_event
        t.step(lambda vq: vq.push_batch([(c[1], i, 1) for c in chains]))
        t.step(lambda vq: vq.should_notify())
        idx += 2
    assert t.vqs[1].last_avail_idx == (start + 28) & 0xFFFF


@pytest.mark.parametrize("flags", [0, 1])
def test_split_notify_no_interrupt_and_notify_on_empty(cring, flags):
    t = split_twin(cring, notify_on_empty=True)
    t.write(A, U16.pack(flags))
    t.desc(0, DATA, 4, 0)
    t.avail(0, 0)
    t.avail_idx(1)
    t.step(lambda vq: vq.pop())
    t.step(lambda vq: vq.should_notify())
    t.step(lambda vq: vq.push(0, 0))
    assert t.step(lambda vq: vq.should_notify()) is True  # empty and nothing in flight


def test_push_rejects_bad_elements_like_the_reference(cring):
    t = split_twin(cring)
    for item in [(8, 0, 1), (-1, 0, 1), (0, 1 << 32, 1), (0, 0, 0)]:
        assert t.step(lambda vq: vq.push(*item))[0] == "ValueError"
    t.step(lambda vq: vq.push_batch([]))


# -- packed ---------------------------------------------------------------------------------
def packed_twin(cring, size=8, **kw):
    return Twin(cring, size, packed=True, areas=(D, A, U), **kw)


def pdesc(t, pos, addr, length, buf_id, flags, wrap=True):
    flags |= (AVAIL if wrap else USED)
    t.write(D + 16 * pos, DESC.pack(addr, length, buf_id, flags))


def test_packed_chains_wrap_and_notify(cring):
    t = packed_twin(cring, size=4, event_idx=True)
    t.write(DATA, bytes(range(256)))
    wrap = True
    pos = 0
    for round_ in range(6):
        for k in range(3):  # a 3-descriptor chain crossing the ring end every other round
            p = (pos + k) % 4
            w = wrap if pos + k < 4 else not wrap
            flags = (NEXT if k < 2 else WRITE) | (0 if k < 2 else 0)
            pdesc(t, p, DATA + 16 * k + round_, 8, round_ % 4, flags, w)
        t.write(A, struct.pack("<HH", (pos | (wrap << 15)), round_ % 3))
        chain = t.step(lambda vq: vq.pop())
        assert chain[0] == "chain" and chain[2] == 3
        t.step(lambda vq: vq.push(chain[1], round_, 3))
        t.step(lambda vq: vq.should_notify())
        pos += 3
        if pos >= 4:
            pos -= 4
            wrap = not wrap


@pytest.mark.parametrize("name, build, code, head", [
    ("wrap_confusion", lambda t: (pdesc(t, 0, DATA, 4, 1, NEXT),
                                  pdesc(t, 1, DATA, 4, 1, 0, wrap=False)), "PACKED_WRAP", None),
    ("id_range", lambda t: pdesc(t, 0, DATA, 4, 8, 0), "HEAD_RANGE", None),
    ("addr_in_last", lambda t: (pdesc(t, 0, DATA, 4, 5, NEXT),
                                pdesc(t, 1, 0x100000, 4, 2, 0)), "ADDR", 2),
    ("addr_not_last", lambda t: (pdesc(t, 0, 0x100000, 4, 5, NEXT),
                                 pdesc(t, 1, DATA, 4, 2, 0)), "ADDR", None),
    ("order", lambda t: (pdesc(t, 0, DATA, 4, 5, NEXT | WRITE), pdesc(t, 1, DATA, 4, 3, 0)),
     "ORDER", 3),
    ("loop", lambda t: [pdesc(t, p, DATA, 1, 0, NEXT) for p in range(8)], "LOOP", None),
    ("indirect_next", lambda t: pdesc(t, 0, 0x8000, 16, 1, INDIRECT | NEXT), "INDIRECT_NEXT",
     None),
    ("indirect_len", lambda t: pdesc(t, 0, 0x8000, 20, 1, INDIRECT), "INDIRECT_LEN", 1),
    ("indirect_order", lambda t: (pdesc(t, 0, 0x8000, 32, 6, INDIRECT),
                                  t.write(0x8000, DESC.pack(DATA, 4, 0, WRITE)
                                          + DESC.pack(DATA, 4, 0, 0))), "ORDER", 6),
])
def test_packed_hostile_chain(cring, name, build, code, head):
    t = packed_twin(cring)
    if name == "loop":  # every slot available with the same wrap: LOOP before PACKED_WRAP
        for p in range(8):
            pdesc(t, p, DATA, 1, 0, NEXT)
    else:
        build(t)
    err = t.step(lambda vq: vq.pop())
    assert err[1] == ChainError[code] and err[3] == head


def test_packed_indirect_table_chain(cring):
    t = packed_twin(cring)
    t.write(DATA, b"abcdefgh")
    t.write(0x8000, DESC.pack(DATA, 4, 0, NEXT | INDIRECT) + DESC.pack(DATA + 4, 4, 0, 0)
            + DESC.pack(DATA + 0x100, 32, 0, WRITE))
    pdesc(t, 0, 0x8000, 48, 7, INDIRECT)
    chain = t.step(lambda vq: vq.pop())
    assert chain[3] == [b"abcd", b"efgh"] and chain[6] == 32 and chain[2] == 1
    t.step(lambda vq: vq.push(7, 5, 1))
    t.step(lambda vq: vq.get_base())
