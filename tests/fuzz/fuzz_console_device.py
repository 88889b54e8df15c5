"""Fuzz harness for the whole console device (``ConsoleDevice`` in-process) under a hostile guest.

The twin of ``fuzz_vsock_device.py``: a real `ConsoleDevice` on a real `EventLoop`, its queues
set up through a real `BackendSession` (vhost-user messages handled in-process), real host
UNIX sockets on the ports' ``listen:`` endpoints and memfd guest RAM split in two regions,
driven by the ring driver model (``tests.support.driver``) and the Linux driver's control
model (``tests.support.console_guest.LinuxConsoleGuest``). Both ring implementations (and so
both stream pumps, zero copy on or off) take part.

The device has ``max_ports`` 4: a console port ``con`` (id 0, queues 0/1), ports ``p1`` and
``p2`` (ids 1/2, queues 4/5 and 6/7) and a hot-pluggable ``hp`` (id 3 while present). A step
list mixes well-formed traffic both ways on every port with hostile guest actions (control
messages the device must ignore, odd and broken chains on any queue, a guest that never posts
receive buffers on a port) and host and management events (peers that stop reading, close,
reconnect; hot-plug and unplug; a restart of every ring: GET_VRING_BASE, then
SET_VRING_BASE/ADDR/KICK/CALL).

Invariants, checked around every device entry point and after every step (`World.check_*`):

- no exception leaves the device (kicks, the loop's callbacks: the loop's "callback failed");
- guest memory outside the device-writable buffers of outstanding chains and the used rings
  is byte-for-byte unchanged (Spec: virtio 1.2 §2.7.4); a used length never exceeds the
  chain's writable bytes, and is 0 on a transmitq (§2.7.8.2, §5.3.6);
- per port, the bytes each host peer wrote reach the guest in order, exactly once, and only
  while the guest has the port open (Linux discards the others); all of them once the guest
  reads and has buffers posted; and a peer's bytes all arrive before the next peer's;
- per port, what the guest wrote reaches the host peers in order and exactly once, each
  peer a contiguous piece (bytes may be lost only when a peer leaves or the port goes); all
  of it once a reading peer is attached;
- the device and the guest agree about ports (ready, open) once control messages flowed; a
  removed port's transmitq holds no chain when DEVICE_REMOVE reaches the guest (Linux then
  detaches nothing);
- a broken queue uses no chain and is logged once; the other ports keep moving (a hostile
  or stuck port never stalls the rest).

``run_steps(steps, ring)`` runs a step list (the property test generates them); under
atheris ``python3 tests/fuzz/fuzz_console_device.py [corpus_dir]`` decodes bytes into steps.

Spec: virtio 1.2 §5.3.6 (Device Operation), §5.3.6.2 (Multiport), §2.7 (split rings).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from tests.fuzz.fuzz_vsock_device import Violation, _Records  # noqa: E402
from tests.support import ring_impl_class  # noqa: E402
from tests.support.console_guest import LinuxConsoleGuest  # noqa: E402
from tests.support.driver import DESC, INDIRECT, NEXT, WRITE, Allocator, MemfdRam, \
    SplitDriver, _Outstanding  # noqa: E402
from vhost_user.channel import Message  # noqa: E402
from vhost_user.session import OFFERED_PROTOCOL_FEATURES, BackendSession  # noqa: E402
from vhost_user.wire import FrontendReq, Header, MemoryRegion, MemoryTable, U64, \
    VirtioFeature, VringAddr, VringFd, VringState  # noqa: E402
from virtio.config import ConsoleConfig, Endpoint, PortConfig  # noqa: E402
from virtio.console.device import ConsoleDevice  # noqa: E402
from virtio.console.wire import BAD_ID, CONTROL_RX_QUEUE, CONTROL_TX_QUEUE, ConsoleFeature, \
    ControlEvent, ControlMessage, port_queues  # noqa: E402
from virtio.loop import EventLoop  # noqa: E402

RAM = 4 << 20
QSIZE = 64
CQSIZE = 32
MAX_PORTS = 4
PAGE = 4096
CONTROL_RX_POSTED = 16
RX_POSTED = 12  # receive buffers the guest keeps posted on a port it reads
CON, P1, P2, HP = 0, 1, 2, 3
FIXED_PORTS = {CON: "con", P1: "p1", P2: "p2"}
HP_NAME = "hp"
SETTLE_ROUNDS = 80
CHUNK = 16 * 1024  # largest guest write buffer

TX_SHAPES = ("one", "split", "indirect", "many", "zero_desc")
#: odd receive chains a guest may post on a port's receiveq
RX_ODD = ("readonly", "readonly_first", "zero_len", "tiny", "many", "indirect", "write_then_read")
#: odd transmit chains (no data of the stream in them)
TX_ODD = ("writable_only", "zero_len", "empty_indirect")
#: control messages the device must ignore (no state change)
CTL_IGNORED = ("unknown_port", "unknown_event", "wrong_direction", "bad_value", "short",
               "oversized", "not_announced", "writable_only")
BREAKS = ("loop", "next_oob", "avail_jump", "addr_oob", "indirect_nested")
HOST_CLOSE = ("close", "close_unread", "shut_wr")


class Streams:
    """Deterministic random byte streams: any 16-byte window locates its offset. Host peer
    streams carry the peer's number (mod 4) in their top two bits, so the pieces of two
    successive peers never blur."""

    def __init__(self) -> None:
        self._cache: dict[int, np.ndarray] = {}

    def get(self, seed: int, start: int, n: int, tag: int | None = None) -> bytes:
        arr = self._cache.get(seed)
        if arr is None or len(arr) < start + n:
            size = max(start + n, 1 << 20, 0 if arr is None else 2 * len(arr))
            arr = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
            self._cache[seed] = arr
        out = arr[start:start + n]
        if tag is not None:
            out = (out & 0x3F) | np.uint8((tag & 3) << 6)
        return out.tobytes()


@dataclasses.dataclass
class Peer:
    """One host client of a port's listen socket."""

    number: int
    sock: socket.socket | None
    sent: bytearray = dataclasses.field(default_factory=bytearray)  # host -> guest
    received: bytearray = dataclasses.field(default_factory=bytearray)  # guest -> host
    reading: bool = True
    closed: str = ""  # how the test closed it ("" = open)
    eof: bool = False
    #: the guest wrote to the port after this peer left: the device's write fails (EPIPE)
    #: and it drops the connection with the bytes the peer left unread (QEMU does the same)
    cut: bool = False
    mark: int = 0  # guest bytes written to the port before this peer connected


