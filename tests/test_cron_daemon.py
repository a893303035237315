"""Cron in the running daemon: fires on time, counts runs, runtime control, fork safety."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from conftest import run_cli, until, write_config
from procqueue import QueueNotRegistered, QueueTask, TaskNotFound

pytestmark = pytest.mark.timeout(90)

QUEUES = """
[queues."default"]
concurrency = 2
[queues."default".handlers]
"echo" = "pqhandlers:echo"
"always_fail" = "pqhandlers:always_fail"
"""


def _cron(*entries: str) -> str:
    return QUEUES + "".join(f"\n[[cron]]\n{e}\n" for e in entries)


def test_every_second_entry_fires_about_once_a_second(make_daemon):
    daemon = make_daemon(
        queues=_cron(
            'name = "tick"\nspec = "*/1 * * * * *"\nqueue = "default"\n'
            'type = "echo"\npayload = { n = 1 }'
        )
    )
    client = daemon.client()
    time.sleep(3.2)  # the thing under test is the wall clock itself
    entry = client.get_cron("tick")
    assert 2 <= entry.total <= 4, entry
    assert entry.err_count == 0
    assert entry.next_run is not None and entry.next_run > datetime.now(UTC) - timedelta(seconds=1)
    assert entry.last_run is not None and entry.last_run.microsecond == 0
    logs = daemon.logs()
    task_id = logs.split("cron tick: published task ")[1].split()[0]
    task = client.get_task(task_id)
    assert task.headers["cron"] == "tick" and task.key.startswith("tick:")
    assert task.result["payload"] == {"n": 1}


def test_next_run_of_five_field_and_descriptor_specs(make_daemon):
    daemon = make_daemon(
        queues=_cron(
            'name = "hourly"\nspec = "0 * * * *"\nqueue = "default"\ntype = "echo"',
            'name = "daily"\nspec = "@daily"\nqueue = "default"\ntype = "echo"',
            'name = "every"\nspec = "@every 90s"\nqueue = "default"\ntype = "echo"',
            'name = "berlin"\nspec = "0 30 3 * * *"\nqueue = "default"\ntype = "echo"\n'
            'timezone = "Europe/Berlin"',
        )
    )
    entries = {e.name: e for e in daemon.client().list_cron()}
    now = datetime.now(UTC)
    hourly = entries["hourly"].next_run
    assert (hourly.minute, hourly.second) == (0, 0) and now < hourly <= now + timedelta(hours=1)
    daily = entries["daily"].next_run.astimezone(UTC)
    assert (daily.hour, daily.minute) == (0, 0) and now < daily <= now + timedelta(days=1)
    every = entries["every"].next_run
    assert every.timestamp() % 90 == 0 and now < every <= now + timedelta(seconds=90)
    from zoneinfo import ZoneInfo

    berlin = entries["berlin"].next_run.astimezone(ZoneInfo("Europe/Berlin"))
    assert (berlin.hour, berlin.minute) == (3, 30)
    listed = daemon.cli("cron", "list")
    assert listed.returncode == 0 and "hourly" in listed.stdout and "0 * * * *" in listed.stdout


def test_add_cancel_get_list_at_run_time(daemon):
    client = daemon.client()
    added = client.add_cron("*/1 * * * * *", "default", "always_fail", payload={"x": 1})
    assert added.name and added.next_run is not None  # a generated uuid name
    named = client.add_cron("@hourly", "default", "echo", name="mine")
    assert named.name == "mine"
    assert {e.name for e in client.list_cron()} == {added.name, "mine"}
    until(lambda: client.get_cron(added.name).err_count != 0, timeout=10)
    assert client.get_cron(added.name).total >= 1  # runs whose task finally failed count too
    client.cancel_cron(added.name)
    with pytest.raises(TaskNotFound, match=added.name):
        client.get_cron(added.name)
    with pytest.raises(TaskNotFound):
        client.cancel_cron("nope")
    with pytest.raises(QueueNotRegistered):
        client.add_cron("@hourly", "nope", "echo")
    out = daemon.cli("cron", "cancel", "mine")
    assert out.returncode == 0
    assert orjson.loads(daemon.cli("cron", "list", "--json").stdout) == []
    assert daemon.cli("cron", "cancel", "mine").returncode == 1


def test_runtime_entries_survive_a_reload(make_daemon):
    daemon = make_daemon(
        queues=_cron('name = "cfg"\nspec = "@hourly"\nqueue = "default"\ntype = "echo"')
    )
    client = daemon.client()
    client.add_cron("@daily", "default", "echo", name="runtime")
    daemon.config.write_text(daemon.config.read_text().replace('name = "cfg"', 'name = "cfg2"'))
    os.kill(daemon.proc.pid, signal.SIGHUP)
    until(lambda: "reloaded" in daemon.logs(), timeout=10)
    assert {e.name for e in client.list_cron()} == {"cfg2", "runtime"}


def test_bad_cron_spec_is_a_config_error(short_dir):
    config = write_config(
        short_dir, _cron('name = "bad"\nspec = "61 * * * * *"\nqueue = "default"\ntype = "echo"')
    )
    result = run_cli("check", str(config))
    assert result.returncode == 2
    assert 'cron[0] ("bad").spec' in result.stderr and str(config) in result.stderr


def test_forking_while_cron_fires_does_not_deadlock(make_daemon):
    """Every task forks a fresh worker (max_tasks_per_child = 1) while five
    per-second cron entries keep the cron thread busy."""
    entries = [
        f'name = "c{i}"\nspec = "*/1 * * * * *"\nqueue = "churn"\ntype = "echo"' for i in range(5)
    ]
    daemon = make_daemon(
        queues="""
        [queues."churn"]
        concurrency = 2
        max_tasks_per_child = 1
        [queues."churn".handlers]
        "echo" = "pqhandlers:echo"
    """
        + "".join(f"\n[[cron]]\n{e}\n" for e in entries)
    )
    client = daemon.client()
    ids = []
    end = time.monotonic() + 4
    while time.monotonic() < end:
        ids += [
            t.id
            for t in client.publish_many([QueueTask(queue="churn", type="echo") for _ in range(5)])
        ]
        time.sleep(0.05)
    for task_id in ids:
        assert client.wait(task_id, timeout=30).status.value == "succeeded"
    fired = sum(e.total for e in client.list_cron())
    assert fired >= 10
    assert daemon.logs().count("recycled after 1 tasks") >= len(ids)
