"""The benchmark script runs end to end (tiny sizes); no speed is asserted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

EXPECTED = {
    "noop": {
        "procqueue prefetch=0",
        "procqueue prefetch=8",
        "procqueue prefetch=64",
        "procqueue sqlite prefetch=64",
        "ProcessPoolExecutor(2).submit",
        "ProcessPoolExecutor(2).map(chunksize=1)",
        "ProcessPoolExecutor(2).map(chunksize=256)",
        "multiprocessing.Pool(2).apply_async",
        "multiprocessing.Pool(2).imap_unordered(chunksize=1)",
    },
    "cpu": {"procqueue", "ProcessPoolExecutor(2).submit", "bare fork ceiling"},
    "pool": {
        "procqueue.Pool(2).run",
        "ProcessPoolExecutor(2).submit",
        "procqueue.Pool(2).map(chunksize=256)",
        "multiprocessing.Pool(2).imap_unordered(chunksize=256)",
        "multiprocessing.Pool(2).imap(chunksize=256)",
    },
}
LATENCY = {
    "procqueue publish+wait",
    "procqueue.Pool(1).run().result()",
    "ProcessPoolExecutor(1).submit().result()",
    "procqueue publish -> handler start (one way)",
}
TRANSPORT_SYSTEMS = 8


def run_bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_throughput(results: dict[str, Any]) -> None:
    for section, systems in EXPECTED.items():
        got = results[section]["systems"]
        assert set(got) == systems, section
        for name, info in got.items():
            assert info["median_tasks_per_s"] > 0, f"{section}: {name}"
            assert info["min_tasks_per_s"] <= info["median_tasks_per_s"] <= info["max_tasks_per_s"]
    assert results["noop"]["best_procqueue"] in EXPECTED["noop"]
    for section in ("noop", "cpu", "latency", "pool", "transport"):
        assert results[section]["ratios"], section
        assert all(v > 0 for v in results[section]["ratios"].values()), section


def check_latency(results: dict[str, Any]) -> None:
    got = results["latency"]["systems"]
    assert set(got) == LATENCY
    for name, info in got.items():
        assert 0 < info["p50_us"] <= info["p99_us"], name
        assert info["samples"] > 0 and all(v > 0 for v in info["p50_us_per_run"]), name


def check_rss(results: dict[str, Any]) -> None:
    section = results["rss"]
    sqlite, memory = section["systems"].values()
    for info in (sqlite, memory):
        assert info["published"] > 0 and info["publish_per_s"] > 0
        assert len(info["checkpoints"]) >= 2
        assert all(c["rss_mib"] > 0 for c in info["checkpoints"])
    assert sqlite["published"] == section["tasks"] and not sqlite["queue_full"]
    assert sqlite["on_disk"] > 0  # the backlog went to disk, not to memory
    assert memory["queue_full"] and memory["published"] == memory["buffer_size"]


def check_transport(results: dict[str, Any]) -> None:
    section = results["transport"]
    assert len(section["systems"]) == TRANSPORT_SYSTEMS
    for name, info in section["systems"].items():
        assert info["median_frames_per_s"] > 0 and info["median_mib_per_s"] > 0, name
    assert section["ring_stalls"] == 0, "a ring wait timed out: lost wake-up"


@pytest.mark.timeout(180)
def test_benchmark_quick_run_reports_every_section(tmp_path: Path) -> None:
    out, chart = tmp_path / "r.json", tmp_path / "r.png"
    with_chart = importlib.util.find_spec("matplotlib") is not None  # the [bench] extra
    args = ["--quick", "--json", str(out), *(["--chart", str(chart)] if with_chart else [])]
    proc = run_bench(*args, timeout=170)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    results = json.loads(out.read_text())
    assert results["meta"]["sections"] == ["noop", "cpu", "latency", "pool", "rss", "transport"]
    check_throughput(results)
    check_latency(results)
    check_rss(results)
    check_transport(results)
    if with_chart:
        assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.timeout(60)
def test_benchmark_rejects_an_unknown_section() -> None:
    proc = run_bench("--quick", "--sections", "noop,bogus", timeout=50)
    assert proc.returncode == 2
    assert "unknown section(s) bogus" in proc.stderr
