"""Frames between the supervisor and its workers (carried by ``ring.Channel``).

Every frame starts with one opcode byte. Task frames keep the payload raw
(no base64): ``b"T" | u32 meta length (LE) | orjson meta | payload bytes``,
where meta is the list described below. Every other frame is
``opcode | orjson body``.

down (supervisor -> worker)      up (worker -> supervisor)
  T  run this task                 B  booted: handlers imported       {pid}
  R  reply to a publish            E  boot failed (then exits 3)      {error}
  S  stop after the current task   D  task done        [id, result]
                                   F  task failed      [id, code, message, retry]
                                   P  publish          {rid, tasks: [task dicts]}
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

import orjson

from .task import QueueTask, QueueTaskStatus

OP_TASK, OP_REPLY, OP_STOP = b"T"[0], b"R"[0], b"S"[0]
OP_BOOTED, OP_BOOT_ERROR, OP_DONE, OP_FAILED, OP_PUBLISH = (ord(c) for c in "BEDFP")

# The built-in task type of ``procqueue.Pool.run`` / ``map``: the payload names a
# function by import path ({"fn": "module:qualname", "args": [...], "kwargs": {...}}
# or {"fn": ..., "chunk": [arg, ...]}). Only queues with ``allow_calls`` run it.
CALL_TYPE = "procqueue.call"

_META_LEN = struct.Struct("<I")
# A task frame's meta list, in order (encode_task / decode_task):
# id, queue, type, key, headers, delay, timeout, max_retry, attempt,
# created_at, available_at (timestamps) and limit, the effective time limit in
# seconds (the task's timeout, else the queue's; 0 = none).


def encode(op: int, body: Any) -> bytes:
    return bytes((op,)) + orjson.dumps(body)


def decode(frame: bytes) -> Any:
    return orjson.loads(memoryview(frame)[1:])


def encode_task(task: QueueTask, limit: float) -> bytes:
    meta = orjson.dumps(
        [
            task.id,
            task.queue,
            task.type,
            task.key,
            task.headers,
            task.delay,
            task.timeout,
            task.max_retry,
            task.attempt,
            _ts(task.created_at),
            _ts(task.available_at),
            limit,
        ]
    )
    return b"T" + _META_LEN.pack(len(meta)) + meta + (task.payload or b"")


def decode_task(frame: bytes) -> tuple[QueueTask, float]:
    (size,) = _META_LEN.unpack_from(frame, 1)
    meta = orjson.loads(memoryview(frame)[5 : 5 + size])
    payload = frame[5 + size :] or None
    (
        tid,
        queue,
        ttype,
        key,
        headers,
        delay,
        timeout,
        max_retry,
        attempt,
        created,
        available,
        limit,
    ) = meta
    task = QueueTask(
        queue=queue,
        type=ttype,
        payload=payload,
        key=key,
        headers=headers,
        delay=delay,
        timeout=timeout,
        max_retry=max_retry,
        id=tid,
        attempt=attempt,
        status=QueueTaskStatus.RUNNING,
        created_at=_dt(created),
        available_at=_dt(available),
    )
    return task, limit


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value else None


def _dt(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None
