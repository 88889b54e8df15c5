"""The vhost-user back-end session: one front-end connection's protocol state machine.

Sans-I/O: the adapter feeds bytes and fds (``receive``), takes replies (``process`` /
``handle``) and back-end channel messages (``take_backend_output``), watches the kick fds
the session lists (``kick_fds``) and reports kicks (``on_kick``). The session maps guest
memory through ``ring.mapping`` (the ring package's one mmap adapter), closes the fds it
owns, and never touches a socket.

Every request goes through one pipeline (STYLE R4), one method per step:

1. failed latch (a session that rejected a message with disconnect stays failed);
2. known request and fds allowed for it (count);
3. exact payload size;
4. ``unpack()`` of the payload (syntax);
5. queue index < ``device.num_queues`` (once, here);
6. feature gate (protocol features negotiated by SET_PROTOCOL_FEATURES);
7. the handler;
8. REPLY_ACK: only if negotiated and NEED_REPLY set, and only for requests without a reply
   of their own.

Received fds are closed on every rejection path. Malformed input (steps 2–5, unknown codes)
raises :class:`FrontendProtocolError` with ``should_disconnect=True``. A gated or refused
request gets an error reply where the spec gives one (REPLY_ACK, or the request's own reply)
and the session carries on; a refusal that cannot be reported disconnects, because the
front-end would otherwise carry on believing it succeeded.

Spec: vhost-user (QEMU revision in docs/spec-refs.md) "Front-end message types",
"Ring states", "Communication", "REPLY_ACK".
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import struct
from typing import Any, Callable, Sequence

from ring import mapping as ring_mapping
from ring.errors import MemoryMapError, RingError
from ring.memory import DirtyLog, GuestMemory, Region
from vhost_user.channel import (
    Closed,
    Message,
    MessageChannel,
    NeedData,
    close_fds,
    encode_message,
)
from vhost_user.device import QueueHandle, VhostUserDevice
from vhost_user.errors import FrontendProtocolError
from vhost_user.wire import (
    DEVICE_FEATURE_MASK,
    MAX_PAYLOAD_BYTES,
    BackendReq,
    ConfigSpace,
    FrontendReq,
    Inflight,
    IotlbMsg,
    LogDescription,
    MemoryTable,
    MemRegMsg,
    SharedObject,
    TransferDeviceState,
    U64,
    VhostUserProtocolFeature as PF,
    VirtioFeature as VF,
    VringAddr,
    VringFd,
    VringState,
    inflight_queue_region_bytes,
)

__all__ = [
    "BackendSession",
    "DEFAULT_MAX_MEM_SLOTS",
    "OFFERED_PROTOCOL_FEATURES",
    "OFFERED_TRANSPORT_FEATURES",
    "Reply",
]

log = logging.getLogger(__name__)

MAX_QUEUE_SIZE = 32768  # virtio 1.2 §2.7 / §2.8: queue size at most 32768
DEFAULT_MAX_MEM_SLOTS = 32  # GET_MAX_MEM_SLOTS answer: memory regions we accept at once

OFFERED_TRANSPORT_FEATURES = (
    VF.VERSION_1
    | VF.RING_EVENT_IDX
    | VF.RING_INDIRECT_DESC
    | VF.RING_PACKED
    | VF.NOTIFY_ON_EMPTY
    | VF.VHOST_USER_F_PROTOCOL_FEATURES
    | VF.VHOST_F_LOG_ALL
)
OFFERED_PROTOCOL_FEATURES = (
    PF.MQ
    | PF.REPLY_ACK
    | PF.CONFIG
    | PF.BACKEND_REQ
    | PF.CONFIGURE_MEM_SLOTS
    | PF.INFLIGHT_SHMFD
    | PF.STATUS
    | PF.RESET_DEVICE
    | PF.LOG_SHMFD
)
_VHOST_ONLY_FEATURES = VF.VHOST_USER_F_PROTOCOL_FEATURES | VF.VHOST_F_LOG_ALL


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """Bytes to send to the front-end, with fds that stay owned by the session (the sender
    passes them with SCM_RIGHTS, which duplicates them)."""

    data: bytes
    fds: tuple[int, ...] = ()


class _ReplyKind(enum.Enum):
    """What a request answers with. Spec: vhost-user "Communication" (requests that reply)."""

    NONE = "none"  # only a REPLY_ACK when negotiated and asked for
    U64 = "u64"
    STATE = "state"
    CONFIG = "config"
    INFLIGHT = "inflight"
    EMPTY = "empty"  # POSTCOPY_ADVISE: an empty reply (+ the userfault fd on success)
    ECHO = "echo"  # CREATE_CRYPTO_SESSION: the payload back, session id in the first u64


@dataclasses.dataclass(frozen=True, slots=True)
class _Rule:
    """The static validation rule of one request."""

    fds: tuple[int, int]  # (min, max) fds in the ancillary data
    size: tuple[int, int]  # (min, max) payload bytes; min == max for fixed-size payloads
    parse: Callable[..., Any] | None  # payload parser (wire.*.unpack), None for no payload
    gate: int = 0  # protocol feature mask that must have been negotiated
    reply: _ReplyKind = _ReplyKind.NONE
    unsupported: bool = False  # we never offer what it needs: always refused cleanly


def _r(fds=(0, 0), size=(0, 0), parse=None, gate=0, reply=_ReplyKind.NONE, unsupported=False):
    if isinstance(size, int):
        size = (size, size)
    return _Rule(fds, size, parse, int(gate), reply, unsupported)


_K = _ReplyKind
_RULES: dict[FrontendReq, _Rule] = {
    FrontendReq.GET_FEATURES: _r(reply=_K.U64),
    FrontendReq.SET_FEATURES: _r(size=8, parse=U64.unpack),
    FrontendReq.SET_OWNER: _r(),
    FrontendReq.RESET_OWNER: _r(),
    FrontendReq.SET_MEM_TABLE: _r(
        fds=(1, 8), size=(MemoryTable.MIN_SIZE, MemoryTable.MAX_SIZE), parse=MemoryTable.unpack
    ),
    FrontendReq.SET_LOG_BASE: _r(
        fds=(1, 1), size=16, parse=LogDescription.unpack, gate=PF.LOG_SHMFD, reply=_K.U64
    ),
    FrontendReq.SET_LOG_FD: _r(fds=(0, 1)),
    FrontendReq.SET_VRING_NUM: _r(size=8, parse=VringState.unpack),
    FrontendReq.SET_VRING_ADDR: _r(size=40, parse=VringAddr.unpack),
    FrontendReq.SET_VRING_BASE: _r(size=8, parse=VringState.unpack),
    FrontendReq.GET_VRING_BASE: _r(size=8, parse=VringState.unpack, reply=_K.STATE),
    FrontendReq.SET_VRING_KICK: _r(fds=(0, 1), size=8, parse=VringFd.unpack),
    FrontendReq.SET_VRING_CALL: _r(fds=(0, 1), size=8, parse=VringFd.unpack),
    FrontendReq.SET_VRING_ERR: _r(fds=(0, 1), size=8, parse=VringFd.unpack),
    FrontendReq.GET_PROTOCOL_FEATURES: _r(reply=_K.U64),
    FrontendReq.SET_PROTOCOL_FEATURES: _r(size=8, parse=U64.unpack),
    FrontendReq.GET_QUEUE_NUM: _r(reply=_K.U64),
    FrontendReq.SET_VRING_ENABLE: _r(size=8, parse=VringState.unpack),
    FrontendReq.SEND_RARP: _r(size=8, parse=U64.unpack, gate=PF.RARP, unsupported=True),
    FrontendReq.NET_SET_MTU: _r(size=8, parse=U64.unpack, gate=PF.NET_MTU, unsupported=True),
    FrontendReq.SET_BACKEND_REQ_FD: _r(fds=(1, 1), gate=PF.BACKEND_REQ),
    FrontendReq.IOTLB_MSG: _r(size=32, parse=IotlbMsg.unpack, reply=_K.U64, unsupported=True),
    FrontendReq.SET_VRING_ENDIAN: _r(
        size=8, parse=VringState.unpack, gate=PF.CROSS_ENDIAN, unsupported=True
    ),
    FrontendReq.GET_CONFIG: _r(
        size=(ConfigSpace.MIN_SIZE, ConfigSpace.MAX_SIZE),
        parse=ConfigSpace.unpack,
        gate=PF.CONFIG,
        reply=_K.CONFIG,
    ),
    FrontendReq.SET_CONFIG: _r(
        size=(ConfigSpace.MIN_SIZE, ConfigSpace.MAX_SIZE), parse=ConfigSpace.unpack, gate=PF.CONFIG
    ),
    FrontendReq.CREATE_CRYPTO_SESSION: _r(
        size=(8, MAX_PAYLOAD_BYTES), gate=PF.CRYPTO_SESSION, reply=_K.ECHO, unsupported=True
    ),
    FrontendReq.CLOSE_CRYPTO_SESSION: _r(
        size=8, parse=U64.unpack, gate=PF.CRYPTO_SESSION, unsupported=True
    ),
    FrontendReq.POSTCOPY_ADVISE: _r(gate=PF.PAGEFAULT, reply=_K.EMPTY, unsupported=True),
    FrontendReq.POSTCOPY_LISTEN: _r(gate=PF.PAGEFAULT, unsupported=True),
    FrontendReq.POSTCOPY_END: _r(gate=PF.PAGEFAULT, reply=_K.U64, unsupported=True),
    FrontendReq.GET_INFLIGHT_FD: _r(
        size=24, parse=Inflight.unpack, gate=PF.INFLIGHT_SHMFD, reply=_K.INFLIGHT
    ),
    FrontendReq.SET_INFLIGHT_FD: _r(
        fds=(1, 1), size=24, parse=Inflight.unpack, gate=PF.INFLIGHT_SHMFD
    ),
    FrontendReq.GPU_SET_SOCKET: _r(fds=(0, 1), unsupported=True),
    FrontendReq.RESET_DEVICE: _r(gate=PF.RESET_DEVICE),
    FrontendReq.VRING_KICK: _r(
        size=8, parse=VringState.unpack, gate=PF.INBAND_NOTIFICATIONS, unsupported=True
    ),
    FrontendReq.GET_MAX_MEM_SLOTS: _r(gate=PF.CONFIGURE_MEM_SLOTS, reply=_K.U64),
    FrontendReq.ADD_MEM_REG: _r(
        fds=(1, 1), size=40, parse=MemRegMsg.unpack, gate=PF.CONFIGURE_MEM_SLOTS
    ),
    # "For compatibility with existing incorrect implementations, the back-end MAY accept
    #  messages with one file descriptor. If a file descriptor is passed, the back-end MUST
    #  close it without using it otherwise."
    FrontendReq.REM_MEM_REG: _r(
        fds=(0, 1), size=40, parse=MemRegMsg.unpack, gate=PF.CONFIGURE_MEM_SLOTS
    ),
    FrontendReq.SET_STATUS: _r(size=8, parse=U64.unpack, gate=PF.STATUS),
    FrontendReq.GET_STATUS: _r(gate=PF.STATUS, reply=_K.U64),
    FrontendReq.GET_SHARED_OBJECT: _r(
        size=16, parse=SharedObject.unpack, gate=PF.SHARED_OBJECT, reply=_K.U64, unsupported=True
    ),
    FrontendReq.SET_DEVICE_STATE_FD: _r(
        fds=(1, 1),
        size=8,
        parse=TransferDeviceState.unpack,
        gate=PF.DEVICE_STATE,
        reply=_K.U64,
        unsupported=True,
    ),
    FrontendReq.CHECK_DEVICE_STATE: _r(gate=PF.DEVICE_STATE, reply=_K.U64, unsupported=True),
}

_INDEXED = frozenset(
    {
        FrontendReq.SET_VRING_NUM,
        FrontendReq.SET_VRING_ADDR,
        FrontendReq.SET_VRING_BASE,
        FrontendReq.GET_VRING_BASE,
        FrontendReq.SET_VRING_KICK,
        FrontendReq.SET_VRING_CALL,
        FrontendReq.SET_VRING_ERR,
        FrontendReq.SET_VRING_ENABLE,
        FrontendReq.SET_VRING_ENDIAN,
        FrontendReq.VRING_KICK,
    }
)

# SET_DEVICE_STATE_FD reply: bits 0-7 error code, bit 8 "no fd returned".
_DEVICE_STATE_NOFD = 0x100


class _Refused(Exception):
    """A handler refuses a well-formed request (reported with an error reply if possible)."""


@dataclasses.dataclass(slots=True)
class _Vring:
    """Per-queue vhost-user state. Spec: vhost-user "Ring states"."""

    index: int
    num: int | None = None
    addr: VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    polling: bool = False
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False
    enabled: bool = False
    vq: Any = None
    handle: QueueHandle | None = None

    @property
    def live(self) -> bool:
        return self.handle is not None


def _default_shm_factory(size: int) -> int:
    """A sealed-size anonymous shared memory fd (inflight area). Spec: vhost-user
    "Inflight I/O tracking" (the back-end allocates the buffer)."""
    fd = os.memfd_create("vmchannel-inflight", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


class BackendSession:
    """One front-end connection, back-end side.

    ``device`` implements :class:`~vhost_user.device.VhostUserDevice`. ``signal(fd)`` writes
    an eventfd (the adapter supplies it; used by :meth:`QueueHandle.notify`).
    ``virtqueue_factory`` defaults to ``ring.Virtqueue``. ``wakeup`` (settable) is called
    when back-end channel output was queued outside message handling.
    """

    def __init__(
        self,
        device: VhostUserDevice,
        *,
        signal: Callable[[int], None],
        virtqueue_factory: Callable[..., Any] | None = None,
        shm_factory: Callable[[int], int] = _default_shm_factory,
        max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
        name: str = "vhost-user",
    ) -> None:
        if virtqueue_factory is None:
            from ring import Virtqueue as virtqueue_factory  # noqa: N813 (import per use: R8)
        self.device = device
        self.log = log.getChild(name)
        self._signal = signal
        self._vq_factory = virtqueue_factory
        self._shm_factory = shm_factory
        self.max_mem_slots = max_mem_slots
        self.channel = MessageChannel()
        self.memory = GuestMemory()
        self.vrings = [_Vring(i) for i in range(device.num_queues)]
        # The adapter's "stop watching this kick fd", called before the session closes one
        # (see _close_kick_fd); None: nothing watches them.
        self.before_kick_close: Callable[[int], None] | None = None
        self.owner = False
        self.failed = False
        self.closed = False
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.status = 0
        self._device_features_sent: int | None = None
        self._dirty_log: DirtyLog | None = None
        self._log_fd: int | None = None
        self._backend_fd: int | None = None
        self._backend_out: list[bytes] = []
        self._inflight_fd: int | None = None
        self._inflight: Region | None = None
        self.wakeup: Callable[[], None] | None = None
        self._kept_fds: set[int] = set()

    # ------------------------------------------------------------------ features offered

    def offered_features(self) -> int:
        """GET_FEATURES answer: transport bits we implement + the device's bits 0..23."""
        return int(OFFERED_TRANSPORT_FEATURES) | (self.device.device_features() & DEVICE_FEATURE_MASK)

    def has_protocol(self, feature: int) -> bool:
        return (self.acked_protocol_features & feature) == feature

    # ------------------------------------------------------------------ adapter interface

    def receive(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Bytes and fds read from the socket (``b""`` at EOF)."""
        self.channel.receive(data, fds)

    def process(self) -> tuple[list[Reply], bool]:
        """Handle every complete buffered message. Returns ``(replies, eof)``; raises
        :class:`FrontendProtocolError` (``should_disconnect``) for a message that ends the
        connection (replies produced before it are lost with the connection anyway)."""
        replies: list[Reply] = []
        while True:
            item = self.channel.next_message()
            if isinstance(item, NeedData):
                return replies, False
            if isinstance(item, Closed):
                return replies, True
            replies.extend(self.handle(item))

    def kick_fds(self) -> dict[int, int]:
        """Queue index → kick eventfd, for every started queue that has one (watch these)."""
        return {v.index: v.kick_fd for v in self.vrings if v.started and v.kick_fd is not None}

    def kick_reader(self, index: int) -> Callable[[int], None] | None:
        """The device's own reader of queue ``index``'s kick fd (``QueueHandle.kick_reader``)
        while the queue is live, else None (drain and :meth:`on_kick`)."""
        handle = self.vrings[index].handle
        return None if handle is None else handle.kick_reader

    def polled_queues(self) -> list[int]:
        """Started queues without a kick fd (SET_VRING_KICK with the no-fd flag): poll them."""
        return [v.index for v in self.vrings if v.started and v.polling]

    def on_kick(self, index: int) -> None:
        """The kick fd of ``index`` became readable (the adapter drained it).

        Deviation: a started but disabled ring is not processed (the spec wants it processed
        "without side effects"; our devices see only enabled rings).
        """
        vring = self.vrings[index]
        if vring.live:
            self.device.kick(index)

    @property
    def backend_fd(self) -> int | None:
        """The back-end channel socket (SET_BACKEND_REQ_FD), or None."""
        return self._backend_fd

    def take_backend_output(self) -> list[bytes]:
        """Messages queued for the back-end channel since the last call."""
        out, self._backend_out = self._backend_out, []
        return out

    def notify_config(self) -> bool:
        """Queue VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (no NEED_REPLY: we never block on the
        front-end). Returns False when the channel or the CONFIG feature is missing.

        Spec: vhost-user VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
        """
        if self._backend_fd is None or not self.has_protocol(PF.CONFIG | PF.BACKEND_REQ):
            return False
        self._backend_out.append(encode_message(BackendReq.CONFIG_CHANGE_MSG))
        if self.wakeup is not None:
            self.wakeup()
        return True

    def close(self) -> None:
        """The front-end went away (or we dropped it): stop the device's queues, reset the
        device, close every fd and unmap guest memory. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for vring in self.vrings:
            vring.started = False
            vring.enabled = False
            self._reconcile(vring)
            self._release_vq(vring)
            self._close_vring_fds(vring)
        try:
            self.device.reset()
        finally:
            self.channel.close()
            self._unmap_all()
            for fd in (self._log_fd, self._backend_fd, self._inflight_fd):
                if fd is not None:
                    close_fds([fd])
            self._log_fd = self._backend_fd = self._inflight_fd = None
            self._inflight = None
            self._dirty_log = None

    # ------------------------------------------------------------------ the pipeline

    def handle(self, msg: Message) -> list[Reply]:
        """Validate and execute one request (the STYLE R4 order); return the replies."""
        fds = list(msg.fds)
        self._kept_fds = set()
        self.log.debug("<-- %s", _describe(msg))
        try:
            self._check_latch(msg)
            request, rule = self._check_known(msg)
            self._check_fds(request, rule, msg)
            self._check_size(request, rule, msg)
            body = self._unpack(request, rule, msg)
            self._check_queue_index(request, body, msg)
        except FrontendProtocolError:
            close_fds(fds)
            self.failed = True
            raise
        if not self._gate_passes(rule):
            close_fds(fds)
            return self._refuse(msg, request, rule, "protocol feature not negotiated"
                                if not rule.unsupported else "not supported")
        try:
            replies = self._dispatch(request, body, msg)
        except _Refused as exc:
            close_fds([fd for fd in fds if fd not in self._kept_fds])
            return self._refuse(msg, request, rule, str(exc))
        except FrontendProtocolError:
            close_fds([fd for fd in fds if fd not in self._kept_fds])
            self.failed = True
            raise
        # Handlers that store an fd mark it kept; every other received fd is closed here
        # (mapped memory holds its own reference to the file).
        close_fds([fd for fd in fds if fd not in self._kept_fds])
        if rule.reply is _ReplyKind.NONE and msg.header.need_reply and self.has_protocol(PF.REPLY_ACK):
            replies = [*replies, self._reply(request, U64(0).pack())]
        for reply in replies:
            self.log.debug("--> %s %d bytes %d fds", request.name, len(reply.data) - 12, len(reply.fds))
        return replies

    def _check_latch(self, msg: Message) -> None:
        if self.failed or self.closed:
            raise FrontendProtocolError(
                "session already failed", request=msg.request, should_disconnect=True
            )

    def _check_known(self, msg: Message) -> tuple[FrontendReq, _Rule]:
        try:
            request = FrontendReq(msg.request)
        except ValueError:
            raise FrontendProtocolError(
                f"unknown request {msg.request}", request=msg.request, raw=msg.payload
            ) from None
        if msg.header.is_reply:
            raise FrontendProtocolError(
                f"{request.name} carries the REPLY flag", request=msg.request
            )
        return request, _RULES[request]

    def _check_fds(self, request: FrontendReq, rule: _Rule, msg: Message) -> None:
        low, high = rule.fds
        if not low <= len(msg.fds) <= high:
            raise FrontendProtocolError(
                f"{request.name} with {len(msg.fds)} fds (allowed {low}..{high})",
                request=request,
            )

    def _check_size(self, request: FrontendReq, rule: _Rule, msg: Message) -> None:
        low, high = rule.size
        if not low <= len(msg.payload) <= high:
            expected = str(low) if low == high else f"{low}..{high}"
            raise FrontendProtocolError(
                f"{request.name} payload of {len(msg.payload)} bytes (expected {expected})",
                request=request,
                raw=msg.payload,
            )

    def _unpack(self, request: FrontendReq, rule: _Rule, msg: Message) -> Any:
        if rule.parse is None:
            return msg.payload
        return rule.parse(msg.payload, request)

    def _check_queue_index(self, request: FrontendReq, body: Any, msg: Message) -> None:
        if request in _INDEXED and body.index >= len(self.vrings):
            raise FrontendProtocolError(
                f"{request.name} for queue {body.index}; the device has {len(self.vrings)}",
                request=request,
                raw=msg.payload,
            )

    def _gate_passes(self, rule: _Rule) -> bool:
        return not rule.unsupported and self.has_protocol(rule.gate)

    def _refuse(self, msg: Message, request: FrontendReq, rule: _Rule, why: str) -> list[Reply]:
        """Answer a refused request with its error form; keep the connection when we could
        tell the front-end, else (nothing in the spec lets us report it) disconnect unless it
        is a message whose feature was never offered (then ignoring is what a back-end
        without the feature does)."""
        kind = rule.reply
        if kind is _ReplyKind.U64:
            error = _DEVICE_STATE_NOFD | 1 if request == FrontendReq.SET_DEVICE_STATE_FD else 1
            self.log.warning("refused %s: %s", request.name, why)
            return [self._reply(request, U64(error).pack())]
        if kind is _ReplyKind.CONFIG:
            self.log.warning("refused %s: %s", request.name, why)
            return [self._reply(request, b"")]  # "zero length of payload to indicate an error"
        if kind is _ReplyKind.INFLIGHT:
            self.log.warning("refused %s: %s", request.name, why)
            return [self._reply(request, Inflight(0, 0, 0, 0).pack())]
        if kind is _ReplyKind.EMPTY:
            self.log.warning("refused %s: %s", request.name, why)
            return [self._reply(request, b"")]
        if kind is _ReplyKind.ECHO:
            self.log.warning("refused %s: %s", request.name, why)
            payload = bytearray(msg.payload)
            payload[:8] = struct.pack("=q", -1)  # "negative for failure"
            return [self._reply(request, bytes(payload))]
        if kind is _ReplyKind.STATE:
            self.failed = True
            raise FrontendProtocolError(f"{request.name}: {why}", request=request)
        if msg.header.need_reply and self.has_protocol(PF.REPLY_ACK):
            self.log.warning("refused %s: %s", request.name, why)
            return [self._reply(request, U64(1).pack())]
        if rule.unsupported or not self.has_protocol(rule.gate):
            self.log.error("ignored %s: %s (no way to report it)", request.name, why)
            return []
        self.failed = True
        raise FrontendProtocolError(f"{request.name} refused: {why}", request=request)

    def _keep(self, fd: int) -> int:
        """Take ownership of a received fd (the pipeline will not close it)."""
        self._kept_fds.add(fd)
        return fd

    @staticmethod
    def _reply(request: int, payload: bytes, fds: tuple[int, ...] = ()) -> Reply:
        return Reply(encode_message(request, payload, reply=True), fds)

    def _dispatch(self, request: FrontendReq, body: Any, msg: Message) -> list[Reply]:
        handler = getattr(self, "_on_" + request.name.lower())
        result = handler(body, msg)
        if result is None:
            return []
        if isinstance(result, Reply):
            return [result]
        return [self._reply(request, result)]

    # ------------------------------------------------------------------ handlers: features

    def _on_get_features(self, body, msg) -> bytes:
        return U64(self.offered_features()).pack()

    def _on_set_features(self, body: U64, msg) -> None:
        """Spec: vhost-user "Ring states": "upon receiving a VHOST_USER_SET_FEATURES message
        from the front-end without VHOST_USER_F_PROTOCOL_FEATURES set, the back-end must enable
        all rings immediately"."""
        features = body.u64
        extra = features & ~self.offered_features()
        if extra:
            raise FrontendProtocolError(
                f"SET_FEATURES acks features we did not offer: {extra:#x}",
                request=FrontendReq.SET_FEATURES,
            )
        self.acked_features = features
        virtio_features = features & ~int(_VHOST_ONLY_FEATURES)
        if virtio_features != self._device_features_sent:
            self._device_features_sent = virtio_features
            self.device.set_features(virtio_features)
        self._update_log()
        if not features & VF.VHOST_USER_F_PROTOCOL_FEATURES:
            for vring in self.vrings:
                vring.enabled = True
                self._reconcile(vring)
        return None

    def _on_get_protocol_features(self, body, msg) -> bytes:
        return U64(int(OFFERED_PROTOCOL_FEATURES)).pack()

    def _on_set_protocol_features(self, body: U64, msg) -> None:
        extra = body.u64 & ~int(OFFERED_PROTOCOL_FEATURES)
        if extra:
            raise FrontendProtocolError(
                f"SET_PROTOCOL_FEATURES acks protocol features we did not offer: {extra:#x}",
                request=FrontendReq.SET_PROTOCOL_FEATURES,
            )
        self.acked_protocol_features = body.u64

    def _on_set_owner(self, body, msg) -> None:
        self.owner = True

    def _on_reset_owner(self, body, msg) -> None:
        """Deprecated; "back-ends either ignore this message, or use it to disable all rings":
        we disable all rings."""
        for vring in self.vrings:
            vring.enabled = False
            self._reconcile(vring)

    def _on_get_queue_num(self, body, msg) -> bytes:
        return U64(len(self.vrings)).pack()

    def _on_get_max_mem_slots(self, body, msg) -> bytes:
        return U64(self.max_mem_slots).pack()

    # ------------------------------------------------------------------ handlers: memory

    def _map(self, fd: int, region) -> Region:
        try:
            return ring_mapping.map_region(
                fd, region.guest_phys_addr, region.memory_size, region.userspace_addr,
                region.mmap_offset,
            )
        except (MemoryMapError, RingError) as exc:
            raise _Refused(f"cannot map region {region}: {exc}") from exc

    def _on_set_mem_table(self, table: MemoryTable, msg: Message) -> None:
        """Map the new regions, then replace the table and unmap the old ones.
        Spec: vhost-user VHOST_USER_SET_MEM_TABLE ("The size and ordering of the fds matches
        the number and ordering of memory regions")."""
        if len(msg.fds) != len(table.regions):
            raise FrontendProtocolError(
                f"SET_MEM_TABLE with {len(table.regions)} regions and {len(msg.fds)} fds",
                request=FrontendReq.SET_MEM_TABLE,
            )
        new: list[Region] = []
        try:
            for region, fd in zip(table.regions, msg.fds):
                new.append(self._map(fd, region))
            GuestMemory(new)  # overlap check before anything changes
        except (_Refused, MemoryMapError) as exc:
            for region in new:
                ring_mapping.unmap_region(region)
            raise _Refused(str(exc)) from exc
        old = self.memory.clear()
        for region in new:
            self.memory.add(region)
        for region in old:
            ring_mapping.unmap_region(region)

    def _on_add_mem_reg(self, body: MemRegMsg, msg: Message) -> None:
        """Spec: vhost-user VHOST_USER_ADD_MEM_REG ("Exactly one file descriptor")."""
        if len(self.memory.regions) >= self.max_mem_slots:
            raise _Refused(f"all {self.max_mem_slots} memory slots in use")
        region = self._map(msg.fds[0], body.region)
        try:
            self.memory.add(region)
        except MemoryMapError as exc:
            ring_mapping.unmap_region(region)
            raise _Refused(str(exc)) from exc

    def _on_rem_mem_reg(self, body: MemRegMsg, msg: Message) -> None:
        """"The memory region to be removed is identified by its guest address, user address
        and size. The mmap offset is ignored." Spec: vhost-user VHOST_USER_REM_MEM_REG."""
        # "the back-end MUST close it without using it otherwise": the pipeline closes it.
        r = body.region
        for region in self.memory.regions:
            if (region.gpa, region.size, region.uva) == (
                r.guest_phys_addr, r.memory_size, r.userspace_addr
            ):
                self.memory.remove(region.gpa, region.size)
                ring_mapping.unmap_region(region)
                return
        raise _Refused(f"no region {r} to remove")

    def _unmap_all(self) -> None:
        for region in self.memory.clear():
            ring_mapping.unmap_region(region)
        self.memory.log = None
        if self._inflight is not None:
            ring_mapping.unmap_region(self._inflight)

    # ------------------------------------------------------------------ handlers: dirty log

    def _on_set_log_base(self, body: LogDescription, msg: Message) -> bytes:
        """Spec: vhost-user VHOST_USER_SET_LOG_BASE, "Migration". Replies u64 0 (QEMU reads a
        reply when LOG_SHMFD is negotiated)."""
        try:
            self._dirty_log = ring_mapping.map_log(msg.fds[0], body.mmap_size, body.mmap_offset)
        except (MemoryMapError, RingError) as exc:
            raise _Refused(f"cannot map the dirty log: {exc}") from exc
        self._update_log()
        return U64(0).pack()

    def _update_log(self) -> None:
        """The ring marks pages only while VHOST_F_LOG_ALL is acked and a log is mapped."""
        logging_on = bool(self.acked_features & VF.VHOST_F_LOG_ALL)
        self.memory.log = self._dirty_log if logging_on else None

    def _on_set_log_fd(self, body, msg: Message) -> None:
        if self._log_fd is not None:
            close_fds([self._log_fd])
        self._log_fd = self._keep(msg.fds[0]) if msg.fds else None

    # ------------------------------------------------------------------ handlers: vrings

    def _on_set_vring_num(self, body: VringState, msg) -> None:
        vring = self.vrings[body.index]
        # A device may bound its rings lower (vhost-device-vsock's --queue-size does).
        limit = min(MAX_QUEUE_SIZE, getattr(self.device, "max_queue_size", MAX_QUEUE_SIZE))
        if not 1 <= body.num <= limit:
            raise FrontendProtocolError(
                f"queue {body.index}: size {body.num} outside 1..{limit}",
                request=FrontendReq.SET_VRING_NUM,
            )
        if vring.started and body.num != vring.num:
            raise _Refused(f"queue {body.index} is started; cannot resize")
        vring.num = body.num

    def _on_set_vring_addr(self, body: VringAddr, msg) -> None:
        """QEMU re-sends the addresses of a running ring to toggle VHOST_VRING_F_LOG; that
        is accepted. Moving a started ring is refused.

        Deviation: the used ring is logged at its translated guest-physical address, which
        equals ``log_guest_addr`` for QEMU; a different value is only reported.
        """
        vring = self.vrings[body.index]
        old = vring.addr
        same_place = old is not None and (
            old.desc_user_addr, old.used_user_addr, old.avail_user_addr
        ) == (body.desc_user_addr, body.used_user_addr, body.avail_user_addr)
        if vring.started and not same_place:
            raise _Refused(f"queue {body.index} is started; cannot move its rings")
        vring.addr = body

    def _on_set_vring_base(self, body: VringState, msg) -> None:
        """Split: bits 0-15 next avail index, 16-31 reserved. Packed: both indices and wrap
        counters. Spec: vhost-user VHOST_USER_SET_VRING_BASE."""
        vring = self.vrings[body.index]
        packed = bool(self.acked_features & VF.RING_PACKED)
        if not packed and body.num > 0xFFFF:
            raise FrontendProtocolError(
                f"queue {body.index}: split base {body.num:#x} has reserved bits set",
                request=FrontendReq.SET_VRING_BASE,
            )
        if vring.started:
            raise _Refused(f"queue {body.index} is started; stop it with GET_VRING_BASE first")
        vring.base = body.num

    def _on_get_vring_base(self, body: VringState, msg) -> bytes:
        """"Stops the vring and returns the current descriptor index or indices."
        Spec: vhost-user VHOST_USER_GET_VRING_BASE. Like libvhost-user we also drop the kick
        and call fds: the front-end sets them again before restarting the ring."""
        vring = self.vrings[body.index]
        vring.started = False
        self._reconcile(vring)
        if vring.vq is not None:
            vring.base = vring.vq.get_base()
        self._release_vq(vring)
        if vring.kick_fd is not None:
            self._close_kick_fd(vring.kick_fd)
            vring.kick_fd = None
        if vring.call_fd is not None:
            close_fds([vring.call_fd])
            vring.call_fd = None
        vring.polling = False
        return VringState(body.index, vring.base).pack()

    def _take_vring_fd(self, body: VringFd, msg: Message, request: FrontendReq) -> int | None:
        """Spec: vhost-user VHOST_USER_SET_VRING_KICK: "Bit 8 is the invalid FD flag. This
        flag is set when there is no file descriptor in the ancillary data." """
        if body.nofd == bool(msg.fds):
            raise FrontendProtocolError(
                f"{request.name} for queue {body.index}: no-fd flag {body.nofd} with "
                f"{len(msg.fds)} fds",
                request=request,
            )
        return None if body.nofd else self._keep(msg.fds[0])

    def _on_set_vring_kick(self, body: VringFd, msg: Message) -> None:
        """The ring starts here (as in libvhost-user), or is refused if it cannot: the
        front-end must have sent SET_VRING_NUM and SET_VRING_ADDR and a memory table covering
        the rings. Spec: vhost-user "Ring states"."""
        fd = self._take_vring_fd(body, msg, FrontendReq.SET_VRING_KICK)
        vring = self.vrings[body.index]
        if vring.kick_fd is not None:
            self._close_kick_fd(vring.kick_fd)
        vring.kick_fd = fd
        vring.polling = fd is None
        if vring.handle is not None:
            vring.handle.kick_fd = fd
        if vring.started:
            return  # new kick fd for a running ring
        vring.vq = self._build_virtqueue(vring)
        vring.started = True
        self._reconcile(vring)

    def _on_set_vring_call(self, body: VringFd, msg: Message) -> None:
        fd = self._take_vring_fd(body, msg, FrontendReq.SET_VRING_CALL)
        vring = self.vrings[body.index]
        if vring.vq is not None:
            vring.vq.call_fd = fd  # before the old fd closes: nothing may signal it after
        if vring.call_fd is not None:
            close_fds([vring.call_fd])
        vring.call_fd = fd

    def _on_set_vring_err(self, body: VringFd, msg: Message) -> None:
        fd = self._take_vring_fd(body, msg, FrontendReq.SET_VRING_ERR)
        vring = self.vrings[body.index]
        if vring.err_fd is not None:
            close_fds([vring.err_fd])
        vring.err_fd = fd

    def _on_set_vring_enable(self, body: VringState, msg) -> None:
        if body.num not in (0, 1):
            raise FrontendProtocolError(
                f"SET_VRING_ENABLE num {body.num} (expected 0 or 1)",
                request=FrontendReq.SET_VRING_ENABLE,
            )
        vring = self.vrings[body.index]
        vring.enabled = bool(body.num)
        self._reconcile(vring)

    def _build_virtqueue(self, vring: _Vring) -> Any:
        """Translate the front-end's ring addresses (user addresses) to guest-physical ones
        and build the ``ring`` Virtqueue at the stored base.

        Spec: vhost-user "A vring address description" ("a ring address is ... a user
        address"), VHOST_USER_SET_VRING_BASE; virtio 1.2 §2.7 (split part sizes), §2.8.
        """
        if vring.num is None or vring.addr is None:
            raise _Refused(f"queue {vring.index}: kick before SET_VRING_NUM/SET_VRING_ADDR")
        size, addr = vring.num, vring.addr
        packed = bool(self.acked_features & VF.RING_PACKED)
        if not packed and size & (size - 1):
            raise _Refused(f"queue {vring.index}: split ring size {size} not a power of 2")
        if packed:
            lengths = (16 * size, 4, 4)
        else:
            lengths = (16 * size, 6 + 2 * size, 6 + 8 * size)
        try:
            desc = self.memory.uva_to_gpa(addr.desc_user_addr, lengths[0])
            driver = self.memory.uva_to_gpa(addr.avail_user_addr, lengths[1])
            device = self.memory.uva_to_gpa(addr.used_user_addr, lengths[2])
        except RingError as exc:
            raise _Refused(f"queue {vring.index}: ring address not in guest memory: {exc}")
        if addr.flags & 1 and addr.log_guest_addr != device:
            self.log.warning(
                "queue %d: log_guest_addr %#x differs from the used ring gpa %#x; logging at "
                "the gpa", vring.index, addr.log_guest_addr, device,
            )
        try:
            vq = self._vq_factory(
                self.memory,
                size,
                packed=packed,
                event_idx=bool(self.acked_features & VF.RING_EVENT_IDX),
                notify_on_empty=bool(self.acked_features & VF.NOTIFY_ON_EMPTY),
                index=vring.index,
            )
            vq.configure(desc, driver, device)
            vq.set_base(vring.base)
            vq.call_fd = vring.call_fd
        except (RingError, ValueError) as exc:
            raise _Refused(f"queue {vring.index}: cannot set up the ring: {exc}") from exc
        return vq

    def _reconcile(self, vring: _Vring) -> None:
        """Tell the device when a queue becomes live (started and enabled) or stops being
        live. Spec: vhost-user "Ring states"."""
        want = vring.started and vring.enabled and vring.vq is not None
        if want and not vring.live:
            vring.handle = QueueHandle(vring.index, vring.vq, self._signal, vring.kick_fd)
            self.log.debug("queue %d live", vring.index)
            self.device.queue_started(vring.handle)
        elif not want and vring.live:
            vring.handle = None
            self.log.debug("queue %d stopped", vring.index)
            self.device.queue_stopped(vring.index)

    @staticmethod
    def _release_vq(vring: _Vring) -> None:
        """Drop the ring (its call fd is about to close: nothing may signal it)."""
        if vring.vq is not None:
            vring.vq.call_fd = None
        vring.vq = None

    def _close_vring_fds(self, vring: _Vring) -> None:
        if vring.kick_fd is not None:
            self._close_kick_fd(vring.kick_fd)
            vring.kick_fd = None
        for attr in ("call_fd", "err_fd"):
            fd = getattr(vring, attr)
            if fd is not None:
                close_fds([fd])
                setattr(vring, attr, None)

    def _close_kick_fd(self, fd: int) -> None:
        """Close a ring's kick eventfd after its adapter stopped watching it. epoll forgets
        a registration only when the open file goes, and the front-end keeps this eventfd:
        a watch removed after the close stays behind under a dead fd number, and the same
        eventfd sent again for a restarted ring (a new fd, often that number) is refused
        (EEXIST). Spec: vhost-user VHOST_USER_GET_VRING_BASE, "Ring states"."""
        if self.before_kick_close is not None:
            self.before_kick_close(fd)
        close_fds([fd])

    # ------------------------------------------------------------------ handlers: others

    def _on_set_backend_req_fd(self, body, msg: Message) -> None:
        if self._backend_fd is not None:
            close_fds([self._backend_fd])
        self._backend_fd = self._keep(msg.fds[0])

    def _on_get_config(self, body: ConfigSpace, msg) -> bytes:
        """"vhost-user back-end's payload size MUST match the front-end's request, vhost-user
        back-end uses zero length of payload to indicate an error".
        Spec: vhost-user VHOST_USER_GET_CONFIG."""
        try:
            data = bytes(self.device.config_read(body.offset, body.size))
        except Exception as exc:  # device refused: report, keep the connection
            self.log.warning("GET_CONFIG %d+%d failed: %s", body.offset, body.size, exc)
            return b""
        if len(data) != body.size:
            self.log.warning("device returned %d config bytes for %d", len(data), body.size)
            return b""
        return ConfigSpace(body.offset, body.size, body.flags, data).pack()

    def _on_set_config(self, body: ConfigSpace, msg) -> None:
        """Read-only fields are the device's business (``config_write`` raises)."""
        try:
            self.device.config_write(body.offset, body.payload)
        except Exception as exc:
            raise _Refused(f"config write {body.offset}+{body.size}: {exc}") from exc

    def _on_get_inflight_fd(self, body: Inflight, msg) -> Reply:
        """Allocate the inflight area: one region per queue, sized per the spec's
        QueueRegionSplit / QueueRegionPacked, each rounded up to 64 bytes.
        Spec: vhost-user "Inflight I/O tracking", VHOST_USER_GET_INFLIGHT_FD."""
        if not 1 <= body.num_queues <= len(self.vrings) or not 1 <= body.queue_size:
            raise _Refused(f"inflight area for {body.num_queues} queues of {body.queue_size}")
        packed = bool(self.acked_features & VF.RING_PACKED)
        size = inflight_queue_region_bytes(body.queue_size, packed) * body.num_queues
        try:
            fd = self._shm_factory(size)
        except OSError as exc:
            raise _Refused(f"cannot allocate {size} inflight bytes: {exc}") from exc
        if self._inflight_fd is not None:
            close_fds([self._inflight_fd])
        self._inflight_fd = fd
        payload = Inflight(size, 0, body.num_queues, body.queue_size).pack()
        return self._reply(FrontendReq.GET_INFLIGHT_FD, payload, (fd,))

    def _on_set_inflight_fd(self, body: Inflight, msg: Message) -> None:
        """Map the inflight area the front-end kept for us. Spec: vhost-user
        VHOST_USER_SET_INFLIGHT_FD."""
        try:
            packed = bool(self.acked_features & VF.RING_PACKED)
            need = inflight_queue_region_bytes(body.queue_size, packed) * body.num_queues
            if body.mmap_size < need or body.num_queues > len(self.vrings):
                raise _Refused(f"inflight area {body} too small or too many queues")
            region = ring_mapping.map_region(msg.fds[0], 0, body.mmap_size, 0, body.mmap_offset)
        except (MemoryMapError, RingError) as exc:
            raise _Refused(f"cannot map the inflight area: {exc}") from exc
        if self._inflight is not None:
            ring_mapping.unmap_region(self._inflight)
        self._inflight = region

    @property
    def inflight(self) -> Region | None:
        """The mapped inflight area (SET_INFLIGHT_FD), for devices that track it."""
        return self._inflight

    def _on_set_status(self, body: U64, msg) -> None:
        """Store the virtio device status. QEMU sends 0 whenever it stops the vhost device
        (VM pause, migration), so 0 does not reset the device here; RESET_DEVICE does.
        Spec: vhost-user VHOST_USER_SET_STATUS."""
        if body.u64 > 0xFF:
            raise FrontendProtocolError(
                f"SET_STATUS {body.u64:#x} is not an 8-bit status", request=FrontendReq.SET_STATUS
            )
        self.status = body.u64

    def _on_get_status(self, body, msg) -> bytes:
        return U64(self.status).pack()

    def _on_reset_device(self, body, msg) -> None:
        """"disable all rings and reset all internal device state to the initial state ...
        The back-end retains ownership". Memory and protocol features stay.
        Spec: vhost-user VHOST_USER_RESET_DEVICE."""
        for vring in self.vrings:
            vring.started = False
            vring.enabled = False
            self._reconcile(vring)
            self._release_vq(vring)
            vring.base = 0
            vring.num = None
            vring.addr = None
            self._close_vring_fds(vring)
            vring.polling = False
        self.acked_features = 0
        self._device_features_sent = None
        self.status = 0
        self._update_log()
        self.device.reset()


def _describe(msg: Message) -> str:
    try:
        name = FrontendReq(msg.request).name
    except ValueError:
        name = f"request {msg.request}"
    return f"{name} flags={msg.header.flags:#x} size={msg.header.size} fds={len(msg.fds)}"
