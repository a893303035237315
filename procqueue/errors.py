"""procqueue's errors: one base class with a numeric code.

Codes 1-10 are the reference package's (asynctask's ``ErrInternal`` ...
``ErrInvalidQueuePayload``); procqueue's own errors follow from 11. The code
travels over the control socket so a client raises the same class the
supervisor did.
"""

from __future__ import annotations

from typing import ClassVar


class ProcQueueError(Exception):
    """Base of every procqueue error; ``code`` is stable across versions."""

    code: ClassVar[int] = 0
    default_message: ClassVar[str] = "procqueue error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)

    @property
    def message(self) -> str:
        return str(self.args[0])

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "error": type(self).__name__, "message": self.message}


class InternalError(ProcQueueError):
    code = 1
    default_message = "internal error"


class TaskNotFound(ProcQueueError):
    code = 2
    default_message = "task not found"


class InvalidQueueTask(ProcQueueError):
    code = 3
    default_message = "invalid queue task"


class TaskHandlerNotFound(ProcQueueError):
    code = 4
    default_message = "task handler not found"


class QueueConfigConflict(ProcQueueError):
    code = 5
    default_message = "task queue config conflict"


class InvalidQueueName(ProcQueueError):
    code = 6
    default_message = "invalid queue name"


class QueueNotRegistered(ProcQueueError):
    code = 7
    default_message = "task queue not registered"


class InvalidTaskType(ProcQueueError):
    code = 8
    default_message = "invalid task type"


class InvalidTaskHandler(ProcQueueError):
    code = 9
    default_message = "invalid task handler"


class InvalidQueuePayload(ProcQueueError):
    code = 10
    default_message = "invalid queue payload"


class TaskTimeout(ProcQueueError):
    """Raised inside a handler when its time limit runs out (the soft limit)."""

    code = 11
    default_message = "task timeout"


class QueueFull(ProcQueueError):
    """A queue holds ``buffer_size`` pending tasks; publish later."""

    code = 12
    default_message = "task queue full"


class ConfigError(ProcQueueError):
    """A config file is invalid; the message names the file, the key and the fix."""

    code = 13
    default_message = "invalid config"


class ProtocolError(ProcQueueError):
    """A malformed or oversized control-socket request."""

    code = 14
    default_message = "protocol error"


class DaemonUnavailable(ProcQueueError):
    """The control socket cannot be reached (daemon not running?)."""

    code = 15
    default_message = "procqueue daemon unavailable"


class TaskFailed(ProcQueueError):
    """A ``procqueue.Pool`` call raised (after its retries); the message is its last error."""

    code = 16
    default_message = "task failed"


ERRORS_BY_CODE: dict[int, type[ProcQueueError]] = {
    cls.code: cls
    for cls in (
        InternalError,
        TaskNotFound,
        InvalidQueueTask,
        TaskHandlerNotFound,
        QueueConfigConflict,
        InvalidQueueName,
        QueueNotRegistered,
        InvalidTaskType,
        InvalidTaskHandler,
        InvalidQueuePayload,
        TaskTimeout,
        QueueFull,
        ConfigError,
        ProtocolError,
        DaemonUnavailable,
        TaskFailed,
    )
}


def error_from_dict(data: dict[str, object]) -> ProcQueueError:
    """Rebuild the error a supervisor reported (unknown codes become InternalError)."""
    code = data.get("code")
    cls = ERRORS_BY_CODE.get(code if isinstance(code, int) else 1, InternalError)
    return cls(str(data.get("message") or cls.default_message))
