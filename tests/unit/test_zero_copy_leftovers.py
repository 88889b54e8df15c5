"""Zero-copy transmit: what the pump's pipe still holds when the socket filled reaches the
peer on the next pump call even when the guest posts no further chain, and those chains then
come back (a guest that writes one burst and waits for its buffers must not stall); and a
transmitq detached while the peer stays (a ring stop) keeps the pipe's bytes and writes them
first when it comes back, instead of leaving a hole in the stream.

Also: a chain whose last bytes are copied after its first went by reference still waits for
all of them (checked to fail without that rule in tx_to_fd).

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


def test_a_chain_finished_by_a_copy_still_waits_for_its_bytes_sent_by_reference():
    """A chain larger than the pipe goes partly by reference (the pipe fills: the chain stays
    pending); its last 1000 bytes are then copied (a round under the zero-copy threshold).
    It must still come back only once the peer has read all of it."""
    import fcntl

    p = ZcPort(sndbuf=4096)
    try:
        pipe_bytes = fcntl.fcntl(p.pump._zc.pipe_w, fcntl.F_GETPIPE_SZ)
        data = pattern(pipe_bytes + 1000, 5)
        head = p.post(data)
        got = b""
        for _ in range(2000):
            p.pump.pump_tx()
            back = p.reclaim()
            if back:
                assert back == [head] and got == data  # not before every byte was read
                break
            got += p.host_read()
        else:
            raise AssertionError("the chain never came back")
        assert pipe_bytes // 2 < p.pump.bytes_by_reference < len(data)  # part by reference, the rest copied
    finally:
        p.close()
