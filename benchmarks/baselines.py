"""The standard library's process pools and a bare-fork ceiling, timed warm.

Every pool is created and warmed up (each worker has run a task) before its
timing starts, and shut down after it ends: startup is never timed.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from . import handlers
from .daemons import CTX, RUN_TIMEOUT


def _warm_ppe(pool: cf.ProcessPoolExecutor, workers: int) -> None:
    for future in [pool.submit(handlers.noop_plain) for _ in range(4 * workers)]:
        future.result()


class CpuRun(NamedTuple):
    """One run of the CPU section: its seconds, and the tasks' own times summed
    (``handlers.timed_spin``: wall and CPU seconds inside the task)."""

    seconds: float
    task_wall: float
    task_cpu: float
    tasks: int

    @classmethod
    def of(cls, seconds: float, times: list[Any]) -> CpuRun:
        """From each task's (wall, cpu) result."""
        return cls(seconds, sum(t[0] for t in times), sum(t[1] for t in times), len(times))


def ppe_throughput(fn: Callable[[Any], Any], arg: Any, n: int, workers: int) -> float:
    """Seconds to submit n calls to a warm ProcessPoolExecutor and wait for all."""
    return ppe_results(fn, arg, n, workers)[0]


def ppe_results(
    fn: Callable[[Any], Any], arg: Any, n: int, workers: int
) -> tuple[float, list[Any]]:
    """``ppe_throughput``, with the calls' results (collected after the timing)."""
    with cf.ProcessPoolExecutor(workers, mp_context=CTX) as pool:
        _warm_ppe(pool, workers)
        start = time.perf_counter()
        futures = [pool.submit(fn, arg) for _ in range(n)]
        cf.wait(futures)
        elapsed = time.perf_counter() - start
        return elapsed, [future.result() for future in futures]


def ppe_map(n: int, workers: int, chunksize: int) -> float:
    """Seconds for ``ProcessPoolExecutor.map(noop, n items, chunksize)``, all consumed."""
    with cf.ProcessPoolExecutor(workers, mp_context=CTX) as pool:
        _warm_ppe(pool, workers)
        start = time.perf_counter()
        got = sum(
            1 for _ in pool.map(handlers.noop_plain, itertools.repeat(None, n), chunksize=chunksize)
        )
        elapsed = time.perf_counter() - start
    if got != n:
        raise RuntimeError(f"ProcessPoolExecutor.map returned {got} results for {n} items")
    return elapsed


def mp_pool_throughput(n: int, workers: int) -> float:
    """Seconds for ``imap_unordered(noop, range(n), chunksize=1)`` on a warm Pool."""
    with CTX.Pool(workers) as pool:
        for _ in pool.imap_unordered(handlers.noop_plain, range(4 * workers), chunksize=1):
            pass
        start = time.perf_counter()
        for _ in pool.imap_unordered(handlers.noop_plain, range(n), chunksize=1):
            pass
        return time.perf_counter() - start


def mp_apply_async(n: int, workers: int) -> float:
    """Seconds for n ``apply_async(noop)`` calls on a warm Pool, then every ``get``."""
    with CTX.Pool(workers) as pool:
        for result in [pool.apply_async(handlers.noop_plain) for _ in range(4 * workers)]:
            result.get(RUN_TIMEOUT)
        start = time.perf_counter()
        results = [pool.apply_async(handlers.noop_plain) for _ in range(n)]
        for result in results:
            result.get(RUN_TIMEOUT)
        return time.perf_counter() - start


def fork_ceiling(n: int, iterations: int, workers: int, waker: float = 0.0) -> CpuRun:
    """``workers`` forked processes run n tasks between them, no transport: the
    seconds it took, and the tasks' own times each child sums up.

    ``waker`` > 0: a third process wakes every ``waker`` seconds meanwhile and
    does nothing else, as a pool's dispatcher wakes once per task: what the
    wake-ups alone cost the workers on this machine.

    Each child takes its next task by reading one byte from a pipe that holds
    one byte per task: a pool that balances like the real ones (a child on a
    slower vCPU runs fewer tasks) at the cost of a 1-byte read per task, ~1 us
    beside a 10 ms task. A fixed n/workers split instead waits for its slowest
    child, and the two vCPUs here often run at different speeds. The children
    are forked first and wait for the go byte, so the fork is not timed (as
    the pools and the daemon are warm when their timing starts).
    """
    with _waking(waker):
        return _timed_children(n, iterations, workers)


