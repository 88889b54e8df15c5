"""Fuzz harness for the vhost-user message framing (``vhost_user.channel.MessageChannel``).

Invariants (STYLE R9, h11's fuzz invariant): the same bytes fed whole, byte by byte, or in
fuzz-chosen chunks give identical messages (and identical errors), and nothing but the
channel's ``ProtocolError`` (then ``StateError`` on a broken channel) is ever raised.

Run under atheris: ``python3 tests/fuzz/fuzz_channel.py [corpus_dir]``; as a short pytest:
``tests/fuzz/test_fuzz_corpus.py``.

Spec: vhost-user "Message Specification" (header, size, payload).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

from vhost_user.channel import Closed, MessageChannel, NeedData  # noqa: E402
from vhost_user.errors import ProtocolError  # noqa: E402


def feed(stream: bytes, cuts: list[int], eof: bool) -> list:
    """Feed ``stream`` split at ``cuts`` (then EOF if asked); return the events in order."""
    channel = MessageChannel()
    events: list = []
    pieces, start = [], 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(stream))) + [len(stream)]:
        if cut > start:
            pieces.append(stream[start:cut])
        start = cut
    if eof:
        pieces.append(b"")  # receive(b"") means EOF
    for piece in pieces:
        channel.receive(piece)
        while True:
            try:
                item = channel.next_message()
            except ProtocolError as exc:
                events.append(("error", type(exc).__name__, exc.request))
                return events
            if isinstance(item, NeedData):
                break
            if isinstance(item, Closed):
                events.append(("closed",))
                return events
            events.append(("msg", item.header.request, item.header.flags, item.payload))
    return events


def one_input(data: bytes) -> None:
    if not data:
        return
    eof = bool(data[0] & 1)
    stream = data[1:]
    whole = feed(stream, [], eof)
    bytewise = feed(stream, list(range(1, len(stream))), eof)
    chunked = feed(stream, [i for i, b in enumerate(stream) if b & 0x80], eof)
    assert whole == bytewise == chunked, (whole, bytewise, chunked)


def main(argv: list[str]) -> None:
    import atheris

    import logging

    logging.disable(logging.WARNING)  # hostile rings log a warning per input
    atheris.instrument_all()  # the modules under test are already imported
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
