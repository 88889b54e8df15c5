"""The guest side of the vsock scenarios, on the project's vsock guest model.

``tests/support/vsock_guest.py`` (Linux ``virtio_transport_common.c`` behaviour: credit,
CREDIT_UPDATE, 4 KiB receive buffers, ≤ 64 KiB packets) runs in this process; the guest
listens on ``port`` and accepts the host's CONNECTs. Unlike the console workloads this
driver does Python work per packet (header parse, credit bookkeeping), so vsock throughput
figures are bounded by the guest model as much as by the back-end: ANALYSIS.md has the
split.

Workloads: ``vsock-tx`` (guest → host, 64 KiB packets), ``vsock-rx`` (host → guest),
``vsock-conns`` (accept many connections; idle).

Spec: virtio 1.2 §5.10.6 (Device Operation).
"""

from __future__ import annotations

import time

from bench.guest_proc import Guest
from tests.support.vsock_guest import VsockGuest as Model
from vhost_user.frontend import GuestRam, VhostUserFrontend

BLOCK = b"\x5a" * (256 * 1024)


class VsockGuest:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.ram = GuestRam([(0, spec.get("ram_bytes", 256 << 20))])
        fe = VhostUserFrontend.connect(spec["socket"], timeout_s=20.0)
        self.model = Model(fe, self.ram, queue_size=spec.get("queue_size", 256))
        self.model.start()
        self.port = spec.get("port", 1234)
        self.model.listen(self.port)
        self.conns = []

    def command(self, cmd: dict) -> dict:
        if cmd["cmd"] == "accept":
            count, t0 = int(cmd["count"]), time.perf_counter()
            deadline = t0 + float(cmd.get("timeout", 60))
            q = self.model.accept_queue[self.port]
            while len(self.conns) < count and time.perf_counter() < deadline:
                self.model.pump(0.01)
                while q:
                    self.conns.append(q.popleft())
                self.model.packets.clear()
            return {"accepted": len(self.conns), "seconds": time.perf_counter() - t0}
        if cmd["cmd"] == "pump":
            end = time.perf_counter() + float(cmd["seconds"])
            while time.perf_counter() < end:
                self.model.pump(0.05)
                self.model.packets.clear()
            return {"ok": True}
        raise ValueError(f"unknown command {cmd}")

    def run(self, seconds: float) -> dict:
        m, conn = self.model, self.conns[0]
        tx = self.spec["workload"] == "vsock-tx"
        start_cnt = conn.tx_cnt if tx else conn.rx_cnt
        moved = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            if tx and conn.tx_pending < 2 * len(BLOCK):
                conn.send(BLOCK)
            m.pump(0.01)
            m.packets.clear()
            m.sent.clear()
            if not tx:
                conn.received.clear()
        now = conn.tx_cnt if tx else conn.rx_cnt
        moved = (now - start_cnt) & 0xFFFFFFFF
        if tx:  # bytes still queued in the guest model were not sent
            pass
        return {"bytes": moved, "seconds": time.perf_counter() - t0}

    def rtt(self, iterations: int) -> dict:
        raise ValueError("no vsock round-trip workload")

    def close(self) -> None:
        try:
            self.model.fe.close()
        finally:
            self.ram.close()


# guest_proc.make_guest imports VsockGuest from here; Guest is the console/echo base.
__all__ = ["VsockGuest", "Guest"]
