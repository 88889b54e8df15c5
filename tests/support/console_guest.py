"""A model of the Linux virtio_console driver's control side (guest), sans-I/O.

It reproduces what drivers/char/virtio_console.c (Linux 6.1) does with control messages, so
device tests can run the real handshake without a VM, and integration tests can run it over
real rings (feed it the bytes of each used control receive buffer, post what it returns on
the control transmitq):

* probe: after DRIVER_OK, fill the control receiveq, send DEVICE_READY(1) with id
  0xffffffff (``VIRTIO_CONSOLE_BAD_ID``) — :meth:`LinuxConsoleGuest.driver_ok`;
* ``handle_control_message``: a message for an unknown port is dropped unless it is
  PORT_ADD; PORT_ADD of an existing port re-sends PORT_READY(1); PORT_ADD with
  ``id >= max_nr_ports`` is dropped with a warning; ``add_port`` sends PORT_READY(1) (or
  PORT_READY(0) when it fails); PORT_REMOVE unplugs (an open file stays open but the port is
  gone: closing it later sends nothing); CONSOLE_PORT(value != 0) attaches an hvc, marks the
  port guest-connected and sends PORT_OPEN(1); RESIZE applies to console ports only and reads
  the payload in the configured field order; PORT_OPEN sets ``host_connected``; PORT_NAME is
  taken once (repeats are ignored), up to the first NUL, and creates the sysfs ``name``
  attribute; every other event is ignored;
* open/close of ``/dev/vportNpM``: console ports refuse with ENXIO, a second opener gets
  EBUSY, open sends PORT_OPEN(1), close PORT_OPEN(0);
* hibernation: :meth:`freeze` forgets host state, :meth:`restore` sends PORT_READY(1) for each
  port and PORT_OPEN(1) for those open in the guest, without DEVICE_READY.

Messages the model receives are whole control receive buffers (the device puts one message
in each); Linux's buffers are PAGE_SIZE, so a longer message is cut to 4096 bytes here, as a
ring would.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from virtio.console.wire import BAD_ID, ConsoleResize, ControlEvent, ResizeOrder

__all__ = ["GuestPort", "GuestOpenError", "LinuxConsoleGuest", "CONTROL_RX_BUFFER_BYTES"]

CONTROL_RX_BUFFER_BYTES = 4096
_HEADER = struct.Struct("<IHH")


class GuestOpenError(OSError):
    """open() of a port failed in the guest (``errno`` ENXIO or EBUSY)."""


@dataclass(slots=True)
class GuestPort:
    """Linux's ``struct port`` fields that the control protocol touches."""

    id: int
    name: str | None = None
    is_console: bool = False
    host_connected: bool = False
    guest_connected: bool = False
    cols: int = 0
    rows: int = 0


def _msg(port_id: int, event: int, value: int) -> bytes:
    return _HEADER.pack(port_id, int(event), value)


