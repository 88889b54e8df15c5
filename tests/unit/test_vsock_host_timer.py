"""VsockHost keeps one loop timer per connection while it fires no later than the
connection's deadline (a deadline of virtio 1.2 §5.10.6.3's CREDIT_REQUEST delay that moves
later is served by the timer already armed); a deadline gone cancels it, so an idle
connection costs no wake-up."""

from __future__ import annotations

from virtio.vsock.conn import ConnKey, SetTimer
from virtio.vsock.errors import UnknownConnectionError
from virtio.vsock.host import VsockHost


class FakeTimer:
    def __init__(self, at: float, callback) -> None:
        self.at, self.callback, self.cancelled = at, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """A clock set by the test and the timers armed on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback) -> FakeTimer:
        timer = FakeTimer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def live(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled]

    def fire(self, timer: FakeTimer) -> None:
        """Run ``timer`` at its time (as the loop does)."""
        assert not timer.cancelled
        self.now = max(self.now, timer.at)
        timer.cancelled = True  # done: no longer pending
        timer.callback()


class FakeConn:
    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline


class FakeMuxer:
    """Connections by key and the ``timer_fired`` calls it received."""

    def __init__(self) -> None:
        self.conns: dict[ConnKey, FakeConn] = {}
        self.fired: list[tuple[ConnKey, float]] = []

    def connection(self, key: ConnKey) -> FakeConn:
        try:
            return self.conns[key]
        except KeyError:
            raise UnknownConnectionError(key) from None

    def timer_fired(self, key: ConnKey, now: float) -> list:
        self.fired.append((key, now))
        return []


KEY = ConnKey(3, 1024, 5000)


def make() -> tuple[FakeLoop, FakeMuxer, VsockHost]:
    loop, mux = FakeLoop(), FakeMuxer()
    return loop, mux, VsockHost(loop, mux, on_rx_ready=lambda cid: None)


def set_deadline(host: VsockHost, mux: FakeMuxer, deadline: float | None) -> None:
    mux.conns[KEY].deadline = deadline
    host.run([SetTimer(KEY, deadline)])


def test_a_later_deadline_keeps_the_timer_and_it_re_arms_when_it_fires_early():
    """virtio 1.2 §5.10.6.3: a deadline that moves later is served by the timer already
    armed, and the muxer hears of the deadline only once it is due."""
    loop, mux, host = make()
    mux.conns[KEY] = FakeConn(None)
    set_deadline(host, mux, 100.01)
    [first] = loop.live()
    for _ in range(5):
        loop.now += 0.001
        set_deadline(host, mux, loop.now + 0.01)
    assert loop.live() == [first]  # no cancel, no new timer
    loop.fire(first)
    assert mux.fired == []  # early: the deadline is later now
    [second] = loop.live()
    assert second.at >= mux.conns[KEY].deadline
    loop.fire(second)
    assert mux.fired == [(KEY, loop.now)] and loop.now >= mux.conns[KEY].deadline
    assert loop.live() == []


def test_an_earlier_deadline_replaces_the_timer():
    """virtio 1.2 §5.10.6.3: a deadline that comes sooner is served on time."""
    loop, mux, host = make()
    mux.conns[KEY] = FakeConn(None)
    set_deadline(host, mux, 105.0)
    [late] = loop.live()
    set_deadline(host, mux, 101.0)
    [soon] = loop.live()
    assert late.cancelled and soon is not late and 101.0 <= soon.at < 101.001
    loop.fire(soon)
    assert mux.fired == [(KEY, loop.now)]


def test_a_dropped_deadline_and_a_gone_connection_cancel():
    """virtio 1.2 §5.10.6.3: the guest's credit came first (deadline None): the timer is
    cancelled, so an idle connection wakes nobody; a closed connection's timer too."""
    loop, mux, host = make()
    mux.conns[KEY] = FakeConn(None)
    set_deadline(host, mux, 100.5)
    [timer] = loop.live()
    set_deadline(host, mux, None)
    assert timer.cancelled and loop.live() == [] and mux.fired == []

    set_deadline(host, mux, 101.0)
    [timer] = loop.live()
    del mux.conns[KEY]
    host.run([SetTimer(KEY, None)])
    assert timer.cancelled and loop.live() == [] and mux.fired == []
