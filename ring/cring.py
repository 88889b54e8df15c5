"""Virtqueue backed by the C hot path (``ring._vring_c``, built from csrc/vring.c).

The same interface, results and exceptions as the pure-Python reference :mod:`ring.pyring`,
byte for byte: the C code walks chains, publishes used elements, decides notifications and
runs the batched ``readv``/``writev`` data path; this module owns the caller-side state (an
``ffi.new``'d ``struct vr_queue``), the region table handed to C (rebuilt whenever
``GuestMemory.generation`` changes), and turns C results into :class:`ring.types.Chain`,
:class:`TxResult`, :class:`RxResult` and typed exceptions (one :func:`_raise_for`).

Guest memory reaches C as ``ffi.from_buffer`` of each region's view; the buffers stay
referenced here as long as C holds pointers into them, and Chain memoryviews are slices of
the same region views.

Spec: virtio 1.2 §2.7 (Split Virtqueues), §2.8 (Packed Virtqueues); vhost-user "Ring
states"; STYLE R7 (the cffi boundary).
"""

from __future__ import annotations

import logging
import struct

from ring.base import VirtqueueBase
from ring.errors import ChainError, DriverError, GuestAddressError
from ring.memory import GuestMemory
from ring.types import Chain, Pending, RxResult, TxResult
from ring.datapath import check_prefix
from ring.wire import MAX_PREFIX, MAX_QUEUE_SIZE, MAX_SEGMENTS

try:
    from ring._vring_c import ffi, lib
except ImportError as exc:  # not built: ring/__init__ falls back to pyring unless C is required
    raise ImportError(f"ring._vring_c is not built (run python3 ring/_vring_build.py): {exc}") \
        from exc

__all__ = ["Virtqueue", "Chain", "TxResult", "RxResult", "Pending", "ABI_VERSION"]

log = logging.getLogger(__name__)

ABI_VERSION = 5  # the csrc/vring.h VR_ABI_VERSION this module was written against


def _check_abi() -> None:
    """Refuse a stale or foreign build (cryptography's version-stamp habit)."""
    if lib.VR_ABI_VERSION != ABI_VERSION or lib.vr_abi_version() != ABI_VERSION:
        raise ImportError(f"ring._vring_c ABI {lib.vr_abi_version()} != {ABI_VERSION}: rebuild "
                          "with python3 ring/_vring_build.py")
    for code in ChainError:
        if getattr(lib, f"VR_E_{code.name}", None) != -int(code):
            raise ImportError(f"csrc/vring.h VR_E_{code.name} does not mirror ChainError")
    if (lib.VR_MAX_SEGMENTS != MAX_SEGMENTS or lib.VR_MAX_QUEUE_SIZE != MAX_QUEUE_SIZE
            or lib.VR_MAX_PREFIX != MAX_PREFIX):
        raise ImportError("csrc/vring.h limits differ from ring.wire")


_check_abi()

_UNLIMITED = 1 << 62  # the reference's "no max_bytes" budget
_U64_MAX = (1 << 64) - 1
_new_tuple = tuple.__new__  # builds the NamedTuple results without their Python __new__
_vr_tx_to_fd = lib.vr_tx_to_fd
_vr_rx_from_fd = lib.vr_rx_from_fd
_vr_rx_from_fd_prefix = lib.vr_rx_from_fd_prefix
_BROKEN = {int(code): code for code in ChainError}
# struct vr_chain / struct vr_segment as Python sees them (checked against ffi at import)
_CHAIN_FMT = struct.Struct("=IIIIIIQQ")  # head, ring_slots, seg_start, nseg, nreadable, -, rb, wb
_SEG_FMT = struct.Struct("=QQII")  # host, offset, len, region
if (ffi.sizeof("struct vr_chain") != _CHAIN_FMT.size
        or ffi.sizeof("struct vr_segment") != _SEG_FMT.size
        or ffi.offsetof("struct vr_segment", "len") != 16
        or ffi.offsetof("struct vr_chain", "readable_bytes") != 24):
    raise ImportError("csrc/vring.h struct vr_chain / vr_segment layout changed")
_BATCH_CHAINS = 64  # chains per vr_pop_batch call
_BATCH_SEGMENTS = 4 * MAX_SEGMENTS


