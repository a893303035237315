"""procqueue against ``ProcessPoolExecutor``, ``multiprocessing.Pool`` and bare forks.

Run from the repository root::

    python -m benchmarks                      # full run, about 6 minutes on 2 cores
    python -m benchmarks --quick              # tiny sizes, one repetition (smoke test)
    python -m benchmarks --json r.json        # also write every figure as JSON
    python -m benchmarks --chart r.png        # and a chart (matplotlib, the [bench] extra)
    python -m benchmarks --sections noop,latency   # a subset

Seven sections; inside each, the systems are measured interleaved (A B C,
A B C, ...) ``--repeat`` times on the same machine in the same run, and
reported as median and min-max (latencies: p50/p99 over every sample), with
the ratios of the medians and (no-op and CPU sections) the median of each
repetition's own ratio, which a drift of the machine's speed disturbs less:

1. ``noop``: no-op tasks, 2 workers: the procqueue daemon (memory store,
   prefetch 0, 8 and 64; SQLite store, prefetch 64; ``buffer_size`` large
   enough that publish never pushes back), fed with ``Client.publish_many``
   in batches, timed from the first publish until ``Client.wait`` returns
   the last task and ``status()`` then counts every task succeeded
   (re-polled every 2 ms if one is still running); versus
   ``ProcessPoolExecutor(2)`` ``submit`` per task and ``map`` with chunksize
   1 and 256, and ``multiprocessing.Pool(2)`` ``apply_async`` per task and
   ``imap_unordered(..., chunksize=1)``.
2. ``cpu``: CPU-bound ~10 ms tasks (a pure-Python loop calibrated once
   here), 2 workers: procqueue (prefetch 0 and 1) versus
   ``ProcessPoolExecutor(2)`` versus a bare-fork ceiling (2 forked processes
   taking their tasks one at a time from a pipe: no transport, no tracking);
   a ceiling run comes first in every repetition and one more closes the
   section, and each run is also reported against the two around it; and
   the same ceiling beside a third process that does nothing but wake up
   once per task (at the ideal rate), as a pool's dispatcher does. This
   section runs ``--cpu-repeat`` times (default 15), not ``--repeat``: its
   target is a 5% effect, and single runs here swing by 20%. Every task
   times itself (``handlers.timed_spin``), so each system also reports the
   share of its workers' time spent inside tasks (what the pool costs) and
   a task's CPU time (how fast the same loop ran in its processes). Every
   run starts its processes anew (a new daemon; the ceiling and
   ``ProcessPoolExecutor`` in a new interpreter, ``benchmarks/fresh.py``):
   how fast the loop runs differs by a few percent between started
   processes, so each system's median is over a draw per repetition.
3. ``latency`` with one idle worker: daemon publish + ``Client.wait`` (two
   requests), ``Client.run`` (publish and wait in one request),
   ``procqueue.Pool(1).run(noop).result()`` and
   ``ProcessPoolExecutor(1).submit(noop).result()`` round trips; and the
   daemon's one-way "publish -> handler start": the client's ``time.time()``
   just before ``publish`` against the handler's ``time.time()`` at entry
   (same machine clock), returned as the task's result.
4. ``pool``: ``procqueue.Pool(2)`` ``run``/``map`` against the stdlib pools
   (see ``embedded_pool.py``).
5. ``rss``: the supervisor's RSS while a backlog piles up behind a held
   worker, SQLite versus memory store (see ``rss.py``).
6. ``transport``: frames/s between two forked processes through
   ``procqueue.ring.Channel`` versus pipes and ``multiprocessing`` (see
   ``transport.py``).
7. ``brokers``: no-op tasks, 2 workers each, ``--broker-tasks`` per run:
   Celery 5 (prefork, Redis broker and result backend; default options and
   ``-O fair``) and Dramatiq (Redis broker, 2 processes x 1 thread) on the
   local Redis server (see ``brokers.py``), interleaved with the procqueue
   daemon at prefetch 0 and 64 and ``ProcessPoolExecutor(2).submit``; and
   the round trip ``.delay().get()`` on one idle Celery worker against
   procqueue publish + wait on one idle worker (``--broker-latency-samples``
   in all, split across the runs). Part of the default run only when Redis
   answers PING at 127.0.0.1:6379 and celery and dramatiq import (the
   ``[bench]`` extra); otherwise the report says why it was skipped. Asked
   for by ``--sections`` without them, the benchmark stops with an error.

Each procqueue configuration runs in its own daemon (``procqueue.cli run``
on a temporary config), started when its section starts and stopped with
SIGTERM when it ends. Pools are created, warmed up, then timed; startup is
never timed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import procqueue
from procqueue import Client, QueueTask, QueueTaskStatus

from . import baselines, brokers, fresh, handlers
from .daemons import CTX, QUEUE, ROOT, RUN_TIMEOUT, WORKERS, DaemonSpec, daemon
from .embedded_pool import run_pool
from .rss import rss_table, run_rss
from .stats import (
    interleaved,
    interleaved_samples,
    latency_summary,
    latency_table,
    median_ratio,
    paired_ratio,
    ratio_text,
    summary,
    throughput_table,
)
from .transport import run_transport, transport_table

SECTIONS = ("noop", "cpu", "latency", "pool", "rss", "transport", "brokers")
BATCH = 1000

NOOP_PQ0 = "procqueue prefetch=0"
NOOP_PQ8 = "procqueue prefetch=8"
NOOP_PQ64 = "procqueue prefetch=64"
NOOP_SQLITE = "procqueue sqlite prefetch=64"
PQ_VARIANTS = {  # label -> daemon (memory store unless it says sqlite)
    NOOP_PQ0: ("noop-p0", 0),
    NOOP_PQ8: ("noop-p8", 8),
    NOOP_PQ64: ("noop-p64", 64),
    NOOP_SQLITE: ("noop-sqlite", 64),
}
PPE = "ProcessPoolExecutor(2).submit"
PPE_MAP1 = "ProcessPoolExecutor(2).map(chunksize=1)"
PPE_MAP256 = "ProcessPoolExecutor(2).map(chunksize=256)"
MP_APPLY = "multiprocessing.Pool(2).apply_async"
MP_POOL = "multiprocessing.Pool(2).imap_unordered(chunksize=1)"
CPU_PQ = {"procqueue prefetch=0": 0, "procqueue prefetch=1": 1}  # label -> prefetch
CPU_PPE = "ProcessPoolExecutor(2).submit"
CEILING = "bare fork ceiling"
CEILING_WAKING = "bare fork ceiling + a process waking once a task"
LAT_PQ = "procqueue publish+wait"
LAT_RUN = "procqueue Client.run (publish and wait in one request)"
LAT_POOL = "procqueue.Pool(1).run().result()"
LAT_PPE = "ProcessPoolExecutor(1).submit().result()"
LAT_STAMP = "procqueue publish -> handler start (one way)"
CELERY = "Celery prefork (Redis broker + result backend)"
CELERY_FAIR = "Celery prefork -O fair (Redis broker + result backend)"
DRAMATIQ = "Dramatiq (Redis broker, 2 processes x 1 thread)"
BROKER_PQ = {NOOP_PQ0: ("brokers-p0", 0), NOOP_PQ64: ("brokers-p64", 64)}
LAT_CELERY = "Celery .delay().get()"


# ------------------------------------------------------------------ procqueue


def queue_counts(client: Client) -> tuple[int, int]:
    info = client.status()["queues"][QUEUE]
    return int(info["succeeded"]), int(info["failed"])


def pq_throughput(
    socket_path: Path,
    task_type: str,
    n: int,
    payload: bytes | None,
    ids: list[str] | None = None,
) -> float:
    """Seconds from the first publish until ``status()`` counts all n tasks
    succeeded; the tasks' ids go to ``ids`` when given."""
    with Client(socket_path, timeout=60) as client:
        base_ok, base_failed = queue_counts(client)
        start = time.perf_counter()
        last_id = ""
        for first in range(0, n, BATCH):
            size = min(BATCH, n - first)
            batch = [QueueTask(queue=QUEUE, type=task_type, payload=payload) for _ in range(size)]
            stored = client.publish_many(batch)
            last_id = stored[-1].id
            if ids is not None:
                ids += [task.id for task in stored]
        client.wait(last_id, timeout=RUN_TIMEOUT)
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            ok, failed = queue_counts(client)
            if failed > base_failed:
                raise RuntimeError(f"procqueue: {failed - base_failed} {task_type} task(s) failed")
            if ok - base_ok >= n:
                return time.perf_counter() - start
            if time.monotonic() > deadline:
                raise RuntimeError(f"procqueue: only {ok - base_ok}/{n} tasks succeeded")
            time.sleep(0.002)


