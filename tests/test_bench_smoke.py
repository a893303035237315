"""The benchmark script runs end to end (tiny sizes); no speed is asserted.

The quick run includes the brokers section, so it needs the Redis server at
127.0.0.1:6379 and celery, dramatiq and redis (the ``[test]`` extra has them):
without them the test fails, it does not skip.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
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
    "cpu": {
        "procqueue prefetch=0",
        "procqueue prefetch=1",
        "ProcessPoolExecutor(2).submit",
        "bare fork ceiling",
        "bare fork ceiling + a process waking once a task",
    },
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
    "procqueue Client.run (publish and wait in one request)",
    "procqueue.Pool(1).run().result()",
    "ProcessPoolExecutor(1).submit().result()",
    "procqueue publish -> handler start (one way)",
}
TRANSPORT_SYSTEMS = 8
BROKERS = {
    "procqueue prefetch=0",
    "procqueue prefetch=64",
    "ProcessPoolExecutor(2).submit",
    "Celery prefork (Redis broker + result backend)",
    "Celery prefork -O fair (Redis broker + result backend)",
    "Dramatiq (Redis broker, 2 processes x 1 thread)",
}
BROKER_LATENCY = {"Celery .delay().get()", "procqueue publish+wait"}
BROKER_APPS = ("pqb_celery_app", "pqb_dramatiq_app")  # in every worker's command line


def run_bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return run_python("-m", "benchmarks", *args, timeout=timeout)


def run_python(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
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
    noop = results["noop"]
    assert set(noop["paired_ratios"]) == set(noop["ratios"])  # the same pairs, both ways
    assert all(v > 0 for v in noop["paired_ratios"].values())


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


def check_brokers(results: dict[str, Any]) -> None:
    section = results["brokers"]
    assert set(section["systems"]) == BROKERS
    for name, info in section["systems"].items():
        assert info["median_tasks_per_s"] > 0, name
        assert info["min_tasks_per_s"] <= info["median_tasks_per_s"] <= info["max_tasks_per_s"]
    assert len(section["ratios"]) == 2 * 4 and all(v > 0 for v in section["ratios"].values())
    assert set(section["versions"]) >= {"celery", "dramatiq", "redis-server"}
    latency = section["latency"]
    assert set(latency["systems"]) == BROKER_LATENCY
    for name, info in latency["systems"].items():
        assert 0 < info["p50_us"] <= info["p99_us"], name
        assert info["samples"] > 0, name


def broker_workers_left() -> list[str]:
    """Command lines of Celery or Dramatiq workers of the benchmark still running."""
    left = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(a in cmdline for a in BROKER_APPS):
            left.append(f"{proc.pid}: {cmdline}")
    return left


@pytest.mark.timeout(180)
def test_benchmark_quick_run_reports_every_section(tmp_path: Path) -> None:
    out, chart = tmp_path / "r.json", tmp_path / "r.png"
    with_chart = importlib.util.find_spec("matplotlib") is not None  # the [bench] extra
    args = ["--quick", "--json", str(out), *(["--chart", str(chart)] if with_chart else [])]
    proc = run_bench(*args, timeout=170)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert not broker_workers_left(), broker_workers_left()
    results = json.loads(out.read_text())
    assert not results["meta"]["skipped"], (
        f"skipped: {results['meta']['skipped']} (this test needs the Redis server at "
        "127.0.0.1:6379, and celery, dramatiq and redis from the [test] extra)"
    )
    assert results["meta"]["sections"] == [
        "noop",
        "cpu",
        "latency",
        "pool",
        "rss",
        "transport",
        "brokers",
    ]
    check_throughput(results)
    check_latency(results)
    check_rss(results)
    check_transport(results)
    check_brokers(results)
    if with_chart:
        assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.timeout(90)
def test_cpu_section_runs_cpu_repeat_times_with_a_ceiling_run_around_each(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    args = ["--sections", "cpu", "--cpu-tasks", "4", "--cpu-repeat", "2", "--repeat", "1"]
    proc = run_bench(*args, "--json", str(out), timeout=80)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    section = json.loads(out.read_text())["cpu"]
    assert section["repeat"] == 2
    runs = {name: len(info["tasks_per_s"]) for name, info in section["systems"].items()}
    assert runs == {name: 3 if name == "bare fork ceiling" else 2 for name in EXPECTED["cpu"]}
    assert "2 run(s) each" in proc.stdout
    # Each system's tasks reported their own times: inside the timed window
    # (a share of at most 1), and about as long as the calibrated task.
    for name, info in section["systems"].items():
        assert 0.2 < info["task_share"] <= 1.0, (name, info["task_share"])
        assert 0.3 < info["task_cpu_ms"] / section["task_ms_measured"] < 3.0, (name, info)
        assert f"{name}: {info['task_share']:.1%} inside" in proc.stdout
    for name, ratio in section["task_share_ratios"].items():
        ceiling = section["systems"]["bare fork ceiling"]["task_share"]
        system = section["systems"][name.split(" / ")[0]]["task_share"]
        assert ratio == pytest.approx(system / ceiling), name


@pytest.mark.timeout(60)
def test_benchmark_rejects_an_unknown_section() -> None:
    proc = run_bench("--quick", "--sections", "noop,bogus", timeout=50)
    assert proc.returncode == 2
    assert "unknown section(s) bogus" in proc.stderr


GATE = """
import sys
from benchmarks import brokers, throughput

