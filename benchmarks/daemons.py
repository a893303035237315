"""Daemons for the benchmark: ``procqueue.cli run`` subprocesses on temporary configs.

Each configuration runs in its own daemon with one queue ``bench`` that knows
every handler of ``benchmarks.handlers``; a section starts the daemons it
needs, and they are stopped with SIGTERM when it ends (a slow or noisy stop
is reported on stderr).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from procqueue import Client

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "bench"
WORKERS = 2
BUFFER_SIZE = 1_000_000
READY_TIMEOUT = 10.0
RUN_TIMEOUT = 300.0
CTX = multiprocessing.get_context("fork")  # procqueue forks its workers too

HANDLERS = {
    "noop": "benchmarks.handlers:noop",
    "cpu10ms": "benchmarks.handlers:cpu10ms",
    "stamp": "benchmarks.handlers:stamp",
    "hold": "benchmarks.handlers:hold",
}


@dataclass(frozen=True, slots=True)
class DaemonSpec:
    """One daemon configuration (``store``: "memory" or "sqlite:///abs/path.db")."""

    name: str
    concurrency: int = WORKERS
    prefetch: int = 0
    store: str = "memory"
    sync: str = "full"
    buffer_size: int = BUFFER_SIZE
    expected_log: str = ""  # a log line containing this is expected at stop, not a warning


def write_config(workdir: Path, spec: DaemonSpec) -> tuple[Path, Path]:
    """A daemon config with one queue ``bench`` running every benchmark handler."""
    socket_path = workdir / f"{spec.name}.sock"
    config = workdir / f"{spec.name}.toml"
    handlers = "\n".join(f'"{t}" = {json.dumps(target)}' for t, target in HANDLERS.items())
    config.write_text(
        f"""[procqueue]
store = {json.dumps(spec.store)}
sync = {json.dumps(spec.sync)}
socket = {json.dumps(str(socket_path))}
pythonpath = [{json.dumps(str(ROOT))}]
shutdown_timeout = "10s"
log_level = "warning"

[queues."{QUEUE}"]
concurrency = {spec.concurrency}
prefetch = {spec.prefetch}
buffer_size = {spec.buffer_size}

[queues."{QUEUE}".handlers]
{handlers}
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


def unexpected_log(log: Path, expected: str) -> bool:
    """Whether the log (level "warning": normally empty) has a line not ``expected``."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return False
    return any(not expected or expected not in line for line in lines)


def stop_daemon(
    proc: subprocess.Popen[bytes], name: str, log: Path, expected_log: str = ""
) -> None:
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
    if code != 0 or took > 2.0 or unexpected_log(log, expected_log):
        print(
            f"warning: daemon {name} exited {code} {took:.1f}s after SIGTERM; its log:\n"
            f"{log_tail(log)}",
            file=sys.stderr,
        )


@contextlib.contextmanager
def daemon(workdir: Path, spec: DaemonSpec) -> Iterator[Path]:
    """Run a daemon for the duration of the block; yields its socket path."""
    config, socket_path = write_config(workdir, spec)
    log = workdir / f"{spec.name}.log"
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
        stop_daemon(proc, spec.name, log, spec.expected_log)
