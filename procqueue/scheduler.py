"""Cron inside the supervisor: the schedule, its thread, and the loop's side.

The cron thread (``CronThread``) only computes fire times and queues
"publish this now"; this module drains those fires in the supervisor's loop,
publishes them as tasks (headers ``cron`` and ``cron_scheduled``, key
``name:scheduled``), counts how each run ended, and serves the runtime
control ops (add, cancel, get, list). Entries added at run time survive a
reload; entries from the config follow the config.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .cron import MAX_SLEEP, CronSpecEntry, CronTask, Fire, Schedule
from .errors import InvalidQueueTask, QueueNotRegistered
from .task import QueueTask, QueueTaskStatus, marshal_payload

log = logging.getLogger("procqueue.cron")

Publish = Callable[[list[QueueTask]], list[QueueTask]]


class CronThread:
    """Wakes at the next fire time and hands the fires to the supervisor's loop.

    Locking: the thread holds ``lock`` only while it calls the schedule and
    appends to :attr:`fires`; it sleeps, reads the clock and writes the wake-up
    byte without it. The supervisor takes the same lock around its own
    schedule calls (add, cancel, list, record_outcome) and drains ``fires``
    (a deque: ``popleft`` needs no lock). Around a fork, register
    ``os.register_at_fork(before=t.pause, after_in_parent=t.resume,
    after_in_child=t.resume)`` from the main thread: holding the lock
    guarantees the cron thread is asleep or outside croniter (and any import
    it might trigger) when the child is cloned. ``lock`` is not reentrant:
    never fork while already holding it.
    """

    def __init__(
        self,
        schedule: Schedule,
        lock: threading.Lock,
        wake_fd: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.schedule = schedule
        self.lock = lock
        self.wake_fd = wake_fd
        self.clock = clock
        self.fires: collections.deque[Fire] = collections.deque()
        self._event = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="procqueue-cron", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stopping = True
        self._event.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def poke(self) -> None:
        """The schedule changed: recompute the wake-up time now."""
        self._event.set()

    def pause(self) -> None:
        self.lock.acquire()

    def resume(self) -> None:
        self.lock.release()

    def _run(self) -> None:
        while not self._stopping:
            self._event.clear()  # a poke from here on interrupts the wait below
            try:
                timeout = self._tick()
            except Exception:
                log.exception("cron: computing fire times failed; retrying in 1s")
                timeout = 1.0
            self._event.wait(timeout)

    def _tick(self) -> float:
        """Queue what is due; return how long to sleep."""
        with self.lock:
            if self._stopping:
                return 0.0
            fires = self.schedule.due(self.clock())
            self.fires.extend(fires)
            wakeup = self.schedule.next_wakeup()
        if fires:
            self._ring()
        if wakeup is None:
            return MAX_SLEEP
        return min(MAX_SLEEP, max(0.0, wakeup - self.clock()))

    def _ring(self) -> None:
        # BlockingIOError: a wake-up byte is already pending; BrokenPipeError:
        # the loop has gone (shutdown).
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self.wake_fd, b"\0")


class CronService:
    def __init__(
        self,
        entries: tuple[CronSpecEntry, ...],
        selector: selectors.BaseSelector,
        publish: Publish,
        queues: Callable[[], set[str]],
    ) -> None:
        self.lock = threading.Lock()
        self.schedule = Schedule(entries, time.time())
        self.configured = {e.name for e in entries}  # the rest were added at run time
        self.publish, self.queues = publish, queues
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        selector.register(self._r, selectors.EVENT_READ, self._on_wake)
        self.thread = CronThread(self.schedule, self.lock, self._w.fileno())
        # Fork only with the cron thread outside the schedule (DESIGN.md: no lock
        # a child could need may be held across fork()).
        os.register_at_fork(
            before=self._before_fork,
            after_in_parent=self._after_fork,
            after_in_child=self._after_fork,
        )
        self._forking = False

    def start(self) -> None:
        if len(self.schedule):
            log.info(
                "cron: %d entr%s", len(self.schedule), "y" if len(self.schedule) == 1 else "ies"
            )
        self.thread.start()

    def stop(self) -> None:
        self.thread.stop()

    def fds(self) -> list[socket.socket]:
        return [self._r, self._w]

    def _before_fork(self) -> None:
        if threading.current_thread() is threading.main_thread() and self.thread._thread:
            self.thread.pause()
            self._forking = True

    def _after_fork(self) -> None:
        if self._forking:
            self._forking = False
            self.thread.resume()

    # -- the loop's side ------------------------------------------------------
    def _on_wake(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            self._r.recv(4096)
        while self.thread.fires:
            fire = self.thread.fires.popleft()
            try:
                (task,) = self.publish([fire.to_task()])
            except Exception as exc:
                log.error(
                    "cron %s: could not publish the run due at %s: %s",
                    fire.name,
                    fire.scheduled.isoformat(),
                    exc,
                )
                continue
            log.info(
                "cron %s: published task %s (due %s)",
                fire.name,
                task.id,
                fire.scheduled.isoformat(),
            )

    def on_finish(self, task: QueueTask) -> None:
        """A task finished for good: count it for its cron entry, if it has one."""
        name = task.headers.get("cron")
        if name:
            with self.lock:
                self.schedule.record_outcome(name, task.status is QueueTaskStatus.SUCCEEDED)

    def reconfigure(self, entries: tuple[CronSpecEntry, ...]) -> None:
        """A reload: config entries follow the new config; runtime ones stay."""
        now = time.time()
        with self.lock:
            for name in self.configured - {e.name for e in entries}:
                if name in self.schedule:
                    self.schedule.cancel(name)
            for entry in entries:
                old = self.schedule.get(entry.name) if entry.name in self.schedule else None
                if old is not None and _same(old, entry):
                    continue
                if old is not None:
                    self.schedule.cancel(entry.name)
                self.schedule.add(entry, now)
            self.configured = {e.name for e in entries}
        self.thread.poke()

    # -- control ops ---------------------------------------------------------------
    def ops(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "cron_add": self.add,
            "cron_cancel": self.cancel,
            "cron_get": self.get,
            "cron_list": self.list,
        }

    def add(self, req: dict[str, Any]) -> dict[str, Any]:
        queue, ttype, spec = (str(req.get(k) or "") for k in ("queue", "type", "spec"))
        if queue not in self.queues():
            raise QueueNotRegistered(f"cron: queue {queue!r} is not registered")
        if not ttype or not spec:
            raise InvalidQueueTask("cron_add needs a spec, a queue and a type")
        entry = CronSpecEntry(
            name=str(req.get("name") or uuid.uuid4()),
            spec=spec,
            queue=queue,
            type=ttype,
            payload=marshal_payload(req.get("payload")),
            description=str(req.get("description") or ""),
            timezone=str(req.get("timezone") or "UTC"),
            misfire=str(req.get("misfire") or "coalesce"),
        )
        with self.lock:
            added = self.schedule.add(entry, time.time()).to_dict()
        self.thread.poke()
        log.info("cron %s added at run time: %s -> %s/%s", entry.name, spec, queue, ttype)
        return added

    def cancel(self, req: dict[str, Any]) -> None:
        name = str(req.get("name") or "")
        with self.lock:
            self.schedule.cancel(name)
        self.configured.discard(name)
        self.thread.poke()
        log.info("cron %s cancelled", name)

    def get(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            return self.schedule.get(str(req.get("name") or "")).to_dict()

    def list(self, req: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [task.to_dict() for task in self.schedule.list()]


def _same(task: CronTask, entry: CronSpecEntry) -> bool:
    fields = ("spec", "queue", "type", "payload", "timezone", "misfire", "description")
    return all(getattr(task, f) == getattr(entry, f) for f in fields)
