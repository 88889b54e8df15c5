"""virtio/console/control.py against the Linux driver model (virtio 1.2 §5.3.6.2)."""

import json

import pytest

from tests.support.console_guest import GuestOpenError, LinuxConsoleGuest, pump
from virtio.console.control import (
    ConfigChanged,
    ConsoleControl,
    DeviceFailed,
    DeviceReady,
    GuestClosed,
    GuestOpened,
    MessageIgnored,
    PortAddFailed,
    PortDetached,
    PortReady,
)
from virtio.console.errors import (
    ControlBacklogFull,
    InvalidMaxPorts,
    InvalidPortName,
    PortConfigError,
    UnknownPort,
)
from virtio.console.wire import (
    BAD_ID,
    ConsoleFeature,
    ControlEvent,
    ControlHeader,
    ControlMessage,
    ResizeOrder,
)

READY = ControlMessage.build(BAD_ID, ControlEvent.DEVICE_READY, 1)


def headers(messages):
    return [
        (h.id, ControlEvent(h.event), h.value)
        for h in (ControlHeader.unpack(m[:8]) for m in messages)
    ]


def make(nr_ports, max_nr_ports=None, console=True, **kw):
    """A device with a console on port 0 and ``nr_ports - 1`` generic ports, plus a guest."""
    max_nr_ports = max_nr_ports or nr_ports
    control = ConsoleControl(max_nr_ports, **kw)
    if console:
        control.add_port("console", is_console=True, host_connected=True)
    for i in range(1, nr_ports):
        control.add_port(f"org.test.port.{i}", host_connected=bool(i % 2))
    guest = LinuxConsoleGuest(max_nr_ports, resize_order=control.resize_order)
    return control, guest


def assert_guest_matches_device(control, guest):
    assert sorted(guest.ports) == [p.id for p in control.ports]
    for port in control.ports:
        gp = guest.ports[port.id]
        assert gp.name == port.name
        assert gp.is_console == port.is_console
        assert gp.host_connected == port.host_connected
        assert gp.guest_connected == port.guest_open
        assert port.guest_ready and port.announced


# -- the handshake ------------------------------------------------------------------------------
@pytest.mark.parametrize("nr_ports", [1, 31, 127])
def test_full_handshake(nr_ports):
    control, guest = make(nr_ports)
    events = pump(control, guest, guest.driver_ok())
    assert events[0] == DeviceReady()
    ready = [e for e in events if isinstance(e, PortReady)]
    assert [e.port_id for e in ready] == list(range(nr_ports))
    # the console port's hvc attaches and the guest reports it open
    assert GuestOpened(0, "console") in events
    assert not [e for e in events if isinstance(e, MessageIgnored)]
    assert control.pending == 0
    assert_guest_matches_device(control, guest)
    names = guest.sysfs_names()
    assert len(names) == nr_ports
    assert names["vport0p0"] == "console\n"
    if nr_ports > 1:
        assert names[f"vport0p{nr_ports - 1}"] == f"org.test.port.{nr_ports - 1}\n"


def test_nothing_is_sent_before_device_ready():
    control, _ = make(3, max_nr_ports=8)
    assert control.pending == 0
    control.add_port("late")
    control.set_host_connected(1, False)
    assert control.pending == 0


def test_device_ready_announces_every_port_in_id_order():
    control, _ = make(3)
    assert control.receive(READY) == [DeviceReady()]
    assert headers(control.pending_messages()) == [
        (0, ControlEvent.DEVICE_ADD, 0),
        (1, ControlEvent.DEVICE_ADD, 0),
        (2, ControlEvent.DEVICE_ADD, 0),
    ]


