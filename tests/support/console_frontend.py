"""A "Linux guest" for console device tests: the project's vhost-user front-end (QEMU's role),
one ring driver model per virtqueue and the Linux driver's control model, over real sockets.

It behaves the way drivers/char/virtio_console.c (Linux 6.1) does, as far as a device can
tell:

* after DRIVER_OK it fills the control receiveq with PAGE_SIZE (4096-byte) buffers and sends
  DEVICE_READY(1) first;
* every control message it sends goes through the control transmitq and it *busy-waits*
  until the device returns the buffer (``control_tx_wait_s`` bounds the wait: a device that
  does not serve the control queue promptly fails the test, where Linux would hang);
* control messages are handled by :class:`tests.support.console_guest.LinuxConsoleGuest`;
  a port the guest creates (PORT_ADD → PORT_READY 1) gets its receiveq filled with
  PAGE_SIZE buffers, as Linux's ``add_port`` does;
* one opener per port (``open`` of an open port raises EBUSY, console ports ENXIO);
  bytes arriving for a port no guest process has open are discarded (counted in
  :attr:`GuestPortIO.discarded` — a correct device never sends them);
* writes only go out while the host side is connected (Linux's ``will_write_block``),
  in chunks of ``tx_chunk`` bytes.

Usage::

    guest = ConsoleGuest.attach(vhost_socket_path)
    guest.driver_ok()
    guest.run_until(lambda: guest.port_names() >= {"p1"})
    guest.open("p1"); guest.write("p1", b"hi"); guest.run_until(...); guest.read("p1")

Spec: virtio 1.2 §5.3.6 (Device Operation), §5.3.6.2 (Multiport); vhost-user front-end
sequence as in ``vhost_user.frontend``.
"""

from __future__ import annotations

import os
import select
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from tests.support.console_guest import LinuxConsoleGuest
from tests.support.driver import Allocator, SplitDriver
from vhost_user.frontend import FrontendQueue, GuestRam, VhostUserFrontend
from vhost_user.wire import VirtioFeature as VF
from virtio.console.wire import (
    CONTROL_RX_QUEUE,
    CONTROL_TX_QUEUE,
    ConsoleConfig,
    ConsoleFeature,
    port_queues,
)

__all__ = ["ConsoleGuest", "GuestPortIO", "PAGE_SIZE"]

PAGE_SIZE = 4096


@dataclass(slots=True)
class GuestPortIO:
    """Data-side state of one guest port: received bytes, bytes waiting to be written."""

    port_id: int
    inbox: bytearray = field(default_factory=bytearray)
    outbox: deque = field(default_factory=deque)  # memoryviews still to post
    out_bytes: int = 0  # bytes in outbox
    received: int = 0
    sent: int = 0  # bytes posted on the transmitq
    discarded: int = 0  # bytes that arrived while the port was not open


