"""procqueue against ``ProcessPoolExecutor``, ``multiprocessing.Pool`` and bare forks.

Run from the repository root::

    python -m benchmarks                  # full run, under a minute on 2 cores
    python -m benchmarks --quick          # tiny sizes, one repetition (smoke test)
    python -m benchmarks --json r.json    # also write every figure as JSON

Three sections; inside each, the systems are measured interleaved
(A B C, A B C, ...) ``--repeat`` times on the same machine in the same run:

1. no-op tasks, 2 workers: the procqueue daemon (memory store, prefetch 0 and
   prefetch 8, ``buffer_size`` large enough that publish never pushes back),
   fed with ``Client.publish_many`` in batches, timed from the first publish
   until ``Client.wait`` returns the last task and ``status()`` then counts
   every task succeeded (re-polled every 2 ms if one is still running); versus
   ``ProcessPoolExecutor(2).submit`` per task and
   ``multiprocessing.Pool(2).imap_unordered(..., chunksize=1)``.
2. CPU-bound ~10 ms tasks (a pure-Python loop calibrated once here), 2
   workers: procqueue versus ``ProcessPoolExecutor(2)`` versus a bare-fork
   ceiling (2 forked processes running N/2 tasks each, no transport).
3. latency with one idle worker: publish one task and ``Client.wait`` for it,
   versus ``ProcessPoolExecutor(1).submit(...).result()``; p50/p99 in µs.

Each procqueue configuration runs in its own daemon (``procqueue.cli run``
on a temporary config), all started up front and stopped with SIGTERM at the
end; an idle daemon sleeps on its sockets, so it does not disturb the others.
Pools are created, warmed up, then timed; startup is never timed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from procqueue import Client, QueueTask, QueueTaskStatus

from . import handlers

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "bench"
WORKERS = 2
BUFFER_SIZE = 1_000_000
BATCH = 1000
READY_TIMEOUT = 10.0
RUN_TIMEOUT = 300.0
CTX = multiprocessing.get_context("fork")  # procqueue forks its workers too

NOOP_PQ0 = "procqueue prefetch=0"
NOOP_PQ8 = "procqueue prefetch=8"
NOOP_SQLITE = "procqueue sqlite prefetch=8"
PPE = "ProcessPoolExecutor(2).submit"
MP_POOL = "multiprocessing.Pool(2).imap_unordered"
CPU_PQ = "procqueue"
CPU_PPE = "ProcessPoolExecutor(2).submit"
CEILING = "bare fork ceiling"
LAT_PQ = "procqueue publish+wait"
LAT_PPE = "ProcessPoolExecutor(1).submit().result()"


# ------------------------------------------------------------------ the daemon


def write_config(
    workdir: Path, name: str, concurrency: int, prefetch: int, store: str = "memory"
) -> tuple[Path, Path]:
    """A daemon config with one queue ``bench`` running both handlers."""
    socket_path = workdir / f"{name}.sock"
    config = workdir / f"{name}.toml"
    config.write_text(
        f"""[procqueue]
store = {json.dumps(store)}
socket = {json.dumps(str(socket_path))}
pythonpath = [{json.dumps(str(ROOT))}]
shutdown_timeout = "10s"
log_level = "warning"

[queues."{QUEUE}"]
concurrency = {concurrency}
prefetch = {prefetch}
buffer_size = {BUFFER_SIZE}

[queues."{QUEUE}".handlers]
"noop" = "benchmarks.handlers:noop"
"cpu10ms" = "benchmarks.handlers:cpu10ms"
"""
    )
    return config, socket_path


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(proc: subprocess.Popen[bytes], socket_path: Path, log: Path) -> None:
    """Until the daemon answers ``ping`` and every worker has booted."""
    deadline = time.monotonic() + READY_TIMEOUT
    pinged = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            with Client(socket_path, timeout=5) as client:
                client.ping()
                pinged = True
                workers = client.status()["queues"][QUEUE]["workers"]
        except Exception:
            time.sleep(0.02)
            continue
        if all(w["state"] == "idle" for w in workers):
            return
        time.sleep(0.02)
    what = "workers not idle" if pinged else "no answer to ping"
    raise RuntimeError(f"daemon not ready after {READY_TIMEOUT:g}s ({what}):\n{log_tail(log)}")


def stop_daemon(proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    """SIGTERM and wait; SIGKILL the group if it does not exit (and say so)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    try:
        code = proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        print(f"warning: daemon {name} ignored SIGTERM for 15s:\n{log_tail(log)}", file=sys.stderr)
        return
    took = time.monotonic() - start
    logged = log.exists() and log.stat().st_size > 0  # log_level "warning": normally empty
    if code != 0 or took > 2.0 or logged:
        print(
            f"warning: daemon {name} exited {code} {took:.1f}s after SIGTERM; its log:\n"
            f"{log_tail(log)}",
            file=sys.stderr,
        )


