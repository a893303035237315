"""The one place that forks, and the supervisor's handle on each worker."""

from __future__ import annotations

import collections
import enum
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Config, TaskQueueConfig
from .ring import Channel, Endpoint
from .task import QueueTask

log = logging.getLogger("procqueue.supervisor")

# Signals the supervisor handles; blocked around fork() so that none lands in
# the child before it has reset its handlers (STYLE.md 4).
SUPERVISOR_SIGNALS = {
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGCHLD,
    signal.SIGTTIN,
    signal.SIGTTOU,
}


class WorkerState(enum.StrEnum):
    STARTING = "starting"  # forked, importing handlers
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"  # told to stop after its current task
    DEAD = "dead"


@dataclass(eq=False)
class WorkerHandle:
    """What the supervisor knows of one worker process."""

    queue: str
    index: int
    pid: int
    ep: Endpoint
    state: WorkerState = WorkerState.STARTING
    inflight: collections.deque[QueueTask] = field(default_factory=collections.deque)
    started_at: float = 0.0  # monotonic start of the task at the head of ``inflight``
    deadline: float | None = None  # monotonic time of the hard kill for that task
    spawned_at: float = field(default_factory=time.monotonic)
    tasks_done: int = 0
    last_run: float = 0.0  # seconds its last task ran: the loop spins only for short ones
    killed_for: str = ""  # why the supervisor killed it (hard time limit ...)
    boot_error: str = ""
    retire_reason: str = ""  # why it was told to stop (reload, recycled ...)
    rss_checked_at: float = 0.0
    qconfig: TaskQueueConfig = field(default_factory=TaskQueueConfig)

    @property
    def name(self) -> str:
        return f"{self.queue}#{self.index}"

    def set_state(self, new: WorkerState) -> None:
        if new is not self.state:
            log.debug("worker %s pid %d: %s -> %s", self.name, self.pid, self.state, new)
            self.state = new

    @property
    def recycles(self) -> bool:
        """Whether its queue replaces workers after a task count or an RSS limit."""
        return bool(self.qconfig.max_tasks_per_child or self.qconfig.max_memory_per_child)


def fork_worker(
    config: Config,
    queue: str,
    index: int,
    close_in_child: Callable[[], None],
) -> WorkerHandle:
    """Fork one worker of ``queue``; only the supervisor's main thread calls this."""
    from .worker import prepare_process, worker_main

    channel = Channel(config.queues[queue].ring_size)
    parent = os.getpid()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 70
            try:
                ep = channel.child()
                close_in_child()
                prepare_process(parent)
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                worker_main(config, queue, index, ep, parent)
            except BaseException:
                import traceback

                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(code)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return WorkerHandle(queue, index, pid, channel.parent(), qconfig=config.queues[queue])
