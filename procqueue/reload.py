"""Development hot reload: ``procqueue run CONFIG --reload``.

The reloader is its own process role (STYLE.md 1). A small parent process, the
*watcher*, starts the real daemon as a child (``python -m procqueue.cli run
CONFIG ...``: a fresh interpreter, not a fork of the watcher, so the supervisor
stays single-threaded), watches the config file and the handlers' source trees
with :mod:`watchfiles` and, on each debounced batch of changes, sends the daemon
SIGHUP: the supervisor's reload path replaces its workers, which import the new
code after their fork, and no queued task is lost. A change never restarts the
daemon. The watcher forwards SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTTIN and
SIGTTOU, and exits with the daemon's exit status when the daemon exits.

Threads: watchfiles runs in one background thread of the watcher process; the
main thread owns the child (it alone signals and reaps it, so a pid is never
signalled after it was reaped) and sleeps in one selector on the signal wakeup
socket and the thread's reload socket (STYLE.md 2, 3).

The daemon runs in its own process group: a terminal's Ctrl-C reaches only the
watcher, which forwards it once (two SIGINTs would mean a fast stop). If the
watcher is killed with SIGKILL the daemon outlives it; stop it by its pid.

What is watched (:func:`watched_paths`): the config file and, for every
handler ``pkg.mod:attr``, the directory of its top-level package ``pkg`` (or of
the single-file module), found without importing anything; a module that cannot
be found falls back to the ``pythonpath`` directories. Installed libraries
(stdlib, site-packages) are not watched.

How (:func:`watch_dirs`): watchfiles' recursive mode registers every directory
under a root, a project's ``venv`` included, so the watcher walks the trees
itself, skipping hidden, cache and virtualenv directories, and watches that
explicit list non-recursively. The config file is watched through its own
directory alone: editors save by renaming a new file over the old one, and a
watch on the file itself would die with the old inode. When a directory appears
in a tree or a watched one goes, the walk is redone and the watch restarted.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import re
import selectors
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import watchfiles
from watchfiles import Change

from .config import Config, load_config
from .errors import ConfigError

__all__ = [
    "DEBOUNCE_MS",
    "FORWARDED_SIGNALS",
    "Batch",
    "WatchState",
    "child_command",
    "exit_status",
    "is_relevant",
    "run_with_reloader",
    "skip_dir",
    "watch_dirs",
    "watched_paths",
]

log = logging.getLogger("procqueue.reload")

DEBOUNCE_MS = 300  # a burst of saves within this is one reload
STEP_MS = 100  # a quiet gap this long ends a burst early; also the stop latency
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
FORWARDED_SIGNALS += (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
# Never watched, nor reported under (hidden directories are not walked either).
IGNORED_DIRS = frozenset(("__pycache__", ".git", ".hg", ".svn", ".venv", ".tox", ".nox"))
IGNORED_DIRS |= {".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis", ".idea"}
IGNORED_DIRS |= {"node_modules", "site-packages"}
# vim swap files (.swp, .swx, ...) and its write probe "4913"; emacs backups
# "x~", lock files ".#x" and autosaves "#x#"; JetBrains "x___jb_tmp___".
_EDITOR_TEMP = re.compile(r"\.sw.$|~$|^\.#|^#.*#$|^4913$|___jb_\w+___$")
_MAX_LISTED = 10  # changed files named in one log line

_SignalHandler = Callable[[int, FrameType | None], Any] | int | None


# ------------------------------------------------------------- what to watch


def watched_paths(config: Config) -> list[Path]:
    """The config file, then the source roots of the handler modules (sorted, unique).

    Nothing is imported: each handler's top-level module is looked up the way
    the daemon will import it, ``pythonpath`` first, then the working directory
    (``python -m`` puts it on the daemon's path) and this interpreter's path.
    """
    search = [*map(os.fspath, config.settings.pythonpath), os.getcwd(), *sys.path]
    tops = {
        target.partition(":")[0].partition(".")[0]
        for queue in config.queues.values()
        for target in queue.handlers.values()
    }
    roots: set[Path] = set()
    for top in sorted(tops):
        found = _source_roots(top, search)
        if found is None:
            log.warning("reload: cannot find module %r; watching the pythonpath directories", top)
            roots.update(config.settings.pythonpath)
        else:
            roots.update(found)
    return [config.path, *sorted(roots)]


def _source_roots(name: str, search: list[str]) -> list[Path] | None:
    """Directories of top-level module ``name``: None if not found, [] if none to watch."""
    if name in sys.builtin_module_names:
        return []
    spec = PathFinder.find_spec(name, search) or _meta_path_spec(name)
    if spec is None:
        return None
    if spec.submodule_search_locations is not None:  # a package, maybe a namespace one
        roots = [Path(location) for location in spec.submodule_search_locations]
    elif spec.has_location and spec.origin:
        roots = [Path(spec.origin).parent]
    else:
        return []  # frozen: no file
    return [Path(os.path.abspath(root)) for root in roots if not _is_library(root)]


def _meta_path_spec(name: str) -> ModuleSpec | None:
    """Other finders, e.g. setuptools' editable installs (a top-level name imports nothing)."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


@functools.cache
def _library_dirs() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    dirs = [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths]
    dirs.append(site.getusersitepackages())
    return tuple(Path(d).resolve() for d in dirs)


def _is_library(path: Path) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(lib) for lib in _library_dirs())