@contextlib.contextmanager
def daemon(
    workdir: Path, name: str, concurrency: int, prefetch: int, store: str = "memory"
) -> Iterator[Path]:
    """Run a daemon for the duration of the block; yields its socket path."""
    config, socket_path = write_config(workdir, name, concurrency, prefetch, store)
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "procqueue.cli", "run", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        wait_ready(proc, socket_path, log)
        yield socket_path
    finally:
        stop_daemon(proc, name, log)


# ------------------------------------------------------------------ procqueue


def queue_counts(client: Client) -> tuple[int, int]:
    info = client.status()["queues"][QUEUE]
    return int(info["succeeded"]), int(info["failed"])


def pq_throughput(socket_path: Path, task_type: str, n: int, payload: bytes | None) -> float:
    """Seconds from the first publish until ``status()`` counts all n tasks succeeded."""
    with Client(socket_path, timeout=60) as client:
        base_ok, base_failed = queue_counts(client)
        start = time.perf_counter()
        last_id = ""
        for first in range(0, n, BATCH):
            size = min(BATCH, n - first)
            batch = [QueueTask(queue=QUEUE, type=task_type, payload=payload) for _ in range(size)]
            last_id = client.publish_many(batch)[-1].id
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


def pq_latency(socket_path: Path, samples: int, warmup: int = 20) -> list[float]:
    """Round trips (publish one task, wait for it) in seconds."""
    out: list[float] = []
    with Client(socket_path, timeout=30) as client:
        for i in range(warmup + samples):
            start = time.perf_counter()
            stored = client.publish(QueueTask(queue=QUEUE, type="noop"))
            done = client.wait(stored.id, timeout=30)
            elapsed = time.perf_counter() - start
            if done.status is not QueueTaskStatus.SUCCEEDED:
                raise RuntimeError(f"procqueue: latency task {done.status}: {done.last_error}")
            if i >= warmup:
                out.append(elapsed)
    return out


# ------------------------------------------------------------------ baselines


def ppe_throughput(fn: Callable[[Any], None], arg: Any, n: int, workers: int) -> float:
    """Seconds to submit n calls to a warm ProcessPoolExecutor and wait for all."""
    with cf.ProcessPoolExecutor(workers, mp_context=CTX) as pool:
        for future in [pool.submit(handlers.noop_plain) for _ in range(4 * workers)]:
            future.result()
        start = time.perf_counter()
        futures = [pool.submit(fn, arg) for _ in range(n)]
        cf.wait(futures)
        elapsed = time.perf_counter() - start
        for future in futures:
            future.result()
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


def fork_ceiling(n: int, iterations: int, workers: int) -> float:
    """Seconds for ``workers`` forked processes to run n tasks between them, no transport.

    The children are forked first and wait on a pipe, so the fork is not timed
    (as the pools and the daemon are warm when their timing starts).
    """
    shares = [n // workers + (i < n % workers) for i in range(workers)]
    go_r, go_w = os.pipe()
    pids = []
    try:
        for share in shares:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(go_w)
                    if os.read(go_r, 1):
                        for _ in range(share):
                            handlers.cpu_plain(iterations)
                        code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        start = time.perf_counter()
        os.write(go_w, b"g" * workers)
    finally:
        os.close(go_r)
        os.close(go_w)  # a child still waiting (fork failed midway) reads EOF and exits
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"bare fork child exited {os.waitstatus_to_exitcode(status)}")
    return time.perf_counter() - start


def ppe_latency(samples: int, warmup: int = 20) -> list[float]:
    out: list[float] = []
    with cf.ProcessPoolExecutor(1, mp_context=CTX) as pool:
        for i in range(warmup + samples):
            start = time.perf_counter()
            pool.submit(handlers.noop_plain).result()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                out.append(elapsed)
    return out


# ------------------------------------------------------------------ measuring


def calibrate(target: float = handlers.CPU_SECONDS) -> tuple[int, float]:
    """Iterations of ``spin`` that take ``target`` seconds here; and the measured time."""

    def best_of(iterations: int, tries: int = 7) -> float:
        times = []
        for _ in range(tries):
            start = time.perf_counter()
            handlers.spin(iterations)
            times.append(time.perf_counter() - start)
        return min(times)

    iterations = 50_000
    for _ in range(2):  # the second pass corrects the probe's fixed overheads
        iterations = max(1, round(iterations * target / best_of(iterations)))
    return iterations, best_of(iterations)


