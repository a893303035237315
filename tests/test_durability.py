"""The SQLite store: what survives kill -9, status by id, results, dead letters."""

from __future__ import annotations

import os
import random
import signal
import time

import orjson
import psutil
import pytest

from conftest import until
from procqueue import Client, QueueTask, QueueTaskStatus, marshal_payload

pytestmark = pytest.mark.timeout(120)
SQLITE = 'store = "sqlite:///data/app.db"\nshutdown_timeout = "10s"'
RECORD_QUEUE = """
[queues."work"]
concurrency = 2
max_retry = 5
retry_delay = "50ms"
buffer_size = 500
[queues."work".handlers]
"record" = "pqhandlers:record"
"always_fail" = "pqhandlers:always_fail"
"echo" = "pqhandlers:echo"
"""


def _restart(make_daemon, queues=RECORD_QUEUE, settings=SQLITE):
    return make_daemon(queues=queues, settings=settings)


def test_finished_task_and_result_survive_restart(make_daemon):
    daemon = make_daemon(settings=SQLITE)
    done = daemon.run_task(queue="default", type="echo", payload=marshal_payload({"x": 1}))
    assert done.status is QueueTaskStatus.SUCCEEDED
    assert daemon.stop() == 0
    daemon = make_daemon(settings=SQLITE)
    again = daemon.client().get_task(done.id)
    assert again.status is QueueTaskStatus.SUCCEEDED and again.result == done.result
    shown = daemon.cli("task", done.id)
    assert orjson.loads(shown.stdout)["result"]["payload"] == {"x": 1}


def test_sigkill_loses_no_published_task(make_daemon, short_dir):
    log = short_dir / "ran.log"
    daemon = _restart(make_daemon)
    client = daemon.client()
    published: list[str] = []
    rng = random.Random(7)
    for _round in range(4):
        for _ in range(rng.randint(3, 6)):
            batch = [
                QueueTask(queue="work", type="record", payload=marshal_payload({"log": str(log)}))
                for _ in range(100)
            ]
            published += [t.id for t in client.publish_many(batch)]
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(daemon.proc.pid, signal.SIGKILL)  # no goodbye: a crash
        daemon.proc.wait(10)
        daemon = _restart(make_daemon)
        client = daemon.client()
    deadline = time.monotonic() + 60
    while (
        client.status()["queues"]["work"]["pending"] or client.status()["queues"]["work"]["running"]
    ):
        assert time.monotonic() < deadline, daemon.logs()
        time.sleep(0.1)
    ran = set(log.read_text().split())
    assert set(published) <= ran, f"{len(set(published) - ran)} published task(s) never ran"
    statuses = {client.get_task(i).status for i in published}
    assert statuses == {QueueTaskStatus.SUCCEEDED}


def test_kill_right_after_publish_reply(make_daemon):
    daemon = _restart(make_daemon)
    stored = daemon.client().publish(QueueTask(queue="work", type="echo", delay=3600))
    os.kill(daemon.proc.pid, signal.SIGKILL)  # before any later loop turn could write
    daemon.proc.wait(10)
    daemon = _restart(make_daemon)
    task = daemon.client().get_task(stored.id)
    assert task.status is QueueTaskStatus.PENDING
    assert task.available_at == stored.available_at  # the delay is kept
    assert daemon.client().status()["queues"]["work"]["pending"] == 1


def test_running_task_is_charged_an_attempt_after_a_crash(make_daemon, short_dir):
    daemon = _restart(make_daemon)
    client = daemon.client()
    log = short_dir / "ran.log"
    stored = client.publish(
        QueueTask(
            queue="work", type="record", payload=marshal_payload({"log": str(log), "sleep": 30})
        )
    )
    until(log.exists, timeout=10)
    time.sleep(0.1)  # let the loop commit "running"
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(10)
    daemon = _restart(make_daemon)
    task = daemon.client().get_task(stored.id)
    assert task.attempt == 1
    assert "supervisor died" in task.last_error


def test_dead_letters_list_requeue_purge(make_daemon):
    daemon = _restart(make_daemon)
    client = daemon.client()
    dead = [daemon.run_task(queue="work", type="always_fail", max_retry=1) for _ in range(3)]
    assert all(t.status is QueueTaskStatus.FAILED for t in dead)
    listed = daemon.cli("dead", "list", "--json")
    assert listed.returncode == 0
    assert {t["id"] for t in orjson.loads(listed.stdout)} == {t.id for t in dead}
    table = daemon.cli("dead", "list", "--queue", "work")
    assert "3 dead letter(s)" in table.stdout and "always fails" in table.stdout
    assert daemon.cli("dead", "requeue", dead[0].id).returncode == 0
    again = client.wait(dead[0].id, timeout=20)
    assert again.status is QueueTaskStatus.FAILED and again.attempt == 1  # ran again from 0
    assert daemon.cli("dead", "requeue").returncode == 2  # neither ID nor --all
    purged = daemon.cli("dead", "purge", "--queue", "work")
    assert purged.returncode == 0 and "purged 3" in purged.stdout
    assert client.dead_letters() == []