def test_port_ready_answer_order_console_name_open_resize():
    control = ConsoleControl(4)
    control.add_port("console", is_console=True, host_connected=True, cols=80, rows=24)
    control.add_port("agent")
    control.receive(READY)
    while control.pending:
        control.consume()
    assert control.receive(ControlMessage.build(0, ControlEvent.PORT_READY, 1)) == [
        PortReady(0, "console")
    ]
    control.receive(ControlMessage.build(1, ControlEvent.PORT_READY, 1))
    msgs = control.pending_messages()
    assert headers(msgs) == [
        (0, ControlEvent.CONSOLE_PORT, 1),
        (0, ControlEvent.PORT_NAME, 1),
        (0, ControlEvent.PORT_OPEN, 1),
        (0, ControlEvent.RESIZE, 0),
        (1, ControlEvent.PORT_NAME, 1),
        (1, ControlEvent.PORT_OPEN, 0),
    ]
    assert msgs[1][8:] == b"console"  # spec: no NUL terminator
    assert msgs[3][8:] == bytes([80, 0, 24, 0])  # spec order: cols, rows


def test_generic_port_open_and_close_by_guest_process():
    control, guest = make(3)
    pump(control, guest, guest.driver_ok())
    assert pump(control, guest, guest.open(2)) == [GuestOpened(2, "org.test.port.2")]
    assert control.may_send_to_guest(2)
    with pytest.raises(GuestOpenError):  # one opener per port, as Linux
        guest.open(2)
    assert pump(control, guest, guest.close(2)) == [
        GuestClosed(2, "org.test.port.2", "guest")
    ]
    assert not control.may_send_to_guest(2)


def test_console_port_cannot_be_opened_as_a_vport():
    control, guest = make(2)
    pump(control, guest, guest.driver_ok())
    with pytest.raises(GuestOpenError):
        guest.open(0)


def test_host_connect_and_disconnect_reach_the_guest():
    control, guest = make(2)
    pump(control, guest, guest.driver_ok())
    assert guest.ports[1].host_connected is True
    control.set_host_connected(1, False)
    pump(control, guest)
    assert guest.ports[1].host_connected is False
    control.set_host_connected(1, False)  # no change: no message
    assert control.pending == 0


# -- hot plug -----------------------------------------------------------------------------------
def test_hot_add_after_ready_runs_the_same_sequence():
    control, guest = make(2, max_nr_ports=8)
    pump(control, guest, guest.driver_ok())
    port = control.add_port("org.qemu.guest_agent.0", host_connected=True)
    assert headers(control.pending_messages()) == [(port.id, ControlEvent.DEVICE_ADD, 0)]
    events = pump(control, guest)
    assert events == [PortReady(port.id, "org.qemu.guest_agent.0")]
    assert guest.port_by_name("org.qemu.guest_agent.0").host_connected
    assert_guest_matches_device(control, guest)


def test_hot_remove_sends_device_remove_and_detaches_queues():
    control, guest = make(3)
    pump(control, guest, guest.driver_ok())
    events = control.remove_port(2)
    assert events == [PortDetached(2, "org.test.port.2")]
    assert headers(control.pending_messages()) == [(2, ControlEvent.DEVICE_REMOVE, 0)]
    assert control.port_for_queue(6) is None and control.port_for_queue(7) is None
    assert control.port_for_queue(4).id == 1
    pump(control, guest)
    assert 2 not in guest.ports
    assert "vport0p2" not in guest.sysfs_names()


def test_removing_an_open_port_reports_guest_closed_and_guest_stays_quiet():
    control, guest = make(3)
    pump(control, guest, guest.driver_ok())
    pump(control, guest, guest.open(1))
    events = control.remove_port(1)
    assert events == [
        GuestClosed(1, "org.test.port.1", "removed"),
        PortDetached(1, "org.test.port.1"),
    ]
    pump(control, guest)
    # Linux keeps the fd but the port is gone: closing it sends no PORT_OPEN 0
    assert guest.close(1) == []


def test_readding_a_removed_name_gets_a_fresh_id_and_full_sequence():
    control, guest = make(3, max_nr_ports=8)
    pump(control, guest, guest.driver_ok())
    control.remove_port(1)
    pump(control, guest)
    port = control.add_port("org.test.port.1")
    assert port.id not in (0, 1, 2)
    pump(control, guest)
    assert guest.ports[port.id].name == "org.test.port.1"
    assert_guest_matches_device(control, guest)


