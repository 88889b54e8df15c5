"""The virtio-vsock device: virtqueues ↔ vsock packets, one device per VM, one backend for all.

Spec: virtio 1.2 §5.10 (Socket Device): device id 19 (§5.10.1); queues rx = 0, tx = 1,
event = 2 (§5.10.2); feature VIRTIO_VSOCK_F_SEQPACKET (§5.10.3); config ``le64 guest_cid``
(§5.10.4); packets = a 44-byte header + payload in one chain (§5.10.6); the event queue
carries VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (§5.10.6.7).

Layout after Firecracker's vsock split: this module moves packets between the queues and the
sans-I/O `VsockMuxer` (routing, connections, credit); `VsockHost` (host.py) executes the
muxer's actions on real UNIX sockets; `virtio.vsock.mgmt` answers management commands.

* **TX** (guest → device): every available chain is handed to ``muxer.guest_tx`` and
  completed with used length 0 (§5.10.6.1: the device uses TX buffers without writing).
  Guest data goes straight from guest memory to the host socket (``WriteHost`` runs
  before the chain completes); what the socket does not take is copied, and credit bounds
  it (a guest exceeding its credit has that connection reset), so the TX queue never needs
  to stall.
* **RX** (device → guest): an RX chain is popped only when the muxer has something for this
  VM; host stream bytes are ``readv``-ed from the host socket straight into the chain after
  the header. When the guest posts no RX buffers, nothing is read and the host sockets are
  not polled for input (the muxer drops read interest), until the guest kicks RX.
  A chain popped for nothing (the host had no data after all) is given back (``unpop``).
* **Event queue**: QEMU's ``vhost-user-vsock-pci`` keeps it (only queues 0 and 1 are set up
  here); a front-end that gives us queue 2 gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET after
  connection state was lost (device reset, front-end reconnect, restore), so the guest
  resets its sockets instead of waiting on connections that no longer exist.

Spec: vhost-user "Ring states" (devices see only live rings).
"""

from __future__ import annotations

import logging
import os
import socket
from functools import partial
from typing import Any, Callable, Sequence

from ring.errors import DriverError

from .conn import ConnConfig, RxPacket, RxRead
from .errors import DuplicateCidError, UnknownCidError
from .handshake import OkPortConvention
from .host import _SEND_FLAGS, IOV_MAX, VsockHost
from .lane import (LANE_CHAINS, LaneUpdate, Put, Stop, make_put, make_tx_lane,
                   payload_views as _payload)
from .muxer import DEVICE_FEATURES, MuxerConfig, VsockMuxer
from .rx_pump import make_rx_pump
from .stream_loop import Reason, StreamLoop
from .wire import (HOST_CID, VIRTIO_ID_VSOCK, Op, Queue, Type, VsockConfig as VsockConfigSpace,
                   VsockEvent, VsockHeader)

log = logging.getLogger(__name__)

HDR = VsockHeader.SIZE
#: RX chains filled per turn of the loop before yielding to other fds (fairness).
RX_BUDGET = 256
#: TX chains per pop_batch, and batches per turn.
TX_BATCH = 64
TX_BUDGET_BATCHES = 8
#: Most bytes the TX lane takes per call (its tail buffer; a larger credit window is served
#: by further calls or the general path, never refused).
LANE_TAIL_MAX = 1 << 20
#: Device-specific feature bits live in bits 0..23 (virtio 1.2 §6).
_DEVICE_FEATURE_MASK = (1 << 24) - 1


def conn_config_for(vm: Any) -> ConnConfig:
    """A `ConnConfig` from a `virtio.config.VsockConfig`: buffer size, connect timeout,
    CREDIT_REQUEST delay and the ``OK <port>`` convention (``reply_port`` "guest" =
    vhost-device-vsock, the default; "host" = Firecracker)."""
    convention = (OkPortConvention.HOST_PORT if getattr(vm, "reply_port", "guest") == "host"
                  else OkPortConvention.GUEST_PORT)
    return ConnConfig(buf_alloc_bytes=vm.tx_buffer_size,
                      request_timeout_s=vm.connect_timeout_s,
                      ok_convention=convention,
                      credit_request_delay_s=getattr(vm, "credit_request_delay_s", 0.01))