def pq_cpu_run(socket_path: Path, n: int, payload: bytes) -> baselines.CpuRun:
    """``pq_throughput`` of n ``cpu10ms`` tasks, with the times each task
    reported as its result (fetched after the timing)."""
    ids: list[str] = []
    seconds = pq_throughput(socket_path, "cpu10ms", n, payload, ids)
    with Client(socket_path, timeout=60) as client:
        return baselines.CpuRun.of(seconds, [client.get_task(i).result for i in ids])


def pq_cpu_fresh(workdir: Path, prefetch: int, n: int, payload: bytes) -> baselines.CpuRun:
    """``pq_cpu_run`` on a daemon started for it (and warmed up: not timed)."""
    with daemon(workdir, DaemonSpec(f"cpu-p{prefetch}", prefetch=prefetch)) as path:
        pq_throughput(path, "cpu10ms", min(n, 10), payload)
        return pq_cpu_run(path, n, payload)


def pq_latency(
    socket_path: Path, samples: int, warmup: int = 20, one_request: bool = False
) -> list[float]:
    """Round trips in seconds: publish one task, then wait for it (two
    requests), or ``Client.run`` (``one_request``: publish and wait in one)."""
    out: list[float] = []
    with Client(socket_path, timeout=30) as client:
        for i in range(warmup + samples):
            start = time.perf_counter()
            if one_request:
                done = client.run(QueueTask(queue=QUEUE, type="noop"), timeout=30)
            else:
                stored = client.publish(QueueTask(queue=QUEUE, type="noop"))
                done = client.wait(stored.id, timeout=30)
            elapsed = time.perf_counter() - start
            if done.status is not QueueTaskStatus.SUCCEEDED:
                raise RuntimeError(f"procqueue: latency task {done.status}: {done.last_error}")
            if i >= warmup:
                out.append(elapsed)
    return out


