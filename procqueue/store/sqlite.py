"""The SQLite store: durable task state on one machine, no server needed.

* WAL mode; ``sync = "full"`` fsyncs every commit (a power cut loses nothing
  that was acknowledged), ``"normal"`` fsyncs only at checkpoints (a process
  crash loses nothing, a power cut may lose the last commits).
* Group commit: ``put`` only remembers the task; ``commit`` turns every
  change since the last hand-over into rows and gives them to the writer
  thread (``writer.py``) as two transactions with a ticket each, new tasks
  first; the supervisor answers a publish once its new tasks' ticket is
  durable, any other reply once everything it reports is (``durable()``),
  and keeps working meanwhile.
* One supervisor per database: an exclusive ``flock`` on ``<db>.lock``.
* ``seq`` is the admission order, assigned here; the broker pages pending
  tasks in by ``seq`` so that a backlog lives on disk, not in memory.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import socket
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from ..errors import DaemonUnavailable, InternalError
from ..task import FINISHED, QueueTask, QueueTaskStatus, from_stamp, has_defaults, stamp
from .writer import COLUMNS as _COLUMNS
from .writer import Batch, Writer

SCHEMA_VERSION = 3
UNFINISHED = ("pending", "running", "retrying")

# Migrations, in order: MIGRATIONS[n] brings a database from version n to n + 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE tasks (
        seq          INTEGER PRIMARY KEY,          -- admission order
        id           TEXT NOT NULL UNIQUE,
        queue        TEXT NOT NULL,
        type         TEXT NOT NULL,
        key          TEXT NOT NULL DEFAULT '',
        payload      BLOB,
        headers      TEXT NOT NULL DEFAULT '{}',
        delay        REAL NOT NULL DEFAULT 0,
        timeout      REAL NOT NULL DEFAULT 0,
        max_retry    INTEGER NOT NULL DEFAULT 0,
        attempt      INTEGER NOT NULL DEFAULT 0,
        status       TEXT NOT NULL,
        last_error   TEXT NOT NULL DEFAULT '',
        created_at   REAL NOT NULL,
        available_at REAL NOT NULL,
        result       TEXT,
        finished_at  REAL
    );
    CREATE INDEX tasks_unfinished ON tasks (queue, seq)
        WHERE status IN ('pending', 'running', 'retrying');
    CREATE INDEX tasks_finished ON tasks (status, finished_at)
        WHERE status IN ('succeeded', 'failed');
    """,
    # 2: plain indexes. A partial index whose WHERE names ``status`` is rewritten
    # by every status change; these are touched only when queue/seq/finished_at
    # change, which halves the cost of a task's life (measured: 17 -> 9 us).
    """
    DROP INDEX tasks_unfinished;
    DROP INDEX tasks_finished;
    CREATE INDEX tasks_queue_seq ON tasks (queue, seq);
    CREATE INDEX tasks_finished_at ON tasks (finished_at);
    """,
    # 3: finished_at is NULL until a task finishes: leaving those rows out of its
    # index spares an INSERT one index entry and a finish the removal of the
    # NULL one (measured: ~1.1 us of a task's ~5.5 in the writer thread).
    """
    DROP INDEX tasks_finished_at;
    CREATE INDEX tasks_finished_at ON tasks (finished_at) WHERE finished_at IS NOT NULL;
    """,
]


class StoreLocked(DaemonUnavailable):
    """Another supervisor has the database open."""


