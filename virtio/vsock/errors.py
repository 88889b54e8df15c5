"""Typed exceptions of the vsock device core.

Tree::

    VsockError                       base of everything raised by virtio.vsock
    ├── VsockProtocolError           a peer broke the vsock protocol          .raw
    │   ├── HeaderError              header shorter than 44 bytes / bad len   .raw
    │   └── HandshakeError           bad "CONNECT <port>\\n" from a host peer  .problem, .data
    ├── VsockStateError              call at the wrong time                   .state, .required
    ├── DuplicateCidError            a VM with this CID is already attached   .cid
    ├── UnknownCidError              no VM with this CID                      .cid
    ├── UnknownConnectionError       no connection with this key              .key
    └── TableFullError               connection table at its limit            .limit

Guest protocol errors never escape the muxer: they become an RST for the one connection
concerned, or a dropped (and counted) packet. `HandshakeError` is raised to the I/O adapter,
which closes that host socket.
"""

from __future__ import annotations

from typing import Any


class VsockError(Exception):
    """Base class of the vsock core's exceptions."""


class VsockProtocolError(VsockError):
    """A peer (guest driver or host client) broke the protocol."""

    def __init__(self, message: str, *, raw: bytes = b"") -> None:
        super().__init__(message)
        self.raw = raw


class HeaderError(VsockProtocolError):
    """A vsock header or structure is too short, or its ``len`` exceeds the buffer."""


class HandshakeError(VsockProtocolError):
    """The host peer's hybrid-vsock handshake line is malformed.

    ``problem`` is a `virtio.vsock.handshake.HandshakeProblem`; ``data`` the bytes of the
    line seen so far.
    """

    def __init__(self, message: str, *, problem: Any, data: bytes = b"") -> None:
        super().__init__(message, raw=data)
        self.problem = problem
        self.data = data


class VsockStateError(VsockError):
    """A method was called in a state that does not allow it."""

    def __init__(self, message: str, *, state: Any = None, required: Any = None) -> None:
        super().__init__(message)
        self.state = state
        self.required = required


class DuplicateCidError(VsockError):
    def __init__(self, cid: int) -> None:
        super().__init__(f"a VM with guest CID {cid} is already attached")
        self.cid = cid


class UnknownCidError(VsockError):
    def __init__(self, cid: int) -> None:
        super().__init__(f"no VM with guest CID {cid}")
        self.cid = cid


class UnknownConnectionError(VsockError):
    def __init__(self, key: Any) -> None:
        super().__init__(f"no vsock connection {key}")
        self.key = key


class TableFullError(VsockError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"vsock connection table full ({limit} connections)")
        self.limit = limit
