"""Unit tests of procqueue.cron: spec parsing, the pure Schedule, the thread."""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from procqueue.cron import (
    MISFIRE_GRACE,
    CronSpecEntry,
    Fire,
    Schedule,
)
from procqueue.cronconfig import parse_cron_entries
from procqueue.errors import ConfigError, InvalidQueueTask, QueueConfigConflict, TaskNotFound
from procqueue.scheduler import CronThread

QUEUES = {"report": object(), "default": object()}
BERLIN = ZoneInfo("Europe/Berlin")
SPEC_EXPECTED = 'a cron spec (6 fields with seconds first, 5 fields, @daily ... or "@every 90s")'


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def ts(*args: int) -> float:
    return utc(*args).timestamp()


def entry(spec: str, name: str = "job", **kwargs: Any) -> CronSpecEntry:
    fields: dict[str, object] = {"queue": "default", "type": "t"} | kwargs
    return CronSpecEntry(name=name, spec=spec, **fields)  # type: ignore[arg-type]


def next_run(spec: str, now: datetime, **kwargs: Any) -> datetime | None:
    return Schedule([entry(spec, **kwargs)], now.timestamp()).get("job").next_run


def run_between(schedule: Schedule, end: datetime) -> list[Fire]:
    """Wake the schedule at each fire time up to ``end``, as an on-time loop would."""
    fires: list[Fire] = []
    while (wakeup := schedule.next_wakeup()) is not None and wakeup <= end.timestamp():
        fires.extend(schedule.due(wakeup))
    return fires


def toml_entry(**kwargs: object) -> dict[str, object]:
    return {"name": "daily-report", "spec": "0 30 3 * * *", "queue": "report", "type": "r"} | kwargs


def config_error(*entries: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_cron_entries(list(entries), "/x/app.toml", QUEUES)
    return str(info.value)


# ------------------------------------------------------------------ specs

NOW = utc(2024, 3, 13, 12, 0, 0)  # a Wednesday


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0 30 3 * * *", utc(2024, 3, 14, 3, 30, 0)),  # seconds first
        ("15 * * * * *", utc(2024, 3, 13, 12, 0, 15)),  # second 15 of each minute
        ("15 * * * *", utc(2024, 3, 13, 12, 15, 0)),  # classic: minute 15
        ("*/20 5 * * * *", utc(2024, 3, 13, 12, 5, 0)),
        ("0 0 9 * * MON-FRI", utc(2024, 3, 14, 9, 0, 0)),
        ("@yearly", utc(2025, 1, 1)),
        ("@annually", utc(2025, 1, 1)),
        ("@monthly", utc(2024, 4, 1)),
        ("@weekly", utc(2024, 3, 17)),  # Sunday midnight
        ("@daily", utc(2024, 3, 14)),
        ("@midnight", utc(2024, 3, 14)),
        ("@hourly", utc(2024, 3, 13, 13)),
        ("  0   30  3 * * * ", utc(2024, 3, 14, 3, 30, 0)),
    ],
)
def test_next_run(spec: str, expected: datetime) -> None:
    assert next_run(spec, NOW) == expected


def test_next_run_is_strictly_after_now() -> None:
    assert next_run("0 0 12 * * *", NOW) == utc(2024, 3, 14, 12)
    assert next_run("* * * * * *", NOW + timedelta(microseconds=1)) == utc(2024, 3, 13, 12, 0, 1)


def test_timezone() -> None:
    winter, summer = utc(2024, 1, 10), utc(2024, 7, 10)
    assert next_run("0 30 3 * * *", winter, timezone="Europe/Berlin") == utc(2024, 1, 10, 2, 30)
    assert next_run("0 30 3 * * *", summer, timezone="Europe/Berlin") == utc(2024, 7, 10, 1, 30)
    assert next_run("@daily", summer, timezone="America/New_York") == utc(2024, 7, 10, 4)


