"""``python -m bench --profile`` (bench/profile.py): perf's report is read into process
roles and hot symbols, shares are of the bench's own samples, and a real ``perf record``
of a child process that spins is attributed to that child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from bench.profile import Profiler, descendants, parse_report, role_of, summarise

REPORT = """\
# Overhead      Pid:Command      Shared Object        Symbol
# ........  ...................  ...................  ......
#
    40.00%       101:python      [kernel.kallsyms]    [k] _copy_from_iter
    20.00%       102:peer        [kernel.kallsyms]    [k] _copy_to_iter
    10.00%       101:python      libpython3.11.so.1.0 [.] _PyEval_EvalFrameDefault
    10.00%         0:swapper     [kernel.kallsyms]    [k] pv_native_safe_halt
     5.00%       777:stream      [kernel.kallsyms]    [k] _copy_from_iter
     5.00%       778:stream      [kernel.kallsyms]    [k] _copy_from_iter
    10.00%       999:python      libpython3.11.so.1.0 [.] _PyEval_EvalFrameDefault
"""
OURS = {101: "python -m vmchannel run --config x", 102: "/w/bench/.cache/peer sink 32768 0 p",
        777: "/w/bench/.cache/stream 32768 1.0 read 0 0 0",
        778: "/w/bench/.cache/stream 32768 1.0 read 0 0 0"}


def test_report_rows_are_parsed():
    rows = parse_report(REPORT)
    assert [(r.percent, r.pid, r.dso, r.symbol) for r in rows][:3] == [
        (40.0, 101, "[kernel]", "_copy_from_iter"),
        (20.0, 102, "[kernel]", "_copy_to_iter"),
        (10.0, 101, "libpython", "_PyEval_EvalFrameDefault")]
    assert len(rows) == 7


def test_roles_come_from_the_bench_own_processes():
    assert role_of(0, OURS) == "idle"
    assert role_of(101, OURS) == "back-end"
    assert role_of(102, OURS) == "host peer"
    assert role_of(777, OURS) == "raw limit helper"
    assert role_of(999, OURS) == "other (not this bench)"  # someone else's python


def test_shares_are_of_the_bench_samples_and_symbols_merge_across_pids():
    text = summarise(parse_report(REPORT), OURS)
    assert "idle 10.0 % (with the 0.5 s before the run while perf starts), other jobs on this shared CPU 10.0 %, this bench 80.0 %" in text
    lines = text.splitlines()
    assert "    62.5 %  back-end" in lines  # (40 + 10) / 80
    assert "    25.0 %  host peer" in lines
    assert "    12.5 %  raw limit helper" in lines  # two pids, one role
    assert any(line.split()[:2] == ["50.00", "%"] and line.endswith("_copy_from_iter")
               for line in lines)  # 40 % of all = 50 % of the bench's
    assert not any("pv_native_safe_halt" in line for line in lines)


CHILD = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c",
                               "import time; print('up', flush=True); time.sleep(30)"])
print(grandchild.pid, flush=True)
time.sleep(30)
"""


def test_descendants_lists_children_and_grandchildren_with_their_command_lines():
    """The back-end and the guest are started through other processes: the whole tree."""
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    lines = [child.stdout.readline().strip() for _ in range(2)]  # "up" and its pid, any order
    grandchild = int(next(line for line in lines if line != "up"))
    try:
        assert "up" in lines  # both run their own programs by now
        ours = descendants(os.getpid())
        assert os.getpid() in ours
        assert "grandchild = subprocess.Popen" in ours[child.pid]
        assert "print('up'" in ours[grandchild]
    finally:
        os.kill(grandchild, signal.SIGKILL)
        child.kill()
        child.wait()


FAKE_PERF = f"""#!{sys.executable}
# perf record ... -o FILE: handle SIGINT (even when the test run inherited it ignored, as
# real perf does), then make FILE (the profiler waits for it: this interpreter may start
# slowly on a loaded machine) and wait for SIGINT; perf report: a canned report.
import os, signal, sys, time
if sys.argv[1] == "record":
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    open(sys.argv[sys.argv.index("-o") + 1], "w").close()
    while True:
        time.sleep(0.05)
sys.stdout.write(open(os.path.join(os.path.dirname(sys.argv[0]), "report.txt")).read())
"""


