"""Configuration of a vmchannel process: devices, host endpoints, management socket.

A process serves any number of devices. Configuration comes from command-line flags
(``virtio.cli``) or a TOML file (``load_toml``); both produce the same frozen dataclasses,
validated here once, so the devices never see malformed settings.

TOML layout (every key optional unless marked)::

    [management]
    socket = "/run/vmchannel/mgmt.sock"

    [[console]]
    socket = "/run/vmchannel/console.sock"     # required: the vhost-user socket
    mode = "listen"                            # listen (QEMU connects) | connect (QEMU server=on)
    max_ports = 31                             # 1..127
    socket_dir = "/run/vmchannel/ports"        # ports without an endpoint get DIR/<name>.sock
    console = "stdio"                          # port 0 as a console on our terminal, or an endpoint
    zero_copy = true                           # large guest writes reach AF_UNIX peers by page
                                               # reference; buffers return once the peer read them
      [[console.port]]
      name = "org.qemu.guest_agent.0"          # required
      host = "listen:/run/qga.sock"            # or connect:PATH; default: socket_dir

    [[vsock]]
    guest_cid = 3                              # required, >= 3
    socket = "/run/vmchannel/vsock3.sock"      # required
    uds_path = "/run/vmchannel/vsock3"         # required
    groups = ["default"]
    tx_buffer_size = 262144
    queue_size = 256
    credit_request_delay_s = 0.01              # silence at zero credit before CREDIT_REQUEST
    stream_loop_after = 1048576                # bytes to the guest before the C stream loop (-1 never)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

MAX_CONSOLE_PORTS = 127
"""Deliberate deviation from the "up to 128" in DESIGN.md: VHOST_USER_SET_VRING_KICK/CALL/ERR
carry the ring index in bits 0-7 (vhost-user "VHOST_USER_SET_VRING_KICK"), so queue indices
stop at 255. ``max_nr_ports`` ports need 2 * (max_nr_ports + 1) queues: 127 ports use indices
0..255, while 128 ports would need 256 and 257, which QEMU masks to 0 and 1 (it would wire
port 127's kick to port 0). 127 is the largest count that works."""

DEFAULT_MAX_PORTS = 31
"""QEMU's virtio-serial default ``max_ports`` is 31."""



class ConfigError(ValueError):
    """A configuration value is invalid; ``.key`` names the setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The host side of a port: we listen on ``path`` or connect to it."""

    kind: str  # "listen" | "connect" | "stdio"
    path: str = ""

    @classmethod
    def parse(cls, text: str, key: str = "endpoint") -> "Endpoint":
        if text == "stdio":
            return cls("stdio")
        kind, sep, path = text.partition(":")
        if not sep or kind not in ("listen", "connect") or not path:
            raise ConfigError(key, f"expected listen:PATH, connect:PATH or stdio, got {text!r}")
        return cls(kind, path)

    def __str__(self) -> str:
        return self.kind if self.kind == "stdio" else f"{self.kind}:{self.path}"


@dataclass(frozen=True, slots=True)
class PortConfig:
    name: str
    host: Endpoint | None = None
    console: bool = False

    @classmethod
    def parse(cls, text: str) -> "PortConfig":
        """``NAME[=listen:PATH|connect:PATH]`` as given to ``--port``."""
        name, sep, endpoint = text.partition("=")
        check_port_name(name)
        return cls(name, Endpoint.parse(endpoint, f"--port {name}") if sep else None)


def check_port_name(name: str) -> None:
    """Port names become ``/dev/virtio-ports/<name>`` in the guest and ``<name>.sock`` in a
    socket directory; the console package owns the rule (``virtio.console.ports``)."""
    from virtio.console.errors import InvalidPortName
    from virtio.console.ports import check_port_name as console_check

    try:
        console_check(name)
    except InvalidPortName as exc:
        raise ConfigError("port name", f"{name!r} is not a valid port name: {exc}") from None


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    socket: str
    mode: str = "listen"
    max_ports: int = DEFAULT_MAX_PORTS
    socket_dir: str | None = None
    console: Endpoint | None = None
    ports: tuple[PortConfig, ...] = ()
    cols: int = 80
    rows: int = 25
    zero_copy: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.zero_copy, bool):
            raise ConfigError("console.zero_copy", f"must be true or false, got {self.zero_copy!r}")
        if self.mode not in ("listen", "connect"):
            raise ConfigError("console.mode", f"must be listen or connect, got {self.mode!r}")
        if not 1 <= self.max_ports <= MAX_CONSOLE_PORTS:
            raise ConfigError(
                "console.max_ports",
                f"{self.max_ports} is out of range 1..{MAX_CONSOLE_PORTS} "
                "(vhost-user carries queue indices in 8 bits)",
            )
        names = [p.name for p in self.ports]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError("console.port", f"duplicate port names: {', '.join(dupes)}")
        consoles = sum(1 for p in self.ports if p.console) + (1 if self.console else 0)
        if consoles > 1:
            raise ConfigError("console.port", "at most one console port (it takes port id 0)")
        # Port id 0 is reserved for a console port, as in QEMU's virtio-serial: ordinary
        # ports get ids 1..max_ports-1.
        ordinary = len(self.ports) - sum(1 for p in self.ports if p.console)
        if ordinary > self.max_ports - 1:
            raise ConfigError(
                "console.port",
                f"{ordinary} ports configured but max_ports {self.max_ports} leaves room for "
                f"{self.max_ports - 1} (port id 0 is reserved for a console port)",
            )
        if self.socket_dir is None and any(p.host is None for p in self.ports):
            missing = [p.name for p in self.ports if p.host is None]
            raise ConfigError(
                "console.port",
                f"ports {missing} have no host endpoint: give NAME=listen:PATH or --socket-dir",
            )

    @property
    def num_queues(self) -> int:
        return 2 * (self.max_ports + 1)

    def endpoint_for(self, port: PortConfig) -> Endpoint:
        if port.host is not None:
            return port.host
        assert self.socket_dir is not None
        return Endpoint("listen", os.path.join(self.socket_dir, f"{port.name}.sock"))