def test_every_is_aligned_on_the_epoch() -> None:
    now = 1_700_000_000.5
    schedule = Schedule([entry("@every 90s"), entry("@every 1h30m", name="long")], now)
    first = schedule.get("job").next_run
    assert first is not None and first.timestamp() == (1_700_000_000 // 90 + 1) * 90
    long = schedule.get("long").next_run
    assert long is not None and long.timestamp() == (1_700_000_000 // 5400 + 1) * 5400
    assert [f.scheduled for f in schedule.due(first.timestamp())] == [first]
    assert schedule.get("job").next_run == first + timedelta(seconds=90)


def test_every_from_a_multiple_is_the_next_multiple() -> None:
    assert next_run("@every 1m", utc(2024, 1, 1, 0, 5)) == utc(2024, 1, 1, 0, 6)


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("61 * * * * *", ""),
        ("* * * *", " (it has 4 fields)"),
        ("0 * * * * * 2024", " (it has 7 fields)"),
        ("*/0 * * * *", ""),
        ("a b c d e", ""),
        ("", " (it has 0 fields)"),
        ("0 0 30 2 *", " (it never matches a date)"),
        ("@reboot", " (descriptors are @yearly,"),
        ("@every", " (@every takes a duration"),
        ("@every 0s", " (@every takes a duration"),
        ("@every 1.5s", " (@every takes a duration"),
        ("@every 90", " (@every takes a duration"),
    ],
)
def test_bad_spec_in_config(spec: str, hint: str) -> None:
    message = config_error(toml_entry(spec=spec))
    shown = orjson.dumps(spec).decode()
    prefix = f'/x/app.toml: cron[0] ("daily-report").spec: expected {SPEC_EXPECTED}, got {shown}'
    assert message.startswith(prefix + hint)


def test_bad_spec_message_matches_the_documented_form() -> None:
    assert config_error(toml_entry(spec="61 * * * * *")) == (
        f'/x/app.toml: cron[0] ("daily-report").spec: expected {SPEC_EXPECTED}, got "61 * * * * *"'
    )


@pytest.mark.parametrize("spec", ["61 * * * * *", "0 0 30 2 *", "@every 0s", 5])
def test_bad_spec_in_add(spec: object) -> None:
    schedule = Schedule([], ts(2024, 1, 1))
    with pytest.raises(InvalidQueueTask, match=r'cron entry "job": spec: expected a cron spec'):
        schedule.add(entry(spec), ts(2024, 1, 1))  # type: ignore[arg-type]
    assert "job" not in schedule


@pytest.mark.parametrize(
    ("field", "value"), [("timezone", "Mars/Base"), ("misfire", "late"), ("queue", "")]
)
def test_bad_fields_in_add(field: str, value: str) -> None:
    with pytest.raises(InvalidQueueTask, match=f'cron entry "job": {field}: expected'):
        Schedule([entry("@daily", **{field: value})], ts(2024, 1, 1))


# ----------------------------------------------------------------- config


def test_parse_full_entry() -> None:
    raw = toml_entry(
        payload={"region": "eu", "when": date(2024, 1, 2)},
        description="nightly report",
        timezone="Europe/Berlin",
        misfire="SKIP",
    )
    (parsed,) = parse_cron_entries([raw], "/x/app.toml", QUEUES)
    assert parsed == CronSpecEntry(
        name="daily-report",
        spec="0 30 3 * * *",
        queue="report",
        type="r",
        payload=b'{"region":"eu","when":"2024-01-02"}',
        description="nightly report",
        timezone="Europe/Berlin",
        misfire="skip",
    )


