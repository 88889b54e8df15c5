"""Front-end ↔ back-end over a real UNIX socket, with the echo device, split and packed.

The back-end runs on the project's event loop in a thread; the blocking front-end plays
QEMU and the guest-driver model lays the rings in the shared memfd RAM.

Spec: vhost-user "Ring states", VHOST_USER_GET_VRING_BASE, VHOST_USER_GET_CONFIG,
VHOST_USER_BACKEND_CONFIG_CHANGE_MSG; virtio 1.2 §2.7, §2.8.
"""

from __future__ import annotations

import os
import threading

import pytest

from ring import Virtqueue
from tests.support.driver import Allocator, PackedDriver, SplitDriver
from tests.support.frontend_fixtures import EchoDevice
from vhost_user.connection import Listener
from vhost_user.frontend import FrontendError, FrontendQueue, GuestRam, VhostUserFrontend
from vhost_user.wire import BackendReq, FrontendReq, VhostUserProtocolFeature as PF
from vhost_user.wire import VirtioFeature as VF
from virtio.loop import EventLoop

REGIONS = [(0, 1 << 20), (1 << 20, 1 << 20), (4 << 20, 1 << 20)]  # adjacent + a gap


class Backend:
    """An event loop in a thread serving ``device`` on a listener."""

    def __init__(self, path: str, device) -> None:
        self.loop = EventLoop()
        self.device = device
        self.listener = Listener(self.loop, path, device)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.loop.run_once(0.01)

    def call(self, fn):
        """Run ``fn`` on the loop thread and wait for it."""
        done = threading.Event()
        result = {}

        def run():
            try:
                result["value"] = fn()
            finally:
                done.set()

        self.loop.call_soon(run)
        assert done.wait(5)
        return result.get("value")

    def close(self) -> None:
        self.call(self.listener.close)
        self._stop.set()
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def backend(tmp_path):
    device = EchoDevice(num_queues=2)
    be = Backend(str(tmp_path / "vu.sock"), device)
    yield be
    be.close()


def _start(be, packed: bool, event_idx: bool = True, use_add_mem_reg: bool = False):
    fe = VhostUserFrontend.connect(be.listener.path)
    ram = GuestRam(REGIONS)
    offered = fe.init()
    features = int(VF.VERSION_1 | VF.VHOST_USER_F_PROTOCOL_FEATURES)
    if event_idx:
        features |= VF.RING_EVENT_IDX
    if packed:
        features |= VF.RING_PACKED
    assert features & ~offered == 0
    cls = PackedDriver if packed else SplitDriver
    alloc = Allocator(ram.memory)  # one guest allocator for both rings and their buffers
    drivers = [cls(ram.memory, 8, event_idx=event_idx, index=i, allocator=alloc)
               for i in range(2)]
    queues = [FrontendQueue(i, 8, *d.ring_addresses) for i, d in enumerate(drivers)]
    fe.start(ram, queues, features=features, use_add_mem_reg=use_add_mem_reg)
    return fe, ram, drivers, queues


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("use_add_mem_reg", [False, True], ids=["mem_table", "add_mem_reg"])
def test_echo_round_trip(backend, packed, use_add_mem_reg):
    fe, ram, drivers, queues = _start(backend, packed, use_add_mem_reg=use_add_mem_reg)
    try:
        for n, (drv, q) in enumerate(zip(drivers, queues)):
            payload = b"hello %d " % n * 50  # crosses nothing special, 400+ bytes
            drv.add_buf(out=[payload], in_sizes=[len(payload)])
            drv.kick_prepare()
            q.kick()
            assert q.wait_call(), "no call after the echo"
            used = drv.get_bufs()
            assert [u.data for u in used] == [payload]
            assert used[0].len_ == len(payload)
        bases = fe.stop()
        # Split: next avail index 1 (one chain). Packed: the chain took 2 descriptors, so
        # avail idx 2 / wrap 1 and used idx 2 / wrap 1 (vhost-user "vring descriptor indices").
        expected = (2 | 1 << 15 | 2 << 16 | 1 << 31) if packed else 1
        assert bases == {0: expected, 1: expected}
        assert [e for e in backend.device.events if e[0] == "stopped"] == [
            ("stopped", 0), ("stopped", 1)]
    finally:
        fe.close()
        ram.close()


