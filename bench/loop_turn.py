"""``python -m bench.loop_turn [EVENTS]``: what one event costs in ``virtio.loop.EventLoop``
against the smallest possible epoll loop (one ``poll``, a dict lookup, a call), both on one
level-triggered eventfd that stays readable, pinned to the caller's CPU. Prints µs per event
for each; the difference is the loop's own overhead per event (bench/results/ANALYSIS.md,
"Fifth session").
"""

from __future__ import annotations

import os
import select
import sys
import time

from virtio.loop import EventLoop


def per_event_us(events: int) -> tuple[float, float]:
    """(EventLoop.run, minimal loop) µs per event over ``events`` events each."""
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    os.eventfd_write(efd, 1)  # never drained: every wait returns it at once
    try:
        loop = EventLoop()
        count = [0]

        def reader() -> None:
            count[0] += 1
            if count[0] >= events:
                loop.stop()

        loop.add_reader(efd, reader)
        t0 = time.perf_counter()
        loop.run()
        looped = (time.perf_counter() - t0) / events * 1e6
        loop.close()
        ep = select.epoll()
        ep.register(efd, select.EPOLLIN)
        count[0] = 0

        def counter() -> None:
            count[0] += 1

        watches = {efd: counter}
        poll = ep.poll
        t0 = time.perf_counter()
        while count[0] < events:
            for fd, _ in poll(-1):
                watches[fd]()
        minimal = (time.perf_counter() - t0) / events * 1e6
        ep.close()
        return looped, minimal
    finally:
        os.close(efd)


def main() -> None:
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    looped, minimal = per_event_us(events)
    print(f"EventLoop.run {looped:.3f} us/event, minimal epoll loop {minimal:.3f} us/event, "
          f"overhead {looped - minimal:.3f} us/event")


if __name__ == "__main__":
    main()
