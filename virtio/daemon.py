"""The vmchannel process: one event loop serving every configured device.

``Daemon(config)`` builds the loop, the management server (QMP framing) and, per device, the
device object plus its vhost-user endpoint (``Listener`` when QEMU connects to us,
``Connector`` when QEMU listens). Devices register their management commands with the
registry and emit events through ``emit``; nothing is global, so several daemons can live
in one Python process (tests and embedding do that).

Spec: DESIGN.md "Management"; STYLE R12 (no global state), R13 (one thread, selectors).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from vhost_user.connection import Connector, Listener
from virtio.config import Config
from virtio.loop import EventLoop
from virtio.mgmt import ManagementServer
from virtio.qmp import CommandRegistry

log = logging.getLogger("vmchannel")


class Daemon:
    """Every device of one ``Config`` on one event loop."""

    def __init__(self, config: Config, loop: EventLoop | None = None,
                 virtqueue_factory: Callable[..., Any] | None = None) -> None:
        """``virtqueue_factory`` overrides the ring implementation (tests run both)."""
        self.config = config
        self._session_kwargs = ({"virtqueue_factory": virtqueue_factory}
                                if virtqueue_factory is not None else {})
        self.loop = loop or EventLoop()
        self.registry = CommandRegistry()
        self.mgmt: ManagementServer | None = None
        self.devices: list[tuple[str, Any]] = []  # (kind, device)
        self.endpoints: list[Listener | Connector] = []
        self._started = False
        self._register_builtin_commands()

    # -- assembly -------------------------------------------------------------------------
    def start(self) -> None:
        """Create every socket; raises OSError/ConfigError with the failing path named."""
        if self.config.mgmt_socket:
            _ensure_parent(self.config.mgmt_socket)
            self.mgmt = ManagementServer(self.loop, self.config.mgmt_socket, self.registry)
        for socket_path in self.config.echo_sockets:
            from virtio.echo import EchoDevice

            self._serve("echo", EchoDevice(self.loop, name=os.path.basename(socket_path)),
                        socket_path, "listen")
        for console in self.config.consoles:
            from virtio.console.device import ConsoleDevice

            device = ConsoleDevice(self.loop, console, emit=self.emit)
            endpoint = self._serve("console", device, console.socket, console.mode)
            device.notify_config = _config_notifier(endpoint)
            device.register_commands(self.registry)
        if self.config.vsocks:
            from virtio.vsock.device import VsockBackend

            backend = VsockBackend(self.loop, self.config.vsocks, emit=self.emit)
            for vm in self.config.vsocks:
                self._serve("vsock", backend.device(vm.guest_cid), vm.socket, vm.mode)
            backend.register_commands(self.registry)
            self.devices.append(("vsock-backend", backend))
        self._started = True

    def _serve(self, kind: str, device: Any, path: str, mode: str) -> Listener | Connector:
        _ensure_parent(path)
        endpoint_cls = Listener if mode == "listen" else Connector
        def on_frontend(connected: bool) -> None:
            event = "FRONTEND_CONNECTED" if connected else "FRONTEND_DISCONNECTED"
            self.emit(event, {"socket": path, "device": kind})

        announced = _ResetAnnouncer(
            device, lambda: self.emit("DEVICE_RESET", {"socket": path, "device": kind}))
        endpoint = endpoint_cls(self.loop, path, announced, on_frontend=on_frontend,
                                **self._session_kwargs)
        self.devices.append((kind, device))
        self.endpoints.append(endpoint)
        return endpoint

    def describe(self) -> list[str]:
        lines = [f"{kind} device on {ep.path}" for (kind, _), ep in
                 zip((d for d in self.devices if d[0] != "vsock-backend"), self.endpoints)]
        if self.mgmt is not None:
            lines.append(f"management (QMP) on {self.config.mgmt_socket}")
        return lines

    # -- running --------------------------------------------------------------------------
    def run(self) -> None:
        self.loop.run()

    def stop(self) -> None:
        self.loop.stop()

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()
        for kind, device in self.devices:
            close = getattr(device, "close", None)
            if close is not None:
                close()
        if self.mgmt is not None:
            self.mgmt.close()
        self.endpoints.clear()
        self.devices.clear()

    # -- management -----------------------------------------------------------------------
    def emit(self, event: str, data: dict | None = None) -> None:
        """Send an asynchronous QMP event to every management client (loop thread only)."""
        if self.mgmt is not None:
            self.mgmt.emit(event, data)

    def _register_builtin_commands(self) -> None:
        def query_devices(_args: dict) -> list[dict]:
            out = []
            for (kind, device), endpoint in zip(
                    (d for d in self.devices if d[0] != "vsock-backend"), self.endpoints):
                connection = getattr(endpoint, "connection", None)
                out.append({"type": kind, "socket": endpoint.path,
                            "frontend-connected": connection is not None})
            return out

        self.registry.register("query-devices", query_devices, args_schema={})


class _ResetAnnouncer:
    """The device as the vhost-user session sees it, announcing every reset (RESET_DEVICE,
    front-end gone) as a management event; everything else goes straight to the device."""

    def __init__(self, device: Any, announce: Callable[[], None]) -> None:
        self._device = device
        self._announce = announce
        self.kick = device.kick  # bound once: every guest notification goes through here

    def reset(self) -> None:
        self._device.reset()
        self._announce()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._device, name)


def _config_notifier(endpoint: Listener | Connector) -> Callable[[], None]:
    """VHOST_USER_BACKEND_CONFIG_CHANGE_MSG to whichever front-end is attached now."""
    def notify() -> None:
        if endpoint.connection is not None:
            endpoint.connection.session.notify_config()
    return notify


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)

