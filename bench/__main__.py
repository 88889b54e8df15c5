"""``python -m bench`` / ``vmchannel bench``: the end-to-end benchmark harness (issue 5).

Runs every scenario (or those named with ``--scenario``), prints each figure as it comes
and writes JSON, Markdown and a PNG plot to ``bench/results/`` (``<timestamp>.*`` and
``latest.*``). ``--quick`` runs fewer and shorter measurements (whole run under a minute).
Micro-benchmarks are separate: ``python -m pytest bench``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import time
from pathlib import Path

SCENARIOS = ("bulk-tx", "bulk-rx", "small", "rtt", "ports", "vsock", "idle", "py-vs-c")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer, shorter runs, same-CPU pinning only unless --pinning says "
                        "otherwise (< 1 minute)")
    p.add_argument("--scenario", action="append", choices=SCENARIOS,
                   help="run only these scenarios (repeatable)")
    p.add_argument("--runs", type=int, help="back-end/limit run pairs (default 5, quick 3)")
    p.add_argument("--seconds", type=float, help="seconds per run (default 1.0, quick 0.2)")
    p.add_argument("--pinning", choices=("same", "cross", "both"),
                   help="CPU pinning (default both; with --quick, same: the targets' pinning)")
    p.add_argument("--out", type=Path, help="results directory (default bench/results)")
    p.add_argument("--ports", type=int, default=126,
                   help="ports of the many-ports scenario (max 126: port 0 is the console's)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--profile", action="store_true",
                   help="also profile each targeted same-CPU row with perf (bench/profile.py)"
                        " into <out>/profiles/<timestamp>/")
    return p


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "--":  # `vmchannel bench -- --quick` (argparse REMAINDER)
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    from bench import report, scenarios as sc
    from bench.limits.build import BuildError, build_all

    try:
        build_all()
    except BuildError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if args.pinning is None:
        args.pinning = "same" if args.quick else "both"
    if (os.cpu_count() or 1) < 2 and args.pinning != "same":
        args.pinning = "same"
    pinnings = ("same", "cross") if args.pinning == "both" else (args.pinning,)
    ctx = sc.Ctx(quick=args.quick, runs=args.runs or (3 if args.quick else 5),
                 seconds=args.seconds or (0.2 if args.quick else 1.0), pinnings=pinnings)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or report.RESULTS_DIR
    if args.profile:
        from bench.profile import Profiler

        ctx.profiler = Profiler(out_dir / "profiles" / stamp, shutil.which("perf"))
    chosen = args.scenario or list(SCENARIOS)
    chunks = [32768] if args.quick else [4096, 16384, 32768, 65536, 131072]
    t0 = time.monotonic()
    rows: list = []
    failures: list[str] = []
    timings: dict[str, float] = {}
    try:
        for name in chosen:
          started = time.monotonic()
          try:
            if name == "bulk-tx":
                rows += sc.bulk(ctx, "guest->host", chunks)
            elif name == "bulk-rx":
                rows += sc.bulk(ctx, "host->guest", [65536] if args.quick else chunks)
            elif name == "small":
                rows += sc.small(ctx)
            elif name == "rtt":
                rows += sc.rtt(ctx)
            elif name == "ports":
                rows += sc.many_ports(ctx, args.ports)
            elif name == "vsock":
                from bench import vsock_scenarios

                rows += vsock_scenarios.all_vsock(ctx)
            elif name == "idle":
                rows += sc.idle(ctx)
            elif name == "py-vs-c":
                rows += sc.py_vs_c(ctx)
          except Exception as exc:  # one failing scenario must not lose the others' figures
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"bench: scenario {name} failed: {failures[-1]}", file=sys.stderr)
          timings[name] = round(time.monotonic() - started, 1)
          print(f"bench: {name} took {timings[name]} s", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(ctx.workdir, ignore_errors=True)
        else:
            print(f"work directory kept: {ctx.workdir}")
    cmd = "python -m bench" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                               if (argv if argv is not None else sys.argv[1:]) else "")
    meta = {"command": cmd.strip(), "date": stamp, "cpus": os.cpu_count(), "runs": ctx.runs,
            "seconds": ctx.seconds, "elapsed_s": round(time.monotonic() - t0, 1),
            "python": sys.version.split()[0], "failures": failures,
            "scenario_seconds": timings}
    if ctx.profiler is not None:
        meta["profiles"] = [str(p) for p in ctx.profiler.written]
    paths = report.write(rows, meta, out_dir, stamp)
    print(report.markdown(rows, meta))
    print("wrote " + ", ".join(str(p) for p in paths.values()) +
          f" in {meta['elapsed_s']} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
