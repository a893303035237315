"""The SQLite store's writer thread: commits off the supervisor's loop.

The loop turns its changes into rows (plain tuples, so the thread never
touches a live task) and hands them over as batches with ticket numbers;
the writer commits one batch a transaction, in order, records the highest
ticket it has made durable and writes a byte to a socket the loop watches.
The loop answers a publish only once its ticket is durable, and meanwhile
keeps dispatching and collecting outcomes instead of waiting for the disk.

The SQL, not Python, is the store's cost (measured alone, in 1,000-row
transactions: ~1.8 us per plain row inserted, ~1.7 per row of a shared
UPDATE): the loop keeps it down by folding a task's changes into its INSERT
while the task waits for its turn (``sqlite.py``).

Fork safety (DESIGN.md): the writer holds ``fork_lock`` for the whole of a
transaction and an ``os.register_at_fork`` hook takes the same lock before
the loop forks a worker, so no child is ever cloned in the middle of a
SQLite transaction.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import socket
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("procqueue.store")


COLUMNS = (
    "seq, id, queue, type, key, payload, headers, delay, timeout, max_retry, attempt, "
    "status, last_error, created_at, available_at, result, finished_at"
)
_COLUMN_NAMES = COLUMNS.split(", ")
# Inserts go ROWS_PER_INSERT rows to a statement: SQLite's per-statement work
# (bind, step, reset) then happens once per 32 rows, which halves the cost of
# an insert (measured: 11.4 -> 5.6 us a row, fsync included).
ROWS_PER_INSERT = 32


def _insert_sql(columns: Sequence[int]) -> tuple[str, str]:
    """INSERT statements for ``columns``: (``ROWS_PER_INSERT`` rows, one row)."""
    names = ", ".join(_COLUMN_NAMES[i] for i in columns)
    one = f"({', '.join('?' * len(columns))})"
    many = ", ".join([one] * ROWS_PER_INSERT)
    return f"INSERT INTO tasks ({names}) VALUES {many}", f"INSERT INTO tasks ({names}) VALUES {one}"


_FULL_INSERTS = _insert_sql(range(17))
INSERT_SQL = _FULL_INSERTS[1]  # one row; rows of it go ROWS_PER_INSERT to a statement

# Most tasks set nothing beyond the columns below (no key, headers, delay,
# timeout, max_retry, attempt, error or result): they are inserted with these
# alone and SQLite fills in the schema's defaults. And the tasks of one publish
# share most of them: the loop groups such *plain* tasks by SHARED_COLUMNS
# (``sqlite._submit``), and each group goes as INSERT ... SELECT over a VALUES
# list of the three per-task columns, the shared ones bound once a statement.
# The sqlite3 module spends ~0.1-0.3 us binding each value: 9 bound values a
# row took ~2.45 us of CPU a row, 3 take ~1.85 at 32 rows to a statement and
# ~1.65 at 128 (measured alone, 1,024-row transactions).
SHARED_COLUMNS = ("queue", "type", "status", "created_at", "available_at", "finished_at")
PER_TASK_COLUMNS = ("seq", "id", "payload")
SHARED_ROWS_PER_INSERT = 128  # a remainder goes in statements of 64, 32, ... 1 rows


def shared_insert_sql(rows: int) -> str:
    """INSERT of ``rows`` plain tasks: the SHARED_COLUMNS values first, then
    each task's PER_TASK_COLUMNS."""
    names = ", ".join(SHARED_COLUMNS + PER_TASK_COLUMNS)
    shared = ", ".join("?" * len(SHARED_COLUMNS))
    values = ", ".join(["(?, ?, ?)"] * rows)
    return (
        f"INSERT INTO tasks ({names}) SELECT {shared}, column1, column2, column3 "
        f"FROM (VALUES {values})"
    )


