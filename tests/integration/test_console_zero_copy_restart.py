"""Zero-copy transmit across a ring stop and restart through the vhost-user front-end (the
daemon in a thread, the project's front-end and Linux-like guest): QEMU's ``stop``/``cont``
is SET_VRING_ENABLE 0 and GET_VRING_BASE on every ring, then SET_VRING_NUM/BASE/ADDR/KICK/
CALL again with the bases it got.

A slow host peer that has not read what the socket refers to by page reference when the
rings stop must still read the guest's stream exactly, although the guest reuses every
transmit buffer it gets back (here: overwrites it the moment it is freed). The stop used to
return every waiting chain, so the guest refilled those pages after the restart and the peer
read the new bytes in place of the old ones.

With the Python rings (VMCHANNEL_RING=py: no zero copy) the same test checks that the copy
path gives the same outcome.

Spec: vhost-user VHOST_USER_GET_VRING_BASE, VHOST_USER_SET_VRING_BASE, "Ring states";
virtio 1.2 §2.7.8 (a buffer is used once the device is done with it), §5.3.6.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from tests.integration.test_console_ring_restart import _restart_with_new_eventfds
from tests.integration.test_console_zero_copy import PORT, ZcConsole

pytestmark = pytest.mark.timeout(120)

SCRIBBLE = b"\xee"


def _scribble_on_free(c: ZcConsole) -> list[int]:
    """Make the guest overwrite each transmit buffer the moment it frees it (it gets the
    chain back); returns the list the freed gpas are appended to."""
    driver = c.guest.drivers[c.txq]
    alloc, memory = driver.alloc, c.guest.ram.memory
    free, freed = alloc.free, []

    def scribbling_free(gpa: int) -> None:
        lo, size = alloc._sizes[gpa]
        memory.write(gpa, SCRIBBLE * (lo + size - gpa))
        freed.append(gpa)
        free(gpa)

    alloc.free = scribbling_free
    return freed


@pytest.mark.parametrize("restarts", [1, 2])
def test_a_ring_stop_while_the_peer_lags_keeps_the_stream_exact(tmp_path, restarts):
    c = ZcConsole(tmp_path)
    try:
        freed = _scribble_on_free(c)
        # 384 writes of 32 KiB: more than the ring holds. Not test_console_zero_copy's
        # pattern: it repeats every 64 KiB, so a buffer reused for the chunk 8 MiB later
        # holds the same bytes and the damage would not show.
        data = hashlib.shake_256(b"zero-copy restart").digest(12 << 20)
        c.guest.write(PORT, data)
        got = bytearray(c.read_all(256 << 10, piece=64 << 10))
        for _ in range(restarts):
            c.guest.run_for(0.2)  # the device fills the socket and the pipe, then waits
            kept = c.pump_attr("deferred") if c.c_pump else 0
            if c.c_pump:
                assert kept > 0 and c.pump_attr("bytes_by_reference") > 0
            _restart_with_new_eventfds(c.guest)  # the peer has not read on meanwhile
            # The guest reclaims what came back at once and writes on into those buffers
            # (Linux reclaims its transmit buffers on its next write, interrupt or not).
            c.guest._on_port_tx(c.port_id)
            if c.c_pump:
                assert c.pump_attr("deferred") >= 1  # the ring went on with them
        deadline = time.monotonic() + 60
        while (len(got) < len(data) or c.outstanding()) and time.monotonic() < deadline:
            got += c.read(64 << 10)
            c.guest.pump(0.0005)
        assert len(got) == len(data)
        assert bytes(got) == data, f"first difference at {_first_difference(got, data)}"
        assert c.outstanding() == 0 and freed  # every buffer back, each reused
        if c.c_pump:
            assert c.pump_attr("deferred") == 0
    finally:
        c.close()


def _first_difference(a: bytes | bytearray, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
