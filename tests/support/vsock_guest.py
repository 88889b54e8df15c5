"""A guest-side virtio-vsock driver model over the ring driver model (tests and bench).

It plays what Linux ``net/vmw_vsock/virtio_transport.c`` + ``virtio_transport_common.c`` do
for a vhost-user vsock device driven by the project's front-end
(`vhost_user.frontend.VhostUserFrontend`):

* negotiates VERSION_1 (+ EVENT_IDX, + VIRTIO_VSOCK_F_SEQPACKET), reads ``guest_cid`` with
  GET_CONFIG, sets up rx/tx (and, with ``event_queue=True``, the event queue, as a generic
  front-end would; QEMU's vhost-user-vsock-pci keeps it);
* keeps the RX queue full of buffers, each a 44-byte header descriptor followed by one
  payload descriptor of ``rx_buf_size`` bytes (Linux: ``VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE``,
  4 KiB) and refills when half of them are used; posts 8 event buffers;
* sends one packet per TX chain (header descriptor + payload descriptor), at most
  64 KiB of payload (``VIRTIO_VSOCK_MAX_PKT_BUF_SIZE``), never beyond the peer's credit;
* credit like Linux: every packet carries ``buf_alloc`` and ``fwd_cnt`` (bytes the
  application consumed); CREDIT_UPDATE when the peer's view of our free space drops below
  64 KiB after the application consumed data (``virtio_transport_do_credit_update``), and
  in reply to CREDIT_REQUEST; CREDIT_REQUEST when we have data and zero credit;
* answers REQUEST on a listening port with RESPONSE, anything for an unknown connection
  with RST; SHUTDOWN flags and RST as ``virtio_transport_recv_connected`` does;
  TRANSPORT_RESET on the event queue resets every connection.

``auto_consume=False`` on a connection keeps received data unconsumed (the application
does not read), so the peer runs out of credit: zero-credit tests.

Spec: virtio 1.2 §5.10.6 (Device Operation), §5.10.6.3 (Buffer Space Management).
"""

from __future__ import annotations

import dataclasses
import os
import select
import time
from collections import deque
from typing import Callable

from tests.support.driver import Allocator, PackedDriver, SplitDriver
from vhost_user.frontend import FrontendQueue, GuestRam, VhostUserFrontend
from vhost_user.wire import VirtioFeature as VF
from virtio.vsock.wire import (HOST_CID, Op, SeqpacketFlag, ShutdownFlag, Type, VsockEvent,
                               VsockFeature, VsockHeader)

HDR = VsockHeader.SIZE
MAX_PKT = 64 * 1024
U32 = 0xFFFFFFFF


