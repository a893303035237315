"""The real daemon, as a user drives it: publish, run, retry, time out, crash."""

from __future__ import annotations

import os
import signal
import time

import orjson
import psutil
import pytest

from conftest import until
from procqueue import (
    InvalidQueueTask,
    InvalidTaskType,
    QueueNotRegistered,
    QueueTask,
    QueueTaskStatus,
    TaskNotFound,
    marshal_payload,
)

pytestmark = pytest.mark.timeout(90)
OK, FAILED = QueueTaskStatus.SUCCEEDED, QueueTaskStatus.FAILED


def test_publish_and_result_through_client(daemon):
    client = daemon.client()
    stored = client.publish(
        QueueTask(
            queue="default",
            type="echo",
            payload=marshal_payload({"n": 1}),
            key="user-1",
            headers={"trace": "abc"},
        )
    )
    assert stored.id and stored.status is QueueTaskStatus.PENDING
    assert stored.created_at is not None and stored.created_at.tzinfo is not None
    done = client.wait(stored.id, timeout=20)
    assert done.status is OK
    assert done.result["payload"] == {"n": 1}
    assert done.key == "user-1" and done.headers == {"trace": "abc"}
    assert client.get_task(stored.id).status is OK


@pytest.mark.parametrize("spin", [0.0, 0.5])
def test_client_with_and_without_polling_for_replies(daemon, spin):
    """``spin=0`` sleeps on the socket at once; a long spin still returns as
    soon as the reply is there, and a slow reply is still waited for."""
    from procqueue import Client

    with Client(daemon.socket, timeout=30, spin=spin) as client:
        start = time.monotonic()
        done = client.run(QueueTask(queue="default", type="echo", payload=b'{"n": 2}'))
        assert done.status is OK and done.result["payload"] == {"n": 2}
        assert client.ping()["pid"] == daemon.proc.pid
        slow = QueueTask(queue="default", type="stamp", payload=b'{"sleep": 0.7}')
        assert client.run(slow, timeout=20).status is OK
        assert time.monotonic() - start >= 0.7


def test_publish_many_one_round_trip_and_all_run(daemon):
    client = daemon.client()
    tasks = [
        QueueTask(queue="default", type="echo", payload=marshal_payload(i)) for i in range(500)
    ]
    stored = client.publish_many(tasks)
    assert len({t.id for t in stored}) == 500
    results = [client.wait(t.id, timeout=30) for t in stored]
    assert all(t.status is OK for t in results)
    assert sorted(t.result["payload"] for t in results) == list(range(500))


def test_cli_publish_task_and_status(daemon):
    out = daemon.cli(
        "publish",
        "--queue",
        "default",
        "--type",
        "echo",
        "--payload",
        '{"a": 1}',
        "--header",
        "k=v",
        "--wait",
    )
    assert out.returncode == 0, out.stderr
    task = orjson.loads(out.stdout)
    assert task["status"] == "succeeded" and task["headers"] == {"k": "v"}
    assert task["result"]["payload"] == {"a": 1}
    shown = daemon.cli("task", task["id"])
    assert shown.returncode == 0 and orjson.loads(shown.stdout)["id"] == task["id"]
    status = daemon.cli("status", "--json")
    queue = orjson.loads(status.stdout)["queues"]["default"]
    assert queue["concurrency"] == 2 and queue["succeeded"] >= 1
    assert {"pending", "running", "retrying", "failed"} <= set(queue)
    assert all(w["pid"] and w["rss"] > 0 and w["state"] for w in queue["workers"])
    table = daemon.cli("status")
    assert table.returncode == 0 and "default#0" in table.stdout and "succeeded" in table.stdout


def test_cli_errors_exit_codes(daemon):
    bad_queue = daemon.cli("publish", "--queue", "nope", "--type", "echo")
    assert bad_queue.returncode == 1 and "QueueNotRegistered" in bad_queue.stderr
    assert "nope" in bad_queue.stderr
    missing = daemon.cli("task", "no-such-id")
    assert missing.returncode == 1 and "TaskNotFound" in missing.stderr
    bad_payload = daemon.cli("publish", "--queue", "default", "--type", "echo", "--payload", "{x")
    assert bad_payload.returncode == 2


def test_validation_errors(daemon):
    client = daemon.client()
    with pytest.raises(QueueNotRegistered, match="'missing'"):
        client.publish(QueueTask(queue="missing", type="echo"))
    with pytest.raises(InvalidTaskType):
        client.publish(QueueTask(queue="default", type=""))
    with pytest.raises(InvalidQueueTask):
        client.publish(QueueTask(queue="", type="echo"))
    with pytest.raises(TaskNotFound):
        client.get_task("nope")


