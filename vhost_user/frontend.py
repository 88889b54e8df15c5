"""A minimal vhost-user front-end: what QEMU does for a device with N queues.

The test and benchmark harness (blocking, with timeouts). It speaks the same wire formats as
the back-end, gives guest RAM to the back-end from a memfd cut into several regions, lays
nothing in it itself (the guest-driver model in ``tests/support/driver.py`` does, through
:attr:`GuestRam.memory`), and drives the message sequence QEMU's ``vhost_user_backend_init``,
``vhost_dev_init``, ``vhost_dev_start`` and ``vhost_dev_stop`` send:

- init: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
  GET_MAX_MEM_SLOTS, SET_BACKEND_REQ_FD, SET_OWNER;
- start: SET_FEATURES, SET_MEM_TABLE (or ADD_MEM_REG per region), per queue
  SET_VRING_NUM / SET_VRING_BASE / SET_VRING_ADDR / SET_VRING_KICK / SET_VRING_CALL, then
  SET_VRING_ENABLE 1 per queue and SET_STATUS;
- stop: SET_VRING_ENABLE 0, GET_VRING_BASE per queue, SET_STATUS 0.

With REPLY_ACK negotiated every request without a reply of its own is sent with NEED_REPLY
and its acknowledgement checked (QEMU does so for most of them).

Spec: vhost-user "Front-end message types"; QEMU hw/virtio/vhost-user.c, hw/virtio/vhost.c.
"""

from __future__ import annotations

import array
import dataclasses
import os
import select
import socket
import sys
import time
from typing import Any, Sequence

from vhost_user.channel import Closed, Message, MessageChannel, close_fds, encode_message
from vhost_user.errors import ProtocolError
from vhost_user.session import OFFERED_PROTOCOL_FEATURES
from vhost_user.wire import (
    ConfigSpace,
    FrontendReq,
    Inflight,
    LogDescription,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    U64,
    VhostUserProtocolFeature as PF,
    VirtioFeature as VF,
    VringAddr,
    VringFd,
    VringState,
)

__all__ = ["FrontendError", "GuestRam", "VhostUserFrontend", "FrontendQueue"]

_CMSG_BYTES = socket.CMSG_SPACE(8 * array.array("i").itemsize)
UVA_BASE = 0x7F00_0000_0000
# SET_VRING_BASE of a fresh packed ring: indices 0, avail and used wrap counters 1 (bits 15, 31).
PACKED_FRESH_BASE = (1 << 15) | (1 << 31)


class FrontendError(ProtocolError):
    """The back-end answered wrongly (bad reply, NACK, timeout, closed)."""


