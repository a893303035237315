"""The SQLite store's writer thread: commits off the supervisor's loop.

The loop turns each turn's changes into rows (plain tuples, so the thread
never touches a live task) and hands them over with a ticket number; the
writer commits everything queued so far in one transaction (group commit
across turns), records the highest ticket it has made durable and writes a
byte to a socket the loop watches. The loop answers a publish only once its
ticket is durable, and meanwhile keeps dispatching and collecting outcomes
instead of waiting for the disk.

Under load the writer finds many turns queued, in which one task is often
inserted, marked running and marked succeeded: ``merge`` keeps only its last
state, so such a task costs one INSERT instead of an INSERT and two UPDATEs
(the SQL, not Python, was the store's cost: ~8 us per row written).

Fork safety (DESIGN.md): the writer holds ``fork_lock`` for the whole of a
transaction and an ``os.register_at_fork`` hook takes the same lock before
the loop forks a worker, so no child is ever cloned in the middle of a
SQLite transaction.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("procqueue.store")


COLUMNS = (
    "seq, id, queue, type, key, payload, headers, delay, timeout, max_retry, attempt, "
    "status, last_error, created_at, available_at, result, finished_at"
)
_ROW = f"({', '.join('?' * 17)})"
INSERT_SQL = f"INSERT INTO tasks ({COLUMNS}) VALUES {_ROW}"
# Inserts go ROWS_PER_INSERT rows to a statement: SQLite's per-statement work
# (bind, step, reset) then happens once per 32 rows, which halves the cost of
# an insert (measured: 11.4 -> 5.6 us a row, fsync included).
ROWS_PER_INSERT = 32
_INSERT_MANY_SQL = f"INSERT INTO tasks ({COLUMNS}) VALUES {', '.join([_ROW] * ROWS_PER_INSERT)}"
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
# A state row is the part of a task that changes after its INSERT:
# (seq, attempt, status, last_error, available_at, result, finished_at);
# these are the positions of those columns (after seq) in an INSERT row.
_STATE_COLUMNS = (10, 11, 12, 14, 15, 16)


@dataclass(frozen=True, slots=True)
class Batch:
    ticket: int
    max_seq: int  # the highest admission seq inserted by this batch (0: none)
    inserts: list[list[Any]]  # full rows of new tasks
    states: list[tuple[Any, ...]]  # state rows of tasks whose seq we know
    by_id: list[tuple[Any, ...]]  # updates of tasks known by id only (rare)


def merge(batches: Sequence[Batch]) -> list[tuple[str, list[Any]]]:
    """The statements that write ``batches`` in one transaction, each task's
    last state only: a state change of a task inserted in the same
    transaction goes into its INSERT row."""
    inserts: dict[int, list[Any]] = {}
    states: dict[int, tuple[Any, ...]] = {}
    by_id: list[tuple[Any, ...]] = []
    for batch in batches:
        for row in batch.inserts:
            inserts[row[0]] = row
        for state in batch.states:
            inserted = inserts.get(state[0])
            if inserted is None:
                states[state[0]] = state  # the last one wins
            else:
                for column, value in zip(_STATE_COLUMNS, state[1:], strict=True):
                    inserted[column] = value
        by_id += batch.by_id
    unfinished = [(*s[1:5], s[0]) for s in states.values() if s[6] is None]
    finished = [(*s[1:], s[0]) for s in states.values() if s[6] is not None]
    statements: list[tuple[str, list[Any]]] = [
        (INSERT_SQL, list(inserts.values())),
        (UPDATE_UNFINISHED_SQL, unfinished),
        (UPDATE_BY_SEQ_SQL, finished),
        (UPDATE_BY_ID_SQL, by_id),
    ]
    return [(sql, rows) for sql, rows in statements if rows]


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

    def submit(self, batch: Batch) -> None:
        with self._cv:
            self._queue.append(batch)
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
                batches = list(self._queue)
                self._queue.clear()
            try:
                with self.fork_lock:
                    self._commit(batches)
            except BaseException as exc:  # the loop re-raises it: the store stops being durable
                log.critical("store: commit failed: %s", exc)
                self.error = exc
            with self._cv:
                if self.error is None:
                    self.done = batches[-1].ticket
                    self.committed_seq = max(self.committed_seq, *(b.max_seq for b in batches))
                self._cv.notify_all()
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")
            if self.error is not None:
                return

    def _commit(self, batches: list[Batch]) -> None:
        db = self.db
        db.execute("BEGIN")
        try:
            for sql, rows in merge(batches):
                if sql is INSERT_SQL:
                    _insert(db, rows)
                else:
                    db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise


def _insert(db: sqlite3.Connection, rows: list[Any]) -> None:
    """INSERT ``rows``, ``ROWS_PER_INSERT`` to a statement, the rest one by one."""
    whole = len(rows) - len(rows) % ROWS_PER_INSERT
    groups = (
        [value for row in rows[start : start + ROWS_PER_INSERT] for value in row]
        for start in range(0, whole, ROWS_PER_INSERT)
    )
    db.executemany(_INSERT_MANY_SQL, groups)
    db.executemany(INSERT_SQL, rows[whole:])
