"""Fuzz harness for the vhost-user back-end session state machine (``BackendSession``).

The fuzz input is read as a sequence of front-end requests: every request code of the spec
(plus unknown ones), fuzz-chosen flags, a fuzz-chosen number of real file descriptors
(eventfds, a small memfd) and either a well-formed payload with fuzz-chosen field values or
raw bytes. A 1 MiB memfd stands in for guest RAM, so memory-table, vring-address and
inflight requests reach the real mapping code.

Invariants (STYLE R4, R5; issue "Bad input gets a clear error and loses nothing"):
- ``BackendSession.handle`` returns replies or raises ``FrontendProtocolError`` — nothing
  else, whatever the sequence;
- after a refusal that ends the connection, ``close()`` leaves no fd we handed over open
  (every received fd is closed on every rejection path, and on close);
- the process never dereferences memory outside what it mapped (a crash would end the run).

Run under atheris: ``python3 tests/fuzz/fuzz_session.py [corpus_dir]``; as a short pytest:
``tests/fuzz/test_fuzz_corpus.py``.

Spec: vhost-user "Front-end message types", "Ring states".
"""

from __future__ import annotations

import os
import struct
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

from tests.support.frontend_fixtures import EchoDevice  # noqa: E402
from vhost_user.channel import Message  # noqa: E402
from vhost_user.errors import FrontendProtocolError  # noqa: E402
from vhost_user.session import OFFERED_PROTOCOL_FEATURES, BackendSession  # noqa: E402
from vhost_user.wire import FrontendReq, Header  # noqa: E402

RAM_BYTES = 1 << 20
REQUESTS = [int(r) for r in FrontendReq] + [0, 44, 99, 0xFFFFFFFF]


class Reader:
    """Consume the fuzz input as small integers; zeros once it runs out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u64_small(self) -> int:
        """Values that matter for guest addresses: near 0, near RAM size, or huge."""
        kind, low = self.byte(), self.byte() << 8 | self.byte()
        return (low * 16, RAM_BYTES - low, (1 << 64) - 1 - low, low << 20)[kind & 3] & (2**64 - 1)

    def raw(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


def _payload(request: int, r: Reader) -> bytes:
    """A well-formed payload for the request's structure, with fuzz-chosen values."""
    q = lambda: r.u64_small()  # noqa: E731
    index = r.byte() & 3
    if request in (FrontendReq.SET_FEATURES, FrontendReq.SET_PROTOCOL_FEATURES):
        return struct.pack("=Q", int.from_bytes(r.raw(8).ljust(8, b"\0"), "little"))
    if request in (FrontendReq.SET_VRING_NUM, FrontendReq.SET_VRING_BASE,
                   FrontendReq.GET_VRING_BASE, FrontendReq.SET_VRING_ENABLE):
        return struct.pack("=II", index, (1 << (r.byte() & 15)) if r.byte() & 1 else r.byte())
    if request == FrontendReq.SET_VRING_ADDR:
        return struct.pack("=IIQQQQ", index, r.byte() & 1, q(), q(), q(), q())
    if request in (FrontendReq.SET_VRING_KICK, FrontendReq.SET_VRING_CALL,
                   FrontendReq.SET_VRING_ERR):
        return struct.pack("=Q", index | ((r.byte() & 1) << 8))
    if request == FrontendReq.SET_MEM_TABLE:
        n = r.byte() % 3
        regions = b"".join(struct.pack("=QQQQ", q(), q(), q(), q()) for _ in range(n))
        return struct.pack("=II", n, 0) + regions
    if request in (FrontendReq.ADD_MEM_REG, FrontendReq.REM_MEM_REG):
        return struct.pack("=QQQQQ", 0, q(), q(), q(), q())
    if request in (FrontendReq.GET_CONFIG, FrontendReq.SET_CONFIG):
        size = r.byte() % 16
        return struct.pack("=III", r.byte() % 16, size, 0) + r.raw(size).ljust(size, b"\0")
    if request in (FrontendReq.GET_INFLIGHT_FD, FrontendReq.SET_INFLIGHT_FD):
        return struct.pack("=QQHH", q(), q(), r.byte() % 4, 1 << (r.byte() % 10))
    if request == FrontendReq.SET_LOG_BASE:
        return struct.pack("=QQ", q(), q())
    if request == FrontendReq.SET_STATUS:
        return struct.pack("=Q", r.byte())
    return b""


def _fds(count: int, ram_fd: int) -> list[int]:
    fds = []
    for i in range(count):
        if i == 0:
            fds.append(os.dup(ram_fd))
        else:
            fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    return fds


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