def test_unknown_type_fails_without_retry(daemon):
    task = daemon.run_task(queue="default", type="no.such.type")
    assert task.status is FAILED and task.attempt == 0
    assert "no.such.type" in task.last_error and "handler" in task.last_error


def test_cpu_bound_tasks_run_in_parallel(daemon):
    client = daemon.client()
    tasks = client.publish_many(
        [
            QueueTask(queue="default", type="stamp", payload=marshal_payload({"spin": 0.4}))
            for _ in range(2)
        ]
    )
    a, b = (client.wait(t.id, timeout=20).result for t in tasks)
    assert a["pid"] != b["pid"]
    assert a["start"] < b["end"] and b["start"] < a["end"], "the two tasks did not overlap"


def test_short_task_never_waits_behind_a_long_one(daemon):
    client = daemon.client()
    long = client.publish(
        QueueTask(queue="default", type="stamp", payload=marshal_payload({"sleep": 1.5}))
    )
    shorts = client.publish_many([QueueTask(queue="default", type="stamp") for _ in range(6)])
    long_done = client.wait(long.id, timeout=20).result
    for short in shorts:
        result = client.wait(short.id, timeout=20).result
        assert result["end"] < long_done["end"], "a short task waited behind the long one"
        assert result["pid"] != long_done["pid"]


def test_retries_then_success(daemon):
    task = daemon.run_task(
        queue="default", type="flaky", payload=marshal_payload({"fail_times": 2})
    )
    assert task.status is OK and task.attempt == 2 and task.result == 2
    assert "flaky failure on attempt 1" in task.last_error


def test_retries_exhausted_and_task_max_retry_overrides(daemon):
    task = daemon.run_task(queue="default", type="always_fail")
    assert task.status is FAILED and task.attempt == 2  # the queue's max_retry
    assert "ValueError: this handler always fails" in task.last_error
    task = daemon.run_task(queue="default", type="always_fail", max_retry=4)
    assert task.status is FAILED and task.attempt == 4
    status = daemon.client().status()["queues"]["default"]
    assert status["failed"] == 2 and status["retried"] == 6


def test_delay_is_never_early(daemon):
    client = daemon.client()
    stored = client.publish(QueueTask(queue="default", type="stamp", delay=0.6))
    assert (stored.available_at - stored.created_at).total_seconds() == pytest.approx(0.6, abs=1e-3)
    status = client.status()["queues"]["default"]
    assert status["pending"] == 1
    done = client.wait(stored.id, timeout=20)
    assert done.result["start"] >= stored.available_at.timestamp()
    assert done.result["start"] - stored.available_at.timestamp() < 0.5


def test_soft_timeout_raises_in_handler(daemon):
    task = daemon.run_task(queue="default", type="sleepy", timeout=0.3, max_retry=1)
    assert task.status is FAILED and task.attempt == 1
    assert "timeout" in task.last_error


def test_hard_timeout_kills_a_stubborn_worker(daemon):
    before = set(daemon.worker_pids())
    started = time.monotonic()
    task = daemon.run_task(queue="default", type="stubborn", timeout=0.3, max_retry=1)
    assert task.status is FAILED and "timeout" in task.last_error and "killed" in task.last_error
    assert time.monotonic() - started < 10
    daemon.wait_ready()
    after = set(daemon.worker_pids())
    assert len(after) == 2 and before != after, "the killed worker was not replaced"
    assert daemon.run_task(queue="default", type="echo").status is OK


def test_deadline_visible_to_handler(daemon):
    task = daemon.run_task(queue="default", type="deadline", timeout=5)
    assert 4 < task.result <= 5


@pytest.mark.parametrize("how", ["kill", "exit"])
def test_worker_killed_mid_task_costs_one_attempt(daemon, how):
    task = daemon.run_task(queue="default", type="die_once", payload=marshal_payload({"how": how}))
    assert task.status is OK and task.attempt == 1 and task.result == 1
    assert "died" in task.last_error
    assert ("SIGKILL" if how == "kill" else "code 13") in task.last_error
    daemon.wait_ready()
    assert len(daemon.worker_pids()) == 2


