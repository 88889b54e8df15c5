"""Value types shared by both ring implementations (``ring.pyring`` and ``ring.cring``).

Spec: virtio 1.2 §2.7.5, §2.8 (descriptor chains), §2.7.8 (used elements).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from ring.errors import ChainError

__all__ = ["Chain", "Pending", "RxResult", "TxResult"]


class Chain(NamedTuple):
    """One descriptor chain popped from a virtqueue.

    ``head``: the id to push back (split: head descriptor index; packed: buffer id).
    ``ring_slots``: descriptors the chain occupied in a packed ring (1 for split).
    ``readable`` / ``writable``: memoryviews straight into guest memory (driver→device and
    device→driver buffers), split where a buffer crosses a region boundary; zero-length
    descriptors give no memoryview. ``readable_gpas`` / ``writable_gpas``: the guest-physical
    ``(gpa, length)`` of each memoryview, one-to-one (for dirty logging and state save).

    Writing into ``writable`` directly does not mark the dirty log: use
    ``Virtqueue.fill(chain, data)`` for that.

    A NamedTuple (immutable, compared by value, the same fields), not a frozen dataclass:
    ``pop_batch`` builds one per chain and the dataclass's ``__init__`` cost ~0.5 µs each.
    """

    head: int
    ring_slots: int
    readable: list
    writable: list
    readable_bytes: int
    writable_bytes: int
    readable_gpas: tuple = ()
    writable_gpas: tuple = ()

    def read_all(self) -> bytes:
        """Copy every readable byte of the chain (control messages, headers)."""
        return b"".join(bytes(v) for v in self.readable)


@dataclasses.dataclass(frozen=True, slots=True)
class Pending:
    """The partially written TX chain kept by ``tx_to_fd``: ``offset`` bytes already left.

    ``segments`` are the chain's readable ``(gpa, length)`` pieces, so the chain can be
    resumed after the memory table changed or after a restart (``Virtqueue.state()``).
    """

    head: int
    ring_slots: int
    offset: int
    segments: tuple

    @property
    def total_bytes(self) -> int:
        return sum(length for _, length in self.segments)


class TxResult(NamedTuple):
    """Outcome of ``Virtqueue.tx_to_fd`` (guest → host stream).

    ``bytes`` written to the fd, ``chains`` completed (pushed), ``notify`` whether to signal
    the guest (``should_notify()`` after publication; False when nothing was completed),
    ``blocked`` the fd returned EAGAIN or took fewer bytes than offered, ``error`` errno of
    another write failure (or None), ``broken`` the ChainError when a hostile chain broke the
    queue during this call.

    A NamedTuple, not a frozen dataclass: one is built per data-path call, and a frozen
    dataclass costs ~1 µs to build (an ``object.__setattr__`` per field), a tuple ~0.2 µs.
    Immutable and compared by value all the same.
    """

    bytes: int = 0
    chains: int = 0
    notify: bool = False
    blocked: bool = False
    error: int | None = None
    broken: ChainError | None = None


class RxResult(NamedTuple):
    """Outcome of ``Virtqueue.rx_from_fd`` (host → guest stream).

    ``bytes`` read into guest buffers, ``chains`` completed, ``notify`` as for TxResult,
    ``eof`` the fd reached end of file, ``starved`` the ring ran out of buffers while data
    may remain, ``error`` errno of a read failure, ``drained`` the fd has no more data now
    (EAGAIN, a short read, or every byte FIONREAD reported was read), ``broken`` the
    ChainError when a hostile chain broke the queue during this call. A NamedTuple, as
    TxResult.
    """

    bytes: int = 0
    chains: int = 0
    notify: bool = False
    eof: bool = False
    starved: bool = False
    error: int | None = None
    drained: bool = False
    broken: ChainError | None = None
