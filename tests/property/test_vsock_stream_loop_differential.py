"""The C stream loop (virtio/vsock/stream_loop.py) against the general path it replaces.

Adapted from helper-35's differential property for the Python "armed stream" that the C
loop superseded. Two identical worlds (tests/fuzz/fuzz_vsock_device.py: a real
`VsockBackend` on a real loop driven with ``run_once(0)``, so every call into the C loop
gets a zero budget and serves what is ready, host UNIX sockets, memfd guest RAM, queues set
up through a real `BackendSession`) run the same steps, one with the loop armed from the
first byte (``stream_loop_after`` 0), one never (-1); after every step the connections'
state, the muxer's stats and scheduling, the host adapter's fd interest and timers, every
packet the guest got (headers and payloads, in used-ring order) and every byte each host
peer got must be equal. The steps mix a host->guest stream with what takes it off its
steady state: a CREDIT_UPDATE together with payload in one kick, a CREDIT_REQUEST, the host
peer's EOF or close, the guest's credit running out, a second connection streaming and a
host client connecting, queue stop/start, device reset and front-end reconnect, RX buffers
too small for a packet; both ring layouts and both ring implementations (the loop needs
the C one: with ``VMCHANNEL_RING=py`` neither world enters it, and both must agree).

Spec: virtio 1.2 §5.10.6 (one packet per RX buffer), §5.10.6.3 (every header carries the
sender's credit; CREDIT_UPDATE, CREDIT_REQUEST), §5.10.6.3.1 (RW within the credit).
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.fuzz_vsock_device import CID, GOOD, GOOD_SHAPES, HDR, RX_SHAPES, VICTIM, World
from tests.property.profiles import scaled
from virtio.vsock.conn import WriteHost
from virtio.vsock.wire import Op, VsockHeader

RINGS = pytest.mark.parametrize("ring,packed", [("c", False), ("c", True), ("py", False)])


def _plain(value):
    """``value`` with guest-memory views and containers turned into comparable values."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, WriteHost):
        return ("WriteHost", value.key, b"".join(bytes(b) for b in value.data))
    if isinstance(value, (list, tuple, deque)):
        return tuple(_plain(v) for v in value)
    return value


def snapshot(world: World) -> dict:
    """Everything the lean path could change differently: connections (every attribute),
    the VM's stats and RX scheduling, host fd interest and armed timers."""
    mux = world.backend.muxer
    vm = mux._vms[CID]
    conns = {}
    for key, conn in vm.conns.items():
        conns[tuple(key)] = {name: _plain(v) for name, v in vars(conn).items()
                             if name not in ("log", "cfg")}
    host = world.backend.host
    return {
        "conns": conns,
        "stats": dataclasses.asdict(vm.stats),
        "rxq": list(vm.rxq),
        "ctrl": _plain(list(vm.ctrl)),
        "sib_q": len(vm.sib_q),
        "interest": {tuple(k): (hs.read, hs.write) for k, hs in host._socks.items()},
        "timers": sorted(tuple(k) for k in host._timers),
        "guest": [(c.state, c.told, bytes(c.received), bytes(c.host_received),
                   bytes(c.sent), bytes(c.host_sent), c.peer_buf_alloc, c.peer_fwd_cnt)
                  for c in world.conns + world.retired + world.hconns],
        "packets": list(world.packets),
        "events_sent": world.dev.events_sent,
    }


def kicks_through_eventfds(world: World) -> None:
    """Deliver the driver's kicks as a front-end does, by writing each queue's kick eventfd,
    watched by the world's loop the way vhost_user/connection.py watches it (the device's
    own kick reader where it set one): the C loop serves the TX kick eventfd itself, so the
    World's direct ``session.on_kick`` calls would bypass it. Both worlds get this."""
    from vhost_user.connection import _KickWatch

    loop, session = world.loop, world.session
    watches: dict[int, tuple[int, object]] = {}

    def reconcile() -> None:
        wanted = session.kick_fds()
        for index, (fd, watch) in list(watches.items()):
            if wanted.get(index) != fd or watch.device_reader is not session.kick_reader(index):
                watch.stop()
                loop.remove_reader(fd)
                del watches[index]
        for index, fd in wanted.items():
            if index not in watches:
                os.set_blocking(fd, False)
                watch = _KickWatch(session, index, fd, session.kick_reader(index))
                loop.add_reader(fd, watch.reader)
                watches[index] = (fd, watch)

    def turn(force_kick: bool = False) -> None:
        reconcile()
        wanted = session.kick_fds()
        queues = [(1, world.tx), (0, world.rx)] + ([(2, world.ev)] if world.ev else [])
        for index, driver in queues:
            if (driver.kick_prepare() or force_kick) and index in wanted:
                os.eventfd_write(wanted[index], 1)
        world.device(loop.run_once, 0)
        world.check_logs()

    world.turn = turn


