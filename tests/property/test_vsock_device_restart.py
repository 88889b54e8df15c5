"""Queue restarts, device resets and the event queue of the vsock device, with bytes in flight.

The world of tests/fuzz/fuzz_vsock_device.py (a real `VsockBackend` whose queues a real
`BackendSession` sets up from vhost-user messages, memfd guest RAM, real UNIX sockets) with
queue 2 (the event queue) too. A restart step stops every queue while a TX chain waits
unkicked and host bytes wait unread, lets the host write and the guest queue more while
stopped, then starts again (`RESTARTS`):

- ``same``: QEMU's stop/cont (SET_VRING_ENABLE 0 and GET_VRING_BASE on every queue, then
  SET_FEATURES, SET_MEM_TABLE, SET_VRING_NUM/BASE/ADDR/KICK/CALL at those bases, enable):
  nothing is lost, duplicated or reordered either way;
- ``reset``: RESET_DEVICE and fresh rings (the guest driver was reset): the old host peers
  are closed, new connections work;
- ``reconnect``: the front-end goes away (the session closes: the device resets) and a new
  one sets up the same rings at their bases: the guest, which knows nothing, is told by
  TRANSPORT_RESET on the event queue if it posted a usable event buffer (else by an RST on
  its next packet), and the old host peers are closed;
- ``rx_only`` / ``tx_only``: one ring stopped with GET_VRING_BASE and started again alone
  while the other runs on (the device keeps the packets for the stopped RX ring): nothing
  lost, duplicated or reordered.

The guest posts event buffers of one kind per run (`EVENT_BUFFERS`): usable ones (4 bytes,
64 bytes, 2 + 2 bytes), none, too short, read-only, or none at first and good ones later.

Invariants (besides every invariant of the hostile-guest harness): the device writes no
guest memory while its queues are stopped; an event chain's used length stays within its
writable bytes; a TRANSPORT_RESET comes only after a device reset, at most once per reset,
and does come (used length exactly 4: Linux's virtio_vsock_event_done takes no other) when the
guest has a usable event buffer. Spec: vhost-user "Ring states", VHOST_USER_GET_VRING_BASE,
VHOST_USER_RESET_DEVICE; virtio 1.2 §5.10.6.7 (device events), §2.7.8.2 (used lengths).

Not here, because the device gets them wrong (tests/unit/
test_vsock_event_short_buffer_FAILING.py): a too-short or read-only event buffer followed
by a usable one (``short_then_good``, ``readonly_then_good``).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.fuzz_vsock_device import (EVENT_BUFFERS, GOOD, GOOD_SHAPES, HOSTILE_TX,
                                          RESTARTS, VICTIM, run_steps)
from tests.property.profiles import scaled

#: the device loses the reset on these (see the module docstring): left out until fixed
KNOWN_BAD_EVENT_BUFFERS = ("short_then_good", "readonly_then_good")
EVENT_KINDS = [e for e in EVENT_BUFFERS if e not in KNOWN_BAD_EVENT_BUFFERS]

restart = st.tuples(st.just("restart"), st.sampled_from(RESTARTS),
                    st.sampled_from([0, 1, 5000, 70000]), st.sampled_from([0, 7, 16384]))
step = st.one_of(
    restart, restart,
    st.tuples(st.just("send"), st.sampled_from([GOOD, GOOD, VICTIM]),
              st.sampled_from([1, 4097, 16384]), st.sampled_from(GOOD_SHAPES),
              st.integers(0, 255)),
    st.tuples(st.just("host_write"), st.sampled_from([GOOD, VICTIM]),
              st.sampled_from([100, 70000])),
    st.tuples(st.just("hostile"), st.sampled_from(HOSTILE_TX), st.integers(0, 1 << 16)),
    st.tuples(st.just("victim_reading"), st.booleans()),
    st.tuples(st.just("host_connect"), st.integers(0, 2), st.just("response"),
              st.just("whole"), st.just(100)),
    st.tuples(st.just("hconn_io"), st.just(4096)),
    st.just(("post_events",)),
)

RINGS = pytest.mark.parametrize("ring", ["c", "py"])


@RINGS
@pytest.mark.timeout(1800)
@scaled(0.05)
@given(steps=st.lists(step, min_size=1, max_size=8),
       events=st.sampled_from(EVENT_KINDS))
def test_restarts_and_resets_mid_stream_keep_every_invariant(ring, steps, events):
    """vhost-user "Ring states" and virtio 1.2 §5.10.6.7: stop/cont loses, duplicates and
    reorders nothing; after a reset the old host peers are closed and a guest with a usable
    event buffer gets TRANSPORT_RESET once (the invariants of the module docstring)."""
    run_steps(steps, ring, event_queue=True, event_buffers=events)


@RINGS
def test_stop_and_cont_with_bytes_in_flight_loses_nothing(ring):
    """vhost-user VHOST_USER_GET_VRING_BASE: QEMU's stop/cont twice, each with a TX chain
    not yet kicked and 70 KB unread in the host socket, and more of both while stopped:
    every byte arrives once and in order, and the connections stay up (no event: no reset).
    """
    world = run_steps([("send", GOOD, 16384, "two", 0), ("host_write", GOOD, 70000),
                       ("restart", "same", 70000, 16384), ("send", GOOD, 9000, "many", 3),
                       ("restart", "same", 5000, 7), ("host_write", GOOD, 100)], ring,
                      event_queue=True)
    good = world.conns[GOOD]
    assert world.restarts == 2 and world.generation == 0 and not world.events_seen
    assert good.state == "established" and not good.told
    assert len(good.received) == len(good.host_sent) == 70000 * 3 + 5000 * 2 + 100
    assert len(good.host_received) == len(good.sent) == 16384 * 3 + 9000 + 7 * 2


@pytest.mark.parametrize("ring, kind, events", [
    ("c", "reset", "good"), ("py", "reset", "readonly"), ("c", "reconnect", "split4"),
    ("py", "reconnect", "none"), ("c", "reconnect", "short"), ("c", "reconnect", "late_good")])
def test_a_reset_closes_the_host_peers_and_tells_the_guest(ring, kind, events):
    """virtio 1.2 §5.10.6.7: after RESET_DEVICE (fresh rings) or a front-end reconnect (same
    rings), the old host peers are closed; the guest gets one TRANSPORT_RESET of exactly 4
    bytes once it has a usable event buffer (late ones too), nothing else is written into
    unusable ones beyond their writable bytes, and new connections carry data both ways."""
    world = run_steps([("send", GOOD, 16384, "two", 0), ("host_write", GOOD, 70000),
                       ("restart", kind, 70000, 9000)]
                      + ([("post_events",)] if events == "late_good" else [])
                      + [("send", GOOD, 4097, "two", 0), ("host_write", GOOD, 5000)],
                      ring, event_queue=True, event_buffers=events)
    assert world.generation == 1
    assert all(c.peer_eof for c in world.retired)
    resets = [d for n, d in world.events_seen if n == 4]
    if events in ("none", "short", "readonly"):
        assert resets == []
    else:
        assert resets == [b"\0\0\0\0"]
    good = world.conns[GOOD]
    if kind == "reset" or resets:  # the guest knows: it connected again
        assert good.generation == 1 and good.state == "established"
        assert len(good.received) == 5000 and len(good.host_received) == 4097
    else:  # told by an RST when it sent on the old connection
        assert good.state == "closed" and good.told == "rst"


def test_regression_a_reset_after_a_malformed_request_again():
    """A guest REQUEST repeated on a connection the device had reset made the device connect
    the host service once more; after a device reset the harness took that stale socket for
    the new connection's (found by the fuzz loop, seed 44). virtio 1.2 §5.10.6.7: the new
    connections after the reset carry data."""
    world = run_steps([("hostile", "bad_op", 44718), ("hostile", "request_again", 46260),
                       ("restart", "reset", 18000, 10944), ("send", VICTIM, 100, "two", 0)],
                      "py", event_queue=True, event_buffers="big")
    assert world.stale and world.conns[VICTIM].host_received == world.conns[VICTIM].sent
    assert len(world.conns[VICTIM].sent) == 100
