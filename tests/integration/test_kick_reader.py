"""A device that reads its own kick eventfds (``QueueHandle.kick_reader``), over a real
front-end connection: called with the queue's current kick fd while the queue is live, never
after it stopped, and the old path (drain + ``device.kick``) again once the device stops
claiming it.

Spec: vhost-user VHOST_USER_SET_VRING_KICK ("Ring states": a kick on a started ring means
"process it"), VHOST_USER_GET_VRING_BASE (stops the ring).
"""

from __future__ import annotations

import os
import socket
import time

from tests.integration.test_vhost_user_modes import LoopThread
from tests.support.driver import Allocator, SplitDriver
from tests.support.frontend_fixtures import EchoDevice
from vhost_user.connection import Connection
from vhost_user.frontend import FrontendQueue, GuestRam, VhostUserFrontend
from vhost_user.wire import VirtioFeature as VF

FEATURES = int(VF.VERSION_1 | VF.VHOST_USER_F_PROTOCOL_FEATURES)


class ClaimingEcho(EchoDevice):
    """The echo device, reading queue 0's kick fd itself while ``claim`` is set."""

    def __init__(self) -> None:
        super().__init__(num_queues=1)
        self.claim = True
        self.reads: list[tuple[int, int]] = []  # (kick fd, eventfd counter read)
        self.kicks: list[int] = []

    def queue_started(self, handle) -> None:
        if self.claim:
            handle.kick_reader = self._read_kick
        super().queue_started(handle)

    def _read_kick(self, fd: int) -> None:
        try:
            count = int.from_bytes(os.read(fd, 8), "little")
        except BlockingIOError:
            count = 0
        self.reads.append((fd, count))
        super().kick(0)

    def kick(self, index: int) -> None:
        self.kicks.append(index)
        super().kick(index)


def _wait(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def _setup():
    lt = LoopThread()
    device = ClaimingEcho()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    lt.call(lambda: Connection(lt.loop, ours, device))
    fe = VhostUserFrontend(theirs)
    fe.init()
    ram = GuestRam([(0, 1 << 20)])
    drv = SplitDriver(ram.memory, 16, allocator=Allocator(ram.memory), index=0)
    queue = FrontendQueue(0, 16, *drv.ring_addresses)
    fe.start(ram, [queue], features=FEATURES)
    assert _wait(lambda: ("started", 0) in device.events)
    lt.call(device.kicks.clear)  # queue_started's own look at the ring is not a kick
    return lt, device, fe, ram, drv, queue


def _echo(drv: SplitDriver, queue: FrontendQueue, payload: bytes) -> bytes:
    drv.add_buf(out=[payload], in_sizes=[len(payload)])
    drv.kick_prepare()
    queue.kick()
    assert queue.wait_call(5), "no call: the kick was not served"
    (used,) = drv.get_bufs()
    return used.data


def test_the_device_reads_its_kicks_with_the_current_fd():
    lt, device, fe, ram, drv, queue = _setup()
    try:
        assert _echo(drv, queue, b"first") == b"first"
        # every kick drained by the device (a first look when the watch began may read 0)
        assert sum(count for _fd, count in device.reads) == 1
        assert device.kicks == [], "the session drained and forwarded a claimed kick"
        old_fd = device.reads[-1][0]
        # A new kick eventfd for the running ring: the reader follows it.
        new_kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.set_vring_kick(0, new_kick)
        os.close(queue.kick_fd)
        queue.kick_fd = new_kick
        before = len(device.reads)
        assert _echo(drv, queue, b"second") == b"second"
        fds = {fd for fd, _count in device.reads[before:]}
        assert fds and old_fd not in fds
    finally:
        fe.close()
        lt.close()
        ram.close()


def test_no_reads_after_the_queue_stopped_and_the_old_path_returns():
    lt, device, fe, ram, drv, queue = _setup()
    try:
        assert _echo(drv, queue, b"x") == b"x"
        fe.get_vring_base(0)  # stops the ring (and drops its kick fd)
        assert _wait(lambda: ("stopped", 0) in device.events)
        reads = len(device.reads)
        os.write(queue.kick_fd, (1).to_bytes(8, "little"))
        time.sleep(0.1)
        assert len(device.reads) == reads
        # Restarted without a claim: the session drains and calls device.kick again.
        device.claim = False
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.set_vring_base(0, drv.avail_idx_shadow)
        fe.set_vring_call(0, call)
        fe.set_vring_kick(0, kick)
        queue.close()
        queue.kick_fd, queue.call_fd = kick, call
        assert _echo(drv, queue, b"y") == b"y"
        assert device.kicks and len(device.reads) == reads
    finally:
        fe.close()
        lt.close()
        ram.close()