@dataclasses.dataclass
class GuestConn:
    """One guest socket's connection (Linux ``struct virtio_vsock_sock`` + socket state)."""

    guest: "VsockGuest"
    local_port: int
    peer_cid: int
    peer_port: int
    type_: int = Type.STREAM
    state: str = "connecting"  # connecting | established | closing | closed | reset
    buf_alloc: int = 256 * 1024
    fwd_cnt: int = 0  # bytes the application consumed
    rx_cnt: int = 0  # bytes received
    last_fwd_cnt: int = 0  # fwd_cnt in our last packet
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0
    auto_consume: bool = True
    received: bytearray = dataclasses.field(default_factory=bytearray)
    unconsumed: int = 0
    messages: list = dataclasses.field(default_factory=list)  # seqpacket (bytes, eor)
    partial: bytearray = dataclasses.field(default_factory=bytearray)
    txq: deque = dataclasses.field(default_factory=deque)  # (bytes, eom/eor flags)
    peer_shutdown: int = 0
    credit_requested: bool = False
    rst_received: bool = False

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.local_port, self.peer_cid, self.peer_port)

    @property
    def peer_credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32))

    @property
    def tx_pending(self) -> int:
        return sum(len(d) for d, _ in self.txq)

    def send(self, data: bytes, *, eor: bool = False) -> None:
        """Queue ``data`` (stream bytes, or one seqpacket message) for transmission."""
        if self.type_ == Type.SEQPACKET:
            self.txq.append((bytes(data), SeqpacketFlag.EOM | (SeqpacketFlag.EOR if eor else 0)))
        else:
            for i in range(0, len(data), MAX_PKT):
                self.txq.append((bytes(data[i:i + MAX_PKT]), 0))
        self.guest.flush()

    def consume(self, n: int | None = None) -> None:
        """The application reads ``n`` (default: all) unconsumed bytes."""
        n = self.unconsumed if n is None else min(n, self.unconsumed)
        self.unconsumed -= n
        self.fwd_cnt = (self.fwd_cnt + n) & U32
        free_in_peer_view = self.buf_alloc - ((self.rx_cnt - self.last_fwd_cnt) & U32)
        if n and free_in_peer_view < MAX_PKT:
            self.guest.send_control(self, Op.CREDIT_UPDATE)

    def shutdown(self, flags: int = ShutdownFlag.BOTH) -> None:
        self.guest.send_control(self, Op.SHUTDOWN, flags=int(flags))
        if flags == ShutdownFlag.BOTH:
            self.state = "closing"

    def reset(self) -> None:
        self.guest.send_control(self, Op.RST)
        self.state = "reset"
        self.guest.conns.pop(self.key, None)


class VsockGuest:
    """See module docstring. Use ``VsockGuest.attach(socket_path, ram)`` for the common case."""

    def __init__(self, fe: VhostUserFrontend, ram: GuestRam, *, queue_size: int = 128,
                 packed: bool = False, event_queue: bool = False, rx_buf_size: int = 4096,
                 seqpacket: bool = True, event_idx: bool = True, buf_alloc: int = 256 * 1024
                 ) -> None:
        self.fe, self.ram = fe, ram
        self.queue_size = queue_size
        self.packed = packed
        self.event_queue = event_queue
        self.rx_buf_size = rx_buf_size
        self.seqpacket = seqpacket
        self.event_idx = event_idx
        self.buf_alloc = buf_alloc
        self.conns: dict[tuple[int, int, int], GuestConn] = {}
        self.listening: dict[int, int] = {}  # port -> type
        self.accept_queue: dict[int, deque] = {}
        self.events: list[int] = []
        self.packets: list[VsockHeader] = []  # every header received (for assertions)
        self.sent: list[VsockHeader] = []
        self.on_packet: Callable[[VsockHeader, bytes], None] | None = None
        self.next_port = 50000
        self.cid = 0
        self.rx_posted = 0
        self.tx_outstanding = 0
        self.queues: list[FrontendQueue] = []

    @classmethod
    def attach(cls, socket_path: str, ram: GuestRam, **kwargs) -> "VsockGuest":
        fe = VhostUserFrontend.connect(socket_path)
        guest = cls(fe, ram, **kwargs)
        guest.start()
        return guest

    # -- bring-up ----------------------------------------------------------------------------
    def start(self) -> None:
        offered = self.fe.init()
        features = int(VF.VERSION_1 | VF.VHOST_USER_F_PROTOCOL_FEATURES)
        if self.event_idx:
            features |= int(VF.RING_EVENT_IDX)
        if self.packed:
            features |= int(VF.RING_PACKED)
        if self.seqpacket:
            features |= int(VsockFeature.VIRTIO_VSOCK_F_SEQPACKET)
        assert features & ~offered == 0, f"back-end lacks {features & ~offered:#x}"
        self.features = features
        self.cid = int.from_bytes(self.fe.get_config(0, 8), "little")
        alloc = Allocator(self.ram.memory)
        cls = PackedDriver if self.packed else SplitDriver
        n = 3 if self.event_queue else 2
        self.drivers = [cls(self.ram.memory, self.queue_size, event_idx=self.event_idx,
                            index=i, allocator=alloc) for i in range(n)]
        self.rx, self.tx = self.drivers[0], self.drivers[1]
        self.evq = self.drivers[2] if self.event_queue else None
        self.queues = [FrontendQueue(i, self.queue_size, *d.ring_addresses)
                       for i, d in enumerate(self.drivers)]
        self.fill_rx(kick=False)
        if self.evq is not None:
            for _ in range(8):
                self.evq.add_buf(in_sizes=[VsockEvent.SIZE])
        self.fe.start(self.ram, self.queues, features=features)

    def restart(self, fe: VhostUserFrontend) -> None:
        """A new front-end connection for the same guest (the back-end restarted or QEMU
        reconnected): replay init and start with the rings' current state, as QEMU does."""
        self.fe = fe
        offered = fe.init()
        assert self.features & ~offered == 0
        for q in self.queues:
            q.kick_fd = q.call_fd = -1
            q.base = self._ring_base(self.drivers[q.index])
        fe.start(self.ram, self.queues, features=self.features)

    @staticmethod
    def _ring_base(drv) -> int:
        if isinstance(drv, SplitDriver):
            return drv.used_idx  # QEMU restarts at the used index after a back-end loss
        raise NotImplementedError("restart with packed rings")

    def close(self) -> None:
        self.fe.close()

    # -- queues ------------------------------------------------------------------------------
    def fill_rx(self, kick: bool = True) -> None:
        while self.rx_posted < self.queue_size:
            try:
                self.rx.add_buf(in_sizes=[HDR, self.rx_buf_size])
            except MemoryError:
                break
            self.rx_posted += 1
        if kick and self.rx.kick_prepare():
            self.queues[0].kick()

    def post_rx(self, count: int) -> None:
        """Post ``count`` RX buffers (tests of a guest that posts few or none)."""
        for _ in range(count):
            self.rx.add_buf(in_sizes=[HDR, self.rx_buf_size])
            self.rx_posted += 1
        if self.rx.kick_prepare():
            self.queues[0].kick()

    def _header(self, conn: GuestConn, op: Op, *, len_: int = 0, flags: int = 0
                ) -> VsockHeader:
        conn.last_fwd_cnt = conn.fwd_cnt
        return VsockHeader(self.cid, conn.peer_cid, conn.local_port, conn.peer_port, len_,
                           int(conn.type_), int(op), flags, conn.buf_alloc, conn.fwd_cnt)

    def send_packet(self, hdr: VsockHeader | bytes, payload: bytes = b"", *,
                    kick: bool = True) -> None:
        """Put one packet on the TX queue (header descriptor + payload descriptor)."""
        raw = hdr.pack() if isinstance(hdr, VsockHeader) else hdr
        if isinstance(hdr, VsockHeader):
            self.sent.append(hdr)
        out = [raw, payload] if payload else [raw]
        deadline = time.monotonic() + 10
        while True:
            try:
                self.tx.add_buf(out=out)
                break
            except MemoryError:  # ring full: wait for the device to use some
                if self.tx.kick_prepare():
                    self.queues[1].kick()
                self.queues[1].wait_call(0.02)
                self.reap_tx()
                if time.monotonic() > deadline:
                    raise
        self.tx_outstanding += 1
        if kick and self.tx.kick_prepare():
            self.queues[1].kick()

    def send_control(self, conn: GuestConn, op: Op, *, flags: int = 0) -> None:
        self.send_packet(self._header(conn, op, flags=flags))

    def reap_tx(self) -> None:
        self.tx_outstanding -= len(self.tx.get_bufs())

    # -- sockets -----------------------------------------------------------------------------
    def listen(self, port: int, type_: int = Type.STREAM) -> None:
        self.listening[port] = int(type_)
        self.accept_queue.setdefault(port, deque())

    def connect(self, port: int, *, cid: int = int(HOST_CID), type_: int = Type.STREAM,
                local_port: int | None = None, wait: bool = True, timeout: float = 5.0,
                buf_alloc: int | None = None) -> GuestConn:
        if local_port is None:
            local_port = self.next_port
            self.next_port += 1
        conn = GuestConn(self, local_port, cid, port, int(type_),
                         buf_alloc=buf_alloc or self.buf_alloc)
        self.conns[conn.key] = conn
        self.send_control(conn, Op.REQUEST)
        if wait:
            self.run_until(lambda: conn.state != "connecting", timeout)
        return conn

    def accept(self, port: int, timeout: float = 5.0) -> GuestConn:
        q = self.accept_queue[port]
        self.run_until(lambda: bool(q), timeout)
        return q.popleft()

    def flush(self) -> None:
        """Transmit queued data within the peer's credit (Linux virtio_transport_send_pkt)."""
        for conn in list(self.conns.values()):
            while conn.txq and conn.state == "established":
                data, flags = conn.txq[0]
                credit = conn.peer_credit
                if conn.type_ == Type.SEQPACKET:
                    # A message goes in pieces of at most 64 KiB; EOM/EOR on the last.
                    if credit < min(len(data), MAX_PKT) and data:
                        break
                    n = min(len(data), MAX_PKT)
                    last = n == len(data)
                    self.send_packet(self._header(conn, Op.RW, len_=n,
                                                  flags=int(flags) if last else 0),
                                     data[:n], kick=False)
                    conn.tx_cnt = (conn.tx_cnt + n) & U32
                    if last:
                        conn.txq.popleft()
                    else:
                        conn.txq[0] = (data[n:], flags)
                    continue
                if credit == 0:
                    if not conn.credit_requested:
                        conn.credit_requested = True
                        self.send_packet(self._header(conn, Op.CREDIT_REQUEST), kick=False)
                    break
                n = min(len(data), credit)
                self.send_packet(self._header(conn, Op.RW, len_=n), data[:n], kick=False)
                conn.tx_cnt = (conn.tx_cnt + n) & U32
                if n == len(data):
                    conn.txq.popleft()
                else:
                    conn.txq[0] = (data[n:], flags)
        if self.tx.kick_prepare():
            self.queues[1].kick()

    # -- the receive path --------------------------------------------------------------------
    def pump(self, timeout: float = 0.05) -> int:
        """One round: wait for an interrupt (at most ``timeout``), reap RX/TX/event
        buffers, dispatch packets, refill RX, transmit queued data. Returns packets seen."""
        fds = [q.call_fd for q in self.queues]
        ready, _, _ = select.select(fds, [], [], timeout)
        for fd in ready:
            try:
                os.read(fd, 8)
            except BlockingIOError:
                pass
        self.reap_tx()
        seen = 0
        for used in self.rx.get_bufs():
            self.rx_posted -= 1
            seen += 1
            data = used.data[:used.len_]
            if len(data) < HDR:
                continue  # Linux drops a buffer shorter than a header
            hdr = VsockHeader.unpack(data)
            payload = data[HDR:HDR + hdr.len_]
            self.packets.append(hdr)
            self._dispatch(hdr, payload)
        if self.evq is not None:
            for used in self.evq.get_bufs():
                event = VsockEvent.unpack(used.data[:used.len_])
                self.events.append(event.id)
                self._transport_reset()
                self.evq.add_buf(in_sizes=[VsockEvent.SIZE])
            if self.evq.kick_prepare():
                self.queues[2].kick()
        if self.rx_posted <= self.queue_size // 2:
            self.fill_rx()
        self.flush()
        return seen

    def run_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("guest model: condition not met in time")
            self.pump(0.02)

    def _transport_reset(self) -> None:
        """Linux virtio_vsock_reset_sock: every connection is reset."""
        for conn in self.conns.values():
            conn.state = "reset"
        self.conns.clear()

    def _dispatch(self, hdr: VsockHeader, payload: bytes) -> None:
        if self.on_packet is not None:
            self.on_packet(hdr, payload)
        if hdr.dst_cid != self.cid:
            return
        conn = self.conns.get((hdr.dst_port, hdr.src_cid, hdr.src_port))
        op = hdr.op
        if conn is None:
            if op == Op.REQUEST and self.listening.get(hdr.dst_port) == hdr.type_:
                conn = GuestConn(self, hdr.dst_port, hdr.src_cid, hdr.src_port, hdr.type_,
                                 state="established", buf_alloc=self.buf_alloc)
                conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
                self.conns[conn.key] = conn
                self.send_control(conn, Op.RESPONSE)
                self.accept_queue[hdr.dst_port].append(conn)
            elif op != Op.RST:
                rst = VsockHeader(self.cid, hdr.src_cid, hdr.dst_port, hdr.src_port, 0,
                                  hdr.type_, int(Op.RST), 0, 0, 0)
                self.send_packet(rst)
            return
        if (hdr.buf_alloc, hdr.fwd_cnt) != (conn.peer_buf_alloc, conn.peer_fwd_cnt):
            conn.credit_requested = False
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if op == Op.RST:
            conn.rst_received = True
            conn.state = "reset" if conn.state != "closing" else "closed"
            self.conns.pop(conn.key, None)
        elif op == Op.RESPONSE and conn.state == "connecting":
            conn.state = "established"
        elif op == Op.RW:
            conn.rx_cnt = (conn.rx_cnt + len(payload)) & U32
            if conn.type_ == Type.SEQPACKET:
                conn.partial += payload
                if hdr.flags & SeqpacketFlag.EOM:
                    conn.messages.append((bytes(conn.partial),
                                          bool(hdr.flags & SeqpacketFlag.EOR)))
                    conn.partial = bytearray()
            else:
                conn.received += payload
            conn.unconsumed += len(payload)
            if conn.auto_consume:
                conn.consume()
        elif op == Op.SHUTDOWN:
            conn.peer_shutdown |= hdr.flags
            if conn.peer_shutdown == ShutdownFlag.BOTH and conn.state == "established":
                # Linux: peer closed both ways -> we reset once we have nothing to send.
                self.send_control(conn, Op.RST)
                conn.state = "closed"
                self.conns.pop(conn.key, None)
        elif op == Op.CREDIT_REQUEST:
            self.send_control(conn, Op.CREDIT_UPDATE)
        # CREDIT_UPDATE: the peer's credit fields were taken above.


