"""Zero-copy transmit: what the pump's pipe still holds when the socket filled reaches the
peer on the next pump call even when the guest posts no further chain, and those chains then
come back (a guest that writes one burst and waits for its buffers must not stall); and a
transmitq detached while the peer stays (a ring stop) keeps the pipe's bytes and writes them
first when it comes back, instead of leaving a hole in the stream.

Found by the zero-copy tests: tx_to_fd first moved the pipe's leftovers only inside a round
that had gathered a chain, so after a burst that filled the socket nothing more was sent and
the chains waited for ever; and release_deferred dropped the pipe's bytes at a ring stop
(the peer got 81008 of 216608 bytes).

Spec: virtio 1.2 §2.7.8 (the device returns a buffer once it is done with it), §5.3.6.
"""

from __future__ import annotations

from ring.pump import PumpFlag
from tests.unit.test_zero_copy_pump import ZcPort, pattern


def test_pipe_leftovers_reach_the_peer_without_a_further_chain():
    p = ZcPort(sndbuf=4096)
    try:
        data = p.fill_socket()  # 4 chains, 192 KiB: more than the socket takes at once
        assert p.pump.pump_tx() & PumpFlag.TX_DEFERRED
        got = b""
        for _ in range(50):  # the peer reads all it can, the socket turns writable, pump
            got += p.host_read()
            p.pump.pump_tx()
        got += p.host_read()
        assert len(got) == len(data) and got == data
        assert p.pump.deferred == 0 and sorted(p.reclaim()) == [0, 1, 2, 3]
        assert not p.pump.pump_tx() & PumpFlag.TX_DEFERRED
    finally:
        p.close()


def test_a_queue_stop_and_restart_loses_no_byte_to_a_connected_peer():
    p = ZcPort(sndbuf=4096)
    try:
        data = p.fill_socket()  # 192 KiB by reference; the socket takes ~60 KiB at once
        assert p.pump.pump_tx() & PumpFlag.TX_DEFERRED
        got = p.host_read()
        p.pump.tx = None  # the transmitq stops (GET_VRING_BASE)
        assert sorted(p.reclaim()) == [0, 1, 2, 3]
        p.pump.tx = p.tx  # and starts again; the host peer never left
        more = pattern(20000, 7)
        p.post(more)
        for _ in range(50):
            p.pump.pump_tx()
            got += p.host_read()
        assert len(got) == len(data) + len(more)
        assert got == data + more
    finally:
        p.close()