def test_parse_defaults_and_empty() -> None:
    (parsed,) = parse_cron_entries([toml_entry(spec="@every 90s")], "/x/app.toml", QUEUES)
    assert (parsed.payload, parsed.description, parsed.timezone, parsed.misfire) == (
        None,
        "",
        "UTC",
        "coalesce",
    )
    assert parse_cron_entries(None, "/x/app.toml", QUEUES) == ()
    assert parse_cron_entries([], "/x/app.toml", QUEUES) == ()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            toml_entry(spek="@daily"),
            'cron[0] ("daily-report").spek: expected one of the keys name, spec, queue, type, '
            'payload, description, timezone, misfire, got unknown key "spek" '
            '(did you mean "spec"?)',
        ),
        (
            toml_entry(queue="nope"),
            'cron[0] ("daily-report").queue: expected one of the queues "report", "default", '
            'got "nope"',
        ),
        (
            toml_entry(timezone="Mars/Base"),
            'cron[0] ("daily-report").timezone: expected an IANA time zone such as "UTC" or '
            '"Europe/Berlin", got "Mars/Base"',
        ),
        (
            toml_entry(misfire="late"),
            'cron[0] ("daily-report").misfire: expected one of "coalesce", "skip", got "late"',
        ),
        (
            toml_entry(description=3),
            'cron[0] ("daily-report").description: expected a string, got 3',
        ),
        (
            toml_entry(payload={"x": object()}),
            'cron[0] ("daily-report").payload: expected a JSON-serialisable value, got a table',
        ),
        (
            {"spec": "@daily", "queue": "report", "type": "r"},
            "cron[0].name: expected a name of 1-200 characters",
        ),
        (
            toml_entry(type=None) | {"type": "bad type"},
            'cron[0] ("daily-report").type: expected a name of 1-200 characters',
        ),
        (toml_entry(spec=None) | {"spec": 5}, 'cron[0] ("daily-report").spec: expected a cron'),
        ("x", 'cron[0]: expected a table of cron settings ([[cron]]), got "x"'),
    ],
)
def test_config_errors(raw: object, expected: str) -> None:
    assert config_error(raw).startswith(f"/x/app.toml: {expected}")


def test_config_errors_missing_keys() -> None:
    raw = {"name": "a", "queue": "report", "type": "r"}
    assert config_error(raw).endswith(", got nothing")


def test_config_duplicate_names() -> None:
    ok = toml_entry(name="a")
    message = config_error(ok, toml_entry(name="b"), ok)
    assert message == (
        '/x/app.toml: cron[2] ("a").name: expected a unique name, got "a" (already used by cron[0])'
    )


def test_config_not_an_array() -> None:
    with pytest.raises(ConfigError, match=r"^/x/app.toml: cron: expected an array of tables"):
        parse_cron_entries({"name": "x"}, "/x/app.toml", QUEUES)


# ---------------------------------------------------------------- misfire

START = utc(2024, 5, 1, 12, 0, 0)


def test_coalesce_after_sleeping_across_ten_ticks() -> None:
    schedule = Schedule([entry("*/10 * * * * *")], START.timestamp())
    assert schedule.get("job").next_run == START + timedelta(seconds=10)
    late = START + timedelta(seconds=100.5)  # ticks at +10 ... +100 all missed
    fires = schedule.due(late.timestamp())
    assert [(f.name, f.scheduled) for f in fires] == [("job", START + timedelta(seconds=100))]
    assert schedule.get("job").next_run == START + timedelta(seconds=110)
    assert schedule.get("job").last_run == START + timedelta(seconds=100)
    assert schedule.due(late.timestamp()) == []


def test_skip_drops_late_fires_and_keeps_on_time_ones() -> None:
    schedule = Schedule([entry("*/10 * * * * *", misfire="skip")], START.timestamp())
    assert schedule.due((START + timedelta(seconds=105)).timestamp()) == []  # +10 ... +100 late
    assert schedule.get("job").next_run == START + timedelta(seconds=110)
    assert schedule.get("job").last_run is None
    on_time = START + timedelta(seconds=110 + MISFIRE_GRACE)  # exactly the grace: kept
    fires = schedule.due(on_time.timestamp())
    assert [f.scheduled for f in fires] == [START + timedelta(seconds=110)]
    late = START + timedelta(seconds=120 + MISFIRE_GRACE + 0.1)
    assert schedule.due(late.timestamp()) == []
    assert schedule.get("job").last_run == START + timedelta(seconds=110)