class GuestRam:
    """Guest RAM shared through one memfd, cut into regions ``(gpa, size)``.

    ``memory`` is a ``ring.memory.GuestMemory`` over our own mappings (the guest's view, for
    the driver model); ``regions`` the wire descriptions; ``fd`` the memfd (each region is
    sent with it, at its own mmap offset, as QEMU does for one memory backend).
    """

    def __init__(self, regions: Sequence[tuple[int, int]], uva_base: int = UVA_BASE) -> None:
        from ring.mapping import map_region, unmap_region
        from ring.memory import GuestMemory

        self._unmap = unmap_region
        total = sum(size for _, size in regions)
        self.fd = os.memfd_create("vmchannel-frontend-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, total)
        self.regions: list[MemoryRegion] = []
        mapped = []
        offset = 0
        for gpa, size in regions:
            self.regions.append(MemoryRegion(gpa, size, uva_base + gpa, offset))
            mapped.append(map_region(self.fd, gpa, size, uva_base + gpa, offset))
            offset += size
        self.memory = GuestMemory(mapped)

    def uva(self, gpa: int) -> int:
        """The front-end (user) address of a guest-physical address."""
        for r in self.regions:
            if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.memory_size:
                return r.userspace_addr + gpa - r.guest_phys_addr
        raise ValueError(f"gpa {gpa:#x} not in guest RAM")

    def close(self) -> None:
        for region in self.memory.clear():
            self._unmap(region)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclasses.dataclass(slots=True)
class FrontendQueue:
    """One queue as the front-end sets it up: ring addresses (gpa), size, eventfds."""

    index: int
    size: int
    desc_gpa: int
    driver_gpa: int
    device_gpa: int
    base: int | None = None  # None: a fresh ring (split 0; packed both wrap counters 1)
    kick_fd: int = -1
    call_fd: int = -1

    def kick(self) -> None:
        """The guest notifies the queue (QEMU's ioeventfd fires the kick eventfd)."""
        os.write(self.kick_fd, (1).to_bytes(8, sys.byteorder))

    def wait_call(self, timeout_s: float = 2.0) -> bool:
        """Wait for the back-end to signal the call eventfd; consume it."""
        ready, _, _ = select.select([self.call_fd], [], [], timeout_s)
        if not ready:
            return False
        os.read(self.call_fd, 8)
        return True

    def close(self) -> None:
        close_fds([fd for fd in (self.kick_fd, self.call_fd) if fd >= 0])
        self.kick_fd = self.call_fd = -1


class VhostUserFrontend:
    """A blocking vhost-user front-end over a connected UNIX socket."""

    def __init__(self, sock: socket.socket, *, timeout_s: float = 5.0) -> None:
        self.sock = sock
        self.timeout_s = timeout_s
        sock.settimeout(timeout_s)
        self.channel = MessageChannel(error_type=FrontendError)
        self.backend_sock: socket.socket | None = None
        self._backend_channel = MessageChannel(error_type=FrontendError)
        self.features = 0
        self.protocol_features = 0
        self.queues: dict[int, FrontendQueue] = {}

    @classmethod
    def connect(cls, path: str, *, timeout_s: float = 5.0) -> "VhostUserFrontend":
        """Connect to a back-end listening at ``path``, retrying until ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return cls(sock, timeout_s=timeout_s)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    # ------------------------------------------------------------------ raw messages

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & PF.REPLY_ACK)

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
             need_reply: bool = False) -> None:
        data = encode_message(request, payload, need_reply=need_reply)
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds))])
        else:
            self.sock.sendall(data)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes (hostile-input tests)."""
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds))])
        else:
            self.sock.sendall(data)

    def receive(self) -> Message:
        """The next message from the back-end (blocking, ``timeout_s``)."""
        return self._receive(self.sock, self.channel)

    def _receive(self, sock: socket.socket, channel: MessageChannel) -> Message:
        deadline = time.monotonic() + self.timeout_s
        while True:
            item = channel.next_message()
            if isinstance(item, Message):
                return item
            if isinstance(item, Closed):
                raise FrontendError("back-end closed the connection")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrontendError("timed out waiting for the back-end")
            sock.settimeout(remaining)
            try:
                data, anc, _flags, _ = sock.recvmsg(channel.wanted_bytes(), _CMSG_BYTES)
            except socket.timeout:
                raise FrontendError("timed out waiting for the back-end") from None
            except ConnectionResetError:
                data, anc = b"", []
            fds: list[int] = []
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                    fds.extend(arr)
            channel.receive(data, fds)

    def request(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                reply: bool = False, ack: bool | None = None) -> Message | None:
        """Send a request; return its reply when it has one (``reply``), or check the
        REPLY_ACK acknowledgement (``ack``: default = REPLY_ACK negotiated)."""
        if ack is None:
            ack = self.reply_ack and not reply
        self.send(request, payload, fds, need_reply=ack)
        if not (reply or ack):
            return None
        msg = self.receive()
        if msg.request != request or not msg.header.is_reply:
            close_fds(msg.fds)
            raise FrontendError(f"expected a reply to {FrontendReq(request).name}, got {msg}")
        if ack and not reply:
            value = U64.unpack(msg.payload).u64
            if value != 0:
                raise FrontendError(f"{FrontendReq(request).name} NACKed ({value})",
                                    request=request)
        return msg

    def _u64_request(self, request: FrontendReq) -> int:
        msg = self.request(request, reply=True)
        assert msg is not None
        return U64.unpack(msg.payload).u64

    # ------------------------------------------------------------------ the requests

    def get_features(self) -> int:
        return self._u64_request(FrontendReq.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.request(FrontendReq.SET_FEATURES, U64(features).pack())
        self.features = features

    def get_protocol_features(self) -> int:
        return self._u64_request(FrontendReq.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        # The ack (if any) follows the new protocol features: REPLY_ACK applies right away.
        self.send(FrontendReq.SET_PROTOCOL_FEATURES, U64(features).pack())
        self.protocol_features = features

    def set_owner(self) -> None:
        self.request(FrontendReq.SET_OWNER)

    def get_queue_num(self) -> int:
        return self._u64_request(FrontendReq.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        return self._u64_request(FrontendReq.GET_MAX_MEM_SLOTS)

    def set_mem_table(self, ram: GuestRam) -> None:
        self.request(FrontendReq.SET_MEM_TABLE, MemoryTable(tuple(ram.regions)).pack(),
                     [ram.fd] * len(ram.regions))

    def add_mem_reg(self, ram: GuestRam, region: MemoryRegion) -> None:
        self.request(FrontendReq.ADD_MEM_REG, MemRegMsg(region).pack(), [ram.fd])

    def rem_mem_reg(self, region: MemoryRegion) -> None:
        self.request(FrontendReq.REM_MEM_REG, MemRegMsg(region).pack())

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(FrontendReq.SET_VRING_NUM, VringState(index, num).pack())

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(FrontendReq.SET_VRING_BASE, VringState(index, base).pack())

    def set_vring_addr(self, index: int, desc_uva: int, used_uva: int, avail_uva: int,
                       log_gpa: int = 0, flags: int = 0) -> None:
        self.request(FrontendReq.SET_VRING_ADDR,
                     VringAddr(index, flags, desc_uva, used_uva, avail_uva, log_gpa).pack())

    def get_vring_base(self, index: int) -> int:
        msg = self.request(FrontendReq.GET_VRING_BASE, VringState(index, 0).pack(), reply=True)
        assert msg is not None
        return VringState.unpack(msg.payload).num

    def _set_vring_fd(self, request: FrontendReq, index: int, fd: int | None) -> None:
        self.request(request, VringFd(index, fd is None).pack(), [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(FrontendReq.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(FrontendReq.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(FrontendReq.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(FrontendReq.SET_VRING_ENABLE, VringState(index, int(enable)).pack())

    def get_config(self, offset: int, size: int) -> bytes:
        msg = self.request(FrontendReq.GET_CONFIG,
                           ConfigSpace(offset, size, 0, bytes(size)).pack(), reply=True)
        assert msg is not None
        if not msg.payload:
            raise FrontendError("GET_CONFIG failed (empty reply)")
        return ConfigSpace.unpack(msg.payload).payload

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.request(FrontendReq.SET_CONFIG, ConfigSpace(offset, len(data), flags, data).pack())

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[Inflight, int | None]:
        msg = self.request(FrontendReq.GET_INFLIGHT_FD,
                           Inflight(0, 0, num_queues, queue_size).pack(), reply=True)
        assert msg is not None
        return Inflight.unpack(msg.payload), (msg.fds[0] if msg.fds else None)

    def set_inflight_fd(self, inflight: Inflight, fd: int) -> None:
        self.request(FrontendReq.SET_INFLIGHT_FD, inflight.pack(), [fd])

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> None:
        """Hand the back-end the dirty-page log (QEMU does this when migration starts).
        Spec: vhost-user VHOST_USER_SET_LOG_BASE; with LOG_SHMFD the back-end replies."""
        body = LogDescription(size, offset).pack()
        if self.protocol_features & PF.LOG_SHMFD:
            self.request(FrontendReq.SET_LOG_BASE, body, [fd], reply=True)
        else:
            self.send(FrontendReq.SET_LOG_BASE, body, [fd])

    def set_status(self, status: int) -> None:
        self.request(FrontendReq.SET_STATUS, U64(status).pack())

    def get_status(self) -> int:
        return self._u64_request(FrontendReq.GET_STATUS)

    def reset_device(self) -> None:
        self.request(FrontendReq.RESET_DEVICE)

    # ------------------------------------------------------------------ back-end channel

    def setup_backend_channel(self) -> None:
        """Create the back-end request channel (a socketpair) and pass one end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.request(FrontendReq.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        finally:
            theirs.close()
        self.backend_sock = ours

    def receive_backend(self, timeout_s: float | None = None) -> Message:
        """The next back-end → front-end request (e.g. CONFIG_CHANGE_MSG); answers
        NEED_REPLY with 0."""
        if self.backend_sock is None:
            raise FrontendError("no back-end channel")
        saved = self.timeout_s
        self.timeout_s = timeout_s if timeout_s is not None else saved
        try:
            msg = self._receive(self.backend_sock, self._backend_channel)
        finally:
            self.timeout_s = saved
        if msg.header.need_reply:
            self.backend_sock.sendall(encode_message(msg.request, U64(0).pack(), reply=True))
        return msg

    # ------------------------------------------------------------------ QEMU's sequences

    def init(self, *, want_protocol: int = int(OFFERED_PROTOCOL_FEATURES),
             backend_channel: bool = True) -> int:
        """vhost_user_backend_init + vhost_dev_init. Returns the back-end's features."""
        features = self.get_features()
        if features & VF.VHOST_USER_F_PROTOCOL_FEATURES:
            offered = self.get_protocol_features()
            self.set_protocol_features(offered & want_protocol)
            if self.protocol_features & PF.MQ:
                self.queue_num = self.get_queue_num()
            if self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
                self.max_mem_slots = self.get_max_mem_slots()
            if backend_channel and self.protocol_features & PF.BACKEND_REQ:
                self.setup_backend_channel()
        self.set_owner()
        self.backend_features = features
        return features

    def start(self, ram: GuestRam, queues: Sequence[FrontendQueue], *, features: int,
              use_add_mem_reg: bool = False, status: int = 0xF) -> None:
        """vhost_dev_start: features, memory, then each queue, then enable and status."""
        self.set_features(features)
        if use_add_mem_reg and self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
            for region in ram.regions:
                self.add_mem_reg(ram, region)
        else:
            self.set_mem_table(ram)
        for q in queues:
            if q.kick_fd < 0:
                q.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            if q.call_fd < 0:
                q.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            if q.base is None:
                q.base = PACKED_FRESH_BASE if features & VF.RING_PACKED else 0
            self.set_vring_num(q.index, q.size)
            self.set_vring_base(q.index, q.base)
            self.set_vring_addr(q.index, ram.uva(q.desc_gpa), ram.uva(q.device_gpa),
                                ram.uva(q.driver_gpa), q.device_gpa)
            self.set_vring_kick(q.index, q.kick_fd)
            self.set_vring_call(q.index, q.call_fd)
            self.queues[q.index] = q
        if features & VF.VHOST_USER_F_PROTOCOL_FEATURES:
            for q in queues:
                self.set_vring_enable(q.index, True)
        if self.protocol_features & PF.STATUS:
            self.set_status(status)

    def stop(self) -> dict[int, int]:
        """vhost_dev_stop: disable, GET_VRING_BASE each queue (their bases), status 0."""
        if self.features & VF.VHOST_USER_F_PROTOCOL_FEATURES:
            for index in self.queues:
                self.set_vring_enable(index, False)
        bases = {}
        for index, q in self.queues.items():
            q.base = bases[index] = self.get_vring_base(index)
        if self.protocol_features & PF.STATUS:
            self.set_status(0)
        return bases

    def close(self) -> None:
        for q in self.queues.values():
            q.close()
        self.queues.clear()
        if self.backend_sock is not None:
            self.backend_sock.close()
            self.backend_sock = None
        self.channel.close()
        self.sock.close()

    def __enter__(self) -> "VhostUserFrontend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

