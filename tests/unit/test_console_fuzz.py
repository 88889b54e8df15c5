"""Hypothesis: hostile guest bytes and random host/guest interleavings never break the core.

Invariants (h11's fuzz rule, STYLE.md R9): the parser raises nothing but
``ControlProtocolError``; ``ConsoleControl.receive`` raises nothing at all; the undelivered
queue stays bounded under guest input; and whatever happened, once every queued message is
delivered the Linux driver model agrees with the device about every port.
"""

import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.console_guest import GuestOpenError, LinuxConsoleGuest, pump
from virtio.console.control import (
    ConsoleControl,
    DeviceFailed,
    DeviceReady,
    GuestClosed,
    GuestOpened,
    MessageIgnored,
    PortAddFailed,
    PortReady,
)
from virtio.console.errors import ControlBacklogFull, ControlProtocolError
from virtio.console.wire import BAD_ID, ControlMessage

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GUEST_EVENTS = (DeviceReady, DeviceFailed, PortReady, PortAddFailed, GuestOpened, GuestClosed,
                MessageIgnored)


def started(nr_ports=4, max_nr_ports=8):
    control = ConsoleControl(max_nr_ports)
    control.add_port("console", is_console=True, host_connected=True)
    for i in range(1, nr_ports):
        control.add_port(f"p{i}")
    guest = LinuxConsoleGuest(max_nr_ports)
    pump(control, guest, guest.driver_ok())
    return control, guest


messages = st.one_of(
    st.binary(max_size=64),
    st.builds(
        ControlMessage.build,
        st.one_of(st.integers(0, 10), st.just(BAD_ID), st.integers(0, 2**32 - 1)),
        st.integers(0, 2**16 - 1) | st.integers(0, 9),
        st.integers(0, 2**16 - 1) | st.integers(0, 2),
    ),
)


@FUZZ
@given(st.binary(max_size=64))
def test_parser_raises_only_its_own_error(data):
    try:
        msg = ControlMessage.parse(data)
    except ControlProtocolError:
        assert len(data) < 8
    else:
        assert msg.pack() == data


@FUZZ
@given(st.lists(messages, max_size=60), st.booleans())
def test_receive_never_raises_and_queue_stays_bounded(batch, ready_first):
    control, guest = started() if ready_first else (ConsoleControl(8), None)
    for raw in batch:
        events = control.receive(raw)
        assert all(isinstance(e, GUEST_EVENTS) for e in events)
        # a guest cannot grow the queue beyond a few messages per port
        assert control.pending <= 2 + 6 * control.ports.max_nr_ports
    json.dumps(control.snapshot())


@FUZZ
@given(st.lists(messages, max_size=30))
def test_garbage_between_valid_traffic_does_not_derail_the_handshake(garbage):
    control = ConsoleControl(8)
    control.add_port("console", is_console=True)
    control.add_port("agent", host_connected=True)
    for raw in garbage:  # before DEVICE_READY
        control.receive(raw)
    guest = LinuxConsoleGuest(8)
    pump(control, guest, guest.driver_ok())
    assert guest.sysfs_names() == {"vport0p0": "console\n", "vport0p1": "agent\n"}
    assert guest.ports[1].host_connected


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 20), st.booleans()),
        st.tuples(st.just("remove"), st.integers(0, 7)),
        st.tuples(st.just("host"), st.integers(0, 7), st.booleans()),
        st.tuples(st.just("resize"), st.integers(0, 300), st.integers(0, 100)),
        st.tuples(st.just("open"), st.integers(0, 7)),
        st.tuples(st.just("close"), st.integers(0, 7)),
        st.tuples(st.just("deliver"), st.integers(0, 5)),
        st.tuples(st.just("snapshot"),),
        st.tuples(st.just("reboot"),),
    ),
    max_size=40,
)


@FUZZ
@given(ops)
@example([("remove", 0), ("add", 0, False), ("remove", 0)])
def test_random_interleavings_converge_to_agreement(sequence):
    control, guest = started()
    names = 0
    for op in sequence:
        kind = op[0]
        if kind == "add" and 0 not in control.ports and op[1] % 4 == 0:
            names += 1
            control.add_port(f"console.{names}", is_console=True, host_connected=op[2])
        elif kind == "add" and len(control.ports) < control.ports.max_nr_ports - 1:
            names += 1
            control.add_port(f"n{op[1]}.{names}", host_connected=op[2])
        elif kind == "remove" and op[1] in control.ports:
            control.remove_port(op[1])
        elif kind == "host" and op[1] in control.ports:
            try:
                control.set_host_connected(op[1], op[2])
            except ControlBacklogFull:  # pragma: no cover - limit is far away here
                pass
        elif kind == "resize" and 0 in control.ports:
            control.resize(0, op[1], op[2])
        elif kind in ("open", "close"):
            try:
                out = guest.open(op[1]) if kind == "open" else guest.close(op[1])
            except GuestOpenError:
                continue
            pump(control, guest, out, rx_buffers=0)
        elif kind == "deliver":
            pump(control, guest, rx_buffers=op[1])
        elif kind == "snapshot":
            control = ConsoleControl.from_snapshot(json.loads(json.dumps(control.snapshot())))
        elif kind == "reboot":
            control.reset()
            guest = LinuxConsoleGuest(control.ports.max_nr_ports)
            pump(control, guest, guest.driver_ok(), rx_buffers=0)
    pump(control, guest)
    assert control.pending == 0
    assert sorted(guest.ports) == [p.id for p in control.ports]
    for port in control.ports:
        gp = guest.ports[port.id]
        assert (gp.name, gp.is_console, gp.host_connected, gp.guest_connected) == (
            port.name, port.is_console, port.host_connected, port.guest_open
        )
    if 0 in control.ports and (control.ports[0].cols or control.ports[0].rows):
        console = guest.ports[0]
        assert (console.cols, console.rows) == (control.ports[0].cols, control.ports[0].rows)
