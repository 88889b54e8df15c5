"""Two ring implementations in lock step over two identical guest memories.

:class:`RingPair` holds one ``Virtqueue`` per implementation (the pure-Python reference
``ring.pyring`` and the C ``ring.cring``), each over its own copy of the same guest memory.
Every call goes to both; :meth:`RingPair.call` returns the reference outcome after asserting
that the outcomes are equal, that guest memory (and the dirty log) is byte-identical and
that the queue state is equal. Used by the differential tests, the state machine and the
fuzz harness (STYLE R9).

Outcomes are compared through :func:`outcome`: a chain becomes its head, slots, byte counts,
guest-physical pieces and readable contents; an exception becomes its type and fields.

Spec: virtio 1.2 §2.7 / §2.8 (what both implementations implement); docs/internals.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ring._chain import RingAccessError
from ring.errors import DriverError, GuestAddressError, MemoryMapError
from ring.memory import DirtyLog, GuestMemory, Region
from ring.types import Chain, Pending, RxResult, TxResult
from tests.support.driver import UVA_BASE, bytearray_memory

# Guest RAM used by every differential test: two adjacent regions (a buffer may straddle
# them), a gap, and a third region. Ring areas live in region 0.
R0 = (0x0, 0x10000)
R1 = (0x10000, 0x4000)  # adjacent to R0
GAP = (0x14000, 0x18000)  # no memory here
R2 = (0x18000, 0x4000)
REGIONS = (R0, R1, R2)
END = R2[0] + R2[1]  # first byte past guest RAM
LOG_BYTES = 8  # dirty log covering 64 pages (all of guest RAM)


def make_memory(log: bool = False) -> GuestMemory:
    """A fresh zeroed GuestMemory with the standard regions (and a dirty log if asked)."""
    mem = bytearray_memory(*REGIONS)
    if log:
        mem.log = DirtyLog(bytearray(LOG_BYTES))
    return mem


def clone_memory(mem: GuestMemory) -> GuestMemory:
    """An independent byte-for-byte copy of ``mem`` (regions and dirty log)."""
    copy = GuestMemory([Region(r.gpa, r.size, r.uva, r.mmap_offset, bytearray(r.view))
                        for r in mem.regions])
    if mem.log is not None:
        copy.log = DirtyLog(bytearray(mem.log.buffer))
    return copy


def memory_bytes(mem: GuestMemory) -> tuple:
    """Everything a ring may write: each region's bytes and the dirty log."""
    log = None if mem.log is None else bytes(mem.log.buffer)
    return tuple(bytes(r.view) for r in mem.regions), log


def first_difference(a: GuestMemory, b: GuestMemory) -> str:
    """A readable description of where two memories differ (for assertion messages)."""
    for ra, rb in zip(a.regions, b.regions):
        va, vb = bytes(ra.view), bytes(rb.view)
        if va != vb:
            diffs = [i for i in range(len(va)) if va[i] != vb[i]]
            gpas = ", ".join(f"{ra.gpa + i:#x}: {va[i]:#04x} vs {vb[i]:#04x}"
                             for i in diffs[:8])
            return f"{len(diffs)} bytes differ (ref vs other) at {gpas}"
    if a.log is not None and bytes(a.log.buffer) != bytes(b.log.buffer):
        return f"dirty log differs: {bytes(a.log.buffer).hex()} vs {bytes(b.log.buffer).hex()}"
    return "no difference"


