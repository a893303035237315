"""Control-socket requests, served inside the supervisor's loop.

Every reply that reports a state change (publish, a finished task for
``wait``) is held until the end of the loop turn, after the store's commit,
and until the store has what it reports on disk: a publish reply once its
tasks are (the store writes new tasks first), any other once the whole turn
is. What a client has been told survives a crash of the supervisor.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

from .broker import Broker
from .control import DEFERRED, Conn, error_reply
from .errors import InvalidQueueTask, ProtocolError, QueueFull, TaskNotFound
from .store import Store
from .task import QueueTask, QueueTaskStatus, payload_tasks, stamp

Reply = dict[str, Any]
Answer = Callable[[Any], None]  # sends the reply of one request (Conn.defer)


class Requests:
    def __init__(
        self,
        broker: Broker,
        store: Store,
        status: Callable[[], dict[str, Any]],
        state: Callable[[], str],
    ) -> None:
        self.broker, self.store, self._status, self.state = broker, store, status, state
        self.after_admit: list[tuple[Answer, Reply]] = []  # publish replies: (send, frame)
        self.after_commit: list[tuple[Answer, Reply]] = []  # the others
        self.held: collections.deque[tuple[int, list[tuple[Answer, Reply]]]] = (
            collections.deque()
        )  # replies of committed turns, waiting for their ticket
        self.waiters: dict[str, list[Answer]] = {}  # task id -> the waits to answer
        self.notify: dict[str, Conn] = {}  # task id -> the connection that wants its outcome
        # (monotonic deadline, seq, task id, answer) of waits with a timeout
        self.wait_timers: list[tuple[float, int, str, Answer]] = []
        self._seq = itertools.count()
        self.extra: dict[str, Callable[[dict[str, Any]], Any]] = {}  # more ops (cron ...)
        self.on_admit: Callable[[], None] = lambda: None  # a client's tasks were admitted

    def handle(self, conn: Conn, req: dict[str, Any]) -> Any:
        op = req["op"]
        if op == "publish":
            return self._publish(conn, req)
        if op == "get_task":
            return {"ok": self.task(str(req.get("id", ""))).to_dict()}
        if op == "wait":
            return self._wait(conn, req)
        if op == "status":
            return {"ok": self._status()}
        if op == "ping":
            return {"ok": {"pid": os.getpid(), "state": self.state()}}
        if op in ("dead_list", "dead_requeue", "dead_purge"):
            return {"ok": self._dead_letters(op, req)}
        if op in self.extra:
            return {"ok": self.extra[op](req)}
        known = [
            "publish",
            "get_task",
            "wait",
            "status",
            "ping",
            "dead_list",
            "dead_requeue",
            "dead_purge",
            *self.extra,
        ]
        raise ProtocolError(f"unknown op {op!r}; expected one of: {', '.join(known)}")

    # -- publish -----------------------------------------------------------------
    def _publish(self, conn: Conn, req: dict[str, Any]) -> Any:
        tasks = _request_tasks(req)
        shape = _REPLY_SHAPES[req.get("brief") or "tasks"]
        # "chained": the next part of one publish_many, refused unless the part
        # before it got in whole, so that what is admitted stays a prefix.
        if req.get("chained") and not conn.session.get("chain_ok", True):
            refused = InvalidQueueTask("not admitted: an earlier part of this publish was refused")
            return error_reply(refused, accepted=shape([]))
        conn.session["chain_ok"] = False
        try:
            stored = self.broker.publish(tasks)
            reply: Reply = {"ok": shape(stored)}
            conn.session["chain_ok"] = True
        except QueueFull as exc:
            stored = getattr(exc, "accepted", [])
            reply = error_reply(exc, accepted=shape(stored))
        if stored:
            self.on_admit()
        if req.get("notify"):  # push {"event": "done", ...} when each task finishes
            for task in stored:
                self.notify[task.id] = conn
        if req.get("wait") and "ok" in reply and len(stored) == 1:
            return self._wait(conn, {"id": stored[0].id, "timeout": req.get("timeout")})
        self.after_admit.append((conn.defer(), reply))
        return DEFERRED

    def publish_from_worker(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``ctx.publish`` in a handler: never pushed back, or a full queue could
        deadlock the very workers that drain it."""
        stored = self.broker.publish([QueueTask.from_dict(t) for t in tasks], force=True)
        return [t.to_dict() for t in stored]

    # -- tasks and waiting -------------------------------------------------------
    def task(self, task_id: str) -> QueueTask:
        task = self.broker.get(task_id)
        if task is None:
            raise TaskNotFound(f"task {task_id!r} not found")
        return task

    def _wait(self, conn: Conn, req: dict[str, Any]) -> Any:
        task_id = str(req.get("id", ""))
        task = self.task(task_id)
        timeout = req.get("timeout")
        if (task.status is not None and task.status.finished) or timeout == 0:
            return {"ok": task.to_dict()}
        answer = conn.defer()
        self.waiters.setdefault(task_id, []).append(answer)
        if isinstance(timeout, int | float) and timeout > 0:
            entry = (time.monotonic() + timeout, next(self._seq), task_id, answer)
            heapq.heappush(self.wait_timers, entry)
        return DEFERRED

    def on_finish(self, task: QueueTask) -> None:
        answers = self.waiters.pop(task.id, None) if self.waiters else None
        if answers:
            reply = {"ok": task.to_dict()}
            self.after_commit.extend((answer, reply) for answer in answers)
        conn = self.notify.pop(task.id, None) if self.notify else None
        if conn is not None and not conn.closed:
            event = {
                "event": "done",
                "id": task.id,
                "status": task.status,
                "result": task.result,
                "error": task.last_error,
            }
            self.after_commit.append((conn.push, event))

    def next_timer(self) -> float | None:
        return self.wait_timers[0][0] if self.wait_timers else None

    def expire_waits(self, now: float) -> None:
        """``wait`` with a timeout that ran out: answer with the task as it is."""
        while self.wait_timers and self.wait_timers[0][0] <= now:
            _, _, task_id, answer = heapq.heappop(self.wait_timers)
            if answer in self.waiters.get(task_id, ()):
                self.waiters[task_id].remove(answer)
                answer({"ok": self.task(task_id).to_dict()})

    def hold_until(self, admitted: int, committed: int) -> None:
        """This turn's publish replies go out once the store says ``admitted``
        is durable, the others once ``committed`` is. ``held`` is released in
        order, so no reply overtakes one held before it."""
        if self.after_admit:
            self.held.append((admitted, self.after_admit))
            self.after_admit = []
        if self.after_commit:
            self.held.append((committed, self.after_commit))
            self.after_commit = []

    def send_durable(self, durable: int) -> None:
        """Send the held replies whose ticket is on disk: what they report is durable."""
        while self.held and self.held[0][0] <= durable:
            for send, frame in self.held.popleft()[1]:
                send(frame)

    # -- dead letters ----------------------------------------------------------------
    def _dead_letters(self, op: str, req: dict[str, Any]) -> Any:
        queue = req.get("queue") or None
        self.store.sync()
        if op == "dead_list":
            limit = int(req.get("limit") or 1000)
            return [t.to_dict() for t in self.store.dead(queue, limit)]
        if op == "dead_purge":
            return self.store.purge_dead(queue)
        tasks = (
            self.store.dead(queue, limit=1_000_000)
            if req.get("all")
            else [self.task(str(req.get("id", "")))]
        )
        for task in tasks:
            if task.status is not QueueTaskStatus.FAILED:
                raise InvalidQueueTask(f"task {task.id} is {task.status}, not a dead letter")
        return [self.broker.requeue(t).to_dict() for t in tasks]


