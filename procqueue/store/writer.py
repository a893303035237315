"""The SQLite store's writer thread: commits off the supervisor's loop.

The loop turns each turn's changes into rows (plain tuples, so the thread
never touches a live task) and hands them over with a ticket number; the
writer commits everything queued so far in one transaction (group commit
across turns), records the highest ticket it has made durable and writes a
byte to a socket the loop watches. The loop answers a publish only once its
ticket is durable, and meanwhile keeps dispatching and collecting outcomes
instead of waiting for the disk.

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


@dataclass(frozen=True, slots=True)
class Batch:
    ticket: int
    max_seq: int  # the highest admission seq inserted by this batch (0: none)
    statements: Sequence[tuple[str, list[tuple[Any, ...]]]]


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
            for batch in batches:
                for sql, rows in batch.statements:
                    db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
