"""Exceptions raised by the vhost_user package.

Tree::

    BackendError                         base of everything raised here
    ├── ProtocolError                    a peer broke the spec          .raw, .request
    │   └── FrontendProtocolError        the vhost-user front-end did   .should_disconnect
    ├── StateError                       call at the wrong time         .state, .required
    └── HostIOError                      host socket/fd failure         OSError as __cause__

``ProtocolError`` is raised wherever peer input enters (the channel's framing, ``unpack()``
of a payload, the session's checks). ``should_disconnect`` tells the I/O adapter whether the
connection must be dropped (malformed or unknown message, or a state the session cannot
recover from) or whether an error reply was enough and the session carries on.

The guest ring's errors (``DriverError`` ...) live in ``ring.errors``; they never reach the
front-end.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "FrontendProtocolError",
    "HostIOError",
    "ProtocolError",
    "StateError",
]


class BackendError(Exception):
    """Base class of every exception raised by ``vhost_user``."""


class ProtocolError(BackendError):
    """A peer broke the protocol. ``request`` is the request code (0 if unknown), ``raw`` the
    offending bytes (possibly truncated, for logging)."""

    def __init__(self, message: str, *, request: int = 0, raw: bytes = b"") -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.raw = bytes(raw[:64])


class FrontendProtocolError(ProtocolError):
    """The vhost-user front-end sent something we reject.

    ``should_disconnect`` True: the connection is dropped (the session latches failed).
    False: the request was refused with an error reply (or ignored with a log line where the
    spec gives no way to reply) and the session continues.
    """

    def __init__(
        self,
        message: str,
        *,
        request: int = 0,
        raw: bytes = b"",
        should_disconnect: bool = True,
    ) -> None:
        super().__init__(message, request=request, raw=raw)
        self.should_disconnect = should_disconnect


class StateError(BackendError):
    """An operation was requested in a state that does not allow it.

    ``state`` describes the current state, ``required`` the state the call needs.
    """

    def __init__(self, message: str, *, state: str = "", required: str = "") -> None:
        super().__init__(message)
        self.state = state
        self.required = required


class HostIOError(BackendError):
    """An operation on a host socket or fd failed; the ``OSError`` is the ``__cause__``."""
