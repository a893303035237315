"""procqueue.reload: what is watched, the change filter, and the watcher process end to end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from watchfiles import Change

from procqueue.config import load_config
from procqueue.reload import (
    WatchState,
    child_command,
    exit_status,
    is_relevant,
    run_with_reloader,
    watch_dirs,
    watched_paths,
)

# ------------------------------------------------------------------ helpers


def write_config(path: Path, handlers: dict[str, str], pythonpath: Path) -> Path:
    lines = [
        "[procqueue]",
        f"pythonpath = [{json.dumps(str(pythonpath))}]",
        'socket = "pq.sock"',
        "",
        '[queues."default".handlers]',
        *(f"{json.dumps(ttype)} = {json.dumps(target)}" for ttype, target in handlers.items()),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def make_package(root: Path, name: str = "rlpkg") -> Path:
    """A package whose import would fail loudly: watched_paths must never import it."""
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "handlers.py").write_text("raise RuntimeError('imported by the reloader')\n")
    return pkg


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def holds(predicate: Callable[[], bool], seconds: float) -> bool:
    """True if ``predicate`` stays true for ``seconds`` (a negative check needs a window)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.02)
    return predicate()


# ----------------------------------------------------------- watched_paths


def test_watched_paths_package_dir_and_config(tmp_path: Path) -> None:
    pkg = make_package(tmp_path)
    config = load_config(
        write_config(tmp_path / "etc" / "app.toml", {"t": "rlpkg.handlers:run"}, tmp_path)
    )
    paths = watched_paths(config)
    assert paths == [config.path, pkg]
    assert "rlpkg" not in sys.modules and "rlpkg.handlers" not in sys.modules


def test_watched_paths_unknown_module_falls_back_to_pythonpath(tmp_path: Path) -> None:
    pkg = make_package(tmp_path)
    handlers = {"t": "rlpkg.handlers:run", "u": "rl_nowhere.mod:run"}
    config = load_config(write_config(tmp_path / "etc" / "app.toml", handlers, tmp_path))
    assert watched_paths(config) == [config.path, tmp_path, pkg]


def test_watched_paths_single_module_and_libraries(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "rlmod.py").write_text("raise RuntimeError('imported')\n")
    handlers = {"a": "rlmod:run", "b": "json:dumps", "c": "sys:exit"}
    config = load_config(write_config(tmp_path / "app.toml", handlers, tmp_path / "src"))
    # a single-file module: its directory; stdlib and built-in modules: nothing
    assert watched_paths(config) == [config.path, tmp_path / "src"]
    assert "rlmod" not in sys.modules


def test_watch_dirs_walks_trees_and_skips_junk(tmp_path: Path) -> None:
    pkg = make_package(tmp_path)
    for sub in ("sub/deeper", "__pycache__", ".git/objects", "venv/lib", "x.egg-info"):
        (pkg / sub).mkdir(parents=True)
    (pkg / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    config_file = tmp_path / "etc" / "app.toml"
    (config_file.parent / "nested").mkdir(parents=True)
    dirs = watch_dirs(config_file, [pkg, tmp_path / "missing"])
    assert dirs == [config_file.parent, pkg, pkg / "sub", pkg / "sub" / "deeper"]


# ------------------------------------------------------------------ filter


@pytest.mark.parametrize(
    ("name", "relevant"),
    [
        ("pkg/handlers.py", True),
        ("pkg/sub/__init__.py", True),
        ("pkg/__pycache__/handlers.cpython-311.pyc", False),
        ("pkg/__pycache__/x.py", False),
        ("pkg/handlers.pyc", False),
        (".git/x", False),
        (".git/hooks/x.py", False),
        ("pkg/x.py.swp", False),
        ("pkg/.x.py.swx", False),
        ("pkg/.#x.py", False),
        ("pkg/#x.py#", False),
        ("pkg/4913", False),
        ("pkg/x~", False),
        ("pkg/x.py~", False),
        ("pkg/notes.txt", False),
        ("app.toml", True),
        ("other.toml", False),
    ],
)
def test_is_relevant(tmp_path: Path, name: str, relevant: bool) -> None:
    config_file = tmp_path / "app.toml"
    for change in (Change.added, Change.modified, Change.deleted):
        assert is_relevant(change, str(tmp_path / name), config_file) is relevant


# ------------------------------------------------------------ the step


def test_on_batch_reports_and_restarts_when_the_layout_changes(tmp_path: Path) -> None:
    pkg = make_package(tmp_path)
    config_file = write_config(tmp_path / "app.toml", {"t": "rlpkg.handlers:run"}, tmp_path)
    state = WatchState(load_config(config_file))
    assert state.dirs == [tmp_path, pkg]
    handlers = str(pkg / "handlers.py")
    assert state.on_batch({(Change.modified, handlers)}) == ([handlers], False)
    assert state.on_batch({(Change.added, str(pkg / "handlers.pyc"))}) == ([], False)
    (pkg / "__pycache__").mkdir()
    assert state.on_batch({(Change.added, str(pkg / "__pycache__"))}) == ([], False)
    (pkg / "sub").mkdir()
    assert state.on_batch({(Change.added, str(pkg / "sub"))}) == ([str(pkg / "sub")], True)
    assert pkg / "sub" in state.dirs
    (pkg / "sub").rmdir()
    assert state.on_batch({(Change.deleted, str(pkg / "sub"))}).restart
    assert state.dirs == [tmp_path, pkg]


def test_on_batch_rereads_the_config(tmp_path: Path) -> None:
    make_package(tmp_path)
    other = make_package(tmp_path, "rlother")
    config_file = write_config(tmp_path / "etc" / "app.toml", {"t": "rlpkg.handlers:run"}, tmp_path)
    state = WatchState(load_config(config_file))
    write_config(config_file, {"t": "rlother.handlers:run"}, tmp_path)
    batch = state.on_batch({(Change.modified, str(config_file))})
    assert batch == ([str(config_file)], True)
    assert state.paths == [config_file, other]
    assert state.dirs == [config_file.parent, other]
    # an invalid config: reloaded (the supervisor rejects it), the paths stay
    config_file.write_text("[procqueue]\nnot_a_key = 1\n")
    assert state.on_batch({(Change.modified, str(config_file))}) == ([str(config_file)], False)
    assert state.paths == [config_file, other]


def test_child_command_and_exit_status() -> None:
    assert child_command("app.toml", ["--reload", "--log-level", "debug"]) == [
        sys.executable,
        "-m",
        "procqueue.cli",
        "run",
        "app.toml",
        "--log-level",
        "debug",
    ]
    assert exit_status(0) == 0
    assert exit_status(3) == 3
    assert exit_status(-signal.SIGKILL) == 128 + signal.SIGKILL


# ------------------------------------------------------- the whole watcher


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("script", "status"),
    [("import sys; sys.exit(3)", 3), ("import os; os.kill(os.getpid(), 9)", 137)],
)
def test_run_with_reloader_returns_the_daemons_status(
    tmp_path: Path, script: str, status: int
) -> None:
    make_package(tmp_path)
    config = write_config(tmp_path / "app.toml", {"t": "rlpkg.handlers:run"}, tmp_path)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGCHLD)}
    assert run_with_reloader(str(config), [], command=[sys.executable, "-c", script]) == status
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert signal.set_wakeup_fd(-1) == -1