def test_retention_prunes_succeeded_tasks(make_daemon):
    daemon = make_daemon(settings=SQLITE.replace('"10s"', '"10s"\nretention = "500ms"'))
    done = daemon.run_task(queue="default", type="echo")
    failed = daemon.run_task(queue="default", type="always_fail", max_retry=1)
    deadline = time.monotonic() + 10
    from procqueue import TaskNotFound

    while True:
        try:
            daemon.client().get_task(done.id)
        except TaskNotFound:
            break
        assert time.monotonic() < deadline, "retention never pruned the task"
        time.sleep(0.1)
    assert daemon.client().get_task(failed.id).status is QueueTaskStatus.FAILED  # kept


def test_second_daemon_on_the_same_store_refuses(make_daemon, short_dir):
    daemon = _restart(make_daemon)
    other_dir = short_dir / "other"
    other_dir.mkdir()
    config = other_dir / "app.toml"
    text = daemon.config.read_text().replace(
        '"sqlite:///data/app.db"', f'"sqlite:///{daemon.config.parent}/data/app.db"'
    )
    config.write_text(text)
    from conftest import start_daemon

    other = start_daemon(config)
    assert other.proc.wait(20) == 1
    assert "in use by another procqueue daemon" in other.logs()
    assert daemon.client().ping()["state"] == "running"


def test_backlog_is_paged_not_held_in_memory(make_daemon, short_dir):
    queues = """
    [queues."slow"]
    concurrency = 1
    buffer_size = 1000
    [queues."slow".handlers]
    "sleepy" = "pqhandlers:sleepy"
    """
    daemon = make_daemon(queues=queues, settings=SQLITE.replace('"full"', '"normal"'))
    client = Client(daemon.socket, timeout=60)
    sup = psutil.Process(daemon.proc.pid)

    def publish(n: int) -> None:
        for _ in range(n // 5000):
            client.publish_many(
                [QueueTask(queue="slow", type="sleepy", payload=b"x" * 200) for _ in range(5000)]
            )

    publish(20_000)
    early = sup.memory_info().rss
    publish(100_000)
    late = sup.memory_info().rss
    status = client.status()["queues"]["slow"]
    client.close()
    assert status["pending"] >= 119_000
    # 100k more tasks held in memory would take ~60 MiB; even a dict entry per task ~10 MiB
    assert late - early < 6 << 20, f"supervisor RSS grew {(late - early) / (1 << 20):.1f} MiB"


def test_paged_backlog_all_runs_in_order(make_daemon, short_dir):
    log = short_dir / "order.log"
    queues = """
    [queues."q"]
    concurrency = 1
    buffer_size = 10
    [queues."q".handlers]
    "record" = "pqhandlers:record"
    """
    daemon = make_daemon(queues=queues, settings=SQLITE)
    client = daemon.client()
    ids = [
        t.id
        for t in client.publish_many(
            [
                QueueTask(queue="q", type="record", payload=marshal_payload({"log": str(log)}))
                for _ in range(200)
            ]
        )
    ]
    last = client.wait(ids[-1], timeout=60)
    assert last.status is QueueTaskStatus.SUCCEEDED, "the backlog's last task never ran"
    assert log.read_text().split() == ids


def test_supervisor_memory_stays_flat_as_tasks_pass_through(make_daemon):
    """The SQLite store forgets what it held of a task once it is written
    finished. It did not for a task that finished before its INSERT went to
    the writer (about half of them under load): the supervisor grew by ~22 MiB
    per 300,000 tasks. Run 50,000 tasks, then 200,000 more: the RSS must not
    follow (it grows ~1-2 MiB here; ~15 MiB with the leak)."""
    daemon = make_daemon(
        queues='[queues."fast"]\nconcurrency = 2\nprefetch = 64\nbuffer_size = 100000\n'
        '[queues."fast".handlers]\n"noop" = "pqhandlers:noop"\n',
        settings=SQLITE,
    )
    client = daemon.client()
    supervisor = psutil.Process(daemon.proc.pid)

    def run(count: int) -> None:
        last = ""
        for _ in range(count // 1000):
            last = client.publish_many([QueueTask(queue="fast", type="noop") for _ in range(1000)])[
                -1
            ].id
        assert client.wait(last, timeout=60).status is QueueTaskStatus.SUCCEEDED
        until(lambda: client.status()["queues"]["fast"]["running"] == 0, timeout=30)

    run(50_000)
    before = supervisor.memory_info().rss
    run(200_000)
    grown = (supervisor.memory_info().rss - before) / 2**20
    assert grown < 8, f"the supervisor grew by {grown:.1f} MiB over 200,000 tasks"
