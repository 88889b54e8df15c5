"""A console port's rings stopped and started again (vhost-user GET_VRING_BASE, then the
rings set up again: QEMU's ``stop``/``cont``, a migration, a front-end reconnect) lose
nothing: the same kick eventfds may come back, and a transmit chain that was partly written
to a full host socket at the stop is neither lost nor repeated.

Found while testing zero copy (both fail with it off too): the session closed the kick fd
before the connection stopped watching it, so epoll kept the registration (the front-end
still holds the eventfd) and refused the same eventfd for the restarted ring (EEXIST: the
back-end dropped the front-end); and GET_VRING_BASE counted the partly written chain as
consumed, so its unwritten rest never reached the peer and the chain never came back.

Spec: vhost-user VHOST_USER_GET_VRING_BASE, "Ring states"; virtio 1.2 §2.7.8, §5.3.6.
"""

from __future__ import annotations

from tests.unit.test_zero_copy_pump import pattern


def test_a_ring_restarted_with_the_same_eventfds_keeps_the_connection(tmp_path):
    """The front-end stops every ring and starts them again with the same kick and call
    eventfds (as QEMU's vhost_dev_stop/vhost_dev_start may): the back-end keeps the
    connection and the port carries on. (It used to stop watching the old kick fd only
    after closing it, so epoll kept the registration and refused the same eventfd: EEXIST,
    and the back-end dropped the front-end.)

    Spec: vhost-user VHOST_USER_GET_VRING_BASE, "Ring states"; virtio 1.2 §5.3.6."""
    from tests.integration.test_console_zero_copy import PORT, ZcConsole

    c = ZcConsole(tmp_path, zero_copy=False)
    try:
        first = pattern(64 << 10, 1)
        c.guest.write(PORT, first)
        assert c.read_all(len(first)) == first
        g = c.guest
        g.fe.stop()  # GET_VRING_BASE on every ring
        g.fe.start(g.ram, list(g.queues.values()), features=g.features)  # same eventfds
        second = pattern(64 << 10, 2)
        c.guest.write(PORT, second)
        assert c.read_all(len(second), timeout_s=5) == second
    finally:
        c.close()


def _restart_with_new_eventfds(guest) -> None:
    """vhost_dev_stop, then vhost_dev_start with new kick and call eventfds."""
    import os
    import select

    guest.fe.stop()
    for q in guest.queues.values():
        guest._poll.unregister(q.call_fd)
        q.close()
        q.kick_fd = q.call_fd = -1
    guest.fe.start(guest.ram, list(guest.queues.values()), features=guest.features)
    guest._call_fd_queue = {}
    for q in guest.queues.values():
        guest._poll.register(q.call_fd, select.EPOLLIN)
        guest._call_fd_queue[q.call_fd] = q.index
    os.write(guest.queues[max(guest.queues)].kick_fd, (1).to_bytes(8, "little"))


def test_a_ring_stop_with_a_partly_written_chain_loses_nothing(tmp_path):
    """The console transmitq stops (GET_VRING_BASE) while a chain is partly written to a
    full host socket, then the rings start again with new eventfds: the peer gets every
    byte once, in order, and the guest every buffer back (zero copy off: the copy path).
    (GET_VRING_BASE used to count that chain consumed and drop it with the queue: the peer
    missed the 6336 bytes left of chunk 71 and the chain never came back.)

    Spec: virtio 1.2 §2.7.8 (every available buffer is eventually used), §5.3.6; vhost-user
    VHOST_USER_GET_VRING_BASE."""
    import time

    from tests.integration.test_console_zero_copy import PORT, ZcConsole

    c = ZcConsole(tmp_path, zero_copy=False)
    try:
        data = pattern(4 << 20, 1)
        c.guest.write(PORT, data)
        got = bytearray(c.read_all(256 << 10, piece=64 << 10))
        c.guest.run_for(0.2)
        assert c.be.call(lambda: c.be.console._handles[c.txq].vq.pending) is not None
        _restart_with_new_eventfds(c.guest)
        deadline = time.monotonic() + 10
        while (len(got) < len(data) or c.outstanding()) and time.monotonic() < deadline:
            got += c.read(1 << 20)
            c.guest.pump(0.001)
        assert bytes(got) == data
        assert c.outstanding() == 0
    finally:
        c.close()
