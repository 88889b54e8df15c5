"""The vsock muxer: routes guest packets and host events to connections (sans-I/O).

Spec: virtio 1.2 §5.10.6 (Device Operation), §5.10.6.2 (Addressing), §5.10.6.7 (Device
Events). Structure after Firecracker's ``unix/muxer.rs``: one table of `Connection` per VM,
keyed by (guest CID, host port, guest port), an RX schedule (connections with a packet for
the guest, served round-robin), and one ``_reconcile(key, before)`` that re-derives fd
interest, timers and RX scheduling after any mutation of a connection.

Several VMs share one muxer. VMs that share a group (``group`` or any of ``groups``) are
siblings: a guest
packet whose dst_cid is a sibling's CID is forwarded to that sibling's RX queue (copied; the
guests do credit between themselves end to end) and the pair is tracked in the table (for
limits, listing and clean-up). Everything else addressed elsewhere than CID 2 is dropped.

How the device and the I/O adapter drive it (all calls take ``now``, monotonic seconds, and
return ``list[Action]`` unless noted; actions are executed in order):

guest side (device):
  ``guest_tx(cid, readable, now)``       one TX chain (its readable buffers: header + payload).
                                          Any ``WriteHost`` in the result points into those
                                          buffers: execute it and call ``host_write_done``
                                          before completing the chain.
  ``poll_rx(cid, now, max_payload)``     -> (`RxPacket` | `RxRead` | None, actions), for one
                                          RX chain.
  ``rx_read_done(key, n, now, hangup)``  -> (header | None, actions) after an ``RxRead``.
  ``rx_message(key, data, now, ...)``    a seqpacket message read for an ``RxRead(message)``.
  ``reset(cid, now)``                    drop every connection of a VM (device reset; the
                                          device then sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET).
host side (adapter):
  ``host_connect_request(cid, port, now, leftover)`` -> (key, actions): a client on
                                          ``uds_path`` completed ``CONNECT <port>``.
  ``host_connected(key, now, ok)``, ``host_readable(key, now)``, ``host_writable(key, now)``,
  ``host_write_done(key, n, now)``, ``host_error(key, now, errno)``, ``timer_fired(key, now)``
  (or ``expire(now)`` with ``next_deadline()``).

Every host action names a `ConnKey`; the adapter keeps the key → socket map, creates it on
``ConnectHost`` / after ``host_connect_request`` and forgets it on ``CloseHost``; actions for
a key it does not know are ignored.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Sequence

from .conn import (Action, Buffer, CloseHost, ConnConfig, ConnInfo, ConnKey, Connection,
                   ConnState, RwPacket, RxPacket, RxItem, RxReady, SetHostInterest, SetTimer)
from .errors import (DuplicateCidError, TableFullError, UnknownCidError,
                     UnknownConnectionError)
from .wire import (HOST_CID, MAX_PKT_PAYLOAD_BYTES, U32_MASK, Op, SeqpacketFlag, Type,
                   VsockFeature, VsockHeader, cid_is_valid_guest)

log = logging.getLogger(__name__)

#: Feature bits the device offers (Spec: virtio 1.2 §5.10.3).
DEVICE_FEATURES = VsockFeature.VIRTIO_VSOCK_F_STREAM | VsockFeature.VIRTIO_VSOCK_F_SEQPACKET


@dataclass(frozen=True, slots=True)
class MuxerConfig:
    conn: ConnConfig = field(default_factory=ConnConfig)
    max_connections: int = 4096  # whole muxer, host and sibling connections together
    ephemeral_ports: tuple[int, int] = (1 << 30, 1 << 31)  # [low, high) for host-initiated
    max_control_queue: int = 1024  # per VM: RSTs for unknown connections
    max_sibling_queue_bytes: int = 4 * 1024 * 1024  # per VM: packets forwarded from siblings
    warn_interval_s: float = 1.0
    warn_burst: int = 5


@dataclass(slots=True)
class VsockStats:
    """Per-VM counters (``query-vsock-stats``)."""

    tx_packets: int = 0
    rx_packets: int = 0
    dropped_short_header: int = 0
    dropped_bad_len: int = 0
    dropped_bad_cid: int = 0
    dropped_control_overflow: int = 0
    rst_unknown_connection: int = 0
    rst_bad_op: int = 0
    rst_bad_type: int = 0
    rst_table_full: int = 0
    connections_opened: int = 0
    connections_refused: int = 0
    sibling_packets: int = 0
    warnings_suppressed: int = 0


#: What ``_reconcile`` compares before/after a mutation: ``(wants_read, wants_write,
#: deadline, has_rx)``, a plain tuple (built twice per mutation on the data path).
_Snap = tuple
_NO_SNAP = (False, False, None, False)


@dataclass(slots=True)
class _SiblingConn:
    """A connection between two sibling guests; the muxer only forwards its packets."""

    initiator: tuple[int, int]  # (cid, port)
    acceptor: tuple[int, int]
    type_: int
    established: bool = False
    bytes_fwd: int = 0  # initiator -> acceptor
    bytes_back: int = 0  # acceptor -> initiator


def _sibling_key(a: tuple[int, int], b: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    return (a, b) if a <= b else (b, a)


class _Vm:
    __slots__ = ("cid", "uds_path", "group", "groups", "conn_cfg", "features", "conns", "rxq", "ctrl", "sib_q",
                 "sib_q_bytes", "sib_off", "stats", "next_port", "used_ports", "log",
                 "warn_window", "warn_count", "serve_sibling_first")

    def __init__(self, cid: int, uds_path: str, group: str | None, next_port: int,
                 groups: frozenset[str] = frozenset(), conn_cfg: ConnConfig | None = None
                 ) -> None:
        self.cid = cid
        self.uds_path = uds_path
        self.group = group
        self.groups = groups | ({group} if group is not None else set())
        self.conn_cfg = conn_cfg
        self.features = VsockFeature(0)
        self.conns: dict[ConnKey, Connection] = {}
        self.rxq: OrderedDict[ConnKey, None] = OrderedDict()
        self.ctrl: deque[VsockHeader] = deque()
        self.sib_q: deque[tuple[VsockHeader, bytes]] = deque()
        self.sib_q_bytes = 0
        self.sib_off = 0
        self.stats = VsockStats()
        self.next_port = next_port
        self.used_ports: dict[int, int] = {}
        self.log = log.getChild(f"cid{cid}")
        self.warn_window = -1e18
        self.warn_count = 0
        self.serve_sibling_first = False

    def has_rx(self) -> bool:
        return bool(self.ctrl or self.sib_q or self.rxq)


class VsockMuxer:
    """Routes between guests' vsock queues and host UNIX sockets. See module docstring."""

    def __init__(self, config: MuxerConfig | None = None) -> None:
        self.config = config or MuxerConfig()
        self._vms: dict[int, _Vm] = {}
        self._siblings: dict[tuple, _SiblingConn] = {}
        self._nconns = 0

    # -- VMs --------------------------------------------------------------------------------

    def add_vm(self, cid: int, uds_path: str, *, group: str | None = None,
               groups: Sequence[str] = (), conn_config: ConnConfig | None = None) -> None:
        """Attach a VM with guest CID ``cid``; host services live at ``<uds_path>_<port>``.

        ``group``/``groups``: the sibling groups it belongs to (vhost-device-vsock's
        ``--groups``). ``conn_config``: this VM's connection settings (default: the muxer's
        ``config.conn``)."""
        if cid in self._vms:
            raise DuplicateCidError(cid)
        if not cid_is_valid_guest(cid):
            raise ValueError(f"guest CID {cid} is reserved or out of range")
        self._vms[cid] = _Vm(cid, uds_path, group, self.config.ephemeral_ports[0],
                             frozenset(groups), conn_config)

    def has_rx(self, cid: int) -> bool:
        """Whether VM ``cid`` may have a packet for its RX queue (so an RX chain is worth
        popping); ``poll_rx`` can still return None (e.g. a host read finds no data)."""
        return self._vm(cid).has_rx()

    def conn_config(self, cid: int) -> ConnConfig:
        """The connection settings of VM ``cid``."""
        return self._vm(cid).conn_cfg or self.config.conn

    def remove_vm(self, cid: int, now: float) -> list[Action]:
        actions = self.reset(cid, now)
        del self._vms[cid]
        return actions

    def set_features(self, cid: int, features: int) -> None:
        """The features the driver accepted (device-specific bits)."""
        self._vm(cid).features = VsockFeature(features & int(DEVICE_FEATURES))

    def vm_cids(self) -> list[int]:
        return sorted(self._vms)

    def stats(self, cid: int) -> VsockStats:
        return self._vm(cid).stats

    def connection(self, key: ConnKey) -> Connection:
        conn = self._lookup(key)
        if conn is None:
            raise UnknownConnectionError(key)
        return conn

    def connections(self, cid: int | None = None) -> list[ConnInfo]:
        """Rows for ``query-vsock-connections`` (host and sibling connections)."""
        rows: list[ConnInfo] = []
        for vm in self._vms.values():
            if cid is None or vm.cid == cid:
                rows += (c.info() for c in vm.conns.values())
        for s in self._siblings.values():
            if cid is None or cid in (s.initiator[0], s.acceptor[0]):
                rows.append(ConnInfo(cid=s.initiator[0], local_port=s.acceptor[1],
                                     peer_port=s.initiator[1],
                                     type="seqpacket" if s.type_ == Type.SEQPACKET else "stream",
                                     state="established" if s.established else "requested",
                                     initiator=f"sibling cid {s.initiator[0]} -> "
                                               f"cid {s.acceptor[0]}",
                                     bytes_to_host=s.bytes_fwd, bytes_to_guest=s.bytes_back,
                                     buffered_bytes=0))
        return rows

    @property
    def connection_count(self) -> int:
        return self._nconns

    def reset(self, cid: int, now: float) -> list[Action]:
        """Drop every connection of VM ``cid`` (closing host sides): for a device reset or a
        restart that lost state. The device sends the TRANSPORT_RESET event itself
        (Spec: virtio 1.2 §5.10.6.7)."""
        vm = self._vm(cid)
        actions: list[Action] = []
        for key, conn in vm.conns.items():
            if conn.host_open:
                actions.append(CloseHost(key))
            if conn.deadline is not None:
                actions.append(SetTimer(key, None))
            self._nconns -= 1
        vm.conns.clear()
        vm.rxq.clear()
        vm.ctrl.clear()
        vm.sib_q.clear()
        vm.sib_q_bytes = vm.sib_off = 0
        vm.used_ports.clear()
        for skey, s in list(self._siblings.items()):
            if cid in (s.initiator[0], s.acceptor[0]):
                other, mine = (s.acceptor, s.initiator) if s.initiator[0] == cid else (
                    s.initiator, s.acceptor)
                del self._siblings[skey]
                self._nconns -= 1
                ovm = self._vms.get(other[0])
                if ovm is not None:
                    actions += self._queue_ctrl(ovm, VsockHeader(
                        mine[0], other[0], mine[1], other[1], 0, s.type_, Op.RST, 0, 0, 0))
        return actions

    # -- guest -> device ----------------------------------------------------------------------

    def guest_tx(self, cid: int, readable: Buffer | Sequence[Buffer], now: float
                 ) -> list[Action]:
        """One packet from VM ``cid``'s TX queue (the chain's readable buffers, in order).

        Validation order: header size → len within the buffer → src_cid → dst_cid (host,
        sibling, else drop) → type → op → connection lookup."""
        vm = self._vm(cid)
        views = [readable] if isinstance(readable, (bytes, bytearray, memoryview)) else list(
            readable)
        hdr, rest = self._split_header(views)
        if hdr is None:
            vm.stats.dropped_short_header += 1
            self._warn(vm, now, "dropping TX packet shorter than a header")
            return []
        payload = self._check_len(hdr, rest)
        if payload is None:
            vm.stats.dropped_bad_len += 1
            self._warn(vm, now, "dropping TX packet: len %d beyond the buffer", hdr.len_)
            return []
        return self._route(vm, hdr, payload, now)

    def guest_rw_batch(self, cid: int, dst_port: int, src_port: int,
                       packets: Sequence[RwPacket], now: float) -> list[Action]:
        """Consecutive stream RW packets of VM ``cid`` from guest port ``src_port`` to host
        port ``dst_port`` (the device's TX fast path). The caller checked what `guest_tx`
        checks before routing (header size, len within the buffer, src_cid = the VM,
        dst_cid = the host, type STREAM, op RW); header fields come as plain ints.

        Same outcome as `guest_tx` for each packet, with one reconcile for the batch and
        one ``WriteHost`` for all the payloads."""
        vm = self._vm(cid)
        key = ConnKey(cid, dst_port, src_port)
        conn = vm.conns.get(key)
        if conn is None or conn.type_ is not Type.STREAM:
            actions: list[Action] = []
            for n, flags, ba, fc, views in packets:
                hdr = VsockHeader(cid, int(HOST_CID), src_port, dst_port, n, _STREAM, _RW,
                                  flags, ba, fc)
                actions += self._route(vm, hdr, views, now)
            return actions
        vm.stats.tx_packets += len(packets)
        before = self._snap(conn)
        actions = conn.on_rw_batch(packets, now)
        return actions + self._reconcile(key, before, now=now)

    def guest_credit_update(self, cid: int, dst_port: int, src_port: int, buf_alloc: int,
                            fwd_cnt: int, now: float) -> list[Action] | None:
        """A stream CREDIT_UPDATE from VM ``cid`` (guest port ``src_port``) to the host
        (port ``dst_port``), header fields as plain ints: the device's TX fast path for the
        packet a receiving guest sends every credit window. The caller checked what
        `guest_tx` checks before routing (a whole header, src_cid = the VM, dst_cid = the
        host, type STREAM, op CREDIT_UPDATE). Same outcome as `guest_tx`; None (nothing
        done) when there is no stream connection of that key, for `guest_tx` to answer.

        Spec: virtio 1.2 §5.10.6.3 (every packet carries the sender's credit)."""
        vm = self._vms.get(cid)
        key = ConnKey(cid, dst_port, src_port)
        conn = None if vm is None else vm.conns.get(key)
        if conn is None or conn.type_ is not Type.STREAM:
            return None
        vm.stats.tx_packets += 1
        before = self._snap(conn)
        conn.peer_credit(buf_alloc, fwd_cnt)
        return self._reconcile(key, before, now=now)

    def credit_reopens_rx(self, cid: int, dst_port: int, src_port: int, buf_alloc: int,
                          fwd_cnt: int, now: float
                          ) -> tuple[Connection, int, _Snap] | None:
        """A guest stream CREDIT_UPDATE (plain ints, checked as for `guest_credit_update`)
        that re-opens credit for a connection whose host socket is known readable, while
        nothing else of its VM is waiting for the RX queue (no control or sibling packet,
        no connection scheduled: `poll_rx` would serve this read next): the credit fields
        are applied and ``(connection, credit, before)`` returned for the device's RX pump,
        which reads at once instead of a scheduled RX pass; report with
        `credit_reopen_done`. None (nothing changed): `guest_credit_update` answers.

        Spec: virtio 1.2 §5.10.6.3 (every packet carries the sender's credit)."""
        vm = self._vms.get(cid)
        if vm is None or vm.ctrl or vm.sib_q or vm.rxq:
            return None
        conn = vm.conns.get(ConnKey(cid, dst_port, src_port))
        if conn is None or not conn.credit_reopens_read():
            return None
        credit = buf_alloc - ((conn.tx_cnt - fwd_cnt) & 0xFFFFFFFF)
        if credit <= 0:
            return None
        # The snapshot, known from the conditions: no read interest (the socket is known
        # readable), nothing for the guest (no key scheduled: every reconcile keeps
        # has_rx == scheduled)
        before = (False, conn.wants_write, conn.deadline, False)
        vm.stats.tx_packets += 1
        conn.peer_credit(buf_alloc, fwd_cnt)
        conn.arm_credit_request(now)  # the guest spoke: a CREDIT_REQUEST timer is dropped
        return conn, credit, before

    def credit_reopen_done(self, conn: Connection, nbytes: int, packets: int,
                           clean_drain: bool, now: float, before: _Snap) -> list[Action]:
        """After the RX pump moved ``packets`` packets, ``nbytes`` payload bytes, of a
        `credit_reopens_rx` connection: the counters and one reconcile (the same state
        as `guest_credit_update`, then `rx_burst_next` + `rx_burst_done`)."""
        self._vms[conn.key.cid].stats.rx_packets += packets
        conn.rx_reopen_done(nbytes, clean_drain)
        return self._reconcile(conn.key, before, now=now)

    def direct_tx_conn(self, cid: int, dst_port: int, src_port: int) -> Connection | None:
        """The stream connection of VM ``cid`` (guest port ``src_port`` to host port
        ``dst_port``) when its RW packets may take the device's direct lane
        (`Connection.direct_tx_ok`), else None (use `guest_rw_batch`). The lane:
        ``before = snapshot(conn)``, ``conn.rw_direct(packets)``, the device's own write,
        ``conn.rw_written(...)``, then ``settle(conn, before, len(packets))``; the outcome
        is that of `guest_rw_batch` plus ``host_write_done``."""
        return self.direct_tx_conn_of(ConnKey(cid, dst_port, src_port))

    def direct_tx_conn_of(self, key: ConnKey) -> Connection | None:
        """`direct_tx_conn` by key."""
        vm = self._vms.get(key.cid)
        conn = None if vm is None else vm.conns.get(key)
        return conn if conn is not None and conn.direct_tx_ok else None

    @staticmethod
    def snapshot(conn: Connection) -> _Snap:
        """What `settle` (``_reconcile``) compares after a mutation of ``conn``."""
        return (conn.wants_read, conn.wants_write, conn.deadline, conn.has_rx)

    _snap = snapshot

    def settle(self, conn: Connection, before: _Snap, packets: int = 0,
               now: float | None = None) -> list[Action]:
        """After a direct-lane mutation of ``conn`` (see `direct_tx_conn`): count
        ``packets`` TX packets and reconcile (interest, timer, RX scheduling)."""
        self._vms[conn.key.cid].stats.tx_packets += packets
        return self._reconcile(conn.key, before, now=now)

    def settle_quiet(self, conn: Connection, pending_before: int, packets: int,
                     now: float | None = None) -> list[Action]:
        """`settle` after a TX lane run that left no tail, saw no write error and carried
        the guest's credit fields unchanged (``Connection.rw_lane`` then changes only
        counters and, through ``_credit_check``, the CREDIT_UPDATE bit of ``_pending``;
        ``pending_before``: ``conn._pending`` before it). Interest, deadline and the
        write side are as before, so only ``has_rx`` can differ: the packets are counted
        and, when ``_pending`` is unchanged (the update went straight out, or none was
        due), nothing else is done; otherwise one reconcile against the state before,
        rebuilt (``has_rx`` before = the key is scheduled, as every reconcile leaves it).

        Spec: virtio 1.2 §5.10.6.3 (credit)."""
        vm = self._vms[conn.key.cid]
        vm.stats.tx_packets += packets
        if conn._pending == pending_before:
            return []
        key = conn.key
        before = (conn.wants_read, conn.wants_write, conn.deadline, key in vm.rxq)
        return self._reconcile(key, before, now=now)

    def settle_update_sent(self, conn: Connection, packets: int, pending_changed: bool,
                           now: float | None = None) -> list[Action]:
        """`credit_update_sent` then `settle_quiet` after ``Connection.rw_lane_update_sent``
        (``pending_changed``: its result): the packets and the update are counted, and a
        reconcile runs only when an update owed before the run went out with it.

        Spec: virtio 1.2 §5.10.6.3 (credit)."""
        vm = self._vms[conn.key.cid]
        stats = vm.stats
        stats.tx_packets += packets
        stats.rx_packets += 1
        if not pending_changed:
            return []
        key = conn.key
        before = (conn.wants_read, conn.wants_write, conn.deadline, key in vm.rxq)
        return self._reconcile(key, before, now=now)

    def credit_only_quiet(self, conn: Connection, packets: int, buf_alloc: int,
                          fwd_cnt: int, credit_changed: bool, now: float
                          ) -> list[Action] | None:
        """A TX lane run of ``packets`` packets without payload (the guest's CREDIT_UPDATEs
        of a host->guest stream: one per credit window) carrying ``buf_alloc`` /
        ``fwd_cnt`` (the last packet's; ``credit_changed``: some packet's pair differed
        from the one before it, as the lane reports), for a connection in the RX pump's
        state (`Connection.rx_lane_state`: nothing owed to the guest, socket not known
        readable). Then `has_rx` stays False and the write side, the handshake deadline
        and the guest->host counters are untouched, so only read interest and the
        CREDIT_REQUEST timer can change: the credit fields are applied, the packets
        counted, and a reconcile runs only when one of those two changed. The outcome is
        that of ``rw_lane`` + `settle`. None (nothing changed): the caller takes that path.

        Spec: virtio 1.2 §5.10.6.3 (every packet carries the sender's credit)."""
        vm = self._vms[conn.key.cid]
        if not conn.rx_lane_state() or conn.key in vm.rxq:
            return None
        conn._credit_check()  # as rw_lane does (no payload: an update owed stays owed)
        if conn._pending:
            return None  # an update owed: the full path puts it (_credit_check is idempotent)
        # wants_read in that state: peer_free > 0, inline (before and after the update)
        read_before = conn.peer_buf_alloc > ((conn.tx_cnt - conn.peer_fwd_cnt) & U32_MASK)
        vm.stats.tx_packets += packets
        if credit_changed:  # as rw_lane
            conn._credit_requested = False
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        # arm_credit_request, inline: in that state (no queued data, socket not known
        # readable) no CREDIT_REQUEST is wanted, so the timer is dropped, and the deadline
        # is the handshake / shutdown one unless that timer was armed before.
        request_at = conn._credit_request_at
        deadline_before = conn._deadline if request_at is None else conn.deadline
        conn._credit_request_at = None
        conn._credit_request_due = False
        if (buf_alloc > ((conn.tx_cnt - fwd_cnt) & U32_MASK)) == read_before and (
                conn._deadline == deadline_before):
            return []
        return self._reconcile(conn.key, (read_before, conn.wants_write, deadline_before,
                                          False), now=now)

    def lone_update_possible(self, conn: Connection) -> bool:
        """Before a TX lane run of ``conn`` (the device's `LaneUpdate`): a CREDIT_UPDATE
        the run makes due (or one owed already) would be the next packet of this VM for
        the guest, i.e. `lone_credit_update` would return it after a quiet run (one that
        changes no credit fields): nothing of the VM comes first in `poll_rx` order and
        the connection owes nothing but that update, queues no data and has no host bytes
        known waiting. Changes nothing.

        Spec: virtio 1.2 §5.10.6.3 (CREDIT_UPDATE)."""
        return self._first_for_guest(conn) and conn.only_update_owed()

    def _first_for_guest(self, conn: Connection) -> bool:
        """Nothing of ``conn``'s VM comes before it in `poll_rx` order: no control or
        sibling packet, no other connection scheduled."""
        vm = self._vms.get(conn.key.cid)
        if vm is None or vm.ctrl or vm.sib_q:
            return False
        rxq = vm.rxq
        return not rxq or (len(rxq) == 1 and conn.key in rxq)

    def lone_credit_update(self, conn: Connection) -> bytes | None:
        """When ``conn``'s next packet for the guest is a CREDIT_UPDATE and nothing of its
        VM comes before it in `poll_rx` order (no control or sibling packet, no other
        connection scheduled): that header, packed, changing nothing. The device's TX path
        then puts it straight into an RX buffer and reports with `credit_update_sent`; the
        outcome is that of the next `poll_rx`."""
        if not self._first_for_guest(conn) or conn._peek_rx() != "credit_update":
            return None
        return conn.credit_update_packet()

    def credit_update_sent(self, conn: Connection) -> None:
        """The `lone_credit_update` header is in the guest's RX queue."""
        conn.credit_update_sent()
        self._vms[conn.key.cid].stats.rx_packets += 1

    def _route(self, vm: _Vm, hdr: VsockHeader, payload: list[memoryview], now: float
               ) -> list[Action]:
        """`guest_tx` after the header and its len were checked."""
        vm.stats.tx_packets += 1
        if hdr.src_cid != vm.cid:
            vm.stats.dropped_bad_cid += 1
            self._warn(vm, now, "dropping TX packet with src_cid %d", hdr.src_cid)
            return []
        if hdr.dst_cid != HOST_CID:
            sib = self._vms.get(hdr.dst_cid)
            if sib is None or sib is vm or not vm.groups & sib.groups:
                vm.stats.dropped_bad_cid += 1
                self._warn(vm, now, "dropping TX packet for dst_cid %d", hdr.dst_cid)
                return []
            return self._sibling_tx(vm, sib, hdr, payload, now)
        if not self._type_ok(vm, hdr.type_):
            vm.stats.rst_bad_type += 1
            self._warn(vm, now, "bad socket type %d: RST", hdr.type_)
            return self._rst_reply(vm, hdr)
        key = ConnKey(vm.cid, hdr.dst_port, hdr.src_port)
        conn = vm.conns.get(key)
        if hdr.op not in _KNOWN_OPS:
            vm.stats.rst_bad_op += 1
            self._warn(vm, now, "bad op %d: RST", hdr.op)
            if conn is not None:
                return self._mutate(conn, now, lambda: conn.kill(now))
            return self._rst_reply(vm, hdr)
        if conn is None:
            if hdr.op == Op.REQUEST:
                return self._guest_request(vm, key, hdr, now)
            if hdr.op == Op.RST:
                return []
            vm.stats.rst_unknown_connection += 1
            return self._rst_reply(vm, hdr)
        if conn.type_ != hdr.type_:
            return self._mutate(conn, now, lambda: conn.kill(now))
        return self._mutate(conn, now, lambda: conn.on_packet(hdr, payload, now))

    @staticmethod
    def _split_header(views: list[Buffer]) -> tuple[VsockHeader | None, list[memoryview]]:
        """Copy the 44-byte header out of the buffers (it may straddle them); the rest are
        payload views (no copy)."""
        need = VsockHeader.SIZE
        head = bytearray()
        rest: list[memoryview] = []
        for b in views:
            mv = memoryview(b).cast("B") if not isinstance(b, memoryview) or b.format != "B" \
                else b
            if need:
                take = min(need, len(mv))
                head += mv[:take]
                need -= take
                mv = mv[take:]
            if len(mv):
                rest.append(mv)
        if need:
            return None, []
        return VsockHeader.unpack(head), rest

    @staticmethod
    def _check_len(hdr: VsockHeader, rest: list[memoryview]) -> list[memoryview] | None:
        if hdr.op != Op.RW:
            return []  # only RW carries payload; anything else is ignored
        total = sum(len(v) for v in rest)
        if hdr.len_ > total:
            return None
        out: list[memoryview] = []
        need = hdr.len_
        for v in rest:
            if not need:
                break
            take = min(need, len(v))
            out.append(v[:take])
            need -= take
        return out

    def _type_ok(self, vm: _Vm, type_: int) -> bool:
        if type_ == Type.STREAM:
            return True
        return type_ == Type.SEQPACKET and bool(
            vm.features & VsockFeature.VIRTIO_VSOCK_F_SEQPACKET)

    def _rst_reply(self, vm: _Vm, hdr: VsockHeader) -> list[Action]:
        """RST back to the sender of ``hdr`` (never in reply to an RST)."""
        if hdr.op == Op.RST:
            return []
        return self._queue_ctrl(vm, VsockHeader(
            src_cid=hdr.dst_cid, dst_cid=hdr.src_cid, src_port=hdr.dst_port,
            dst_port=hdr.src_port, len_=0, type_=hdr.type_, op=Op.RST, flags=0, buf_alloc=0,
            fwd_cnt=0))

    def _queue_ctrl(self, vm: _Vm, hdr: VsockHeader) -> list[Action]:
        if len(vm.ctrl) >= self.config.max_control_queue:
            vm.stats.dropped_control_overflow += 1
            return []
        was = vm.has_rx()
        vm.ctrl.append(hdr)
        return [] if was else [RxReady(vm.cid)]

    def _guest_request(self, vm: _Vm, key: ConnKey, hdr: VsockHeader, now: float
                       ) -> list[Action]:
        if self._nconns >= self.config.max_connections:
            vm.stats.rst_table_full += 1
            self._warn(vm, now, "connection table full (%d): RST", self.config.max_connections)
            return self._rst_reply(vm, hdr)
        path = f"{vm.uds_path}_{key.local_port}"
        conn, actions = Connection.from_guest_request(key, hdr, path, vm.conn_cfg or self.config.conn, now,
                                                      vm.log)
        self._insert(vm, conn)
        vm.stats.connections_opened += 1
        return actions + self._reconcile(key, _NO_SNAP, now=now)

    # -- siblings ---------------------------------------------------------------------------------

    def _sibling_tx(self, vm: _Vm, sib: _Vm, hdr: VsockHeader, payload: list[memoryview],
                    now: float) -> list[Action]:
        vm.stats.sibling_packets += 1
        if not (self._type_ok(vm, hdr.type_) and self._type_ok(sib, hdr.type_)):
            vm.stats.rst_bad_type += 1
            return self._rst_reply(vm, hdr)
        if hdr.op not in _KNOWN_OPS:
            vm.stats.rst_bad_op += 1
            return self._sibling_abort(vm, sib, hdr)
        src, dst = (vm.cid, hdr.src_port), (sib.cid, hdr.dst_port)
        skey = _sibling_key(src, dst)
        s = self._siblings.get(skey)
        if s is None:
            if hdr.op == Op.RST:
                return []
            if hdr.op != Op.REQUEST:
                vm.stats.rst_unknown_connection += 1
                return self._rst_reply(vm, hdr)
            if self._nconns >= self.config.max_connections:
                vm.stats.rst_table_full += 1
                return self._rst_reply(vm, hdr)
            s = self._siblings[skey] = _SiblingConn(src, dst, hdr.type_)
            self._nconns += 1
        if hdr.len_ > MAX_PKT_PAYLOAD_BYTES:
            return self._sibling_abort(vm, sib, hdr)
        data = b"".join(bytes(v) for v in payload)
        if sib.sib_q_bytes + len(data) > self.config.max_sibling_queue_bytes:
            self._warn(vm, now, "sibling cid %d not draining its RX queue: RST", sib.cid)
            return self._sibling_abort(vm, sib, hdr)
        if hdr.op == Op.RST:
            del self._siblings[skey]
            self._nconns -= 1
        elif hdr.op == Op.RESPONSE:
            s.established = True
        if hdr.op == Op.RW:
            if s.initiator == src:
                s.bytes_fwd += len(data)
            else:
                s.bytes_back += len(data)
        was = sib.has_rx()
        sib.sib_q.append((hdr, data))
        sib.sib_q_bytes += len(data)
        return [] if was else [RxReady(sib.cid)]

    def _sibling_abort(self, vm: _Vm, sib: _Vm, hdr: VsockHeader) -> list[Action]:
        """Reset a sibling connection on both sides."""
        skey = _sibling_key((vm.cid, hdr.src_port), (sib.cid, hdr.dst_port))
        if self._siblings.pop(skey, None) is not None:
            self._nconns -= 1
        rst_to_sib = VsockHeader(vm.cid, sib.cid, hdr.src_port, hdr.dst_port, 0, hdr.type_,
                                 Op.RST, 0, 0, 0)
        return self._rst_reply(vm, hdr) + self._queue_ctrl(sib, rst_to_sib)

    # -- device <- muxer: RX ----------------------------------------------------------------------

    def poll_rx(self, cid: int, now: float, max_payload: int
                ) -> tuple[RxItem | None, list[Action]]:
        """The next packet for VM ``cid``'s RX queue, for a chain with room for ``max_payload``
        bytes after the header (None when there is nothing: the chain is not used), and the
        actions (interest, timers) that producing it caused.

        Order: RSTs for unknown connections, then sibling packets and connections in turn;
        connections are served round-robin, one packet each."""
        vm = self._vm(cid)
        if vm.ctrl:
            vm.stats.rx_packets += 1
            return RxPacket(vm.ctrl.popleft()), []
        actions: list[Action] = []
        polls = [self._poll_sibling, self._poll_conns]
        if not vm.serve_sibling_first:
            polls.reverse()
        vm.serve_sibling_first = not vm.serve_sibling_first
        for poll in polls:
            item = poll(vm, max_payload, actions, now)
            if item is not None:
                vm.stats.rx_packets += 1
                return item, actions
        return None, actions

    def _poll_sibling(self, vm: _Vm, max_payload: int, actions: list[Action],
                      now: float) -> RxItem | None:
        if not vm.sib_q:
            return None
        hdr, data = vm.sib_q[0]
        rest = len(data) - vm.sib_off
        if hdr.op != Op.RW or rest <= max_payload:
            vm.sib_q.popleft()
            vm.sib_q_bytes -= len(data)
            chunk = memoryview(data)[vm.sib_off:]
            vm.sib_off = 0
            return RxPacket(hdr.with_(len_=len(chunk)) if hdr.op == Op.RW else hdr, chunk)
        if max_payload <= 0:
            return None
        # Split an RW bigger than the guest's RX buffer; EOM/EOR only on the last piece.
        chunk = memoryview(data)[vm.sib_off:vm.sib_off + max_payload]
        vm.sib_off += max_payload
        flags = hdr.flags & ~int(SeqpacketFlag.EOM | SeqpacketFlag.EOR) \
            if hdr.type_ == Type.SEQPACKET else hdr.flags
        return RxPacket(hdr.with_(len_=len(chunk), flags=flags), chunk)

    def _poll_conns(self, vm: _Vm, max_payload: int, actions: list[Action],
                    now: float) -> RxItem | None:
        for _ in range(len(vm.rxq)):
            key, _none = vm.rxq.popitem(last=False)
            conn = vm.conns.get(key)
            if conn is None:
                continue
            before = self._snap(conn)[:3] + (False,)  # popped
            item = conn.next_rx(max_payload)
            actions += self._reconcile(key, before, requeue=True, now=now)
            if item is not None:
                return item
        return None

    def rx_read_done(self, key: ConnKey, nbytes: int | None, now: float, *,
                     hangup: bool = False) -> tuple[VsockHeader | None, list[Action]]:
        conn = self._lookup(key)
        if conn is None:
            return None, []
        before = self._snap(conn)
        hdr, actions = conn.rx_read_done(nbytes, now, hangup=hangup)
        return hdr, actions + self._reconcile(key, before, now=now)

    def rx_burst(self, key: ConnKey) -> tuple[bytes, int] | None:
        """`Connection.rx_burst` of ``key`` (None if it is gone or has no stream read)."""
        conn = self._lookup(key)
        return None if conn is None else conn.rx_burst()

    def rx_burst_next(self, cid: int) -> tuple[ConnKey, bytes, int] | None:
        """When VM ``cid``'s next RX packet (in `poll_rx` order: control packets, sibling
        packets, then connections round-robin) would be a stream read from a host socket:
        ``(key, header template, max payload bytes)`` as `rx_burst` gives, so the device
        can read it straight into many RX chains; None otherwise. Changes nothing; report
        with `rx_burst_done`, which also moves the connection to the back of the
        round-robin."""
        vm = self._vm(cid)
        if vm.ctrl or vm.sib_q or not vm.rxq:
            return None
        key = next(iter(vm.rxq))
        conn = vm.conns.get(key)
        burst = None if conn is None else conn.rx_burst()
        return None if burst is None else (key, *burst)

    def rx_burst_done(self, key: ConnKey, nbytes: int, packets: int, drained: bool,
                      now: float) -> list[Action]:
        """After a burst read of ``packets`` packets, ``nbytes`` payload bytes, for ``key``
        (see `Connection.rx_burst_done`)."""
        conn = self._lookup(key)
        if conn is None:
            return []
        vm = self._vms[key.cid]
        vm.stats.rx_packets += packets
        if key in vm.rxq:
            vm.rxq.move_to_end(key)  # served: round-robin, as _poll_conns
        return self._mutate(conn, now, lambda: conn.rx_burst_done(nbytes, drained))

    def rx_lane_conn(self, key: ConnKey) -> tuple[Connection, int] | None:
        """``(connection, credit)`` when a host-readable event of ``key`` may go straight
        into the guest's RX queue through the device's RX pump: nothing of its VM is
        waiting for the RX queue (no control or sibling packet, no connection scheduled,
        so `poll_rx` would serve this read next) and `Connection.rx_lane_credit` is
        positive. None: take `host_readable` (the general path). Changes nothing; report
        with `rx_lane_done`."""
        vm = self._vms.get(key.cid)
        if vm is None or vm.ctrl or vm.sib_q or vm.rxq:
            return None
        conn = vm.conns.get(key)
        if conn is None:
            return None
        credit = conn.rx_lane_credit
        return (conn, credit) if credit > 0 else None

    def rx_lane_done(self, conn: Connection, nbytes: int, packets: int, clean_drain: bool,
                     now: float) -> list[Action]:
        """After the RX pump moved ``packets`` packets, ``nbytes`` payload bytes, of
        ``conn`` (see `rx_lane_conn`, `Connection.rx_lane_done`): the counters, and a
        reconcile only when the outcome changed what it derives. The state before the
        pump is known from `rx_lane_conn`'s conditions (read interest on, nothing for the
        guest) and the pump changes neither write interest nor deadline, so ``before`` is
        built from the state after, without a snapshot on the common path."""
        self._vms[conn.key.cid].stats.rx_packets += packets
        if conn.rx_lane_done(nbytes, clean_drain):
            return []
        before = (True, conn.wants_write, conn.deadline, False)
        return self._reconcile(conn.key, before, now=now)

    def stream_loop_conn(self, key: ConnKey) -> Connection | None:
        """The connection ``key`` when the C stream loop may serve it
        (virtio/vsock/stream_loop.py): its host->guest stream in the RX pump's state
        (`Connection.rx_lane_state`: nothing owed to the guest, no host bytes known waiting)
        and nothing else of its VM waiting for the RX queue (as `rx_lane_conn`, whatever the
        credit), its guest's packets able to take the TX lane (`direct_tx_conn_of`), and no
        CREDIT_UPDATE of ours due. Changes nothing; report with `stream_loop_done`."""
        vm = self._vms.get(key.cid)
        if vm is None or vm.ctrl or vm.sib_q or vm.rxq:
            return None
        conn = vm.conns.get(key)
        if conn is None or not conn.direct_tx_ok or not conn.rx_lane_state():
            return None
        conn._credit_check()  # idempotent; in this state it can only mark an update due
        return None if conn._pending else conn

    def stream_loop_done(self, conn: Connection, rx_packets: int, tx_packets: int,
                         nbytes: int, tx_cnt: int, peer_buf_alloc: int, peer_fwd_cnt: int,
                         credit_changed: bool, before: _Snap,
                         now: float) -> list[Action]:
        """After the C stream loop served ``conn`` (see `stream_loop_conn`): the packets
        counted, the counters applied (`Connection.stream_loop_done`), and one reconcile
        against ``before`` (`snapshot` as the loop was entered): the outcome of the
        `rx_lane_done` and `credit_only_quiet` calls the same events would have made one by
        one."""
        stats = self._vms[conn.key.cid].stats
        stats.rx_packets += rx_packets
        stats.tx_packets += tx_packets
        conn.stream_loop_done(nbytes, tx_cnt, peer_buf_alloc, peer_fwd_cnt, credit_changed)
        if tx_packets:  # as credit_only_quiet: in this state no CREDIT_REQUEST is wanted
            conn._credit_request_at = None
            conn._credit_request_due = False
        return self._reconcile(conn.key, before, now=now)

    def rx_message(self, key: ConnKey, data: bytes, now: float, *, truncated: bool = False,
                   eor: bool = False) -> list[Action]:
        conn = self._lookup(key)
        if conn is None:
            return []
        return self._mutate(conn, now, lambda: conn.rx_message(data, now, truncated=truncated,
                                                              eor=eor))

    # -- host -> muxer ----------------------------------------------------------------------------

    def host_connect_request(self, cid: int, port: int, now: float, leftover: bytes = b"",
                             type_: Type = Type.STREAM) -> tuple[ConnKey, list[Action]]:
        """A host client asked for guest port ``port`` (after a valid handshake). Assigns a
        host-side port, queues a REQUEST to the guest. Raises `TableFullError` (the adapter
        closes the client)."""
        vm = self._vm(cid)
        if self._nconns >= self.config.max_connections:
            vm.stats.connections_refused += 1
            raise TableFullError(self.config.max_connections)
        local_port = self._alloc_port(vm)
        key = ConnKey(vm.cid, local_port, port)
        conn = Connection.from_host_connect(key, Type(type_), vm.conn_cfg or self.config.conn,
                                            now, leftover, vm.log)
        self._insert(vm, conn)
        vm.stats.connections_opened += 1
        return key, self._reconcile(key, _NO_SNAP, now=now)

    def host_connected(self, key: ConnKey, now: float, ok: bool = True) -> list[Action]:
        conn = self._lookup(key)
        if conn is None:
            return [CloseHost(key)] if ok else []
        return self._mutate(conn, now, lambda: conn.host_connected(now, ok))

    def host_readable(self, key: ConnKey, now: float) -> list[Action]:
        conn = self._lookup(key)
        if conn is None:
            return []
        return self._mutate(conn, now, lambda: conn.host_readable_event(now))

    def host_writable(self, key: ConnKey, now: float) -> list[Action]:
        conn = self._lookup(key)
        if conn is None:
            return []
        return self._mutate(conn, now, lambda: conn.host_writable(now))

    def host_write_done(self, key: ConnKey, nbytes: int | None, now: float) -> list[Action]:
        conn = self._lookup(key)
        if conn is None:
            return []
        return self._mutate(conn, now, lambda: conn.host_write_done(nbytes, now))

    def host_error(self, key: ConnKey, now: float, errno_: int | None = None) -> list[Action]:
        conn = self._lookup(key)
        if conn is None:
            return []
        return self._mutate(conn, now, lambda: conn.host_error(now, errno_))

    def timer_fired(self, key: ConnKey, now: float) -> list[Action]:
        conn = self._lookup(key)
        if conn is None:
            return []
        return self._mutate(conn, now, lambda: conn.timer_fired(now))

    def next_deadline(self) -> float | None:
        deadlines = [c.deadline for vm in self._vms.values() for c in vm.conns.values()
                     if c.deadline is not None]
        return min(deadlines, default=None)

    def expire(self, now: float) -> list[Action]:
        """Fire every connection timer due at ``now`` (alternative to per-key timers)."""
        actions: list[Action] = []
        due = [c for vm in self._vms.values() for c in vm.conns.values()
               if c.deadline is not None and c.deadline <= now]
        for conn in due:
            actions += self.timer_fired(conn.key, now)
        return actions

    # -- internals --------------------------------------------------------------------------------

    def _vm(self, cid: int) -> _Vm:
        vm = self._vms.get(cid)
        if vm is None:
            raise UnknownCidError(cid)
        return vm

    def _lookup(self, key: ConnKey) -> Connection | None:
        vm = self._vms.get(key.cid)
        return None if vm is None else vm.conns.get(key)

    def _insert(self, vm: _Vm, conn: Connection) -> None:
        vm.conns[conn.key] = conn
        vm.used_ports[conn.key.local_port] = vm.used_ports.get(conn.key.local_port, 0) + 1
        self._nconns += 1

    def _alloc_port(self, vm: _Vm) -> int:
        low, high = self.config.ephemeral_ports
        span = high - low
        for _ in range(span):
            port = vm.next_port
            vm.next_port = low + (port + 1 - low) % span
            if port not in vm.used_ports:
                return port
        raise TableFullError(self.config.max_connections)

    def _warn(self, vm: _Vm, now: float, msg: str, *args: object) -> None:
        """Guest-triggered warning, rate-limited per VM (burst per interval)."""
        if now - vm.warn_window >= self.config.warn_interval_s:
            if vm.stats.warnings_suppressed and vm.warn_count > self.config.warn_burst:
                vm.log.warning("%d similar warnings suppressed", vm.warn_count -
                               self.config.warn_burst)
            vm.warn_window = now
            vm.warn_count = 0
        vm.warn_count += 1
        if vm.warn_count <= self.config.warn_burst:
            vm.log.warning(msg, *args)
        else:
            vm.stats.warnings_suppressed += 1

    def _mutate(self, conn: Connection, now: float, fn) -> list[Action]:
        before = self._snap(conn)
        actions = fn()
        return actions + self._reconcile(conn.key, before, now=now)

    def _reconcile(self, key: ConnKey, before: _Snap, *, requeue: bool = False,
                   now: float | None = None) -> list[Action]:
        """Re-derive fd interest, timer and RX scheduling of ``key`` after a mutation.

        Removes a CLOSED connection from the table. Returns the actions (SetHostInterest,
        SetTimer, RxReady) that bring the adapter and the device in line."""
        actions: list[Action] = []
        vm = self._vms[key.cid]
        conn = vm.conns.get(key)
        if conn is None:
            return actions
        before_read, before_write, before_deadline, _had_rx = before
        if conn.state is ConnState.CLOSED:
            if before_deadline is not None:
                actions.append(SetTimer(key, None))
            del vm.conns[key]
            vm.rxq.pop(key, None)
            left = vm.used_ports[key.local_port] - 1
            if left:
                vm.used_ports[key.local_port] = left
            else:
                del vm.used_ports[key.local_port]
            self._nconns -= 1
            return actions
        conn.arm_credit_request(now)
        read, write, deadline, has_rx = self._snap(conn)
        if conn.host_open and (read != before_read or write != before_write):
            actions.append(SetHostInterest(key, read, write))
        if deadline != before_deadline:
            actions.append(SetTimer(key, deadline))
        if has_rx:
            if key not in vm.rxq:
                was = vm.has_rx()
                vm.rxq[key] = None
                if not was and not requeue:
                    actions.append(RxReady(vm.cid))
        else:
            vm.rxq.pop(key, None)
        return actions


_KNOWN_OPS = frozenset(int(op) for op in Op if op != Op.INVALID)
_STREAM, _RW = int(Type.STREAM), int(Op.RW)
