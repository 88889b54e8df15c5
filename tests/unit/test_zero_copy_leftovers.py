"""Zero-copy transmit: what the pump's pipe still holds when the socket filled reaches the
peer on the next pump call even when the guest posts no further chain, and those chains then
come back (a guest that writes one burst and waits for its buffers must not stall).

Found by the zero-copy tests: tx_to_fd first moved the pipe's leftovers only inside a round
that had gathered a chain, so after a burst that filled the socket nothing more was sent and
the chains waited for ever.

Spec: virtio 1.2 §2.7.8 (the device returns a buffer once it is done with it), §5.3.6.
"""

from __future__ import annotations

from ring.pump import PumpFlag
from tests.unit.test_zero_copy_pump import ZcPort


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