def _shared_chunks(count: int) -> list[int]:
    """Statement sizes for ``count`` rows: whole SHARED_ROWS_PER_INSERT, then
    the remainder's powers of two (a few distinct statements, all cached)."""
    sizes = [SHARED_ROWS_PER_INSERT] * (count // SHARED_ROWS_PER_INSERT)
    rest = count % SHARED_ROWS_PER_INSERT
    size = SHARED_ROWS_PER_INSERT
    while rest:
        size //= 2
        if rest >= size:
            sizes.append(size)
            rest -= size
    return sizes


_SHARED_SQL = {1 << bit: shared_insert_sql(1 << bit) for bit in range(8)}
assert SHARED_ROWS_PER_INSERT in _SHARED_SQL


UPDATE_BY_ID_SQL = (
    "UPDATE tasks SET attempt = ?, status = ?, last_error = ?, available_at = ?, "
    "result = ?, finished_at = ? WHERE id = ?"
)
# The same by admission seq (the rowid): no detour through the id index. Used for
# the tasks this supervisor holds, whose seq it knows.
UPDATE_BY_SEQ_SQL = UPDATE_BY_ID_SQL.replace("WHERE id = ?", "WHERE seq = ?")
# Before a task finishes, result and finished_at stay NULL: leaving them out of
# the SET keeps SQLite off the finished_at index.
UPDATE_UNFINISHED_SQL = (
    "UPDATE tasks SET attempt = ?, status = ?, last_error = ?, available_at = ? WHERE seq = ?"
)
# Tasks that reach the same state in one batch (typically one publish's tasks,
# succeeded with no result) share one UPDATE over a JSON array of their seqs:
# SQLite then does the per-row work in C (measured: 4.5 -> 2.1 us a row).
_SEQ_IN_ARRAY = "WHERE seq IN (SELECT value FROM json_each(?))"
UPDATE_SEQS_SQL = UPDATE_BY_SEQ_SQL.replace("WHERE seq = ?", _SEQ_IN_ARRAY)
UPDATE_UNFINISHED_SEQS_SQL = UPDATE_UNFINISHED_SQL.replace("WHERE seq = ?", _SEQ_IN_ARRAY)


@dataclass(frozen=True, slots=True)
class Batch:
    """One transaction's writes. A state row is the part of a task that
    changes after its INSERT: (attempt, status, last_error, available_at,
    result, finished_at)."""

    ticket: int
    max_seq: int  # the highest admission seq inserted by this batch (0: none)
    inserts: list[list[Any]] = field(default_factory=list)  # full rows of new tasks
    # Tasks known by seq, grouped by the state they reach: (state row, seqs).
    updates: list[tuple[tuple[Any, ...], list[int]]] = field(default_factory=list)
    by_id: list[tuple[Any, ...]] = field(default_factory=list)  # known by id only (rare)
    # New plain tasks: SHARED_COLUMNS values -> each task's PER_TASK_COLUMNS.
    plain: dict[tuple[Any, ...], list[tuple[Any, ...]]] = field(default_factory=dict)


def statements(batch: Batch) -> list[tuple[str, list[Any]]]:
    """The statements that write ``batch``, with the rows each runs over."""
    unfinished_one, unfinished_many, finished_one, finished_many = _updates(batch)
    pairs: list[tuple[str, list[Any]]] = [
        (INSERT_SQL, batch.inserts),
        *_shared_inserts(batch.plain),
        (UPDATE_UNFINISHED_SQL, unfinished_one),
        (UPDATE_UNFINISHED_SEQS_SQL, unfinished_many),
        (UPDATE_BY_SEQ_SQL, finished_one),
        (UPDATE_SEQS_SQL, finished_many),
        (UPDATE_BY_ID_SQL, batch.by_id),
    ]
    return [(sql, rows) for sql, rows in pairs if rows]


def _shared_inserts(
    plain: dict[tuple[Any, ...], list[tuple[Any, ...]]],
) -> list[tuple[str, list[Any]]]:
    """The statements that insert ``plain`` tasks, with each one's parameters."""
    by_size: dict[int, list[Any]] = {}
    for shared, tasks in plain.items():
        start = 0
        for size in _shared_chunks(len(tasks)):
            values = itertools.chain.from_iterable(tasks[start : start + size])
            by_size.setdefault(size, []).append((*shared, *values))
            start += size
    return [(_SHARED_SQL[size], params) for size, params in by_size.items()]


def _updates(batch: Batch) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """The UPDATE rows of ``batch``'s tasks known by seq: of unfinished tasks
    alone in their state (values, seq) and sharing it (values, JSON array of
    seqs), then the same of finished ones. An unfinished task's result and
    finished_at stay NULL: not written."""
    unfinished_one: list[Any] = []
    unfinished_many: list[Any] = []
    finished_one: list[Any] = []
    finished_many: list[Any] = []
    for values, seqs in batch.updates:
        finished = values[5] is not None
        written = values if finished else values[:4]
        if len(seqs) == 1:
            (finished_one if finished else unfinished_one).append((*written, seqs[0]))
        else:
            many = finished_many if finished else unfinished_many
            many.append((*written, orjson.dumps(seqs).decode()))
    return unfinished_one, unfinished_many, finished_one, finished_many


class Writer:
    def __init__(self, path: Path, pragmas: Sequence[str]) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in pragmas:
            self.db.execute(pragma)
        self.done = 0  # the highest durable ticket
        self.committed_seq = 0
        self.error: BaseException | None = None
        self._queue: collections.deque[Batch] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.fork_lock = threading.Lock()
        self.wake_r, self._wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        os.register_at_fork(
            before=self._before_fork,
            after_in_parent=self._after_fork,
            after_in_child=self._after_fork,
        )
        self._thread = threading.Thread(target=self._run, name="procqueue-store", daemon=True)
        self._thread.start()

    def _before_fork(self) -> None:
        self.fork_lock.acquire()

    def _after_fork(self) -> None:
        self.fork_lock.release()

    def submit(self, *batches: Batch) -> None:
        with self._cv:
            self._queue.extend(batches)
            self._cv.notify_all()

    def wait(self, ticket: int) -> None:
        """Block until ``ticket`` is durable (rare operations and shutdown only)."""
        with self._cv:
            while self.done < ticket and self.error is None:
                self._cv.wait()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join()
        self.db.close()
        self.wake_r.close()
        self._wake_w.close()

    # -- the thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if not self._queue:
                    return
                batch = self._queue.popleft()
            try:
                with self.fork_lock:
                    self._commit(statements(batch))
            except BaseException as exc:  # the loop re-raises it: the store stops being durable
                log.critical("store: commit failed: %s", exc)
                self.error = exc
            with self._cv:
                if self.error is None:
                    self.done = batch.ticket
                    self.committed_seq = max(self.committed_seq, batch.max_seq)
                self._cv.notify_all()
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")
            if self.error is not None:
                return

    def _commit(self, writes: list[tuple[str, list[Any]]]) -> None:
        if not writes:
            return  # an empty half of a pair: nothing to make durable
        db = self.db
        db.execute("BEGIN")
        try:
            for sql, rows in writes:
                if sql == INSERT_SQL:
                    _insert_groups(db, _FULL_INSERTS, rows)
                else:
                    db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise


def _insert_groups(db: sqlite3.Connection, sql: tuple[str, str], rows: list[Any]) -> None:
    """INSERT ``rows`` with ``sql`` (see ``_insert_sql``), ``ROWS_PER_INSERT`` to a statement."""
    many, one = sql
    whole = len(rows) - len(rows) % ROWS_PER_INSERT
    if whole:
        groups = (
            list(itertools.chain.from_iterable(rows[start : start + ROWS_PER_INSERT]))
            for start in range(0, whole, ROWS_PER_INSERT)
        )
        db.executemany(many, groups)
    if whole < len(rows):
        db.executemany(one, rows[whole:])
