"""Frames between the supervisor and its workers (carried by ``ring.Channel``).

Every frame starts with one opcode byte. A task frame carries one or more
tasks (all a dispatch hands one worker at once) and keeps payloads raw (no
base64): ``b"T" | u32 meta length (LE) | orjson [meta, ...] | payloads``,
where each meta is the list described below and the payloads follow in the
same order. Every other frame is ``opcode | orjson body``.

down (supervisor -> worker)      up (worker -> supervisor)
  T  run these tasks, in order     B  booted: handlers imported       {pid}
  R  reply to a publish            E  boot failed (then exits 3)      {error}
  S  stop after the current task   D  task done        [id, result]
                                   F  task failed      [id, code, message, retry]
                                   P  publish          {rid, tasks: [task dicts]}
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

from .task import QueueTask, QueueTaskStatus, from_stamp, stamp, trusted_task

OP_TASK, OP_REPLY, OP_STOP = b"T"[0], b"R"[0], b"S"[0]
OP_BOOTED, OP_BOOT_ERROR, OP_DONE, OP_FAILED, OP_PUBLISH = (ord(c) for c in "BEDFP")
OP_DONE_EMPTY = ord("d")  # task done, no result to keep: no JSON to encode or parse
_SECONDS = struct.Struct("<d")

# The built-in task type of ``procqueue.Pool.run`` / ``map``: the payload names a
# function by import path ({"fn": "module:qualname", "args": [...], "kwargs": {...}}
# or {"fn": ..., "chunk": [arg, ...]}). Only queues with ``allow_calls`` run it.
CALL_TYPE = "procqueue.call"

_META_LEN = struct.Struct("<I")
# A task's meta list, in order (encode_tasks / decode_tasks):
# id, queue, type, key, headers, delay, timeout, max_retry, attempt,
# created_at, available_at (timestamps), limit, the effective time limit in
# seconds (the task's timeout, else the queue's; 0 = none), and the length of
# its payload in the frame's tail.


def encode(op: int, body: Any) -> bytes:
    return bytes((op,)) + orjson.dumps(body)


def decode(frame: bytes) -> Any:
    return orjson.loads(memoryview(frame)[1:])


def encode_done_empty(task_id: str, seconds: float) -> bytes:
    return b"d" + _SECONDS.pack(seconds) + task_id.encode()


def decode_done_empty(frame: bytes) -> tuple[float, str]:
    """(run seconds, task id) of a ``d`` frame."""
    return _SECONDS.unpack_from(frame, 1)[0], frame[9:].decode()


def encode_tasks(tasks: list[QueueTask], default_limit: float) -> bytes:
    """One frame for ``tasks``; ``default_limit`` applies to a task without a timeout."""
    metas = []
    payloads = []
    for task in tasks:
        payload = task.payload
        metas.append(
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
                stamp(task.created_at),
                stamp(task.available_at),
                task.timeout or default_limit,
                len(payload) if payload else 0,
            ]
        )
        if payload:
            payloads.append(payload)
    meta = orjson.dumps(metas)
    return b"T" + _META_LEN.pack(len(meta)) + meta + b"".join(payloads)


def decode_tasks(frame: bytes) -> list[tuple[QueueTask, float]]:
    """The tasks of a task frame, each with its time limit (0 = none)."""
    (size,) = _META_LEN.unpack_from(frame, 1)
    pos = 5 + size
    out = []
    running = QueueTaskStatus.RUNNING
    for meta in orjson.loads(frame[5:pos]):  # a copy of the meta beats a memoryview
        tid, queue, ttype, key, headers, delay, timeout, retries, attempt, *rest = meta
        created, available, limit, size = rest
        payload = frame[pos : pos + size] if size else None
        pos += size
        task = trusted_task(
            queue,
            ttype,
            payload,
            key,
            headers,
            float(delay),
            float(timeout),
            retries,
            tid,
            attempt,
            running,
            "",
            from_stamp(created),
            from_stamp(available),
        )
        out.append((task, limit))
    return out