class VsockDevice:
    """The VhostUserDevice of one VM (docs/internals.md, "what the back-end asks of a
    device"). Built by `VsockBackend.add_vm`; shares the backend's muxer and host adapter.
    """

    device_id = VIRTIO_ID_VSOCK
    #: rx, tx, event. QEMU's vhost-user-vsock-pci sets up only 0 and 1.
    num_queues = 3

    def __init__(self, backend: "VsockBackend", config: Any) -> None:
        self.backend = backend
        self.config = config
        self.cid = int(config.guest_cid)
        #: the largest ring a front-end may set up (vhost-device-vsock's --queue-size)
        self.max_queue_size = int(getattr(config, "queue_size", 32768))
        self.loop = backend.loop
        self.muxer = backend.muxer
        self.host = backend.host
        self.log = log.getChild(f"cid{self.cid}")
        self._queues: dict[int, Any] = {}  # index -> QueueHandle
        self._rx_scheduled = False
        self._tx_scheduled = False
        self._in_rx = False
        self._ever_started = False
        self.event_pending = False  # TRANSPORT_RESET owed to the guest
        self._event_buffer_warned = False  # a too-short event buffer was logged
        #: the TX lane (lane.py) and the connection it serves: the last one whose RW
        #: packets took the direct lane (None: none yet, or it left the lane)
        self._lane = None
        self._lane_key = None
        self._put = None  # (RX vq, its packet put): the lane's CREDIT_UPDATE
        self._rx_pump = None  # (RX vq, its RX pump): host-readable events (rx_pump.py)
        #: the C stream loop (stream_loop.py), once a connection has moved this many bytes
        #: to the guest (negative: never; the pure-Python ring: never); may be changed
        self.stream_loop_after = int(getattr(config, "stream_loop_after", -1))
        self._stream_loop = None
        #: (key, bytes_to_guest): after a run that a guest packet or an unusual read ended
        #: early, that connection waits for this many bytes to the guest before the next
        #: (a connection with traffic both ways would otherwise enter and leave per packet)
        self._stream_hold: tuple[Any, int] | None = None
        self.stream_loop_runs = 0  # calls into the C stream loop
        self.stream_loop_bytes = 0  # payload bytes it moved to the guest
        #: queues whose breaking was logged (once until the queue starts again or a reset)
        self._broken_logged: set[int] = set()
        self.features = 0
        self.events_sent = 0
        self.resets = 0

    # -- VhostUserDevice -------------------------------------------------------------------
    def device_features(self) -> int:
        return int(DEVICE_FEATURES)

    def config_read(self, offset: int, size: int) -> bytes:
        """``struct virtio_vsock_config``: le64 guest_cid (Spec: virtio 1.2 §5.10.4)."""
        space = VsockConfigSpace(self.cid).pack()
        if offset < 0 or size < 0 or offset + size > len(space):
            raise ValueError(f"config read {offset}+{size} beyond {len(space)} bytes")
        return space[offset:offset + size]

    def config_write(self, offset: int, data: bytes) -> None:
        """Spec: virtio 1.2 §5.10.4: guest_cid is read-only for the driver."""
        raise ValueError("the vsock config space is read-only")

    def set_features(self, features: int) -> None:
        self.features = features
        self.muxer.set_features(self.cid, features & _DEVICE_FEATURE_MASK)

    def queue_started(self, handle: Any) -> None:
        self._queues[handle.index] = handle
        self._broken_logged.discard(handle.index)
        self._ever_started = True
        if handle.index == Queue.TX:
            handle.kick_reader = self._on_tx_kick
            self._process_tx()
        elif handle.index == Queue.RX:
            self._schedule_rx()
        elif handle.index == Queue.EVENT:
            self._deliver_event()

    def queue_stopped(self, index: int) -> None:
        self._queues.pop(index, None)
        if index == Queue.TX:
            self._lane = None

    def _log_broken(self, index: int, error: Any) -> None:
        """A queue the guest driver broke: one ERROR per queue until it starts again or
        the device is reset, however often the guest kicks or the host writes meanwhile
        (STYLE R5/R11: one precise message; a hostile guest cannot flood the log).

        Spec: virtio 1.2 §2.7.5.2 (device requirements on descriptors: a chain that breaks
        them stops the queue until reset)."""
        if index in self._broken_logged:
            return
        self._broken_logged.add(index)
        name = {_RXQ: "RX", _TXQ: "TX"}.get(index, "event")
        self.log.error("%s queue broken (%s): the guest driver broke the ring; it stays "
                       "stopped until the device is reset", name, error)

    def _on_tx_kick(self, kick_fd: int) -> None:
        """The TX queue's kick eventfd is readable (``QueueHandle.kick_reader``: called
        only while the queue is live): drain it and serve the queue, without the session's
        generic kick layers (a kick per credit window of a guest->host stream)."""
        try:
            os.read(kick_fd, 8)
        except (BlockingIOError, InterruptedError):
            pass
        self._process_tx()

    def kick(self, index: int) -> None:
        if index == Queue.TX:
            self._process_tx()
        elif index == Queue.RX:
            self._process_rx()
        elif index == Queue.EVENT:
            self._deliver_event()

    def reset(self) -> None:
        """Device reset or front-end gone: every connection of this VM is dropped, so the
        guest is owed a TRANSPORT_RESET if it ever ran (Spec: virtio 1.2 §5.10.6.7)."""
        self._queues.clear()
        self._lane = self._lane_key = None
        self._broken_logged.clear()
        self.resets += 1
        self.host.run(self.muxer.reset(self.cid, self.loop.time()))
        self.host.close_cid(self.cid)
        if self._ever_started:
            self.event_pending = True

    def snapshot(self) -> dict:
        """Host sockets cannot be carried to another process: only the identity."""
        return {"guest_cid": self.cid, "connections": len(self.muxer.connections(self.cid))}

    def restore(self, state: dict) -> None:
        """Connections did not survive: tell the guest (TRANSPORT_RESET) on the event queue."""
        if int(state.get("guest_cid", self.cid)) != self.cid:
            raise ValueError(f"state of guest CID {state.get('guest_cid')} for CID {self.cid}")
        self.event_pending = True
        self._deliver_event()

    # -- scheduling ------------------------------------------------------------------------
    def rx_ready(self) -> None:
        """The muxer has packets for this VM (RxReady)."""
        self._schedule_rx()

    def _schedule_rx(self) -> None:
        if not self._rx_scheduled:
            self._rx_scheduled = True
            self.loop.call_soon(self._scheduled_rx)

    def _scheduled_rx(self) -> None:
        self._rx_scheduled = False
        self._process_rx()

    def _schedule_tx(self) -> None:
        if not self._tx_scheduled:
            self._tx_scheduled = True
            self.loop.call_soon(self._scheduled_tx)

    def _scheduled_tx(self) -> None:
        self._tx_scheduled = False
        self._process_tx()

    # -- TX: guest -> host ---------------------------------------------------------------
    def _process_tx(self) -> None:
        """Spec: virtio 1.2 §5.10.6.1: one packet (header + payload) per TX chain."""
        handle = self._queues.get(_TXQ)
        if handle is None:
            return
        vq = handle.vq
        completed = 0
        if self._lane_key is not None:
            res = self._tx_lane(vq)
            if res is not None:
                if res.broken is not None:
                    self._log_broken(_TXQ, res.broken)
                    handle.notify_if_needed()
                    return
                if res.stop == Stop.EMPTY:
                    if self._rx_scheduled:
                        self._process_rx()  # the credit update (see below)
                    return
        for _ in range(TX_BUDGET_BATCHES):
            broken: DriverError | None = None
            try:
                chains = vq.pop_batch(TX_BATCH)
            except DriverError as exc:
                chains, broken = list(getattr(exc, "chains", ()) or ()), exc
            if chains:
                try:
                    self._tx_packets(chains)
                except Exception:  # a bug must not leak the chains
                    self.log.exception("TX packet handling failed")
                vq.push_batch([(c.head, 0, c.ring_slots) for c in chains])
                completed += len(chains)
            if broken is not None:
                self._log_broken(_TXQ, broken)
                completed += 1  # the ring pushed the bad chain
                break
            if len(chains) < TX_BATCH:
                break
        else:
            self._schedule_tx()  # more to do: after other fds had their turn
        if completed:
            handle.notify_if_needed()
        if self._rx_scheduled:
            # The batch queued packets for the guest (normally a CREDIT_UPDATE): send them
            # now rather than after another turn of the loop, so the guest, which may be
            # waiting for credit, gets one interrupt at once. (The scheduled call then
            # finds little or nothing to do.)
            self._process_rx()

    def _tx_lane(self, vq: Any) -> Any:
        """Run the TX lane (lane.py) for the connection that last took the direct lane,
        then apply its outcome as `_rw_group` does (counters, one reconcile). None when
        that connection cannot take it now (the general path then runs alone).

        Spec: virtio 1.2 §5.10.6.3.1 (the lane never takes a packet beyond the credit)."""
        key = self._lane_key
        muxer = self.muxer
        conn = muxer.direct_tx_conn_of(key)
        sock = None if conn is None else self.host.sock(key)
        if sock is None:
            self._lane_key = None
            return None
        lane = self._lane
        if lane is None or (lane.tail_cap < conn.buf_alloc and lane.tail_cap < LANE_TAIL_MAX):
            lane = self._lane = make_tx_lane(vq, min(conn.buf_alloc, LANE_TAIL_MAX))
        rx = self._rx_handle_now()
        update = None
        if rx is not None and muxer.lone_update_possible(conn):
            update = _lane_update((rx.vq, conn.buf_alloc, conn.recv_cnt, conn.fwd_cnt,
                                   conn.adv_fwd_cnt, conn.update_threshold,
                                   conn.credit_update_owed))
        res = lane.run(vq, sock, self.cid, key.local_port, key.peer_port, conn.lane_credit,
                       conn.peer_buf_alloc, conn.peer_fwd_cnt, LANE_CHAINS, update)
        if res.call_errno is not None:
            self.log.warning("TX call eventfd: %s", os.strerror(res.call_errno))
        if res.chains:
            run = self.host.run
            now = self.loop.time()
            if conn.host_readable:  # (credit_reopens_rx needs it; credit_only_quiet not)
                if res.chains == res.credit_updates == 1 and res.credit_changed and \
                        self._credit_reopens(key.local_port, key.peer_port,
                                             res.peer_buf_alloc, res.peer_fwd_cnt, now):
                    return res  # one CREDIT_UPDATE, and it re-opened a waiting read
            elif not res.bytes and not res.tail and res.error is None:
                # only credit fields (a receiving guest's CREDIT_UPDATE)
                actions = muxer.credit_only_quiet(conn, res.chains, res.peer_buf_alloc,
                                                  res.peer_fwd_cnt, res.credit_changed, now)
                if actions is not None:
                    if actions:
                        run(actions)
                    return res
            if (not res.tail and res.error is None and not res.credit_changed
                    and res.peer_buf_alloc == conn.peer_buf_alloc
                    and res.peer_fwd_cnt == conn.peer_fwd_cnt):
                put = res.put
                if put is not None and put.status == Put.DONE:
                    # a streaming guest's window: the lane wrote it all and put our
                    # CREDIT_UPDATE (rw_lane, credit_update_sent, settle_quiet in one)
                    if put.call_errno is not None:
                        self.log.warning("RX call eventfd: %s", os.strerror(put.call_errno))
                    actions = muxer.settle_update_sent(
                        conn, res.chains, conn.rw_lane_update_sent(res.bytes, res.written),
                        now)
                    if actions:
                        run(actions)
                    return res
                pending = conn._pending
                conn.rw_lane(res.bytes, res.written, res.tail, res.peer_buf_alloc,
                             res.peer_fwd_cnt, res.credit_changed)
                if put is None:
                    self._credit_update_now(conn)
                else:  # the lane put it (LaneUpdate)
                    self._update_put(rx, conn, res.put)
                actions = muxer.settle_quiet(conn, pending, res.chains, now)
                if actions:
                    run(actions)
                return res
            before = muxer.snapshot(conn)
            conn.rw_lane(res.bytes, res.written, res.tail, res.peer_buf_alloc,
                         res.peer_fwd_cnt, res.credit_changed)
            self._credit_update_now(conn)
            run(muxer.settle(conn, before, res.chains, now))
            if res.error is not None:
                self.log.info("%s: host write failed: %s", key, os.strerror(res.error))
                run(muxer.host_error(key, self.loop.time(), res.error))
        return res

    def _credit_update_now(self, conn: Any) -> None:
        """The CREDIT_UPDATE the TX lane just made due, straight into one RX buffer when it
        is the only packet this VM has for the guest (`VsockMuxer.lone_credit_update`):
        one call instead of a scheduled RX pass (the guest may be waiting for it).

        Spec: virtio 1.2 §5.10.6.3 (CREDIT_UPDATE), §5.10.6 (one packet per RX buffer)."""
        handle = self._rx_handle_now()
        if handle is None:
            return
        packet = self.muxer.lone_credit_update(conn)
        if packet is None:
            return
        put = self._put
        if put is None or put[0] is not handle.vq:
            put = self._put = (handle.vq, make_put(handle.vq))
        self._update_put(handle, conn, put[1](handle.vq, packet))

    def _update_put(self, handle: Any, conn: Any, res: Any) -> None:
        """The outcome of putting ``conn``'s CREDIT_UPDATE into the RX queue of
        ``handle`` (a `PutResult`): sent, or no buffer (it stays owed), or a broken ring."""
        if res.status == Put.DONE:
            self.muxer.credit_update_sent(conn)
            if res.call_errno is not None:
                self.log.warning("RX call eventfd: %s", os.strerror(res.call_errno))
        elif res.status == Put.BROKEN:
            self._log_broken(_RXQ, res.broken)
            handle.notify_if_needed()

    def _tx_packets(self, chains: list) -> None:
        """Hand a batch of TX packets to the muxer, before their chains are completed.

        Fast path: the header is unpacked once into plain ints; consecutive stream RW
        packets of one connection go to ``muxer.guest_rw_batch`` as one group (one
        reconcile, one ``writev`` of their payloads straight from guest memory). Anything
        else (control packets, seqpacket, headers split over descriptors, bad fields) goes
        through ``muxer.guest_tx``, in order, which validates it in full.

        Spec: virtio 1.2 §5.10.6 (packet = header + payload), §5.10.6.1 (TX buffers)."""
        cid = self.cid
        muxer, run, flush = self.muxer, self.host.run, self._rw_group
        now = self.loop.time()
        group: list = []
        group_ports = None
        for chain in chains:
            readable = chain.readable
            first = readable[0] if readable else None
            if first is not None and len(first) >= HDR:
                (src_cid, dst_cid, src_port, dst_port, len_, type_, op, flags, buf_alloc,
                 fwd_cnt) = _unpack_hdr(first)
                if op == _RW and type_ == _STREAM and src_cid == cid and dst_cid == _HOST:
                    views = _payload(readable, len_)
                    if views is not None:
                        ports = (dst_port, src_port)
                        if ports != group_ports and group:
                            flush(group_ports, group, now)
                            group = []
                        group_ports = ports
                        group.append((len_, flags, buf_alloc, fwd_cnt, views))
                        continue
                elif (op == _CREDIT_UPDATE and type_ == _STREAM and src_cid == cid
                      and dst_cid == _HOST):
                    if group:
                        flush(group_ports, group, now)
                        group, group_ports = [], None
                    if not len_ and self._lane_key is None:
                        conn = muxer.direct_tx_conn(cid, dst_port, src_port)
                        if conn is not None:  # its next updates can take the TX lane
                            self._lane_key = conn.key
                    if self._credit_reopens(dst_port, src_port, buf_alloc, fwd_cnt, now):
                        continue
                    actions = muxer.guest_credit_update(cid, dst_port, src_port, buf_alloc,
                                                        fwd_cnt, now)
                    if actions is not None:
                        run(actions)
                        continue
            if group:
                flush(group_ports, group, now)
                group, group_ports = [], None
            run(muxer.guest_tx(cid, readable, now))
        if group:
            flush(group_ports, group, now)

    def _rw_group(self, ports: tuple[int, int], group: list, now: float) -> None:
        """Consecutive stream RW packets of one connection (``ports`` = host port, guest
        port). The direct lane (`VsockMuxer.direct_tx_conn`): their payloads go to the
        host socket with one ``sendmsg`` straight from guest memory, the connection's
        counters are updated once and the muxer reconciles once; the outcome is that of
        ``muxer.guest_rw_batch`` + ``host_write_done`` (tests/property/
        test_vsock_direct_lane.py). Anything else takes ``guest_rw_batch``.

        Spec: virtio 1.2 §5.10.6.3 (credit), §5.10.6.4 (stream data)."""
        muxer = self.muxer
        conn = muxer.direct_tx_conn(self.cid, *ports)
        sock = None if conn is None else self.host.sock(conn.key)
        if sock is not None:
            self._lane_key = conn.key  # its next packets can take the TX lane
            before = muxer.snapshot(conn)
            total = conn.rw_direct(group)
            if total is not None:
                data = [v for p in group for v in p[4]]
                written, failed = 0, None
                if total:
                    try:
                        written = sock.sendmsg(data if len(data) <= IOV_MAX else
                                               data[:IOV_MAX], (), _SEND_FLAGS)
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError as exc:
                        failed = exc
                conn.rw_written(data, total, written)
                run = self.host.run
                run(muxer.settle(conn, before, len(group), now))
                if failed is not None:
                    self.log.info("%s: host write failed: %s", conn.key, failed)
                    run(muxer.host_error(conn.key, now, failed.errno))
                return
        self.host.run(muxer.guest_rw_batch(self.cid, *ports, group, now))

    # -- RX: host -> guest -----------------------------------------------------------------
    def host_readable(self, key: Any, sock: socket.socket) -> bool:
        """Host socket ``sock`` of connection ``key`` of this VM became readable
        (``VsockHost.on_readable``): serve it with the RX pump (rx_pump.py) when
        `VsockMuxer.rx_lane_conn` allows, one C call reading into as many RX buffers as
        the guest's credit allows, publishing and signalling; the muxer then
        applies only the counters unless the outcome was unusual (`rx_lane_done`). False:
        the caller takes the general path (``muxer.host_readable``).

        Spec: virtio 1.2 §5.10.6 (one packet per RX buffer), §5.10.6.3 (credit)."""
        handle = self._rx_handle_now()
        if handle is None:
            return False
        muxer = self.muxer
        lane = muxer.rx_lane_conn(key)
        if lane is None:
            return False
        conn, credit = lane
        self._pump(handle, sock, conn, credit, muxer.rx_lane_done, self.loop.time())
        if 0 <= self.stream_loop_after <= conn.bytes_to_guest:
            self._serve_stream(key, sock)
        return True

    def _serve_stream(self, key: Any, sock: socket.socket) -> None:
        """Serve connection ``key`` with the C stream loop (stream_loop.py) when it is in
        the steady state of a host->guest stream: `VsockMuxer.stream_loop_conn` allows it,
        its guest's CREDIT_UPDATEs take the C TX lane, both queues run on the C ring and
        the event loop has nothing to do now. The TX kick eventfd and the socket leave the
        event loop while the C loop serves them, and come back before anything else.

        Spec: virtio 1.2 §5.10.6 (one packet per RX buffer), §5.10.6.3 (credit)."""
        txh, rxh = self._queues.get(_TXQ), self._queues.get(_RXQ)
        lane, pump = self._lane, self._rx_pump
        if (txh is None or rxh is None or txh.kick_fd is None or self._lane_key != key
                or not hasattr(lane, "prepare") or pump is None or pump[0] is not rxh.vq
                or not hasattr(pump[1], "prepare") or self._in_rx or self._rx_scheduled
                or self._tx_scheduled):
            return
        muxer = self.muxer
        conn = muxer.stream_loop_conn(key)
        budget = self.loop.wait_budget()
        hold = self._stream_hold
        if conn is None or budget is None or (
                hold is not None and hold[0] == key and conn.bytes_to_guest < hold[1]):
            return
        if self._stream_loop is None:
            self._stream_loop = StreamLoop()
        kick_fd, sock_fd = txh.kick_fd, sock.fileno()
        loop = self.loop
        kick_reader = loop.take_reader(kick_fd)
        if kick_reader is None:
            return  # not watched by the loop: not ours to serve
        sock_reader = loop.take_reader(sock_fd)
        before = muxer.snapshot(conn)
        _cid, host_port, guest_port = key
        try:
            out = self._stream_loop.serve(
                txh.vq, lane.prepare(sock, self.cid, host_port, guest_port, LANE_CHAINS),
                rxh.vq, pump[1].prepare(self.cid, host_port, guest_port, conn.buf_alloc,
                                        sock_fd),
                conn, kick_fd, sock_fd, loop.fileno(), budget)
        finally:
            loop.add_reader(kick_fd, kick_reader)
            if sock_reader is not None:
                loop.add_reader(sock_fd, sock_reader)
        self.stream_loop_runs += 1
        self.stream_loop_bytes += out.bytes
        self._stream_hold = None if out.bytes >= _STREAM_HOLD_BELOW or out.reason in (
            Reason.YIELD, Reason.TIMEOUT, Reason.SIGNAL) else (
            key, conn.bytes_to_guest + max(self.stream_loop_after, _STREAM_HOLD_FOR))
        now = loop.time()
        actions = muxer.stream_loop_done(conn, out.rx_packets, out.tx_packets, out.bytes,
                                         out.tx_cnt, out.peer_buf_alloc, out.peer_fwd_cnt,
                                         out.credit_changed, before, now)
        if actions:
            self.host.run(actions)
        self._stream_ended(out, txh, rxh, conn, pump[1], now)

    def _stream_ended(self, out: Any, txh: Any, rxh: Any, conn: Any, pump: Any,
                      now: float) -> None:
        """Hand the event that ended a C stream loop run to the general path."""
        reason = out.reason
        if reason == Reason.TX:
            self._process_tx()  # the kick was drained: the packet waits on the ring
        elif reason == Reason.TX_FAILED:
            if out.rc < 0:
                from ring.cring import _raise_for
                raise _raise_for(out.rc, txh.vq.index)
            self._log_broken(_TXQ, txh.vq._error(self._lane._lane.broken))
            txh.notify_if_needed()
        elif reason == Reason.RX:
            if out.rc < 0:
                from ring.cring import _raise_for
                raise _raise_for(out.rc, rxh.vq.index)
            self._pump_done(rxh, conn, pump.last_result(), self.muxer.rx_lane_done, now)
        elif reason == Reason.ERROR:
            self.log.warning("stream loop: epoll failed: %s", os.strerror(out.error))

    def _credit_reopens(self, host_port: int, guest_port: int, buf_alloc: int, fwd_cnt: int,
                        now: float) -> bool:
        """A guest CREDIT_UPDATE (TX) that re-opens credit while the connection's host
        socket is known readable (`VsockMuxer.credit_reopens_rx`): the RX pump reads into
        the guest's buffers at once, one call, instead of an RX pass scheduled through
        the muxer. False (nothing done): the caller answers the packet as usual.

        Spec: virtio 1.2 §5.10.6.3 (credit), §5.10.6 (one packet per RX buffer)."""
        handle = self._rx_handle_now()
        if handle is None:
            return False
        muxer = self.muxer
        lane = muxer.credit_reopens_rx(self.cid, host_port, guest_port, buf_alloc, fwd_cnt,
                                       now)
        if lane is None:
            return False
        conn, credit, before = lane
        sock = self.host.sock(conn.key)
        if sock is None:  # marked readable: the general path finds the socket gone
            self.host.run(muxer.credit_reopen_done(conn, 0, 0, False, now, before))
            return True
        self._pump(handle, sock, conn, credit, muxer.credit_reopen_done, now, before)
        return True

    def _pump(self, handle: Any, sock: socket.socket, conn: Any, credit: int,
              done: Callable[..., list], now: float, *extra: Any) -> None:
        """The RX pump (rx_pump.py) for ``conn``: up to ``credit`` bytes from ``sock``;
        then ``done(conn, bytes, chains, clean_drain, now, *extra)`` (the muxer's report)
        and its actions."""
        vq = handle.vq
        pump = self._rx_pump
        if pump is None or pump[0] is not vq:
            pump = self._rx_pump = (vq, make_rx_pump(vq))
        _cid, host_port, guest_port = conn.key
        self._pump_done(handle, conn, pump[1](vq, sock.fileno(), self.cid, host_port,
                                              guest_port, conn.buf_alloc, conn.fwd_cnt,
                                              credit), done, now, *extra)

    def _pump_done(self, handle: Any, conn: Any, result: Any, done: Callable[..., list],
                   now: float, *extra: Any) -> None:
        """A pump's ``result`` (`RxPumpResult`) reported: ``done(conn, bytes, chains,
        clean_drain, now, *extra)`` and its actions, a failed call signal logged, a broken
        ring logged once."""
        nbytes, chains, _notify, eof, _starved, error, drained, broken, call_errno = result
        if call_errno is not None:
            self.log.warning("RX call eventfd: %s", os.strerror(call_errno))
        clean = drained and not (eof or error or broken is not None)
        actions = done(conn, nbytes, chains, clean, now, *extra)
        if actions:
            self.host.run(actions)
        if broken is not None:
            self._log_broken(_RXQ, broken)
            handle.notify_if_needed()

    def _rx_handle_now(self) -> Any:
        """The RX queue's handle when a packet may go into it at once: the queue runs and
        no RX pass is on the stack (it would be re-entered). None otherwise."""
        return None if self._in_rx else self._queues.get(_RXQ)

    def _process_rx(self) -> None:
        if self._in_rx:
            self._schedule_rx()
            return
        self._in_rx = True
        try:
            self._fill_rx()
        finally:
            self._in_rx = False

    def _fill_rx(self) -> None:
        handle = self._queues.get(_RXQ)
        if handle is None:
            return
        vq = handle.vq
        used: list[tuple[int, int, int]] = []
        notify_broken = False
        burst_notify = False
        burst_first = True
        for _ in range(RX_BUDGET):
            if not self.muxer.has_rx(self.cid):
                break
            if burst_first:
                # The next packet is stream data from a host socket: read it straight into
                # as many chains as the guest's credit allows (one C call), without first
                # filling one chain on its own. Once per call: a burst that moved nothing
                # (EOF, an error, no buffers) leaves the rest to the packet-at-a-time path.
                burst_first = False
                nxt = self.muxer.rx_burst_next(self.cid)
                if nxt is not None:
                    if used:
                        vq.push_batch(used)
                        used = []
                    res = self._rx_burst(vq, nxt[0], self.loop.time(), nxt[1:])
                    if res is not None:
                        burst_notify |= res.notify
                        if res.broken is not None:
                            break
                        if res.chains and not res.starved:
                            burst_first = True
                        if res.starved:
                            break
                        continue
            try:
                chain = vq.pop()
            except DriverError as exc:
                self._log_broken(_RXQ, exc)
                notify_broken = True
                break
            if chain is None:
                break  # no buffers: the guest kicks RX when it posts some
            room = chain.writable_bytes - HDR
            if room < 0:
                self.log.warning("RX buffer of %d bytes cannot hold a packet header: "
                                 "returned empty", chain.writable_bytes)
                used.append((chain.head, 0, chain.ring_slots))
                continue
            now = self.loop.time()
            item, actions = self.muxer.poll_rx(self.cid, now, room)
            self.host.run(actions)
            if item is None:
                vq.unpop(chain)  # nothing to send after all: the buffer stays the guest's
                break
            length = self._deliver(vq, chain, item, now)
            if length is None:
                vq.unpop(chain)
                continue
            used.append((chain.head, length, chain.ring_slots))
            if type(item) is RxRead and not item.message and length == chain.writable_bytes:
                # The host socket filled the chain: read the rest of what the guest's credit
                # allows into as many chains as it takes, in one C call.
                vq.push_batch(used)  # first: the guest reads packets in used-ring order
                used = []
                res = self._rx_burst(vq, item.key, now)
                if res is not None:
                    burst_notify |= res.notify
                    if res.broken is not None:
                        break
        else:
            self._schedule_rx()
        if used:
            vq.push_batch(used)
        if used or notify_broken or burst_notify:
            if not handle.notify_if_needed() and burst_notify:
                handle.notify()

    def _rx_burst(self, vq: Any, key: Any, now: float, burst: Any = None) -> Any:
        """Stream data of connection ``key`` into many RX chains with one
        ``rx_from_fd``: the packet header is the prefix of each chain, its ``len`` patched
        with the chain's payload (Spec: virtio 1.2 §5.10.6: one packet per buffer).
        ``burst``: ``muxer.rx_burst(key)`` if the caller has it."""
        if burst is None:
            burst = self.muxer.rx_burst(key)
        sock = self.host.sock(key)
        if burst is None or sock is None:
            return None
        template, max_bytes = burst
        if max_bytes <= 0:
            return None
        res = vq.rx_from_fd(sock.fileno(), max_bytes, prefix=template,
                            prefix_len_offset=_LEN_OFFSET)
        self.host.run(self.muxer.rx_burst_done(key, res.bytes, res.chains, res.drained, now))
        if res.broken is not None:
            self._log_broken(_RXQ, res.broken)
        return res

    def _deliver(self, vq: Any, chain: Any, item: Any, now: float) -> int | None:
        """Write ``item`` into ``chain``; the used length, or None if the chain stays
        unused."""
        if type(item) is RxPacket:
            vq.fill(chain, item.header.pack(), 0)
            if item.payload:
                vq.fill(chain, item.payload, HDR)
            return HDR + len(item.payload)
        assert type(item) is RxRead
        sock = self.host.sock(item.key)
        if sock is None:
            self.host.run(self.muxer.host_error(item.key, now))
            return None
        if item.message:
            return self._read_message(vq, chain, item, sock, now)
        views = _slice_views(chain.writable, HDR, item.max_bytes)
        try:
            n: int | None = os.readv(sock.fileno(), views)
        except (BlockingIOError, InterruptedError):
            n = None
        except OSError as exc:
            self.host.run(self.muxer.host_error(item.key, now, exc.errno))
            return None
        hangup = n == 0 and self.host.hung_up(item.key)
        header, actions = self.muxer.rx_read_done(item.key, n, now, hangup=hangup)
        self.host.run(actions)
        if header is None:
            return None
        if n:
            _mark_dirty(vq, chain, HDR, n)
        vq.fill(chain, header.pack(), 0)
        return HDR + header.len_

    def _read_message(self, vq: Any, chain: Any, item: RxRead, sock: socket.socket,
                      now: float) -> int | None:
        """One host SOCK_SEQPACKET message (copied; the muxer splits it into packets)."""
        try:
            data, _anc, flags, _addr = sock.recvmsg(item.max_bytes + 1)
        except (BlockingIOError, InterruptedError):
            header, actions = self.muxer.rx_read_done(item.key, None, now)
            self.host.run(actions)
            return None
        except OSError as exc:
            self.host.run(self.muxer.host_error(item.key, now, exc.errno))
            return None
        if not data and self.host.peer_shut_write(item.key):
            header, actions = self.muxer.rx_read_done(item.key, 0, now,
                                                      hangup=self.host.hung_up(item.key))
            self.host.run(actions)
            if header is None:
                return None
            vq.fill(chain, header.pack(), 0)
            return HDR + header.len_
        truncated = len(data) > item.max_bytes or bool(flags & socket.MSG_TRUNC)
        self.host.run(self.muxer.rx_message(item.key, data, now, truncated=truncated,
                                            eor=bool(flags & socket.MSG_EOR)))
        return None

    # -- event queue -------------------------------------------------------------------------
    def _deliver_event(self) -> None:
        """Spec: virtio 1.2 §5.10.6.7: VIRTIO_VSOCK_EVENT_TRANSPORT_RESET tells the driver
        that connections were lost (and to re-read guest_cid).

        A chain with fewer writable bytes than the 4-byte event (a short or read-only
        buffer) goes back with used length 0 and the event waits for the next chain: a
        Linux driver handles an event only when its used length is sizeof(struct
        virtio_vsock_event) (virtio_vsock_event_done), so a truncated one would be lost
        (QEMU's vhost_vsock_common_send_transport_reset refuses such a buffer too). One
        warning per event owed, however many such buffers the guest posts."""
        if not self.event_pending:
            return
        handle = self._queues.get(Queue.EVENT)
        if handle is None:
            return
        vq = handle.vq
        while True:
            try:
                chain = vq.pop()
            except DriverError as exc:
                self._log_broken(int(Queue.EVENT), exc)
                handle.notify_if_needed()
                return
            if chain is None:
                handle.notify_if_needed()  # (buffers given back empty, if any)
                return  # the guest posts event buffers and kicks
            if chain.writable_bytes >= VsockEvent.SIZE:
                break
            vq.push(chain.head, 0, chain.ring_slots)
            if not self._event_buffer_warned:
                self._event_buffer_warned = True
                self.log.warning("event buffer of %d writable bytes cannot hold the %d-byte "
                                 "TRANSPORT_RESET: returned empty, the event waits for the "
                                 "next buffer", chain.writable_bytes, VsockEvent.SIZE)
        n = vq.fill(chain, VsockEvent.transport_reset().pack())
        vq.push(chain.head, n, chain.ring_slots)
        self.event_pending = False
        self._event_buffer_warned = False
        self.events_sent += 1
        self.log.info("sent TRANSPORT_RESET to the guest")
        handle.notify_if_needed()

    @property
    def live_queues(self) -> list[int]:
        return sorted(self._queues)


