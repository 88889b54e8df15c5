"""The event loop: readers, writers, edge-triggered writers, timers, failure isolation,
interest()."""

import os
import selectors
import socket

from virtio.loop import EventLoop


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reader_called_when_data_arrives_and_removed_reader_is_silent():
    loop = EventLoop()
    a, b = socket.socketpair()
    seen = []
    loop.add_reader(a.fileno(), lambda: seen.append(a.recv(10)))
    b.send(b"hi")
    loop.run_once(1.0)
    assert seen == [b"hi"]
    loop.remove_reader(a.fileno())
    b.send(b"again")
    loop.run_once(0.01)
    assert seen == [b"hi"]
    assert a.fileno() not in loop.interest()
    loop.close()


def test_reader_and_writer_on_same_fd_share_one_registration():
    loop = EventLoop()
    a, _b = socket.socketpair()
    loop.add_reader(a.fileno(), lambda: None)
    loop.add_writer(a.fileno(), lambda: None)
    assert loop.interest()[a.fileno()] == selectors.EVENT_READ | selectors.EVENT_WRITE
    loop.remove_writer(a.fileno())
    assert loop.interest()[a.fileno()] == selectors.EVENT_READ
    loop.close()


def test_timers_fire_in_deadline_order_and_cancel_works():
    clock = FakeClock()
    loop = EventLoop(clock)
    fired = []
    loop.call_later(2.0, lambda: fired.append("late"))
    early = loop.call_later(1.0, lambda: fired.append("early"))
    loop.call_later(1.5, lambda: fired.append("middle"))
    early.cancel()
    clock.now += 3.0
    loop.run_once(0)
    assert fired == ["middle", "late"]
    assert loop.next_deadline() is None
    loop.close()


def test_failing_callback_is_logged_and_loop_keeps_serving(caplog):
    loop = EventLoop()

    def boom():
        raise RuntimeError("peer did something odd")

    results = []
    loop.call_soon(boom)
    loop.call_soon(lambda: results.append("still alive"))
    loop.run_once(0)
    assert results == ["still alive"]
    assert "peer did something odd" in caplog.text
    loop.close()


def test_stop_from_another_callback_ends_run():
    loop = EventLoop()
    loop.call_later(0.01, loop.stop)
    loop.run()  # returns instead of hanging
    loop.close()


def test_stop_before_run_ends_the_next_run_only():
    """A stop requested before run (a SIGTERM while the daemon starts) is not lost; it ends
    that one run, and a later run serves again until its own stop."""
    loop = EventLoop()
    ran = []
    loop.stop()
    loop.call_soon(lambda: ran.append("first"))
    loop.run()  # returns instead of hanging (at most one iteration)
    loop.call_later(0.01, lambda: (ran.append("second"), loop.stop()))
    loop.run()
    assert ran[-1] == "second"
    loop.close()


def test_interest_excludes_internal_wakeup_pipe():
    loop = EventLoop()
    assert loop.interest() == {}
    r, w = os.pipe()
    loop.add_reader(r, lambda: None)
    assert loop.interest() == {r: selectors.EVENT_READ}
    loop.close()
    os.close(r)
    os.close(w)


def test_a_failing_reader_does_not_starve_the_other_ready_fds(caplog):
    loop = EventLoop()
    pairs = [socket.socketpair() for _ in range(3)]
    seen = []

    def failing():
        pairs[0][0].recv(10)
        raise RuntimeError("first reader broke")

    loop.add_reader(pairs[0][0].fileno(), failing)
    for a, _ in pairs[1:]:
        loop.add_reader(a.fileno(), lambda a=a: seen.append(a.recv(10)))
    for _, b in pairs:
        b.send(b"x")
    loop.run_once(1.0)
    assert seen == [b"x", b"x"]
    assert "first reader broke" in caplog.text
    loop.close()


def test_peer_hang_up_reaches_reader_and_writer():
    loop = EventLoop()
    a, b = socket.socketpair()
    seen = []
    loop.add_reader(a.fileno(), lambda: seen.append(("r", a.recv(10))))
    b.close()
    loop.run_once(1.0)
    assert seen == [("r", b"")]
    loop.remove_reader(a.fileno())
    loop.add_writer(a.fileno(), lambda: seen.append("w"))
    loop.run_once(1.0)
    assert seen[-1] == "w"
    loop.close()


