"""The single-threaded event loop every I/O adapter runs on.

One thread, one ``selectors.DefaultSelector`` (epoll on Linux). Adapters register readers,
writers and timers with callbacks; cores stay sans-I/O and never see the loop. The loop is
passed to whoever needs it (no global loop), and ``interest()`` exposes the fds and events it
waits for, so an asyncio or trio adapter could drive the same devices (DESIGN.md "Embedding").

A callback that raises is logged (ERROR summary, DEBUG traceback) and the loop goes on: one
connection's failure never stops the process (STYLE R5, R11).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
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


@dataclass(slots=True)
class _Watch:
    reader: Callback | None = None
    writer: Callback | None = None

    def mask(self) -> int:
        return (selectors.EVENT_READ if self.reader else 0) | (
            selectors.EVENT_WRITE if self.writer else 0
        )


class EventLoop:
    """Readers, writers, timers and soon-callbacks over one selector.

    ``clock`` is injectable so tests can drive timers without sleeping.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._watches: dict[int, _Watch] = {}
        self._timers: list[Timer] = []
        self._sequence = itertools.count()
        self._soon: deque[Callback] = deque()
        self._running = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add_reader(self._wake_r, self._drain_wakeup)

    # -- registration -------------------------------------------------------------------
    def time(self) -> float:
        return self._clock()

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._update(fd, reader=callback)

    def remove_reader(self, fd: int) -> None:
        self._update(fd, reader=None)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._update(fd, writer=callback)

    def remove_writer(self, fd: int) -> None:
        self._update(fd, writer=None)

    _KEEP = object()

    def _update(self, fd: int, reader=_KEEP, writer=_KEEP) -> None:
        watch = self._watches.get(fd)
        old_mask = watch.mask() if watch else 0
        if watch is None:
            watch = _Watch()
        if reader is not self._KEEP:
            watch.reader = reader
        if writer is not self._KEEP:
            watch.writer = writer
        new_mask = watch.mask()
        if new_mask == 0:
            self._watches.pop(fd, None)
            if old_mask:
                self._selector.unregister(fd)
            return
        self._watches[fd] = watch
        if old_mask == 0:
            self._selector.register(fd, new_mask, fd)
        elif old_mask != new_mask:
            self._selector.modify(fd, new_mask, fd)

    def call_soon(self, callback: Callback) -> None:
        """Run ``callback`` on the next iteration (thread-safe wake-up included)."""
        self._soon.append(callback)
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

    # -- running ------------------------------------------------------------------------
    def run_once(self, timeout_s: float | None = None) -> None:
        """Wait for at most ``timeout_s`` (None: until something happens) and dispatch."""
        if self._soon:
            timeout_s = 0.0
        deadline = self.next_deadline()
        if deadline is not None:
            until_timer = max(0.0, deadline - self._clock())
            timeout_s = until_timer if timeout_s is None else min(timeout_s, until_timer)
        for key, events in self._selector.select(timeout_s):
            self._dispatch_fd(key.fd, events)
        self._run_due_timers()
        self._run_soon()

    def run(self) -> None:
        self._running = True
        while self._running:
            self.run_once(None)

    def stop(self) -> None:
        self._running = False
        self._wake()

    def close(self) -> None:
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._watches.clear()
        self._timers.clear()
        self._soon.clear()

    # -- internals ----------------------------------------------------------------------
    def _dispatch_fd(self, fd: int, events: int) -> None:
        watch = self._watches.get(fd)
        if watch is not None and events & selectors.EVENT_READ and watch.reader:
            self._guarded(watch.reader)
        watch = self._watches.get(fd)  # the reader may have removed or replaced it
        if watch is not None and events & selectors.EVENT_WRITE and watch.writer:
            self._guarded(watch.writer)

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
    def _guarded(callback: Callback) -> None:
        try:
            callback()
        except Exception as exc:  # one failing callback must not stop the process
            log.error("callback %r failed: %s: %s", callback, type(exc).__name__, exc)
            log.debug("traceback of the failed callback", exc_info=True)
