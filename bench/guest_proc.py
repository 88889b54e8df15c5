"""The guest process of an end-to-end scenario: the project's vhost-user front-end (QEMU's
role) plus the cheap guest driver of :mod:`bench.guest`, in a process of its own.

Started by the harness as ``python -m bench.guest_proc SPEC_JSON``; it connects to the
back-end, negotiates and starts the queues the spec names, prints ``{"ready": ...}`` and then
answers one JSON line per command read from stdin:

- ``{"cmd": "run", "seconds": S}`` → ``{"bytes": .., "chains": .., "seconds": .., ...}``
  (streaming workloads), or ``{"cmd": "rtt", "iterations": N}`` → latency percentiles;
- ``{"cmd": "quit"}``.

Workloads (``spec["workload"]``):

- ``echo-bulk``: echo test device, guest TX chains of ``chunk`` bytes → back-end socket pair →
  guest RX buffers of ``rx_buffer`` bytes; throughput counted on RX;
- ``echo-rtt``: one 64-byte chain at a time, time until it is back in an RX buffer;
- ``console-tx`` / ``console-rx`` / ``console-rtt``: console ports (see bench/console_guest.py);
- ``vsock-*``: see bench/vsock_guest.py.

Spec: vhost-user "Front-end message types" (start sequence); virtio 1.2 §2.7.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time

from bench.guest import GuestLayout, StreamQueue, round_trips
from vhost_user.frontend import FrontendQueue, GuestRam, VhostUserFrontend
from vhost_user.wire import VirtioFeature as VF

RAM_BYTES = 256 << 20
FEATURES = int(VF.VERSION_1 | VF.VHOST_USER_F_PROTOCOL_FEATURES | VF.RING_EVENT_IDX)


def pin_from_spec(spec: dict) -> None:
    cpu = spec.get("cpu")
    if cpu is not None:
        os.sched_setaffinity(0, {int(cpu)})


class Guest:
    """Front-end + RAM + queues; subclasses set up a device and implement workloads."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.fe = VhostUserFrontend.connect(spec["socket"], timeout_s=20.0)
        self.ram = GuestRam([(0, spec.get("ram_bytes", RAM_BYTES))])
        region = self.ram.memory.regions[0]
        self.layout = GuestLayout(region.view, region.gpa)
        self.queues: dict[int, StreamQueue] = {}
        self.rescues = 0

    def start(self, queues: list[StreamQueue], extra: list[FrontendQueue] = (),
              device_features: int = 0) -> None:
        offered = self.fe.init()
        features = FEATURES | (device_features & offered)
        fqs = list(extra)
        for q in queues:
            fq = FrontendQueue(q.index, q.size, *q.ring_addresses, kick_fd=q.kick_fd,
                               call_fd=q.call_fd)
            fqs.append(fq)
            self.queues[q.index] = q
        fqs.sort(key=lambda f: f.index)
        self.fe.start(self.ram, fqs, features=features)

    # -- helpers ------------------------------------------------------------------------
    def wait_calls(self, queues: list[StreamQueue], timeout_s: float) -> list[StreamQueue]:
        """Sleep until one of ``queues`` is signalled; consume the signals."""
        fds = {q.call_fd: q for q in queues}
        ready, _, _ = select.select(list(fds), [], [], timeout_s)
        for fd in ready:
            os.read(fd, 8)
        return [fds[fd] for fd in ready]

    def close(self) -> None:
        try:
            self.fe.close()
        finally:
            self.ram.close()


class EchoGuest(Guest):
    """The echo test device (queue 0 RX, queue 1 TX): what goes out comes back."""

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        size = spec.get("queue_size", 256)
        chunk = spec.get("chunk", 32768)
        self.rx = StreamQueue(self.layout, 0, size, [spec.get("rx_buffer", 4096)],
                              writable=True)
        self.tx = StreamQueue(self.layout, 1, size, [chunk])
        self.start([self.rx, self.tx])

    def run(self, seconds: float) -> dict:
        """Stream TX → RX for ``seconds``; throughput counted on RX bytes."""
        rx, tx = self.rx, self.tx
        rx.reap(), tx.reap()
        total = chains = 0
        start = time.perf_counter()
        deadline = start + seconds
        rx_ahead, tx_ahead = max(1, rx.chains // 4), max(1, tx.chains // 4)
        while True:
            n, b = rx.reap()
            chains += n
            total += b
            tx.reap()
            now = time.perf_counter()
            if now >= deadline:
                break
            rx.publish()
            tx.publish()
            rx.want_interrupt_after(min(rx_ahead, rx.outstanding))
            tx.want_interrupt_after(min(tx_ahead, tx.outstanding))
            # Re-check after arming (Linux virtqueue_enable_cb_prepare + poll).
            if (rx._used_idx[0] - rx.last_used) & 0xFFFF or \
                    ((tx._used_idx[0] - tx.last_used) & 0xFFFF) >= tx_ahead:
                continue
            if not self.wait_calls([rx, tx], 0.2):
                self.rescues += 1
                tx.kick()
                rx.kick()
        elapsed = time.perf_counter() - start
        return {"bytes": total, "chains": chains, "seconds": elapsed, "rescues": self.rescues,
                "kicks": tx.kicks + rx.kicks}

    def rtt(self, iterations: int) -> dict:
        """One ``chunk``-byte message at a time: TX → back-end → RX; latency in ns
        (:func:`bench.guest.round_trips`)."""
        lat, rescues = round_trips(self.rx, self.tx, iterations, iterations // 10 + 10)
        self.rescues += rescues
        return latency_summary(lat, self.rescues)


def latency_summary(lat: list[int], rescues: int = 0) -> dict:
    lat.sort()
    n = len(lat)
    return {"p50_ns": lat[n // 2], "p99_ns": lat[(n * 99) // 100], "min_ns": lat[0],
            "mean_ns": sum(lat) / n, "iterations": n, "rescues": rescues}


def make_guest(spec: dict) -> Guest:
    workload = spec["workload"]
    if workload.startswith("echo"):
        return EchoGuest(spec)
    if workload.startswith("console"):
        from bench.console_guest import ConsoleGuest

        return ConsoleGuest(spec)
    if workload.startswith("vsock"):
        from bench.vsock_guest import VsockGuest

        return VsockGuest(spec)  # noqa: F821 (imported above)
    raise ValueError(f"unknown workload {workload!r}")


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    pin_from_spec(spec)
    guest = make_guest(spec)
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "run":
                result = guest.run(float(cmd["seconds"]))
            elif cmd["cmd"] == "rtt":
                result = guest.rtt(int(cmd["iterations"]))
            else:
                result = guest.command(cmd)
            print(json.dumps(result), flush=True)
    finally:
        guest.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
