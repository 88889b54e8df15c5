"""The guest side of the console scenarios: the Linux control handshake, then fast streams.

Control queues (2 receive, 3 transmit) are driven by the general guest-driver model
(``tests/support/driver.py``) and the Linux control-protocol model
(``tests/support/console_guest.py``): DEVICE_READY, PORT_ADD → PORT_READY, PORT_NAME,
then the guest opens every port it streams on (PORT_OPEN 1), as Linux does on open().
Port data queues use :class:`bench.guest.StreamQueue` (pre-built chains).

Workloads (``spec["workload"]``): ``console-tx`` guest → host on ``ports`` ports with
``chunk``-byte chains, ``console-rx`` host → guest into ``rx_buffer``-byte buffers,
``console-rtt`` 64-byte echo through the host peer (``rtt``).

Spec: virtio 1.2 §5.3.6.2 (multiport device operation), §5.3.2 (queue numbering).
"""

from __future__ import annotations

import time

from bench.guest import StreamQueue, round_trips, stream
from bench.guest_proc import Guest, latency_summary
from tests.support.console_guest import CONTROL_RX_BUFFER_BYTES, LinuxConsoleGuest
from tests.support.driver import Allocator, SplitDriver
from vhost_user.frontend import FrontendQueue
from virtio.console.wire import ConsoleFeature, port_queues

CONTROL_RX, CONTROL_TX = 2, 3
CONTROL_BYTES = 4 << 20


class ConsoleGuest(Guest):
    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        self.max_ports = spec["max_ports"]
        names = spec["port_names"]  # the ports to open and stream on, in order
        size = spec.get("queue_size", 256)
        workload = spec["workload"]
        # Control rings: the general driver model over a slice of guest RAM.
        lo = self.layout.alloc(CONTROL_BYTES, 4096)
        alloc = Allocator(self.ram.memory, lo, lo + CONTROL_BYTES)
        self.ctl_rx = SplitDriver(self.ram.memory, 64, event_idx=True, allocator=alloc,
                                  index=CONTROL_RX)
        self.ctl_tx = SplitDriver(self.ram.memory, 256, event_idx=True, allocator=alloc,
                                  index=CONTROL_TX)
        self.ctl_fqs = [FrontendQueue(d.index, d.size, *d.ring_addresses)
                        for d in (self.ctl_rx, self.ctl_tx)]
        # Port ids are assigned by the device in configuration order (no console port).
        self.port_ids = list(range(1, len(names) + 1)) if not spec.get("ids") else spec["ids"]
        self.tx: list[StreamQueue] = []
        self.rx: list[StreamQueue] = []
        queues = []
        for pid in self.port_ids:
            rxq, txq = port_queues(pid)
            if workload in ("console-rx", "console-rtt"):
                q = StreamQueue(self.layout, rxq, size, [spec.get("rx_buffer", 4096)],
                                writable=True)
                self.rx.append(q)
                queues.append(q)
            if workload in ("console-tx", "console-rtt"):
                q = StreamQueue(self.layout, txq, size, [spec.get("chunk", 32768)])
                self.tx.append(q)
                queues.append(q)
        self.model = LinuxConsoleGuest(self.max_ports)
        self.start(queues, self.ctl_fqs,
                   device_features=int(ConsoleFeature.F_MULTIPORT | ConsoleFeature.F_SIZE))
        self._handshake(names)

    # -- control ----------------------------------------------------------------------------
    def _send_control(self, messages: list[bytes]) -> None:
        for m in messages:
            deadline = time.monotonic() + 10
            while self.ctl_tx.num_free == 0:  # ring full: wait for the device to return some
                self.ctl_fqs[1].kick()
                self.ctl_fqs[1].wait_call(0.01)
                self.ctl_tx.get_bufs()
                if time.monotonic() > deadline:
                    raise TimeoutError("control transmitq never drained")
            self.ctl_tx.add_buf(out=[m])
            self.ctl_tx.kick_prepare()
            self.ctl_fqs[1].kick()  # Linux kicks every control message
            self.ctl_tx.get_bufs()

    def _pump_control(self, timeout_s: float) -> bool:
        """Reap control receive buffers, feed the model, send its answers; repost."""
        while self.ctl_rx.outstanding < 48:
            self.ctl_rx.add_buf(in_sizes=[CONTROL_RX_BUFFER_BYTES])
        if self.ctl_rx.kick_prepare():
            self.ctl_fqs[0].kick()
        self.ctl_fqs[0].wait_call(timeout_s)
        got = False
        for used in self.ctl_rx.get_bufs():
            got = True
            self._send_control(self.model.receive(used.data[:used.len_]))
        self.ctl_tx.get_bufs()
        return got

    def _handshake(self, names: list[str]) -> None:
        self._send_control(self.model.driver_ok())
        deadline = time.monotonic() + 30
        while True:
            have = {p.name: p.id for p in self.model.ports.values() if p.name}
            if all(n in have for n in names):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"console handshake: ports {sorted(set(names) - set(have))} "
                                   "never named")
            self._pump_control(0.05)
        self.port_ids = [have[n] for n in names]
        for pid in self.port_ids:
            self._send_control(self.model.open(pid))
        # Let the device see the opens before the host peer arrives.
        self._pump_control(0.01)

    def command(self, cmd: dict) -> dict:
        if cmd["cmd"] == "settle":
            while self._pump_control(0.05):
                pass
            return {"ok": True}
        raise ValueError(f"unknown command {cmd}")

    # -- workloads --------------------------------------------------------------------------
    def run(self, seconds: float) -> dict:
        if self.spec["workload"] == "console-tx":
            return self._stream(self.tx, seconds, count_lens=False)
        return self._stream(self.rx, seconds, count_lens=True)

    def _stream(self, queues: list[StreamQueue], seconds: float, count_lens: bool) -> dict:
        """Keep every queue full (:func:`bench.guest.stream`: touches only the queues whose
        call fired, so the guest's cost per wake-up does not grow with the number of
        ports)."""
        r = stream(queues, seconds, count_lens)
        self.rescues += r["rescues"]
        return {"bytes": sum(r["per_port"]), "per_port": r["per_port"],
                "seconds": r["seconds"], "guest_cpu_s": r["guest_cpu_s"],
                "wakeups": r["wakeups"], "kicks": r["kicks"],
                "rescues": self.rescues}

    def rtt(self, iterations: int) -> dict:
        """64-byte echo through the host peer, one at a time (:func:`bench.guest.round_trips`)."""
        lat, rescues = round_trips(self.rx[0], self.tx[0], iterations, iterations // 10 + 10)
        self.rescues += rescues
        return latency_summary(lat, self.rescues)
