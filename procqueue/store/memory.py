"""The memory store: nothing survives the process; finished tasks are kept
for look-ups until ``keep_finished`` newer ones have finished."""

from __future__ import annotations

import collections

from ..task import QueueTask


class MemoryStore:
    def __init__(self, keep_finished: int = 100_000) -> None:
        self.tasks: dict[str, QueueTask] = {}
        self.keep_finished = keep_finished
        self._finished: collections.deque[str] = collections.deque()

    def put(self, task: QueueTask) -> None:
        self.tasks[task.id] = task
        if task.status is not None and task.status.finished:
            self._finished.append(task.id)
            while len(self._finished) > self.keep_finished:
                old = self.tasks.get(self._finished.popleft())
                if old is not None and old.status is not None and old.status.finished:
                    del self.tasks[old.id]

    def get(self, task_id: str) -> QueueTask | None:
        return self.tasks.get(task_id)

    def commit(self) -> None:
        pass

    def close(self) -> None:
        self.tasks.clear()
