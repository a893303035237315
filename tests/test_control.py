"""The control socket and the CLI around it: bad input gets a clear error, never a crash."""

from __future__ import annotations

import socket
import stat
import struct

import orjson
import pytest

from conftest import run_cli, write_config
from procqueue import QueueTask, QueueTaskStatus
from procqueue.control import MAX_REQUEST

pytestmark = pytest.mark.timeout(60)


def _raw(daemon, data: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(daemon.socket))
    sock.sendall(data)
    return sock


def _reply(sock: socket.socket) -> dict:
    head = sock.recv(4, socket.MSG_WAITALL)
    (size,) = struct.unpack("<I", head)
    return orjson.loads(sock.recv(size, socket.MSG_WAITALL))


def _frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def test_socket_is_private(daemon):
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", '"op"'),
        (b'{"op": "explode"}', "unknown op"),
        (b'{"op": "publish", "tasks": "x"}', "list of task objects"),
        (
            b'{"op": "publish", "tasks": [{"queue": "default", "type": "echo", "bogus": 1}]}',
            "unknown task field",
        ),
        (
            b'{"op": "publish", "tasks": [{"queue": "default", "type": "echo", "payload": "!!"}]}',
            "base64",
        ),
        (b'{"op": "publish", "queue": "default", "type": "echo"}', '"payloads"'),
        (
            b'{"op": "publish", "queue": "default", "type": "echo", "payloads": [5]}',
            "base64 string or null",
        ),
        (
            b'{"op": "publish", "queue": "default", "type": "echo", "payloads": ["!!"]}',
            "base64",
        ),
        (b'{"op": "publish", "queue": 1, "type": "echo", "payloads": [null]}', "strings"),
        (
            b'{"op": "publish", "queue": "nowhere", "type": "echo", "payloads": [null]}',
            "not registered",
        ),
    ],
)
def test_malformed_requests_get_error_replies(daemon, body, expect):
    with _raw(daemon, _frame(body)) as sock:
        reply = _reply(sock)
        assert expect in reply["error"]["message"]
        assert isinstance(reply["error"]["code"], int)
        # the same connection still works afterwards
        sock.sendall(_frame(b'{"op": "ping"}'))
        assert _reply(sock)["ok"]["state"] == "running"


def test_oversized_frame_is_refused_and_connection_closed(daemon):
    with _raw(daemon, struct.pack("<I", MAX_REQUEST + 1)) as sock:
        reply = _reply(sock)
        assert "exceeds" in reply["error"]["message"]
        assert sock.recv(1) == b""
    assert daemon.client().ping()["state"] == "running"


def test_client_disconnect_mid_frame_does_not_hurt(daemon):
    sock = _raw(daemon, struct.pack("<I", 100) + b'{"op"')
    sock.close()
    done = daemon.run_task(queue="default", type="echo")
    assert done.status is QueueTaskStatus.SUCCEEDED


def test_wait_with_timeout_returns_unfinished_task(daemon):
    client = daemon.client()
    stored = client.publish(QueueTask(queue="default", type="stamp", delay=5))
    task = client.wait(stored.id, timeout=0.2)
    assert task.status is QueueTaskStatus.PENDING


def test_second_daemon_on_same_socket_refuses(daemon):
    from conftest import start_daemon

    other = start_daemon(daemon.config)
    assert other.proc.wait(20) == 1
    assert "already serving" in other.logs()
    assert daemon.client().ping()["state"] == "running"


def test_bad_config_exits_2_naming_file_and_key(short_dir):
    config = write_config(
        short_dir,
        queues="""
        [queues."q"]
        concurrency = "two"
    """,
    )
    for command in ("run", "check"):
        result = run_cli(command, str(config))
        assert result.returncode == 2
        assert str(config) in result.stderr
        assert 'queues."q".concurrency' in result.stderr and "integer" in result.stderr


def test_check_imports_every_handler(short_dir):
    good = write_config(
        short_dir,
        queues="""
        [queues."q"]
        [queues."q".handlers]
        "echo" = "pqhandlers:echo"
    """,
    )
    result = run_cli("check", str(good))
    assert result.returncode == 0 and "ok" in result.stdout
    bad = write_config(
        short_dir,
        queues="""
        [queues."q"]
        [queues."q".handlers]
        "x" = "broken_handlers:handler"
        "y" = "pqhandlers:no_such_function"
    """,
    )
    result = run_cli("check", str(bad))
    assert result.returncode == 1
    assert "broken on purpose" in result.stderr and "no_such_function" in result.stderr