FD_REQUESTS = {
    FrontendReq.ADD_MEM_REG: 1, FrontendReq.SET_LOG_BASE: 1, FrontendReq.SET_LOG_FD: 1,
    FrontendReq.SET_VRING_KICK: 1, FrontendReq.SET_VRING_CALL: 1, FrontendReq.SET_VRING_ERR: 1,
    FrontendReq.SET_BACKEND_REQ_FD: 1, FrontendReq.SET_INFLIGHT_FD: 1,
    FrontendReq.SET_DEVICE_STATE_FD: 1,
}
UVA_BASE = 0x7F00_0000_0000


def _preamble(r: Reader) -> list[tuple[int, int, bytes, int]]:
    """A plausible start (features, owner, guest RAM, two rings laid out in it) so the
    fuzzed requests after it reach deep states; fuzz bits pick packed/event-idx."""
    choice = r.byte()
    features = (1 << 32) | (1 << 30) | ((choice & 1) << 29) | (((choice >> 1) & 1) << 34)
    steps = [
        (FrontendReq.GET_FEATURES, 1, b"", 0),
        (FrontendReq.SET_PROTOCOL_FEATURES, 1, struct.pack("=Q", int(OFFERED_PROTOCOL_FEATURES)), 0),
        (FrontendReq.SET_OWNER, 1, b"", 0),
        (FrontendReq.SET_FEATURES, 1, struct.pack("=Q", features), 0),
        (FrontendReq.SET_MEM_TABLE, 1,
         struct.pack("=II", 1, 0) + struct.pack("=QQQQ", 0, RAM_BYTES, UVA_BASE, 0), 1),
    ]
    for index in range(2 if choice & 4 else 0):
        base = 0x10000 * (index + 1)
        steps += [
            (FrontendReq.SET_VRING_NUM, 1, struct.pack("=II", index, 16), 0),
            (FrontendReq.SET_VRING_BASE, 1, struct.pack("=II", index, 0), 0),
            (FrontendReq.SET_VRING_ADDR, 1, struct.pack(
                "=IIQQQQ", index, 0, UVA_BASE + base, UVA_BASE + base + 0x2000,
                UVA_BASE + base + 0x1000, base + 0x2000), 0),
            (FrontendReq.SET_VRING_KICK, 1, struct.pack("=Q", index), 1),
            (FrontendReq.SET_VRING_CALL, 1, struct.pack("=Q", index), 1),
            (FrontendReq.SET_VRING_ENABLE, 1, struct.pack("=II", index, 1), 0),
        ]
    return steps


def _fuzzed(r: Reader) -> tuple[int, int, bytes, int]:
    request = REQUESTS[r.byte() % len(REQUESTS)]
    flags = (1 | (r.byte() & 0x0C)) if r.byte() & 7 else r.byte()
    payload = _payload(request, r) if r.byte() & 3 else r.raw(r.byte() % 48)
    if r.byte() & 7:
        nfds = FD_REQUESTS.get(request, 0)
        if request == FrontendReq.SET_MEM_TABLE and len(payload) >= 8:
            nfds = struct.unpack_from("=I", payload)[0] % 4
        if request in (FrontendReq.SET_VRING_KICK, FrontendReq.SET_VRING_CALL,
                       FrontendReq.SET_VRING_ERR) and len(payload) == 8 and payload[1] & 1:
            nfds = 0  # the no-fd flag
    else:
        nfds = r.byte() % 4
    return request, flags, payload, nfds


def one_input(data: bytes) -> None:
    r = Reader(data)
    ram_fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram_fd, RAM_BYTES)
    session = BackendSession(EchoDevice(num_queues=4), signal=lambda fd: None)
    handed: list[int] = []
    try:
        steps = iter(_preamble(r))
        for _ in range(96):
            step = next(steps, None)
            if step is None:
                if r.done:
                    break
                step = _fuzzed(r)
            request, flags, payload, nfds = step
            fds = _fds(nfds, ram_fd)
            handed += fds
            msg = Message(Header(int(request), flags, len(payload)), payload, tuple(fds))
            try:
                session.handle(msg)
            except FrontendProtocolError:
                break  # the adapter drops the connection here
            for index in range(4):  # whatever rings got started, let the device run them
                session.on_kick(index)
    finally:
        session.close()
        os.close(ram_fd)
    leaked = [fd for fd in handed if _is_open(fd)]
    for fd in leaked:
        os.close(fd)
    assert not leaked, f"fds left open after close(): {leaked}"


def main(argv: list[str]) -> None:
    import logging

    import atheris

    logging.disable(logging.CRITICAL)
    atheris.instrument_all()
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
