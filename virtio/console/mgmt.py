"""Management commands of the console device (QMP, through ``virtio.qmp.CommandRegistry``).

Commands (arguments as QAPI-style schemas; ``device`` picks a console when a process serves
several — its vhost-user socket path or that path's file name — and may be left out when
there is one, or when the port name says which):

``query-ports {"*device": "str"}``
    ``[{"id": int, "name": str, "console": bool, "guest-open": bool, "guest-ready": bool,
    "host-connected": bool, "host": "listen:PATH", "bytes-to-guest": int,
    "bytes-from-guest": int, "device": str}, ...]`` in device, then id order.
``port-add {"name": "str", "*host": "str", "*console": "bool", "*device": "str"}``
    hot-plug a port; ``host`` is ``listen:PATH``, ``connect:PATH`` (or ``stdio``); default
    ``SOCKET_DIR/<name>.sock``. Returns the new port's ``query-ports`` entry. Errors
    (``GenericError``): invalid name, duplicate name, all ids in use, no endpoint, socket path
    in use or not creatable.
``port-remove {"name": "str", "*device": "str"}``
    hot-unplug (also while the guest has the port open). ``DeviceNotFound`` if no such port.
``port-resize {"name": "str", "cols": "int", "rows": "int", "*device": "str"}``
    set a console port's window size (RESIZE to the guest).

Several console devices in one process share one set of commands: the first device
registers them, later ones join (:func:`register_console_commands`).

Spec: QEMU docs/interop/qmp-spec.rst (execute/return/error); QEMU's ``VSERPORT_CHANGE``.
"""

from __future__ import annotations

import os
from typing import Any

from virtio.qmp import ErrorClass, QmpCommandError

from .errors import PortConfigError, UnknownPort
from .host import HostEndpointError

__all__ = ["ConsoleCommands", "register_console_commands"]

_DEVICE_ARG = {"*device": "str"}


class ConsoleCommands:
    """The command handlers, over every console device registered with one registry."""

    def __init__(self) -> None:
        self.devices: list[Any] = []

    # -- device selection ---------------------------------------------------------------
    def _select(self, args: dict, port_name: str | None = None) -> Any:
        wanted = args.get("device")
        if wanted is not None:
            for device in self.devices:
                if wanted in (device.name, os.path.basename(device.name)):
                    return device
            raise QmpCommandError(ErrorClass.DeviceNotFound,
                                  f"no console device {wanted!r}")
        live = [d for d in self.devices if not d.closed]
        if len(live) == 1:
            return live[0]
        if port_name is not None:
            owners = [d for d in live if d.control.ports.find(port_name) is not None]
            if len(owners) == 1:
                return owners[0]
        if not live:
            raise QmpCommandError(ErrorClass.DeviceNotFound, "no console device")
        raise QmpCommandError(ErrorClass.GenericError,
                              "several console devices: give 'device'")

    # -- handlers -----------------------------------------------------------------------
    def query_ports(self, args: dict) -> list[dict]:
        devices = [self._select(args)] if "device" in args else self.devices
        out: list[dict] = []
        for device in devices:
            if not device.closed:
                out.extend(device.query_ports())
        return out

    def port_add(self, args: dict) -> dict:
        device = self._select(args)
        name = args["name"]
        try:
            port = device.add_port(name, args.get("host"), console=args.get("console", False))
        except (PortConfigError, HostEndpointError) as exc:
            raise QmpCommandError(ErrorClass.GenericError, str(exc)) from None
        return next(p for p in device.query_ports() if p["id"] == port.id)

    def port_remove(self, args: dict) -> None:
        name = args["name"]
        device = self._select(args, name)
        try:
            device.remove_port(name)
        except UnknownPort:
            raise QmpCommandError(ErrorClass.DeviceNotFound,
                                  f"no port named {name!r}") from None
        return None

    def port_resize(self, args: dict) -> None:
        name = args["name"]
        device = self._select(args, name)
        try:
            device.resize(name, args["cols"], args["rows"])
        except UnknownPort:
            raise QmpCommandError(ErrorClass.DeviceNotFound,
                                  f"no port named {name!r}") from None
        except PortConfigError as exc:
            raise QmpCommandError(ErrorClass.GenericError, str(exc)) from None
        return None


def register_console_commands(registry: Any, device: Any) -> ConsoleCommands:
    """Register the console commands (first device) or add ``device`` to them."""
    existing = registry.get("query-ports")
    if existing is not None:
        commands = getattr(existing.handler, "__self__", None)
        if not isinstance(commands, ConsoleCommands):
            raise ValueError("query-ports is registered by something else")
        commands.devices.append(device)
        return commands
    commands = ConsoleCommands()
    commands.devices.append(device)
    registry.register("query-ports", commands.query_ports, args_schema=_DEVICE_ARG)
    registry.register("port-add", commands.port_add,
                      args_schema={"name": "str", "*host": "str", "*console": "bool",
                                   **_DEVICE_ARG})
    registry.register("port-remove", commands.port_remove,
                      args_schema={"name": "str", **_DEVICE_ARG})
    registry.register("port-resize", commands.port_resize,
                      args_schema={"name": "str", "cols": "int", "rows": "int",
                                   **_DEVICE_ARG})
    return commands
