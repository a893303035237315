"""Interleaved repetitions, medians and min-max, percentiles and the text tables."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Mapping
from typing import Any

NAME_WIDTH = 56


def interleaved(
    section: str,
    systems: Mapping[str, Callable[[], float]],
    n: int | Mapping[str, int],
    repeat: int,
    unit: str = "tasks",
) -> dict[str, list[float]]:
    """Run each system once per repetition, in turn (A B C, A B C ...); items/s per run.

    Each run returns its seconds for ``n`` items (or ``n[name]`` items).
    """
    rates: dict[str, list[float]] = {name: [] for name in systems}
    for rep in range(repeat):
        for name, run in systems.items():
            count = n if isinstance(n, int) else n[name]
            rate = count / run()
            rates[name].append(rate)
            print(f"  {section} {rep + 1}/{repeat}  {name}: {rate:,.0f} {unit}/s", file=sys.stderr)
    return rates


def interleaved_samples(
    section: str, systems: Mapping[str, Callable[[], list[float]]], repeat: int
) -> dict[str, list[list[float]]]:
    """Latency samples (seconds), one list per run, systems interleaved."""
    runs: dict[str, list[list[float]]] = {name: [] for name in systems}
    for rep in range(repeat):
        for name, run in systems.items():
            got = run()
            runs[name].append(got)
            print(
                f"  {section} {rep + 1}/{repeat}  {name}: "
                f"p50 {statistics.median(got) * 1e6:,.0f} µs",
                file=sys.stderr,
            )
    return runs


def summary(rates: list[float], unit: str = "tasks") -> dict[str, Any]:
    return {
        f"{unit}_per_s": rates,
        f"median_{unit}_per_s": statistics.median(rates),
        f"min_{unit}_per_s": min(rates),
        f"max_{unit}_per_s": max(rates),
    }


def percentile(samples: list[float], pct: int) -> float:
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def latency_summary(runs: list[list[float]], round_trip: bool = True) -> dict[str, Any]:
    """p50/p99 in µs over every sample of every run, and each run's p50."""
    pooled = [value for run in runs for value in run]
    info: dict[str, Any] = {
        "samples": len(pooled),
        "p50_us": statistics.median(pooled) * 1e6,
        "p99_us": percentile(pooled, 99) * 1e6,
        "p50_us_per_run": [statistics.median(run) * 1e6 for run in runs],
    }
    if round_trip:  # one task per round trip: its rate is meaningful
        info["median_tasks_per_s"] = 1 / statistics.median(pooled)
    return info


def median_ratio(systems: Mapping[str, Mapping[str, Any]], a: str, b: str, unit: str) -> float:
    key = f"median_{unit}_per_s"
    return float(systems[a][key] / systems[b][key])


def paired_ratio(rates: Mapping[str, list[float]], a: str, b: str) -> float:
    """The median over the repetitions of a's rate over b's in the same one:
    neighbours in time, so a drift of the machine's speed mostly cancels."""
    return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))


def throughput_table(
    title: str, section: Mapping[str, Any], ceiling: bool = False, unit: str = "tasks"
) -> list[str]:
    """Median, min and max rate per system, then the section's ratios of medians."""
    extra = f"  {'of ceiling':>10}" if ceiling else ""
    lines = [
        title,
        f"  {'system':<{NAME_WIDTH}}{'median/s':>11}{'min/s':>11}{'max/s':>11}{extra}",
    ]
    for name, info in section["systems"].items():
        row = (
            f"  {name:<{NAME_WIDTH}}{info[f'median_{unit}_per_s']:>11,.0f}"
            f"{info[f'min_{unit}_per_s']:>11,.0f}{info[f'max_{unit}_per_s']:>11,.0f}"
        )
        if ceiling:
            row += f"  {info['fraction_of_ceiling']:>10.1%}"
        lines.append(row)
    return lines + ratio_lines(section["ratios"])


def ratio_text(value: float) -> str:
    """A ratio as printed: three decimals under 1, where targets such as 0.5x
    and 0.95x sit (0.496x is not "0.50x"), two above."""
    return f"{value:.3f}x" if value < 1 else f"{value:.2f}x"


def ratio_lines(ratios: Mapping[str, float]) -> list[str]:
    return ["  ratios of medians:", *(f"    {k}: {ratio_text(v)}" for k, v in ratios.items())]


def latency_table(title: str, section: Mapping[str, Any]) -> list[str]:
    lines = [title, f"  {'system':<{NAME_WIDTH}}{'p50 µs':>10}{'p99 µs':>10}  p50 per run µs"]
    for name, info in section["systems"].items():
        runs = ", ".join(f"{v:,.0f}" for v in info["p50_us_per_run"])
        lines.append(
            f"  {name:<{NAME_WIDTH}}{info['p50_us']:>10,.0f}{info['p99_us']:>10,.0f}  {runs}"
        )
    return lines + [f"  {name}: {ratio_text(value)}" for name, value in section["ratios"].items()]