def _fake_perf(tmp_path, report: str) -> str:
    path = tmp_path / "perf"
    path.write_text(FAKE_PERF)
    path.chmod(0o755)
    (tmp_path / "report.txt").write_text(report)
    return str(path)


def test_a_short_lived_child_of_the_run_is_counted_as_the_bench(tmp_path):
    """The raw limit's helpers run and exit inside one run: the watch must catch them."""
    profiler = Profiler(tmp_path / "out", _fake_perf(tmp_path, ""))

    def run() -> float:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)",
                                  "/stream"])
        child.wait()  # gone before the run ends; perf's report names its pid
        (tmp_path / "report.txt").write_text(
            f"    60.00%  {child.pid}:python  [kernel.kallsyms]  [k] _copy_to_iter\n"
            "    40.00%  1:init  [kernel.kallsyms]  [k] do_syscall_64\n")
        return 1.0

    assert profiler.run("limit", "limit", run) == 1.0
    lines = profiler.written[0].read_text().splitlines()
    assert "   100.0 %  raw limit helper" in lines
    assert any("other jobs on this shared CPU 40.0 %" in line for line in lines)


def test_a_run_under_perf_writes_its_summary_and_returns_the_figure(tmp_path):
    me = os.getpid()
    report = f"    75.00%  {me}:python  libpython3.11.so.1.0  [.] _PyEval_EvalFrameDefault\n" \
             "    25.00%       0:swapper     [kernel.kallsyms]    [k] pv_native_safe_halt\n"
    profiler = Profiler(tmp_path / "out", _fake_perf(tmp_path, report))
    assert profiler.run("console guest->host 32 KiB", "back-end", lambda: 42.0) == 42.0
    [path] = profiler.written
    assert path.name == "console-guest-host-32-kib-back-end.txt"
    text = path.read_text()
    assert text.startswith("console guest->host 32 KiB: back-end run, same CPU")
    assert "idle 25.0 % (with the 0.5 s before the run while perf starts), other jobs on this shared CPU 0.0 %, this bench 75.0 %" in text
    assert "   100.0 %  bench harness" in text.splitlines()


def test_without_perf_the_run_goes_on_and_the_file_says_why(tmp_path):
    profiler = Profiler(tmp_path, None)
    assert profiler.run("rtt", "limit", lambda: 7.0) == 7.0
    assert profiler.written[0].read_text().endswith("perf is not installed: no profile.\n")


def test_a_perf_that_does_not_stop_is_killed_and_the_file_says_so(tmp_path):
    stubborn = tmp_path / "perf"
    stubborn.write_text(f"#!{sys.executable}\nimport signal, time\n"
                        "signal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)\n")
    stubborn.chmod(0o755)
    profiler = Profiler(tmp_path / "out", str(stubborn))
    profiler.stop_timeout_s = 0.5
    assert profiler.run("rtt", "back-end", lambda: 3.0) == 3.0
    assert "perf record failed (exit -9)" in profiler.written[0].read_text()


def test_a_perf_slow_to_start_is_waited_for_before_the_run(tmp_path):
    """On a loaded machine perf may take longer than the fixed start-up pause to start; the
    profiler waits for its output file first (this failed now and then under load)."""
    slow = FAKE_PERF.replace("import os, signal, sys, time",
                             "import os, signal, sys, time; time.sleep(1.0)")
    path = tmp_path / "perf"
    path.write_text(slow)
    path.chmod(0o755)
    (tmp_path / "report.txt").write_text(
        f"    90.00%  {os.getpid()}:python  libpython3.11.so.1.0  [.] _PyEval_EvalFrameDefault\n")
    profiler = Profiler(tmp_path / "out", str(path))
    assert profiler.run("rtt", "back-end", lambda: 5.0) == 5.0
    text = profiler.written[0].read_text()
    assert "perf record failed" not in text
    assert "   100.0 %  bench harness" in text.splitlines()
