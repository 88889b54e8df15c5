"""The stream pump over C rings: ``vr_pump_tx`` / ``vr_pump_rx`` (csrc/vring.c).

Same attributes, flags and totals as the reference :class:`ring.pump.StreamPump`; one
event costs one Python method and one crossing into C. The attributes live in an
``ffi.new``'d ``struct vr_pump``; ``tx`` / ``rx`` must be :class:`ring.cring.Virtqueue`
objects over one :class:`~ring.memory.GuestMemory`. Before each call the pump checks that
memory's generation once (the rings' region tables are rebuilt when it moved, as their own
data-path calls do), so C never walks a stale table.

Spec: virtio 1.2 §5.3.6, §2.7.7 (as ring.pump); STYLE R7 (the cffi boundary).
"""

from __future__ import annotations

from typing import Any

from ring.cring import Virtqueue, _BROKEN, _raise_for, ffi, lib
from ring.pump import DEFAULT_RX_BUDGET, DEFAULT_TX_BUDGET
from ring.types import RxResult, TxResult

__all__ = ["StreamPump"]

_vr_pump_tx = lib.vr_pump_tx
_vr_pump_rx = lib.vr_pump_rx


class StreamPump:
    """C stream pump (see :class:`ring.pump.StreamPump` for the contract)."""

    __slots__ = ("_p", "_tx", "_rx", "_memory", "_generation", "_log")

    def __init__(self) -> None:
        p = ffi.new("struct vr_pump *")
        p.write_fd = p.read_fd = -1
        p.tx_budget = DEFAULT_TX_BUDGET
        p.rx_budget = DEFAULT_RX_BUDGET
        self._p = p
        self._tx: Virtqueue | None = None
        self._rx: Virtqueue | None = None
        self._memory = None
        self._generation = -1
        self._log = None

    # -- the queues -----------------------------------------------------------------------
    def _attach(self, vq: Virtqueue | None) -> tuple[Any, Any]:
        """``(struct vr_queue *, struct vr_scratch *)`` for ``vq`` (NULLs for None)."""
        if vq is None:
            return ffi.NULL, ffi.NULL
        if not isinstance(vq, Virtqueue):
            raise TypeError(f"the C pump needs ring.cring queues, not {type(vq).__name__}")
        other = self._rx if vq is not self._rx else self._tx
        if other is not None and other.memory is not vq.memory:
            raise ValueError("the pump's queues must share one GuestMemory")
        state = vq.c_state()  # region table current, scratch made
        self._memory = vq.memory
        self._generation = vq.memory.generation
        self._log = vq.memory.log
        return state

    @property
    def tx(self) -> Virtqueue | None:
        return self._tx

    @tx.setter
    def tx(self, vq: Virtqueue | None) -> None:
        self._p.tx, self._p.tx_scratch = self._attach(vq)
        self._tx = vq
        self._forget_memory()

    @property
    def rx(self) -> Virtqueue | None:
        return self._rx

    @rx.setter
    def rx(self, vq: Virtqueue | None) -> None:
        self._p.rx, self._p.rx_scratch = self._attach(vq)
        self._rx = vq
        self._forget_memory()

    def _forget_memory(self) -> None:
        if self._tx is None and self._rx is None:
            self._memory = None

    def _resync(self) -> None:
        """Guest memory changed: rebuild the rings' region tables before C runs."""
        for vq in (self._tx, self._rx):
            if vq is not None:
                vq._datapath_slow()
        memory = self._memory
        self._generation = memory.generation
        self._log = memory.log

    # -- plain settings and totals ----------------------------------------------------------
    def _field(name: str, doc: str):  # noqa: N805 (a class-body helper)
        return property(lambda self: int(getattr(self._p, name)),
                        lambda self, value: setattr(self._p, name, value), doc=doc)

    write_fd = _field("write_fd", "where the guest's bytes go, -1: no host peer")
    read_fd = _field("read_fd", "what is read for the guest, -1: not wanted now")
    tx_budget = _field("tx_budget", "bytes per tx step")
    rx_budget = _field("rx_budget", "bytes per rx step")
    follow_rx_max = _field("follow_rx_max", "run the rx step after a tx step of 1..this bytes")
    bytes_from_guest = _field("bytes_from_guest", "running total, guest → host")
    bytes_to_guest = _field("bytes_to_guest", "running total, host → guest")
    call_errno = _field("call_errno", "errno of the last failed call eventfd write")
    kick_errno = _field("kick_errno", "errno of the last failed kick eventfd read")
    del _field

    @property
    def ran_rx(self) -> bool:
        return bool(self._p.ran_rx)

    @property
    def tx_result(self) -> TxResult:
        out = self._p.tx_out
        return TxResult(out.bytes, out.chains, out.notify != 0, out.blocked != 0,
                        out.error or None, _BROKEN[out.broken] if out.broken else None)

    @property
    def rx_result(self) -> RxResult:
        out = self._p.rx_out
        return RxResult(out.bytes, out.chains, out.notify != 0, out.eof != 0,
                        out.starved != 0, out.error or None, out.drained != 0,
                        _BROKEN[out.broken] if out.broken else None)

    # -- the events -----------------------------------------------------------------------
    def pump_tx(self, kick_fd: int = -1) -> int:
        """Drain ``kick_fd`` (-1: none), guest → host, then the rx step after a small write;
        :class:`PumpFlag` bits."""
        memory = self._memory
        if memory is None:
            return _vr_pump_tx(self._p, kick_fd) if kick_fd >= 0 else 0
        if memory.generation != self._generation or memory.log is not self._log:
            self._resync()
        tx, rx = self._tx, self._rx
        if tx is not None:
            tx._unpop_mark = None  # a pop before this call can no longer be given back
        if rx is not None:
            rx._unpop_mark = None
        rc = _vr_pump_tx(self._p, kick_fd)
        if rc < 0:
            raise _raise_for(rc, tx.index if self._p.ran_rx == 0 or rx is None else rx.index)
        return rc

    def pump_rx(self) -> int:
        """Host → guest; :class:`PumpFlag` bits."""
        memory = self._memory
        rx = self._rx
        if memory is None or rx is None:
            return 0
        if memory.generation != self._generation or memory.log is not self._log:
            self._resync()
        rx._unpop_mark = None
        rc = _vr_pump_rx(self._p)
        if rc < 0:
            raise _raise_for(rc, rx.index)
        return rc