def chain_key(chain: Chain, mem: GuestMemory) -> tuple:
    """What two implementations must agree on for a chain; also checks the chain is
    self-consistent (views match gpas, byte counts add up)."""
    assert isinstance(chain, Chain), type(chain)
    assert len(chain.readable) == len(chain.readable_gpas)
    assert len(chain.writable) == len(chain.writable_gpas)
    assert all(len(v) == n for v, (_g, n) in zip(chain.readable, chain.readable_gpas))
    assert all(len(v) == n for v, (_g, n) in zip(chain.writable, chain.writable_gpas))
    assert all(len(v) > 0 for v in chain.readable + chain.writable), "zero-length view"
    assert sum(n for _g, n in chain.readable_gpas) == chain.readable_bytes
    assert sum(n for _g, n in chain.writable_gpas) == chain.writable_bytes
    for view, (gpa, n) in zip(chain.readable, chain.readable_gpas):
        assert bytes(view) == mem.read(gpa, n), f"readable view != guest bytes at {gpa:#x}"
    return (chain.head, chain.ring_slots, chain.readable_bytes, chain.writable_bytes,
            tuple(map(tuple, chain.readable_gpas)), tuple(map(tuple, chain.writable_gpas)),
            tuple(bytes(v) for v in chain.readable))


def exc_key(exc: BaseException, mem: GuestMemory) -> tuple:
    """An exception as (type name, fields) — messages are free to differ."""
    if isinstance(exc, DriverError):
        return ("DriverError", exc.code, exc.queue, exc.head,
                tuple(chain_key(c, mem) for c in exc.chains))
    if isinstance(exc, GuestAddressError):
        return ("GuestAddressError", exc.gpa, exc.length)
    if isinstance(exc, MemoryMapError):
        return ("MemoryMapError",)
    if type(exc).__name__ == "RingAccessError":
        # ring._chain.RingAccessError is internal, yet set_base/configure on a split ring
        # whose used ring is unmapped let it escape in both implementations (reported).
        return ("RingAccessError",)
    if isinstance(exc, (ValueError, TypeError, OverflowError)):
        # argument errors: the type family must agree, not the message
        return ("argument-error",)
    raise exc  # anything else is a bug in the implementation under test


def outcome(value: Any, mem: GuestMemory) -> Any:
    """A comparable form of a Virtqueue method's return value."""
    if isinstance(value, Chain):
        return chain_key(value, mem)
    if isinstance(value, list):
        return [outcome(v, mem) for v in value]
    if isinstance(value, (TxResult, RxResult)):
        return (type(value).__name__,) + tuple(
            None if v is None else (int(v) if not isinstance(v, bool) else v)
            for v in value)
    return value


def pending_key(pending: Pending | None) -> tuple | None:
    if pending is None:
        return None
    return (pending.head, pending.ring_slots, pending.offset,
            tuple(map(tuple, pending.segments)))


def queue_state(vq) -> tuple:
    """The device-side state both implementations must agree on."""
    broken = vq.broken
    return dict(
        last_avail_idx=vq.last_avail_idx, used_idx=vq.used_idx,
        avail_wrap=bool(vq.avail_wrap), used_wrap=bool(vq.used_wrap),
        in_flight=vq.in_flight, broken=None if broken is None else int(broken),
        signalled_used=vq.signalled_used,
        signalled_used_valid=bool(vq.signalled_used_valid),
        pending=pending_key(vq.pending), base=vq.get_base(),
    )


class Divergence(AssertionError):
    """The two implementations did something different."""


@dataclasses.dataclass
class Side:
    """One implementation: its name, guest memory and queue."""

    name: str
    memory: GuestMemory
    vq: Any = None


