"""Sans-I/O framing: whole vs byte-at-a-time feeding, bounds, EOF, fd attribution.

Spec: vhost-user "Message Specification".
"""

from __future__ import annotations

import os

import pytest

from vhost_user.channel import Closed, Message, MessageChannel, NeedData, encode_message
from vhost_user.errors import FrontendProtocolError, StateError
from vhost_user.wire import FrontendReq, MAX_PAYLOAD_BYTES


def _drain(channel):
    out = []
    while True:
        item = channel.next_message()
        if not isinstance(item, Message):
            return out, item
        out.append(item)


def _stream():
    msgs = [
        encode_message(FrontendReq.GET_FEATURES),
        encode_message(FrontendReq.SET_FEATURES, (1 << 32).to_bytes(8, "little")),
        encode_message(FrontendReq.SET_VRING_KICK, bytes(8), need_reply=True),
        encode_message(FrontendReq.SET_CONFIG, bytes(12 + 200)),
    ]
    return msgs


def test_whole_and_byte_at_a_time_identical():
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        msgs = _stream()
        whole = MessageChannel()
        for i, m in enumerate(msgs):
            whole.receive(m, [r1] if i == 2 else [])
        a, tail_a = _drain(whole)

        bytewise = MessageChannel()
        got = []
        for i, m in enumerate(msgs):
            for j in range(len(m)):
                bytewise.receive(m[j : j + 1], [r2] if (i == 2 and j == 0) else [])
                got.extend(_drain(bytewise)[0])
        strip = lambda ms: [(x.header, x.payload, len(x.fds)) for x in ms]
        assert strip(a) == strip(got) and len(a) == 4
        assert a[2].fds == (r1,) and got[2].fds == (r2,)
        assert isinstance(tail_a, NeedData)
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_all_in_one_chunk_gives_fds_to_first_message():
    r, w = os.pipe()
    try:
        ch = MessageChannel()
        ch.receive(b"".join(_stream()), [r])
        msgs, _ = _drain(ch)
        assert msgs[0].fds == (r,) and all(not m.fds for m in msgs[1:])
    finally:
        os.close(r)
        os.close(w)


def test_wanted_bytes_never_crosses_a_boundary():
    ch = MessageChannel()
    data = b"".join(_stream())
    pos = 0
    count = 0
    while pos < len(data):
        n = ch.wanted_bytes()
        ch.receive(data[pos : pos + n])
        pos += n
        msgs, _ = _drain(ch)
        count += len(msgs)
        assert ch.buffered_bytes == 0 or ch.buffered_bytes < 12 + 212
    assert count == 4


def test_oversized_payload_rejected_and_fds_closed():
    r, w = os.pipe()
    try:
        ch = MessageChannel()
        header = encode_message(FrontendReq.SET_CONFIG)[:8] + (MAX_PAYLOAD_BYTES + 1).to_bytes(4, "little")
        ch.receive(header, [r])
        with pytest.raises(FrontendProtocolError, match="exceeds"):
            ch.next_message()
        with pytest.raises(OSError):
            os.fstat(r)  # closed by the channel
        with pytest.raises(StateError):
            ch.next_message()
    finally:
        os.close(w)


def test_eof_at_boundary_and_inside_message():
    ch = MessageChannel()
    ch.receive(encode_message(FrontendReq.GET_FEATURES))
    ch.receive(b"")
    msgs, tail = _drain(ch)
    assert len(msgs) == 1 and isinstance(tail, Closed)

    ch = MessageChannel()
    ch.receive(encode_message(FrontendReq.SET_FEATURES, bytes(8))[:15])
    ch.receive(b"")
    with pytest.raises(FrontendProtocolError, match="inside a message"):
        ch.next_message()


def test_bad_version_rejected():
    ch = MessageChannel()
    ch.receive(b"\x01\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00")
    with pytest.raises(FrontendProtocolError):
        ch.next_message()
