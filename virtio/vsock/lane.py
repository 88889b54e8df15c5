"""The vsock TX lane: one connection's stream RW packets, ring to host socket, in one call.

The device's fast path for a guest streaming to the host: the leading run of available TX
chains that are stream RW packets of one connection, or its CREDIT_UPDATEs without payload
(a receiving guest's one packet per credit window: only the credit fields count, as for
every packet of the run) (src_cid = the VM, dst_cid = the host,
the given ports, the header whole in the first readable buffer, ``len`` within the chain,
cumulative ``len`` within the credit) is taken off the ring, their payloads go to the host
socket with one ``sendmsg`` straight from guest memory, the chains are completed (used
length 0) and the notify decision is made (signalling the queue's call eventfd). The first
chain that does not belong to the run is given back untouched, so the device's general path
(``VsockDevice._tx_packets``, which validates in full and gives the usual errors) sees it
next. What the socket did not take is returned as a copy (``tail``): credit bounds it.

Python keeps every decision: the caller names the connection and its credit before the call
and applies the outcome afterwards (``Connection.rw_lane``, ``VsockMuxer.settle``).

Two implementations with one behaviour (STYLE R9): :class:`PyTxLane` over any ring (the
reference, used with ``VMCHANNEL_RING=py``) and :class:`CTxLane`, ``vs_tx_lane`` in
csrc/vsock_path.c over ``ring.cring`` queues; tests/property/test_vsock_tx_lane.py checks
them against each other, hostile rings included.

Spec: virtio 1.2 §5.10.6 (packet = 44-byte header + payload in one chain), §5.10.6.1 (TX
buffers are used without being written), §5.10.6.3.1 (credit), §5.10.6.4 (stream data).
"""

from __future__ import annotations

import enum
import errno as _errno
import os
import socket
import sys
from functools import partial
from typing import Any, NamedTuple, Sequence

from ring.cstruct import field_codec
from ring.errors import DriverError

from .conn import _tail, credit_update_due
from .wire import HOST_CID, Op, Type, VsockHeader

__all__ = ["Stop", "LaneResult", "LaneUpdate", "PyTxLane", "CTxLane", "make_tx_lane",
           "LANE_CHAINS", "Put", "PutResult", "put_packet_py", "CPut", "make_put"]

HDR = VsockHeader.SIZE
#: Most chains one call takes, and most payload pieces one ``sendmsg`` gathers (IOV_MAX).
LANE_CHAINS = 256
LANE_IOV = 1024
_SEND_FLAGS = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT
_ONE = (1).to_bytes(8, sys.byteorder)
_unpack = VsockHeader.FMT.unpack_from
_pack = VsockHeader.FMT.pack
_RW, _STREAM, _HOST = int(Op.RW), int(Type.STREAM), int(HOST_CID)
_CREDIT_UPDATE = int(Op.CREDIT_UPDATE)
_U32 = 0xFFFFFFFF


class Stop(enum.IntEnum):
    """Why the run ended (csrc/vsock_path.h ``VS_STOP_*``)."""

    EMPTY = 0  # no more available chains
    OTHER = 1  # the next chain is not in the run: given back for the general path
    CREDIT = 2  # the next packet would exceed the credit: given back
    FULL = 3  # max_chains taken, or the gather list is full
    BROKEN = 4  # the pop failed: ``broken`` holds the DriverError


_STOPS = tuple(Stop)  # by value: no enum call per lane run


class LaneResult(NamedTuple):
    """Outcome of one lane call. ``peer_buf_alloc`` / ``peer_fwd_cnt``: the last taken
    packet's (else the ones given); ``credit_changed``: some packet's pair differed from
    the one before it; ``notify``: the ring asked for (and got) a used buffer notification;
    ``error`` / ``call_errno``: errno of a failed ``sendmsg`` / call eventfd write;
    ``credit_updates``: how many of the chains were CREDIT_UPDATEs; ``put``: see below.

    ``update`` (a `LaneUpdate`, or None) lets a run that was quiet (every packet carried
    the credit fields given, no tail, no send error) end with the CREDIT_UPDATE decision
    on our counters after it (`credit_update_due` on ``recv_cnt + bytes`` and ``fwd_cnt +
    written``) and, if one is due or already owed, that header (our ``buf_alloc``, the new
    fwd_cnt) put into the RX queue as `put_packet_py` does: the caller then applies
    ``Connection.rw_lane`` and, for a ``Put.DONE``, ``credit_update_sent``, with no
    separate put call (Spec: virtio 1.2 §5.10.6.3)."""

    chains: int
    stop: Stop
    bytes: int
    written: int
    tail: bytes
    error: int | None
    broken: DriverError | None
    peer_buf_alloc: int
    peer_fwd_cnt: int
    credit_changed: bool
    notify: bool
    call_errno: int | None
    credit_updates: int = 0  # of the chains, CREDIT_UPDATEs (len 0)
    #: the CREDIT_UPDATE put after a quiet run (``update`` given): None (not tried: no
    #: update given, the run not quiet, or none due or owed), else its `PutResult`
    put: Any = None


