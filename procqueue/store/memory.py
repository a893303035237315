"""The memory store: nothing survives the process; the newest ``keep_finished``
finished tasks (and up to one ``GENERATION`` more) are kept for look-ups.

Unfinished tasks live in one dict. A task that finishes moves to the newest
of a few *generations*, dicts of up to ``GENERATION`` finished tasks each;
once they hold more than ``keep_finished`` the oldest is dropped whole. A
single dict of 100,000 finished tasks, with one entry added and one removed
per task, is megabytes whose every look-up misses the CPU caches (perf: 15%
of the loop's CPU under load); a generation being filled stays small and
hot, and forgetting old tasks costs no look-up at all. A look-up by id of a
finished task (rare: ``get_task``, ``wait`` on a done task) checks the
generations newest first.
"""

from __future__ import annotations

import collections
import itertools

from ..task import FINISHED, QueueTask, QueueTaskStatus

GENERATION = 10_000  # finished tasks per generation dict


class MemoryStore:
    def __init__(self, keep_finished: int = 100_000) -> None:
        self.tasks: dict[str, QueueTask] = {}  # unfinished tasks
        self.keep_finished = keep_finished
        # Finished tasks by id, oldest generation first. A task requeued from one
        # (pending again) is back in ``tasks`` and its entry here is stale: every
        # reader checks ``tasks`` first, and a task's newest entry wins.
        self._finished: collections.deque[dict[str, QueueTask]] = collections.deque([{}])
        self._size = min(GENERATION, max(1, keep_finished))
        self.seq = 0

    spills = False  # a full queue pushes back on publish (QueueFull)

    def add(self, task: QueueTask, held: bool = True) -> int:
        self.seq += 1
        self.tasks[task.id] = task  # a new task: never finished
        return self.seq

    def add_many(self, tasks: list[QueueTask]) -> None:
        self.seq += len(tasks)
        self.tasks.update({task.id: task for task in tasks})

    def put(self, task: QueueTask) -> None:
        # The broker changes the very objects ``add`` stored: a change matters
        # here only when a task finishes (it moves to the finished tasks) or
        # comes back from them (a dead letter requeued).
        if task.status not in FINISHED:
            if task.id not in self.tasks:
                self.tasks[task.id] = task
            return
        self.tasks.pop(task.id, None)
        newest = self._finished[-1]
        newest[task.id] = task
        if len(newest) >= self._size:
            self._finished.append({})
            if (len(self._finished) - 2) * self._size >= self.keep_finished:
                self._finished.popleft()  # the others still hold keep_finished

    def put_started(self, tasks: list[QueueTask]) -> None:
        """Nothing to do: they are the very objects held in ``self.tasks`` (every
        way into the ready line adds or puts the task; a dead letter requeued
        comes back through ``put``), changed in place."""

    def get(self, task_id: str) -> QueueTask | None:
        task = self.tasks.get(task_id)
        if task is None:
            for generation in reversed(self._finished):
                if (task := generation.get(task_id)) is not None:
                    return task
        return task

    def finished(self) -> list[QueueTask]:
        """Every finished task kept, oldest first (each once, as it is now)."""
        newest = {}
        for generation in self._finished:
            newest.update(generation)
        return [t for t in newest.values() if t.status in FINISHED and t.id not in self.tasks]

    def commit(self) -> tuple[int, int]:
        return (0, 0)  # nothing to make durable: every reply may go at once

    def durable(self) -> int:
        return 0

    def sync(self) -> None:
        pass

    def close(self) -> None:
        self.tasks.clear()
        self._finished = collections.deque([{}])

    def dead(self, queue: str | None = None, limit: int = 1000) -> list[QueueTask]:
        failed = (
            t
            for t in self.finished()
            if t.status is QueueTaskStatus.FAILED and (queue is None or t.queue == queue)
        )
        return list(itertools.islice(failed, max(0, limit)))

    def purge_dead(self, queue: str | None = None) -> int:
        doomed = {t.id for t in self.dead(queue, limit=len(self.tasks) + self.kept())}
        for generation in self._finished:
            for task_id in doomed.intersection(generation):
                del generation[task_id]
        return len(doomed)

    def kept(self) -> int:
        """How many finished-task entries the generations hold."""
        return sum(len(generation) for generation in self._finished)

    def prune(self, before: float, batch: int = 2000) -> int:
        return 0  # finished tasks are capped by count (keep_finished) instead