def _raise_for(code: int, queue: int, head: int | None = None,
               chains: list | None = None) -> DriverError:
    """The exception the reference raises for a negative ``VR_E_*`` code (to be raised)."""
    return DriverError(ChainError(-code), queue, head, chains)


def _host_pointer(view: memoryview):
    """``(keeper, uint8_t *)`` for a writable memoryview.

    The buffer is taken from the exporting object (``view.obj``: the bytearray or mmap), not
    from the memoryview itself: cffi's ``from_buffer`` of a memoryview crashes the
    interpreter when both end up in one garbage-collected cycle (the memoryview is cleared
    first). A temporary ``from_buffer`` of the view gives the view's offset in the object.
    """
    base = ffi.from_buffer("uint8_t[]", view.obj, require_writable=True)
    with ffi.from_buffer("uint8_t[]", view, require_writable=True) as tmp:
        offset = int(ffi.cast("uintptr_t", tmp)) - int(ffi.cast("uintptr_t", base))
    if not 0 <= offset <= len(base) - view.nbytes:
        raise ValueError("region buffer is not a contiguous slice of its exporter")
    return base, base + offset


class _Memory:
    """The region table as C sees it, for one GuestMemory generation (and its dirty log).

    Holds the ``ffi.from_buffer`` objects: C keeps raw pointers into them.
    """

    __slots__ = ("generation", "regions", "table", "buffers", "views", "gpas", "log",
                 "log_buffer", "log_host", "log_size")

    def __init__(self, memory: GuestMemory) -> None:
        self.generation = memory.generation
        self.regions = memory.regions
        self.table = ffi.new("struct vr_region[]", max(1, len(self.regions)))
        self.buffers = []
        self.views = []
        self.gpas = [region.gpa for region in self.regions]
        for i, region in enumerate(self.regions):
            buf, host = _host_pointer(region.view)
            self.buffers.append(buf)
            self.views.append(region.view)
            entry = self.table[i]
            entry.gpa = region.gpa
            entry.size = region.size
            entry.uva = region.uva
            entry.host = host
        self.log = memory.log
        self.log_buffer = self.log_host = None
        self.log_size = 0
        if self.log is not None:
            view = memoryview(self.log.buffer)
            self.log_buffer, self.log_host = _host_pointer(view)
            self.log_size = view.nbytes


