"""virtio/console/config.py: config space windows and emerg_wr (virtio 1.2 §5.3.4, §5.3.5.1)."""

import pytest

from virtio.console.config import ConsoleConfigSpace, EmergencyWrite
from virtio.console.errors import ConfigAccessError


@pytest.fixture
def space():
    return ConsoleConfigSpace(max_nr_ports=31, cols=80, rows=25)


def test_full_read_is_the_12_byte_struct(space):
    assert space.read(0, 12) == bytes([80, 0, 25, 0, 31, 0, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize(
    "offset, size, expected",
    [
        (0, 2, bytes([80, 0])),
        (2, 2, bytes([25, 0])),
        (4, 4, bytes([31, 0, 0, 0])),
        (4, 1, bytes([31])),
        (1, 3, bytes([0, 25, 0])),
        (8, 4, bytes(4)),
        (12, 0, b""),
    ],
)
def test_partial_reads_return_the_window(space, offset, size, expected):
    assert space.read(offset, size) == expected


@pytest.mark.parametrize("offset, size", [(0, 13), (11, 2), (12, 1), (-1, 2), (0, -1), (100, 4)])
def test_reads_outside_the_struct_raise(space, offset, size):
    with pytest.raises(ConfigAccessError) as info:
        space.read(offset, size)
    assert (info.value.offset, info.value.size) == (offset, size)


def test_spec_5_3_5_1_emerg_wr_write_emits_low_byte_even_unconfigured(space):
    assert space.write(8, (0x141).to_bytes(4, "little")) == [EmergencyWrite(0x41)]
    assert EmergencyWrite(0x41).data == b"A"
    assert space.emergency_bytes == 1


def test_single_byte_write_to_emerg_wr_counts(space):
    assert space.write(8, b"x") == [EmergencyWrite(ord("x"))]


def test_write_to_upper_emerg_wr_bytes_only_emits_nothing(space):
    assert space.write(9, b"\x01\x02\x03") == []


def test_emerg_wr_reads_back_zero(space):
    space.write(8, b"Z\0\0\0")
    assert space.read(8, 4) == bytes(4)


def test_writes_to_read_only_fields_are_ignored(space):
    assert space.write(0, b"\xff" * 8) == []
    assert space.read(0, 8) == bytes([80, 0, 25, 0, 31, 0, 0, 0])


def test_write_spanning_read_only_and_emerg_wr_emits_once(space):
    assert space.write(4, bytes([9, 9, 9, 9, ord("!"), 0, 0, 0])) == [EmergencyWrite(ord("!"))]
    assert space.read(4, 4) == bytes([31, 0, 0, 0])


def test_write_outside_raises(space):
    with pytest.raises(ConfigAccessError):
        space.write(10, b"\0\0\0")


def test_set_size_reports_change(space):
    assert space.set_size(80, 25) is False
    assert space.set_size(132, 43) is True
    assert space.read(0, 4) == bytes([132, 0, 43, 0])
    with pytest.raises(ValueError):
        space.set_size(70000, 1)