def pq_start_latency(socket_path: Path, samples: int, warmup: int = 20) -> list[float]:
    """One way: wall time just before ``publish`` until the ``stamp`` handler starts."""
    out: list[float] = []
    with Client(socket_path, timeout=30) as client:
        for i in range(warmup + samples):
            sent = time.time()
            stored = client.publish(QueueTask(queue=QUEUE, type="stamp"))
            done = client.wait(stored.id, timeout=30)
            if done.status is not QueueTaskStatus.SUCCEEDED or done.result is None:
                raise RuntimeError(f"procqueue: stamp task {done.status}: {done.last_error}")
            if i >= warmup:
                out.append(float(done.result) - sent)
    return out


def pool_latency(pool: procqueue.Pool, samples: int, warmup: int = 20) -> list[float]:
    """Round trips ``pool.run(noop).result()`` in seconds."""
    out: list[float] = []
    for i in range(warmup + samples):
        start = time.perf_counter()
        pool.run(handlers.noop_plain).result(30)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            out.append(elapsed)
    return out


# ------------------------------------------------------------------ sections


def calibrate(target: float = handlers.CPU_SECONDS) -> tuple[int, float]:
    """Iterations of ``spin`` that take ``target`` seconds here; and the measured time."""

    def median_of(iterations: int, tries: int = 7) -> float:
        # The median, not the best: this machine's speed swings by tens of
        # percent from second to second, and the best try is its fastest moment.
        times = []
        for _ in range(tries):
            start = time.perf_counter()
            handlers.spin(iterations)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    iterations = 50_000
    for _ in range(2):  # the second pass corrects the probe's fixed overheads
        iterations = max(1, round(iterations * target / median_of(iterations)))
    return iterations, median_of(iterations)


