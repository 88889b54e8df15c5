"""One vsock connection between a guest AF_VSOCK socket and a host UNIX socket (sans-I/O).

Spec: virtio 1.2 §5.10.6 (Device Operation): connection set-up (REQUEST/RESPONSE),
§5.10.6.3 (Buffer Space Management: credit), §5.10.6.5 (stream: SHUTDOWN, RST),
§5.10.6.6 (seqpacket: EOM/EOR).

Nothing here touches a socket or the clock. Inputs are guest packets (a header already copied
out of guest memory, plus the payload as buffers that may point into guest memory) and host
events reported by the I/O adapter; outputs are host *actions* (frozen dataclasses) and, when
the device asks for one, the next packet for the guest.

Data path boundary (who copies what):

* guest → host, stream: the RW payload is handed out as ``WriteHost(key, data)`` where
  ``data`` is a tuple of the payload buffers *as given* (memoryviews into guest memory). The
  adapter writes them with one ``writev``/``sendmsg`` **immediately** and reports the count
  with `Connection.host_write_done` **before** it completes the TX chain. Only the unwritten
  tail is copied (into an immutable-chunk buffer of at most ``buf_alloc`` bytes, which credit
  guarantees) and later flushed by another ``WriteHost`` on ``host_writable``.
* host → guest, stream: no buffering at all. When the guest has credit, `next_rx` returns
  ``RxRead(key, max_bytes)``: the device reads at most ``max_bytes`` from the host socket
  straight into the RX chain after the 44-byte header (``readv``), then calls
  `rx_read_done` with the count and writes the returned header in front.
* seqpacket, both ways, is message-at-a-time and copies (one ``bytes`` per message, at most
  ``max_message_bytes`` host→guest, at most ``buf_alloc`` guest→host).

Credit (§5.10.6.3), with all counters u32 and wrapping:

* ours: ``buf_alloc`` (constant per connection) and ``fwd_cnt`` (bytes delivered to the host
  socket). The guest may have at most ``buf_alloc - (recv_cnt - adv_fwd_cnt)`` bytes in flight
  where ``adv_fwd_cnt`` is the last ``fwd_cnt`` we put in a packet header; a guest that sends
  more has that connection reset and nothing else.
* theirs: ``peer_free = peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` clamped at 0 (a guest
  shrinking its buffer, or a fwd_cnt that runs ahead, never makes us send more).
* CREDIT_UPDATE is sent when the guest's view of our free space has fallen below
  ``credit_update_threshold`` (default ``buf_alloc / 4``) and we have freed at least that much
  (or everything) since we last told it — the guest blocks only at zero credit, so one of the
  two must become true while the host drains (Linux and Firecracker use the same idea with
  64 KiB and 4 KiB). Also sent in reply to CREDIT_REQUEST. CREDIT_REQUEST is sent once when
  we have data for the guest and zero credit and the guest stayed silent for
  ``credit_request_delay_s`` (a Linux guest updates unprompted before that: it sends
  CREDIT_UPDATE whenever a read leaves its free space under 64 KiB); re-armed when the
  guest's credit changes.

Close semantics:

* guest SHUTDOWN SEND: after the buffered guest data is written, ``ShutdownHost`` (SHUT_WR).
* guest SHUTDOWN RCV: stop reading the host socket; drop what is queued for the guest;
  ``ShutdownHost`` (SHUT_RD): the host peer's further writes fail with EPIPE.
* guest SHUTDOWN RCV|SEND: after the drain, RST to the guest and ``CloseHost`` (the guest
  driver waits for our RST); a drain that takes longer than ``shutdown_timeout_s`` is cut.
* host EOF (``read() == 0``): SHUTDOWN SEND to the guest (half-close, the guest may still
  send). Host hang-up (the peer closed both ways: the adapter saw EPOLLHUP): SHUTDOWN
  RCV|SEND, ``CloseHost``, guest data from now on is discarded; we wait for the guest's RST
  for at most ``shutdown_timeout_s`` then RST ourselves.
* both directions finished without a full guest SHUTDOWN: after the drain we send SHUTDOWN
  RCV|SEND, close the host and await the RST as above.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence, Union

from .handshake import OkPortConvention, build_ok_reply
from .wire import (MAX_PKT_PAYLOAD_BYTES, U32_MASK, HOST_CID, Op, SeqpacketFlag, ShutdownFlag,
                   Type, VsockHeader)

log = logging.getLogger(__name__)

Buffer = Union[bytes, bytearray, memoryview]

#: Most buffers handed to the adapter in one WriteHost (well under IOV_MAX = 1024).
MAX_WRITE_SEGMENTS = 64


# --- identity, configuration ------------------------------------------------------------


class ConnKey(NamedTuple):
    """A connection's identity: the guest's CID, the host-side port, the guest-side port.

    A NamedTuple (immutable, ordered, hashed and compared in C): it keys every per-packet
    dict lookup of the data path, where a dataclass's generated ``__hash__``/``__eq__``
    cost a Python call each."""

    cid: int
    local_port: int
    peer_port: int

    def __str__(self) -> str:
        return f"{self.cid}:{self.peer_port}<->2:{self.local_port}"


@dataclass(frozen=True, slots=True)
class ConnConfig:
    """Per-connection limits and timeouts (seconds)."""

    buf_alloc_bytes: int = 256 * 1024
    credit_update_threshold_bytes: int | None = None  # None: buf_alloc / 4
    #: at zero credit, how long the guest may stay silent before we send CREDIT_REQUEST
    #: (0: at once). A Linux guest sends CREDIT_UPDATE unprompted once its application has
    #: read enough that its free space falls under 64 KiB, which at zero credit it always
    #: has: the request would only cost a packet each way per credit window. It stays the
    #: safety net for guests that wait to be asked (see `Connection.credit_request_wanted`).
    credit_request_delay_s: float = 0.01
    request_timeout_s: float = 2.0
    shutdown_timeout_s: float = 2.0
    max_message_bytes: int = 64 * 1024  # host→guest seqpacket message limit
    ok_convention: OkPortConvention = OkPortConvention.HOST_PORT

    def __post_init__(self) -> None:
        if not 0 < self.buf_alloc_bytes <= U32_MASK:
            raise ValueError(f"buf_alloc_bytes must be in 1..2^32-1, got {self.buf_alloc_bytes}")
        if self.max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")

    @property
    def credit_update_threshold(self) -> int:
        t = self.credit_update_threshold_bytes
        return max(1, self.buf_alloc_bytes // 4) if t is None else max(1, t)


class ConnState(enum.Enum):
    LOCAL_INIT = "local-init"  # host-initiated: REQUEST to the guest, awaiting RESPONSE
    PEER_INIT = "peer-init"  # guest-initiated: connecting to the host service
    ESTABLISHED = "established"  # possibly half-closed (see shutdown flags)
    CLOSING = "closing"  # draining to the host before RST, or awaiting the guest's RST
    KILLED = "killed"  # RST queued for the guest; host side closed
    CLOSED = "closed"  # finished: the muxer drops it from the table


# --- actions (outputs) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectHost:
    """Connect a new host socket for ``key`` to ``path`` (``SOCK_STREAM`` or ``SOCK_SEQPACKET``
    by ``type_``), non-blocking; report with ``host_connected(key, now, ok)``."""

    key: ConnKey
    path: str
    type_: Type


@dataclass(frozen=True, slots=True)
class WriteHost:
    """Write ``data`` (a gather list) to the host socket now, then report the byte count with
    ``host_write_done(key, n, now)`` (``None`` for EAGAIN) before completing the TX chain the
    buffers may point into. ``message``: seqpacket, send the buffers as one message (one
    ``sendmsg``, all or nothing); ``eor``: the message ends a record (MSG_EOR)."""

    key: ConnKey
    data: tuple[Buffer, ...]
    message: bool = False
    eor: bool = False

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.data)


@dataclass(frozen=True, slots=True)
class ShutdownHost:
    """``shutdown()`` the host socket: ``SHUT_WR`` (the default) when the guest will send
    nothing more; ``SHUT_RD`` (``read=True, write=False``) when it will receive nothing
    more, so the host peer's later writes fail with EPIPE, as a Linux vsock sender's do
    once its peer shut down receiving, instead of filling the socket and blocking."""

    key: ConnKey
    read: bool = False
    write: bool = True


@dataclass(frozen=True, slots=True)
class CloseHost:
    """Close the host socket of ``key`` and forget it (a no-op if it has none)."""

    key: ConnKey


@dataclass(frozen=True, slots=True)
class ReplyHost:
    """Write these bytes (the ``OK <port>\\n`` line) to the host socket, whole, before anything
    else; a failure is reported as ``host_error``."""

    key: ConnKey
    data: bytes


@dataclass(frozen=True, slots=True)
class SetHostInterest:
    """Poll the host socket of ``key`` for readability / writability (level-triggered)."""

    key: ConnKey
    read: bool
    write: bool


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Call ``timer_fired(key, now)`` at ``deadline`` (monotonic seconds); None cancels."""

    key: ConnKey
    deadline: float | None


