"""The multiport control protocol, device side, as a sans-I/O state machine.

Spec: virtio 1.2 §5.3.6.2 (Multiport Device Operation), driven the way Linux's
drivers/char/virtio_console.c expects it.

Inputs: whole buffers from the guest's control transmitq (:meth:`ConsoleControl.receive`),
host events (:meth:`add_port`, :meth:`remove_port`, :meth:`set_host_connected`,
:meth:`resize`), and device life-cycle (:meth:`set_features`, :meth:`driver_ok`,
:meth:`reset`). Outputs: control messages for the guest's control receiveq, kept in a FIFO
that the device drains with :meth:`peek` / :meth:`consume` whenever the guest has posted a
receive buffer (nothing is dropped when it has not), and events for management
(:class:`GuestOpened`, :class:`PortDetached`, ...), returned by the calls that cause them.

The protocol, as a Linux guest runs it:

1. After DRIVER_OK the guest posts control receive buffers and sends DEVICE_READY(1). Before
   that the device sends nothing. DEVICE_READY(0) means the guest failed to set the device
   up: logged, :class:`DeviceFailed`, no ports announced.
2. The device answers with DEVICE_ADD (Linux: PORT_ADD) for every port, in id order.
3. Per port the guest answers PORT_READY(1) (or 0 if it failed to create it:
   :class:`PortAddFailed`). The device then sends, in the order QEMU has always used and so
   the order Linux is tested against: CONSOLE_PORT(1) for console ports, PORT_NAME (name
   after the header, no NUL, as the spec says), PORT_OPEN(host_connected), and RESIZE for
   console ports whose size is known. CONSOLE_PORT makes Linux attach an hvc and answer
   PORT_OPEN(1) itself.
4. Guest PORT_OPEN(1/0) is a guest process opening/closing the port: :class:`GuestOpened` /
   :class:`GuestClosed`. Host data may only go to a port the guest has open (Linux discards
   it otherwise): see :meth:`may_send_to_guest`.
5. Hot-add after DEVICE_READY sends DEVICE_ADD and continues at 3. Hot-remove sends
   DEVICE_REMOVE (or, if the DEVICE_ADD was never delivered, withdraws it silently) and
   returns :class:`PortDetached`: the device must stop serving that port's virtqueues until a
   port with that id is added again (:meth:`port_for_queue` returns ``None`` meanwhile). Linux
   drops an unplugged port's state without sending PORT_OPEN(0), so removing an open port
   also yields :class:`GuestClosed`.

Deliberate deviations from QEMU's virtio-serial-bus.c: QEMU drops a control message when
the guest has no receive buffer posted; we queue it. QEMU sends PORT_OPEN only for connected
host sides; we always state the host side's state (harmless for Linux, which starts with
"not connected", and exact after a hibernate resume). QEMU puts a NUL after the name; the
spec says "without a NUL terminator" and Linux accepts both.

Hibernation: Linux's freeze resets the device and its restore sends PORT_READY(1) for each
port it knows, without DEVICE_READY. A PORT_READY for a port the previous driver instance had
been told about therefore counts as "driver resumed": the device brings the guest up to date
(DEVICE_REMOVE for ports removed meanwhile, DEVICE_ADD for ports added) and answers it.

Guest input never raises: malformed, unknown-port, wrong-direction and out-of-order messages
are logged (rate-limited), counted in :attr:`ConsoleControl.stats` and reported as
:class:`MessageIgnored`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Union

from .config import ConsoleConfigSpace
from .errors import ControlBacklogFull, ControlProtocolError, PortConfigError
from .ports import Port, PortTable
from .wire import (
    ConsoleFeature,
    ConsoleResize,
    ControlEvent,
    ControlHeader,
    ControlMessage,
    ResizeOrder,
    queue_port,
)

__all__ = [
    "ConfigChanged",
    "ConsoleControl",
    "ControlStats",
    "DeviceFailed",
    "DeviceReady",
    "Event",
    "GuestClosed",
    "GuestOpened",
    "MessageIgnored",
    "PortAddFailed",
    "PortDetached",
    "PortReady",
]

logger = logging.getLogger(__name__)

SNAPSHOT_VERSION = 1
_HEADER_SIZE = ControlHeader.FMT.size
_REPLY_EVENTS = frozenset(
    {
        ControlEvent.CONSOLE_PORT,
        ControlEvent.PORT_NAME,
        ControlEvent.PORT_OPEN,
        ControlEvent.RESIZE,
    }
)
_DEVICE_TO_DRIVER = frozenset(
    {
        ControlEvent.DEVICE_ADD,
        ControlEvent.DEVICE_REMOVE,
        ControlEvent.CONSOLE_PORT,
        ControlEvent.RESIZE,
        ControlEvent.PORT_NAME,
    }
)


# -- events for the device / management ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeviceReady:
    """The guest driver is ready for control messages (``resumed``: after hibernation)."""

    resumed: bool = False


@dataclass(frozen=True, slots=True)
class DeviceFailed:
    """The guest reported DEVICE_READY(0): it failed to set the device up."""


@dataclass(frozen=True, slots=True)
class PortReady:
    """The guest created the port (PORT_READY 1); its name and state are on their way."""

    port_id: int
    name: str


@dataclass(frozen=True, slots=True)
class PortAddFailed:
    """The guest failed to create the port (PORT_READY 0)."""

    port_id: int
    name: str


@dataclass(frozen=True, slots=True)
class GuestOpened:
    """A guest process opened the port (or the guest attached a console to it)."""

    port_id: int
    name: str


@dataclass(frozen=True, slots=True)
class GuestClosed:
    """The guest side closed: ``reason`` is ``"guest"``, ``"removed"`` or ``"reset"``."""

    port_id: int
    name: str
    reason: str = "guest"


@dataclass(frozen=True, slots=True)
class PortDetached:
    """The port was removed: stop serving its queues (``port_queues(port_id)``)."""

    port_id: int
    name: str


@dataclass(frozen=True, slots=True)
class ConfigChanged:
    """Config space changed for a guest that reads it (no MULTIPORT): notify the driver."""


@dataclass(frozen=True, slots=True)
class MessageIgnored:
    """A guest control message was ignored; ``reason`` says why."""

    reason: str
    port_id: int | None = None
    event: int | None = None


Event = Union[
    DeviceReady,
    DeviceFailed,
    PortReady,
    PortAddFailed,
    GuestOpened,
    GuestClosed,
    PortDetached,
    ConfigChanged,
    MessageIgnored,
]


@dataclass(slots=True)
class ControlStats:
    """Counters of one device's control channel."""

    received: int = 0
    ignored: int = 0
    queued: int = 0
    delivered: int = 0
    ignored_by_reason: dict[str, int] = field(default_factory=dict)


