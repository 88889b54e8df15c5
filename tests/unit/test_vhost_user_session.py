"""The back-end session, sans-I/O: validation order, fd hygiene, ring states, replies.

Spec: vhost-user "Front-end message types", "Ring states", "REPLY_ACK"; STYLE R4.
"""

from __future__ import annotations

import os

import pytest

from tests.support.driver import Allocator, SplitDriver
from tests.support.frontend_fixtures import EchoDevice
from vhost_user.channel import Message
from vhost_user.errors import FrontendProtocolError
from vhost_user.frontend import GuestRam
from vhost_user.session import BackendSession, OFFERED_PROTOCOL_FEATURES
from vhost_user.wire import (
    ConfigSpace, FrontendReq as R, Header, HeaderFlag, Inflight, LogDescription, MemoryTable,
    MemRegMsg, U64, VhostUserProtocolFeature as PF, VirtioFeature as VF, VringAddr, VringFd,
    VringState,
)

FEATURES = int(VF.VERSION_1 | VF.VHOST_USER_F_PROTOCOL_FEATURES | VF.RING_EVENT_IDX)


def msg(request, payload=b"", fds=(), need_reply=False):
    flags = 1 | (HeaderFlag.NEED_REPLY if need_reply else 0)
    return Message(Header(int(request), int(flags), len(payload)), payload, tuple(fds))


def new_session(device=None, signals=None):
    signals = [] if signals is None else signals
    return BackendSession(device or EchoDevice(num_queues=2), signal=signals.append)


def reply_u64(replies):
    assert len(replies) == 1
    return U64.unpack(replies[0].data[12:]).u64


def negotiate(s, protocol=int(OFFERED_PROTOCOL_FEATURES)):
    s.handle(msg(R.SET_PROTOCOL_FEATURES, U64(protocol).pack()))
    s.handle(msg(R.SET_OWNER))
    s.handle(msg(R.SET_FEATURES, U64(FEATURES).pack()))


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- validation order


def test_unknown_request_disconnects_and_closes_fds():
    s = new_session()
    r, w = os.pipe()
    with pytest.raises(FrontendProtocolError) as exc:
        s.handle(msg(99, b"", [r]))
    assert exc.value.should_disconnect and not is_open(r)
    os.close(w)
    # failed latch: every later message is refused, its fds closed
    r, w = os.pipe()
    with pytest.raises(FrontendProtocolError):
        s.handle(msg(R.GET_FEATURES, b"", [r]))
    assert not is_open(r)
    os.close(w)


def test_fd_count_checked_before_size():
    s = new_session()
    r, w = os.pipe()
    # GET_FEATURES allows no fd *and* has a wrong size: the fd rule must be the one reported
    with pytest.raises(FrontendProtocolError, match="fds"):
        s.handle(msg(R.GET_FEATURES, bytes(3), [r]))
    assert not is_open(r)
    os.close(w)


def test_size_checked_before_unpack():
    s = new_session()
    with pytest.raises(FrontendProtocolError, match="payload of 7 bytes"):
        s.handle(msg(R.SET_VRING_NUM, bytes(7)))


def test_unpack_checked_before_queue_index():
    s = new_session()
    # index 200 (out of range) with a reserved bit set: syntax is reported first
    with pytest.raises(FrontendProtocolError, match="reserved"):
        s.handle(msg(R.SET_VRING_CALL, (200 | 0x100 | 0x1000).to_bytes(8, "little")))


def test_queue_index_checked_before_feature_gate():
    s = new_session()
    # VRING_KICK (in-band) is never negotiated; a bad index must still disconnect first
    with pytest.raises(FrontendProtocolError, match="queue 5"):
        s.handle(msg(R.VRING_KICK, VringState(5, 0).pack()))


def test_feature_gate_refusal_keeps_session_and_closes_fd():
    s = new_session()
    r, w = os.pipe()
    # SET_BACKEND_REQ_FD before BACKEND_REQ was negotiated: nothing to report with → ignored
    assert s.handle(msg(R.SET_BACKEND_REQ_FD, b"", [r])) == []
    assert not is_open(r) and not s.failed
    os.close(w)
    # GET_CONFIG without CONFIG: an empty config reply (the spec's error form)
    replies = s.handle(msg(R.GET_CONFIG, ConfigSpace(0, 4, 0, bytes(4)).pack()))
    assert replies[0].data[8:12] == bytes(4)  # header size 0
    assert not s.failed


