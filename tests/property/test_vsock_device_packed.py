"""The vsock device on packed rings under a hostile guest (VIRTIO_F_RING_PACKED).

The back-end session offers VIRTIO_F_RING_PACKED to every device, the vsock device
included (``OFFERED_TRANSPORT_FEATURES``; a test below pins it), so a front-end may set the
vsock queues up as packed rings. The world of tests/fuzz/fuzz_vsock_device.py then runs
with `PackedDriver` rings: the same steps as tests/property/test_vsock_device_hostile.py
(good traffic, lying headers, odd TX/RX layouts, host peers that stop reading, close or
reset), host-initiated connections, and queue restarts with packed GET_VRING_BASE values
(both indices and wrap counters), with every invariant of the harness. The driver writes
and the device overwrites packed descriptors in place, so the memory check allows the
device the descriptor ring and its event suppression area.

Not here: hostile packed descriptor layouts (loops, nested indirect, ...) — the harness's
"break" steps craft split rings only; tests/property/test_ring_differential.py covers
packed ones at the ring level. Spec: virtio 1.2 §2.8 (Packed Virtqueues), §5.10.6.
"""

from __future__ import annotations

import pytest
from hypothesis import given

from tests.fuzz.fuzz_vsock_device import GOOD, World, run_steps
from tests.property.profiles import scaled
from tests.property.test_vsock_device_hostile import steps
from vhost_user.session import BackendSession
from vhost_user.wire import VirtioFeature

RINGS = pytest.mark.parametrize("ring", ["c", "py"])


def test_the_session_offers_packed_rings_for_the_vsock_device():
    """virtio 1.2 §2.8: the vsock back-end offers VIRTIO_F_RING_PACKED (so packed vsock
    queues are in scope)."""
    world = World("c")
    try:
        offered = BackendSession(world.dev, signal=lambda fd: None).offered_features()
        assert offered & VirtioFeature.RING_PACKED
    finally:
        world.close()


@RINGS
@pytest.mark.timeout(1800)
@scaled(0.05)
@given(steps=steps)
def test_packed_rings_keep_every_invariant(ring, steps):
    """virtio 1.2 §2.8, §5.10.6.3: on packed rings, the hostile-guest steps keep every
    invariant of the harness (no escaped exception, guest memory, credit, delivery)."""
    run_steps(steps, ring, packed=True)


@RINGS
def test_packed_stop_and_cont_and_host_connect_lose_nothing(ring):
    """vhost-user VHOST_USER_GET_VRING_BASE (packed: both indices and wrap counters): a
    stop/cont with bytes in flight (about a hundred RX chains of 4 KiB, so the ring wraps
    around the restart or near it) and a host-initiated connection lose, duplicate and
    reorder nothing."""
    world = run_steps([("send", GOOD, 16384, "two", 0), ("host_write", GOOD, 300000),
                       ("restart", "same", 70000, 16384),
                       ("host_connect", 0, "response", "whole", 100), ("hconn_io", 40000),
                       ("send", GOOD, 9000, "many", 3), ("restart", "same", 5000, 7)],
                      ring, packed=True, event_queue=True)
    good = world.conns[GOOD]
    assert world.restarts == 2 and not world.events_seen
    assert len(good.received) == len(good.host_sent) > 300000  # (what the socket took)
    assert len(good.host_received) == len(good.sent) == 16384 * 3 + 9000 + 7 * 2
    assert world.hconns[0].raw.startswith(b"OK 5000\n")
