"""Zero-copy transmit keeps completions in order: a small chain that is copied (and could
go back at once) while a larger chain before it waits for the host peer's read goes back
only after that one. The bench's guest model re-posts "the oldest N chains" when N come
back, as a driver may when the device completes in order (QEMU's virtio-serial does); an
early small completion would make it re-post a buffer the socket still refers to.

Spec: virtio 1.2 §2.7.8 (the used ring), §2.7.9 (in-order use of descriptors, what
VIRTIO_F_IN_ORDER promises), §5.3.6.
"""

from __future__ import annotations

from ring.pump import PumpFlag
from tests.unit.test_zero_copy_pump import BIG, ZcPort, pattern


def test_a_copied_chain_behind_a_waiting_one_comes_back_after_it():
    p = ZcPort()
    try:
        big, small = pattern(BIG, 1), pattern(64, 2)
        first = p.post(big)
        assert p.pump.pump_tx() & PumpFlag.TX_DEFERRED  # by reference: waits for the read
        second = p.post(small)
        assert p.pump.pump_tx() & PumpFlag.TX_DEFERRED  # copied, yet behind the first
        assert p.pump.deferred == 2 and p.reclaim() == []
        assert p.host_read(BIG - 1) == big[:-1]  # the first chain not wholly read yet
        p.pump.pump_tx()
        assert p.reclaim() == []
        assert p.host_read() == big[-1:] + small
        assert not p.pump.pump_tx() & PumpFlag.TX_DEFERRED
        assert p.reclaim() == [first, second]
    finally:
        p.close()


def test_copied_chains_with_nothing_waiting_come_back_at_once():
    p = ZcPort()
    try:
        heads = [p.post(pattern(64, k)) for k in range(3)]
        assert not p.pump.pump_tx() & PumpFlag.TX_DEFERRED
        assert p.reclaim() == heads and p.pump.bytes_by_reference == 0
    finally:
        p.close()
