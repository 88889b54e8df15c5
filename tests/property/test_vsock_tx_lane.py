"""The vsock TX lane: the pure-Python reference (``virtio.vsock.lane.PyTxLane`` over
``ring.pyring``) against the C one (``vs_tx_lane``, csrc/vsock_path.c, over ``ring.cring``).

Fed the same guest packets — this connection's stream RW packets, packets of other ports,
other ops, other CIDs, headers split over descriptors, ``len`` beyond the chain, runs that
outgrow the credit — and the same host socket (taking everything, part, nothing, or failing),
both must take the same run, stop for the same reason, put the same bytes on the socket,
return the same tail, leave byte-identical guest memory and queue state, and signal the call
eventfd the same number of times. Fed hostile rings (``tests.property.rings``), both must
report the same ``DriverError`` (code, queue, head) or stop at the same chain.

Spec: virtio 1.2 §5.10.6 (packet = header + payload in one chain), §5.10.6.1 (TX buffers
used without being written), §5.10.6.3.1 (RW only within the peer's free space).
"""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ring.errors import ChainError
from tests.property.ringpair import RingPair, exc_key, make_memory, require_pair
from tests.property.rings import RawRing, raw_rings, start_pair
from tests.support.driver import Allocator, PackedDriver, SplitDriver, bytearray_memory
from virtio.vsock.conn import credit_update_due
from virtio.vsock.lane import (LANE_CHAINS, CPut, CTxLane, LaneUpdate, Put, PyTxLane, Stop,
                               put_packet_py)
from virtio.vsock.wire import VsockHeader

CID, HOST_PORT, GUEST_PORT = 3, 80, 1000
TAIL_CAP = 256 * 1024
HDR = VsockHeader.SIZE


@pytest.fixture(scope="module")
def impls():
    return require_pair()


