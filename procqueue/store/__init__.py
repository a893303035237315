"""Task stores behind one small interface, chosen by ``store =`` in the config.

Only the supervisor talks to a store. ``put`` records a task's current state
(the broker calls it on every status change); ``commit`` ends one loop
turn's writes (group commit for durable stores): it returns two tickets, one
for the turn's new tasks and one for all its writes, and ``durable()`` tells
which tickets have reached the disk.
"""

from __future__ import annotations

from typing import Protocol

from ..task import QueueTask


class Store(Protocol):
    spills: bool  # True: pending tasks beyond buffer_size wait on disk (paged in)
    seq: int  # the admission seq of the last task added

    def add(self, task: QueueTask, held: bool = True) -> int: ...  # its admission seq

    def add_many(self, tasks: list[QueueTask]) -> None: ...  # ``add`` each, held, in order

    def put(self, task: QueueTask) -> None: ...  # a change of a task already added

    def put_started(self, tasks: list[QueueTask]) -> None: ...  # ``put`` of tasks now running

    def get(self, task_id: str) -> QueueTask | None: ...

    # hand over this turn's writes: the tickets of (its new tasks, all of them);
    # 0: durable now
    def commit(self) -> tuple[int, int]: ...

    def durable(self) -> int: ...  # the highest ticket that is on disk

    def sync(self) -> None: ...  # commit and wait for the disk (rare operations only)

    def close(self) -> None: ...

    def dead(self, queue: str | None = None, limit: int = 1000) -> list[QueueTask]: ...

    def purge_dead(self, queue: str | None = None) -> int: ...

    def prune(self, before: float, batch: int = 2000) -> int: ...


def open_store(url: str, sync: str = "full") -> Store:
    """Open the store a config names: ``memory`` or ``sqlite:///path`` (absolute here)."""
    if url == "memory":
        from .memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite://"):
        from pathlib import Path

        from .sqlite import SqliteStore

        return SqliteStore(Path(url.removeprefix("sqlite://")), sync)
    raise ValueError(f"unsupported store {url!r}")