def test_spec_5_3_6_2_1_no_device_remove_for_a_port_the_guest_never_got():
    control, guest = make(2, max_nr_ports=8)
    pump(control, guest, guest.driver_ok())
    port = control.add_port("flash")
    assert control.remove_port(port.id) == [PortDetached(port.id, "flash")]
    assert control.pending == 0
    assert port.id not in guest.ports


def test_invalid_names_are_refused_before_anything_is_sent():
    control, guest = make(2, max_nr_ports=8)
    pump(control, guest, guest.driver_ok())
    for bad in ("", "../x", ".dot", "a b", "x" * 251):
        with pytest.raises(InvalidPortName):
            control.add_port(bad)
    assert control.pending == 0
    with pytest.raises(UnknownPort):
        control.remove_port(7)


def test_128_ports_are_refused_clearly():
    with pytest.raises(InvalidMaxPorts, match=r"1\.\.127"):
        ConsoleControl(128)


# -- guest failures -----------------------------------------------------------------------------
def test_device_ready_0_is_a_guest_failure_and_no_ports_are_announced():
    control, _ = make(3, max_nr_ports=8)
    guest = LinuxConsoleGuest(3, fail_device=True)
    events = pump(control, guest, guest.driver_ok())
    assert events == [DeviceFailed()]
    assert control.pending == 0 and not control.driver_ready
    control.add_port("after-failure")
    assert control.pending == 0


def test_port_ready_0_is_a_failed_port_and_gets_no_configuration():
    control, _ = make(3)
    guest = LinuxConsoleGuest(3, fail_port_ids={1})
    events = pump(control, guest, guest.driver_ok())
    assert PortAddFailed(1, "org.test.port.1") in events
    assert PortReady(1, "org.test.port.1") not in events
    assert 1 not in guest.ports
    assert control.ports[1].add_failed and not control.ports[1].guest_ready
    control.set_host_connected(1, False)
    assert control.pending == 0
    assert control.remove_port(1) == [PortDetached(1, "org.test.port.1")]
    pump(control, guest)
    assert sorted(guest.ports) == [0, 2]


def test_guest_drops_port_add_beyond_max_nr_ports():
    guest = LinuxConsoleGuest(2)
    assert guest.receive(ControlMessage.build(5, ControlEvent.PORT_ADD)) == []
    assert guest.warnings


def test_guest_answers_duplicate_add_with_port_ready_like_linux():
    guest = LinuxConsoleGuest(4)
    add = ControlMessage.build(1, ControlEvent.PORT_ADD)
    assert guest.receive(add) == guest.receive(add) == [
        ControlMessage.build(1, ControlEvent.PORT_READY, 1)
    ]
    assert list(guest.ports) == [1]


def test_repeated_port_ready_replaces_the_queued_answer():
    control, guest = make(2)
    pump(control, guest, guest.driver_ok())
    for _ in range(50):
        control.receive(ControlMessage.build(1, ControlEvent.PORT_READY, 1))
    assert headers(control.pending_messages()) == [
        (1, ControlEvent.PORT_NAME, 1),
        (1, ControlEvent.PORT_OPEN, 1),
    ]


# -- no receive buffers -------------------------------------------------------------------------
def test_messages_wait_for_receive_buffers_and_arrive_in_order():
    control, guest = make(5, max_nr_ports=16)
    pump(control, guest, guest.driver_ok(), rx_buffers=0)
    assert control.pending == 5
    for i in range(5):
        control.add_port(f"hot.{i}")
    control.remove_port(2)
    expected = control.pending_messages()
    delivered = []
    while control.pending:  # one buffer at a time, with pauses in between
        before = control.pending
        msg = control.peek()
        assert control.peek() == msg  # peeking does not consume
        pump(control, guest, rx_buffers=1)
        delivered.append(msg)
        assert control.pending >= before - 1
        if len(delivered) >= 200:
            pytest.fail("queue never drained")
    assert delivered[: len(expected)] == expected
    assert control.stats.delivered == len(delivered)
    assert_guest_matches_device(control, guest)