@contextlib.contextmanager
def _waking(period: float) -> Iterator[None]:
    """A child process that sleeps ``period`` seconds in a loop (none if 0)."""
    if period <= 0:
        yield
        return
    pid = os.fork()
    if pid == 0:
        try:
            while True:
                time.sleep(period)
        finally:
            os._exit(0)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# What a ceiling child reports when it is done: its tasks' summed wall and CPU
# seconds and their number (one pipe write of 24 bytes: atomic, under PIPE_BUF).
_SUMS = struct.Struct("ddq")


def _timed_children(n: int, iterations: int, workers: int) -> CpuRun:
    """The ceiling run itself (see ``fork_ceiling``)."""
    tokens_r, tokens_w = os.pipe()
    go_r, go_w = os.pipe()
    sums_r, sums_w = os.pipe()
    pids = []
    try:
        for _ in range(workers):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(go_w)
                    os.close(tokens_w)
                    if os.read(go_r, 1):
                        done = CpuRun.of(0.0, _take_tasks(tokens_r, iterations))
                        os.write(sums_w, _SUMS.pack(*done[1:]))
                        code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(tokens_r)
        tokens_r = -1
        start = time.perf_counter()
        os.write(go_w, b"g" * workers)
        with os.fdopen(tokens_w, "wb", buffering=0) as tokens:
            tokens_w = -1  # closed by the with: the children then read EOF when done
            tokens.write(b"t" * n)  # blocks only while the children still have a full pipe
    finally:
        for fd in (tokens_r, tokens_w, go_r, go_w, sums_w):
            if fd >= 0:
                os.close(fd)  # a child still waiting (fork failed midway) reads EOF and exits
    try:
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"bare fork child exited {os.waitstatus_to_exitcode(status)}")
        elapsed = time.perf_counter() - start
        return _summed(elapsed, os.read(sums_r, _SUMS.size * workers), workers)
    finally:
        os.close(sums_r)


def _take_tasks(tokens: int, iterations: int) -> list[tuple[float, float]]:
    """A ceiling child's work: a task per byte read from ``tokens``, until EOF
    (every task taken); each task's (wall, cpu) times.

    A list comprehension, not a ``while`` loop: called from a ``while`` loop
    the same loop ran ~3% slower here, in the bare children alone (10.61
    against 10.33 ms of CPU a task, ``ProcessPoolExecutor``'s workers 10.30;
    it is the code around the call, not the read: see the performance
    notes), and a ceiling must not run its tasks slower than the pools do.
    """
    return [handlers.cpu_plain(iterations) for _ in iter(lambda: os.read(tokens, 1), b"")]


def _summed(elapsed: float, data: bytes, workers: int) -> CpuRun:
    """The children's reports (one ``_SUMS`` each) added up."""
    if len(data) != _SUMS.size * workers:
        raise RuntimeError(
            f"bare fork children reported {len(data)} bytes, not {_SUMS.size * workers}"
        )
    walls, cpus, counts = zip(*_SUMS.iter_unpack(data), strict=True)
    return CpuRun(elapsed, sum(walls), sum(cpus), sum(counts))


def ppe_latency(samples: int, warmup: int = 20) -> list[float]:
    """Round trips ``submit(noop).result()`` on ``ProcessPoolExecutor(1)``, in seconds."""
    out: list[float] = []
    with cf.ProcessPoolExecutor(1, mp_context=CTX) as pool:
        for i in range(warmup + samples):
            start = time.perf_counter()
            pool.submit(handlers.noop_plain).result()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                out.append(elapsed)
    return out
