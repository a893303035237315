"""Task bodies for the benchmark: procqueue handlers and their plain twins.

The daemon's workers import this module (the repo root is on the config's
``pythonpath``); the process pools pickle the plain functions by reference and
``procqueue.Pool`` names them by import path.
Every system runs the very same ``spin`` loop for the CPU-bound tasks, with an
iteration count calibrated once in the benchmark process to ~10 ms.
"""

from __future__ import annotations

import os
import time
from typing import Any

from procqueue import Context, QueueTask

CPU_SECONDS = 0.010
HOLD_SECONDS = 600.0


def spin(iterations: int) -> int:
    """Pure-Python CPU work: ``iterations`` turns of a small arithmetic loop."""
    x = 1
    for _ in range(iterations):
        x = (x * 31 + 7) & 0xFFFF  # small ints only: the same cost every turn
    return x


def timed_spin(iterations: int) -> tuple[float, float]:
    """``spin``, timed from inside: (wall seconds, this thread's CPU seconds).

    What lets the CPU section tell the pool's overhead (time the workers spent
    outside the task) from the task itself running slower in one process than
    in another (the same loop's speed varies by a few percent with where the
    process's memory landed and with the code it is called from: see
    ``fresh.py`` and ``baselines._take_tasks``).
    """
    wall, cpu = time.perf_counter(), time.thread_time()
    spin(iterations)
    return time.perf_counter() - wall, time.thread_time() - cpu


def busy_for(seconds: float) -> None:
    """Burn CPU until ``seconds`` of wall time have passed (when not calibrated)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def noop(ctx: Context, task: QueueTask) -> None:
    """procqueue handler that does nothing."""


def cpu10ms(ctx: Context, task: QueueTask) -> list[float] | None:
    """procqueue handler: ``timed_spin(int(payload))``, its times as the result;
    or a 10 ms busy wait without payload."""
    if task.payload:
        return list(timed_spin(int(task.payload)))
    busy_for(CPU_SECONDS)
    return None


def stamp(ctx: Context, task: QueueTask) -> float:
    """procqueue handler: the wall time (``time.time()``) at which it started."""
    return time.time()


def hold(ctx: Context, task: QueueTask) -> None:
    """procqueue handler: block its worker until the file named by the payload exists.

    Gives up after ``HOLD_SECONDS``; the benchmark creates the file to let go.
    """
    path = (task.payload or b"").decode()
    end = time.monotonic() + HOLD_SECONDS
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.01)


def noop_plain(arg: Any = None) -> None:
    """The no-op for ProcessPoolExecutor, multiprocessing.Pool and procqueue.Pool."""


def cpu_plain(iterations: int) -> tuple[float, float]:
    """The CPU-bound task for ProcessPoolExecutor and the bare-fork ceiling."""
    return timed_spin(iterations)
