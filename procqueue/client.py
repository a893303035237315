"""``Client``: talk to a running daemon over its control socket."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

from .control import FRAME, encode_frame
from .cron import CronTask
from .errors import DaemonUnavailable, ProtocolError, QueueFull, error_from_dict
from .spinwait import REPLY_SPIN, ReplyPoll
from .task import QueueTask, QueueTaskStatus, b64_text, from_stamp, has_defaults, trusted_task

# Tasks per publish request: ``publish_many`` sends longer lists as pipelined
# parts of this size, so that the daemon's admission, dispatch and commit of
# one part overlap with the sending of the next.
PUBLISH_PART = 256


class Client:
    """A blocking client; one request at a time. Not thread-safe: one per thread.

    ``spin``: seconds to poll for a reply before sleeping on the socket, when
    polling gave the shorter waits lately (see ``procqueue.spinwait``); 0
    never polls.
    """

    _sock: socket.socket | None

    def __init__(
        self,
        socket: str | os.PathLike[str],
        timeout: float | None = 30.0,
        spin: float = REPLY_SPIN,
    ) -> None:
        self.path = Path(socket)
        self.timeout = timeout
        self.spin = spin
        self._poll = ReplyPoll(spin)
        self._sock = None
        self._inbuf = bytearray()  # reply bytes read but not yet taken

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], timeout: float | None = 30.0) -> Client:
        from .config import load_config

        return cls(load_config(path).settings.socket, timeout)

    # -- the API -----------------------------------------------------------------
    def publish(
        self, task: QueueTask, block: bool = True, timeout: float | None = None
    ) -> QueueTask:
        """Publish one task; returns the stored copy (id, created_at, status)."""
        return self.publish_many([task], block=block, timeout=timeout)[0]

    def publish_many(
        self, tasks: Iterable[QueueTask], block: bool = True, timeout: float | None = None
    ) -> list[QueueTask]:
        """Publish tasks, admitted in order; returns the stored copies.

        Many tasks go as pipelined requests of ``PUBLISH_PART`` tasks: the
        daemon admits, dispatches and commits one part while later ones are
        still on their way. A part is refused if the one before it was not
        wholly admitted, so what got in is always a prefix of ``tasks``.
        When a queue is full (``buffer_size``), ``block=True`` waits and sends
        the rest again until ``timeout`` (None = forever); ``block=False``
        raises ``QueueFull``. Every error raised lists in its ``accepted``
        attribute the stored copies of what got in.
        """
        sources = list(tasks)
        stored: list[QueueTask] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.001
        while True:
            briefs, error = self._publish_parts(sources[len(stored) :])
            for brief in briefs:
                stored += _stored_copies(sources[len(stored) :], brief)
            if error is None:
                return stored
            err = error_from_dict(error)
            if not isinstance(err, QueueFull) or not block or _past(deadline):
                err.accepted = stored  # type: ignore[attr-defined]
                raise err
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _publish_parts(
        self, tasks: list[QueueTask]
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Send ``tasks`` in pipelined parts; the brief replies of the parts
        admitted and the first error (None if every part got in)."""
        starts = range(0, max(1, len(tasks)), PUBLISH_PART)
        requests = (
            {
                **_part_fields(tasks[first : first + PUBLISH_PART]),
                "op": "publish",
                "brief": "ids",  # the reply is the ids and what they share, not whole tasks
                "chained": index > 0,  # refused unless the part before got in whole
            }
            for index, first in enumerate(starts)
        )
        briefs: list[dict[str, Any]] = []
        for reply in self._exchange(requests, len(starts)):
            if "ok" in reply:
                briefs.append(reply["ok"])
            else:
                briefs.append(reply.get("accepted") or {"ids": []})
                return briefs, reply["error"]
        return briefs, None

    def run(self, task: QueueTask, timeout: float | None = None) -> QueueTask:
        """Publish one task and wait for its outcome in a single round trip.

        Returns the task as it is when it finished (or when ``timeout`` ran
        out: check ``status``). A full queue raises ``QueueFull``.
        """
        request = {
            "op": "publish",
            "tasks": [task.to_publish_dict()],
            "wait": True,
            "timeout": timeout,
        }
        return QueueTask.from_dict(self._call(request, io_timeout=None)["ok"])

    def get_task(self, task_id: str) -> QueueTask:
        return QueueTask.from_dict(self._call({"op": "get_task", "id": task_id})["ok"])

    def wait(self, task_id: str, timeout: float | None = None) -> QueueTask:
        """Block until the task has finished (or ``timeout``); return it as it is then."""
        request: dict[str, Any] = {"op": "wait", "id": task_id, "timeout": timeout}
        return QueueTask.from_dict(self._call(request, io_timeout=None)["ok"])

    def dead_letters(self, queue: str | None = None, limit: int = 1000) -> list[QueueTask]:
        """Tasks whose retries ran out (or whose handler is missing), oldest first."""
        reply = self._call({"op": "dead_list", "queue": queue, "limit": limit})
        return [QueueTask.from_dict(t) for t in reply["ok"]]

    def requeue_dead(
        self, task_id: str | None = None, *, all: bool = False, queue: str | None = None
    ) -> list[QueueTask]:
        """Put one dead letter (or ``all``, optionally of one queue) back as pending."""
        request = {"op": "dead_requeue", "id": task_id, "all": all, "queue": queue}
        return [QueueTask.from_dict(t) for t in self._call(request)["ok"]]

    def purge_dead(self, queue: str | None = None) -> int:
        """Delete dead letters; returns how many."""
        return int(self._call({"op": "dead_purge", "queue": queue})["ok"])

    # -- cron (the reference's CronTaskDispatcher) ---------------------------------
    def add_cron(
        self,
        spec: str,
        queue: str,
        type: str,
        payload: Any = None,
        name: str | None = None,
        **options: str,
    ) -> CronTask:
        """Add a cron entry at run time (kept across reloads); a uuid name when none.

        ``options``: ``description``, ``timezone`` (default UTC), ``misfire``
        (``coalesce`` or ``skip``).
        """
        request = {
            "op": "cron_add",
            "spec": spec,
            "queue": queue,
            "type": type,
            "payload": payload,
            "name": name,
            **options,
        }
        return CronTask.from_dict(self._call(request)["ok"])

    def cancel_cron(self, name: str) -> None:
        """Remove a cron entry; ``TaskNotFound`` when there is none of that name."""
        self._call({"op": "cron_cancel", "name": name})

    def get_cron(self, name: str) -> CronTask:
        return CronTask.from_dict(self._call({"op": "cron_get", "name": name})["ok"])

    def list_cron(self) -> list[CronTask]:
        return [CronTask.from_dict(c) for c in self._call({"op": "cron_list"})["ok"]]

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call({"op": "status"})["ok"]
        return result

    def ping(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call({"op": "ping"})["ok"]
        return result

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._inbuf.clear()  # a new connection starts on a frame boundary

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------
    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                sock.close()
                raise DaemonUnavailable(
                    f"cannot reach the procqueue daemon at {self.path}: {exc.strerror or exc}; "
                    "is `procqueue run` running with this config?"
                ) from None
            self._sock = sock
        return self._sock

    def _call(
        self,
        request: dict[str, Any],
        raise_error: bool = True,
        io_timeout: float | None = -1.0,
    ) -> dict[str, Any]:
        """One request, one reply; ``io_timeout`` -1 means the client's own timeout."""
        (reply,) = self._exchange([request], 1, io_timeout)
        if raise_error and "error" in reply:
            raise error_from_dict(reply["error"])
        return reply

    def _exchange(
        self, requests: Iterable[dict[str, Any]], count: int, io_timeout: float | None = -1.0
    ) -> list[dict[str, Any]]:
        """Send ``count`` requests, each as soon as it is encoded, then read
        their replies (the daemon answers in order)."""
        sock = self._connect()
        sock.settimeout(self.timeout if io_timeout == -1.0 else io_timeout)
        try:
            for request in requests:
                sock.sendall(encode_frame(request))
            replies = [orjson.loads(self._read_frame(sock)) for _ in range(count)]
        except (OSError, EOFError) as exc:
            self.close()
            raise DaemonUnavailable(f"lost the connection to {self.path}: {exc}") from None
        return replies

    def _read_frame(self, sock: socket.socket) -> bytes:
        # Buffered: one recv usually brings a whole reply (or several), not a
        # recv for its length and another for its body.
        buf = self._inbuf
        if len(buf) < 4:
            ticket = self._poll.wait(sock)  # a reply due soon: poll (no wake-up) or not
            _recv_into(sock, buf, 4)
            self._poll.done(ticket)
        (size,) = FRAME.unpack_from(buf)
        if size > 1 << 30:
            raise ProtocolError(f"reply of {size} bytes is implausible")
        _recv_into(sock, buf, 4 + size)
        with memoryview(buf) as view:  # one copy of the body, not a slice and a copy
            frame = bytes(view[4 : 4 + size])
        del buf[: 4 + size]
        return frame


def _part_fields(part: list[QueueTask]) -> dict[str, Any]:
    """The tasks of one publish request. Tasks of one queue and type that set
    nothing but a payload (the usual bulk publish) go as that queue, type and a
    list of payloads: no JSON object per task to build here and to parse and
    check in the daemon (callgrind: 68.4k -> 58.3k instructions a task on the
    daemon's path, 21.8k -> 18.4k here)."""
    if part and (shared := _shared_queue_type(part)):
        payloads = [b64_text(t.payload) for t in part]
        return {"queue": shared[0], "type": shared[1], "payloads": payloads}
    return {"tasks": [t.to_publish_dict() for t in part]}


def _shared_queue_type(part: list[QueueTask]) -> tuple[str, str] | None:
    queue, ttype = part[0].queue, part[0].type
    for t in part:
        if t.queue != queue or t.type != ttype or t.id or not has_defaults(t):
            return None
    return queue, ttype


def _stored_copies(sources: list[QueueTask], brief: dict[str, Any]) -> list[QueueTask]:
    """The stored tasks, rebuilt from what was sent and the brief reply."""
    ids = brief["ids"]
    if not ids:
        return []
    shared = (from_stamp(brief["created"]), QueueTaskStatus(brief["status"]))
    others = {
        i: (from_stamp(created), QueueTaskStatus(status)) for i, created, status in brief["others"]
    }
    out = []
    for i, (task, task_id) in enumerate(zip(sources, ids, strict=False)):
        created_at, status = others.get(i, shared)
        available_at = created_at + timedelta(seconds=task.delay) if task.delay else created_at
        out.append(
            trusted_task(
                task.queue,
                task.type,
                task.payload,
                task.key,
                task.headers,
                task.delay,
                task.timeout,
                task.max_retry,
                task_id,
                0,
                status,
                "",
                created_at,
                available_at,
            )
        )
    return out


def _recv_into(sock: socket.socket, buf: bytearray, n: int) -> None:
    """Read from ``sock`` onto ``buf`` until it holds at least ``n`` bytes
    (64 KiB to 1 MiB a call: ``recv`` allocates all it is asked for)."""
    while len(buf) < n:
        chunk = sock.recv(min(max(n - len(buf), 1 << 16), 1 << 20))
        if not chunk:
            raise EOFError("connection closed by the daemon")
        buf += chunk


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline
