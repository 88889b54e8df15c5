"""The management socket driven by QEMU's own client library and qmp-shell.

Spec: QEMU docs/interop/qmp-spec.rst. The server (virtio/mgmt.py) runs its event loop in a
thread; the tests talk to it over a real UNIX socket with ``qemu.qmp.QMPClient`` (asyncio),
raw sockets, and the ``qmp-shell`` console script fed through a pipe.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from virtio.loop import EventLoop
from virtio.mgmt import ManagementServer
from virtio.qmp import CommandRegistry, ErrorClass, QmpCommandError

qmp = pytest.importorskip("qemu.qmp")

pytestmark = pytest.mark.timeout(60)


class Harness:
    """A ManagementServer with demo commands, its loop running in a thread."""

    def __init__(self, path: str, **server_kw) -> None:
        self.loop = EventLoop()
        self.registry = CommandRegistry()
        self.quits = threading.Event()
        self.registry.register("demo-add", lambda a: a["a"] + a["b"],
                               args_schema={"a": "int", "b": "int"})
        self.registry.register("demo-emit", self._demo_emit,
                               args_schema={"port": "str", "*size": "int"})
        self.registry.register("demo-fail", self._demo_fail, args_schema={"id": "str"})
        if server_kw.pop("quit", False):
            server_kw["on_quit"] = self.quits.set
        self.server = ManagementServer(self.loop, path, self.registry, **server_kw)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)

    def _demo_emit(self, args):
        data = {"port": args["port"], "pad": "x" * args.get("size", 0)}
        self.server.emit("DEMO_PORT_OPEN", data)
        return {"emitted": True}

    @staticmethod
    def _demo_fail(args):
        raise QmpCommandError(ErrorClass.DeviceNotFound, f"Device '{args['id']}' not found")

    def call(self, fn, timeout_s: float = 5.0):
        """Run ``fn`` on the loop thread and return its result."""
        done = threading.Event()
        box = []
        self.loop.call_soon(lambda: (box.append(fn()), done.set()))
        assert done.wait(timeout_s), "loop did not run the call"
        return box[0]

    def stop(self) -> None:
        self.call(self.server.close)
        self.loop.call_soon(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@contextmanager
def running_server(path: str, **server_kw):
    harness = Harness(path, **server_kw)
    harness.thread.start()
    try:
        yield harness
    finally:
        harness.stop()


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "mgmt.sock")


def raw_client(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    return sock


def read_message(sock: socket.socket, buf: bytearray) -> dict:
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\r\n")
    buf[:] = rest
    return json.loads(line)


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# -- qemu.qmp ---------------------------------------------------------------------------

def test_qemu_qmp_client_executes_receives_event_and_error_class(sock_path):
    async def session():
        client = qmp.QMPClient("test")
        await client.connect(sock_path)
        try:
            greeting = client.greeting
            assert greeting.QMP.version["package"] == "vmchannel 0.1.0"
            assert await client.execute("demo-add", {"a": 40, "b": 2}) == 42
            names = {c["name"] for c in await client.execute("query-commands")}
            assert {"demo-add", "demo-emit", "query-version"} <= names
            assert await client.execute("demo-emit", {"port": "p1"}) == {"emitted": True}
            event = await asyncio.wait_for(client.events.get(), 5)
            assert event["event"] == "DEMO_PORT_OPEN"
            assert event["data"] == {"port": "p1", "pad": ""}
            assert abs(event["timestamp"]["seconds"] - time.time()) < 60
            with pytest.raises(qmp.ExecuteError) as excinfo:
                await client.execute("demo-fail", {"id": "nodev"})
            assert excinfo.value.error_class == "DeviceNotFound"
            with pytest.raises(qmp.ExecuteError) as excinfo:
                await client.execute("demo-add", {"a": 1})
            assert excinfo.value.error_class == "GenericError"
            assert "'b'" in str(excinfo.value)
            with pytest.raises(qmp.ExecuteError) as excinfo:
                await client.execute("no-such-command")
            assert excinfo.value.error_class == "CommandNotFound"
            # still serving after the errors
            assert await client.execute("demo-add", {"a": 1, "b": 1}) == 2
        finally:
            await client.disconnect()

    with running_server(sock_path) as h:
        asyncio.run(session())
        wait_until(lambda: h.server.client_count == 0)


def test_qemu_qmp_events_from_the_loop_reach_every_negotiated_client(sock_path):
    async def session(h):
        clients = [qmp.QMPClient(f"c{i}") for i in range(3)]
        for c in clients:
            await c.connect(sock_path)
        try:
            h.call(lambda: h.server.emit("FRONTEND_CONNECTED", {"device": "vsock0"}))
            for c in clients:
                event = await asyncio.wait_for(c.events.get(), 5)
                assert event["event"] == "FRONTEND_CONNECTED"
                assert event["data"] == {"device": "vsock0"}
        finally:
            for c in clients:
                await c.disconnect()

    with running_server(sock_path) as h:
        asyncio.run(session(h))


# -- raw sockets: negotiation, malformed input, slow clients -------------------------------

def test_events_skip_clients_still_negotiating(sock_path):
    with running_server(sock_path) as h:
        sock, buf = raw_client(sock_path), bytearray()
        assert "QMP" in read_message(sock, buf)
        wait_until(lambda: h.server.client_count == 1)
        h.call(lambda: h.server.emit("EARLY", None))
        sock.sendall(b'{"execute": "qmp_capabilities", "id": 1}')
        assert read_message(sock, buf) == {"return": {}, "id": 1}
        h.call(lambda: h.server.emit("LATE", {}))
        assert read_message(sock, buf)["event"] == "LATE"
        sock.close()


def test_malformed_and_split_input_do_not_kill_the_server(sock_path):
    with running_server(sock_path) as h:
        sock, buf = raw_client(sock_path), bytearray()
        read_message(sock, buf)
        for piece in (b'{"execute": "qmp_cap', b'abilities"}', b'{"execute": }', b"[1]",
                      b'{"execute": "demo-add", "arguments": {"a": 1, "b": 2}, "id": 5}'):
            sock.sendall(piece)
            time.sleep(0.01)
        assert read_message(sock, buf) == {"return": {}}
        assert read_message(sock, buf)["error"]["desc"] == "JSON parse error, expecting value"
        assert read_message(sock, buf)["error"]["desc"] == "QMP input must be a JSON object"
        assert read_message(sock, buf) == {"return": 3, "id": 5}
        # an over-long message: one error, then business as usual
        sock.sendall(b'{"execute": "demo-emit", "arguments": {"port": "'
                     + b"p" * (1 << 20) + b'"}}{"execute": "demo-add", '
                     b'"arguments": {"a": 2, "b": 2}}')
        assert read_message(sock, buf)["error"]["desc"] == \
            "JSON parse error, message exceeds 1048576 bytes"
        assert read_message(sock, buf) == {"return": 4}
        assert h.server.client_count == 1
        sock.close()


def test_client_that_stops_reading_is_disconnected_without_blocking_others(sock_path):
    with running_server(sock_path, max_output_bytes=64 * 1024) as h:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(sock_path)
        slow.sendall(b'{"execute": "qmp_capabilities"}')
        good, buf = raw_client(sock_path), bytearray()
        read_message(good, buf)
        good.sendall(b'{"execute": "qmp_capabilities"}')
        assert read_message(good, buf) == {"return": {}}
        wait_until(lambda: h.server.client_count == 2)
        time.sleep(0.1)  # let the slow client's negotiation be processed
        for _ in range(200):
            h.call(lambda: h.server.emit("BIG", {"pad": "y" * 16384}))
            if h.server.client_count == 1:
                break
            assert read_message(good, buf)["event"] == "BIG"
        assert h.server.client_count == 1
        good.sendall(b'{"execute": "demo-add", "arguments": {"a": 5, "b": 5}, "id": "x"}')
        while (msg := read_message(good, buf)).get("event") == "BIG":
            pass
        assert msg == {"return": 10, "id": "x"}
        slow.close()
        good.close()


def test_client_limit_refuses_extra_clients(sock_path):
    with running_server(sock_path, max_clients=1) as h:
        first, buf = raw_client(sock_path), bytearray()
        read_message(first, buf)
        second = raw_client(sock_path)
        assert second.recv(100) == b""
        assert h.server.client_count == 1
        first.close()
        second.close()


def test_quit_flushes_answer_then_asks_the_owner(sock_path):
    with running_server(sock_path, quit=True) as h:
        sock, buf = raw_client(sock_path), bytearray()
        read_message(sock, buf)
        sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "quit", "id": 1}')
        assert read_message(sock, buf) == {"return": {}}
        assert read_message(sock, buf) == {"return": {}, "id": 1}
        assert sock.recv(100) == b""
        assert h.quits.wait(5)
        sock.close()


def test_quit_is_not_offered_without_an_owner_callback(sock_path):
    with running_server(sock_path) as h:
        sock, buf = raw_client(sock_path), bytearray()
        read_message(sock, buf)
        sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "quit"}')
        read_message(sock, buf)
        assert read_message(sock, buf)["error"]["class"] == "CommandNotFound"
        assert not h.quits.is_set()
        sock.close()


# -- the socket file ---------------------------------------------------------------------

def test_socket_is_0600_and_removed_on_close(sock_path):
    with running_server(sock_path):
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert [n for n in os.listdir(os.path.dirname(sock_path))] == ["mgmt.sock"]
    assert not os.path.exists(sock_path)


def test_stale_socket_is_replaced(sock_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()                             # file left behind, nobody listening
    with running_server(sock_path):
        sock, buf = raw_client(sock_path), bytearray()
        assert "QMP" in read_message(sock, buf)
        sock.close()


def test_live_socket_and_regular_file_are_not_clobbered(sock_path, tmp_path):
    with running_server(sock_path):
        loop = EventLoop()
        try:
            with pytest.raises(FileExistsError):
                ManagementServer(loop, sock_path, CommandRegistry())
        finally:
            loop.close()
        sock, buf = raw_client(sock_path), bytearray()
        assert "QMP" in read_message(sock, buf)   # the first server still serves
        sock.close()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    loop = EventLoop()
    try:
        with pytest.raises(FileExistsError):
            ManagementServer(loop, str(regular), CommandRegistry())
    finally:
        loop.close()
    assert regular.read_text() == "keep me"


# -- qmp-shell ---------------------------------------------------------------------------

def test_qmp_shell_driven_through_a_pipe(sock_path, tmp_path):
    """qmp-shell reads commands with input(), so a pipe on stdin drives it; an empty line
    prints the events received so far; EOF ends it."""
    env = dict(os.environ, HOME=str(tmp_path))  # qmp-shell writes ~/.qmp-shell_history
    script = "demo-add a=20 b=22\ndemo-emit port=p7\n\ndemo-fail id=d0\n"
    with running_server(sock_path):
        proc = subprocess.run(
            [sys.executable, "-m", "qemu.qmp.qmp_shell", sock_path],
            input=script, capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Connected to QEMU 0.1.0" in out
    assert '{"return": 42}' in out
    assert '{"return": {"emitted": true}}' in out
    assert "'event': 'DEMO_PORT_OPEN'" in out
    assert '"class": "DeviceNotFound"' in out


def test_long_path_falls_back_to_binding_in_place_still_0600(tmp_path):
    """The private temp name is longer than the final path; near the sun_path limit the
    server binds at the final path under a restrictive umask instead."""
    base = str(tmp_path)
    long_dir = os.path.join(base, "d" * (105 - len(base) - len("/mgmt.sock") - 1))
    os.mkdir(long_dir)
    path = os.path.join(long_dir, "mgmt.sock")
    assert len(path) <= 107 < len(os.path.join(long_dir, ".qmpXXXXXXXX", "s"))
    with running_server(path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        sock, buf = raw_client(path), bytearray()
        assert "QMP" in read_message(sock, buf)
        sock.close()
    assert os.listdir(long_dir) == []
