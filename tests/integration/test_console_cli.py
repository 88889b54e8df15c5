"""``vmchannel console`` as a separate process: the project's front-end and Linux-like guest
attach to it, a host client talks through a port, and the management socket answers.

Spec: issue 3 point 7 (CLI); QEMU docs/interop/qmp-spec.rst.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support.console_frontend import ConsoleGuest

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_for(path, proc, timeout_s=10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"vmchannel exited: {proc.communicate()[1]}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def qmp_command(path, command: str, arguments: dict | None = None):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.settimeout(5)
        stream = sock.makefile("rwb")
        assert "QMP" in json.loads(stream.readline())
        for msg in ({"execute": "qmp_capabilities"},
                    {"execute": command, **({"arguments": arguments} if arguments else {})}):
            stream.write(json.dumps(msg).encode() + b"\r\n")
            stream.flush()
            while True:
                reply = json.loads(stream.readline())
                if "event" not in reply:
                    break
        return reply


def test_cli_console_serves_a_frontend_and_management(tmp_path):
    vu = tmp_path / "vu.sock"
    mgmt = tmp_path / "mgmt.sock"
    agent = tmp_path / "agent.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtio.cli", "console", "--socket", str(vu),
         "--max-ports", "4", "--port", f"org.qemu.guest_agent.0=listen:{agent}",
         "--port", "spare", "--socket-dir", str(tmp_path / "ports"), "--mgmt", str(mgmt)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for path in (vu, mgmt, agent):
            wait_for(path, proc)
        guest = ConsoleGuest.attach(str(vu), ram_bytes=32 << 20)
        try:
            guest.driver_ok()
            guest.run_until(lambda: {"org.qemu.guest_agent.0", "spare"} <= guest.port_names(),
                            5, "port names")
            host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            host.connect(str(agent))
            host.settimeout(5)
            guest.run_until(lambda: guest.port("org.qemu.guest_agent.0").host_connected, 5,
                            "agent connected")
            guest.open("org.qemu.guest_agent.0")
            host.sendall(b'{"execute":"guest-ping"}\n')
            pid = guest.port_id("org.qemu.guest_agent.0")
            guest.run_until(lambda: guest.io[pid].received >= 25, 5, "request")
            guest.write("org.qemu.guest_agent.0", b'{"return": {}}\n')
            assert host.recv(64) == b'{"return": {}}\n'
            reply = qmp_command(mgmt, "query-ports")
            ports = {p["name"]: p for p in reply["return"]}
            assert ports["org.qemu.guest_agent.0"]["guest-open"] is True
            assert ports["org.qemu.guest_agent.0"]["bytes-from-guest"] == 15
            assert ports["spare"]["host"] == f"listen:{tmp_path / 'ports' / 'spare.sock'}"
            reply = qmp_command(mgmt, "port-add", {"name": "hot"})
            assert reply["return"]["name"] == "hot"
            guest.run_until(lambda: "hot" in guest.port_names(), 5, "hot port")
            host.close()
        finally:
            guest.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    assert not vu.exists() and not agent.exists()


@pytest.mark.parametrize("rest", [["--quick"], ["--quick", "--scenario", "rtt", "--runs", "1"],
                                  ["--", "--quick"], []])
def test_cli_bench_forwards_every_argument_untouched(monkeypatch, rest):
    """`vmchannel bench --quick ...` reaches the harness as is (argparse used to refuse it)."""
    import bench.__main__
    from virtio import cli

    seen = []
    monkeypatch.setattr(bench.__main__, "main", lambda argv: seen.append(argv) or 7)
    assert cli.main(["bench", *rest]) == 7
    assert seen == [rest]
