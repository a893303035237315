"""The control socket, server side: framing and connections, no task logic.

Protocol: a Unix stream socket carrying frames ``u32 length (little-endian)
| orjson object``. Each request is an object with an ``op``; each gets one
reply, in order: ``{"ok": value}`` or ``{"error": {"code", "error",
"message"}}``. No pickle anywhere: a client can name a queue and a type,
never code. A malformed frame gets an error reply; an oversized one gets an
error reply and the connection is closed.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from .errors import DaemonUnavailable, ProcQueueError, ProtocolError
from .spinwait import CpuNudge

log = logging.getLogger("procqueue.control")

FRAME = struct.Struct("<I")
MAX_REQUEST = 256 << 20  # a 16 MiB payload is ~22 MiB once base64'd into JSON
MAX_PIPELINE = 256  # requests of one connection handled but not yet answered
_READ_BUFFER = bytearray(1 << 20)  # every connection reads into this (one loop thread)
_READ_VIEW = memoryview(_READ_BUFFER)
# A client whose request came within QUICK_CLIENT of our last write to it is in
# a request/reply loop (``run``, ``publish`` then ``wait``, ``Pool.run``): after
# the next write to it the loop polls for up to NEXT_REQUEST_SPIN before it
# sleeps, so that the next request costs no wake-up (see ``Supervisor._select``).
QUICK_CLIENT = 1e-3
NEXT_REQUEST_SPIN = 100e-6


class Deferred:
    """Returned by a request handler that will answer later, through the
    function ``Conn.defer`` gave it."""


DEFERRED = Deferred()
Handler = Callable[["Conn", dict[str, Any]], Any]


def encode_frame(obj: Any) -> bytes:
    body = orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    return FRAME.pack(len(body)) + body


def error_reply(exc: ProcQueueError, **extra: Any) -> dict[str, Any]:
    return {"error": exc.to_dict(), **extra}


class Conn:
    """One client connection. Requests are handled as they arrive, even while
    earlier ones wait for a deferred answer (a publish waits for its commit),
    so a client may pipeline; replies always go out in request order."""

    def __init__(self, server: ControlServer, sock: socket.socket) -> None:
        self.server, self.sock = server, sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        # One entry per request not yet sent back, oldest first: [reply frame],
        # or [None] while the request's answer is deferred.
        self.answers: collections.deque[list[bytes | None]] = collections.deque()
        self._current: list[bytes | None] | None = None  # the request being handled
        self._processing = False
        self.closed = False
        self.close_after_reply = False
        self.want_write = False
        self.session: dict[str, Any] = {}  # per-connection state of the request handler
        self.sent_at = 0.0  # perf_counter() when outbuf last went out whole
        self.quick = False  # its last request came within QUICK_CLIENT of that

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self._read()
        if mask & selectors.EVENT_WRITE and not self.closed:
            self._write()

    def _read(self) -> None:
        # recv_into one buffer the loop reuses: ``recv(1 << 20)`` allocates (and
        # on this path mmaps and unmaps) 1 MiB a call, measured at ~22 us of a
        # request's ~60 us; a read into the reused buffer costs ~0.3 us more
        # than the syscall.
        try:
            n = self.sock.recv_into(_READ_BUFFER)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if not n:
            self.close()
            return
        # Measured when we read, so a late wake-up of ours counts against the
        # client: hence a bound of 1 ms, well above a vCPU's wake-up time.
        self.quick = time.perf_counter() - self.sent_at < QUICK_CLIENT
        self.inbuf += _READ_VIEW[:n]
        self._process()

    def _process(self) -> None:
        if self._processing:  # an answer given while handling: the loop below goes on
            return
        self._processing = True
        try:
            while (
                not self.closed
                and not self.close_after_reply
                and len(self.answers) < MAX_PIPELINE
                and len(self.inbuf) >= 4
            ):
                (size,) = FRAME.unpack_from(self.inbuf)
                if size > MAX_REQUEST:
                    self.close_after_reply = True
                    error = ProtocolError(f"request of {size} bytes exceeds {MAX_REQUEST}")
                    self._answer(self._slot(), error_reply(error))
                    return
                if len(self.inbuf) < 4 + size:
                    return
                body = bytes(self.inbuf[4 : 4 + size])
                del self.inbuf[: 4 + size]
                self._handle(body)
        finally:
            self._processing = False

    def _slot(self) -> list[bytes | None]:
        slot: list[bytes | None] = [None]
        self.answers.append(slot)
        return slot

    def _handle(self, body: bytes) -> None:
        slot = self._slot()
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            self._answer(slot, error_reply(ProtocolError(f"request is not valid JSON: {exc}")))
            return
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            error = ProtocolError('a request must be an object with a string "op"')
            self._answer(slot, error_reply(error))
            return
        self._current = slot
        try:
            result = self.server.handler(self, request)
        except ProcQueueError as exc:
            result = error_reply(exc)
        except Exception as exc:  # a bug must not take the daemon down
            log.exception("control request %r failed", request.get("op"))
            result = error_reply(ProtocolError(f"internal error handling {request['op']!r}: {exc}"))
        finally:
            self._current = None
        if result is not DEFERRED:
            self._answer(slot, result)

    def defer(self) -> Callable[[Any], None]:
        """For a handler about to return ``DEFERRED``: the function that answers
        the request being handled, later."""
        slot = self._current
        assert slot is not None, "defer() outside a request handler"
        return lambda obj: self._answer(slot, obj)

    def _answer(self, slot: list[bytes | None], obj: Any) -> None:
        if self.closed or slot[0] is not None:
            return
        slot[0] = encode_frame(obj)
        answers = self.answers
        while answers and (frame := answers[0][0]) is not None:
            self.outbuf += frame
            answers.popleft()
        self._write()
        if not self.closed:
            self._process()  # requests held back by a full pipeline may go on

    def push(self, obj: Any) -> None:
        """An event frame (``{"event": ...}``) outside the request/reply order.
        Sent at the end of the loop turn (``ControlServer.flush``): a pool that
        finishes thousands of tasks a turn then costs one ``send``, not one each."""
        if not self.closed:
            self.outbuf += encode_frame(obj)
            self.server.corked.add(self)

    def _write(self) -> None:
        try:
            sent = self.sock.send(self.outbuf)
            del self.outbuf[:sent]
            if not self.outbuf:
                self.sent_at = time.perf_counter()
                if self.quick:
                    self.server.spin_until = self.sent_at + NEXT_REQUEST_SPIN
                    self.server.nudge.after_reply(self.sock)
        except BlockingIOError:
            pass
        except OSError:
            self.close()
            return
        if not self.outbuf and not self.answers and self.close_after_reply:
            self.close()
            return
        want_write = bool(self.outbuf)
        if want_write != self.want_write:  # one epoll_ctl only when interest changes
            self.want_write = want_write
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self.server.selector.modify(self.sock, events, self.on_event)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.forget(self)
        with contextlib.suppress(KeyError, ValueError):
            self.server.selector.unregister(self.sock)
        self.sock.close()


class ControlServer:
    def __init__(
        self, path: Path, mode: int, selector: selectors.BaseSelector, handler: Handler
    ) -> None:
        self.path, self.selector, self.handler = path, selector, handler
        self.conns: set[Conn] = set()
        self.corked: set[Conn] = set()  # pushed events not yet written
        self.spin_until = 0.0  # perf_counter(): poll, don't sleep, until then
        self.nudge = CpuNudge()  # off the CPU of a client in a request/reply loop
        self.listener = _listen(path, mode)
        selector.register(self.listener, selectors.EVENT_READ, self._accept)

    def _accept(self, mask: int) -> None:
        for sock in accept_all(self.listener, "control socket"):
            conn = Conn(self, sock)
            self.conns.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, conn.on_event)

    def forget(self, conn: Conn) -> None:
        self.conns.discard(conn)
        self.corked.discard(conn)

    def flush(self) -> None:
        """Write the events pushed this loop turn."""
        if not self.corked:
            return
        corked, self.corked = self.corked, set()
        for conn in corked:
            if not conn.closed:
                conn._write()

    def fds(self) -> list[socket.socket]:
        return [self.listener, *(c.sock for c in self.conns)]

    def close(self) -> None:
        for conn in list(self.conns):
            conn.close()
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.listener)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def accept_all(listener: socket.socket, what: str) -> Iterator[socket.socket]:
    """Every connection waiting on a non-blocking listener, made non-blocking."""
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and the like: log, keep serving
            log.warning("%s: accept failed: %s", what, exc)
            return
        sock.setblocking(False)
        yield sock


def _listen(path: Path, mode: int) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_socket():
        if _alive(path):
            raise DaemonUnavailable(
                f"another procqueue daemon is already serving {path}; stop it first "
                "or give this config another socket"
            )
        path.unlink()  # stale, left by a daemon that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            log.debug("probing %s: %s", path, exc)
        return False
    finally:
        probe.close()
