"""The batched data path of the pure-Python reference: chains ↔ host fd with one
``writev``/``readv`` per batch.

Semantics (mirrored by ``ring.cring``), see docs/internals.md "The batched data path":

- TX: the pending partial chain resumes first; chains are completed (used_len 0) only after
  all their readable bytes left; chains popped but not reached by the write are given back by
  rewinding ``last_avail_idx``; a hostile chain stops gathering (``broken`` in the result);
  chains popped before it that the write did not reach cannot be rewound past it and are
  completed with used_len 0 (the queue is broken anyway; the guest gets its buffers back).
- RX: chains are completed with the bytes they received; untouched chains are given back.

Spec: virtio 1.2 §2.7.13 / §2.8.21 (device side of the used ring), §5.3.6 (console data).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import termios
from typing import TYPE_CHECKING

from ring.errors import DriverError, GuestAddressError
from ring.types import Pending, RxResult, TxResult
from ring.wire import MAX_PREFIX, MAX_SEGMENTS

if TYPE_CHECKING:
    from ring.pyring import Virtqueue

_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


def _vectored(call, fd: int, iov: list) -> tuple[int, bool, int | None]:
    """One ``os.writev``/``os.readv`` on a non-blocking fd: ``(bytes, would_block, errno)``
    (EINTR is retried by Python itself, PEP 475)."""
    try:
        return call(fd, iov), False, None
    except OSError as exc:
        if exc.errno in _AGAIN:
            return 0, True, None
        return 0, False, exc.errno
_UNLIMITED = 1 << 62
_U32 = struct.Struct("<I")
_INT = struct.Struct("i")  # FIONREAD's native int
_INT_ZERO = bytes(_INT.size)


def _pending_views(vq: "Virtqueue", pending: Pending) -> list:
    """Re-translate the rest of the pending chain (the memory table may have changed)."""
    views = []
    skip = pending.offset
    for gpa, length in pending.segments:
        if skip >= length:
            skip -= length
            continue
        views.extend(vq.memory.translate(gpa + skip, length - skip))
        skip = 0
    return views


def _clip(views: list, limit: int) -> list:
    """The first ``limit`` bytes of ``views``."""
    out = []
    for view in views:
        if limit <= 0:
            break
        out.append(view if len(view) <= limit else view[:limit])
        limit -= len(out[-1])
    return out


def tx_to_fd(vq: "Virtqueue", fd: int, max_bytes: int | None = None) -> TxResult:
    """Guest → host stream: writev available chains' readable bytes to non-blocking ``fd``.

    Loops until the ring is empty, the fd would block (EAGAIN, or a short write: the fd's
    buffer is full), an error, or ``max_bytes`` written.
    """
    budget = _UNLIMITED if max_bytes is None else max_bytes
    written_total = 0
    completed: list[tuple[int, int, int]] = []
    blocked = False
    error = None
    broken = None
    while written_total < budget and not blocked and error is None:
        # entries: [head, ring_slots, bytes_to_write, readable_gpas, was_pending, prior_offset]
        entries = []
        iov: list = []
        gathered = 0
        fresh_chains = fresh_slots = 0
        pending = vq._pending
        if pending is not None:
            try:
                views = _pending_views(vq, pending)
            except GuestAddressError:
                error = errno.EFAULT  # the region went away under the chain
                break
            entries.append([pending.head, pending.ring_slots,
                            pending.total_bytes - pending.offset, pending.segments, True,
                            pending.offset])
            iov.extend(views)
            gathered += entries[-1][2]
        while gathered < budget - written_total and broken is None:
            try:
                chain = vq.pop()
            except DriverError as exc:
                broken = exc.code
                break
            if chain is None:
                break
            if iov and len(iov) + len(chain.readable) > MAX_SEGMENTS:
                vq._rewind(chain.ring_slots, 1)
                break
            fresh_chains += 1
            fresh_slots += chain.ring_slots
            entries.append([chain.head, chain.ring_slots, chain.readable_bytes,
                            chain.readable_gpas, False, 0])
            iov.extend(chain.readable)
            gathered += chain.readable_bytes
        if not entries:
            break
        limit = min(gathered, budget - written_total)
        n = 0
        if limit > 0:
            n, blocked, error = _vectored(os.writev, fd, _clip(iov, limit))
        written_total += n
        # Distribute the written bytes over the entries, in order.
        remaining = n
        vq._pending = None
        rewind_chains = rewind_slots = 0
        stop = False
        for head, slots, need, gpas, was_pending, prior in entries:
            if stop:
                if not was_pending:
                    rewind_chains += 1
                    rewind_slots += slots
                continue
            if remaining >= need:
                remaining -= need
                completed.append((head, 0, slots))
                continue
            stop = True
            if was_pending or remaining > 0:
                vq._pending = Pending(head, slots, prior + remaining, tuple(gpas))
                remaining = 0
            else:
                rewind_chains += 1
                rewind_slots += slots
        if broken is None:
            vq._rewind(rewind_slots, rewind_chains)
        else:  # cannot rewind across the broken chain: return untouched chains empty
            completed.extend((e[0], 0, e[1]) for e in entries[len(entries) - rewind_chains:])
        if n < limit and not blocked and error is None:
            blocked = True  # a short write: the fd's buffer is full (no extra EAGAIN syscall)
        if vq._pending is not None or n < limit or broken is not None:
            break
    if completed:
        vq.push_batch(completed)  # one publication for the whole call
    # A hostile chain was returned as (head, 0) by the walk itself: the guest must hear of it.
    notify = vq.should_notify() if completed or broken is not None else False
    return TxResult(written_total, len(completed), notify, blocked, error, broken)


def check_prefix(prefix, prefix_len_offset: int | None) -> bytes:
    """Validate the ``rx_from_fd`` prefix arguments (both implementations): at most
    ``MAX_PREFIX`` bytes; the u32 length field, if any, lies wholly inside the prefix."""
    prefix = bytes(prefix)
    if len(prefix) > MAX_PREFIX:
        raise ValueError(f"prefix of {len(prefix)} bytes exceeds {MAX_PREFIX}")
    if prefix_len_offset is not None and not 0 <= prefix_len_offset <= len(prefix) - 4:
        raise ValueError(f"prefix_len_offset {prefix_len_offset} outside the {len(prefix)}-byte "
                         "prefix")
    return prefix


def _split_prefix(views: list, plen: int) -> tuple[list, list]:
    """``views`` cut after their first ``plen`` bytes: (prefix pieces, payload pieces)."""
    if plen == 0:
        return [], views
    pre, rest = [], []
    skip = plen
    for view in views:
        if skip <= 0:
            rest.append(view)
        elif len(view) <= skip:
            pre.append(view)
            skip -= len(view)
        else:
            pre.append(view[:skip])
            rest.append(view[skip:])
            skip = 0
    return pre, rest


def _wanted(fd: int) -> tuple[int, bool]:
    """Bytes an RX round should gather room for, asked once the round holds its first chain
    (C: ``rx_wanted``): ``(FIONREAD count, True)`` when the fd has data; ``(1, False)`` (that
    one chain: its readv sees EOF or EAGAIN) when it reports none; ``(no bound, False)`` when
    the fd cannot tell (ioctl fails: not a socket, pipe, tty or file)."""
    try:
        avail = _INT.unpack(fcntl.ioctl(fd, termios.FIONREAD, _INT_ZERO))[0]
    except OSError:
        return _UNLIMITED, False
    if avail <= 0:
        return 1, False
    return avail, True


def rx_from_fd(vq: "Virtqueue", fd: int, max_bytes: int | None = None, *, prefix=b"",
               prefix_len_offset: int | None = None) -> RxResult:
    """Host → guest stream: readv from non-blocking ``fd`` into available chains' writable
    buffers; each touched chain is completed with the bytes it received.

    ``prefix``: the first ``len(prefix)`` writable bytes of every chain are reserved; the
    payload is read into the rest, and each chain that received payload gets ``prefix``
    written in front, with its payload byte count as a little-endian u32 at
    ``prefix_len_offset`` (if not None); its used length is prefix + payload. A chain with
    no room after the prefix is treated like a chain with no writable bytes. ``max_bytes``
    counts payload bytes only.

    A round gathers only as many chains as the bytes waiting need (FIONREAD, see
    :func:`_wanted`), and a read that returns fewer bytes than offered, or every byte
    FIONREAD reported, ends the call with ``drained`` (no second read just to see EAGAIN).
    """
    prefix = check_prefix(prefix, prefix_len_offset)
    plen = len(prefix)
    budget = _UNLIMITED if max_bytes is None else max_bytes
    read_total = 0
    completed: list[tuple[int, int, int]] = []
    eof = starved = drained = False
    error = None
    broken = None
    while read_total < budget:
        # entries: (chain, prefix pieces, payload pieces, payload capacity)
        entries = []
        iov: list = []
        pieces = 0
        gathered = 0
        want, known = _UNLIMITED, False
        while gathered < budget - read_total and gathered < want and broken is None:
            try:
                chain = vq.pop()
            except DriverError as exc:
                broken = exc.code
                break
            if chain is None:
                break
            pre, rest = _split_prefix(chain.writable, plen)
            npieces = len(pre) + len(rest)
            if pieces and pieces + npieces > MAX_SEGMENTS:
                vq._rewind(chain.ring_slots, 1)
                break
            if chain.writable_bytes <= plen or npieces > MAX_SEGMENTS:
                if entries:
                    # Chains gathered before it may stay unfilled and be rewound; rewinding
                    # counts from last_avail_idx, so this one must not be consumed past them:
                    # give it back too and take it first in the next round.
                    vq._rewind(chain.ring_slots, 1)
                    break
                # Nothing to receive into: give it straight back, used_len 0.
                completed.append((chain.head, 0, chain.ring_slots))
                continue
            entries.append((chain, pre, chain.writable_bytes - plen))
            iov.extend(rest)
            pieces += npieces
            gathered += chain.writable_bytes - plen
            if len(entries) == 1 and gathered < budget - read_total:
                # only as many chains as the waiting bytes need (no need to ask when this
                # one chain already holds the whole budget)
                want, known = _wanted(fd)
        if not entries:
            starved = broken is None
            break
        limit = min(gathered, budget - read_total)
        n, drained, error = _vectored(os.readv, fd, _clip(iov, limit))
        if n == 0 and not drained and error is None:
            eof = True
        read_total += n
        remaining = n
        rewind_chains = rewind_slots = 0
        for chain, pre, room in entries:
            if remaining > 0:
                got = min(remaining, room)
                remaining -= got
                if plen:
                    _write_prefix(pre, prefix, prefix_len_offset, got)
                completed.append((chain.head, plen + got, chain.ring_slots))
                _mark_written(vq, chain.writable_gpas, plen + got)
            else:
                rewind_chains += 1
                rewind_slots += chain.ring_slots
        if broken is None:
            vq._rewind(rewind_slots, rewind_chains)
        else:  # cannot rewind across the broken chain: complete untouched ones empty
            completed.extend((e[0].head, 0, e[0].ring_slots)
                             for e in entries[len(entries) - rewind_chains:])
        if n > 0 and error is None and (n < limit or (known and n >= want)):
            drained = True  # the fd has no more now: no second read just to see EAGAIN
        if eof or drained or error is not None or broken is not None:
            break
    if completed:
        vq.push_batch(completed)
    # A hostile chain was returned as (head, 0) by the walk itself: the guest must hear of it.
    notify = vq.should_notify() if completed or broken is not None else False
    return RxResult(read_total, len(completed), notify, eof, starved, error, drained, broken)


def _write_prefix(pieces: list, prefix: bytes, len_offset: int | None, count: int) -> None:
    """Copy ``prefix`` (with ``count`` as u32 LE at ``len_offset``) over ``pieces``."""
    if len_offset is not None:
        data = bytearray(prefix)
        _U32.pack_into(data, len_offset, count)
    else:
        data = prefix
    off = 0
    for view in pieces:
        view[:] = data[off:off + len(view)]
        off += len(view)


def _mark_written(vq: "Virtqueue", gpas, count: int) -> None:
    """Dirty-log the first ``count`` bytes of the chain's writable buffers."""
    if vq.memory.log is None:
        return
    for gpa, length in gpas:
        if count <= 0:
            break
        n = min(length, count)
        vq.memory.mark_dirty(gpa, n)
        count -= n
