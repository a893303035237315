"""Section 7's other side: Celery and Dramatiq workers on the local Redis server.

Each runs as a subprocess in its own session, on a small app module written
into a temporary directory put on its ``PYTHONPATH``:

* Celery 5, prefork pool, Redis broker and Redis result backend (DB 14),
  with the worker-to-worker traffic (gossip, mingle, event heartbeats)
  turned off, as is usual when throughput matters::

      celery -A pqb_celery_app worker --concurrency 2 --pool prefork \\
          --loglevel warning --without-gossip --without-mingle --without-heartbeat

  plus ``-Q``/``-n`` so that several workers can run side by side: one per
  variant (the default prefetch, ``-O fair``) and a ``--concurrency 1`` one
  for the latency line, each on its own queue. Everything else is Celery's
  default (``task_acks_late`` off, prefetch multiplier 4, JSON). Tasks are
  sent with ``apply_async(queue=...)`` (``.delay()`` with the variant's
  queue) and awaited with ``AsyncResult.get()`` on every one. Ready when
  ``app.control.ping()`` gets the worker's reply.
* Dramatiq with a Redis broker (DB 15): ``dramatiq pqb_dramatiq_app
  --processes 2 --threads 1``; tasks sent with ``.send()``; the actor INCRs
  a Redis counter, which the benchmark polls (every 2 ms) until it has
  grown by N. Ready when both worker processes have said so (a middleware's
  ``after_worker_boot`` adds its pid to a Redis set). An idle Dramatiq
  consumer polls Redis with an exponential back-off of up to 1 s, so every
  timed run is preceded by an untimed wake-up batch: the figure is the
  steady rate, not a burst after idle.

Both DBs are flushed before the workers start and after they stop. The
workers are stopped with SIGTERM to the leader, then SIGKILL to the whole
process group if anything of it is left after 15 s (a slow or noisy stop is
reported on stderr); on Linux they also get SIGTERM if the benchmark process
dies without its ``finally`` blocks running (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from .daemons import RUN_TIMEOUT, WORKERS, log_tail

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
CELERY_DB = 14
DRAMATIQ_DB = 15
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
POLL = 0.002

CELERY_MODULE = "pqb_celery_app"
DRAMATIQ_MODULE = "pqb_dramatiq_app"
CELERY_TASK = "pqbench.noop"
DRAMATIQ_QUEUE = "pqbench"
DONE_KEY = "pqbench:done"
READY_KEY = "pqbench:ready"

CELERY_VARIANTS = {"default": [], "fair": ["-O", "fair"]}  # variant -> extra worker options
CELERY_LATENCY = "latency"  # the --concurrency 1 worker

CELERY_APP = '''"""Celery app of procqueue's benchmark (written by benchmarks/brokers.py)."""

from celery import Celery

URL = {url!r}

app = Celery("pqbench", broker=URL, backend=URL)
app.conf.update(broker_connection_retry_on_startup=True, result_expires=3600)


@app.task(name={task!r})
def noop():
    return None
'''

DRAMATIQ_APP = '''"""Dramatiq app of procqueue's benchmark (written by benchmarks/brokers.py)."""

import os

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

URL = {url!r}
counter = redis.Redis.from_url(URL)


class Ready(Middleware):
    """Each worker process adds its pid to a set once it consumes."""

    def after_worker_boot(self, broker, worker):
        counter.sadd({ready!r}, os.getpid())


broker = RedisBroker(url=URL)
broker.add_middleware(Ready())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name={queue!r})
def noop():
    counter.incr({done!r})