class VsockBackend:
    """Every vsock VM of one process: one muxer, one host adapter, one device per VM.

    ``configs``: `virtio.config.VsockConfig` items (guest_cid, uds_path, groups,
    tx_buffer_size, connect_timeout_s, reply_port, max_connections). ``emit(event, data)``
    sends a management event (unused for now, kept for the daemon's contract).
    """

    def __init__(self, loop: Any, configs: Sequence[Any] = (), *,
                 emit: Callable[[str, dict | None], None] | None = None,
                 muxer_config: MuxerConfig | None = None,
                 handshake_timeout_s: float | None = None) -> None:
        self.loop = loop
        self.emit = emit
        if muxer_config is None:
            limit = sum(int(getattr(c, "max_connections", 4096)) for c in configs) or 4096
            muxer_config = MuxerConfig(max_connections=limit)
        self.muxer = VsockMuxer(muxer_config)
        kwargs = {} if handshake_timeout_s is None else {"handshake_timeout_s":
                                                          handshake_timeout_s}
        self.host = VsockHost(loop, self.muxer, on_rx_ready=self._rx_ready,
                              on_readable=self._host_readable, **kwargs)
        self._devices: dict[int, VsockDevice] = {}
        try:
            for config in configs:
                self.add_vm(config)
        except BaseException:
            self.close()
            raise

    def add_vm(self, config: Any) -> VsockDevice:
        """Attach a VM; `DuplicateCidError` if its CID is taken (nothing is changed then)."""
        cid = int(config.guest_cid)
        if cid in self._devices:
            raise DuplicateCidError(cid)
        self.muxer.add_vm(cid, config.uds_path, groups=tuple(getattr(config, "groups", ())),
                          conn_config=conn_config_for(config))
        try:
            self.host.listen(cid, config.uds_path)
        except BaseException:
            self.muxer.remove_vm(cid, self.loop.time())
            raise
        device = self._devices[cid] = VsockDevice(self, config)
        return device

    def device(self, cid: int) -> VsockDevice:
        try:
            return self._devices[cid]
        except KeyError:
            raise UnknownCidError(cid) from None

    @property
    def devices(self) -> dict[int, VsockDevice]:
        return dict(self._devices)

    def register_commands(self, registry: Any) -> None:
        from .mgmt import register_vsock_commands

        register_vsock_commands(registry, self)

    def _host_readable(self, key: Any, sock: socket.socket) -> bool:
        device = self._devices.get(key.cid)
        return device is not None and device.host_readable(key, sock)

    def _rx_ready(self, cid: int) -> None:
        device = self._devices.get(cid)
        if device is not None:
            device.rx_ready()

    def close(self) -> None:
        """Close every host socket and listener (the vhost-user endpoints are the daemon's)."""
        now = self.loop.time()
        for cid in list(self._devices):
            try:
                self.host.run(self.muxer.reset(cid, now))
            except UnknownCidError:
                pass
        self.host.close()
        self._devices.clear()


