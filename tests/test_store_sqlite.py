"""The SQLite store in-process: tickets, the writer thread, migrations, the lock."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import until
from procqueue.errors import InternalError
from procqueue.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SqliteStore, StoreLocked
from procqueue.task import QueueTask, QueueTaskStatus

pytestmark = pytest.mark.timeout(30)


def _task(n: int) -> QueueTask:
    created = QueueTask(queue="q", type="t", id=f"task-{n}", status=QueueTaskStatus.PENDING)
    created.created_at = created.available_at = _now()
    return created


def _now():
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _wait_durable(store: SqliteStore, ticket: int) -> None:
    until(lambda: store.durable() >= ticket, timeout=10)


def test_tickets_become_durable_and_reads_see_unacked_tasks(tmp_path):
    store = SqliteStore(tmp_path / "a.db")
    try:
        assert store.commit() == (0, 0)  # nothing to write: nothing to wait for
        tasks = [_task(i) for i in range(100)]
        seqs = [store.add(t) for t in tasks]
        assert seqs == list(range(1, 101))
        assert store.get("task-5") is tasks[5]  # not even handed over yet
        admitted, ticket = store.commit()
        assert (admitted, ticket) == (1, 2) and store.get("task-5") is tasks[5]
        _wait_durable(store, ticket)
        assert store.committed_seq == 100
        tasks[5].status = QueueTaskStatus.RUNNING
        store.put(tasks[5])
        tasks[6].status, tasks[6].result = QueueTaskStatus.SUCCEEDED, {"ok": 1}
        store.put(tasks[6])
        _wait_durable(store, store.commit()[1])
        again = SqliteStore.__new__(SqliteStore)  # read through a fresh connection
        again.db = sqlite3.connect(tmp_path / "a.db")
        assert again.db.execute("SELECT status FROM tasks WHERE id='task-5'").fetchone() == (
            "running",
        )
        row = again.db.execute("SELECT status, result, finished_at FROM tasks WHERE id='task-6'")
        status, result, finished = row.fetchone()
        assert (status, result) == ("succeeded", '{"ok":1}') and finished > 0
        again.db.close()
        page = store.page("q", 0, 10)
        assert [seq for seq, _ in page] == [1, 2, 3, 4, 5, 8, 9, 10, 11, 12]  # not 6, 7
        assert all(t.status is QueueTaskStatus.PENDING for _, t in page)
    finally:
        store.close()


def test_reopen_keeps_everything(tmp_path):
    store = SqliteStore(tmp_path / "a.db")
    for i in range(10):
        store.add(_task(i))
    store.commit()
    store.close()  # waits for the writer
    store = SqliteStore(tmp_path / "a.db")
    try:
        assert store.seq == 10 and store.get("task-9").id == "task-9"
        assert store.unfinished_counts() == {"q": 10}
    finally:
        store.close()


def test_add_many_is_add_of_each_in_order(tmp_path):
    store = SqliteStore(tmp_path / "a.db")
    try:
        store.add(_task(0))
        tasks = [_task(i) for i in range(1, 6)]
        store.add_many(tasks)
        assert store.seq == 6 and store.get("task-3") is tasks[2]
        store.add(_task(6))
        tasks[1].status = QueueTaskStatus.RUNNING
        store.put_started([tasks[1]])
        _wait_durable(store, store.commit()[1])
        page = store.page("q", 0, 100)
        pending = [(n + 1, f"task-{n}") for n in range(7) if n != 2]
        assert [(seq, t.id) for seq, t in page] == pending
        assert store.running()[0].id == "task-2"  # seq 3, started: not pending
    finally:
        store.close()


def test_migrates_a_version_1_database(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version = 1; COMMIT;")
    db.execute(
        "INSERT INTO tasks (seq, id, queue, type, status, created_at, available_at) "
        "VALUES (1, 'old', 'q', 't', 'pending', 0, 0)"
    )
    db.close()
    store = SqliteStore(path)
    try:
        assert store.db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        indexes = {
            r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert {"tasks_queue_seq", "tasks_finished_at"} <= indexes
        assert "tasks_unfinished" not in indexes
        assert store.get("old").status is QueueTaskStatus.PENDING
    finally:
        store.close()


def test_finished_at_index_holds_finished_tasks_only_and_serves_dead_letters_and_pruning(
    tmp_path,
):
    path = tmp_path / "v2.db"
    db = sqlite3.connect(path, isolation_level=None)
    for version, script in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(f"BEGIN; {script}; PRAGMA user_version = {version}; COMMIT;")
    db.executemany(
        "INSERT INTO tasks (seq, id, queue, type, status, created_at, available_at, finished_at) "
        "VALUES (?, ?, 'q', 't', ?, 0, 0, ?)",
        [(1, "waits", "pending", None), (2, "died", "failed", 5.0), (3, "done", "succeeded", 6.0)],
    )
    db.close()
    store = SqliteStore(path)  # migrates version 2 to 3
    try:
        (sql,) = store.db.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'tasks_finished_at'"
        ).fetchone()
        assert sql.endswith("WHERE finished_at IS NOT NULL")
        # The index has the two finished rows, not the pending one.
        assert store.db.execute(
            "SELECT COUNT(*) FROM tasks INDEXED BY tasks_finished_at WHERE finished_at > 0"
        ).fetchone() == (2,)
        assert [t.id for t in store.dead()] == ["died"]
        assert [t.id for t in store.dead("q")] == ["died"]
        plans = {
            "dead": "SELECT * FROM tasks WHERE status = 'failed' AND finished_at IS NOT NULL "
            "ORDER BY finished_at LIMIT 10",
            "prune": "SELECT seq FROM tasks WHERE status = 'succeeded' AND finished_at < 1e18",
        }
        for what, query in plans.items():
            plan = " ".join(r[3] for r in store.db.execute(f"EXPLAIN QUERY PLAN {query}"))
            assert "INDEX tasks_finished_at" in plan, (what, plan)
        assert store.prune(before=1e18) == 1  # the succeeded task; the failed one stays
        assert store.get("done") is None and store.get("died") is not None
        assert store.get("waits").status is QueueTaskStatus.PENDING
    finally:
        store.close()


def test_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "new.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(InternalError, match="newer than this procqueue"):
        SqliteStore(path)


def test_one_store_per_file(tmp_path):
    store = SqliteStore(tmp_path / "a.db")
    try:
        with pytest.raises(StoreLocked, match="in use by another procqueue daemon"):
            SqliteStore(tmp_path / "a.db")
    finally:
        store.close()


def test_changes_pile_up_while_a_pair_is_in_flight(tmp_path):
    store = SqliteStore(tmp_path / "p.db")
    try:
        store.writer.fork_lock.acquire()  # the writer is stuck in its first transaction
        first = [_task(i) for i in range(3)]
        for task in first:
            store.add(task)
        assert store.commit() == (1, 2)  # handed over: inserts, then (no) changes
        first[0].status = QueueTaskStatus.SUCCEEDED
        store.put(first[0])
        late = _task(9)
        store.add(late)
        late.status = QueueTaskStatus.RUNNING
        store.put(late)  # folded into its INSERT, not a change of its own
        assert store.commit() == (3, 4)  # waiting for the pair in flight
        assert store.commit() == (3, 4)  # a later turn joins the same pair
        assert store.durable() == 0
        store.writer.fork_lock.release()
        _wait_durable(store, 2)
        assert store.commit() == (3, 4)  # now handed over
        _wait_durable(store, 4)
        rows = dict(store.db.execute("SELECT id, status FROM tasks").fetchall())
        assert rows == {
            "task-0": "succeeded",
            "task-1": "pending",
            "task-2": "pending",
            "task-9": "running",
        }
        assert store.commit() == (0, 0)
    finally:
        if store.writer.fork_lock.locked():
            store.writer.fork_lock.release()
        store.close()


def test_writer_statements_write_each_state_once_for_the_tasks_reaching_it():
    from procqueue.store.writer import (
        INSERT_SQL,
        UPDATE_BY_ID_SQL,
        UPDATE_BY_SEQ_SQL,
        UPDATE_SEQS_SQL,
        UPDATE_UNFINISHED_SEQS_SQL,
        UPDATE_UNFINISHED_SQL,
        Batch,
        shared_insert_sql,
        statements,
    )

    row = [1, "t1", "q", "t", "", None, "{}", 0.0, 0.0, 0, 0, "pending", "", 1.0, 1.0, None, None]
    running = (0, "running", "", 1.0, None, None)
    done = (0, "succeeded", "", 1.0, None, 9.0)
    answered = (0, "succeeded", "", 1.0, '{"ok":1}', 9.0)
    by_id = [(0, "pending", "", 2.0, None, None, "old")]
    assert statements(Batch(1, 1, [row])) == [(INSERT_SQL, [row])]
    shared = ("q", "t", "pending", 1.0, 1.0, None)
    plain = {shared: [(2, "t2", None), (3, "t3", b"x")]}
    assert statements(Batch(1, 3, [row], plain=plain)) == [
        (INSERT_SQL, [row]),
        (shared_insert_sql(2), [(*shared, 2, "t2", None, 3, "t3", b"x")]),
    ]
    updates = [(done, [7, 9, 12]), (running, [8, 11]), (answered, [10])]  # as the loop groups
    written = dict(statements(Batch(2, 0, updates=updates, by_id=by_id)))
    assert written[UPDATE_SEQS_SQL] == [(0, "succeeded", "", 1.0, None, 9.0, "[7,9,12]")]
    assert written[UPDATE_BY_SEQ_SQL] == [(0, "succeeded", "", 1.0, '{"ok":1}', 9.0, 10)]
    assert written[UPDATE_UNFINISHED_SEQS_SQL] == [(0, "running", "", 1.0, "[8,11]")]
    assert UPDATE_UNFINISHED_SQL not in written
    assert written[UPDATE_BY_ID_SQL] == by_id
    assert statements(Batch(3, 0)) == []


def test_plain_tasks_go_in_a_few_statements_of_whole_and_power_of_two_sizes():
    from procqueue.store.writer import SHARED_ROWS_PER_INSERT, Batch, shared_insert_sql, statements

    whole = SHARED_ROWS_PER_INSERT
    pending = ("q", "t", "pending", 1.0, 1.0, None)
    done = ("q", "t", "succeeded", 1.0, 1.0, 5.0)
    plain = {
        pending: [(i, f"t{i}", None) for i in range(2 * whole + 37)],  # 37 = 32 + 4 + 1
        done: [(i, f"t{i}", None) for i in range(1000, 1005)],  # 5 = 4 + 1
    }
    written = statements(Batch(1, 1004, plain=plain))
    sizes = {sql: [(len(p) - 6) // 3 for p in params] for sql, params in written}
    assert sizes == {
        shared_insert_sql(whole): [whole, whole],
        shared_insert_sql(32): [32],
        shared_insert_sql(4): [4, 4],
        shared_insert_sql(1): [1, 1],
    }
    assert sum(len(p) - 6 for _, params in written for p in params) == 3 * (2 * whole + 42)
    # each statement starts with its group's shared values
    heads = sorted(p[:6] for _, params in written for p in params)
    assert heads.count(pending) == 5 and heads.count(done) == 2


def test_plain_tasks_of_mixed_states_and_queues_read_back_as_admitted(tmp_path):
    store = SqliteStore(tmp_path / "m.db")
    try:
        tasks = [_task(i) for i in range(300)]
        for i, task in enumerate(tasks):
            task.queue = "q" if i % 3 else "other"
            task.created_at = task.available_at = tasks[0].created_at  # as in one publish
            task.payload = None if i % 2 else f"p{i}".encode()
            store.add(task)
        for task in tasks[::7]:  # finished before their INSERT: inserted done
            task.status = QueueTaskStatus.SUCCEEDED
            store.put(task)
        _wait_durable(store, store.commit()[1])
        rows = store.db.execute(
            "SELECT id, queue, payload, status, finished_at IS NOT NULL FROM tasks ORDER BY seq"
        ).fetchall()
        assert rows == [
            (t.id, t.queue, t.payload, t.status.value, t.status is QueueTaskStatus.SUCCEEDED)
            for t in tasks
        ]
    finally:
        store.close()


def test_shared_state_updates_reach_every_row(tmp_path):
    store = SqliteStore(tmp_path / "u.db")
    try:
        tasks = [_task(i) for i in range(50)]
        for task in tasks:
            store.add(task)
        _wait_durable(store, store.commit()[1])
        for task in tasks[:40]:
            task.status = QueueTaskStatus.SUCCEEDED
            store.put(task)
        tasks[40].status, tasks[40].result = QueueTaskStatus.SUCCEEDED, [1, 2]
        store.put(tasks[40])
        for task in tasks[41:45]:
            task.status = QueueTaskStatus.RUNNING
            store.put(task)
        _wait_durable(store, store.commit()[1])
        counts = dict(
            store.db.execute(
                "SELECT status, COUNT(*) FROM tasks WHERE finished_at IS NOT NULL "
                "OR status != 'succeeded' GROUP BY status"
            ).fetchall()
        )
        assert counts == {"succeeded": 41, "running": 4, "pending": 5}
        assert store.db.execute("SELECT result FROM tasks WHERE id = 'task-40'").fetchone() == (
            "[1,2]",
        )
    finally:
        store.close()


def test_many_rows_are_inserted_in_groups_and_read_back(tmp_path):
    from procqueue.store.writer import ROWS_PER_INSERT

    store = SqliteStore(tmp_path / "g.db")
    count = ROWS_PER_INSERT * 3 + 5  # whole groups and a remainder
    try:
        tasks = [_task(i) for i in range(count)]
        for task in tasks:
            store.add(task)
        tasks[3].status = QueueTaskStatus.SUCCEEDED  # finished before its first commit
        store.put(tasks[3])
        _wait_durable(store, store.commit()[1])
        assert [t.id for _, t in store.page("q", 0, count)] == [
            t.id for t in tasks if t.id != "task-3"
        ]
        assert store.get("task-3").status is QueueTaskStatus.SUCCEEDED
    finally:
        store.close()


def test_plain_and_full_rows_read_back_the_same(tmp_path):
    """A task with default fields is inserted with fewer columns (SQLite fills
    in the defaults); it must read back exactly as one inserted whole."""
    store = SqliteStore(tmp_path / "r.db")
    plain = _task(1)
    plain.payload = b"\x00\xffraw"
    rich = _task(2)
    rich.key, rich.headers, rich.delay, rich.timeout = "k", {"h": 1}, 1.5, 2.0
    rich.max_retry, rich.attempt, rich.last_error = 3, 1, "boom"
    bare = _task(3)
    done = _task(4)  # ran and finished before its INSERT: one row, already done
    for task in (plain, rich, bare, done):
        store.add(task)
    done.status = QueueTaskStatus.SUCCEEDED
    store.close()
    store = SqliteStore(tmp_path / "r.db")
    try:
        for task in (plain, rich, bare, done):
            again = store.get(task.id)
            assert again is not None and again.to_dict() == task.to_dict()
            assert type(again.delay) is float and type(again.max_retry) is int
        finished = dict(store.db.execute("SELECT id, finished_at FROM tasks").fetchall())
        assert finished["task-4"] > 0  # retention finds it by finished_at
        assert finished["task-1"] is None and finished["task-3"] is None
        assert store.prune(before=finished["task-4"] + 1) == 1
    finally:
        store.close()


def test_a_commit_landing_during_a_page_read_does_not_end_spilling(tmp_path):
    """Regression: the broker decided "drained" from a committed seq read after
    its page; rows committed while the page was read were then never paged in
    (a backlog task ran only after a restart, seen as a 60 s wait in CI)."""
    from procqueue.broker import Broker
    from procqueue.config import TaskQueueConfig

    store = SqliteStore(tmp_path / "p.db")
    try:
        broker = Broker({"q": TaskQueueConfig(buffer_size=2, handlers={"t": "m:f"})}, store, _clock)
        *_, first = broker.publish([QueueTask(queue="q", type="t") for _ in range(3)])
        _wait_durable(store, store.commit()[1])
        state = broker.queues["q"]
        assert state.spilling and first not in state.ready  # the third waits on disk
        broker.take_many(state, 2)  # room to page in
        (late,) = broker.publish([QueueTask(queue="q", type="t")])  # spilled, not committed
        read_page = store.page

        def page_then_commit(*args):  # the writer commits while the page is read
            rows = read_page(*args)
            _wait_durable(store, store.commit()[1])
            return rows

        store.page = page_then_commit  # type: ignore[method-assign]
        broker.page_in()
        assert [t.id for t in state.ready] == [first.id] and state.spilling  # late: not read
        store.page = read_page  # type: ignore[method-assign]
        broker.page_in()  # the next page brings it
        assert [t.id for t in state.ready] == [first.id, late.id]
        broker.take_many(state, 2)
        broker.page_in()
        assert not state.ready and not state.spilling  # drained
    finally:
        store.close()


def _clock() -> float:
    import time

    return time.time()


# What may happen to a task before and between the commits that write it, as
# the broker does it: each path is cut in two at a point, the first part done
# before the first commit, the rest before the second.
_PATHS = [
    (),
    ("start",),
    ("start", "succeed"),
    ("start", "answer"),
    ("start", "die"),
    ("start", "retry"),
    ("start", "retry", "start", "succeed"),
    ("start", "succeed", "requeue"),
    ("start", "die", "requeue"),
    ("start", "answer", "requeue", "start"),
]
_EXTRAS = [
    (),
    (("key", "k"),),
    (("timeout", 2.0),),
    (("max_retry", 3),),
    (("headers", {"h": "1"}),),
]
_SPEC = st.tuples(
    st.sampled_from(["a", "b"]),  # type
    st.sampled_from([None, b"", b"x"]),  # payload
    st.sampled_from(_EXTRAS),
    st.sampled_from(_PATHS),
    st.integers(0, 4),  # where the path is cut (past its end: all before)
)
# Every path cut at every point, for a plain task and for one with an extra field.
_EVERY_PATH = [
    ("a", None, extra, path, cut)
    for extra in _EXTRAS[:2]
    for path in _PATHS
    for cut in range(len(path) + 1)
]


def _act(task: QueueTask, action: str, later) -> None:
    s = QueueTaskStatus
    if action == "start":
        task.status = s.RUNNING
    elif action in ("succeed", "answer"):
        task.status, task.result = s.SUCCEEDED, ({"n": 1} if action == "answer" else None)
    elif action == "die":
        task.status, task.last_error = s.FAILED, "boom"
    elif action == "retry":
        task.status, task.last_error, task.available_at = s.RETRYING, "again", later
        task.attempt += 1
    elif action == "requeue":  # a dead letter back in line (Broker.requeue)
        task.status, task.attempt, task.result, task.available_at = s.PENDING, 0, None, later


def _written(store: SqliteStore, tasks: list[QueueTask], specs, whole: bool, later) -> list:
    """Add ``tasks`` whole or one by one, take them along their paths around
    two commits; the rows written."""
    if whole:
        store.add_many(tasks)
    else:
        for task in tasks:
            store.add(task)
    for part in (0, 1):
        for task, (*_, path, cut) in zip(tasks, specs, strict=True):
            actions = path[:cut] if part == 0 else path[cut:]
            for action in actions:
                _act(task, action, later)
            if actions:
                store.put(task)
        _wait_durable(store, store.commit()[1])
    return store.db.execute(
        "SELECT seq, id, queue, type, key, payload, headers, delay, timeout, max_retry, "
        "attempt, status, last_error, created_at, available_at, result, "
        "finished_at IS NOT NULL FROM tasks ORDER BY seq"
    ).fetchall()


@settings(max_examples=30, deadline=None)
@example(specs=_EVERY_PATH)
@given(specs=st.lists(_SPEC, min_size=1, max_size=30))
def test_a_batch_added_whole_is_written_as_each_task_added_alone(tmp_path_factory, specs):
    """``add_many``'s batch rows (``_batch_rows``) and ``add``'s per-task rows
    write the same database, true to the tasks, whatever the tasks did before
    each commit; and no finished task stays held."""
    created = _now()
    later = created + timedelta(seconds=5)
    tables = []
    for whole in (True, False):
        store = SqliteStore(tmp_path_factory.mktemp("db") / "t.db")
        try:
            tasks = []
            for n, (ttype, payload, extra, _, _) in enumerate(specs):
                task = QueueTask(queue="q", type=ttype, payload=payload, id=f"t{n}")
                for name, value in extra:
                    setattr(task, name, value)
                task.status = QueueTaskStatus.PENDING
                task.created_at = task.available_at = created
                tasks.append(task)
            rows = _written(store, tasks, specs, whole, later)
            finished = {QueueTaskStatus.SUCCEEDED, QueueTaskStatus.FAILED}
            expected = [
                (
                    t.status.value,
                    t.attempt,
                    t.last_error,
                    t.available_at.timestamp(),
                    None if t.result is None else json.dumps(t.result, separators=(",", ":")),
                    t.status in finished,
                )
                for t in tasks
            ]
            assert [(r[11], r[10], r[12], r[14], r[15], r[16]) for r in rows] == expected
            assert not set(store._seqs) & {t.id for t in tasks if t.status in finished}
            tables.append(rows)
        finally:
            store.close()
    assert tables[0] == tables[1]


def test_tasks_that_finish_before_their_insert_are_not_held_after_it(tmp_path):
    """The store holds the seq of each unfinished task (it writes their
    changes by seq). One that finished before its INSERT was handed over used
    to stay held for good: a leak of about half the tasks under load."""
    store = SqliteStore(tmp_path / "h.db")
    try:
        batch = [_task(i) for i in range(5)]
        store.add_many(batch)
        alone = _task(5)
        store.add(alone)
        for task in [*batch[:3], alone]:
            task.status = QueueTaskStatus.SUCCEEDED
            store.put(task)
        _wait_durable(store, store.commit()[1])
        assert sorted(store._seqs) == ["task-3", "task-4"]  # the unfinished ones only
    finally:
        store.close()