class LinuxConsoleGuest:
    """The guest driver's control-side state machine (module docstring).

    ``fail_port_ids``: ports whose creation fails (the guest answers PORT_READY 0 and does not
    create them). ``fail_device``: probe fails (the guest sends DEVICE_READY 0).
    """

    def __init__(
        self,
        max_nr_ports: int,
        *,
        multiport: bool = True,
        resize_order: ResizeOrder = ResizeOrder.SPEC,
        vdev_index: int = 0,
        fail_port_ids: frozenset[int] | set[int] = frozenset(),
        fail_device: bool = False,
    ) -> None:
        self.max_nr_ports = max_nr_ports
        self.multiport = multiport
        self.resize_order = resize_order
        self.vdev_index = vdev_index
        self.fail_port_ids = set(fail_port_ids)
        self.fail_device = fail_device
        self.ports: dict[int, GuestPort] = {}
        self.orphans: list[GuestPort] = []  # unplugged while open: fd still held
        self.ready_sent = False
        self.dropped: list[tuple[int, int, str]] = []  # (id, event, why) for assertions
        self.warnings: list[str] = []

    # -- driver life-cycle ----------------------------------------------------------------
    def driver_ok(self) -> list[bytes]:
        """virtcons_probe after DRIVER_OK: DEVICE_READY(1), or (0) when the probe fails."""
        if not self.multiport:
            self.ports[0] = GuestPort(0, is_console=True, guest_connected=True)
            return []
        self.ready_sent = True
        return [_msg(BAD_ID, ControlEvent.DEVICE_READY, 0 if self.fail_device else 1)]

    def freeze(self) -> None:
        """virtcons_freeze: the device is reset; ports keep names, host state is forgotten."""
        for port in self.ports.values():
            port.host_connected = False

    def restore(self) -> list[bytes]:
        """virtcons_restore: PORT_READY(1) per port, PORT_OPEN(1) for guest-open ports."""
        out: list[bytes] = []
        for port in sorted(self.ports.values(), key=lambda p: p.id):
            out.append(_msg(port.id, ControlEvent.PORT_READY, 1))
            if port.guest_connected:
                out.append(_msg(port.id, ControlEvent.PORT_OPEN, 1))
        return out

    # -- control receiveq -----------------------------------------------------------------
    def receive(self, buffer: bytes) -> list[bytes]:
        """handle_control_message() for one used control receive buffer.

        Returns the control messages the guest sends in reaction, in order.
        """
        buffer = bytes(buffer[:CONTROL_RX_BUFFER_BYTES])
        if len(buffer) < _HEADER.size:
            self.dropped.append((-1, -1, "short"))
            return []
        port_id, event, value = _HEADER.unpack(buffer[: _HEADER.size])
        payload = buffer[_HEADER.size :]
        port = self.ports.get(port_id)
        if port is None and event != ControlEvent.PORT_ADD:
            self.dropped.append((port_id, event, "invalid index"))
            return []
        if event == ControlEvent.PORT_ADD:
            if port is not None:
                return [_msg(port_id, ControlEvent.PORT_READY, 1)]
            if port_id >= self.max_nr_ports:
                self.warnings.append(f"out-of-bound id {port_id}")
                return []
            if port_id in self.fail_port_ids:
                return [_msg(port_id, ControlEvent.PORT_READY, 0)]
            self.ports[port_id] = GuestPort(port_id)
            return [_msg(port_id, ControlEvent.PORT_READY, 1)]
        assert port is not None
        if event == ControlEvent.PORT_REMOVE:
            self._unplug(port)
            return []
        if event == ControlEvent.CONSOLE_PORT:
            if not value or port.is_console:
                return []
            port.is_console = True
            port.guest_connected = True
            return [_msg(port_id, ControlEvent.PORT_OPEN, 1)]
        if event == ControlEvent.RESIZE:
            if not port.is_console:
                return []
            if len(payload) < ConsoleResize.FMT.size:
                self.dropped.append((port_id, event, "short resize"))
                return []
            size = ConsoleResize.unpack(payload, self.resize_order)
            port.cols, port.rows = size.cols, size.rows
            return []
        if event == ControlEvent.PORT_OPEN:
            port.host_connected = bool(value)
            return []
        if event == ControlEvent.PORT_NAME:
            if port.name is not None:
                return []
            raw = payload.split(b"\0", 1)[0]
            port.name = raw.decode("utf-8", "replace")
            return []
        self.dropped.append((port_id, event, "unhandled event"))
        return []

    def _unplug(self, port: GuestPort) -> None:
        del self.ports[port.id]
        if port.guest_connected and not port.is_console:
            self.orphans.append(port)
        port.guest_connected = False
        port.host_connected = False

    # -- user space -----------------------------------------------------------------------
    def open(self, port_id: int) -> list[bytes]:
        """port_fops_open(): PORT_OPEN(1), or GuestOpenError(ENXIO / EBUSY)."""
        port = self.ports.get(port_id)
        if port is None or port.is_console:
            raise GuestOpenError(errno.ENXIO, f"port {port_id} cannot be opened")
        if port.guest_connected:
            raise GuestOpenError(errno.EBUSY, f"port {port_id} is already open")
        port.guest_connected = True
        return [_msg(port_id, ControlEvent.PORT_OPEN, 1)]

    def close(self, port_id: int) -> list[bytes]:
        """port_fops_release(): PORT_OPEN(0), nothing if the port was unplugged meanwhile."""
        for orphan in self.orphans:
            if orphan.id == port_id:
                self.orphans.remove(orphan)
                return []
        port = self.ports.get(port_id)
        if port is None or not port.guest_connected or port.is_console:
            raise GuestOpenError(errno.EBADF, f"port {port_id} is not open")
        port.guest_connected = False
        return [_msg(port_id, ControlEvent.PORT_OPEN, 0)]

    # -- what the guest's user space sees -------------------------------------------------
    def sysfs_names(self) -> dict[str, str]:
        """``/sys/class/virtio-ports/<dev>/name`` contents by device name (only named ports)."""
        return {
            f"vport{self.vdev_index}p{port.id}": f"{port.name}\n"
            for port in sorted(self.ports.values(), key=lambda p: p.id)
            if port.name is not None
        }

    def port_by_name(self, name: str) -> GuestPort | None:
        for port in self.ports.values():
            if port.name == name:
                return port
        return None


def pump(device, guest: LinuxConsoleGuest, initial=(), *, rx_buffers: int | None = None) -> list:
    """Run the control channel between a device core and the guest model.

    ``initial``: guest messages to hand the device first (e.g. ``guest.driver_ok()``).
    Then deliver queued device messages one per guest receive buffer, feeding each guest
    reply straight back (Linux busy-waits on its control transmitq, so replies are handled
    before the next receive buffer). ``rx_buffers`` limits how many receive buffers the guest
    has posted (``None``: unlimited). Returns the device events, in order.

    ``device`` is anything with ``receive(bytes) -> list``, ``peek()`` and ``consume()``
    (``virtio.console.control.ConsoleControl``).
    """
    events: list = []
    for message in initial:
        events += device.receive(message)
    budget = rx_buffers
    while device.peek() is not None and (budget is None or budget > 0):
        message = device.consume()
        if budget is not None:
            budget -= 1
        for reply in guest.receive(message):
            events += device.receive(reply)
    return events
