"""virtio/console/ports.py: names, ids, limits (virtio 1.2 §5.3.6.2)."""

import json

import pytest

from virtio.console.errors import (
    ConsoleError,
    DuplicatePortName,
    InvalidMaxPorts,
    InvalidPortName,
    NoFreePortId,
    PortIdInUse,
    UnknownPort,
)
from virtio.console.ports import (
    MAX_NR_PORTS,
    MAX_PORT_NAME_BYTES,
    PortTable,
    check_port_name,
)


@pytest.mark.parametrize(
    "name",
    [
        "org.qemu.guest_agent.0",
        "com.redhat.spice.0",
        "a",
        "x" * MAX_PORT_NAME_BYTES,
        "with:colon-and_under.score",
        "-leading-dash",
        "0",
    ],
)
def test_valid_names_are_accepted(name):
    assert check_port_name(name) == name


@pytest.mark.parametrize(
    "name, why",
    [
        ("", "empty"),
        ("x" * (MAX_PORT_NAME_BYTES + 1), "longer"),
        (".hidden", "start with '.'"),
        ("..", "start with '.'"),
        ("a/b", "allowed characters"),
        ("../../etc/passwd", "start with '.'"),
        ("sp ace", "allowed characters"),
        ("nul\0byte", "allowed characters"),
        ("tab\t", "allowed characters"),
        ("ünïcode", "allowed characters"),
        ("semi;colon", "allowed characters"),
        (None, "must be a str"),
        (b"bytes", "must be a str"),
    ],
)
def test_invalid_names_are_rejected_with_reason(name, why):
    with pytest.raises(InvalidPortName) as info:
        check_port_name(name)
    assert why in str(info.value)
    assert info.value.name == name
    assert isinstance(info.value, ConsoleError)


@pytest.mark.parametrize("value", [0, -1, MAX_NR_PORTS + 1, 128, True, "31", 1.5])
def test_max_nr_ports_outside_1_to_127_is_rejected(value):
    with pytest.raises(InvalidMaxPorts) as info:
        PortTable(value)
    assert info.value.value == value
    assert info.value.limit == 127


@pytest.mark.parametrize("value", [1, 31, 127])
def test_max_nr_ports_in_range_is_accepted(value):
    assert PortTable(value).max_nr_ports == value


def test_console_gets_id_0_and_generic_ports_start_at_1():
    table = PortTable(4)
    assert table.add("a").id == 1
    assert table.add("console", is_console=True).id == 0
    assert table.add("b").id == 2
    assert table.add("second-console", is_console=True).id == 3


def test_id_0_is_reserved_for_a_console_port():
    table = PortTable(2)
    table.add("a")
    with pytest.raises(NoFreePortId):
        table.add("b")
    with pytest.raises(PortIdInUse) as info:
        table.add("b", port_id=0)
    assert info.value.port_id == 0


def test_single_port_device_without_console_explains_why_it_is_full():
    with pytest.raises(NoFreePortId, match="reserved for a console"):
        PortTable(1).add("a")


def test_duplicate_names_are_rejected():
    table = PortTable(4)
    table.add("a")
    with pytest.raises(DuplicatePortName) as info:
        table.add("a")
    assert info.value.name == "a"
    assert len(table) == 1


def test_explicit_ids_are_checked():
    table = PortTable(4)
    table.add("a", port_id=3)
    with pytest.raises(PortIdInUse):
        table.add("b", port_id=3)
    with pytest.raises(PortIdInUse):
        table.add("b", port_id=4)
    with pytest.raises(PortIdInUse):
        table.add("b", port_id=-1)


def test_table_fills_to_max_nr_ports_then_refuses():
    table = PortTable(MAX_NR_PORTS)
    table.add("console", is_console=True)
    for i in range(1, MAX_NR_PORTS):
        assert table.add(f"p{i}").id == i
    with pytest.raises(NoFreePortId) as info:
        table.add("one-too-many")
    assert info.value.max_nr_ports == MAX_NR_PORTS


def test_readding_a_removed_name_gets_a_free_id_never_used_ids_first():
    table = PortTable(8)
    first = table.add("agent").id
    table.add("other")
    table.remove(first)
    again = table.add("agent")
    assert again.id not in (first, 2)
    assert table.by_name("agent") is again


def test_freed_ids_are_reused_oldest_first_when_the_space_is_used_up():
    table = PortTable(4)
    ids = [table.add(n).id for n in ("a", "b", "c")]
    assert ids == [1, 2, 3]
    table.remove(2)
    table.remove(1)
    assert table.add("d").id == 2
    assert table.add("e").id == 1


def test_unknown_port_lookups_raise():
    table = PortTable(4)
    with pytest.raises(UnknownPort):
        table[1]
    with pytest.raises(UnknownPort):
        table.remove(1)
    with pytest.raises(UnknownPort):
        table.by_name("nope")
    assert table.get(1) is None and table.find("nope") is None


def test_iteration_is_in_id_order():
    table = PortTable(6)
    table.add("x", port_id=5)
    table.add("y", port_id=2)
    table.add("c", is_console=True)
    assert [p.id for p in table] == [0, 2, 5]


def test_snapshot_round_trips_through_json():
    table = PortTable(8)
    table.add("console", is_console=True)
    port = table.add("agent")
    port.guest_open = True
    port.bytes_to_guest = 42
    table.add("gone")
    table.remove(2)
    state = json.loads(json.dumps(table.snapshot()))
    clone = PortTable.from_snapshot(state)
    assert clone.snapshot() == table.snapshot()
    assert clone.by_name("agent").guest_open is True
    assert clone.add("new").id == table.add("new").id
