"""One run of the CPU section in a new interpreter.

Usage: ``python -m benchmarks.fresh KIND N ITERATIONS WORKERS [WAKER]``.

How fast a process runs the spin loop depends on where its memory landed,
which is drawn anew at every exec (address-space randomisation, and which
physical pages it gets) and inherited by its forks: the same loop ran at
8.85-9.44 ms of CPU in separately started interpreters here, and slower in
each of six tries with randomisation turned off (``setarch -R``). Forked from the
benchmark process, the ceiling's children and ``ProcessPoolExecutor``'s
workers would share one draw for a whole sitting, as a long-lived daemon's
workers would: each system's median would then weigh one draw against
another. Run from here (and procqueue on a new daemon each time), every
system gets a new draw per repetition.

KIND is ``ceiling`` (``baselines.fork_ceiling``; WAKER seconds between the
waker's wake-ups, 0 for none) or ``ppe`` (``baselines.ppe_results``). Prints
the run as a JSON ``baselines.CpuRun``; the interpreter's start is not timed.
"""

from __future__ import annotations

import subprocess
import sys

import orjson

from . import baselines, handlers
from .daemons import ROOT, RUN_TIMEOUT

KINDS = ("ceiling", "ppe")


def run(kind: str, n: int, iterations: int, workers: int, waker: float = 0.0) -> baselines.CpuRun:
    """The run, in this process."""
    if kind == "ceiling":
        return baselines.fork_ceiling(n, iterations, workers, waker)
    if kind == "ppe":
        seconds, results = baselines.ppe_results(handlers.cpu_plain, iterations, n, workers)
        return baselines.CpuRun.of(seconds, results)
    raise ValueError(f"unknown kind {kind!r}; expected one of: {', '.join(KINDS)}")


def in_new_interpreter(
    kind: str, n: int, iterations: int, workers: int, waker: float = 0.0
) -> baselines.CpuRun:
    """``run`` in a freshly started ``python -m benchmarks.fresh``."""
    args = [sys.executable, "-m", "benchmarks.fresh", kind, str(n), str(iterations)]
    args += [str(workers), repr(waker)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, timeout=RUN_TIMEOUT, check=False)
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace")
        raise RuntimeError(f"benchmarks.fresh {kind} exited {done.returncode}: {why}")
    return baselines.CpuRun(**orjson.loads(done.stdout))


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5) or argv[0] not in KINDS:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    kind, n, iterations, workers = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    waker = float(argv[4]) if len(argv) == 5 else 0.0
    done = run(kind, n, iterations, workers, waker)
    sys.stdout.buffer.write(orjson.dumps(done._asdict()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