def test_skip_keeps_the_on_time_tick_after_missed_ones() -> None:
    schedule = Schedule([entry("*/10 * * * * *", misfire="skip")], START.timestamp())
    fires = schedule.due((START + timedelta(seconds=100.5)).timestamp())
    assert [f.scheduled for f in fires] == [START + timedelta(seconds=100)]


def test_coalesce_after_a_long_pause_is_fast() -> None:
    schedule = Schedule([entry("* * * * * *")], START.timestamp())
    later = START + timedelta(days=3, seconds=0.25)
    began = time.perf_counter()
    fires = schedule.due(later.timestamp())
    assert time.perf_counter() - began < 0.5
    assert [f.scheduled for f in fires] == [START + timedelta(days=3)]


def test_coalesce_irregular_spec_after_a_pause() -> None:
    schedule = Schedule([entry("* 3 * * *")], START.timestamp())  # every minute of 03:xx
    fires = schedule.due(ts(2024, 5, 4, 22, 0))
    assert [f.scheduled for f in fires] == [utc(2024, 5, 4, 3, 59)]


def test_a_fire_never_happens_twice_when_the_clock_goes_back() -> None:
    schedule = Schedule([entry("0 * * * * *")], START.timestamp())
    assert len(schedule.due(ts(2024, 5, 1, 12, 1, 0))) == 1
    assert schedule.due(ts(2024, 5, 1, 12, 0, 30)) == []  # clock stepped back
    assert schedule.due(ts(2024, 5, 1, 12, 1, 0)) == []
    assert len(schedule.due(ts(2024, 5, 1, 12, 2, 0))) == 1


def test_due_orders_fires_by_time_then_name() -> None:
    entries = [entry("0 * * * * *", name="b"), entry("0 * * * * *", name="a"), entry("@daily")]
    schedule = Schedule(entries, START.timestamp())
    assert [f.name for f in schedule.due(ts(2024, 5, 1, 12, 1))] == ["a", "b"]
    assert schedule.next_wakeup() == ts(2024, 5, 1, 12, 2)


# -------------------------------------------------------------------- DST


def local_dates(fires: list[Fire], tz: ZoneInfo) -> collections.Counter[date]:
    return collections.Counter(f.scheduled.astimezone(tz).date() for f in fires)


def utc_dates(fires: list[Fire]) -> collections.Counter[date]:
    return collections.Counter(f.scheduled.date() for f in fires)


def test_daily_job_on_spring_forward_day_runs_once() -> None:
    schedule = Schedule([entry("0 30 2 * * *", timezone="Europe/Berlin")], ts(2024, 3, 29))
    fires = run_between(schedule, utc(2024, 4, 2))
    assert local_dates(fires, BERLIN) == {date(2024, 3, d): 1 for d in (29, 30, 31)} | {
        date(2024, 4, 1): 1
    }
    # 02:30 does not exist on 2024-03-31: the run happens at the end of the gap.
    spring = [f.scheduled for f in fires if f.scheduled.date() == date(2024, 3, 31)]
    assert spring == [utc(2024, 3, 31, 1, 0)]  # 03:00 CEST


def test_daily_job_on_fall_back_day_runs_once() -> None:
    schedule = Schedule([entry("30 2 * * *", timezone="Europe/Berlin")], ts(2024, 10, 25))
    fires = run_between(schedule, utc(2024, 10, 29))
    assert local_dates(fires, BERLIN) == {date(2024, 10, d): 1 for d in (25, 26, 27, 28)}
    fall = [f.scheduled for f in fires if f.scheduled.astimezone(BERLIN).day == 27]
    assert fall == [utc(2024, 10, 27, 0, 30)]  # the first 02:30 (CEST)
    assert len({f.key for f in fires}) == len(fires)


