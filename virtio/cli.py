"""The ``vmchannel`` command line.

Sub-commands:

``serve [--config FILE]``
    run every device of a TOML config, or the built-in default configuration;
``console --socket VHOST_SOCK [--max-ports N] [--port NAME[=listen:PATH|connect:PATH]]...
[--socket-dir DIR] [--console stdio|listen:PATH] [--no-zero-copy] [--mgmt MGMT_SOCK]``
    one console device;
``vsock --guest-cid CID --socket VHOST_SOCK --uds-path PATH [...] [--vm ...]``
    one or more vsock VMs, flags compatible with rust-vmm's vhost-device-vsock;
``qemu-args [--config FILE | device flags]``
    print the QEMU arguments that attach a configuration;
``bench``
    the end-to-end benchmark harness (``python -m bench``).
"""

from __future__ import annotations

import argparse
import logging
import resource
import shlex
import signal
import sys
import threading
from typing import Sequence

from virtio.config import (
    Config,
    ConfigError,
    ConsoleConfig,
    DEFAULT_MAX_PORTS,
    Endpoint,
    PortConfig,
    VsockConfig,
    default_config,
    default_run_dir,
    load_toml,
)

log = logging.getLogger("vmchannel")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mgmt", metavar="MGMT_SOCK", help="QMP management socket to listen on")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")


def _add_console_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--socket", required=required, metavar="VHOST_SOCK",
                   help="vhost-user socket (we listen unless --connect)")
    p.add_argument("--connect", action="store_true",
                   help="connect to VHOST_SOCK (QEMU -chardev socket,server=on) instead of listening")
    p.add_argument("--max-ports", type=int, default=DEFAULT_MAX_PORTS,
                   help=f"max_nr_ports offered to the guest (1..127, default {DEFAULT_MAX_PORTS})")
    p.add_argument("--port", action="append", default=[], metavar="NAME[=listen:PATH|connect:PATH]",
                   help="a named port and its host endpoint (repeatable)")
    p.add_argument("--socket-dir", metavar="DIR",
                   help="ports without an endpoint listen on DIR/<name>.sock")
    p.add_argument("--console", metavar="stdio|listen:PATH|connect:PATH",
                   help="make port 0 a console bound to our terminal or a socket")
    p.add_argument("--no-zero-copy", action="store_true",
                   help="copy every guest write into the host sockets (default: writes of "
                        "16 KiB and more go by page reference; see README)")