def test_reply_ack_only_when_negotiated_and_requested():
    s = new_session()
    assert s.handle(msg(R.SET_OWNER, need_reply=True)) == []  # REPLY_ACK not negotiated
    s.handle(msg(R.SET_PROTOCOL_FEATURES, U64(int(PF.REPLY_ACK)).pack()))
    assert reply_u64(s.handle(msg(R.SET_OWNER, need_reply=True))) == 0
    assert s.handle(msg(R.SET_OWNER)) == []
    # a request with its own reply gets exactly that reply, no extra ack
    replies = s.handle(msg(R.GET_FEATURES, need_reply=True))
    assert reply_u64(replies) & VF.VHOST_USER_F_PROTOCOL_FEATURES
    # a refused request is NACKed, the session continues
    assert reply_u64(s.handle(msg(R.SEND_RARP, bytes(8), need_reply=True))) != 0
    assert not s.failed


def test_replies_carry_reply_flag_and_request():
    s = new_session()
    (reply,) = s.handle(msg(R.GET_PROTOCOL_FEATURES))
    header = Header.unpack(reply.data[:12])
    assert header.request == R.GET_PROTOCOL_FEATURES and header.is_reply and header.size == 8
    assert U64.unpack(reply.data[12:]).u64 == OFFERED_PROTOCOL_FEATURES


def test_set_features_rejects_unoffered_bits():
    s = new_session()
    with pytest.raises(FrontendProtocolError):
        s.handle(msg(R.SET_FEATURES, U64(1 << 45).pack()))


def test_unsupported_requests_have_error_replies():
    s = new_session()
    negotiate(s)
    r, w = os.pipe()
    # SET_DEVICE_STATE_FD: parsed, then "not supported": error + no-fd flag, fd closed
    value = reply_u64(s.handle(msg(R.SET_DEVICE_STATE_FD, bytes(8), [r])))
    assert value & 0xFF and value & 0x100 and not is_open(r)
    os.close(w)
    assert reply_u64(s.handle(msg(R.CHECK_DEVICE_STATE))) != 0
    assert reply_u64(s.handle(msg(R.IOTLB_MSG, bytes(16) + bytes(8) + b"\x01\x02" + bytes(6)))) != 0
    assert not s.failed


# ---------------------------------------------------------------- memory, rings, devices


class Guest:
    """Guest RAM + one split ring per queue, as QEMU would set them up."""

    def __init__(self, queues=2):
        self.ram = GuestRam([(0, 1 << 20), (1 << 20, 1 << 20)])
        alloc = Allocator(self.ram.memory)
        self.drivers = [SplitDriver(self.ram.memory, 8, event_idx=True, index=i, allocator=alloc)
                        for i in range(queues)]

    def addr(self, i):
        d = self.drivers[i]
        return VringAddr(i, 0, self.ram.uva(d.desc_gpa), self.ram.uva(d.used_gpa),
                         self.ram.uva(d.avail_gpa), d.used_gpa)

    def close(self):
        self.ram.close()


def start_queue(s, guest, i, kick_fd, call_fd):
    s.handle(msg(R.SET_VRING_NUM, VringState(i, 8).pack()))
    s.handle(msg(R.SET_VRING_BASE, VringState(i, 0).pack()))
    s.handle(msg(R.SET_VRING_ADDR, guest.addr(i).pack()))
    s.handle(msg(R.SET_VRING_KICK, VringFd(i, False).pack(), [kick_fd]))
    s.handle(msg(R.SET_VRING_CALL, VringFd(i, False).pack(), [call_fd]))