@pytest.mark.parametrize("day", [date(2024, 3, 31), date(2024, 10, 27)])
@pytest.mark.parametrize("spec", ["0 * * * *", "0 0 * * * *", "@hourly", "30 * * * *"])
def test_hourly_job_across_transitions_runs_every_real_hour(day: date, spec: str) -> None:
    start = datetime.combine(day, datetime.min.time(), UTC) - timedelta(days=1, seconds=1)
    schedule = Schedule([entry(spec, timezone="Europe/Berlin")], start.timestamp())
    fires = run_between(schedule, start + timedelta(days=3))
    per_utc_day = utc_dates(fires)
    assert per_utc_day[day] == 24
    assert per_utc_day[day - timedelta(days=1)] == 24
    gaps = {b.scheduled - a.scheduled for a, b in itertools.pairwise(fires)}
    assert gaps == {timedelta(hours=1)}


def test_quarter_hour_job_keeps_its_rhythm_on_fall_back() -> None:
    schedule = Schedule([entry("*/15 * * * *", timezone="Europe/Berlin")], ts(2024, 10, 26))
    fires = run_between(schedule, utc(2024, 10, 28))
    assert utc_dates(fires)[date(2024, 10, 27)] == 96
    assert local_dates(fires, BERLIN)[date(2024, 10, 27)] == 100  # the 25-hour local day


@pytest.mark.parametrize("day", [date(2024, 3, 10), date(2024, 11, 3)])
def test_new_york_transitions(day: date) -> None:
    tz = ZoneInfo("America/New_York")
    start = datetime.combine(day, datetime.min.time(), UTC) - timedelta(days=1)
    daily = Schedule([entry("30 1 * * *", timezone="America/New_York")], start.timestamp())
    assert set(local_dates(run_between(daily, start + timedelta(days=3)), tz).values()) == {1}
    hourly = Schedule([entry("@hourly", timezone="America/New_York")], start.timestamp())
    assert utc_dates(run_between(hourly, start + timedelta(days=3)))[day] == 24


# -------------------------------------------------------- add/cancel/get


def test_add_cancel_get_list() -> None:
    schedule = Schedule([entry("@daily", name="a")], START.timestamp())
    task = schedule.add(entry("@hourly", name="b"), START.timestamp())
    assert task is schedule.get("b") and task.identifier == "b"
    assert [t.name for t in schedule.list()] == ["a", "b"]
    assert len(schedule) == 2
    schedule.cancel("a")
    assert [t.name for t in schedule.list()] == ["b"]
    with pytest.raises(TaskNotFound, match=r'cron entry "a" not found \(known: "b"\)'):
        schedule.get("a")
    with pytest.raises(TaskNotFound, match='"a"'):
        schedule.cancel("a")
    schedule.add(entry("@daily", name="a"), START.timestamp())  # a name can be reused
    assert "a" in schedule


def test_add_duplicate_name_conflicts() -> None:
    schedule = Schedule([entry("@daily")], START.timestamp())
    with pytest.raises(QueueConfigConflict, match='cron entry "job" already exists'):
        schedule.add(entry("@hourly"), START.timestamp())
    with pytest.raises(QueueConfigConflict):
        Schedule([entry("@daily"), entry("@hourly")], START.timestamp())
    assert schedule.get("job").spec == "@daily"


def test_cancelled_entry_no_longer_fires() -> None:
    schedule = Schedule([entry("* * * * * *")], START.timestamp())
    schedule.cancel("job")
    assert schedule.due(START.timestamp() + 10) == []
    assert schedule.next_wakeup() is None


def test_record_outcome() -> None:
    schedule = Schedule([entry("@daily")], START.timestamp())
    for ok in (True, False, True, False, False):
        schedule.record_outcome("job", ok)
    task = schedule.get("job")
    assert (task.total, task.err_count) == (5, 3)
    schedule.record_outcome("cancelled-meanwhile", False)  # ignored


