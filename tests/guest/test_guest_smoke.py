"""Smoke test of the real-guest harness, independent of vmchannel's back-end.

One guest boots with QEMU's built-in virtio-serial port ``org.test.0``: this proves the
kernel, the module load order, the initramfs and the serial command channel work, that
guest port names are found in sysfs, that bytes cross the port both ways, and that the
vsock helper and qemu-ga run in the guest (vsock over the guest's loopback transport).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.guest.pattern import crc32, message, parse_helper_output, stream_pattern
from tests.guest.vm import GuestBootError, GuestVM

pytestmark = pytest.mark.guest

PORT_NAME = "org.test.0"


@pytest.fixture(scope="module")
def serial_guest(guest_image):
    """One guest for the whole module (one boot), with port org.test.0 on a host socket."""
    workdir = Path(tempfile.mkdtemp(prefix="gsmoke-"))
    host_sock = workdir / "port0.sock"
    vm = GuestVM(guest_image.kernel, guest_image.initramfs, workdir=workdir)
    vm.add_virtio_serial_port(PORT_NAME, host_sock)
    with vm:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(20)
        conn.connect(str(host_sock))
        yield vm, conn
        conn.close()
    assert not vm.alive()
    shutil.rmtree(workdir, ignore_errors=True)


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_guest_boots_and_runs_commands(serial_guest):
    vm, _ = serial_guest
    assert vm.boot_seconds is not None and vm.boot_seconds < 60
    assert vm.run("uname -r").output.strip().startswith("6.1.")
    assert vm.run("printf 'a\\nb'; echo err >&2; exit 3") == (3, "a\nberr\n")
    loaded = vm.check("cut -d' ' -f1 /proc/modules").split()
    for module in ("virtio_console", "vmw_vsock_virtio_transport", "vsock_loopback"):
        assert module in loaded
    # The guest kills a command at its timeout and the channel stays in step.
    started = time.monotonic()
    assert vm.run("sleep 30", timeout=2).status == 137
    assert time.monotonic() - started < 15
    assert vm.run("echo still-here") == (0, "still-here\n")
    # Background commands: status recorded, process group killable.
    sleeper = vm.start_background("sleep 100")
    assert sleeper.running()
    sleeper.kill("KILL")
    assert sleeper.wait(timeout=10).status == 137
    assert vm.start_background("echo out; exit 5").wait(timeout=10) == (5, "out\n")


def test_virtio_serial_port_name_and_data_both_ways(serial_guest):
    vm, conn = serial_guest
    names = vm.check("cat /sys/class/virtio-ports/*/name").split()
    assert names == [PORT_NAME]

    # guest -> host
    vm.check("for p in /dev/vport*p1; do printf 'hello-from-guest' > $p; done")
    assert recv_exactly(conn, 16) == b"hello-from-guest"

    # host -> guest: a reader in the guest, then bytes from the host
    payload = stream_pattern(3000, seed=7)
    reader = vm.start_background("head -c 3000 /dev/vport*p1 | sha256sum")
    time.sleep(0.5)  # let the guest open the port (QEMU then accepts host bytes)
    conn.sendall(payload)
    status, output = reader.wait(timeout=30)
    assert status == 0
    assert output.split()[0] == hashlib.sha256(payload).hexdigest()


def test_vsock_helper_over_guest_loopback(serial_guest):
    vm, _ = serial_guest
    server = vm.vsock_helper("listen", "-p", 5000, "-k", 4, "-a", "echo", "-w", 60)
    server.wait_for_output(r"LISTENING port=5000")
    client = vm.vsock_helper("connect", "-c", 1, "-p", 5000, "-k", 4, "-a", "roundtrip",
                             "-n", 100_000, "-s", 11, "-w", 60)
    status, output = client.wait(timeout=90)
    report = parse_helper_output(output)
    assert status == 0, output
    assert report.ok and len(report.conns) == 4
    for conn in report.conns:
        assert conn.rcvd == 100_000
        assert conn.crc32_rx == crc32(stream_pattern(100_000, seed=11 + conn.idx))
    assert server.wait(timeout=30).status == 0
    assert vm.local_cid() == 1  # no virtio-vsock device: the loopback's VMADDR_CID_LOCAL

    # SEQPACKET: the host-side message model (sizes, contents) matches the helper's.
    seq_server = vm.vsock_helper("listen", "-t", "seqpacket", "-p", 5001, "-a", "recv",
                                 "-m", 50, "-z", 2000, "-s", 5)
    seq_server.wait_for_output(r"LISTENING port=5001")
    seq_client = vm.vsock_helper("connect", "-t", "seqpacket", "-c", 1, "-p", 5001,
                                 "-a", "send", "-m", 50, "-z", 2000, "-s", 5)
    status, output = seq_server.wait(timeout=60)
    assert status == 0, output
    expected = b"".join(message(5, j, 2000) for j in range(50))
    (conn,) = parse_helper_output(output).conns
    assert (conn.msgs_rcvd, conn.rcvd, conn.crc32_rx) == (50, len(expected), crc32(expected))
    assert seq_client.wait(timeout=30).status == 0

    # Many concurrent SEQPACKET connections through one poll loop, echoed back.
    seq_echo = vm.vsock_helper("listen", "-t", "seqpacket", "-p", 5003, "-k", 16, "-a", "echo")
    seq_echo.wait_for_output(r"LISTENING port=5003")
    seq_rt = vm.vsock_helper("connect", "-t", "seqpacket", "-c", 1, "-p", 5003, "-k", 16,
                             "-a", "roundtrip", "-m", 20, "-z", 3000)
    status, output = seq_rt.wait(timeout=60)
    report = parse_helper_output(output)
    assert status == 0 and report.ok, output
    assert [c.msgs_rcvd for c in report.conns] == [20] * 16
    assert seq_echo.wait(timeout=30).status == 0


def test_helper_detects_corruption(serial_guest):
    """A receiver expecting a different seed must fail: the checker can fail."""
    vm, _ = serial_guest
    server = vm.vsock_helper("listen", "-p", 5002, "-a", "recv", "-n", 5000, "-s", 1)
    server.wait_for_output("LISTENING")
    vm.vsock_helper("connect", "-c", 1, "-p", 5002, "-a", "send", "-n", 5000, "-s", 2)
    status, output = server.wait(timeout=60)
    assert status == 1
    assert "pattern_mismatch_at_byte_0" in output


def test_qemu_guest_agent_starts(serial_guest):
    """qemu-ga loads its shared libraries, opens its vsock listener and keeps running."""
    vm, _ = serial_guest
    qga = vm.start_qga(port=1234)
    deadline = time.monotonic() + 20
    while vm.run("test -s /run/qga-state/qga.state").status != 0:
        assert qga.running(), qga.output()
        assert time.monotonic() < deadline, qga.output()
        time.sleep(0.3)
    time.sleep(1)
    assert qga.running(), qga.output()
    assert "qemu-ga" in vm.check("ps")
    qga.kill("TERM")
    assert qga.wait(timeout=10).status == 0  # qemu-ga exits cleanly on SIGTERM
    assert "qemu-ga" not in vm.check("ps")


def test_process_group_teardown(guest_vm_factory):
    """The factory's VMs are gone (QEMU reaped) after stop; stop is idempotent."""
    vm = guest_vm_factory()
    pid = vm.pid
    assert vm.run("echo ok") == (0, "ok\n")
    vm.stop()
    assert not vm.alive()
    assert vm.stop() == vm._proc.returncode
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_vhost_user_vsock_device_dials_the_backend_socket(guest_vm_factory, guest_tmp):
    """QEMU started with ``add_vhost_user_vsock`` connects to the back-end socket and
    opens with VHOST_USER_GET_FEATURES (request 1); a back-end that then hangs up makes
    the boot fail with GuestBootError carrying QEMU's complaint."""
    path = guest_tmp / "vhost.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(30)
    seen: list[bytes] = []

    def fake_backend() -> None:
        conn, _ = listener.accept()
        with conn:
            seen.append(conn.recv(12))  # vhost-user header: request, flags, size (u32 each)

    thread = threading.Thread(target=fake_backend)
    thread.start()
    vm = guest_vm_factory(start=False, vhost_user_vsock=path, guest_cid=3, boot_timeout=30)
    assert vm.guest_cid == 3
    assert any("vhost-user-vsock-pci" in a for a in vm.qemu_command())
    with pytest.raises(GuestBootError) as err:
        vm.start()
    thread.join(10)
    listener.close()
    request, flags, size = struct.unpack("=III", seen[0])
    assert (request, size) == (1, 0)  # VHOST_USER_GET_FEATURES, no payload
    assert flags & 0x3 == 0x1  # version 1
    assert "vhost" in err.value.console_tail.lower()
    assert not vm.alive()
