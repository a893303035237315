"""The task model: ``QueueTask``, its statuses and the payload helpers.

Follows the reference's ``QueueTask`` field for field. In Python, durations
(``delay``, ``timeout``) are float seconds (a ``timedelta`` is accepted) and
times are timezone-aware ``datetime`` in UTC. The JSON form (orjson) uses the
same snake_case names, durations as seconds, times as RFC 3339 strings and
``payload`` as base64 (as the reference's ``encoding/json`` does for bytes).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson

from .errors import InvalidQueuePayload, InvalidQueueTask

T = TypeVar("T")


class QueueTaskStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset((QueueTaskStatus.SUCCEEDED, QueueTaskStatus.FAILED))


def _seconds(value: float | timedelta | None, name: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise InvalidQueueTask(f"task {name}: expected seconds >= 0, got {value!r}")
    return float(value)


@dataclass(slots=True)
class QueueTask:
    """One unit of work, routed by ``(queue, type)`` to a handler."""

    queue: str = ""
    type: str = ""
    payload: bytes | None = None
    key: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    timeout: float = 0.0
    max_retry: int = 0
    id: str = ""
    attempt: int = 0
    status: QueueTaskStatus | None = None
    last_error: str = ""
    created_at: datetime | None = None
    available_at: datetime | None = None
    result: Any = None

    def __post_init__(self) -> None:
        # Fast path first: plain float seconds and bytes need no conversion.
        if self.delay.__class__ is not float or self.delay < 0:
            self.delay = _seconds(self.delay, "delay")
        if self.timeout.__class__ is not float or self.timeout < 0:
            self.timeout = _seconds(self.timeout, "timeout")
        payload = self.payload
        if payload is None or payload.__class__ is bytes:
            pass
        elif isinstance(payload, bytearray | memoryview):
            self.payload = bytes(payload)
        elif not isinstance(payload, bytes):
            raise InvalidQueuePayload(
                f"task {self.type or '?'}: payload must be bytes (use marshal_payload), "
                f"got {type(payload).__name__}"
            )
        if self.status is not None and self.status.__class__ is not QueueTaskStatus:
            self.status = QueueTaskStatus(self.status)

    def identifier(self) -> str:
        return self.id

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form: every field, durations in seconds, times RFC 3339."""
        return {
            "id": self.id,
            "queue": self.queue,
            "type": self.type,
            "key": self.key,
            "payload": b64_text(self.payload),
            "headers": self.headers,
            "delay": self.delay,
            "timeout": self.timeout,
            "max_retry": self.max_retry,
            "attempt": self.attempt,
            "status": self.status.value if self.status else None,
            "last_error": self.last_error,
            "created_at": self.created_at,
            "available_at": self.available_at,
            "result": self.result,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def to_publish_dict(self) -> dict[str, Any]:
        """What a publish needs: the fields a client sets, defaults left out
        (the supervisor fills in status and times; this keeps frames small)."""
        out: dict[str, Any] = {"queue": self.queue, "type": self.type}
        if self.id:
            out["id"] = self.id
        if self.payload:
            out["payload"] = b64_text(self.payload)
        if self.key:
            out["key"] = self.key
        if self.headers:
            out["headers"] = self.headers
        for name in ("delay", "timeout", "max_retry"):
            if value := getattr(self, name):
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QueueTask:
        if not isinstance(data, dict):
            raise InvalidQueueTask(f"a task must be a JSON object, got {type(data).__name__}")
        if not _FIELD_NAMES.issuperset(data):
            unknown = set(data) - _FIELD_NAMES
            raise InvalidQueueTask(f"unknown task field(s): {', '.join(sorted(unknown))}")
        values = data
        if data.get("payload").__class__ is str:
            values = dict(data)
            values["payload"] = _b64_payload(data["payload"])
        if "created_at" in data or "available_at" in data:
            values = dict(values)
            for name in ("created_at", "available_at"):
                if isinstance(values.get(name), str):
                    values[name] = _parse_time(values[name], name)
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise InvalidQueueTask(f"invalid task: {exc}") from None

    @classmethod
    def from_json(cls, raw: bytes | str) -> QueueTask:
        try:
            return cls.from_dict(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            raise InvalidQueueTask(f"task is not valid JSON: {exc}") from None

    def copy(self, **changes: Any) -> QueueTask:
        """A shallow copy with ``changes`` applied (no re-validation: a hot path)."""
        new = trusted_task(
            self.queue,
            self.type,
            self.payload,
            self.key,
            self.headers,
            self.delay,
            self.timeout,
            self.max_retry,
            self.id,
            self.attempt,
            self.status,
            self.last_error,
            self.created_at,
            self.available_at,
            self.result,
        )
        for name, value in changes.items():
            setattr(new, name, value)
        return new


def trusted_task(
    queue: str,
    type: str,
    payload: bytes | None,
    key: str,
    headers: dict[str, str],
    delay: float,
    timeout: float,
    max_retry: int,
    id: str,
    attempt: int,
    status: QueueTaskStatus | None,
    last_error: str,
    created_at: datetime | None,
    available_at: datetime | None,
    result: Any = None,
) -> QueueTask:
    """A ``QueueTask`` from values already checked (our own frames and rows):
    every field given, in declaration order, and no ``__post_init__``."""
    task = _new_task(QueueTask)
    task.queue, task.type, task.payload, task.key, task.headers = queue, type, payload, key, headers
    task.delay, task.timeout, task.max_retry, task.id, task.attempt = (
        delay,
        timeout,
        max_retry,
        id,
        attempt,
    )
    task.status, task.last_error, task.created_at, task.available_at, task.result = (
        status,
        last_error,
        created_at,
        available_at,
        result,
    )
    return task


def has_defaults(t: QueueTask) -> bool:
    """Whether a task leaves key, headers, delay, timeout, max_retry and attempt
    at their defaults: what lets a batch of tasks travel and be stored in a
    compact form (the client's publish, task frames, SQLite INSERTs)."""
    return not (t.key or t.headers or t.delay or t.timeout or t.max_retry or t.attempt)


# Task ids: a random prefix per supervisor (or Pool) start and a counter, unique
# without a uuid4 each. The counter is offset by ID_COUNTER_BASE so that it keeps
# its width (13 digits for 9 * 10**12 tasks) and ids sort in admission order.
ID_COUNTER_BASE = 10**12


def new_id_prefix() -> str:
    return os.urandom(8).hex() + "-"


def payload_tasks(queue: Any, type: Any, payloads: list[Any]) -> list[QueueTask]:
    """New tasks of one queue and type whose only other field is a payload,
    given base64-encoded (or null): a bulk publish in its compact form."""
    if not isinstance(queue, str) or not isinstance(type, str):
        raise InvalidQueueTask("a publish's queue and type must be strings")
    return [
        trusted_task(queue, type, _b64_payload(p), "", {}, 0.0, 0.0, 0, "", 0, None, "", None, None)
        for p in payloads
    ]


def b64_text(payload: bytes | None) -> str | None:
    """A payload as the JSON form carries it: base64 text, or None when empty."""
    return base64.b64encode(payload).decode() if payload else None


def _b64_payload(payload: Any) -> bytes | None:
    if payload is None:
        return None
    if payload.__class__ is not str:
        raise InvalidQueuePayload(f"a payload must be a base64 string or null, got {payload!r:.40}")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError as exc:
        raise InvalidQueuePayload(f"task payload is not valid base64: {exc}") from None


_new_task = object.__new__
_FIELD_ORDER = tuple(f.name for f in dataclasses.fields(QueueTask))
_FIELD_NAMES = set(_FIELD_ORDER)


def _parse_time(text: str, name: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidQueueTask(f"task {name}: expected an RFC 3339 time, got {text!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# One-entry caches for the two conversions below: the tasks of one publish share
# their created_at (and, with no delay, available_at is the same object), so the
# hot paths (task frames, store rows, replies) convert the same time over and
# over; a datetime is immutable, so sharing one is safe.
_last_stamp: list[Any] = [None, 0.0]  # [datetime, its timestamp]
_last_time: list[Any] = [None, None]  # [timestamp, its datetime]


def stamp(value: datetime | None) -> float:
    """POSIX seconds of an aware datetime (0.0 for None)."""
    if value is _last_stamp[0]:
        return _last_stamp[1]  # type: ignore[no-any-return]
    ts = value.timestamp() if value else 0.0
    _last_stamp[:] = value, ts
    return ts


def from_stamp(value: float) -> datetime:
    """The UTC datetime of POSIX seconds."""
    if value == _last_time[0]:
        return _last_time[1]  # type: ignore[no-any-return]
    when = datetime.fromtimestamp(value, UTC)
    _last_time[:] = value, when
    return when


def utcnow() -> datetime:
    return datetime.now(UTC)


def marshal_payload(obj: Any) -> bytes | None:
    """Serialise ``obj`` to JSON bytes for ``QueueTask.payload`` (bytes pass through)."""
    if obj is None:
        return None
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj)
    try:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:
        raise InvalidQueuePayload(f"payload is not JSON-serialisable: {exc}") from None


def unmarshal_payload(task: QueueTask, into: Any = None) -> Any:
    """Decode a task's JSON payload.

    ``into`` may be ``None`` (return the decoded value), a dataclass or other
    class (``into(**obj)`` for objects, ``into(value)`` otherwise), or a dict /
    list to fill in place (as the reference fills a pointer).
    """
    if not task.payload:
        return into if isinstance(into, dict | list) else None
    try:
        value = orjson.loads(task.payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidQueuePayload(
            f"task {task.id or '?'} ({task.queue}/{task.type}): payload is not JSON: {exc}"
        ) from None
    if into is None:
        return value
    try:
        if isinstance(into, dict):
            into.update(value)
            return into
        if isinstance(into, list):
            into.extend(value)
            return into
        if isinstance(into, type) and isinstance(value, dict) and into is not dict:
            return into(**value)
        return into(value)
    except (TypeError, ValueError) as exc:
        raise InvalidQueuePayload(
            f"task {task.id or '?'} ({task.queue}/{task.type}): payload does not fit "
            f"{getattr(into, '__name__', type(into).__name__)}: {exc}"
        ) from None