brokers.unavailable = lambda: "Redis at 127.0.0.1:6379 does not answer PING (test)"
args = throughput.parse_args(["--quick"])
print(",".join(args.sections), args.skipped["brokers"])
print(throughput.render({"meta": {
    "revision": "", "python": "3", "cpus": 2, "machine": "m", "repeat": 1,
    "skipped": args.skipped, "section_seconds": {},
}}))
throughput.parse_args(["--quick", "--sections", "noop,brokers"])
"""


@pytest.mark.timeout(60)
def test_brokers_section_is_skipped_by_default_and_refused_when_asked_without_redis() -> None:
    proc = run_python("-c", GATE, timeout=50)
    assert proc.returncode == 2, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    assert lines[0] == "noop,cpu,latency,pool,rss,transport Redis at 127.0.0.1:6379 " + (
        "does not answer PING (test)"
    )
    assert any(line.startswith("7. brokers") and "skipped" in line for line in lines)
    assert "section brokers cannot run: Redis at 127.0.0.1:6379" in proc.stderr


def test_paired_ratio_is_the_median_of_the_ratios_within_each_repetition() -> None:
    from benchmarks.stats import median_ratio, paired_ratio, summary

    # The machine runs at half speed in the second repetition: each pair still
    # shows a at 2x b, while the ratio of the medians is thrown off.
    rates = {"a": [200.0, 100.0, 210.0], "b": [100.0, 50.0, 105.0]}
    assert paired_ratio(rates, "a", "b") == 2.0
    rates = {"a": [300.0, 100.0, 100.0], "b": [100.0, 100.0, 25.0]}
    assert paired_ratio(rates, "a", "b") == 3.0
    assert median_ratio({k: summary(v) for k, v in rates.items()}, "a", "b", "tasks") == 1.0


def test_ratios_are_printed_precisely_enough_to_judge_a_target() -> None:
    """0.496x is under a 0.5x target: it must not print as "0.50x"."""
    from benchmarks.stats import ratio_lines, ratio_text

    assert ratio_text(0.4958) == "0.496x"
    assert ratio_text(0.9538) == "0.954x"
    assert ratio_text(20.534) == "20.53x"
    assert ratio_lines({"a / b": 0.4958}) == ["  ratios of medians:", "    a / b: 0.496x"]


@pytest.mark.timeout(60)
def test_a_fresh_interpreter_runs_one_cpu_run_and_reports_it() -> None:
    from benchmarks import fresh

    done = fresh.in_new_interpreter("ceiling", 6, 1000, 2)
    assert done.tasks == 6
    assert 0 < done.task_cpu <= done.task_wall * 1.5 and done.seconds > 0
    assert fresh.in_new_interpreter("ppe", 3, 1000, 2).tasks == 3
    with pytest.raises(RuntimeError, match="exited 2"):
        fresh.in_new_interpreter("bogus", 1, 1, 1)