class LaneUpdate(NamedTuple):
    """The CREDIT_UPDATE a TX lane run may make due (see `LaneResult`): the RX queue, our
    receive window and u32 counters before the run, the threshold, and whether an update
    is owed already. Give it only when the update, once due, is the next packet the
    guest gets from this VM (`VsockMuxer.lone_update_possible`)."""

    rxq: Any
    buf_alloc: int
    recv_cnt: int
    fwd_cnt: int
    adv_fwd_cnt: int
    threshold: int
    owed: bool


def _update_packet(cid: int, host_port: int, guest_port: int, buf_alloc: int,
                   fwd_cnt: int) -> bytes:
    """A stream CREDIT_UPDATE header from the host (Spec: virtio 1.2 §5.10.6.3)."""
    return _pack(_HOST, cid, host_port, guest_port, 0, _STREAM, _CREDIT_UPDATE, 0,
                 buf_alloc, fwd_cnt)


def _signal(fd: int | None) -> int | None:
    """Add 1 to the call eventfd (EAGAIN: already signalled); the errno of a failure."""
    if fd is None:
        return None
    try:
        os.write(fd, _ONE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        return exc.errno
    return None


class PyTxLane:
    """The reference lane over any ring (see module docstring). ``tail_cap``: most bytes the
    tail may hold; the credit is clamped to it."""

    def __init__(self, tail_cap: int) -> None:
        self.tail_cap = tail_cap

    def run(self, vq: Any, sock: socket.socket, cid: int, host_port: int, guest_port: int,
            credit: int, peer_buf_alloc: int, peer_fwd_cnt: int,
            max_chains: int = LANE_CHAINS, update: LaneUpdate | None = None) -> LaneResult:
        credit = min(credit, self.tail_cap)
        max_chains = min(max_chains, LANE_CHAINS)
        ba, fc = peer_buf_alloc, peer_fwd_cnt
        if vq.pending is not None:
            return LaneResult(0, Stop.OTHER, 0, 0, b"", None, None, ba, fc, False, False,
                              None)
        taken: list[tuple[int, int, int]] = []
        views: list[memoryview] = []
        total = updates = 0
        changed = False
        stop, broken = Stop.EMPTY, None
        while True:
            if len(taken) >= max_chains:
                stop = Stop.FULL
                break
            try:
                chain = vq.pop()
            except DriverError as exc:
                stop, broken = Stop.BROKEN, exc
                break
            if chain is None:
                break
            readable = chain.readable
            if not readable or len(readable[0]) < HDR:
                why = Stop.OTHER
            else:
                why, len_, pieces, h = _classify(chain, cid, host_port, guest_port,
                                                 credit - total, LANE_IOV - len(views))
            if why is not None:
                vq.unpop(chain)
                stop = why
                break
            if h[8] != ba or h[9] != fc:
                changed = True
            ba, fc = h[8], h[9]
            total += len_
            updates += h[6] == _CREDIT_UPDATE
            views += pieces
            taken.append((chain.head, 0, chain.ring_slots))
        if not taken:
            return LaneResult(0, stop, 0, 0, b"", None, broken, ba, fc, False, False, None)
        written, error = 0, None
        if total:
            try:
                written = sock.sendmsg(views, (), _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                error = exc.errno or _errno.EIO
        tail = _tail(views, written) if written < total else b""
        vq.push_batch(taken)
        notify = vq.should_notify()
        call_errno = _signal(vq.call_fd) if notify else None
        put = None
        if update is not None and not changed and not tail and error is None:
            fwd = (update.fwd_cnt + written) & _U32
            if update.owed or credit_update_due(update.buf_alloc,
                                                (update.recv_cnt + total) & _U32,
                                                update.adv_fwd_cnt, fwd, update.threshold):
                put = put_packet_py(update.rxq, _update_packet(cid, host_port, guest_port,
                                                               update.buf_alloc, fwd))
        return LaneResult(len(taken), stop, total, written, tail, error, broken, ba, fc,
                          changed, notify, call_errno, updates, put)


def _classify(chain: Any, cid: int, host_port: int, guest_port: int, credit_left: int,
              iov_room: int) -> tuple[Stop | None, int, list, tuple]:
    """``(None, len, payload views, header fields)`` if the chain belongs to the run, else
    ``(Stop, ...)``. The header is unpacked once from guest memory (a copy)."""
    readable = chain.readable
    first = readable[0]
    h = _unpack(first)
    src_cid, dst_cid, src_port, dst_port, len_, type_, op = h[:7]
    if ((op != _RW and (op != _CREDIT_UPDATE or len_)) or type_ != _STREAM
            or src_cid != cid or dst_cid != _HOST or dst_port != host_port
            or src_port != guest_port):
        return Stop.OTHER, 0, [], h
    if len_ > chain.readable_bytes - HDR:
        return Stop.OTHER, 0, [], h
    if len_ > credit_left:
        return Stop.CREDIT, 0, [], h
    pieces = payload_views(readable, len_)
    if len(pieces) > iov_room:
        return Stop.FULL, 0, [], h
    return None, len_, pieces, h


def payload_views(readable: Sequence[memoryview], len_: int) -> list[memoryview] | None:
    """The ``len_`` payload bytes after the header (no copy), or None if the chain's
    readable buffers hold fewer (the full check in ``muxer.guest_tx`` then drops it)."""
    first = readable[0]
    out = [first[HDR:HDR + len_]] if len(first) > HDR and len_ else []
    need = len_ - (len(out[0]) if out else 0)
    for view in readable[1:]:
        if need <= 0:
            break
        piece = view if len(view) <= need else view[:need]
        out.append(piece)
        need -= len(piece)
    return None if need > 0 else out


class CTxLane:
    """The lane in C (``vs_tx_lane``, csrc/vsock_path.c) over ``ring.cring`` queues; same
    contract and results as :class:`PyTxLane`. The queue's C state comes from
    ``Virtqueue.c_state`` (its region table current before each call)."""

    def __init__(self, tail_cap: int) -> None:
        from ring.cring import ffi, lib  # C only when it is used (VMCHANNEL_RING=py)

        self.tail_cap = tail_cap
        self._ffi, self._call = ffi, lib.vs_tx_lane
        self._lane = lane = ffi.new("struct vs_tx_lane *")
        self._tail = bytearray(max(1, tail_cap))
        self._tail_c = ffi.from_buffer(self._tail)
        lane.tail = self._tail_c
        lane.tail_cap = tail_cap
        self._put = ffi.new("struct vs_rx_put *")  # the update's working room
        self._null = ffi.NULL
        lane.put = self._put
        #: the inputs that stay the same from run to run of one connection, as last
        #: written into the struct (a cffi field write costs about as much as a Python
        #: call: a streaming connection runs the lane once per credit window)
        self._fixed: tuple | None = None
        self._update_fixed: tuple | None = None
        self._put_q = None  # the put_q pointer as last written (None: never)
        view = ffi.buffer(lane)
        #: every per-run input with one pack (the struct keeps them contiguous) and every
        #: output with one unpack of the struct's memory (ring/cstruct.py)
        codec, offset = field_codec(ffi, "struct vs_tx_lane", _INPUT_FIELDS)
        self.pack_inputs = partial(codec.pack_into, view, offset)
        codec, offset = field_codec(ffi, "struct vs_tx_lane", _OUTPUT_FIELDS)
        self.unpack_outputs = self._outputs = partial(codec.unpack_from, view, offset)
        #: ``c_call(q, c_lane)``: the C entry point and this lane's struct, for a caller
        #: that packs the inputs itself (the device's armed stream, device.py)
        self.c_call, self.c_lane = self._call, lane

    def fix(self, cid: int, host_port: int, guest_port: int, fd: int, max_chains: int,
            put_q: Any = None, buf_alloc: int = 0, threshold: int = 0) -> None:
        """Write the inputs that stay the same from run to run (and, with ``put_q`` (a
        ``struct vr_queue *``), the CREDIT_UPDATE put's) unless they are there already."""
        fixed = (cid, host_port, guest_port, fd, max_chains)
        lane = self._lane
        if fixed != self._fixed:
            lane.cid, lane.host_port, lane.guest_port, lane.fd = fixed[:4]
            lane.max_chains = max_chains if max_chains > 0 else 0
            self._fixed = fixed
        if put_q is None:
            put_q = self._null
        elif (buf_alloc, threshold) != self._update_fixed:
            lane.buf_alloc = buf_alloc
            lane.update_threshold = threshold
            self._update_fixed = (buf_alloc, threshold)
        if put_q is not self._put_q:
            lane.put_q = put_q
            self._put_q = put_q

    def prepare(self, sock: socket.socket, cid: int, host_port: int, guest_port: int,
                max_chains: int = LANE_CHAINS) -> Any:
        """The ``struct vs_tx_lane *`` with one connection's fixed inputs written and no
        CREDIT_UPDATE put, for a C caller that sets the credit fields itself
        (virtio/vsock/stream_loop.py)."""
        self.fix(cid, host_port, guest_port, sock.fileno(), max_chains)
        return self._lane

    def run(self, vq: Any, sock: socket.socket, cid: int, host_port: int, guest_port: int,
            credit: int, peer_buf_alloc: int, peer_fwd_cnt: int,
            max_chains: int = LANE_CHAINS, update: LaneUpdate | None = None) -> LaneResult:
        q, _scratch = vq.c_state()
        if update is None:
            self.fix(cid, host_port, guest_port, sock.fileno(), max_chains)
            self.pack_inputs(credit if credit > 0 else 0, peer_buf_alloc, peer_fwd_cnt, 0, 0,
                             0, 0)
            rxq = None
        else:
            rxq = update.rxq
            self.fix(cid, host_port, guest_port, sock.fileno(), max_chains,
                     rxq.c_state()[0], update.buf_alloc, update.threshold)
            self.pack_inputs(credit if credit > 0 else 0, peer_buf_alloc, peer_fwd_cnt,
                             update.recv_cnt, update.fwd_cnt, update.adv_fwd_cnt,
                             1 if update.owed else 0)
        rc = self._call(q, self._lane)
        if rc < 0:
            from ring.cring import _raise_for
            raise _raise_for(rc, vq.index)
        return self.result(self._outputs(), vq, rxq)

    def result(self, outputs: tuple, vq: Any, rxq: Any = None) -> LaneResult:
        """The `LaneResult` of a call on ``vq`` whose outputs (``unpack_outputs()``) are
        ``outputs``; ``rxq``: the RX queue of the update put (None: no update given)."""
        (ba, fc, put_status, chains, stop, nbytes, written, tail_len, error, broken, changed,
         notify, call_errno, updates) = outputs
        if rxq is not None and put_status != -1:
            put = _put_outcome(self._put, put_status, rxq)
            return _lane_result((chains, _STOPS[stop], nbytes, written, b"", None,
                                 vq._error(broken) if stop == 4 else None, ba, fc, False,
                                 notify != 0, call_errno or None, updates, put))
        if stop == 4 or tail_len or error or call_errno:
            return _lane_result((chains, _STOPS[stop], nbytes, written,
                                 bytes(memoryview(self._tail)[:tail_len]) if tail_len else b"",
                                 error or None, vq._error(broken) if stop == 4 else None,
                                 ba, fc, changed != 0, notify != 0, call_errno or None,
                                 updates, None))
        return _lane_result((chains, _STOPS[stop], nbytes, written, b"", None, None, ba, fc,
                             changed != 0, notify != 0, None, updates, None))


#: a LaneResult from a tuple of all its fields, without the NamedTuple's Python __new__
_lane_result = partial(tuple.__new__, LaneResult)

#: The inputs ``CTxLane.run`` writes before every call, contiguous in the struct, and the
#: fields it reads after a call, in struct order, with their ``struct`` codes
#: (csrc/vsock_path.h ``struct vs_tx_lane``; ``peer_buf_alloc``/``peer_fwd_cnt`` are both).
_INPUT_FIELDS = (("credit", "Q"), ("peer_buf_alloc", "I"), ("peer_fwd_cnt", "I"),
                 ("recv_cnt", "I"), ("fwd_cnt", "I"), ("adv_fwd_cnt", "I"),
                 ("update_owed", "i"))
_OUTPUT_FIELDS = (("peer_buf_alloc", "I"), ("peer_fwd_cnt", "I"), ("put_status", "i"),
                  ("chains", "I"), ("stop", "I"), ("bytes", "Q"), ("written", "Q"),
                  ("tail_len", "Q"), ("error", "i"), ("broken", "i"),
                  ("credit_changed", "i"), ("notify", "i"), ("call_errno", "i"),
                  ("credit_updates", "I"))


def make_tx_lane(vq: Any, tail_cap: int) -> PyTxLane | CTxLane:
    """The lane for ``vq``'s implementation: C for ``ring.cring`` queues, else Python."""
    try:
        from ring.cring import Virtqueue as CVirtqueue
    except ImportError:
        return PyTxLane(tail_cap)
    return CTxLane(tail_cap) if isinstance(vq, CVirtqueue) else PyTxLane(tail_cap)


# -- one control packet into the RX queue -------------------------------------------------------

class Put(enum.IntEnum):
    """Outcome of a packet put (csrc/vsock_path.h ``VS_PUT_*``)."""

    EMPTY = 0  # no RX buffer: nothing done
    DONE = 1  # written, used length 44
    SMALL = 2  # the next buffer cannot hold a header: given back for the general path
    BROKEN = 3  # the pop failed: ``broken`` holds the DriverError


class PutResult(NamedTuple):
    status: Put
    notify: bool
    call_errno: int | None
    broken: DriverError | None


def put_packet_py(vq: Any, packet: bytes) -> PutResult:
    """The reference: the 44-byte ``packet`` (a header without payload) into the next RX
    chain, published with used length 44, the notify decision made and signalled.

    Spec: virtio 1.2 §5.10.6 (one packet per RX buffer), §2.7.7 (used buffer notification)."""
    try:
        chain = vq.pop()
    except DriverError as exc:
        return PutResult(Put.BROKEN, False, None, exc)
    if chain is None:
        return PutResult(Put.EMPTY, False, None, None)
    if chain.writable_bytes < HDR:
        vq.unpop(chain)
        return PutResult(Put.SMALL, False, None, None)
    vq.fill(chain, packet)
    vq.push_batch([(chain.head, HDR, chain.ring_slots)])
    notify = vq.should_notify()
    return PutResult(Put.DONE, notify, _signal(vq.call_fd) if notify else None, None)


class CPut:
    """``vs_rx_put`` (csrc/vsock_path.c) over ``ring.cring`` queues, the twin of
    :func:`put_packet_py`."""

    def __init__(self) -> None:
        from ring.cring import ffi, lib

        self._put = ffi.new("struct vs_rx_put *")
        self._packet = ffi.buffer(self._put.packet)
        self._call = lib.vs_rx_put

    def __call__(self, vq: Any, packet: bytes) -> PutResult:
        q, _scratch = vq.c_state()
        put = self._put
        self._packet[:] = packet
        return _put_outcome(put, self._call(q, put), vq)


#: a PutResult from a tuple of all its fields, without the NamedTuple's Python __new__
_put_result = partial(tuple.__new__, PutResult)


def _put_outcome(put: Any, rc: int, vq: Any) -> PutResult:
    """The `PutResult` of ``vs_rx_put`` returning ``rc`` on ``vq`` with working room
    ``put`` (a negative VR_E_* raises, as every C ring call)."""
    if rc < 0:
        from ring.cring import _raise_for
        raise _raise_for(rc, vq.index)
    if rc == 1:  # Put.DONE
        return _put_result((Put.DONE, put.notify != 0, put.call_errno or None, None))
    broken = vq._error(put.broken) if rc == Put.BROKEN else None
    return PutResult(Put(rc), False, None, broken)


def make_put(vq: Any):
    """``put(vq, packet) -> PutResult`` for ``vq``'s implementation."""
    try:
        from ring.cring import Virtqueue as CVirtqueue
    except ImportError:
        return put_packet_py
    return CPut() if isinstance(vq, CVirtqueue) else put_packet_py
