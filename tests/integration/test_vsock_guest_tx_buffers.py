"""The bench's vsock guest (bench/vsock_guest.py, and its C stand-in
bench/limits/vsock_guest.c) takes a TX payload buffer per packet from a free stack and gives
it back when the device has used the chain, as Linux kmallocs and frees them. Through the
real back-end, the host sink (bench/limits/peer.c) must still see exactly the stream pattern
(every byte of the first 32 MiB, samples after that) while a few buffers are reused many
times and the C stand-in and the Python model take the rings over from each other; every
buffer must come back.

Spec: virtio 1.2 §5.10.6.4 (stream data arrives in order, without loss), §2.7.13 (supplying
buffers), §2.7.14 (the device returns used buffers).
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

import ring
from bench.procs import Backend, Peer
from bench.vsock_guest import MAX_PKT, FastVsockGuest

PORT = 1234
#: 16 descriptors: 8 TX chains, so the pool has 8 buffers, each used many times
QUEUE_SIZE = 16


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="vsg-"))  # short: AF_UNIX paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _sink_result(peer: Peer) -> dict:
    peer.proc.send_signal(signal.SIGTERM)
    out, err = peer.proc.communicate(timeout=10)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"the sink gave no result: {err}"
    return json.loads(lines[-1])


def test_sink_sees_the_pattern_across_buffer_reuses_and_engine_handovers(workdir):
    sock, uds = str(workdir / "vsock.sock"), str(workdir / "vsock")
    toml = (f'[[vsock]]\nguest_cid = 3\nsocket = "{sock}"\nuds_path = "{uds}"\n'
            f'tx_buffer_size = {256 * 1024}\n')
    backend = Backend(workdir, toml, [sock], ring=ring.IMPLEMENTATION, cpu=None)
    guest = peer = None
    try:
        guest = FastVsockGuest({"workload": "vsock-tx", "socket": sock, "port": PORT,
                                "buf_alloc": 256 * 1024, "queue_size": QUEUE_SIZE,
                                "ram_bytes": 32 << 20})
        accepted: list[dict] = []
        accept = threading.Thread(target=lambda: accepted.append(
            guest.command({"cmd": "accept", "count": 1, "timeout": 20})))
        accept.start()
        peer = Peer("sink", MAX_PKT, None, [f"vsock:{PORT}:{uds}"])
        accept.join(30)
        assert [a["accepted"] for a in accepted] == [1]
        conn = guest.accepted[0]
        # C, Python, C, Python, ...: each takes over the buffers the other left in flight,
        # until every buffer was reused (runs are short and timed, so how many it takes
        # depends on the machine's load; the deadline only bounds a stuck stream)
        runs = []
        engines = itertools.cycle((("c", 0.003), ("py", 0.01)))
        deadline = time.monotonic() + 60
        while len(runs) < 4 or (conn.tx_bytes // MAX_PKT <= 10 * guest.tx_buffers.count
                                and time.monotonic() < deadline):
            engine, seconds = next(engines)
            runs.append(guest.run_c(seconds) if engine == "c" else guest.run_py(seconds))
            assert all(b is None or 0 <= b < guest.tx_buffers.count
                       for b in guest.tx_buffers.held)
        sent = conn.tx_bytes
        assert sum(r["bytes"] for r in runs) == sent
        assert sent // MAX_PKT > 10 * guest.tx_buffers.count  # each buffer reused
        deadline = time.monotonic() + 10
        while guest.txq.outstanding and time.monotonic() < deadline:
            guest._tx_free()  # the back-end forwards what was posted, then returns it
            time.sleep(0.01)
        assert sorted(guest.tx_buffers.free) == list(range(guest.tx_buffers.count))
        time.sleep(0.2)  # the back-end's socket writes reach the sink
        result = _sink_result(peer)
        peer = None
        assert result.get("mismatch") is None, result
        assert sum(result["bytes"]) == sent
    finally:
        if peer is not None:
            peer.close()
        if guest is not None:
            guest.close()
        backend.close()