@dataclasses.dataclass
class PortState:
    """One port generation (from its add to its removal) as the guest and host see it."""

    pid: int
    name: str
    generation: int
    starve: bool = False  # the guest posts no receive buffers
    received: bytearray = dataclasses.field(default_factory=bytearray)  # guest got
    discarded: int = 0  # bytes that arrived while the guest had the port closed
    sent: bytearray = dataclasses.field(default_factory=bytearray)  # the guest posted
    outbox: bytearray = dataclasses.field(default_factory=bytearray)  # to post
    peers: list[Peer] = dataclasses.field(default_factory=list)
    removed: bool = False
    created: bool = False  # the guest created it (PORT_ADD)

    @property
    def peer(self) -> Peer | None:
        return self.peers[-1] if self.peers and not self.peers[-1].closed else None


class World:
    """A console device, its guest and its host peers; see the module docstring."""

    def __init__(self, ring: str, *, zero_copy: bool = True) -> None:
        self.dir = tempfile.mkdtemp(prefix="cdh-")
        self.records = _Records()
        self._loggers = [logging.getLogger(n) for n in ("virtio", "ring", "vhost_user")]
        for lg in self._loggers:
            lg.addHandler(self.records)
        self.loop = EventLoop()
        self.streams = Streams()
        self.ring = ring
        cfg = ConsoleConfig(
            socket=f"{self.dir}/vu.sock", max_ports=MAX_PORTS, socket_dir=self.dir,
            console=Endpoint("listen", f"{self.dir}/con.sock"),
            ports=(PortConfig("p1"), PortConfig("p2")), zero_copy=zero_copy)
        self.events: list[tuple[str, dict]] = []
        self.dev = ConsoleDevice(self.loop, cfg, lambda n, d: self.events.append((n, d)))
        self.session = BackendSession(self.dev, signal=lambda fd: None,
                                      virtqueue_factory=ring_impl_class(ring))
        self.ram = MemfdRam([(0, RAM // 2), (RAM // 2, RAM // 2)])  # buffers straddle
        self.mem = self.ram.memory
        self.alloc = Allocator(self.mem)
        self.features = int(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX
                            | VirtioFeature.RING_INDIRECT_DESC
                            | VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES
                            | ConsoleFeature.F_SIZE | ConsoleFeature.F_MULTIPORT
                            | ConsoleFeature.F_EMERG_WRITE)
        self.drivers = {i: SplitDriver(self.mem, CQSIZE if i in (2, 3) else QSIZE,
                                       event_idx=True, allocator=self.alloc, index=i)
                        for i in range(2 * (MAX_PORTS + 1))}
        self.model = LinuxConsoleGuest(MAX_PORTS)
        self.ports: dict[int, PortState] = {}
        self.generations = 0
        self.history: list[PortState] = []
        self.broken: dict[int, int] = {}  # queue -> used idx once broken
        self.broken_asked = False
        self.control_tainted = False  # guest-side control state no longer trustworthy
        self.ctl_pending: list[list[bytes]] = []  # control messages waiting for ring room
        self.ignored_expected = 0
        self.steps_run = 0
        self.restarts = 0
        for pid, name in FIXED_PORTS.items():
            self._new_port_state(pid, name)
        self.vu(FrontendReq.SET_PROTOCOL_FEATURES, U64(int(OFFERED_PROTOCOL_FEATURES)).pack())
        self.vu(FrontendReq.SET_OWNER)
        self.start_queues({})

    def _new_port_state(self, pid: int, name: str) -> PortState:
        self.generations += 1
        st = PortState(pid, name, self.generations)
        self.ports[pid] = st
        self.history.append(st)
        return st

    # -- the front-end (vhost-user messages to the session) -----------------------------------
    def vu(self, request: FrontendReq, payload: bytes = b"", fds: tuple[int, ...] = ()) -> list:
        msg = Message(Header(int(request), 1, len(payload)), payload, tuple(fds))
        out: list = []
        self.device(lambda: out.extend(self.session.handle(msg)))
        return out

    def start_queues(self, bases: dict[int, int]) -> None:
        """vhost_dev_start: features, memory table, each ring (at ``bases``, else fresh),
        then enable. Spec: vhost-user "Ring states", VHOST_USER_SET_VRING_BASE."""
        self.vu(FrontendReq.SET_FEATURES, U64(self.features).pack())
        regions = tuple(MemoryRegion(s.gpa, s.size, s.uva, s.mmap_offset)
                        for s in self.ram.specs)
        self.vu(FrontendReq.SET_MEM_TABLE, MemoryTable(regions).pack(),
                tuple(os.dup(self.ram.fd) for _ in regions))
        uva = self.ram.specs[0].uva
        for i, d in self.drivers.items():
            desc, driver, device = d.ring_addresses
            self.vu(FrontendReq.SET_VRING_NUM, VringState(i, d.size).pack())
            self.vu(FrontendReq.SET_VRING_BASE, VringState(i, bases.get(i, 0)).pack())
            self.vu(FrontendReq.SET_VRING_ADDR,
                    VringAddr(i, 0, uva + desc, uva + device, uva + driver, device).pack())
            self.vu(FrontendReq.SET_VRING_KICK, VringFd(i, False).pack(),
                    (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),))
            self.vu(FrontendReq.SET_VRING_CALL, VringFd(i, False).pack(),
                    (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),))
        for i in self.drivers:
            self.vu(FrontendReq.SET_VRING_ENABLE, VringState(i, 1).pack())
        self.vu(FrontendReq.SET_STATUS, U64(0xF).pack())

    def stop_queues(self) -> dict[int, int]:
        """vhost_dev_stop: disable each ring, GET_VRING_BASE each. Spec: vhost-user
        VHOST_USER_GET_VRING_BASE."""
        for i in self.drivers:
            self.vu(FrontendReq.SET_VRING_ENABLE, VringState(i, 0).pack())
        bases = {}
        for i in self.drivers:
            (reply,) = self.vu(FrontendReq.GET_VRING_BASE, VringState(i, 0).pack())
            bases[i] = VringState.unpack(reply.data[Header.FMT.size:]).num
        self.vu(FrontendReq.SET_STATUS, U64(0).pack())
        return bases

    def restart(self) -> None:
        """Every ring stops and starts again where it was (QEMU's stop/cont): nothing may be
        lost or repeated."""
        if self.broken:
            return  # a broken ring would start again clean: covered by the vsock harness
        self.start_queues(self.stop_queues())
        self.restarts += 1
        for i in self.drivers:
            self.kick(i)

    def vq(self, index: int):
        return self.session.vrings[index].vq

    def close(self) -> None:
        try:
            self.session.close()
            self.dev.close()
        finally:
            for st in self.history:
                for p in st.peers:
                    if p.sock is not None:
                        p.sock.close()
            self.loop.close()
            self.ram.close()
            for lg in self._loggers:
                lg.removeHandler(self.records)
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- the device, watched -----------------------------------------------------------------
    def _allowed(self) -> list[tuple[int, int]]:
        spans = [(d.used_gpa, 6 + 8 * d.size) for d in self.drivers.values()]
        for d in self.drivers.values():
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
            if old == bytes(region.view):
                continue
            diff = np.nonzero(np.frombuffer(old, np.uint8)
                              != np.frombuffer(region.view, np.uint8))[0]
            allowed = np.zeros(len(old), bool)
            for a, n in self._allowed():
                lo, hi = max(a - region.gpa, 0), min(a + n - region.gpa, len(old))
                if lo < hi:
                    allowed[lo:hi] = True
            bad += [int(g) + region.gpa for g in diff[~allowed[diff]]]
        if bad:
            raise Violation(f"device wrote guest memory outside posted writable buffers/used "
                            f"rings at {len(bad)} bytes, first gpa {bad[0]:#x} ({call})")

    def kick(self, index: int) -> None:
        """The guest notifies queue ``index``: through the device's own kick reader when it
        set one (as the loop would call it), else the session's on_kick."""
        vring = self.session.vrings[index]
        reader = self.session.kick_reader(index)
        if reader is not None and vring.kick_fd is not None:
            os.eventfd_write(vring.kick_fd, 1)
            self.device(reader, vring.kick_fd)
        else:
            self.device(self.session.on_kick, index)

    def turn(self, force_kick: bool = False) -> None:
        for i, d in self.drivers.items():
            if d.kick_prepare() or (force_kick and i in self.broken):
                self.kick(i)
        self.device(self.loop.run_once, 0)
        self.check_logs()

    def check_logs(self) -> None:
        for r in self.records.records:
            msg = r.getMessage()
            if r.levelno >= logging.ERROR and "callback" in msg and "failed" in msg:
                raise Violation(f"an exception escaped the device: {msg}")

    def _note_broken(self) -> None:
        for i, d in self.drivers.items():
            vq = self.vq(i)
            if i not in self.broken and vq is not None and vq.broken is not None:
                self.broken[i] = d.used_idx

    # -- reaping -----------------------------------------------------------------------------
    def reap(self, index: int) -> list:
        """Used chains of queue ``index``, each checked against its writable bytes."""
        if index in self.broken:
            return []
        d = self.drivers[index]
        out = []
        while d.last_used_idx != d.used_idx:
            head, length = d.used_elem(d.last_used_idx & (d.size - 1))
            state = d._outstanding.get(head)
            if state is None:
                raise Violation(f"queue {index}: used id {head} names no outstanding chain")
            room = sum(n for _, n in state.writable)
            if length > room:
                raise Violation(f"queue {index}: chain {head} used with length {length} > its "
                                f"{room} writable bytes")
            if index % 2 == 1 and length != 0:
                raise Violation(f"transmitq {index}: chain {head} used with length {length}")
            out.append(d.get_buf())
        return out

    # -- guest: control ----------------------------------------------------------------------
    def send_control(self, message: bytes, shape: str = "one") -> None:
        if shape == "split" and len(message) > 1:
            pieces = [message[:3], message[3:]]
        elif shape == "writable_only":
            pieces = []
        else:
            pieces = [message]
        self.ctl_pending.append(pieces)
        self.flush_control_tx()

    def flush_control_tx(self) -> None:
        if CONTROL_TX_QUEUE in self.broken:
            self.ctl_pending.clear()
            return
        d = self.drivers[CONTROL_TX_QUEUE]
        self.reap(CONTROL_TX_QUEUE)
        while self.ctl_pending:
            pieces = self.ctl_pending[0]
            try:
                d.add_buf(out=pieces, in_sizes=() if pieces else (8,))
            except MemoryError:
                return
            self.ctl_pending.pop(0)
            # Linux busy-waits for each control buffer (__send_control_msg)
            if d.kick_prepare():
                self.kick(CONTROL_TX_QUEUE)
            self.reap(CONTROL_TX_QUEUE)

    def post_control_rx(self, n: int, shape: str = "page") -> None:
        if CONTROL_RX_QUEUE in self.broken:
            return
        d = self.drivers[CONTROL_RX_QUEUE]
        for _ in range(n):
            kw: dict[str, Any] = dict(in_sizes=[PAGE])
            if shape == "readonly":
                kw = dict(out=[b"\x55" * 16])
            elif shape == "readonly_first":
                kw = dict(out=[b"\x55" * 16], in_sizes=[PAGE])
            elif shape == "tiny":
                kw = dict(in_sizes=[3])
            try:
                d.add_buf(**kw)
            except MemoryError:
                return

    def reap_control(self) -> bool:
        got = False
        for used in self.reap(CONTROL_RX_QUEUE):
            got = True
            if used.len_ == 0:
                self.post_control_rx(1)
                continue
            if used.len_ < 8:
                self.control_tainted = True  # a message cut by a buffer the guest made tiny
            before = set(self.model.ports)
            replies = self.model.receive(used.data[:used.len_])
            self.post_control_rx(1)  # Linux re-adds the buffer (control_work_handler)
            after = set(self.model.ports)
            for pid in sorted(after - before):
                self._guest_created(pid)
            for pid in sorted(before - after):
                self._guest_removed(pid)
            for message in replies:
                self.send_control(message)
        return got

    def _guest_created(self, pid: int) -> None:
        """Linux add_port: fill the receiveq, then PORT_READY (sent by the model)."""
        st = next((s for s in reversed(self.history) if s.pid == pid), None)
        if st is None:
            raise Violation(f"the guest created port {pid}, which the device never had")
        if st.created:
            raise Violation(f"the guest created port {pid} twice")
        st.created = True
        self.refill(st)

    def _guest_removed(self, pid: int) -> None:
        """Linux unplug_port / remove_port_data: take the used receive buffers (discarded),
        detach the unused ones (avail idx steps back), take the used transmit buffers; an
        unused transmit buffer left is the device's fault (it must have emptied the
        transmitq before DEVICE_REMOVE)."""
        st = next(s for s in self.history if s.pid == pid and s.created)
        rx_q, tx_q = port_queues(pid)
        self.reap_port_rx(st, discard=True)
        self.detach_unused(rx_q)
        self.reap(tx_q)
        left = self.drivers[tx_q].outstanding
        if left and tx_q not in self.broken:
            raise Violation(f"port {pid}: {left} transmit chains still in the ring when "
                            f"DEVICE_REMOVE reached the guest")
        self.detach_unused(tx_q)
        st.created = False

    def detach_unused(self, index: int) -> None:
        """Linux virtqueue_detach_unused_buf_split for every outstanding chain."""
        if index in self.broken:
            return
        d = self.drivers[index]
        for head in list(d._outstanding):
            state = d._outstanding.pop(head)
            for gpa in state.buffers:
                d.alloc.free(gpa)
            if state.indirect_gpa is not None:
                d.alloc.free(state.indirect_gpa)
            d._release(head, state)
            d.write_avail_idx(d.avail_idx_shadow - 1)

    # -- guest: ports ------------------------------------------------------------------------
    def guest_open(self, pid: int) -> bool:
        gp = self.model.ports.get(pid)
        return gp is not None and gp.guest_connected

    def refill(self, st: PortState) -> None:
        rx_q = port_queues(st.pid)[0]
        if st.starve or rx_q in self.broken or not st.created or st.removed:
            return
        d = self.drivers[rx_q]
        for _ in range(RX_POSTED - d.outstanding):
            try:
                d.add_buf(in_sizes=[PAGE])
            except MemoryError:
                return

    def reap_port_rx(self, st: PortState, discard: bool = False) -> bool:
        got = False
        for used in self.reap(port_queues(st.pid)[0]):
            got = True
            if discard or not self.guest_open(st.pid):
                st.discarded += used.len_
            else:
                st.received += used.data[:used.len_]
        return got

    def flush_tx(self, st: PortState, shape: str = "one") -> bool:
        tx_q = port_queues(st.pid)[1]
        if tx_q in self.broken or not st.created:
            return False
        self.reap(tx_q)
        d = self.drivers[tx_q]
        moved = False
        while st.outbox:
            n = min(len(st.outbox), CHUNK)
            data = bytes(st.outbox[:n])
            try:
                self._add_tx(d, data, shape)
            except MemoryError:
                break
            del st.outbox[:n]
            st.sent += data
            moved = True
        return moved

    @staticmethod
    def _add_tx(d: SplitDriver, data: bytes, shape: str) -> None:
        if shape == "split" and len(data) > 1:
            d.add_buf(out=[data[:len(data) // 2], data[len(data) // 2:]])
        elif shape == "indirect":
            d.add_buf(out=[data[:7], data[7:]] if len(data) > 7 else [data], indirect=True)
        elif shape == "many":
            step = max(1, -(-len(data) // 20))
            d.add_buf(out=[data[i:i + step] for i in range(0, len(data), step)])
        elif shape == "zero_desc":
            d.add_buf(out=[b"", data, b""])
        else:
            d.add_buf(out=[data])

    def gsend(self, pid: int, n: int, shape: str) -> None:
        st = self.ports.get(pid)
        if st is None or not st.created:
            return
        st.outbox += self.streams.get(1000 + st.generation, len(st.sent) + len(st.outbox), n)
        for p in st.peers:
            p.cut = p.cut or bool(p.closed)
        self.flush_tx(st, shape)

    def gopen(self, pid: int, want: bool) -> None:
        gp = self.model.ports.get(pid)
        if gp is None or gp.is_console or gp.guest_connected == want:
            return
        st = self.ports[pid]
        self.reap_port_rx(st)  # what in_intr had already taken
        for message in (self.model.open(pid) if want else self.model.close(pid)):
            self.send_control(message)

    def starve(self, pid: int, on: bool) -> None:
        st = self.ports.get(pid)
        if st is not None:
            st.starve = on
            if not on:
                self.refill(st)

    def post_rx_odd(self, pid: int, shape: str) -> None:
        st = self.ports.get(pid)
        rx_q = port_queues(pid)[0]
        if st is None or not st.created or rx_q in self.broken:
            return
        kw: dict[str, Any]
        if shape == "readonly":
            kw = dict(out=[b"\xAA" * 64])
        elif shape == "readonly_first":
            kw = dict(out=[b"\xAA" * 64], in_sizes=[PAGE])
        elif shape == "zero_len":
            kw = dict(in_sizes=[0, 100, 0, 50])
        elif shape == "tiny":
            kw = dict(in_sizes=[1])
        elif shape == "many":
            kw = dict(in_sizes=[97] * 30)
        elif shape == "indirect":
            kw = dict(in_sizes=[700, PAGE - 700], indirect=True)
        elif shape == "write_then_read":  # §2.7.4.2: the driver MUST NOT (writable first)
            d = self.drivers[rx_q]
            try:
                head = d.add_buf(out=[b"\xAA" * 64], in_sizes=[64])
            except MemoryError:
                return
            state = d._outstanding[head]
            (first, second), (ro, wr) = state.descs, state.buffers
            d.write_desc(first, wr, 64, WRITE | NEXT, second)
            d.write_desc(second, ro, 64, 0, 0)
            return
        else:  # pragma: no cover
            raise ValueError(shape)
        try:
            self.drivers[rx_q].add_buf(**kw)
        except MemoryError:
            pass

    def post_tx_odd(self, pid: int, shape: str) -> None:
        st = self.ports.get(pid)
        tx_q = port_queues(pid)[1]
        if st is None or not st.created or tx_q in self.broken:
            return
        d = self.drivers[tx_q]
        try:
            if shape == "writable_only":
                d.add_buf(in_sizes=[64])
            elif shape == "zero_len":
                d.add_buf(out=[b"", b""])
            elif shape == "empty_indirect":
                d.add_buf(out=[b""], indirect=True)
            else:  # pragma: no cover
                raise ValueError(shape)
        except MemoryError:
            pass

    # -- guest: hostile control messages -------------------------------------------------------
    def ctl_hostile(self, kind: str, arg: int) -> None:
        """A control message the device must ignore (CTL_IGNORED): nothing may change."""
        if CONTROL_TX_QUEUE in self.broken:
            return
        real = sorted(self.model.ports) or [P1]
        pid = real[arg % len(real)]
        if kind == "unknown_port":
            bad = (MAX_PORTS, 100, BAD_ID, 1 << 31, MAX_PORTS + 1)[arg % 5]
            ev = (ControlEvent.PORT_READY, ControlEvent.PORT_OPEN)[arg % 2]
            msg = ControlMessage.build(bad, ev, 1)
        elif kind == "unknown_event":
            msg = ControlMessage.build(pid, (8, 9, 0xFF, 0xFFFF, 100)[arg % 5], 1)
        elif kind == "wrong_direction":
            ev = (ControlEvent.DEVICE_ADD, ControlEvent.DEVICE_REMOVE, ControlEvent.CONSOLE_PORT,
                  ControlEvent.RESIZE, ControlEvent.PORT_NAME)[arg % 5]
            msg = ControlMessage.build(pid, ev, 1)
        elif kind == "bad_value":
            ev = (ControlEvent.PORT_OPEN, ControlEvent.PORT_READY,
                  ControlEvent.DEVICE_READY)[arg % 3]
            msg = ControlMessage.build(BAD_ID if ev == ControlEvent.DEVICE_READY else pid, ev,
                                       (2, 3, 0xFFFF, 0x100)[arg % 4])
        elif kind == "short":
            msg = ControlMessage.build(pid, ControlEvent.PORT_OPEN, 0)[:arg % 8]
        elif kind == "oversized":
            gp = self.model.ports.get(pid)
            state = int(gp is not None and gp.guest_connected)
            msg = ControlMessage.build(pid, ControlEvent.PORT_OPEN, state) + \
                bytes(range(1 + arg % 64))
        elif kind == "not_announced":
            free = [i for i in range(MAX_PORTS) if i not in self.dev.control.ports]
            if not free:
                return
            ev = (ControlEvent.PORT_READY, ControlEvent.PORT_OPEN)[arg % 2]
            msg = ControlMessage.build(free[arg % len(free)], ev, 1)
        elif kind == "writable_only":
            self.send_control(b"", "writable_only")
            self.ignored_expected += 1
            return
        else:  # pragma: no cover
            raise ValueError(kind)
        self.ignored_expected += 1
        self.send_control(msg, ("one", "split")[arg % 2])

    def repeat_device_ready(self, shape: str) -> None:
        """A guest that sends DEVICE_READY(1) again (a fresh driver instance for the device:
        it announces every port again and forgets what the guest had open), then PORT_OPEN(1)
        for the ports it has open, as a resuming driver would."""
        self.send_control(ControlMessage.build(BAD_ID, ControlEvent.DEVICE_READY, 1), shape)
        for pid, gp in sorted(self.model.ports.items()):
            if gp.guest_connected:
                self.send_control(ControlMessage.build(pid, ControlEvent.PORT_OPEN, 1))

    # -- host peers ----------------------------------------------------------------------------
    def host_connect(self, pid: int) -> None:
        st = self.ports.get(pid)
        if st is None or st.peer is not None:
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(f"{self.dir}/{st.name}.sock")
        except OSError:
            s.close()
            return
        s.setblocking(False)
        st.peers.append(Peer(len(st.peers), s, mark=len(st.sent) + len(st.outbox)))

    def host_write(self, pid: int, n: int) -> None:
        st = self.ports.get(pid)
        p = st.peer if st is not None else None
        if p is None or p.sock is None:
            return
        data = self.streams.get(5000 + 10 * st.generation + p.number, len(p.sent), n, p.number)
        try:
            sent = p.sock.send(data)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            sent = 0
        p.sent += data[:sent]

    def host_reading(self, pid: int, on: bool) -> None:
        st = self.ports.get(pid)
        if st is not None and st.peer is not None:
            st.peer.reading = on

    def host_close(self, pid: int, mode: str) -> None:
        st = self.ports.get(pid)
        p = st.peer if st is not None else None
        if p is None or p.sock is None:
            return
        if mode == "close":
            self._read_peer(p)
        p.closed = mode
        if mode == "shut_wr":
            p.sock.shutdown(socket.SHUT_WR)
            return
        p.sock.close()
        p.sock = None

    def _read_peer(self, p: Peer) -> bool:
        moved = False
        try:
            while chunk := p.sock.recv(1 << 20):
                p.received += chunk
                moved = True
            if not p.eof:
                p.eof = moved = True
        except (BlockingIOError, ConnectionResetError):
            pass
        return moved

    def host_io(self) -> bool:
        moved = False
        for st in self.ports.values():
            for p in st.peers:
                if p.sock is not None and p.reading:
                    moved |= self._read_peer(p)
        return moved

    # -- management ----------------------------------------------------------------------------
    def hotplug(self, add: bool) -> None:
        if add:
            if self.dev.control.ports.find(HP_NAME) is not None:
                return
            port = self.dev.add_port(HP_NAME)
            if port.id in self.ports and not self.ports[port.id].removed:
                raise Violation(f"hot-added port got id {port.id}, still in use")
            self._new_port_state(port.id, HP_NAME)
        else:
            port = self.dev.control.ports.find(HP_NAME)
            if port is None:
                return
            st = self.ports[port.id]
            self.host_io()
            self.dev.remove_port(HP_NAME)
            st.removed = True
            for p in st.peers:
                if p.sock is not None and not p.closed:
                    p.closed = "removed"

    # -- running -------------------------------------------------------------------------------
    def settle(self) -> None:
        quiet = 0
        for _ in range(SETTLE_ROUNDS):
            for st in list(self.ports.values()):
                self.flush_tx(st)
            self.flush_control_tx()
            self.turn(force_kick=self.broken_asked)
            moved = self.reap_control()
            for st in list(self.ports.values()):
                moved |= self.reap_port_rx(st)
                self.refill(st)
            moved |= self.host_io()
            quiet = 0 if moved else quiet + 1
            if quiet >= 3:
                return

    def boot(self, early: int = 0) -> None:
        """Linux probe: control receive buffers, DEVICE_READY; ``early`` hostile PORT_READY /
        PORT_OPEN messages go first (the device must ignore them: it announced nothing)."""
        self.post_control_rx(CONTROL_RX_POSTED)
        for i in range(early):
            ev = (ControlEvent.PORT_READY, ControlEvent.PORT_OPEN)[i % 2]
            self.send_control(ControlMessage.build(i % MAX_PORTS, ev, 1))
            self.ignored_expected += 1
        for message in self.model.driver_ok():
            self.send_control(message)
        self.settle()
        for pid in FIXED_PORTS:
            self.host_connect(pid)
        self.settle()
        for pid in (P1, P2):
            self.gopen(pid, True)
        self.settle()
        for pid in FIXED_PORTS:
            if not self.ports[pid].created or not self.guest_open(pid):
                raise Violation(f"port {pid} did not come up: {self.model.ports.get(pid)}")

    def step(self, step: tuple) -> None:
        kind, *args = step
        if kind == "gsend":
            self.gsend(*args)
        elif kind == "host_write":
            self.host_write(*args)
        elif kind == "host_reading":
            self.host_reading(*args)
        elif kind == "host_close":
            self.host_close(*args)
        elif kind == "host_connect":
            self.host_connect(*args)
        elif kind == "gopen":
            self.gopen(*args)
        elif kind == "starve":
            self.starve(*args)
        elif kind == "rx_odd":
            self.post_rx_odd(*args)
        elif kind == "tx_odd":
            self.post_tx_odd(*args)
        elif kind == "ctl":
            self.ctl_hostile(*args)
        elif kind == "ready_again":
            self.repeat_device_ready(*args)
        elif kind == "ctl_rx_odd":
            self.post_control_rx(1, args[0])
        elif kind == "hotplug":
            self.hotplug(*args)
        elif kind == "restart":
            self.restart()
        elif kind == "break":
            self.break_ring(*args)
        elif kind != "idle":  # pragma: no cover
            raise ValueError(kind)
        self.settle()
        self.check_broken()
        self.check_streams(final=False)
        self.steps_run += 1

    # -- broken rings --------------------------------------------------------------------------
    def break_ring(self, index: int, how: str, arg: int) -> None:
        if index in self.broken:
            return
        d = self.drivers[index]
        self.reap(index)
        if d.num_free < 2:
            return
        head = d.free_head
        other = d._next[head]
        buf = d.alloc.alloc(64)
        flag = WRITE if index % 2 == 0 else 0
        if how == "loop":
            d.write_desc(head, buf, 64, flag | NEXT, head)
        elif how == "next_oob":
            d.write_desc(head, buf, 64, flag | NEXT, d.size + arg % 1000)
        elif how == "addr_oob":
            d.write_desc(head, RAM + (arg << 12), 64, flag, 0)
        elif how == "indirect_nested":
            d.write(buf, DESC.pack(buf, 16, INDIRECT, 0) * 4)
            d.write_desc(head, buf, 64, INDIRECT, 0)
        if how == "avail_jump":
            d.write_avail_idx(d.avail_idx_shadow + d.size + 1 + arg % 1000)
        else:
            d._outstanding[head] = _Outstanding([buf], [], 1, [head], None, None)
            d.free_head, d.num_free = other, d.num_free - 1
            d.expose(head)
        self.broken_asked = True
        self.kick(index)
        self.device(self.loop.run_once, 0)

    def check_broken(self) -> None:
        for index, used in self.broken.items():
            d = self.drivers[index]
            if d.used_idx != used:
                raise Violation(f"queue {index} used {(d.used_idx - used) & 0xFFFF} chains "
                                f"after it broke")
        logged = [r.getMessage() for r in self.records.records
                  if "broken" in r.getMessage() or "DriverError" in r.getMessage()
                  or "control transmitq" in r.getMessage()
                  or "control receiveq" in r.getMessage()]
        if len(logged) > 2 * len(self.broken):
            raise Violation(f"{len(self.broken)} broken queues logged {len(logged)} times "
                            f"(once each, STYLE R5): {logged[:6]}")

    # -- delivery ------------------------------------------------------------------------------
    def port_ok(self, st: PortState) -> bool:
        """The device and the guest agree this port is up and open, and its control plane
        is not in doubt."""
        port = self.dev.control.ports.get(st.pid)
        return (not st.removed and st.created and port is not None
                and not self.control_tainted
                and CONTROL_RX_QUEUE not in self.broken and CONTROL_TX_QUEUE not in self.broken
                and port.guest_open == self.guest_open(st.pid))

    def check_streams(self, final: bool) -> None:
        for st in self.history:
            self.check_host_to_guest(st, final)
            self.check_guest_to_host(st, final)
        if not self.control_tainted and CONTROL_RX_QUEUE not in self.broken \
                and CONTROL_TX_QUEUE not in self.broken:
            self.check_agreement()

    def check_host_to_guest(self, st: PortState, final: bool) -> None:
        if st.discarded and not st.removed:
            raise Violation(f"port {st.pid}: {st.discarded} host bytes reached it while the "
                            f"guest had it closed (Linux discards them)")
        got = bytes(st.received)
        pos = 0
        short = 0  # bytes of peers that are not cut still to come
        for i, p in enumerate(st.peers):
            k = _common_prefix(got, pos, p.sent)
            short += 0 if p.cut else len(p.sent) - k
            later = pos + k < len(got)
            if later and k < len(p.sent) and not p.cut:
                raise Violation(f"port {st.pid}: the guest got {k} of peer {i}'s "
                                f"{len(p.sent)} bytes, then bytes of a later peer or bytes "
                                f"nobody sent (at {pos + k})")
            pos += k
        if pos != len(got):
            raise Violation(f"port {st.pid}: the guest got {len(got) - pos} bytes no host peer "
                            f"sent at that point (offset {pos} of {len(got)})")
        rx_q = port_queues(st.pid)[0]
        if not self.port_ok(st) or st.starve or rx_q in self.broken \
                or not self.guest_open(st.pid):
            return
        if short:
            raise Violation(f"port {st.pid}: {short} bytes the host peers sent did not reach "
                            f"the guest while it reads with buffers posted")

    def check_guest_to_host(self, st: PortState, final: bool) -> None:
        sent = bytes(st.sent)
        end = 0
        for i, p in enumerate(st.peers):
            if not p.received:
                continue
            got = bytes(p.received)
            start = end if sent[end:end + len(got)] == got else -1
            if start < 0:
                start = sent.find(got[:32], end)
                if start < 0 or sent[start:start + len(got)] != got:
                    raise Violation(f"port {st.pid}: peer {i} got {len(got)} bytes that are not "
                                    f"the next piece of what the guest sent (after {end})")
                if not st.peers[i - 1].closed if i else True:
                    raise Violation(f"port {st.pid}: peer {i} missed guest bytes "
                                    f"{end}..{start} though no peer left before it")
            end = start + len(got)
        tx_q = port_queues(st.pid)[1]
        p = st.peer
        if not self.port_ok(st) or tx_q in self.broken or p is None or not p.reading:
            return
        if p.number >= self._accepted(st):
            return
        # A peer that left unread bytes took them with it; the one after it gets at least
        # everything written since it connected.
        took_all = end == len(sent) and not st.outbox
        if not took_all and not (not p.received and len(sent) <= p.mark and not st.outbox):
            raise Violation(f"port {st.pid}: the guest sent {len(sent) + len(st.outbox)} bytes, "
                            f"the reading host peer has {end}")
        left = self.drivers[tx_q].outstanding
        if left:
            raise Violation(f"port {st.pid}: {left} transmit chains not returned though the "
                            f"peer read everything")

    def _accepted(self, st: PortState) -> int:
        io = self.dev._io.get(st.pid)
        return 0 if io is None else io.endpoint.connections

    def check_agreement(self) -> None:
        """Once control messages flowed, the device's view of each port is the guest's."""
        if self.dev.control.pending or self.ctl_pending:
            return
        for pid, port in ((p.id, p) for p in self.dev.control.ports):
            gp = self.model.ports.get(pid)
            if gp is None:
                if port.guest_ready:
                    raise Violation(f"device thinks the guest has port {pid}; it has not")
                continue
            if not port.guest_ready:
                raise Violation(f"the guest has port {pid}, the device thinks it is not ready")
            if port.guest_open != gp.guest_connected:
                raise Violation(f"port {pid}: device guest_open {port.guest_open}, guest "
                                f"{gp.guest_connected}")
            if gp.host_connected != port.host_connected:
                raise Violation(f"port {pid}: guest thinks host_connected "
                                f"{gp.host_connected}, device {port.host_connected}")
        for pid in self.model.ports:
            if self.dev.control.ports.get(pid) is None:
                raise Violation(f"the guest still has port {pid}, which the device removed")
        ignored = self.dev.control.stats.ignored
        if ignored < self.ignored_expected:
            raise Violation(f"{self.ignored_expected} bad control messages sent, the device "
                            f"ignored {ignored}")

    def finish(self) -> None:
        """Open every tap (peers read, the guest reads every port with buffers posted) and
        check that everything arrived."""
        for st in self.ports.values():
            for p in st.peers:
                p.reading = True
            if st.starve:
                self.starve(st.pid, False)
        self.settle()
        self.check_broken()
        self.check_streams(final=True)


def _common_prefix(got: bytes, pos: int, want: bytes | bytearray) -> int:
    n = min(len(got) - pos, len(want))
    if n <= 0:
        return 0
    a = np.frombuffer(got, np.uint8, n, pos)
    b = np.frombuffer(bytes(want[:n]), np.uint8)
    diff = np.nonzero(a != b)[0]
    return int(diff[0]) if len(diff) else n


def run_steps(steps: list[tuple], ring: str = "c", *, zero_copy: bool = True,
              early: int = 0) -> World:
    """Boot the guest (``early`` hostile control messages before DEVICE_READY), run
    ``steps``, then ``finish``; raises `Violation`."""
    world = World(ring, zero_copy=zero_copy)
    try:
        world.boot(early)
        for step in steps:
            world.step(step)
        world.finish()
        return world
    finally:
        world.close()


# -- bytes -> steps (atheris) --------------------------------------------------------------------
QUEUES = (0, 1, CONTROL_RX_QUEUE, CONTROL_TX_QUEUE, 4, 5, 6, 7)


def decode(data: bytes) -> tuple[str, bool, list[tuple]]:
    """A ring name, zero copy on/off and a step list from fuzz bytes."""
    ring = "py" if data[:1] and data[0] & 1 else "c"
    zero_copy = not (data[:1] and data[0] & 2)
    steps: list[tuple] = []
    pos = 1

    def take() -> int:
        nonlocal pos
        pos += 1
        return data[pos - 1] if pos <= len(data) else 0

    while pos < len(data) and len(steps) < 40:
        k = take() % 16
        port = take() % 4
        if k <= 2:
            steps.append(("gsend", port, 1 + take() * 97, TX_SHAPES[take() % len(TX_SHAPES)]))
        elif k <= 4:
            steps.append(("host_write", port, 1 + take() * 311))
        elif k == 5:
            steps.append(("host_reading", port, bool(take() & 1)))
        elif k == 6:
            steps.append(("host_close", port, HOST_CLOSE[take() % 3]))
        elif k == 7:
            steps.append(("host_connect", port))
        elif k == 8:
            steps.append(("gopen", port, bool(take() & 1)))
        elif k == 9:
            steps.append(("starve", port, bool(take() & 1)))
        elif k == 10:
            steps.append(("rx_odd", port, RX_ODD[take() % len(RX_ODD)]))
        elif k == 11:
            steps.append(("tx_odd", port, TX_ODD[take() % len(TX_ODD)]))
        elif k == 12:
            steps.append(("ctl", CTL_IGNORED[take() % len(CTL_IGNORED)], take()))
        elif k == 13:
            steps.append(("hotplug", bool(take() & 1)))
        elif k == 14 and take() < 64:
            steps.append(("break", QUEUES[take() % len(QUEUES)], BREAKS[take() % 5], take()))
        elif k == 15 and take() < 64:
            steps.append(("restart",) if take() & 1 else ("ready_again", "one"))
        else:
            steps.append(("idle",))
    return ring, zero_copy, steps


def one_input(data: bytes) -> None:
    ring, zero_copy, steps = decode(data)
    run_steps(steps, ring, zero_copy=zero_copy)


def main() -> None:  # pragma: no cover - needs atheris
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":  # pragma: no cover
    main()