@dataclass(frozen=True, slots=True)
class RxReady:
    """VM ``cid`` has packets for its RX queue: call ``poll_rx`` when buffers are posted."""

    cid: int


Action = Union[ConnectHost, WriteHost, ShutdownHost, CloseHost, ReplyHost, SetHostInterest,
               SetTimer, RxReady]


@dataclass(frozen=True, slots=True)
class RxPacket:
    """A complete packet for the guest: write ``header`` then ``payload`` into one RX chain.
    ``len(payload) == header.len_`` and is at most the ``max_payload`` asked for."""

    header: VsockHeader
    payload: Buffer = b""


@dataclass(frozen=True, slots=True)
class RxRead:
    """Read from the host socket of ``key`` for the guest.

    ``message=False`` (stream): ``readv`` at most ``max_bytes`` into the RX chain right after
    the 44-byte header, then ``rx_read_done(key, n, now, hangup=...)`` (n = bytes, 0 = EOF,
    None = EAGAIN) returns the header to write in front (or None: give the chain back).
    ``message=True`` (seqpacket): ``recv`` one message into a buffer of ``max_bytes`` (+1 to
    detect truncation), then ``rx_message(key, data, now, truncated=...)`` (or
    ``rx_read_done`` for EAGAIN/EOF); the chain is not used and can be offered again."""

    key: ConnKey
    max_bytes: int
    message: bool = False


RxItem = Union[RxPacket, RxRead]

#: One guest RW packet of the TX fast path: ``(len, flags, buf_alloc, fwd_cnt, payload
#: buffers)``, header fields as plain ints (no enum built per packet).
RwPacket = tuple[int, int, int, int, Sequence[Buffer]]


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """One row of ``query-vsock-connections``."""

    cid: int
    local_port: int
    peer_port: int
    type: str
    state: str
    initiator: str
    bytes_to_host: int
    bytes_to_guest: int
    buffered_bytes: int


# --- the state machine -------------------------------------------------------------------


def credit_update_due(buf_alloc: int, recv_cnt: int, adv_fwd_cnt: int, fwd_cnt: int,
                      threshold: int) -> bool:
    """Is a CREDIT_UPDATE due? The guest's view of our free space (``buf_alloc -
    (recv_cnt - adv_fwd_cnt)``, from the last fwd_cnt we sent) fell under ``threshold``
    and the actual free space is larger by at least ``threshold``, or all of ``buf_alloc``
    (u32 counters). The TX lane's C twin is csrc/vsock_path.c update_due.

    Spec: virtio 1.2 §5.10.6.3 (CREDIT_UPDATE tells the peer about freed space)."""
    view_free = buf_alloc - ((recv_cnt - adv_fwd_cnt) & U32_MASK)
    actual_free = buf_alloc - ((recv_cnt - fwd_cnt) & U32_MASK)
    return view_free < threshold and actual_free > view_free and (
        actual_free - view_free >= threshold or actual_free == buf_alloc)


def _u32(x: int) -> int:
    return x & U32_MASK


class _Pending:
    """Control packets waiting for an RX buffer: bits of ``Connection._pending``, plain
    ints (``enum.IntFlag`` arithmetic costs ~1 µs per operation on the data path)."""

    RST = 1
    RESPONSE = 2
    REQUEST = 4
    SHUTDOWN = 8
    CREDIT_UPDATE = 16


#: ShutdownFlag bits as plain ints (see `_Pending`); ``peer_shut``/``local_shut`` hold ints.
_RCV, _SEND, _BOTH = int(ShutdownFlag.RCV), int(ShutdownFlag.SEND), int(ShutdownFlag.BOTH)
#: For `Connection.credit_update_packet` (once per credit window): no enum conversion.
_pack_header = VsockHeader.FMT.pack
_HOST_CID, _CREDIT_UPDATE = int(HOST_CID), int(Op.CREDIT_UPDATE)