def make_world(ring: str, packed: bool, lean: bool) -> World:
    world = World(ring, packed=packed)
    kicks_through_eventfds(world)
    world.dev.stream_loop_after = 0 if lean else -1
    world.packets = []  # every RX packet the guest got: header fields, payload
    receive = world.receive

    def recording(data: bytes, length: int) -> None:
        if length >= HDR:
            world.packets.append((VsockHeader.FMT.unpack_from(data), bytes(data[HDR:length])))
        receive(data, length)

    world.receive = recording
    # how often the general path's steady-state steps ran (the C loop skips them)
    world.calls = {"credit_only_quiet": 0, "rx_lane_conn": 0}
    mux = world.backend.muxer
    for name in world.calls:
        def counting(*args, _name=name, _fn=getattr(mux, name)):
            world.calls[_name] += 1
            return _fn(*args)
        setattr(mux, name, counting)
    world.connect()
    world.settle()
    return world


def step(world: World, s: tuple) -> None:
    """One step; the World's own steps, and the ones this test adds (on the good
    connection, the one that streams and arms)."""
    kind, *args = s
    good = world.conns[GOOD]
    if kind == "credit_request":  # the guest asks for our credit (Spec: §5.10.6.3)
        if good.state == "established":
            world.control(good, Op.CREDIT_REQUEST)
    elif kind == "update_and_send":  # a CREDIT_UPDATE and an RW in one kick
        if good.state == "established":
            world.consume(good)
            world.control(good, Op.CREDIT_UPDATE)
            world.send(good, args[0], args[1], 0)
    elif kind == "good_consume":  # the guest's application stops / starts reading
        good.consume = args[0]
        if args[0] and good.state == "established":
            world.consume(good)
            world.control(good, Op.CREDIT_UPDATE)
    elif kind == "good_close":  # the host peer: EOF (shut_wr), close, close unread
        world.host_close(good, args[0])
        good.tainted = True  # (the World's delivery checks assume a peer that stays)
    elif kind == "good_reading":
        good.peer_reading = args[0]
    else:
        if not (good.consume and good.peer_reading) or good.tainted:
            # the World expects the good connection's taps open (every byte through at
            # each step); here they may be shut for a while: delivery is checked at the end
            world.check_progress = lambda: None
        try:
            world.step(s)
        finally:
            world.__dict__.pop("check_progress", None)
        return
    world.settle()


def run_both(ring: str, packed: bool, steps: list[tuple]) -> tuple[World, World]:
    """Run ``steps`` in a lean world and a general one, comparing after every step."""
    lean = make_world(ring, packed, True)
    try:
        general = make_world(ring, packed, False)
        try:
            assert snapshot(lean) == snapshot(general)
            for i, s in enumerate(steps):
                step(lean, s)
                step(general, s)
                a, b = snapshot(lean), snapshot(general)
                if a != b:
                    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
                    raise AssertionError(f"step {i} {s}: lean and general differ: "
                                         f"{str(diff)[:3000]}")
            for world in (lean, general):
                good = world.conns[GOOD]  # every tap open (finish does the victim's)
                good.peer_reading = True
                if not good.consume:
                    step(world, ("good_consume", True))
                world.finish()
            assert snapshot(lean) == snapshot(general)
            assert general.dev.stream_loop_runs == 0
        finally:
            general.close()
    finally:
        lean.close()
    return lean, general


