"""``Context``: what a handler gets besides its task."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .task import QueueTask, marshal_payload


@dataclass(slots=True)
class Context:
    """Passed to every handler as ``handle(ctx, task)``.

    ``deadline`` is the wall-clock time (``time.time()``) at which the task's
    time limit runs out, or None when it has none.
    """

    task: QueueTask
    deadline: float | None
    worker: str
    _publish: Callable[[list[QueueTask]], list[QueueTask]] = field(repr=False)

    def remaining(self) -> float | None:
        """Seconds left before the time limit (never negative), or None."""
        return None if self.deadline is None else max(0.0, self.deadline - time.time())

    def publish(
        self,
        task: QueueTask | None = None,
        *,
        queue: str = "",
        type: str = "",
        payload: Any = None,
        **fields: Any,
    ) -> QueueTask:
        """Publish a follow-up task; returns the stored copy (with its id).

        Either pass a ``QueueTask`` or its fields as keywords; ``payload`` given
        as keyword may be any JSON-serialisable value.
        """
        if task is None:
            task = QueueTask(queue=queue, type=type, payload=marshal_payload(payload), **fields)
        return self._publish([task])[0]

    def publish_many(self, tasks: list[QueueTask]) -> list[QueueTask]:
        return self._publish(list(tasks))
