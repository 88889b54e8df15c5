"""The vsock RX pump: one host-readable event of a stream connection, socket to RX ring, in
one call.

The device's fast path for a host streaming to the guest: when the host socket of an
established stream connection becomes readable and nothing else is owed to the guest (see
`VsockMuxer.rx_lane_conn`), the socket is read straight into as many RX chains as the
guest's credit allows, each chain holding one RW packet (the 44-byte header, its ``len``
patched with the chain's payload, then the payload), the chains are published, the notify
decision is made and the queue's call eventfd is signalled. The connection's counters are
applied afterwards (`VsockMuxer.rx_lane_done`), and the muxer reconciles only when the
outcome changes what it derives (the socket not drained, the credit used up, EOF, an
error, a broken ring).

Two implementations with one behaviour (STYLE R9): :func:`rx_pump_py` over any ring (the
reference, ``VMCHANNEL_RING=py``) and :class:`CRxPump`, ``vs_rx_pump`` in
csrc/vsock_path.c over ``ring.cring`` queues; tests/property/test_vsock_rx_pump.py checks
them against each other, hostile rings included.

Spec: virtio 1.2 §5.10.6 (one packet per RX buffer, header then payload), §5.10.6.3 (every
header carries buf_alloc/fwd_cnt; RW within the guest's credit), §2.7.7 (used buffer
notification).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

from ring.cstruct import field_codec

from .lane import _signal
from .wire import HOST_CID, Op, Type, VsockHeader

__all__ = ["RxPumpResult", "rx_pump_py", "CRxPump", "make_rx_pump", "LEN_OFFSET"]

#: offset of le32 len in struct virtio_vsock_hdr (Spec: virtio 1.2 §5.10.6)
LEN_OFFSET = 24
_pack = VsockHeader.FMT.pack
_HOST, _STREAM, _RW = int(HOST_CID), int(Type.STREAM), int(Op.RW)


class RxPumpResult(NamedTuple):
    """Outcome of one pump call: the ``rx_from_fd`` fields (payload ``bytes``, ``chains``
    published, ``notify`` (the ring asked for and got a notification), ``eof``,
    ``starved``, ``error``, ``drained``, ``broken``) and ``call_errno`` (errno of a failed
    call eventfd write)."""

    bytes: int
    chains: int
    notify: bool
    eof: bool
    starved: bool
    error: int | None
    drained: bool
    broken: Any  # the ring's ChainError code, as RxResult.broken
    call_errno: int | None


_NOTHING = RxPumpResult(0, 0, False, False, False, None, False, None, None)


def rx_pump_py(vq: Any, fd: int, cid: int, host_port: int, guest_port: int, buf_alloc: int,
               fwd_cnt: int, credit: int) -> RxPumpResult:
    """The reference pump (see module docstring): ``credit`` payload bytes at most, nothing
    read when it is 0."""
    if credit <= 0:
        return _NOTHING
    template = _pack(_HOST, cid, host_port, guest_port, 0, _STREAM, _RW, 0, buf_alloc,
                     fwd_cnt)
    res = vq.rx_from_fd(fd, credit, prefix=template, prefix_len_offset=LEN_OFFSET)
    call_errno = _signal(vq.call_fd) if res.notify else None
    return RxPumpResult(res.bytes, res.chains, res.notify, res.eof, res.starved, res.error,
                        res.drained, res.broken, call_errno)


class CRxPump:
    """``vs_rx_pump`` (csrc/vsock_path.c) over ``ring.cring`` queues, the twin of
    :func:`rx_pump_py`. The queue's C state comes from ``Virtqueue.c_state`` (its region
    table current before each call)."""

    def __init__(self) -> None:
        from ring.cring import _BROKEN, ffi, lib  # C only when it is used

        self._p = ffi.new("struct vs_rx_pump *")
        self._call = lib.vs_rx_pump
        self._broken = _BROKEN
        # every input with one pack, every output with one unpack (ring/cstruct.py)
        view = ffi.buffer(self._p)
        codec, offset = field_codec(ffi, "struct vs_rx_pump", _INPUT_FIELDS)
        self.pack_inputs = self._inputs = partial(codec.pack_into, view, offset)
        codec, offset = field_codec(ffi, "struct vs_rx_pump", _OUTPUT_FIELDS)
        self.unpack_outputs = self._outputs = partial(codec.unpack_from, view, offset)
        #: ``c_call(q, scratch, c_pump)``: the C entry point and this pump's struct, for a
        #: caller that packs the inputs itself (the device's armed stream, device.py)
        self.c_call, self.c_pump = self._call, self._p

    def __call__(self, vq: Any, fd: int, cid: int, host_port: int, guest_port: int,
                 buf_alloc: int, fwd_cnt: int, credit: int) -> RxPumpResult:
        if credit <= 0:
            return _NOTHING
        q, s = vq.c_state()
        self._inputs(cid, host_port, guest_port, buf_alloc, fwd_cnt, credit, fd)
        rc = self._call(q, s, self._p)
        if rc < 0:
            from ring.cring import _raise_for
            raise _raise_for(rc, vq.index)
        return self.result(self._outputs())

    def prepare(self, cid: int, host_port: int, guest_port: int, buf_alloc: int,
                fd: int) -> Any:
        """The ``struct vs_rx_pump *`` with one connection's fixed inputs written, for a C
        caller that sets ``credit`` and ``fwd_cnt`` itself (virtio/vsock/stream_loop.py);
        its outputs then read with :meth:`last_result`."""
        self._inputs(cid, host_port, guest_port, buf_alloc, 0, 0, fd)
        return self._p

    def last_result(self) -> RxPumpResult:
        """The outputs of the last ``vs_rx_pump`` call on this struct."""
        return self.result(self._outputs())

    def result(self, outputs: tuple) -> RxPumpResult:
        """The `RxPumpResult` of a call whose outputs (``unpack_outputs()``) are
        ``outputs``."""
        call_errno, nbytes, chains, notify, eof, starved, error, drained, broken = outputs
        if broken or error or call_errno:
            return _result((nbytes, chains, notify != 0, eof != 0, starved != 0,
                            error or None, drained != 0,
                            self._broken[broken] if broken else None, call_errno or None))
        return _result((nbytes, chains, notify != 0, eof != 0, starved != 0, None,
                        drained != 0, None, None))


_result = partial(tuple.__new__, RxPumpResult)  # a RxPumpResult without its Python __new__

#: ``struct vs_rx_pump`` (csrc/vsock_path.h): the inputs and the outputs, in struct order
_INPUT_FIELDS = (("cid", "Q"), ("host_port", "I"), ("guest_port", "I"), ("buf_alloc", "I"),
                 ("fwd_cnt", "I"), ("credit", "Q"), ("fd", "i"))
_OUTPUT_FIELDS = (("call_errno", "i"), ("out.bytes", "Q"), ("out.chains", "I"),
                  ("out.notify", "i"), ("out.eof", "i"), ("out.starved", "i"),
                  ("out.error", "i"), ("out.drained", "i"), ("out.broken", "i"))


def make_rx_pump(vq: Any):
    """``pump(vq, fd, cid, host_port, guest_port, buf_alloc, fwd_cnt, credit)`` for
    ``vq``'s implementation: C for ``ring.cring`` queues, else Python."""
    try:
        from ring.cring import Virtqueue as CVirtqueue
    except ImportError:
        return rx_pump_py
    return CRxPump() if isinstance(vq, CVirtqueue) else rx_pump_py
