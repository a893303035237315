"""Metrics and the selector-driven /metrics responder, without a daemon.

The test drives the selector loop in its own thread, as the supervisor does,
while HTTP clients run in helper threads (threads are fine in the test).
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from procqueue.metrics import (
    MAX_CONNECTIONS,
    MAX_HEAD,
    RUN_SECONDS_BUCKETS,
    Metrics,
    MetricsServer,
    parse_address,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: bytes | str) -> Samples:
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(parsed: Samples, name: str, **labels: str) -> float | None:
    return parsed.get((name, frozenset(labels.items())))


def pump(selector: selectors.BaseSelector, until: Callable[[], bool], timeout: float = 10) -> None:
    """Run the loop as the supervisor would until ``until()`` or the deadline."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        for key, mask in selector.select(0.05):
            key.data(mask)


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes


@dataclass
class Fetch:
    """An urlopen in a thread; ``done`` once it has a reply or an error."""

    url: str
    method: str = "GET"
    data: bytes | None = None
    reply: Reply | None = None
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        request = urllib.request.Request(self.url, data=self.data, method=self.method)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                self.reply = Reply(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                self.reply = Reply(exc.code, exc.headers, exc.read())
        except BaseException as exc:
            self.error = exc

    def done(self) -> bool:
        return not self.thread.is_alive()


@dataclass
class Harness:
    selector: selectors.BaseSelector
    metrics: Metrics
    server: MetricsServer
    renders: list[float]

    def url(self, path: str) -> str:
        host, port = self.server.address
        return f"http://{host}:{port}{path}"

    def get(self, path: str, method: str = "GET", data: bytes | None = None) -> Reply:
        fetch = Fetch(self.url(path), method, data)
        pump(self.selector, fetch.done)
        fetch.thread.join()
        if fetch.error is not None:
            raise fetch.error
        assert fetch.reply is not None
        return fetch.reply

    def connect(self) -> socket.socket:
        return socket.create_connection(self.server.address, timeout=10)

    def pump(self, until: Callable[[], bool]) -> None:
        pump(self.selector, until)


@pytest.fixture
def harness() -> Iterator[Harness]:
    selector = selectors.DefaultSelector()
    metrics = Metrics()
    renders: list[float] = []
    server = MetricsServer(
        "127.0.0.1:0", selector, metrics, lambda: renders.append(time.monotonic())
    )
    try:
        yield Harness(selector, metrics, server, renders)
    finally:
        server.close()
        selector.close()


def record(metrics: Metrics) -> None:
    metrics.published("emails", 3)
    metrics.published("emails")
    metrics.published("reports")
    metrics.finished("emails", "succeeded", 0.003)
    metrics.finished("emails", "succeeded", 0.2)
    metrics.finished("emails", "failed", 45.0)
    metrics.finished("reports", "failed", None)
    metrics.retried("emails")
    metrics.worker_died("emails", "crash")
    metrics.worker_died("emails", "crash")
    metrics.worker_died("reports", "timeout")
    metrics.set_gauges(
        {
            "emails": {"pending": 5, "running": 2, "delayed": 1, "workers": 2},
            "reports": {"pending": 0, "running": 1, "delayed": 0, "workers": 1},
        }
    )


# -- Metrics, no sockets -----------------------------------------------------------


def test_counters_histogram_and_gauges_render_with_queue_labels():
    metrics = Metrics()
    record(metrics)
    got = samples(metrics.render())
    assert value(got, "procqueue_tasks_published_total", queue="emails") == 4
    assert value(got, "procqueue_tasks_published_total", queue="reports") == 1
    assert value(got, "procqueue_tasks_succeeded_total", queue="emails") == 2
    assert value(got, "procqueue_tasks_failed_total", queue="emails") == 1
    assert value(got, "procqueue_tasks_failed_total", queue="reports") == 1
    assert value(got, "procqueue_tasks_succeeded_total", queue="reports") is None
    assert value(got, "procqueue_tasks_retried_total", queue="emails") == 1
    assert value(got, "procqueue_worker_deaths_total", queue="emails", reason="crash") == 2
    assert value(got, "procqueue_worker_deaths_total", queue="reports", reason="timeout") == 1
    assert value(got, "procqueue_tasks_pending", queue="emails") == 5
    assert value(got, "procqueue_tasks_running", queue="emails") == 2
    assert value(got, "procqueue_tasks_delayed", queue="emails") == 1
    assert value(got, "procqueue_workers", queue="emails") == 2
    assert value(got, "procqueue_workers", queue="reports") == 1


def test_run_time_histogram_buckets():
    metrics = Metrics()
    record(metrics)
    got = samples(metrics.render())
    bucket = "procqueue_task_run_seconds_bucket"
    assert value(got, bucket, queue="emails", le="0.001") == 0
    assert value(got, bucket, queue="emails", le="0.005") == 1
    assert value(got, bucket, queue="emails", le="0.25") == 2
    assert value(got, bucket, queue="emails", le="30.0") == 2
    assert value(got, bucket, queue="emails", le="60.0") == 3
    assert value(got, bucket, queue="emails", le="+Inf") == 3
    assert value(got, "procqueue_task_run_seconds_count", queue="emails") == 3
    assert value(got, "procqueue_task_run_seconds_sum", queue="emails") == pytest.approx(45.203)
    # a run without a known duration is counted but not observed
    assert value(got, "procqueue_task_run_seconds_count", queue="reports") is None
    les = {dict(labels)["le"] for name, labels in got if name == bucket}
    assert les == {str(b) for b in RUN_SECONDS_BUCKETS} | {"+Inf"}


def test_a_queue_absent_from_the_snapshot_loses_its_gauge_series():
    metrics = Metrics()
    record(metrics)
    metrics.set_gauges({"emails": {"pending": 7, "running": 0, "delayed": 0, "workers": 2}})
    got = samples(metrics.render())
    assert value(got, "procqueue_tasks_pending", queue="emails") == 7
    for name in ("tasks_pending", "tasks_running", "tasks_delayed", "workers"):
        assert value(got, f"procqueue_{name}", queue="reports") is None
    # counters keep their history
    assert value(got, "procqueue_tasks_published_total", queue="reports") == 1
    metrics.set_gauges({"reports": {"pending": 1, "running": 0, "delayed": 0, "workers": 1}})
    got = samples(metrics.render())
    assert value(got, "procqueue_tasks_pending", queue="reports") == 1
    assert value(got, "procqueue_tasks_pending", queue="emails") is None


def test_registries_are_private_to_each_instance():
    a, b = Metrics(), Metrics()
    a.published("emails")
    assert value(samples(b.render()), "procqueue_tasks_published_total", queue="emails") is None


def test_unknown_status_and_reason_are_refused():
    metrics = Metrics()
    with pytest.raises(ValueError, match="succeeded"):
        metrics.finished("emails", "ok", 1.0)
    with pytest.raises(ValueError, match="crash"):
        metrics.worker_died("emails", "oom")


# -- addresses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (":9464", ("127.0.0.1", 9464)),
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("localhost:9464", ("localhost", 9464)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("[::]:0", ("::", 0)),
        ("metrics.example.com:80", ("metrics.example.com", 80)),
    ],
)
def test_parse_address(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("9464", "HOST:PORT"),
        ("", "HOST:PORT"),
        ("127.0.0.1:", "port"),
        ("127.0.0.1:http", "port"),
        ("127.0.0.1:70000", "port"),
        ("127.0.0.1:-1", "port"),
        ("::1:9464", "brackets"),
        ("[::1:9464", "IPv6"),
        ("[127.0.0.1]:9464", "IPv6"),
        ("bad host:9464", "host name"),
        ("http://localhost:9464", "scheme"),
        ("localhost:9464/metrics", "path"),
    ],
)
def test_malformed_addresses_raise_value_error(address, why):
    with pytest.raises(ValueError, match=why) as info:
        parse_address(address)
    assert repr(address) in str(info.value)
    with selectors.DefaultSelector() as selector, pytest.raises(ValueError):
        MetricsServer(address, selector, Metrics())


