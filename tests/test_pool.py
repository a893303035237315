"""``procqueue.Pool``: the engine embedded in a program, as a better ProcessPoolExecutor."""

from __future__ import annotations

import os
import signal

import pool_funcs
import psutil
import pytest

import procqueue
from conftest import until
from procqueue import InvalidQueuePayload, InvalidTaskHandler, QueueTask, TaskFailed, TaskStatus

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pool():
    with procqueue.Pool(workers=2) as running:
        yield running


def test_run_returns_a_handle_with_status_result_and_err(pool):
    task = pool.run(pool_funcs.add, 2, b=3)
    assert task.result(timeout=10) == 5
    assert task.status is TaskStatus.FINISH and task.err is None and task.done()


def test_failure_is_reported_not_raised_in_the_pool(pool):
    task = pool.run(pool_funcs.boom, "no luck")
    with pytest.raises(TaskFailed, match="ValueError: no luck"):
        task.result(timeout=10)
    assert isinstance(task.err, TaskFailed)
    assert pool.run(pool_funcs.square, 3).result(timeout=10) == 9  # the pool goes on


def test_status_while_running(pool):
    task = pool.run(pool_funcs.nap, 1.0)
    until(lambda: task.status is TaskStatus.RUNNING, timeout=5)
    assert task.result(timeout=10) == 1.0


def test_runs_in_parallel_worker_processes(pool):
    pids = {t.result(10) for t in [pool.run(pool_funcs.nap, 0.3) for _ in range(2)]}
    assert pids == {0.3}
    workers = {pool.run(pool_funcs.pid).result(10) for _ in range(20)}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2


def test_map_keeps_order_with_chunks(pool):
    assert list(pool.map(pool_funcs.square, range(1000), chunksize=64)) == [
        x * x for x in range(1000)
    ]
    assert list(pool.map(pool_funcs.square, [])) == []


def test_many_runs_pipeline(pool):
    tasks = [pool.run(pool_funcs.square, i) for i in range(3000)]
    assert [t.result(30) for t in tasks] == [i * i for i in range(3000)]


def test_bad_inputs_fail_clearly(pool):
    with pytest.raises(InvalidTaskHandler, match="module-level"):
        pool.run(lambda: 1)
    with pytest.raises(InvalidQueuePayload, match="JSON"):
        pool.run(pool_funcs.square, object())
    with pytest.raises(TaskFailed, match="not JSON-serialisable"):
        pool.run(pool_funcs.unserialisable).result(10)


def test_publish_and_client_work_against_the_pool(pool):
    stored = pool.publish(
        QueueTask(
            queue="default",
            type="procqueue.call",
            payload=b'{"fn": "pool_funcs:square", "args": [4]}',
        )
    )
    with pool.client() as client:
        assert client.wait(stored.id, timeout=10).result == 16
        assert client.status()["queues"]["default"]["concurrency"] == 2


def test_close_leaves_no_process(tmp_path):
    pool = procqueue.Pool(workers=2).start()
    supervisor = psutil.Process(pool._pid)
    children = supervisor.children()
    assert len(children) == 2
    assert pool.run(pool_funcs.square, 2).result(10) == 4
    pool.close()
    gone = [
        p for p in [supervisor, *children] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert not gone
    with pytest.raises(procqueue.DaemonUnavailable):
        pool.run(pool_funcs.square, 1)


def test_pool_from_a_config_file_with_retries(short_dir):
    config = short_dir / "pool.toml"
    config.write_text(
        """
        [queues."default"]
        concurrency = 1
        max_retry = 2
        retry_delay = "10ms"
        [queues."other"]
        [queues."other".handlers]
        "echo" = "pqhandlers:echo"
    """.replace("\n        ", "\n")
    )
    with procqueue.Pool(config) as pool:
        task = pool.run(pool_funcs.boom, "again")
        with pytest.raises(TaskFailed):
            task.result(10)
        with pool.client() as client:
            assert client.get_task(task.id).attempt == 2
            stored = client.publish(QueueTask(queue="other", type="echo"))
            assert client.wait(stored.id, timeout=10).status.value == "succeeded"


def test_plain_daemon_refuses_function_calls(daemon):
    task = daemon.run_task(queue="default", type="procqueue.call", payload=b'{"fn": "os:getpid"}')
    assert task.status.value == "failed" and "handler" in task.last_error


def test_supervisor_exits_with_the_program(short_dir):
    import subprocess
    import sys

    script = short_dir / "prog.py"
    script.write_text(
        "import sys, time, procqueue\n"
        f"sys.path.insert(0, {str(os.path.dirname(pool_funcs.__file__))!r})\n"
        "import pool_funcs\n"
        "pool = procqueue.Pool(workers=1).start()\n"
        "print(pool._pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    prog = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    supervisor = int(prog.stdout.readline())
    prog.send_signal(signal.SIGKILL)
    prog.wait(10)
    prog.stdout.close()
    until(
        lambda: (
            not (psutil.pid_exists(supervisor) and psutil.Process(supervisor).status() != "zombie")
        ),
        timeout=10,
        message="the pool's supervisor outlived its program",
    )


def test_handles_resolve_without_anyone_waiting(pool):
    task = pool.run(pool_funcs.square, 5)
    until(task.done, timeout=10)  # the background reader resolves it
    assert task.result(0) == 25


def test_many_threads_wait_at_once(pool):
    import concurrent.futures

    def work(i: int) -> list[int]:
        return [pool.run(pool_funcs.add, i, b=j).result(20) for j in range(200)]

    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        results = list(threads.map(work, range(4)))
    assert results == [[i + j for j in range(200)] for i in range(4)]


def test_a_lone_call_is_sent_by_run_itself_and_later_ones_by_the_sender(pool):
    notified = []
    notify = pool._wake.notify
    pool._wake.notify = lambda n=1: (notified.append(n), notify(n))
    lone = pool.run(pool_funcs.nap, 0.5)
    assert not pool._outbox and notified == []  # on the wire already, no thread woken
    more = [pool.run(pool_funcs.square, i) for i in range(50)]  # while the lone one runs
    assert notified  # these went to the sender thread, to be batched
    assert [t.result(10) for t in more] == [i * i for i in range(50)]
    assert lone.result(10) == 0.5
