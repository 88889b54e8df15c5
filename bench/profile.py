"""``python -m bench --profile``: where CPU 0 goes during a measured run, as perf sees it.

Issue 5 asks that a missed target be explained with a profile, not a guess. With
``--profile``, every scenario that has a target runs one extra back-end run and one extra
limit run (same-CPU pinning only: then guest, back-end, host peer and the limit's helpers
all share CPU 0, so one system-wide ``perf record -C 0`` sees the whole pipeline) and
writes, per run, a text file to ``<results>/profiles/<timestamp>/``:

- CPU 0's time by process, each process named by its role (back-end, guest model, C guest
  stand-in, host peer, raw limit helper, idle, other) from its command line;
- the hottest symbols (self time) with the process role and the shared object
  (``[kernel]`` for kernel code, ``libpython`` for the interpreter, ``_vring_c`` for the C
  data path).

perf's software ``cpu-clock`` event is used (these VMs expose no hardware counters); it
needs root or ``kernel.perf_event_paranoid`` ≤ 0. When perf is missing or not allowed, the
profile says so in its file and the measurement goes on.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

__all__ = ["Profiler", "descendants", "parse_report", "role_of", "summarise"]

#: perf record needs a moment before it samples; the run starts after it.
_PERF_START_S = 0.5
#: ... and before that, at most this long for it to have created its output file (it does
#: so at start-up): a loaded machine can take longer than _PERF_START_S to start it.
_PERF_READY_S = 10.0

#: (substring of /proc/<pid>/cmdline, role), first match wins.
_ROLES = (
    ("bench.guest_proc", "guest model"),
    ("vsock_guest", "C guest stand-in"),
    ("/peer", "host peer"),
    ("/stream", "raw limit helper"),
    ("/rtt", "raw limit helper"),
    ("vmchannel", "back-end"),
    ("virtio.daemon", "back-end"),
)
#: How often the bench's process tree is listed during a profiled run: the raw limit's
#: helpers live for one run only, so they are caught while they run.
_WATCH_S = 0.05
_LINE = re.compile(r"^\s*([\d.]+)%\s+(\d+):(\S+)\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$")


def role_of(pid: int, ours: dict[int, str]) -> str:
    """The role of ``pid``: ``ours`` maps the processes of this bench's tree seen during the
    run to their command lines; pid 0 is the idle task; anything else on the CPU (another
    job on this shared machine) is "other"."""
    if pid == 0:
        return "idle"
    if pid in ours:
        for needle, role in _ROLES:
            if needle in ours[pid]:
                return role
        return "bench harness"
    return "other (not this bench)"


def descendants(root: int) -> dict[int, str]:
    """The live descendants of ``root`` (and root), pid → command line, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    ours, frontier = {root}, [root]
    while frontier:
        for child in children.get(frontier.pop(), ()):
            if child not in ours:
                ours.add(child)
                frontier.append(child)
    return {pid: _cmdline(pid) for pid in ours}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _short_dso(dso: str) -> str:
    if dso.startswith("[kernel"):
        return "[kernel]"
    base = os.path.basename(dso)
    for prefix in ("libpython", "_vring_c", "libc"):
        if base.startswith(prefix):
            return prefix
    return base


@dataclasses.dataclass
class Sample:
    percent: float
    pid: int
    dso: str
    symbol: str


def parse_report(text: str) -> list[Sample]:
    """The rows of ``perf report --stdio --sort pid,dso,sym -g none``."""
    rows = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            rows.append(Sample(float(m.group(1)), int(m.group(2)), _short_dso(m.group(4)),
                               m.group(6)))
    return rows


