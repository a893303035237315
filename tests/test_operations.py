"""Operating the daemon: reload, recycling, systemd notify, logs, status."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import orjson
import psutil
import pytest

from conftest import TESTS, start_daemon, until, write_config
from procqueue import QueueTask, QueueTaskStatus, marshal_payload

pytestmark = pytest.mark.timeout(90)
OK = QueueTaskStatus.SUCCEEDED


def _hot_module(directory: Path, version: str) -> None:
    (directory / "hotmod.py").write_text(
        "import time\n"
        "def handle(ctx, task):\n"
        "    with open(task.headers['log'], 'a') as out:\n"
        "        out.write(task.id + '\\n')\n"
        "    time.sleep(float(task.headers.get('sleep', '0')))\n"
        f"    return {version!r}\n"
    )


HOT_QUEUES = """
[queues."hot"]
concurrency = 1
[queues."hot".handlers]
"hot" = "hotmod:handle"
"""


def test_sighup_runs_new_code_and_loses_nothing(make_daemon, short_dir):
    _hot_module(short_dir, "v1")
    daemon = make_daemon(queues=HOT_QUEUES, settings=f'pythonpath = ["{short_dir}", "{TESTS}"]')
    client = daemon.client()
    log = str(short_dir / "ran.log")
    first = client.publish(QueueTask(queue="hot", type="hot", headers={"log": log, "sleep": "0.5"}))
    queued = client.publish_many(
        [QueueTask(queue="hot", type="hot", headers={"log": log}) for _ in range(20)]
    )
    until(lambda: client.get_task(first.id).status is QueueTaskStatus.RUNNING)
    _hot_module(short_dir, "v2")
    os.kill(daemon.proc.pid, signal.SIGHUP)
    results = [client.wait(t.id, timeout=30) for t in [first, *queued]]
    assert all(t.status is OK for t in results)
    assert results[0].result == "v1"  # the running task finished on the old worker
    assert results[-1].result == "v2"  # new workers import the edited module
    ran = Path(log).read_text().split()
    assert sorted(ran) == sorted(t.id for t in results)  # each exactly once
    assert "reloaded" in daemon.logs()


def test_bad_config_on_reload_keeps_the_old_one(daemon):
    pids = daemon.worker_pids()
    text = daemon.config.read_text()
    daemon.config.write_text(text + '\n[queues."x"]\nconcurrency = "many"\n')
    os.kill(daemon.proc.pid, signal.SIGHUP)
    until(lambda: "reload rejected" in daemon.logs())
    assert 'queues."x".concurrency' in daemon.logs()
    assert daemon.worker_pids() == pids
    assert daemon.run_task(queue="default", type="echo").status is OK


def test_reload_adds_and_resizes_queues(daemon):
    text = daemon.config.read_text().replace("concurrency = 2", "concurrency = 3")
    daemon.config.write_text(
        text + '\n[queues."extra"]\n[queues."extra".handlers]\n"echo" = "pqhandlers:echo"\n'
    )
    os.kill(daemon.proc.pid, signal.SIGHUP)
    until(lambda: "extra" in daemon.client().status()["queues"])
    status = daemon.wait_ready()
    assert len(status["queues"]["default"]["workers"]) == 3
    assert daemon.run_task(queue="extra", type="echo").status is OK


def test_recycling_after_max_tasks_per_child(make_daemon):
    daemon = make_daemon(
        queues="""
        [queues."q"]
        concurrency = 1
        max_tasks_per_child = 3
        [queues."q".handlers]
        "echo" = "pqhandlers:echo"
    """
    )
    client = daemon.client()
    tasks = client.publish_many([QueueTask(queue="q", type="echo") for _ in range(7)])
    pids = [client.wait(t.id, timeout=20).result["pid"] for t in tasks]
    assert pids[0] == pids[1] == pids[2] != pids[3]
    assert pids[3] == pids[4] == pids[5] != pids[6]
    assert "recycled after 3 tasks" in daemon.logs()


def test_recycling_on_memory_limit(make_daemon):
    daemon = make_daemon(
        queues="""
        [queues."q"]
        concurrency = 1
        max_memory_per_child = "150MiB"
        [queues."q".handlers]
        "hog" = "pqhandlers:hog"
        "echo" = "pqhandlers:echo"
    """
    )
    hog = daemon.run_task(queue="q", type="hog", payload=marshal_payload({"mib": 200}))
    assert hog.status is OK
    until(lambda: "above max_memory_per_child" in daemon.logs())
    after = daemon.run_task(queue="q", type="echo")
    assert after.status is OK and after.result["pid"] != hog.result


def test_sd_notify_sequence(short_dir):
    sock_path = short_dir / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(sock_path))
    systemd.settimeout(15)
    config = write_config(short_dir)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    daemon = start_daemon(config, env=env)
    messages: list[str] = []

    def expect(prefix: str) -> None:
        while not any(m.startswith(prefix) for m in messages):
            messages.append(systemd.recv(4096).decode())

    try:
        expect("READY=1")
        assert "MAINPID=" in messages[-1] and "STATUS=" in messages[-1]
        expect("WATCHDOG=1")
        os.kill(daemon.proc.pid, signal.SIGHUP)
        expect("RELOADING=1")
        assert "MONOTONIC_USEC=" in messages[-1]
        count = sum(m.startswith("READY=1") for m in messages)
        while sum(m.startswith("READY=1") for m in messages) == count:
            messages.append(systemd.recv(4096).decode())
        assert daemon.stop() == 0
        expect("STOPPING=1")
    finally:
        systemd.close()
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def test_json_log_format(short_dir):
    config = write_config(short_dir)
    daemon = start_daemon(config, extra=["--log-format", "json"])
    try:
        daemon.wait_ready()
        daemon.run_task(queue="default", type="always_fail", max_retry=1)
    finally:
        daemon.stop()
    lines = [orjson.loads(line) for line in daemon.logs().splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "pid", "msg"} <= set(e) for e in lines)
    assert any("always fails" in e["msg"] and e["level"] == "info" for e in lines)


def test_status_reports_rates_and_workers(daemon):
    client = daemon.client()
    for task in client.publish_many([QueueTask(queue="default", type="echo") for _ in range(20)]):
        client.wait(task.id, timeout=20)
    queue = client.status()["queues"]["default"]
    assert queue["throughput_1m"] > 0 and queue["run_p50"] is not None
    assert queue["run_p99"] >= queue["run_p50"]
    worker = queue["workers"][0]
    assert {"pid", "state", "task_id", "tasks_done", "rss", "cpu_percent"} <= set(worker)
    table = daemon.cli("status").stdout
    assert "tasks/s" in table and "p99" in table


def test_crash_backoff_is_visible_and_capped(make_daemon):
    daemon = make_daemon(
        queues="""
        [queues."bad"]
        [queues."bad".handlers]
        "x" = "broken_handlers:handler"
    """
    )
    until(lambda: daemon.logs().count("cannot start") >= 3, timeout=20)
    worker = daemon.client().status()["queues"]["bad"]["workers"][0]
    assert worker["state"] == "crashing" and "broken on purpose" in worker["error"]
    assert "next try in 2.0s" in daemon.logs()  # 0.5, 1, 2 ... doubling
    assert psutil.Process(daemon.proc.pid).status() != psutil.STATUS_ZOMBIE


def test_prometheus_endpoint(make_daemon):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as probe:  # a free port for this test
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = make_daemon(settings=f'metrics = "127.0.0.1:{port}"')
    daemon.run_task(queue="default", type="echo")
    daemon.run_task(queue="default", type="always_fail", max_retry=1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {
        (s.name, s.labels.get("queue")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("procqueue_tasks_published_total", "default")] == 2
    assert samples[("procqueue_tasks_succeeded_total", "default")] == 1
    assert samples[("procqueue_tasks_failed_total", "default")] == 1
    assert samples[("procqueue_tasks_retried_total", "default")] == 1
    assert samples[("procqueue_task_run_seconds_count", "default")] == 2
    assert samples[("procqueue_workers", "default")] == 2


def test_bad_metrics_address_is_a_config_error(short_dir):
    from conftest import run_cli

    config = write_config(short_dir, settings='metrics = "nowhere"')
    result = run_cli("check", str(config))
    assert result.returncode == 2 and "procqueue.metrics" in result.stderr


def test_reload_flag_picks_up_edits_and_survives_a_syntax_error(short_dir):
    _hot_module(short_dir, "v1")
    config = write_config(
        short_dir, queues=HOT_QUEUES, settings=f'pythonpath = ["{short_dir}", "{TESTS}"]'
    )
    daemon = start_daemon(config, extra=["--reload"])
    log = str(short_dir / "ran.log")

    def run() -> QueueTask:
        return daemon.run_task(queue="hot", type="hot", headers={"log": log}, wait=20)

    try:
        daemon.wait_ready()
        assert run().result == "v1"
        _hot_module(short_dir, "v2")
        until(lambda: run().result == "v2", timeout=20, message=daemon.logs())
        (short_dir / "hotmod.py").write_text("def handle(ctx, task):\n    return (\n")
        until(lambda: "same error" in daemon.logs(), timeout=20)  # retried, told once
        client = daemon.client()
        stored = client.publish(QueueTask(queue="hot", type="hot", headers={"log": log}))
        _hot_module(short_dir, "v3")  # fixed: the queue resumes, the queued task runs
        assert client.wait(stored.id, timeout=30).result == "v3"
        assert daemon.logs().count("SyntaxError") == 1  # reported once, not per retry
    finally:
        daemon.stop()


def test_run_times_are_the_workers_own_even_with_prefetch(make_daemon):
    queues = """
[queues."pre"]
concurrency = 1
prefetch = 8
[queues."pre".handlers]
"stamp" = "pqhandlers:stamp"
"""
    daemon = make_daemon(queues)
    client = daemon.client()
    quick = [QueueTask(queue="pre", type="stamp") for _ in range(8)]
    slow = QueueTask(queue="pre", type="stamp", payload=marshal_payload({"sleep": 0.3}))
    stored = client.publish_many([*quick, slow, *quick])
    client.wait(stored[-1].id, timeout=20)
    queue = client.status()["queues"]["pre"]
    # 16 quick runs and one of 0.3 s: the median is quick, the 99th percentile is the slow one
    assert queue["run_p50"] < 0.1
    assert 0.3 <= queue["run_p99"] < 1.0
