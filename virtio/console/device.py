"""The virtio-console multiport device served over vhost-user: queues ↔ control core ↔ host.

Spec: virtio 1.2 §5.3 (Console Device): §5.3.2 virtqueues (port 0 = 0/1, control = 2/3,
port n ≥ 1 = 2n+2 / 2n+3), §5.3.3 features (F_SIZE, F_MULTIPORT, F_EMERG_WRITE), §5.3.4
config space, §5.3.6.2 multiport control. The protocol decisions live in the sans-I/O core
(:class:`~virtio.console.control.ConsoleControl`); host sockets live in
:mod:`virtio.console.host`; this module wires them to the rings and the event loop.

How the queues are served:

* **Control transmitq (3)** is drained at once on every kick: each buffer is returned
  (used length 0) *before* its message is processed, because Linux sends control messages
  with a spinlock held and busy-waits for the buffer to come back.
* **Control receiveq (2)** gets one queued control message per guest buffer, whenever the
  guest has posted buffers; messages wait (in order) while it has none.
* **Port transmitq** (guest → host): ``tx_to_fd`` writes guest buffers straight into the
  host socket, only while a host peer is attached, only as fast as it accepts them: on a
  short write the loop waits for writability of *that* socket (``add_writer``), so a host
  peer that never reads stalls only its own port. Guest bytes written while no host peer is
  attached stay in the ring until one attaches (QEMU would drop them).
* **Zero copy** (``ConsoleConfig.zero_copy``, on by default; C rings, AF_UNIX host sockets):
  large transmit rounds reach the host socket by page reference (:mod:`ring.cpump`), so
  the host peer's read is the only copy of the guest's bytes. Such a chain goes back to the
  guest only once the peer has read all of it; meanwhile the socket is watched with an
  edge-triggered writer (each peer read is an edge), so a peer that stops reading costs no
  CPU. A queue stop (GET_VRING_BASE) keeps the waiting chains in flight until the same
  ring goes on and the peer has read them (ring.cpump ``StreamPump.tx``). A device reset or
  a port's removal gives them up: a guest that reuses those buffers before a slow peer reads
  them changes bytes the peer has not read yet. Set ``zero_copy = false`` where that
  matters.
* **Port receiveq** (host → guest): the host socket is watched (``add_reader``) only while
  the guest has the port open, a host peer is attached and the guest has buffers posted;
  when ``rx_from_fd`` reports the ring starved, the watch is dropped until the guest kicks
  the receiveq (no busy loop). Host bytes are therefore never read into a buffer Linux would
  discard, and never read at all while nobody in the guest listens (the host peer sees
  backpressure).
* A **removed port**'s transmitq is emptied at removal — its partially written chain and
  every available chain are completed with used length 0 — *before* DEVICE_REMOVE can reach
  the guest (Linux then finds no unused buffer to detach, and never rewinds ``avail->idx``
  under us); later kicks of that queue are drained the same way until the id is reused. Its
  receiveq is left alone (Linux detaches those buffers itself).

Management events (``emit(name, data)``; ``data["device"]`` is the vhost-user socket path):

======================== ==================================================================
``VSERPORT_CHANGE``      ``{"id": NAME, "open": bool}`` — a guest process opened/closed the
                         port (QEMU's event of the same name and shape); also ``open:
                         false`` when the port is removed or the device reset while open.
``PORT_HOST_CONNECTED``  ``{"id": NAME}`` — a host peer attached to the port.
``PORT_HOST_DISCONNECTED`` ``{"id": NAME}`` — it left.
``PORT_ADDED``           ``{"id": NAME, "port": ID, "host": ENDPOINT}`` (management/library)
``PORT_REMOVED``         ``{"id": NAME, "port": ID}``
======================== ==================================================================
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from ring.pump import PumpFlag, stream_pump_for
from virtio.config import ConsoleConfig, Endpoint

from .config import EmergencyWrite
from .control import (
    ConfigChanged,
    ConsoleControl,
    DeviceFailed,
    DeviceReady,
    GuestClosed,
    GuestOpened,
    PortAddFailed,
)
from .errors import ControlBacklogFull, DuplicatePortName, PortConfigError
from .host import HostEndpoint, ensure_socket_dir, make_endpoint
from .ports import CONSOLE_PORT_ID, Port, check_port_name
from .wire import CONTROL_RX_QUEUE, CONTROL_TX_QUEUE, ConsoleFeature, port_queues, queue_port

__all__ = ["CONSOLE_DEVICE_ID", "ConsoleDevice", "ConsoleEvent"]

log = logging.getLogger(__name__)

CONSOLE_DEVICE_ID = 3
"""virtio device id of the console. Spec: virtio 1.2 §5 (Device Types)."""

RX_BUDGET_BYTES = 256 * 1024
"""Host bytes moved into one port's receiveq per readiness callback (fairness)."""
TX_BUDGET_BYTES = 1 << 20
"""Guest bytes moved out of one port's transmitq per call before other work runs."""
OPPORTUNISTIC_RX_BYTES = 4096
"""After a guest → host write of at most this many bytes, look for the host's answer at once
(request/response traffic; vhost-net's busy-poll idea, one non-blocking ``readv``)."""
EMERGENCY_BUFFER_BYTES = 64 * 1024
"""Emergency-write bytes kept while port 0 has no host peer (older ones are dropped)."""
HOST_STATE_RETRY_S = 0.05
"""Retry delay when the control backlog is full (the guest posts no control buffers)."""


