"""Task stores behind one small interface, chosen by ``store =`` in the config.

Only the supervisor talks to a store. ``put`` records a task's current state
(the broker calls it on every status change); ``commit`` ends one loop
turn's batch of writes (group commit for durable stores).
"""

from __future__ import annotations

from typing import Protocol

from ..task import QueueTask


class Store(Protocol):
    def put(self, task: QueueTask) -> None: ...

    def get(self, task_id: str) -> QueueTask | None: ...

    def commit(self) -> None: ...

    def close(self) -> None: ...


def open_store(url: str) -> Store:
    """Open the store a config names (only ``memory`` in this version)."""
    from .memory import MemoryStore

    if url == "memory":
        return MemoryStore()
    raise ValueError(f"unsupported store {url!r}")
