"""Micro-benchmarks of the vhost-user wire layer: message parse (framing + payload unpack)
and build. Run with ``python -m pytest bench``.

Spec: vhost-user "Message Specification" (header, payloads).
"""

from __future__ import annotations

from vhost_user.channel import Message, MessageChannel, encode_message
from vhost_user.wire import FrontendReq, VringAddr, VringState


def test_build_set_vring_addr(benchmark):
    body = VringAddr(1, 0, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0x3000)

    def build():
        return encode_message(FrontendReq.SET_VRING_ADDR, body.pack())

    assert len(benchmark(build)) == 12 + 40


def test_parse_set_vring_num(benchmark):
    raw = encode_message(FrontendReq.SET_VRING_NUM, VringState(3, 256).pack()) * 32

    def parse():
        ch = MessageChannel()
        ch.receive(raw, [])
        n = 0
        while isinstance(msg := ch.next_message(), Message):
            assert VringState.unpack(msg.payload).num == 256
            n += 1
        return n

    assert benchmark(parse) == 32