_unpack_hdr = VsockHeader.FMT.unpack_from
#: queue indexes as plain ints (dict keys of VsockDevice._queues; looked up per event)
_RXQ, _TXQ = int(Queue.RX), int(Queue.TX)
#: a LaneUpdate from a tuple of all its fields, without the NamedTuple's Python __new__
_lane_update = partial(tuple.__new__, LaneUpdate)
_LEN_OFFSET = 24  # of le32 len in struct virtio_vsock_hdr (Spec: virtio 1.2 §5.10.6)
_RW, _STREAM, _HOST = int(Op.RW), int(Type.STREAM), int(HOST_CID)
#: a C stream loop run that moved less than this before a guest packet or an unusual read
#: ended it makes its connection wait _STREAM_HOLD_FOR more bytes to the guest before the next
_STREAM_HOLD_BELOW, _STREAM_HOLD_FOR = 256 * 1024, 1 << 20
_CREDIT_UPDATE = int(Op.CREDIT_UPDATE)


def _slice_views(views: Sequence[memoryview], offset: int, limit: int) -> list[memoryview]:
    """The buffers ``views`` from byte ``offset`` on, at most ``limit`` bytes in all."""
    out: list[memoryview] = []
    for view in views:
        n = len(view)
        if offset >= n:
            offset -= n
            continue
        piece = view[offset:offset + limit] if offset or n > limit else view
        offset = 0
        out.append(piece)
        limit -= len(piece)
        if limit <= 0:
            break
    return out


def _mark_dirty(vq: Any, chain: Any, offset: int, length: int) -> None:
    """Mark the dirty log for bytes written into ``chain`` behind the ring's back (readv)."""
    memory = getattr(vq, "memory", None)
    if memory is None or getattr(memory, "log", None) is None:
        return
    for gpa, size in chain.writable_gpas:
        if offset >= size:
            offset -= size
            continue
        n = min(size - offset, length)
        memory.mark_dirty(gpa + offset, n)
        length -= n
        offset = 0
        if length <= 0:
            break
