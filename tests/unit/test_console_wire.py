"""virtio/console/wire.py: sizes, byte layouts, enums, queue numbering (virtio 1.2 §5.3)."""

import pytest

from virtio.console.errors import ControlProtocolError
from virtio.console.wire import (
    BAD_ID,
    CONFIG_SIZE,
    ConsoleConfig,
    ConsoleFeature,
    ConsoleResize,
    ControlEvent,
    ControlHeader,
    ControlMessage,
    ResizeOrder,
    num_queues,
    port_queues,
    queue_port,
)


def test_struct_sizes_are_pinned():
    assert ControlHeader.FMT.size == 8
    assert ConsoleResize.FMT.size == 4
    assert ConsoleConfig.FMT.size == CONFIG_SIZE == 12


def test_event_numbers_match_spec_5_3_6_2():
    assert [int(e) for e in (
        ControlEvent.DEVICE_READY, ControlEvent.DEVICE_ADD, ControlEvent.DEVICE_REMOVE,
        ControlEvent.PORT_READY, ControlEvent.CONSOLE_PORT, ControlEvent.RESIZE,
        ControlEvent.PORT_OPEN, ControlEvent.PORT_NAME,
    )] == list(range(8))
    assert ControlEvent.PORT_ADD is ControlEvent.DEVICE_ADD
    assert ControlEvent.PORT_REMOVE is ControlEvent.DEVICE_REMOVE


def test_feature_bits_match_spec_5_3_3():
    assert ConsoleFeature.F_SIZE == 1
    assert ConsoleFeature.F_MULTIPORT == 2
    assert ConsoleFeature.F_EMERG_WRITE == 4


def test_control_header_is_little_endian():
    raw = ControlHeader(0x01020304, 6, 1).pack()
    assert raw == bytes([4, 3, 2, 1, 6, 0, 1, 0])
    assert ControlHeader.unpack(raw) == ControlHeader(0x01020304, 6, 1)


def test_device_ready_from_linux_uses_bad_id():
    raw = ControlMessage.build(BAD_ID, ControlEvent.DEVICE_READY, 1)
    assert raw == b"\xff\xff\xff\xff\x00\x00\x01\x00"


def test_port_name_payload_follows_header_without_nul():
    raw = ControlMessage.build(3, ControlEvent.PORT_NAME, 1, b"org.qemu.guest_agent.0")
    msg = ControlMessage.parse(raw)
    assert msg.header == ControlHeader(3, 7, 1)
    assert msg.payload == b"org.qemu.guest_agent.0"


@pytest.mark.parametrize("size", [0, 1, 7])
def test_short_message_raises_protocol_error(size):
    with pytest.raises(ControlProtocolError) as info:
        ControlMessage.parse(b"\x01" * size)
    assert info.value.raw == b"\x01" * size


def test_header_unpack_wants_exactly_eight_bytes():
    with pytest.raises(ControlProtocolError):
        ControlHeader.unpack(b"\0" * 9)


def test_resize_spec_order_is_cols_then_rows():
    assert ConsoleResize(cols=80, rows=24).pack(ResizeOrder.SPEC) == bytes([80, 0, 24, 0])


def test_resize_linux_legacy_order_is_rows_then_cols():
    assert ConsoleResize(cols=80, rows=24).pack(ResizeOrder.LINUX_LEGACY) == bytes(
        [24, 0, 80, 0]
    )


@pytest.mark.parametrize("order", list(ResizeOrder))
def test_resize_round_trips_in_each_order(order):
    size = ConsoleResize(cols=300, rows=50)
    assert ConsoleResize.unpack(size.pack(order), order) == size


def test_resize_orders_disagree_on_non_square_sizes():
    raw = ConsoleResize(cols=132, rows=43).pack(ResizeOrder.SPEC)
    assert ConsoleResize.unpack(raw, ResizeOrder.LINUX_LEGACY) == ConsoleResize(43, 132)


def test_short_resize_payload_raises():
    with pytest.raises(ControlProtocolError):
        ConsoleResize.unpack(b"\x01\x02\x03")


def test_config_layout_cols_rows_max_ports_emerg():
    raw = ConsoleConfig(cols=80, rows=25, max_nr_ports=31, emerg_wr=0).pack()
    assert raw == bytes([80, 0, 25, 0, 31, 0, 0, 0, 0, 0, 0, 0])
    assert ConsoleConfig.unpack(raw) == ConsoleConfig(80, 25, 31, 0)


def test_queue_numbering_spec_5_3_2():
    assert port_queues(0) == (0, 1)
    assert port_queues(1) == (4, 5)
    assert port_queues(126) == (254, 255)
    assert queue_port(0) == queue_port(1) == 0
    assert queue_port(2) is None and queue_port(3) is None
    assert queue_port(4) == queue_port(5) == 1
    for port_id in range(127):
        rx, tx = port_queues(port_id)
        assert queue_port(rx) == queue_port(tx) == port_id
    assert num_queues(127) == 256
    assert num_queues(5, multiport=False) == 2
