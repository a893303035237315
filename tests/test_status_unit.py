"""The status table (``procqueue status``) as a person reads it."""

from __future__ import annotations

from procqueue.status import render_status


def test_status_table_shows_run_times_a_person_can_read() -> None:
    """Run times under a millisecond in µs (a no-op task is not "0.0ms"), then
    ms, then seconds; the throughput column as the daemon counted it."""

    def queue(p50: float | None, p99: float | None) -> dict[str, object]:
        counts = dict.fromkeys(("pending", "delayed", "running", "retrying", "failed"), 0)
        return {
            **counts,
            "concurrency": 2,
            "succeeded": 150_000,
            "throughput_1m": 2500.0,
            "run_p50": p50,
            "run_p99": p99,
            "workers": [],
        }

    status = {
        "pid": 1,
        "state": "running",
        "config": "app.toml",
        "store": "memory",
        "queues": {"fast": queue(3.2e-6, 0.0125), "slow": queue(2.5, None)},
    }
    fast, slow = (line.split() for line in render_status(status).splitlines()[3:5])
    assert fast[0] == "fast" and fast[-3:] == ["2500.0", "3µs", "12.5ms"]
    assert slow[0] == "slow" and slow[-2:] == ["2.50s", "-"]
