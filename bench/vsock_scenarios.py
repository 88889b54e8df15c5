"""vsock scenarios: one connection with 64 KiB writes each direction vs raw AF_UNIX,
1,000 open connections (back-end RSS per idle connection), host CONNECT handshakes per
second, idle back-end CPU with every connection open. Host->guest also reports, from the
same minutes, the ideal relay of bench/limits/relay.c against the same raw limit: what the
machine allows for a three-process path into 4 KiB guest buffers, so the back-end's own
cost is the distance between its row and that one.

Spec: DESIGN.md "The vsock device" (hybrid vsock CONNECT/OK).
"""

from __future__ import annotations

import json
import os
import signal
import time

from bench.procs import Backend, GuestProc, Peer, limit_relay, limit_stream
from bench.scenarios import PINNINGS, Ctx, Row, _fmt, _rate, alternate

KIB = 1024
PORT = 1234
#: Credit window of each side (back-end ``tx_buffer_size``, guest ``buf_alloc``).
WINDOW = int(os.environ.get("VSOCK_BENCH_WINDOW", 256 * KIB))
#: Descriptors per vsock queue of the bench guest.
QUEUE_SIZE = int(os.environ.get("VSOCK_BENCH_QUEUE", 256))
#: The guest end of the streaming rows: "c" (bench/limits/vsock_guest.c) or "py".
GUEST_ENGINE = os.environ.get("VSOCK_BENCH_GUEST", "c")


class VsockSetup:
    def __init__(self, ctx: Ctx, pin: str, workload: str, tag: str, engine: str = "py",
                 mgmt_socket: str | None = None) -> None:
        cpus = PINNINGS[pin]
        d = ctx.workdir / f"{tag}-{pin}-{time.monotonic_ns()}"
        d.mkdir(parents=True)
        self.sock, self.uds = str(d / "vsock.sock"), str(d / "vsock")
        toml = ((f'[management]\nsocket = "{mgmt_socket}"\n' if mgmt_socket else "")
                + f'[[vsock]]\nguest_cid = 3\nsocket = "{self.sock}"\n'
                f'uds_path = "{self.uds}"\ntx_buffer_size = {WINDOW}\n')
        self.cpus = cpus
        self.backend = self.guest = self.peer = None
        try:
            self.backend = Backend(d, toml, [self.sock] + ([mgmt_socket] if mgmt_socket
                                                           else []),
                                   ring=ctx.ring, cpu=cpus["backend"])
            self.guest = GuestProc(d, {"workload": workload, "socket": self.sock,
                                       "cpu": cpus["guest"], "port": PORT,
                                       "buf_alloc": WINDOW, "queue_size": QUEUE_SIZE,
                                       "engine": engine})
        except BaseException:
            self.close()
            raise

    def connect(self, mode: str, count: int, chunk: int = 64 * KIB) -> float:
        """Host peer opens ``count`` connections (CONNECT/OK) while the guest accepts;
        returns the seconds the handshakes took."""
        g = self.guest
        g.proc.stdin.write(json.dumps({"cmd": "accept", "count": count, "timeout": 60}) + "\n")
        g.proc.stdin.flush()
        t0 = time.perf_counter()
        self.peer = Peer(mode, chunk, self.cpus["peer"], [f"vsock:{PORT}:{self.uds}"] * count)
        elapsed = time.perf_counter() - t0
        answer = g._answer()
        if answer["accepted"] != count:
            raise RuntimeError(f"guest accepted {answer['accepted']} of {count} connections")
        return elapsed

    def close(self) -> None:
        for p in (self.guest, self.peer, self.backend):
            if p is not None:
                try:
                    p.close()
                except Exception:  # noqa: BLE001
                    pass