def noop_daemons(workdir: Path, stack: contextlib.ExitStack) -> dict[str, Path]:
    """Start one daemon per procqueue variant; socket path by label."""
    sockets = {}
    for label, (name, prefetch) in PQ_VARIANTS.items():
        store = f"sqlite:///{workdir}/bench.db" if "sqlite" in label else "memory"
        spec = DaemonSpec(name, prefetch=prefetch, store=store)
        sockets[label] = stack.enter_context(daemon(workdir, spec))
    return sockets


def noop_ratios(
    rates: dict[str, list[float]], result: dict[str, Any]
) -> tuple[str, dict[str, float], dict[str, float], dict[str, float]]:
    """The best procqueue variant; printed ratios of medians and paired ratios
    (the same pairs); every variant against every baseline."""
    baselines_ = [name for name in result if name not in PQ_VARIANTS]
    best = max(PQ_VARIANTS, key=lambda name: result[name]["median_tasks_per_s"])
    pairs = {f"{NOOP_SQLITE} / {NOOP_PQ64}": (NOOP_SQLITE, NOOP_PQ64)}
    pairs |= {f"best procqueue ({best}) / {b}": (best, b) for b in baselines_}
    shown = {label: median_ratio(result, a, b, "tasks") for label, (a, b) in pairs.items()}
    paired = {label: paired_ratio(rates, a, b) for label, (a, b) in pairs.items()}
    every = {
        f"{pq} / {b}": median_ratio(result, pq, b, "tasks")
        for pq in PQ_VARIANTS
        for b in baselines_
    }
    return best, shown, paired, every


