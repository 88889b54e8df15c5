"""The whole console device under a hostile guest, misbehaving host peers and management.

A real `ConsoleDevice` (C rings and zero copy by default, the Python rings too) runs in-process
over memfd guest RAM with a Linux-like guest (tests/support/console_guest.py) and real host
UNIX sockets on its ports; Hypothesis generates step lists mixing good traffic both ways on
several ports with hostile control messages, odd and broken chains, a guest that posts no
receive buffers, host peers that stop reading, leave and come back, hot-plug and unplug and
restarts of every ring (tests/fuzz/fuzz_console_device.py has the world, the guest model and
every invariant).

Invariants: no exception escapes the device; guest memory outside the posted writable buffers
and the used rings never changes (Spec: virtio 1.2 §2.7.4); used lengths stay within the
chain's writable bytes and are 0 on transmitqs (§2.7.8.2); host bytes reach an open port in
order exactly once and never a closed one, guest bytes reach the host peers in order exactly
once (a loss only where a peer left or the port went); device and guest agree about every
port (§5.3.6.2); a broken queue stays stopped and is logged once; the other ports keep moving.

``HYPOTHESIS_PROFILE=nightly`` runs many more, longer examples.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.fuzz_console_device import (BREAKS, CON, CTL_IGNORED, HOST_CLOSE, HP, P1, P2,
                                            QUEUES, RX_ODD, TX_ODD, TX_SHAPES, World, decode,
                                            run_steps)
from tests.property.profiles import scaled
from virtio.console.wire import port_queues

ports = st.sampled_from([CON, P1, P2, HP])
gsend = st.tuples(st.just("gsend"), ports, st.sampled_from([1, 100, 4096, 5000, 40000, 200000]),
                  st.sampled_from(TX_SHAPES))
host_write = st.tuples(st.just("host_write"), ports,
                       st.sampled_from([1, 100, 4096, 9000, 70000, 300000]))
host_events = st.one_of(
    st.tuples(st.just("host_reading"), ports, st.booleans()),
    st.tuples(st.just("host_close"), ports, st.sampled_from(HOST_CLOSE)),
    st.tuples(st.just("host_connect"), ports),
)
guest_events = st.one_of(
    st.tuples(st.just("gopen"), ports, st.booleans()),
    st.tuples(st.just("starve"), ports, st.booleans()),
)
odd_chains = st.one_of(
    st.tuples(st.just("rx_odd"), ports, st.sampled_from(RX_ODD)),
    st.tuples(st.just("tx_odd"), ports, st.sampled_from(TX_ODD)),
)
control = st.one_of(
    st.tuples(st.just("ctl"), st.sampled_from(CTL_IGNORED), st.integers(0, 255)),
    st.tuples(st.just("ready_again"), st.sampled_from(["one", "split"])),
    st.tuples(st.just("ctl_rx_odd"), st.sampled_from(["readonly", "readonly_first", "tiny"])),
)
management = st.one_of(st.tuples(st.just("hotplug"), st.booleans()), st.just(("restart",)))
step = st.one_of(gsend, gsend, host_write, host_write, host_events, guest_events, odd_chains,
                 control, management, st.just(("idle",)))
steps = st.lists(step, max_size=20)
breaks = st.tuples(st.just("break"), st.sampled_from(QUEUES), st.sampled_from(BREAKS),
                   st.integers(0, 255))
steps_then_break = st.tuples(st.lists(step, max_size=6), breaks, st.lists(step, max_size=8))

RINGS = pytest.mark.parametrize("ring", ["c", "py"])
#: the Python pump always copies: zero copy matters with the C rings only
RING_COPY = pytest.mark.parametrize("ring,zero_copy", [("c", True), ("c", False), ("py", False)])


@RINGS
@pytest.mark.timeout(1800)  # nightly: about 900 examples of up to a second or two each
@scaled(0.15)
@given(steps=steps, zero_copy=st.booleans(), early=st.integers(0, 3))
def test_hostile_guest_host_peers_and_hotplug_keep_every_invariant(ring, steps, zero_copy,
                                                                   early):
    """virtio 1.2 §5.3.6.2: every port delivers every byte both ways in order while both
    ends take part, and nothing the guest, a host peer or management does breaks the
    invariants of the module docstring."""
    run_steps(steps, ring, zero_copy=zero_copy, early=early)


@RINGS
@pytest.mark.timeout(1800)
@scaled(0.1)
@given(case=steps_then_break)
def test_a_broken_queue_stays_stopped_and_the_other_ports_move(ring, case):
    """virtio 1.2 §2.7.5.2 and STYLE R5: after a ring error the queue uses no chain until
    reset and the error is logged once; every other port keeps delivering both ways."""
    before, brk, after = case
    run_steps(before + [brk] + after, ring)


def test_harness_reaches_full_sockets_hotplug_and_restarts():
    """The harness is not degenerate: a peer that stops reading fills its socket while the
    other ports move hundreds of kilobytes both ways; a hot-plugged port carries data; a
    restart mid-stream loses nothing."""
    world = run_steps([("host_reading", P1, False), ("gsend", P1, 200000, "one"),
                       ("gsend", P1, 200000, "one"), ("gsend", P2, 200000, "many"),
                       ("host_write", P2, 300000), ("hotplug", True), ("host_connect", HP),
                       ("gopen", HP, True), ("host_write", HP, 5000), ("gsend", HP, 7000, "one"),
                       ("restart",), ("gsend", CON, 40000, "split"),
                       ("host_write", CON, 70000)], "c")
    by_pid = {s.pid: s for s in world.history}
    assert by_pid[P2].received == by_pid[P2].peers[0].sent and len(by_pid[P2].received) > 200000
    assert len(by_pid[P2].peers[0].received) == 200000
    assert len(by_pid[HP].received) == 5000 and len(by_pid[HP].peers[0].received) == 7000
    assert len(by_pid[P1].peers[0].received) == 400000  # (read at the end)
    assert world.restarts == 1


def test_fuzz_byte_decoder_covers_every_step_kind():
    """The atheris entry point decodes bytes into every kind of step."""
    kinds = set()
    for i in range(600):
        _ring, _zc, got = decode(bytes((i * 37 + j * 11) & 0xFF for j in range(80)))
        kinds |= {s[0] for s in got}
    assert kinds >= {"gsend", "host_write", "host_reading", "host_close", "host_connect",
                     "gopen", "starve", "rx_odd", "tx_odd", "ctl", "hotplug", "idle"}
    assert World  # the world class the fuzz target runs


@pytest.mark.parametrize("seed", [b"\x00" + bytes(range(7, 250, 3)), b"\x01" + b"\x05\x03" * 30,
                                  b"\x02\x0d\x01\x07\x03\x08\x03\x01\x00\x01\x05\x03\x10"])
def test_fuzz_entry_point_runs_seed_inputs(seed):
    """The atheris entry point runs a decoded input end to end (ring and zero copy by the
    first byte) with every invariant checked."""
    from tests.fuzz.fuzz_console_device import one_input

    one_input(seed)


def _broken_messages(world) -> list[str]:
    return [r.getMessage() for r in world.records.records
            if r.name.startswith("virtio.console") and r.levelno >= 30
            and ("broken" in r.getMessage() or "transmitq:" in r.getMessage()
                 or "receiveq:" in r.getMessage())]


@RINGS
@pytest.mark.parametrize("queue", [1, 2, 3, 4])
def test_a_broken_queue_is_logged_once_however_often_the_guest_kicks(ring, queue):
    """virtio 1.2 §2.7.5.2, STYLE R5: one message per broken queue (a port's receiveq or
    transmitq, a control queue), not one per kick or per host write: a hostile guest must not
    flood the log. The other ports keep moving meanwhile."""
    world = World(ring)
    try:
        world.boot()
        world.break_ring(queue, "loop", 0)  # a descriptor whose next is itself
        for _ in range(12):  # (a receiveq breaks when the device reaches the bad chain)
            world.kick(queue)
            world.host_write(CON if queue > 1 else P2, 5000)
            world.host_write(P1, 5000)
            world.host_close(P2, "close")  # PORT_OPEN messages for the control receiveq
            world.host_connect(P2)
            world.settle()
        assert world.vq(queue).broken is not None
        assert len(_broken_messages(world)) == 1, _broken_messages(world)
        world.check_streams(final=False)
    finally:
        world.close()


@RINGS
def test_a_broken_receiveq_with_host_bytes_waiting_does_not_spin_the_loop(ring):
    """virtio 1.2 §2.7.5.2, STYLE R5: once a port's receiveq is broken the device stops
    watching the host socket for it (as when the guest posts no buffers) instead of being
    woken by the readable socket on every loop turn, finding the queue broken each time;
    only a guest kick of that queue (or the ring set up again) looks again."""
    world = World(ring)
    try:
        world.boot()
        world.break_ring(port_queues(P1)[0], "loop", 0)
        for _ in range(12):  # past the buffers posted before the bad chain
            world.host_write(P1, 5000)
            world.settle()
        assert world.vq(port_queues(P1)[0]).broken is not None
        calls = []
        real = world.dev._pump_rx
        world.dev._pump_rx = lambda io: (calls.append(io.port.id), real(io))
        world.host_write(P1, 100)  # bytes wait in the socket
        for _ in range(50):
            world.device(world.loop.run_once, 0)
        assert calls.count(P1) <= 1, f"{calls.count(P1)} receive passes on a broken queue"
        world.host_write(P2, 3000)
        world.settle()
        world.check_streams(final=False)  # the other ports still move
    finally:
        world.close()


@RING_COPY
def test_a_restart_mid_stream_loses_and_repeats_nothing(ring, zero_copy):
    """vhost-user VHOST_USER_GET_VRING_BASE then SET_VRING_BASE/ADDR/KICK/CALL on every ring
    while a host peer holds back (transmit chains in flight, a socket full) and host bytes
    wait for receive buffers: afterwards every byte arrives once, in order, both ways, on
    every port (virtio 1.2 §2.7.8, §5.3.6)."""
    world = run_steps([("host_reading", P1, False), ("gsend", P1, 100000, "one"),
                       ("gsend", P1, 60000, "many"), ("starve", P2, True),
                       ("host_write", P2, 70000), ("gsend", P2, 40000, "split"),
                       ("restart",), ("host_reading", P1, True), ("starve", P2, False),
                       ("restart",), ("gsend", CON, 5000, "indirect"),
                       ("host_write", CON, 5000)], ring, zero_copy=zero_copy)
    by_pid = {s.pid: s for s in world.history}
    assert bytes(by_pid[P1].peers[0].received) == bytes(by_pid[P1].sent)
    assert len(by_pid[P1].sent) == 160000
    assert bytes(by_pid[P2].received) == bytes(by_pid[P2].peers[0].sent)
    assert world.restarts == 2


@RING_COPY
def test_an_unplugged_port_returns_every_transmit_chain_before_the_guest_hears_of_it(
        ring, zero_copy):
    """A port is hot-unplugged while its host peer holds back, so transmit chains wait for
    the peer's reads (zero copy) or for room in its socket: every one of them is used
    (length 0) before DEVICE_REMOVE reaches the guest. Linux's remove_port_data detaches
    whatever is still unused on the out_vq, stepping avail->idx back over entries the device
    has already taken, and frees buffers a host socket may still refer to. (With zero copy
    the chains waiting for reads stayed in flight: the removal stopped the queue, keeping
    them as for a ring restart, before it released them.)

    Spec: virtio 1.2 §5.3.6.2 (VIRTIO_CONSOLE_DEVICE_REMOVE), §2.7.8."""
    world = run_steps([("hotplug", True), ("host_connect", HP), ("host_reading", HP, False),
                       ("gsend", HP, 200000, "one"), ("hotplug", False)], ring,
                      zero_copy=zero_copy)
    removed = next(s for s in world.history if s.pid == HP)
    assert removed.removed and len(removed.sent) == 200000
    assert world.drivers[port_queues(HP)[1]].outstanding == 0