class _Host:
    """One side's host socket pair and call eventfd. ``mode``: "open" (takes all),
    "full" (EAGAIN), "small" (a small send buffer: partial writes), "closed" (EPIPE)."""

    def __init__(self, mode: str) -> None:
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.a.setblocking(False)
        self.b.setblocking(False)
        self.mode = mode
        if mode == "small":
            self.a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        elif mode == "full":
            self.a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            try:
                while True:
                    self.a.send(b"\0" * 4096)
            except BlockingIOError:
                pass
            self.prefill = self._drain()
        elif mode == "closed":
            self.b.close()
        self.call = os.eventfd(0, os.EFD_NONBLOCK)

    def _drain(self) -> bytes:
        out = bytearray()
        try:
            while True:
                chunk = self.b.recv(1 << 20)
                if not chunk:
                    break
                out += chunk
        except BlockingIOError:
            pass
        return bytes(out)

    def received(self) -> bytes:
        return b"" if self.mode in ("closed", "full") else self._drain()

    def calls(self) -> int:
        try:
            return int.from_bytes(os.read(self.call, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self.a.close()
        if self.mode != "closed":
            self.b.close()
        os.close(self.call)


def _key(res, mem) -> tuple:
    """A LaneResult in comparable form (the DriverError by its fields)."""
    broken = None if res.broken is None else exc_key(res.broken, mem)
    return tuple(res._replace(broken=None)) + (broken,)


def _run_both(pair: RingPair, modes: list[str], lane_args: list[tuple]) -> list:
    """Run the lane calls ``lane_args`` (cid, host_port, guest_port, credit, ba, fc,
    max_chains) on both sides, comparing after each; the reference's results."""
    hosts = {side.name: _Host(mode) for side, mode in zip(pair.sides, modes * 2)}
    lanes = {"py": PyTxLane(TAIL_CAP), "c": CTxLane(TAIL_CAP)}
    try:
        for side in pair.sides:
            side.vq.call_fd = hosts[side.name].call
        out = []
        for args in lane_args:
            results = []
            for side in pair.sides:
                res = lanes[side.name].run(side.vq, hosts[side.name].a, *args)
                results.append((side.name, _key(res, side.memory),
                                hosts[side.name].received(), hosts[side.name].calls()))
            ref = results[0]
            for other in results[1:]:
                assert other[1:] == ref[1:], (ref, other)
            pair.check(f"lane{args!r}")
            out.append(ref[1])
        return out
    finally:
        for h in hosts.values():
            h.close()


# -- benign rings of generated vsock packets -------------------------------------------------

KINDS = ["rw", "rw", "rw", "rw", "credit_update", "other_port", "other_op", "other_cid",
         "seqpacket", "split_header", "len_beyond", "no_payload_room"]
packet = st.tuples(
    st.sampled_from(KINDS),
    st.sampled_from([0, 1, 100, 4096, 20000]),  # len
    st.integers(1, 3),  # payload pieces
    st.sampled_from([256 * 1024, 4096]),  # buf_alloc
    st.integers(0, 2),  # fwd_cnt
)


def _chain_buffers(kind: str, len_: int, pieces: int, ba: int, fc: int, seq: int):
    src_cid, src_port, dst_port, type_, op = CID, GUEST_PORT, HOST_PORT, 1, 5
    if kind == "other_port":
        src_port += 1
    elif kind == "other_op":
        op = 6  # CREDIT_UPDATE: in the run only without payload
    elif kind == "credit_update":
        op, len_ = 6, 0
    elif kind == "other_cid":
        src_cid = CID + 1
    elif kind == "seqpacket":
        type_ = 2
    hdr = VsockHeader.FMT.pack(src_cid, 2, src_port, dst_port, len_, type_, op, 0, ba, fc)
    payload = bytes((seq * 31 + i) & 0xFF for i in range(len_))
    if kind == "len_beyond":
        payload = payload[:len_ // 2]
    if kind == "split_header":
        return [hdr[:20], hdr[20:] + payload]
    if kind == "no_payload_room" or not payload:
        return [hdr] + ([payload] if payload else [])
    # the header's buffer carries the first piece of payload, as Linux's skb may not
    cut = [len(payload) * k // pieces for k in range(pieces + 1)]
    parts = [payload[cut[k]:cut[k + 1]] for k in range(pieces)]
    return [hdr + parts[0]] + [p for p in parts[1:] if p]


@settings(max_examples=100, deadline=None)
@given(packed=st.booleans(), event_idx=st.booleans(),
       packets=st.lists(packet, min_size=0, max_size=12),
       mode=st.sampled_from(["open", "open", "small", "full", "closed"]),
       credit=st.sampled_from([0, 100, 7000, 30000, 1 << 20]),
       max_chains=st.sampled_from([256, 3, 1, 0]),
       peer=st.sampled_from([(256 * 1024, 0), (4096, 1)]))
def test_lane_c_matches_reference(impls, packed, event_idx, packets, mode, credit, max_chains,
                                  peer):
    mem = bytearray_memory((0, 1 << 20))
    driver = (PackedDriver if packed else SplitDriver)(mem, 64, event_idx=event_idx)
    for seq, (kind, len_, pieces, ba, fc) in enumerate(packets):
        driver.add_buf(_chain_buffers(kind, len_, pieces, ba, fc, seq))
    if event_idx and not packed:
        driver.write_used_event(0)
    pair = RingPair(impls, mem)
    pair.build(64, packed=packed, event_idx=event_idx)
    pair.call("configure", *driver.ring_addresses)
    args = (CID, HOST_PORT, GUEST_PORT, credit, *peer, max_chains)
    first, second = _run_both(pair, [mode], [args, args])
    # what the reference did is what the lane promises
    taken = first[0]
    assert taken <= max_chains
    if first[1] == Stop.EMPTY:
        assert taken == len(packets)
    assert first[2] <= min(credit, TAIL_CAP)
    assert first[3] + len(first[4]) == first[2]  # written + tail = payload bytes
    # CREDIT_UPDATEs without payload are in the run, and counted
    assert first[12] == sum(1 for kind, len_, *_ in packets[:taken]
                            if kind == "credit_update" or (kind == "other_op" and not len_))


def test_lane_takes_the_run_and_gives_back_the_rest(impls):
    """Three RW packets, then another port's: three taken in one sendmsg, the fourth is
    still available for the general path; the bytes arrive in order."""
    for name, lane in (("py", PyTxLane(TAIL_CAP)), ("c", CTxLane(TAIL_CAP))):
        mem = bytearray_memory((0, 1 << 20))
        driver = SplitDriver(mem, 8)
        for seq, kind in enumerate(["rw", "rw", "rw", "other_port"]):
            driver.add_buf(_chain_buffers(kind, 100, 2, 4096, 0, seq))
        vq = driver.attach(impls[name])
        host = _Host("open")
        try:
            res = lane.run(vq, host.a, CID, HOST_PORT, GUEST_PORT, 1 << 20, 0, 0)
            assert (res.chains, res.stop, res.bytes, res.written) == (3, Stop.OTHER, 300, 300)
            assert res.credit_changed and (res.peer_buf_alloc, res.peer_fwd_cnt) == (4096, 0)
            expected = b"".join(bytes((s * 31 + i) & 0xFF for i in range(100)) for s in range(3))
            assert host.received() == expected
            chain = vq.pop()
            assert chain is not None and vq.in_flight == 1  # the other port's packet
        finally:
            host.close()


def test_lane_stops_before_exceeding_the_credit(impls):
    """Spec: virtio 1.2 §5.10.6.3.1: "VIRTIO_VSOCK_OP_RW data packets MUST only be
    transmitted when the peer has sufficient free buffer space for the payload." The lane
    never takes a packet beyond the credit: it is given back (for the general path, which
    resets the connection)."""
    for name, lane in (("py", PyTxLane(TAIL_CAP)), ("c", CTxLane(TAIL_CAP))):
        mem = bytearray_memory((0, 1 << 20))
        driver = SplitDriver(mem, 8)
        for seq in range(3):
            driver.add_buf(_chain_buffers("rw", 4096, 1, 4096, 0, seq))
        vq = driver.attach(impls[name])
        host = _Host("open")
        try:
            res = lane.run(vq, host.a, CID, HOST_PORT, GUEST_PORT, 8191, 4096, 0)
            assert (res.chains, res.stop, res.bytes) == (1, Stop.CREDIT, 4096)
            assert vq.in_flight == 0 and vq.last_avail_idx == 1
        finally:
            host.close()


def test_one_lane_serves_queues_in_turn(impls):
    """Spec: virtio 1.2 §5.10.6: one lane object over two TX queues in turn (a device reset
    makes a new queue; CTxLane binds its queue's methods once per queue): each call takes
    the packets of the queue it is given, into that queue's host socket."""
    for name, lane in (("py", PyTxLane(TAIL_CAP)), ("c", CTxLane(TAIL_CAP))):
        sides = []
        for base in (0, 50):
            mem = bytearray_memory((0, 1 << 20))
            driver = SplitDriver(mem, 8)
            for seq in range(base, base + 4):
                driver.add_buf(_chain_buffers("rw", 100, 1, 4096, 0, seq))
            sides.append((driver.attach(impls[name]), _Host("open"), base))
        try:
            for turn in range(2):
                for vq, host, base in sides:
                    res = lane.run(vq, host.a, CID, HOST_PORT, GUEST_PORT, 1 << 20, 4096, 0,
                                   2)
                    assert (res.chains, res.bytes, res.written) == (2, 200, 200), name
                    seqs = range(base + 2 * turn, base + 2 * turn + 2)
                    assert host.received() == b"".join(
                        bytes((s * 31 + i) & 0xFF for i in range(100)) for s in seqs)
        finally:
            for _vq, host, _base in sides:
                host.close()


# -- hostile rings -----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(raw=raw_rings(), credit=st.sampled_from([0, 1 << 20]))
def test_lane_on_hostile_rings_matches_reference(impls, raw: RawRing, credit):
    """Hostile descriptor tables (loops, bad next, nested indirect, buffers past RAM, ...):
    both lanes report the same DriverError (code, queue, head) with the same guest memory
    and queue state, or stop at the same chain and give it back identically."""
    pair, started = start_pair(impls, raw)
    if not started:
        return
    args = (CID, HOST_PORT, GUEST_PORT, credit, 0, 0, 256)
    first, second = _run_both(pair, ["open"], [args, args])
    if first[1] == Stop.BROKEN:  # the queue stays broken: the next call says so
        assert second[1] == Stop.BROKEN and second[-1][1] == ChainError.BROKEN


# -- the CREDIT_UPDATE put (vs_rx_put) ---------------------------------------------------------

PACKET = VsockHeader.FMT.pack(2, CID, HOST_PORT, GUEST_PORT, 0, 1, 6, 0, 262144, 12345)


def _put_both(pair: RingPair, times: int = 2) -> list:
    puts = {"py": put_packet_py, "c": CPut()}
    calls = {side.name: os.eventfd(0, os.EFD_NONBLOCK) for side in pair.sides}
    try:
        for side in pair.sides:
            side.vq.call_fd = calls[side.name]
        out = []
        for _ in range(times):
            keys = []
            for side in pair.sides:
                res = puts[side.name](side.vq, PACKET)
                broken = None if res.broken is None else exc_key(res.broken, side.memory)
                try:
                    signalled = int.from_bytes(os.read(calls[side.name], 8), "little")
                except BlockingIOError:
                    signalled = 0
                keys.append((tuple(res._replace(broken=None)), broken, signalled))
            assert keys[1:] == keys[:1] * (len(keys) - 1), keys
            pair.check("put")
            out.append(keys[0])
        return out
    finally:
        for fd in calls.values():
            os.close(fd)


@settings(max_examples=200, deadline=None)
@given(raw=raw_rings())
def test_put_on_hostile_rings_matches_reference(impls, raw: RawRing):
    """Hostile rings: the same DriverError (code, queue, head), or the same buffer written
    (guest memory and dirty log byte-identical), or the same small buffer given back."""
    pair, started = start_pair(impls, raw)
    if not started:
        return
    _put_both(pair)


@settings(max_examples=60, deadline=None)
@given(packed=st.booleans(), event_idx=st.booleans(), log=st.booleans(),
       sizes=st.lists(st.lists(st.sampled_from([1, 20, 24, 44, 4096]), min_size=1,
                               max_size=3), max_size=4))
def test_put_on_benign_rings_matches_reference(impls, packed, event_idx, log, sizes):
    """RX chains of one to three writable buffers (a header may straddle them, or not
    fit): the same outcome, bytes, dirty log, used ring and notifications."""
    mem = make_memory(log=log)
    driver = (PackedDriver if packed else SplitDriver)(mem, 16, event_idx=event_idx)
    for in_sizes in sizes:
        driver.add_buf(in_sizes=in_sizes)
    pair = RingPair(impls, mem)
    pair.build(16, packed=packed, event_idx=event_idx)
    pair.call("configure", *driver.ring_addresses)
    results = _put_both(pair, times=len(sizes) + 1)
    for in_sizes, (res, _broken, _signalled) in zip(sizes, results):
        if sum(in_sizes) < HDR:
            assert res[0] == Put.SMALL
            break
        assert res[0] == Put.DONE
    else:
        assert results[-1][0][0] == Put.EMPTY


def test_put_writes_the_header_and_uses_44_bytes(impls):
    for name, put in (("py", put_packet_py), ("c", CPut())):
        mem = bytearray_memory((0, 1 << 20))
        driver = SplitDriver(mem, 8)
        driver.add_buf(in_sizes=[20, 4096])
        vq = driver.attach(impls[name])
        assert put(vq, PACKET).status == Put.DONE
        (used,) = driver.get_bufs()
        assert used.len_ == HDR
        assert used.data[:HDR] == PACKET


def test_one_put_serves_queues_in_turn(impls):
    """Spec: virtio 1.2 §5.10.6: one put object over two RX queues in turn (CPut binds its
    queue's methods once per queue): each packet lands in the queue it is given."""
    for name, put in (("py", put_packet_py), ("c", CPut())):
        drivers = []
        for _ in range(2):
            mem = bytearray_memory((0, 1 << 20))
            driver = SplitDriver(mem, 8)
            for _ in range(2):
                driver.add_buf(in_sizes=[4096])
            drivers.append((driver, driver.attach(impls[name])))
        for turn in range(2):
            for i, (driver, vq) in enumerate(drivers):
                packet = bytes([turn * 2 + i]) * HDR
                assert put(vq, packet).status == Put.DONE, name
                (used,) = driver.get_bufs()
                assert (used.len_, used.data[:HDR]) == (HDR, packet)


# -- the CREDIT_UPDATE after a quiet run (LaneUpdate) ------------------------------------------

BUF_ALLOC = 256 * 1024


def _lane_with_update(impl, name: str, packed: bool, event_idx: bool, packets: list,
                      mode: str, credit: int, rx_sizes: list, counters: tuple) -> tuple:
    """One lane run with a `LaneUpdate` on fresh TX and RX rings in one guest memory: what
    the guest and the host observe (result, host bytes, both rings' used entries and call
    counts)."""
    mem = bytearray_memory((0, 1 << 20))
    alloc = Allocator(mem)
    drv = PackedDriver if packed else SplitDriver
    tx = drv(mem, 64, event_idx=event_idx, allocator=alloc, index=1)
    rx = drv(mem, 16, event_idx=event_idx, allocator=alloc, index=0)
    for seq, (kind, len_, pieces, ba, fc) in enumerate(packets):
        tx.add_buf(_chain_buffers(kind, len_, pieces, ba, fc, seq))
    for sizes in rx_sizes:
        rx.add_buf(in_sizes=sizes)
    txq, rxq = tx.attach(impl), rx.attach(impl)
    host = _Host(mode)
    rx_call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        txq.call_fd, rxq.call_fd = host.call, rx_call
        lane = PyTxLane(TAIL_CAP) if name == "py" else CTxLane(TAIL_CAP)
        recv, adv_gap, fwd_gap, threshold, owed = counters
        update = LaneUpdate(rxq, BUF_ALLOC, recv, (recv - fwd_gap) & 0xFFFFFFFF,
                            (recv - adv_gap) & 0xFFFFFFFF, threshold, owed)
        res = lane.run(txq, host.a, CID, HOST_PORT, GUEST_PORT, credit, BUF_ALLOC, 0,
                       LANE_CHAINS, update)
        put = None if res.put is None else (
            tuple(res.put._replace(broken=None)),
            None if res.put.broken is None else exc_key(res.put.broken, mem))
        try:
            rx_calls = int.from_bytes(os.read(rx_call, 8), "little")
        except BlockingIOError:
            rx_calls = 0
        return (_key(res._replace(put=None), mem), put, host.received(), host.calls(),
                rx_calls, [(u.len_, u.data) for u in rx.get_bufs()],
                [u.len_ for u in tx.get_bufs()])
    finally:
        host.close()
        os.close(rx_call)


#: packets that mostly carry the credit fields the lane is given (quiet runs), some not
quiet_packet = st.tuples(
    st.sampled_from(["rw", "rw", "rw", "credit_update", "other_port", "len_beyond"]),
    st.sampled_from([0, 100, 4096, 20000]),  # len
    st.integers(1, 2),  # payload pieces
    st.just(BUF_ALLOC),  # buf_alloc
    st.sampled_from([0, 0, 0, 1]),  # fwd_cnt
)


@settings(max_examples=150, deadline=None)
@given(packed=st.booleans(), event_idx=st.booleans(),
       packets=st.lists(quiet_packet, min_size=0, max_size=8),
       mode=st.sampled_from(["open", "open", "open", "small", "full", "closed"]),
       credit=st.sampled_from([0, 7000, 1 << 20]),
       rx_sizes=st.sampled_from([[], [[4096]], [[20]], [[20, 24]], [[44], [4096]]]),
       counters=st.tuples(st.sampled_from([0, 5000, 0xFFFFFF00]),  # recv_cnt
                          st.sampled_from([0, 1000, 200000, BUF_ALLOC]),  # recv - adv
                          st.sampled_from([0, 1000, 200000]),  # recv - fwd (<= the above
                          st.sampled_from([1, 65536]),  # threshold         when relevant)
                          st.booleans()))  # owed
def test_lane_update_c_matches_reference(impls, packed, event_idx, packets, mode, credit,
                                         rx_sizes, counters):
    """The lane with a `LaneUpdate`: C and Python take the same run, and after a quiet run
    make the same CREDIT_UPDATE decision and put the same header into the same RX buffer
    (or find none, or one too small) with the same notifications; a run that is not quiet
    (a credit field changed, a tail, a send error) puts nothing. (vs_rx_put on hostile
    rings: test_put_on_hostile_rings_matches_reference.)
    Spec: virtio 1.2 §5.10.6.3 (CREDIT_UPDATE), §5.10.6 (one packet per RX buffer)."""
    got = {name: _lane_with_update(impls[name], name, packed, event_idx, packets, mode, credit,
                                   rx_sizes, counters) for name in ("py", "c")}
    assert got["c"] == got["py"]
    res, put = got["py"][0], got["py"][1]
    chains, _stop, nbytes, written, tail, error, _broken, _ba, _fc, changed = res[:10]
    recv, adv_gap, fwd_gap, threshold, owed = counters
    quiet = chains and not changed and not tail and error is None
    due = credit_update_due(BUF_ALLOC, (recv + nbytes) & 0xFFFFFFFF,
                            (recv - adv_gap) & 0xFFFFFFFF,
                            (recv - fwd_gap + written) & 0xFFFFFFFF, threshold)
    assert (put is not None) == bool(quiet and (owed or due))
    event(f"put: {None if put is None else Put(put[0][0]).name}")
    if put is not None and put[0][0] == Put.DONE:
        fwd = (recv - fwd_gap + written) & 0xFFFFFFFF
        want = VsockHeader.FMT.pack(2, CID, HOST_PORT, GUEST_PORT, 0, 1, 6, 0, BUF_ALLOC, fwd)
        assert got["py"][5][0] == (HDR, want)


def test_lane_update_puts_the_due_credit_update_once(impls):
    """Three RW packets of 40,000 bytes that the socket takes: the guest's view of our free
    space falls under the threshold, so the lane puts one CREDIT_UPDATE with fwd_cnt
    advanced by the bytes written; with nothing due and nothing owed it puts nothing.
    Spec: virtio 1.2 §5.10.6.3."""
    for name in ("py", "c"):
        packets = [("rw", 20000, 2, BUF_ALLOC, 0)] * 6
        due = _lane_with_update(impls[name], name, False, True, packets, "open", 1 << 20,
                                [[4096]], (200000, 200000, 0, 65536, False))
        assert due[1][0][0] == Put.DONE, name
        want = VsockHeader.FMT.pack(2, CID, HOST_PORT, GUEST_PORT, 0, 1, 6, 0, BUF_ALLOC,
                                    200000 + 120000)
        assert due[5] == [(HDR, want)], name
        quiet = _lane_with_update(impls[name], name, False, True, packets[:1], "open",
                                  1 << 20, [[4096]], (0, 0, 0, 65536, False))
        assert quiet[1] is None and quiet[5] == [], name
