"""The processes of a benchmark run: the back-end, the guest, the host peer, the limits.

- :class:`Backend`: ``python -m virtio.cli serve --config <generated toml>`` with
  ``VMCHANNEL_RING`` set, pinned with ``os.sched_setaffinity``; its CPU time and RSS come
  from ``/proc/<pid>/stat`` and ``/proc/<pid>/status``.
- :class:`GuestProc`: ``python -m bench.guest_proc SPEC`` (front-end + guest driver), driven
  by JSON lines over its stdin/stdout.
- :class:`Peer`: the C host peer (``bench/limits/peer.c``) on the port / vsock sockets.
- :func:`limit_stream`, :func:`limit_rtt`: the C limit programs, run to completion.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.limits.build import helper_path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchProcessError(RuntimeError):
    """A benchmark process failed to start or answered wrongly (``.stderr`` attached)."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message + (f"\n--- stderr ---\n{stderr[-3000:]}" if stderr else ""))
        self.stderr = stderr


def _pinned(cpu: int | None):
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def wait_for_path(path: str, proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise BenchProcessError(f"process exited ({proc.returncode}) before {path} appeared",
                                    _read_err(proc))
        if time.monotonic() > deadline:
            raise BenchProcessError(f"{path} did not appear in {timeout_s} s", _read_err(proc))
        time.sleep(0.01)


def _read_err(proc: subprocess.Popen) -> str:
    err = getattr(proc, "_bench_err", None)
    if err is None:
        return ""
    try:
        with open(err) as f:
            return f.read()
    except OSError:
        return ""


class Backend:
    """The back-end process serving ``config_toml`` (its vhost-user sockets in ``sockets``)."""

    def __init__(self, workdir: Path, config_toml: str, sockets: list[str], *, ring: str,
                 cpu: int | None) -> None:
        self.workdir = workdir
        cfg = workdir / "backend.toml"
        cfg.write_text(config_toml)
        self.stderr_path = workdir / "backend.stderr"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "virtio.cli", "serve", "--config", str(cfg)],
                cwd=ROOT, env=_env(VMCHANNEL_RING=ring), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_pinned(cpu))
        self.proc._bench_err = str(self.stderr_path)
        for path in sockets:
            wait_for_path(path, self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of the back-end so far (/proc/<pid>/stat fields 14, 15)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise BenchProcessError("no VmRSS in /proc status")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class GuestProc:
    """``python -m bench.guest_proc`` with a spec; one JSON request/answer per call."""

    def __init__(self, workdir: Path, spec: dict, timeout_s: float = 60.0) -> None:
        self.stderr_path = workdir / f"guest-{spec['workload']}.stderr"
        self._err = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.guest_proc", json.dumps(spec)], cwd=ROOT,
            env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
            text=True, bufsize=1)
        self.proc._bench_err = str(self.stderr_path)
        self.ready = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            raise BenchProcessError(f"guest process exited ({self.proc.returncode})",
                                    _read_err(self.proc))
        return json.loads(line)

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def run(self, seconds: float) -> dict:
        return self.call(cmd="run", seconds=seconds)

    def rtt(self, iterations: int) -> dict:
        return self.call(cmd="rtt", iterations=iterations)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._err.close()


class Peer:
    """The C host peer (sink/source/echo) on the given socket specs."""

    def __init__(self, mode: str, chunk: int, cpu: int | None, specs: list[str]) -> None:
        self.proc = subprocess.Popen(
            [str(helper_path("peer")), mode, str(chunk), str(-1 if cpu is None else cpu),
             *specs], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            self.proc.kill()
            raise BenchProcessError(f"host peer did not start: {line!r}",
                                    self.proc.stderr.read())

    def close(self) -> list[int]:
        """Stop the peer; the bytes it moved per connection."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _err = self.proc.communicate(timeout=10)
        for line in out.splitlines():
            if line.startswith("{"):
                return json.loads(line)["bytes"]
        return []


def limit_stream(chunk: int, seconds: float, reader: str, writer_cpu: int | None,
                 reader_cpu: int | None, working_set: int = 0) -> dict:
    """Raw AF_UNIX stream (``reader``: "read" into 256 KiB or "readv" into 16 × 4 KiB).

    ``working_set`` > 0: the guest's stand-in cycles over that many bytes (the writer with
    "read", the readv reader with "readv") instead of one hot buffer (bench/limits/stream.c).
    """
    out = subprocess.run([str(helper_path("stream")), str(chunk), str(seconds), reader,
                          str(-1 if writer_cpu is None else writer_cpu),
                          str(-1 if reader_cpu is None else reader_cpu), str(working_set)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def limit_relay(chunk: int, seconds: float, window: int, writer_cpu: int | None,
                relay_cpu: int | None, reader_cpu: int | None) -> dict:
    """The ideal host->guest relay (bench/limits/relay.c): writer, C relay and reader in
    three processes, readv into 4 KiB buffers in shared memory within a ``window``-byte
    credit, no virtqueue and no Python; what the machine allows for that path's shape."""
    cpus = [str(-1 if c is None else c) for c in (writer_cpu, relay_cpu, reader_cpu)]
    out = subprocess.run([str(helper_path("relay")), str(chunk), str(seconds), str(window),
                          *cpus], capture_output=True, text=True, check=True,
                         timeout=seconds + 60)
    return json.loads(out.stdout)


def limit_rtt(hops: int, iterations: int, guest_cpu: int | None, backend_cpu: int | None,
              host_cpu: int | None) -> dict:
    """Raw eventfd + socketpair round trip (``hops`` 2: echo device path, 3: with a host
    peer process)."""
    cpus = [str(-1 if c is None else c) for c in (guest_cpu, backend_cpu, host_cpu)]
    out = subprocess.run([str(helper_path("rtt")), str(hops), str(iterations), *cpus],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)
