"""Host-initiated vsock connections (hybrid vsock ``CONNECT <port>``) under a hostile guest.

The world of tests/fuzz/fuzz_vsock_device.py (a real `VsockBackend`, memfd guest RAM, real
UNIX sockets, queues set up through a real `BackendSession`), with host clients connecting
to the back-end's UNIX socket and writing ``CONNECT <port>\\n`` (virtio/vsock/handshake.py):
whole with bytes after it, in two pieces, or closing right after it; and clients whose line
is bad, cut short, or who close mid-line. The guest answers the device's REQUEST with
RESPONSE, RST, nothing, a RESPONSE after the device gave up, a CREDIT_UPDATE, or garbage
(RW, SHUTDOWN, REQUEST, a RESPONSE of another type).

Invariants (besides every invariant of the hostile-guest harness): a client reads
``OK <port>`` only if the guest sent RESPONSE in time, then exactly the guest's bytes in
order, and the guest gets the client's bytes (those after the line first) in order; a
refused, timed-out or reset one is closed without a byte; a garbage answer gets the guest an
RST (as Linux's connecting side resets: virtio_transport_recv_connecting); a bad or unfinished
line gets no REQUEST, no byte, and is closed (at once, or after the handshake timeout);
no handshake stays pending. Spec: virtio 1.2 §5.10.6.2 (connection set-up), §5.10.6.3
(credit); the hybrid-vsock convention (Firecracker docs/vsock.md).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.fuzz_vsock_device import (BAD_LINES, CONNECT_HOW, GOOD, GOOD_SHAPES,
                                          HOST_ANSWERS, HOSTILE_TX, PARTIAL_LINES, VICTIM,
                                          Violation, World, run_steps)
from tests.property.profiles import scaled

host_connect = st.tuples(st.just("host_connect"), st.integers(0, 2),
                         st.sampled_from(HOST_ANSWERS), st.sampled_from(CONNECT_HOW),
                         st.sampled_from([0, 1, 100, 5000, 70000]))
bad_line = st.tuples(st.just("host_bad_line"), st.integers(0, len(BAD_LINES + PARTIAL_LINES)),
                     st.sampled_from(["wait", "close"]))
hconn_io = st.tuples(st.just("hconn_io"), st.sampled_from([1, 4096, 40000]))
others = st.one_of(
    st.tuples(st.just("send"), st.sampled_from([GOOD, VICTIM]), st.sampled_from([7, 9000]),
              st.sampled_from(GOOD_SHAPES), st.integers(0, 255)),
    st.tuples(st.just("hostile"), st.sampled_from(HOSTILE_TX), st.integers(0, 1 << 16)),
    st.tuples(st.just("host_write"), st.sampled_from([GOOD, VICTIM]),
              st.sampled_from([100, 70000])),
    st.tuples(st.just("victim_reading"), st.booleans()),
)
step = st.one_of(host_connect, host_connect, bad_line, hconn_io, hconn_io, others,
                 st.just(("wait",)))
steps = st.lists(step, min_size=1, max_size=10)

RINGS = pytest.mark.parametrize("ring", ["c", "py"])


@RINGS
@pytest.mark.timeout(1800)
@scaled(0.05)
@given(steps=steps)
def test_host_clients_and_guest_answers_keep_every_invariant(ring, steps):
    """virtio 1.2 §5.10.6.2: whatever host clients write and however the guest answers the
    REQUEST, a client is connected exactly when the guest accepted, and every byte of an
    accepted connection arrives in order both ways (the invariants of the module
    docstring)."""
    run_steps(steps, ring)


@RINGS
def test_each_guest_answer_to_a_host_connect(ring):
    """virtio 1.2 §5.10.6.2: every answer of the guest to the REQUEST for a host client's
    ``CONNECT`` (with bytes after the line), side by side with an accepted connection that
    moves 70 KB host to guest and 16 KiB back, then the timeouts: only RESPONSE connects."""
    world = run_steps([("host_connect", i, answer, "whole", 100)
                       for i, answer in enumerate(HOST_ANSWERS)]
                      + [("host_connect", 1, "response", "split", 0),
                         ("hconn_io", 70000), ("wait",), ("hconn_io", 10)], ring)
    *answered, accepted = world.hconns
    assert accepted.raw.startswith(b"OK 5001\n")
    assert len(accepted.received) == len(accepted.host_sent) > 70000
    assert len(accepted.host_received) == len(accepted.sent) > 16000  # (16 KiB a send)
    assert sorted(c.answer for c in answered) == sorted(HOST_ANSWERS)
    for c in answered:
        assert c.requested
        if c.answer == "response":
            assert c.raw.startswith(c.ok_line)
            assert c.received[:100] == c.host_sent[:100] and len(c.host_sent) >= 100
        else:
            assert c.raw == b"" and c.peer_eof, c


@RINGS
def test_bad_or_unfinished_connect_lines_are_closed_without_a_request(ring):
    """Hybrid vsock handshake (virtio/vsock/handshake.py): a line the parser refuses is
    closed at once, an unfinished one at the handshake timeout, and neither reaches the
    guest (a REQUEST for it fails the harness); a client that closes mid-line leaves no
    handshake behind; a good client next to them connects."""
    lines = range(len(BAD_LINES + PARTIAL_LINES))
    world = run_steps([("host_bad_line", i, then) for i in lines for then in ("wait", "close")]
                      + [("host_connect", 0, "response", "whole", 5), ("hconn_io", 100)], ring)
    waited = [cl for cl in world.clients if not cl.closed_by_us]
    assert len(waited) == len(lines) and all(cl.eof and not cl.got for cl in waited)
    assert world.hconns[0].raw.startswith(b"OK 5000\n")


def test_the_harness_catches_a_client_that_reads_ok_for_a_refused_connection():
    """The check is not vacuous: a client that read an OK the guest never sent fails it."""
    world = World("c")
    try:
        world.connect()
        world.settle()
        world.host_connect(0, "rst", "whole", 0)
        world.settle()
        world.hconns[0].raw += b"OK 5000\n"
        with pytest.raises(Violation, match="got OK"):
            world.check_host_initiated(final=False)
    finally:
        world.close()
