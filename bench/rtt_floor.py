"""The per-event floor of a Python event loop: the 64-byte round trip of ``bench/limits/rtt.c``
(guest → kick eventfd → middle → socket → echo peer → socket → middle → call eventfd →
guest) with every process written in Python, the middle in three styles:

``blocking``  read(kick), write(sock), read(sock), write(call) — rtt.c's middle in Python;
``epoll``     the smallest possible epoll loop: one ``epoll.poll()`` per event, a dict
              lookup, a bound-method call (what virtio/loop.py does, minus the device);
``epoll-opportunistic`` as ``epoll``, but after writing the socket it tries a non-blocking
              read of the answer before going back to epoll.

``python -m bench.rtt_floor [ITERATIONS]`` prints p50/p99 per style and pinning beside the C
limit (``rtt 3``), so the figures in bench/results/ANALYSIS.md can be reproduced.
"""

from __future__ import annotations

import json
import os
import select
import socket
import statistics
import subprocess
import sys
import time

from bench.limits.build import build_all, helper_path

PINNINGS = {"same": (0, 0, 0), "cross": (1, 0, 1)}  # guest, middle, echo
MSG = bytes(64)


def _echo(sock: socket.socket) -> None:
    while True:
        data = sock.recv(64)
        if not data:
            return
        sock.sendall(data)


def _middle(style: str, kick: int, call: int, sock: socket.socket) -> None:
    one = (1).to_bytes(8, sys.byteorder)
    fd = sock.fileno()
    if style == "blocking":
        while True:
            os.read(kick, 8)
            os.write(fd, MSG)
            if not os.read(fd, 64):
                return
            os.write(call, one)
    os.set_blocking(kick, False)
    os.set_blocking(fd, False)
    ep = select.epoll()
    ep.register(kick, select.EPOLLIN)
    ep.register(fd, select.EPOLLIN)
    opportunistic = style == "epoll-opportunistic"

    def answer() -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        if not data:
            raise SystemExit
        os.write(call, one)

    def on_kick() -> None:
        os.read(kick, 8)
        os.write(fd, MSG)
        if opportunistic:
            answer()

    handlers = {kick: on_kick, fd: answer}
    while True:
        for ready, _ in ep.poll():
            handlers[ready]()


def run(style: str, iterations: int, pin: str) -> dict:
    """p50/p99 (ns) of ``iterations`` round trips (after a warm-up)."""
    gcpu, mcpu, ecpu = PINNINGS[pin]
    kick, call = os.eventfd(0), os.eventfd(0)
    a, b = socket.socketpair()
    children = []
    for cpu, body in ((ecpu, lambda: _echo(b)), (mcpu, lambda: _middle(style, kick, call, a))):
        pid = os.fork()
        if pid == 0:
            try:
                os.sched_setaffinity(0, {cpu})
                body()
            finally:
                os._exit(0)
        children.append(pid)
    os.sched_setaffinity(0, {gcpu})
    one, clock = (1).to_bytes(8, sys.byteorder), time.perf_counter_ns
    lat = []
    warm = iterations // 10 + 10
    try:
        for i in range(iterations + warm):
            t0 = clock()
            os.write(kick, one)
            os.read(call, 8)
            if i >= warm:
                lat.append(clock() - t0)
    finally:
        a.close()
        b.close()
        for pid in children:
            os.kill(pid, 15)
            os.waitpid(pid, 0)
        os.close(kick)
        os.close(call)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    lat.sort()
    return {"p50_ns": lat[len(lat) // 2], "p99_ns": lat[len(lat) * 99 // 100]}


def limit(iterations: int, pin: str) -> dict:
    gcpu, mcpu, ecpu = PINNINGS[pin]
    out = subprocess.run([str(helper_path("rtt")), "3", str(iterations), str(gcpu), str(mcpu),
                          str(ecpu)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    iterations = int(argv[0]) if argv else 20000
    build_all()
    for pin in ("same", "cross"):
        rows = {"C (rtt 3)": [limit(iterations, pin) for _ in range(3)]}
        for style in ("blocking", "epoll", "epoll-opportunistic"):
            rows[f"Python {style}"] = [run(style, iterations, pin) for _ in range(3)]
        for name, runs in rows.items():
            p50 = statistics.median(r["p50_ns"] for r in runs) / 1e3
            p99 = statistics.median(r["p99_ns"] for r in runs) / 1e3
            print(f"[{pin:5}] {name:30} p50 {p50:6.1f} µs  p99 {p99:7.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