class ConsoleEvent(str, enum.Enum):
    """Management event names (module docstring)."""

    VSERPORT_CHANGE = "VSERPORT_CHANGE"
    PORT_HOST_CONNECTED = "PORT_HOST_CONNECTED"
    PORT_HOST_DISCONNECTED = "PORT_HOST_DISCONNECTED"
    PORT_ADDED = "PORT_ADDED"
    PORT_REMOVED = "PORT_REMOVED"


@dataclass(eq=False, slots=True)
class _PortIO:
    """The device's run-time view of one port: its host endpoint and what is watched."""

    port: Port
    endpoint_config: Endpoint
    endpoint: HostEndpoint
    rx_fd: int | None = None  # fd with our add_reader (host → guest)
    tx_fd: int | None = None  # fd with our writer (waiting for the host to read)
    tx_edge: bool = False  # tx_fd's writer is edge-triggered (zero copy: chains wait)
    probe_fd: int | None = None  # fd watched only to notice a host hang-up
    rx_starved: bool = False  # the guest had no receive buffers at the last read
    host_has_data: bool = False  # probe saw bytes the guest is not reading yet
    emergency: bytearray = field(default_factory=bytearray)
    carry: bytearray = field(default_factory=bytearray)  # taken guest bytes a stopped
    #                          transmitq left unwritten: they go first (_salvage_tx)
    retry_timer: Any = None
    removed: bool = False
    pump: Any = None  # ring.pump stream pump over the port's live queues and host fds