def summarise(samples: list[Sample], ours: dict[int, str], top: int = 30) -> str:
    """CPU share by role, then the ``top`` hottest symbols, as aligned text. Shares are of
    this bench's own samples (idle time and other jobs on the shared CPU left out; their
    shares of all samples are stated)."""
    by_role: dict[str, float] = {}
    by_symbol: dict[tuple[str, str, str], float] = {}
    for s in samples:
        role = role_of(s.pid, ours)
        by_role[role] = by_role.get(role, 0.0) + s.percent
        key = (role, s.dso, s.symbol)
        by_symbol[key] = by_symbol.get(key, 0.0) + s.percent
    outside = ("idle", "other (not this bench)")
    bench = sum(pct for role, pct in by_role.items() if role not in outside)
    total = bench or 1.0
    out = [f"Of all samples: idle {by_role.get(outside[0], 0.0):.1f} % (with the "
           f"{_PERF_START_S} s before the run while perf starts), other jobs on this "
           f"shared CPU {by_role.get(outside[1], 0.0):.1f} %, this bench {bench:.1f} %.",
           "", "This bench's samples by process role:"]
    for role, pct in sorted(by_role.items(), key=lambda kv: -kv[1]):
        if role not in outside:
            out.append(f"  {100 * pct / total:6.1f} %  {role}")
    out += ["", f"Hottest {top} symbols (self time, % of this bench's samples):"]
    ranked = sorted(((k, v) for k, v in by_symbol.items() if k[0] not in outside),
                    key=lambda kv: -kv[1])
    for (role, dso, symbol), pct in ranked[:top]:
        out.append(f"  {100 * pct / total:6.2f} %  {role:<18} {dso:<10} {symbol}")
    return "\n".join(out) + "\n"


class Profiler:
    """Records CPU 0 with perf while a run goes on, and writes the summary (see module)."""

    #: How long perf may take to write its data after SIGINT before it is killed.
    stop_timeout_s = 60.0

    def __init__(self, out_dir: Path, perf: str | None) -> None:
        """``perf``: the perf executable (``shutil.which("perf")``), None if missing."""
        self.out_dir = out_dir
        self.perf = perf
        self.written: list[Path] = []

    def run(self, name: str, what: str, fn: Callable[[], float]) -> float:
        """Run ``fn`` under ``perf record -C 0``; write ``<name>-<what>.txt``; return fn's
        value."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{_slug(name)}-{what}.txt"
        header = f"{name}: {what} run, same CPU, `perf record -C 0` (cpu-clock)\n\n"
        if not self.perf:
            path.write_text(header + "perf is not installed: no profile.\n")
            self.written.append(path)
            return fn()
        with tempfile.TemporaryDirectory(prefix="vmchannel-perf-") as tmp:
            data = Path(tmp) / "perf.data"
            rec = subprocess.Popen([self.perf, "record", "-q", "-C", "0", "-o", str(data)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            watch = _TreeWatch(os.getpid())
            try:
                ready_by = time.monotonic() + _PERF_READY_S
                while not data.exists() and rec.poll() is None and time.monotonic() < ready_by:
                    time.sleep(0.01)
                time.sleep(_PERF_START_S)
                with watch:
                    value = fn()
                ours = watch.seen
            finally:
                rec.send_signal(signal.SIGINT)
                try:
                    _, err = rec.communicate(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:  # never leave perf recording behind
                    rec.kill()
                    _, err = rec.communicate()
            if rec.returncode not in (0, -signal.SIGINT) or not data.exists():
                path.write_text(header + f"perf record failed (exit {rec.returncode}): "
                                f"{err.decode(errors='replace').strip()}\n")
                self.written.append(path)
                return value
            report = subprocess.run(
                [self.perf, "report", "-i", str(data), "--stdio", "--no-children",
                 "--sort", "pid,dso,sym", "-g", "none", "--percent-limit", "0.2"],
                capture_output=True, text=True, timeout=300)
        path.write_text(header + summarise(parse_report(report.stdout), ours))
        self.written.append(path)
        return value


class _TreeWatch:
    """Lists the bench's process tree every ``_WATCH_S`` while the ``with`` block runs;
    ``seen`` keeps every process met (pid → command line), exited ones too."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _look(self) -> None:
        for pid, cmd in descendants(self.root).items():
            if cmd:  # empty while a child is still between fork and exec
                self.seen.setdefault(pid, cmd)

    def _watch(self) -> None:
        while True:
            self._look()
            if self._stop.wait(_WATCH_S):
                return

    def __enter__(self) -> "_TreeWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._look()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
