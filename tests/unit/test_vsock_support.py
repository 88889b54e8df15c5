"""Test harness for the vsock core: a fake device + I/O adapter executing muxer actions.

Not a test module (no ``test_`` prefix); imported by tests/unit/test_vsock_*.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from virtio.vsock.conn import (CloseHost, ConnectHost, ConnKey, ReplyHost, RxPacket, RxRead,
                               RxReady, SetHostInterest, SetTimer, ShutdownHost, WriteHost)
from virtio.vsock.muxer import MuxerConfig, VsockMuxer
from virtio.vsock.wire import Op, Type, VsockHeader

GUEST_BUF = 256 * 1024


@dataclass
class FakeHostSock:
    """The host end of one connection: what it received, what it will send, its capacity."""

    capacity: int = 1 << 30  # bytes it accepts before EAGAIN
    received: bytearray = field(default_factory=bytearray)
    messages: list = field(default_factory=list)  # seqpacket messages received
    to_guest: bytearray = field(default_factory=bytearray)
    to_guest_msgs: list = field(default_factory=list)
    eof: bool = False
    hangup: bool = False
    closed: bool = False
    shut_wr: bool = False
    shut_rd: bool = False
    replies: list = field(default_factory=list)
    read: bool = False
    write: bool = False


def pkt(op, src_port=1000, dst_port=80, *, payload=b"", len_=None, type_=Type.STREAM,
        flags=0, buf_alloc=GUEST_BUF, fwd_cnt=0, src_cid=3, dst_cid=2) -> bytes:
    hdr = VsockHeader(src_cid, dst_cid, src_port, dst_port,
                      len(payload) if len_ is None else len_, int(type_), int(op), int(flags),
                      buf_alloc, fwd_cnt)
    return hdr.pack() + payload


class Harness:
    def __init__(self, config: MuxerConfig | None = None, cids=(3,), group=None,
                 seqpacket=False):
        self.mux = VsockMuxer(config)
        self.now = 0.0
        self.socks: dict[ConnKey, FakeHostSock] = {}
        self.connects: list[ConnectHost] = []
        self.timers: dict[ConnKey, float] = {}
        self.rx_ready: set[int] = set()
        self.refuse_connect = False
        self.log: list = []
        for cid in cids:
            self.mux.add_vm(cid, f"/run/vm{cid}.vsock", group=group)
            if seqpacket:
                self.mux.set_features(cid, 0b11)

    # -- executing actions -------------------------------------------------------------
    def run(self, actions):
        for a in actions:
            self.log.append(a)
            if isinstance(a, ConnectHost):
                self.connects.append(a)
                if self.refuse_connect:
                    self.run(self.mux.host_connected(a.key, self.now, ok=False))
                else:
                    self.socks[a.key] = FakeHostSock()
                    self.run(self.mux.host_connected(a.key, self.now, ok=True))
            elif isinstance(a, WriteHost):
                s = self.socks[a.key]
                data = b"".join(bytes(b) for b in a.data)
                if a.message:
                    if s.capacity >= len(data):
                        s.capacity -= len(data)
                        s.messages.append((data, a.eor))
                        n = len(data)
                    else:
                        n = None
                else:
                    n = min(len(data), s.capacity)
                    s.capacity -= n
                    s.received += data[:n]
                    n = n or None
                self.run(self.mux.host_write_done(a.key, n, self.now))
            elif isinstance(a, CloseHost):
                if a.key in self.socks:
                    self.socks[a.key].closed = True
            elif isinstance(a, ShutdownHost):
                self.socks[a.key].shut_wr |= a.write
                self.socks[a.key].shut_rd |= a.read
            elif isinstance(a, ReplyHost):
                self.socks[a.key].replies.append(a.data)
            elif isinstance(a, SetHostInterest):
                s = self.socks.get(a.key)
                if s is not None:
                    s.read, s.write = a.read, a.write
            elif isinstance(a, SetTimer):
                if a.deadline is None:
                    self.timers.pop(a.key, None)
                else:
                    self.timers[a.key] = a.deadline
            elif isinstance(a, RxReady):
                self.rx_ready.add(a.cid)
            else:  # pragma: no cover
                raise AssertionError(a)

    # -- guest side ----------------------------------------------------------------------
    def send(self, data, cid=3):
        self.run(self.mux.guest_tx(cid, data, self.now))

    def rx(self, cid=3, max_payload=4096, limit=10000):
        """Drain the RX side: list of (VsockHeader, payload bytes)."""
        out = []
        for _ in range(limit):
            item, actions = self.mux.poll_rx(cid, self.now, max_payload)
            self.run(actions)
            if item is None:
                break
            if isinstance(item, RxPacket):
                out.append((item.header, bytes(item.payload)))
                continue
            assert isinstance(item, RxRead)
            s = self.socks[item.key]
            if item.message:
                if s.to_guest_msgs:
                    msg = s.to_guest_msgs.pop(0)
                    self.run(self.mux.rx_message(item.key, msg, self.now,
                                                 truncated=len(msg) > item.max_bytes))
                    continue
                nbytes = 0 if s.eof else None
                hdr, actions = self.mux.rx_read_done(item.key, nbytes, self.now,
                                                     hangup=s.hangup)
            else:
                assert 0 < item.max_bytes <= max_payload
                if s.to_guest:
                    data = bytes(s.to_guest[:item.max_bytes])
                    del s.to_guest[:len(data)]
                    hdr, actions = self.mux.rx_read_done(item.key, len(data), self.now)
                elif s.eof:
                    data = b""
                    hdr, actions = self.mux.rx_read_done(item.key, 0, self.now,
                                                         hangup=s.hangup)
                else:
                    data = b""
                    hdr, actions = self.mux.rx_read_done(item.key, None, self.now)
                if hdr is not None:
                    assert hdr.len_ == len(data)
            self.run(actions)
            if hdr is not None:
                out.append((hdr, data if hdr.op == Op.RW else b""))
        return out

    def host_sends(self, key, data=b"", eof=False, hangup=False, msgs=()):
        s = self.socks[key]
        s.to_guest += data
        s.to_guest_msgs += list(msgs)
        s.eof |= eof
        s.hangup |= hangup
        self.run(self.mux.host_readable(key, self.now))

    def writable(self, key, capacity=1 << 30):
        self.socks[key].capacity = capacity
        self.run(self.mux.host_writable(key, self.now))

    def advance(self, dt):
        self.now += dt
        self.run(self.mux.expire(self.now))

    def open_guest_conn(self, src_port=1000, dst_port=80, type_=Type.STREAM, cid=3,
                        buf_alloc=GUEST_BUF):
        self.send(pkt(Op.REQUEST, src_port, dst_port, type_=type_, src_cid=cid,
                      buf_alloc=buf_alloc), cid)
        key = ConnKey(cid, dst_port, src_port)
        got = self.rx(cid)
        assert [(h.op, h.dst_port) for h, _ in got] == [(Op.RESPONSE, src_port)], got
        return key
