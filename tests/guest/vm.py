"""A handle on a real QEMU + Linux test guest, driven over its serial console.

``GuestVM`` boots Debian's QEMU 7.2 under TCG with guest RAM in a shared memfd (what
vhost-user back-ends need to map it), the Debian kernel and the initramfs from
``initramfs.build_guest_image()``. The guest's /init hands ttyS0 to a small shell agent
(``rootfs/bin/guest-agent``); ``run()`` sends it one command line and waits for the
command's begin/end markers, so tests get ``(status, output)`` back.

    image = build_guest_image()
    with GuestVM(image.kernel, image.initramfs) as vm:
        vm.add_vhost_user_vsock(...)   # before start: device options are fixed at boot
        status, out = vm.run("uname -r")

QEMU's serial console is a pipe to this process (``-chardev stdio``); a reader thread
collects everything the guest prints (``console_text()``; also written to
``<workdir>/console.log``), and QEMU's stderr goes to ``<workdir>/qemu.stderr``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple, Sequence

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
READY_MARKER = b"\n@@VMREADY@@\n"
# Grace beyond a command's own timeout before the host gives up on the guest (a TCG guest
# on a loaded 2-CPU machine can stall for tens of seconds).
HOST_GRACE_S = 30.0


class GuestError(RuntimeError):
    """Base class for guest VM failures; ``console_tail`` holds the last console output."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        super().__init__(message + (f"\n--- guest console (tail) ---\n{console_tail}" if console_tail else ""))
        self.console_tail = console_tail


class GuestBootError(GuestError):
    """QEMU exited or the guest never printed its ready marker."""


class GuestTimeout(GuestError):
    """The guest agent did not answer in time (the command may still be running)."""


class GuestCommandError(GuestError):
    """``check()``: a command exited non-zero.  ``.status``, ``.output``."""

    def __init__(self, cmd: str, status: int, output: str) -> None:
        super().__init__(f"guest command {cmd!r} exited {status}:\n{output}")
        self.status = status
        self.output = output


class CommandResult(NamedTuple):
    status: int
    output: str


@dataclasses.dataclass
class BackgroundCommand:
    """A guest command started by ``GuestVM.start_background``.

    Its stdout+stderr go to ``out_path`` in the guest, its exit status to ``rc_path`` when
    it ends. All methods talk to the guest through ``vm.run``.
    """

    vm: "GuestVM"
    name: str
    pid: int
    out_path: str
    rc_path: str

    def output(self) -> str:
        """Everything the command has printed so far."""
        return self.vm.run(f"cat {self.out_path}").output

    def exit_status(self) -> int | None:
        """The exit status, or None while the command runs."""
        res = self.vm.run(f"cat {self.rc_path} 2>/dev/null")
        text = res.output.strip()
        return int(text) if res.status == 0 and text else None

    def running(self) -> bool:
        return self.exit_status() is None

    def wait(self, timeout: float = 60.0, poll_s: float = 0.2) -> CommandResult:
        """Wait until the command ends; returns ``(status, output)``.

        Raises ``GuestTimeout`` if it still runs after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            # One round trip: the status file (if any) then a separator then the output.
            res = self.vm.run(f"cat {self.rc_path} 2>/dev/null; echo '@@RC@@'; cat {self.out_path}")
            rc_text, _, out = res.output.partition("@@RC@@\n")
            if rc_text.strip():
                return CommandResult(int(rc_text.strip()), out)
            if time.monotonic() >= deadline:
                raise GuestTimeout(f"background command {self.name} still running after {timeout} s:\n{out}")
            time.sleep(poll_s)

    def wait_for_output(self, pattern: str, timeout: float = 30.0, poll_s: float = 0.2) -> re.Match:
        """Wait until the output matches ``pattern`` (a regex, searched); returns the match.

        Raises ``GuestTimeout`` on timeout, ``GuestCommandError`` if the command ended
        without printing it.
        """
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            res = self.vm.run(f"cat {self.rc_path} 2>/dev/null; echo '@@RC@@'; cat {self.out_path}")
            rc_text, _, out = res.output.partition("@@RC@@\n")
            m = rx.search(out)
            if m:
                return m
            if rc_text.strip():
                raise GuestCommandError(self.name, int(rc_text.strip()), out)
            if time.monotonic() >= deadline:
                raise GuestTimeout(f"{pattern!r} not in output of {self.name} after {timeout} s:\n{out}")
            time.sleep(poll_s)

    def kill(self, sig: str = "TERM") -> None:
        """Send signal ``sig`` to the command's process group (its children too)."""
        self.vm.run(f"kill -{sig} -{self.pid} 2>/dev/null; true")


