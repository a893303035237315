"""The PNG chart: no-op tasks/s per system, and latency p50/p99 per system.

matplotlib (the ``[bench]`` extra) is imported only when a chart is asked
for, with the non-interactive Agg backend. A panel whose sections were not
run is left out.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

PQ_COLOUR, BASE_COLOUR = "#1f77b4", "#9a9a9a"
P50_COLOUR, P99_COLOUR = "#2ca02c", "#d62728"


def throughput_rows(results: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """(label, median, min, max) of every no-op system: sections noop, pool and brokers."""
    rows = []
    for section, tag in (("noop", "no-op"), ("pool", "Pool"), ("brokers", "brokers")):
        for name, info in results.get(section, {}).get("systems", {}).items():
            rows.append(
                (
                    f"{tag}: {name}",
                    info["median_tasks_per_s"],
                    info["min_tasks_per_s"],
                    info["max_tasks_per_s"],
                )
            )
    return rows


def latency_rows(results: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(label, p50, p99) of the latency section, then of the brokers section's round trips."""
    systems = results.get("latency", {}).get("systems", {})
    rows = [(name, info["p50_us"], info["p99_us"]) for name, info in systems.items()]
    brokers = results.get("brokers", {}).get("latency", {}).get("systems", {})
    rows += [(f"brokers: {name}", i["p50_us"], i["p99_us"]) for name, i in brokers.items()]
    return rows


def draw_throughput(ax: Any, rows: list[tuple[str, float, float, float]]) -> None:
    labels = [r[0] for r in rows]
    medians = [r[1] for r in rows]
    errors = [[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]]
    colours = [PQ_COLOUR if "procqueue" in label else BASE_COLOUR for label in labels]
    ys = range(len(rows))
    ax.barh(ys, medians, xerr=errors, color=colours, capsize=3)
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("no-op tasks/s (median, bar = min-max; log scale)")
    ax.set_title("Throughput, 2 workers (blue: procqueue)")
    for y, row in zip(ys, rows, strict=True):  # the median, right of the whisker
        ax.text(row[3] * 1.05, y, f"{row[1]:,.0f}", va="center", fontsize=7)
    left = min(r[2] for r in rows)
    ax.set_xlim(left / 2, max(r[3] for r in rows) * 4)  # room for the rightmost label


def draw_latency(ax: Any, rows: list[tuple[str, float, float]]) -> None:
    height = 0.4
    ys = list(range(len(rows)))
    p50 = [r[1] for r in rows]
    p99 = [r[2] for r in rows]
    ax.barh([y - height / 2 for y in ys], p50, height, color=P50_COLOUR, label="p50")
    ax.barh([y + height / 2 for y in ys], p99, height, color=P99_COLOUR, label="p99")
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("µs")
    ax.set_xlim(0, max(p99) * 1.1)  # room for the rightmost label
    ax.set_title("Latency, one idle worker")
    ax.legend(loc="best", fontsize=8)
    for y, a, b in zip(ys, p50, p99, strict=True):
        ax.text(a, y - height / 2, f" {a:,.0f}", va="center", fontsize=7)
        ax.text(b, y + height / 2, f" {b:,.0f}", va="center", fontsize=7)


def write_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[list[Any], Any]] = [
        (throughput_rows(results), draw_throughput),
        (latency_rows(results), draw_latency),
    ]
    panels = [(rows, draw) for rows, draw in panels if rows]
    if not panels:
        print(f"no chart: neither no-op nor latency figures to draw ({path})", file=sys.stderr)
        return
    heights = [max(2.0, 0.35 * len(rows) + 1.2) for rows, _ in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(11, sum(heights)), gridspec_kw={"height_ratios": heights}
    )
    axes = axes if len(panels) > 1 else [axes]
    for ax, (rows, draw) in zip(axes, panels, strict=True):
        draw(ax, rows)
    meta = results["meta"]
    fig.suptitle(
        f"procqueue benchmark {meta['revision']}  python {meta['python']}  "
        f"{meta['cpus']} CPUs  {meta['repeat']} run(s)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
