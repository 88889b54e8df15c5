"""vsock wire formats and the hybrid-vsock handshake (Spec: virtio 1.2 §5.10)."""

import pytest
from hypothesis import given, strategies as st

from virtio.vsock.errors import HandshakeError, HeaderError, VsockStateError
from virtio.vsock.handshake import (HandshakeParser, HandshakeProblem, OkPortConvention,
                                    build_ok_reply, parse_connect_line)
from virtio.vsock.wire import (Op, SeqpacketFlag, ShutdownFlag, Type, VsockConfig, VsockEvent,
                               VsockFeature, VsockHeader)

u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)
u64 = st.integers(0, 2**64 - 1)


def test_sizes_pinned():
    assert VsockHeader.FMT.size == VsockHeader.SIZE == 44
    assert VsockEvent.FMT.size == 4 and VsockConfig.FMT.size == 8


def test_codes_match_spec():
    assert [int(o) for o in Op] == list(range(8))
    assert (Type.STREAM, Type.SEQPACKET) == (1, 2)
    assert (ShutdownFlag.RCV, ShutdownFlag.SEND) == (1, 2)
    assert (SeqpacketFlag.EOM, SeqpacketFlag.EOR) == (1, 2)
    assert VsockFeature.VIRTIO_VSOCK_F_STREAM == 1 and VsockFeature.VIRTIO_VSOCK_F_SEQPACKET == 2
    assert VsockEvent.transport_reset().pack() == b"\0\0\0\0"
    assert VsockConfig(3).pack() == b"\x03" + b"\0" * 7


@given(st.tuples(u64, u64, u32, u32, u32, u16, u16, u32, u32, u32))
def test_header_roundtrip(fields):
    hdr = VsockHeader(*fields)
    raw = hdr.pack()
    assert len(raw) == 44
    assert VsockHeader.unpack(raw + b"junk") == hdr


def test_header_little_endian_layout():
    raw = VsockHeader(3, 2, 0x01020304, 5, 6, 1, 5, 0, 7, 8).pack()
    assert raw[:8] == b"\x03" + b"\0" * 7
    assert raw[16:20] == b"\x04\x03\x02\x01"
    assert raw[28:30] == b"\x01\x00" and raw[30:32] == b"\x05\x00"


@pytest.mark.parametrize("n", [0, 1, 43])
def test_short_header_rejected(n):
    with pytest.raises(HeaderError):
        VsockHeader.unpack(b"\0" * n)


# --- handshake -------------------------------------------------------------------------


def feed_chunks(data: bytes, cuts: list[int]):
    """Feed ``data`` cut at ``cuts``; returns ("ok", port, leftover) or ("err", problem)."""
    parser = HandshakeParser()
    bounds = sorted(set(c for c in cuts if 0 < c < len(data)))
    pieces = [data[a:b] for a, b in zip([0] + bounds, bounds + [len(data)])]
    try:
        for i, piece in enumerate(pieces):
            res = parser.feed(piece)
            if res is not None:
                return ("ok", res.port, res.leftover + b"".join(pieces[i + 1:]))
        parser.feed(b"")
    except HandshakeError as e:
        return ("err", e.problem)
    raise AssertionError("unreachable")


def test_valid_line_and_leftover_kept():
    r = parse_connect_line(b"CONNECT 52\nhello\nworld")
    assert (r.port, r.leftover) == (52, b"hello\nworld")
    assert parse_connect_line(b"CONNECT 4294967295\n").port == 2**32 - 1
    assert parse_connect_line(b"CONNECT 0080\n").port == 80


@pytest.mark.parametrize("data,problem", [
    (b"", HandshakeProblem.INCOMPLETE),
    (b"CONNECT 5", HandshakeProblem.INCOMPLETE),
    (b"connect 5\n", HandshakeProblem.BAD_PREFIX),
    (b"\n", HandshakeProblem.BAD_PREFIX),
    (b"CONNECT\n", HandshakeProblem.BAD_PREFIX),
    (b"CONNECT \n", HandshakeProblem.NOT_A_NUMBER),
    (b"CONNECT -1\n", HandshakeProblem.NOT_A_NUMBER),
    (b"CONNECT  5\n", HandshakeProblem.NOT_A_NUMBER),
    (b"CONNECT 5 \n", HandshakeProblem.TRAILING_JUNK),
    (b"CONNECT 5\r\n", HandshakeProblem.TRAILING_JUNK),
    (b"CONNECT 0x10\n", HandshakeProblem.TRAILING_JUNK),
    (b"CONNECT 4294967296\n", HandshakeProblem.PORT_OUT_OF_RANGE),
    (b"CONNECT 00000000001\n", HandshakeProblem.PORT_OUT_OF_RANGE),
    (b"CONNECT " + b"9" * 100, HandshakeProblem.PORT_OUT_OF_RANGE),
])
def test_hostile_lines(data, problem):
    with pytest.raises(HandshakeError) as ei:
        parse_connect_line(data)
    assert ei.value.problem is problem
    assert problem.value in str(ei.value)
    assert len(ei.value.data) <= 32  # the parser never buffers more than its bound


def test_garbage_rejected_at_first_bad_byte_without_newline():
    parser = HandshakeParser()
    with pytest.raises(HandshakeError) as ei:
        parser.feed(b"GET / HTTP/1.1" + b"x" * 10_000)
    assert ei.value.data == b"G"
    with pytest.raises(HandshakeError):  # stays failed
        parser.feed(b"CONNECT 1\n")


def test_feed_after_done_is_state_error():
    parser = HandshakeParser()
    assert parser.feed(b"CONNECT 1\n").port == 1
    with pytest.raises(VsockStateError):
        parser.feed(b"x")


def test_deadline_is_a_parameter():
    parser = HandshakeParser(started_at=10.0, timeout_s=2.0)
    assert not parser.expired(11.9) and parser.expired(12.0)


lines = st.one_of(
    st.builds(lambda p, rest: b"CONNECT %d\n" % p + rest, u32, st.binary(max_size=20)),
    st.binary(max_size=40),
    st.builds(lambda a, b: b"CONNECT " + a + b, st.binary(max_size=12).filter(
        lambda x: True), st.binary(max_size=10)),
)


@given(lines, st.lists(st.integers(0, 60), max_size=10))
def test_whole_vs_chunked_identical(data, cuts):
    whole = feed_chunks(data, [])
    assert feed_chunks(data, cuts) == whole
    assert feed_chunks(data, list(range(len(data)))) == whole  # byte at a time


def test_ok_reply_conventions():
    assert build_ok_reply(host_port=1 << 30, guest_port=52) == b"OK 1073741824\n"
    assert build_ok_reply(host_port=1 << 30, guest_port=52,
                          convention=OkPortConvention.GUEST_PORT) == b"OK 52\n"
