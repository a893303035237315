"""procqueue: a multiprocess worker-pool daemon for Python.

Queues, retries, delays, time limits and cron over forked worker processes,
fed through shared-memory rings by one supervisor. See the README.
"""

from .client import Client
from .config import Config, TaskQueueConfig, load_config
from .context import Context
from .embedded import Pool, Task, TaskStatus
from .errors import (
    ConfigError,
    DaemonUnavailable,
    InternalError,
    InvalidQueueName,
    InvalidQueuePayload,
    InvalidQueueTask,
    InvalidTaskHandler,
    InvalidTaskType,
    ProcQueueError,
    ProtocolError,
    QueueConfigConflict,
    QueueFull,
    QueueNotRegistered,
    TaskFailed,
    TaskHandlerNotFound,
    TaskNotFound,
    TaskTimeout,
)
from .task import QueueTask, QueueTaskStatus, marshal_payload, unmarshal_payload

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Config",
    "ConfigError",
    "Context",
    "DaemonUnavailable",
    "InternalError",
    "InvalidQueueName",
    "InvalidQueuePayload",
    "InvalidQueueTask",
    "InvalidTaskHandler",
    "InvalidTaskType",
    "Pool",
    "ProcQueueError",
    "ProtocolError",
    "QueueConfigConflict",
    "QueueFull",
    "QueueNotRegistered",
    "QueueTask",
    "QueueTaskStatus",
    "Task",
    "TaskFailed",
    "TaskHandlerNotFound",
    "TaskNotFound",
    "TaskQueueConfig",
    "TaskStatus",
    "TaskTimeout",
    "load_config",
    "marshal_payload",
    "unmarshal_payload",
]