@pytest.mark.timeout(30)
def test_port_in_use_raises_os_error_naming_the_address(harness):
    port = harness.server.address[1]
    with selectors.DefaultSelector() as selector:
        with pytest.raises(OSError, match=f"127.0.0.1:{port}") as info:
            MetricsServer(f"127.0.0.1:{port}", selector, Metrics())
        assert not selector.get_map()
    assert info.value.errno is not None


@pytest.mark.timeout(30)
def test_default_host_is_loopback():
    with selectors.DefaultSelector() as selector:
        server = MetricsServer(":0", selector, Metrics())
        try:
            assert server.address[0] == "127.0.0.1"
            assert server.address[1] > 0
        finally:
            server.close()


@pytest.mark.timeout(30)
def test_ipv6_loopback():
    with selectors.DefaultSelector() as selector:
        try:
            server = MetricsServer("[::1]:0", selector, Metrics())
        except OSError:
            pytest.skip("no IPv6 loopback here")
        try:
            assert server.address[0] == "::1"
            with socket.create_connection(("::1", server.address[1]), timeout=10) as client:
                client.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert recv_all(selector, client).startswith(b"HTTP/1.0 200 OK")
        finally:
            server.close()


# -- serving -------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_scrape_returns_the_exposition(harness):
    record(harness.metrics)
    reply = harness.get("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert int(reply.headers["Content-Length"]) == len(reply.body)
    got = samples(reply.body)
    assert value(got, "procqueue_tasks_published_total", queue="emails") == 4
    assert value(got, "procqueue_worker_deaths_total", queue="emails", reason="crash") == 2
    assert value(got, "procqueue_task_run_seconds_count", queue="emails") == 3
    assert value(got, "procqueue_tasks_running", queue="reports") == 1
    assert len(harness.renders) == 1
    assert harness.server.fds() == [harness.server.listener]  # the connection was closed


@pytest.mark.timeout(30)
def test_before_render_refreshes_gauges_for_the_scrape():
    with selectors.DefaultSelector() as selector:
        metrics = Metrics()
        metrics.set_gauges({"old": {"pending": 1, "running": 0, "delayed": 0, "workers": 1}})
        snapshot = {"new": {"pending": 9, "running": 3, "delayed": 2, "workers": 4}}
        server = MetricsServer(":0", selector, metrics, lambda: metrics.set_gauges(snapshot))
        try:
            harness = Harness(selector, metrics, server, [])
            got = samples(harness.get("/metrics").body)
        finally:
            server.close()
    assert value(got, "procqueue_tasks_pending", queue="new") == 9
    assert value(got, "procqueue_workers", queue="new") == 4
    assert value(got, "procqueue_tasks_pending", queue="old") is None


@pytest.mark.timeout(30)
def test_query_string_is_ignored_and_head_has_no_body(harness):
    assert harness.get("/metrics?name[]=procqueue_workers").status == 200
    reply = harness.get("/metrics", method="HEAD")
    assert reply.status == 200
    assert reply.body == b""
    assert int(reply.headers["Content-Length"]) > 0


@pytest.mark.timeout(30)
def test_root_points_at_metrics_and_other_paths_are_404(harness):
    root = harness.get("/")
    assert root.status == 200
    assert b"/metrics" in root.body
    assert harness.get("/metrics/extra").status == 404
    assert harness.get("/favicon.ico").status == 404
    assert harness.renders == []


@pytest.mark.timeout(30)
def test_other_methods_are_405(harness):
    reply = harness.get("/metrics", method="POST", data=b"x" * 1000)
    assert reply.status == 405
    assert "GET" in reply.headers["Allow"]
    assert harness.get("/metrics", method="DELETE").status == 405
    assert harness.renders == []


@pytest.mark.timeout(30)
def test_a_failing_before_render_is_a_500_not_a_crash(caplog):
    def boom() -> None:
        raise RuntimeError("snapshot broke")

    with selectors.DefaultSelector() as selector:
        server = MetricsServer(":0", selector, Metrics(), boom)
        try:
            harness = Harness(selector, server.metrics, server, [])
            assert harness.get("/metrics").status == 500
            assert harness.get("/").status == 200
        finally:
            server.close()
    assert "rendering a scrape failed" in caplog.text


@pytest.mark.timeout(30)
def test_a_silent_connection_does_not_block_another_scrape(harness):
    with harness.connect() as silent:
        harness.pump(lambda: len(harness.server.conns) == 1)
        reply = harness.get("/metrics")
        assert reply.status == 200
        assert len(harness.renders) == 1
        assert len(harness.server.conns) == 1  # the silent one: still waiting, still registered
        assert not _eof(silent)
    harness.pump(lambda: not harness.server.conns)  # its close is noticed


@pytest.mark.timeout(30)
def test_a_request_split_across_packets_is_answered(harness):
    with harness.connect() as client:
        client.sendall(b"GET /metr")
        harness.pump(lambda: len(harness.server.conns) == 1)
        for _ in range(5):
            for key, mask in harness.selector.select(0.05):
                key.data(mask)
        client.sendall(b"ics HTTP/1.1\r\nHost: x\r\n\r\n")
        harness.pump(lambda: not harness.server.conns or bool(harness.renders))
        assert recv_all(harness.selector, client).startswith(b"HTTP/1.0 200 OK\r\n")


@pytest.mark.timeout(30)
def test_an_oversized_head_gets_431_and_is_closed(harness):
    with harness.connect() as client:
        client.sendall(b"GET /metrics HTTP/1.0\r\n" + b"X-Padding: aaaaaaaa\r\n" * (MAX_HEAD // 20))
        response = recv_all(harness.selector, client)
    assert response.startswith(b"HTTP/1.0 431 ")
    assert harness.renders == []


@pytest.mark.timeout(30)
def test_a_malformed_request_line_is_400(harness):
    with harness.connect() as client:
        client.sendall(b"hello\r\n\r\n")
        assert recv_all(harness.selector, client).startswith(b"HTTP/1.0 400 ")


@pytest.mark.timeout(30)
def test_a_large_response_survives_partial_sends(harness):
    for i in range(300):
        harness.metrics.finished(f"queue-{i:04d}", "succeeded", 0.01 * i)
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(harness.server.address)
        harness.pump(lambda: len(harness.server.conns) == 1)
        (conn,) = harness.server.conns  # a small send buffer forces partial sends
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        harness.pump(lambda: bool(harness.renders))
        key = harness.selector.get_key(conn.sock)
        assert key.events == selectors.EVENT_WRITE, "the body fit in one send"
        response = recv_all(harness.selector, client)
    head, _, body = response.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    got = samples(body)
    assert value(got, "procqueue_task_run_seconds_count", queue="queue-0299") == 1
    assert value(got, "procqueue_task_run_seconds_count", queue="queue-0000") == 1


@pytest.mark.timeout(30)
def test_connections_are_capped_dropping_the_oldest(harness):
    clients = [harness.connect() for _ in range(MAX_CONNECTIONS + 1)]
    try:
        harness.pump(lambda: _eof(clients[0]))
        assert len(harness.server.conns) == MAX_CONNECTIONS
        assert len(harness.server.fds()) == MAX_CONNECTIONS + 1
        clients[-1].sendall(b"GET / HTTP/1.0\r\n\r\n")  # the newest is served
        assert recv_all(harness.selector, clients[-1]).startswith(b"HTTP/1.0 200 OK")
        assert not _eof(clients[1])  # the others stay open
    finally:
        for client in clients:
            client.close()


@pytest.mark.timeout(30)
def test_fds_lists_every_socket_and_close_closes_them():
    selector = selectors.DefaultSelector()
    server = MetricsServer(":0", selector, Metrics())
    try:
        with socket.create_connection(server.address, timeout=10):
            pump(selector, lambda: len(server.conns) == 1)
            fds = server.fds()
            assert len(fds) == 2
            assert fds[0] is server.listener
            server.close()
            assert all(sock.fileno() == -1 for sock in fds)
            assert not selector.get_map()
    finally:
        server.close()
        selector.close()


def recv_all(selector: selectors.BaseSelector, client: socket.socket) -> bytes:
    """Read until the server closes, pumping its loop meanwhile."""
    client.setblocking(False)
    chunks: list[bytes] = []
    closed = False

    def read() -> bool:
        nonlocal closed
        try:
            while chunk := client.recv(65536):
                chunks.append(chunk)
            closed = True
        except BlockingIOError:
            pass
        return closed

    pump(selector, read)
    return b"".join(chunks)


def _eof(client: socket.socket) -> bool:
    client.setblocking(False)
    try:
        return client.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
