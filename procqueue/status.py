"""Render ``status`` replies as a table a person can read."""

from __future__ import annotations

from typing import Any

_QUEUE_COLUMNS = (
    "queue",
    "workers",
    "pending",
    "delayed",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "tasks/s",
    "p50",
    "p99",
)
_WORKER_COLUMNS = ("worker", "pid", "state", "task", "for", "done", "rss", "cpu")


def render_status(status: dict[str, Any]) -> str:
    lines = [
        f"procqueue pid {status['pid']} {status['state']}  config {status['config']}  "
        f"store {status['store']}",
        "",
    ]
    queues = status["queues"]
    rows = [_queue_row(name, q) for name, q in queues.items()]
    lines += _table(_QUEUE_COLUMNS, rows)
    workers = [w for q in queues.values() for w in q["workers"]]
    lines += ["", *_table(_WORKER_COLUMNS, [_worker_row(w) for w in workers])]
    if status.get("cron"):
        lines += ["", render_cron(status["cron"])]
    errors = [f"  {w['name']}: {w['error']}" for w in workers if w.get("error")]
    if errors:
        lines += ["", "errors:", *errors]
    return "\n".join(lines)


def _queue_row(name: str, q: dict[str, Any]) -> list[str]:
    counts = [
        str(q[c]) for c in ("pending", "delayed", "running", "retrying", "succeeded", "failed")
    ]
    return [
        name,
        str(q["concurrency"]),
        *counts,
        f"{q['throughput_1m']:.1f}",
        _secs(q["run_p50"]),
        _secs(q["run_p99"]),
    ]


def _secs(value: float | None) -> str:
    """A run time for people: µs under a millisecond (a no-op task is not 0.0ms)."""
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f}µs"
    return f"{value * 1000:.1f}ms" if value < 1 else f"{value:.2f}s"


def _worker_row(w: dict[str, Any]) -> list[str]:
    running = w.get("running_for")
    return [
        w["name"],
        str(w["pid"] or "-"),
        w["state"],
        w.get("task_id") or "-",
        f"{running:.1f}s" if running is not None else "-",
        str(w.get("tasks_done", "-")),
        _mib(w.get("rss")),
        "-" if w.get("cpu_percent") is None else f"{w['cpu_percent']:.0f}%",
    ]


def _mib(rss: int | None) -> str:
    return "-" if rss is None else f"{rss / (1 << 20):.1f}MiB"


def _table(header: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), *(fmt.format(*r) for r in rows)]


_CRON_COLUMNS = ("cron", "spec", "queue/type", "next run", "last run", "runs", "errors")


def render_cron(entries: list[dict[str, Any]]) -> str:
    rows = [
        [
            e["name"],
            e["spec"],
            f"{e['queue']}/{e['type']}",
            e["next_run"] or "-",
            e["last_run"] or "-",
            str(e["total"]),
            str(e["err_count"]),
        ]
        for e in entries
    ]
    return "\n".join(_table(_CRON_COLUMNS, rows)) if rows else "no cron entries"