#: host writes within the guest's credit (its steady state: each read drains the socket)
#: and one beyond it (the pump stops at zero credit; the CREDIT_UPDATE re-opens the read)
STREAM = [("host_write", GOOD, 16 * 1024)] * 12 + [("host_write", GOOD, 300000)]


@RINGS
def test_a_host_to_guest_stream_takes_the_c_loop_with_the_general_outcome(ring, packed):
    """virtio 1.2 §5.10.6.3: a host->guest stream with the guest's CREDIT_UPDATEs: the C
    loop serves its events (C rings) and every state and packet is as without it."""
    lean, general = run_both(ring, packed, STREAM)
    good = lean.conns[GOOD]
    assert len(good.received) == len(good.host_sent) > 400000
    if ring == "c":
        # entered (single-threaded, with a zero budget, it finds what Python's own
        # dispatch of the same turn has not served yet; tests/integration/
        # test_vsock_stream_loop*.py have it carry the bytes)
        assert lean.dev.stream_loop_runs >= 1
    else:
        assert lean.dev.stream_loop_runs == 0
        assert lean.calls == general.calls


SPECIAL = [
    ("update_and_send", 5000, "two"),
    ("credit_request",),
    ("good_consume", False),
    ("good_consume", True),
    ("host_write", VICTIM, 300000),
    ("post_rx", "tiny", 3),
    ("restart", "same", 5000, 3000),
    ("restart", "reset", 70000, 3000),
    ("restart", "reconnect", 70000, 3000),
    ("host_connect", 0, "response", "whole", 10),
    ("good_close", "shut_wr"),
]


@RINGS
@pytest.mark.parametrize("special", SPECIAL, ids=lambda s: "-".join(map(str, s)))
def test_each_way_off_the_steady_state_gives_the_general_outcome(ring, packed, special):
    """virtio 1.2 §5.10.6.3: mid-stream, each event that ends the C loop (see the module
    docstring) ends as on the general path, and the stream goes on."""
    run_both(ring, packed, STREAM[:6] + [special] + STREAM[:6])


@RINGS
@pytest.mark.parametrize("mode", ["shut_wr", "close", "close_unread"])
def test_the_host_peer_ending_mid_stream_gives_the_general_outcome(ring, packed, mode):
    """virtio 1.2 §5.10.6.3: EOF or a reset host socket while the C loop serves."""
    run_both(ring, packed, STREAM[:6] + [("good_close", mode), ("host_write", GOOD, 1000)])


host_write = st.tuples(st.just("host_write"), st.sampled_from([GOOD, GOOD, VICTIM]),
                       st.sampled_from([1, 4096, 16 * 1024, 16 * 1024, 70000, 300000]))
guest_send = st.tuples(st.just("send"), st.sampled_from([GOOD, VICTIM]),
                       st.sampled_from([1, 4096, 16 * 1024]), st.sampled_from(GOOD_SHAPES),
                       st.integers(0, 255))
special = st.one_of(
    st.tuples(st.just("update_and_send"), st.sampled_from([1, 4096, 16 * 1024]),
              st.sampled_from(GOOD_SHAPES)),
    st.just(("credit_request",)),
    st.tuples(st.just("good_consume"), st.booleans()),
    st.tuples(st.just("good_reading"), st.booleans()),
    st.tuples(st.just("good_close"), st.sampled_from(["shut_wr", "close", "close_unread"])),
    st.tuples(st.just("post_rx"), st.sampled_from(RX_SHAPES), st.integers(1, 4)),
    st.tuples(st.just("restart"), st.sampled_from(["same", "reset", "reconnect"]),
              st.sampled_from([0, 5000, 70000]), st.sampled_from([0, 3000])),
    st.tuples(st.just("victim_consume"), st.booleans()),
    st.just(("idle",)),
)
steps = st.lists(st.one_of(host_write, host_write, host_write, guest_send, special),
                 max_size=14)


@RINGS
@pytest.mark.timeout(1800)
@scaled(0.1)
@given(steps=steps)
def test_any_mix_of_steps_gives_the_same_state_and_packets_with_the_loop_or_not(ring, packed, steps):
    """virtio 1.2 §5.10.6.3: whatever mix of streaming and off-steady-state events, the C
    loop changes nothing the muxer, the host or the guest can see."""
    run_both(ring, packed, steps)
