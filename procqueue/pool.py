"""The supervisor's worker pool: spawning, dispatch, outcomes, deaths.

Dispatch is credit based: a worker holds at most ``1 + prefetch`` tasks, so
with the default ``prefetch = 0`` a task goes only to an idle worker and a
short task never waits behind a long one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil  # type: ignore[import-untyped]

from . import wire
from .broker import Broker, QueueState
from .config import Config
from .ring import PeerGone
from .spawn import WorkerHandle, WorkerState, fork_worker
from .spinwait import poll_until
from .worker import EXIT_BOOT_ERROR

log = logging.getLogger("procqueue.supervisor")

BACKOFF_START, BACKOFF_MAX = 0.5, 30.0


@dataclass
class Slot:
    """One worker position of a queue (``queue#index``) and its restart history."""

    queue: str
    index: int
    worker: WorkerHandle | None = None
    failures: int = 0
    respawn_at: float | None = None
    last_error: str = ""


class WorkerPool:
    def __init__(
        self,
        config: Config,
        broker: Broker,
        selector: selectors.BaseSelector,
        close_in_child: Callable[[], None],
    ) -> None:
        self.config, self.broker, self.selector = config, broker, selector
        self._close_in_child = close_in_child
        self.slots: dict[str, list[Slot]] = {
            name: [Slot(name, i) for i in range(cfg.concurrency)]
            for name, cfg in config.queues.items()
        }
        self.by_pid: dict[int, WorkerHandle] = {}
        self.last_done: WorkerHandle | None = None  # the worker that reported an outcome last
        self._procs: dict[int, psutil.Process] = {}  # for CPU% between two status calls
        self.stopping = False
        self.reported: set[str] = set()  # boot errors already logged at ERROR
        self.publish_hook: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None

    # -- spawning --------------------------------------------------------------
    def start_all(self) -> None:
        for slots in self.slots.values():
            for slot in slots:
                self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        slot.respawn_at = None
        handle = fork_worker(self.config, slot.queue, slot.index, self._close_in_child)
        slot.worker = handle
        self.by_pid[handle.pid] = handle
        self.selector.register(
            handle.ep.sock, selectors.EVENT_READ, lambda mask, h=handle: self._on_doorbell(h)
        )
        log.debug("worker %s started, pid %d", handle.name, handle.pid)

    def close_in_child(self) -> None:
        for handle in self.by_pid.values():
            handle.ep.sock.close()

    def _on_doorbell(self, handle: WorkerHandle) -> None:
        if handle.ep.closed:  # reaped earlier in this same batch of events
            return
        try:
            handle.ep.drain_doorbell()
        except PeerGone:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(handle.ep.sock)

    # -- the sleep handshake -----------------------------------------------------
    def sleep_prepare(self) -> bool:
        """Tell every worker we are about to sleep; False if one already has news."""
        ok = True
        for handle in self.by_pid.values():
            if not handle.ep.closed and not handle.ep.sleep_prepare():
                ok = False
        return ok

    def spin(self, seconds: float) -> bool:
        """Poll the up rings for up to ``seconds``; True as soon as one has data.

        Only the rings of workers whose last task ran under ``seconds``: a
        longer task's outcome is not coming within the spin, and on busy cores
        each ``sched_yield`` lasts milliseconds, so spinning beside a worker
        on long tasks only takes a share of its core (measured: 6% of a core
        for 10 ms tasks); its doorbell wakes the loop instead.
        """
        end = time.perf_counter() + seconds
        rings = [
            h.ep.rx
            for h in self.by_pid.values()
            if h.inflight and not h.ep.closed and h.last_run < seconds
        ]
        return bool(rings) and poll_until(lambda: any(r.readable() for r in rings), end)

    def idle_last_done(self) -> int | None:
        """The pid of the worker that reported an outcome last, if it is alive
        and holds no task now (``CpuNudge.idle_worker``)."""
        handle = self.last_done
        if handle is None or handle.inflight or self.by_pid.get(handle.pid) is not handle:
            return None
        return handle.pid

    def sleep_done(self) -> None:
        for handle in self.by_pid.values():
            handle.ep.sleep_done()

    def flush(self) -> None:
        for handle in self.by_pid.values():
            if not handle.ep.closed:
                handle.ep.flush()

    # -- outcomes ------------------------------------------------------------------
    def collect(self) -> None:
        for handle in list(self.by_pid.values()):
            if handle.ep.closed and not handle.ep.rx.readable():
                continue
            frames = handle.ep.recv()
            if frames:
                self._on_frames(handle, frames)

    def _on_frames(self, handle: WorkerHandle, frames: list[bytes]) -> None:
        """A worker's frames, in order. Once its outcomes are applied, the task
        then at the head of its ring is taken to start now (for the hard time
        limit); run times come from the worker itself."""
        done = handle.tasks_done
        runs: list[tuple[Any, None, float]] = []  # successes with no result, applied together
        for frame in frames:
            if frame[0] == wire.OP_DONE_EMPTY:  # the common case, without a call more
                seconds, task_id = wire.decode_done_empty(frame)
                task = self._pop_head(handle, task_id, seconds)
                if task is not None:
                    runs.append((task, None, seconds))
            else:
                if runs:  # outcomes are applied in the order the worker sent them
                    self.broker.succeed_all(runs)
                    runs = []
                self._on_frame(handle, frame)
        if runs:
            self.broker.succeed_all(runs)
        if handle.tasks_done != done:
            self.last_done = handle
            now = time.monotonic()
            self._start_head(handle, now)
            if handle.recycles:
                self._maybe_recycle(handle, now)

    def _on_frame(self, handle: WorkerHandle, frame: bytes) -> None:
        op = frame[0]
        if op == wire.OP_DONE:
            task_id, result, seconds = wire.decode(frame)
            task = self._pop_head(handle, task_id, seconds)
            if task is not None:
                self.broker.succeed(task, result, seconds)
        elif op == wire.OP_FAILED:
            task_id, _code, message, retry, seconds, *_ = wire.decode(frame)
            task = self._pop_head(handle, task_id, seconds)
            if task is not None:
                status = self.broker.fail(task, message, retry, seconds)
                log.info(
                    "task %s (%s/%s) attempt %d failed (%s): %s",
                    task.id,
                    task.queue,
                    task.type,
                    task.attempt,
                    status,
                    message,
                )
        elif op == wire.OP_PUBLISH:
            self._on_publish(handle, wire.decode(frame))
        elif op == wire.OP_BOOTED:
            handle.set_state(WorkerState.IDLE)
            self.reported.clear()
            log.info("worker %s (pid %d) ready", handle.name, handle.pid)
        elif op == wire.OP_BOOT_ERROR:
            handle.boot_error = wire.decode(frame)["error"]

    def _pop_head(self, handle: WorkerHandle, task_id: str, seconds: float) -> Any:
        """The task a worker reported on, having run ``seconds``: the head of
        what it holds."""
        handle.last_run = seconds  # WorkerPool.spin: is the next outcome near?
        inflight = handle.inflight
        if not inflight or inflight[0].id != task_id:
            log.error("worker %s reported task %s it was not running", handle.name, task_id)
            return None
        handle.tasks_done += 1
        return inflight.popleft()

    def _maybe_recycle(self, handle: WorkerHandle, now: float) -> None:
        """Replace a worker that ran its quota of tasks or grew past its memory limit."""
        cfg = handle.qconfig
        if handle.state is WorkerState.RETIRING:
            return
        if cfg.max_tasks_per_child and handle.tasks_done >= cfg.max_tasks_per_child:
            self.retire(handle, f"recycled after {handle.tasks_done} tasks")
        elif cfg.max_memory_per_child and now - handle.rss_checked_at >= 0.5:
            handle.rss_checked_at = now
            rss = _rss(handle.pid) or 0
            if rss > cfg.max_memory_per_child:
                self.retire(
                    handle,
                    f"recycled: RSS {rss >> 20} MiB above "
                    f"max_memory_per_child {cfg.max_memory_per_child >> 20} MiB",
                )

    def retire(self, handle: WorkerHandle, reason: str) -> None:
        """Stop a worker after the tasks it holds, and start its replacement now."""
        handle.set_state(WorkerState.RETIRING)
        handle.retire_reason = reason
        if self.broker.metrics is not None and reason.startswith("recycled"):
            self.broker.metrics.worker_died(handle.queue, "recycled")
        handle.ep.send(wire.encode(wire.OP_STOP, None))
        log.info("worker %s (pid %d) retiring: %s", handle.name, handle.pid, reason)
        slots = self.slots.get(handle.queue, [])
        slot = next((s for s in slots if s.worker is handle), None)
        if slot is not None and not self.stopping:
            slot.worker = None
            self._spawn(slot)

    def _start_head(self, handle: WorkerHandle, now: float) -> None:
        """The task now at the head of a worker's ring starts running now."""
        if not handle.inflight:
            handle.deadline = None
            if handle.state is WorkerState.BUSY:
                handle.set_state(WorkerState.IDLE)
            return
        handle.started_at = now
        limit = self._limit(handle.inflight[0], handle)
        grace = handle.qconfig.kill_grace
        handle.deadline = now + limit + grace if limit > 0 else None

    def _limit(self, task: Any, handle: WorkerHandle) -> float:
        return float(task.timeout or handle.qconfig.timeout)

    def _on_publish(self, handle: WorkerHandle, body: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"rid": body.get("rid")}
        try:
            assert self.publish_hook is not None
            reply["ok"] = self.publish_hook(body.get("tasks") or [])
        except Exception as exc:
            from .errors import InternalError, ProcQueueError

            err = exc if isinstance(exc, ProcQueueError) else InternalError(str(exc))
            reply["error"] = err.to_dict()
        handle.ep.send(wire.encode(wire.OP_REPLY, reply))

    # -- dispatch --------------------------------------------------------------------
    def dispatch(self) -> None:
        for state in self.broker.queues.values():
            if state.ready:
                self._dispatch_queue(state)

    def _dispatch_queue(self, state: QueueState) -> None:
        """Deal ready tasks to the queue's workers, least loaded first, an even
        share each, until each holds ``1 + prefetch``; one frame per worker."""
        limit = 1 + state.config.prefetch
        workers = [
            h
            for s in self.slots.get(state.name, ())
            if (h := s.worker) is not None and h.state in _ACCEPTING and len(h.inflight) < limit
        ]
        workers.sort(key=_load)
        now = time.monotonic()
        for left, handle in zip(range(len(workers), 0, -1), workers, strict=True):
            share = min(limit - len(handle.inflight), -(-len(state.ready) // left))  # ceil
            tasks = self.broker.take_many(state, share)
            if not tasks:
                return
            handle.ep.send(wire.encode_tasks(tasks, handle.qconfig.timeout))
            was_idle = not handle.inflight
            handle.inflight.extend(tasks)
            if was_idle:
                handle.set_state(WorkerState.BUSY)
                self._start_head(handle, now)

    # -- deaths ------------------------------------------------------------------------
    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = self.by_pid.pop(pid, None)
            self._procs.pop(pid, None)
            if handle is not None:
                self._on_exit(handle, status)

    def _on_exit(self, handle: WorkerHandle, status: int) -> None:
        frames = handle.ep.recv()  # outcomes it sent just before it died
        if frames:
            self._on_frames(handle, frames)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(handle.ep.sock)
        handle.ep.close()
        handle.set_state(WorkerState.DEAD)
        how = _describe_exit(status)
        self._settle_inflight(handle, how, clean=os.waitstatus_to_exitcode(status) == 0)
        slot = (
            self.slots[handle.queue][handle.index]
            if handle.index < len(self.slots.get(handle.queue, []))
            else None
        )
        if slot is None or slot.worker is not handle:
            return
        slot.worker = None
        self._after_death(slot, handle, status, how)

    def _settle_inflight(self, handle: WorkerHandle, how: str, clean: bool) -> None:
        if not handle.inflight:
            return
        if clean:  # a worker exits 0 only between tasks: what it held never started
            while handle.inflight:
                self.broker.give_back(handle.inflight.pop())
            return
        running = handle.inflight.popleft()
        reason = handle.killed_for or f"worker {handle.name} (pid {handle.pid}) died: {how}"
        status = self.broker.fail(running, reason, True, time.monotonic() - handle.started_at)
        if self.broker.metrics is not None:
            self.broker.metrics.worker_died(
                handle.queue, "timeout" if handle.killed_for else "crash"
            )
        log.warning(
            "task %s (%s/%s): %s; now %s", running.id, running.queue, running.type, reason, status
        )
        while handle.inflight:  # prefetched, never started: back in line, uncharged
            self.broker.give_back(handle.inflight.pop())

    def _after_death(self, slot: Slot, handle: WorkerHandle, status: int, how: str) -> None:
        if self.stopping:
            log.info("worker %s (pid %d) exited: %s", handle.name, handle.pid, how)
            return
        # It never said "booted": its handlers fail to import, or it crashes at start.
        boot_failed = (
            os.waitstatus_to_exitcode(status) == EXIT_BOOT_ERROR
            or handle.state is WorkerState.STARTING
        )
        if not boot_failed:
            slot.failures = 0
            log.warning("worker %s (pid %d) %s; starting a new one", handle.name, handle.pid, how)
            self._spawn(slot)
            return
        slot.failures += 1
        if self.broker.metrics is not None:
            self.broker.metrics.worker_died(handle.queue, "boot")
        slot.last_error = handle.boot_error or f"worker exited at start: {how}"
        delay = min(BACKOFF_MAX, BACKOFF_START * 2 ** (slot.failures - 1))
        slot.respawn_at = time.monotonic() + delay
        first = slot.last_error not in self.reported  # the same error is told once, loudly
        self.reported.add(slot.last_error)
        log.log(
            logging.ERROR if first else logging.INFO,
            "worker %s cannot start (%d in a row): %s; next try in %.1fs",
            handle.name,
            slot.failures,
            slot.last_error if first else "same error",
            delay,
        )

    # -- timers ------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        times = [h.deadline for h in self.by_pid.values() if h.deadline is not None]
        if not self.stopping:
            times += [
                s.respawn_at for ss in self.slots.values() for s in ss if s.respawn_at is not None
            ]
        return min(times) if times else None

    def check_deadlines(self, now: float) -> None:
        for handle in list(self.by_pid.values()):
            if handle.deadline is not None and now >= handle.deadline and handle.inflight:
                self._hard_kill(handle)
        if self.stopping:
            return
        for slots in self.slots.values():
            for slot in slots:
                if slot.respawn_at is not None and now >= slot.respawn_at:
                    self._spawn(slot)

    def _hard_kill(self, handle: WorkerHandle) -> None:
        task = handle.inflight[0]
        limit = self._limit(task, handle)
        handle.killed_for = (
            f"timeout: task ran past its time limit of {limit:g}s and ignored the "
            f"soft timeout; worker {handle.name} (pid {handle.pid}) was killed"
        )
        handle.deadline = None
        log.warning("task %s (%s/%s): %s", task.id, task.queue, task.type, handle.killed_for)
        with contextlib.suppress(ProcessLookupError):
            os.kill(handle.pid, signal.SIGKILL)

    # -- stopping and resizing -----------------------------------------------------------
    def terminate_all(self) -> None:
        """Graceful: each worker finishes its current task, then exits."""
        for handle in self.by_pid.values():
            handle.set_state(WorkerState.RETIRING)
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGTERM)

    def kill_all(self, wait: bool = True) -> None:
        self.stopping = True
        for handle in self.by_pid.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)
        if wait:
            deadline = time.monotonic() + 5.0
            while self.by_pid and time.monotonic() < deadline:
                for pid, handle in list(self.by_pid.items()):
                    with contextlib.suppress(ChildProcessError):
                        done, status = os.waitpid(pid, 0)
                        if done:
                            del self.by_pid[pid]
                            self._on_exit(handle, status)

    def resize(self, delta: int) -> None:
        """SIGTTIN / SIGTTOU: one worker more or fewer for every queue (at least one)."""
        for name, slots in self.slots.items():
            if delta > 0:
                slot = Slot(name, len(slots))
                slots.append(slot)
                self._spawn(slot)
            elif len(slots) > 1:
                slot = slots.pop()
                if slot.worker is not None:
                    self.retire(slot.worker, "fewer workers (SIGTTOU)")
            log.info("queue %s: %d worker(s)", name, len(slots))

    def reconfigure(self, config: Config) -> None:
        """Reload: every worker retires after what it holds; new ones import fresh code."""
        self.config = config
        self.reported.clear()
        old = [s.worker for slots in self.slots.values() for s in slots if s.worker]
        self.slots = {
            name: [Slot(name, i) for i in range(cfg.concurrency)]
            for name, cfg in config.queues.items()
        }
        for handle in old:
            self.retire(handle, "reload")
        self.start_all()

    # -- looking -----------------------------------------------------------------------
    def alive(self) -> int:
        return len(self.by_pid)

    def running(self) -> int:
        return sum(1 for h in self.by_pid.values() if h.inflight)

    def describe(self, queue: str) -> list[dict[str, Any]]:
        """Every worker position of a queue, plus workers still retiring."""
        out: list[dict[str, Any]] = []
        slots = self.slots.get(queue, [])
        for slot in slots:
            if slot.worker is None:
                state = "crashing" if slot.failures else "dead"
                out.append(
                    {
                        "name": f"{queue}#{slot.index}",
                        "pid": None,
                        "state": state,
                        "error": slot.last_error,
                        "task_id": None,
                        "rss": None,
                    }
                )
            else:
                out.append(self._describe_worker(slot.worker))
        current = {s.worker for s in slots}
        out += [
            self._describe_worker(h)
            for h in self.by_pid.values()
            if h.queue == queue and h not in current
        ]
        return out

    def _describe_worker(self, handle: WorkerHandle) -> dict[str, Any]:
        head = handle.inflight[0] if handle.inflight else None
        proc = self._procs.get(handle.pid)
        if proc is None:
            proc = self._procs[handle.pid] = psutil.Process(handle.pid)
        try:
            rss, cpu = int(proc.memory_info().rss), proc.cpu_percent(None)
        except psutil.Error:
            rss, cpu = None, None
        return {
            "name": handle.name,
            "pid": handle.pid,
            "state": handle.state.value,
            "task_id": head.id if head else None,
            "running_for": round(time.monotonic() - handle.started_at, 3) if head else None,
            "tasks_done": handle.tasks_done,
            "rss": rss,
            "cpu_percent": cpu,
            "retire_reason": handle.retire_reason or None,
        }


_ACCEPTING = frozenset((WorkerState.IDLE, WorkerState.BUSY))


def _load(handle: WorkerHandle) -> int:
    return len(handle.inflight)


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(sig).name}"
        return f"killed by signal {sig}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def _rss(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None