def test_call_soon_from_another_thread_wakes_a_waiting_loop():
    import threading
    import time

    loop = EventLoop()
    done = []
    started = time.monotonic()
    t = threading.Timer(0.05, lambda: loop.call_soon(lambda: done.append(True)))
    t.start()
    loop.run_once(5.0)  # woken by the other thread's call_soon
    if not done:
        loop.run_once(0)
    t.join()
    assert done == [True]
    assert time.monotonic() - started < 2.0
    loop.close()


def test_call_soon_inside_a_callback_runs_without_waiting():
    import time

    loop = EventLoop()
    order = []
    loop.call_soon(lambda: loop.call_soon(lambda: order.append("second")) or
                   order.append("first"))
    loop.run_once(0)
    started = time.monotonic()
    loop.run_once(5.0)  # a soon-callback is queued: no wait
    assert order == ["first", "second"]
    assert time.monotonic() - started < 1.0
    loop.close()


# -- edge-triggered writers (add_edge_writer: EPOLLOUT | EPOLLET on a private duplicate) ------
class EdgePair:
    """A non-blocking socketpair with a small send buffer, an edge writer on ``a`` that
    counts its wake-ups, and helpers to fill ``a`` and drain it from ``b``."""

    def __init__(self) -> None:
        self.loop = EventLoop()
        self.a, self.b = socket.socketpair()
        self.a.setblocking(False)
        self.b.setblocking(False)
        self.a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.fired = 0
        self.loop.add_edge_writer(self.a.fileno(), self._fire)

    def _fire(self) -> None:
        self.fired += 1

    def turn(self, timeout_s: float = 0.05) -> int:
        """One run_once; how many times the writer fired in it."""
        before = self.fired
        self.loop.run_once(timeout_s)
        return self.fired - before

    def fill(self) -> int:
        sent = 0
        while True:
            try:
                sent += self.a.send(bytes(1024))
            except BlockingIOError:
                return sent

    def drain(self) -> int:
        got = 0
        while True:
            try:
                chunk = self.b.recv(1 << 16)
            except BlockingIOError:
                return got
            got += len(chunk)
            if not chunk:
                return got

    def close(self) -> None:
        self.loop.close()
        self.a.close()
        self.b.close()


def test_edge_writer_fires_once_while_the_socket_stays_writable():
    p = EdgePair()
    try:
        assert p.loop.edge_writers() == {p.a.fileno()}
        assert p.turn(1.0) == 1  # writable when added: one edge
        assert p.turn() == 0 and p.turn() == 0  # still writable, no new edge
        p.a.send(b"x")  # room left: a write that does not fill the buffer is no edge
        assert p.turn() == 0
    finally:
        p.close()


def test_edge_writer_fires_again_when_the_peer_frees_a_full_buffer():
    p = EdgePair()
    try:
        p.turn(1.0)
        assert p.fill() > 0
        assert p.turn() == 0  # full: not writable
        assert p.drain() > 0
        assert p.turn(1.0) == 1  # the peer's read made room: one edge
        assert p.turn() == 0
        p.fill()
        p.drain()
        assert p.turn(1.0) == 1  # and again for the next cycle
    finally:
        p.close()


def test_edge_writer_shares_the_fd_with_a_level_triggered_reader():
    """The edge watch is on a duplicate: a reader on the same fd keeps working."""
    p = EdgePair()
    try:
        got = []
        p.loop.add_reader(p.a.fileno(), lambda: got.append(p.a.recv(10)))
        p.b.send(b"hi")
        p.turn(1.0)
        assert got == [b"hi"]
        assert p.loop.interest()[p.a.fileno()] == selectors.EVENT_READ
    finally:
        p.close()


def test_adding_an_edge_writer_again_replaces_its_callback():
    p = EdgePair()
    try:
        fds = len(os.listdir("/proc/self/fd"))
        other = []
        p.loop.add_edge_writer(p.a.fileno(), lambda: other.append(1))
        assert len(os.listdir("/proc/self/fd")) == fds  # no second duplicate
        p.turn(1.0)
        assert (p.fired, other) == (0, [1])
    finally:
        p.close()


def test_edge_writer_wakes_on_peer_hang_up():
    p = EdgePair()
    try:
        p.turn(1.0)
        p.fill()
        p.b.close()
        assert p.turn(1.0) == 1
    finally:
        p.loop.close()
        p.a.close()


def _peer_sees_eof(peer: socket.socket, timeout_s: float = 1.0) -> bool:
    peer.settimeout(timeout_s)
    try:
        return peer.recv(10) == b""
    except (TimeoutError, socket.timeout):
        return False


