"""Fuzz harness for the whole vsock device (``VsockDevice`` in-process) under a hostile guest.

Unlike ``fuzz_vsock.py`` (the sans-I/O muxer alone), this runs a real `VsockBackend` on a
real `EventLoop`, real host UNIX sockets and real memfd guest RAM driven by the ring driver
model (``tests.support.driver``), so the C TX lane, the C RX pump, the general Python TX/RX
paths and `VsockHost` all take part; the queues are set up by vhost-user messages through
a real `BackendSession`, as a front-end does. A small guest model opens two stream
connections to host services — ``good`` (never the target of a malformed packet) and
``victim`` — and a step list mixes well-formed traffic with hostile guest actions (headers
that lie, bad CIDs/ports/types/ops, odd descriptor layouts, RX buffers that are read-only or
too small, broken rings) and host events (a peer that stops reading, closes, resets or
writes while the guest has no credit). Host clients also connect to the back-end's UNIX
socket with good, split, bad or unfinished ``CONNECT <port>`` lines, and the guest answers
the device's REQUEST in every way (`HOST_ANSWERS`; tests/property/
test_vsock_device_host_connect.py has the invariants). Restart steps stop every queue with
bytes in flight and start them again as QEMU's stop/cont, a RESET_DEVICE with fresh rings,
or a front-end reconnect (`RESTARTS`); the event queue gets usable, missing, too-short or
read-only buffers (`EVENT_BUFFERS`; tests/property/test_vsock_device_restart.py); rings may
be packed (tests/property/test_vsock_device_packed.py).

Invariants, checked after every device call and every step (`World.check_*`):

- no exception leaves a device entry point (``kick``, and the host callbacks the loop runs:
  the loop's "callback failed" log and the device's "TX packet handling failed" count too);
- guest memory outside the device-writable buffers of outstanding RX chains and the used
  rings is byte-for-byte unchanged (Spec: virtio 1.2 §2.7.4: the device writes only
  device-writable buffers); TX chains are used with length 0 (§5.10.6.1); an RX used length
  never exceeds the chain's writable bytes (§2.7.8.2);
- the device never sends a connection more payload than the guest's credit (§5.10.6.3);
- every byte of a well-behaved connection reaches the other side in order exactly once,
  or the guest was told (RST or SHUTDOWN) — never silently dropped; and it keeps moving
  while another connection's peer never reads;
- a broken queue stays stopped (no used entries) until reset and is logged once.

``run_steps(steps, ring)`` runs a step list (the property test generates them); under
atheris ``python3 tests/fuzz/fuzz_vsock_device.py [corpus_dir]`` decodes bytes into steps.

Spec: virtio 1.2 §5.10.6 (Device Operation), §5.10.6.3 (Buffer Space Management),
§2.7.4 (Message Framing), §2.7.8.2 (used ring).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from tests.support import ring_impl_class  # noqa: E402
from tests.support.driver import DESC, INDIRECT, NEXT, WRITE, Allocator, MemfdRam, \
    PackedDriver, SplitDriver, _Outstanding  # noqa: E402
from vhost_user.channel import Message  # noqa: E402
from vhost_user.frontend import PACKED_FRESH_BASE  # noqa: E402
from vhost_user.session import OFFERED_PROTOCOL_FEATURES, BackendSession  # noqa: E402
from vhost_user.wire import FrontendReq, Header, MemoryRegion, MemoryTable, U64, \
    VirtioFeature, VringAddr, VringFd, VringState  # noqa: E402
from virtio.config import VsockConfig  # noqa: E402
from virtio.loop import EventLoop  # noqa: E402
from virtio.vsock.conn import ConnKey  # noqa: E402
from virtio.vsock.device import VsockBackend  # noqa: E402
from virtio.vsock.wire import HOST_CID, EventId, Op, ShutdownFlag, Type, VsockEvent, \
    VsockHeader  # noqa: E402

CID = 3
HDR = VsockHeader.SIZE
RAM = 4 << 20
QSIZE = 128
RX_BUF = 4096
RX_POSTED = 24  # RX buffers the guest keeps posted
GUEST_BUF_ALLOC = 64 * 1024  # the guest's receive window per connection
DEVICE_BUF = 32 * 1024  # the device's (tx_buffer_size): the guest's send credit
GOOD, VICTIM = 0, 1
HOST_PORTS = (80, 81)
GUEST_PORTS = (1000, 1001)
SETTLE_ROUNDS = 60
#: the host-client handshake and guest-answer timeouts: short (the harness waits them out),
#: long enough that a loaded machine answers a REQUEST in time
HANDSHAKE_S = 0.2
U32 = 0xFFFFFFFF

#: legal TX descriptor layouts a well-behaved guest may use
GOOD_SHAPES = ("two", "one", "split_hdr", "indirect", "zero_desc", "many")
#: hostile TX packets; ``taint`` ones target the victim connection
HOSTILE_TX = ("len_beyond", "len_short", "over_credit", "bad_type", "bad_op",
              "request_again", "writable_tail", "spoof_src_cid", "spoof_dst_cid",
              "unknown_port", "short_header", "no_readable", "hdr_only_lies", "empty_rw",
              "credit_lie", "data_in_control")
RX_SHAPES = ("normal", "single", "indirect", "tiny", "readonly_first", "zero_len", "hdr_only",
             "many")
BREAKS = ("loop", "next_oob", "avail_jump", "addr_oob", "indirect_nested")
#: guest ports a host client asks for (the guest "listens" on each, answering as the step says)
LISTEN_PORTS = (5000, 5001, 7)
#: how the guest answers the device's REQUEST for a host client's CONNECT
HOST_ANSWERS = ("response", "rst", "none", "late_response", "credit_update", "rw_first",
                "shutdown", "request", "seqpacket_response")
#: answers Linux's connecting side resets (virtio_transport_recv_connecting: anything but
#: RESPONSE / RST / INVALID is "destroy": an RST to the peer, an error to the socket)
GARBAGE_ANSWERS = ("rw_first", "shutdown", "request", "seqpacket_response")
#: how a host client sends a good line: at once (with bytes after it), in two pieces, or
#: closing its socket right after it (mid-handshake, before the OK)
CONNECT_HOW = ("whole", "split", "close_after")
#: lines the handshake parser must refuse, and lines that never end (cut, or closed)
BAD_LINES = (b"CONNEC 5000\n", b"connect 5000\n", b"CONNECT x\n", b"CONNECT \n",
             b"CONNECT 5000\r\n", b"CONNECT 99999999999\n", b"CONNECT 4294967296\n",
             b"CONNECT 5000 \n", b"\n", b"C" * 40, b"CONNECT -1\n", b"CONNECT 0x10\n",
             b"CONNECT 50\x0000\n", b"OK 5000\n")
PARTIAL_LINES = (b"", b"CONN", b"CONNECT ", b"CONNECT 50", b"CONNECT 4294967295")
#: how the front-end stops and starts the queues: "same" = QEMU's stop/cont (GET_VRING_BASE
#: on every queue, then the same rings again at those bases); "reset" = RESET_DEVICE and
#: fresh rings (the guest driver was reset too); "reconnect" = the front-end goes away (the
#: session closes) and a new one sets up the same rings at their bases (the guest knows
#: nothing: the device must tell it, TRANSPORT_RESET); "rx_only" / "tx_only": one ring
#: stopped and started again alone while the other runs on
RESTARTS = ("same", "reset", "reconnect", "rx_only", "tx_only")
#: event buffers the guest posts: usable ones, none, too short, read-only, and a bad one
#: first then usable ones
EVENT_BUFFERS = ("good", "big", "split4", "none", "short", "readonly", "short_then_good",
                 "readonly_then_good", "late_good")
#: those after which a TRANSPORT_RESET must reach the guest (Linux's virtio_vsock_event_done
#: takes an event only if its used length is sizeof(struct virtio_vsock_event))
USABLE_EVENT_BUFFERS = ("good", "big", "split4", "short_then_good", "readonly_then_good")
MAX_RESTARTS = 3


class Violation(AssertionError):
    """An invariant of the module docstring failed."""


class _Records(logging.Handler):
    """Keeps every record of the loggers the device and loop log to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def count(self, needle: str) -> int:
        return sum(needle in r.getMessage() for r in self.records)