def test_cli_without_daemon_fails_clearly(short_dir):
    config = write_config(short_dir)
    result = run_cli("status", str(config))
    assert result.returncode == 1 and "cannot reach the procqueue daemon" in result.stderr


def test_help_for_every_command():
    for command in ("run", "check", "publish", "task", "status"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: procqueue" in result.stdout


def test_pipelined_requests_are_all_answered_in_order(daemon):
    task = {"queue": "default", "type": "echo"}
    requests = [
        b'{"op": "ping"}',
        orjson.dumps({"op": "publish", "tasks": [task], "brief": "ids"}),
        b"{not json",
        b'{"op": "get_task", "id": "no-such-task"}',
        orjson.dumps({"op": "publish", "tasks": [task, task], "brief": "count"}),
        b'{"op": "ping"}',
    ]
    with _raw(daemon, b"".join(_frame(body) for body in requests)) as sock:
        replies = [_reply(sock) for _ in requests]
    assert replies[0]["ok"]["state"] == "running"
    assert len(replies[1]["ok"]["ids"]) == 1
    assert "not valid JSON" in replies[2]["error"]["message"]
    assert "not found" in replies[3]["error"]["message"]
    assert replies[4] == {"ok": 2}
    assert replies[5]["ok"]["state"] == "running"


def test_publish_many_sends_parts_and_admits_only_a_prefix(daemon):
    from procqueue.client import PUBLISH_PART
    from procqueue.errors import QueueNotRegistered

    client = daemon.client()
    good = [QueueTask(queue="default", type="echo", key=str(i)) for i in range(PUBLISH_PART * 2)]
    stored = client.publish_many(good)
    assert [t.key for t in stored] == [t.key for t in good]
    assert len({t.id for t in stored}) == len(good)
    # the second part names an unknown queue: it is refused whole, and the third
    # part, valid on its own, is refused with it (what got in stays a prefix)
    mixed = [QueueTask(queue="default", type="echo") for _ in range(PUBLISH_PART * 3)]
    mixed[PUBLISH_PART + 1] = QueueTask(queue="nowhere", type="echo")
    before = client.status()["queues"]["default"]["published"]
    with pytest.raises(QueueNotRegistered) as caught:
        client.publish_many(mixed)
    accepted = caught.value.accepted
    assert len(accepted) == PUBLISH_PART
    assert client.status()["queues"]["default"]["published"] == before + PUBLISH_PART
    for task in accepted[-3:]:
        assert client.wait(task.id, timeout=20).status is QueueTaskStatus.SUCCEEDED


def test_held_replies_go_when_what_they_report_is_durable():
    """Publish replies wait for their tasks' INSERT ticket, the others for the
    turn's last ticket; none overtakes a reply held before it."""
    from procqueue.api import Requests

    sent: list[str] = []
    requests = Requests(None, None, dict, str)  # type: ignore[arg-type]

    def reply(name: str) -> tuple[object, dict[str, str]]:
        return (lambda frame: sent.append(frame["name"]), {"name": name})

    requests.after_admit.append(reply("publish-1"))
    requests.after_commit.append(reply("wait-1"))
    requests.hold_until(1, 2)
    requests.after_admit.append(reply("publish-2"))
    requests.hold_until(3, 4)
    requests.after_commit.append(reply("status"))
    requests.hold_until(0, 0)  # nothing to write this turn: still behind the others
    requests.send_durable(1)
    assert sent == ["publish-1"]
    requests.send_durable(3)
    assert sent == ["publish-1", "wait-1", "publish-2", "status"]


def test_admitted_tasks_are_handed_on_before_the_reply():
    """A publish calls ``on_admit`` (the supervisor dispatches and rings the
    workers there, mid-turn) once its tasks are in the ready queue; a publish
    that admitted nothing does not."""
    from procqueue.api import Requests
    from procqueue.broker import Broker
    from procqueue.config import TaskQueueConfig
    from procqueue.store.memory import MemoryStore

    store = MemoryStore()
    queues = {"q": TaskQueueConfig(buffer_size=1, handlers={"t": "m:f"})}
    broker = Broker(queues, store, lambda: 1_700_000_000.0)
    requests = Requests(broker, store, dict, str)
    ready_at_admit: list[int] = []
    requests.on_admit = lambda: ready_at_admit.append(len(broker.queues["q"].ready))

    class Conn:
        session: dict[str, object] = {}
        closed = False

        def defer(self):
            return lambda frame: None

    def publish(count: int) -> None:
        tasks = [{"queue": "q", "type": "t"} for _ in range(count)]
        requests.handle(Conn(), {"op": "publish", "tasks": tasks})

    publish(1)
    assert ready_at_admit == [1]
    publish(1)  # the queue is full: nothing admitted, nothing to hand on
    assert ready_at_admit == [1]
    assert "error" in requests.after_admit[-1][1]


def test_payload_only_tasks_are_published_in_the_compact_form():
    from procqueue.client import _part_fields

    same = [QueueTask(queue="q", type="t", payload=p) for p in (b"a", None, b"")]
    assert _part_fields(same) == {"queue": "q", "type": "t", "payloads": ["YQ==", None, None]}
    for differs in (
        QueueTask(queue="other", type="t"),
        QueueTask(queue="q", type="other"),
        QueueTask(queue="q", type="t", key="k"),
        QueueTask(queue="q", type="t", id="mine"),
        QueueTask(queue="q", type="t", headers={"h": "v"}),
        QueueTask(queue="q", type="t", delay=1),
        QueueTask(queue="q", type="t", timeout=1),
        QueueTask(queue="q", type="t", max_retry=1),
    ):
        fields = _part_fields([*same, differs])
        assert list(fields) == ["tasks"] and len(fields["tasks"]) == 4


def test_compact_publish_runs_every_task_with_its_own_payload(daemon):
    from procqueue.client import PUBLISH_PART

    client = daemon.client()
    tasks = [
        QueueTask(queue="default", type="echo", payload=orjson.dumps(i) if i % 3 else None)
        for i in range(PUBLISH_PART + 10)
    ]
    stored = client.publish_many(tasks)
    assert [t.payload for t in stored] == [t.payload for t in tasks]
    for i in (0, 1, 2, PUBLISH_PART + 9):
        done = client.wait(stored[i].id, timeout=20)
        assert done.status is QueueTaskStatus.SUCCEEDED
        assert done.result["payload"] == (i if i % 3 else None)
        assert client.get_task(stored[i].id).payload == tasks[i].payload


def test_a_client_in_a_request_reply_loop_keeps_the_loop_polling(tmp_path):
    """A request that follows our last reply within QUICK_CLIENT marks its client
    as one in a request/reply loop: after the next reply to it the supervisor
    polls until ``spin_until``; a client that took longer sets no such time."""
    import selectors
    import time

    from procqueue.control import NEXT_REQUEST_SPIN, QUICK_CLIENT, ControlServer

    with selectors.DefaultSelector() as sel:
        server = ControlServer(tmp_path / "c.sock", 0o600, sel, lambda conn, req: {"ok": req["op"]})
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(str(tmp_path / "c.sock"))

        def request(op: str) -> float:
            """Send one request, let the server handle it; the time it replied."""
            client.sendall(_frame(orjson.dumps({"op": op})))
            while True:
                for key, mask in sel.select(5):
                    key.data(mask)
                conns = list(server.conns)
                if conns and not conns[0].answers and conns[0].sent_at:
                    break
            assert _reply(client) == {"ok": op}
            return conns[0].sent_at

        first = request("ping")  # the first request of a connection: no loop yet
        assert server.spin_until == 0.0
        second = request("ping")  # right after the reply: a loop
        assert server.spin_until == pytest.approx(second + NEXT_REQUEST_SPIN)
        assert second > first
        time.sleep(QUICK_CLIENT * 3)
        third = request("ping")  # after a pause: no polling for this one
        assert server.spin_until == pytest.approx(second + NEXT_REQUEST_SPIN)
        assert third > second + QUICK_CLIENT
        client.close()
        server.close()
