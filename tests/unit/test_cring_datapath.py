"""The batched data path of ring.cring (vr_tx_to_fd / vr_rx_from_fd) against the reference
ring.datapath over real socketpairs: same results, pending chains, used rings, bytes on the
wire, dirty log.

Spec: virtio 1.2 §2.7.13 / §2.8.21 (device side of the used ring), §5.3.6 (console data).
"""

from __future__ import annotations

import socket
import struct

import pytest

from ring.errors import ChainError
from tests.unit.test_cring_differential import (DATA, NEXT, WRITE, Twin, U,  # noqa: F401
                                                cring, pdesc)

DESC = struct.Struct("<QIHH")


def pairs(sndbuf=None):
    """One non-blocking socketpair per implementation: (device end, host peer)."""
    out = []
    for _ in range(2):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if sndbuf:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
        a.setblocking(False)
        b.setblocking(False)
        out.append((a, b))
    return out


def drain(sock):
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def post_split(t, heads_data, first_idx=0, writable=0):
    """Make chains available: each of readable data (split, one descriptor + optional
    writable descriptor), in order from avail slot first_idx."""
    addr = DATA
    for k, data in enumerate(heads_data):
        t.write(addr, data)
        if writable:
            t.desc(k, addr, len(data), NEXT if data else WRITE, k + 8 if data else 0)
        t.desc(k, addr, len(data), 0) if not writable else None
        t.avail((first_idx + k) % t.size, k)
        addr += len(data) + 7
    t.avail_idx(first_idx + len(heads_data))


def run(t, socks, method, *args):
    """Call vq.<method>(device_fd, *args) on both; compare results (Twin.step)."""
    it = iter(socks)
    fds = {}

    def op(vq):
        if id(vq) not in fds:
            fds[id(vq)] = next(it)[0].fileno()
        return getattr(vq, method)(fds[id(vq)], *args)
    # keep fd assignment stable: py first, c second
    fds[id(t.vqs[0])] = socks[0][0].fileno()
    fds[id(t.vqs[1])] = socks[1][0].fileno()
    return t.step(op)


@pytest.mark.parametrize("packed", [False, True])
def test_tx_whole_chains_one_publication(cring, packed):
    t = Twin(cring, 8, packed=packed, event_idx=True)
    socks = pairs()
    payload = [bytes([65 + k]) * (100 + k) for k in range(5)]
    if packed:
        addr = DATA
        for k, data in enumerate(payload):
            t.write(addr, data)
            pdesc(t, k, addr, len(data), k, 0)
            addr += len(data)
    else:
        post_split(t, payload)
    res = run(t, socks, "tx_to_fd")
    assert res.bytes == sum(map(len, payload)) and res.chains == 5 and not res.blocked
    assert [drain(b) for _, b in socks] == [b"".join(payload)] * 2
    assert t.vqs[1].pending is None


def test_tx_partial_writes_resume_pending(cring):
    t = Twin(cring, 16, event_idx=False, regions=((0, 0x400000),))
    socks = pairs(sndbuf=4096)
    big = [bytes([k]) * 60000 for k in range(1, 7)]
    addr = DATA
    for k, data in enumerate(big):
        t.write(addr, data)
        t.desc(k, addr, len(data), 0)
        t.avail(k, k)
        addr += len(data)
    t.avail_idx(len(big))
    received = [b"", b""]
    saw_pending = False
    for _ in range(200):
        res = run(t, socks, "tx_to_fd")
        saw_pending |= t.vqs[1].pending is not None and res.blocked
        for i, (_, b) in enumerate(socks):
            received[i] += drain(b)
        if t.vqs[0].pending is None and res.chains and t.vqs[0].in_flight == 0 and \
                t.vqs[0].last_avail_idx == len(big):
            break
    assert saw_pending  # partial writes really happened and were resumed
    assert received[0] == received[1] == b"".join(big)


def test_tx_max_bytes_and_error_and_broken(cring):
    t = Twin(cring, 8)
    socks = pairs()
    post_split(t, [b"abcdef", b"ghij", b"kl"])
    res = run(t, socks, "tx_to_fd", 8)  # budget splits the second chain
    assert res.bytes == 8 and t.vqs[1].pending.offset == 2
    # a hostile chain after the good ones: the result reports broken, good chains complete
    t.desc(3, 0x10000000, 4, 0)
    t.avail(3, 3)
    t.avail_idx(4)
    res = run(t, socks, "tx_to_fd")
    assert res.broken == ChainError.ADDR
    # the peer went away: EPIPE, the pending chain stays pending
    t2 = Twin(cring, 8)
    socks2 = pairs()
    post_split(t2, [b"x" * 10])
    for _, b in socks2:
        b.close()
    res = run(t2, socks2, "tx_to_fd")
    assert res.error is not None and res.chains == 0


def test_rx_fills_chains_gives_back_untouched_eof_and_starved(cring):
    t = Twin(cring, 8, event_idx=True)
    socks = pairs()
    for k in range(4):
        t.desc(k, DATA + 0x1000 * k, 64, WRITE)
        t.avail(k, k)
    t.avail_idx(4)
    for _, b in socks:
        b.send(b"z" * 100)
    res = run(t, socks, "rx_from_fd")
    assert res.bytes == 100 and res.chains == 2 and res.drained and not res.eof
    assert t.vqs[1].last_avail_idx == 2  # the untouched chains were given back
    for _, b in socks:
        b.send(b"q" * 500)
    res = run(t, socks, "rx_from_fd")
    assert res.bytes == 128 and res.starved
    assert run(t, socks, "rx_from_fd").starved
    for k in range(4):
        t.avail((4 + k) % 8, k)
    t.avail_idx(8)
    res = run(t, socks, "rx_from_fd", 10)  # max_bytes
    assert res.bytes == 10 and res.chains == 1
    # a peer that closed with data still queued: the data, then EOF
    t2 = Twin(cring, 8)
    socks2 = pairs()
    for k in range(2):
        t2.desc(k, DATA + 0x1000 * k, 64, WRITE)
        t2.avail(k, k)
    t2.avail_idx(2)
    for _, b in socks2:
        b.send(b"tail")
        b.close()
    res = run(t2, socks2, "rx_from_fd")  # a short read ends the call: no second readv
    assert res.drained and not res.eof and res.bytes == 4 and res.chains == 1
    res = run(t2, socks2, "rx_from_fd")  # the fd stays readable: the next call sees EOF
    assert res.eof and res.bytes == 0 and res.chains == 0
    assert t2.vqs[1].last_avail_idx == 1


def test_rx_zero_writable_and_packed(cring):
    t = Twin(cring, 4, packed=True)
    socks = pairs()
    pdesc(t, 0, DATA, 8, 2, 0)          # readable only: given back with 0
    pdesc(t, 1, DATA + 0x100, 16, 1, WRITE)
    pdesc(t, 2, DATA + 0x200, 16, 0, WRITE)
    for _, b in socks:
        b.send(b"0123456789abcdefXYZ")
    res = run(t, socks, "rx_from_fd")
    assert res.chains == 3 and res.bytes == 19
