"""The supervisor: one selector loop that owns every task and every worker.

It never imports user code. Each turn of the loop (``step``) sleeps in one
``select`` on the signal fd, the control socket and every worker's doorbell,
with the timeout set to the next timer; then it reads worker outcomes, fires
timers, hands ready tasks to workers with room and flushes the rings.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import os
import selectors
import signal
import socket
import time
from typing import Any

import setproctitle

from .broker import Broker
from .config import Config
from .control import DEFERRED, Conn, ControlServer, error_reply
from .errors import InvalidQueueTask, ProtocolError, QueueFull, TaskNotFound
from .pool import WorkerPool
from .store import open_store
from .task import QueueTask, QueueTaskStatus

log = logging.getLogger("procqueue.supervisor")


class SupervisorState(enum.StrEnum):
    BOOTING = "booting"
    RUNNING = "running"
    DRAINING = "draining"  # graceful stop: no new work, running tasks finish
    STOPPED = "stopped"


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = SupervisorState.BOOTING
        self.selector = selectors.DefaultSelector()
        self.store = open_store(config.settings.store, config.settings.sync)
        self.broker = Broker(config.queues, self.store, time.time, self._on_finish)
        self.pool = WorkerPool(config, self.broker, self.selector, self._close_in_child)
        self.pool.publish_hook = self._publish_from_worker
        self.waiters: dict[str, list[Conn]] = {}
        self.wait_timers: list[tuple[float, int, str, Conn]] = []  # (monotonic, seq, id, conn)
        self._seq = itertools.count()
        self.stop_deadline: float | None = None
        self.sigint_count = 0
        self._sig_r, self._sig_w = socket.socketpair()
        self.control: ControlServer | None = None
        self.after_commit: list[tuple[Conn, dict[str, Any]]] = []  # replies held for durability
        self.next_prune = time.monotonic() + 1.0

    # -- lifecycle -----------------------------------------------------------
    def set_state(self, new: SupervisorState) -> None:
        if new is not self.state:
            log.info("supervisor: %s -> %s", self.state, new)
            self.state = new

    def serve_forever(self) -> None:
        self.boot()
        try:
            while self.state is not SupervisorState.STOPPED:
                self.step()
        finally:
            self.cleanup()

    def boot(self) -> None:
        setproctitle.setproctitle(f"procqueue: supervisor {self.config.path}")
        self._install_signals()
        settings = self.config.settings
        self.control = ControlServer(
            settings.socket, settings.socket_mode, self.selector, self.handle_request
        )
        if self.store.spills:
            self.broker.recover()
        self.pool.start_all()
        self.set_state(SupervisorState.RUNNING)
        log.info(
            "procqueue %d serving %s on %s with %d queue(s)",
            os.getpid(),
            self.config.path,
            settings.socket,
            len(self.config.queues),
        )

    def cleanup(self) -> None:
        self.pool.kill_all()
        if self.control is not None:
            self.control.close()
        signal.set_wakeup_fd(-1)
        self.store.close()
        log.info("procqueue %d stopped", os.getpid())

    def _close_in_child(self) -> None:
        """In a freshly forked worker: close every fd that belongs to the supervisor."""
        signal.set_wakeup_fd(-1)
        self._sig_r.close()
        self._sig_w.close()
        if self.control is not None:
            for sock in self.control.fds():
                sock.close()
        self.pool.close_in_child()
        self.selector.close()

    # -- the loop ------------------------------------------------------------
    def step(self) -> None:
        timeout = self._timeout()
        if timeout != 0 and not self.pool.sleep_prepare():
            timeout = 0
        events = self.selector.select(timeout)
        self.pool.sleep_done()
        for key, mask in events:
            try:
                key.data(mask)
            except Exception:  # a bug in one event handler must not stop the daemon
                log.exception("supervisor: error handling an event on fd %d", key.fd)
        self.pool.collect()
        self._fire_timers()
        if self.state is SupervisorState.RUNNING:
            self.broker.promote_due()
            self.pool.dispatch()
        self.pool.flush()
        self._commit()
        if self.state is SupervisorState.DRAINING and not self.pool.alive():
            self.set_state(SupervisorState.STOPPED)

    def _commit(self) -> None:
        """End of a loop turn: one transaction, then the replies that waited for it."""
        self.store.commit()
        if self.store.spills:
            self.broker.page_in()
        if self.after_commit:
            replies, self.after_commit = self.after_commit, []
            for conn, reply in replies:
                conn.reply(reply)

    def _timeout(self) -> float | None:
        now = time.monotonic()
        if self.after_commit:
            return 0.0
        deadlines = [self.pool.next_deadline(), self.stop_deadline, self.next_prune]
        if self.wait_timers:
            deadlines.append(self.wait_timers[0][0])
        due = self.broker.next_due() if self.state is SupervisorState.RUNNING else None
        if due is not None:
            deadlines.append(now + (due - time.time()))
        times = [d for d in deadlines if d is not None]
        if not times:
            return 5.0  # nothing scheduled: a safety net only, every event wakes us
        return min(5.0, max(0.0, min(times) - now))

    def _fire_timers(self) -> None:
        now = time.monotonic()
        if now >= self.next_prune:
            self._prune(now)
        self.pool.check_deadlines(now)
        while self.wait_timers and self.wait_timers[0][0] <= now:
            _, _, task_id, conn = heapq.heappop(self.wait_timers)
            if conn in self.waiters.get(task_id, ()):
                self.waiters[task_id].remove(conn)
                conn.reply({"ok": self._task_dict(task_id)})
        if self.stop_deadline is not None and now >= self.stop_deadline:
            log.warning(
                "shutdown_timeout passed: killing %d worker(s) still busy", self.pool.alive()
            )
            self.stop_deadline = None
            self.pool.kill_all(wait=False)

    def _prune(self, now: float) -> None:
        """Retention: delete old succeeded tasks a batch per turn, never a long stall."""
        self.store.commit()
        removed = self.store.prune(time.time() - self.config.settings.retention)
        if removed:
            log.info("retention: pruned %d succeeded task(s)", removed)
        interval = min(60.0, max(0.5, self.config.settings.retention / 2))
        self.next_prune = now + (0.0 if removed >= 2000 else interval)

    # -- signals (STYLE.md 2: handlers only record; the loop acts) -------------
    def _install_signals(self) -> None:
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        for sig in (
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGHUP,
            signal.SIGQUIT,
            signal.SIGCHLD,
            signal.SIGTTIN,
            signal.SIGTTOU,
        ):
            signal.signal(sig, _record_only)
        self.selector.register(self._sig_r, selectors.EVENT_READ, self._on_signals)

    def _on_signals(self, mask: int) -> None:
        try:
            data = self._sig_r.recv(4096)
        except BlockingIOError:
            return
        for signum in data:
            self.handle_signal(signal.Signals(signum))

    def handle_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGCHLD:
            self.pool.reap()
        elif sig in (signal.SIGTERM, signal.SIGINT):
            self.sigint_count += sig == signal.SIGINT
            if self.sigint_count >= 2:
                self.stop(graceful=False)
            else:
                self.stop(graceful=True)
        elif sig == signal.SIGQUIT:
            self.stop(graceful=False)
        elif sig == signal.SIGHUP:
            log.warning("SIGHUP: configuration reload is not available in this version")
        elif sig == signal.SIGTTIN:
            self.pool.resize(+1)
        elif sig == signal.SIGTTOU:
            self.pool.resize(-1)

    def stop(self, graceful: bool) -> None:
        if self.state is SupervisorState.DRAINING and graceful:
            return
        log.info(
            "%s stop: %d task(s) running", "graceful" if graceful else "fast", self.pool.running()
        )
        self.set_state(SupervisorState.DRAINING)
        self.pool.stopping = True
        if graceful:
            self.stop_deadline = time.monotonic() + self.config.settings.shutdown_timeout
            self.pool.terminate_all()
        else:
            self.pool.kill_all(wait=False)
        left = sum(s.pending for s in self.broker.queues.values())
        if left and self.config.settings.store == "memory":
            log.warning("%d pending task(s) are dropped: the memory store keeps nothing", left)

    # -- control requests --------------------------------------------------
    def handle_request(self, conn: Conn, req: dict[str, Any]) -> Any:
        op = req["op"]
        if op == "publish":
            return self._publish(conn, req)
        if op == "get_task":
            return {"ok": self._task_dict(str(req.get("id", "")), must_exist=True)}
        if op == "wait":
            return self._wait(conn, req)
        if op == "status":
            return {"ok": self.status()}
        if op == "ping":
            return {"ok": {"pid": os.getpid(), "state": self.state.value}}
        if op.startswith("dead_"):
            return self._dead_letters(op, req)
        raise ProtocolError(
            f"unknown op {op!r}; expected publish, get_task, wait, status, ping, "
            "dead_list, dead_requeue or dead_purge"
        )

    def _dead_letters(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        queue = req.get("queue") or None
        self.store.commit()
        if op == "dead_list":
            limit = int(req.get("limit") or 1000)
            return {"ok": [t.to_dict() for t in self.store.dead(queue, limit)]}
        if op == "dead_purge":
            return {"ok": self.store.purge_dead(queue)}
        if op == "dead_requeue":
            if req.get("all"):
                tasks = self.store.dead(queue, limit=1_000_000)
            else:
                tasks = [self._task(str(req.get("id", "")))]
            for task in tasks:
                if task.status is not QueueTaskStatus.FAILED:
                    raise InvalidQueueTask(f"task {task.id} is {task.status}, not a dead letter")
            return {"ok": [self.broker.requeue(t).to_dict() for t in tasks]}
        raise ProtocolError(f"unknown op {op!r}")

    def _publish(self, conn: Conn, req: dict[str, Any]) -> Any:
        """Admit tasks; the reply waits for this turn's commit (durable once answered)."""
        raw = req.get("tasks")
        if not isinstance(raw, list):
            raise InvalidQueueTask('publish needs "tasks": a list of task objects')
        tasks = [QueueTask.from_dict(t) for t in raw]
        try:
            reply = {"ok": [t.to_dict() for t in self.broker.publish(tasks)]}
        except QueueFull as exc:
            done = getattr(exc, "accepted", [])
            reply = error_reply(exc, accepted=[t.to_dict() for t in done])
        self.after_commit.append((conn, reply))
        return DEFERRED

    def _publish_from_worker(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        stored = self.broker.publish([QueueTask.from_dict(t) for t in tasks], force=True)
        return [t.to_dict() for t in stored]

    def _wait(self, conn: Conn, req: dict[str, Any]) -> Any:
        task_id = str(req.get("id", ""))
        task = self._task(task_id)
        timeout = req.get("timeout")
        if (task.status is not None and task.status.finished) or timeout == 0:
            return {"ok": task.to_dict()}
        self.waiters.setdefault(task_id, []).append(conn)
        if isinstance(timeout, int | float) and timeout > 0:
            entry = (time.monotonic() + timeout, next(self._seq), task_id, conn)
            heapq.heappush(self.wait_timers, entry)
        return DEFERRED

    def _on_finish(self, task: QueueTask) -> None:
        conns = self.waiters.pop(task.id, None)
        if conns:
            reply = {"ok": task.to_dict()}
            for conn in conns:
                conn.reply(reply)

    def _task(self, task_id: str) -> QueueTask:
        task = self.broker.get(task_id)
        if task is None:
            raise TaskNotFound(f"task {task_id!r} not found")
        return task

    def _task_dict(self, task_id: str, must_exist: bool = True) -> dict[str, Any]:
        return self._task(task_id).to_dict()

    def status(self) -> dict[str, Any]:
        queues = self.broker.stats()
        for name, info in queues.items():
            info["workers"] = self.pool.describe(name)
        return {
            "pid": os.getpid(),
            "state": self.state.value,
            "config": str(self.config.path),
            "store": self.config.settings.store,
            "queues": queues,
        }


def _record_only(signum: int, frame: Any) -> None:
    """Signal handler: the wakeup fd already carries the number; do nothing here."""


def run(config: Config) -> int:
    sup = Supervisor(config)
    sup.serve_forever()
    return 0
