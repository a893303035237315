"""``procqueue.Pool``: the supervisor/worker engine inside a Python program.

``with procqueue.Pool() as pool:`` forks a supervisor from the calling
process (so the workers see every module the program has imported, its
``__main__`` included) and talks to it over a private control socket.
``pool.run(fn, *args)`` returns at once with a ``Task`` handle; functions
travel by import path and arguments and results as JSON, never as pickle.

Throughput comes from pipelining: ``run`` only queues the call; a sender
thread ships everything queued so far as one publish, and a reader thread
resolves handles from the ``done`` events the supervisor pushes. A call made
while none is outstanding is sent by ``run`` itself: waking the sender for
it made the caller and that thread trade the GIL and a core at the moment
the call's outcome was due. The fork happens in ``start()``, before those
threads exist.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import enum
import itertools
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from .client import Client
from .config import Config, config_from_dict, load_config
from .control import FRAME, encode_frame
from .errors import (
    DaemonUnavailable,
    InvalidQueuePayload,
    InvalidTaskHandler,
    QueueFull,
    TaskFailed,
    TaskNotFound,
    error_from_dict,
)
from .spinwait import REPLY_SPIN, readable_within
from .task import ID_COUNTER_BASE, QueueTask, new_id_prefix
from .wire import CALL_TYPE

QUEUE = "default"
# Pool()'s own queue lets a busy worker hold 4 more calls: small calls then pipeline
# (~3x the throughput of prefetch 0) while a long call delays at most 4 others.
# Give Pool a config with prefetch = 0 for long calls of uneven length.
DEFAULT_PREFETCH = 4


class TaskStatus(enum.IntEnum):
    """The reference's ``TaskStatus``: queued, running, finished."""

    QUEUE = 0
    RUNNING = 1
    FINISH = 2