class ConsoleGuest:
    """The guest (module docstring). Single-threaded and blocking; drive it with
    :meth:`pump` / :meth:`run_until` from the test thread."""

    def __init__(self, frontend: VhostUserFrontend, *, ram_bytes: int = 128 << 20,
                 port_queue_size: int = 256, control_queue_size: int = 64,
                 rx_fill: int | None = None, tx_chunk: int = 256 * 1024,
                 control_rx_buffers: int | None = None, control_tx_wait_s: float = 2.0,
                 event_idx: bool = True) -> None:
        self.fe = frontend
        self.ram = GuestRam([(0, ram_bytes)])
        self.port_queue_size = port_queue_size
        self.control_queue_size = control_queue_size
        self.rx_fill = port_queue_size if rx_fill is None else rx_fill
        self.tx_chunk = tx_chunk
        self.control_tx_wait_s = control_tx_wait_s
        self.auto_control_rx = control_rx_buffers is None
        self._initial_control_rx = (control_queue_size if control_rx_buffers is None
                                    else control_rx_buffers)
        offered = frontend.init()
        device_bits = int(ConsoleFeature.F_SIZE | ConsoleFeature.F_MULTIPORT
                          | ConsoleFeature.F_EMERG_WRITE)
        wanted = int(VF.VERSION_1 | VF.VHOST_USER_F_PROTOCOL_FEATURES) | device_bits
        if event_idx:
            wanted |= int(VF.RING_EVENT_IDX)
        self.features = wanted & offered
        self.config = ConsoleConfig.unpack(frontend.get_config(0, ConsoleConfig.FMT.size))
        self.max_nr_ports = self.config.max_nr_ports
        self.num_queues = 2 * (self.max_nr_ports + 1)
        self.model = LinuxConsoleGuest(self.max_nr_ports)
        # Each queue allocates its rings and buffers from its own slice of guest RAM.
        control_slice = control_queue_size * PAGE_SIZE + (64 << 10)
        port_slice = ((ram_bytes - 2 * control_slice) // (self.num_queues - 2)
                      ) & ~(PAGE_SIZE - 1)
        self.drivers: dict[int, SplitDriver] = {}
        queues = []
        lo = 0
        for index in range(self.num_queues):
            control = index in (CONTROL_RX_QUEUE, CONTROL_TX_QUEUE)
            size = control_queue_size if control else port_queue_size
            slice_bytes = control_slice if control else port_slice
            alloc = Allocator(self.ram.memory, lo, lo + slice_bytes)
            lo += slice_bytes
            driver = SplitDriver(self.ram.memory, size, event_idx=event_idx,
                                 allocator=alloc, index=index)
            self.drivers[index] = driver
            queues.append(FrontendQueue(index, size, *driver.ring_addresses))
        frontend.start(self.ram, queues, features=self.features)
        self.queues = {q.index: q for q in queues}
        self._poll = select.epoll()
        self._call_fd_queue: dict[int, int] = {}
        for q in queues:
            self._poll.register(q.call_fd, select.EPOLLIN)
            self._call_fd_queue[q.call_fd] = q.index
        self.io: dict[int, GuestPortIO] = {}
        self.control_received: list[bytes] = []
        self.closed = False

    @classmethod
    def attach(cls, path: str, **kwargs) -> "ConsoleGuest":
        """Connect a new front-end session to the back-end at ``path`` and start the device."""
        return cls(VhostUserFrontend.connect(path), **kwargs)

    # ------------------------------------------------------------------ life-cycle
    def driver_ok(self) -> None:
        """virtcons_probe after DRIVER_OK: fill the control receiveq, then DEVICE_READY."""
        self.post_control_rx(self._initial_control_rx)
        for message in self.model.driver_ok():
            self.send_control(message)

    def post_control_rx(self, count: int) -> None:
        driver = self.drivers[CONTROL_RX_QUEUE]
        for _ in range(count):
            driver.add_buf(in_sizes=[PAGE_SIZE])
        self._kick(CONTROL_RX_QUEUE)

    def stop(self) -> None:
        """vhost_dev_stop (the VM pauses or the front-end goes)."""
        self.fe.stop()

    def close(self) -> None:
        """The front-end disconnects (QEMU quits)."""
        if self.closed:
            return
        self.closed = True
        self._poll.close()
        self.fe.close()
        self.ram.close()

    # ------------------------------------------------------------------ control channel
    def send_control(self, message: bytes) -> None:
        """__send_control_msg: add, kick, busy-wait until the device returns the buffer."""
        driver = self.drivers[CONTROL_TX_QUEUE]
        driver.add_buf(out=[message])
        self._kick(CONTROL_TX_QUEUE)
        deadline = time.monotonic() + self.control_tx_wait_s
        while not driver.get_bufs():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"device did not return a control transmit buffer within "
                    f"{self.control_tx_wait_s}s (a Linux guest would hang)")
            time.sleep(0.0001)

    def _on_control_rx(self) -> None:
        driver = self.drivers[CONTROL_RX_QUEUE]
        used = driver.get_bufs()
        for buf in used:
            self.control_received.append(buf.data)
            before = set(self.model.ports)
            replies = self.model.receive(buf.data)
            after = set(self.model.ports)
            for port_id in sorted(after - before):
                self.io.setdefault(port_id, GuestPortIO(port_id))
                self._fill_rx(port_id)
            for port_id in before - after:
                io = self.io.get(port_id)
                if io is not None:
                    io.outbox.clear()
                    io.out_bytes = 0
            for reply in replies:
                self.send_control(reply)
        if used and self.auto_control_rx:
            for _ in used:
                driver.add_buf(in_sizes=[PAGE_SIZE])
            self._kick(CONTROL_RX_QUEUE)
        if used:
            for port_id in list(self.io):
                self._post_tx(port_id)

    # ------------------------------------------------------------------ ports
    def port_id(self, name: str) -> int:
        port = self.model.port_by_name(name)
        if port is None:
            raise KeyError(f"guest has no port named {name!r}")
        return port.id

    def port_names(self) -> set[str]:
        return {p.name for p in self.model.ports.values() if p.name is not None}

    def port(self, name: str):
        return self.model.ports[self.port_id(name)]

    def open(self, name: str) -> None:
        for message in self.model.open(self.port_id(name)):
            self.send_control(message)

    def close_port(self, name: str) -> None:
        for message in self.model.close(self.port_id(name)):
            self.send_control(message)

    def write(self, name: str, data: bytes) -> None:
        """write(2) on an open port: queued, posted while the host side is connected."""
        port_id = self.port_id(name)
        if not self.model.ports[port_id].guest_connected:
            raise OSError("port not open")
        io = self.io[port_id]
        io.outbox.append(memoryview(data))
        io.out_bytes += len(data)
        self._post_tx(port_id)

    def read(self, name: str) -> bytes:
        """Everything received on the port since the last read."""
        io = self.io[self.port_id(name)]
        data = bytes(io.inbox)
        io.inbox.clear()
        return data

    def pending_out(self, name: str) -> int:
        """Bytes written but not yet returned by the device."""
        port_id = self.port_id(name)
        return self.io[port_id].out_bytes + self.drivers[port_queues(port_id)[1]].outstanding

    def emergency_write(self, char: int) -> None:
        """The guest writes ``emerg_wr`` (virtio 1.2 §5.3.4)."""
        self.fe.set_config(8, bytes([char, 0, 0, 0]))

    def _fill_rx(self, port_id: int) -> None:
        driver = self.drivers[port_queues(port_id)[0]]
        added = 0
        while driver.outstanding < self.rx_fill:
            try:
                driver.add_buf(in_sizes=[PAGE_SIZE])
            except MemoryError:
                break
            added += 1
        if added:
            self._kick(port_queues(port_id)[0])

    def _on_port_rx(self, port_id: int) -> None:
        driver = self.drivers[port_queues(port_id)[0]]
        used = driver.get_bufs()
        if not used:
            return
        io = self.io.setdefault(port_id, GuestPortIO(port_id))
        port = self.model.ports.get(port_id)
        for buf in used:
            if port is not None and port.guest_connected:
                io.inbox += buf.data
                io.received += len(buf.data)
            else:
                io.discarded += len(buf.data)
        if port is not None:
            self._fill_rx(port_id)

    def _post_tx(self, port_id: int) -> None:
        io = self.io.get(port_id)
        port = self.model.ports.get(port_id)
        if io is None or not io.outbox or port is None or not port.host_connected:
            return
        driver = self.drivers[port_queues(port_id)[1]]
        posted = 0
        while io.outbox and driver.num_free > 0:
            head = io.outbox[0]
            chunk = head[: self.tx_chunk]
            try:
                driver.add_buf(out=[chunk])
            except MemoryError:
                break
            posted += 1
            io.sent += len(chunk)
            io.out_bytes -= len(chunk)
            if len(chunk) == len(head):
                io.outbox.popleft()
            else:
                io.outbox[0] = head[len(chunk):]
        if posted:
            self._kick(port_queues(port_id)[1])

    def _on_port_tx(self, port_id: int) -> None:
        self.drivers[port_queues(port_id)[1]].get_bufs()
        self._post_tx(port_id)

    # ------------------------------------------------------------------ running
    def _kick(self, index: int) -> None:
        if self.drivers[index].kick_prepare():
            self.queues[index].kick()

    def pump(self, timeout_s: float = 0.05) -> int:
        """Wait up to ``timeout_s`` for interrupts and handle every queue that got one."""
        handled = 0
        for fd, _ in self._poll.poll(timeout_s):
            try:
                os.read(fd, 8)
            except BlockingIOError:
                pass
            index = self._call_fd_queue[fd]
            handled += 1
            if index == CONTROL_RX_QUEUE:
                self._on_control_rx()
            elif index == CONTROL_TX_QUEUE:
                pass  # reaped by the busy-wait
            else:
                port_id = 0 if index < 2 else (index - 2) // 2
                if index == port_queues(port_id)[0]:
                    self._on_port_rx(port_id)
                else:
                    self._on_port_tx(port_id)
        return handled

    def run_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0,
                  what: str = "condition") -> None:
        """Pump until ``predicate()`` holds; AssertionError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
            self.pump(0.02)

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.pump(0.01)

    def __enter__(self) -> "ConsoleGuest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ConsoleBackend:
    """A :class:`virtio.daemon.Daemon` running in a thread, with the events it emits
    recorded (``events``: list of ``(name, data)``) and :meth:`call` to run code on its loop
    thread (the device is single-threaded)."""

    def __init__(self, config, **daemon_kwargs) -> None:
        import threading

        from virtio.daemon import Daemon

        self.daemon = Daemon(config, **daemon_kwargs)
        self.events: list[tuple[str, dict]] = []
        forward = self.daemon.emit

        def record(name: str, data: dict | None = None) -> None:
            self.events.append((name, dict(data or {})))
            forward(name, data)

        self.daemon.emit = record  # type: ignore[method-assign]
        self.daemon.start()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vmchannel-daemon", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.daemon.loop.run_once(0.05)

    @property
    def console(self):
        """The (first) ConsoleDevice."""
        return next(dev for kind, dev in self.daemon.devices if kind == "console")

    def call(self, fn, timeout_s: float = 5.0):
        """Run ``fn()`` on the loop thread; return its result or raise its exception."""
        import threading

        done = threading.Event()
        box: list = []

        def run() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:  # handed to the caller
                box.append((False, exc))
            done.set()

        self.daemon.loop.call_soon(run)
        if not done.wait(timeout_s):
            raise AssertionError("the daemon loop did not run the call")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def events_named(self, name: str) -> list[dict]:
        return [data for n, data in list(self.events) if n == name]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.daemon.close()
        self.daemon.loop.close()

    def __enter__(self) -> "ConsoleBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
