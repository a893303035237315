"""Prometheus metrics for the supervisor, served from the supervisor's own loop.

``Metrics`` holds the counters, the run-time histogram and the gauges in a
private ``CollectorRegistry``; only the supervisor records into it (a worker's
copy after fork is meaningless and must not be used).

``MetricsServer`` answers ``GET /metrics`` as a tiny HTTP/1.0 responder whose
sockets are registered in the supervisor's ``selectors`` loop, like the control
socket. It is deliberately *not* ``prometheus_client.start_http_server``: that
starts a daemon thread running a ``ThreadingHTTPServer``, and the supervisor
forks workers. ``fork()`` copies only the calling thread; if the server thread
holds a lock at that instant (a metric's value lock while collecting, the
registry lock, a ``logging`` handler lock, the allocator's), the child inherits
the lock held by a thread that no longer exists and deadlocks the first time it
takes it. Serving from the loop also keeps one wait for everything, and a scrape
sees a consistent state: it is rendered between two turns of the loop, after
``before_render`` has refreshed the gauges, with no locking of our own.

A connection never blocks the loop: it is non-blocking, read until the end of
the request head, answered, and closed once the response is fully written. A
client that connects and says nothing simply stays registered; at most
``MAX_CONNECTIONS`` are kept, the oldest is dropped to admit a new one.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import logging
import re
import selectors
import socket
from collections.abc import Callable, Mapping
from http import HTTPStatus
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .control import accept_all

log = logging.getLogger("procqueue.metrics")

RUN_SECONDS_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
FINISH_STATUSES = ("succeeded", "failed")
DEATH_REASONS = ("crash", "timeout", "recycled", "boot")
GAUGES = {  # snapshot key -> (metric name, help)
    "pending": ("procqueue_tasks_pending", "Tasks ready to run, waiting for a worker."),
    "running": ("procqueue_tasks_running", "Tasks being run by a worker."),
    "delayed": ("procqueue_tasks_delayed", "Tasks waiting for their ETA or retry delay."),
    "workers": ("procqueue_workers", "Live worker processes."),
}


class Metrics:
    """Every procqueue metric, in a registry of its own (tests create several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._published = self._counter("tasks_published", "Tasks accepted into a queue.")
        self._finished = {
            "succeeded": self._counter("tasks_succeeded", "Task runs that succeeded."),
            "failed": self._counter("tasks_failed", "Task runs that failed."),
        }
        self._retried = self._counter("tasks_retried", "Failed task runs scheduled again.")
        self._deaths = Counter(
            "procqueue_worker_deaths",
            "Worker processes that ended, by reason: " + ", ".join(DEATH_REASONS) + ".",
            ["queue", "reason"],
            registry=self.registry,
        )
        self._run_seconds = Histogram(
            "procqueue_task_run_seconds",
            "Time a worker spent running a task, in seconds.",
            ["queue"],
            buckets=RUN_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._gauges = {
            key: Gauge(name, help_text, ["queue"], registry=self.registry)
            for key, (name, help_text) in GAUGES.items()
        }
        self._gauge_queues: set[str] = set()

    def _counter(self, name: str, help_text: str) -> Counter:
        # prometheus_client appends the ``_total`` suffix to a counter's sample.
        return Counter(f"procqueue_{name}", help_text, ["queue"], registry=self.registry)

    def published(self, queue: str, n: int = 1) -> None:
        self._published.labels(queue=queue).inc(n)

    def finished(self, queue: str, status: str, seconds: float | None) -> None:
        """Count a finished run; ``seconds`` is its run time, if known."""
        if status not in self._finished:
            raise ValueError(f"finished status must be one of {FINISH_STATUSES}, got {status!r}")
        self._finished[status].labels(queue=queue).inc()
        if seconds is not None:
            self._run_seconds.labels(queue=queue).observe(seconds)

    def retried(self, queue: str) -> None:
        self._retried.labels(queue=queue).inc()

    def worker_died(self, queue: str, reason: str) -> None:
        if reason not in DEATH_REASONS:  # keeps the label's cardinality bounded
            raise ValueError(f"worker death reason must be one of {DEATH_REASONS}, got {reason!r}")
        self._deaths.labels(queue=queue, reason=reason).inc()

    def set_gauges(self, snapshot: Mapping[str, Mapping[str, int]]) -> None:
        """Set the gauges from ``{queue: {"pending", "running", "delayed", "workers"}}``.

        A queue absent from the snapshot (removed by a reload) loses its gauge
        series instead of reporting its last values forever; a missing key is 0.
        """
        for queue, values in snapshot.items():
            for key, gauge in self._gauges.items():
                gauge.labels(queue=queue).set(values.get(key, 0))
        for gone in self._gauge_queues - snapshot.keys():
            for gauge in self._gauges.values():
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
        self._gauge_queues = set(snapshot)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# -- the HTTP responder --------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"  # loopback unless the user names an address
MAX_HEAD = 8 << 10  # a longer request head gets 431
MAX_CONNECTIONS = 64  # beyond this the oldest connection is dropped
MAX_DRAIN = 64 << 10  # bytes discarded from a client after its response, then close
BACKLOG = 64
INDEX = b"procqueue metrics exporter: scrape /metrics\n"
NOT_FOUND = b"not found: the metrics are at /metrics\n"
TEXT_PLAIN = "text/plain; charset=utf-8"
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\Z")


class ConnState(enum.StrEnum):
    READING = "reading"  # until the request head ends
    WRITING = "writing"  # the response, across partial sends
    LINGERING = "lingering"  # write side shut; discard input until the client closes
    CLOSED = "closed"


class _Conn:
    """One scrape: read the head, answer, shut down, close."""

    def __init__(self, server: MetricsServer, sock: socket.socket) -> None:
        self.server, self.sock = server, sock
        self.state = ConnState.READING
        self.inbuf = bytearray()
        self.out = memoryview(b"")
        self.drained = 0

    def on_event(self, mask: int) -> None:
        if self.state is ConnState.READING:
            self._read()
        elif self.state is ConnState.WRITING:
            self._write()
        elif self.state is ConnState.LINGERING:
            self._drain()

    def _recv(self) -> bytes | None:
        """Some bytes; ``b""`` at EOF or on error; None when nothing is there yet."""
        try:
            return self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def _read(self) -> None:
        data = self._recv()
        if data is None:
            return
        if not data:
            self.close()
            return
        self.inbuf += data
        end = _head_end(self.inbuf)
        if end > MAX_HEAD or (end < 0 and len(self.inbuf) >= MAX_HEAD):
            self.respond(_response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"head too large\n"))
        elif end >= 0:
            self.respond(self.server.answer(bytes(self.inbuf[:end])))

    def respond(self, response: bytes) -> None:
        self.state = ConnState.WRITING
        self.inbuf.clear()
        self.out = memoryview(response)
        self._write()

    def _write(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        self.out = self.out[sent:]
        if self.out:  # partial send: wait until the socket can take more
            self.server.selector.modify(self.sock, selectors.EVENT_WRITE, self.on_event)
            return
        self._linger()

    def _linger(self) -> None:
        # Closing with unread input (a POST body, a pipelined request) would
        # send RST and could destroy the response in flight: shut our side, then
        # discard whatever the client still sends until it closes.
        self.state = ConnState.LINGERING
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self.server.selector.modify(self.sock, selectors.EVENT_READ, self.on_event)
        self._drain()

    def _drain(self) -> None:
        while (data := self._recv()) is not None:
            self.drained += len(data)
            if not data or self.drained > MAX_DRAIN:
                self.close()
                return

    def close(self) -> None:
        if self.state is ConnState.CLOSED:
            return
        self.state = ConnState.CLOSED
        self.server.forget(self)
        with contextlib.suppress(KeyError, ValueError):
            self.server.selector.unregister(self.sock)
        self.sock.close()


class MetricsServer:
    """A minimal HTTP/1.0 responder on the supervisor's own selector: no thread."""

    def __init__(
        self,
        address: str,
        selector: selectors.BaseSelector,
        metrics: Metrics,
        before_render: Callable[[], None] | None = None,
    ) -> None:
        self.selector, self.metrics, self.before_render = selector, metrics, before_render
        self.conns: dict[_Conn, None] = {}  # an ordered set: the first is the oldest
        self.listener = _listen(address)
        name = self.listener.getsockname()
        self.address: tuple[str, int] = (name[0], name[1])
        selector.register(self.listener, selectors.EVENT_READ, self._accept)

    def _accept(self, mask: int) -> None:
        for sock in accept_all(self.listener, "metrics"):
            if len(self.conns) >= MAX_CONNECTIONS:
                oldest = next(iter(self.conns))
                log.debug("metrics: %d connections open, dropping the oldest", len(self.conns))
                oldest.close()
            conn = _Conn(self, sock)
            self.conns[conn] = None
            self.selector.register(sock, selectors.EVENT_READ, conn.on_event)

    def answer(self, head: bytes) -> bytes:
        """The full response to one request head."""
        parts = head.split(b"\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(HTTPStatus.BAD_REQUEST, b"malformed request line\n")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            body = f"method {method} not allowed: use GET\n".encode("latin-1")
            return _response(HTTPStatus.METHOD_NOT_ALLOWED, body, allow="GET, HEAD")
        path = urlsplit(target).path
        if path == "/metrics":
            status, body, content_type = self._scrape()
        elif path == "/":
            status, body, content_type = HTTPStatus.OK, INDEX, TEXT_PLAIN
        else:
            status, body, content_type = (
                HTTPStatus.NOT_FOUND,
                b"not found: try /metrics\n",
                TEXT_PLAIN,
            )
        return _response(status, body, content_type, head_only=method == "HEAD")

    def _scrape(self) -> tuple[HTTPStatus, bytes, str]:
        try:
            if self.before_render is not None:
                self.before_render()
            return HTTPStatus.OK, self.metrics.render(), CONTENT_TYPE_LATEST
        except Exception:  # a bug must not take the supervisor down
            log.exception("metrics: rendering a scrape failed")
            return HTTPStatus.INTERNAL_SERVER_ERROR, b"scrape failed: see the log\n", TEXT_PLAIN

    def forget(self, conn: _Conn) -> None:
        self.conns.pop(conn, None)

    def fds(self) -> list[socket.socket]:
        """Every socket (listener and connections), for a forked child to close."""
        return [self.listener, *(conn.sock for conn in self.conns)]

    def close(self) -> None:
        for conn in list(self.conns):
            conn.close()
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.listener)
        self.listener.close()


def _head_end(buf: bytearray) -> int:
    """Where the request head ends (blank line included), or -1."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := buf.find(sep)) >= 0]
    return min(ends, default=-1)


def _response(
    status: HTTPStatus,
    body: bytes,
    content_type: str = TEXT_PLAIN,
    *,
    head_only: bool = False,
    allow: str | None = None,
) -> bytes:
    lines = [
        f"HTTP/1.0 {status.value} {status.phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if allow is not None:
        lines.append(f"Allow: {allow}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``":port"`` -> (host, port); ValueError says why not."""
    host, sep, port = address.rpartition(":")
    if "/" in address:
        raise _bad(address, "give HOST:PORT alone, without a scheme or a path")
    if not sep:
        raise _bad(address, "expected HOST:PORT, e.g. 127.0.0.1:9464, [::1]:9464 or :9464")
    return _parse_host(address, host), _parse_port(address, port)


def _parse_host(address: str, host: str) -> str:
    if not host:
        return DEFAULT_HOST
    if host.startswith("["):
        inner = host[1:-1] if host.endswith("]") else ""
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise _bad(address, f"{host} is not a bracketed IPv6 address like [::1]") from None
        return inner
    if ":" in host:
        raise _bad(address, "write an IPv6 address in brackets, e.g. [::1]:9464")
    if not _HOSTNAME.match(host):
        raise _bad(address, f"{host!r} is not a host name or IP address")
    return host


def _parse_port(address: str, port: str) -> int:
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise _bad(address, f"the port must be a number from 0 to 65535, got {port!r}")
    return int(port)


def _bad(address: str, why: str) -> ValueError:
    return ValueError(f"metrics address {address!r}: {why}")


def _listen(address: str) -> socket.socket:
    host, port = parse_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise _bad(address, f"cannot resolve {host!r}: {exc.strerror}") from exc
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        raise OSError(exc.errno, f"cannot serve metrics on {address}: {why}") from exc
    return sock