@dataclass(frozen=True, slots=True)
class VsockConfig:
    guest_cid: int
    socket: str
    uds_path: str
    mode: str = "listen"
    groups: tuple[str, ...] = ("default",)
    tx_buffer_size: int = 256 * 1024
    queue_size: int = 256
    connect_timeout_s: float = 2.0
    reply_port: str = "guest"  # "guest" (vhost-device-vsock) | "host" (Firecracker)
    max_connections: int = 4096
    #: seconds a guest may stay silent at zero credit before we send CREDIT_REQUEST
    #: (0: at once); see virtio.vsock.conn.ConnConfig
    credit_request_delay_s: float = 0.01
    #: bytes a connection moves to the guest before its steady host->guest stream is served
    #: by the C stream loop (virtio/vsock/stream_loop.py); -1: never, 0: at once
    stream_loop_after: int = 1 << 20

    def __post_init__(self) -> None:
        if not 3 <= self.guest_cid < 0xFFFFFFFF:
            raise ConfigError("vsock.guest_cid", f"{self.guest_cid} must be in 3..2^32-2")
        if self.mode not in ("listen", "connect"):
            raise ConfigError("vsock.mode", f"must be listen or connect, got {self.mode!r}")
        if self.reply_port not in ("guest", "host"):
            raise ConfigError("vsock.reply_port", "must be guest or host")
        if not 4096 <= self.tx_buffer_size <= 64 * 1024 * 1024:
            raise ConfigError("vsock.tx_buffer_size", "must be 4 KiB..64 MiB")
        if self.queue_size & (self.queue_size - 1) or not 2 <= self.queue_size <= 32768:
            raise ConfigError("vsock.queue_size", "must be a power of two in 2..32768")
        if not 0 <= self.credit_request_delay_s <= 60:
            raise ConfigError("vsock.credit_request_delay_s", "must be 0..60 seconds")
        if self.stream_loop_after < -1:
            raise ConfigError("vsock.stream_loop_after", "must be -1 (never) or a byte count")

    @classmethod
    def parse_vm(cls, text: str) -> "VsockConfig":
        """``guest-cid=3,socket=PATH,uds-path=PATH[,groups=a+b][,...]`` as ``--vm`` takes."""
        fields: dict[str, Any] = {}
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError("--vm", f"expected key=value, got {item!r}")
            fields[key.replace("-", "_")] = value
        return cls.from_mapping(fields, "--vm")

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], key: str = "vsock") -> "VsockConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(key, f"unknown settings: {', '.join(unknown)}")
        for required in ("guest_cid", "socket", "uds_path"):
            if required not in raw:
                raise ConfigError(key, f"{required.replace('_', '-')} is required")
        values = dict(raw)
        try:
            for name in ("guest_cid", "tx_buffer_size", "queue_size", "max_connections",
                         "stream_loop_after"):
                if name in values:
                    values[name] = int(values[name])
            for name in ("connect_timeout_s", "credit_request_delay_s"):
                if name in values:
                    values[name] = float(values[name])
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
        if isinstance(values.get("groups"), str):
            values["groups"] = tuple(values["groups"].split("+"))
        elif "groups" in values:
            values["groups"] = tuple(values["groups"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Config:
    consoles: tuple[ConsoleConfig, ...] = ()
    vsocks: tuple[VsockConfig, ...] = ()
    mgmt_socket: str | None = None
    echo_sockets: tuple[str, ...] = field(default=())  # test device (foundation)

    def __post_init__(self) -> None:
        cids = [v.guest_cid for v in self.vsocks]
        dupes = sorted({c for c in cids if cids.count(c) > 1})
        if dupes:
            raise ConfigError("vsock.guest_cid", f"duplicate guest CIDs: {dupes}")
        sockets = [c.socket for c in self.consoles] + [v.socket for v in self.vsocks]
        sockets += list(self.echo_sockets)
        dup_sockets = sorted({s for s in sockets if sockets.count(s) > 1})
        if dup_sockets:
            raise ConfigError("socket", f"vhost-user socket used twice: {dup_sockets}")


def _console_from_mapping(raw: dict[str, Any]) -> ConsoleConfig:
    raw = dict(raw)
    if "socket" not in raw:
        raise ConfigError("console", "socket is required")
    ports = []
    for item in raw.pop("port", []):
        if "name" not in item:
            raise ConfigError("console.port", "name is required")
        check_port_name(item["name"])
        host = Endpoint.parse(item["host"], f"port {item['name']}") if "host" in item else None
        ports.append(PortConfig(item["name"], host, bool(item.get("console", False))))
    console = raw.pop("console", None)
    known = {f.name for f in dataclasses.fields(ConsoleConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError("console", f"unknown settings: {', '.join(unknown)}")
    return ConsoleConfig(
        ports=tuple(ports),
        console=Endpoint.parse(console, "console.console") if console else None,
        **raw,
    )


def load_toml(path: str | Path) -> Config:
    """Read a TOML configuration file (layout in the module docstring)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"management", "console", "vsock", "echo"})
    if unknown:
        raise ConfigError(str(path), f"unknown sections: {', '.join(unknown)}")
    return Config(
        consoles=tuple(_console_from_mapping(c) for c in raw.get("console", [])),
        vsocks=tuple(VsockConfig.from_mapping(v) for v in raw.get("vsock", [])),
        mgmt_socket=raw.get("management", {}).get("socket"),
        echo_sockets=tuple(e["socket"] for e in raw.get("echo", [])),
    )


def default_config(run_dir: str) -> Config:
    """The built-in configuration ``vmchannel serve`` uses without ``--config``: one console
    device with the guest-agent port and a spare port in ``run_dir/ports``, one vsock VM with
    CID 3, and the management socket, all under ``run_dir``."""
    return Config(
        consoles=(
            ConsoleConfig(
                socket=os.path.join(run_dir, "console.sock"),
                socket_dir=os.path.join(run_dir, "ports"),
                ports=(PortConfig("org.qemu.guest_agent.0"), PortConfig("vmchannel.0")),
            ),
        ),
        vsocks=(
            VsockConfig(
                guest_cid=3,
                socket=os.path.join(run_dir, "vsock.sock"),
                uds_path=os.path.join(run_dir, "vsock"),
            ),
        ),
        mgmt_socket=os.path.join(run_dir, "mgmt.sock"),
    )


def default_run_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vmchannel-{os.getuid()}"
    return os.path.join(base, "vmchannel") if "XDG_RUNTIME_DIR" in os.environ else base
