"""Sans-I/O framing of vhost-user messages on a byte stream with file descriptors.

Feed what the socket gave (``receive(data, fds)``; ``b""`` means EOF) and take complete
messages out (``next_message()``). File descriptors that arrived together with some bytes
belong to the message that those bytes' first byte is part of (on Linux, SCM_RIGHTS data
attached to a ``sendmsg`` arrives with the first byte of that ``sendmsg``, and QEMU sends each
message, fds included, with one ``sendmsg``). Feeding a stream whole or byte by byte therefore
gives identical messages.

Used on both ends: the back-end reads front-end requests, the front-end reads replies and
back-end requests.

Spec: vhost-user "Message Specification" (header + payload of ``size`` bytes), "Communication"
(fds in the ancillary data).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from vhost_user.errors import FrontendProtocolError, ProtocolError, StateError
from vhost_user.wire import MAX_PAYLOAD_BYTES, VERSION, Header, HeaderFlag

__all__ = ["Closed", "Message", "MessageChannel", "NeedData", "close_fds", "encode_message"]

MAX_FDS_PER_MESSAGE = 8  # QEMU VHOST_USER_MAX_FDS / VHOST_MEMORY_BASELINE_NREGIONS


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One complete message: the header, exactly ``header.size`` payload bytes and the fds
    that came with it (the receiver owns them and must close them)."""

    header: Header
    payload: bytes
    fds: tuple[int, ...] = ()

    @property
    def request(self) -> int:
        return self.header.request


@dataclasses.dataclass(frozen=True, slots=True)
class NeedData:
    """No complete message buffered yet."""


@dataclasses.dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed the stream at a message boundary."""


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def encode_message(
    request: int,
    payload: bytes = b"",
    *,
    reply: bool = False,
    need_reply: bool = False,
) -> bytes:
    """Header + payload bytes for a message (version 1; REPLY / NEED_REPLY as asked)."""
    flags = VERSION
    if reply:
        flags |= HeaderFlag.REPLY
    if need_reply:
        flags |= HeaderFlag.NEED_REPLY
    return Header(int(request), int(flags), len(payload)).pack() + payload


class MessageChannel:
    """Reassembles messages from stream chunks.

    ``max_payload_bytes`` bounds the payload (a larger ``size`` is a protocol error, raised
    as soon as the header is complete, before any payload is buffered). After a
    ``ProtocolError`` the channel is broken: every later call raises ``StateError``; the fds
    it held are closed.

    ``error_type`` is the ProtocolError subclass raised (the back-end uses
    :class:`FrontendProtocolError`).
    """

    HEADER_BYTES = Header.FMT.size

    def __init__(
        self,
        *,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        error_type: type[ProtocolError] = FrontendProtocolError,
    ) -> None:
        self._buffer = bytearray()
        self._start = 0  # stream offset of _buffer[0]
        self._pending_fds: list[tuple[int, list[int]]] = []  # (stream offset, fds)
        self._eof = False
        self._broken = False
        self._max_payload = max_payload_bytes
        self._error_type = error_type

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def wanted_bytes(self) -> int:
        """How many bytes complete the message being assembled (the header first). An
        adapter that reads at most this much never reads past a message boundary, so the
        fds of one ``sendmsg`` are never received together with an earlier message's bytes
        (Linux may glue stream data from separate ``sendmsg`` calls into one ``recvmsg``)."""
        buffered = len(self._buffer)
        if buffered < self.HEADER_BYTES:
            return self.HEADER_BYTES - buffered
        size = Header.FMT.unpack_from(self._buffer)[2]
        return max(1, min(size, self._max_payload) + self.HEADER_BYTES - buffered)

    def receive(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Add bytes (and the fds received with them) from the peer; ``b""`` is EOF."""
        if self._broken or self._eof:
            close_fds(fds)
            raise StateError(
                "receive on a closed or broken channel", state="closed", required="open"
            )
        if not data:
            close_fds(fds)
            self._eof = True
            return
        if fds:
            self._pending_fds.append((self._start + len(self._buffer), list(fds)))
        self._buffer += data

    def next_message(self) -> Message | NeedData | Closed:
        """The next complete message, ``NeedData()`` or ``Closed()`` (EOF at a boundary).

        Raises the channel's ProtocolError for an oversized payload, a bad header, too many
        fds on one message, or EOF inside a message.
        """
        if self._broken:
            raise StateError("channel is broken", state="broken", required="open")
        buffered = len(self._buffer)
        if buffered < self.HEADER_BYTES:
            return self._maybe_closed(buffered)
        try:
            header = Header.unpack(bytes(self._buffer[: self.HEADER_BYTES]))
        except ProtocolError as exc:
            self._fail()
            raise self._error_type(exc.message, request=exc.request, raw=exc.raw) from None
        if header.size > self._max_payload:
            raw = bytes(self._buffer[: self.HEADER_BYTES])
            self._fail()
            raise self._error_type(
                f"payload size {header.size} exceeds the {self._max_payload}-byte limit",
                request=header.request,
                raw=raw,
            )
        total = self.HEADER_BYTES + header.size
        if buffered < total:
            return self._maybe_closed(buffered)
        payload = bytes(self._buffer[self.HEADER_BYTES : total])
        end = self._start + total
        fds: list[int] = []
        while self._pending_fds and self._pending_fds[0][0] < end:
            fds.extend(self._pending_fds.pop(0)[1])
        del self._buffer[:total]
        self._start = end
        if len(fds) > MAX_FDS_PER_MESSAGE:
            close_fds(fds)
            self._fail()
            raise self._error_type(
                f"{len(fds)} fds on one message (at most {MAX_FDS_PER_MESSAGE})",
                request=header.request,
            )
        return Message(header, payload, tuple(fds))

    def _maybe_closed(self, buffered: int) -> NeedData | Closed:
        if not self._eof:
            return NeedData()
        if buffered == 0:
            return Closed()
        self._fail()
        raise self._error_type(f"peer closed the stream inside a message ({buffered} bytes)")

    def _fail(self) -> None:
        self._broken = True
        self.close()

    def close(self) -> None:
        """Drop buffered bytes and close fds not yet handed out in a message."""
        for _offset, fds in self._pending_fds:
            close_fds(fds)
        self._pending_fds.clear()
        self._buffer.clear()