def test_consume_on_empty_queue_raises():
    control, _ = make(1)
    assert control.peek() is None
    with pytest.raises(IndexError):
        control.consume()


def test_host_flapping_without_buffers_is_bounded_by_backlog_error():
    control, guest = make(2, max_pending=10)
    pump(control, guest, guest.driver_ok())
    with pytest.raises(ControlBacklogFull) as info:
        for i in range(100):
            control.set_host_connected(1, i % 2 == 0)
    assert info.value.limit == 10
    assert control.pending == 10
    state_before = control.ports[1].host_connected
    pump(control, guest)
    assert guest.ports[1].host_connected == state_before


# -- resize -------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", list(ResizeOrder))
def test_resize_reaches_the_console_in_the_configured_order(order):
    control, guest = make(2, resize_order=order)
    pump(control, guest, guest.driver_ok())
    control.resize(0, 132, 43)
    pump(control, guest)
    assert (guest.ports[0].cols, guest.ports[0].rows) == (132, 43)


def test_resize_with_mismatched_order_swaps_dimensions():
    control, _ = make(1, resize_order=ResizeOrder.SPEC)
    guest = LinuxConsoleGuest(1, resize_order=ResizeOrder.LINUX_LEGACY)
    pump(control, guest, guest.driver_ok())
    control.resize(0, 132, 43)
    pump(control, guest)
    assert (guest.ports[0].cols, guest.ports[0].rows) == (43, 132)


def test_undelivered_resizes_coalesce():
    control, guest = make(1)
    pump(control, guest, guest.driver_ok())
    for cols in range(10, 60):
        control.resize(0, cols, 24)
    assert control.pending == 1
    pump(control, guest)
    assert guest.ports[0].cols == 59


def test_resize_of_a_generic_port_is_refused():
    control, _ = make(2)
    with pytest.raises(PortConfigError):
        control.resize(1, 80, 24)


def test_resize_port0_without_multiport_changes_config():
    control, _ = make(1)
    control.set_features(ConsoleFeature.F_SIZE)
    assert control.resize(0, 100, 30) == [ConfigChanged()]
    assert control.config.read(0, 4) == bytes([100, 0, 30, 0])
    assert control.pending == 0


def test_without_multiport_port0_is_live_at_driver_ok_and_control_is_ignored():
    control, _ = make(1)
    control.set_features(ConsoleFeature.F_SIZE)
    assert control.driver_ok() == [PortReady(0, "console"), GuestOpened(0, "console")]
    assert control.receive(READY) == [MessageIgnored("no-multiport", BAD_ID, 0)]
    assert control.pending == 0


# -- odd guest input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"", "bad-size"),
        (b"\x00" * 7, "bad-size"),
        (READY + b"\x00", "bad-size"),
        (ControlMessage.build(9, ControlEvent.PORT_READY, 1), "unknown-port"),
        (ControlMessage.build(9, ControlEvent.PORT_OPEN, 1), "unknown-port"),
        (ControlMessage.build(1, ControlEvent.PORT_NAME, 1), "wrong-direction"),
        (ControlMessage.build(1, ControlEvent.DEVICE_ADD, 0), "wrong-direction"),
        (ControlMessage.build(1, 99, 0), "unknown-event"),
        (ControlMessage.build(1, ControlEvent.PORT_OPEN, 2), "bad-value"),
        (ControlMessage.build(BAD_ID, ControlEvent.DEVICE_READY, 7), "bad-value"),
    ],
)
def test_bad_guest_messages_are_ignored_and_counted(raw, reason):
    control, guest = make(2)
    pump(control, guest, guest.driver_ok())
    events = control.receive(raw)
    assert len(events) == 1 and isinstance(events[0], MessageIgnored)
    assert events[0].reason == reason
    assert control.stats.ignored_by_reason[reason] == 1
    assert control.pending == 0


