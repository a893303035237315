"""Unit tests for procqueue.broker: the supervisor's task state machine, on a fake clock."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from procqueue.broker import Broker, QueueState, RecentRuns
from procqueue.config import TaskQueueConfig
from procqueue.errors import (
    InvalidQueueTask,
    InvalidTaskType,
    QueueFull,
    QueueNotRegistered,
)
from procqueue.store.memory import MemoryStore
from procqueue.task import ID_COUNTER_BASE, QueueTask, QueueTaskStatus

T0 = 1_700_000_000.0
HANDLERS = {"echo": "pqhandlers:echo", "work": "pqhandlers:echo"}


@dataclass
class Rig:
    broker: Broker
    store: MemoryStore
    finished: list[QueueTask] = field(default_factory=list)
    now: list[float] = field(default_factory=lambda: [T0])

    def advance(self, seconds: float) -> None:
        self.now[0] += seconds

    def set(self, when: float) -> None:
        self.now[0] = when

    @property
    def time(self) -> float:
        return self.now[0]

    def state(self, queue: str = "default") -> QueueState:
        return self.broker.queues[queue]

    def publish_one(self, **fields: object) -> QueueTask:
        fields.setdefault("queue", "default")
        fields.setdefault("type", "echo")
        (task,) = self.broker.publish([QueueTask(**fields)])  # type: ignore[arg-type]
        return task

    def take(self, queue: str = "default") -> QueueTask | None:
        return self.broker.take(self.state(queue))


def make_rig(**queues: TaskQueueConfig) -> Rig:
    if not queues:
        queues = {"default": TaskQueueConfig(max_retry=2, retry_delay=5.0, handlers=HANDLERS)}
    store = MemoryStore()
    finished: list[QueueTask] = []
    now = [T0]
    broker = Broker(queues, store, lambda: now[0], on_finish=finished.append)
    return Rig(broker, store, finished, now)


@pytest.fixture
def rig() -> Iterator[Rig]:
    yield make_rig()


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


# ------------------------------------------------------------------ validation


def test_publish_rejects_task_without_queue(rig: Rig) -> None:
    with pytest.raises(InvalidQueueTask, match="echo"):
        rig.broker.publish([QueueTask(queue="", type="echo")])
    assert rig.store.tasks == {}


def test_publish_rejects_task_without_type(rig: Rig) -> None:
    with pytest.raises(InvalidTaskType, match="default"):
        rig.broker.publish([QueueTask(queue="default", type="")])
    assert rig.store.tasks == {}


def test_publish_rejects_unknown_queue_naming_it(rig: Rig) -> None:
    with pytest.raises(QueueNotRegistered) as info:
        rig.broker.publish([QueueTask(queue="nope", type="echo")])
    assert "'nope'" in info.value.message
    assert "default" in info.value.message  # the known queues are listed
    assert info.value.code == 7


def test_one_invalid_task_admits_nothing(rig: Rig) -> None:
    batch = [QueueTask(queue="default", type="echo"), QueueTask(queue="default", type="")]
    with pytest.raises(InvalidTaskType):
        rig.broker.publish(batch)
    assert rig.store.tasks == {}
    assert rig.state().pending == 0
    assert rig.broker.stats()["default"]["published"] == 0


# ------------------------------------------------------------------- admission


def test_admission_fills_in_the_stored_task(rig: Rig) -> None:
    original = QueueTask(queue="default", type="echo", payload=b"{}", key="k")
    (stored,) = rig.broker.publish([original])
    assert stored.id
    assert stored.status is QueueTaskStatus.PENDING
    assert stored.attempt == 0
    assert stored.created_at == at(T0)
    assert stored.available_at == at(T0)
    assert stored.payload == b"{}"
    assert stored.key == "k"
    assert rig.store.get(stored.id) is stored
    assert rig.broker.get(stored.id) is stored
    assert stored is original  # taken over, not copied: the supervisor's hot path
    assert list(rig.state().ready) == [stored]


def test_admission_keeps_a_given_id_and_makes_unique_ones(rig: Rig) -> None:
    given = rig.publish_one(id="mine")
    assert given.id == "mine"
    ids = {rig.publish_one().id for _ in range(50)}
    assert len(ids) == 50
    assert "mine" not in ids


def test_admission_resets_run_state(rig: Rig) -> None:
    stored = rig.publish_one(
        attempt=3, status=QueueTaskStatus.FAILED, last_error="old", result={"x": 1}
    )
    assert stored.attempt == 0
    assert stored.status is QueueTaskStatus.PENDING
    assert stored.last_error == ""
    assert stored.result is None


def test_queue_full_at_buffer_size_reports_accepted() -> None:
    rig = make_rig(default=TaskQueueConfig(buffer_size=3, handlers=HANDLERS))
    rig.publish_one()
    batch = [QueueTask(queue="default", type="echo", key=str(i)) for i in range(4)]
    with pytest.raises(QueueFull) as info:
        rig.broker.publish(batch)
    accepted = info.value.accepted  # type: ignore[attr-defined]
    assert [t.key for t in accepted] == ["0", "1"]
    assert all(rig.store.get(t.id) is t for t in accepted)
    assert rig.state().pending == 3
    assert "buffer_size = 3" in info.value.message
    assert rig.broker.stats()["default"]["published"] == 3
    with pytest.raises(QueueFull) as again:
        rig.broker.publish([QueueTask(queue="default", type="echo")])
    assert again.value.accepted == []  # type: ignore[attr-defined]


TaskSpec = tuple[str, bool, float]  # (queue, own id?, delay)
QUEUES = ["default", "other"]
PLAIN: TaskSpec = ("default", False, 0.0)
task_specs = st.one_of(
    st.lists(  # anything
        st.tuples(st.sampled_from(QUEUES), st.booleans(), st.sampled_from([0.0, 30.0])),
        max_size=12,
    ),
    st.integers(0, 9).map(lambda n: [PLAIN] * n),  # plain batches, of every size around the room
)


def _admitted(broker: Broker, specs: list[TaskSpec], force: bool) -> list[object]:
    """What publishing ``specs`` as one batch did: every field of the tasks
    it admitted, the error (if any), the ready lines, the store and counters."""
    tasks = [
        QueueTask(queue=q, type="echo", id=f"own-{i}" if own else "", delay=delay)
        for i, (q, own, delay) in enumerate(specs)
    ]
    try:
        accepted, error = broker.publish(tasks, force=force), None
    except QueueFull as exc:
        accepted, error = exc.accepted, type(exc)  # type: ignore[attr-defined]
    return [
        [t.to_dict() for t in accepted],
        error,
        {name: [t.id for t in s.ready] for name, s in broker.queues.items()},
        {name: [(at, t.id) for at, _, t in s.delayed] for name, s in broker.queues.items()},
        sorted(broker.store.tasks),  # type: ignore[attr-defined]
        broker.stats(),
    ]


@settings(max_examples=200, deadline=None)
@given(earlier=task_specs, batch=task_specs, force=st.booleans())
@example(earlier=[], batch=[PLAIN] * 7, force=False)  # more than buffer_size
@example(earlier=[PLAIN] * 4, batch=[PLAIN] * 3, force=False)  # more than the room left
@example(earlier=[PLAIN] * 6, batch=[PLAIN] * 3, force=True)
@example(earlier=[], batch=[PLAIN, ("other", False, 0.0), PLAIN], force=False)  # two queues
def test_a_batch_admitted_at_once_is_admitted_as_task_by_task(
    earlier: list[TaskSpec], batch: list[TaskSpec], force: bool
) -> None:
    """``Broker._admit_plain`` (one queue, no ids, no delays, room for all) is
    only a faster way: every batch ends up as the per-task path leaves it."""
    queues = {
        name: TaskQueueConfig(buffer_size=6, handlers=HANDLERS) for name in ("default", "other")
    }
    results = []
    for batched in (True, False):
        broker = Broker(queues, MemoryStore(), lambda: T0)
        broker._id_prefix = "same-"  # the ids are compared too
        if not batched:
            broker._all_plain = lambda *args: False  # type: ignore[method-assign]
        _admitted(broker, earlier, force=True)
        results.append(_admitted(broker, batch, force))
    assert results[0] == results[1]


def test_a_plain_batch_gets_consecutive_ids_in_order(rig: Rig) -> None:
    tasks = [QueueTask(queue="default", type="echo", payload=bytes([i])) for i in range(12)]
    stored = rig.broker.publish(tasks)
    assert stored == tasks  # taken over, in order
    numbers = [int(t.id.rpartition("-")[2]) - ID_COUNTER_BASE for t in stored]
    assert numbers == list(range(1, 13))
    assert sorted(t.id for t in stored) == [t.id for t in stored]  # "-10" after "-9" too
    assert [t.payload for t in rig.state().ready] == [bytes([i]) for i in range(12)]
    assert all(t.status is QueueTaskStatus.PENDING and t.created_at == at(T0) for t in stored)
    assert rig.store.seq == 12
    assert rig.broker.stats()["default"]["published"] == 12


def test_queue_full_counts_delayed_tasks_but_not_running() -> None:
    rig = make_rig(default=TaskQueueConfig(buffer_size=2, handlers=HANDLERS))
    rig.publish_one(delay=60)
    rig.publish_one()
    with pytest.raises(QueueFull):
        rig.publish_one()
    assert rig.take() is not None  # running tasks no longer count
    rig.publish_one()


def test_force_bypasses_buffer_size() -> None:
    rig = make_rig(default=TaskQueueConfig(buffer_size=1, handlers=HANDLERS))
    rig.publish_one()
    tasks = [QueueTask(queue="default", type="echo") for _ in range(5)]
    assert len(rig.broker.publish(tasks, force=True)) == 5
    assert rig.state().pending == 6


def test_queues_are_independent() -> None:
    rig = make_rig(
        a=TaskQueueConfig(buffer_size=1, handlers=HANDLERS),
        b=TaskQueueConfig(buffer_size=1, handlers=HANDLERS),
    )
    rig.publish_one(queue="a")
    rig.publish_one(queue="b")
    with pytest.raises(QueueFull, match="'a'"):
        rig.publish_one(queue="a")
    assert rig.take("b") is not None
    assert rig.take("b") is None
    assert rig.take("a") is not None


# ---------------------------------------------------------------------- delays


def test_delayed_task_is_never_early(rig: Rig) -> None:
    task = rig.publish_one(delay=10)
    assert task.available_at == at(T0 + 10)
    assert task.created_at == at(T0)
    assert rig.broker.next_due() == T0 + 10
    assert rig.take() is None
    rig.set(T0 + 9.999)
    rig.broker.promote_due()
    assert rig.take() is None
    assert rig.state().pending == 1
    rig.set(T0 + 10)
    rig.broker.promote_due()
    assert rig.broker.next_due() is None
    taken = rig.take()
    assert taken is task
    assert taken.status is QueueTaskStatus.RUNNING


def test_promote_after_the_time_and_in_due_order(rig: Rig) -> None:
    late = rig.publish_one(delay=30, key="late")
    soon = rig.publish_one(delay=5, key="soon")
    now = rig.publish_one(key="now")
    assert rig.broker.next_due() == T0 + 5
    rig.set(T0 + 100)
    rig.broker.promote_due()
    assert [rig.take(), rig.take(), rig.take()] == [now, soon, late]
    assert rig.take() is None


def test_next_due_spans_queues() -> None:
    rig = make_rig(a=TaskQueueConfig(handlers=HANDLERS), b=TaskQueueConfig(handlers=HANDLERS))
    assert rig.broker.next_due() is None
    rig.publish_one(queue="a", delay=20)
    rig.publish_one(queue="b", delay=7)
    assert rig.broker.next_due() == T0 + 7


def test_delay_zero_is_ready_at_once(rig: Rig) -> None:
    task = rig.publish_one(delay=0)
    assert rig.broker.next_due() is None
    assert rig.take() is task


# ------------------------------------------------------------------------ take


def test_take_marks_running_fifo(rig: Rig) -> None:
    first, second = rig.publish_one(key="1"), rig.publish_one(key="2")
    taken = rig.take()
    assert taken is first
    assert taken.status is QueueTaskStatus.RUNNING
    assert rig.store.get(first.id).status is QueueTaskStatus.RUNNING  # type: ignore[union-attr]
    assert rig.state().running == 1
    assert rig.take() is second
    assert rig.take() is None
    assert rig.state().running == 2


def test_unknown_type_fails_at_take_and_is_never_handed_out(rig: Rig) -> None:
    bad = rig.publish_one(type="mystery")
    good = rig.publish_one(type="echo")
    assert rig.take() is good
    assert bad.status is QueueTaskStatus.FAILED
    assert "'mystery'" in bad.last_error
    assert rig.store.get(bad.id).status is QueueTaskStatus.FAILED  # type: ignore[union-attr]
    assert rig.finished == [bad]
    assert rig.take() is None
    stats = rig.broker.stats()["default"]
    assert stats["failed"] == 1
    assert stats["running"] == 1
    assert stats["pending"] == 0


# ---------------------------------------------------------------------- retries


def test_fail_retries_until_queue_max_retry_then_dead_letters(rig: Rig) -> None:
    task = rig.publish_one()
    for attempt in (1, 2):
        assert rig.take() is task
        assert rig.broker.fail(task, f"boom {attempt}") is QueueTaskStatus.RETRYING
        assert task.status is QueueTaskStatus.RETRYING
        assert task.attempt == attempt
        assert task.last_error == f"boom {attempt}"
        assert task.available_at == at(rig.time + 5.0)
        assert rig.finished == []
        rig.advance(5.0)
        rig.broker.promote_due()
    assert rig.take() is task
    assert rig.broker.fail(task, "boom 3") is QueueTaskStatus.FAILED
    assert task.status is QueueTaskStatus.FAILED
    assert task.attempt == 2
    assert task.last_error == "boom 3"
    assert rig.finished == [task]
    assert rig.store.get(task.id).status is QueueTaskStatus.FAILED  # type: ignore[union-attr]
    rig.advance(1000)
    rig.broker.promote_due()
    assert rig.take() is None
    stats = rig.broker.stats()["default"]
    assert (stats["retried"], stats["failed"], stats["running"]) == (2, 1, 0)


def test_retry_delay_is_honoured(rig: Rig) -> None:
    task = rig.publish_one()
    rig.take()
    rig.advance(1.5)
    failed_at = rig.time
    rig.broker.fail(task, "x")
    assert rig.broker.next_due() == failed_at + 5.0
    assert rig.broker.stats()["default"]["retrying"] == 1
    rig.set(failed_at + 4.999)
    rig.broker.promote_due()
    assert rig.take() is None
    rig.set(failed_at + 5.0)
    rig.broker.promote_due()
    assert rig.take() is task
    assert task.status is QueueTaskStatus.RUNNING
    assert task.attempt == 1


def test_zero_retry_delay_is_ready_at_once() -> None:
    rig = make_rig(default=TaskQueueConfig(max_retry=1, retry_delay=0, handlers=HANDLERS))
    task = rig.publish_one()
    rig.take()
    assert rig.broker.fail(task, "x") is QueueTaskStatus.RETRYING
    assert rig.take() is task


def test_task_max_retry_overrides_queue() -> None:
    rig = make_rig(default=TaskQueueConfig(max_retry=1, retry_delay=0, handlers=HANDLERS))
    task = rig.publish_one(max_retry=3)
    outcomes = []
    for _ in range(4):
        assert rig.take() is task
        outcomes.append(rig.broker.fail(task, "x"))
    R, F = QueueTaskStatus.RETRYING, QueueTaskStatus.FAILED
    assert outcomes == [R, R, R, F]
    assert task.attempt == 3


def test_task_max_retry_zero_uses_queue_and_queue_zero_means_no_retry() -> None:
    rig = make_rig(default=TaskQueueConfig(max_retry=0, retry_delay=0, handlers=HANDLERS))
    task = rig.publish_one(max_retry=0)
    rig.take()
    assert rig.broker.fail(task, "x") is QueueTaskStatus.FAILED
    assert task.attempt == 0
    assert rig.finished == [task]


def test_task_max_retry_can_lower_the_queue_limit() -> None:
    rig = make_rig(default=TaskQueueConfig(max_retry=5, retry_delay=0, handlers=HANDLERS))
    task = rig.publish_one(max_retry=1)
    rig.take()
    assert rig.broker.fail(task, "x") is QueueTaskStatus.RETRYING
    rig.take()
    assert rig.broker.fail(task, "x") is QueueTaskStatus.FAILED


def test_fail_without_retry_dead_letters_at_once(rig: Rig) -> None:
    task = rig.publish_one()
    rig.take()
    assert rig.broker.fail(task, "fatal", retry=False) is QueueTaskStatus.FAILED
    assert task.status is QueueTaskStatus.FAILED
    assert task.last_error == "fatal"
    assert task.attempt == 0
    assert rig.finished == [task]
    assert rig.state().pending == 0
    assert rig.broker.stats()["default"]["retried"] == 0


# ------------------------------------------------------------ give back / succeed


def test_give_back_puts_task_first_without_charging(rig: Rig) -> None:
    first = rig.publish_one(key="1")
    rig.publish_one(key="2")
    taken = rig.take()
    assert taken is first
    rig.broker.give_back(first)
    assert first.status is QueueTaskStatus.PENDING
    assert first.attempt == 0
    assert rig.state().running == 0
    assert rig.store.get(first.id).status is QueueTaskStatus.PENDING  # type: ignore[union-attr]
    assert rig.take() is first
    assert first.attempt == 0
    assert rig.broker.stats()["default"]["retried"] == 0


def test_give_back_after_a_retry_keeps_the_attempt(rig: Rig) -> None:
    task = rig.publish_one()
    rig.take()
    rig.broker.fail(task, "x")
    rig.advance(5)
    rig.broker.promote_due()
    rig.publish_one(key="other")
    rig.take()
    rig.broker.give_back(task)
    assert task.attempt == 1
    assert rig.take() is task


def test_succeed_stores_result_and_reports(rig: Rig) -> None:
    task = rig.publish_one()
    rig.take()
    rig.broker.succeed(task, {"answer": 42})
    assert task.status is QueueTaskStatus.SUCCEEDED
    assert task.result == {"answer": 42}
    assert rig.store.get(task.id).result == {"answer": 42}  # type: ignore[union-attr]
    assert rig.finished == [task]
    assert rig.state().running == 0


def test_on_finish_is_optional() -> None:
    store = MemoryStore()
    broker = Broker({"default": TaskQueueConfig(handlers=HANDLERS)}, store, lambda: T0)
    (task,) = broker.publish([QueueTask(queue="default", type="echo")])
    assert broker.take(broker.queues["default"]) is task
    broker.succeed(task)
    assert task.status is QueueTaskStatus.SUCCEEDED
    assert task.result is None


# ------------------------------------------------------------------------ stats


def test_stats_counters() -> None:
    rig = make_rig(
        default=TaskQueueConfig(concurrency=3, max_retry=1, retry_delay=10, handlers=HANDLERS),
        other=TaskQueueConfig(handlers=HANDLERS),
    )
    empty = rig.broker.stats()
    assert set(empty) == {"default", "other"}
    assert empty["other"] == {
        "concurrency": 1,
        "pending": 0,
        "ready": 0,
        "running": 0,
        "retrying": 0,
        "published": 0,
        "succeeded": 0,
        "failed": 0,
        "retried": 0,
        "delayed": 0,
        "on_disk": 0,
        "throughput_1m": 0.0,
        "run_p50": None,
        "run_p99": None,
    }
    ok, flaky, dead = (rig.publish_one(key=k) for k in ("ok", "flaky", "dead"))
    rig.publish_one(key="later", delay=60)
    rig.publish_one(key="queued")
    for _ in range(3):
        rig.take()
    rig.broker.succeed(ok, seconds=0.5)
    rig.broker.fail(flaky, "x", seconds=0.1)
    rig.broker.fail(dead, "x", retry=False)  # no run time known: not a run in the stats
    stats = rig.broker.stats()["default"]
    assert stats.pop("throughput_1m") == pytest.approx(2 / 60, abs=1e-3)
    assert (stats.pop("run_p50"), stats.pop("run_p99")) == (0.5, 0.5)
    assert (stats.pop("delayed"), stats.pop("on_disk")) == (1, 0)
    assert stats == {
        "concurrency": 3,
        "pending": 3,  # queued (ready) + later (delayed) + flaky (retrying)
        "ready": 1,
        "running": 0,
        "retrying": 1,
        "published": 5,
        "succeeded": 1,
        "failed": 1,
        "retried": 1,
    }
    assert rig.broker.stats()["other"]["published"] == 0


def test_succeed_all_is_succeed_for_each_run_in_order(rig: Rig) -> None:
    tasks = [rig.publish_one() for _ in range(3)]
    one = make_rig()
    alone = [one.publish_one() for _ in range(3)]
    for broker_rig in (rig, one):
        assert broker_rig.broker.take_many(broker_rig.state(), 3)
    rig.broker.succeed_all([(t, None, 0.5 + i) for i, t in enumerate(tasks)])
    for i, task in enumerate(alone):
        one.broker.succeed(task, None, 0.5 + i)
    assert rig.finished == tasks  # each reported, in the order the worker sent them
    for got, want in ((rig, tasks), (one, alone)):
        assert all(t.status is QueueTaskStatus.SUCCEEDED and t.result is None for t in want)
        assert [got.store.get(t.id) for t in want] == want
        assert list(got.state().recent.durations) == [0.5, 1.5, 2.5]
    stats, expect = rig.broker.stats()["default"], one.broker.stats()["default"]
    for key in ("succeeded", "running", "pending", "published"):
        assert stats[key] == expect[key], key
    assert stats["succeeded"] == 3 and stats["running"] == 0


def test_memory_store_keeps_the_newest_finished_tasks_and_forgets_older_ones() -> None:
    store = MemoryStore(keep_finished=4)  # generations of 4: keeps 4 to 8 finished tasks
    tasks = [QueueTask(queue="q", type="t", id=f"t{i}") for i in range(13)]
    for task in tasks:
        store.add(task)
    tasks[12].status = QueueTaskStatus.RUNNING
    store.put(tasks[12])
    for task in tasks[:12]:
        task.status = QueueTaskStatus.SUCCEEDED
        store.put(task)
    kept = [t for t in tasks[:12] if store.get(t.id) is t]
    assert 4 <= len(kept) <= 8 and kept == tasks[12 - len(kept) : 12]  # the newest ones
    assert store.get("t0") is None and store.get("t12") is tasks[12]  # unfinished: always
    assert store.kept() == len(kept) and store.tasks == {"t12": tasks[12]}


def test_memory_store_forgets_a_finished_task_only_if_it_is_still_finished_and_stored() -> None:
    store = MemoryStore(keep_finished=1)
    requeued, purged = (QueueTask(queue="q", type="t", id=f"t{i}") for i in range(2))
    for task in (requeued, purged):
        store.add(task)
    requeued.status = QueueTaskStatus.FAILED
    store.put(requeued)
    requeued.status = QueueTaskStatus.PENDING  # a dead letter back in line, same object
    store.put(requeued)
    purged.status = QueueTaskStatus.FAILED
    store.put(purged)  # pushes the requeued one out of the finished list...
    assert store.get("t0") is requeued  # ...but it is pending again: kept
    assert store.purge_dead() == 1 and store.get("t1") is None
    again = QueueTask(queue="q", type="t", id="t1")  # the purged id published anew
    store.add(again)
    again.status = QueueTaskStatus.SUCCEEDED
    store.put(again)  # pushes the purged task out: the newest finished task stays
    assert store.get("t1") is again


def test_recent_runs_count_a_minute_by_the_second() -> None:
    recent = RecentRuns()
    recent.add(1000.2, [0.1] * 3)
    recent.add(1000.9, [0.2] * 2)  # the same second
    recent.add(1030.0, [0.3] * 7)
    recent.add(1031.0, [])  # nothing ended: nothing counted
    assert recent.per_second(1031.0) == pytest.approx(12 / 60)
    assert recent.per_second(1060.5) == pytest.approx(7 / 60)  # second 1000 has left the minute
    assert recent.per_second(1091.0) == 0.0
    recent.add(1100.0, [0.4])
    assert list(recent._ended) == [[1100, 1]]  # older seconds dropped as time goes on
    assert list(recent.durations)[-2:] == [0.3, 0.4]


def test_throughput_is_not_capped_by_the_run_times_kept(rig: Rig) -> None:
    """10,000 runs in a second: 166.7 a second over the minute, though only the
    last 4,096 run times are kept for the percentiles."""
    tasks = [QueueTask(queue="default", type="echo") for _ in range(10_000)]
    rig.broker.publish(tasks, force=True)  # past buffer_size
    assert len(rig.broker.take_many(rig.state(), 10_000)) == 10_000
    rig.broker.succeed_all([(t, None, 0.001) for t in tasks])
    stats = rig.broker.stats()["default"]
    assert stats["throughput_1m"] == pytest.approx(10_000 / 60, abs=0.01)
    assert len(rig.state().recent.durations) == 4096 and stats["run_p50"] == 0.001