class Task:
    """A handle on one ``pool.run`` call."""

    def __init__(self, pool: Pool, task_id: str) -> None:
        self.id, self._pool = task_id, pool
        self._done = False  # set by the reader thread under the pool's ``_results`` lock
        self._ok = False
        self._value: Any = None
        self._error = ""

    def _finish(self, ok: bool, value: Any, error: str) -> None:
        """Record the outcome; the caller holds the pool's ``_results`` condition."""
        self._ok, self._value, self._error = ok, value, error
        self._done = True

    def done(self) -> bool:
        return self._done

    @property
    def status(self) -> TaskStatus:
        if self._done:
            return TaskStatus.FINISH
        running = self._pool._task_state(self.id) == "running"
        return TaskStatus.RUNNING if running else TaskStatus.QUEUE

    @property
    def err(self) -> TaskFailed | None:
        """The error of a finished, failed call (None while running or on success)."""
        if self._done and not self._ok:
            return TaskFailed(self._error or "task failed")
        return None

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the call and return its result; raise ``TaskFailed`` if it failed."""
        if not self._done and self._pool._outbox:
            self._pool._send_outbox()
        if not self._done and not self._pool._wait_for(self, timeout):
            raise TimeoutError(f"task {self.id} did not finish within {timeout}s")
        if not self._ok:
            raise TaskFailed(self._error or "task failed")
        return self._value


def function_path(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of a module-level function, or InvalidTaskHandler."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or not qualname or "<" in qualname:
        raise InvalidTaskHandler(
            f"{fn!r} cannot be named by import path: pass a module-level function "
            "(no lambda, no nested function)"
        )
    return f"{module}:{qualname}"


class Pool:
    """A better ``ProcessPoolExecutor``: queues, retries, time limits and cron.

    ``config`` may be None (a memory store and a queue ``default`` with one
    worker per core), a path to a procqueue TOML config, or a ``Config``.
    ``run`` and ``map`` use the queue named ``default``.
    """

    def __init__(
        self,
        config: str | os.PathLike[str] | Config | None = None,
        *,
        workers: int | None = None,
        spin: float = REPLY_SPIN,
    ) -> None:
        self.spin = spin  # Task.result polls this long before it sleeps (procqueue.spinwait)
        self._dir = Path(tempfile.mkdtemp(prefix="pqpool", dir="/tmp"))
        self.config = self._embedded_config(config, workers)
        self._pid = 0
        self._sock: socket.socket | None = None
        self._pending: dict[str, Task] = {}
        self._outbox: collections.deque[dict[str, Any]] = collections.deque()
        self._batches: collections.deque[list[dict[str, Any]]] = collections.deque()
        self._wake = threading.Condition()
        self._send_lock = threading.Lock()
        self._results = threading.Condition()
        self._reader_nap = threading.Condition()  # the reader sleeps here while others read
        self._read_lock = threading.Lock()  # held by the one thread reading the socket
        self._inbuf = bytearray()
        self._waiting = 0  # threads inside Task.result
        self._eof = False
        self._resend_at = 0.0  # one for all handles: no Event per task
        # Task ids: random per pool + a counter; next() on a count is atomic, so
        # threads calling run() at once never share an id (uuid4 would cost a
        # getrandom per call, and that call releases the GIL).
        self._id_prefix, self._ids = new_id_prefix(), itertools.count(ID_COUNTER_BASE + 1)
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._client: Client | None = None
        self._client_lock = threading.Lock()

    def _embedded_config(self, config: Any, workers: int | None) -> Config:
        socket_path = str(self._dir / "pool.sock")
        if isinstance(config, Config):
            raw = dict(config.raw)
            path: Any = config.path
        elif config is not None:
            loaded = load_config(config)
            raw, path = dict(loaded.raw), loaded.path
        else:
            count = workers or os.cpu_count() or 1
            raw = {
                "procqueue": {"store": "memory"},
                "queues": {
                    QUEUE: {
                        "concurrency": count,
                        "buffer_size": 1 << 30,
                        "prefetch": DEFAULT_PREFETCH,
                    }
                },
            }
            path = self._dir / "pool.toml"
        settings = dict(raw.get("procqueue", {}))
        settings["socket"] = socket_path
        queues = {name: dict(table) for name, table in raw.get("queues", {}).items()}
        if QUEUE in queues:  # the embedding program trusts its own functions
            queues[QUEUE]["allow_calls"] = True
            if workers:
                queues[QUEUE]["concurrency"] = workers
        return config_from_dict({**raw, "procqueue": settings, "queues": queues}, path)

    # -- lifecycle ------------------------------------------------------------
    def __enter__(self) -> Pool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Pool:
        if self._pid:
            return self
        self._pid = _fork_supervisor(self.config)
        self._sock = self._connect()
        self._wait_for_workers()
        for target in (self._send_loop, self._read_loop):
            thread = threading.Thread(
                target=target, name=f"procqueue-pool-{target.__name__}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _connect(self, timeout: float = 30.0) -> socket.socket:
        deadline = time.monotonic() + timeout
        path = str(self.config.settings.socket)
        while True:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
            if pid:
                raise DaemonUnavailable(f"the pool's supervisor exited ({status:#x})")
            with contextlib.suppress(OSError):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(path)
                    return sock
                except OSError:
                    sock.close()
                    raise
            if time.monotonic() > deadline:
                raise DaemonUnavailable(f"the pool's supervisor did not start within {timeout}s")
            time.sleep(0.005)

    def _wait_for_workers(self, timeout: float = 30.0) -> None:
        """Return once every worker has imported its handlers (or is crashing)."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                queues = client.status()["queues"].values()
                states = {w["state"] for q in queues for w in q["workers"]}
                if states <= {"idle", "busy", "crashing"}:
                    return
                time.sleep(0.005)
        raise DaemonUnavailable(f"the pool's workers did not start within {timeout}s")

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers (running calls finish) and the supervisor."""
        if not self._pid:
            return
        self._closing = True
        with self._wake:
            self._wake.notify_all()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGTERM)
        _wait_or_kill(self._pid, timeout)
        self._pid = 0
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        for thread in self._threads:
            thread.join(5)
        if self._client is not None:
            self._client.close()
        with self._results:
            for task in list(self._pending.values()):
                task._finish(False, None, "the pool was closed before the task finished")
            self._pending.clear()
            self._results.notify_all()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- the API ------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Task:
        """Run ``fn(*args, **kwargs)`` in a worker of the queue ``default``."""
        return self._submit({"fn": function_path(fn), "args": args, "kwargs": kwargs})

    def map(
        self,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any],
        *,
        chunksize: int = 1,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """``fn`` over every item, results in order; ``chunksize`` items per task."""
        target = function_path(fn)
        chunks = _chunks(iterable, max(1, chunksize))
        window: collections.deque[Task] = collections.deque()
        ahead = 16 * self.config.queues[QUEUE].concurrency + 16  # chunks in flight
        for chunk in chunks:  # stream: submit ahead, yield in order as results come
            window.append(self._submit({"fn": target, "chunk": chunk}))
            if len(window) >= ahead:
                yield from window.popleft().result(timeout)
        while window:
            yield from window.popleft().result(timeout)

    def publish(self, task: QueueTask) -> QueueTask:
        """Publish a task to any queue of the pool, as ``Client.publish`` does."""
        with self._client_lock:
            if self._client is None:
                self._client = Client(self.config.settings.socket)
            return self._client.publish(task)

    def client(self) -> Client:
        """A new client of this pool's supervisor (for status, wait, cron ...)."""
        return Client(self.config.settings.socket)

    def _task_state(self, task_id: str) -> str:
        with self._client_lock:
            if self._client is None:
                self._client = Client(self.config.settings.socket)
            try:
                return str(self._client.get_task(task_id).status)
            except TaskNotFound:  # still in the outbox: not sent yet
                return "pending"

    # -- pipelining ----------------------------------------------------------------
    def _submit(self, call: dict[str, Any]) -> Task:
        if not self._pid or self._closing:
            raise DaemonUnavailable("the pool is not running: use it inside `with Pool() as pool`")
        try:
            payload = orjson.dumps(call)
        except TypeError as exc:
            raise InvalidQueuePayload(f"arguments must be JSON-serialisable: {exc}") from None
        task = Task(self, f"{self._id_prefix}{next(self._ids)}")
        # Nothing outstanding: a lone call (``run(f).result()``), sent from here
        # (Pool(1).run().result() p50 134 -> 110 us here). A call made while
        # others are outstanding is one of many: the sender thread batches them.
        lone = not self._pending
        self._pending[task.id] = task
        entry = {
            "id": task.id,
            "queue": QUEUE,
            "type": CALL_TYPE,
            "payload": base64.b64encode(payload).decode(),
        }
        with self._wake:
            self._outbox.append(entry)
            if not lone:
                self._wake.notify()
        if lone:
            self._send_outbox()
        return task

    def _send_loop(self) -> None:
        """Ship everything queued so far as one publish; never wait for replies."""
        while not self._closing:
            with self._wake:
                while not self._outbox and not self._closing:
                    self._wake.wait()
            pause = self._resend_at - time.monotonic()
            if pause > 0:  # a full queue pushed back: give the workers a moment
                time.sleep(pause)
            if not self._send_outbox():
                return

    def _send_outbox(self) -> bool:
        """Send the queued calls as one publish (also called by ``Task.result``, so a
        lone ``run(...).result()`` does not wait for the sender thread to wake)."""
        assert self._sock is not None
        with self._send_lock:  # batches go on the wire in the order of ``_batches``
            with self._wake:
                batch = list(self._outbox)
                self._outbox.clear()
            if not batch:
                return True
            self._batches.append(batch)
            request = {"op": "publish", "tasks": batch, "notify": True, "brief": "count"}
            try:
                self._sock.sendall(encode_frame(request))
            except OSError:
                return False
        return True

    # -- reading: leader/follower ------------------------------------------------
    # A thread waiting in ``Task.result`` reads the socket itself (it wakes
    # straight from ``select`` on its own event, no hand-off through another
    # thread); the background reader only reads while nobody waits, so that
    # handles still resolve and the socket never fills up.

    def _read_loop(self) -> None:
        while not self._eof:
            if self._waiting:
                # Nap on a condition of its own, not on ``_results``: woken by every
                # outcome, this thread took the GIL from the very thread the
                # outcome was for (Pool(1).run().result() p50 106 -> 85 us, p99
                # 237 -> 171). It looks again within 50 ms of the last waiter.
                with self._reader_nap:
                    self._reader_nap.wait(0.05)
                continue
            self._read_once(0.05)

    def _read_once(self, timeout: float, spin: float = 0.0) -> None:
        """Read and apply whatever frames arrive within ``timeout`` (one reader at
        a time), polling for the first ``spin`` seconds of it."""
        if not self._read_lock.acquire(blocking=False):
            with self._results:
                self._results.wait(timeout)
            return
        try:
            assert self._sock is not None
            if (
                not readable_within(self._sock, min(spin, timeout))
                and not select.select([self._sock], [], [], timeout)[0]
            ):
                return
            try:
                chunk = self._sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._eof = True
                with self._results:
                    self._results.notify_all()
                return
            self._inbuf += chunk
            frames, used = _split(self._inbuf)
            del self._inbuf[:used]
        finally:
            self._read_lock.release()
        self._on_frames(frames)

    def _on_frames(self, frames: list[Any]) -> None:
        with self._results:
            for frame in frames:
                if "event" in frame:
                    task = self._pending.pop(frame["id"], None)
                    if task is not None:
                        ok = frame["status"] == "succeeded"
                        task._finish(ok, frame["result"], frame["error"])
                else:
                    self._on_publish_reply(frame)
            self._results.notify_all()

    def _wait_for(self, task: Task, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._results:
            self._waiting += 1
        spin = self.spin  # on the first read only: the outcome of a short call is due
        try:
            while not task._done and not self._eof:
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    break
                self._read_once(left, spin)
                spin = 0.0
        finally:
            with self._results:
                self._waiting -= 1
        return task._done

    def _on_publish_reply(self, reply: dict[str, Any]) -> None:
        batch = self._batches.popleft()
        if "error" not in reply:
            return
        error = error_from_dict(reply["error"])
        rest = batch[int(reply.get("accepted") or 0) :]
        if isinstance(error, QueueFull):  # the sender sends the rest again, a little later
            with self._wake:
                self._outbox.extendleft(reversed(rest))
                self._resend_at = time.monotonic() + 0.005
                self._wake.notify()
            return
        for entry in rest:
            task = self._pending.pop(entry["id"], None)
            if task is not None:
                task._finish(False, None, str(error))


def _chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _split(buf: bytearray) -> tuple[list[Any], int]:
    """Decode the complete ``u32 length | JSON`` frames at the front of ``buf``."""
    frames, pos = [], 0
    while len(buf) - pos >= 4:
        (size,) = FRAME.unpack_from(buf, pos)
        if len(buf) - pos - 4 < size:
            break
        frames.append(orjson.loads(memoryview(buf)[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return frames, pos


def _fork_supervisor(config: Config) -> int:
    """Fork the supervisor from the calling (main) thread; it dies with its parent."""
    from .logs import setup_logging
    from .supervisor import Supervisor
    from .systemd import Notifier
    from .worker import _die_with_parent

    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        _die_with_parent(signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(0)
        setup_logging(
            config.settings.log_level if config.settings.log_level != "info" else "warning"
        )
        Supervisor(config, notifier=Notifier()).serve_forever()  # not the program's systemd
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _wait_or_kill(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