def test_port_messages_before_device_ready_are_out_of_order():
    control, _ = make(2)
    for event in (ControlEvent.PORT_READY, ControlEvent.PORT_OPEN):
        (ignored,) = control.receive(ControlMessage.build(1, event, 1))
        assert ignored.reason == "out-of-order"
    assert control.pending == 0 and not control.ports[1].guest_open


def test_ignored_message_logging_is_rate_limited(caplog):
    control, _ = make(1)
    with caplog.at_level("WARNING"):
        for _ in range(500):
            control.receive(b"junk")
    assert control.stats.ignored == 500
    assert 5 <= len(caplog.records) <= 20


# -- resets, resume, restart --------------------------------------------------------------------
def test_second_device_ready_means_a_new_driver():
    control, guest = make(3)
    pump(control, guest, guest.driver_ok())
    pump(control, guest, guest.open(1))
    new_guest = LinuxConsoleGuest(3)
    events = pump(control, new_guest, new_guest.driver_ok())
    assert GuestClosed(1, "org.test.port.1", "reset") in events
    assert_guest_matches_device(control, new_guest)


def test_reset_forgets_the_driver_and_withdraws_queued_messages():
    control, guest = make(3)
    pump(control, guest, guest.driver_ok())
    pump(control, guest, guest.open(2))
    control.set_host_connected(1, False)
    assert control.reset() == [
        GuestClosed(0, "console", "reset"),
        GuestClosed(2, "org.test.port.2", "reset"),
    ]
    assert control.pending == 0 and not control.driver_ready
    fresh = LinuxConsoleGuest(3)
    pump(control, fresh, fresh.driver_ok())
    assert_guest_matches_device(control, fresh)


def test_hibernate_resume_without_device_ready_updates_the_guest():
    control, guest = make(3, max_nr_ports=8)
    pump(control, guest, guest.driver_ok())
    pump(control, guest, guest.open(1))
    guest.freeze()
    control.reset()
    control.remove_port(2)  # while the guest sleeps
    added = control.add_port("while-asleep")
    events = pump(control, guest, guest.restore())
    assert events[0] == DeviceReady(resumed=True)
    assert GuestOpened(1, "org.test.port.1") in events
    assert 2 not in guest.ports
    assert guest.ports[added.id].name == "while-asleep"
    assert_guest_matches_device(control, guest)


def test_snapshot_restore_mid_handshake_continues_where_it_stopped():
    control, guest = make(5, max_nr_ports=8)
    pump(control, guest, guest.driver_ok(), rx_buffers=3)
    pump(control, guest, guest.open(1), rx_buffers=0)
    assert control.pending > 0
    state = json.loads(json.dumps(control.snapshot()))
    restored = ConsoleControl.from_snapshot(state)
    assert restored.snapshot() == control.snapshot()
    pump(restored, guest)  # the guest never noticed the restart
    assert_guest_matches_device(restored, guest)
    assert restored.may_send_to_guest(1)


def test_snapshot_with_unknown_version_is_refused():
    control, _ = make(1)
    state = control.snapshot()
    state["version"] = 99
    with pytest.raises(ValueError):
        ConsoleControl.from_snapshot(state)


def test_regression_remove_readd_remove_same_id_keeps_first_remove():
    """Found by hypothesis: withdrawing the second incarnation's undelivered DEVICE_ADD must
    not withdraw the DEVICE_REMOVE of the first one."""
    control, guest = make(3, max_nr_ports=4)
    pump(control, guest, guest.driver_ok())
    control.remove_port(0)
    control.add_port("console2", is_console=True)
    control.remove_port(0)
    assert headers(control.pending_messages()) == [(0, ControlEvent.DEVICE_REMOVE, 0)]
    pump(control, guest)
    assert sorted(guest.ports) == [1, 2]
