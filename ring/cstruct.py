"""Many fields of a cffi struct with one ``struct`` call.

Each cffi attribute read or write of a struct field costs about as much as a Python call;
an entry point that sets seven inputs and reads nine outputs per call pays more for that
than for its own Python. :func:`field_codec` builds a ``struct.Struct`` covering a run of
fields of a compiled C struct (their offsets and sizes taken from cffi, the fields between
them skipped as pad bytes), so the caller packs its inputs with one ``pack_into`` and reads
its outputs with one ``unpack_from`` on ``ffi.buffer(ptr)``.
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

__all__ = ["field_codec"]


def field_codec(ffi: Any, ctype: str, fields: Sequence[tuple[str, str]]) -> tuple[
        struct.Struct, int]:
    """``(codec, offset)`` for ``fields`` of C struct type ``ctype``: ``(name, code)``
    pairs in increasing offset order (``name`` may be dotted for a nested struct's field:
    ``"out.bytes"``; ``code`` a ``struct`` format character of the field's size). Values
    are packed and unpacked in that order at ``offset`` (the first field's). Raises
    ImportError when a field's size or order does not match the compiled struct."""
    fmt, start, at = "=", None, None
    for name, code in fields:
        path = name.split(".")
        offset = ffi.offsetof(ctype, *path)
        ftype = ffi.typeof(ctype)
        for part in path:
            ftype = dict(ftype.fields)[part].type
        size = struct.calcsize("=" + code)
        if ffi.sizeof(ftype) != size:
            raise ImportError(f"{ctype}.{name} is {ffi.sizeof(ftype)} bytes, not {size}")
        if at is None:
            start = offset
        elif offset < at:
            raise ImportError(f"{ctype}.{name} is out of order")
        else:
            fmt += "x" * (offset - at)
        fmt += code
        at = offset + size
    return struct.Struct(fmt), start
