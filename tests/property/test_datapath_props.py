"""Data-path properties of ``tx_to_fd`` / ``rx_from_fd`` over real sockets, both
implementations, compared with each other.

TX: chains added in stages are written into a ``socketpair`` whose send buffer is small,
with a reader draining random amounts between calls. Per implementation: after every call
the bytes written so far equal the readable bytes of the chains the driver reaped plus the
pending chain's offset (a chain is used only after all its bytes left); in the end the reader
received exactly the concatenation of every chain's readable bytes, in order, and every
chain came back once with used length 0.

RX: random writes into a socket; after every call the driver reaps chains whose data,
concatenated, is exactly the prefix of the stream sent so far; used lengths never exceed the
writable size and only the last chain that received data in a call may be partly filled.

Both implementations see identical syscall sequences, so their results, guest memory and
queue state must be identical too.

Spec: virtio 1.2 §2.7.13 / §2.8.21 (used buffers), §5.3.6 (console port data);
docs/internals.md "The batched data path", "Reconciled details" 7–8.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import event, given, reject
from hypothesis import strategies as st

from tests.property.profiles import scaled
from tests.property.ringpair import RingPair, make_memory, require_pair
from tests.support.driver import Allocator, make_driver

CHAIN = st.tuples(
    st.lists(st.one_of(st.integers(0, 64), st.integers(0, 9000)), min_size=1,
             max_size=3),  # readable sizes (0 allowed)
    st.lists(st.integers(1, 64), max_size=1),  # writable parts (TX ignores them)
    st.booleans(),  # indirect
)


def data_for(seq: int, n: int) -> bytes:
    return bytes((seq * 131 + i * 29 + (i >> 8)) & 0xFF for i in range(n))


def _setup(impls, packed: bool, size: int, event_idx: bool):
    pair = RingPair(impls, make_memory(log=True))
    drivers = []
    for side in pair.sides:
        drv = make_driver(side.memory, size, packed=packed, event_idx=event_idx,
                          allocator=Allocator(side.memory, start=0x1000))
        side.vq = drv.attach(impls[side.name])
        drivers.append(drv)
    return pair, drivers


def _socketpairs(n: int, sndbuf: int | None):
    socks = []
    for _ in range(n):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if sndbuf:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        a.setblocking(False)
        b.setblocking(False)
        socks.append((a, b))
    return socks


@pytest.fixture(scope="module")
def impls():
    return require_pair()


@scaled(1.5)
@given(packed=st.booleans(), size=st.sampled_from([2, 4, 8]), event_idx=st.booleans(),
       stages=st.lists(st.lists(CHAIN, max_size=6), min_size=1, max_size=4),
       sndbuf=st.sampled_from([None, 2048, 4096, 8192]),
       reads=st.lists(st.one_of(st.integers(0, 512), st.integers(0, 20000)), min_size=1,
                      max_size=8),
       max_bytes=st.one_of(st.none(), st.integers(1, 5000)))
def test_tx_delivers_readable_bytes_in_order(impls, packed, size, event_idx, stages, sndbuf,
                                             reads, max_bytes):
    pair, drivers = _setup(impls, packed, size, event_idx)
    socks = _socketpairs(len(pair.sides), sndbuf)
    try:
        n_sides = len(pair.sides)
        received = [bytearray() for _ in range(n_sides)]
        written = [0] * n_sides
        reaped_bytes = [0] * n_sides
        expected = bytearray()
        sizes: dict = {}  # per side: head -> readable bytes of the outstanding chain
        order = [[] for _ in range(n_sides)]  # heads in add order, per side
        done_order = [[] for _ in range(n_sides)]
        seq = 0
        backlog = [list(s) for s in stages]

        def add_some(chains):
            nonlocal seq
            for outs, ins, indirect in chains:
                bufs = [data_for(seq + k, n) for k, n in enumerate(outs)]
                seq += len(outs)
                heads = []
                for i, drv in enumerate(drivers):
                    try:
                        heads.append(drv.add_buf(out=bufs, in_sizes=ins, indirect=indirect))
                    except MemoryError:
                        heads.append(None)
                assert len(set(heads)) == 1
                if heads[0] is None:
                    return
                expected.extend(b"".join(bufs))
                for i in range(n_sides):
                    sizes[(i, heads[i])] = sum(outs)
                    order[i].append(heads[i])

        def step(read_amount):
            results = pair.apply(lambda side: side.vq.tx_to_fd(
                socks[pair.sides.index(side)][0].fileno(), max_bytes), "tx_to_fd")
            assert results[0] == "ok", results
            for i, res in enumerate(pair.last_values):
                assert res.broken is None and res.error is None
                written[i] += res.bytes
                for used in drivers[i].get_bufs():
                    assert used.len_ == 0
                    reaped_bytes[i] += sizes.pop((i, used.id))
                    done_order[i].append(used.id)
                pending = pair.sides[i].vq.pending
                if i == 0:
                    event(f"tx blocked={res.blocked} pending={pending is not None}")
                # used only after every byte left: the rest is the pending chain's offset
                assert written[i] == reaped_bytes[i] + (pending.offset if pending else 0)
                if read_amount:
                    try:
                        received[i] += socks[i][1].recv(read_amount)
                    except BlockingIOError:
                        pass

        for i, amount in enumerate(reads):
            if backlog:
                add_some(backlog.pop(0))
            step(amount)
        for stage in backlog:
            add_some(stage)
        for _ in range(2000):  # drain: everything must come out eventually
            if all(not [k for k in sizes if k[0] == i] for i in range(n_sides)):
                break
            step(1 << 16)
        for i in range(n_sides):
            while True:
                try:
                    chunk = socks[i][1].recv(1 << 16)
                except BlockingIOError:
                    break
                received[i] += chunk
            assert bytes(received[i]) == bytes(expected), f"{pair.sides[i].name}: stream"
            assert done_order[i] == order[i], "chains completed out of order"
        pair.check("end")
    finally:
        for a, b in socks:
            a.close()
            b.close()


@scaled(1.5)
@given(packed=st.booleans(), size=st.sampled_from([2, 4, 8]), event_idx=st.booleans(),
       chains=st.lists(st.tuples(st.lists(st.integers(0, 2000), max_size=2),
                                 st.booleans(), st.booleans()), min_size=1, max_size=16),
       writes=st.lists(st.integers(1, 3000), min_size=1, max_size=8),
       max_bytes=st.one_of(st.none(), st.integers(1, 2000)))
def test_rx_fills_chains_in_order(impls, packed, size, event_idx, chains, writes, max_bytes):
    if any(sum(ins) == 0 for ins, _r, _i in chains) and _c_has_rx_rewind_bug_cached():
        reject()  # a known C bug (test_regression_rx_readonly_chain_after_unfilled_chain)
    pair, drivers = _setup(impls, packed, size, event_idx)
    socks = _socketpairs(len(pair.sides), None)
    try:
        n_sides = len(pair.sides)
        stream = bytearray()
        got = [bytearray() for _ in range(n_sides)]
        writable: dict = {}
        backlog = list(chains)

        def refill():
            while backlog:
                ins, with_readable, indirect = backlog[0]
                heads = []
                for drv in drivers:
                    try:
                        heads.append(drv.add_buf(out=[b"hdr"] if with_readable or not ins
                                                 else [], in_sizes=ins, indirect=indirect))
                    except MemoryError:
                        heads.append(None)
                assert len(set(heads)) == 1
                if heads[0] is None:
                    return
                backlog.pop(0)
                for i in range(n_sides):
                    writable[(i, heads[i])] = sum(ins)

        def step():
            refill()
            results = pair.apply(lambda side: side.vq.rx_from_fd(
                socks[pair.sides.index(side)][1].fileno(), max_bytes), "rx_from_fd")
            assert results[0] == "ok", results
            for i, res in enumerate(pair.last_values):
                assert res.broken is None and res.error is None
                reaped = drivers[i].get_bufs()
                caps = [writable.pop((i, used.id)) for used in reaped]
                filled = [(u, cap) for u, cap in zip(reaped, caps) if u.len_ > 0]
                for used, cap in zip(reaped, caps):
                    assert used.len_ <= cap and len(used.data) == used.len_
                    got[i].extend(used.data)
                # a chain is never reused after a partial fill: only the last chain that
                # received data in this call may be partly filled
                assert all(u.len_ == cap for u, cap in filled[:-1])
                assert bytes(got[i]) == bytes(stream[:len(got[i])]), "stream order"
                assert res.bytes == sum(u.len_ for u in reaped)
                if i == 0:
                    event(f"rx drained={res.drained} starved={res.starved} eof={res.eof}")
            return pair.last_values[0]

        for n in writes:
            data = data_for(n, n)
            for a, _b in socks:
                a.sendall(data)
            stream.extend(data)
            step()
        for a, _b in socks:
            a.shutdown(socket.SHUT_WR)
        for _ in range(50):
            res = step()
            if res.eof or (res.starved and not backlog):
                break
        for i in range(n_sides):
            assert bytes(got[i]) == bytes(stream[:len(got[i])])
            if res.eof:
                assert bytes(got[i]) == bytes(stream)
        pair.check("end")
    finally:
        for a, b in socks:
            a.close()
            b.close()


# -- regressions ------------------------------------------------------------------------------
def _rx_readonly_after_unfilled(vq_cls, packed: bool):
    """Shrunk from test_rx_fills_chains_in_order: two 1-byte writable chains, then a chain
    with no writable part, and one byte of data. Returns what the driver reaped."""
    mem = make_memory()
    drv = make_driver(mem, 4, packed=packed, allocator=Allocator(mem, start=0x1000))
    vq = drv.attach(vq_cls)
    first = drv.add_buf(in_sizes=[1])
    second = drv.add_buf(in_sizes=[1])
    third = drv.add_buf(out=[b"hdr"])
    a, b = socket.socketpair()
    try:
        a.sendall(b"x")
        b.setblocking(False)
        vq.rx_from_fd(b.fileno())
        reaped = [(u.id, u.len_, u.data) for u in drv.get_bufs()]
        a.sendall(b"y")
        vq.rx_from_fd(b.fileno())
        reaped += [(u.id, u.len_, u.data) for u in drv.get_bufs()]
        vq.rx_from_fd(b.fileno())  # nothing waiting: the read-only chain comes back empty
        reaped += [(u.id, u.len_, u.data) for u in drv.get_bufs()]
    finally:
        a.close()
        b.close()
    return reaped, (first, second, third), vq


_PROBE: list = []


def _c_has_rx_rewind_bug_cached() -> bool:
    if not _PROBE:
        _PROBE.append(_c_has_rx_rewind_bug())
    return _PROBE[0]


def _c_has_rx_rewind_bug() -> bool:
    """Whether ring.cring still has the rx rewind bug fixed in ring/datapath.py (see the
    regression test below); the property test then avoids the shape for the C side."""
    impls = require_pair()
    try:
        reaped, (first, second, third), _vq = _rx_readonly_after_unfilled(impls["c"], False)
    except AssertionError:  # the driver model saw a head returned twice
        return True
    return reaped != [(first, 1, b"x"), (second, 1, b"y"), (third, 0, b"")]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("impl", ["py", "c"])
def test_regression_rx_readonly_chain_after_unfilled_chain(impl, packed):
    """A chain without writable buffers popped after chains the read does not reach must not
    be consumed past them: ``rx_from_fd`` rewinds unfilled chains by count from
    ``last_avail_idx``, so before the fix the unfilled chain was skipped (never returned)
    and the read-only chain was returned twice (the driver saw a head it no longer owned).
    Fixed in ring/datapath.py rx_from_fd; csrc/vring.c vr_rx_from_fd had the same bug."""
    from tests.support import ring_impl_class
    vq_cls = ring_impl_class(impl)
    if impl == "c" and _c_has_rx_rewind_bug():
        pytest.xfail("csrc/vring.c vr_rx_from_fd: read-only chain consumed past unfilled "
                     "chains (same bug as fixed in ring/datapath.py); reported to B")
    reaped, (first, second, third), vq = _rx_readonly_after_unfilled(vq_cls, packed)
    assert reaped == [(first, 1, b"x"), (second, 1, b"y"), (third, 0, b"")]
    assert vq.in_flight == 0


@scaled(1.5)
@given(packed=st.booleans(), size=st.sampled_from([2, 4, 8]), event_idx=st.booleans(),
       chains=st.lists(st.tuples(st.lists(st.integers(0, 120), max_size=3), st.booleans()),
                       min_size=1, max_size=16),
       writes=st.lists(st.integers(1, 1500), min_size=1, max_size=6),
       prefix=st.binary(max_size=48), with_len=st.booleans(), len_at=st.integers(0, 44),
       max_bytes=st.one_of(st.none(), st.integers(1, 1000)))
def test_rx_prefix_heads_every_filled_chain(impls, packed, size, event_idx, chains, writes,
                                           prefix, with_len, len_at, max_bytes):
    """``rx_from_fd(prefix=...)``: every chain that received payload starts with the prefix
    (its payload length as u32 LE at ``prefix_len_offset``), used length = prefix + payload,
    the payloads concatenated are the stream in order, a chain without room after the prefix
    comes back empty; both implementations byte-identical (vsock RX: header + payload)."""
    offset = min(len_at, len(prefix) - 4) if with_len and len(prefix) >= 4 else None
    plen = len(prefix)
    pair, drivers = _setup(impls, packed, size, event_idx)
    socks = _socketpairs(len(pair.sides), None)
    try:
        n_sides = len(pair.sides)
        stream = bytearray()
        got = [bytearray() for _ in range(n_sides)]
        writable: dict = {}
        backlog = list(chains)

        def refill():
            while backlog:
                ins, indirect = backlog[0]
                heads = []
                for drv in drivers:
                    try:
                        heads.append(drv.add_buf(out=[] if ins else [b"r"], in_sizes=ins,
                                                 indirect=indirect))
                    except MemoryError:
                        heads.append(None)
                assert len(set(heads)) == 1
                if heads[0] is None:
                    return
                backlog.pop(0)
                for i in range(n_sides):
                    writable[(i, heads[i])] = sum(ins)

        def step():
            refill()
            results = pair.apply(lambda side: side.vq.rx_from_fd(
                socks[pair.sides.index(side)][1].fileno(), max_bytes, prefix=prefix,
                prefix_len_offset=offset), "rx_from_fd")
            assert results[0] == "ok", results
            for i, res in enumerate(pair.last_values):
                assert res.broken is None and res.error is None
                payload_total = 0
                for used in drivers[i].get_bufs():
                    cap = writable.pop((i, used.id))
                    if cap <= plen:
                        assert used.len_ == 0
                        continue
                    assert used.len_ <= cap
                    if used.len_ == 0:
                        continue
                    n = used.len_ - plen
                    assert n > 0
                    want = bytearray(prefix)
                    if offset is not None:
                        want[offset:offset + 4] = n.to_bytes(4, "little")
                    assert bytes(used.data[:plen]) == bytes(want)
                    got[i].extend(used.data[plen:used.len_])
                    payload_total += n
                assert bytes(got[i]) == bytes(stream[:len(got[i])]), "stream order"
                assert res.bytes == payload_total
            return pair.last_values[0]

        for n in writes:
            data = data_for(n, n)
            for a, _b in socks:
                a.sendall(data)
            stream.extend(data)
            step()
        for a, _b in socks:
            a.shutdown(socket.SHUT_WR)
        for _ in range(50):
            res = step()
            if res.eof or (res.starved and not backlog):
                break
        for i in range(n_sides):
            if res.eof:
                assert bytes(got[i]) == bytes(stream)
        pair.check("end")
    finally:
        for a, b in socks:
            a.close()
            b.close()


@pytest.mark.parametrize("prefix, offset", [(b"x" * 257, None), (b"abc", 0), (b"abcd", 1),
                                            (b"abcd", -1), (b"", 0)])
def test_rx_prefix_arguments_checked_by_both(impls, prefix, offset):
    """Bad prefix arguments raise ValueError in both implementations, before any I/O."""
    for name, cls in impls.items():
        vq = cls(make_memory(), 4, packed=False, event_idx=False)
        with pytest.raises(ValueError):
            vq.rx_from_fd(-1, prefix=prefix, prefix_len_offset=offset)


# -- FIONREAD-bounded gathering and the short-read stop ------------------------------------------
def _rx_ring(vq_cls, packed: bool, chains, *, hostile_last: bool = False):
    """A size-8 ring with ``chains`` posted (lists of writable sizes, one descriptor each);
    ``hostile_last``: the last chain's descriptor then points outside guest memory, so a
    device that pops it breaks the queue."""
    mem = make_memory()
    drv = make_driver(mem, 8, packed=packed, allocator=Allocator(mem, start=0x1000))
    vq = drv.attach(vq_cls)
    heads = [drv.add_buf(in_sizes=ins) for ins in chains]
    if hostile_last:
        desc_gpa = drv.ring_addresses[0]
        slot = len(chains) - 1 if packed else heads[-1]
        drv.write(desc_gpa + 16 * slot, struct.pack("<Q", 0xFFFF_FFFF_0000))
    return mem, drv, vq


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rx_gathers_only_the_chains_the_waiting_bytes_need(impls, packed):
    """64 bytes waiting, eight 4 KiB chains posted: one chain is popped, filled and pushed;
    the read is short, so the call ends drained without a second read; the others stay
    available and are not even walked (the eighth is hostile: walking it would break the
    queue); the same in both implementations."""
    outcomes = []
    for name, cls in impls.items():
        _mem, drv, vq = _rx_ring(cls, packed, [[4096]] * 8, hostile_last=True)
        a, b = socket.socketpair()
        try:
            b.setblocking(False)
            a.sendall(b"m" * 64)
            res = vq.rx_from_fd(b.fileno())
            assert (res.bytes, res.chains, res.drained, res.eof, res.starved,
                    res.broken) == (64, 1, True, False, False, None), name
            used = drv.get_bufs()
            assert [(u.len_, bytes(u.data)) for u in used] == [(64, b"m" * 64)]
            assert vq.in_flight == 0 and vq.last_avail_idx == 1
            a.sendall(b"n" * 9000)  # needs three chains: exactly three are used
            res = vq.rx_from_fd(b.fileno())
            assert (res.bytes, res.chains, res.drained, res.broken) == (9000, 3, True, None)
            assert [u.len_ for u in drv.get_bufs()] == [4096, 4096, 808]
            a.close()
            res = vq.rx_from_fd(b.fileno())
            assert (res.bytes, res.chains, res.eof, res.broken) == (0, 0, True, None), name
            outcomes.append(vq.last_avail_idx)
        finally:
            a.close()
            b.close()
    assert len(set(outcomes)) == 1 and outcomes[0] == 4


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rx_from_fd_without_fionread_falls_back_to_the_budget(impls, packed):
    """An fd that cannot say how much is waiting (``/dev/zero``: FIONREAD fails) is read as
    before: as many chains as ``max_bytes`` needs, in one call."""
    for name, cls in impls.items():
        _mem, drv, vq = _rx_ring(cls, packed, [[1000]] * 6)
        fd = os.open("/dev/zero", os.O_RDONLY | os.O_NONBLOCK)
        try:
            res = vq.rx_from_fd(fd, 2500)
        finally:
            os.close(fd)
        assert (res.bytes, res.chains, res.drained, res.eof) == (2500, 3, False, False), name
        assert [u.len_ for u in drv.get_bufs()] == [1000, 1000, 500]
        assert vq.last_avail_idx == 3


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rx_from_pipe_uses_fionread_too(impls, packed):
    """Pipes answer FIONREAD: 5000 bytes into 1000-byte chains take five chains, drained."""
    for name, cls in impls.items():
        _mem, drv, vq = _rx_ring(cls, packed, [[1000]] * 8)
        r, w = os.pipe()
        try:
            os.set_blocking(r, False)
            os.write(w, bytes(range(250)) * 20)
            res = vq.rx_from_fd(r)
            assert (res.bytes, res.chains, res.drained) == (5000, 5, True), name
            assert b"".join(bytes(u.data) for u in drv.get_bufs()) == bytes(range(250)) * 20
        finally:
            os.close(r)
            os.close(w)
