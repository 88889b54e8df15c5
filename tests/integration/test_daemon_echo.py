"""The daemon serving the echo test device end to end: the project's front-end (QEMU's
role) and guest-driver model over a real UNIX socket and memfd guest RAM, both ring layouts
and both ring implementations, megabytes streamed through the batched data path.

Spec: virtio 1.2 §2.7 (split), §2.8 (packed); vhost-user "Ring states".
"""

from __future__ import annotations

import threading

import pytest

from tests.support import ring_impl_class
from tests.support.driver import Allocator, PackedDriver, SplitDriver
from vhost_user.frontend import FrontendQueue, GuestRam, VhostUserFrontend
from vhost_user.wire import VirtioFeature as VF
from virtio.config import Config
from virtio.daemon import Daemon
from virtio.echo import RX_QUEUE, TX_QUEUE

REGIONS = [(0, 2 << 20), (2 << 20, 2 << 20)]  # two adjacent regions: buffers straddle them
QUEUE_SIZE = 64
CHUNK = 3000  # not a power of two, so chains and RX buffers never line up


class DaemonThread:
    def __init__(self, config: Config, virtqueue_factory) -> None:
        self.daemon = Daemon(config, virtqueue_factory=virtqueue_factory)
        self.daemon.start()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.daemon.loop.run_once(0.01)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.daemon.close()
        self.daemon.loop.close()


@pytest.fixture(params=["py", "c"])
def ring_impl(request):
    return ring_impl_class(request.param)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_echo_streams_megabytes_byte_for_byte(tmp_path, ring_impl, packed):
    sock = str(tmp_path / "echo.sock")
    backend = DaemonThread(Config(echo_sockets=(sock,)), ring_impl)
    fe = VhostUserFrontend.connect(sock)
    ram = GuestRam(REGIONS)
    try:
        offered = fe.init()
        features = int(VF.VERSION_1 | VF.VHOST_USER_F_PROTOCOL_FEATURES | VF.RING_EVENT_IDX)
        if packed:
            features |= VF.RING_PACKED
        assert features & ~offered == 0
        cls = PackedDriver if packed else SplitDriver
        alloc = Allocator(ram.memory)
        rx, tx = (cls(ram.memory, QUEUE_SIZE, event_idx=True, index=i, allocator=alloc)
                  for i in (RX_QUEUE, TX_QUEUE))
        queues = [FrontendQueue(i, QUEUE_SIZE, *d.ring_addresses) for i, d in enumerate((rx, tx))]
        fe.start(ram, queues, features=features)

        total = 4 << 20
        pattern = bytes((i * 7 + i // 251) & 0xFF for i in range(CHUNK * 4))
        sent = received = 0
        got = bytearray()
        rx_posted = 0
        tx_posted = 0
        while received < total:
            while rx_posted < QUEUE_SIZE // 2:
                rx.add_buf(in_sizes=[4096])
                rx_posted += 1
            if rx.kick_prepare():
                queues[RX_QUEUE].kick()
            while sent < total and tx_posted < QUEUE_SIZE // 2:
                n = min(CHUNK, total - sent)
                off = sent % CHUNK
                tx.add_buf(out=[pattern[off:off + n]])
                sent += n
                tx_posted += 1
            if tx.kick_prepare():
                queues[TX_QUEUE].kick()
            queues[RX_QUEUE].wait_call(0.2)
            for used in rx.get_bufs():
                got += used.data[: used.len_]
                received += used.len_
                rx_posted -= 1
            tx_posted -= len(tx.get_bufs())
        expected = b"".join(pattern[(s % CHUNK):(s % CHUNK) + min(CHUNK, total - s)]
                            for s in range(0, total, CHUNK))
        assert bytes(got) == expected
        assert backend.daemon.devices[0][1].bytes_echoed == total
    finally:
        fe.close()
        ram.close()
        backend.close()