# -- the back-end side of integration tests --------------------------------------------------
class BackendThread:
    """A `virtio.daemon.Daemon` serving vsock VMs on its own thread (QEMU's peer role is
    played by `VsockGuest` in the test thread). ``call(fn)`` runs ``fn`` on the loop thread
    and returns its result (the backend is single-threaded)."""

    def __init__(self, vsocks, *, virtqueue_factory=None, mgmt_socket: str | None = None
                 ) -> None:
        import threading

        from virtio.config import Config
        from virtio.daemon import Daemon

        kwargs = {} if virtqueue_factory is None else {"virtqueue_factory": virtqueue_factory}
        self.daemon = Daemon(Config(vsocks=tuple(vsocks), mgmt_socket=mgmt_socket), **kwargs)
        self.daemon.start()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="vsock-backend")
        self.thread.start()

    @property
    def backend(self):
        return next(d for kind, d in self.daemon.devices if kind == "vsock-backend")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.daemon.loop.run_once(0.05)

    def call(self, fn, timeout: float = 5.0):
        import threading

        done = threading.Event()
        box: list = []

        def run() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box.append((False, exc))
            done.set()

        self.daemon.loop.call_soon(run)
        if not done.wait(timeout):
            raise TimeoutError("backend loop did not run the call")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        self.daemon.loop.stop()
        self.thread.join(5)
        self.daemon.close()
        self.daemon.loop.close()
