"""Section 5: the supervisor's memory while a backlog piles up behind a held worker.

A daemon with one worker (concurrency 1, prefetch 0) gets a first task whose
handler (``hold``) blocks until the benchmark creates a file, so every task
published after it stays pending. Small no-op tasks (16-byte payload) are
then published with ``publish_many`` in batches, and the supervisor's RSS
(psutil, the daemon's pid from ``status()``) is sampled before the first
batch and every ``every`` tasks:

* SQLite store, ``sync = "normal"``, ``buffer_size = 1000``: pending tasks
  beyond the buffer wait on disk, so RSS should stay flat however many.
* memory store, ``buffer_size`` = a fifth of the total: publish with
  ``block=False`` until ``QueueFull``; RSS grows up to the buffer, then the
  queue pushes back.

One run per store (no repetitions): it measures memory, not speed; the
publish rate is reported as a by-product.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import psutil

from procqueue import Client, QueueFull, QueueTask, QueueTaskStatus

from .daemons import QUEUE, DaemonSpec, daemon

BATCH = 5000
SQLITE_BUFFER = 1000
PAYLOAD = b"x" * 16
MIB = 1 << 20


def hold_worker(client: Client, release: Path, timeout: float = 10.0) -> None:
    """Publish the ``hold`` task and wait until the only worker runs it."""
    stored = client.publish(QueueTask(queue=QUEUE, type="hold", payload=str(release).encode()))
    deadline = time.monotonic() + timeout
    while client.get_task(stored.id).status is not QueueTaskStatus.RUNNING:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the hold task did not start within {timeout:g}s")
        time.sleep(0.01)


def rss_mib(proc: psutil.Process) -> float:
    return float(proc.memory_info().rss / MIB)


def fill(client: Client, total: int, every: int, block: bool) -> dict[str, Any]:
    """Publish up to ``total`` tasks (stop at ``QueueFull``), sampling RSS every ``every``."""
    proc = psutil.Process(int(client.status()["pid"]))
    batch = min(BATCH, every)
    checkpoints = [{"published": 0, "rss_mib": rss_mib(proc)}]
    published, full, mark = 0, False, every
    start = time.perf_counter()
    while published < total and not full:
        size = min(batch, total - published)
        tasks = [QueueTask(queue=QUEUE, type="noop", payload=PAYLOAD) for _ in range(size)]
        try:
            published += len(client.publish_many(tasks, block=block))
        except QueueFull as exc:
            published += len(getattr(exc, "accepted", []))
            full = True
        if published >= mark or full or published >= total:
            checkpoints.append({"published": published, "rss_mib": rss_mib(proc)})
            mark = (published // every + 1) * every
    elapsed = time.perf_counter() - start
    queue = client.status()["queues"][QUEUE]
    return {
        "published": published,
        "queue_full": full,
        "seconds": elapsed,
        "publish_per_s": published / elapsed,
        "checkpoints": checkpoints,
        "pending": queue["pending"],
        "in_memory": queue["ready"] + queue["delayed"],
        "on_disk": queue["on_disk"],
    }


def measure_store(workdir: Path, spec: DaemonSpec, total: int, every: int) -> dict[str, Any]:
    release = workdir / f"{spec.name}.release"
    with daemon(workdir, spec) as socket_path, Client(socket_path, timeout=120) as client:
        hold_worker(client, release)
        try:
            result = fill(client, total, every, block=spec.store != "memory")
        finally:
            release.touch()  # the worker lets go; the daemon then stops at once
    last = result["checkpoints"][-1]
    print(
        f"  rss {spec.name}: {result['published']:,} published, "
        f"{last['rss_mib']:.1f} MiB, {result['publish_per_s']:,.0f} published/s",
        file=sys.stderr,
    )
    return {"store": spec.store.split(":")[0], "sync": spec.sync, **result}


def run_rss(workdir: Path, total: int) -> dict[str, Any]:
    every = max(1, total // 10)
    memory_buffer = max(BATCH, total // 5)
    sqlite = DaemonSpec(
        "rss-sqlite",
        concurrency=1,
        store=f"sqlite:///{workdir}/rss.db",
        sync="normal",
        buffer_size=SQLITE_BUFFER,
    )
    memory = DaemonSpec(
        "rss-memory",
        concurrency=1,
        buffer_size=memory_buffer,
        expected_log="pending task(s) are dropped: the memory store keeps nothing",
    )
    systems = {
        f"sqlite sync=normal buffer_size={SQLITE_BUFFER:,}": measure_store(
            workdir, sqlite, total, every
        ),
        f"memory buffer_size={memory_buffer:,}": measure_store(workdir, memory, total, every),
    }
    for spec, info in zip((sqlite, memory), systems.values(), strict=True):
        info["buffer_size"] = spec.buffer_size
    return {"tasks": total, "batch": min(BATCH, every), "every": every, "systems": systems}


def rss_table(title: str, section: dict[str, Any]) -> list[str]:
    """Published count down the side, one RSS column (MiB) per store."""
    systems = section["systems"]
    columns = [
        {c["published"]: c["rss_mib"] for c in info["checkpoints"]} for info in systems.values()
    ]
    counts = sorted({count for column in columns for count in column})
    heads = [name.split(" ")[0] + " MiB" for name in systems]
    lines = [title, f"  {'published':>12}" + "".join(f"{h:>14}" for h in heads)]
    for count in counts:
        cells = "".join(
            f"{column[count]:>14.1f}" if count in column else f"{'':>14}" for column in columns
        )
        lines.append(f"  {count:>12,}{cells}")
    for name, info in systems.items():
        end = "then QueueFull" if info["queue_full"] else "no push-back"
        lines.append(
            f"  {name}: {info['published']:,} published ({end}) in {info['seconds']:.1f} s "
            f"= {info['publish_per_s']:,.0f}/s; pending {info['pending']:,} "
            f"({info['in_memory']:,} in memory, {info['on_disk']:,} on disk); "
            f"RSS {info['checkpoints'][0]['rss_mib']:.1f} -> "
            f"{info['checkpoints'][-1]['rss_mib']:.1f} MiB"
        )
    return lines
