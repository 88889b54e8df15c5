"""Results people can read: JSON, a Markdown table and a PNG plot in ``bench/results/``.

``write(rows, meta, out_dir)`` writes ``<stamp>.json``, ``<stamp>.md`` and
``<stamp>.png`` and copies them to ``latest.*`` (the README shows the latest).
"""

from __future__ import annotations

import json
import statistics
import shutil
import sys
from pathlib import Path

from bench.scenarios import Row, human

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def markdown(rows: list[Row], meta: dict) -> str:
    lines = [f"Command: `{meta['command']}` — {meta['date']}, {meta['cpus']} CPUs, "
             f"{meta['runs']} runs × {meta['seconds']} s each (back-end and limit alternated), "
             "medians with min–max.",
             "",
             "| scenario | pinning | back-end (min–max) | limit (min–max) | ratio | target |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        b = f"{human(r.median, r.unit)} ({human(min(r.backend), r.unit)}–" \
            f"{human(max(r.backend), r.unit)})"
        if r.limit:
            lim = f"{human(r.limit_median, r.unit)} ({human(min(r.limit), r.unit)}–" \
                  f"{human(max(r.limit), r.unit)}) {r.limit_label}"
        else:
            lim = "—"
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}"
        if r.target is None:
            target = "reported"
        else:
            op = "≥" if r.higher_is_better else "≤"
            verdict = {True: " ✅", False: " ❌", None: ""}[r.passed]
            target = f"{op} {r.target}{verdict}"
        extra = ""
        if r.extra.get("cpu_percent") is not None:
            extra = f" = {r.extra['cpu_percent']:.2f} % CPU"
        if r.extra.get("guest_cpu_ms_per_gb"):
            extra = f"; guest model {statistics.median(r.extra['guest_cpu_ms_per_gb']):.0f} ms CPU/GB"
        lines.append(f"| {r.label} | {r.pinning} | {b}{extra} | {lim} | {ratio} | {target} |")
    lines.append("")
    lines.append("Ratio: back-end median / limit median (for latencies: lower is better). "
                 "Targets apply to same-CPU pinning (every process on CPU 0); cross-CPU "
                 "(back-end on CPU 0, guest and host peer on CPU 1) is reported beside.")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> bool:
    """Throughput against chunk size, back-end next to limit, both directions."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: no PNG plot: matplotlib is not installed (pip install -e '.[bench]', "
              "or make bench)", file=sys.stderr)
        return False
    series = [r for r in rows if r.direction and r.unit == "B/s" and r.chunk
              and not r.scenario.endswith("-ws")]
    if not series:
        return False
    # working-set-matched limits (bench.scenarios.bulk): one point at their chunk size
    base = {(r.label, r.pinning): r for r in series}
    ws_points = []
    for r in rows:
        if r.scenario.endswith("-ws") and r.limit:
            b = base.get((r.label.replace(" vs working-set-matched limit", ""), r.pinning))
            if b is not None:
                ws_points.append((b.direction, b.pinning, b.chunk, r.limit_median))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, direction in zip(axes, ("guest->host", "host->guest")):
        for pin, style in (("same", "-"), ("cross", ":")):
            pts = sorted((r for r in series if r.direction == direction and r.pinning == pin),
                         key=lambda r: r.chunk)
            if not pts:
                continue
            xs = [r.chunk // 1024 for r in pts]
            ax.plot(xs, [r.median / 1e9 for r in pts], "o" + style, color="tab:blue",
                    label=f"vmchannel ({pin} CPU)")
            ax.plot(xs, [r.limit_median / 1e9 for r in pts], "s" + style, color="tab:gray",
                    label=f"raw AF_UNIX limit, one hot buffer ({pin} CPU)")
            ws = [(c // 1024, v / 1e9) for d, p, c, v in ws_points
                  if d == direction and p == pin]
            if ws:
                ax.plot([x for x, _ in ws], [y for _, y in ws], "x" if pin == "same" else "+",
                        color="tab:red",
                        markersize=9, label=f"raw limit over the guest's working set ({pin})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("chunk size (KiB)" + (" — guest chain" if direction == "guest->host"
                                              else " — host write, 4 KiB guest buffers"))
        ax.set_title(f"console {direction}")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(rows: list[Row], meta: dict, out_dir: Path = RESULTS_DIR, stamp: str = "latest",
          copy_latest: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stamp}.json", "md": out_dir / f"{stamp}.md",
             "png": out_dir / f"{stamp}.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]},
                                        indent=1) + "\n")
    paths["md"].write_text(markdown(rows, meta))
    if not plot(rows, paths["png"]):
        paths.pop("png")
    if copy_latest and stamp != "latest":
        for kind, p in paths.items():
            shutil.copyfile(p, out_dir / f"latest.{kind}")
    return paths