class RingPair:
    """Reference (``sides[0]``, pure Python) and other implementations in lock step.

    ``impls`` maps a name to a ``Virtqueue`` class; the first is the reference. The memories
    start as clones of ``memory``.
    """

    def __init__(self, impls: dict[str, type], memory: GuestMemory) -> None:
        names = list(impls)
        self.impls = impls
        self.sides = [Side(names[0], memory)] + [Side(n, clone_memory(memory))
                                                 for n in names[1:]]
        self.last_values: list = []  # every side's return value (or exception) of the last call

    @property
    def ref(self) -> Side:
        return self.sides[0]

    def build(self, size: int, *, packed: bool, event_idx: bool,
              notify_on_empty: bool = False, index: int = 0) -> None:
        """Construct one queue per implementation (not configured yet)."""
        for side in self.sides:
            side.vq = self.impls[side.name](side.memory, size, packed=packed,
                                            event_idx=event_idx,
                                            notify_on_empty=notify_on_empty, index=index)

    def guest_write(self, gpa: int, data: bytes) -> None:
        """The guest writes the same bytes into every memory (no dirty logging); bytes that
        are no longer mapped (a removed region) are not written."""
        for side in self.sides:
            try:
                side.memory.check(gpa, len(data))
            except GuestAddressError:
                continue
            for view, chunk in _split_write(side.memory, gpa, data):
                view[:] = chunk

    def call(self, method: str, *args, **kwargs) -> Any:
        """Call ``vq.method(*args)`` on every side; assert equal outcomes, memories, states.
        Returns the reference's (outcome kind, value): ("ok", value) or ("exc", exception).
        """
        return self.apply(lambda side: getattr(side.vq, method)(*args, **kwargs),
                          f"{method}{args!r}")

    def apply(self, action: Callable[[Side], Any], what: str = "action") -> Any:
        """Run ``action(side)`` on every side and compare as :meth:`call` does."""
        results = []
        self.last_values = []
        for side in self.sides:
            try:
                value = action(side)
            except (DriverError, GuestAddressError, MemoryMapError, RingAccessError,
                    ValueError, TypeError, OverflowError) as exc:
                results.append(("exc", exc, exc_key(exc, side.memory)))
                self.last_values.append(exc)
            else:
                self.last_values.append(value)
                results.append(("ok", value, outcome(value, side.memory)))
        self.check(what, results)
        kind, value, _key = results[0]
        return kind, value

    def check(self, what: str, results=None) -> None:
        """Assert equal outcomes (if given), equal memories and equal queue states."""
        ref = self.ref
        for i, side in enumerate(self.sides[1:], 1):
            if results is not None and results[0][2] != results[i][2]:
                raise Divergence(f"{what}: {ref.name} -> {results[0][0]} {results[0][2]!r}\n"
                                 f"{' ' * len(what)}  {side.name} -> {results[i][0]} "
                                 f"{results[i][2]!r}")
            if memory_bytes(ref.memory) != memory_bytes(side.memory):
                raise Divergence(f"{what}: guest memory differs: "
                                 f"{first_difference(ref.memory, side.memory)}")
            if ref.vq is not None:
                a, b = queue_state(ref.vq), queue_state(side.vq)
                if a != b:
                    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
                    raise Divergence(f"{what}: queue state differs ({ref.name}, {side.name}):"
                                     f" {diff}")


def _split_write(mem: GuestMemory, gpa: int, data: bytes):
    pos = 0
    for view in mem.translate(gpa, len(data)):
        yield view, data[pos: pos + len(view)]
        pos += len(view)


def available_impls() -> dict[str, type]:
    """``{"py": pyring.Virtqueue, "c": cring.Virtqueue}``; "c" missing when not built."""
    from ring.pyring import Virtqueue as PyVirtqueue
    impls = {"py": PyVirtqueue}
    try:
        from ring.cring import Virtqueue as CVirtqueue
    except ImportError:
        return impls
    impls["c"] = CVirtqueue
    return impls


def require_pair() -> dict[str, type]:
    """Both implementations, or skip the calling test."""
    import pytest

    impls = available_impls()
    if "c" not in impls:
        pytest.skip("ring.cring (the C ring) is not importable: nothing to compare against")
    return impls


__all__ = ["END", "GAP", "LOG_BYTES", "R0", "R1", "R2", "REGIONS", "UVA_BASE", "Divergence",
           "RingPair", "Side", "available_impls", "chain_key", "clone_memory", "exc_key",
           "make_memory", "memory_bytes", "outcome", "queue_state", "require_pair"]