class SqliteStore:
    spills = True  # pending tasks beyond buffer_size stay on disk

    def __init__(self, path: Path, sync: str = "full") -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(path)
        pragmas = [
            "PRAGMA journal_mode = WAL",
            "PRAGMA busy_timeout = 5000",
            f"PRAGMA synchronous = {'FULL' if sync == 'full' else 'NORMAL'}",
        ]
        # This connection reads (and makes the rare writes: recovery, purge, prune,
        # after ``sync()``); the writer thread has its own for the loop's commits.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in pragmas:
            self.db.execute(pragma)
        _migrate(self.db, path)
        self.seq: int = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()[0]
        # Tasks admitted since the last hand-over, by id; and how they came:
        # one by one as (seq, task), or by ``add_many`` as (first seq, tasks).
        self._new: dict[str, QueueTask] = {}
        self._added: list[tuple[int, QueueTask]] = []
        self._batches: list[tuple[int, list[QueueTask]]] = []
        self._seqs: dict[str, int] = {}  # id -> seq of the unfinished tasks we hold
        self._changed: dict[str, QueueTask] = {}
        self._submitted = 0  # the ticket of the last batch handed to the writer
        # Batches handed to the writer and not yet durable, each with the dict of
        # live tasks it writes (``_new``'s or ``_changed``'s, kept whole: no entry
        # per task to add and remove), so that ``get`` still finds them.
        self._inflight: collections.deque[tuple[int, dict[str, QueueTask]]] = collections.deque()
        self.writer = Writer(path, pragmas)
        self.writer.committed_seq = self.seq

    # -- the Store protocol --------------------------------------------------------
    def put(self, task: QueueTask) -> None:
        """Record a change of a task already added; written at the next commit."""
        if task.id not in self._new:  # a new task is inserted with its state at commit
            self._changed[task.id] = task

    def put_started(self, tasks: list[QueueTask]) -> None:
        for task in tasks:
            self.put(task)

    def add(self, task: QueueTask, held: bool = True) -> int:
        """Record a newly admitted task; returns its admission ``seq``.

        ``held=False``: the task waits on disk only (a spilled backlog); its seq
        is learnt again when it is paged in, so a backlog costs no memory here.
        """
        self.seq += 1
        self._new[task.id] = task
        self._added.append((self.seq, task))
        if held:
            self._seqs[task.id] = self.seq
        return self.seq

    def add_many(self, tasks: list[QueueTask]) -> None:
        """``add`` each task, held, in order: the broker's plain batch (one
        queue, one created_at, no ids or delays of their own), kept whole so
        that ``commit`` can write it without looking at each task twice."""
        first = self.seq + 1
        self._batches.append((first, tasks))
        ids = [task.id for task in tasks]
        self._new.update(zip(ids, tasks, strict=True))
        self._seqs.update(zip(ids, range(first, first + len(tasks)), strict=True))
        self.seq += len(tasks)

    def get(self, task_id: str) -> QueueTask | None:
        task = self._new.get(task_id) or self._changed.get(task_id)
        if task is not None:
            return task
        for _, written in self._inflight:  # the same live task objects
            if (task := written.get(task_id)) is not None:
                return task
        row = self.db.execute(f"SELECT {_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return _task(row) if row else None

    def commit(self) -> tuple[int, int]:
        """End of a loop turn: the tickets under which this turn's writes will
        be durable: (its new tasks, all of them); (0, 0): nothing to write.

        The writer gets a pair of transactions at a time: the new tasks'
        INSERTs first (a publish is answered as soon as they are durable),
        then the other tasks' changes. While a pair is in flight, the changes
        of the following turns pile up here, in ``_new`` and ``_changed``
        (keyed by id, holding the live tasks), and go over as the next pair
        once it is done: a task admitted, started and finished meanwhile is
        then one INSERT row with its last state, built once.
        """
        if not self._new and not self._changed:
            return (0, 0)
        if self.writer.done < self._submitted:
            return (self._submitted + 1, self._submitted + 2)  # the next pair
        self._submit()
        return (self._submitted - 1, self._submitted)

    def _submit(self) -> None:
        """Turn what piled up into rows and hand them to the writer as a pair."""
        now = time.time()
        plain: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
        inserts: list[list[Any]] = []
        for first, tasks in self._batches:
            _batch_rows(first, tasks, now, plain, inserts)
        for seq, task in self._added:
            _insert_row(seq, task, now, plain, inserts)
        self._forget_finished(self._new)
        updates, by_id = self._sort_changes(now)
        self._submitted += 2
        inserted, updated = self._submitted - 1, self._submitted
        self._inflight.append((inserted, self._new))
        self._inflight.append((updated, self._changed))
        max_seq = self.seq if self._new else 0  # every seq given out is in _new
        self._new, self._changed, self._added, self._batches = {}, {}, [], []
        self.writer.submit(
            Batch(inserted, max_seq, inserts, plain=plain),
            Batch(updated, 0, updates=updates, by_id=by_id),
        )

    def durable(self) -> int:
        """The highest ticket on disk; forgets what it no longer needs to hold."""
        self.writer.raise_error()
        done = self.writer.done
        while self._inflight and self._inflight[0][0] <= done:
            self._inflight.popleft()
        return done

    @property
    def committed_seq(self) -> int:
        """Admission seqs up to this one are on disk (paging reads only those)."""
        return self.writer.committed_seq

    def wake_socket(self) -> socket.socket:
        return self.writer.wake_r

    def sync(self) -> None:
        """Commit and wait until everything is on disk (rare operations only)."""
        self.writer.wait(self._submitted)  # the batch in flight
        if self._new or self._changed:
            self._submit()
            self.writer.wait(self._submitted)
        self.durable()

    def _forget_finished(self, tasks: dict[str, QueueTask]) -> None:
        """Stop holding the seqs of new tasks that finished before their INSERT
        (they never pass through ``_sort_changes``, which forgets the others)."""
        seqs = self._seqs
        for task_id, task in tasks.items():
            if task.status in FINISHED:
                seqs.pop(task_id, None)

    def _sort_changes(self, now: float) -> tuple[list[Any], list[Any]]:
        """The updates: of the tasks we hold, grouped by the state they reach as
        (state row without its seq, seqs); and full updates of the tasks whose
        seq we do not know (by id). A plain state (no attempt, error or result)
        is keyed by (status, available_at), its row built once per group."""
        plain: dict[tuple[Any, Any], list[int]] = {}
        other: dict[tuple[Any, ...], list[int]] = {}
        by_id: list[Any] = []
        seqs = self._seqs
        for task in self._changed.values():
            seq = seqs.get(task.id)
            if seq is None:
                by_id.append((*_state(task, now), task.id))
                continue
            status = task.status
            if status in FINISHED:
                del seqs[task.id]  # we no longer hold it
            if task.attempt or task.last_error or task.result is not None:
                other.setdefault(_state(task, now), []).append(seq)
            elif (group := plain.get((status, task.available_at))) is not None:
                group.append(seq)
            else:
                plain[status, task.available_at] = [seq]
        updates = [
            ((0, _STATUS_TEXT[status], "", stamp(available), None, _finished(status, now)), group)
            for (status, available), group in plain.items()
        ]
        return updates + list(other.items()), by_id

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sync()
        self.writer.close()
        self.db.close()
        os.close(self._lock_fd)

    # -- paging and recovery ----------------------------------------------------------
    def page(self, queue: str, after_seq: int, limit: int) -> list[tuple[int, QueueTask]]:
        """Unfinished tasks of a queue with ``seq > after_seq``, in admission order."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM tasks WHERE queue = ? AND seq > ? "
            "AND status IN ('pending', 'retrying') ORDER BY seq LIMIT ?",
            (queue, after_seq, limit),
        ).fetchall()
        page = [(row[0], _task(row)) for row in rows]
        self._seqs.update((task.id, seq) for seq, task in page)
        return page

    def unfinished_counts(self) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT queue, COUNT(*) FROM tasks WHERE status IN ('pending', 'running', "
            "'retrying') GROUP BY queue"
        ).fetchall()
        return {queue: count for queue, count in rows}

    def running(self) -> list[QueueTask]:
        """Tasks left ``running`` by a supervisor that died."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM tasks WHERE status = 'running' ORDER BY seq"
        ).fetchall()
        return [_task(row) for row in rows]

    # -- dead letters and retention --------------------------------------------------
    def dead(self, queue: str | None = None, limit: int = 1000) -> list[QueueTask]:
        # "finished_at IS NOT NULL" (true of every failed task) lets SQLite read
        # the partial finished_at index in that order
        sql = f"SELECT {_COLUMNS} FROM tasks WHERE status = 'failed' AND finished_at IS NOT NULL"
        args: tuple[Any, ...] = ()
        if queue:
            sql += " AND queue = ?"
            args = (queue,)
        rows = self.db.execute(sql + " ORDER BY finished_at LIMIT ?", (*args, limit)).fetchall()
        return [_task(row) for row in rows]

    def purge_dead(self, queue: str | None = None) -> int:
        self.sync()
        sql = "DELETE FROM tasks WHERE status = 'failed'" + (" AND queue = ?" if queue else "")
        return self.db.execute(sql, (queue,) if queue else ()).rowcount

    def prune(self, before: float, batch: int = 2000) -> int:
        """Delete up to ``batch`` succeeded tasks finished before ``before``."""
        self.sync()
        return self.db.execute(
            "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE status = 'succeeded' "
            "AND finished_at < ? LIMIT ?)",
            (before, batch),
        ).rowcount


