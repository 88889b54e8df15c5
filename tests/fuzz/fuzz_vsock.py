"""Fuzz harness for the vsock core (``VsockMuxer`` and its connections), guest- and host-facing.

The fuzz input is read as steps: guest packets (every op and type, ports from a small set so
packets meet real connections, a ``len`` that may lie about the payload, wrong CIDs), host
events (data, EOF, hang-up, a full or drained socket, a refused connect, a new hybrid-vsock
CONNECT), time passing, and the device draining its RX queue. The guest never grants more
credit than ``buf_alloc`` bytes per connection and never reports consumption (fwd_cnt 0).

Invariants (virtio 1.2 §5.10.6.3 "Buffer Space Management"; STYLE R5):
- nothing but the documented results comes out: no exception, whatever the sequence;
- the device never sends a connection more payload than the credit the guest gave
  (``buf_alloc`` with fwd_cnt 0), so the guest is never overrun;
- the connection table stays within its bound.

Run under atheris: ``python3 tests/fuzz/fuzz_vsock.py [corpus_dir]``; as a short pytest:
``tests/fuzz/test_fuzz_corpus.py``.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

from tests.unit.test_vsock_support import Harness, pkt  # noqa: E402
from virtio.vsock.errors import TableFullError  # noqa: E402
from virtio.vsock.muxer import MuxerConfig  # noqa: E402
from virtio.vsock.wire import Op  # noqa: E402

CID = 3
PORTS = (80, 81, 1024, 50000)
MAX_CONNECTIONS = 8


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    buf_alloc = 1024 * (1 + data[0] % 16)
    h = Harness(MuxerConfig(max_connections=MAX_CONNECTIONS), seqpacket=bool(data[1] & 1))
    delivered: dict[tuple[int, int], int] = defaultdict(int)  # (host port, guest port)
    pos = 2

    def take() -> int:
        nonlocal pos
        pos += 1
        return data[pos - 1] if pos <= len(data) else 0

    while pos < len(data):
        kind = take() % 8
        if kind <= 2:  # a guest packet
            op, type_, flags = take() % 9, take() % 4, take() % 4
            src, dst = PORTS[take() % 4], PORTS[take() % 4]
            payload = bytes(take() % 64)
            lie = take()
            len_ = len(payload) if lie < 200 else (lie * 977) & 0xFFFFFFFF
            src_cid = CID if take() < 240 else take()
            dst_cid = 2 if take() < 240 else take()
            h.send(pkt(op, src, dst, payload=payload, len_=len_, type_=type_, flags=flags,
                       buf_alloc=buf_alloc, fwd_cnt=0, src_cid=src_cid, dst_cid=dst_cid))
        elif kind == 3 and h.socks:  # the host side of a connection does something
            keys = sorted(h.socks)
            key = keys[take() % len(keys)]
            action = take() % 4
            if action == 0:
                h.host_sends(key, bytes(64 * (1 + take() % 64)))
            elif action == 1:
                h.host_sends(key, eof=True, hangup=bool(take() & 1))
            elif action == 2:
                h.writable(key, capacity=take() * 16)
            else:
                h.socks[key].capacity = 0
        elif kind == 4:  # a hybrid-vsock client asks for a guest port
            try:
                key, actions = h.mux.host_connect_request(CID, PORTS[take() % 4], h.now, b"")
                h.run(actions)
            except TableFullError:
                pass
        elif kind == 5:
            h.advance(take() / 32)
        else:  # the device drains its RX queue into guest buffers
            for header, payload in h.rx(CID, max_payload=1 + take() * 16, limit=200):
                pair = (header.src_port, header.dst_port)
                if header.op in (Op.REQUEST, Op.RESPONSE, Op.RST):
                    delivered[pair] = 0  # a new connection (or none) on these ports
                elif header.op == Op.RW:
                    delivered[pair] += header.len_
                    assert header.len_ == len(payload)
        over = {k: v for k, v in delivered.items() if v > buf_alloc}
        assert not over, f"sent beyond the guest's credit of {buf_alloc}: {over}"
        assert h.mux.connection_count <= MAX_CONNECTIONS


def main(argv: list[str]) -> None:
    import logging

    import atheris

    logging.disable(logging.CRITICAL)
    atheris.instrument_all()
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