class _RateLimitedLog:
    """Log the first ``burst`` occurrences of each reason, then every ``every``-th one.

    Count-based rather than time-based: the core never reads the clock (sans-I/O).
    """

    def __init__(self, log: logging.Logger, burst: int = 10, every: int = 1000) -> None:
        self._log = log
        self._burst = burst
        self._every = every

    def warning(self, counts: dict[str, int], reason: str, msg: str, *args: Any) -> None:
        n = counts.get(reason, 0)
        if n <= self._burst:
            self._log.warning(msg, *args)
        elif n % self._every == 0:
            self._log.warning(msg + " (%d times so far)", *args, n)


# -- the state machine -----------------------------------------------------------------------
class ConsoleControl:
    """Device side of the console control protocol (module docstring).

    ``max_pending`` bounds the queue of undelivered messages against host-side flapping
    (:meth:`set_host_connected` raises :class:`ControlBacklogFull` at the limit); guest-caused
    messages are bounded by construction (a repeated PORT_READY replaces its queued answer).
    """

    def __init__(
        self,
        max_nr_ports: int | None = None,
        *,
        ports: PortTable | None = None,
        resize_order: ResizeOrder = ResizeOrder.SPEC,
        max_pending: int | None = None,
        name: str = "console",
    ) -> None:
        if ports is None:
            if max_nr_ports is None:
                raise TypeError("give max_nr_ports or ports")
            ports = PortTable(max_nr_ports)
        self.ports = ports
        self.config = ConsoleConfigSpace(ports.max_nr_ports)
        self.resize_order = resize_order
        self.max_pending = (
            max_pending if max_pending is not None else 1024 + 8 * ports.max_nr_ports
        )
        self.multiport = True
        self.driver_ready = False
        self.stats = ControlStats()
        self._outbox: deque[bytes] = deque()
        self._stale_ids: set[int] = set()  # announced to the guest, removed while not ready
        self._log = logger.getChild(name)
        self._ratelimit = _RateLimitedLog(self._log)
        port0 = ports.get(0)
        if port0 is not None:
            self.config.set_size(port0.cols, port0.rows)

    # -- output ---------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Number of control messages waiting for guest receive buffers."""
        return len(self._outbox)

    def peek(self) -> bytes | None:
        """The next control message for the guest's control receiveq, or ``None``."""
        return self._outbox[0] if self._outbox else None

    def consume(self) -> bytes:
        """Remove and return the message :meth:`peek` showed, once it is in a guest buffer."""
        if not self._outbox:
            raise IndexError("no pending control message")
        self.stats.delivered += 1
        return self._outbox.popleft()

    def pending_messages(self) -> list[bytes]:
        """A copy of the queue, oldest first (for inspection and tests)."""
        return list(self._outbox)

    # -- queries for the device -----------------------------------------------------------
    def port_for_queue(self, index: int) -> Port | None:
        """The live port owning virtqueue ``index`` (``None``: control queue or no port)."""
        port_id = queue_port(index)
        return None if port_id is None else self.ports.get(port_id)

    def may_send_to_guest(self, port_id: int) -> bool:
        """True if host bytes for this port would reach a reader (Linux discards otherwise)."""
        port = self.ports.get(port_id)
        return port is not None and port.guest_open

    # -- device life-cycle ----------------------------------------------------------------
    def set_features(self, features: int) -> None:
        """Record the negotiated feature bits (only F_MULTIPORT matters here)."""
        self.multiport = bool(features & ConsoleFeature.F_MULTIPORT)

    def driver_ok(self) -> list[Event]:
        """The driver set DRIVER_OK. Without MULTIPORT, port 0 is live from now on.

        Spec: virtio 1.2 §5.3.6 (without MULTIPORT only port 0 exists, with no control queue
        to announce it); QEMU marks port 0 guest-connected at DRIVER_OK likewise.
        """
        if self.multiport:
            return []
        port = self.ports.get(0)
        if port is None or port.guest_open:
            return []
        port.guest_ready = port.guest_open = True
        return [PortReady(port.id, port.name), GuestOpened(port.id, port.name)]

    def reset(self) -> list[Event]:
        """Device reset (status 0, RESET_DEVICE, front-end gone): forget the driver's state.

        Queued messages are withdrawn (the rings they were for are gone). What the previous
        driver instance was told is remembered, for a hibernation resume.
        """
        events: list[Event] = []
        for raw in self._outbox:
            header = ControlHeader.unpack(raw[:_HEADER_SIZE])
            if header.event == ControlEvent.DEVICE_ADD:
                port = self.ports.get(header.id)
                if port is not None:
                    port.announced = False
            elif header.event == ControlEvent.DEVICE_REMOVE:
                self._stale_ids.add(header.id)
        self._outbox.clear()
        for port in self.ports:
            if port.guest_open:
                events.append(GuestClosed(port.id, port.name, "reset"))
            port.guest_open = port.guest_ready = port.add_failed = False
        self.driver_ready = False
        self.multiport = True
        return events

    # -- host events ----------------------------------------------------------------------
    def add_port(
        self,
        name: str,
        *,
        is_console: bool = False,
        host_connected: bool = False,
        port_id: int | None = None,
        cols: int = 0,
        rows: int = 0,
    ) -> Port:
        """Create a port (cold- or hot-plug); announced at once if the driver is ready."""
        port = self.ports.add(name, is_console=is_console, port_id=port_id)
        port.host_connected = host_connected
        port.cols, port.rows = cols, rows
        if port.id == 0:
            self.config.set_size(cols, rows)
        if self.driver_ready and self.multiport:
            self._announce(port)
        return port

    def remove_port(self, port_id: int) -> list[Event]:
        """Hot-unplug a port (``UnknownPort`` if there is none)."""
        port = self.ports.remove(port_id)
        events: list[Event] = []
        if port.guest_open:
            events.append(GuestClosed(port.id, port.name, "removed"))
        events.append(PortDetached(port.id, port.name))
        # Messages for this id queued after its last DEVICE_ADD belong to this port; one queued
        # before it can only be the DEVICE_REMOVE of an earlier port with the same id, which
        # the guest must still get.
        last_add = None
        for i, header in enumerate(self._queued_headers()):
            if header.id == port_id and header.event == ControlEvent.DEVICE_ADD:
                last_add = i
        add_undelivered = last_add is not None
        self._withdraw(port_id, None, start=last_add or 0)
        # Spec: virtio 1.2 §5.3.6.2.1 "The device MUST NOT specify a port in
        # VIRTIO_CONSOLE_DEVICE_REMOVE which has not been created with a previous
        # VIRTIO_CONSOLE_DEVICE_ADD."
        if port.announced and not add_undelivered:
            if self.driver_ready:
                self._queue(ControlMessage.build(port_id, ControlEvent.DEVICE_REMOVE))
            else:
                self._stale_ids.add(port_id)
        port.announced = port.guest_ready = port.guest_open = False
        return events

    def set_host_connected(self, port_id: int, connected: bool) -> None:
        """The host side of a port connected or disconnected: PORT_OPEN to the guest."""
        port = self.ports[port_id]
        connected = bool(connected)
        if port.host_connected == connected:
            return
        tell_guest = self.driver_ready and self.multiport and port.guest_ready
        if tell_guest and len(self._outbox) >= self.max_pending:
            raise ControlBacklogFull(self.max_pending)
        port.host_connected = connected
        if tell_guest:
            self._queue(ControlMessage.build(port_id, ControlEvent.PORT_OPEN, int(connected)))

    def resize(self, port_id: int, cols: int, rows: int) -> list[Event]:
        """A console port's terminal size changed: RESIZE (or config change for port 0)."""
        port = self.ports[port_id]
        if not port.is_console:
            raise PortConfigError(f"port {port_id} ({port.name!r}) is not a console port")
        for value in (cols, rows):
            if not 0 <= value <= 0xFFFF:
                raise PortConfigError(f"console size {cols}x{rows} outside 0..65535")
        port.cols, port.rows = cols, rows
        events: list[Event] = []
        if port_id == 0 and self.config.set_size(cols, rows) and not self.multiport:
            events.append(ConfigChanged())
        if self.driver_ready and self.multiport and port.guest_ready:
            self._queue_resize(port)
        return events

    # -- guest input ----------------------------------------------------------------------
    def receive(self, data: bytes) -> list[Event]:
        """Handle one buffer from the control transmitq. Never raises for guest input."""
        self.stats.received += 1
        if len(data) != _HEADER_SIZE:
            return self._ignore(
                "bad-size", None, None, "control message of %d bytes (want %d)",
                len(data), _HEADER_SIZE,
            )
        try:
            header = ControlMessage.parse(bytes(data)).header
        except ControlProtocolError as exc:  # pragma: no cover - size checked above
            return self._ignore("malformed", None, None, "%s", exc.reason)
        if not self.multiport:
            return self._ignore(
                "no-multiport", header.id, header.event,
                "control message without MULTIPORT negotiated",
            )
        event = header.event
        if event == ControlEvent.DEVICE_READY:
            return self._on_device_ready(header)
        if event in _DEVICE_TO_DRIVER:
            return self._ignore(
                "wrong-direction", header.id, event,
                "guest sent device-to-driver event %d for port %d", event, header.id,
            )
        if event == ControlEvent.PORT_READY:
            return self._on_port_ready(header)
        if event == ControlEvent.PORT_OPEN:
            return self._on_port_open(header)
        return self._ignore(
            "unknown-event", header.id, event, "unknown control event %d", event
        )

    def _on_device_ready(self, header: ControlHeader) -> list[Event]:
        if header.value == 0:
            self._log.error("guest failed to initialise the console device (DEVICE_READY 0)")
            events: list[Event] = self.reset()
            return events + [DeviceFailed()]
        if header.value != 1:
            return self._ignore(
                "bad-value", header.id, header.event,
                "DEVICE_READY with value %d", header.value,
            )
        events = self.reset() if self.driver_ready else []
        # A fresh driver instance: everything earlier drivers knew is gone with them.
        self._outbox.clear()
        self._stale_ids.clear()
        for port in self.ports:
            port.announced = port.guest_ready = port.guest_open = port.add_failed = False
        self.driver_ready = True
        events.append(DeviceReady())
        for port in self.ports:
            self._announce(port)
        return events

    def _on_port_ready(self, header: ControlHeader) -> list[Event]:
        port = self.ports.get(header.id)
        if port is None:
            return self._ignore(
                "unknown-port", header.id, header.event, "PORT_READY for unknown port %d",
                header.id,
            )
        if header.value > 1:
            return self._ignore(
                "bad-value", header.id, header.event,
                "PORT_READY with value %d for port %d", header.value, header.id,
            )
        events: list[Event] = []
        if not self.driver_ready:
            if not port.announced:
                return self._ignore(
                    "out-of-order", header.id, header.event,
                    "PORT_READY for port %d before DEVICE_READY", header.id,
                )
            events.extend(self._resume())
        elif not port.announced:
            return self._ignore(
                "out-of-order", header.id, header.event,
                "PORT_READY for port %d that was never announced", header.id,
            )
        if header.value == 0:
            self._log.error("guest failed to add port %d (%s)", port.id, port.name)
            port.add_failed = True
            port.guest_ready = False
            self._withdraw(port.id, _REPLY_EVENTS)
            events.append(PortAddFailed(port.id, port.name))
            return events
        if not port.guest_ready:
            events.append(PortReady(port.id, port.name))
        port.guest_ready = True
        port.add_failed = False
        self._withdraw(port.id, _REPLY_EVENTS)
        if port.is_console:
            self._queue(ControlMessage.build(port.id, ControlEvent.CONSOLE_PORT, 1))
        self._queue(
            ControlMessage.build(port.id, ControlEvent.PORT_NAME, 1, port.name.encode())
        )
        self._queue(
            ControlMessage.build(port.id, ControlEvent.PORT_OPEN, int(port.host_connected))
        )
        if port.is_console and (port.cols or port.rows):
            self._queue_resize(port)
        return events

    def _on_port_open(self, header: ControlHeader) -> list[Event]:
        port = self.ports.get(header.id)
        if port is None:
            return self._ignore(
                "unknown-port", header.id, header.event, "PORT_OPEN for unknown port %d",
                header.id,
            )
        if header.value > 1:
            return self._ignore(
                "bad-value", header.id, header.event,
                "PORT_OPEN with value %d for port %d", header.value, header.id,
            )
        if not self.driver_ready or not port.announced:
            return self._ignore(
                "out-of-order", header.id, header.event,
                "PORT_OPEN for port %d the guest was not told about", header.id,
            )
        opened = header.value == 1
        if port.guest_open == opened:
            return []
        port.guest_open = opened
        if opened:
            return [GuestOpened(port.id, port.name)]
        return [GuestClosed(port.id, port.name, "guest")]

    def _resume(self) -> list[Event]:
        """First PORT_READY after a reset without DEVICE_READY: a hibernation resume."""
        self._log.info("guest driver resumed without DEVICE_READY (hibernation restore)")
        self.driver_ready = True
        for stale in sorted(self._stale_ids):
            self._queue(ControlMessage.build(stale, ControlEvent.DEVICE_REMOVE))
        self._stale_ids.clear()
        for port in self.ports:
            if not port.announced:
                self._announce(port)
        return [DeviceReady(resumed=True)]

    # -- queue helpers --------------------------------------------------------------------
    def _announce(self, port: Port) -> None:
        # Spec: virtio 1.2 §5.3.6.2.1 "The device MUST NOT specify a port which exists in a
        # VIRTIO_CONSOLE_DEVICE_ADD message, nor a port which is equal or greater than
        # max_nr_ports." (PortTable guarantees the range; one ADD per driver instance.)
        port.announced = True
        port.guest_ready = port.guest_open = port.add_failed = False
        self._queue(ControlMessage.build(port.id, ControlEvent.DEVICE_ADD))

    def _queue(self, message: bytes) -> None:
        self.stats.queued += 1
        self._outbox.append(message)

    def _queue_resize(self, port: Port) -> None:
        payload = ConsoleResize(port.cols, port.rows).pack(self.resize_order)
        message = ControlMessage.build(port.id, ControlEvent.RESIZE, 0, payload)
        for i, raw in enumerate(self._outbox):  # an undelivered RESIZE only needs the news
            header = ControlHeader.unpack(raw[:_HEADER_SIZE])
            if header.id == port.id and header.event == ControlEvent.RESIZE:
                self._outbox[i] = message
                return
        self._queue(message)

    def _queued_headers(self) -> Iterable[ControlHeader]:
        for raw in self._outbox:
            yield ControlHeader.unpack(raw[:_HEADER_SIZE])

    def _withdraw(
        self, port_id: int, events: frozenset[int] | None, start: int = 0
    ) -> None:
        """Drop undelivered messages for ``port_id`` (only ``events`` kinds, or all) that
        sit at queue position ``start`` or later."""
        kept: deque[bytes] = deque()
        for i, raw in enumerate(self._outbox):
            header = ControlHeader.unpack(raw[:_HEADER_SIZE])
            if (
                i >= start
                and header.id == port_id
                and (events is None or header.event in events)
            ):
                continue
            kept.append(raw)
        self._outbox = kept

    def _ignore(
        self, reason: str, port_id: int | None, event: int | None, msg: str, *args: Any
    ) -> list[Event]:
        self.stats.ignored += 1
        counts = self.stats.ignored_by_reason
        counts[reason] = counts.get(reason, 0) + 1
        self._ratelimit.warning(counts, reason, "ignored guest control message: " + msg, *args)
        return [MessageIgnored(reason, port_id, event)]

    # -- state for restart without a guest reset --------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """JSON-able state: port table, guest states, undelivered messages."""
        return {
            "version": SNAPSHOT_VERSION,
            "ports": self.ports.snapshot(),
            "driver_ready": self.driver_ready,
            "multiport": self.multiport,
            "resize_order": self.resize_order.name,
            "pending": [raw.hex() for raw in self._outbox],
            "stale_ids": sorted(self._stale_ids),
        }

    @classmethod
    def from_snapshot(cls, state: dict[str, Any], *, name: str = "console") -> "ConsoleControl":
        """Rebuild a core from :meth:`snapshot` output (``ValueError`` if it is not one)."""
        if state.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported console snapshot version {state.get('version')!r}")
        control = cls(
            ports=PortTable.from_snapshot(state["ports"]),
            resize_order=ResizeOrder[state["resize_order"]],
            name=name,
        )
        control.driver_ready = bool(state["driver_ready"])
        control.multiport = bool(state["multiport"])
        for text in state["pending"]:
            raw = bytes.fromhex(text)
            if len(raw) < _HEADER_SIZE:
                raise ValueError("truncated control message in snapshot")
            control._outbox.append(raw)
        control._stale_ids = {int(i) for i in state["stale_ids"]}
        return control
