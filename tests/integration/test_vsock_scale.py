"""The vsock backend at scale and with several VMs: 1,000 concurrent connections, two VMs in
one group talking by CID, duplicate CIDs refused.

Spec: virtio 1.2 §5.10.6.2 (Addressing); DESIGN.md "The vsock device" (several VMs, groups).
"""

from __future__ import annotations

import selectors
import shutil
import socket
import tempfile

import pytest

from tests.integration.test_vsock_device import REGIONS, Setup, pattern, vm_config
from tests.support.vsock_guest import BackendThread, VsockGuest
from vhost_user.frontend import GuestRam
from virtio.config import ConfigError
from virtio.vsock.device import VsockBackend
from virtio.vsock.errors import DuplicateCidError
from virtio.loop import EventLoop

N_CONNS = 1000


@pytest.fixture
def short_dir():
    path = tempfile.mkdtemp(prefix="vsk-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_thousand_concurrent_guest_connections(short_dir):
    s = Setup(short_dir, queue_size=256)
    try:
        g = s.guest
        server = s.host_listen(5555)
        server.setblocking(False)
        peers: list[socket.socket] = []
        conns = []
        for i in range(N_CONNS):
            conns.append(g.connect(5555, wait=False))
            if i % 64 == 63:
                g.pump(0)
        sel = selectors.DefaultSelector()
        sel.register(server, selectors.EVENT_READ)

        def accept_all():
            while True:
                try:
                    peer, _ = server.accept()
                except BlockingIOError:
                    return
                peer.setblocking(True)
                peer.settimeout(10)
                peers.append(peer)
        g.run_until(lambda: (accept_all(), all(c.state == "established" for c in conns))[1],
                    30)
        accept_all()
        assert len(peers) == N_CONNS
        rows = s.backend.call(lambda: s.backend.backend.muxer.connections(3))
        assert len(rows) == N_CONNS
        # Every connection carries its own bytes, both ways.
        for i, c in enumerate(conns):
            c.send(b"g%04d" % i)
        g.run_until(lambda: not any(c.txq for c in conns), 10)
        for _ in range(5):
            g.pump(0.01)
        got = sorted(p.recv(16) for p in peers)
        assert got == sorted(b"g%04d" % i for i in range(N_CONNS))
        for p in peers:
            p.sendall(b"h")
        g.run_until(lambda: all(bytes(c.received) == b"h" for c in conns), 20)
        for p in peers:
            p.close()
        g.run_until(lambda: not g.conns, 20)
        # The guest forgets a connection when it sends its RST; the back-end when that RST
        # has been processed, a moment later.
        g.run_until(lambda: s.backend.call(lambda: s.backend.backend.muxer.connections(3)) == [],
                    5)
    finally:
        s.close()


def test_two_vms_in_a_group_talk_by_cid(short_dir):
    cfgs = [vm_config(short_dir, cid=3, groups=("blue",)),
            vm_config(short_dir, cid=4, groups=("blue", "red"))]
    backend = BackendThread(cfgs)
    ram3, ram4 = GuestRam(REGIONS), GuestRam(REGIONS)
    g3 = VsockGuest.attach(cfgs[0].socket, ram3)
    g4 = VsockGuest.attach(cfgs[1].socket, ram4)
    try:
        assert (g3.cid, g4.cid) == (3, 4)
        g4.listen(700)
        c3 = g3.connect(700, cid=4, wait=False)
        g4.run_until(lambda: bool(g4.accept_queue[700]), 5)
        c4 = g4.accept(700)
        g3.run_until(lambda: c3.state == "established", 5)
        data = pattern(300_000, 4)
        c3.send(data)
        for _ in range(2000):
            g3.pump(0.001)
            g4.pump(0.001)
            if len(c4.received) == len(data):
                break
        assert bytes(c4.received) == data
        c4.send(b"back")
        for _ in range(200):
            g4.pump(0.001)
            g3.pump(0.001)
            if c3.received:
                break
        assert bytes(c3.received) == b"back"
        rows = backend.call(lambda: backend.backend.muxer.connections())
        assert len(rows) == 1 and rows[0].initiator.startswith("sibling")
    finally:
        g3.close()
        g4.close()
        backend.close()
        ram3.close()
        ram4.close()


def test_vms_without_a_common_group_cannot_talk(short_dir):
    cfgs = [vm_config(short_dir, cid=3, groups=("blue",)),
            vm_config(short_dir, cid=4, groups=("red",))]
    backend = BackendThread(cfgs)
    ram3, ram4 = GuestRam(REGIONS), GuestRam(REGIONS)
    g3 = VsockGuest.attach(cfgs[0].socket, ram3)
    g4 = VsockGuest.attach(cfgs[1].socket, ram4)
    try:
        g4.listen(700)
        c3 = g3.connect(700, cid=4, wait=False)
        for _ in range(20):
            g3.pump(0.01)
            g4.pump(0.01)
        assert not g4.accept_queue[700] and c3.state == "connecting"
        stats = backend.call(lambda: backend.backend.muxer.stats(3))
        assert stats.dropped_bad_cid == 1
    finally:
        g3.close()
        g4.close()
        backend.close()
        ram3.close()
        ram4.close()


def test_duplicate_cids_refused(short_dir):
    a = vm_config(short_dir, cid=5)
    b = vm_config(short_dir, cid=5)
    b = type(b)(guest_cid=5, socket=f"{short_dir}/other.sock", uds_path=f"{short_dir}/o")
    with pytest.raises(ConfigError):
        from virtio.config import Config
        Config(vsocks=(a, b))
    loop = EventLoop()
    backend = VsockBackend(loop, [a])
    try:
        with pytest.raises(DuplicateCidError):
            backend.add_vm(b)
        assert list(backend.devices) == [5]
    finally:
        backend.close()
        loop.close()
