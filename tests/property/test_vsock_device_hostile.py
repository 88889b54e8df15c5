"""The whole vsock device under a hostile guest and misbehaving host peers.

A real `VsockDevice` (C rings by default, the Python rings too) runs in-process over memfd
guest RAM, with two established stream connections to real host UNIX sockets; Hypothesis
generates step lists mixing well-formed traffic with hostile guest actions and host events
(tests/fuzz/fuzz_vsock_device.py has the world, the guest model and every invariant).

Invariants: no exception escapes the device; guest memory outside the device-writable RX
buffers and the used rings never changes (Spec: virtio 1.2 §2.7.4); TX chains are used with
length 0 (§5.10.6.1) and RX used lengths stay within the chain (§2.7.8.2); the guest's credit
is never overrun (§5.10.6.3); every byte of a well-behaved connection arrives in order exactly
once or the guest is told the connection ended; the good connection keeps moving whatever
the other one's peer does; a broken queue stays stopped and is logged once.

``HYPOTHESIS_PROFILE=nightly`` runs many more, longer examples.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.fuzz_vsock_device import (BREAKS, GOOD, GOOD_SHAPES, HOSTILE_TX, RX_SHAPES,
                                          VICTIM, World, decode, run_steps)
from tests.property.profiles import scaled

sizes = st.sampled_from([1, 7, 100, 4096, 4097, 9000, 16 * 1024, 40000])
send = st.tuples(st.just("send"), st.sampled_from([GOOD, GOOD, VICTIM]), sizes,
                 st.sampled_from(GOOD_SHAPES), st.integers(0, 255))
hostile = st.tuples(st.just("hostile"), st.sampled_from(HOSTILE_TX), st.integers(0, 1 << 16))
post_rx = st.tuples(st.just("post_rx"), st.sampled_from(RX_SHAPES), st.integers(1, 4))
host_write = st.tuples(st.just("host_write"), st.sampled_from([GOOD, VICTIM]),
                       st.sampled_from([1, 100, 4096, 5000, 70000, 300000]))
host_events = st.one_of(
    st.tuples(st.just("victim_reading"), st.booleans()),
    st.tuples(st.just("victim_consume"), st.booleans()),
    st.tuples(st.just("victim_close"), st.sampled_from(["close", "close_unread", "shut_wr"])),
    st.tuples(st.just("victim_shutdown"), st.integers(1, 3)),
)
breaks = st.tuples(st.just("break"), st.sampled_from([0, 1]), st.sampled_from(BREAKS),
                   st.integers(0, 255))
step = st.one_of(send, send, hostile, hostile, post_rx, host_write, host_write, host_events,
                 st.just(("idle",)))
steps = st.lists(step, max_size=25)
steps_then_break = st.tuples(st.lists(step, max_size=8), breaks, st.lists(step, max_size=8))


RINGS = pytest.mark.parametrize("ring", ["c", "py"])


@RINGS
@pytest.mark.timeout(1800)  # nightly: about 450 examples of up to a second or two each
@scaled(0.15)
@given(steps=steps)
def test_hostile_guest_and_host_peers_keep_every_invariant(ring, steps):
    """virtio 1.2 §5.10.6.3: the good connection delivers every byte both ways in order, and
    nothing the guest or a host peer does breaks the invariants of the module docstring."""
    run_steps(steps, ring)


@RINGS
@scaled(0.1)
@given(case=steps_then_break)
def test_a_broken_queue_stays_stopped_and_is_logged_once(ring, case):
    """virtio 1.2 §2.7.5.2 and STYLE R5: after a ring error the queue uses no chain until
    reset, whatever the guest or the host does next, and the error is logged once."""
    before, brk, after = case
    run_steps(before + [brk] + after, ring)


@RINGS
def test_a_tx_queue_broken_is_logged_once_however_often_the_guest_kicks(ring):
    """virtio 1.2 §2.7.5.2, STYLE R5: one message per broken queue, not one per kick (a
    hostile guest must not flood the log)."""
    world = World(ring)
    try:
        world.connect()
        world.settle()
        world.break_ring(1, "loop", 0)  # a TX descriptor whose next is itself
        assert world.txvq.broken is not None
        for _ in range(5):
            world.device(world.dev.kick, 1)
        assert world.records.count("TX queue broken") == 1
    finally:
        world.close()


@RINGS
def test_an_rx_queue_broken_is_logged_once_however_often_the_host_writes(ring):
    """virtio 1.2 §2.7.5.2, STYLE R5: the host peer writing on and on (each write an RX
    pass or an RX pump run that finds the queue broken) logs the broken queue once."""
    world = World(ring)
    try:
        world.connect()
        world.settle()
        world.break_ring(0, "loop", 0)  # an RX descriptor whose next is itself
        for _ in range(5):
            world.host_write(world.conns[GOOD], 40000)  # past the buffers posted before it
            world.settle(force_kick=True)
        assert world.rxvq.broken is not None
        assert world.records.count("RX queue broken") == 1
    finally:
        world.close()


def test_harness_reaches_full_sockets_and_busy_connections():
    """The harness is not degenerate: a victim peer that stops reading fills its socket
    while the good connection moves megabytes both ways."""
    world = run_steps([("victim_reading", False)]
                      + [("send", VICTIM, 16 * 1024, "two", 0)] * 40
                      + [("send", GOOD, 16 * 1024, s, 5) for s in GOOD_SHAPES] * 4
                      + [("host_write", GOOD, 300000)] * 3, "c")
    good, victim = world.conns
    assert len(good.sent) == len(good.host_received) >= 300000
    assert len(good.received) == len(good.host_sent) >= 300000
    assert VICTIM in world.out_of_credit and GOOD not in world.out_of_credit
    assert len(victim.host_received) == len(victim.sent) > 0


def test_fuzz_byte_decoder_covers_every_step_kind():
    """The atheris entry point decodes bytes into every kind of step."""
    kinds = set()
    for i in range(400):
        _ring, got = decode(bytes((i * 37 + j * 11) & 0xFF for j in range(80)))
        kinds |= {s[0] for s in got}
    assert kinds >= {"send", "hostile", "post_rx", "host_write", "victim_reading",
                     "victim_consume", "victim_close", "victim_shutdown", "idle",
                     "host_connect", "host_bad_line", "hconn_io", "wait", "restart",
                     "post_events"}
    assert World  # the world class the fuzz target runs


@pytest.mark.parametrize("seed", [b"\x00" + bytes(range(7, 250, 3)), b"\x01" + b"\x05\x03" * 30,
                                  b"\x00\x04\x01\x00\x04\x02\x00\x09\x01\x00\x0a\x01\x01\x00",
                                  b"\x06" + bytes(range(7, 250, 3)),  # packed, event queue
                                  b"\x05\x0f\x80\x01\x10\x20\x0f\x90\x02\x40\x40\x0c\x00"
                                  b"\x00\x00\x00\x0e\x20\x0f\x90\x00\x10\x10",
                                  # a tainted connection retired by a device reset
                                  bytes.fromhex("e83f2c14f188528d41bb0d4b32dd53d4ae89eea07a4f579e"
                                                "2ff7ace2c1d298dcf01c945cbf59cd932cd33931f0d1"
                                                "5eb4ce11")])
def test_fuzz_entry_point_runs_seed_inputs(seed):
    """The atheris entry point runs a decoded input end to end (both rings by the first
    byte) with every invariant checked."""
    from tests.fuzz.fuzz_vsock_device import one_input

    one_input(seed)