FAKE_DAEMON = r"""
import os, signal, sys, time
record, parent = sys.argv[1], os.getppid()

def note(line):
    with open(record, "a") as file:
        file.write(line + "\n")

def on_term(signum, frame):
    note("TERM")
    sys.exit(7)

signal.signal(signal.SIGHUP, lambda signum, frame: note("HUP"))
signal.signal(signal.SIGTERM, on_term)
note(f"READY {os.getpid()}")
while os.getppid() == parent:  # an orphan (its watcher died) ends itself
    time.sleep(0.05)
"""

WATCHER = r"""
import logging, sys
from procqueue.reload import run_with_reloader
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
config, daemon, record = sys.argv[1:]
sys.exit(run_with_reloader(config, [], command=[sys.executable, "-c", daemon, record]))
"""


def _lines(record: Path) -> list[str]:
    return record.read_text().splitlines() if record.exists() else []


def _hups(record: Path) -> int:
    return _lines(record).count("HUP")


def _settled(record: Path, quiet: float = 1.0) -> int:
    """The SIGHUP count once no new one came for ``quiet`` seconds."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        count = _hups(record)
        if holds(lambda count=count: _hups(record) == count, quiet):
            return count
    raise AssertionError("SIGHUPs kept coming")


def _arm(probe: Path, record: Path) -> None:
    """Edit a watched file until a SIGHUP proves the watch is live, then let it settle."""
    deadline = time.monotonic() + 20
    while _hups(record) == 0:
        assert time.monotonic() < deadline, "the watcher never reacted"
        probe.write_text(f"# {time.monotonic()}\n")
        holds(lambda: _hups(record) == 0, 1.0)
    _settled(record)


@pytest.mark.timeout(60)
def test_reloader_end_to_end(tmp_path: Path) -> None:
    pkg = make_package(tmp_path)
    config = write_config(tmp_path / "app.toml", {"t": "rlpkg.handlers:run"}, tmp_path)
    record, errors = tmp_path / "daemon.record", tmp_path / "watcher.err"
    with errors.open("wb") as stderr:
        watcher = subprocess.Popen(
            [sys.executable, "-c", WATCHER, str(config), FAKE_DAEMON, str(record)],
            cwd=tmp_path,
            stderr=stderr,
            start_new_session=True,
        )
    daemon_pid = 0
    try:
        wait_for(lambda: any(line.startswith("READY") for line in _lines(record)), "the daemon")
        daemon_pid = int(_lines(record)[0].split()[1])
        _arm(pkg / "probe.py", record)

        # two saves in quick succession: one debounced reload (two at worst)
        base = _hups(record)
        (pkg / "handlers.py").write_text("def run(ctx, task): return 1\n")
        time.sleep(0.03)
        (pkg / "handlers.py").write_text("def run(ctx, task): return 2\n")
        wait_for(lambda: _hups(record) > base, "a reload")
        assert 1 <= _settled(record) - base <= 2

        # compiled and editor files: no reload
        base = _hups(record)
        (pkg / "__pycache__").mkdir()
        (pkg / "__pycache__" / "handlers.cpython-311.pyc").write_bytes(b"\0")
        (pkg / "handlers.pyc").write_bytes(b"\0")
        (pkg / ".handlers.py.swp").write_bytes(b"\0")
        assert holds(lambda: _hups(record) == base, 1.5)

        # the config saved the way editors do (a new file renamed over it): one reload
        staged = tmp_path / "app.toml.new"
        staged.write_text(config.read_text() + "# edited\n")
        os.replace(staged, config)
        wait_for(lambda: _hups(record) > base, "a reload for the config")

        # SIGTERM is forwarded; the watcher exits with the daemon's code
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=20) == 7
        assert _lines(record)[-1] == "TERM"
        log = errors.read_text()
        assert "rlpkg/handlers.py" in log
        assert "app.toml changed" in log
    finally:
        if watcher.poll() is None:
            os.killpg(watcher.pid, signal.SIGKILL)
            watcher.wait()
        if daemon_pid and "TERM" not in _lines(record):  # else it exited: its pid is free
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon_pid, signal.SIGKILL)
