"""vhost-user endpoints in both roles and dirty-page logging, over real sockets.

- Connect mode: QEMU ``-chardev socket,server=on`` listens and the back-end connects, with
  retry until the front-end appears and reconnection after it goes away.
- LOG_SHMFD + VHOST_F_LOG_ALL: every guest page the back-end writes (RX data, used ring)
  is marked in the shared log, as live migration requires.

Spec: vhost-user "Introduction" (back-end as client or server), "Migration",
VHOST_USER_SET_LOG_BASE; virtio 1.2 §2.7.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import mmap

from tests.support.driver import Allocator, SplitDriver
from vhost_user.connection import Connector, Listener
from vhost_user.frontend import FrontendQueue, GuestRam, VhostUserFrontend
from vhost_user.wire import VirtioFeature as VF
from virtio.echo import EchoDevice, RX_QUEUE, TX_QUEUE
from virtio.loop import EventLoop

REGIONS = [(0, 1 << 20), (1 << 20, 1 << 20)]
PAGE = 4096


class LoopThread:
    def __init__(self) -> None:
        self.loop = EventLoop()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.loop.run_once(0.01)

    def call(self, fn):
        done, box = threading.Event(), {}

        def run():
            box["v"] = fn()
            done.set()

        self.loop.call_soon(run)
        assert done.wait(5)
        return box["v"]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.loop.close()


def _echo_once(fe: VhostUserFrontend, ram: GuestRam, payload: bytes, extra=0):
    features = int(VF.VERSION_1 | VF.VHOST_USER_F_PROTOCOL_FEATURES | VF.RING_EVENT_IDX) | extra
    alloc = Allocator(ram.memory)
    rx, tx = (SplitDriver(ram.memory, 16, event_idx=True, index=i, allocator=alloc)
              for i in (RX_QUEUE, TX_QUEUE))
    queues = [FrontendQueue(i, 16, *d.ring_addresses) for i, d in enumerate((rx, tx))]
    fe.start(ram, queues, features=features)
    rx_buf = rx.add_buf(in_sizes=[len(payload)])
    rx.kick_prepare()
    queues[RX_QUEUE].kick()
    tx.add_buf(out=[payload])
    tx.kick_prepare()
    queues[TX_QUEUE].kick()
    deadline = time.monotonic() + 5
    got = []
    while not got and time.monotonic() < deadline:
        queues[RX_QUEUE].wait_call(0.2)
        got = rx.get_bufs()
    return got, rx, rx_buf


def test_backend_connects_to_a_listening_frontend_and_reconnects(tmp_path):
    path = str(tmp_path / "qemu-server.sock")
    lt = LoopThread()
    events = []
    device = EchoDevice(lt.loop)
    connector = lt.call(lambda: Connector(lt.loop, path, device, retry_s=0.01, max_retry_s=0.05,
                                          on_frontend=events.append))
    try:
        time.sleep(0.1)  # the back-end retries while nobody listens
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        server.settimeout(5)
        for round_ in range(2):
            conn, _ = server.accept()
            fe = VhostUserFrontend(conn)
            ram = GuestRam(REGIONS)
            fe.init()
            got, _rx, _ = _echo_once(fe, ram, b"round %d" % round_)
            assert [u.data[: u.len_] for u in got] == [b"round %d" % round_]
            fe.close()
            ram.close()
        server.close()
        deadline = time.monotonic() + 5
        while events != [True, False, True, False] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events == [True, False, True, False]
    finally:
        lt.call(connector.close)
        lt.close()


def test_dirty_log_marks_every_page_the_backend_wrote(tmp_path):
    path = str(tmp_path / "vu.sock")
    lt = LoopThread()
    listener = lt.call(lambda: Listener(lt.loop, path, EchoDevice(lt.loop)))
    fe = VhostUserFrontend.connect(path)
    ram = GuestRam(REGIONS)
    log_size = (sum(size for _, size in REGIONS) // PAGE + 7) // 8
    log_fd = os.memfd_create("dirty-log")
    os.ftruncate(log_fd, log_size)
    try:
        fe.init()
        fe.set_log_base(log_fd, log_size)
        payload = bytes(range(256)) * 40  # 10 KiB: spans three RX pages
        got, rx, _ = _echo_once(fe, ram, payload, extra=int(VF.VHOST_F_LOG_ALL))
        assert [u.data[: u.len_] for u in got] == [payload]
        log = mmap.mmap(log_fd, log_size)
        dirty = {n for n in range(log_size * 8) if log[n // 8] >> (n % 8) & 1}
        desc_gpa = rx.ring_addresses[0] + 16 * got[0].id
        buf_gpa, buf_len, _flags, _next = struct.unpack("<QIHH", ram.memory.read(desc_gpa, 16))
        assert buf_len == len(payload)
        rx_pages = set(range(buf_gpa // PAGE, (buf_gpa + buf_len - 1) // PAGE + 1))
        used_page = rx.ring_addresses[2] // PAGE
        assert used_page in dirty, "the used ring write was not logged"
        assert rx_pages <= dirty, f"RX data pages {rx_pages - dirty} not logged"
        # Nothing the back-end only read (the TX buffer, the descriptor tables) is marked.
        assert dirty <= rx_pages | {used_page}, f"pages logged but not written: {dirty}"
        log.close()
    finally:
        os.close(log_fd)
        fe.close()
        ram.close()
        lt.call(listener.close)
        lt.close()