def _pattern(start: int, n: int, salt: int) -> bytes:
    return bytes((start + i * 7 + salt * 31 + (start + i) // 251) & 0xFF for i in range(n))


@dataclasses.dataclass
class Conn:
    """One guest stream connection and its host peer."""

    index: int
    guest_port: int
    host_port: int
    state: str = "connecting"  # connecting | established | closed
    told: str = ""  # "rst" / "shutdown" when the device told the guest it ended
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0
    rx_cnt: int = 0
    fwd_cnt: int = 0
    adv_fwd_cnt: int = 0
    consume: bool = True
    sent: bytearray = dataclasses.field(default_factory=bytearray)
    received: bytearray = dataclasses.field(default_factory=bytearray)
    peer: socket.socket | None = None
    peer_reading: bool = True
    peer_gone: bool = False  # the test closed / shut the host side
    host_received: bytearray = dataclasses.field(default_factory=bytearray)
    host_sent: bytearray = dataclasses.field(default_factory=bytearray)
    peer_eof: bool = False  # the host peer read end-of-file
    guest_shut: int = 0  # SHUTDOWN flags the guest sent
    tainted: bool = False  # a malformed packet was sent on it
    spoofed: bool = False  # a packet with its ports but a wrong CID was sent
    credit_lied: bool = False  # it advertised a buf_alloc/fwd_cnt it does not have
    # host-initiated connections (a host client's CONNECT <port>; host_port from REQUEST)
    answer: str = ""  # how the guest answers the REQUEST (HOST_ANSWERS); "" = guest-initiated
    requested: bool = False  # the device sent the REQUEST
    responded_in_time: bool = False  # the guest sent RESPONSE before the device gave up
    ok_line: bytes = b""  # what the client must read first once the guest accepted
    raw: bytearray = dataclasses.field(default_factory=bytearray)  # all the client read
    rsts: int = 0  # RSTs the guest got for it
    generation: int = 0  # device resets before it was opened (older ones were forgotten)

    @property
    def credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32))


@dataclasses.dataclass
class Client:
    """A host client of the hybrid-vsock socket that never completes a valid handshake."""

    sock: socket.socket
    line: bytes
    closed_by_us: bool = False
    eof: bool = False  # the device closed it
    got: bytearray = dataclasses.field(default_factory=bytearray)