def stream(ctx: Ctx) -> list[Row]:
    """One connection, 64 KiB writes, each direction, against raw AF_UNIX. The guest end of
    the timed runs is ``GUEST_ENGINE``: "c", the C stand-in for the Linux driver
    (bench/limits/vsock_guest.c: it checks every host->guest byte), or "py", the Python
    model (bench/vsock_guest.py); the row label says which. Guest->host bytes are counted
    at both ends: the sink must have received exactly what the guest sent."""
    rows = []
    engine = GUEST_ENGINE
    for pin in ctx.pinnings:
        cpus = PINNINGS[pin]
        for direction, workload, mode in (("guest->host", "vsock-tx", "sink"),
                                          ("host->guest", "vsock-rx", "source")):
            s = VsockSetup(ctx, pin, workload, workload, engine=engine)
            runs: list[dict] = []
            relay: list[float] = []
            label = f"vsock {direction}, 64 KiB writes" + (", C guest stand-in"
                                                            if engine == "c" else "")

            def limit_run() -> float:
                if mode == "source" and len(relay) < ctx.runs:  # the ideal relay too
                    relay.append(limit_relay(64 * KIB, ctx.seconds, WINDOW, cpus["peer"],
                                             cpus["backend"], cpus["guest"])["bytes_per_s"])
                return limit_stream(64 * KIB, ctx.seconds, "read", cpus["writer"],
                                    cpus["reader"])["bytes_per_s"]

            try:
                s.connect(mode, 1)
                b, l = alternate(ctx, lambda: _rate(_keep(runs, s.guest.run(ctx.seconds))),
                                 limit_run, profile_as=label if ctx.profiling(pin) else None)
                if mode == "sink":
                    _check_sink(s, sum(r["bytes"] for r in runs))
            finally:
                s.close()
            rows.append(Row(f"vsock-{workload[6:]}", label, pin, ctx.ring, "B/s", b, l,
                            "raw AF_UNIX 64 KiB", 0.6, chunk=64 * KIB))
            ctx.log(_fmt(rows[-1]))
            if relay:
                rows.append(Row("vsock-rx-relay", "machine: ideal host->guest relay (C, 3 "
                                "processes, 4 KiB buffers, no virtqueue) vs raw AF_UNIX", pin,
                                "raw", "B/s", relay, l, "raw AF_UNIX 64 KiB", None,
                                chunk=64 * KIB))
                ctx.log(_fmt(rows[-1]))
    return rows


def _keep(runs: list[dict], result: dict) -> dict:
    runs.append(result)
    return result


def _check_sink(s: VsockSetup, sent: int) -> None:
    """The host sink must have received every byte the guest sent (once the back-end's
    buffers drained), each the guest->host stream pattern's byte at its offset (the sink
    checks them, bench/limits/peer.c): a path that drops, reorders or invents bytes cannot
    look fast."""
    time.sleep(0.2)
    peer, s.peer = s.peer, None
    got, mismatch = _sink_result(peer)
    if mismatch is not None:
        conn, offset = mismatch
        raise RuntimeError(f"vsock guest->host: the host sink got a wrong byte at stream "
                           f"offset {offset} of connection {conn}")
    if got != sent:
        raise RuntimeError(f"vsock guest->host: the guest sent {sent} bytes, the host sink "
                           f"received {got}")


def _sink_result(peer) -> tuple[int, list | None]:
    """Stop the sink: the bytes it received in all, and its first pattern mismatch
    (``[connection, stream offset]``) or None."""
    if peer.proc.poll() is None:
        peer.proc.send_signal(signal.SIGTERM)
    out, err = peer.proc.communicate(timeout=10)
    for line in out.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            return sum(result["bytes"]), result.get("mismatch")
    raise RuntimeError(f"the host sink gave no result (exit {peer.proc.returncode}): "
                       f"{err.strip()}")


def connections(ctx: Ctx, count: int = 1000) -> list[Row]:
    s = VsockSetup(ctx, "same", "vsock-conns", "conns")
    try:
        s.guest.call(cmd="pump", seconds=0.2)
        rss0 = s.backend.rss_kib()
        took = s.connect("sink", count)
        s.guest.call(cmd="pump", seconds=0.3)
        rss1 = s.backend.rss_kib()
        seconds = 2.0 if ctx.quick else 10.0
        cpu0 = s.backend.cpu_seconds()
        time.sleep(seconds)
        idle_cpu = s.backend.cpu_seconds() - cpu0
    finally:
        s.close()
    per_conn = (rss1 - rss0) / count
    rows = [
        Row("vsock-rss", f"vsock RSS per idle connection ({count} open)", "same", ctx.ring,
            "KiB", [per_conn], [], "", None, higher_is_better=False,
            extra={"rss_before_kib": rss0, "rss_after_kib": rss1, "limit_kib": 50,
                   "ratio": per_conn / 50}),
        Row("vsock-connect", "host CONNECT handshakes per second (guest model accepting)",
            "same", ctx.ring, "conn/s", [count / took], [], "", None,
            extra={"connections": count, "seconds": took}),
        Row("idle-vsock", f"idle back-end CPU over {seconds:.0f} s ({count} vsock "
            "connections open)", "same", ctx.ring, "CPU s", [idle_cpu], [], "", None,
            higher_is_better=False, extra={"seconds": seconds,
                                           "cpu_percent": 100 * idle_cpu / seconds}),
    ]
    rows[0].target = 1.0  # ≤ 50 KiB each: ratio to 50 KiB ≤ 1
    for r in rows:
        ctx.log(_fmt(r))
    return rows


def all_vsock(ctx: Ctx) -> list[Row]:
    return stream(ctx) + connections(ctx, 200 if ctx.quick else 1000)
