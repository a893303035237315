"""TOML config -> frozen dataclasses, with durations and sizes.

``load_config`` reads a file with :mod:`tomllib` and ``config_from_dict``
validates the parsed tables into :class:`Config`. Every value is checked at
load, unknown keys anywhere are errors, and each :class:`ConfigError` has the
form ``<file>: <toml key path>: expected <what>, got <value>``, e.g.::

    /etc/app.toml: queues."emails".concurrency: expected an integer >= 1, got "two"

Queue names and task types are always quoted in key paths (as TOML would need
for ``"user.sync"``). Handler targets are checked for shape only: the
supervisor never imports user code, its workers do.

Internally each ``_<type>_field`` helper raises ``_Invalid`` (a ValueError)
with the key path; ``config_from_dict`` prefixes the file name once.
"""

from __future__ import annotations

import copy
import difflib
import json
import keyword
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import date, time
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import ConfigError

__all__ = [
    "Config",
    "Settings",
    "TaskQueueConfig",
    "config_from_dict",
    "format_duration",
    "load_config",
    "parse_duration",
    "parse_size",
]

STORES = ("memory", "sqlite:///path/app.db")
SYNC_MODES = ("full", "normal")
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_RING_SIZE = 4 << 10
MAX_RING_SIZE = 1 << 30
MAX_NAME_LENGTH = 200
# AF_UNIX sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
DEFAULT_SOCKET = "procqueue.sock"

_NAME = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_NAME_LENGTH}}}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_UNITS = {
    unit: Decimal(seconds)
    for unit, seconds in (("ms", "0.001"), ("s", "1"), ("m", "60"), ("h", "3600"), ("d", "86400"))
}
_DURATION_EXPECTED = (
    'a duration such as "250ms", "5s", "1.5s" or "1h30m" (units ms, s, m, h, d) '
    "or a number of seconds >= 0"
)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE_EXPECTED = (
    'a size such as "512MiB", "4KiB", "10KB" or "100B" '
    "(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB) or a number of bytes >= 0"
)
_TARGET_EXPECTED = (
    'a handler "package.module:attribute" (Python identifiers; attribute may be dotted)'
)
_NAME_EXPECTED = f"a name of 1-{MAX_NAME_LENGTH} characters from A-Z a-z 0-9 . _ : -"
_MISSING: Any = object()


# ---------------------------------------------------------------- dataclasses