def interleaved(
    section: str, systems: dict[str, Callable[[], float]], n: int, repeat: int
) -> dict[str, list[float]]:
    """Run each system once per repetition, in turn; tasks/s per run."""
    rates: dict[str, list[float]] = {name: [] for name in systems}
    for rep in range(repeat):
        for name, run in systems.items():
            rate = n / run()
            rates[name].append(rate)
            print(f"  {section} {rep + 1}/{repeat}  {name}: {rate:,.0f} tasks/s", file=sys.stderr)
    return rates


def summary(rates: list[float]) -> dict[str, Any]:
    return {
        "tasks_per_s": rates,
        "median_tasks_per_s": statistics.median(rates),
        "min_tasks_per_s": min(rates),
        "max_tasks_per_s": max(rates),
    }


def percentile(samples: list[float], pct: int) -> float:
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def run_noop(sockets: dict[str, Path], n: int, repeat: int) -> dict[str, Any]:
    for name in ("noop-p0", "noop-p8", "noop-sqlite"):
        pq_throughput(sockets[name], "noop", min(n, 500), None)  # warm-up
    systems: dict[str, Callable[[], float]] = {
        NOOP_PQ0: lambda: pq_throughput(sockets["noop-p0"], "noop", n, None),
        NOOP_PQ8: lambda: pq_throughput(sockets["noop-p8"], "noop", n, None),
        NOOP_SQLITE: lambda: pq_throughput(sockets["noop-sqlite"], "noop", n, None),
        PPE: lambda: ppe_throughput(handlers.noop_plain, None, n, WORKERS),
        MP_POOL: lambda: mp_pool_throughput(n, WORKERS),
    }
    rates = interleaved("no-op", systems, n, repeat)
    result = {name: summary(r) for name, r in rates.items()}
    ratios = {
        f"{pq} / {base}": result[pq]["median_tasks_per_s"] / result[base]["median_tasks_per_s"]
        for pq in (NOOP_PQ0, NOOP_PQ8, NOOP_SQLITE)
        for base in (PPE, MP_POOL)
    }
    ratios[f"{NOOP_SQLITE} / {NOOP_PQ8}"] = (
        result[NOOP_SQLITE]["median_tasks_per_s"] / result[NOOP_PQ8]["median_tasks_per_s"]
    )
    return {"tasks": n, "workers": WORKERS, "batch": BATCH, "systems": result, "ratios": ratios}


def run_cpu(socket_path: Path, n: int, repeat: int) -> dict[str, Any]:
    iterations, seconds = calibrate()
    payload = str(iterations).encode()
    pq_throughput(socket_path, "cpu10ms", min(n, 10), payload)  # warm-up
    systems: dict[str, Callable[[], float]] = {
        CPU_PQ: lambda: pq_throughput(socket_path, "cpu10ms", n, payload),
        CPU_PPE: lambda: ppe_throughput(handlers.cpu_plain, iterations, n, WORKERS),
        CEILING: lambda: fork_ceiling(n, iterations, WORKERS),
    }
    rates = interleaved("cpu", systems, n, repeat)
    result = {name: summary(r) for name, r in rates.items()}
    ceiling = result[CEILING]["median_tasks_per_s"]
    for info in result.values():
        info["fraction_of_ceiling"] = info["median_tasks_per_s"] / ceiling
    return {
        "tasks": n,
        "workers": WORKERS,
        "spin_iterations": iterations,
        "task_ms_measured": seconds * 1000,
        "ideal_tasks_per_s": WORKERS / seconds,
        "systems": result,
        "ratios": {
            f"{CPU_PQ} / {CPU_PPE}": result[CPU_PQ]["median_tasks_per_s"]
            / result[CPU_PPE]["median_tasks_per_s"],
            f"{CPU_PQ} / {CEILING}": result[CPU_PQ]["fraction_of_ceiling"],
        },
    }


def run_latency(socket_path: Path, samples: int, repeat: int) -> dict[str, Any]:
    systems: dict[str, Callable[[], list[float]]] = {
        LAT_PQ: lambda: pq_latency(socket_path, samples),
        LAT_PPE: lambda: ppe_latency(samples),
    }
    pooled: dict[str, list[float]] = {name: [] for name in systems}
    p50s: dict[str, list[float]] = {name: [] for name in systems}
    for rep in range(repeat):
        for name, run in systems.items():
            got = run()
            pooled[name] += got
            p50s[name].append(statistics.median(got) * 1e6)
            print(
                f"  latency {rep + 1}/{repeat}  {name}: p50 {p50s[name][-1]:,.0f} µs",
                file=sys.stderr,
            )
    result: dict[str, dict[str, Any]] = {
        name: {
            "samples": len(values),
            "p50_us": statistics.median(values) * 1e6,
            "p99_us": percentile(values, 99) * 1e6,
            "p50_us_per_run": p50s[name],
            "median_tasks_per_s": 1 / statistics.median(values),
        }
        for name, values in pooled.items()
    }
    ratio = result[LAT_PQ]["p50_us"] / result[LAT_PPE]["p50_us"]
    return {
        "samples_per_run": samples,
        "systems": result,
        "ratios": {f"{LAT_PQ} p50 / {LAT_PPE} p50": ratio},
    }