'''


def redis_url(db: int) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


def unavailable() -> str | None:
    """Why the section cannot run here (a missing package, no Redis), or None."""
    for name in ("redis", "celery", "dramatiq"):
        try:
            importlib.import_module(name)
        except Exception as exc:
            return f"{name} does not import ({exc}); pip install -e '.[bench]'"
    import redis

    try:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=2)
        with contextlib.closing(client):
            client.ping()
    except (redis.RedisError, OSError) as exc:
        return f"Redis at {REDIS_HOST}:{REDIS_PORT} does not answer PING ({exc})"
    return None


def versions() -> dict[str, str]:
    import celery
    import dramatiq
    import kombu
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=2)
    with contextlib.closing(client):
        server = str(client.info("server")["redis_version"])
    return {
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "dramatiq": dramatiq.__version__,
        "redis-py": redis.__version__,
        "redis-server": server,
    }


# ------------------------------------------------------------------ processes


def _pdeathsig() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when this process dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded here, not in the forked child
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return preexec


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group ``pgid``."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


@dataclass
class Worker:
    """A worker command run in its own session; stop() leaves nothing of its group alive."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    terminated: float | None = None  # time.monotonic() of the SIGTERM

    def start(self, cwd: Path, env: dict[str, str]) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=_pdeathsig(),
            )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n{log_tail(self.log)}"
            )

    def not_ready(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"{self.name} not ready after {READY_TIMEOUT:g}s ({what}):\n{log_tail(self.log)}"
        )

    def terminate(self) -> None:
        """SIGTERM the leader (once), without waiting."""
        if self.proc is None or self.terminated is not None:
            return
        self.terminated = time.monotonic()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM the leader; SIGKILL the group if any of it is left after STOP_TIMEOUT."""
        proc = self.proc
        if proc is None:
            return
        self.terminate()
        assert self.terminated is not None
        start = self.terminated
        try:
            code: int | None = proc.wait(max(0.0, start + STOP_TIMEOUT - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        deadline = start + STOP_TIMEOUT  # the rest of the time for the leader's children
        while (killed := group_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if killed:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            if code is None:
                code = proc.wait(5)
            deadline = time.monotonic() + 5
            while (left := group_members(proc.pid)) and time.monotonic() < deadline:
                time.sleep(0.05)
            if left:
                raise RuntimeError(f"{self.name}: pids {left} survived SIGKILL")
        took = time.monotonic() - start
        if killed or code != 0 or took > 5.0:
            print(
                f"warning: {self.name} exited {code} {took:.1f}s after SIGTERM"
                f"{f'; SIGKILL to pids {killed} left in its group' if killed else ''}; "
                f"its log:\n{log_tail(self.log)}",
                file=sys.stderr,
            )


def import_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def flush(db: int) -> None:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_timeout=10)
    with contextlib.closing(client):
        client.flushdb()


# ------------------------------------------------------------------ the fleet


@dataclass
class Fleet:
    """The running workers and the client-side handles to time them."""

    celery_task: Any
    dramatiq_actor: Any
    counter: Any  # redis.Redis on the Dramatiq DB

    @staticmethod
    def queue(variant: str) -> str:
        return f"pqbench.{variant}"

    def celery_run(self, variant: str, n: int) -> float:
        """Seconds from the first ``apply_async`` until ``get()`` returned for all n."""
        queue = self.queue(variant)
        start = time.perf_counter()
        results = [self.celery_task.apply_async(queue=queue) for _ in range(n)]
        for result in results:
            result.get(timeout=RUN_TIMEOUT)
        return time.perf_counter() - start

    def celery_latency(self, samples: int, warmup: int = 20) -> list[float]:
        """``apply_async().get()`` round trips on the --concurrency 1 worker, in seconds."""
        queue = self.queue(CELERY_LATENCY)
        out: list[float] = []
        for i in range(warmup + samples):
            start = time.perf_counter()
            self.celery_task.apply_async(queue=queue).get(timeout=30)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                out.append(elapsed)
        return out

    def done(self) -> int:
        return int(self.counter.get(DONE_KEY) or 0)

    def wait_done(self, target: int, timeout: float = RUN_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.done()) < target:
            if time.monotonic() > deadline:
                raise RuntimeError(f"dramatiq: counter at {got}, expected {target}")
            time.sleep(POLL)

    def dramatiq_send(self, n: int) -> int:
        """Send n tasks; the counter value at which all of them have run."""
        base = self.done()
        for _ in range(n):
            self.dramatiq_actor.send()
        return base + n

    def dramatiq_run(self, n: int) -> float:
        """Seconds from the first ``send()`` until the counter has grown by n."""
        self.wait_done(self.dramatiq_send(4 * WORKERS))  # untimed: wake idle consumers
        start = time.perf_counter()
        self.wait_done(self.dramatiq_send(n))
        return time.perf_counter() - start


def celery_worker(workdir: Path, variant: str, node: str) -> Worker:
    concurrency = 1 if variant == CELERY_LATENCY else WORKERS
    argv = [
        sys.executable, "-m", "celery", "-A", CELERY_MODULE, "worker",
        "--concurrency", str(concurrency), "--pool", "prefork", "--loglevel", "warning",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-Q", Fleet.queue(variant), "-n", node,
        *CELERY_VARIANTS.get(variant, []),
    ]  # fmt: skip
    return Worker(f"celery worker {variant}", argv, workdir / f"celery-{variant}.log")


def dramatiq_worker(workdir: Path) -> Worker:
    argv = [
        sys.executable, "-m", "dramatiq", DRAMATIQ_MODULE,
        "--processes", str(WORKERS), "--threads", "1",
    ]  # fmt: skip
    return Worker("dramatiq worker", argv, workdir / "dramatiq.log")


def wait_celery(app: Any, worker: Worker, node: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        worker.check_alive()
        if app.control.ping(destination=[node], timeout=0.5):
            return
    raise worker.not_ready("no reply to app.control.ping()")


def wait_dramatiq(counter: Any, worker: Worker) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        worker.check_alive()
        if counter.scard(READY_KEY) >= WORKERS:
            return
        time.sleep(0.05)
    raise worker.not_ready(f"fewer than {WORKERS} worker processes booted")


@contextlib.contextmanager
def fleet(workdir: Path) -> Iterator[Fleet]:
    """Celery (one worker per variant, one for latency) and Dramatiq, started together.

    Yields once every worker is ready and warm; on the way out, however it is
    left, every worker is stopped and both DBs are flushed.
    """
    import redis

    appdir = workdir / "brokers"
    appdir.mkdir(exist_ok=True)
    (appdir / f"{CELERY_MODULE}.py").write_text(
        CELERY_APP.format(url=redis_url(CELERY_DB), task=CELERY_TASK)
    )
    (appdir / f"{DRAMATIQ_MODULE}.py").write_text(
        DRAMATIQ_APP.format(
            url=redis_url(DRAMATIQ_DB), ready=READY_KEY, queue=DRAMATIQ_QUEUE, done=DONE_KEY
        )
    )
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(appdir), os.environ.get("PYTHONPATH")]))
    }
    host = socket.gethostname()
    nodes = {v: f"pqbench-{v}-{os.getpid()}@{host}" for v in [*CELERY_VARIANTS, CELERY_LATENCY]}
    workers = {v: celery_worker(workdir, v, node) for v, node in nodes.items()}
    workers["dramatiq"] = dramatiq_worker(workdir)
    flush(CELERY_DB)
    flush(DRAMATIQ_DB)
    counter = redis.Redis.from_url(redis_url(DRAMATIQ_DB))
    celery_mod = dramatiq_mod = None
    try:
        for worker in workers.values():
            worker.start(appdir, env)
        celery_mod = import_file(CELERY_MODULE, appdir / f"{CELERY_MODULE}.py")
        dramatiq_mod = import_file(DRAMATIQ_MODULE, appdir / f"{DRAMATIQ_MODULE}.py")
        for variant, node in nodes.items():
            wait_celery(celery_mod.app, workers[variant], node)
        wait_dramatiq(counter, workers["dramatiq"])
        handle = Fleet(celery_mod.noop, dramatiq_mod.noop, counter)
        for variant in nodes:  # warm-up: every pool process has run a task
            handle.celery_run(variant, 4 * WORKERS)
        handle.wait_done(handle.dramatiq_send(4 * WORKERS), timeout=READY_TIMEOUT)
        yield handle
    finally:
        errors = []
        for worker in workers.values():  # all at once: each takes a second or two
            worker.terminate()
        for worker in workers.values():
            try:
                worker.stop()
            except Exception as exc:
                errors.append(exc)
        if celery_mod is not None:
            celery_mod.app.close()
        if dramatiq_mod is not None:
            dramatiq_mod.broker.close()
        counter.close()
        sys.modules.pop(CELERY_MODULE, None)
        sys.modules.pop(DRAMATIQ_MODULE, None)
        flush(CELERY_DB)
        flush(DRAMATIQ_DB)
        if errors:
            raise errors[0]
