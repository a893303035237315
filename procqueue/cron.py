"""Cron: ``[[cron]]`` entries, their pure schedule, and the cron thread.

Three layers, each testable on its own:

* :func:`procqueue.cronconfig.parse_cron_entries` validates the config's
  ``[[cron]]`` tables into frozen :class:`CronSpecEntry` values.
* :class:`Schedule` is pure: the clock is a ``now`` argument (STYLE.md 10).
  ``due(now)`` returns the :class:`Fire` values whose time has come and
  advances each entry; every fire has a key ``name:scheduled`` and a fire
  never happens twice (STYLE.md 11).
* :class:`procqueue.scheduler.CronThread` sleeps until the next fire time, asks the schedule what
  is due under one lock, queues the fires in a deque and writes one wake-up
  byte for the supervisor's selector. It never publishes anything itself.

Spec semantics (all cron math is croniter's; nothing here parses fields):

* 6 fields are **seconds first** (robfig/cron ``WithSeconds``). croniter's own
  6-field order puts seconds last, so those specs are given to croniter with
  ``second_at_beginning=True``. 5 fields are classic cron. 7-field (year)
  specs are refused. Descriptors: ``@yearly @annually @monthly @weekly
  @daily @midnight @hourly``.
* ``@every D`` (``D`` a duration such as ``90s`` or ``1h30m``, whole seconds,
  at least 1s) fires at the multiples of ``D`` since the Unix epoch. Unlike
  robfig/cron (which counts from the daemon's start) this makes the fire
  times, hence the fire keys, the same after a restart and on every daemon.
* Times are computed in the entry's ``timezone`` (IANA name, default UTC) and
  reported as aware UTC datetimes. Daylight-saving transitions neither skip
  nor double a run: a fire time inside the skipped hour of a spring-forward
  day runs once, at the end of the gap (croniter moves it there, e.g. a daily
  02:30 in Europe/Berlin runs at 03:00 CEST that day); in the repeated hour
  of a fall-back day, a wall-clock time that occurs twice runs once, at its
  first occurrence, unless the spec's hour field matches every hour (hourly
  and finer jobs keep their real-time rhythm: 24 hourly runs per UTC day).
  See ``_CronRule.next_after`` for the croniter workaround this needs.

Misfire policy, when the loop was late (a busy or suspended supervisor):
``"coalesce"`` (default) emits one fire for the latest missed time;
``"skip"`` emits a fire only if it is at most :data:`MISFIRE_GRACE` seconds
late, so missed ticks are dropped and an on-time tick still runs.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from croniter import CroniterError, croniter  # type: ignore[import-untyped]

from .errors import InvalidQueueTask, QueueConfigConflict, TaskNotFound
from .task import QueueTask

__all__ = [
    "DESCRIPTORS",
    "MISFIRE_GRACE",
    "MISFIRE_POLICIES",
    "CronSpecEntry",
    "CronTask",
    "Fire",
    "Schedule",
]

log = logging.getLogger("procqueue.cron")

MISFIRE_POLICIES = ("coalesce", "skip")
MISFIRE_GRACE = 1.0
DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
SPEC_EXPECTED = 'a cron spec (6 fields with seconds first, 5 fields, @daily ... or "@every 90s")'
TIMEZONE_EXPECTED = 'an IANA time zone such as "UTC" or "Europe/Berlin"'
# The cron thread re-reads the wall clock at least this often, so a clock step
# (NTP, suspend) delays a fire by at most this much.
MAX_SLEEP = 60.0

_ENTRY_KEYS = ("name", "spec", "queue", "type", "payload", "description", "timezone", "misfire")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A fixed instant to probe a spec with: a spec that can never match (Feb 30)
# fails here, at load, rather than silently never firing.
_PROBE = datetime(2000, 1, 1, tzinfo=UTC)
_MAX_SKIPS = 1000


# ------------------------------------------------------------------- rules


class _Rule(Protocol):
    def next_after(self, after: datetime) -> datetime | None:
        """The first fire time strictly after ``after`` (aware UTC), None if never."""


@dataclass(frozen=True, slots=True)
class _EveryRule:
    seconds: int

    def next_after(self, after: datetime) -> datetime | None:
        micros = (after - _EPOCH) // timedelta(microseconds=1)
        period = self.seconds * 1_000_000
        return _EPOCH + timedelta(microseconds=(micros // period + 1) * period)


@dataclass(frozen=True, slots=True)
class _CronRule:
    expr: str
    seconds_first: bool
    tz: ZoneInfo
    every_hour: bool

    def next_after(self, after: datetime) -> datetime | None:
        it = croniter(self.expr, after.astimezone(self.tz), second_at_beginning=self.seconds_first)
        for _ in range(_MAX_SKIPS):
            try:
                local: datetime = it.get_next(datetime)
            except CroniterError:  # no match within croniter's search horizon
                return None
            instant = local.astimezone(UTC)
            if instant <= after:  # defensive: croniter must move forward
                continue
            # Workaround: croniter (7.0) returns a wall time that occurs twice on
            # a fall-back day at both occurrences, so a daily 02:30 job would
            # run twice. Drop the second occurrence (fold=1) unless the hour
            # field matches every hour, as cronie does for fixed-time jobs.
            if instant.astimezone(self.tz).fold and not self.every_hour:
                continue
            return instant
        return None


class _BadField(ValueError):
    """An invalid entry ``field``: what was ``expected``, and a ``hint`` (maybe empty)."""

    def __init__(self, field: str, expected: str, hint: str = "") -> None:
        super().__init__(field)
        self.field, self.expected, self.hint = field, expected, f" ({hint})" if hint else ""


def _zone(name: object) -> ZoneInfo:
    try:
        if isinstance(name, str) and name:
            return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        pass
    raise _BadField("timezone", TIMEZONE_EXPECTED)


def _every_rule(text: str) -> _EveryRule:
    from . import config  # lazy: config.py imports this module

    hint = "@every takes a duration of whole seconds, at least 1s, such as 90s or 1h30m"
    try:
        seconds = config.parse_duration(text.removeprefix("@every").strip())
    except ValueError:
        seconds = 0.0
    if seconds < 1 or seconds != int(seconds):
        raise _BadField("spec", SPEC_EXPECTED, hint)
    return _EveryRule(int(seconds))


def _compile(spec: object, tz: ZoneInfo) -> _Rule:
    """The rule for ``spec`` in zone ``tz``; _BadField if invalid."""
    if not isinstance(spec, str):
        raise _BadField("spec", SPEC_EXPECTED)
    text = " ".join(spec.split())
    if text == "@every" or text.startswith("@every "):
        return _every_rule(text)
    if text.startswith("@"):
        if text.lower() not in DESCRIPTORS:
            hint = "descriptors are " + ", ".join(DESCRIPTORS) + ", @every <duration>"
            raise _BadField("spec", SPEC_EXPECTED, hint)
        text = text.lower()
    elif len(text.split()) not in (5, 6):
        raise _BadField("spec", SPEC_EXPECTED, f"it has {len(text.split())} fields")
    seconds_first = len(text.split()) == 6
    try:
        it = croniter(text, _PROBE, second_at_beginning=seconds_first)
        it.get_next(datetime)
    except CroniterError as exc:
        never = "failed to find next date" in str(exc)
        raise _BadField("spec", SPEC_EXPECTED, "it never matches a date" if never else "") from None
    hours = it.expanded[1]  # croniter's field order: minute, hour, ... (seconds last)
    every_hour = hours == ["*"] or set(hours) >= set(range(24))
    return _CronRule(text, seconds_first, tz, every_hour)


# ----------------------------------------------------------------- entries


@dataclass(frozen=True, slots=True)
class CronSpecEntry:
    """One validated ``[[cron]]`` entry."""

    name: str
    spec: str
    queue: str
    type: str
    payload: bytes | None = None
    description: str = ""
    timezone: str = "UTC"
    misfire: str = "coalesce"


def _payload_json(payload: bytes | None) -> Any:
    if not payload:
        return None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload.decode("utf-8", "replace")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass
class CronTask:
    """The reference's CronTask plus scheduling state; read it under the schedule's lock."""

    name: str
    spec: str
    queue: str
    type: str
    payload: bytes | None = None
    description: str = ""
    timezone: str = "UTC"
    misfire: str = "coalesce"
    total: int = 0
    err_count: int = 0
    next_run: datetime | None = None
    last_run: datetime | None = None  # scheduled time of the last fire

    @property
    def identifier(self) -> str:
        return self.name

    @property
    def last_key(self) -> str | None:
        """The key of the last fire (see :attr:`Fire.key`)."""
        return None if self.last_run is None else f"{self.name}:{self.last_run.isoformat()}"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["payload"] = _payload_json(self.payload)
        data["next_run"] = _iso(self.next_run)
        data["last_run"] = _iso(self.last_run)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CronTask:
        """The inverse of :meth:`to_dict` (what a client receives)."""
        values = dict(data)
        payload = values.get("payload")
        values["payload"] = None if payload is None else orjson.dumps(payload)
        for name in ("next_run", "last_run"):
            if values.get(name):
                values[name] = datetime.fromisoformat(values[name])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Fire:
    """One run of a cron entry, for the supervisor to publish."""

    name: str
    queue: str
    type: str
    payload: bytes | None
    scheduled: datetime

    @property
    def key(self) -> str:
        return f"{self.name}:{self.scheduled.isoformat()}"

    def headers(self) -> dict[str, str]:
        return {"cron": self.name, "cron_scheduled": self.scheduled.isoformat()}

    def to_task(self) -> QueueTask:
        """The task to publish: ``key`` is the fire key, for idempotent handlers."""
        return QueueTask(
            queue=self.queue,
            type=self.type,
            payload=self.payload,
            key=self.key,
            headers=self.headers(),
        )


# ---------------------------------------------------------------- schedule


def _utc(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)


def _latest_due(rule: _Rule, first: datetime, now: datetime) -> datetime:
    """The latest fire time <= ``now``, given ``first`` (<= now) is one.

    After a long pause, stepping through every missed tick of a per-second
    spec would take seconds; a look-back window doubling from 1 s finds a fire
    near ``now`` in a few croniter calls instead.
    """
    latest, span = first, timedelta(seconds=1)
    while now - span > latest:
        probe = rule.next_after(now - span)
        if probe is not None and probe <= now:
            latest = probe
            break
        span *= 2
    while (following := rule.next_after(latest)) is not None and following <= now:
        latest = following
    return latest


def _entry_rule(entry: CronSpecEntry) -> _Rule:
    """Validate an entry added through the API; InvalidQueueTask names the field."""
    try:
        for field in ("name", "queue", "type"):
            if not isinstance(getattr(entry, field), str) or not getattr(entry, field):
                raise _BadField(field, "a non-empty name")
        if entry.misfire not in MISFIRE_POLICIES:
            raise _BadField("misfire", " or ".join(f'"{p}"' for p in MISFIRE_POLICIES))
        return _compile(entry.spec, _zone(entry.timezone))
    except _BadField as bad:
        value = getattr(entry, bad.field)
        raise InvalidQueueTask(
            f"cron entry {json.dumps(str(entry.name))}: {bad.field}: "
            f"expected {bad.expected}, got {value!r}{bad.hint}"
        ) from None


class Schedule:
    """The cron entries and their next fire times. Pure; not thread-safe.

    Every method takes ``now`` (a ``time.time()`` value) where time matters;
    callers sharing a schedule with the cron thread hold its lock.
    """

    def __init__(self, entries: Iterable[CronSpecEntry], now: float) -> None:
        self._tasks: dict[str, CronTask] = {}
        self._rules: dict[str, _Rule] = {}
        for entry in entries:
            self.add(entry, now)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, entry: CronSpecEntry, now: float) -> CronTask:
        """Schedule ``entry``; its first fire is strictly after ``now``."""
        if entry.name in self._tasks:
            raise QueueConfigConflict(f"cron entry {json.dumps(entry.name)} already exists")
        rule = _entry_rule(entry)
        task = CronTask(
            name=entry.name,
            spec=entry.spec,
            queue=entry.queue,
            type=entry.type,
            payload=entry.payload,
            description=entry.description,
            timezone=entry.timezone,
            misfire=entry.misfire,
            next_run=rule.next_after(_utc(now)),
        )
        self._tasks[entry.name] = task
        self._rules[entry.name] = rule
        return task

    def cancel(self, name: str) -> None:
        self.get(name)
        del self._tasks[name], self._rules[name]

    def get(self, name: str) -> CronTask:
        """The live entry (as the reference's GetTask), TaskNotFound if unknown."""
        try:
            return self._tasks[name]
        except KeyError:
            known = ", ".join(json.dumps(n) for n in self._tasks) or "none"
            raise TaskNotFound(
                f"cron entry {json.dumps(name)} not found (known: {known})"
            ) from None

    def list(self) -> builtins.list[CronTask]:
        return list(self._tasks.values())

    def due(self, now: float) -> builtins.list[Fire]:
        """Every fire whose time has come (one per entry at most), by scheduled time."""
        current = _utc(now)
        fires = [fire for task in self._tasks.values() if (fire := self._step(task, current))]
        fires.sort(key=lambda fire: (fire.scheduled, fire.name))
        return fires

    def _step(self, task: CronTask, now: datetime) -> Fire | None:
        if task.next_run is None or task.next_run > now:
            return None
        rule = self._rules[task.name]
        latest = _latest_due(rule, task.next_run, now)
        task.next_run = rule.next_after(now)
        if task.last_run is not None and latest <= task.last_run:
            return None  # already fired (the clock went back): never twice
        if task.misfire == "skip" and (now - latest).total_seconds() > MISFIRE_GRACE:
            log.info("cron %s: skipped the run due at %s (late)", task.name, latest.isoformat())
            return None
        task.last_run = latest
        return Fire(task.name, task.queue, task.type, task.payload, latest)

    def next_wakeup(self) -> float | None:
        """The earliest next fire time as a timestamp, None if nothing will fire."""
        times = [task.next_run for task in self._tasks.values() if task.next_run is not None]
        return min(times).timestamp() if times else None

    def record_outcome(self, name: str, succeeded: bool) -> None:
        """Count a run whose task finished (after its retries).

        Unknown names are ignored: an entry cancelled while its run was in
        flight is not an error.
        """
        task = self._tasks.get(name)
        if task is None:
            return
        task.total += 1
        if not succeeded:
            task.err_count += 1