def watch_dirs(config_file: Path, roots: Iterable[Path]) -> list[Path]:
    """The explicit list of directories to watch, non-recursively (sorted).

    The config file's own directory, and each root with every subdirectory that
    :func:`skip_dir` keeps. Missing directories are left out.
    """
    dirs = {config_file.parent} if config_file.parent.is_dir() else set()
    for root in roots:
        if root.is_dir():
            dirs.update(_tree(root))
    return sorted(dirs)


def _tree(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, _ in os.walk(root):  # symlinks are not followed: no cycles
        yield Path(dirpath)
        dirnames[:] = [name for name in dirnames if not skip_dir(os.path.join(dirpath, name))]


def skip_dir(path: str) -> bool:
    """Directories never worth watching: hidden, caches, virtualenvs, packaging output."""
    name = os.path.basename(path)
    return (
        name.startswith(".")
        or name in IGNORED_DIRS
        or name.endswith(".egg-info")
        or os.path.exists(os.path.join(path, "pyvenv.cfg"))
    )


def is_relevant(change: Change, path: str, config_file: Path) -> bool:
    """Whether a change to ``path`` calls for a reload: the config file or Python source.

    Not compiled files, nothing under a cache or VCS directory, no editor temp
    files. Every kind of change counts: a deleted module matters as an edited one.
    """
    if path == os.fspath(config_file):
        return True
    *parents, name = Path(path).parts
    if IGNORED_DIRS.intersection(parents):
        return False
    return name.endswith(".py") and not _EDITOR_TEMP.search(name)


# ------------------------------------------------------ the watcher's state


class Batch(NamedTuple):
    changed: list[str]  # the paths worth a reload, sorted; empty: no reload
    restart: bool  # the directories changed: watch the new list


class WatchState:
    """What the watcher thread watches; :meth:`on_batch` is its step (no threads needed)."""

    def __init__(self, config: Config) -> None:
        self.config_file = config.path
        self.paths = watched_paths(config)
        self.dirs = watch_dirs(self.config_file, self.paths[1:])

    def accepts(self, change: Change, path: str) -> bool:
        """The ``watch_filter``: relevant files, and directories that appear or go."""
        return is_relevant(change, path, self.config_file) or self._layout_change(change, path)

    def _layout_change(self, change: Change, path: str) -> bool:
        if change == Change.deleted:
            return Path(path) in self.dirs
        return change == Change.added and os.path.isdir(path) and not skip_dir(path)

    def on_batch(self, changes: Iterable[tuple[Change, str]]) -> Batch:
        """Re-read a changed config, re-walk the trees if their layout changed."""
        accepted = [(change, path) for change, path in changes if self.accepts(change, path)]
        changed = sorted({path for _, path in accepted})
        layout = any(self._layout_change(change, path) for change, path in accepted)
        config_changed = os.fspath(self.config_file) in changed
        if config_changed:
            self._reread_config()
        if not (layout or config_changed):
            return Batch(changed, restart=False)
        old, self.dirs = self.dirs, watch_dirs(self.config_file, self.paths[1:])
        return Batch(changed, restart=layout or self.dirs != old)

    def rescan(self) -> None:
        self.dirs = watch_dirs(self.config_file, self.paths[1:])

    def _reread_config(self) -> None:
        try:
            config = load_config(self.config_file)
        except ConfigError as exc:  # the supervisor logs the rejection itself
            log.debug("reload: new config rejected, the watched paths stay: %s", exc)
            return
        self.paths = watched_paths(config)


def _watch(
    state: WatchState, stop: threading.Event, notify: Callable[[list[str]], None], debounce: int
) -> None:
    """The watcher thread's loop: watch, report each batch, re-watch on a new layout."""
    while not stop.is_set():
        changes = watchfiles.watch(
            *state.dirs,
            watch_filter=state.accepts,
            debounce=debounce,
            step=STEP_MS,
            stop_event=stop,
            recursive=False,
            raise_interrupt=False,
        )
        try:
            for batch in changes:
                result = state.on_batch(batch)
                if result.changed:
                    notify(result.changed)
                if result.restart:
                    break
        except FileNotFoundError:  # a directory went between the walk and the watch
            state.rescan()
            stop.wait(STEP_MS / 1000)
        finally:
            changes.close()


def _watch_thread(
    state: WatchState, stop: threading.Event, notify: Callable[[list[str]], None], debounce: int
) -> None:
    try:
        _watch(state, stop, notify, debounce)
    except Exception:
        log.exception("reload: the file watcher failed; changes are no longer reloaded")


def _describe(paths: list[str]) -> str:
    try:
        cwd = Path.cwd()
    except OSError:
        cwd = Path("/")
    shown = [os.path.relpath(p, cwd) if Path(p).is_relative_to(cwd) else p for p in paths]
    more = len(shown) - _MAX_LISTED
    return ", ".join(shown[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


# ------------------------------------------------------- the watcher process


class _Wakeups:
    """The main thread's one wait: signal numbers and reload requests, each on a socketpair.

    Signal handlers only record (STYLE.md 2): ``set_wakeup_fd`` writes each
    signal number to a socket and the Python-level handler does nothing.
    """

    def __init__(self) -> None:
        self._signals, self._signals_w = socket.socketpair()
        self._reloads, self._reloads_w = socket.socketpair()
        self._sockets = (self._signals, self._signals_w, self._reloads, self._reloads_w)
        for sock in self._sockets:
            sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._signals, selectors.EVENT_READ)
        self._selector.register(self._reloads, selectors.EVENT_READ)
        self._old_fd = -1
        self._old_handlers: dict[signal.Signals, _SignalHandler] = {}

    def __enter__(self) -> _Wakeups:
        self._old_fd = signal.set_wakeup_fd(self._signals_w.fileno(), warn_on_full_buffer=False)
        for sig in (*FORWARDED_SIGNALS, signal.SIGCHLD):
            self._old_handlers[sig] = signal.signal(sig, _record_only)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        signal.set_wakeup_fd(self._old_fd)
        self._selector.close()
        for sock in self._sockets:
            sock.close()

    def request_reload(self, changed: list[str]) -> None:
        """Called by the watcher thread; the main thread sends the SIGHUP."""
        log.info("reload: %s changed; sending SIGHUP to the daemon", _describe(changed))
        with contextlib.suppress(BlockingIOError):  # full: a reload is pending anyway
            self._reloads_w.send(b"R")

    def wait(self) -> tuple[bytes, bool]:
        """Sleep until a signal or a reload request: the signal numbers, and whether to reload."""
        ready = {key.fileobj for key, _ in self._selector.select()}
        reload = self._reloads in ready and bool(_drain(self._reloads))
        return (_drain(self._signals) if self._signals in ready else b""), reload


def _record_only(signum: int, frame: FrameType | None) -> None:
    """The wakeup fd already has the signal number."""


def _drain(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


def child_command(config_path: str, argv: Sequence[str]) -> list[str]:
    """The daemon's command line: ``run CONFIG`` with the other options, minus ``--reload``."""
    options = [arg for arg in argv if arg != "--reload"]
    return [sys.executable, "-m", "procqueue.cli", "run", config_path, *options]


def exit_status(returncode: int) -> int:
    """The daemon's exit code; a daemon killed by signal N gives 128 + N, as in a shell."""
    return returncode if returncode >= 0 else 128 - returncode


def run_with_reloader(
    config_path: str,
    argv: Sequence[str],
    *,
    command: Sequence[str] | None = None,
    debounce_ms: int = DEBOUNCE_MS,
) -> int:
    """Run the daemon as a child, SIGHUP it on source changes; return its exit status.

    ``argv`` holds the ``run`` options besides CONFIG (``--reload`` is dropped);
    ``command`` replaces the child's whole command line (tests). Call it from
    the main thread: it installs signal handlers, and restores them on return.
    A bad config raises :class:`ConfigError` before anything starts.
    """
    state = WatchState(load_config(config_path))
    cmd = list(command) if command is not None else child_command(config_path, argv)
    if logging.getLogger("watchfiles.main").level == logging.NOTSET:
        logging.getLogger("watchfiles.main").setLevel(logging.WARNING)  # our line says more
    with _Wakeups() as wakeups:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, process_group=0)
        roots = ", ".join(_describe([os.fspath(p)]) for p in state.paths)
        log.info("reload: daemon pid %d; watching %s (%d dirs)", proc.pid, roots, len(state.dirs))
        stop = threading.Event()
        args = (state, stop, wakeups.request_reload, debounce_ms)
        thread = threading.Thread(target=_watch_thread, args=args, name="reload", daemon=True)
        thread.start()
        try:
            return exit_status(_supervise(proc, wakeups))
        finally:
            stop.set()
            thread.join()
            _reap(proc)


def _supervise(proc: subprocess.Popen[bytes], wakeups: _Wakeups) -> int:
    """The main loop: forward signals and pass reloads on until the daemon exits."""
    while proc.poll() is None:
        signums, reload = wakeups.wait()
        for signum in signums:
            if signum != signal.SIGCHLD:  # SIGCHLD only wakes us up for the poll
                log.debug("reload: forwarding %s to the daemon", signal.Signals(signum).name)
                proc.send_signal(signum)
        if reload:
            proc.send_signal(signal.SIGHUP)
    log.info("reload: daemon exited with status %d", proc.returncode)
    return proc.returncode


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """After an error in the watcher: stop the daemon rather than orphan it."""
    if proc.poll() is None:
        log.error("reload: stopping the daemon (pid %d)", proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait()
