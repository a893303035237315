"""Handlers used by the daemon tests (imported by workers through pythonpath)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time

import procqueue
from procqueue import Context, QueueTask, TaskTimeout


def echo(ctx: Context, task: QueueTask) -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "payload": procqueue.unmarshal_payload(task),
        "attempt": task.attempt,
    }


def stamp(ctx: Context, task: QueueTask) -> dict[str, float]:
    """Returns when it started and ended (wall clock) and in which process."""
    args = procqueue.unmarshal_payload(task) or {}
    start = time.time()
    if args.get("spin"):
        end = time.perf_counter() + float(args["spin"])
        while time.perf_counter() < end:
            pass
    if args.get("sleep"):
        time.sleep(float(args["sleep"]))
    return {"pid": os.getpid(), "start": start, "end": time.time()}


def flaky(ctx: Context, task: QueueTask) -> int:
    args = procqueue.unmarshal_payload(task) or {}
    if task.attempt < int(args.get("fail_times", 2)):
        raise RuntimeError(f"flaky failure on attempt {task.attempt}")
    return task.attempt


def always_fail(ctx: Context, task: QueueTask) -> None:
    raise ValueError("this handler always fails")


def sleepy(ctx: Context, task: QueueTask) -> None:
    time.sleep(60)


def stubborn(ctx: Context, task: QueueTask) -> None:
    """Ignores the soft time limit: only the supervisor's hard kill ends it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    end = time.time() + 60
    while time.time() < end:
        with contextlib.suppress(TaskTimeout):
            time.sleep(0.05)


def die_once(ctx: Context, task: QueueTask) -> int:
    """Kills its own worker on the first attempt (as a segfault or OOM kill would)."""
    how = (procqueue.unmarshal_payload(task) or {}).get("how", "kill")
    if task.attempt == 0:
        if how == "exit":
            os._exit(13)
        os.kill(os.getpid(), signal.SIGKILL)
    return task.attempt


def digest(ctx: Context, task: QueueTask) -> dict[str, object]:
    data = task.payload or b""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def follow_up(ctx: Context, task: QueueTask) -> str:
    child = ctx.publish(queue=task.queue, type="echo", payload={"parent": task.id})
    return child.id


def deadline(ctx: Context, task: QueueTask) -> float | None:
    return ctx.remaining()


async def async_echo(ctx: Context, task: QueueTask) -> str:
    import asyncio

    await asyncio.sleep(0.01)
    return "async ok"


def record(ctx: Context, task: QueueTask) -> str:
    """Appends its task id to the file named in the payload: proof it ran."""
    args = procqueue.unmarshal_payload(task)
    with open(args["log"], "a") as out:
        out.write(task.id + "\n")
    if args.get("sleep"):
        time.sleep(float(args["sleep"]))
    return task.id


_hoard: list[bytes] = []


def hog(ctx: Context, task: QueueTask) -> int:
    """Allocates and keeps memory, as a leaky handler would."""
    mib = int((procqueue.unmarshal_payload(task) or {}).get("mib", 100))
    _hoard.append(b"x" * (mib << 20))
    return os.getpid()


def now(ctx: Context, task: QueueTask) -> float:
    return time.time()


def noop(ctx: Context, task: QueueTask) -> None:
    """Does nothing: for tests that push many tasks through."""