def _add_vsock_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--guest-cid", type=int, help="the guest's CID (>= 3)")
    p.add_argument("--socket", metavar="VHOST_SOCK", help="vhost-user socket")
    p.add_argument("--uds-path", metavar="PATH",
                   help="host UNIX socket for hybrid vsock (host connects here; guest "
                        "connections to port P go to PATH_P)")
    p.add_argument("--tx-buffer-size", type=int, default=256 * 1024,
                   help="per-connection guest->host buffer in bytes (default 256 KiB)")
    p.add_argument("--queue-size", type=int, default=256, help="virtqueue size (default 256)")
    p.add_argument("--groups", default="default",
                   help="'+'-separated groups; VMs sharing a group can reach each other by CID")
    p.add_argument("--connect-timeout", type=float, default=2.0,
                   help="seconds the guest has to accept a host CONNECT (default 2)")
    p.add_argument("--credit-request-delay", type=float, default=0.01, metavar="SECONDS",
                   help="how long a guest may stay silent at zero credit before the "
                        "back-end sends CREDIT_REQUEST (default 0.01; 0 = at once)")
    p.add_argument("--reply-port", choices=("guest", "host"), default="guest",
                   help="port in the 'OK <port>' reply: the guest port (vhost-device-vsock, "
                        "default) or the host-side port assigned (Firecracker)")
    p.add_argument("--vm", action="append", default=[], metavar="guest-cid=..,socket=..,uds-path=..",
                   help="another VM (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmchannel", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the devices of a config file or the default config")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration (default: built-in)")
    serve.add_argument("--run-dir", default=None,
                       help="directory for the default configuration's sockets")
    _add_common(serve)

    console = sub.add_parser("console", help="run one virtio-console device")
    _add_console_flags(console, required=True)
    _add_common(console)

    vsock = sub.add_parser("vsock", help="run virtio-vsock devices")
    _add_vsock_flags(vsock, required=False)
    vsock.add_argument("--config", metavar="FILE", help="TOML configuration")
    _add_common(vsock)

    qargs = sub.add_parser("qemu-args", help="print the QEMU arguments for a configuration")
    qargs.add_argument("--config", metavar="FILE")
    qargs.add_argument("--run-dir", default=None)
    qargs.add_argument("--memory", default="1G", help="guest RAM size for the memfd backend")
    qargs.add_argument("--qemu-version", default="10.2",
                       help="target QEMU version: the console needs >= 10.2 "
                            "(vhost-user-test-device-pci)")

    # Only for --help: main() hands everything after `bench` to bench.__main__ untouched.
    bench = sub.add_parser("bench", help="run the benchmark harness (python -m bench ARGS)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Turn parsed flags into a validated ``Config``."""
    if args.command == "serve" or (args.command == "qemu-args"):
        if args.config:
            return load_toml(args.config)
        return default_config(args.run_dir or default_run_dir())
    if args.command == "console":
        ports = tuple(PortConfig.parse(p) for p in args.port)
        console = ConsoleConfig(
            socket=args.socket,
            mode="connect" if args.connect else "listen",
            max_ports=args.max_ports,
            socket_dir=args.socket_dir,
            console=Endpoint.parse(args.console, "--console") if args.console else None,
            ports=ports,
            zero_copy=not args.no_zero_copy,
        )
        return Config(consoles=(console,), mgmt_socket=args.mgmt)
    if args.command == "vsock":
        vms = []
        base = load_toml(args.config) if args.config else Config()
        if args.guest_cid is not None or args.socket or args.uds_path:
            missing = [f for f, v in (("--guest-cid", args.guest_cid), ("--socket", args.socket),
                                      ("--uds-path", args.uds_path)) if v is None]
            if missing:
                raise ConfigError("vsock", f"{', '.join(missing)} required")
            vms.append(VsockConfig(
                guest_cid=args.guest_cid, socket=args.socket, uds_path=args.uds_path,
                tx_buffer_size=args.tx_buffer_size, queue_size=args.queue_size,
                groups=tuple(args.groups.split("+")), connect_timeout_s=args.connect_timeout,
                reply_port=args.reply_port, credit_request_delay_s=args.credit_request_delay,
            ))
        vms.extend(VsockConfig.parse_vm(v) for v in args.vm)
        vms = list(base.vsocks) + vms
        if not vms:
            raise ConfigError("vsock", "give --guest-cid/--socket/--uds-path, --vm or --config")
        return Config(consoles=base.consoles, vsocks=tuple(vms),
                      mgmt_socket=args.mgmt or base.mgmt_socket)
    raise ConfigError("command", f"no configuration for {args.command}")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Start-up and connection events are worth seeing by default.
    logging.getLogger("vmchannel").setLevel(min(level, logging.INFO))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        # Everything after `bench` belongs to the harness, untouched: argparse's REMAINDER
        # in a sub-parser refuses leading options such as `--quick`.
        from bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"vmchannel: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "qemu-args":
        from virtio.qemu_args import qemu_arg_sets

        for arg_set in qemu_arg_sets(config, memory=args.memory):
            print(" ".join(shlex.quote(a) for a in arg_set))
        return 0
    _setup_logging(args.verbose)
    raise_fd_limit()
    from virtio.daemon import Daemon

    from vhost_user.errors import BackendError
    from virtio.console.errors import ConsoleError

    daemon = Daemon(config)
    previous = _stop_on_signals(daemon)  # before start: its sockets appear during it
    try:
        daemon.start()
    except (OSError, ConfigError, ConsoleError, BackendError) as exc:
        print(f"vmchannel: cannot start: {exc}", file=sys.stderr)
        _restore(previous)
        daemon.close()
        return 1
    for line in daemon.describe():
        log.info("%s", line)
    if args.command == "serve" and not args.config:
        from virtio.qemu_args import qemu_arg_sets

        for arg_set in qemu_arg_sets(config, memory="1G"):
            log.info("attach with: qemu-system-x86_64 %s",
                     " ".join(shlex.quote(a) for a in arg_set))
    try:
        daemon.run()
    except KeyboardInterrupt:
        pass
    finally:
        _restore(previous)
        daemon.close()
    return 0


#: The soft open-file limit the daemon asks for (never above the hard limit).
FD_LIMIT_WANTED = 1 << 16


def raise_fd_limit(wanted: int = FD_LIMIT_WANTED) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (capped by the hard limit), as
    servers of many fds do, and return the soft limit now in force. Each console port uses
    up to nine fds (listen and peer sockets, the zero-copy pipe, an edge-watch duplicate and
    its queues' kick and call eventfds): 127 ports pass the common default of 1,024, and a
    front-end's SET_VRING_KICK whose fd cannot be received would drop its connection. An
    event loop on epoll has no FD_SETSIZE bound."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


#: The signals that end ``serve`` cleanly (sockets removed, exit status 0): SIGTERM from a
#: service manager, SIGINT from a terminal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _stop_on_signals(daemon) -> dict:
    """Make SIGTERM and SIGINT stop ``daemon``'s loop; returns what to restore.

    Installed explicitly, not left to Python's default: SIGTERM's default kills the process
    without removing its sockets, and a shell starts background jobs with SIGINT ignored,
    which Python then leaves ignored (so Ctrl-C or ``kill -INT`` did nothing). The loop's
    wake-up pipe is the signal wake-up fd: a signal arriving just before ``epoll_wait``
    would otherwise leave its handler waiting for the next event (seen: 1 stop in 15 hung).
    Only the main thread may set handlers; elsewhere (an embedding program) nothing is
    changed."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    saved = {signum: signal.signal(signum, lambda _signum, _frame: daemon.stop())
             for signum in STOP_SIGNALS}
    saved["wakeup_fd"] = signal.set_wakeup_fd(daemon.loop.wakeup_fd, warn_on_full_buffer=False)
    return saved


def _restore(saved: dict) -> None:
    if "wakeup_fd" in saved:
        signal.set_wakeup_fd(saved.pop("wakeup_fd"))
    for signum, handler in saved.items():
        signal.signal(signum, handler)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