def test_external_sigkill_of_busy_worker_retries_the_task(daemon):
    client = daemon.client()
    stored = client.publish(
        QueueTask(
            queue="default", type="stamp", payload=marshal_payload({"sleep": 30}), max_retry=1
        )
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        busy = [
            w for w in client.status()["queues"]["default"]["workers"] if w["task_id"] == stored.id
        ]
        if busy:
            break
        time.sleep(0.02)
    os.kill(busy[0]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while client.get_task(stored.id).attempt == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    task = client.get_task(stored.id)
    assert task.attempt == 1 and "SIGKILL" in task.last_error
    assert task.status in (
        QueueTaskStatus.RETRYING,
        QueueTaskStatus.PENDING,
        QueueTaskStatus.RUNNING,
    )


def test_16_mib_payload_through_a_small_ring(make_daemon):
    daemon = make_daemon(
        queues="""
        [queues."big"]
        concurrency = 1
        ring_size = "64KiB"
        [queues."big".handlers]
        "digest" = "pqhandlers:digest"
        "echo" = "pqhandlers:echo"
    """
    )
    data = os.urandom(16 << 20)
    task = daemon.run_task(queue="big", type="digest", payload=data, wait=60)
    import hashlib

    assert task.status is OK
    assert task.result == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert daemon.run_task(queue="big", type="echo").status is OK


def test_follow_up_publish_from_handler(daemon):
    parent = daemon.run_task(queue="default", type="follow_up")
    assert parent.status is OK
    child = daemon.client().wait(parent.result, timeout=20)
    assert child.status is OK and child.result["payload"] == {"parent": parent.id}


def test_async_handler(daemon):
    task = daemon.run_task(queue="default", type="async_echo")
    assert task.status is OK and task.result == "async ok"


def test_broken_handler_module_backs_off_without_hurting_other_queues(make_daemon):
    daemon = make_daemon(
        queues="""
        [queues."good"]
        [queues."good".handlers]
        "echo" = "pqhandlers:echo"
        [queues."bad"]
        [queues."bad".handlers]
        "x" = "broken_handlers:handler"
    """
    )
    client = daemon.client()
    stored = client.publish(QueueTask(queue="bad", type="x"))
    assert daemon.run_task(queue="good", type="echo").status is OK
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        bad = client.status()["queues"]["bad"]["workers"][0]
        if bad["state"] == "crashing":
            break
        time.sleep(0.05)
    assert bad["state"] == "crashing"
    assert "broken_handlers is broken on purpose" in bad["error"]
    assert client.get_task(stored.id).status is QueueTaskStatus.PENDING  # kept, not lost
    assert "cannot load handler" in daemon.logs()


def test_process_titles(daemon):
    sup = psutil.Process(daemon.proc.pid)
    assert " ".join(sup.cmdline()).startswith("procqueue: supervisor")
    titles = sorted(" ".join(c.cmdline()).strip() for c in sup.children())
    assert titles == ["procqueue: worker default#0 idle", "procqueue: worker default#1 idle"]


ONE_WORKER = """
[queues."one"]
concurrency = 1
prefetch = 64

[queues."one".handlers]
"stamp" = "pqhandlers:stamp"
"""


def _worker_title(daemon) -> str:
    (worker,) = psutil.Process(daemon.proc.pid).children()
    return " ".join(worker.cmdline()).strip()


def test_a_worker_title_names_its_task_but_never_one_already_done(make_daemon):
    daemon = make_daemon(queues=ONE_WORKER)
    client = daemon.client()

    def stamp(**args: float) -> QueueTask:
        return QueueTask(queue="one", type="stamp", payload=marshal_payload(args))

    def done(task: QueueTask) -> bool:
        return client.get_task(task.id).status is QueueTaskStatus.SUCCEEDED

    busy = "procqueue: worker one#0 busy "
    first = client.publish(stamp(sleep=1.0))  # from idle: named
    until(lambda: _worker_title(daemon) == busy + first.id)
    # Queued behind it: a task after a long one (named), a run of short ones, a slow one.
    after_long, *shorts, slow = client.publish_many(
        [stamp(sleep=0.3)] + [stamp() for _ in range(200)] + [stamp(sleep=1.5)]
    )
    # (A prefetched task counts as running at once: the title tells when it starts.)
    until(lambda: _worker_title(daemon) == busy + after_long.id)
    until(lambda: all(done(t) for t in shorts), timeout=20)
    # The worker is on the slow task now, started after a short one: the title
    # says so, or (had the worker slept between them) names it; never a task done.
    assert not done(slow)
    assert _worker_title(daemon) in (busy + "(short tasks)", busy + slow.id)
    until(lambda: done(slow))
    until(lambda: _worker_title(daemon) == "procqueue: worker one#0 idle")


def test_sigterm_lets_the_running_task_finish(daemon):
    client = daemon.client()
    stored = client.publish(
        QueueTask(queue="default", type="stamp", payload=marshal_payload({"sleep": 1.0}))
    )
    until(lambda: client.get_task(stored.id).status is QueueTaskStatus.RUNNING, timeout=10)
    workers = daemon.worker_pids()
    shm_before = set(os.listdir("/dev/shm"))
    assert daemon.stop(signal.SIGTERM) == 0
    logs = daemon.logs()
    assert "graceful stop: 1 task(s) running" in logs
    assert f"task {stored.id}" not in logs  # it was not failed or killed
    assert not [
        p
        for p in workers
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
    assert set(os.listdir("/dev/shm")) <= shm_before
    assert not daemon.socket.exists()


def test_workers_exit_when_supervisor_is_sigkilled(daemon):
    workers = daemon.worker_pids()
    daemon.client().publish(
        QueueTask(queue="default", type="stamp", payload=marshal_payload({"sleep": 30}))
    )
    time.sleep(0.2)
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    deadline = time.monotonic() + 3
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [
            p
            for p in workers
            if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        time.sleep(0.05)
    assert not alive, "workers outlived the supervisor"


def test_sigttin_sigttou_resize_every_queue(daemon):
    os.kill(daemon.proc.pid, signal.SIGTTIN)
    until(lambda: len(daemon.worker_pids()) == 3, timeout=10, message=daemon.logs())
    daemon.wait_ready()
    os.kill(daemon.proc.pid, signal.SIGTTOU)
    until(
        lambda: len(daemon.client().status()["queues"]["default"]["workers"]) == 2,
        timeout=10,
        message=daemon.logs(),
    )
    assert daemon.run_task(queue="default", type="echo").status is OK


def test_shutdown_timeout_kills_what_is_still_running(make_daemon):
    daemon = make_daemon(settings='shutdown_timeout = "500ms"')
    client = daemon.client()
    stored = client.publish(
        QueueTask(queue="default", type="stamp", payload=marshal_payload({"sleep": 30}))
    )
    until(lambda: client.get_task(stored.id).status is QueueTaskStatus.RUNNING, timeout=10)
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    assert "shutdown_timeout passed" in daemon.logs()


def test_second_sigint_stops_fast(daemon):
    client = daemon.client()
    client.publish(QueueTask(queue="default", type="stamp", payload=marshal_payload({"sleep": 30})))
    time.sleep(0.2)
    os.kill(daemon.proc.pid, signal.SIGINT)
    # two quick SIGINTs would merge into one: wait until the first was handled
    until(lambda: "graceful stop" in daemon.logs(), timeout=10)
    started = time.monotonic()
    assert daemon.stop(signal.SIGINT) == 0
    assert time.monotonic() - started < 5
    assert "fast stop" in daemon.logs()


def test_client_run_publishes_and_waits_in_one_call(daemon):
    client = daemon.client()
    done = client.run(QueueTask(queue="default", type="echo", payload=marshal_payload([1])))
    assert done.status is OK and done.result["payload"] == [1]
    pending = client.run(QueueTask(queue="default", type="stamp", delay=5), timeout=0.2)
    assert pending.status is QueueTaskStatus.PENDING


def test_an_idle_daemon_uses_no_cpu(daemon):
    """Polling for replies, frames and a quick client's next request is bounded:
    once the tasks are done, the supervisor and its workers sleep (a cap far
    above the ~0.00 s measured)."""
    client = daemon.client()
    stored = client.publish_many([QueueTask(queue="default", type="echo") for _ in range(50)])
    for task in stored:
        assert client.wait(task.id, timeout=30).status is OK
    for _ in range(50):  # a request/reply loop: the supervisor polls between requests
        assert client.run(QueueTask(queue="default", type="echo"), timeout=30).status is OK
    procs = [psutil.Process(daemon.proc.pid), *(psutil.Process(p) for p in daemon.worker_pids())]
    time.sleep(0.2)  # every poll has run out by now (the longest is 0.25 ms)
    before = [sum(p.cpu_times()[:2]) for p in procs]
    time.sleep(2.0)
    used = [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before, strict=True)]
    assert sum(used) < 0.1, used
