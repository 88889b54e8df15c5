"""Virtqueue, pure-Python reference implementation (split and packed rings).

This is the behavioural reference for ``ring.cring``: both must produce the same chains, the
same errors and the same guest memory bytes. docs/internals.md pins the check order.

Spec: virtio 1.2 §2.7 (Split Virtqueues), §2.8 (Packed Virtqueues);
vhost-user "Ring states", VHOST_USER_SET_VRING_BASE / VHOST_USER_GET_VRING_BASE.
"""

from __future__ import annotations

import logging

from ring import packed as _packed
from ring import split as _split
from ring._chain import RingAccessError
from ring.base import VirtqueueBase
from ring.datapath import rx_from_fd, tx_to_fd
from ring.errors import ChainError, DriverError, GuestAddressError
from ring.memory import GuestMemory
from ring.types import Chain, Pending, RxResult, TxResult

__all__ = ["Virtqueue", "Chain", "TxResult", "RxResult", "Pending"]

log = logging.getLogger(__name__)


class Virtqueue(VirtqueueBase):
    """One virtqueue seen from the device side.

    ``size`` must be a power of two ≤ 32768 for split rings, 1..32768 for packed rings.
    Call :meth:`configure` with the guest-physical ring addresses before popping.

    Spec: virtio 1.2 §2.6 (Virtqueues), §2.7.7 / §2.7.10 (notification suppression, split),
    §2.8.10 (packed).
    """

    def __init__(self, memory: GuestMemory, size: int, *, packed: bool, event_idx: bool,
                 notify_on_empty: bool = False, index: int = 0) -> None:
        super().__init__(memory, size, packed=packed, event_idx=event_idx,
                         notify_on_empty=notify_on_empty, index=index, logger=log)
        self.call_fd: int | None = None
        self._init_state()

    def _init_state(self) -> None:
        self._last_avail_idx = 0
        self._used_idx = 0
        self._avail_wrap = True
        self._used_wrap = True
        self._in_flight = 0
        self._broken: ChainError | None = None
        self._signalled_used = 0
        self._signalled_used_valid = False
        self._pending: Pending | None = None
        self._unpop_mark: tuple | None = None  # (head, slots, last_avail, wrap) after a pop

    # -- read-only state --------------------------------------------------------------------
    last_avail_idx = property(lambda self: self._last_avail_idx)
    used_idx = property(lambda self: self._used_idx)
    avail_wrap = property(lambda self: self._avail_wrap if self.packed else True)
    used_wrap = property(lambda self: self._used_wrap if self.packed else True)
    in_flight = property(lambda self: self._in_flight)
    broken = property(lambda self: self._broken)
    signalled_used = property(lambda self: self._signalled_used)
    signalled_used_valid = property(lambda self: self._signalled_used_valid)
    pending = property(lambda self: self._pending)

    # -- setup ------------------------------------------------------------------------------
    def configure(self, desc_gpa: int, driver_gpa: int, device_gpa: int) -> None:
        """Set the ring areas by guest-physical address and bounds-check them once.

        Split: descriptor table / avail ring / used ring; packed: descriptor ring / driver
        event suppression / device event suppression. ``GuestAddressError`` if an area is not
        wholly mapped. For a split ring ``used_idx`` is loaded from ``used->idx`` (as QEMU and
        libvhost-user do on SET_VRING_ADDR), so a reconnecting back-end continues the used
        ring where the previous one left it.

        Spec: virtio 1.2 §2.7 / §2.8 (areas), vhost-user VHOST_USER_SET_VRING_ADDR.
        """
        if self.packed:
            areas = ((desc_gpa, 16 * self.size), (driver_gpa, 4), (device_gpa, 4))
        else:
            lay = self.layout
            areas = ((desc_gpa, lay.desc_bytes), (driver_gpa, lay.avail_bytes),
                     (device_gpa, lay.used_bytes))
        for gpa, length in areas:
            self.memory.check(gpa, length)
        self.desc_gpa, self.driver_gpa, self.device_gpa = desc_gpa, driver_gpa, device_gpa
        if not self.packed:
            self._used_idx = _split.read_used_idx(self)

    def reset(self) -> None:
        """Forget the ring addresses and all state (device reset).

        Spec: virtio 1.2 §2.4 (Device Reset).
        """
        self.desc_gpa = self.driver_gpa = self.device_gpa = None
        self._init_state()

    def get_base(self) -> int:
        """The vhost-user GET_VRING_BASE value.

        Split: ``last_avail_idx``. Packed: bits 0–14 last_avail_idx, bit 15 avail wrap
        counter, bits 16–30 used_idx, bit 31 used wrap counter.
        Spec: vhost-user VHOST_USER_GET_VRING_BASE.
        """
        if not self.packed:
            return self._last_avail_idx
        return (self._last_avail_idx | (int(self._avail_wrap) << 15)
                | (self._used_idx << 16) | (int(self._used_wrap) << 31))

    def set_base(self, value: int) -> None:
        """Apply a vhost-user SET_VRING_BASE value (encoding as :meth:`get_base`).

        Clears ``broken``; ``in_flight`` and the notification shadow restart. A pending partial
        TX chain survives only when ``value`` equals the current base (the same ring resumed
        where it stopped); otherwise it belonged to an old ring and is dropped.
        Spec: vhost-user VHOST_USER_SET_VRING_BASE.
        """
        same = value == self.get_base()
        if self.packed:
            last_avail, used = value & 0x7FFF, (value >> 16) & 0x7FFF
            if last_avail >= self.size or used >= self.size:
                raise ValueError(f"packed base {value:#x} outside queue size {self.size}")
            self._last_avail_idx = last_avail
            self._avail_wrap = bool(value & 0x8000)
            self._used_idx = used
            self._used_wrap = bool(value >> 31 & 1)
        else:
            self._last_avail_idx = value & 0xFFFF
            if self.configured:
                try:
                    self._used_idx = _split.read_used_idx(self)
                except RingAccessError:  # the used ring's region was removed
                    self._broken = ChainError.ADDR
                    raise DriverError(ChainError.ADDR, self.index) from None
        self._broken = None
        self._signalled_used_valid = False
        self._unpop_mark = None
        if not same:
            self._pending = None
        self._in_flight = 1 if self._pending is not None else 0

    # -- state save / restore (restart, device state) ----------------------------------------
    def _restore(self, *, last_avail_idx: int, used_idx: int, avail_wrap: bool,
                 used_wrap: bool, in_flight: int, signalled_used: int,
                 signalled_used_valid: bool, broken, pending) -> None:
        """Set every state field (``VirtqueueBase.load_state`` validated them)."""
        self._last_avail_idx = last_avail_idx
        self._used_idx = used_idx
        self._avail_wrap = avail_wrap
        self._used_wrap = used_wrap
        self._in_flight = in_flight
        self._signalled_used = signalled_used
        self._signalled_used_valid = signalled_used_valid
        self._broken = broken
        self._pending = pending

    # -- chains -----------------------------------------------------------------------------
    def pop(self) -> Chain | None:
        """Walk the next available chain, or return None if the ring is empty.

        Raises ``DriverError`` for a hostile ring (the queue is then broken; see
        docs/internals.md for the check order and what is written).
        Spec: virtio 1.2 §2.7.13.2 / §2.8.21 (receiving used buffers: the device side).
        """
        if self._broken is not None:
            raise DriverError(ChainError.BROKEN, self.index)
        if not self.configured:
            raise DriverError(ChainError.NOT_READY, self.index)
        try:
            chain = _packed.pop(self) if self.packed else _split.pop(self)
            if chain is not None:
                self._unpop_mark = (chain.head, chain.ring_slots, self._last_avail_idx,
                                    self._avail_wrap)
            return chain
        except RingAccessError:
            self._broken = ChainError.ADDR
            self.log.warning("ring area not mapped: queue broken")
            raise DriverError(ChainError.ADDR, self.index) from None

    def pop_batch(self, max_chains: int) -> list[Chain]:
        """Pop up to ``max_chains`` chains. A failure after some chains raises DriverError with
        those chains in ``.chains`` (they are in flight and must still be pushed)."""
        chains: list[Chain] = []
        while len(chains) < max_chains:
            try:
                chain = self.pop()
            except DriverError as exc:
                exc.chains = chains
                raise
            if chain is None:
                break
            chains.append(chain)
        return chains

    def unpop(self, chain: Chain) -> None:
        """Give back ``chain``, the most recently popped one, unconsumed: ``last_avail_idx``
        (and the packed avail wrap counter) step back over it and ``in_flight`` drops by one,
        so the next ``pop`` returns it again (a device that popped a buffer it cannot use
        yet, e.g. vsock RX with nothing to send). ``ValueError`` unless ``chain`` is the
        last chain ``pop``/``pop_batch`` returned and, since then, nothing was pushed for its
        head, no other chain was popped, and no ``tx_to_fd``/``rx_from_fd``, ``unpop``,
        ``set_base``, ``load_state`` or ``reset`` ran. Nothing is written to guest memory.

        Spec: virtio 1.2 §2.7.13.2 / §2.8.21 (a device reads available buffers in order; one
        it has not used may be read again: the driver cannot tell).
        """
        mark = self._unpop_mark
        if (mark is None or mark[0] != chain.head or mark[1] != chain.ring_slots
                or mark[2] != self._last_avail_idx or mark[3] != self._avail_wrap
                or self._in_flight < 1):
            raise ValueError(f"chain {chain.head} is not the last popped, unpushed chain")
        self._unpop_mark = None
        self._rewind(chain.ring_slots, 1)

    def _fail(self, code: ChainError, head: int | None, ring_slots: int) -> DriverError:
        """Latch ``broken``; with a known head/id consume the chain and return it used with
        length 0. Returns the DriverError to raise."""
        self._broken = code
        if head is not None:
            self._advance_avail(ring_slots)
            try:
                self._publish([(head, 0, ring_slots)])
            except RingAccessError:
                self._broken = ChainError.ADDR
        self.log.warning("guest driver error %s at head %s: queue broken", code.name, head)
        return DriverError(code, self.index, head)

    def _advance_avail(self, ring_slots: int) -> None:
        if self.packed:
            self._last_avail_idx += ring_slots
            if self._last_avail_idx >= self.size:
                self._last_avail_idx -= self.size
                self._avail_wrap = not self._avail_wrap
        else:
            self._last_avail_idx = (self._last_avail_idx + 1) & 0xFFFF

    def _rewind(self, ring_slots: int, chains: int) -> None:
        """Give back the last ``chains`` popped chains (``ring_slots`` in total) unconsumed."""
        if chains <= 0:
            return
        if self.packed:
            self._last_avail_idx -= ring_slots
            if self._last_avail_idx < 0:
                self._last_avail_idx += self.size
                self._avail_wrap = not self._avail_wrap
        else:
            self._last_avail_idx = (self._last_avail_idx - chains) & 0xFFFF
        self._in_flight -= chains

    def push_batch(self, items) -> None:
        """Return several chains ``[(head, used_len, ring_slots), ...]`` with one publication."""
        items = list(items)
        if not items:
            return
        self._check_used(items)
        try:
            self._publish(items)
        except RingAccessError:
            self._broken = ChainError.ADDR
            raise DriverError(ChainError.ADDR, self.index) from None
        self._in_flight = max(0, self._in_flight - len(items))

    def _publish(self, items) -> None:
        if self.packed:
            _packed.publish(self, items)
        else:
            _split.publish(self, items)

    # -- notifications ----------------------------------------------------------------------
    def should_notify(self) -> bool:
        """Whether the guest needs an interrupt now (updates ``signalled_used``).

        Spec: virtio 1.2 §2.7.7.2 (split: used_event, VRING_AVAIL_F_NO_INTERRUPT,
        VIRTIO_F_NOTIFY_ON_EMPTY), §2.8.10 (packed driver event suppression).
        """
        if not self.configured:
            return False
        try:
            if self.packed:
                return _packed.should_notify(self)
            return _split.should_notify(self)
        except RingAccessError:
            self._broken = ChainError.ADDR
            raise DriverError(ChainError.ADDR, self.index) from None

    def _event_shadow(self) -> tuple[int, int, bool]:
        """Advance the signalled_used shadow; return (old, new, was_valid)."""
        old, new, valid = self._signalled_used, self._used_idx, self._signalled_used_valid
        self._signalled_used = new
        self._signalled_used_valid = True
        return old, new, valid

    # -- guest memory access for the ring areas ----------------------------------------------
    def _read(self, gpa: int, length: int) -> bytes:
        try:
            return self.memory.read(gpa, length)
        except GuestAddressError:
            raise RingAccessError(gpa) from None

    def _write(self, gpa: int, data: bytes) -> None:
        try:
            self.memory.write(gpa, data)  # marks the dirty log
        except GuestAddressError:
            raise RingAccessError(gpa) from None

    # -- batched data path ------------------------------------------------------------------
    def tx_to_fd(self, fd: int, max_bytes: int | None = None) -> TxResult:
        """Write available chains' readable bytes to ``fd`` with ``writev``; see
        :func:`ring.datapath.tx_to_fd`."""
        try:
            return tx_to_fd(self, fd, max_bytes)
        finally:
            self._unpop_mark = None

    def rx_from_fd(self, fd: int, max_bytes: int | None = None, *, prefix=b"",
                   prefix_len_offset: int | None = None) -> RxResult:
        """Read from ``fd`` into available chains' writable buffers with ``readv``, each
        touched chain optionally starting with ``prefix`` (its payload length patched in at
        ``prefix_len_offset``); see :func:`ring.datapath.rx_from_fd`."""
        try:
            return rx_from_fd(self, fd, max_bytes, prefix=prefix,
                              prefix_len_offset=prefix_len_offset)
        finally:
            self._unpop_mark = None


