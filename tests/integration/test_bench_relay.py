"""The bench's ideal host->guest relay (bench/limits/relay.c): the machine's ceiling for a
three-process path into 4 KiB guest buffers, reported beside the vsock host->guest row. It
must move real, checked bytes and keep the credit rules the real path keeps, or the ceiling
it reports is not one: the relay never reads beyond the reader's window, and the reader
sends a credit update only once the relay's view of its free space fell under 64 KiB.

Spec: virtio 1.2 §5.10.6.3 (the sender never exceeds the receiver's buf_alloc - (tx_cnt -
fwd_cnt); CREDIT_UPDATE tells the sender about freed space).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from bench.limits.build import helper_path

KIB = 1024
UPDATE_BELOW = 64 * KIB  # Linux: VIRTIO_VSOCK_MAX_PKT_BUF_SIZE


def _relay(chunk: int, seconds: float, window: int) -> dict:
    out = subprocess.run([str(helper_path("relay")), str(chunk), str(seconds), str(window),
                          "-1", "-1", "-1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("window", [256 * KIB, 96 * KIB])
def test_the_relay_moves_checked_bytes_within_the_readers_credit(window: int) -> None:
    r = _relay(64 * KIB, 0.2, window)
    assert r["bytes"] > 4 * window
    assert r["bytes_per_s"] == pytest.approx(r["bytes"] / r["seconds"], rel=1e-3)
    # Never more than one window beyond the last credit update the reader sent...
    assert r["bytes"] <= (r["windows"] + 1) * window
    # ...and an update only once more than window - 64 KiB was consumed since the last one.
    assert r["windows"] * (window - UPDATE_BELOW) <= r["bytes"]


def test_the_relay_moves_every_byte_the_writer_wrote() -> None:
    """The writer writes whole 16-chunk rounds; the reader, which checks every byte against
    the writer's 0x5a, gets exactly that many bytes (nothing lost or invented at EOF)."""
    chunk = 12 * KIB + 4  # not a multiple of the 4 KiB buffers: packets end mid-buffer
    r = _relay(chunk, 0.05, 256 * KIB)
    assert r["bytes"] % (16 * chunk) == 0
    assert r["bytes"] > 0


def test_the_relay_refuses_a_window_under_one_update_threshold() -> None:
    out = subprocess.run([str(helper_path("relay")), "65536", "0.1", str(32 * KIB), "-1",
                          "-1", "-1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "WINDOW" in out.stderr
