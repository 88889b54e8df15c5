"""Exceptions raised by the virtio-console device core.

Tree::

    ConsoleError                    base of everything raised here
    ├── PortConfigError             a host-side port request is invalid       .reason
    │   ├── InvalidPortName         name breaks the naming rules              .name
    │   ├── DuplicatePortName       name already in the table                 .name
    │   ├── InvalidMaxPorts         max_nr_ports outside 1..MAX_NR_PORTS      .value, .limit
    │   ├── NoFreePortId            every id 0..max_nr_ports-1 is taken       .max_nr_ports
    │   ├── PortIdInUse             explicit id requested is taken/reserved   .port_id
    │   └── UnknownPort             no port with that id                      .port_id
    ├── ControlProtocolError        guest bytes are not a control message     .raw, .reason
    ├── ControlBacklogFull          too many undelivered control messages     .limit
    └── ConfigAccessError           config space access out of range          .offset, .size

Guest input never escapes as an exception from :class:`virtio.console.control.ConsoleControl`
(it is logged, counted and ignored); :class:`ControlProtocolError` is what the wire parser
raises and the control core converts. Host-side misuse (bad names, full tables) raises the
:class:`PortConfigError` family so management can report it precisely.

Spec: virtio 1.2 §5.3 (Console Device).
"""

from __future__ import annotations

__all__ = [
    "ConfigAccessError",
    "ConsoleError",
    "ControlBacklogFull",
    "ControlProtocolError",
    "DuplicatePortName",
    "InvalidMaxPorts",
    "InvalidPortName",
    "NoFreePortId",
    "PortConfigError",
    "PortIdInUse",
    "UnknownPort",
]


class ConsoleError(Exception):
    """Base class of every exception raised by ``virtio.console``."""


class PortConfigError(ConsoleError):
    """A host-side request about ports (add, remove, limits) cannot be honoured."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidPortName(PortConfigError):
    """The port name breaks the naming rules (see ``virtio.console.ports.check_port_name``)."""

    def __init__(self, name: object, reason: str) -> None:
        super().__init__(f"invalid port name {name!r}: {reason}")
        self.name = name


class DuplicatePortName(PortConfigError):
    """A port with this name already exists on the device."""

    def __init__(self, name: str) -> None:
        super().__init__(f"a port named {name!r} already exists")
        self.name = name


class InvalidMaxPorts(PortConfigError):
    """``max_nr_ports`` is outside ``1..limit``."""

    def __init__(self, value: object, limit: int) -> None:
        super().__init__(f"max_nr_ports must be an integer in 1..{limit}, got {value!r}")
        self.value = value
        self.limit = limit


class NoFreePortId(PortConfigError):
    """Every port id the guest was told about (``max_nr_ports``) is in use."""

    def __init__(self, max_nr_ports: int, reason: str | None = None) -> None:
        super().__init__(reason or f"all {max_nr_ports} port ids are in use")
        self.max_nr_ports = max_nr_ports


class PortIdInUse(PortConfigError):
    """An explicitly requested port id is taken, reserved or out of range."""

    def __init__(self, port_id: int, reason: str) -> None:
        super().__init__(f"port id {port_id}: {reason}")
        self.port_id = port_id


class UnknownPort(PortConfigError):
    """No port with this id (or name) exists."""

    def __init__(self, port_id: int | str) -> None:
        super().__init__(f"no port {port_id!r}")
        self.port_id = port_id


class ControlProtocolError(ConsoleError):
    """Bytes from the guest's control transmitq are not a valid control message.

    ``raw`` holds (at most the first 64 bytes of) the offending buffer.
    """

    def __init__(self, reason: str, raw: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = bytes(raw[:64])


class ControlBacklogFull(ConsoleError):
    """The guest has not posted control receive buffers for ``limit`` queued messages.

    Raised by host-side calls that would queue one more message; the caller should defer the
    host action (for example, not accept a new host connection yet) and retry later. Nothing
    already queued is dropped.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} control messages are waiting for guest receive buffers")
        self.limit = limit


class ConfigAccessError(ConsoleError):
    """A config space read or write falls outside the 12-byte console config structure."""

    def __init__(self, offset: int, size: int, config_size: int) -> None:
        super().__init__(
            f"config access at offset {offset} size {size} outside 0..{config_size}"
        )
        self.offset = offset
        self.size = size
        self.config_size = config_size
