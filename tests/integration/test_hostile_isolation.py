"""A hostile guest ring breaks only its own queue: the process, the other queues of the
same device and other devices in the same process keep serving, and the offending chain is
returned with used length 0.

Spec: virtio 1.2 §2.7.5.3.1 ("A driver MUST NOT create a descriptor chain longer than the
Queue Size of the device"), §2.7.13.2; STYLE R5 (guest errors never escape the loop).
"""

from __future__ import annotations

import threading
import time

import pytest

from ring.errors import ChainError
from tests.support import ring_impl_class
from tests.support.driver import Allocator, SplitDriver
from vhost_user.frontend import FrontendQueue, GuestRam, VhostUserFrontend
from vhost_user.wire import VirtioFeature as VF
from virtio.config import Config
from virtio.daemon import Daemon
from virtio.echo import RX_QUEUE, TX_QUEUE

NEXT = 1


def _used_idx(driver) -> int:
    return int.from_bytes(driver.read(driver.used_gpa + 2, 2), "little")


class Guest:
    """One front-end + split rings for an echo device."""

    def __init__(self, path: str) -> None:
        self.fe = VhostUserFrontend.connect(path)
        self.ram = GuestRam([(0, 1 << 20)])
        self.fe.init()
        alloc = Allocator(self.ram.memory)
        self.rx, self.tx = (SplitDriver(self.ram.memory, 16, event_idx=False, index=i,
                                        allocator=alloc) for i in (RX_QUEUE, TX_QUEUE))
        self.queues = [FrontendQueue(i, 16, *d.ring_addresses)
                       for i, d in enumerate((self.rx, self.tx))]
        self.fe.start(self.ram, self.queues,
                      features=int(VF.VERSION_1 | VF.VHOST_USER_F_PROTOCOL_FEATURES))

    def echo(self, payload: bytes) -> bytes:
        self.rx.add_buf(in_sizes=[len(payload)])
        self.queues[RX_QUEUE].kick()
        self.tx.add_buf(out=[payload])
        self.queues[TX_QUEUE].kick()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self.queues[RX_QUEUE].wait_call(0.1)
            got = self.rx.get_bufs()
            if got:
                self.tx.get_bufs()
                return b"".join(u.data[: u.len_] for u in got)
        raise AssertionError("no echo within 5 s")

    def close(self) -> None:
        self.fe.close()
        self.ram.close()


@pytest.mark.parametrize("impl", ["py", "c"])
def test_descriptor_loop_breaks_only_that_queue(tmp_path, impl):
    paths = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]
    daemon = Daemon(Config(echo_sockets=tuple(paths)), virtqueue_factory=ring_impl_class(impl))
    daemon.start()
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [daemon.loop.run_once(0.01)
                                              for _ in iter(stop.is_set, True)], daemon=True)
    thread.start()
    hostile, bystander = Guest(paths[0]), Guest(paths[1])
    try:
        assert hostile.echo(b"before") == b"before"
        # Two descriptors pointing at each other: a loop (§2.7.5.3.1).
        buf = hostile.tx.alloc.alloc(64, 16)
        hostile.tx.write_desc(14, buf, 64, NEXT, 15)
        hostile.tx.write_desc(15, buf, 64, NEXT, 14)
        hostile.queues[TX_QUEUE].wait_call(0)  # consume the call of the first echo
        hostile.tx.expose(14)
        hostile.queues[TX_QUEUE].kick()
        assert hostile.queues[TX_QUEUE].wait_call(5), "the broken chain was not returned"
        assert _used_idx(hostile.tx) == 2
        assert hostile.tx.used_elem(1) == (14, 0)
        # The other device in the same process is unaffected...
        assert bystander.echo(b"still here" * 100) == b"still here" * 100
        # ...and only the offending queue is broken: the hostile guest's receive queue is
        # still live, and the loop thread still runs.
        echo = daemon.devices[0][1]
        assert echo._queues[TX_QUEUE].vq.broken == ChainError.LOOP
        assert echo._queues[RX_QUEUE].vq.broken is None
        assert thread.is_alive()
    finally:
        hostile.close()
        bystander.close()
        stop.set()
        thread.join(5)
        daemon.close()
        daemon.loop.close()


def test_broken_queue_recovers_after_the_frontend_reconnects(tmp_path):
    path = str(tmp_path / "a.sock")
    daemon = Daemon(Config(echo_sockets=(path,)))
    daemon.start()
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [daemon.loop.run_once(0.01)
                                              for _ in iter(stop.is_set, True)], daemon=True)
    thread.start()
    try:
        guest = Guest(path)
        guest.tx.write_desc(3, 0, 16, NEXT, 99)  # next >= queue size
        guest.tx.expose(3)
        guest.queues[TX_QUEUE].kick()
        assert guest.queues[TX_QUEUE].wait_call(5)
        assert _used_idx(guest.tx) == 1 and guest.tx.used_elem(0) == (3, 0)
        guest.close()
        # A new front-end session (the guest rebooted) gets a working device again.
        again = Guest(path)
        assert again.echo(b"fresh") == b"fresh"
        again.close()
    finally:
        stop.set()
        thread.join(5)
        daemon.close()
        daemon.loop.close()
