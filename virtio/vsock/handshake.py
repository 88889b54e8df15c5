"""The hybrid-vsock host handshake: ``CONNECT <port>\\n`` in, ``OK <port>\\n`` out.

Convention of Firecracker and rust-vmm's vhost-device-vsock (not part of virtio): a host
process connects to the device's ``uds_path`` and writes ``CONNECT <port>\\n``, ``<port>`` a
decimal u32, the guest port to connect to. Once the guest accepts, the device replies
``OK <port>\\n`` and the socket becomes the byte stream of the connection; if the guest
refuses (RST) or does not answer in time, the socket is closed.

Parsing is strict and incremental: every byte is checked as it arrives, so feeding the
input whole or byte-at-a-time gives the same result and the same error at the same byte.

Bound: the longest valid line is ``CONNECT 4294967295\\n`` = 19 bytes. With byte-wise
checks any invalid line is rejected by its 19th byte at the latest (a port of 11 digits
is out of range), so the buffer never holds more than 19 bytes of line; ``MAX_LINE_BYTES =
32`` (Firecracker reads the line into a 32-byte buffer too) is kept as an explicit
belt-and-braces limit that also covers future tolerance (e.g. ``\\r``). Leading zeros are
accepted (``CONNECT 0080`` is port 80: still a decimal u32); ``\\r`` before the newline is
trailing junk.

Bytes after the newline (a client may write ``CONNECT 80\\nhello`` in one go) are returned
as ``leftover``: the caller must forward them to the guest, first, once connected.

The reply's port: Firecracker writes the host-side port the muxer assigned to the local
end; vhost-device-vsock writes the guest port. `OkPortConvention` selects; the default is
``HOST_PORT`` (Firecracker), because that is the one existing clients (e.g. the Firecracker
SDKs) have been written against, and it tells the client something it cannot know already.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import HandshakeError, VsockStateError
from .wire import U32_MASK

CONNECT_PREFIX = b"CONNECT "
MAX_PORT_DIGITS = 10  # 4294967295
MAX_LINE_BYTES = 32
#: Suggested limit for the adapter: a host client must complete its line within this time.
HANDSHAKE_TIMEOUT_S = 2.0


class HandshakeProblem(enum.Enum):
    BAD_PREFIX = "line does not start with 'CONNECT '"
    NOT_A_NUMBER = "port is not a decimal number"
    TRAILING_JUNK = "junk after the port number"
    PORT_OUT_OF_RANGE = "port does not fit in 32 bits"
    LINE_TOO_LONG = f"no newline within {MAX_LINE_BYTES} bytes"
    INCOMPLETE = "connection closed before the end of the line"


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """A complete ``CONNECT`` line: the guest ``port`` and the bytes that followed it."""

    port: int
    leftover: bytes


class OkPortConvention(enum.Enum):
    HOST_PORT = "host"  # Firecracker: the host-side (local) port of the new connection
    GUEST_PORT = "guest"  # vhost-device-vsock: the guest port that was asked for


class HandshakeParser:
    """Incremental parser of one host client's ``CONNECT <port>\\n`` line (sans-I/O).

    ``feed(data)`` returns None while the line is incomplete, a `HandshakeRequest` once the
    newline arrives; it raises `HandshakeError` as soon as the bytes seen cannot start a
    valid line. ``feed(b"")`` means EOF. ``deadline`` (from ``started_at`` + ``timeout_s``)
    lets the adapter drop clients that never finish; time is a parameter.
    """

    __slots__ = ("_line", "_done", "_failed", "deadline")

    def __init__(self, *, started_at: float = 0.0,
                 timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        self._line = bytearray()
        self._done = False
        self._failed: HandshakeError | None = None
        self.deadline = started_at + timeout_s

    @property
    def done(self) -> bool:
        return self._done

    def expired(self, now: float) -> bool:
        return not self._done and now >= self.deadline

    def feed(self, data: bytes | bytearray | memoryview) -> HandshakeRequest | None:
        if self._done:
            raise VsockStateError("handshake already complete", state="done",
                                  required="in-progress")
        if self._failed is not None:
            raise self._failed
        if len(data) == 0:
            self._fail(HandshakeProblem.INCOMPLETE)
        data = bytes(data)
        for i, byte in enumerate(data):
            if byte == 0x0A:  # b"\n"
                port = self._finish()
                return HandshakeRequest(port=port, leftover=data[i + 1:])
            self._line.append(byte)
            self._check_partial()
        return None

    # -- internals -----------------------------------------------------------------------

    def _fail(self, problem: HandshakeProblem) -> None:
        err = HandshakeError(f"bad vsock handshake: {problem.value}: {bytes(self._line)!r}",
                             problem=problem, data=bytes(self._line))
        self._failed = err
        raise err

    def _check_partial(self) -> None:
        """Reject as soon as the line so far cannot be the start of a valid line."""
        line = self._line
        n = len(line)
        if n > MAX_LINE_BYTES:
            self._fail(HandshakeProblem.LINE_TOO_LONG)
        if n <= len(CONNECT_PREFIX):
            if line != CONNECT_PREFIX[:n]:
                self._fail(HandshakeProblem.BAD_PREFIX)
            return
        last = line[-1]
        if not 0x30 <= last <= 0x39:
            if n == len(CONNECT_PREFIX) + 1:
                self._fail(HandshakeProblem.NOT_A_NUMBER)
            self._fail(HandshakeProblem.TRAILING_JUNK)
        digits = n - len(CONNECT_PREFIX)
        if digits > MAX_PORT_DIGITS or int(line[len(CONNECT_PREFIX):]) > U32_MASK:
            self._fail(HandshakeProblem.PORT_OUT_OF_RANGE)

    def _finish(self) -> int:
        if len(self._line) < len(CONNECT_PREFIX):
            self._fail(HandshakeProblem.BAD_PREFIX)
        if len(self._line) == len(CONNECT_PREFIX):
            self._fail(HandshakeProblem.NOT_A_NUMBER)
        self._done = True
        return int(self._line[len(CONNECT_PREFIX):])


def parse_connect_line(data: bytes) -> HandshakeRequest:
    """Parse a whole handshake at once; EOF is assumed after ``data`` if no newline."""
    parser = HandshakeParser()
    result = parser.feed(data) if data else None
    if result is None:
        parser.feed(b"")  # raises INCOMPLETE (or the pending error)
        raise AssertionError("unreachable")
    return result


def build_ok_reply(*, host_port: int, guest_port: int,
                   convention: OkPortConvention = OkPortConvention.HOST_PORT) -> bytes:
    """``OK <port>\\n`` with the port chosen by ``convention`` (default: host port)."""
    port = host_port if convention is OkPortConvention.HOST_PORT else guest_port
    return b"OK %d\n" % (port & U32_MASK)
