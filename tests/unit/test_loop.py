"""The event loop: readers, writers, timers, failure isolation, interest()."""

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