class World:
    """A device, its guest and its host peers; see the module docstring.

    The queues are set up the way a front-end does it, through a real `BackendSession`
    (vhost-user messages handled in-process: SET_FEATURES, SET_MEM_TABLE, per queue
    SET_VRING_NUM/BASE/ADDR/KICK/CALL and SET_VRING_ENABLE), so a queue restart or a device
    reset goes through the same code as with QEMU. ``packed`` uses packed rings
    (VIRTIO_F_RING_PACKED, offered by the session for every device); ``event_queue`` also
    starts queue 2 (the guest then posts ``event_buffers`` there).
    """

    def __init__(self, ring: str, *, packed: bool = False, event_queue: bool = False,
                 event_buffers: str = "good") -> None:
        self.dir = tempfile.mkdtemp(prefix="vsh-")
        self.records = _Records()
        self._loggers = [logging.getLogger(n) for n in ("virtio", "ring", "vhost_user")]
        for lg in self._loggers:
            lg.addHandler(self.records)
        self.loop = EventLoop()
        self.listeners = []
        for port in HOST_PORTS:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(f"{self.dir}/v_{port}")
            s.listen(16)
            s.setblocking(False)
            self.listeners.append(s)
        self.uds_path = f"{self.dir}/v"
        cfg = VsockConfig(guest_cid=CID, socket=f"{self.dir}/vu.sock", uds_path=self.uds_path,
                          tx_buffer_size=DEVICE_BUF, credit_request_delay_s=0.0,
                          connect_timeout_s=HANDSHAKE_S)
        self.backend = VsockBackend(self.loop, [cfg], handshake_timeout_s=HANDSHAKE_S)
        self.dev = self.backend.device(CID)
        self.ring = ring
        self.packed = packed
        self.session = BackendSession(self.dev, signal=lambda fd: None,
                                      virtqueue_factory=ring_impl_class(ring))
        self.ram = MemfdRam([(0, RAM // 2), (RAM // 2, RAM // 2)])  # buffers straddle
        self.mem = self.ram.memory
        self.alloc = Allocator(self.mem)
        self.event_queue = event_queue
        self.event_buffers = event_buffers
        self.events_seen: list[tuple[int, bytes]] = []  # (used length, bytes) per event chain
        self.ev_writable: dict[int, int] = {}  # event chain -> its writable bytes
        self.rx_writable: dict[int, int] = {}  # RX head -> its writable bytes
        self.features = int(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX
                            | VirtioFeature.RING_INDIRECT_DESC
                            | VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES
                            | (VirtioFeature.RING_PACKED if packed else 0))
        self.conns = [Conn(i, GUEST_PORTS[i], HOST_PORTS[i]) for i in (GOOD, VICTIM)]
        self.hconns: list[Conn] = []  # host-initiated connections (CONNECT <port>)
        self.clients: list[Client] = []  # host clients that sent a bad or no CONNECT line
        self.retired: list[Conn] = []  # connections of before a device reset
        self.stale: list[socket.socket] = []  # host-side sockets accepted for no connection
        self.listening: dict[int, str] = {}  # guest port -> how the guest answers a REQUEST
        self.broken: dict[int, int] = {}  # queue -> its used idx once broken
        self.broken_asked = False  # a "break" step ran
        self.out_of_credit: set[int] = set()  # connections that had data and no credit
        self.seq = 0
        self.steps_run = 0
        self.generation = 0  # device resets so far (RESET_DEVICE, front-end gone)
        self.restarts = 0
        self.events_owed = 0  # device resets the guest was not told of yet
        self.events_posted = 0
        self.new_rings()
        self.init_session()
        self.start_queues({})

    # -- the front-end (vhost-user messages to the session) -----------------------------------
    def vu(self, request: FrontendReq, payload: bytes = b"", fds: tuple[int, ...] = ()) -> list:
        """One front-end request, handled by the session (callers check guest memory
        around a whole sequence: `device`)."""
        msg = Message(Header(int(request), 1, len(payload)), payload, tuple(fds))
        return self.session.handle(msg)

    def new_rings(self) -> None:
        """Fresh rings (a driver that starts over: after a reset, or at boot)."""
        drv = PackedDriver if self.packed else SplitDriver
        self.rx = drv(self.mem, QSIZE, event_idx=True, allocator=self.alloc, index=0)
        self.tx = drv(self.mem, QSIZE, event_idx=True, allocator=self.alloc, index=1)
        self.ev = drv(self.mem, 8, event_idx=True, allocator=self.alloc, index=2) \
            if self.event_queue else None
        self.rx_writable = {}
        self.ev_writable = {}
        self.events_posted = 0
        self.post_events()

    @property
    def drivers(self) -> list:
        return [d for d in (self.rx, self.tx, self.ev) if d is not None]

    def start_queues(self, bases: dict[int, int], only: tuple[int, ...] = ()) -> None:
        """vhost_dev_start: features, memory table, each ring (at ``bases``, else fresh),
        then enable; ``only`` these rings (one ring restarted alone: no features, memory
        or status). Spec: vhost-user "Ring states", VHOST_USER_SET_VRING_BASE."""
        self.device(self._start_queues, bases, only)

    def _start_queues(self, bases: dict[int, int], only: tuple[int, ...]) -> None:
        drivers = [d for d in self.drivers if not only or d.index in only]
        if not only:
            self.vu(FrontendReq.SET_FEATURES, U64(self.features).pack())
            regions = tuple(MemoryRegion(s.gpa, s.size, s.uva, s.mmap_offset)
                            for s in self.ram.specs)
            self.vu(FrontendReq.SET_MEM_TABLE, MemoryTable(regions).pack(),
                    tuple(os.dup(self.ram.fd) for _ in regions))
        fresh = PACKED_FRESH_BASE if self.packed else 0
        for d in drivers:
            i = d.index
            desc, driver, device = d.ring_addresses
            uva = self.ram.specs[0].uva  # uva = UVA_BASE + gpa in every region
            self.vu(FrontendReq.SET_VRING_NUM, VringState(i, d.size).pack())
            self.vu(FrontendReq.SET_VRING_BASE, VringState(i, bases.get(i, fresh)).pack())
            self.vu(FrontendReq.SET_VRING_ADDR,
                    VringAddr(i, 0, uva + desc, uva + device, uva + driver, device).pack())
            self.vu(FrontendReq.SET_VRING_KICK, VringFd(i, False).pack(),
                    (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),))
            self.vu(FrontendReq.SET_VRING_CALL, VringFd(i, False).pack(),
                    (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),))
        for d in drivers:
            self.vu(FrontendReq.SET_VRING_ENABLE, VringState(d.index, 1).pack())
        if not only:
            self.vu(FrontendReq.SET_STATUS, U64(0xF).pack())

    def stop_queues(self, only: tuple[int, ...] = ()) -> dict[int, int]:
        """vhost_dev_stop: disable each ring, GET_VRING_BASE each (stops it; its base),
        status 0; ``only`` these rings (no status). Spec: vhost-user
        VHOST_USER_GET_VRING_BASE."""
        bases: dict[int, int] = {}
        self.device(lambda: bases.update(self._stop_queues(only)))
        return bases

    def _stop_queues(self, only: tuple[int, ...]) -> dict[int, int]:
        drivers = [d for d in self.drivers if not only or d.index in only]
        for d in drivers:
            self.vu(FrontendReq.SET_VRING_ENABLE, VringState(d.index, 0).pack())
        bases = {}
        for d in drivers:
            (reply,) = self.vu(FrontendReq.GET_VRING_BASE, VringState(d.index, 0).pack())
            bases[d.index] = VringState.unpack(reply.data[Header.FMT.size:]).num
        if not only:
            self.vu(FrontendReq.SET_STATUS, U64(0).pack())
        return bases

    # -- queue restarts and device resets ---------------------------------------------------
    def restart(self, kind: str, host_n: int, guest_n: int) -> None:
        """Stop every queue with bytes in flight both ways (a TX chain not yet kicked, host
        bytes not yet read), let the host and the guest go on while stopped, then start
        again as ``kind`` says (`RESTARTS`).

        Spec: vhost-user "Ring states", VHOST_USER_GET_VRING_BASE, VHOST_USER_RESET_DEVICE;
        virtio 1.2 §5.10.6.7 (TRANSPORT_RESET after connection state was lost)."""
        if self.broken or self.restarts >= MAX_RESTARTS:
            return
        self.restarts += 1
        good = self.conns[GOOD]
        self.send(good, guest_n, "two", 0)  # in the TX ring, not kicked
        self.host_write(good, host_n)  # in the host socket, not read
        only = {"rx_only": (0,), "tx_only": (1,)}.get(kind, ())
        bases = self.stop_queues(only)
        self.host_write(good, host_n)  # while stopped: the device must not touch the guest
        self.send(good, guest_n, "indirect", 0)
        self.settle()
        if kind in ("same", "rx_only", "tx_only"):
            self.start_queues(bases, only)
            return
        if kind == "reset":
            self.device(self.vu, FrontendReq.RESET_DEVICE)
            self.device_forgot()
            self.retire(told="guest_reset")  # its driver was reset: its sockets are gone
            self.new_rings()
            self.start_queues({})
            self.reconnect()
            return
        self.device(self.session.close)  # the front-end went away: the device resets
        self.device_forgot()
        self.session = BackendSession(self.dev, signal=lambda fd: None,
                                      virtqueue_factory=ring_impl_class(self.ring))
        self.init_session()
        self.start_queues(bases)

    def init_session(self) -> None:
        """vhost_user_backend_init: protocol features, owner."""
        self.vu(FrontendReq.SET_PROTOCOL_FEATURES, U64(int(OFFERED_PROTOCOL_FEATURES)).pack())
        self.vu(FrontendReq.SET_OWNER)

    def device_forgot(self) -> None:
        """The device was reset: it forgot every connection (guest told on the event
        queue, TRANSPORT_RESET)."""
        self.generation += 1
        self.events_owed += 1

    def retire(self, told: str) -> None:
        """The guest's connections end (its driver was reset, or it got TRANSPORT_RESET):
        their host peers must see the end; two new ones take their place."""
        for c in self.conns:
            if c.state != "closed":
                c.state, c.told = "closed", c.told or told
        self.retired += self.conns
        for listener in self.listeners:  # connections the device made for old requests
            while True:  # (a malformed REQUEST again) must not pass for the new ones
                try:
                    self.stale.append(listener.accept()[0])
                except BlockingIOError:
                    break
        ports = [p + 10 * (len(self.retired) // 2) for p in GUEST_PORTS]
        self.conns = [Conn(i, ports[i], HOST_PORTS[i], generation=self.generation)
                      for i in (GOOD, VICTIM)]

    def reconnect(self) -> None:
        self.connect()
        self.settle()

    # -- the event queue (Spec: virtio 1.2 §5.10.6.7) ------------------------------------------
    def post_events(self, mode: str | None = None) -> None:
        """Event buffers as ``mode`` (`EVENT_BUFFERS`) says, up to four outstanding."""
        ev = self.ev
        mode = mode or self.event_buffers
        if ev is None or 2 in self.broken:
            return
        while ev.outstanding < 4:
            first = self.events_posted == 0
            if mode in ("none", "late_good"):
                return
            if mode in ("good", "big", "split4") or not first and mode.endswith("_good"):
                kw = dict(in_sizes={"big": [64], "split4": [2, 2]}.get(mode, [4]))
            elif mode.startswith("short"):
                kw = dict(in_sizes=[1 + self.seq % 3])
            else:  # read-only
                kw = dict(out=[b"\xEE" * 4])
            self.seq += 1
            try:
                head = ev.add_buf(**kw)
            except MemoryError:
                return
            self.events_posted += 1
            self.ev_writable[head] = sum(kw.get("in_sizes", ()))
            if mode in ("short", "readonly"):
                return  # one of them: the guest has nothing better

    def reap_events(self) -> bool:
        if self.ev is None or 2 in self.broken:
            return False
        got = False
        while (used := self.ev.get_buf()) is not None:
            got = True
            room = self.ev_writable.pop(used.id)
            if used.len_ > room:
                raise Violation(f"event chain {used.id}: used length {used.len_} > its {room} "
                                f"writable bytes")
            self.events_seen.append((used.len_, used.data))
            if used.len_ == VsockEvent.SIZE:  # Linux takes exactly sizeof(event), no other
                if VsockEvent.unpack(used.data).id != EventId.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET:
                    raise Violation(f"unknown vsock event {used.data!r}")
                if not self.events_owed:
                    raise Violation("a TRANSPORT_RESET with no device reset before it")
                self.events_owed = 0
                if any(c.generation < self.generation for c in self.conns):
                    self.retire(told="transport_reset")  # Linux resets every socket
                    self.connect()
            self.post_events()
        return got

    def check_events(self) -> None:
        """After a device reset, a guest with a usable event buffer got TRANSPORT_RESET
        (once: `reap_events` fails a second). Spec: virtio 1.2 §5.10.6.7."""
        if self.ev is None or not self.events_owed or self.broken:
            return
        if self.event_buffers in USABLE_EVENT_BUFFERS:
            raise Violation(f"the device was reset ({self.generation} times) and the guest, "
                            f"with {self.event_buffers!r} event buffers, got no "
                            f"TRANSPORT_RESET: {self.events_seen}")

    def vq(self, index: int):
        """The device's live ring ``index`` (None while stopped)."""
        return self.session.vrings[index].vq

    @property
    def rxvq(self):
        return self.vq(0)

    @property
    def txvq(self):
        return self.vq(1)

    def close(self) -> None:
        try:
            self.session.close()
            self.backend.close()
        finally:
            for c in self.conns + self.hconns + self.retired:
                if c.peer is not None:
                    c.peer.close()
            for cl in self.clients:
                cl.sock.close()
            for sock in self.stale:
                sock.close()
            for s in self.listeners:
                s.close()
            self.loop.close()
            self.ram.close()
            for lg in self._loggers:
                lg.removeHandler(self.records)
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- the device, watched -----------------------------------------------------------------
    def _allowed(self) -> list[tuple[int, int]]:
        spans = []
        for d in self.drivers:  # what the device writes of a ring (used ring / descriptors)
            if d.packed:
                spans += [(d.desc_gpa, 16 * d.size), (d.device_gpa, 4)]
            else:
                spans.append((d.used_gpa, 6 + 8 * d.size))
        for d in (self.rx, self.ev):
            if d is not None:
                for state in d._outstanding.values():
                    spans.extend(state.writable)
        return spans

    def device(self, call, *args) -> None:
        """Run one device entry point and check guest memory around it."""
        before = [bytes(r.view) for r in self.mem.regions]
        call(*args)
        self._note_broken()
        bad: list[int] = []
        for region, old in zip(self.mem.regions, before):
            now = np.frombuffer(region.view, np.uint8)
            changed = np.frombuffer(old, np.uint8) != now
            if not changed.any():
                continue
            for gpa, n in self._allowed():  # clear what the device may write
                lo, hi = max(gpa - region.gpa, 0), min(gpa + n - region.gpa, len(now))
                if lo < hi:
                    changed[lo:hi] = False
            bad += [int(g) + region.gpa for g in np.nonzero(changed)[0][:16]]
        if bad:
            raise Violation(f"device wrote guest memory outside RX buffers/used rings, "
                            f"first gpa {bad[0]:#x} ({call})")

    def turn(self, force_kick: bool = False) -> None:
        """Kick what the driver would kick, then one turn of the loop (host sockets)."""
        if self.tx.kick_prepare() or force_kick:
            self.device(self.session.on_kick, 1)
        if self.rx.kick_prepare() or force_kick:
            self.device(self.session.on_kick, 0)
        if self.ev is not None and (self.ev.kick_prepare() or force_kick):
            self.device(self.session.on_kick, 2)
        self.device(self.loop.run_once, 0)
        self.check_logs()

    def check_logs(self) -> None:
        for needle in ("callback", "TX packet handling failed"):
            for r in self.records.records:
                if r.levelno >= logging.ERROR and r.getMessage().startswith(needle) \
                        and "failed" in r.getMessage():
                    raise Violation(f"an exception escaped the device: {r.getMessage()}")

    # -- guest: TX ---------------------------------------------------------------------------
    def hdr(self, c: Conn | None, op: int, len_: int = 0, **kw) -> bytes:
        fields = dict(src_cid=CID, dst_cid=int(HOST_CID),
                      src_port=c.guest_port if c else 2000, dst_port=c.host_port if c else 99,
                      len_=len_, type_=int(Type.STREAM), op=int(op), flags=0,
                      buf_alloc=GUEST_BUF_ALLOC, fwd_cnt=c.fwd_cnt if c else 0)
        fields.update(kw)
        return VsockHeader(**fields).pack()

    def add_tx(self, out: list[bytes], in_sizes=(), indirect: bool = False) -> bool:
        if 1 in self.broken:
            return False
        self.reap_tx()
        try:
            self.tx.add_buf(out=out, in_sizes=in_sizes, indirect=indirect)
        except MemoryError:
            return False
        return True

    def send_packet(self, header: bytes, payload: bytes, shape: str, cut: int = 20) -> bool:
        if shape == "one":
            return self.add_tx([header + payload])
        if shape == "split_hdr":
            cut = 1 + cut % (HDR - 1)
            pieces = [header[:cut], header[cut:]]
            if payload:
                half = len(payload) // 2
                pieces += [p for p in (payload[:half], payload[half:]) if p]
            return self.add_tx(pieces)
        if shape == "indirect":
            return self.add_tx([header] + ([payload] if payload else []), indirect=True)
        if shape == "many":
            step = max(1 + cut % 700, -(-len(payload) // 100))
            return self.add_tx([header] + [payload[i:i + step]
                                           for i in range(0, len(payload), step)][:200])
        if shape == "zero_desc":
            return self.add_tx([header, b""] + ([payload] if payload else []))
        return self.add_tx([header] + ([payload] if payload else []))

    def control(self, c: Conn, op: int, flags: int = 0) -> None:
        c.adv_fwd_cnt = c.fwd_cnt
        self.send_packet(self.hdr(c, op, flags=flags), b"", "two")

    def connect(self) -> None:
        for c in self.conns:
            self.send_packet(self.hdr(c, Op.REQUEST), b"", "two")

    def send(self, c: Conn, n: int, shape: str, cut: int) -> None:
        if c.state == "established" and not c.credit:
            self.out_of_credit.add(c.index)
        n = min(n, c.credit, 16 * 1024)
        if c.state != "established" or n <= 0 or c.guest_shut & ShutdownFlag.SEND:
            return
        data = _pattern(len(c.sent), n, c.index)
        c.adv_fwd_cnt = c.fwd_cnt
        if self.send_packet(self.hdr(c, Op.RW, n), data, shape, cut):
            c.sent += data
            c.tx_cnt = (c.tx_cnt + n) & U32

    def hostile(self, kind: str, c: Conn, arg: int) -> None:
        """One malformed TX packet (see HOSTILE_TX)."""
        payload = _pattern(0, 1 + arg % 300, 9)
        n = len(payload)
        if kind in ("spoof_src_cid", "spoof_dst_cid"):
            c = self.conns[GOOD]
            c.spoofed = True
            op = (Op.RW, Op.RST, Op.SHUTDOWN, Op.CREDIT_UPDATE)[arg % 4]
            bad = (4, 2, 0, U32, 1 << 40)[arg % 5] if kind == "spoof_src_cid" else \
                (CID, 4, 0, U32, 1 << 33)[arg % 5]
            field = "src_cid" if kind == "spoof_src_cid" else "dst_cid"
            body = payload if op == Op.RW else b""
            self.send_packet(self.hdr(c, op, len(body), flags=3 if op == Op.SHUTDOWN else 0,
                                      **{field: bad}), body, "two")
            return
        if kind == "unknown_port":
            op = (Op.RW, Op.SHUTDOWN, Op.CREDIT_REQUEST, Op.REQUEST, Op.RESPONSE,
                  Op.CREDIT_UPDATE)[arg % 6]
            body = payload if op == Op.RW else b""
            self.send_packet(self.hdr(None, op, len(body), src_port=2000 + arg % 3,
                                      dst_port=(99, 80, 81)[arg % 3]), body, "two")
            return
        if kind == "empty_rw":  # legal: a stream RW without payload, on the good one
            g = self.conns[GOOD]
            if g.state == "established":
                self.send_packet(self.hdr(g, Op.RW, 0), b"", ("two", "one")[arg % 2])
            return
        if kind == "short_header":
            self.add_tx([self.hdr(c, Op.RW, 4)[:1 + arg % (HDR - 1)]])
            return
        if kind == "no_readable":
            self.add_tx([], in_sizes=[1 + arg % 100])
            return
        c.tainted = True
        if kind == "len_beyond":
            lie = (n + 1, n + 4096, U32, 64 * 1024, 1 << 31)[arg % 5]
            self.send_packet(self.hdr(c, Op.RW, lie), payload, ("two", "one", "split_hdr")[arg % 3],
                             arg)
        elif kind == "len_short":
            self.send_packet(self.hdr(c, Op.RW, arg % n), payload, "two")
        elif kind == "hdr_only_lies":
            self.send_packet(self.hdr(c, Op.RW, 1 + arg), b"", ("two", "one")[arg % 2])
        elif kind == "over_credit":
            m = c.credit + 1 + arg % 5000
            self.send_packet(self.hdr(c, Op.RW, m), _pattern(0, m, 5), "two")
        elif kind == "bad_type":
            t = (0, 3, 0xFFFF, int(Type.SEQPACKET))[arg % 4]
            self.send_packet(self.hdr(c, Op.RW, n, type_=t), payload, "two")
        elif kind == "bad_op":
            o = (0, 8, 0xFFFF, 200)[arg % 4]
            self.send_packet(self.hdr(c, o, n), payload, "two")
        elif kind == "request_again":
            self.send_packet(self.hdr(c, (Op.REQUEST, Op.RESPONSE)[arg % 2]), b"", "two")
        elif kind == "credit_lie":
            c.credit_lied = True
            ba, fc = ((0, 0), (U32, c.fwd_cnt), (GUEST_BUF_ALLOC, c.fwd_cnt + (1 << 30)),
                      (1, U32))[arg % 4]
            self.send_packet(self.hdr(c, Op.CREDIT_UPDATE, buf_alloc=ba, fwd_cnt=fc), b"", "two")
        elif kind == "data_in_control":
            o = (Op.CREDIT_UPDATE, Op.CREDIT_REQUEST, Op.SHUTDOWN, Op.RST)[arg % 4]
            if self.send_packet(self.hdr(c, o, n, flags=arg % 4), payload, "two"):
                if o == Op.RST:  # the guest itself ended it
                    c.state = "closed"
                elif o == Op.SHUTDOWN:
                    c.guest_shut |= arg % 4
        elif kind == "writable_tail":
            self.add_tx([self.hdr(c, Op.RW, n), payload], in_sizes=[1 + arg % 64])
        else:  # pragma: no cover
            raise ValueError(kind)

    # -- guest: RX ---------------------------------------------------------------------------
    def post_rx(self, shape: str = "normal", count: int = 1) -> None:
        if 0 in self.broken:
            return
        for _ in range(count):
            if shape == "normal":
                kw = dict(in_sizes=[HDR, RX_BUF])
            elif shape == "single":
                kw = dict(in_sizes=[HDR + RX_BUF])
            elif shape == "indirect":
                kw = dict(in_sizes=[HDR, 700, RX_BUF - 700], indirect=True)
            elif shape == "tiny":
                kw = dict(in_sizes=[1 + self.seq % (HDR - 1)])
            elif shape == "readonly_first":
                kw = dict(out=[b"\xAA" * 64], in_sizes=[HDR, RX_BUF])
            elif shape == "zero_len":
                kw = dict(in_sizes=[0, HDR + 100, 0, 50])
            elif shape == "many":
                kw = dict(in_sizes=[11, HDR - 11] + [97] * 30)
            elif shape == "hdr_only":
                kw = dict(in_sizes=[HDR])
            else:  # pragma: no cover
                raise ValueError(shape)
            self.seq += 1
            try:
                head = self.rx.add_buf(**kw)
            except MemoryError:
                return
            self.rx_writable[head] = sum(kw["in_sizes"])

    def refill(self) -> None:
        missing = RX_POSTED - self.rx.outstanding
        if missing > 0:
            self.post_rx("normal", missing)

    def reap_tx(self) -> bool:
        if 1 in self.broken:
            return False
        got = False
        while (used := self.tx.get_buf()) is not None:
            got = True
            if used.len_ != 0:
                raise Violation(f"TX chain {used.id} used with length {used.len_}, not 0")
        return got

    def reap_rx(self) -> bool:
        if 0 in self.broken:
            return False
        got = False
        while True:
            head_len = None if self.packed else self._peek_used(self.rx)
            used = self.rx.get_buf()
            if used is None:
                return got
            got = True
            room = self.rx_writable.pop(used.id)
            if used.len_ > room:
                raise Violation(f"RX chain {used.id}: used length {used.len_} > its "
                                f"{room} writable bytes")
            assert head_len is None or head_len == (used.id, used.len_)
            self.receive(used.data, used.len_)

    @staticmethod
    def _peek_used(drv: SplitDriver):
        if drv.last_used_idx == drv.used_idx:
            return None
        return drv.used_elem(drv.last_used_idx & (drv.size - 1))

    def receive(self, data: bytes, length: int) -> None:
        if length == 0:
            return  # a buffer given back unused (too small for a header)
        if length < HDR:
            raise Violation(f"RX packet of {length} bytes: shorter than a header")
        h = VsockHeader.unpack(data[:HDR])
        if h.src_cid != HOST_CID or h.dst_cid != CID:
            raise Violation(f"RX packet with CIDs {h.src_cid}->{h.dst_cid}: {h}")
        if HDR + h.len_ != length:
            raise Violation(f"RX packet len {h.len_} but used length {length}: {h}")
        if h.op == Op.REQUEST:
            self.host_request(h)
            return
        c = next((c for c in self.conns + self.hconns if (c.guest_port, c.host_port)
                  == (h.dst_port, h.src_port)), None)
        if c is not None and c.answer and h.op == Op.RST:
            c.rsts += 1
        if c is None or c.state == "closed":
            return  # (RSTs for unknown ports and late packets)
        c.peer_buf_alloc, c.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
        op = h.op
        if op == Op.RESPONSE:
            if c.state == "connecting":
                c.state = "established"
        elif op == Op.RW:
            if h.type_ != Type.STREAM:
                raise Violation(f"RW of type {h.type_} on a stream: {h}")
            c.received += data[HDR:length]
            c.rx_cnt = (c.rx_cnt + h.len_) & U32
            if (c.rx_cnt - c.fwd_cnt) & U32 > GUEST_BUF_ALLOC and not c.credit_lied:
                raise Violation(f"conn {c.index}: the device overran the guest's credit: "
                                f"{(c.rx_cnt - c.fwd_cnt) & U32} > {GUEST_BUF_ALLOC}")
            if c.consume:
                self.consume(c)
        elif op == Op.CREDIT_REQUEST:
            self.control(c, Op.CREDIT_UPDATE)
        elif op == Op.SHUTDOWN:
            c.told = c.told or "shutdown"
            if h.flags & ShutdownFlag.BOTH == ShutdownFlag.BOTH:
                self.control(c, Op.RST)  # as Linux virtio_transport_recv_connected
                c.state = "closed"
        elif op == Op.RST:
            c.told = "rst"
            c.state = "closed"

    def consume(self, c: Conn) -> None:
        c.fwd_cnt = c.rx_cnt
        if (c.fwd_cnt - c.adv_fwd_cnt) & U32 >= GUEST_BUF_ALLOC // 2:
            self.control(c, Op.CREDIT_UPDATE)

    # -- host-initiated connections (hybrid vsock: CONNECT <port>\n) ----------------------------
    def _client(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.uds_path)  # the back-end listens with a backlog of 128
        sock.setblocking(False)
        return sock

    def host_connect(self, port_i: int, answer: str, how: str, leftover_n: int) -> None:
        """A host client connects and asks for a guest port; the guest will answer the
        device's REQUEST as ``answer`` says. Spec: the hybrid-vsock convention
        (virtio/vsock/handshake.py); virtio 1.2 §5.10.6.2 (connection set-up)."""
        if len(self.hconns) >= 12:
            return
        port = LISTEN_PORTS[port_i % len(LISTEN_PORTS)]
        c = Conn(2 + len(self.hconns), port, 0, answer=answer, ok_line=b"OK %d\n" % port,
                 generation=self.generation)
        c.state = "waiting"  # the guest has not seen a REQUEST yet
        c.peer = self._client()
        self.hconns.append(c)
        line = b"CONNECT %d\n" % port
        leftover = _pattern(0, leftover_n, 100 + c.index) if how == "whole" else b""
        try:
            if how == "split":
                c.peer.send(line[:5])
                self.settle()  # (on a slow machine the handshake may time out here)
                c.peer.send(line[5:])
            else:
                c.peer.send(line + leftover)
                c.host_sent += leftover
        except (BrokenPipeError, ConnectionResetError):
            c.peer_eof = True  # closed by the device: no REQUEST may follow
        if how == "close_after":
            c.peer.close()
            c.peer, c.peer_gone = None, True

    def host_bad_line(self, line_i: int, then: str) -> None:
        """A host client that sends a line the parser must refuse, or part of a line and
        then nothing (``then`` "wait": the handshake timeout) or closes (``"close"``)."""
        lines = BAD_LINES + PARTIAL_LINES
        line = lines[line_i % len(lines)]
        cl = Client(self._client(), line)
        if line:
            cl.sock.send(line)
        if then == "close":
            cl.sock.close()
            cl.closed_by_us = True
        self.clients.append(cl)

    def host_request(self, h: VsockHeader) -> None:
        """The guest got a REQUEST: it must be for a client's good CONNECT line."""
        c = next((c for c in self.hconns if c.guest_port == h.dst_port and not c.requested),
                 None)
        if c is None:
            raise Violation(f"the device sent a REQUEST no host client asked for: {h}")
        if h.type_ != Type.STREAM or h.len_:
            raise Violation(f"REQUEST for a stream CONNECT with type {h.type_}, len {h.len_}")
        c.requested = True
        c.host_port = h.src_port
        if any(o is not c and o.host_port == c.host_port and o.state != "closed"
               for o in self.hconns):
            raise Violation(f"host port {c.host_port} given to two live connections")
        c.peer_buf_alloc, c.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
        self.answer(c, c.answer)

    def answer(self, c: Conn, answer: str) -> None:
        c.state = "connecting"
        if answer == "response":
            c.responded_in_time = True  # unless an RST follows (the device gave up first)
            c.state = "established"
            self.control(c, Op.RESPONSE)
        elif answer == "rst":
            c.state = "closed"
            self.control(c, Op.RST)
        elif answer == "credit_update":
            self.control(c, Op.CREDIT_UPDATE)  # legal, and no answer: the device times out
        elif answer in GARBAGE_ANSWERS:
            c.state = "closed"  # the guest gives up on it; the device must reset it
            if answer == "rw_first":
                self.send_packet(self.hdr(c, Op.RW, 10), _pattern(0, 10, 77), "two")
            elif answer == "shutdown":
                self.control(c, Op.SHUTDOWN, 3)
            elif answer == "request":
                self.control(c, Op.REQUEST)
            else:
                self.send_packet(self.hdr(c, Op.RESPONSE, type_=int(Type.SEQPACKET)), b"",
                                 "two")
        # "none", "late_response": nothing now

    def wait_timeouts(self) -> None:
        """Let the handshake and REQUEST timeouts pass, fire the loop's timers (before any
        kick: a guest packet then meets the device's decision), then late answers."""
        time.sleep(HANDSHAKE_S * 1.5)
        self.device(self.loop.run_once, 0)
        for c in self.hconns:
            if c.requested and c.answer == "late_response" and c.state == "connecting":
                c.state = "closed"
                self.control(c, Op.RESPONSE)  # too late: the device must not accept it
        self.settle()

    def hconn_io(self, n: int) -> None:
        for c in self.hconns:
            if c.state == "established" and not c.told:
                self.send(c, n, "two", 0)
                self.host_write(c, n)

    def _read_client(self, c: Conn) -> bool:
        moved = False
        try:
            while chunk := c.peer.recv(1 << 20):
                c.raw += chunk
                moved = True
            moved |= not c.peer_eof
            c.peer_eof = True
        except BlockingIOError:
            pass
        except ConnectionResetError:
            moved |= not c.peer_eof
            c.peer_eof = True
        ok = c.ok_line
        if not (c.raw.startswith(ok) or ok.startswith(c.raw)):
            raise Violation(f"host client of port {c.guest_port} read {bytes(c.raw[:40])!r}, "
                            f"not {ok!r} first")
        if c.raw.startswith(ok):
            c.host_received = c.raw[len(ok):]
        return moved

    def check_host_initiated(self, final: bool) -> None:
        """A host client gets ``OK <port>`` only if the guest sent RESPONSE and was not
        reset; otherwise it is closed without a byte. A refused, timed-out or reset one
        leaves the guest with no live connection; garbage answers get the guest an RST
        (as Linux's connecting side does). Bad lines get no REQUEST and no byte, and are
        closed. Spec: virtio 1.2 §5.10.6.2; hybrid vsock (handshake.py)."""
        for c in self.hconns:
            got_ok = c.raw.startswith(c.ok_line)
            if got_ok and not c.responded_in_time:
                raise Violation(f"host client of port {c.guest_port} got OK though the guest "
                                f"answered {c.answer!r}")
            if self.broken:
                continue  # the guest's answers may not reach the device any more
            if c.peer is None:
                if final and c.answer == "response" and c.requested and not (c.rsts or c.told):
                    raise Violation(f"host client of port {c.guest_port} closed after its "
                                    f"CONNECT; the guest accepted and was never told")
                continue
            if c.answer == "response" and c.requested and not c.rsts and c.told != "rst" \
                    and not got_ok:
                raise Violation(f"the guest accepted port {c.guest_port} but the host client "
                                f"got no OK: {bytes(c.raw)!r}")
            # (a RESPONSE of a type not negotiated gets an RST for its header, as Linux's
            # virtio_transport_recv_pkt does, and leaves the connection to its timeout)
            refused = c.answer in ("rst", "rw_first", "shutdown", "request") or (
                final and c.answer in ("none", "late_response", "credit_update",
                                       "seqpacket_response"))
            if refused and c.requested and not c.peer_eof:
                raise Violation(f"host client of port {c.guest_port}: guest answer "
                                f"{c.answer!r}, but the client is still open")
            if final and c.generation < self.generation and not c.peer_eof:
                raise Violation(f"host client of port {c.guest_port}: the device was reset "
                                f"but the client is still open")
            if c.answer in GARBAGE_ANSWERS and c.requested and not c.rsts:
                raise Violation(f"guest answered a REQUEST with {c.answer!r}: no RST")
        for cl in self.clients:
            if cl.closed_by_us:
                continue
            try:
                while chunk := cl.sock.recv(4096):
                    cl.got += chunk
                cl.eof = True
            except BlockingIOError:
                pass
            except ConnectionResetError:
                cl.eof = True
            if cl.got:
                raise Violation(f"a client that sent {cl.line!r} read {bytes(cl.got)!r}")
            bad = cl.line in BAD_LINES
            if (bad or final) and not cl.eof:
                raise Violation(f"a client that sent {cl.line!r} is still open")
        if final:
            left = self.backend.host._listeners[CID].handshakes
            if left:
                raise Violation(f"{len(left)} handshakes still pending after their timeout")

    # -- host peers ----------------------------------------------------------------------------
    def host_io(self) -> bool:
        moved = False
        for c in self.hconns:
            if c.peer is not None and c.peer_reading:
                moved |= self._read_client(c)
        for c in self.retired:
            if c.peer is not None and not c.peer_eof:
                try:
                    while chunk := c.peer.recv(1 << 20):
                        c.host_received += chunk
                    c.peer_eof = moved = True
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    c.peer_eof = moved = True
        for c, listener in zip(self.conns, self.listeners):
            if c.peer is None and not c.peer_gone:
                try:
                    c.peer, _ = listener.accept()
                    c.peer.setblocking(False)
                    moved = True
                except BlockingIOError:
                    pass
            if c.peer is not None and c.peer_reading:
                try:
                    while chunk := c.peer.recv(1 << 20):
                        c.host_received += chunk
                        moved = True
                    if not c.peer_eof:
                        c.peer_eof = moved = True
                except (BlockingIOError, ConnectionResetError):
                    pass
        return moved

    def host_write(self, c: Conn, n: int) -> None:
        if c.peer is None:
            return
        data = _pattern(len(c.host_sent), n, 100 + c.index)
        try:
            sent = c.peer.send(data)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            sent = 0
        c.host_sent += data[:sent]

    def host_close(self, c: Conn, mode: str) -> None:
        if c.peer is None:
            return
        c.peer_gone = True
        if mode == "shut_wr":
            c.peer.shutdown(socket.SHUT_WR)
            return
        if mode == "close":
            self.host_io()
        c.peer.close()
        c.peer = None

    # -- running -------------------------------------------------------------------------------
    def settle(self, force_kick: bool = False) -> None:
        quiet = 0
        for _ in range(SETTLE_ROUNDS):
            self.refill()
            self.turn(force_kick)
            moved = self.reap_tx() | self.reap_rx() | self.reap_events() | self.host_io()
            quiet = 0 if moved else quiet + 1
            if quiet >= 3:
                return

    def step(self, step: tuple) -> None:
        kind, *args = step
        if kind == "send":
            ci, n, shape, cut = args
            self.send(self.conns[ci], n, shape, cut)
        elif kind == "hostile":
            hk, arg = args
            self.hostile(hk, self.conns[VICTIM], arg)
        elif kind == "post_rx":
            self.post_rx(*args)
        elif kind == "host_write":
            ci, n = args
            self.host_write(self.conns[ci], n)
        elif kind == "victim_reading":
            self.conns[VICTIM].peer_reading = args[0]
        elif kind == "victim_consume":
            c = self.conns[VICTIM]
            c.consume = args[0]
            if c.consume and c.state == "established":
                self.consume(c)
                self.control(c, Op.CREDIT_UPDATE)
        elif kind == "victim_shutdown":
            c = self.conns[VICTIM]
            if c.state == "established":
                c.guest_shut |= args[0]
                self.control(c, Op.SHUTDOWN, args[0])
        elif kind == "victim_close":
            self.host_close(self.conns[VICTIM], args[0])
        elif kind == "break":
            self.break_ring(*args)
        elif kind == "host_connect":
            self.host_connect(*args)
        elif kind == "host_bad_line":
            self.host_bad_line(*args)
        elif kind == "wait":
            self.wait_timeouts()
        elif kind == "hconn_io":
            self.hconn_io(*args)
        elif kind == "restart":
            self.restart(*args)
        elif kind == "post_events":  # the guest's event buffers at last ("late_good")
            self.post_events("good")
            self.turn(force_kick=True)
        elif kind != "idle":  # pragma: no cover
            raise ValueError(kind)
        self.settle(force_kick=self.broken_asked)
        self.check_broken()
        self.check_progress()
        self.check_host_initiated(final=False)
        self.check_events()
        self.steps_run += 1

    # -- broken rings --------------------------------------------------------------------------
    def break_ring(self, queue: int, how: str, arg: int) -> None:
        if queue in self.broken or self.packed:  # (packed rings: tests/property/rings.py)
            return
        drv = self.rx if queue == 0 else self.tx
        if queue == 1:
            self.reap_tx()
        else:
            self.reap_rx()
        if drv.num_free < 2:
            return
        head = drv.free_head
        other = drv._next[head]
        buf = drv.alloc.alloc(64)
        flag = WRITE if queue == 0 else 0
        if how == "loop":
            drv.write_desc(head, buf, 64, flag | NEXT, head)
        elif how == "next_oob":
            drv.write_desc(head, buf, 64, flag | NEXT, QSIZE + arg % 1000)
        elif how == "addr_oob":
            drv.write_desc(head, RAM + (arg << 12), 64, flag, 0)
        elif how == "indirect_nested":
            drv.write(buf, DESC.pack(buf, 16, INDIRECT, 0) * 4)
            drv.write_desc(head, buf, 64, INDIRECT, 0)
        if how == "avail_jump":
            drv.write_avail_idx(drv.avail_idx_shadow + QSIZE + 1 + arg % 1000)
        else:
            # the driver's bookkeeping, as if this were a chain it added (then exposed)
            drv._outstanding[head] = _Outstanding([buf], [], 1, [head], None, None)
            drv.free_head, drv.num_free = other, drv.num_free - 1
            if queue == 0:
                self.rx_writable[head] = 0
            drv.expose(head)
        self.broken_asked = True
        self.turn(force_kick=True)

    def _note_broken(self) -> None:
        """A queue the device found broken: its used idx then (the call that found it may
        return the bad chain with used length 0; nothing may follow)."""
        for queue, (vq, drv) in enumerate(((self.rxvq, self.rx), (self.txvq, self.tx))):
            if queue not in self.broken and vq is not None and vq.broken is not None:
                self.broken[queue] = drv.used_idx

    def _broken_log_count(self, queue: int) -> int:
        name = "RX queue broken" if queue == 0 else "TX queue broken"
        return self.records.count(name)

    def check_broken(self) -> None:
        for queue in (0, 1):
            if queue not in self.broken and self._broken_log_count(queue):
                raise Violation(f"queue {queue}: logged broken but the ring is not")
        for queue, used in self.broken.items():
            drv = self.rx if queue == 0 else self.tx
            if drv.used_idx != used:
                raise Violation(f"queue {queue} used {drv.used_idx - used} chains after it "
                                f"broke")
            logged = self._broken_log_count(queue)
            if logged > 1:
                raise Violation(f"queue {queue} broken: logged {logged} times (once is the "
                                f"rule, STYLE R5)")

    # -- progress and delivery -----------------------------------------------------------------
    def check_progress(self) -> None:
        """The good connection is never stuck: what one side sent reached the other (the
        host peer reads and the guest consumes at once), unless the guest was told it
        ended. Checked only while both queues run."""
        self.check_delivery(self.conns[GOOD], complete=not self.broken)
        for c in self.hconns:
            if c.state == "established" and not c.told:
                self.check_delivery(c, complete=not self.broken)

    def check_delivery(self, c: Conn, complete: bool) -> None:
        if not c.host_received == c.sent[:len(c.host_received)]:
            raise Violation(f"conn {c.index}: the host got bytes the guest did not send "
                            f"(or out of order) at {_first_diff(c.host_received, c.sent)}")
        if not c.received == c.host_sent[:len(c.received)]:
            raise Violation(f"conn {c.index}: the guest got bytes the host did not send "
                            f"(or out of order) at {_first_diff(c.received, c.host_sent)}")
        if c.generation < self.generation:
            return  # the device was reset since it opened: ended (the guest told or not)
        if c.state == "established" and c.index == GOOD and not c.spoofed and c.told:
            raise Violation(f"good conn told {c.told} while nothing hostile touched it")
        if c.state == "closed" and c.index == GOOD and not c.spoofed:
            raise Violation("good connection reset though nothing hostile touched it")
        if not complete or c.peer_gone:
            return
        if c.guest_shut & ShutdownFlag.SEND and c.told != "rst" and c.peer is not None:
            if len(c.host_received) != len(c.sent) or not c.peer_eof:
                raise Violation(f"conn {c.index}: the guest sent {len(c.sent)} bytes then "
                                f"SHUTDOWN(SEND); the host got {len(c.host_received)}, "
                                f"EOF {c.peer_eof}")
        if c.state != "established":
            return
        if c.peer_eof and not c.guest_shut & ShutdownFlag.SEND:
            raise Violation(f"conn {c.index}: the host peer got EOF but the guest did not "
                            f"shut down and was not told")
        if len(c.host_received) != len(c.sent):
            raise Violation(f"conn {c.index}: the guest sent {len(c.sent)} bytes, the host "
                            f"got {len(c.host_received)} and the guest was not told")
        if len(c.received) != len(c.host_sent) and not c.guest_shut & ShutdownFlag.RCV:
            raise Violation(f"conn {c.index}: the host sent {len(c.host_sent)} bytes, the "
                            f"guest got {len(c.received)} and was not told")

    def finish(self) -> None:
        """Open every tap (peers read, the guest consumes) and check delivery and that the
        device and the guest agree on which connections exist."""
        v = self.conns[VICTIM]
        v.peer_reading = True
        if not v.consume:
            v.consume = True
            if v.state == "established":
                self.consume(v)
                self.control(v, Op.CREDIT_UPDATE)
        self.settle(force_kick=self.broken_asked)
        if self.hconns or self.clients:
            self.wait_timeouts()
        self.check_broken()
        self.check_host_initiated(final=not self.broken)
        self.check_events()
        for c in self.conns + self.hconns:
            if c.tainted:
                continue
            self.check_delivery(c, complete=not self.broken)
        for c in self.retired:
            if not c.tainted:
                self.check_delivery(c, complete=False)
            if c.generation < self.generation and c.peer is not None and not c.peer_eof:
                raise Violation(f"conn {c.index} (port {c.guest_port}): the device was reset "
                                f"but its host peer was not closed")
        if self.broken:
            return
        for c in self.conns + self.hconns:
            if c.generation < self.generation:
                continue
            alive = self.backend.muxer._lookup(ConnKey(CID, c.host_port, c.guest_port))
            if c.state == "established" and alive is None:
                raise Violation(f"conn {c.index}: the device dropped it and the guest was "
                                f"not told")


def _first_diff(a: bytes | bytearray, b: bytes | bytearray) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def run_steps(steps: list[tuple], ring: str = "c", **options: Any) -> World:
    """Connect both connections, run ``steps``, then ``finish``; raises `Violation`.
    ``options``: `World` options (packed rings, the event queue)."""
    world = World(ring, **options)
    try:
        world.connect()
        world.settle()
        for c in world.conns:
            if c.state != "established":
                raise Violation(f"conn {c.index} did not connect: {c}")
        for step in steps:
            world.step(step)
        world.finish()
        return world
    finally:
        world.close()


# -- bytes -> steps (atheris) --------------------------------------------------------------------
def decode(data: bytes) -> tuple[str, list[tuple]]:
    """A ring name and a step list from fuzz bytes."""
    ring = "py" if data[:1] and data[0] & 1 else "c"
    steps: list[tuple] = []
    pos = 1

    def take() -> int:
        nonlocal pos
        pos += 1
        return data[pos - 1] if pos <= len(data) else 0

    while pos < len(data) and len(steps) < 40:
        k = take() % 16
        if k <= 3:
            steps.append(("send", take() % 2, 1 + take() * 64, GOOD_SHAPES[take() % 5], take()))
        elif k == 4:
            steps.append(("hostile", HOSTILE_TX[take() % len(HOSTILE_TX)], take() * 257))
        elif k == 5:
            steps.append(("post_rx", RX_SHAPES[take() % len(RX_SHAPES)], 1 + take() % 4))
        elif k == 6:
            steps.append(("host_write", take() % 2, 1 + take() * 200))
        elif k == 7:
            steps.append(("victim_reading", bool(take() & 1)))
        elif k == 8:
            steps.append(("victim_consume", bool(take() & 1)))
        elif k == 9:
            steps.append(("victim_close", ("close", "close_unread", "shut_wr")[take() % 3]))
        elif k == 11 and take() < 128:
            steps.append(("victim_shutdown", 1 + take() % 3))
        elif k == 10 and take() < 32:
            steps.append(("break", take() % 2, BREAKS[take() % len(BREAKS)], take()))
        elif k == 12:
            steps.append(("host_connect", take() % 3, HOST_ANSWERS[take() % len(HOST_ANSWERS)],
                          CONNECT_HOW[take() % len(CONNECT_HOW)], take() * 40))
        elif k == 13:
            steps.append(("host_bad_line", take(), ("wait", "close")[take() % 2]))
        elif k == 14:
            steps.append(("hconn_io", 1 + take() * 100))
        elif k == 15 and take() < 64:
            steps.append(("wait",))
        elif k == 15:
            steps.append(("restart", RESTARTS[take() % len(RESTARTS)], take() * 300,
                          take() * 64)
                         if take() % 3 else ("post_events",))
        else:
            steps.append(("idle",))
    return ring, steps


def decode_options(data: bytes) -> dict[str, Any]:
    """`World` options from the first byte: bit 1 packed rings, bit 2 the event queue
    (bits 3-5 its buffers)."""
    first = data[0] if data else 0
    return dict(packed=bool(first & 2), event_queue=bool(first & 4),
                event_buffers=EVENT_BUFFERS[(first >> 3) % len(EVENT_BUFFERS)])


def one_input(data: bytes) -> None:
    ring, steps = decode(data)
    run_steps(steps, ring, **decode_options(data))


def main() -> None:  # pragma: no cover - needs atheris
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":  # pragma: no cover
    main()