def full_session_cycle():
    device = EchoDevice(num_queues=2)
    signals = []
    s = new_session(device, signals)
    guest = Guest()
    try:
        negotiate(s)
        s.handle(msg(R.SET_MEM_TABLE, MemoryTable(tuple(guest.ram.regions)).pack(),
                     [os.dup(guest.ram.fd) for _ in guest.ram.regions]))
        for i in range(2):
            start_queue(s, guest, i, os.eventfd(0), os.eventfd(0))
            s.handle(msg(R.SET_VRING_ENABLE, VringState(i, 1).pack()))
        ours, theirs = os.pipe()
        s.handle(msg(R.SET_BACKEND_REQ_FD, b"", [theirs]))
        s.handle(msg(R.SET_LOG_BASE, LogDescription(4096, 0).pack(), [os.memfd_create("log")]))
        (reply,) = s.handle(msg(R.GET_INFLIGHT_FD, Inflight(0, 0, 2, 8).pack()))
        s.handle(msg(R.SET_INFLIGHT_FD, reply.data[12:], [os.dup(reply.fds[0])]))
        s.handle(msg(R.SET_LOG_FD, b"", [os.eventfd(0)]))
        s.handle(msg(R.SET_VRING_ERR, VringFd(0, False).pack(), [os.eventfd(0)]))
        guest.drivers[0].add_buf(out=[b"ping"], in_sizes=[4])
        s.on_kick(0)
        assert [u.data for u in guest.drivers[0].get_bufs()] == [b"ping"]
        assert signals  # the call fd was signalled
        os.close(ours)
    finally:
        s.close()
        guest.close()
    return device


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leak_across_200_sessions():
    full_session_cycle()  # warm-up (imports, caches)
    before = _open_fds()
    for _ in range(200):
        full_session_cycle()
    assert _open_fds() == before


def test_session_lifecycle_events():
    device = full_session_cycle()
    kinds = [e[0] for e in device.events]
    assert kinds[:3] == ["set_features", "started", "started"]
    assert kinds[-3:] == ["stopped", "stopped", "reset"]


def test_ring_states_enable_and_get_vring_base():
    """Spec: vhost-user "Ring states": with VHOST_USER_F_PROTOCOL_FEATURES a ring starts
    disabled; GET_VRING_BASE stops it and returns the next avail index."""
    device = EchoDevice(num_queues=2)
    s = new_session(device)
    guest = Guest()
    kick, call = os.eventfd(0), os.eventfd(0)
    try:
        negotiate(s)
        s.handle(msg(R.SET_MEM_TABLE, MemoryTable(tuple(guest.ram.regions)).pack(),
                     [os.dup(guest.ram.fd) for _ in guest.ram.regions]))
        start_queue(s, guest, 0, os.dup(kick), os.dup(call))
        assert s.kick_fds() == {0: s.vrings[0].kick_fd}
        assert device.handles == {}  # started but disabled: not given to the device
        guest.drivers[0].add_buf(out=[b"a"], in_sizes=[1])
        s.on_kick(0)
        assert guest.drivers[0].get_bufs() == []
        s.handle(msg(R.SET_VRING_ENABLE, VringState(0, 1).pack()))
        assert 0 in device.handles  # queue_started kicked the waiting chain
        assert [u.data for u in guest.drivers[0].get_bufs()] == [b"a"]
        (reply,) = s.handle(msg(R.GET_VRING_BASE, VringState(0, 0).pack()))
        assert VringState.unpack(reply.data[12:]) == VringState(0, 1)
        assert 0 not in device.handles and s.kick_fds() == {}
    finally:
        s.close()
        guest.close()
        os.close(kick)
        os.close(call)


def test_set_features_without_protocol_features_enables_rings():
    s = new_session()
    s.handle(msg(R.SET_FEATURES, U64(int(VF.VERSION_1)).pack()))
    assert all(v.enabled for v in s.vrings)


def test_kick_with_nofd_means_polling_and_fd_mismatch_disconnects():
    s = new_session()
    guest = Guest()
    try:
        negotiate(s)
        s.handle(msg(R.SET_MEM_TABLE, MemoryTable(tuple(guest.ram.regions)).pack(),
                     [os.dup(guest.ram.fd) for _ in guest.ram.regions]))
        s.handle(msg(R.SET_VRING_NUM, VringState(1, 8).pack()))
        s.handle(msg(R.SET_VRING_ADDR, guest.addr(1).pack()))
        s.handle(msg(R.SET_VRING_KICK, VringFd(1, True).pack()))
        assert s.polled_queues() == [1] and s.kick_fds() == {}
        r, w = os.pipe()
        with pytest.raises(FrontendProtocolError, match="no-fd flag"):
            s.handle(msg(R.SET_VRING_CALL, VringFd(1, True).pack(), [r]))
        assert not is_open(r)
        os.close(w)
    finally:
        s.close()
        guest.close()


