"""The C stream loop: one established host->guest stream served in C, event after event,
until anything else happens.

A stream the host keeps writing into costs the back-end two events per credit window: the
guest's CREDIT_UPDATE on the TX queue and the host socket becoming readable. Served one by
one from the Python event loop (`VsockDevice._tx_lane`, `VsockDevice.host_readable`), each
window also costs some fifty Python calls, which bound the row "vsock host->guest" of the
bench at about a third of raw AF_UNIX; with no Python per window it reaches the target (see
bench/results/ANALYSIS.md, "Seventh session"). So once a connection is in that steady state,
the device hands both events to ``vs_stream_serve`` (csrc/vsock_stream.c) and waits inside
it: the C loop takes the guest's CREDIT_UPDATEs with the TX lane (no payload credit: any
packet with payload stops it untouched), reads the socket with the RX pump while the guest
has credit, and returns when the Python loop has anything to do (its epoll fd is part of the
wait), when its next timer is due, on a signal, and on anything outside the steady state (a
TX packet the lane does not take, a read that did not drain cleanly: EOF, an error, no
buffers, the credit used up with bytes left; a broken ring). Python then applies what the
loop did in one step (`VsockMuxer.stream_loop_done`) and hands the event that ended it to
the general path, so every decision outside the steady state stays Python's (STYLE R7,
widened: C runs the steady state's events, Python decides when it may and what follows).

Single-threaded: the C loop runs inside a Python callback, so while it runs no other
Python runs, and guest memory, the queues and the connection have one owner.

Spec: virtio 1.2 §5.10.6 (one packet per RX buffer), §5.10.6.3 (credit).
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["StreamLoop", "StreamOutcome", "Reason"]


class Reason:
    """Why ``vs_stream_serve`` returned (csrc/vsock_stream.h ``VS_STREAM_*``)."""

    YIELD = 0  # the Python loop has work
    TIMEOUT = 1  # its next timer is due
    SIGNAL = 2  # epoll_wait was interrupted
    TX = 3  # a TX packet the lane does not take waits: the general TX path serves it
    TX_FAILED = 4  # the lane failed (rc) or the TX ring broke (the lane's broken code)
    RX = 5  # the last pump did not drain cleanly: its outputs, uncounted, for Python
    ERROR = 6  # epoll failed (errno in ``error``)


class StreamOutcome(NamedTuple):
    """What one call did: ``reason``; the counters to apply (``rx_packets``,
    ``tx_packets``, ``bytes``, ``tx_cnt``, ``peer_buf_alloc``, ``peer_fwd_cnt``,
    ``credit_changed``); ``rc`` (a negative VR_E_* of a failed lane or pump call, else 0),
    ``error`` (errno of a failed epoll call, else 0), ``events`` (wake-ups served)."""

    reason: int
    rx_packets: int
    tx_packets: int
    bytes: int
    tx_cnt: int
    peer_buf_alloc: int
    peer_fwd_cnt: int
    credit_changed: bool
    rc: int
    error: int
    events: int


class StreamLoop:
    """The ``struct vs_stream`` of one device and the call into ``vs_stream_serve``."""

    def __init__(self) -> None:
        from ring.cring import ffi, lib  # C only when it is used

        self._s = ffi.new("struct vs_stream *")
        self._serve = lib.vs_stream_serve

    def serve(self, tx_vq: Any, lane: Any, rx_vq: Any, pump: Any, conn: Any, kick_fd: int,
              sock_fd: int, loop_fd: int, budget_s: float) -> StreamOutcome:
        """Serve ``conn`` (its counters read here, not written: see `StreamOutcome`) with
        the TX lane struct ``lane`` and RX pump struct ``pump`` (their fixed inputs
        written: ``CTxLane.prepare``, ``CRxPump.prepare``), until it returns. ``budget_s``:
        the longest wait (-1: none), as `EventLoop.wait_budget` gives it."""
        s = self._s
        s.kick_fd, s.sock_fd, s.loop_fd = kick_fd, sock_fd, loop_fd
        s.timeout_ms = -1 if budget_s < 0 else int(budget_s * 1000) + 1
        s.tx_cnt, s.fwd_cnt = conn.tx_cnt, conn.fwd_cnt
        s.peer_buf_alloc, s.peer_fwd_cnt = conn.peer_buf_alloc, conn.peer_fwd_cnt
        tq, _scratch = tx_vq.c_state()
        rq, rs = rx_vq.c_state()
        self._serve(tq, lane, rq, rs, pump, s)
        return StreamOutcome(s.reason, s.rx_packets, s.tx_packets, s.bytes, s.tx_cnt,
                             s.peer_buf_alloc, s.peer_fwd_cnt, s.credit_changed != 0, s.rc,
                             s.error, s.events)