class GuestVM:
    """One QEMU process running the test guest. Use as a context manager.

    ``kernel``, ``initramfs``: from ``initramfs.build_guest_image()``.
    ``extra_qemu_args``: appended to the QEMU command line.
    ``mem``: guest RAM size in QEMU syntax; the RAM is a shared memfd backend, so a
    vhost-user back-end can map it.
    ``machine``: QEMU machine type; ``pc`` boots ~1.5 s faster than ``q35`` under TCG.
    ``cmdline``: appended to the kernel command line.
    ``workdir``: where the console log, QEMU stderr and QMP socket go (a fresh temporary
    directory when None, removed by ``stop`` unless VMCHANNEL_KEEP_GUEST_LOGS is set).
    """

    def __init__(
        self,
        kernel: os.PathLike | str,
        initramfs: os.PathLike | str,
        extra_qemu_args: Sequence[str] = (),
        mem: str = "512M",
        *,
        smp: int = 1,
        machine: str = "pc",
        cmdline: str = "",
        boot_timeout: float = 90.0,
        workdir: os.PathLike | str | None = None,
    ) -> None:
        self.kernel = Path(kernel)
        self.initramfs = Path(initramfs)
        self.extra_qemu_args = list(extra_qemu_args)
        self.mem = mem
        self.smp = smp
        self.machine = machine
        self.cmdline = cmdline
        self.boot_timeout = boot_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="guestvm-"))
        self.qmp_path = self.workdir / "qmp.sock"
        self.guest_cid: int | None = None
        self.boot_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._console = bytearray()
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._token = secrets.token_hex(4)
        self._seq = 0
        self._run_lock = threading.Lock()
        self._bg_seq = 0
        self._stderr_file = None
        self._console_log = None
        self._device_seq = 0
        self._eof = False
        self._last_rx = time.monotonic()

    # -- configuration (before start) --------------------------------------------------

    def add_args(self, *args: str) -> None:
        """Append raw QEMU arguments (before ``start``)."""
        self._require_not_started()
        self.extra_qemu_args.extend(args)

    def add_vhost_user_vsock(
        self,
        socket_path: os.PathLike | str,
        guest_cid: int | None = None,
        *,
        reconnect_s: int | None = None,
        **device_opts: str | int | bool,
    ) -> str:
        """Add ``-device vhost-user-vsock-pci`` connected to a back-end at ``socket_path``.

        QEMU is the socket client: the back-end must already listen there when ``start``
        runs (QEMU fails to start otherwise). ``reconnect_s``: QEMU's chardev
        ``reconnect=N`` (it then retries every N s after the back-end goes away).
        QEMU 7.2's device has no guest-cid property: it asks the back-end (GET_CONFIG), so
        ``guest_cid`` is only recorded in ``self.guest_cid`` for the test's convenience.
        ``device_opts`` become device properties, e.g. ``seqpacket="on"``,
        ``packed=True``, ``event_idx=False``. Returns the device id.
        """
        self._require_not_started()
        self._device_seq += 1
        dev_id = f"vuvsock{self._device_seq}"
        chardev = f"socket,id={dev_id}c,path={socket_path}"
        if reconnect_s is not None:
            chardev += f",reconnect={int(reconnect_s)}"
        device = f"vhost-user-vsock-pci,id={dev_id},chardev={dev_id}c"
        for key, value in device_opts.items():
            if isinstance(value, bool):
                value = "on" if value else "off"
            device += f",{key.replace('_', '-') if key not in _UNDERSCORE_PROPS else key}={value}"
        self.extra_qemu_args += ["-chardev", chardev, "-device", device]
        if guest_cid is not None:
            self.guest_cid = guest_cid
        return dev_id

    def add_virtio_serial_port(self, name: str, host_socket: os.PathLike | str) -> str:
        """Add a QEMU built-in virtio-serial port ``name`` whose host side is a UNIX
        socket that QEMU listens on at ``host_socket`` (connect to it after ``start``).
        Returns the chardev id. All ports share one ``virtio-serial-pci`` controller."""
        self._require_not_started()
        if "vser0" not in " ".join(self.extra_qemu_args):
            self.extra_qemu_args += ["-device", "virtio-serial-pci,id=vser0"]
        self._device_seq += 1
        chr_id = f"vport{self._device_seq}"
        self.extra_qemu_args += [
            "-chardev", f"socket,id={chr_id},path={host_socket},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev={chr_id},name={name}",
        ]
        return chr_id

    def qemu_command(self) -> list[str]:
        append = "console=ttyS0 quiet panic=-1 " + self.cmdline
        return [
            QEMU,
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-accel", "tcg", "-cpu", "max", "-smp", str(self.smp),
            "-m", self.mem,
            "-object", f"memory-backend-memfd,id=mem,size={self.mem},share=on",
            "-machine", f"{self.machine},memory-backend=mem",
            "-kernel", str(self.kernel), "-initrd", str(self.initramfs),
            "-append", append.strip(),
            "-chardev", "stdio,id=ser0,signal=off", "-serial", "chardev:ser0",
            "-monitor", "none",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *self.extra_qemu_args,
        ]

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> "GuestVM":
        """Start QEMU and wait until the guest agent is ready (``boot_timeout``)."""
        self._require_not_started()
        cmd = self.qemu_command()
        log.info("starting guest: %s", shlex.join(cmd))
        self._stderr_file = open(self.workdir / "qemu.stderr", "wb")
        self._console_log = open(self.workdir / "console.log", "wb")
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            start_new_session=True,  # a Ctrl-C in the test's terminal is ours to handle
        )
        self._reader = threading.Thread(target=self._read_console, name="guest-console", daemon=True)
        self._reader.start()
        try:
            self._wait_for(lambda: READY_MARKER in self._console, self.boot_timeout, GuestBootError, "boot")
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - t0
        with self._cond:
            del self._console[: self._console.index(READY_MARKER) + len(READY_MARKER)]
        log.info("guest ready in %.1f s", self.boot_seconds)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """Kill QEMU and reap it; returns its exit status. Safe to call twice."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdin:
            try:
                proc.stdin.close()
            except OSError:
                pass
        if self._reader:
            self._reader.join(timeout)
        if proc.stdout:
            proc.stdout.close()
        for f in (self._stderr_file, self._console_log):
            if f:
                f.close()
        self._stderr_file = self._console_log = None
        if self._own_workdir and not os.environ.get("VMCHANNEL_KEEP_GUEST_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        return proc.returncode

    def __enter__(self) -> "GuestVM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def console_text(self) -> str:
        """Console output not yet consumed by commands (kernel messages, stray output)."""
        with self._cond:
            return self._console.decode(errors="replace")

    def qemu_stderr(self) -> str:
        path = self.workdir / "qemu.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- commands --------------------------------------------------------------------------

    def run(self, cmd: str, timeout: float = 30.0) -> CommandResult:
        """Run shell script ``cmd`` in the guest; returns ``(status, output)``.

        stdout and stderr are merged; stdin is /dev/null. The guest kills the command after
        ``timeout`` s (status 137); if the guest does not answer within ``timeout`` +
        HOST_GRACE_S, ``GuestTimeout`` is raised. Thread-safe (commands are serialised).
        """
        if not self.alive():
            raise GuestError("guest is not running", self._tail())
        with self._run_lock:
            self._seq += 1
            cmd_id = f"{self._token}-{self._seq}"
            begin = f"\n@@B:{cmd_id}@@\n".encode()
            end_rx = re.compile(rb"\n@@E:" + cmd_id.encode() + rb":(\d+)@@\n")
            payload = base64.b64encode(cmd.encode()).decode()
            line = f"{cmd_id} {max(1, int(timeout + 0.999))} {payload}\n".encode()
            assert self._proc and self._proc.stdin
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
            found: list[re.Match] = []

            def done() -> bool:
                start = self._console.find(begin)
                if start < 0:
                    return False
                m = end_rx.search(self._console, start + len(begin))
                if m:
                    found.append(m)
                return m is not None

            self._wait_for(done, timeout + HOST_GRACE_S, GuestTimeout, f"command {cmd!r}")
            with self._cond:
                start = self._console.find(begin)
                m = found[-1]
                output = bytes(self._console[start + len(begin) : m.start()])
                status = int(m.group(1))  # before the buffer under the match changes
                del self._console[: m.end()]
            return CommandResult(status, output.decode(errors="replace"))

    def check(self, cmd: str, timeout: float = 30.0) -> str:
        """``run`` and return the output; ``GuestCommandError`` unless it exits 0."""
        status, output = self.run(cmd, timeout)
        if status != 0:
            raise GuestCommandError(cmd, status, output)
        return output

    def start_background(self, cmd: str, name: str | None = None) -> BackgroundCommand:
        """Start ``cmd`` in the guest without waiting; returns a ``BackgroundCommand``.

        The command runs as a new session and process group (``setsid``; ``.pid`` is its
        process group id) with stdout+stderr to ``/tmp/bg/<name>.out``; a wrapper shell
        waits for it and records its exit status in ``/tmp/bg/<name>.rc``.
        """
        self._bg_seq += 1
        name = name or f"bg{self._bg_seq}"
        base = f"/tmp/bg/{name}"
        out_path, rc_path, pid_path, script = f"{base}.out", f"{base}.rc", f"{base}.pid", f"{base}.sh"
        encoded = base64.b64encode(cmd.encode()).decode()
        pid_text = self.check(
            "mkdir -p /tmp/bg\n"
            f"rm -f {rc_path} {pid_path}\n"
            f"printf '%s' {encoded} | base64 -d > {script}\n"
            f"( setsid sh -c 'echo $$ > {pid_path}; exec sh {script}' > {out_path} 2>&1 < /dev/null\n"
            f"  echo $? > {rc_path}.tmp; mv {rc_path}.tmp {rc_path} ) > /dev/null 2>&1 &\n"
            f"while [ ! -s {pid_path} ]; do sleep 0.01; done\n"
            f"cat {pid_path}\n"
        )
        return BackgroundCommand(self, name, int(pid_text.strip()), out_path, rc_path)

    def write_file(self, path: str, data: bytes, chunk: int = 3072) -> None:
        """Write ``data`` to ``path`` in the guest (through the console, so keep it small)."""
        self.check(f": > {shlex.quote(path)}")
        for i in range(0, len(data), chunk):
            encoded = base64.b64encode(data[i : i + chunk]).decode()
            self.check(f"printf '%s' {encoded} | base64 -d >> {shlex.quote(path)}")

    def vsock_helper(self, *args: str | int, name: str | None = None) -> BackgroundCommand:
        """Start ``/bin/vsock_helper ARGS`` in the background (see helper/vsock_helper.c)."""
        cmd = "exec /bin/vsock_helper " + " ".join(shlex.quote(str(a)) for a in args)
        return self.start_background(cmd, name=name)

    def local_cid(self) -> int:
        """The guest's own vsock CID as its kernel reports it (IOCTL_VM_SOCKETS_GET_LOCAL_CID):
        the device's config-space guest_cid once a virtio-vsock device is up; Linux 6.1
        with only the loopback transport active reports 1 (VMADDR_CID_LOCAL)."""
        out = self.check("/bin/vsock_helper cid")
        return int(out.split()[1])

    def start_qga(self, port: int, name: str = "qga") -> BackgroundCommand:
        """Start qemu-guest-agent listening on vsock ``port`` (any CID)."""
        return self.start_background(
            "mkdir -p /run/qga-state\n"
            f"exec /usr/sbin/qemu-ga --method=vsock-listen --path=4294967295:{int(port)} "
            "--statedir=/run/qga-state --pidfile=/run/qga.pid",
            name=name,
        )

    # -- QMP ---------------------------------------------------------------------------------

    def qmp(self, command: str, **arguments) -> dict:
        """Execute one QMP command on a fresh connection; returns ``return`` (or raises
        ``GuestError`` with QMP's error). Events received meanwhile are ignored."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(self.qmp_path))
            f = s.makefile("rwb")
            json.loads(f.readline())  # greeting
            for req in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                f.write(json.dumps(req).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "event" not in reply:
                        break
                if "error" in reply:
                    raise GuestError(f"QMP {req['execute']}: {reply['error']}")
            return reply["return"]

    # -- internals ---------------------------------------------------------------------------

    def _require_not_started(self) -> None:
        if self._proc is not None:
            raise GuestError("the VM is already started; configure devices before start()")

    def _read_console(self) -> None:
        assert self._proc and self._proc.stdout
        fd = self._proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if self._console_log and data:
                self._console_log.write(data)
                self._console_log.flush()
            with self._cond:
                if data:
                    self._console += data
                    self._last_rx = time.monotonic()
                else:
                    self._eof = True
                self._cond.notify_all()
            if not data:
                return

    def _tail(self, n: int = 3000) -> str:
        with self._cond:
            text = self._console[-n:].decode(errors="replace")
        err = self.qemu_stderr()
        return text + (f"\n--- qemu stderr ---\n{err}" if err else "")

    def _wait_for(self, predicate, timeout: float, exc: type[GuestError], what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                if self._eof:
                    raise GuestBootError(
                        f"QEMU exited (status {self._proc.poll() if self._proc else None}) during {what}",
                        self._tail_locked(),
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    idle = time.monotonic() - self._last_rx
                    raise exc(
                        f"timed out after {timeout:.0f} s waiting for {what} "
                        f"(last console output {idle:.1f} s ago)",
                        self._tail_locked(),
                    )
                self._cond.wait(min(left, 1.0))

    def _tail_locked(self, n: int = 3000) -> str:
        text = self._console[-n:].decode(errors="replace")
        err = self.qemu_stderr()
        return text + (f"\n--- qemu stderr ---\n{err}" if err else "")


# vhost-user-vsock-pci properties spelled with underscores in QEMU 7.2.
_UNDERSCORE_PROPS = frozenset({"event_idx", "indirect_desc", "notify_on_empty", "any_layout"})