def test_to_dict_is_json_ready() -> None:
    spec = entry("@daily", payload=b'{"region":"eu"}', description="d", timezone="Europe/Berlin")
    schedule = Schedule([spec], START.timestamp())
    schedule.due(ts(2024, 5, 2, 0, 0, 0) - 7200 + 0.5)  # midnight in Berlin (CEST)
    data = orjson.loads(orjson.dumps(schedule.get("job").to_dict()))
    assert data == {
        "name": "job",
        "spec": "@daily",
        "queue": "default",
        "type": "t",
        "payload": {"region": "eu"},
        "description": "d",
        "timezone": "Europe/Berlin",
        "misfire": "coalesce",
        "total": 0,
        "err_count": 0,
        "next_run": "2024-05-02T22:00:00+00:00",
        "last_run": "2024-05-01T22:00:00+00:00",
    }
    assert Schedule([entry("@daily")], START.timestamp()).get("job").to_dict()["payload"] is None


# ------------------------------------------------------------------- fires


def test_fire_key_headers_and_task() -> None:
    schedule = Schedule([entry("*/5 * * * * *", payload=b"[1]")], START.timestamp())
    fires = run_between(schedule, START + timedelta(minutes=10))
    assert len(fires) == 120
    assert len({f.key for f in fires}) == len(fires)
    first = fires[0]
    assert first.key == "job:2024-05-01T12:00:05+00:00"
    assert first.headers() == {"cron": "job", "cron_scheduled": "2024-05-01T12:00:05+00:00"}
    assert schedule.get("job").last_key == fires[-1].key
    task = first.to_task()
    assert (task.queue, task.type, task.payload, task.key) == ("default", "t", b"[1]", first.key)
    assert task.headers == first.headers()


def test_next_wakeup() -> None:
    assert Schedule([], START.timestamp()).next_wakeup() is None
    schedule = Schedule([entry("@daily", name="a"), entry("@hourly", name="b")], START.timestamp())
    assert schedule.next_wakeup() == ts(2024, 5, 1, 13)


# ------------------------------------------------------------------ thread


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    yield read_fd, write_fd
    os.close(read_fd)
    os.close(write_fd)


def drain(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


@pytest.mark.timeout(30)
def test_thread_fires_about_once_a_second(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    lock = threading.Lock()
    schedule = Schedule([entry("*/1 * * * * *")], time.time())
    cron = CronThread(schedule, lock, write_fd)
    cron.start()
    try:
        time.sleep(2.5)
    finally:
        cron.stop()
    assert not any(t.name == "procqueue-cron" and t.is_alive() for t in threading.enumerate())
    fires = list(cron.fires)
    assert 2 <= len(fires) <= 3
    assert 1 <= len(drain(read_fd)) <= len(fires)
    assert len({f.key for f in fires}) == len(fires)
    for earlier, later in itertools.pairwise(fires):
        assert later.scheduled - earlier.scheduled == timedelta(seconds=1)


@pytest.mark.timeout(30)
def test_thread_poke_and_pause(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    lock = threading.Lock()
    schedule = Schedule([entry("@yearly", name="rare")], time.time())
    cron = CronThread(schedule, lock, write_fd)
    cron.start()
    try:
        with lock:
            schedule.add(entry("* * * * * *"), time.time())
        cron.poke()
        deadline = time.monotonic() + 5
        while not cron.fires and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cron.fires and cron.fires[0].name == "job"
        cron.pause()  # as before a fork: the thread cannot touch the schedule
        try:
            count = len(cron.fires)
            time.sleep(1.3)
            assert len(cron.fires) == count
        finally:
            cron.resume()
        deadline = time.monotonic() + 5
        while len(cron.fires) == count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(cron.fires) > count
        assert drain(read_fd)
    finally:
        cron.stop()
