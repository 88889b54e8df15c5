"""vhost-user wire formats: sizes pinned to the spec, round trips, syntax checks.

Spec: vhost-user "Message Specification", "Protocol features", "Front-end message types".
"""

from __future__ import annotations

import struct

import pytest

from vhost_user import wire as w
from vhost_user.errors import FrontendProtocolError

SIZES = {
    w.Header: 12,
    w.U64: 8,
    w.VringState: 8,
    w.VringFd: 8,
    w.VringAddr: 40,  # index, flags, 4 x u64
    w.MemoryRegion: 32,
    w.MemRegMsg: 40,  # u64 padding + region
    w.LogDescription: 16,
    w.IotlbMsg: 32,  # struct vhost_iotlb_msg, padded
    w.ConfigSpace: 12,  # + payload
    w.VringArea: 24,
    w.Inflight: 24,  # sizeof(VhostUserInflight) incl. 4 bytes tail padding
    w.SharedObject: 16,
    w.TransferDeviceState: 8,
    w.MemoryTable: 8,  # + 32 per region
}


@pytest.mark.parametrize("cls", list(SIZES), ids=lambda c: c.__name__)
def test_struct_sizes_pinned(cls):
    assert cls.FMT.size == SIZES[cls]
    assert cls.FMT.format.startswith("=")  # native byte order, no C alignment


def test_request_codes_match_spec():
    assert w.FrontendReq.GET_FEATURES == 1 and w.FrontendReq.SET_VRING_KICK == 12
    assert w.FrontendReq.SET_BACKEND_REQ_FD == 21 and w.FrontendReq.GET_CONFIG == 24
    assert w.FrontendReq.RESET_DEVICE == 34 and w.FrontendReq.ADD_MEM_REG == 37
    assert w.FrontendReq.GET_STATUS == 40 and w.FrontendReq.CHECK_DEVICE_STATE == 43
    assert list(w.FrontendReq) == sorted(w.FrontendReq) and len(w.FrontendReq) == 43
    assert w.BackendReq.CONFIG_CHANGE_MSG == 2 and w.BackendReq.SHARED_OBJECT_LOOKUP == 8


def test_protocol_feature_bits_match_spec():
    bits = {f.name: f.value.bit_length() - 1 for f in w.VhostUserProtocolFeature}
    assert bits == {
        "MQ": 0, "LOG_SHMFD": 1, "RARP": 2, "REPLY_ACK": 3, "NET_MTU": 4, "BACKEND_REQ": 5,
        "CROSS_ENDIAN": 6, "CRYPTO_SESSION": 7, "PAGEFAULT": 8, "CONFIG": 9,
        "BACKEND_SEND_FD": 10, "HOST_NOTIFIER": 11, "INFLIGHT_SHMFD": 12, "RESET_DEVICE": 13,
        "INBAND_NOTIFICATIONS": 14, "CONFIGURE_MEM_SLOTS": 15, "STATUS": 16, "XEN_MMAP": 17,
        "SHARED_OBJECT": 18, "DEVICE_STATE": 19,
    }


def test_virtio_feature_bits():
    vf = w.VirtioFeature
    assert vf.VERSION_1 == 1 << 32 and vf.RING_INDIRECT_DESC == 1 << 28
    assert vf.RING_EVENT_IDX == 1 << 29 and vf.NOTIFY_ON_EMPTY == 1 << 24
    assert vf.RING_PACKED == 1 << 34 and vf.VHOST_USER_F_PROTOCOL_FEATURES == 1 << 30


ROUND_TRIPS = [
    w.U64(0xDEADBEEF_CAFEF00D),
    w.VringState(3, 0x8001_8002),
    w.VringFd(7, False),
    w.VringFd(255, True),
    w.VringAddr(1, 1, 0x1000, 0x2000, 0x3000, 0x4000),
    w.MemoryRegion(0x1000, 0x2000, 0x7F00_0000_1000, 0x10),
    w.MemRegMsg(w.MemoryRegion(0, 4096, 0x7F00_0000_0000, 0)),
    w.LogDescription(4096, 64),
    w.IotlbMsg(0x1000, 0x2000, 0x3000, 3, 2),
    w.VringArea(5, 4096, 0),
    w.Inflight(4096, 0, 2, 256),
    w.SharedObject(bytes(range(16))),
    w.TransferDeviceState(1, 0),
    w.ConfigSpace(4, 3, 0, b"abc"),
    w.MemoryTable((w.MemoryRegion(0, 4096, 0x10000, 0), w.MemoryRegion(8192, 4096, 0x30000, 4096))),
]


@pytest.mark.parametrize("value", ROUND_TRIPS, ids=lambda v: type(v).__name__)
def test_round_trip(value):
    assert type(value).unpack(value.pack()) == value


def test_header_version_checked():
    assert w.Header.unpack(struct.pack("=III", 1, 1, 0)) == w.Header(1, 1, 0)
    with pytest.raises(FrontendProtocolError):
        w.Header.unpack(struct.pack("=III", 1, 2, 0))


@pytest.mark.parametrize("cls", [w.U64, w.VringState, w.VringAddr, w.Inflight, w.MemRegMsg])
def test_wrong_size_rejected(cls):
    with pytest.raises(FrontendProtocolError) as exc:
        cls.unpack(bytes(cls.FMT.size + 1), 9)
    assert exc.value.should_disconnect and exc.value.request == 9


def test_vring_fd_reserved_bits_rejected():
    with pytest.raises(FrontendProtocolError):
        w.VringFd.unpack(struct.pack("=Q", 0x200))


def test_memory_table_limits():
    region = w.MemoryRegion(0, 4096, 0, 0).pack()
    nine = struct.pack("=II", 9, 0) + region * 9
    with pytest.raises(FrontendProtocolError):
        w.MemoryTable.unpack(nine)
    with pytest.raises(FrontendProtocolError):  # says 2 regions, carries 1
        w.MemoryTable.unpack(struct.pack("=II", 2, 0) + region)
    with pytest.raises(FrontendProtocolError):  # zero-sized region
        w.MemoryTable.unpack(struct.pack("=II", 1, 0) + w.MemoryRegion(0, 0, 0, 0).pack())


def test_config_bounds():
    with pytest.raises(FrontendProtocolError):
        w.ConfigSpace.unpack(struct.pack("=III", 0, 257, 0) + bytes(257))
    with pytest.raises(FrontendProtocolError):  # size field disagrees with payload
        w.ConfigSpace.unpack(struct.pack("=III", 0, 4, 0) + bytes(3))
    with pytest.raises(FrontendProtocolError):
        w.ConfigSpace.unpack(struct.pack("=III", 0, 1, 7) + b"x")


def test_inflight_region_sizes():
    # QueueRegionSplit: 16 + 16 * n; QueueRegionPacked: 32 + 32 * n; each rounded up to 64.
    assert w.inflight_queue_region_bytes(8, packed=False) == 192
    assert w.inflight_queue_region_bytes(256, packed=False) == 4160
    assert w.inflight_queue_region_bytes(8, packed=True) == 320
    assert w.inflight_queue_region_bytes(1, packed=True) == 64
