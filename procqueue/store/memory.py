"""The memory store: nothing survives the process; finished tasks are kept
for look-ups until ``keep_finished`` newer ones have finished."""

from __future__ import annotations

import collections

from ..task import FINISHED, QueueTask, QueueTaskStatus


class MemoryStore:
    def __init__(self, keep_finished: int = 100_000) -> None:
        self.tasks: dict[str, QueueTask] = {}
        self.keep_finished = keep_finished
        self._finished: collections.deque[QueueTask] = collections.deque()  # oldest first
        self.seq = 0

    spills = False  # a full queue pushes back on publish (QueueFull)

    def add(self, task: QueueTask, held: bool = True) -> int:
        self.seq += 1
        self.tasks[task.id] = task  # a new task: never finished
        return self.seq

    def put(self, task: QueueTask) -> None:
        # The broker changes the very objects ``add`` stored: only a finished
        # task needs anything here (it counts against ``keep_finished``). With
        # 100,000 of them the dict is megabytes, so every look-up in it misses
        # the CPU caches (perf: ~15% of the loop's CPU went to this dict):
        # finishing costs no look-up, forgetting the oldest one costs one.
        if task.status in FINISHED:
            self._finished.append(task)
            while len(self._finished) > self.keep_finished:
                old = self._finished.popleft()
                # not requeued since (then it is pending again) and still the stored one
                if old.status in FINISHED and self.tasks.get(old.id) is old:
                    del self.tasks[old.id]

    def get(self, task_id: str) -> QueueTask | None:
        return self.tasks.get(task_id)

    def commit(self) -> tuple[int, int]:
        return (0, 0)  # nothing to make durable: every reply may go at once

    def durable(self) -> int:
        return 0

    def sync(self) -> None:
        pass

    def close(self) -> None:
        self.tasks.clear()

    def dead(self, queue: str | None = None, limit: int = 1000) -> list[QueueTask]:
        failed = [
            t
            for t in self.tasks.values()
            if t.status is QueueTaskStatus.FAILED and (queue is None or t.queue == queue)
        ]
        return failed[:limit]

    def purge_dead(self, queue: str | None = None) -> int:
        doomed = [t.id for t in self.dead(queue, limit=len(self.tasks))]
        for task_id in doomed:
            del self.tasks[task_id]
        return len(doomed)

    def prune(self, before: float, batch: int = 2000) -> int:
        return 0  # finished tasks are capped by count (keep_finished) instead
