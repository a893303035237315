"""The benchmark script runs end to end (tiny sizes); no speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_benchmark_quick_run_reports_every_system(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    results = json.loads(out.read_text())
    expected = {
        "noop": {
            "procqueue prefetch=0",
            "procqueue prefetch=8",
            "procqueue sqlite prefetch=8",
            "ProcessPoolExecutor(2).submit",
            "multiprocessing.Pool(2).imap_unordered",
        },
        "cpu": {"procqueue", "ProcessPoolExecutor(2).submit", "bare fork ceiling"},
        "latency": {
            "procqueue publish+wait",
            "ProcessPoolExecutor(1).submit().result()",
        },
    }
    for section, systems in expected.items():
        got = results[section]["systems"]
        assert set(got) == systems, section
        for name, info in got.items():
            assert info["median_tasks_per_s"] > 0, f"{section}: {name}"
    for info in results["latency"]["systems"].values():
        assert info["p50_us"] > 0 and info["p99_us"] >= info["p50_us"]
