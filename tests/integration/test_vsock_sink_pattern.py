"""The bench's host sink (bench/limits/peer.c) checks a vsock guest->host stream against
the stream pattern the guest writes (bench/limits/vsock_guest.c, bench/vsock_guest.py), so a
back-end path that loses, reorders or invents bytes fails the bench instead of looking fast:
every byte of the first ``FULL_CHECK_BYTES``, then ``SAMPLE_BYTES`` at every
``SAMPLE_STRIDE``-aligned offset and at the end of each read. A fake hybrid-vsock endpoint
answers the sink's CONNECT and sends it a stream: right, with one byte changed, with two
chunks swapped, with bytes lost, before and after the fully checked start.

Spec: virtio 1.2 §5.10.6.4 (stream data arrives in order, without loss).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading

import pytest

from bench.limits.build import helper_path
from bench.vsock_guest import _stream_ref

TOTAL = 3 * 65536 + 5000
#: bench/limits/peer.c's FULL_CHECK_BYTES, SAMPLE_STRIDE and SAMPLE_BYTES.
FULL_CHECK_BYTES, SAMPLE_STRIDE, SAMPLE_BYTES = 32 << 20, 512, 8


def _sink(tmp_path, stream: bytes, pieces: int = 7) -> tuple[int, dict]:
    path = str(tmp_path / "vsock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            line = b""
            while not line.endswith(b"\n"):
                line += conn.recv(1)
            assert line == b"CONNECT 1234\n"
            conn.sendall(b"OK 1234\n")
            step = -(-len(stream) // pieces)
            for off in range(0, len(stream), step):
                conn.sendall(stream[off:off + step])

    server = threading.Thread(target=serve)
    server.start()
    try:
        proc = subprocess.run([str(helper_path("peer")), "sink", "65536", "-1",
                               f"vsock:1234:{path}"], capture_output=True, text=True,
                              timeout=30)
    finally:
        server.join(timeout=30)
        listener.close()
    result = json.loads(proc.stdout.splitlines()[-1])
    return proc.returncode, result


def test_sink_accepts_the_pattern_and_counts_it(tmp_path):
    rc, result = _sink(tmp_path, _stream_ref(TOTAL))
    assert (rc, result) == (0, {"bytes": [TOTAL]})


@pytest.mark.parametrize("damage", ["changed", "swapped", "lost"])
def test_sink_reports_the_first_wrong_byte(tmp_path, damage):
    ref = bytearray(_stream_ref(TOTAL))
    if damage == "changed":
        ref[70000] ^= 1
        first = 70000
    elif damage == "swapped":  # two 4 KiB chunks change places
        a, b = bytes(ref[65536:69632]), bytes(ref[69632:73728])
        ref[65536:73728] = b + a
        first = 65536
    else:  # 100 bytes missing
        del ref[100000:100100]
        first = 100000
    rc, result = _sink(tmp_path, bytes(ref))
    assert rc == 4
    assert result["bytes"] == [len(ref)] and result["mismatch"][0] == 0
    assert first <= result["mismatch"][1] < first + 8


SAMPLED_TOTAL = FULL_CHECK_BYTES + 3 * 65536 + 5000


def test_sink_accepts_the_pattern_past_the_fully_checked_start(tmp_path):
    rc, result = _sink(tmp_path, _stream_ref(SAMPLED_TOTAL), pieces=97)
    assert (rc, result) == (0, {"bytes": [SAMPLED_TOTAL]})


@pytest.mark.parametrize("damage", ["changed at a sample", "swapped", "lost", "repeated"])
def test_sink_samples_catch_damage_past_the_fully_checked_start(tmp_path, damage):
    ref = bytearray(_stream_ref(SAMPLED_TOTAL))
    at = FULL_CHECK_BYTES + 70000
    if damage == "changed at a sample":
        at -= at % SAMPLE_STRIDE
        ref[at] ^= 1
    elif damage == "swapped":  # two 4 KiB chunks change places
        a, b = bytes(ref[at:at + 4096]), bytes(ref[at + 4096:at + 8192])
        ref[at:at + 8192] = b + a
    elif damage == "lost":  # 100 bytes missing
        del ref[at:at + 100]
    else:  # a 4 KiB run delivered twice (a stale buffer)
        ref[at:at] = ref[at - 4096:at]
    rc, result = _sink(tmp_path, bytes(ref), pieces=97)
    assert rc == 4
    assert result["bytes"] == [len(ref)] and result["mismatch"][0] == 0
    assert at <= result["mismatch"][1] < at + SAMPLE_STRIDE + SAMPLE_BYTES