def run_noop(workdir: Path, n: int, repeat: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        sockets = noop_daemons(workdir, stack)
        for socket_path in sockets.values():
            pq_throughput(socket_path, "noop", min(n, 500), None)  # warm-up
        systems: dict[str, Callable[[], float]] = {
            label: functools.partial(pq_throughput, path, "noop", n, None)
            for label, path in sockets.items()
        }
        systems |= {
            PPE: lambda: baselines.ppe_throughput(handlers.noop_plain, None, n, WORKERS),
            PPE_MAP1: lambda: baselines.ppe_map(n, WORKERS, 1),
            PPE_MAP256: lambda: baselines.ppe_map(n, WORKERS, 256),
            MP_APPLY: lambda: baselines.mp_apply_async(n, WORKERS),
            MP_POOL: lambda: baselines.mp_pool_throughput(n, WORKERS),
        }
        rates = interleaved("no-op", systems, n, repeat)
    result = {name: summary(r) for name, r in rates.items()}
    best, shown, paired, every = noop_ratios(rates, result)
    return {
        "tasks": n,
        "workers": WORKERS,
        "batch": BATCH,
        "systems": result,
        "best_procqueue": best,
        "ratios": shown,
        "paired_ratios": paired,
        "ratios_all": every,
    }


def run_cpu(workdir: Path, n: int, repeat: int) -> dict[str, Any]:
    """Each repetition runs the ceiling, then every other system; one more ceiling
    run closes the section, so each run sits between two ceiling runs. Every
    run starts its processes anew (a new daemon per procqueue run; the others
    through ``fresh.in_new_interpreter``: why, in ``fresh.py``)."""
    iterations, seconds = calibrate()
    payload = str(iterations).encode()
    systems: dict[str, Callable[[], baselines.CpuRun]] = {
        label: functools.partial(pq_cpu_fresh, workdir, prefetch, n, payload)
        for label, prefetch in CPU_PQ.items()
    }
    systems[CPU_PPE] = functools.partial(fresh.in_new_interpreter, "ppe", n, iterations, WORKERS)
    # The ceiling beside a process that only wakes up, once per task at the
    # ideal rate, as every pool's dispatcher does: what wake-ups cost here.
    systems[CEILING_WAKING] = functools.partial(
        fresh.in_new_interpreter, "ceiling", n, iterations, WORKERS, seconds / WORKERS
    )
    ceiling_run = functools.partial(fresh.in_new_interpreter, "ceiling", n, iterations, WORKERS)
    every: dict[str, Callable[[], baselines.CpuRun]] = {CEILING: ceiling_run, **systems}
    runs: dict[str, list[baselines.CpuRun]] = {name: [] for name in every}
    timed = {name: _recorded(run, runs[name]) for name, run in every.items()}
    rates = interleaved("cpu", timed, n, repeat)
    rates[CEILING].append(n / timed[CEILING]())
    result = {name: summary(r) | _inside_tasks(runs[name]) for name, r in rates.items()}
    ceiling = result[CEILING]["median_tasks_per_s"]
    for info in result.values():
        info["fraction_of_ceiling"] = info["median_tasks_per_s"] / ceiling
    # The machine's speed drifts by tens of percent within a minute: each run is
    # set against the mean of the two ceiling runs around it, a steadier ratio.
    around = [(a + b) / 2 for a, b in itertools.pairwise(rates[CEILING])]
    paired = {
        f"{name} / {CEILING}": statistics.median(
            r / c for r, c in zip(rates[name], around, strict=True)
        )
        for name in systems
    }
    return {
        "tasks": n,
        "workers": WORKERS,
        "repeat": repeat,
        "spin_iterations": iterations,
        "task_ms_measured": seconds * 1000,
        "ideal_tasks_per_s": WORKERS / seconds,
        "task_ms_in_ceiling_runs": WORKERS / ceiling * 1000,  # how long a task really took
        "systems": result,
        "ratios": {
            **{f"{pq} / {CPU_PPE}": median_ratio(result, pq, CPU_PPE, "tasks") for pq in CPU_PQ},
            **{f"{name} / {CEILING}": result[name]["fraction_of_ceiling"] for name in systems},
        },
        "paired_ratios": paired,
        # What a pool costs at equal task speed: its workers' share of time
        # inside tasks against the ceiling's (tasks/s also moves with how fast
        # the loop happens to run in each system's processes: task_cpu_ms).
        "task_share_ratios": {
            f"{name} / {CEILING}": result[name]["task_share"] / result[CEILING]["task_share"]
            for name in systems
        },
    }


def _recorded(
    run: Callable[[], baselines.CpuRun], into: list[baselines.CpuRun]
) -> Callable[[], float]:
    """``run`` as ``interleaved`` times it (its seconds), keeping each whole run in ``into``."""

    def seconds() -> float:
        done = run()
        into.append(done)
        return done.seconds

    return seconds


def _inside_tasks(runs: list[baselines.CpuRun]) -> dict[str, float]:
    """How the workers' time went, medians over the runs: ``task_share``, the
    share of the workers' wall time spent inside a task (what the pool leaves
    to its tasks: the rest went to the pool, the start and the last tasks'
    imbalance); ``task_cpu_ms``, a task's CPU time (how fast the task itself
    ran in that system's processes)."""
    return {
        "task_share": statistics.median(r.task_wall / (WORKERS * r.seconds) for r in runs),
        "task_cpu_ms": statistics.median(r.task_cpu / r.tasks * 1000 for r in runs),
    }


def run_latency(workdir: Path, samples: int, repeat: int) -> dict[str, Any]:
    """One idle worker each; the Pool is created once for the section (not timed)."""
    spec = DaemonSpec("latency", concurrency=1)
    with daemon(workdir, spec) as socket_path, procqueue.Pool(workers=1) as pool:
        systems: dict[str, Callable[[], list[float]]] = {
            LAT_PQ: lambda: pq_latency(socket_path, samples),
            LAT_RUN: lambda: pq_latency(socket_path, samples, one_request=True),
            LAT_POOL: lambda: pool_latency(pool, samples),
            LAT_PPE: lambda: baselines.ppe_latency(samples),
            LAT_STAMP: lambda: pq_start_latency(socket_path, samples),
        }
        runs = interleaved_samples("latency", systems, repeat)
    result = {name: latency_summary(r, round_trip=name != LAT_STAMP) for name, r in runs.items()}
    p50 = {name: info["p50_us"] for name, info in result.items()}
    return {
        "samples_per_run": samples,
        "systems": result,
        "ratios": {
            f"{LAT_PQ} p50 / {LAT_PPE} p50": p50[LAT_PQ] / p50[LAT_PPE],
            f"{LAT_RUN} p50 / {LAT_PPE} p50": p50[LAT_RUN] / p50[LAT_PPE],
            f"{LAT_POOL} p50 / {LAT_PPE} p50": p50[LAT_POOL] / p50[LAT_PPE],
            f"{LAT_STAMP} p50 / {LAT_PQ} p50": p50[LAT_STAMP] / p50[LAT_PQ],
        },
    }


def run_brokers(workdir: Path, n: int, repeat: int, samples: int) -> dict[str, Any]:
    """procqueue, ProcessPoolExecutor, Celery and Dramatiq interleaved; every worker warm."""
    per_run = -(-samples // repeat)
    with contextlib.ExitStack() as stack:
        fleet = stack.enter_context(brokers.fleet(workdir))
        sockets = {
            label: stack.enter_context(daemon(workdir, DaemonSpec(name, prefetch=prefetch)))
            for label, (name, prefetch) in BROKER_PQ.items()
        }
        lat_socket = stack.enter_context(
            daemon(workdir, DaemonSpec("brokers-latency", concurrency=1))
        )
        for socket_path in sockets.values():
            pq_throughput(socket_path, "noop", min(n, 500), None)  # warm-up
        systems: dict[str, Callable[[], float]] = {
            label: functools.partial(pq_throughput, path, "noop", n, None)
            for label, path in sockets.items()
        }
        systems |= {
            PPE: lambda: baselines.ppe_throughput(handlers.noop_plain, None, n, WORKERS),
            CELERY: lambda: fleet.celery_run("default", n),
            CELERY_FAIR: lambda: fleet.celery_run("fair", n),
            DRAMATIQ: lambda: fleet.dramatiq_run(n),
        }
        rates = interleaved("brokers", systems, n, repeat)
        latency_systems: dict[str, Callable[[], list[float]]] = {
            LAT_CELERY: lambda: fleet.celery_latency(per_run),
            LAT_PQ: lambda: pq_latency(lat_socket, per_run),
        }
        latency_runs = interleaved_samples("brokers latency", latency_systems, repeat)
    result = {name: summary(r) for name, r in rates.items()}
    others = [name for name in result if name not in BROKER_PQ]
    latency = {name: latency_summary(r) for name, r in latency_runs.items()}
    return {
        "tasks": n,
        "workers": WORKERS,
        "redis": f"{brokers.REDIS_HOST}:{brokers.REDIS_PORT}",
        "versions": brokers.versions(),
        "systems": result,
        "ratios": {
            f"{pq} / {other}": median_ratio(result, pq, other, "tasks")
            for pq in BROKER_PQ
            for other in others
        },
        "latency": {
            "samples_per_run": per_run,
            "systems": latency,
            "ratios": {
                f"{LAT_CELERY} p50 / {LAT_PQ} p50": latency[LAT_CELERY]["p50_us"]
                / latency[LAT_PQ]["p50_us"]
            },
        },
    }


# ------------------------------------------------------------------ output


def render_noop(section: dict[str, Any], runs: str) -> list[str]:
    title = (
        f"1. no-op tasks: N={section['tasks']:,}, {WORKERS} workers, "
        f"publish_many batches of {BATCH}; {runs}"
    )
    return [
        *throughput_table(title, section),
        "  medians of the ratios of the runs of one repetition (neighbours in time):",
        *(f"    {name}: {ratio_text(value)}" for name, value in section["paired_ratios"].items()),
    ]


def render_cpu(section: dict[str, Any], runs: str) -> list[str]:
    runs = f"{section['repeat']} run(s) each, interleaved"  # its own --cpu-repeat
    title = (
        f"2. CPU-bound tasks: N={section['tasks']}, {WORKERS} workers, "
        f"spin({section['spin_iterations']:,}) = {section['task_ms_measured']:.1f} ms alone, "
        f"so {WORKERS} x 1/task = {section['ideal_tasks_per_s']:.0f}/s "
        f"(in the ceiling runs a task took {section['task_ms_in_ceiling_runs']:.1f} ms); {runs}"
    )
    paired = section.get("paired_ratios", {})
    inside = [
        f"    {name}: {info['task_share']:.1%} inside, a task {info['task_cpu_ms']:.2f} ms of CPU"
        for name, info in section["systems"].items()
    ]
    return [
        *throughput_table(title, section, ceiling=True),
        "  medians of the ratios of each run to the mean of the ceiling runs before and after it:",
        *(f"    {name}: {ratio_text(value)}" for name, value in paired.items()),
        "  share of the workers' wall time spent inside a task, and a task's own CPU time",
        "  (medians over the runs; the rest of a pool's time went to the pool itself):",
        *inside,
        "  that share against the ceiling's (what the pool costs, whatever the task's speed):",
        *(
            f"    {name}: {ratio_text(value)}"
            for name, value in section.get("task_share_ratios", {}).items()
        ),
    ]


def render_latency(section: dict[str, Any], runs: str) -> list[str]:
    title = (
        f"3. latency, one idle worker: {section['samples_per_run']} samples per run; {runs}; "
        "the one-way line compares time.time() before publish with the handler's"
    )
    return latency_table(title, section)


def render_pool(section: dict[str, Any], runs: str) -> list[str]:
    title = (
        f"4. procqueue.Pool(workers={WORKERS}) (default config: prefetch "
        f"{section['pool_prefetch']}; created once for the section, not timed): "
        f"run N={section['run_tasks']:,}; map M={section['map_items']:,} "
        f"chunksize={section['chunksize']}; {runs}"
    )
    return throughput_table(title, section)


def render_rss(section: dict[str, Any], runs: str) -> list[str]:
    title = (
        f"5. supervisor RSS, tasks piling up behind one held worker: up to "
        f"{section['tasks']:,} tasks in batches of {section['batch']:,}, sampled every "
        f"{section['every']:,}; one run per store"
    )
    return rss_table(title, section)


def render_transport(section: dict[str, Any], runs: str) -> list[str]:
    title = (
        f"6. transport, one way between two forked processes: {section['frames']:,} frames "
        f"of 100 B, {section['large_frames']:,} of 4 KiB; {runs}"
    )
    return transport_table(title, section)


def render_brokers(section: dict[str, Any], runs: str) -> list[str]:
    v = section["versions"]
    title = (
        f"7. brokers, no-op tasks: N={section['tasks']:,}, {WORKERS} workers each; "
        f"Celery {v['celery']}, Dramatiq {v['dramatiq']}, Redis {v['redis-server']} at "
        f"{section['redis']}; {runs}"
    )
    latency = section["latency"]
    latency_title = (
        f"  round trip, one idle worker each: {latency['samples_per_run']} samples per run"
    )
    return [*throughput_table(title, section), *latency_table(latency_title, latency)]


SKIPPED_TITLES = {"brokers": "7. brokers (Celery, Dramatiq on Redis)"}

RENDER: dict[str, Callable[[dict[str, Any], str], list[str]]] = {
    "noop": render_noop,
    "cpu": render_cpu,
    "latency": render_latency,
    "pool": render_pool,
    "rss": render_rss,
    "transport": render_transport,
    "brokers": render_brokers,
}


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    runs = f"{meta['repeat']} run(s) each, interleaved"
    lines = [
        f"procqueue benchmark  {meta['revision'] or 'unknown revision'}  "
        f"python {meta['python']}  {meta['cpus']} CPUs  {meta['machine']}",
    ]
    for name in SECTIONS:
        if name in results:
            lines += ["", *RENDER[name](results[name], runs)]
        elif name in meta.get("skipped", {}):
            lines += ["", f"{SKIPPED_TITLES[name]}: skipped, {meta['skipped'][name]}"]
    seconds = ", ".join(f"{k} {v:.0f}" for k, v in meta["section_seconds"].items())
    lines += ["", f"wall time per section (s): {seconds}"]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def git_revision() -> str:
    """HEAD's short hash, "+dirty" if procqueue/ has uncommitted changes; "" without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "procqueue"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return ""
    return head + ("+dirty" if head and dirty else "")


SIZES = (
    "tasks",
    "cpu_tasks",
    "latency_samples",
    "map_items",
    "rss_tasks",
    "frames",
    "broker_tasks",
    "broker_latency_samples",
    "repeat",
    "cpu_repeat",
)
QUICK = {
    "tasks": 300,
    "cpu_tasks": 10,
    "latency_samples": 20,
    "map_items": 5_000,
    "rss_tasks": 20_000,
    "frames": 5_000,
    "broker_tasks": 200,
    "broker_latency_samples": 20,
    "repeat": 1,
    "cpu_repeat": 1,
}


def parse_sections(value: str) -> list[str]:
    chosen = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown) or '(none)'}; choose from {','.join(SECTIONS)}"
        )
    return [s for s in SECTIONS if s in chosen]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="procqueue throughput and latency benchmark"
    )
    add = parser.add_argument
    add("-n", "--tasks", type=int, default=30_000, help="no-op tasks per run (also Pool.run)")
    add("--cpu-tasks", type=int, default=200, help="CPU-bound tasks per run")
    add("--latency-samples", type=int, default=300, help="round trips per run")
    add("--map-items", type=int, default=500_000, help="items per Pool.map / imap run")
    add("--rss-tasks", type=int, default=1_000_000, help="tasks published in the RSS section")
    add("--frames", type=int, default=200_000, help="100 B frames per transport run (4 KiB: /4)")
    add("--broker-tasks", type=int, default=5_000, help="no-op tasks per run, brokers section")
    add(
        "--broker-latency-samples",
        type=int,
        default=200,
        help="round trips in all (split across the runs), brokers section",
    )
    add("--repeat", type=int, default=5, help="runs of each system")
    add(
        "--cpu-repeat",
        type=int,
        default=15,
        help="runs of each system in the cpu section (a 5%% target under 20%% noise)",
    )
    add("--quick", action="store_true", help="tiny sizes, one run (smoke test)")
    add(
        "--sections",
        type=parse_sections,
        help=f"{','.join(SECTIONS)} (default: all; brokers only if Redis and its clients are here)",
    )
    add("--json", type=Path, metavar="PATH", help="write all results as JSON")
    add("--chart", type=Path, metavar="PATH", help="write a PNG chart (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    for name in SIZES:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    args.skipped = {}
    if args.sections is None:
        args.sections = list(SECTIONS)
        if reason := brokers.unavailable():
            args.sections.remove("brokers")
            args.skipped["brokers"] = reason
    elif "brokers" in args.sections and (reason := brokers.unavailable()):
        parser.error(f"section brokers cannot run: {reason}")
    return args


def run_section(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    if name == "noop":
        return run_noop(workdir, args.tasks, args.repeat)
    if name == "cpu":
        return run_cpu(workdir, args.cpu_tasks, args.cpu_repeat)
    if name == "latency":
        return run_latency(workdir, args.latency_samples, args.repeat)
    if name == "pool":
        return run_pool(args.tasks, args.map_items, args.repeat)
    if name == "rss":
        return run_rss(workdir, args.rss_tasks)
    if name == "brokers":
        return run_brokers(workdir, args.broker_tasks, args.repeat, args.broker_latency_samples)
    return run_transport(args.frames, args.repeat)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pqb", dir="/tmp"))
    meta: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "cpu_repeat": args.cpu_repeat,
        "quick": args.quick,
        "sections": args.sections,
        "skipped": args.skipped,
        "start_method": CTX.get_start_method(),
        "revision": git_revision(),
        "section_seconds": {},
    }
    results: dict[str, Any] = {"meta": meta}
    try:
        for name in args.sections:
            print(f"section {name}", file=sys.stderr)
            start = time.monotonic()
            results[name] = run_section(name, args, workdir)
            meta["section_seconds"][name] = time.monotonic() - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    if args.chart is not None:
        from .chart import write_chart

        write_chart(results, args.chart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