class Virtqueue(VirtqueueBase):
    """One virtqueue seen from the device side, C implementation (see ring.pyring).

    ``size`` must be a power of two ≤ 32768 for split rings, 1..32768 for packed rings.

    Spec: virtio 1.2 §2.6 (Virtqueues), §2.7.7 / §2.7.10 (notification suppression, split),
    §2.8.10 (packed).
    """

    def __init__(self, memory: GuestMemory, size: int, *, packed: bool, event_idx: bool,
                 notify_on_empty: bool = False, index: int = 0) -> None:
        super().__init__(memory, size, packed=packed, event_idx=event_idx,
                         notify_on_empty=notify_on_empty, index=index, logger=log)
        self._q = ffi.new("struct vr_queue *")
        self._q.size = size
        self._q.packed = self.packed
        self._q.event_idx = self.event_idx
        self._q.notify_on_empty = self.notify_on_empty
        self._q.call_fd = -1
        self._mem: _Memory | None = None
        self._chain = ffi.new("struct vr_chain[]", _BATCH_CHAINS)
        self._seg = ffi.new("struct vr_segment[]", _BATCH_SEGMENTS)
        self._popped = ffi.new("uint32_t *")
        self._scratch = None  # allocated by the first tx_to_fd / rx_from_fd
        self._tx_out = self._rx_out = None  # its result structs (cached for the fast path)
        self._unpop_mark: tuple | None = None  # (head, slots, last_avail, wrap) after a pop
        self._init_state()
        self._sync()

    def _init_state(self) -> None:
        self._unpop_mark = None
        q = self._q
        q.last_avail_idx = q.used_idx = 0
        q.avail_wrap = q.used_wrap = 1
        q.in_flight = 0
        q.broken = 0
        q.error_head = -1
        q.signalled_used = 0
        q.signalled_used_valid = 0
        q.pending_valid = 0
        q.pending_nseg = 0
        q.pending_offset = 0

    def _sync(self) -> None:
        """Hand C the current region table and dirty log (cheap when nothing changed)."""
        memory = self.memory
        mem = self._mem
        if mem is not None and mem.generation == memory.generation and mem.log is memory.log:
            return
        mem = _Memory(memory)
        q = self._q
        q.regions = mem.table
        q.nregions = len(mem.regions)
        q.log = ffi.NULL if mem.log_host is None else mem.log_host
        q.log_size = mem.log_size
        lib.vr_refresh(q)
        self._mem = mem  # the old table and buffers go only now: C no longer points there

    @property
    def call_fd(self) -> int | None:
        fd = self._q.call_fd
        return None if fd < 0 else int(fd)

    @call_fd.setter
    def call_fd(self, fd: int | None) -> None:
        self._q.call_fd = -1 if fd is None else fd

    # -- read-only state --------------------------------------------------------------------
    last_avail_idx = property(lambda self: int(self._q.last_avail_idx))
    used_idx = property(lambda self: int(self._q.used_idx))
    avail_wrap = property(lambda self: bool(self._q.avail_wrap) if self.packed else True)
    used_wrap = property(lambda self: bool(self._q.used_wrap) if self.packed else True)
    in_flight = property(lambda self: int(self._q.in_flight))
    signalled_used = property(lambda self: int(self._q.signalled_used))
    signalled_used_valid = property(lambda self: bool(self._q.signalled_used_valid))

    @property
    def broken(self) -> ChainError | None:
        return ChainError(self._q.broken) if self._q.broken else None

    @property
    def pending(self) -> Pending | None:
        q = self._q
        if not q.pending_valid:
            return None
        segs = tuple((int(q.pending_seg[k].gpa), int(q.pending_seg[k].len))
                     for k in range(q.pending_nseg))
        return Pending(int(q.pending_head), int(q.pending_slots), int(q.pending_offset), segs)

    # -- setup ------------------------------------------------------------------------------
    def configure(self, desc_gpa: int, driver_gpa: int, device_gpa: int) -> None:
        """Set the ring areas by guest-physical address and bounds-check them once
        (``GuestAddressError``); a split ring loads ``used_idx`` from ``used->idx``.

        Spec: virtio 1.2 §2.7 / §2.8 (areas), vhost-user VHOST_USER_SET_VRING_ADDR.
        """
        self._sync()
        bad_gpa = ffi.new("uint64_t *")
        bad_len = ffi.new("uint64_t *")
        for gpa in (desc_gpa, driver_gpa, device_gpa):
            if not 0 <= gpa < 1 << 64:
                raise GuestAddressError(gpa, 0)
        rc = lib.vr_configure(self._q, desc_gpa, driver_gpa, device_gpa, bad_gpa, bad_len)
        if rc < 0:
            raise GuestAddressError(int(bad_gpa[0]), int(bad_len[0]))
        self.desc_gpa, self.driver_gpa, self.device_gpa = desc_gpa, driver_gpa, device_gpa
        if not self.packed:
            self._load_used_idx()

    def _load_used_idx(self) -> None:
        if lib.vr_load_used_idx(self._q) < 0:  # the used ring's region was removed
            self._q.broken = int(ChainError.ADDR)
            raise DriverError(ChainError.ADDR, self.index)

    def reset(self) -> None:
        """Forget the ring addresses and all state (device reset).

        Spec: virtio 1.2 §2.4 (Device Reset).
        """
        self.desc_gpa = self.driver_gpa = self.device_gpa = None
        self._q.configured = 0
        lib.vr_refresh(self._q)
        self._init_state()

    def get_base(self) -> int:
        """The vhost-user GET_VRING_BASE value (split: last_avail_idx; packed: bits 0–14
        last_avail_idx, bit 15 avail wrap, bits 16–30 used_idx, bit 31 used wrap).

        Spec: vhost-user VHOST_USER_GET_VRING_BASE.
        """
        q = self._q
        if not self.packed:
            return int(q.last_avail_idx)
        return (q.last_avail_idx | (q.avail_wrap << 15) | (q.used_idx << 16)
                | (q.used_wrap << 31))

    def set_base(self, value: int) -> None:
        """Apply a vhost-user SET_VRING_BASE value (encoding as :meth:`get_base`).

        Spec: vhost-user VHOST_USER_SET_VRING_BASE.
        """
        self._sync()
        q = self._q
        same = value == self.get_base()
        if self.packed:
            last_avail, used = value & 0x7FFF, (value >> 16) & 0x7FFF
            if last_avail >= self.size or used >= self.size:
                raise ValueError(f"packed base {value:#x} outside queue size {self.size}")
            q.last_avail_idx = last_avail
            q.avail_wrap = 1 if value & 0x8000 else 0
            q.used_idx = used
            q.used_wrap = value >> 31 & 1
        else:
            q.last_avail_idx = value & 0xFFFF
            if self.configured:
                self._load_used_idx()
        q.broken = 0
        q.signalled_used_valid = 0
        self._unpop_mark = None
        if not same:
            q.pending_valid = 0
        q.in_flight = 1 if q.pending_valid else 0

    # -- state save / restore -----------------------------------------------------------------
    def _restore(self, *, last_avail_idx: int, used_idx: int, avail_wrap: bool,
                 used_wrap: bool, in_flight: int, signalled_used: int,
                 signalled_used_valid: bool, broken, pending) -> None:
        """Set every state field in the C struct (``VirtqueueBase.load_state`` validated
        them, including the pending chain's segment count against the C array)."""
        q = self._q
        q.last_avail_idx = last_avail_idx
        q.used_idx = used_idx
        q.avail_wrap = avail_wrap
        q.used_wrap = used_wrap
        q.in_flight = in_flight
        q.signalled_used = signalled_used
        q.signalled_used_valid = signalled_used_valid
        q.broken = 0 if broken is None else int(broken)
        if pending is None:
            q.pending_valid = 0
            return
        q.pending_head = pending.head
        q.pending_slots = pending.ring_slots
        q.pending_offset = pending.offset
        q.pending_nseg = len(pending.segments)
        for k, (gpa, length) in enumerate(pending.segments):
            q.pending_seg[k].gpa = gpa
            q.pending_seg[k].len = length
        q.pending_valid = 1

    # -- chains -----------------------------------------------------------------------------
    def _error(self, rc: int, chains: list | None = None) -> DriverError:
        """The DriverError for a failed pop (logs the guest error once, as the reference)."""
        code = ChainError(-rc)
        head = None
        if code not in (ChainError.BROKEN, ChainError.NOT_READY) and self._q.error_head >= 0:
            head = int(self._q.error_head)
        if code not in (ChainError.BROKEN, ChainError.NOT_READY):
            self.log.warning("guest driver error %s at head %s: queue broken", code.name, head)
        return _raise_for(rc, self.index, head, chains)

    def _make_chains(self, count: int) -> list[Chain]:
        """Chain objects for ``self._chain[0:count]`` and their segments.

        The C arrays are read with one ``struct.iter_unpack`` each rather than per-field
        cffi attribute reads (~50 ns apiece: they dominated ``pop_batch`` for small vsock
        packets)."""
        if count <= 0:
            return []
        raw = list(_CHAIN_FMT.iter_unpack(ffi.buffer(self._chain, _CHAIN_FMT.size * count)))
        last = raw[-1]
        nsegs = last[2] + last[3]
        segs = list(_SEG_FMT.iter_unpack(ffi.buffer(self._seg, _SEG_FMT.size * nsegs)))
        mem = self._mem
        views = mem.views
        gpas = mem.gpas
        chains = []
        for head, slots, start, nseg, nread, _r, rbytes, wbytes in raw:
            readable, writable, rgpas, wgpas = [], [], [], []
            for k in range(start, start + nseg):
                _host, off, n, r = segs[k]
                if k - start < nread:
                    readable.append(views[r][off:off + n])
                    rgpas.append((gpas[r] + off, n))
                else:
                    writable.append(views[r][off:off + n])
                    wgpas.append((gpas[r] + off, n))
            chains.append(_new_tuple(Chain, (head, slots, readable, writable, rbytes, wbytes,
                                             tuple(rgpas), tuple(wgpas))))
        return chains

    def pop(self) -> Chain | None:
        """Walk the next available chain, or return None if the ring is empty.

        Raises ``DriverError`` for a hostile ring (the queue is then broken).
        Spec: virtio 1.2 §2.7.13.2 / §2.8.21.
        """
        self._sync()
        rc = lib.vr_pop(self._q, self._chain, self._seg)
        if rc < 0:
            raise self._error(rc)
        if rc == 0:
            return None
        chain = self._make_chains(1)[0]
        self._mark_popped(chain)
        return chain

    def _advanced(self, position: tuple[int, int], chains: list[Chain]) -> tuple[int, int]:
        """``(last_avail_idx, avail_wrap)`` after ``chains`` were popped from ``position``."""
        idx, wrap = position
        if not self.packed:
            return (idx + len(chains)) & 0xFFFF, wrap
        for chain in chains:
            idx += chain.ring_slots
            if idx >= self.size:
                idx -= self.size
                wrap ^= 1
        return idx, wrap

    def _mark_popped(self, chain: Chain) -> None:
        q = self._q
        self._unpop_mark = (chain.head, chain.ring_slots, q.last_avail_idx, q.avail_wrap)

    def unpop(self, chain: Chain) -> None:
        """Give back ``chain``, the most recently popped one, unconsumed (same rules and
        ``ValueError`` as ring.pyring.Virtqueue.unpop)."""
        mark = self._unpop_mark
        q = self._q
        if (mark is None or mark[0] != chain.head or mark[1] != chain.ring_slots
                or mark[2] != q.last_avail_idx or mark[3] != q.avail_wrap or q.in_flight < 1):
            raise ValueError(f"chain {chain.head} is not the last popped, unpushed chain")
        self._unpop_mark = None
        if self.packed:  # as csrc/vring.c rewind_chains
            pos = q.last_avail_idx - chain.ring_slots
            if pos < 0:
                pos += self.size
                q.avail_wrap ^= 1
            q.last_avail_idx = pos
        else:
            q.last_avail_idx = (q.last_avail_idx - 1) & 0xFFFF
        q.in_flight -= 1

    def pop_batch(self, max_chains: int) -> list[Chain]:
        """Pop up to ``max_chains`` chains; a failure after some chains raises DriverError
        with those chains in ``.chains`` (in flight, to be pushed)."""
        self._sync()
        chains: list[Chain] = []
        while len(chains) < max_chains:
            want = min(_BATCH_CHAINS, max_chains - len(chains))
            before = (self._q.last_avail_idx, self._q.avail_wrap)
            rc = lib.vr_pop_batch(self._q, self._chain, want, self._seg, _BATCH_SEGMENTS,
                                  self._popped)
            got = self._popped[0]
            new = self._make_chains(got)
            chains.extend(new)
            if got and rc >= 0:
                self._mark_popped(new[-1])
            elif got:
                # the ring's position just past the last good chain: the failure after it
                # may have consumed the bad chain too, and unpop must then refuse, as the
                # reference's pop-by-pop batch does
                self._unpop_mark = (new[-1].head, new[-1].ring_slots,
                                    *self._advanced(before, new))
            if rc < 0:
                raise self._error(rc, chains)
            if got < want:
                last = self._chain[got - 1] if got else None
                room = _BATCH_SEGMENTS - (last.seg_start + last.nseg if last else 0)
                if room >= MAX_SEGMENTS:  # the ring ran empty (not the segment pool)
                    break
        return chains

    def push_batch(self, items) -> None:
        """Return several chains ``[(head, used_len, ring_slots), ...]`` with one publication."""
        items = list(items)
        if not items:
            return
        self._check_used(items)
        self._sync()
        n = len(items)
        heads = ffi.new("uint32_t[]", [h for h, _, _ in items])
        lens = ffi.new("uint32_t[]", [n_ for _, n_, _ in items])
        slots = ffi.new("uint32_t[]", [s for _, _, s in items])
        rc = lib.vr_push_batch(self._q, heads, lens, slots, n)
        if rc < 0:
            raise _raise_for(rc, self.index)

    # -- notifications ----------------------------------------------------------------------
    def should_notify(self) -> bool:
        """Whether the guest needs an interrupt now (updates ``signalled_used``).

        Spec: virtio 1.2 §2.7.7.2, §2.8.10.
        """
        self._sync()
        rc = lib.vr_should_notify(self._q)
        if rc < 0:
            raise _raise_for(rc, self.index)
        return bool(rc)

    # -- batched data path ------------------------------------------------------------------
    def _scratch_for_datapath(self):
        if self._scratch is None:
            entries_cap = self.size + 1
            done_cap = 4 * entries_cap
            keep = (ffi.new("struct vr_entry[]", entries_cap),
                    ffi.new("uint32_t[]", done_cap), ffi.new("uint32_t[]", done_cap),
                    ffi.new("uint32_t[]", done_cap))
            s = ffi.new("struct vr_scratch *")
            s.entries_cap, s.done_cap = entries_cap, done_cap
            s.entries, s.done_head, s.done_len, s.done_slots = keep
            self._scratch = (s, keep, ffi.new("struct vr_tx_result *"),
                             ffi.new("struct vr_rx_result *"))
        return self._scratch

    @staticmethod
    def _budget(max_bytes: int | None) -> int:
        if max_bytes is None:
            return _UNLIMITED
        return min(max(0, max_bytes), _U64_MAX)

    def _datapath_ready(self):
        """The scratch struct once the region table is current (``None`` first: the
        caller then goes through :meth:`_sync` and :meth:`_scratch_for_datapath`)."""
        mem = self._mem
        memory = self.memory
        if mem is None or mem.generation != memory.generation or mem.log is not memory.log:
            return None
        scratch = self._scratch
        return None if scratch is None else scratch[0]

    def c_state(self):
        """``(struct vr_queue *, struct vr_scratch *)`` for a C entry point outside this
        module (ring.cpump, the vsock C paths): the region table made current first (rebuilt
        when ``GuestMemory.generation`` moved, so C never walks a stale one), and a chain
        popped before the call can no longer be given back (``unpop``)."""
        s = self._datapath_ready() or self._datapath_slow()
        self._unpop_mark = None
        return self._q, s

    def _datapath_slow(self):
        self._sync()
        s, _keep, self._tx_out, self._rx_out = self._scratch_for_datapath()
        return s

    def tx_to_fd(self, fd: int, max_bytes: int | None = None) -> TxResult:
        """Write available chains' readable bytes to non-blocking ``fd`` with one ``writev``
        per batch (semantics: ring.datapath.tx_to_fd, docs/internals.md).

        The per-call Python work is kept to one generation check, one C call and one tuple:
        this runs once per kick and per writability event of every port."""
        s = self._datapath_ready() or self._datapath_slow()
        self._unpop_mark = None
        out = self._tx_out
        if max_bytes is None:
            budget = _UNLIMITED
        else:
            budget = max_bytes if 0 <= max_bytes <= _U64_MAX else self._budget(max_bytes)
        rc = _vr_tx_to_fd(self._q, s, fd, budget, out)
        if rc < 0:
            raise _raise_for(rc, self.index)
        broken = out.broken
        return _new_tuple(TxResult, (out.bytes, out.chains, out.notify != 0, out.blocked != 0,
                                     out.error or None, _BROKEN[broken] if broken else None))

    def rx_from_fd(self, fd: int, max_bytes: int | None = None, *, prefix=b"",
                   prefix_len_offset: int | None = None) -> RxResult:
        """Read from non-blocking ``fd`` into available chains' writable buffers with one
        ``readv`` per batch, each touched chain optionally starting with ``prefix`` (its
        payload length patched in at ``prefix_len_offset``) (semantics:
        ring.datapath.rx_from_fd, docs/internals.md)."""
        s = self._datapath_ready() or self._datapath_slow()
        self._unpop_mark = None
        out = self._rx_out
        if max_bytes is None:
            budget = _UNLIMITED
        else:
            budget = max_bytes if 0 <= max_bytes <= _U64_MAX else self._budget(max_bytes)
        if prefix:
            prefix = check_prefix(prefix, prefix_len_offset)
            rc = _vr_rx_from_fd_prefix(
                self._q, s, fd, budget, prefix, len(prefix),
                -1 if prefix_len_offset is None else prefix_len_offset, out)
        else:
            if prefix_len_offset is not None:
                check_prefix(prefix, prefix_len_offset)
            rc = _vr_rx_from_fd(self._q, s, fd, budget, out)
        if rc < 0:
            raise _raise_for(rc, self.index)
        broken = out.broken
        return _new_tuple(RxResult, (out.bytes, out.chains, out.notify != 0, out.eof != 0,
                                     out.starved != 0, out.error or None, out.drained != 0,
                                     _BROKEN[broken] if broken else None))
