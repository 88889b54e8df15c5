"""The single-threaded event loop every I/O adapter runs on.

One thread, one ``select.epoll`` (level-triggered, except the edge writers of
:meth:`EventLoop.add_edge_writer`), used directly rather than through
``selectors``: the selector's key objects and event translation cost a few microseconds
per event in CPython, which is most of a 64-byte round trip's budget. Adapters register
readers, writers and timers with callbacks; cores stay sans-I/O and never see the loop. The
loop is passed to whoever needs it (no global loop), and ``interest()`` exposes the fds and
events it waits for (as ``selectors.EVENT_*`` masks), so an asyncio or trio adapter could
drive the same devices (DESIGN.md "Embedding").

Error and hang-up conditions (EPOLLERR, EPOLLHUP) are delivered to both the reader and
the writer of an fd, as ``selectors`` does, so an adapter sees the failure through its own
read or write.

A callback that raises is logged (ERROR summary, DEBUG traceback) and the loop goes on: one
connection's failure never stops the process (STYLE R5, R11). The guard is one ``try``
around a whole batch of ready fds (resumed after the failing callback), not one per call.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import selectors
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

Callback = Callable[[], None]

log = logging.getLogger(__name__)


@dataclass(order=True, slots=True)
class Timer:
    """A pending ``call_later``; ``cancel()`` makes it a no-op."""

    deadline: float
    sequence: int
    callback: Callback | None = field(compare=False)

    def cancel(self) -> None:
        self.callback = None

    @property
    def cancelled(self) -> bool:
        return self.callback is None


_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_READ_EVENTS = ~_EPOLLOUT  # any bit but OUT (IN, HUP, ERR, PRI) wakes the reader
_WRITE_EVENTS = ~_EPOLLIN  # any bit but IN (OUT, HUP, ERR) wakes the writer


@dataclass(slots=True)
class _Watch:
    reader: Callback | None = None
    writer: Callback | None = None

    def epoll_mask(self) -> int:
        return (_EPOLLIN if self.reader else 0) | (_EPOLLOUT if self.writer else 0)

    def mask(self) -> int:
        return (selectors.EVENT_READ if self.reader else 0) | (
            selectors.EVENT_WRITE if self.writer else 0
        )


class EventLoop:
    """Readers, writers, timers and soon-callbacks over one epoll instance.

    ``clock`` is injectable so tests can drive timers without sleeping. ``call_soon`` is
    the one method safe to call from another thread (it wakes the loop).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._epoll = select.epoll()
        self._watches: dict[int, _Watch] = {}
        self._edges: dict[int, int] = {}  # fd -> its private duplicate with an edge watch
        self._timers: list[Timer] = []
        self._sequence = itertools.count()
        self._soon: deque[Callback] = deque()
        self._stop_requested = False
        self._thread: int | None = None  # the thread inside run_once, if any
        self._turn_end: float | None = None  # when the current turn's caller wants it back
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add_reader(self._wake_r, self._drain_wakeup)

    # -- registration -------------------------------------------------------------------
    def time(self) -> float:
        return self._clock()

    def add_reader(self, fd: int, callback: Callback) -> None:
        watch = self._watches.get(fd)
        if watch is None:
            self._watches[fd] = _Watch(callback, None)
            self._epoll.register(fd, _EPOLLIN)
        elif watch.reader is None:
            watch.reader = callback
            self._epoll.modify(fd, watch.epoll_mask())
        else:
            watch.reader = callback  # same registration, new callback: no syscall

    def remove_reader(self, fd: int) -> None:
        self._update(fd, reader=None)

    def add_writer(self, fd: int, callback: Callback) -> None:
        watch = self._watches.get(fd)
        if watch is None:
            self._watches[fd] = _Watch(None, callback)
            self._epoll.register(fd, _EPOLLOUT)
        elif watch.writer is None:
            watch.writer = callback
            self._epoll.modify(fd, watch.epoll_mask())
        else:
            watch.writer = callback

    def remove_writer(self, fd: int) -> None:
        self._update(fd, writer=None)

    def add_edge_writer(self, fd: int, callback: Callback) -> None:
        """Call ``callback`` each time ``fd`` *becomes* writable (EPOLLOUT | EPOLLET), not
        for as long as it stays so: for waiting on a socket peer's reads themselves (each
        read that frees queued bytes is one more wake-up), where a level-triggered writer
        would spin while the buffer has room. Also wakes on hang-up and error. A newly
        added watch on an fd writable now fires once.

        epoll keeps one interest set per open fd and ``fd`` may have a level-triggered
        reader, so the watch is on a private duplicate of ``fd``: remove it before closing
        ``fd``, or the duplicate keeps the socket open."""
        copy = self._edges.get(fd)
        if copy is not None:
            self._watches[copy].writer = callback
            return
        copy = os.dup(fd)
        try:
            self._epoll.register(copy, _EPOLLOUT | select.EPOLLET)
        except OSError:
            os.close(copy)
            raise
        self._watches[copy] = _Watch(None, callback)
        self._edges[fd] = copy

    def remove_edge_writer(self, fd: int) -> None:
        copy = self._edges.pop(fd, None)
        if copy is None:
            return
        self._watches.pop(copy, None)
        try:
            self._epoll.unregister(copy)
        except OSError:
            pass
        os.close(copy)

    def edge_writers(self) -> set[int]:
        """The fds with an edge-triggered writer (their duplicates are internal)."""
        return set(self._edges)

    _KEEP = object()

    def _update(self, fd: int, reader=_KEEP, writer=_KEEP) -> None:
        watch = self._watches.get(fd)
        old_mask = watch.epoll_mask() if watch else 0
        if watch is None:
            watch = _Watch()
        if reader is not self._KEEP:
            watch.reader = reader
        if writer is not self._KEEP:
            watch.writer = writer
        new_mask = watch.epoll_mask()
        if new_mask == 0:
            self._watches.pop(fd, None)
            if old_mask:
                try:
                    self._epoll.unregister(fd)
                except OSError:  # closed before it was unwatched: epoll already forgot it
                    pass
            return
        self._watches[fd] = watch
        if old_mask == 0:
            self._epoll.register(fd, new_mask)
        elif old_mask != new_mask:
            self._epoll.modify(fd, new_mask)

    def call_soon(self, callback: Callback) -> None:
        """Run ``callback`` on the next iteration (thread-safe: another thread wakes the
        loop; the loop's own thread needs no wake-up, it looks before it waits)."""
        self._soon.append(callback)
        if self._thread != threading.get_ident():
            self._wake()

    def call_later(self, delay_s: float, callback: Callback) -> Timer:
        timer = Timer(self._clock() + max(0.0, delay_s), next(self._sequence), callback)
        heapq.heappush(self._timers, timer)
        return timer

    def interest(self) -> dict[int, int]:
        """The fds the loop waits on and their ``selectors.EVENT_*`` masks."""
        return {fd: w.mask() for fd, w in self._watches.items() if fd != self._wake_r}

    def next_deadline(self) -> float | None:
        self._drop_cancelled_timers()
        return self._timers[0].deadline if self._timers else None

    # -- a nested wait (virtio/vsock/stream_loop.py) --------------------------------------
    def fileno(self) -> int:
        """The loop's epoll fd: readable whenever one of the fds the loop watches is ready,
        so a wait nested inside a callback can include it and return as soon as the loop
        has work."""
        return self._epoll.fileno()

    def take_reader(self, fd: int) -> Callback | None:
        """Stop watching ``fd`` for reading and return the callback it had (None: it had
        none, nothing changed), for a nested wait that serves ``fd`` itself; give it back
        with :meth:`add_reader`."""
        watch = self._watches.get(fd)
        callback = None if watch is None else watch.reader
        if callback is not None:
            self.remove_reader(fd)
        return callback

    def wait_budget(self) -> float | None:
        """How long a nested wait may block before the loop has work of its own besides
        its fds: None when it has work now (a soon-callback, a stop request), -1.0 when no
        timer is pending and the turn has no end (`run`), else the seconds until the next
        timer or the end of the current `run_once`, whichever comes first."""
        if self._soon or self._stop_requested:
            return None
        deadline = self.next_deadline()
        end = self._turn_end  # run_once(timeout): its caller waits no longer than that
        if end is not None and (deadline is None or end < deadline):
            deadline = end
        if deadline is None:
            return -1.0
        return max(0.0, deadline - self._clock())

    # -- running ------------------------------------------------------------------------
    def run_once(self, timeout_s: float | None = None) -> None:
        """Wait for at most ``timeout_s`` (None: until something happens) and dispatch."""
        self._thread = threading.get_ident()
        try:
            self._turn(timeout_s)
        finally:
            self._thread = None

    def run(self) -> None:
        """Dispatch until :meth:`stop`; a stop requested before ``run`` (a signal during
        start-up) makes it return at once. The thread is stamped once for the whole run,
        not per turn (on the 64-byte round trip a turn serves one or two events)."""
        turn = self._turn
        self._thread = threading.get_ident()
        try:
            while not self._stop_requested:
                turn(None)
        finally:
            self._thread = None
            self._stop_requested = False

    def _turn(self, timeout_s: float | None) -> None:
        """One wait (at most ``timeout_s``, shortened by a due timer or a soon-callback)
        and the dispatch of what is ready, the due timers and the soon-callbacks."""
        self._turn_end = None if timeout_s is None else self._clock() + timeout_s
        soon, timers = self._soon, self._timers
        if soon:
            timeout_s = 0.0
        elif timers:
            deadline = self.next_deadline()
            if deadline is not None:
                until_timer = max(0.0, deadline - self._clock())
                timeout_s = until_timer if timeout_s is None else min(timeout_s, until_timer)
        try:
            ready = self._epoll.poll(-1 if timeout_s is None else timeout_s)
        except InterruptedError:
            ready = None
        if ready:
            self._dispatch(ready)
        if timers:
            self._run_due_timers()
        if soon:
            self._run_soon()

    def stop(self) -> None:
        """End :meth:`run` (from a callback, another thread or a signal handler)."""
        self._stop_requested = True
        self._wake()

    @property
    def wakeup_fd(self) -> int:
        """The non-blocking write end of the loop's wake-up pipe, for
        ``signal.set_wakeup_fd``: a signal that lands just before ``epoll_wait`` then still
        wakes the loop, so its Python handler runs instead of waiting for the next event."""
        return self._wake_w

    def close(self) -> None:
        for fd in list(self._edges):
            self.remove_edge_writer(fd)
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._watches.clear()
        self._timers.clear()
        self._soon.clear()

    # -- internals ----------------------------------------------------------------------
    def _dispatch(self, ready: list[tuple[int, int]]) -> None:
        """Call the reader, then the writer, of every ready fd. The try covers the whole
        batch; after a failure the batch resumes with the next callback."""
        watches = self._watches
        position, count = 0, len(ready)
        while position < count:
            try:
                while position < count:
                    fd, events = ready[position]
                    position += 1
                    watch = watches.get(fd)
                    if watch is None:
                        continue
                    if events & _READ_EVENTS and watch.reader is not None:
                        watch.reader()
                        if not events & _WRITE_EVENTS:
                            continue
                        watch = watches.get(fd)  # the reader may have removed or replaced it
                        if watch is None:
                            continue
                    if events & _WRITE_EVENTS and watch.writer is not None:
                        watch.writer()
            except Exception as exc:  # one failing callback must not stop the process
                self._log_failure(f"fd {fd}", exc)
                # A failing reader skips its fd's writer this round; level-triggered epoll
                # reports the fd again.

    def _run_due_timers(self) -> None:
        now = self._clock()
        while self._timers and self._timers[0].deadline <= now:
            timer = heapq.heappop(self._timers)
            callback, timer.callback = timer.callback, None
            if callback is not None:
                self._guarded(callback)

    def _run_soon(self) -> None:
        for _ in range(len(self._soon)):
            self._guarded(self._soon.popleft())

    def _drop_cancelled_timers(self) -> None:
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already pending

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    @staticmethod
    def _log_failure(what: object, exc: Exception) -> None:
        log.error("callback %r failed: %s: %s", what, type(exc).__name__, exc)
        log.debug("traceback of the failed callback", exc_info=True)

    @classmethod
    def _guarded(cls, callback: Callback) -> None:
        try:
            callback()
        except Exception as exc:  # one failing callback must not stop the process
            cls._log_failure(callback, exc)