def test_restart_rings_resume_from_base(backend):
    fe, ram, drivers, queues = _start(backend, packed=False)
    try:
        drv, q = drivers[0], queues[0]
        drv.add_buf(out=[b"one"], in_sizes=[3])
        q.kick()
        assert q.wait_call()
        fe.stop()
        # QEMU restarts the device with the saved bases (vhost_dev_start after stop).
        queues2 = [FrontendQueue(i, 8, *d.ring_addresses, base=queues[i].base)
                   for i, d in enumerate(drivers)]
        for old in queues:
            old.close()
        fe.queues.clear()
        fe.start(ram, queues2, features=fe.features)
        assert fe.queues[0].base == 1
        assert [u.data for u in drv.get_bufs()] == [b"one"]
        drv.add_buf(out=[b"two"], in_sizes=[3])
        queues2[0].kick()
        assert queues2[0].wait_call()
        assert [u.data for u in drv.get_bufs()] == [b"two"]
    finally:
        fe.close()
        ram.close()


def test_config_get_set_and_change_notification(backend):
    fe, ram, drivers, queues = _start(backend, packed=False)
    try:
        assert fe.get_config(0, 12) == bytes(range(12))
        fe.set_config(4, b"\xaa\xbb")
        assert fe.get_config(4, 2) == b"\xaa\xbb"
        with pytest.raises(FrontendError):
            fe.get_config(8, 8)  # beyond the device's 12 bytes: empty reply = error
        assert backend.call(lambda: backend.listener.connection.session.notify_config())
        msg = fe.receive_backend(timeout_s=2)
        assert msg.request == BackendReq.CONFIG_CHANGE_MSG
    finally:
        fe.close()
        ram.close()


def test_inflight_fd_status_and_mem_slots(backend):
    fe, ram, drivers, queues = _start(backend, packed=False)
    try:
        inflight, fd = fe.get_inflight_fd(2, 8)
        assert fd is not None
        # QueueRegionSplit: 16-byte header + 16 per descriptor, rounded up to 64.
        assert inflight.mmap_size == 2 * 192
        assert os.fstat(fd).st_size == inflight.mmap_size
        fe.set_inflight_fd(inflight, fd)
        os.close(fd)
        assert fe.get_status() == 0xF
        assert fe.max_mem_slots >= 8
        assert fe.queue_num == 2
    finally:
        fe.close()
        ram.close()


def test_next_frontend_is_served_after_disconnect(backend):
    fe, ram, drivers, queues = _start(backend, packed=False)
    fe.close()
    ram.close()
    fe2, ram2, drivers2, queues2 = _start(backend, packed=True)
    try:
        drivers2[1].add_buf(out=[b"again"], in_sizes=[5])
        queues2[1].kick()
        assert queues2[1].wait_call()
        assert [u.data for u in drivers2[1].get_bufs()] == [b"again"]
        assert ("reset",) in backend.device.events
    finally:
        fe2.close()
        ram2.close()


def test_malformed_message_drops_only_that_connection(backend):
    fe = VhostUserFrontend.connect(backend.listener.path)
    try:
        fe.send_raw(b"\x63\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00")  # unknown request 99
        with pytest.raises(FrontendError):
            fe.receive()
    finally:
        fe.close()
    fe2 = VhostUserFrontend.connect(backend.listener.path)
    try:
        assert fe2.get_features() & VF.VHOST_USER_F_PROTOCOL_FEATURES
    finally:
        fe2.close()
