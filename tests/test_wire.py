"""Task frames between the supervisor and its workers: the full and the plain form."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from procqueue import wire
from procqueue.task import QueueTask, QueueTaskStatus

CREATED = datetime(2026, 12, 6, 4, 0, 0, 123456, tzinfo=UTC)


def _plain(n: int, payloads: list[bytes | None] | None = None) -> list[QueueTask]:
    """Tasks as one bulk publish leaves them: sharing queue, type and times."""
    tasks = []
    for i in range(n):
        task = QueueTask(queue="q", type="t", payload=payloads[i] if payloads else None)
        task.id, task.status = f"abc-{i}", QueueTaskStatus.RUNNING
        task.created_at = task.available_at = CREATED
        tasks.append(task)
    return tasks


def _seen(frame: bytes) -> list[tuple[dict[str, object], float]]:
    return [(task.to_dict(), limit) for task, limit in wire.decode_tasks(frame)]


def _sent(tasks: list[QueueTask], limit: float) -> list[tuple[dict[str, object], float]]:
    return [(task.to_dict(), task.timeout or limit) for task in tasks]


def test_plain_tasks_go_in_the_compact_form_and_come_back_whole() -> None:
    payloads: list[bytes | None] = [None, b"", b"x", bytes(range(256)) * 4096]
    tasks = _plain(4, payloads)
    frame = wire.encode_tasks(tasks, 2.5)
    assert frame[0] == wire.OP_PLAIN_TASKS
    seen = _seen(frame)
    assert seen == _sent(tasks, 2.5)
    assert [t.payload for t, _ in wire.decode_tasks(frame)] == [None, None, b"x", payloads[3]]


def test_any_field_of_its_own_makes_a_task_frame_full() -> None:
    later = CREATED + timedelta(seconds=1)
    changes = {
        "key": "k",
        "headers": {"h": "v"},
        "delay": 1.5,
        "timeout": 3.0,
        "max_retry": 2,
        "attempt": 1,
        "queue": "other",
        "type": "other",
        "available_at": later,
        "created_at": datetime.fromtimestamp(CREATED.timestamp(), UTC),  # equal, not shared
    }
    for field, value in changes.items():
        tasks = _plain(3)
        setattr(tasks[1], field, value)
        frame = wire.encode_tasks(tasks, 0.0)
        assert frame[0] == wire.OP_TASK, field
        assert _seen(frame) == _sent(tasks, 0.0), field


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.one_of(st.none(), st.binary(max_size=64))),
        min_size=1,
        max_size=20,
    ),
    st.sampled_from([0.0, 0.25, 30.0]),
)
def test_every_task_frame_decodes_to_what_was_sent(
    specs: list[tuple[bool, bytes | None]], limit: float
) -> None:
    tasks = _plain(len(specs), [payload for _, payload in specs])
    for task, (own_key, _) in zip(tasks, specs, strict=True):
        if own_key:
            task.key = f"key-{task.id}"
    frame = wire.encode_tasks(tasks, limit)
    assert (frame[0] == wire.OP_PLAIN_TASKS) == (not any(own for own, _ in specs))
    want = _sent(tasks, limit)
    for task_dict, _ in want:
        task_dict["payload"] = task_dict["payload"] or None  # b"" travels as no payload
    assert _seen(frame) == want
