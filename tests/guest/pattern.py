"""Host-side twin of the data patterns that ``helper/vsock_helper.c`` sends and checks.

Stream byte at offset ``o`` with seed ``s`` is ``(o + s) % 251`` (a prime period, so lost,
duplicated or reordered chunks of any power-of-two size are caught). Seqpacket message ``j``
with seed ``s`` has size ``1 + ((s * 2654435761 + j * 40503) mod 2**32) % maxmsg`` and holds
the stream pattern from offset 0 with seed ``s + j``. Connection ``i`` of a helper run uses
seed ``SEED + i``. The helper reports received data as a CRC-32 equal to ``zlib.crc32``.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

PATTERN_PERIOD = 251
_CYCLE = bytes(range(PATTERN_PERIOD))


def stream_pattern(length: int, seed: int = 0, offset: int = 0) -> bytes:
    """``length`` bytes of the stream pattern starting at stream ``offset``."""
    start = (offset + seed) % PATTERN_PERIOD
    reps = (start + length) // PATTERN_PERIOD + 1
    return (_CYCLE * reps)[start : start + length]


def message_size(seed: int, index: int, maxmsg: int = 4096) -> int:
    return 1 + ((seed * 2654435761 + index * 40503) & 0xFFFFFFFF) % maxmsg


def message(seed: int, index: int, maxmsg: int = 4096) -> bytes:
    """Seqpacket message ``index`` of a connection whose seed is ``seed``."""
    return stream_pattern(message_size(seed, index, maxmsg), seed + index)


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class ConnReport:
    """One ``CONN`` line of vsock_helper output."""

    idx: int
    peer: str
    sent: int
    rcvd: int
    msgs_sent: int
    msgs_rcvd: int
    crc32_rx: int
    ok: bool
    err: str | None


@dataclass(frozen=True, slots=True)
class HelperReport:
    """Parsed vsock_helper output: per-connection lines and the final ``DONE`` line."""

    conns: tuple[ConnReport, ...]
    done: dict[str, int] | None
    errors: tuple[str, ...]
    listening: bool

    @property
    def ok(self) -> bool:
        return bool(self.done and self.done["ok"] == 1 and not self.errors)


_KV = re.compile(r"(\w+)=(\S+)")


def parse_helper_output(text: str) -> HelperReport:
    """Parse the machine-readable lines vsock_helper prints (see its header comment)."""
    conns, errors, done, listening = [], [], None, False
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        fields = dict(_KV.findall(rest))
        if word == "LISTENING":
            listening = True
        elif word == "CONN":
            conns.append(
                ConnReport(
                    idx=int(fields["idx"]),
                    peer=fields["peer"],
                    sent=int(fields["sent"]),
                    rcvd=int(fields["rcvd"]),
                    msgs_sent=int(fields["msgs_sent"]),
                    msgs_rcvd=int(fields["msgs_rcvd"]),
                    crc32_rx=int(fields["crc32_rx"], 16),
                    ok=fields["ok"] == "1",
                    err=fields.get("err"),
                )
            )
        elif word == "DONE":
            done = {k: int(v) for k, v in fields.items()}
        elif word == "ERROR":
            errors.append(rest)
    return HelperReport(tuple(sorted(conns, key=lambda c: c.idx)), done, tuple(errors), listening)
