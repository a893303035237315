"""The supervisor: one selector loop that owns every task and every worker.

It never imports user code. Each turn of the loop (``step``) sleeps in one
``select`` on the signal fd, the control socket and every worker's doorbell,
with the timeout set to the next timer; then it reads worker outcomes, fires
timers, hands ready tasks to workers with room, flushes the rings, commits
the store and only then sends the replies that report what was committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import logging
import os
import selectors
import signal
import socket
import time
from typing import Any

import setproctitle

from .api import Requests
from .broker import Broker
from .config import Config, load_config
from .control import ControlServer
from .errors import ConfigError
from .pool import WorkerPool
from .scheduler import CronService
from .spawn import SUPERVISOR_SIGNALS
from .spinwait import select_until
from .store import open_store
from .systemd import Notifier

log = logging.getLogger("procqueue.supervisor")

HANDLED_SIGNALS = tuple(sorted(SUPERVISOR_SIGNALS))
STATUS_EVERY = 10.0  # seconds between systemd STATUS= updates
# While tasks run, poll the up rings this long before sleeping: a short task's
# outcome then costs neither a doorbell write nor a wake-up. Never when idle.
SPIN_SECONDS = 50e-6
# The supervisor holds every task it tracks (the memory store keeps up to
# 100,000 finished ones) and creates a few objects per task: with Python's
# default thresholds (700, 10, 10) the collector ran ~1,200 times per 100,000
# tasks and cost ~2 us a task, almost all of it re-scanning those long-lived
# tasks, which hold no cycles. Collect rarely instead; workers get the
# defaults back (worker.prepare_process), as they run user code.
GC_THRESHOLDS = (50_000, 20, 10)


class SupervisorState(enum.StrEnum):
    BOOTING = "booting"
    RUNNING = "running"
    RELOADING = "reloading"
    DRAINING = "draining"  # graceful stop: no new work, running tasks finish
    STOPPED = "stopped"


class Supervisor:
    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.config = config
        self.state = SupervisorState.BOOTING
        self.selector = selectors.DefaultSelector()
        self.store = open_store(config.settings.store, config.settings.sync)
        self.broker = Broker(config.queues, self.store, time.time, self._on_finish)
        self.requests = Requests(self.broker, self.store, self.status, lambda: self.state.value)
        self.pool = WorkerPool(config, self.broker, self.selector, self._close_in_child)
        self.pool.publish_hook = self.requests.publish_from_worker
        self.cron = CronService(
            config.cron, self.selector, self._publish_cron, lambda: set(self.broker.configured)
        )
        self.requests.extra.update(self.cron.ops())
        self.requests.on_admit = self._dispatch_now
        self.notifier = notifier or Notifier.from_env()
        self.stop_deadline: float | None = None
        self.sigint_count = 0
        self._sig_r, self._sig_w = socket.socketpair()
        self.control: ControlServer | None = None
        self.metrics_server: Any = None
        self.next_prune = time.monotonic() + 1.0
        self.next_status = 0.0

    # -- lifecycle -----------------------------------------------------------
    def set_state(self, new: SupervisorState) -> None:
        if new is not self.state:
            log.info("supervisor: %s -> %s", self.state, new)
            self.state = new

    def serve_forever(self) -> None:
        self.boot()
        try:
            while self.state is not SupervisorState.STOPPED:
                self.step()
        finally:
            self.cleanup()

    def boot(self) -> None:
        setproctitle.setproctitle(f"procqueue: supervisor {self.config.path}")
        self._install_signals()
        settings = self.config.settings
        self.control = ControlServer(
            settings.socket, settings.socket_mode, self.selector, self.requests.handle
        )
        self.control.nudge.idle_worker = self.pool.idle_last_done
        if settings.metrics:
            self._serve_metrics(settings.metrics)
        if self.store.spills:
            self.broker.recover()
            wake = self.store.wake_socket()  # type: ignore[attr-defined]
            self.selector.register(wake, selectors.EVENT_READ, self._on_durable)
        gc.freeze()  # what boot made is permanent: never scanned again, and the
        gc.set_threshold(*GC_THRESHOLDS)  # forked workers do not copy its pages
        self.pool.start_all()
        self.cron.start()
        self.set_state(SupervisorState.RUNNING)
        log.info(
            "procqueue %d serving %s on %s with %d queue(s)",
            os.getpid(),
            self.config.path,
            settings.socket,
            len(self.config.queues),
        )
        self.notifier.ready(self.summary())

    def _serve_metrics(self, address: str) -> None:
        from .metrics import Metrics, MetricsServer

        self.broker.metrics = Metrics()
        self.metrics_server = MetricsServer(
            address, self.selector, self.broker.metrics, before_render=self._refresh_gauges
        )
        log.info("Prometheus metrics on http://%s:%d/metrics", *self.metrics_server.address[:2])

    def _refresh_gauges(self) -> None:
        snapshot = {
            name: {
                "pending": s["pending"],
                "running": s["running"],
                "delayed": s["delayed"],
                "workers": len(self.pool.slots.get(name, ())),
            }
            for name, s in self.broker.stats().items()
        }
        self.broker.metrics.set_gauges(snapshot)

    def cleanup(self) -> None:
        self.cron.stop()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.pool.kill_all()
        if self.control is not None:
            self.control.close()
        signal.set_wakeup_fd(-1)
        self.store.close()
        self.notifier.close()
        log.info("procqueue %d stopped", os.getpid())

    def _close_in_child(self) -> None:
        """In a freshly forked worker: close every fd that belongs to the supervisor."""
        signal.set_wakeup_fd(-1)
        self._sig_r.close()
        self._sig_w.close()
        if self.control is not None:
            for sock in self.control.fds():
                sock.close()
        self.pool.close_in_child()
        for sock in self.cron.fds():
            sock.close()
        if self.metrics_server is not None:
            for sock in self.metrics_server.fds():
                sock.close()
        self.notifier.close()
        self.selector.close()

    # -- the loop ------------------------------------------------------------
    def step(self) -> None:
        timeout = self._timeout()
        if timeout != 0 and self.pool.running() and self.pool.spin(SPIN_SECONDS):
            timeout = 0  # an outcome arrived while we spun: no sleep, no doorbell
        if timeout != 0 and not self.pool.sleep_prepare():
            timeout = 0
        events = self._select(timeout)
        self.pool.sleep_done()
        for key, mask in events:
            try:
                key.data(mask)
            except Exception:  # a bug in one event handler must not stop the daemon
                log.exception("supervisor: error handling an event on fd %d", key.fd)
        self.pool.collect()
        self._fire_timers()
        if self.state is SupervisorState.RUNNING:
            self.broker.promote_due()
            self.pool.dispatch()
        self.pool.flush()  # rings first: the worker starts while we commit and reply
        self._commit()
        if self.control is not None:
            self.control.flush()
        if self.state is SupervisorState.DRAINING and not self.pool.alive():
            self.set_state(SupervisorState.STOPPED)

    def _select(self, timeout: float | None) -> list[tuple[selectors.SelectorKey, int]]:
        """The loop's wait for events. A client in a request/reply loop was just
        answered: poll for its next request for a moment (``ControlServer.spin_until``)
        before sleeping, as waking this process on an idle vCPU costs tens of us."""
        if timeout != 0 and self.control is not None:
            now, end = time.perf_counter(), self.control.spin_until
            if timeout is not None:
                end = min(end, now + timeout)
            if end > now and (events := select_until(self.selector, end)):
                return events
        return self.selector.select(timeout)

    def _dispatch_now(self) -> None:
        """A client's tasks were just admitted: hand them to workers with room and
        ring them now, not at the end of the turn, so that a worker starts while
        the loop finishes the turn (publish -> handler start: ~20 us sooner)."""
        if self.state is SupervisorState.RUNNING:
            self.pool.dispatch()
            self.pool.flush()

    def _commit(self) -> None:
        """End of a loop turn: hand the writes to the store; replies wait for the disk."""
        self.requests.hold_until(*self.store.commit())
        self._on_durable()

    def _on_durable(self, mask: int = 0) -> None:
        """Some writes reached the disk (or none were pending): release their replies."""
        if mask:
            with contextlib.suppress(BlockingIOError):
                self.store.wake_socket().recv(4096)  # type: ignore[attr-defined]
        self.requests.send_durable(self.store.durable())
        if self.store.spills:
            self.broker.page_in()

    def _timeout(self) -> float | None:
        # A reply sent after the last commit let a buffered request in: commit
        # it now rather than sleep.
        if self.requests.after_admit or self.requests.after_commit:
            return 0.0
        now = time.monotonic()
        deadlines = [
            self.pool.next_deadline(),
            self.stop_deadline,
            self.next_prune,
            self.requests.next_timer(),
            self.notifier.next_watchdog(now),
        ]
        due = self.broker.next_due() if self.state is SupervisorState.RUNNING else None
        if due is not None:
            deadlines.append(now + (due - time.time()))
        times = [d for d in deadlines if d is not None]
        if not times:
            return 5.0  # nothing scheduled: a safety net only, every event wakes us
        return min(5.0, max(0.0, min(times) - now))

    def _fire_timers(self) -> None:
        now = time.monotonic()
        if now >= self.next_prune:
            self._prune(now)
        self.pool.check_deadlines(now)
        self.requests.expire_waits(now)
        if self.notifier.watchdog_due(now):
            self.notifier.watchdog(now)  # sent by the loop itself: a stuck loop stops it
        if now >= self.next_status and self.notifier.enabled:
            self.next_status = now + STATUS_EVERY
            self.notifier.status(self.summary())
        if self.stop_deadline is not None and now >= self.stop_deadline:
            log.warning(
                "shutdown_timeout passed: killing %d worker(s) still busy", self.pool.alive()
            )
            self.stop_deadline = None
            self.pool.kill_all(wait=False)

    def _prune(self, now: float) -> None:
        """Retention: delete old succeeded tasks a batch per turn, never a long stall."""
        removed = self.store.prune(time.time() - self.config.settings.retention)
        if removed:
            log.info("retention: pruned %d succeeded task(s)", removed)
        interval = min(60.0, max(0.5, self.config.settings.retention / 2))
        self.next_prune = now + (0.0 if removed >= 2000 else interval)

    def _on_finish(self, task: Any) -> None:
        if self.requests.waiters or self.requests.notify:  # someone waits for an outcome
            self.requests.on_finish(task)
        if task.headers:  # a cron fire carries its entry's name there
            self.cron.on_finish(task)

    def _publish_cron(self, tasks: list[Any]) -> list[Any]:
        if self.state is not SupervisorState.RUNNING:
            raise RuntimeError(f"supervisor is {self.state}")
        return self.broker.publish(tasks, force=True)

    # -- signals (STYLE.md 2: handlers only record; the loop acts) -------------
    def _install_signals(self) -> None:
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _record_only)
        self.selector.register(self._sig_r, selectors.EVENT_READ, self._on_signals)

    def _on_signals(self, mask: int) -> None:
        try:
            data = self._sig_r.recv(4096)
        except BlockingIOError:
            return
        for signum in data:
            self.handle_signal(signal.Signals(signum))

    def handle_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGCHLD:
            self.pool.reap()
        elif sig in (signal.SIGTERM, signal.SIGINT):
            self.sigint_count += sig == signal.SIGINT
            self.stop(graceful=self.sigint_count < 2)
        elif sig == signal.SIGQUIT:
            self.stop(graceful=False)
        elif self.state is not SupervisorState.RUNNING:
            log.info("%s ignored while %s", sig.name, self.state)
        elif sig == signal.SIGHUP:
            self.reload()
        elif sig in (signal.SIGTTIN, signal.SIGTTOU):
            self.pool.resize(+1 if sig == signal.SIGTTIN else -1)

    def stop(self, graceful: bool) -> None:
        if self.state is SupervisorState.DRAINING and graceful:
            return
        kind = "graceful" if graceful else "fast"
        log.info("%s stop: %d task(s) running", kind, self.pool.running())
        self.notifier.stopping(f"{kind} stop")
        self.set_state(SupervisorState.DRAINING)
        self.pool.stopping = True
        if graceful:
            self.stop_deadline = time.monotonic() + self.config.settings.shutdown_timeout
            self.pool.terminate_all()
        else:
            self.pool.kill_all(wait=False)
        left = sum(s.pending for s in self.broker.queues.values())
        if left and self.config.settings.store == "memory":
            log.warning("%d pending task(s) are dropped: the memory store keeps nothing", left)

    # -- reload (STYLE.md 9: parse -> validate -> swap) ---------------------------
    def reload(self) -> None:
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log.error("reload rejected, the running config stays: %s", exc)
            return
        self.notifier.reloading(f"reloading {self.config.path}")
        self.set_state(SupervisorState.RELOADING)
        new = self._keep_fixed_settings(new)
        self.config = new
        self.broker.reconfigure(new.queues)
        self.pool.reconfigure(new)
        self.cron.reconfigure(new.cron)
        self.set_state(SupervisorState.RUNNING)
        log.info(
            "reloaded %s: %d queue(s), new workers start with fresh code", new.path, len(new.queues)
        )
        self.notifier.ready(self.summary())

    def _keep_fixed_settings(self, new: Config) -> Config:
        """Settings bound at start (store, socket) need a restart to change."""
        old = self.config.settings
        fixed: dict[str, Any] = {
            "store": old.store,
            "socket": old.socket,
            "socket_mode": old.socket_mode,
            "sync": old.sync,
            "metrics": old.metrics,
        }
        changed = [k for k, v in fixed.items() if getattr(new.settings, k) != v]
        if changed:
            log.warning(
                "reload: %s changed; that takes a restart, keeping the running value",
                ", ".join(changed),
            )
        return dataclasses.replace(new, settings=dataclasses.replace(new.settings, **fixed))

    # -- looking -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        queues = self.broker.stats()
        for name, info in queues.items():
            info["workers"] = self.pool.describe(name)
        return {
            "pid": os.getpid(),
            "state": self.state.value,
            "config": str(self.config.path),
            "store": self.config.settings.store,
            "queues": queues,
            "cron": self.cron.list(),
        }

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        stats = self.broker.stats().values()
        return (
            f"{len(self.config.queues)} queue(s), {self.pool.alive()} worker(s), "
            f"{sum(s['pending'] for s in stats)} pending, "
            f"{sum(s['running'] for s in stats)} running"
        )


def _record_only(signum: int, frame: Any) -> None:
    """Signal handler: the wakeup fd already carries the number; do nothing here."""


def run(config: Config) -> int:
    Supervisor(config).serve_forever()
    return 0
