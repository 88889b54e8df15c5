"""Guest memory and virtqueues (split and packed), in pure Python and in C.

Implementation selection (STYLE R8): environment variable ``VMCHANNEL_RING``

- ``py`` (or ``1``): force the pure-Python reference ``ring.pyring``;
- ``c`` (or ``0``): require the C implementation ``ring.cring`` (its ImportError propagates);
- unset or empty: ``ring.cring`` if it imports, else ``ring.pyring``.

Both modules stay importable by name. ``IMPLEMENTATION`` is ``"py"`` or ``"c"``.

Spec: virtio 1.2 §2.6–§2.8 (virtqueues); vhost-user "Memory regions description".
"""

from __future__ import annotations

import os

from ring.errors import (ChainError, DriverError, GuestAddressError, MemoryMapError,
                         RingError)
from ring.memory import DirtyLog, GuestMemory, Region
from ring.types import Chain, Pending, RxResult, TxResult

__all__ = [
    "IMPLEMENTATION", "Virtqueue", "GuestMemory", "Region", "DirtyLog", "Chain", "Pending",
    "TxResult", "RxResult", "RingError", "DriverError", "GuestAddressError", "MemoryMapError",
    "ChainError", "select_implementation",
]

_FORCE_PY = ("py", "1", "python")
_FORCE_C = ("c", "0")


def select_implementation(choice: str | None):
    """Return ``(name, Virtqueue)`` for an ``VMCHANNEL_RING`` value (None = unset)."""
    choice = (choice or "").strip().lower()
    if choice in _FORCE_PY:
        from ring.pyring import Virtqueue as py_vq
        return "py", py_vq
    if choice in _FORCE_C:
        from ring.cring import Virtqueue as c_vq
        return "c", c_vq
    if choice:
        raise ValueError(f"VMCHANNEL_RING={choice!r}: expected 'py' or 'c'")
    try:
        from ring.cring import Virtqueue as c_vq
    except ImportError:
        from ring.pyring import Virtqueue as py_vq
        return "py", py_vq
    return "c", c_vq


IMPLEMENTATION, Virtqueue = select_implementation(os.environ.get("VMCHANNEL_RING"))