def test_kick_before_addresses_is_refused():
    s = new_session()
    s.handle(msg(R.SET_PROTOCOL_FEATURES, U64(int(PF.REPLY_ACK)).pack()))
    fd = os.eventfd(0)
    replies = s.handle(msg(R.SET_VRING_KICK, VringFd(0, False).pack(), [fd], need_reply=True))
    assert reply_u64(replies) != 0
    assert not s.failed
    assert s.kick_fds() == {}  # not started
    s.close()
    assert not is_open(fd)


def test_mem_table_fd_count_must_match_regions():
    s = new_session()
    guest = Guest()
    r, w = os.pipe()
    try:
        with pytest.raises(FrontendProtocolError, match="2 regions and 1 fds"):
            s.handle(msg(R.SET_MEM_TABLE, MemoryTable(tuple(guest.ram.regions)).pack(), [r]))
        assert not is_open(r)
    finally:
        os.close(w)
        guest.close()


def test_add_and_remove_mem_reg():
    s = new_session()
    guest = Guest()
    try:
        negotiate(s)
        for region in guest.ram.regions:
            s.handle(msg(R.ADD_MEM_REG, MemRegMsg(region).pack(), [os.dup(guest.ram.fd)]))
        assert len(s.memory.regions) == 2
        # overlap: refused, NACKed (REPLY_ACK negotiated), session continues
        nack = s.handle(msg(R.ADD_MEM_REG, MemRegMsg(guest.ram.regions[0]).pack(),
                            [os.dup(guest.ram.fd)], need_reply=True))
        assert reply_u64(nack) != 0 and not s.failed
        r, w = os.pipe()  # REM_MEM_REG with one fd: accepted, the fd closed unused
        s.handle(msg(R.REM_MEM_REG, MemRegMsg(guest.ram.regions[1]).pack(), [r]))
        assert not is_open(r) and len(s.memory.regions) == 1
        os.close(w)
        assert reply_u64(s.handle(msg(R.GET_MAX_MEM_SLOTS))) == 32
    finally:
        s.close()
        guest.close()


def test_config_forwarded_to_device():
    device = EchoDevice(num_queues=1)
    s = new_session(device)
    negotiate(s)
    (reply,) = s.handle(msg(R.GET_CONFIG, ConfigSpace(2, 3, 0, bytes(3)).pack()))
    assert ConfigSpace.unpack(reply.data[12:]).payload == bytes([2, 3, 4])
    s.handle(msg(R.SET_CONFIG, ConfigSpace(0, 2, 0, b"xy").pack()))
    assert device.config[:2] == b"xy"
    nack = s.handle(msg(R.SET_CONFIG, ConfigSpace(11, 2, 0, b"zz").pack(), need_reply=True))
    assert reply_u64(nack) != 0


def test_notify_config_needs_channel_and_features():
    s = new_session()
    assert not s.notify_config()
    negotiate(s)
    ours, theirs = os.pipe()
    s.handle(msg(R.SET_BACKEND_REQ_FD, b"", [theirs]))
    woke = []
    s.wakeup = lambda: woke.append(1)
    assert s.notify_config() and woke == [1]
    (data,) = s.take_backend_output()
    assert Header.unpack(data[:12]).request == 2  # BACKEND_CONFIG_CHANGE_MSG
    s.close()
    os.close(ours)


def test_reset_device_resets_and_keeps_memory():
    device = EchoDevice(num_queues=2)
    s = new_session(device)
    guest = Guest()
    try:
        negotiate(s)
        s.handle(msg(R.SET_MEM_TABLE, MemoryTable(tuple(guest.ram.regions)).pack(),
                     [os.dup(guest.ram.fd) for _ in guest.ram.regions]))
        s.handle(msg(R.SET_STATUS, U64(0xF).pack()))
        s.handle(msg(R.RESET_DEVICE))
        assert device.events[-1] == ("reset",)
        assert len(s.memory.regions) == 2 and s.status == 0 and s.acked_features == 0
        assert reply_u64(s.handle(msg(R.GET_STATUS))) == 0
    finally:
        s.close()
        guest.close()


def test_device_bounds_the_ring_size_it_accepts():
    device = EchoDevice(num_queues=2)
    device.max_queue_size = 64
    s = new_session(device)
    negotiate(s)
    s.handle(msg(R.SET_VRING_NUM, VringState(0, 64).pack()))
    with pytest.raises(FrontendProtocolError, match="size 128 outside 1..64"):
        s.handle(msg(R.SET_VRING_NUM, VringState(1, 128).pack()))