# ------------------------------------------------------------------ output


def throughput_table(title: str, section: dict[str, Any], ceiling: bool = False) -> list[str]:
    extra = f"  {'of ceiling':>10}" if ceiling else ""
    lines = [
        title,
        f"  {'system':<44}{'median/s':>10}{'min/s':>10}{'max/s':>10}{extra}",
    ]
    for name, info in section["systems"].items():
        row = (
            f"  {name:<44}{info['median_tasks_per_s']:>10,.0f}"
            f"{info['min_tasks_per_s']:>10,.0f}{info['max_tasks_per_s']:>10,.0f}"
        )
        if ceiling:
            row += f"  {info['fraction_of_ceiling']:>10.1%}"
        lines.append(row)
    lines += ["  ratios of medians:"]
    lines += [f"    {name}: {value:.2f}x" for name, value in section["ratios"].items()]
    return lines


def latency_table(title: str, section: dict[str, Any]) -> list[str]:
    lines = [title, f"  {'system':<44}{'p50 µs':>10}{'p99 µs':>10}  p50 per run µs"]
    for name, info in section["systems"].items():
        runs = ", ".join(f"{v:,.0f}" for v in info["p50_us_per_run"])
        lines.append(f"  {name:<44}{info['p50_us']:>10,.0f}{info['p99_us']:>10,.0f}  {runs}")
    lines += [f"  {name}: {value:.2f}x" for name, value in section["ratios"].items()]
    return lines


def render(results: dict[str, Any]) -> str:
    meta, noop, cpu, lat = results["meta"], results["noop"], results["cpu"], results["latency"]
    runs = f"{meta['repeat']} run(s) each, interleaved"
    lines = [
        f"procqueue benchmark  {meta['revision'] or 'unknown revision'}  "
        f"python {meta['python']}  {meta['cpus']} CPUs  {meta['machine']}",
        "",
        *throughput_table(
            f"1. no-op tasks: N={noop['tasks']:,}, {WORKERS} workers, "
            f"publish_many batches of {BATCH}; {runs}",
            noop,
        ),
        "",
        *throughput_table(
            f"2. CPU-bound tasks: N={cpu['tasks']}, {WORKERS} workers, "
            f"spin({cpu['spin_iterations']:,}) = {cpu['task_ms_measured']:.1f} ms alone, "
            f"so {WORKERS} x 1/task = {cpu['ideal_tasks_per_s']:.0f}/s; {runs}",
            cpu,
            ceiling=True,
        ),
        "",
        *latency_table(
            f"3. latency, one idle worker: {lat['samples_per_run']} round trips per run; {runs}",
            lat,
        ),
    ]
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="procqueue throughput and latency benchmark"
    )
    parser.add_argument("-n", "--tasks", type=int, default=20_000, help="no-op tasks per run")
    parser.add_argument("--cpu-tasks", type=int, default=200, help="CPU-bound tasks per run")
    parser.add_argument("--latency-samples", type=int, default=300, help="round trips per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each system")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run (smoke test)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write all results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.cpu_tasks, args.latency_samples, args.repeat = 300, 10, 20, 1
    for name in ("tasks", "cpu_tasks", "latency_samples", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pqb", dir="/tmp"))
    results: dict[str, Any] = {
        "meta": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "repeat": args.repeat,
            "quick": args.quick,
            "start_method": CTX.get_start_method(),
            "revision": git_revision(),
        }
    }
    try:
        with contextlib.ExitStack() as stack:
            sockets = {
                "noop-p0": stack.enter_context(daemon(workdir, "noop-p0", WORKERS, 0)),
                "noop-p8": stack.enter_context(daemon(workdir, "noop-p8", WORKERS, 8)),
                "noop-sqlite": stack.enter_context(
                    daemon(workdir, "noop-sqlite", WORKERS, 8, f"sqlite:///{workdir}/bench.db")
                ),
                "cpu": stack.enter_context(daemon(workdir, "cpu", WORKERS, 0)),
                "latency": stack.enter_context(daemon(workdir, "latency", 1, 0)),
            }
            results["noop"] = run_noop(sockets, args.tasks, args.repeat)
            results["cpu"] = run_cpu(sockets["cpu"], args.cpu_tasks, args.repeat)
            results["latency"] = run_latency(sockets["latency"], args.latency_samples, args.repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
