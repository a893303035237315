"""Fixtures that run the real daemon as a subprocess on a temporary config."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from procqueue import Client, QueueTask, QueueTaskStatus

TESTS = Path(__file__).resolve().parent

BASE_QUEUES = """
[queues."default"]
concurrency = 2
max_retry = 2
retry_delay = "100ms"
timeout = "20s"
kill_grace = "500ms"

[queues."default".handlers]
"echo" = "pqhandlers:echo"
"stamp" = "pqhandlers:stamp"
"flaky" = "pqhandlers:flaky"
"always_fail" = "pqhandlers:always_fail"
"sleepy" = "pqhandlers:sleepy"
"stubborn" = "pqhandlers:stubborn"
"die_once" = "pqhandlers:die_once"
"digest" = "pqhandlers:digest"
"follow_up" = "pqhandlers:follow_up"
"deadline" = "pqhandlers:deadline"
"async_echo" = "pqhandlers:async_echo"
"""


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    config: Path
    socket: Path
    log: Path
    clients: list[Client] = field(default_factory=list)

    def client(self) -> Client:
        client = Client(self.socket, timeout=30)
        self.clients.append(client)
        return client

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        verb = 2 if args[0] in ("dead", "cron") else 1  # the config follows the (sub)command
        return run_cli(*args[:verb], str(self.config), *args[verb:], timeout=timeout)

    def run_task(self, wait: float = 30, **fields: Any) -> QueueTask:
        client = self.client()
        stored = client.publish(QueueTask(**fields))
        return client.wait(stored.id, timeout=wait)

    def wait_ready(self, timeout: float = 20) -> dict[str, Any]:
        """Until every worker slot has booted (or is crashing): never a bare sleep."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with Client(self.socket, timeout=5) as client:
                    status = client.status()
            except Exception:
                time.sleep(0.02)
                continue
            states = [w["state"] for q in status["queues"].values() for w in q["workers"]]
            if all(s in ("idle", "busy", "crashing") for s in states):
                return status
            time.sleep(0.02)
        raise AssertionError(f"daemon not ready after {timeout}s:\n{self.logs()}")

    def worker_pids(self) -> list[int]:
        status = self.client().status()
        return [w["pid"] for q in status["queues"].values() for w in q["workers"] if w["pid"]]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        for client in self.clients:
            client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise AssertionError(f"daemon ignored signal {sig}:\n{self.logs()}") from None

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "procqueue.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_config(directory: Path, queues: str = BASE_QUEUES, settings: str = "") -> Path:
    config = directory / "app.toml"
    lines = [
        "[procqueue]",
        'socket = "pq.sock"',
        'log_level = "debug"',
        *textwrap.dedent(settings).strip().splitlines(),
    ]
    if "pythonpath" not in settings:
        lines.append(f'pythonpath = ["{TESTS}"]')
    if "store =" not in settings:
        lines.append('store = "memory"')
    if "shutdown_timeout" not in settings:
        lines.append('shutdown_timeout = "10s"')
    config.write_text("\n".join(lines) + "\n" + textwrap.dedent(queues))
    return config


def start_daemon(
    config: Path, env: dict[str, str] | None = None, extra: list[str] | None = None
) -> Daemon:
    log = config.parent / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "procqueue.cli", "run", str(config), *(extra or [])],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    return Daemon(proc, config, config.parent / "pq.sock", log)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pq", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_daemon(short_dir: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(queues: str = BASE_QUEUES, settings: str = "", ready: bool = True) -> Daemon:
        daemon = start_daemon(write_config(short_dir, queues, settings))
        started.append(daemon)
        if ready:
            daemon.wait_ready()
        return daemon

    yield make
    for daemon in started:
        for client in daemon.clients:
            client.close()
        if daemon.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.proc.pid, signal.SIGKILL)
            daemon.proc.wait(10)


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon()


def until(condition: Callable[[], object], timeout: float = 15, message: str = "") -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message or "condition never held"
        time.sleep(0.01)


def finished(task: QueueTask) -> bool:
    return task.status in (QueueTaskStatus.SUCCEEDED, QueueTaskStatus.FAILED)