def _frozen_handlers() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class TaskQueueConfig:
    """One logical queue: its workers, retry policy, limits and handlers."""

    concurrency: int = 1
    max_retry: int = 0
    retry_delay: float = 5.0
    buffer_size: int = 1024
    timeout: float = 0.0
    prefetch: int = 0
    ring_size: int = 1 << 20
    kill_grace: float = 5.0
    max_tasks_per_child: int = 0  # replace a worker after this many tasks; 0 = never
    max_memory_per_child: int = 0  # replace a worker whose RSS exceeds this (bytes); 0 = never
    allow_calls: bool = False  # run "procqueue.call" tasks (functions named by import path)
    handlers: Mapping[str, str] = field(default_factory=_frozen_handlers)

    def __post_init__(self) -> None:
        # Keep the instance immutable even when built with a plain dict.
        if not isinstance(self.handlers, MappingProxyType):
            object.__setattr__(self, "handlers", MappingProxyType(dict(self.handlers)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The ``[procqueue]`` section; paths are absolute (resolved by the loader)."""

    store: str = "memory"  # "memory" or "sqlite://" + absolute path
    sync: str = "full"  # sqlite: fsync every commit ("full") or only at checkpoints
    retention: float = 7 * 86400.0  # sqlite: keep succeeded tasks this long
    socket: Path
    socket_mode: int = 0o600
    pythonpath: tuple[Path, ...]
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    metrics: str = ""  # "127.0.0.1:9464" serves Prometheus text at /metrics; "" = off


@dataclass(frozen=True, slots=True)
class Config:
    """A validated config file."""

    path: Path
    settings: Settings
    queues: Mapping[str, TaskQueueConfig]
    raw: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    cron: tuple[Any, ...] = ()  # cron.CronSpecEntry, one per [[cron]] table


_SECTIONS = ("procqueue", "queues", "cron")
_SETTINGS_KEYS = tuple(f.name for f in fields(Settings))
_QUEUE_KEYS = tuple(f.name for f in fields(TaskQueueConfig))


# ---------------------------------------------------------- messages, paths


class _Invalid(ValueError):
    """A bad value at a TOML key path; the loader prefixes the file name."""


def _show(value: object) -> str:
    """Render a value the way it would look in TOML (shortened if long)."""
    if value is _MISSING:
        return "nothing"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 80 else f'{text[:60]}…" ({len(value)} characters)'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table" if value else "an empty table"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    if isinstance(value, date | time):
        return value.isoformat()
    return repr(value)


def _message(key: str, expected: str, value: object, hint: str = "") -> str:
    return f"{key}: expected {expected}, got {_show(value)}{hint}"


def _key(where: str, name: object, *, quote: bool = False) -> str:
    """Join a key path; quote the new part as TOML would (always if ``quote``)."""
    text = str(name)
    part = text if not quote and _BARE_KEY.fullmatch(text) else json.dumps(text, ensure_ascii=False)
    return f"{where}.{part}" if where else part


def _check_keys(
    table: Mapping[str, Any],
    where: str,
    allowed: tuple[str, ...],
    table_hint: Callable[[str], str] | None = None,
) -> None:
    """Reject the first key not in ``allowed``, suggesting the closest one."""
    for name, value in table.items():
        if name in allowed:
            continue
        close = difflib.get_close_matches(str(name), allowed, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        if table_hint is not None and isinstance(value, Mapping) and not close:
            hint = f" ({table_hint(str(name))})"
        expected = "one of the keys " + ", ".join(allowed)
        raise _Invalid(
            f"{_key(where, name)}: expected {expected}, got unknown key {_show(name)}{hint}"
        )


def _table(value: object, key: str, expected: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _Invalid(_message(key, expected, value))
    return value


def _check_name(name: object, key: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _Invalid(_message(key, _NAME_EXPECTED, name))
    return name


# ------------------------------------------------------ durations and sizes


def parse_duration(value: str | int | float, key: str = "duration") -> float:
    """Seconds from ``"250ms"``, ``"5s"``, ``"1h30m"``, ``"7d"``, ``"0"`` or a number >= 0.

    Raises ValueError naming ``key`` for anything else ("", "5", "5x", "-1s", bools).
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value) and value >= 0:
            return float(value)
        raise ValueError(_message(key, _DURATION_EXPECTED, value))
    if not isinstance(value, str):
        raise ValueError(_message(key, _DURATION_EXPECTED, value))
    text = value.strip()
    if text == "0":
        return 0.0
    if not _DURATION.fullmatch(text):
        hint = f' (add a unit, e.g. "{text}s" for seconds)' if _is_number(text) else ""
        raise ValueError(_message(key, _DURATION_EXPECTED, value, hint))
    total = float(sum(Decimal(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text)))
    if not math.isfinite(total):
        raise ValueError(_message(key, _DURATION_EXPECTED, value))
    return total


def _is_number(text: str) -> bool:
    return re.fullmatch(r"\d+(?:\.\d+)?", text) is not None


def format_duration(seconds: float) -> str:
    """Display form of a duration, inverse of :func:`parse_duration` to the millisecond.

    ``5400 -> "1h30m"``, ``0.25 -> "250ms"``, ``1.5 -> "1.5s"``, ``0 -> "0s"``.
    """
    if isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a number of seconds >= 0, got {seconds!r}")
    rest = round(seconds * 1000)
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    if rest >= 1000:
        whole, millis = divmod(rest, 1000)
        parts.append(f"{whole}.{millis:03d}".rstrip("0").rstrip(".") + "s")
    elif rest:
        parts.append(f"{rest}ms")
    return "".join(parts) or "0s"


def parse_size(value: str | int, key: str = "size") -> int:
    """Bytes from ``"512MiB"``, ``"4KiB"``, ``"10KB"`` (powers of 1000), ``"100B"`` or an int."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return value
        raise ValueError(_message(key, _SIZE_EXPECTED, value))
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(_message(key, _SIZE_EXPECTED, value))
    size = Decimal(match.group(1)) * unit
    if size != size.to_integral_value():
        raise ValueError(_message(key, "a whole number of bytes", value))
    return int(size)


# -------------------------------------------------------- one helper a type


def _int_field(table: Mapping[str, Any], where: str, name: str, default: int, minimum: int) -> int:
    value = table.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _Invalid(_message(_key(where, name), f"an integer >= {minimum}", value))
    return value


def _bool_field(table: Mapping[str, Any], where: str, name: str, default: bool) -> bool:
    value = table.get(name, default)
    if isinstance(value, bool):
        return value
    raise _Invalid(_message(_key(where, name), "true or false", value))


def _duration_field(table: Mapping[str, Any], where: str, name: str, default: float) -> float:
    try:
        return parse_duration(table.get(name, default), _key(where, name))
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _size_field(
    table: Mapping[str, Any],
    where: str,
    name: str,
    default: int,
    bounds: tuple[int, int, str] = (MIN_RING_SIZE, MAX_RING_SIZE, 'a size from "4KiB" to "1GiB"'),
) -> int:
    key, value = _key(where, name), table.get(name, default)
    try:
        size = parse_size(value, key)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    low, high, expected = bounds
    if not low <= size <= high:
        raise _Invalid(_message(key, expected, value))
    return size


def _choice_field(
    table: Mapping[str, Any], where: str, name: str, choices: tuple[str, ...], default: str
) -> str:
    value = table.get(name, default)
    if isinstance(value, str) and value.lower() in choices:
        return value.lower()
    expected = "one of " + ", ".join(f'"{choice}"' for choice in choices)
    raise _Invalid(_message(_key(where, name), expected, value))


def _mode_field(table: Mapping[str, Any], where: str, name: str, default: int) -> int:
    """A socket's mode: an octal string ("0600", "0o600", "600") or an int <= 0o777.

    The owner must keep write permission: connecting to a Unix socket needs it.
    """
    value = table.get(name, default)
    mode = -1
    if isinstance(value, str) and re.fullmatch(r"(?:0o|0)?[0-7]{1,3}", value):
        mode = int(value.removeprefix("0o"), 8)
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        mode = value
    if mode >= 0 and mode & 0o200:
        return mode
    expected = (
        'a permission mode that lets the owner write, as an octal string such as "0600" '
        "or an integer such as 0o600"
    )
    raise _Invalid(_message(_key(where, name), expected, value))


def _path(value: object, key: str, base: Path) -> Path:
    """An absolute path: ``~`` expanded, relative to ``base``, normalised."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise _Invalid(_message(key, "a non-empty path string", value))
    return Path(os.path.abspath(base / Path(value).expanduser()))


def _socket_field(table: Mapping[str, Any], where: str, base: Path) -> Path:
    key = _key(where, "socket")
    value = table.get("socket", DEFAULT_SOCKET)
    path = _path(value, key, base)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        expected = f"a socket path of at most {MAX_SOCKET_PATH} bytes once resolved (AF_UNIX limit)"
        raise _Invalid(_message(key, expected, value, f" (resolves to {_show(str(path))})"))
    return path


def _paths_field(table: Mapping[str, Any], where: str, name: str, base: Path) -> tuple[Path, ...]:
    key = _key(where, name)
    value = table.get(name, ["."])
    if not isinstance(value, list | tuple):
        raise _Invalid(_message(key, 'a list of directories such as ["."]', value))
    return tuple(_path(item, f"{key}[{index}]", base) for index, item in enumerate(value))


def _store_field(table: Mapping[str, Any], where: str, base: Path) -> str:
    """``memory`` or ``sqlite:///relative/path.db`` / ``sqlite:////absolute/path.db``.

    Returned normalised: ``memory`` or ``sqlite://`` + an absolute path.
    """
    value = table.get("store", "memory")
    if value == "memory":
        return "memory"
    if isinstance(value, str) and value.startswith("sqlite:///") and len(value) > 10:
        path = Path(value[len("sqlite:///") :]).expanduser()
        return "sqlite://" + str(path if path.is_absolute() else base / path)
    expected = (
        '"memory" or "sqlite:///path/app.db" (relative to the config file; '
        "four slashes for an absolute path)"
    )
    raise _Invalid(_message(_key(where, "store"), expected, value))


def _target_field(value: object, key: str) -> str:
    """A handler target ``dotted.module:dotted.attr``; checked, never imported."""
    if isinstance(value, str) and value.count(":") == 1:
        module, attr = value.split(":")
        if _is_dotted_identifier(module) and _is_dotted_identifier(attr):
            return value
    hint = ""
    if isinstance(value, Mapping):
        hint = ' (quote dotted task types: "user.sync.profile" = "module:attr")'
    raise _Invalid(_message(key, _TARGET_EXPECTED, value, hint))


def _is_dotted_identifier(text: str) -> bool:
    parts = text.split(".")
    return all(part.isidentifier() and not keyword.iskeyword(part) for part in parts)


# ------------------------------------------------------------------ sections


def _settings(data: Mapping[str, Any], base: Path) -> Settings:
    where = "procqueue"
    table = _table(data.get(where, {}), where, "a table of daemon settings ([procqueue])")
    _check_keys(table, where, _SETTINGS_KEYS)
    return Settings(
        store=_store_field(table, where, base),
        sync=_choice_field(table, where, "sync", SYNC_MODES, "full"),
        retention=_duration_field(table, where, "retention", 7 * 86400.0),
        socket=_socket_field(table, where, base),
        socket_mode=_mode_field(table, where, "socket_mode", 0o600),
        pythonpath=_paths_field(table, where, "pythonpath", base),
        shutdown_timeout=_duration_field(table, where, "shutdown_timeout", 30.0),
        log_level=_choice_field(table, where, "log_level", LOG_LEVELS, "info"),
        metrics=_metrics_field(table, where),
    )


def _metrics_field(table: Mapping[str, Any], where: str) -> str:
    from .metrics import parse_address

    value = table.get("metrics", "")
    if value == "":
        return ""
    try:
        if isinstance(value, str):
            parse_address(value)
            return value
    except ValueError:
        pass
    expected = 'an address to serve Prometheus metrics on, e.g. "127.0.0.1:9464" ("" = off)'
    raise _Invalid(_message(_key(where, "metrics"), expected, value))


def _queues(data: Mapping[str, Any]) -> dict[str, TaskQueueConfig]:
    value = data.get("queues", _MISSING)
    expected = 'at least one queue table such as [queues."default"]'
    queues = _table(value, "queues", expected)
    if not queues:
        raise _Invalid(_message("queues", expected, value))
    validated: dict[str, TaskQueueConfig] = {}
    for name, table in queues.items():
        _check_name(name, _key("queues", name, quote=True))
        validated[name] = _queue(name, table)
    return validated


def _queue(name: str, value: object) -> TaskQueueConfig:
    where = _key("queues", name, quote=True)
    table = _table(value, where, "a table of queue settings")

    def dotted_hint(key: str) -> str:
        return f'if "{name}.{key}" is one queue name, quote it: [queues."{name}.{key}"]'

    _check_keys(table, where, _QUEUE_KEYS, dotted_hint)
    return TaskQueueConfig(
        concurrency=_int_field(table, where, "concurrency", 1, 1),
        max_retry=_int_field(table, where, "max_retry", 0, 0),
        retry_delay=_duration_field(table, where, "retry_delay", 5.0),
        buffer_size=_int_field(table, where, "buffer_size", 1024, 1),
        timeout=_duration_field(table, where, "timeout", 0.0),
        prefetch=_int_field(table, where, "prefetch", 0, 0),
        ring_size=_size_field(table, where, "ring_size", 1 << 20),
        kill_grace=_duration_field(table, where, "kill_grace", 5.0),
        max_tasks_per_child=_int_field(table, where, "max_tasks_per_child", 0, 0),
        allow_calls=_bool_field(table, where, "allow_calls", False),
        max_memory_per_child=_size_field(
            table,
            where,
            "max_memory_per_child",
            0,
            (0, 1 << 50, 'a size such as "512MiB" (0 = no limit)'),
        ),
        handlers=_handlers(table.get("handlers", {}), _key(where, "handlers")),
    )


def _handlers(value: object, where: str) -> Mapping[str, str]:
    table = _table(value, where, 'a table of task type = "package.module:attribute"')
    handlers: dict[str, str] = {}
    for task_type, target in table.items():
        key = _key(where, task_type, quote=True)
        handlers[_check_name(task_type, key)] = _target_field(target, key)
    return MappingProxyType(handlers)


# -------------------------------------------------------------------- entry


def config_from_dict(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Config:
    """Validate already-parsed TOML; ``path`` names the file and anchors relative paths."""
    absolute = Path(os.path.abspath(path))
    try:
        if not isinstance(data, Mapping):
            raise _Invalid(_message("(document)", "a table", data))
        _check_keys(data, "", _SECTIONS)
        settings = _settings(data, absolute.parent)
        queues = _queues(data)
    except _Invalid as exc:
        raise ConfigError(f"{os.fspath(path)}: {exc}") from None
    from .cronconfig import parse_cron_entries

    cron = parse_cron_entries(data.get("cron"), os.fspath(path), queues)
    raw = MappingProxyType(copy.deepcopy(dict(data)))
    return Config(
        path=absolute, settings=settings, queues=MappingProxyType(queues), raw=raw, cron=cron
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file; every problem is a :class:`ConfigError`."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"{name}: cannot read the config file ({reason}); check the path"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{name}: invalid TOML: not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    return config_from_dict(data, path)