def _lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreLocked(
            f"store {path} is in use by another procqueue daemon (pid {holder}); "
            "stop it first or give this config another store"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise InternalError(
            f"store {path} has schema version {version}, newer than this procqueue "
            f"({SCHEMA_VERSION}); upgrade procqueue"
        )
    for target in range(version, SCHEMA_VERSION):
        script = MIGRATIONS[target]
        db.executescript(f"BEGIN; {script}; PRAGMA user_version = {target + 1}; COMMIT;")


# A status's column text by dict lookup: ``status.value`` goes through the enum's
# property descriptor (~0.4 us), twice a task on the commit path.
_STATUS_TEXT: dict[Any, str] = {status: status.value for status in QueueTaskStatus}
_STATUS_TEXT[None] = "pending"


def _result(task: QueueTask) -> str | None:
    return None if task.result is None else orjson.dumps(task.result).decode()


def _row(seq: int, t: QueueTask, now: float) -> list[Any]:
    """An INSERT row with the task's state now (it may have run meanwhile)."""
    attempt, status, last_error, available, result, finished = _state(t, now)
    return [
        seq,
        t.id,
        t.queue,
        t.type,
        t.key,
        t.payload,
        orjson.dumps(t.headers).decode() if t.headers else "{}",
        t.delay,
        t.timeout,
        t.max_retry,
        attempt,
        status,
        last_error,
        stamp(t.created_at),
        available,
        result,
        finished,
    ]


def _batch_rows(
    first: int,
    tasks: list[QueueTask],
    now: float,
    plain: dict[tuple[Any, ...], list[tuple[Any, ...]]],
    inserts: list[list[Any]],
) -> None:
    """Add the rows of one ``add_many`` batch (seqs from ``first``) to
    ``plain`` and ``inserts``: its tasks share queue and created_at, so a
    task still plain needs only its type and status looked at."""
    created = tasks[0].created_at
    # (type, status) -> the first task of that kind and the rows of them all
    kinds: dict[tuple[str, Any], tuple[QueueTask, list[tuple[Any, ...]]]] = {}
    for seq, t in enumerate(tasks, first):
        if t.available_at is not created or not _is_plain(t):
            _insert_row(seq, t, now, plain, inserts)
        elif (kind := kinds.get((t.type, t.status))) is not None:
            kind[1].append((seq, t.id, t.payload))
        else:
            kinds[t.type, t.status] = (t, [(seq, t.id, t.payload)])
    for t, rows in kinds.values():
        plain.setdefault(_shared_values(t, now), []).extend(rows)


def _insert_row(
    seq: int,
    t: QueueTask,
    now: float,
    plain: dict[tuple[Any, ...], list[tuple[Any, ...]]],
    inserts: list[list[Any]],
) -> None:
    """Add a task's INSERT row: to ``plain`` (by its shared values) when it is
    plain, else to ``inserts``."""
    if _is_plain(t):
        shared = _shared_values(t, now)
        rows = plain.get(shared)
        if rows is None:
            rows = plain[shared] = []
        rows.append((seq, t.id, t.payload))
    else:
        inserts.append(_row(seq, t, now))


def _finished(status: Any, now: float) -> float | None:
    return now if status in FINISHED else None


def _is_plain(t: QueueTask) -> bool:
    """Whether every column outside ``writer.SHARED_COLUMNS`` and
    ``PER_TASK_COLUMNS`` would hold the schema's default."""
    return has_defaults(t) and not t.last_error and t.result is None


def _shared_values(t: QueueTask, now: float) -> tuple[Any, ...]:
    """A plain task's ``writer.SHARED_COLUMNS``, with its state now: the same
    for every task of one publish in the same state."""
    status = t.status
    return (
        t.queue,
        t.type,
        _STATUS_TEXT[status],
        stamp(t.created_at),
        stamp(t.available_at),
        _finished(status, now),
    )


def _state(t: QueueTask, now: float) -> tuple[Any, ...]:
    """What changes after the INSERT: attempt, status, last_error,
    available_at, result, finished_at."""
    status = t.status
    return (
        t.attempt,
        _STATUS_TEXT[status],
        t.last_error,
        stamp(t.available_at),
        _result(t),
        now if status in FINISHED else None,
    )


def _task(row: Iterable[Any]) -> QueueTask:
    (
        _,
        tid,
        queue,
        ttype,
        key,
        payload,
        headers,
        delay,
        timeout,
        max_retry,
        attempt,
        status,
        last_error,
        created,
        available,
        result,
        _,
    ) = row
    return QueueTask(
        queue=queue,
        type=ttype,
        payload=payload,
        key=key,
        headers=orjson.loads(headers),
        delay=delay,
        timeout=timeout,
        max_retry=max_retry,
        id=tid,
        attempt=attempt,
        status=QueueTaskStatus(status),
        last_error=last_error,
        created_at=from_stamp(created),
        available_at=from_stamp(available),
        result=None if result is None else orjson.loads(result),
    )
