"""The ``vmchannel`` command as users run it: a separate process per test.

- ``serve`` with no config runs the built-in default configuration (console + vsock +
  management) under ``--run-dir``;
- ``vsock`` with vhost-device-vsock's flags serves a front-end, the hybrid-vsock handshake
  and ``query-vsock-connections``;
- ``qemu-args`` prints arguments QEMU accepts; configuration errors exit 2 with the reason;
- SIGTERM and SIGINT end ``serve`` cleanly (exit 0, sockets removed), SIGINT also when the
  process was started with it ignored, as a shell starts background jobs.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys

import pytest

from tests.integration.test_console_cli import qmp_command, wait_for
from tests.support.vsock_guest import VsockGuest
from vhost_user.frontend import GuestRam

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vmchannel(*args: str, ignore_sigint: bool = False) -> subprocess.Popen:
    def ignored() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.Popen([sys.executable, "-m", "virtio.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignored if ignore_sigint else None)


def stop(proc: subprocess.Popen) -> str:
    """SIGINT, then the exit status and stderr; a process that does not stop within 10 s is
    killed (the test fails) rather than left running after the test."""
    proc.send_signal(signal.SIGINT)
    try:
        _out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
        raise AssertionError(f"did not stop on SIGINT within 10 s: {err}") from None
    assert proc.returncode == 0, err
    return err


def test_serve_runs_the_builtin_default_configuration(tmp_path):
    run = tmp_path / "run"
    proc = vmchannel("serve", "--run-dir", str(run))
    try:
        for name in ("mgmt.sock", "console.sock", "vsock.sock", "vsock",
                     "ports/org.qemu.guest_agent.0.sock", "ports/vmchannel.0.sock"):
            wait_for(run / name, proc)
        assert oct(os.stat(run / "console.sock").st_mode & 0o777) == "0o600"
        devices = qmp_command(run / "mgmt.sock", "query-devices")["return"]
        assert sorted(d["type"] for d in devices) == ["console", "vsock"]
        ports = qmp_command(run / "mgmt.sock", "query-ports")["return"]
        assert {p["name"] for p in ports} == {"org.qemu.guest_agent.0", "vmchannel.0"}
    finally:
        err = stop(proc)
    assert "attach with: qemu-system-x86_64" in err
    assert "vhost-user-vsock-pci" in err and "memory-backend-memfd" in err


def test_vsock_cli_handshake_and_connection_listing(tmp_path):
    vu, uds, mgmt = tmp_path / "vu.sock", tmp_path / "vsock", tmp_path / "mgmt.sock"
    proc = vmchannel("vsock", "--guest-cid", "7", "--socket", str(vu), "--uds-path", str(uds),
                     "--tx-buffer-size", "131072", "--mgmt", str(mgmt))
    ram = GuestRam([(0, 4 << 20)])
    guest = None
    try:
        wait_for(vu, proc)
        wait_for(uds, proc)
        guest = VsockGuest.attach(str(vu), ram)
        assert guest.cid == 7
        guest.listen(1234)
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.settimeout(5)
        host.connect(str(uds))
        host.sendall(b"CONNECT 1234\n")
        conn = guest.accept(1234)
        reply = b""
        while not reply.endswith(b"\n"):
            guest.pump(0.01)
            try:
                reply += host.recv(64)
            except socket.timeout:
                break
        assert reply == b"OK 1234\n"  # the default reply names the guest port
        host.sendall(b"ping")
        guest.run_until(lambda: bytes(conn.received) == b"ping")
        listing = qmp_command(mgmt, "query-vsock-connections")["return"]
        assert [(c["cid"], c["peer-port"], c["bytes-to-guest"]) for c in listing] == [(7, 1234, 4)]
        host.close()
    finally:
        if guest is not None:
            guest.close()
        ram.close()
        stop(proc)


def test_qemu_args_for_a_config_file(tmp_path):
    cfg = tmp_path / "vmc.toml"
    cfg.write_text(
        '[[console]]\nsocket = "/run/c.sock"\nmax_ports = 4\nsocket_dir = "/run/p"\n'
        '[[vsock]]\nguest_cid = 5\nsocket = "/run/v.sock"\nuds_path = "/run/v"\n')
    out = subprocess.run([sys.executable, "-m", "virtio.cli", "qemu-args", "--config", str(cfg),
                          "--memory", "512M"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    args = shlex.split(out)
    assert args[args.index("-object") + 1] == (
        "memory-backend-memfd,id=vmchannel-mem,size=512M,share=on")
    devices = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    assert devices == [
        "vhost-user-test-device-pci,chardev=vmchannel-console0,virtio-id=3,num_vqs=10,"
        "config_size=12",
        "vhost-user-vsock-pci,chardev=vmchannel-vsock5",
    ]


@pytest.mark.parametrize("argv, message", [
    (["console", "--socket", "/tmp/x.sock", "--max-ports", "128"], "out of range 1..127"),
    (["console", "--socket", "/tmp/x.sock", "--port", "../etc"], "not a valid port name"),
    (["vsock", "--guest-cid", "3", "--socket", "/tmp/v"], "--uds-path required"),
    (["vsock", "--vm", "guest-cid=3,socket=a,uds-path=b", "--vm", "guest-cid=3,socket=c,uds-path=d"],
     "duplicate guest CIDs"),
])
def test_configuration_errors_exit_2_with_the_reason(argv, message):
    result = subprocess.run([sys.executable, "-m", "virtio.cli", *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_start_up_failure_names_the_path_and_exits_1(tmp_path):
    taken = tmp_path / "not-a-socket"
    taken.write_text("keep me")
    result = subprocess.run([sys.executable, "-m", "virtio.cli", "console", "--socket", str(taken),
                             "--port", f"p=listen:{tmp_path / 'p.sock'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "cannot start" in result.stderr and str(taken) in result.stderr
    assert "Traceback" not in result.stderr
    assert taken.read_text() == "keep me"


@pytest.mark.parametrize("signum, ignore_sigint", [(signal.SIGTERM, False),
                                                   (signal.SIGINT, True)])
def test_serve_stops_cleanly_on_sigterm_and_on_an_inherited_ignored_sigint(
        tmp_path, signum, ignore_sigint):
    run = tmp_path / "run"
    proc = vmchannel("serve", "--run-dir", str(run), ignore_sigint=ignore_sigint)
    try:
        for name in ("mgmt.sock", "console.sock", "vsock.sock", "vsock"):
            wait_for(run / name, proc)
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    left = [p.name for p in (run / "mgmt.sock", run / "console.sock", run / "vsock.sock",
                             run / "vsock") if p.exists()]
    assert left == []