def _request_tasks(req: dict[str, Any]) -> list[QueueTask]:
    """A publish's tasks: ``tasks``, a list of task objects; or ``queue``, ``type``
    and ``payloads`` (base64 or null each), tasks that share all but a payload."""
    raw = req.get("tasks")
    if isinstance(raw, list):
        return [QueueTask.from_dict(t) for t in raw]
    payloads = req.get("payloads")
    if raw is None and isinstance(payloads, list):
        return payload_tasks(req.get("queue"), req.get("type"), payloads)
    raise InvalidQueueTask(
        'publish needs "tasks", a list of task objects, or "queue", "type" and '
        '"payloads", a list of base64 strings or nulls'
    )


def _brief_ids(tasks: list[QueueTask]) -> dict[str, Any]:
    """The ids, plus the created_at and status they share; tasks that differ
    (already known by id) are listed apart as [index, created_at, status]."""
    if not tasks:
        return {"ids": []}
    created, status = tasks[-1].created_at, tasks[-1].status
    others = [
        [i, stamp(t.created_at), t.status]
        for i, t in enumerate(tasks)
        if t.created_at is not created or t.status is not status
    ]
    return {
        "ids": [t.id for t in tasks],
        "created": stamp(created),
        "status": status,
        "others": others,
    }


# How a publish reply describes what was admitted: whole tasks (the default), a
# count (procqueue.Pool, which chose the ids) or the ids in brief (Client).
_REPLY_SHAPES: dict[Any, Callable[[list[QueueTask]], Any]] = {
    "tasks": lambda tasks: [t.to_dict() for t in tasks],
    "count": len,
    "ids": _brief_ids,
}
