"""The console device's port table: names, ids, per-port state and counters.

Spec: virtio 1.2 §5.3.6.2 (ports are numbered 0..max_nr_ports-1; "The device MUST NOT specify
a port which exists in a VIRTIO_CONSOLE_DEVICE_ADD message, nor a port which is equal or
greater than max_nr_ports").

Rules this table enforces, and why:

* ``max_nr_ports`` is 1..:data:`MAX_NR_PORTS` (127). The device has 2 × (max_nr_ports + 1)
  virtqueues and vhost-user carries the ring index of SET_VRING_KICK/CALL in 8 bits, so queue
  indices stop at 255: 127 ports use 0..255, 128 would need 256 and 257. (virtio/config.py
  applies the same limit.)
* Port id 0 is reserved for a console port, as QEMU's virtio-serial does: a guest that does
  not negotiate MULTIPORT only has port 0 and treats it as its console. Generic ports get ids
  1..max_nr_ports-1. Other console ports (the spec allows several) take any free id.
* Ids are handed out lowest-never-used first, then the id freed longest ago. Reusing a just
  freed id is legal, but the guest may still hold buffers it queued on the removed port's
  transmitq, and a new port on the same id would see them; spreading reuse out keeps that
  window as small as the id space allows.
* Names: see :func:`check_port_name`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import (
    DuplicatePortName,
    InvalidMaxPorts,
    InvalidPortName,
    NoFreePortId,
    PortIdInUse,
    UnknownPort,
)

__all__ = [
    "CONSOLE_PORT_ID",
    "MAX_NR_PORTS",
    "MAX_PORT_NAME_BYTES",
    "Port",
    "PortTable",
    "check_port_name",
]

MAX_NR_PORTS = 127
"""Largest ``max_nr_ports`` a vhost-user console can have (module docstring)."""

CONSOLE_PORT_ID = 0
"""The id reserved for a console port."""

MAX_PORT_NAME_BYTES = 250
"""Port names become ``/dev/virtio-ports/<name>`` (udev symlink) in the guest and
``<name>.sock`` in a managed socket directory on the host: one path component each, so
NAME_MAX (255) minus the 5 bytes of ``.sock``. It also keeps PORT_NAME messages (8-byte header
+ name) far below the page-sized control receive buffers Linux posts."""

_NAME_RE = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9._:-]*")


def check_port_name(name: object) -> str:
    """Return ``name`` if it is a valid port name, else raise :class:`InvalidPortName`.

    A name is 1..250 bytes of ASCII letters, digits, ``.``, ``-``, ``_`` and ``:`` (enough for
    ``org.qemu.guest_agent.0``, ``com.redhat.spice.0``, ``org.libguestfs.channel.0``), not
    starting with ``.``. So it is one safe path component on both sides: no ``/``, no NUL, no
    ``.``/``..``, no hidden files, no whitespace or shell metacharacters.
    """
    if not isinstance(name, str):
        raise InvalidPortName(name, "must be a str")
    if not name:
        raise InvalidPortName(name, "must not be empty")
    if len(name.encode("utf-8")) > MAX_PORT_NAME_BYTES:
        raise InvalidPortName(name, f"longer than {MAX_PORT_NAME_BYTES} bytes")
    if name.startswith("."):
        raise InvalidPortName(name, "must not start with '.'")
    if not _NAME_RE.fullmatch(name):
        raise InvalidPortName(name, "allowed characters are A-Z a-z 0-9 . - _ :")
    return name


@dataclass(slots=True)
class Port:
    """One port and what the device knows of the guest's view of it.

    ``announced``: DEVICE_ADD was queued for the current driver instance (and no
    DEVICE_REMOVE since). ``guest_ready``: the guest answered PORT_READY 1.
    ``add_failed``: it answered PORT_READY 0. ``guest_open``: a guest process has the port open
    (console ports: the guest's hvc attached). ``host_connected``: a host peer is attached.
    ``cols``/``rows``: console size (console ports; 0 = unknown).
    """

    id: int
    name: str
    is_console: bool = False
    host_connected: bool = False
    guest_open: bool = False
    guest_ready: bool = False
    announced: bool = False
    add_failed: bool = False
    cols: int = 0
    rows: int = 0
    bytes_to_guest: int = 0
    bytes_from_guest: int = 0
    bytes_discarded: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Port":
        return cls(**data)


@dataclass(slots=True)
class PortTable:
    """Ports by id and by name, with id allocation (module docstring for the rules)."""

    max_nr_ports: int
    _by_id: dict[int, Port] = field(default_factory=dict, init=False)
    _by_name: dict[str, Port] = field(default_factory=dict, init=False)
    _freed: list[int] = field(default_factory=list, init=False)  # oldest first
    _ever_used: set[int] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        value = self.max_nr_ports
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 1 <= value <= MAX_NR_PORTS
        ):
            raise InvalidMaxPorts(value, MAX_NR_PORTS)

    # -- lookup -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Port]:
        """Ports in id order."""
        return iter([self._by_id[i] for i in sorted(self._by_id)])

    def __contains__(self, port_id: object) -> bool:
        return port_id in self._by_id

    def get(self, port_id: int) -> Port | None:
        return self._by_id.get(port_id)

    def __getitem__(self, port_id: int) -> Port:
        try:
            return self._by_id[port_id]
        except KeyError:
            raise UnknownPort(port_id) from None

    def by_name(self, name: str) -> Port:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownPort(name) from None

    def find(self, name: str) -> Port | None:
        return self._by_name.get(name)

    # -- changes ----------------------------------------------------------------------------
    def add(self, name: str, *, is_console: bool = False, port_id: int | None = None) -> Port:
        """Create a port; its id is ``port_id`` or the next free one (module docstring)."""
        check_port_name(name)
        if name in self._by_name:
            raise DuplicatePortName(name)
        if port_id is None:
            port_id = self._allocate(is_console)
        else:
            self._check_explicit_id(port_id, is_console)
        port = Port(id=port_id, name=name, is_console=is_console)
        self._insert(port)
        return port

    def remove(self, port_id: int) -> Port:
        """Remove a port; its id becomes reusable (after older freed ids)."""
        port = self[port_id]
        del self._by_id[port_id]
        del self._by_name[port.name]
        self._freed.append(port_id)
        return port

    def _insert(self, port: Port) -> None:
        self._by_id[port.id] = port
        self._by_name[port.name] = port
        self._ever_used.add(port.id)
        if port.id in self._freed:
            self._freed.remove(port.id)

    def _check_explicit_id(self, port_id: int, is_console: bool) -> None:
        if not isinstance(port_id, int) or not 0 <= port_id < self.max_nr_ports:
            raise PortIdInUse(port_id, f"outside 0..{self.max_nr_ports - 1}")
        if port_id in self._by_id:
            raise PortIdInUse(port_id, f"taken by {self._by_id[port_id].name!r}")
        if port_id == CONSOLE_PORT_ID and not is_console:
            raise PortIdInUse(port_id, "reserved for a console port")

    def _allocate(self, is_console: bool) -> int:
        if is_console and CONSOLE_PORT_ID not in self._by_id:
            return CONSOLE_PORT_ID
        for port_id in range(1, self.max_nr_ports):
            if port_id not in self._by_id and port_id not in self._ever_used:
                return port_id
        for port_id in self._freed:
            if port_id != CONSOLE_PORT_ID and port_id not in self._by_id:
                return port_id
        if self.max_nr_ports == 1 and not is_console:
            raise NoFreePortId(
                self.max_nr_ports,
                "max_nr_ports is 1 and port 0 is reserved for a console port",
            )
        raise NoFreePortId(self.max_nr_ports)

    # -- state ------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """JSON-able state (ports, allocator history)."""
        return {
            "max_nr_ports": self.max_nr_ports,
            "ports": [p.to_dict() for p in self],
            "freed": list(self._freed),
            "ever_used": sorted(self._ever_used),
        }

    @classmethod
    def from_snapshot(cls, state: dict[str, Any]) -> "PortTable":
        table = cls(int(state["max_nr_ports"]))
        for raw in state["ports"]:
            port = Port.from_dict(raw)
            check_port_name(port.name)
            if port.name in table._by_name:
                raise DuplicatePortName(port.name)
            table._check_explicit_id(port.id, port.is_console)
            table._insert(port)
        table._ever_used.update(int(i) for i in state.get("ever_used", ()))
        table._freed = [
            int(i) for i in state.get("freed", ()) if int(i) not in table._by_id
        ]
        return table