def test_remove_edge_writer_closes_the_duplicate():
    p = EdgePair()
    try:
        p.loop.remove_edge_writer(p.a.fileno())
        assert p.loop.edge_writers() == set()
        p.loop.remove_edge_writer(p.a.fileno())  # twice is fine
        p.a.close()  # the last reference: the peer sees EOF
        assert _peer_sees_eof(p.b)
        assert p.turn() == 0
    finally:
        p.loop.close()
        p.b.close()


def test_without_remove_the_duplicate_keeps_the_socket_open():
    """(What remove_edge_writer is for: the duplicate is a reference to the socket.)"""
    p = EdgePair()
    try:
        p.a.close()
        assert not _peer_sees_eof(p.b, 0.1)
    finally:
        p.loop.close()  # closes the duplicate: now the peer sees EOF
        assert _peer_sees_eof(p.b)
        p.b.close()


def test_loop_close_removes_the_edge_writers():
    p = EdgePair()
    fds = len(os.listdir("/proc/self/fd"))
    p.loop.close()
    assert p.loop.edge_writers() == set()
    assert len(os.listdir("/proc/self/fd")) < fds  # the duplicate (and the loop's own fds)
    p.a.close()
    assert _peer_sees_eof(p.b)
    p.b.close()


def test_run_serves_readers_writers_timers_and_soon_callbacks_in_one_pass_each():
    """``run`` inlines ``run_once``: a turn dispatches the ready fds (the reader, then the
    writer of an fd ready both ways, the writer skipped once the reader removed it), then
    the due timers, then the soon-callbacks those queued; a cancelled timer never runs and
    a later timer still wakes the loop."""
    loop = EventLoop()
    a, b = socket.socketpair()
    order: list[str] = []

    def reader() -> None:
        order.append("read")
        a.recv(16)
        loop.remove_writer(a.fileno())

    loop.add_reader(a.fileno(), reader)
    loop.add_writer(a.fileno(), lambda: order.append("write (must not run)"))
    b.send(b"x")
    loop.call_later(0.0, lambda: (order.append("timer"),
                                  loop.call_soon(lambda: order.append("soon"))))
    loop.call_later(0.0, lambda: order.append("cancelled (must not run)")).cancel()
    loop.call_later(0.02, loop.stop)
    loop.run()
    assert order == ["read", "timer", "soon"]
    loop.remove_reader(a.fileno())
    a.close()
    b.close()
    loop.close()


# -- a nested wait (virtio/vsock/stream_loop.py) ---------------------------------------------
def test_the_loops_epoll_fd_is_readable_exactly_when_a_watched_fd_is_ready():
    import select

    loop = EventLoop()
    a, b = socket.socketpair()
    try:
        loop.add_reader(a.fileno(), lambda: None)
        outer = select.epoll()
        outer.register(loop.fileno(), select.EPOLLIN)
        assert outer.poll(0) == []
        b.send(b"x")
        assert outer.poll(0) == [(loop.fileno(), select.EPOLLIN)]
        outer.close()
    finally:
        a.close()
        b.close()
        loop.close()


def test_take_reader_hands_back_the_callback_and_stops_the_watch():
    loop = EventLoop()
    a, b = socket.socketpair()
    calls = []
    try:
        callback = lambda: calls.append(a.recv(10))  # noqa: E731
        loop.add_reader(a.fileno(), callback)
        assert loop.take_reader(a.fileno()) is callback
        assert loop.take_reader(a.fileno()) is None  # nothing left to take
        b.send(b"x")
        loop.run_once(0.05)
        assert calls == []  # not watched while taken
        loop.add_reader(a.fileno(), callback)
        loop.run_once(1.0)
        assert calls == [b"x"]
    finally:
        a.close()
        b.close()
        loop.close()


def test_wait_budget_is_bounded_by_timers_the_turn_and_pending_work():
    now = [100.0]
    loop = EventLoop(clock=lambda: now[0])
    budgets = []
    try:
        a, b = socket.socketpair()
        loop.add_reader(a.fileno(), lambda: (a.recv(10), budgets.append(loop.wait_budget())))
        b.send(b"x")
        loop.run_once(None)  # run(): no end of its own, no timer
        assert budgets[-1] == -1.0
        loop.call_later(2.5, lambda: None)
        b.send(b"x")
        loop.run_once(None)
        assert budgets[-1] == 2.5  # until the timer
        b.send(b"x")
        loop.run_once(0.25)
        assert budgets[-1] == 0.25  # the caller wants the turn back first
        loop.call_soon(lambda: None)
        assert loop.wait_budget() is None  # work now: no nested wait at all
        a.close()
        b.close()
    finally:
        loop.close()