class ConsoleDevice:
    """A virtio-console (MULTIPORT) device for :class:`vhost_user.device.VhostUserDevice`.

    ``config`` is a :class:`virtio.config.ConsoleConfig`; ``emit(name, data)`` sends
    management events. Library API: :meth:`add_port`, :meth:`remove_port`, :meth:`resize`,
    :meth:`query_ports`, :meth:`register_commands`, :meth:`close`. ``notify_config`` (settable)
    is called to request a config-change interrupt (the owner wires it to
    ``session.notify_config()``); only non-MULTIPORT guests need it.
    """

    device_id = CONSOLE_DEVICE_ID

    def __init__(self, loop: Any, config: ConsoleConfig,
                 emit: Callable[[str, dict], None] | None = None, *,
                 name: str | None = None) -> None:
        self.loop = loop
        self.config = config
        self.name = name or config.socket
        self._log = log.getChild(os.path.basename(self.name) or "console")
        self._emit = emit
        self.num_queues = config.num_queues
        self.control = ConsoleControl(config.max_ports, name=os.path.basename(self.name))
        self.notify_config: Callable[[], Any] | None = None
        self._handles: dict[int, Any] = {}
        self._io: dict[int, _PortIO] = {}
        self._tx_ports: dict[int, _PortIO] = {}  # transmitq index -> its port (kick fast path)
        self._broken_logged: set[int] = set()  # queues whose breakage was logged (R5: once)
        self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self.emergency_dropped = 0
        self.closed = False
        if config.socket_dir:
            ensure_socket_dir(config.socket_dir)
        try:
            if config.console is not None:
                self.add_port("console", config.console, console=True, port_id=CONSOLE_PORT_ID,
                              _announce=False)
            for port in config.ports:
                self.add_port(port.name, config.endpoint_for(port), console=port.console,
                              _announce=False)
        except Exception:
            self.close()
            raise

    # ================================================================ VhostUserDevice
    def device_features(self) -> int:
        return int(ConsoleFeature.F_SIZE | ConsoleFeature.F_MULTIPORT
                   | ConsoleFeature.F_EMERG_WRITE)

    def config_read(self, offset: int, size: int) -> bytes:
        return self.control.config.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        """Spec: virtio 1.2 §5.3.5.1 "The device MUST allow a write to emerg_wr, even on an
        unconfigured device." — the byte goes to port 0's host side."""
        for action in self.control.config.write(offset, bytes(data)):
            if isinstance(action, EmergencyWrite):
                self._emergency_write(action.data)

    def set_features(self, features: int) -> None:
        self.control.set_features(features)

    def queue_started(self, handle: Any) -> None:
        index = handle.index
        self._handles[index] = handle
        self._broken_logged.discard(index)  # a ring set up again starts clean
        if index == CONTROL_RX_QUEUE:
            self._flush_control()
            return
        if index == CONTROL_TX_QUEUE:
            self._serve_control_tx()
            return
        if not self.control.multiport and index in (0, 1):
            self._handle_events(self.control.driver_ok())
        io = self._port_io(index)
        if io is None:
            return
        self._sync_pump(io)
        rx_q, tx_q = port_queues(io.port.id)
        if index == tx_q:
            handle.kick_reader = functools.partial(self._on_tx_kick, io)
            self._pump_tx(io)
        else:
            io.rx_starved = False
            self._reconcile(io)

    def queue_stopped(self, index: int) -> None:
        handle = self._handles.pop(index, None)
        io = self._port_io(index)
        if io is not None:
            if handle is not None and index == port_queues(io.port.id)[1]:
                self._salvage_tx(io, handle)
            self._reconcile(io)  # (and the pump lets go of the queue)

    def _salvage_tx(self, io: _PortIO, handle: Any) -> None:
        """A port's transmitq stops (GET_VRING_BASE: a VM pause, a migration, a front-end
        reconnect) while its host peer may stay: lose no byte the guest gave, keep no chain
        the guest gave. The bytes zero copy still held in its pipe and the unwritten rest of
        a partly written chain go to ``io.carry``, written before anything else once the
        queue runs again; that chain goes back to the guest now, so the ring's base counts it
        consumed truthfully (the next ring would never see it again).

        With zero copy the pump keeps that chain, and every chain whose bytes the socket
        still refers to, in flight instead (ring.cpump ``StreamPump.tx``): they go back
        through the same ring once it goes on and the peer has read them.

        Spec: vhost-user VHOST_USER_GET_VRING_BASE; virtio 1.2 §2.7.8, §5.3.6."""
        vq, pump = handle.vq, io.pump
        lost = 0
        if pump is not None and pump.tx is vq:
            before = pump.unsent_lost
            pump.tx = None  # returns the chains the peer has read, keeps the others
            io.carry += pump.take_unsent()
            lost = pump.unsent_lost - before
        pending = vq.pending
        if pending is not None and vq.broken is None:
            rest, lost_here = vq.pending_rest()
            io.carry += rest
            lost += lost_here
        if lost:
            self._log.warning("port %r: %d bytes of a partly written buffer are lost: its "
                              "memory went away", io.port.name, lost)
        if pending is None or vq.broken is not None:
            return
        state = vq.state()
        state["pending"] = None
        vq.load_state(state)
        vq.push(pending.head, 0, pending.ring_slots)
        handle.notify_if_needed()

    def _on_tx_kick(self, io: _PortIO, kick_fd: int) -> None:
        """A port transmitq's kick eventfd is readable (``QueueHandle.kick_reader``): one
        pump call drains it and moves the bytes; Python runs only when it reports something
        to do. Anything unusual (a removed port, emergency bytes first) takes
        :meth:`kick`."""
        pump = io.pump
        if pump is None or io.removed or io.emergency or io.carry:
            try:
                os.read(kick_fd, 8)
            except (BlockingIOError, InterruptedError):
                pass
            self.kick(port_queues(io.port.id)[1])
            return
        flags = pump.pump_tx(kick_fd)
        if flags or io.tx_fd is not None:
            self._after_pump_tx(io, flags)

    def kick(self, index: int) -> None:
        io = self._tx_ports.get(index)
        if io is not None and io.pump is not None and not io.emergency and not io.carry:
            # The fast path of a port's transmitq: one pump call (ring.pump), Python only
            # when it reports something to do.
            flags = io.pump.pump_tx()
            if flags or io.tx_fd is not None:
                self._after_pump_tx(io, flags)
            return
        if index == CONTROL_TX_QUEUE:
            self._serve_control_tx()
        elif index == CONTROL_RX_QUEUE:
            self._flush_control()
        else:
            io = self._port_io(index)
            rx_q, tx_q = port_queues(queue_port(index))
            if io is None:
                if index == tx_q:
                    self._discard_tx(index)
                return
            if index == tx_q:
                self._pump_tx(io)
            else:
                was_starved, io.rx_starved = io.rx_starved, False
                self._reconcile(io)
                if was_starved and io.rx_fd is not None:
                    # The host bytes that waited for these buffers go now, not one loop
                    # round later.
                    self._pump_rx(io)

    def reset(self) -> None:
        """The front-end went away or reset the device: forget the guest, keep the ports and
        their host peers (a new front-end session sees the same ports)."""
        events = self.control.reset()
        self._handles.clear()
        self._broken_logged.clear()
        for io in self._io.values():
            io.rx_starved = False
            self._reconcile(io)  # (the pump lets go of the queues)
            if io.pump is not None:
                io.pump.forget_stopped()  # zero copy's chains kept across a queue stop
        self._handle_events(events)

    def snapshot(self) -> dict:
        """JSON state for restart/migration: the control core and each port's endpoint."""
        return {
            "control": self.control.snapshot(),
            "endpoints": {str(io.port.id): str(io.endpoint_config) for io in self._io.values()},
        }

    def restore(self, state: dict) -> None:
        """Load :meth:`snapshot` output: ports, guest state, undelivered control messages.
        Host endpoints are re-created; ports' host state follows the new endpoints."""
        control = ConsoleControl.from_snapshot(state["control"],
                                               name=os.path.basename(self.name))
        for io in list(self._io.values()):
            self._unwatch(io)
            io.removed = True
            io.endpoint.close()
        self._io.clear()
        self.control = control
        endpoints = state.get("endpoints", {})
        for port in control.ports:
            text = endpoints.get(str(port.id))
            endpoint = (Endpoint.parse(text) if text else
                        self._default_endpoint(port.name))
            port.host_connected = False
            self._start_io(port, endpoint)
        self._flush_control()

    # ================================================================ library API
    def add_port(self, name: str, host: Endpoint | str | None = None, *, console: bool = False,
                 port_id: int | None = None, _announce: bool = True) -> Port:
        """Add (hot-plug) a port whose host side is ``host`` (``Endpoint``, ``"listen:PATH"``,
        ``"connect:PATH"``, ``"stdio"``; default ``socket_dir/<name>.sock``).

        Raises the :class:`~virtio.console.errors.PortConfigError` family (bad or duplicate
        name, no free id, no endpoint) or :class:`~virtio.console.host.HostEndpointError`.
        """
        check_port_name(name)
        if self.control.ports.find(name) is not None:
            raise DuplicatePortName(name)
        if isinstance(host, str):
            host = _parse_endpoint(host)
        if host is None:
            host = self._default_endpoint(name)
        self._check_endpoint_free(host)
        cols, rows = (self.config.cols, self.config.rows) if console else (0, 0)
        port = self.control.add_port(name, is_console=console, port_id=port_id,
                                     cols=cols, rows=rows)
        try:
            self._start_io(port, host)
        except Exception:
            self._io.pop(port.id, None)
            self.control.remove_port(port.id)
            raise
        self._log.info("port %d %r added (host %s)", port.id, name, host)
        if _announce:
            self._event(ConsoleEvent.PORT_ADDED, {"id": name, "port": port.id, "host": str(host)})
            self._flush_control()
        return port

    def remove_port(self, name: str) -> Port:
        """Hot-unplug a port by name (``UnknownPort`` if none); works while the guest has it
        open (it sees the port vanish, as with QEMU's device_del)."""
        port = self.control.ports.by_name(name)
        io = self._io.pop(port.id)
        self._tx_ports.pop(port_queues(port.id)[1], None)
        io.removed = True
        if io.pump is not None:
            # Zero copy's chains waiting for the host peer's reads go back now, while the
            # transmitq is still attached: detaching it first (_unwatch) keeps them in
            # flight as for a ring restart, and Linux then detaches them itself.
            io.pump.close()
        self._unwatch(io)
        if io.retry_timer is not None:
            io.retry_timer.cancel()
        self._discard_tx(port_queues(port.id)[1])  # before DEVICE_REMOVE can reach the guest
        events = self.control.remove_port(port.id)
        was_connected = io.endpoint.connected
        io.endpoint.close()
        self._handle_events(events)
        if was_connected:
            self._event(ConsoleEvent.PORT_HOST_DISCONNECTED, {"id": name})
        self._event(ConsoleEvent.PORT_REMOVED, {"id": name, "port": port.id})
        self._log.info("port %d %r removed", port.id, name)
        self._flush_control()
        return port

    def resize(self, name: str, cols: int, rows: int) -> None:
        """A console port's window size changed: RESIZE to the guest (config for port 0)."""
        port = self.control.ports.by_name(name)
        self._handle_events(self.control.resize(port.id, cols, rows))
        self._flush_control()

    def query_ports(self) -> list[dict]:
        """One dict per port, in id order (the ``query-ports`` management answer)."""
        out = []
        for port in self.control.ports:
            io = self._io.get(port.id)
            out.append({
                "id": port.id,
                "name": port.name,
                "console": port.is_console,
                "guest-open": port.guest_open,
                "guest-ready": port.guest_ready,
                "host-connected": port.host_connected,
                "host": str(io.endpoint_config) if io else "",
                "bytes-to-guest": port.bytes_to_guest + (io.pump.bytes_to_guest
                                                         if io and io.pump else 0),
                "bytes-from-guest": port.bytes_from_guest + (io.pump.bytes_from_guest
                                                             if io and io.pump else 0),
                "device": self.name,
            })
        return out

    def register_commands(self, registry: Any) -> None:
        """Register ``query-ports``, ``port-add``, ``port-remove``, ``port-resize``."""
        from .mgmt import register_console_commands

        register_console_commands(registry, self)

    def close(self) -> None:
        """Close every host endpoint (removing listen sockets) and the device's fds."""
        if self.closed:
            return
        self.closed = True
        for io in self._io.values():
            io.removed = True
            self._unwatch(io)  # (the pump lets go of the queues and the host fd)
            if io.pump is not None:
                io.pump.close()
            if io.retry_timer is not None:
                io.retry_timer.cancel()
            io.endpoint.close()
        self._io.clear()
        self._tx_ports.clear()
        os.close(self._devnull)

    # ================================================================ control queues
    def _serve_control_tx(self) -> None:
        """Spec: virtio 1.2 §5.3.6.2; Linux busy-waits for each control buffer, so every
        buffer is returned before its message is even looked at."""
        handle = self._handles.get(CONTROL_TX_QUEUE)
        if handle is None:
            return
        vq = handle.vq
        while True:
            try:
                chain = vq.pop()
            except Exception as exc:  # DriverError: queue latched broken, logged once
                self._log_broken(CONTROL_TX_QUEUE, "control transmitq: %s", exc)
                break
            if chain is None:
                break
            data = chain.read_all()
            vq.push(chain.head, 0, chain.ring_slots)
            handle.notify_if_needed()
            self._handle_events(self.control.receive(data))
        self._flush_control()

    def _flush_control(self) -> None:
        """Put queued control messages into posted control receive buffers, in order."""
        handle = self._handles.get(CONTROL_RX_QUEUE)
        if handle is None or self.control.peek() is None:
            return
        vq = handle.vq
        done = 0
        while (message := self.control.peek()) is not None:
            try:
                chain = vq.pop()
            except Exception as exc:
                self._log_broken(CONTROL_RX_QUEUE, "control receiveq: %s", exc)
                break
            if chain is None:
                break
            if chain.writable_bytes < len(message):
                self._log.warning("control receive buffer of %d bytes for a %d-byte message",
                                  chain.writable_bytes, len(message))
            written = vq.fill(chain, message) if chain.writable_bytes else 0
            if written:
                self.control.consume()
            vq.push(chain.head, written, chain.ring_slots)
            done += 1
        if done:
            handle.notify_if_needed()

    def _handle_events(self, events: list) -> None:
        for event in events:
            if isinstance(event, GuestOpened):
                self._event(ConsoleEvent.VSERPORT_CHANGE, {"id": event.name, "open": True})
                io = self._io.get(event.port_id)
                if io is not None:
                    io.rx_starved = False
                    self._reconcile(io)
            elif isinstance(event, GuestClosed):
                self._event(ConsoleEvent.VSERPORT_CHANGE, {"id": event.name, "open": False})
                io = self._io.get(event.port_id)
                if io is not None:
                    self._reconcile(io)
            elif isinstance(event, ConfigChanged):
                if self.notify_config is not None:
                    self.notify_config()
            elif isinstance(event, DeviceReady):
                self._log.info("guest driver ready%s", " (resumed)" if event.resumed else "")
            elif isinstance(event, (DeviceFailed, PortAddFailed)):
                self._log.warning("guest reported failure: %s", event)

    # ================================================================ ports
    def _port_io(self, index: int) -> _PortIO | None:
        port_id = queue_port(index)
        return None if port_id is None else self._io.get(port_id)

    def _default_endpoint(self, name: str) -> Endpoint:
        if not self.config.socket_dir:
            raise PortConfigError(
                f"port {name!r} has no host endpoint and the device has no socket directory")
        check_port_name(name)  # the name becomes a path component
        return Endpoint("listen", os.path.join(self.config.socket_dir, f"{name}.sock"))

    def _check_endpoint_free(self, host: Endpoint) -> None:
        if host.kind == "stdio":
            if any(io.endpoint_config.kind == "stdio" for io in self._io.values()):
                raise PortConfigError("stdio is already bound to another port")
            return
        path = os.path.abspath(host.path)
        for io in self._io.values():
            other = io.endpoint_config
            if other.kind == host.kind and os.path.abspath(other.path) == path:
                raise PortConfigError(f"{host} is already used by port {io.port.name!r}")

    def _start_io(self, port: Port, host: Endpoint) -> None:
        holder: list[_PortIO] = []
        endpoint = make_endpoint(
            self.loop, host,
            on_state=lambda connected: holder and self._on_host_state(holder[0], connected),
            on_resize=lambda cols, rows: self._on_terminal_resize(holder[0], cols, rows),
        )
        io = _PortIO(port, host, endpoint)
        holder.append(io)
        self._io[port.id] = io
        self._tx_ports[port_queues(port.id)[1]] = io
        endpoint.start()

    def _on_host_state(self, io: _PortIO, connected: bool) -> None:
        if io.removed:
            return
        if not connected:
            self._unwatch(io)  # before the endpoint closes the fds (the pump lets go too)
            io.host_has_data = False
        else:
            self._sync_pump(io)
        self._event(ConsoleEvent.PORT_HOST_CONNECTED if connected
                    else ConsoleEvent.PORT_HOST_DISCONNECTED, {"id": io.port.name})
        self._sync_host(io)
        if connected:
            self._pump_tx(io)
            self._reconcile(io)

    def _sync_host(self, io: _PortIO) -> None:
        """Bring the core's host state (PORT_OPEN to the guest) in line with the endpoint."""
        io.retry_timer = None
        if io.removed:
            return
        try:
            self.control.set_host_connected(io.port.id, io.endpoint.connected)
        except ControlBacklogFull:
            # The guest posts no control buffers: keep the news until it does.
            io.retry_timer = self.loop.call_later(HOST_STATE_RETRY_S,
                                                  lambda: self._sync_host(io))
        self._flush_control()

    def _on_terminal_resize(self, io: _PortIO, cols: int, rows: int) -> None:
        if not io.removed and io.port.is_console:
            self.resize(io.port.name, cols, rows)

    # ================================================================ data path
    def _reconcile(self, io: _PortIO) -> None:
        """Watch the host side for reading exactly when bytes could go to the guest (module
        docstring); otherwise only watch a connected socket for a hang-up."""
        if io.removed:
            return
        port = io.port
        rx_q, _ = port_queues(port.id)
        fd = io.endpoint.read_fd
        want_rx = (fd is not None and port.guest_open and rx_q in self._handles
                   and not io.rx_starved)
        rx_fd = fd if want_rx else None
        if io.rx_fd != rx_fd:
            if io.rx_fd is not None:
                self.loop.remove_reader(io.rx_fd)
            io.rx_fd = rx_fd
            if rx_fd is not None:
                io.host_has_data = False
                self.loop.add_reader(rx_fd, lambda: self._pump_rx(io))
        probe = (fd if fd is not None and not want_rx and not io.host_has_data
                 and io.endpoint.kind in ("listen", "connect") else None)
        if io.probe_fd != probe:
            if io.probe_fd is not None and io.probe_fd != io.rx_fd:
                self.loop.remove_reader(io.probe_fd)
            io.probe_fd = probe
            if probe is not None:
                self.loop.add_reader(probe, lambda: self._probe_host(io))
        self._sync_pump(io)

    def _unwatch(self, io: _PortIO) -> None:
        for fd in {io.rx_fd, io.probe_fd} - {None}:
            self.loop.remove_reader(fd)
        self._watch_writable(io, None)
        io.rx_fd = io.probe_fd = None
        self._sync_pump(io)

    def _probe_host(self, io: _PortIO) -> None:
        """The host socket is readable while nobody in the guest reads: EOF → the peer left;
        data → leave it in the socket and stop probing until the guest reads again."""
        sock = getattr(io.endpoint, "sock", None)
        if io.removed or sock is None:
            return
        try:
            peek = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._log.info("port %r host side: %s", io.port.name, exc)
            io.endpoint.disconnect()
            return
        if not peek:
            io.endpoint.disconnect()
            return
        io.host_has_data = True
        self._reconcile(io)

    def _sync_pump(self, io: _PortIO) -> None:
        """Hand the port's pump its live queues and current host fds. Runs wherever one of
        them changes, before an fd can close: the pump must never hold a closed fd."""
        rx_q, tx_q = port_queues(io.port.id)
        rx, tx = self._handles.get(rx_q), self._handles.get(tx_q)
        tx_vq = None if tx is None or io.removed else tx.vq
        rx_vq = None if rx is None or io.removed else rx.vq
        pump = io.pump
        if pump is None:
            if tx_vq is None and rx_vq is None:
                return
            pump = io.pump = stream_pump_for(tx_vq if tx_vq is not None else rx_vq)
            pump.tx_budget = TX_BUDGET_BYTES
            pump.rx_budget = RX_BUDGET_BYTES
            pump.follow_rx_max = OPPORTUNISTIC_RX_BYTES
            if self.config.zero_copy:
                pump.enable_zero_copy()
        if pump.tx is not tx_vq or pump.rx is not rx_vq:
            # Detach only what changed: detaching the transmitq returns the chains that wait
            # for the host peer's reads (zero copy) before it has read them.
            if pump.rx is not rx_vq:
                pump.rx = None
            if pump.tx is not tx_vq:
                pump.tx = None
            try:
                pump.tx, pump.rx = tx_vq, rx_vq
            except TypeError:  # another ring implementation (a new session): a new pump
                io.port.bytes_from_guest += pump.bytes_from_guest
                io.port.bytes_to_guest += pump.bytes_to_guest
                pump.tx = pump.rx = None
                pump.close()
                io.pump = None
                self._sync_pump(io)
                return
        write_fd = io.endpoint.write_fd
        write_fd = -1 if write_fd is None or io.removed else write_fd
        if pump.write_fd != write_fd:
            pump.write_fd = write_fd
        read_fd = -1 if io.rx_fd is None else io.rx_fd
        if pump.read_fd != read_fd:
            pump.read_fd = read_fd

    def _pump_rx(self, io: _PortIO) -> None:
        """Host → guest: ``readv`` the host socket into the port's posted receive buffers
        (the reader of ``io.rx_fd``, which _reconcile sets only while the receiveq is live)."""
        if io.removed or io.rx_fd is None:
            return
        flags = io.pump.pump_rx()
        if flags:
            self._after_pump_rx(io, flags)

    def _after_pump_rx(self, io: _PortIO, flags: int) -> None:
        if flags & PumpFlag.CALL_ERROR:
            self._log.warning("port %r call eventfd: %s", io.port.name,
                              os.strerror(io.pump.call_errno))
        if flags & PumpFlag.RX_BROKEN:
            self._log_broken(port_queues(io.port.id)[0],
                             "port %r receiveq broken by the guest: %s", io.port.name,
                             io.pump.rx_result.broken.name)
        if flags & (PumpFlag.RX_EOF | PumpFlag.RX_ERROR):
            if flags & PumpFlag.RX_ERROR:
                self._log.info("port %r host read failed: %s", io.port.name,
                               os.strerror(io.pump.rx_result.error))
            io.endpoint.disconnect()
            return
        if flags & (PumpFlag.RX_STARVED | PumpFlag.RX_BROKEN):
            # A broken receiveq takes no bytes until the guest kicks it or it is set up
            # again, like an empty one: stop watching the host socket (a readable socket
            # would wake the loop on every turn).
            io.rx_starved = True
            self._reconcile(io)

    def _pump_tx(self, io: _PortIO) -> None:
        """Guest → host: ``writev`` the port's transmit buffers into the host socket, only as
        fast as it takes them (a short write waits for writability of this socket only)."""
        if io.removed:
            return
        fd = io.endpoint.write_fd
        if fd is None:
            return  # no host peer: the guest's bytes wait in the ring
        handle = self._handles.get(port_queues(io.port.id)[1])
        if io.carry and not self._write_first(io, fd, io.carry):
            return
        if io.emergency and (handle is None or handle.vq.pending is None):
            if not self._write_first(io, fd, io.emergency):
                return
        if handle is None or io.pump is None:
            self._watch_writable(io, None)  # the queue stopped: nothing to wait for
            return
        flags = io.pump.pump_tx()
        if flags or io.tx_fd is not None:
            self._after_pump_tx(io, flags)

    def _after_pump_tx(self, io: _PortIO, flags: int) -> None:
        """What a tx pump call left to do: log, watch writability, go on later, or hand the
        opportunistic read's outcome on (virtio/console/device.py module docstring)."""
        pump = io.pump
        if flags & PumpFlag.KICK_ERROR:
            self._log.warning("port %r kick eventfd: %s", io.port.name,
                              os.strerror(pump.kick_errno))
        if flags & PumpFlag.CALL_ERROR:
            self._log.warning("port %r call eventfd: %s", io.port.name,
                              os.strerror(pump.call_errno))
        flags &= ~(PumpFlag.CALL_ERROR | PumpFlag.KICK_ERROR)
        if flags & PumpFlag.TX_BROKEN:
            self._log_broken(port_queues(io.port.id)[1],
                             "port %r transmitq broken by the guest: %s", io.port.name,
                             pump.tx_result.broken.name)
        if flags & PumpFlag.TX_ERROR:
            error = pump.tx_result.error
            if error not in (errno.EPIPE, errno.ECONNRESET):
                self._log.warning("port %r host write failed: %s", io.port.name,
                                  os.strerror(error))
            self._watch_writable(io, None)
            io.endpoint.disconnect()
            return
        if flags & PumpFlag.TX_DEFERRED:
            # Zero copy: chains wait for the host peer's reads, and each read that frees
            # queued bytes is an edge (a level-triggered writer would spin while the socket
            # has room but the peer is not reading).
            self._watch_writable(io, io.endpoint.write_fd, edge=True)
        else:
            self._watch_writable(io, io.endpoint.write_fd if flags & PumpFlag.TX_BLOCKED
                                 else None)
        if flags & PumpFlag.TX_MORE:
            self.loop.call_soon(lambda: self._pump_tx(io))  # more may wait: yield first
        elif pump.ran_rx and flags:
            self._after_pump_rx(io, flags)

    def _watch_writable(self, io: _PortIO, fd: int | None, edge: bool = False) -> None:
        if io.tx_fd == fd and io.tx_edge == edge:
            return
        if io.tx_fd is not None:
            if io.tx_edge:
                self.loop.remove_edge_writer(io.tx_fd)
            else:
                self.loop.remove_writer(io.tx_fd)
        io.tx_fd, io.tx_edge = fd, edge
        if fd is not None:
            watch = self.loop.add_edge_writer if edge else self.loop.add_writer
            watch(fd, lambda: self._pump_tx(io))

    def _discard_tx(self, index: int) -> None:
        """Complete every chain of a transmitq that has no port (used length 0)."""
        handle = self._handles.get(index)
        if handle is None:
            return
        result = handle.vq.tx_to_fd(self._devnull)
        if result.chains:
            self._log.info("returned %d stale transmit buffers of queue %d", result.chains,
                           index)
        if result.notify:
            handle.notify()

    # ================================================================ emergency write
    def _emergency_write(self, data: bytes) -> None:
        io = self._io.get(CONSOLE_PORT_ID)
        if io is None:
            self.emergency_dropped += len(data)
            self._log.info("emergency write %r with no port 0: dropped", data)
            return
        io.emergency += data
        excess = len(io.emergency) - EMERGENCY_BUFFER_BYTES
        if excess > 0:
            del io.emergency[:excess]
            self.emergency_dropped += excess
        self._pump_tx(io)

    def _write_first(self, io: _PortIO, fd: int, buffer: bytearray) -> bool:
        """Write bytes that go before the ring's (emergency bytes, ``io.carry``); False
        while some remain (the socket is full: wait for it) or the write failed."""
        try:
            n = os.write(fd, buffer)
        except (BlockingIOError, InterruptedError):
            self._watch_writable(io, fd)
            return False
        except OSError:
            io.endpoint.disconnect()
            return False
        del buffer[:n]
        if buffer:
            self._watch_writable(io, fd)
            return False
        return True

    def _log_broken(self, index: int, msg: str, *args: Any) -> None:
        """Log a queue the guest broke once, until the ring is set up again or the device
        resets: every later kick or host byte finds it broken again, and a hostile guest
        must not flood the log (STYLE R5, R11). Spec: virtio 1.2 §2.7.5.2."""
        if index in self._broken_logged:
            return
        self._broken_logged.add(index)
        self._log.error(msg, *args)

    def _event(self, name: ConsoleEvent, data: dict) -> None:
        if self._emit is not None:
            self._emit(name.value, {**data, "device": self.name})


def _parse_endpoint(text: str) -> Endpoint:
    from virtio.config import ConfigError

    try:
        return Endpoint.parse(text, "host")
    except ConfigError as exc:
        raise PortConfigError(str(exc)) from None
