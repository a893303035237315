"""Section 4: ``procqueue.Pool`` (the engine embedded in this process) against the stdlib.

One ``procqueue.Pool(workers=2)`` (its default config: memory store, the
Pool's own default ``prefetch``, reported) is created for the whole section,
warmed up, and reused by every repetition; its start is never timed. The stdlib
pools are created (and warmed up) inside each run, outside its timing, as in
the no-op section.

* ``pool.run(noop)`` N times, then every ``Task.result()``, versus
  ``ProcessPoolExecutor(2).submit`` N times and every ``Future.result()``.
* ``pool.map(noop, range(M), chunksize=256)`` (results in order) versus
  ``multiprocessing.Pool(2).imap_unordered(noop, range(M), chunksize=256)``
  and, for an ordered twin, ``multiprocessing.Pool(2).imap(...)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import procqueue
from procqueue.embedded import QUEUE as POOL_QUEUE

from . import handlers
from .baselines import ppe_throughput
from .daemons import CTX, RUN_TIMEOUT, WORKERS
from .stats import interleaved, median_ratio, summary

CHUNK = 256
POOL_RUN = f"procqueue.Pool({WORKERS}).run"
PPE_SUBMIT = f"ProcessPoolExecutor({WORKERS}).submit"
POOL_MAP = f"procqueue.Pool({WORKERS}).map(chunksize={CHUNK})"
MP_IMAP_UNORDERED = f"multiprocessing.Pool({WORKERS}).imap_unordered(chunksize={CHUNK})"
MP_IMAP = f"multiprocessing.Pool({WORKERS}).imap(chunksize={CHUNK})"


def pool_run(pool: procqueue.Pool, n: int) -> float:
    """Seconds to ``run`` n no-op calls and collect every result."""
    start = time.perf_counter()
    tasks = [pool.run(handlers.noop_plain) for _ in range(n)]
    for task in tasks:
        task.result(RUN_TIMEOUT)
    return time.perf_counter() - start


def pool_map(pool: procqueue.Pool, m: int) -> float:
    """Seconds for ``map(noop, range(m), chunksize=CHUNK)``, every result consumed."""
    start = time.perf_counter()
    got = sum(1 for _ in pool.map(handlers.noop_plain, range(m), chunksize=CHUNK))
    elapsed = time.perf_counter() - start
    if got != m:
        raise RuntimeError(f"procqueue.Pool.map returned {got} results for {m} items")
    return elapsed


def mp_imap(m: int, ordered: bool) -> float:
    """Seconds for ``imap[_unordered](noop, range(m), chunksize=CHUNK)`` on a warm Pool."""
    with CTX.Pool(WORKERS) as pool:
        imap = pool.imap if ordered else pool.imap_unordered
        for _ in imap(handlers.noop_plain, range(4 * WORKERS), chunksize=1):
            pass
        start = time.perf_counter()
        got = sum(1 for _ in imap(handlers.noop_plain, range(m), chunksize=CHUNK))
        elapsed = time.perf_counter() - start
    if got != m:
        raise RuntimeError(f"multiprocessing.Pool returned {got} results for {m} items")
    return elapsed


def run_pool(n: int, m: int, repeat: int) -> dict[str, Any]:
    with procqueue.Pool(workers=WORKERS) as pool:
        prefetch = pool.config.queues[POOL_QUEUE].prefetch
        pool_run(pool, min(n, 500))  # warm-up: workers resolve the function once
        pool_map(pool, min(m, 10 * CHUNK))
        systems: dict[str, Callable[[], float]] = {
            POOL_RUN: lambda: pool_run(pool, n),
            PPE_SUBMIT: lambda: ppe_throughput(handlers.noop_plain, None, n, WORKERS),
            POOL_MAP: lambda: pool_map(pool, m),
            MP_IMAP_UNORDERED: lambda: mp_imap(m, ordered=False),
            MP_IMAP: lambda: mp_imap(m, ordered=True),
        }
        counts = {POOL_RUN: n, PPE_SUBMIT: n, POOL_MAP: m, MP_IMAP_UNORDERED: m, MP_IMAP: m}
        rates = interleaved("Pool", systems, counts, repeat)
    result = {name: summary(r) for name, r in rates.items()}
    pairs = [(POOL_RUN, PPE_SUBMIT), (POOL_MAP, MP_IMAP_UNORDERED), (POOL_MAP, MP_IMAP)]
    return {
        "run_tasks": n,
        "map_items": m,
        "chunksize": CHUNK,
        "workers": WORKERS,
        "pool_prefetch": prefetch,
        "pool_created": "once for the section (start and warm-up not timed)",
        "systems": result,
        "ratios": {f"{a} / {b}": median_ratio(result, a, b, "tasks") for a, b in pairs},
    }