class Connection:
    """One connection's state machine. The muxer owns the instances; see module docstring.

    Every mutating method returns the host actions it caused (``list[Action]``); RX packets
    are produced only by `next_rx`. Interest, timers and RX scheduling are *derived* from the
    properties `wants_read`, `wants_write`, `deadline`, `has_rx` by the muxer's
    ``_reconcile``.
    """

    def __init__(self, key: ConnKey, type_: Type, cfg: ConnConfig, *, local_init: bool,
                 log_: logging.Logger | None = None) -> None:
        self.key = key
        self.type_ = Type(type_)
        self.cfg = cfg
        self.local_init = local_init
        self.log = log_ or log
        self.state = ConnState.LOCAL_INIT if local_init else ConnState.PEER_INIT
        self._credit_request_at: float | None = None  # CREDIT_REQUEST timer (see deadline)
        self._credit_request_due = False  # that timer fired (or no delay): ask now
        self._deadline: float | None = None  # handshake / shutdown timeout
        # our receive side (guest -> host)
        self.buf_alloc = cfg.buf_alloc_bytes
        #: ``cfg.credit_update_threshold``, once (``cfg`` is frozen and never replaced; the
        #: property's arithmetic ran twice per credit window)
        self.update_threshold = cfg.credit_update_threshold
        self.recv_cnt = 0  # u32: RW payload bytes received from the guest
        self.fwd_cnt = 0  # u32: of those, delivered to the host socket (or discarded)
        self.adv_fwd_cnt = 0  # fwd_cnt in the last header we emitted
        self._g2h_chunks: deque[bytes] = deque()  # stream bytes not yet written
        self._g2h_off = 0  # offset into _g2h_chunks[0]
        self._g2h_msgs: deque[tuple[bytes, bool]] = deque()  # seqpacket (message, eor)
        self._g2h_partial = bytearray()  # seqpacket message being assembled
        self._inflight: WriteHost | None = None
        self._inflight_direct = False  # inflight data points into guest memory
        # the guest's receive side (host -> guest)
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0  # u32: RW payload bytes sent to the guest
        self._h2g: deque[tuple[bytes, bool, bool]] = deque()  # (data, eom, eor) queued
        self._h2g_off = 0
        self.host_readable = False  # the host socket has data (cleared by EAGAIN)
        # shutdown / life cycle
        self.peer_shut = 0  # flags the guest sent
        self.local_shut = 0  # flags we sent / queued
        self._shut_queued = 0
        self.host_eof = False
        self.host_hup = False
        self.host_open = local_init  # an accepted socket exists already for local_init
        self._host_wr_shut = False
        self._pending = 0
        self._credit_requested = False
        self.leftover_for_guest = 0
        # statistics
        self.bytes_to_host = 0
        self.bytes_to_guest = 0

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def from_guest_request(cls, key: ConnKey, hdr: VsockHeader, path: str, cfg: ConnConfig,
                           now: float, log_: logging.Logger | None = None
                           ) -> tuple["Connection", list[Action]]:
        """A guest REQUEST to host port ``key.local_port``: connect the host service."""
        conn = cls(key, Type(hdr.type_), cfg, local_init=False, log_=log_)
        conn._update_peer_credit(hdr)
        conn.deadline = now + cfg.request_timeout_s
        return conn, [ConnectHost(key, path, conn.type_)]

    @classmethod
    def from_host_connect(cls, key: ConnKey, type_: Type, cfg: ConnConfig, now: float,
                          leftover: bytes = b"", log_: logging.Logger | None = None
                          ) -> "Connection":
        """A host client completed ``CONNECT <port>``: send REQUEST, await RESPONSE.
        ``leftover`` (bytes after the line) goes to the guest first once established."""
        conn = cls(key, type_, cfg, local_init=True, log_=log_)
        conn._pending |= _Pending.REQUEST
        conn.deadline = now + cfg.request_timeout_s
        if leftover:
            conn._h2g.append((bytes(leftover), False, False))
            conn.leftover_for_guest = len(leftover)
        return conn

    # -- derived state (read by the muxer's _reconcile) -----------------------------------

    @property
    def deadline(self) -> float | None:
        """When `timer_fired` has something to do: the handshake or shutdown timeout (set
        through this property) or the CREDIT_REQUEST delay, whichever comes first."""
        d, c = self._deadline, self._credit_request_at
        if c is None:
            return d
        return c if d is None or c < d else d

    @deadline.setter
    def deadline(self, value: float | None) -> None:
        self._deadline = value

    def credit_request_wanted(self) -> bool:
        """We have stream data for the guest and it gave us zero credit, not yet asked.

        Spec: virtio 1.2 §5.10.6.3 (CREDIT_REQUEST asks the peer for its credit)."""
        return (bool(self._h2g or (self.host_readable and not self.host_eof))
                and not self._credit_requested and self._h2g_open()
                and self.peer_free == 0)  # the cheapest test first: run every reconcile

    def arm_credit_request(self, now: float | None) -> None:
        """Keep the CREDIT_REQUEST timer in line with `credit_request_wanted` (the muxer
        calls this after every mutation): armed for ``credit_request_delay_s`` when a
        request becomes wanted, dropped when it no longer is (the guest's own
        CREDIT_UPDATE came first). ``now`` None (a caller without the time): due at once,
        the pre-delay behaviour, so no path can stall."""
        if not self.credit_request_wanted():
            self._credit_request_at = None
            self._credit_request_due = False
            return
        if self._credit_request_due or self._credit_request_at is not None:
            return
        delay = self.cfg.credit_request_delay_s
        if now is None or delay <= 0:
            self._credit_request_due = True
        else:
            self._credit_request_at = now + delay

    @property
    def buffered_g2h(self) -> int:
        return _u32(self.recv_cnt - self.fwd_cnt)

    @property
    def peer_free(self) -> int:
        """Bytes the guest can take now: ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` ≥ 0."""
        free = self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32_MASK)
        return free if free > 0 else 0  # inline: read several times per credit window

    def _h2g_open(self) -> bool:
        return (self.state is ConnState.ESTABLISHED and not self.peer_shut & _RCV
                and not (self._pending & (_Pending.RESPONSE | _Pending.REQUEST)))

    def _g2h_done(self) -> bool:
        return bool(self.peer_shut & _SEND) or self.host_hup

    def _h2g_done(self) -> bool:
        return bool(self.peer_shut & _RCV) or self.host_eof

    @property
    def wants_read(self) -> bool:
        """Poll the host socket for input: the guest can take data and we don't know yet."""
        return (self.host_open and self._h2g_open() and not self.host_eof
                and not self.host_readable and not self._h2g and self.peer_free > 0)

    @property
    def wants_write(self) -> bool:
        return self.host_open and self._inflight is None and self._g2h_has_data()

    @property
    def has_rx(self) -> bool:
        return self._peek_rx() is not None

    @property
    def alive(self) -> bool:
        return self.state is not ConnState.CLOSED

    def _g2h_has_data(self) -> bool:
        return bool(self._g2h_chunks or self._g2h_msgs)

    def info(self) -> ConnInfo:
        state = self.state.value
        if self.state is ConnState.ESTABLISHED and (self.peer_shut or self.local_shut):
            parts = []
            if self.peer_shut:
                parts.append(f"guest-shut-{_shut_name(self.peer_shut)}")
            if self.local_shut:
                parts.append(f"host-shut-{_shut_name(self.local_shut)}")
            state = "half-closed(" + ",".join(parts) + ")"
        return ConnInfo(cid=self.key.cid, local_port=self.key.local_port,
                        peer_port=self.key.peer_port, type=self.type_.name.lower(),
                        state=state, initiator="host" if self.local_init else "guest",
                        bytes_to_host=self.bytes_to_host, bytes_to_guest=self.bytes_to_guest,
                        buffered_bytes=self.buffered_g2h)

    # -- host events ----------------------------------------------------------------------

    def host_connected(self, now: float, ok: bool) -> list[Action]:
        """Result of ``ConnectHost``: RESPONSE to the guest, or RST."""
        if self.state is not ConnState.PEER_INIT:
            return [CloseHost(self.key)] if ok else []
        if not ok:
            self.log.info("%s: host service refused the guest's connection", self.key)
            return self.kill(now)
        self.host_open = True
        self.state = ConnState.ESTABLISHED
        self.deadline = None
        self._pending |= _Pending.RESPONSE
        return []

    def host_readable_event(self, now: float) -> list[Action]:
        if self.host_open and not self.host_eof:
            self.host_readable = True
        return []

    def host_writable(self, now: float) -> list[Action]:
        """The host socket can take more: hand out the buffered guest data."""
        if self._inflight is not None or not self.host_open:
            return []
        if self._g2h_msgs:
            msg, eor = self._g2h_msgs[0]
            act = WriteHost(self.key, (msg,), message=True, eor=eor)
        elif self._g2h_chunks:
            views: list[Buffer] = []
            for i, chunk in enumerate(self._g2h_chunks):
                if i >= MAX_WRITE_SEGMENTS:
                    break
                views.append(memoryview(chunk)[self._g2h_off:] if i == 0 else chunk)
            act = WriteHost(self.key, tuple(views))
        else:
            return []
        self._inflight = act
        self._inflight_direct = False
        return [act]

    def host_write_done(self, nbytes: int | None, now: float) -> list[Action]:
        """How much of the last ``WriteHost`` the host socket took (None: EAGAIN)."""
        act = self._inflight
        if act is None:
            return []
        self._inflight = None
        direct = self._inflight_direct
        self._inflight_direct = False
        n = nbytes or 0
        total = act.nbytes
        if n < 0 or n > total:
            raise ValueError(f"host_write_done: {n} bytes of a {total}-byte write")
        if act.message:
            sent = nbytes is not None  # None: EAGAIN; a message (maybe empty) goes whole
            if sent and n != total:  # a seqpacket send is atomic
                raise ValueError("partial seqpacket send")
            if sent:
                if not direct:
                    self._g2h_msgs.popleft()
                self._forwarded(total)
            elif direct:
                self._g2h_msgs.appendleft((_join(act.data), act.eor))
        else:
            if direct:
                if n < total:
                    self._g2h_chunks.append(_tail(act.data, n))
            else:
                self._consume_chunks(n)
            self._forwarded(n)
        return self._after_drain(now)

    def host_error(self, now: float, errno_: int | None = None) -> list[Action]:
        """The host socket failed (not EAGAIN): this connection only is reset."""
        self.log.info("%s: host socket error %s: reset", self.key, errno_)
        return self.kill(now)

    # -- host -> guest reads ----------------------------------------------------------------

    def rx_read_done(self, nbytes: int | None, now: float, *, hangup: bool = False
                     ) -> tuple[VsockHeader | None, list[Action]]:
        """Result of an ``RxRead``: the header to put in front of the data, or None."""
        if nbytes is None:
            self.host_readable = False
            return None, []
        if nbytes > 0:
            if self.type_ is Type.SEQPACKET:
                raise ValueError("seqpacket reads complete with rx_message")
            self.tx_cnt = _u32(self.tx_cnt + nbytes)
            self.bytes_to_guest += nbytes
            return self._header(Op.RW, len_=nbytes), []
        # EOF
        self.host_readable = False
        self.host_eof = True
        actions: list[Action] = []
        if hangup:
            actions += self._host_hung_up(now)
        else:
            self._queue_shutdown(_SEND)
        actions += self._maybe_finish(now)
        # The device already spent a chain on this read: fill it with the next control
        # packet (normally the SHUTDOWN just queued), if any.
        item = self.next_rx(0)
        return (item.header if isinstance(item, RxPacket) else None), actions

    def rx_burst(self) -> tuple[bytes, int] | None:
        """For the device's RX fast path: when the next packet for the guest is a stream
        read from the host socket, ``(header template, max payload bytes)`` for reading
        several packets at once (``Virtqueue.rx_from_fd`` with the template as prefix and
        ``len`` patched per chain); None otherwise. Changes nothing: report the outcome
        with `rx_burst_done`.

        Spec: virtio 1.2 §5.10.6.3 (every header carries our credit; RW within the
        guest's credit)."""
        if self.type_ is not Type.STREAM or self._peek_rx() != "read":
            return None
        credit = self.peer_free
        k = self.key
        template = VsockHeader.FMT.pack(int(HOST_CID), k.cid, k.local_port, k.peer_port, 0,
                                        int(Type.STREAM), int(Op.RW), 0, self.buf_alloc,
                                        self.fwd_cnt)
        return template, credit

    def rx_burst_done(self, nbytes: int, drained: bool) -> list[Action]:
        """``nbytes`` payload bytes went to the guest in packets built from the
        `rx_burst` template; ``drained``: the host socket had no more data (EAGAIN). EOF
        and errors are left for the next ordinary read (`rx_read_done`) to find."""
        if nbytes:
            self.tx_cnt = _u32(self.tx_cnt + nbytes)
            self.bytes_to_guest += nbytes
            self.adv_fwd_cnt = self.fwd_cnt  # the template carried fwd_cnt
            self._pending &= ~_Pending.CREDIT_UPDATE
        if drained:
            self.host_readable = False
        return []

    @property
    def rx_lane_credit(self) -> int:
        """For the device's RX pump (virtio/vsock/rx_pump.py) on a host-readable event:
        the guest's credit when the event can go straight to the guest (a stream
        connection, established and open towards the guest, nothing else owed to it:
        no pending control packet, no queued data, not already known readable, no EOF),
        else 0. In that state `wants_read` is True and `has_rx` False, which is what
        `VsockMuxer.rx_lane_done` relies on.

        Spec: virtio 1.2 §5.10.6.3 (RW within the guest's credit)."""
        if not self.rx_lane_state():
            return 0
        free = self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32_MASK)
        return free if free > 0 else 0  # peer_free, inline (once per host-readable event)

    def rx_lane_state(self) -> bool:
        """A stream connection, established and open towards the guest, nothing else owed
        to it (no pending control packet, no queued data), its host socket not known
        readable and not at EOF: then `has_rx` is False, `wants_read` is ``peer_free >
        0`` and no CREDIT_REQUEST is wanted (`rx_lane_credit`, `VsockMuxer.
        credit_only_quiet`). (`_h2g_open` inline: with ``_pending`` 0 it is ESTABLISHED
        and not ``peer_shut & RCV``.)"""
        return not (self._pending or self._h2g or self.host_readable or self.host_eof
                    or not self.host_open or self.type_ is not Type.STREAM
                    or self.state is not ConnState.ESTABLISHED or self.peer_shut & _RCV)

    def rx_lane_done(self, nbytes: int, clean_drain: bool) -> bool:
        """``nbytes`` payload bytes went to the guest through the RX pump, in packets
        carrying our current buf_alloc/fwd_cnt; ``clean_drain``: the host socket had no
        more data (EAGAIN) and no EOF, error or broken ring was seen. True when nothing the
        muxer derives changed (the socket drained, credit left): no reconcile needed.
        Otherwise the socket is marked readable (unless it drained), so the general path
        (`rx_burst`, `rx_read_done`) reads on and finds EOF or the error itself."""
        if nbytes:
            self.tx_cnt = tx_cnt = (self.tx_cnt + nbytes) & U32_MASK
            self.bytes_to_guest += nbytes
            self.adv_fwd_cnt = self.fwd_cnt  # every header carried fwd_cnt
        else:
            tx_cnt = self.tx_cnt
        if clean_drain:  # peer_free > 0, inline (once per host-readable event)
            return self.peer_buf_alloc > ((tx_cnt - self.peer_fwd_cnt) & U32_MASK)
        self.host_readable = True
        return False

    def stream_loop_done(self, nbytes: int, tx_cnt: int, peer_buf_alloc: int,
                         peer_fwd_cnt: int, credit_changed: bool) -> None:
        """What the C stream loop (virtio/vsock/stream_loop.py) did while it served this
        connection in the `rx_lane_state`: ``nbytes`` payload bytes to the guest in packets
        carrying our buf_alloc/fwd_cnt (``tx_cnt``: the counter after them), and the guest's
        credit fields last seen on its packets without payload (``credit_changed``: one of
        them changed the pair), as `rx_lane_done` after clean drains and `VsockMuxer.
        credit_only_quiet` would have applied them, event by event.

        Spec: virtio 1.2 §5.10.6.3 (credit)."""
        if nbytes:
            self.bytes_to_guest += nbytes
            self.adv_fwd_cnt = self.fwd_cnt  # every header carried fwd_cnt
        self.tx_cnt = tx_cnt & U32_MASK
        if credit_changed:
            self._credit_requested = False
        self.peer_buf_alloc, self.peer_fwd_cnt = peer_buf_alloc, peer_fwd_cnt

    def credit_reopens_read(self) -> bool:
        """The state in which a guest CREDIT_UPDATE may send the RX pump straight back to
        the host socket (`VsockMuxer.credit_reopens_rx`): a stream connection, established
        and open towards the guest, its host socket known readable (the pump stopped at
        zero credit, or left bytes unread), no EOF, nothing else owed to the guest (no
        pending control packet, no queued data).

        Spec: virtio 1.2 §5.10.6.3 (a CREDIT_UPDATE re-opens the window)."""
        return (self.host_readable and not self._pending and not self._h2g
                and not self.host_eof and self.host_open and self.type_ is Type.STREAM
                and self._h2g_open())

    def rx_reopen_done(self, nbytes: int, clean_drain: bool) -> None:
        """``nbytes`` payload bytes went to the guest through the RX pump after a
        `credit_reopens_read` CREDIT_UPDATE, in packets carrying our buf_alloc/fwd_cnt;
        ``clean_drain``: the host socket had no more data (EAGAIN), no EOF, error or
        broken ring. The socket stays marked readable unless it drained, so the general
        path (`rx_burst`, `rx_read_done`) reads on and finds EOF or the error itself."""
        if nbytes:
            self.tx_cnt = _u32(self.tx_cnt + nbytes)
            self.bytes_to_guest += nbytes
            self.adv_fwd_cnt = self.fwd_cnt  # every header carried fwd_cnt
        self.host_readable = not clean_drain

    def rx_message(self, data: bytes, now: float, *, truncated: bool = False,
                   eor: bool = False) -> list[Action]:
        """A whole seqpacket message read from the host socket."""
        if truncated or len(data) > self.cfg.max_message_bytes:
            self.log.warning("%s: host message over %d bytes: reset", self.key,
                             self.cfg.max_message_bytes)
            return self.kill(now)
        if self.peer_shut & _RCV:
            return []
        self._h2g.append((bytes(data), True, eor))
        return []

    # -- guest packets ----------------------------------------------------------------------

    def on_packet(self, hdr: VsockHeader, payload: Sequence[Buffer], now: float
                  ) -> list[Action]:
        """A packet from the guest for this connection (cids, type and len already checked).

        ``payload``: the ``hdr.len_`` payload bytes as buffers (valid until the TX chain is
        completed; see WriteHost)."""
        self._update_peer_credit(hdr)
        op = hdr.op
        st = self.state
        if op == Op.RST:
            return self._peer_reset(now)
        if st is ConnState.KILLED or st is ConnState.CLOSED:
            return []
        if op == Op.CREDIT_REQUEST:
            if st is not ConnState.LOCAL_INIT:
                self._pending |= _Pending.CREDIT_UPDATE
            return []
        if op == Op.CREDIT_UPDATE:
            return []
        if st is ConnState.LOCAL_INIT:
            if op == Op.RESPONSE:
                return self._established_by_guest(now)
            self.log.info("%s: %s before RESPONSE: reset", self.key, Op(op).name)
            return self.kill(now)
        if st is ConnState.PEER_INIT:
            self.log.info("%s: %s while connecting: reset", self.key, Op(op).name)
            return self.kill(now)
        if op == Op.RW:
            return self._guest_data(hdr, payload, now)
        if op == Op.SHUTDOWN:
            return self._guest_shutdown(hdr.flags & _BOTH, now)
        # REQUEST / RESPONSE on a live connection: ignore (as Firecracker does).
        self.log.debug("%s: ignoring %s in state %s", self.key, Op(op).name, st.value)
        return []

    def on_rw_batch(self, packets: Sequence[RwPacket], now: float) -> list[Action]:
        """Consecutive stream RW packets from the guest for this connection (the TX fast
        path: cids, type, op and len already checked by the caller).

        Same outcome as `on_packet` for each in turn, with one ``WriteHost`` for all their
        payloads (one ``writev``). Anything off the common case (not established, shut
        down, host gone, a credit violation) goes packet by packet through `on_packet`.

        Spec: virtio 1.2 §5.10.6.3 (credit), §5.10.6.4 (stream data)."""
        if (self.state is not ConnState.ESTABLISHED or self.type_ is not Type.STREAM
                or not self.host_open or self.host_hup or self.peer_shut & _SEND):
            return self._rw_one_by_one(packets, now)
        buf_alloc = self.buf_alloc
        base = self.recv_cnt - self.adv_fwd_cnt
        total = 0
        for n, _flags, _ba, _fc, _views in packets:
            total += n
            # Spec: virtio 1.2 §5.10.6.3.1 (see _guest_data): credit is cumulative.
            if n > buf_alloc or _u32(base + total) > buf_alloc:
                return self._rw_one_by_one(packets, now)
        for _n, _flags, ba, fc, _views in packets:
            if ba != self.peer_buf_alloc or fc != self.peer_fwd_cnt:
                self._credit_requested = False
                self.peer_buf_alloc, self.peer_fwd_cnt = ba, fc
        self.recv_cnt = _u32(self.recv_cnt + total)
        if total == 0:
            return []
        views = [v for p in packets for v in p[4]]
        if self._inflight is None and not self._g2h_has_data():
            act = WriteHost(self.key, tuple(views))
            self._inflight, self._inflight_direct = act, True
            return [act]
        self._g2h_chunks.append(_join(views))
        return []

    @property
    def direct_tx_ok(self) -> bool:
        """Whether guest RW packets may take the device's direct lane (`rw_direct`, then
        `rw_written`): an established stream with an open host socket, no write in flight
        and nothing buffered, so writing them now keeps the byte order. Exactly the case
        in which `on_rw_batch` hands out one direct ``WriteHost``."""
        return (self.state is ConnState.ESTABLISHED and self.type_ is Type.STREAM
                and self.host_open and not self.host_hup and not self.peer_shut & _SEND
                and self._inflight is None and not self._g2h_chunks and not self._g2h_msgs)

    def rw_direct(self, packets: Sequence[RwPacket]) -> int | None:
        """Take ``packets`` (the caller checked what `on_rw_batch` relies on, and
        `direct_tx_ok`) for the caller to write to the host socket itself: returns their
        payload byte total, or None, changing nothing, when one of them exceeds the credit
        (then `on_rw_batch` must handle them: it resets the connection at that packet).
        Report the write with `rw_written`.

        Spec: virtio 1.2 §5.10.6.3.1 (credit is cumulative, as in `_guest_data`)."""
        buf_alloc = self.buf_alloc
        base = self.recv_cnt - self.adv_fwd_cnt
        total = 0
        for p in packets:
            n = p[0]
            total += n
            if n > buf_alloc or _u32(base + total) > buf_alloc:
                return None
        ba, fc = self.peer_buf_alloc, self.peer_fwd_cnt
        for p in packets:
            if p[2] != ba or p[3] != fc:
                self._credit_requested = False
                ba, fc = p[2], p[3]
        self.peer_buf_alloc, self.peer_fwd_cnt = ba, fc
        self.recv_cnt = _u32(self.recv_cnt + total)
        return total

    def rw_written(self, data: Sequence[Buffer], total: int, written: int) -> None:
        """The caller wrote ``written`` of the ``total`` bytes of ``data`` (the payloads
        taken by `rw_direct`, in order) to the host socket; the unwritten tail is copied
        (credit bounds it) and waits for the socket's writability (``wants_write``)."""
        if written < total:
            self._g2h_chunks.append(_tail(data, written))
        self._forwarded(written)
        self._credit_check()

    def rw_lane(self, total: int, written: int, tail: bytes, peer_buf_alloc: int,
                peer_fwd_cnt: int, credit_changed: bool) -> None:
        """The device's TX lane (virtio/vsock/lane.py) took packets of ``total`` payload
        bytes within the credit it was given (``lane_credit``) and wrote ``written`` of
        them to the host socket; ``tail`` is a copy of the rest. The same state as
        `rw_direct` + `rw_written` for those packets (the caller checked `direct_tx_ok`).

        Spec: virtio 1.2 §5.10.6.3 (every packet carries the sender's credit fields)."""
        if credit_changed:
            self._credit_requested = False
        self.peer_buf_alloc, self.peer_fwd_cnt = peer_buf_alloc, peer_fwd_cnt
        self.recv_cnt = (self.recv_cnt + total) & U32_MASK
        if tail:
            self._g2h_chunks.append(tail)
        self.fwd_cnt = (self.fwd_cnt + written) & U32_MASK  # _forwarded, inline
        self.bytes_to_host += written
        self._credit_check()

    def rw_lane_update_sent(self, total: int, written: int) -> bool:
        """A quiet TX lane run (no tail, no send error, every packet carrying the credit
        fields this connection holds) whose CREDIT_UPDATE the lane put into the guest's RX
        queue: the state of `rw_lane` then `credit_update_sent`, in one step (a streaming
        guest's every credit window). True when ``_pending`` changed (an update was owed
        before the run).

        Spec: virtio 1.2 §5.10.6.3 (CREDIT_UPDATE carries our fwd_cnt)."""
        self.recv_cnt = (self.recv_cnt + total) & U32_MASK
        self.fwd_cnt = fwd_cnt = (self.fwd_cnt + written) & U32_MASK  # _forwarded, inline
        self.bytes_to_host += written
        self.adv_fwd_cnt = fwd_cnt
        pending = self._pending
        self._pending = pending & ~_Pending.CREDIT_UPDATE
        return self._pending != pending

    def credit_update_packet(self) -> bytes:
        """The CREDIT_UPDATE header `next_rx` would produce now, packed, changing nothing;
        `credit_update_sent` once it is in an RX buffer (Spec: virtio 1.2 §5.10.6.3)."""
        k = self.key
        return _pack_header(_HOST_CID, k.cid, k.local_port, k.peer_port, 0, self.type_,
                            _CREDIT_UPDATE, 0, self.buf_alloc, self.fwd_cnt)

    def credit_update_sent(self) -> None:
        """The `credit_update_packet` went to the guest (as `_header` records it)."""
        self.adv_fwd_cnt = self.fwd_cnt
        self._pending &= ~_Pending.CREDIT_UPDATE

    @property
    def lane_credit(self) -> int:
        """Payload bytes the guest may still send (Spec: virtio 1.2 §5.10.6.3.1, as
        `rw_direct` checks them: ``buf_alloc - (recv_cnt - adv_fwd_cnt)``), at least 0."""
        credit = self.buf_alloc - ((self.recv_cnt - self.adv_fwd_cnt) & U32_MASK)
        return credit if credit > 0 else 0  # inline: once per TX lane run

    def _rw_one_by_one(self, packets: Sequence[RwPacket], now: float) -> list[Action]:
        actions: list[Action] = []
        k = self.key
        for n, flags, ba, fc, views in packets:
            hdr = VsockHeader(k.cid, int(HOST_CID), k.peer_port, k.local_port, n,
                              int(Type.STREAM), int(Op.RW), flags, ba, fc)
            actions += self.on_packet(hdr, views, now)
        return actions

    def _update_peer_credit(self, hdr: VsockHeader) -> None:
        self.peer_credit(hdr.buf_alloc, hdr.fwd_cnt)

    def peer_credit(self, buf_alloc: int, fwd_cnt: int) -> None:
        """The credit fields of a guest packet (a CREDIT_UPDATE carries nothing else: this
        is all `on_packet` does with one, in any state)."""
        # Re-arm CREDIT_REQUEST only when the guest's credit changed: a guest answering our
        # CREDIT_REQUEST with an unchanged CREDIT_UPDATE (Linux does, while its application
        # does not read) must not start a request/update ping-pong.
        if buf_alloc != self.peer_buf_alloc or fwd_cnt != self.peer_fwd_cnt:
            self._credit_requested = False
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt

    def _established_by_guest(self, now: float) -> list[Action]:
        self.state = ConnState.ESTABLISHED
        self.deadline = None
        reply = build_ok_reply(host_port=self.key.local_port, guest_port=self.key.peer_port,
                               convention=self.cfg.ok_convention)
        return [ReplyHost(self.key, reply)]

    def _guest_data(self, hdr: VsockHeader, payload: Sequence[Buffer], now: float
                    ) -> list[Action]:
        n = hdr.len_
        # Spec: virtio 1.2 §5.10.6.3.1: "VIRTIO_VSOCK_OP_RW data packets MUST only be
        # transmitted when the peer has sufficient free buffer space for the payload."
        in_flight = _u32(self.recv_cnt + n - self.adv_fwd_cnt)
        if n > self.buf_alloc or in_flight > self.buf_alloc:
            self.log.warning("%s: guest exceeded its credit (%d bytes in flight, buf_alloc "
                             "%d): reset", self.key, in_flight, self.buf_alloc)
            return self.kill(now)
        if self.peer_shut & _SEND:
            self.log.info("%s: guest data after its SHUTDOWN SEND: reset", self.key)
            return self.kill(now)
        self.recv_cnt = _u32(self.recv_cnt + n)
        if self.state is not ConnState.ESTABLISHED or self.host_hup or not self.host_open:
            self._discarded(n)
            return self._credit_check()
        eom = bool(hdr.flags & SeqpacketFlag.EOM)
        eor = bool(hdr.flags & SeqpacketFlag.EOR)
        if self.type_ is Type.SEQPACKET:
            return self._guest_message_part(payload, n, eom, eor, now)
        if n == 0:
            return []
        if self._inflight is None and not self._g2h_has_data():
            act = WriteHost(self.key, tuple(payload))
            self._inflight, self._inflight_direct = act, True
            return [act]
        self._g2h_chunks.append(_join(payload))
        return []

    def _guest_message_part(self, payload: Sequence[Buffer], n: int, eom: bool, eor: bool,
                            now: float) -> list[Action]:
        if not eom:
            for b in payload:
                self._g2h_partial += b
            return []
        if not self._g2h_partial and self._inflight is None and not self._g2h_msgs:
            act = WriteHost(self.key, tuple(payload), message=True, eor=eor)
            self._inflight, self._inflight_direct = act, True
            return [act]
        for b in payload:
            self._g2h_partial += b
        self._g2h_msgs.append((bytes(self._g2h_partial), eor))
        self._g2h_partial = bytearray()
        if self._inflight is None and len(self._g2h_msgs) == 1:
            return self.host_writable(now)  # nothing queued before it: try to send now
        return []

    def _guest_shutdown(self, flags: int, now: float) -> list[Action]:
        new = flags & ~self.peer_shut
        self.peer_shut |= flags
        actions: list[Action] = []
        if new & _RCV:
            self._h2g.clear()
            self._h2g_off = 0
            self.host_readable = False
            if self.host_open and self.state is ConnState.ESTABLISHED:
                actions.append(ShutdownHost(self.key, read=True, write=False))
        actions += self._after_drain(now)
        return actions

    def _peer_reset(self, now: float) -> list[Action]:
        """The guest reset the connection: close the host side, no reply."""
        actions: list[Action] = []
        if self.host_open:
            actions.append(CloseHost(self.key))
            self.host_open = False
        self._drop_buffers()
        self.state = ConnState.CLOSED
        self.deadline = None
        self._pending = 0
        return actions

    # -- drain / finish -------------------------------------------------------------------

    def _forwarded(self, n: int) -> None:
        self.fwd_cnt = _u32(self.fwd_cnt + n)
        self.bytes_to_host += n

    def _discarded(self, n: int) -> None:
        """Guest bytes we drop (host gone): count them forwarded so credit stays right."""
        self.fwd_cnt = _u32(self.fwd_cnt + n)

    def _consume_chunks(self, n: int) -> None:
        while n and self._g2h_chunks:
            avail = len(self._g2h_chunks[0]) - self._g2h_off
            if n >= avail:
                n -= avail
                self._g2h_chunks.popleft()
                self._g2h_off = 0
            else:
                self._g2h_off += n
                n = 0

    def _after_drain(self, now: float) -> list[Action]:
        actions = self._credit_check()
        drained = not self._g2h_has_data() and self._inflight is None
        if (drained and self.peer_shut & _SEND and self.host_open
                and not self._host_wr_shut and self.state is ConnState.ESTABLISHED):
            self._host_wr_shut = True
            actions.append(ShutdownHost(self.key))
        actions += self._maybe_finish(now)
        return actions

    def _credit_check(self) -> list[Action]:
        if credit_update_due(self.buf_alloc, self.recv_cnt, self.adv_fwd_cnt, self.fwd_cnt,
                             self.update_threshold):
            self._pending |= _Pending.CREDIT_UPDATE
        return []

    @property
    def credit_update_owed(self) -> bool:
        """A CREDIT_UPDATE waits to go to the guest."""
        return bool(self._pending & _Pending.CREDIT_UPDATE)

    def only_update_owed(self) -> bool:
        """`_peek_rx` is None or "credit_update", and stays so whatever the guest->host
        counters do while the peer credit is unchanged: no control packet pending but
        that update, no data queued for the guest, no host bytes known waiting
        (`VsockMuxer.lone_update_possible`)."""
        return not (self._pending & ~_Pending.CREDIT_UPDATE or self._h2g
                    or self.host_readable)

    def _maybe_finish(self, now: float) -> list[Action]:
        """Both directions done → RST (guest shut both ways) or SHUTDOWN both and wait."""
        if self.state not in (ConnState.ESTABLISHED, ConnState.CLOSING):
            return []
        if not (self._g2h_done() and self._h2g_done()):
            return []
        drained = self.host_hup or (not self._g2h_has_data() and self._inflight is None)
        if not drained:
            if self.state is not ConnState.CLOSING:
                self.state = ConnState.CLOSING
                self.deadline = now + self.cfg.shutdown_timeout_s
            return []
        if self.peer_shut == _BOTH:
            # The guest closed: it waits for our RST.
            return self.kill(now)
        if self.state is ConnState.CLOSING and self.local_shut == _BOTH:
            return []  # already awaiting the guest's RST
        actions: list[Action] = []
        if self.host_open:
            actions.append(CloseHost(self.key))
            self.host_open = False
        self._queue_shutdown(_BOTH)
        self.state = ConnState.CLOSING
        self.deadline = now + self.cfg.shutdown_timeout_s
        return actions

    def _host_hung_up(self, now: float) -> list[Action]:
        self.host_hup = True
        actions: list[Action] = []
        if self.host_open:
            actions.append(CloseHost(self.key))
            self.host_open = False
        self._discarded(self.buffered_g2h)
        self._drop_g2h()
        self._queue_shutdown(_BOTH)
        if self.state is ConnState.ESTABLISHED:
            self.state = ConnState.CLOSING
            self.deadline = now + self.cfg.shutdown_timeout_s
        return actions

    def _queue_shutdown(self, flags: int) -> None:
        new = flags & ~self.local_shut
        if new:
            self.local_shut |= new
            self._shut_queued |= self.local_shut
            self._pending |= _Pending.SHUTDOWN

    def _take_pending_shutdown(self) -> VsockHeader | None:
        if not self._pending & _Pending.SHUTDOWN or self._h2g:
            return None
        self._pending &= ~_Pending.SHUTDOWN
        return self._header(Op.SHUTDOWN, flags=int(self._shut_queued))

    def _drop_g2h(self) -> None:
        self._g2h_chunks.clear()
        self._g2h_off = 0
        self._g2h_msgs.clear()
        self._g2h_partial = bytearray()

    def _drop_buffers(self) -> None:
        self._drop_g2h()
        self._h2g.clear()
        self._h2g_off = 0
        self.host_readable = False

    def kill(self, now: float) -> list[Action]:
        """Reset: RST to the guest, close the host side, drop all buffered data."""
        actions: list[Action] = []
        if self.state is ConnState.CLOSED:
            return actions
        if self.host_open:
            actions.append(CloseHost(self.key))
            self.host_open = False
        self._drop_buffers()
        self._inflight = None
        self.state = ConnState.KILLED
        self.deadline = None
        self._pending = _Pending.RST
        return actions

    def timer_fired(self, now: float) -> list[Action]:
        at = self._credit_request_at
        if at is not None and now >= at:
            self._credit_request_at = None
            self._credit_request_due = True  # the guest stayed silent: ask (_peek_rx)
        if self._deadline is None or now < self._deadline:
            return []
        if self.state is ConnState.LOCAL_INIT:
            self.log.info("%s: guest did not answer the connection request in time", self.key)
        elif self.state is ConnState.PEER_INIT:
            self.log.info("%s: host service did not accept in time", self.key)
        else:
            self.log.info("%s: shutdown timed out: reset", self.key)
        return self.kill(now)

    # -- packets for the guest ---------------------------------------------------------------

    def _header(self, op: Op, *, len_: int = 0, flags: int = 0) -> VsockHeader:
        """A header from us; every header carries our credit (§5.10.6.3)."""
        self.adv_fwd_cnt = self.fwd_cnt
        self._pending &= ~_Pending.CREDIT_UPDATE
        return VsockHeader(src_cid=int(HOST_CID), dst_cid=self.key.cid, src_port=self.key.local_port,
                           dst_port=self.key.peer_port, len_=len_, type_=int(self.type_),
                           op=int(op), flags=flags, buf_alloc=self.buf_alloc,
                           fwd_cnt=self.fwd_cnt)

    def _peek_rx(self, max_payload: int = MAX_PKT_PAYLOAD_BYTES) -> str | None:
        """What `next_rx` would produce next (without doing it)."""
        p = self._pending
        if p & _Pending.RST:
            return "rst"
        if p & _Pending.RESPONSE:
            return "response"
        if p & _Pending.REQUEST:
            return "request"
        if self._h2g_open():
            credit = self.peer_free
            if self._h2g or (self.host_readable and not self.host_eof):
                if credit > 0 and max_payload > 0:
                    return "data" if self._h2g else "read"
                if credit == 0 and not self._credit_requested and self._credit_request_due:
                    return "credit_request"
        if p & _Pending.SHUTDOWN and not self._h2g:
            return "shutdown"
        if p & _Pending.CREDIT_UPDATE:
            return "credit_update"
        return None

    def next_rx(self, max_payload: int) -> RxItem | None:
        """The next packet for the guest, given an RX buffer with room for ``max_payload``
        payload bytes after the header; None if there is nothing to send."""
        max_payload = min(max_payload, MAX_PKT_PAYLOAD_BYTES)
        kind = self._peek_rx(max_payload)
        if kind is None:
            return None
        if kind == "rst":
            self._pending = 0
            self.state = ConnState.CLOSED
            return RxPacket(self._header(Op.RST))
        if kind == "response":
            self._pending &= ~_Pending.RESPONSE
            return RxPacket(self._header(Op.RESPONSE))
        if kind == "request":
            self._pending &= ~_Pending.REQUEST
            return RxPacket(self._header(Op.REQUEST))
        if kind == "credit_request":
            self._credit_requested = True
            self._credit_request_due = False
            return RxPacket(self._header(Op.CREDIT_REQUEST))
        if kind == "shutdown":
            hdr = self._take_pending_shutdown()
            assert hdr is not None
            return RxPacket(hdr)
        if kind == "credit_update":
            return RxPacket(self._header(Op.CREDIT_UPDATE))
        limit = min(max_payload, self.peer_free)
        if kind == "read":
            if self.type_ is Type.SEQPACKET:
                return RxRead(self.key, self.cfg.max_message_bytes, message=True)
            return RxRead(self.key, limit)
        # queued data ("data")
        data, eom, eor = self._h2g[0]
        rest = len(data) - self._h2g_off
        n = min(rest, limit)
        chunk = memoryview(data)[self._h2g_off:self._h2g_off + n]
        flags = 0
        if n == rest:
            self._h2g.popleft()
            self._h2g_off = 0
            if eom:
                flags = SeqpacketFlag.EOM | (SeqpacketFlag.EOR if eor else 0)
        else:
            self._h2g_off += n
        self.tx_cnt = _u32(self.tx_cnt + n)
        self.bytes_to_guest += n
        return RxPacket(self._header(Op.RW, len_=n, flags=int(flags)), chunk)


def _shut_name(flags: ShutdownFlag) -> str:
    return {ShutdownFlag.RCV: "rcv", ShutdownFlag.SEND: "send"}.get(flags, "both")


def _join(bufs: Iterable[Buffer]) -> bytes:
    return b"".join(bytes(b) if not isinstance(b, bytes) else b for b in bufs)


def _tail(bufs: Sequence[Buffer], skip: int) -> bytes:
    """Copy of the bytes of ``bufs`` after the first ``skip``."""
    out = bytearray()
    for b in bufs:
        ln = len(b)
        if skip >= ln:
            skip -= ln
            continue
        out += memoryview(b)[skip:] if skip else b
        skip = 0
    return bytes(out)
