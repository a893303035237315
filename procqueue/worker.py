"""The worker process: imports its queue's handlers after the fork, runs tasks.

A worker is a stateless executor. It takes task frames from its down ring,
runs one task at a time, reports each outcome on its up ring and sleeps on
the doorbell when there is nothing to do. Killing it loses nothing: the
supervisor owns every task and charges or re-queues what the worker held.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import gc
import importlib
import inspect
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import orjson
import setproctitle

from . import wire
from .config import Config
from .context import Context
from .errors import (
    InternalError,
    InvalidQueuePayload,
    ProcQueueError,
    TaskHandlerNotFound,
    TaskTimeout,
    error_from_dict,
)
from .ring import Endpoint, PeerGone
from .task import QueueTask

log = logging.getLogger("procqueue.worker")

EXIT_BOOT_ERROR = 3  # handlers failed to import: the supervisor backs off before a new try
# Poll the ring this long after a short task before sleeping on the doorbell.
# A client that publishes its next task as soon as it has the last one's result
# does so ~0.15-0.3 ms later here; a worker still polling then starts it without
# being woken (waking a process on an idle vCPU costs tens of us here): publish
# -> handler start p50 112 -> 83 us, Client.run 173 -> 138 us measured side by
# side against 50 us. Not longer: with two vCPUs and three processes in a
# request/reply loop, a poll that outlasts the gap holds a core the others need
# (250 against 500 us, five alternations of the benchmark's latency section on
# 12-06: publish + wait 210-218 against 231-244 us, Client.run 166-169 against
# 182-212, handler start 92-132, four of five under 102, against 132-135;
# 200-350 us alike; no-op throughput the same, prefetch 0 and 64). The poll
# yields the core each turn, and ends: an idle worker sleeps.
SPIN_SECONDS = 250e-6
# After a longer task, only this long (as before the longer poll): the next
# one is not that close, and a polling worker keeps its vCPU looking busy to a
# supervisor woken to hand out the next task. On 10 ms CPU-bound tasks, 50 us,
# 500 us and this rule measured the same within the noise (0.78-0.85x of the
# bare-fork ceiling in one sitting, side by side).
SPIN_AFTER_LONG_TASK = 50e-6
LONG_TASK = 1e-3
PR_SET_PDEATHSIG = 1
MAX_RESULT_BYTES = 1 << 20
DEFAULT_GC_THRESHOLDS = (700, 10, 10)  # CPython's

Handler = Callable[[Context, QueueTask], Any]


class _Stop(Exception):
    """The supervisor asked this worker to exit after its current task."""


class Worker:
    def __init__(self, config: Config, queue: str, index: int, ep: Endpoint, parent: int) -> None:
        self.config, self.queue, self.index, self.ep = config, queue, index, ep
        self.parent = parent
        self.name = f"{queue}#{index}"
        self._title_prefix = f"procqueue: worker {self.name} "  # + the state
        self._busy_title = self._title_prefix + "busy "  # + the task id
        self._idle_title = self._title_prefix + "idle"
        self._short_title = self._title_prefix + "busy (short tasks)"
        self._title_now = ""  # the title last set (see _title_task)
        self.handlers: dict[str, Handler] = {}
        self.functions: dict[str, Callable[..., Any]] = {}  # Pool.run targets, resolved once
        self.backlog: collections.deque[bytes] = collections.deque()  # frames read early
        # Tasks of the last task frame not run yet: they come before any later frame.
        self.tasks: collections.deque[tuple[QueueTask, float]] = collections.deque()
        self.stopping = False
        self.last_run = 0.0  # seconds the last task ran: how long to poll for the next
        self.loop: asyncio.AbstractEventLoop | None = None
        self._rid = 0

    # -- boot --------------------------------------------------------------
    def boot(self) -> None:
        for entry in reversed(self.config.settings.pythonpath):
            if str(entry) not in sys.path:
                sys.path.insert(0, str(entry))
        self._set_title(self._idle_title)
        cfg = self.config.queues[self.queue]
        try:
            for ttype, target in cfg.handlers.items():
                self.handlers[ttype] = load_handler(target)
        except Exception as exc:
            msg = f"queue {self.queue!r}: cannot load handler: {_describe(exc)}"
            self.ep.send(wire.encode(wire.OP_BOOT_ERROR, {"error": msg}))
            self.ep.flush()
            os._exit(EXIT_BOOT_ERROR)
        self.ep.send(wire.encode(wire.OP_BOOTED, {"pid": os.getpid()}))
        self.ep.flush()

    # -- main loop ---------------------------------------------------------
    def serve(self) -> NoReturn:
        try:
            while not (self.stopping or _terminated):
                if self.tasks:
                    self._run(*self.tasks.popleft())
                    continue
                frame = self._next_frame()
                if frame is not None:
                    self._on_frame(frame)
        except (PeerGone, _Stop):
            pass
        os._exit(0)

    def _next_frame(self) -> bytes | None:
        if not self.backlog:
            self.backlog.extend(self.ep.recv())
        if self.backlog:
            return self.backlog.popleft()
        self.ep.flush()
        if not self.ep.spin(poll_seconds(self.last_run)):
            self._set_title(self._idle_title)  # only before a real sleep: a title is a system call
            self.ep.wait(1.0)
            if os.getppid() != self.parent:
                raise PeerGone("supervisor is gone")
        return None

    def _on_frame(self, frame: bytes) -> None:
        op = frame[0]
        if op in wire.TASK_OPS:
            self.tasks.extend(wire.decode_tasks(frame))
        elif op == wire.OP_STOP:
            raise _Stop()
        else:
            log.warning("worker %s: unexpected frame %r", self.name, bytes(frame[:1]))

    def _run(self, task: QueueTask, limit: float) -> None:
        self._title_task(task)
        deadline = time.time() + limit if limit > 0 else None
        ctx = Context(task, deadline, self.name, self._publish)
        start = time.perf_counter()
        try:
            result = self._call(task, ctx, limit)
        except BaseException as exc:  # every failure is reported; SystemExit also ends us
            if not isinstance(exc, Exception):
                self.stopping = True
            self.last_run = time.perf_counter() - start
            self.ep.send(wire.encode(wire.OP_FAILED, _failure(task, exc, self.last_run)))
        else:
            self.last_run = time.perf_counter() - start
            self.ep.send(self._done_frame(task, result, self.last_run))
        self.ep.flush()

    def _done_frame(self, task: QueueTask, result: Any, seconds: float) -> bytes:
        if result is None:
            return wire.encode_done_empty(task.id, seconds)
        if task.type != wire.CALL_TYPE:  # a handler's result is kept only if it fits
            return wire.encode(wire.OP_DONE, [task.id, _keepable(result), seconds])
        try:  # a function's result is what the caller waits for: it must travel
            return wire.encode(wire.OP_DONE, [task.id, result, seconds])
        except TypeError as exc:
            error = InvalidQueuePayload(f"the function's result is not JSON-serialisable: {exc}")
            return wire.encode(wire.OP_FAILED, [task.id, error.code, error.message, False, seconds])

    def _call(self, task: QueueTask, ctx: Context, limit: float) -> Any:
        handler = self.handlers.get(task.type)
        if handler is None and task.type == wire.CALL_TYPE:
            handler = self._run_function
        if handler is None:
            raise TaskHandlerNotFound(
                f"no handler for task type {task.type!r} in queue {task.queue!r}"
            )
        if limit > 0:
            signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            result = handler(ctx, task)
            if result is not None and inspect.isawaitable(result):
                result = self._event_loop().run_until_complete(result)
            return result
        finally:
            if limit > 0:
                signal.setitimer(signal.ITIMER_REAL, 0)

    def _run_function(self, ctx: Context, task: QueueTask) -> Any:
        """``procqueue.Pool.run`` / ``map``: a function named by import path."""
        call = orjson.loads(task.payload or b"{}")
        target = call["fn"]
        fn = self.functions.get(target)
        if fn is None:
            fn = self.functions[target] = load_callable(target)
        if "chunk" in call:
            return [fn(item) for item in call["chunk"]]
        return fn(*call.get("args", ()), **call.get("kwargs", {}))

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        return self.loop

    # -- ctx.publish: a request/reply over the channel -----------------------
    def _publish(self, tasks: list[QueueTask]) -> list[QueueTask]:
        self._rid += 1
        rid = self._rid
        self.ep.send(
            wire.encode(wire.OP_PUBLISH, {"rid": rid, "tasks": [t.to_dict() for t in tasks]})
        )
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            self.ep.flush()
            for frame in self.ep.recv():
                if frame[0] == wire.OP_REPLY and wire.decode(frame)["rid"] == rid:
                    return _reply_tasks(wire.decode(frame))
                self.backlog.append(frame)
            self.ep.wait(0.5)
        raise InternalError(f"worker {self.name}: no reply from the supervisor to publish")

    def _title_task(self, task: QueueTask) -> None:
        """Name the task in the title, unless it is one of a run of short ones.

        A title costs a system call (``prctl(PR_SET_NAME)``): naming every task
        cost ~2 us of the daemon's CPU per no-op task (13.15 -> 11.15 us and
        1.06x tasks/s over 16 paired runs with this rule). A task started from
        idle or after one of ``LONG_TASK`` or more is named, as a title is read
        by people, and a task they can see run costs more than the call; in a
        run of shorter tasks the title
        says ``busy (short tasks)``, set once for the run, so that it never
        names a task already done. ``procqueue status`` names each worker's
        current task in every case.
        """
        if self._title_now == self._idle_title or self.last_run >= LONG_TASK:
            self._set_title(self._busy_title + task.id)
        elif self._title_now != self._short_title:
            self._set_title(self._short_title)

    def _set_title(self, title: str) -> None:
        setproctitle.setproctitle(title)
        self._title_now = title


def poll_seconds(last_run: float) -> float:
    """How long a worker polls its ring for the next task after one that ran
    ``last_run`` seconds, before it sleeps on the doorbell."""
    return SPIN_SECONDS if last_run < LONG_TASK else SPIN_AFTER_LONG_TASK


def _reply_tasks(reply: dict[str, Any]) -> list[QueueTask]:
    if "error" in reply:
        raise error_from_dict(reply["error"])
    return [QueueTask.from_dict(t) for t in reply["ok"]]


def load_handler(target: str) -> Handler:
    """Import ``package.module:attr.path`` and return the handler."""
    handler: Handler = load_callable(target)
    return handler


def load_callable(target: str) -> Callable[..., Any]:
    """Import ``package.module:attr.path`` and return the callable."""
    module_name, _, attr_path = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    fn: Callable[..., Any] = obj
    return fn


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(exc)).strip()


def _failure(task: QueueTask, exc: BaseException, seconds: float) -> list[Any]:
    """The F frame body: [id, code, message, retry, seconds, traceback?]."""
    if isinstance(exc, TaskTimeout):
        return [task.id, exc.code, f"timeout: {exc.message}", True, seconds]
    if isinstance(exc, TaskHandlerNotFound):
        return [task.id, exc.code, exc.message, False, seconds]
    code = exc.code if isinstance(exc, ProcQueueError) else 0
    tb = traceback.format_exception(exc)
    return [task.id, code, _describe(exc), True, seconds, "".join(tb[-6:])]


def _keepable(result: Any) -> Any:
    """A handler's return value if JSON-serialisable and not too large, else None."""
    if result is None:
        return None
    try:
        raw = orjson.dumps(result)
    except TypeError:
        return None
    return result if len(raw) <= MAX_RESULT_BYTES else None


def _on_alarm(signum: int, frame: Any) -> None:
    raise TaskTimeout("the task ran past its time limit")


_terminated = False


def _on_term(signum: int, frame: Any) -> None:
    # Only record: the current task finishes, then the loop sees the flag.
    global _terminated
    _terminated = True


def prepare_process(parent: int) -> None:
    """Signal set-up in the fresh child: called right after the fork."""
    signal.set_wakeup_fd(-1)
    gc.set_threshold(*DEFAULT_GC_THRESHOLDS)  # the supervisor's tuning is not for user code
    for sig in (signal.SIGHUP, signal.SIGCHLD, signal.SIGTTIN, signal.SIGTTOU, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGALRM, _on_alarm)
    _die_with_parent()
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(0)


def _die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` when our parent dies (SIGKILL: even mid-task in C code)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the doorbell EOF and the getppid check still notice


def worker_main(config: Config, queue: str, index: int, ep: Endpoint, parent: int) -> NoReturn:
    worker = Worker(config, queue, index, ep, parent)
    worker.boot()
    worker.serve()
