"""Tests for procqueue.config: loading, defaults, durations, sizes and error messages."""

from __future__ import annotations

import dataclasses
import math
import re
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest

from procqueue.config import (
    Config,
    Settings,
    TaskQueueConfig,
    config_from_dict,
    format_duration,
    load_config,
    parse_duration,
    parse_size,
)
from procqueue.errors import ConfigError

FULL = """
[procqueue]
store = "memory"
socket = "run/procqueue.sock"
socket_mode = "0660"
pythonpath = [".", "src", "/opt/lib"]
shutdown_timeout = "1m"
log_level = "debug"

[queues."user.sync"]
concurrency = 2
max_retry = 3
retry_delay = "1.5s"
buffer_size = 128
timeout = "30s"
prefetch = 4
ring_size = "4MiB"
kill_grace = "250ms"

[queues."user.sync".handlers]
"user.sync.profile" = "examples.handlers:sync_profile"
"user.sync:avatar" = "examples.handlers:Sync.avatar"

[queues.report]
concurrency = 1
"""

MINIMAL = """
[queues.default]
"""


def write(tmp_path: Path, text: str, name: str = "app.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> tuple[Path, str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return path, str(info.value)


def assert_error(message: str, path: Path, key: str, expected: str) -> None:
    """The message has the form ``<file>: <key path>: expected <what>, got <value>``."""
    assert message.startswith(f"{path}: {key}: expected "), message
    assert expected in message, message
    assert ", got " in message, message


# ------------------------------------------------------------- valid configs


def test_full_config_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    config = load_config(path)

    assert isinstance(config, Config)
    assert config.path == path
    assert config.settings == Settings(
        store="memory",
        socket=tmp_path / "run" / "procqueue.sock",
        socket_mode=0o660,
        pythonpath=(tmp_path, tmp_path / "src", Path("/opt/lib")),
        shutdown_timeout=60.0,
        log_level="debug",
    )
    assert list(config.queues) == ["user.sync", "report"]
    sync = config.queues["user.sync"]
    assert sync == TaskQueueConfig(
        concurrency=2,
        max_retry=3,
        retry_delay=1.5,
        buffer_size=128,
        timeout=30.0,
        prefetch=4,
        ring_size=4 << 20,
        kill_grace=0.25,
        handlers={
            "user.sync.profile": "examples.handlers:sync_profile",
            "user.sync:avatar": "examples.handlers:Sync.avatar",
        },
    )
    assert config.queues["report"] == TaskQueueConfig()
    assert config.raw["queues"]["user.sync"]["retry_delay"] == "1.5s"


def test_loaded_config_is_immutable(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.settings.store = "redis"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.queues["report"].concurrency = 9  # type: ignore[misc]
    assert isinstance(config.queues, MappingProxyType)
    assert isinstance(config.queues["user.sync"].handlers, MappingProxyType)
    assert isinstance(config.raw, MappingProxyType)
    with pytest.raises(TypeError):
        config.queues["new"] = TaskQueueConfig()  # type: ignore[index]
    with pytest.raises(TypeError):
        config.queues["user.sync"].handlers["x"] = "m:f"  # type: ignore[index]


def test_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    config = load_config(path)
    assert config.settings == Settings(
        socket=tmp_path / "procqueue.sock",
        pythonpath=(tmp_path,),
    )
    assert config.settings.store == "memory"
    assert config.settings.socket_mode == 0o600
    assert config.settings.shutdown_timeout == 30.0
    assert config.settings.log_level == "info"
    queue = config.queues["default"]
    assert queue == TaskQueueConfig()
    assert (queue.concurrency, queue.max_retry, queue.retry_delay) == (1, 0, 5.0)
    assert (queue.buffer_size, queue.timeout, queue.prefetch) == (1024, 0.0, 0)
    assert (queue.ring_size, queue.kill_grace, dict(queue.handlers)) == (1 << 20, 5.0, {})


def test_relative_config_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", MINIMAL)
    monkeypatch.chdir(tmp_path)
    config = load_config("conf/app.toml")
    assert config.path == tmp_path / "conf" / "app.toml"
    assert config.settings.socket == tmp_path / "conf" / "procqueue.sock"
    assert config.settings.pythonpath == (tmp_path / "conf",)


@pytest.mark.parametrize(
    ("value", "mode"),
    [('"0600"', 0o600), ('"0o640"', 0o640), ('"755"', 0o755), ("0o600", 0o600), ("384", 0o600)],
)
def test_socket_mode_forms(tmp_path: Path, value: str, mode: int) -> None:
    config = load_config(write(tmp_path, f"[procqueue]\nsocket_mode = {value}\n{MINIMAL}"))
    assert config.settings.socket_mode == mode


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f'[procqueue]\nlog_level = "WARNING"\n{MINIMAL}'))
    assert config.settings.log_level == "warning"


def test_names_at_the_length_limit_are_accepted(tmp_path: Path) -> None:
    name = "q" * 200
    config = load_config(write(tmp_path, f'[queues."{name}".handlers]\n"{name}" = "m:f"\n'))
    assert config.queues[name].handlers == {name: "m:f"}


def test_config_from_dict(tmp_path: Path) -> None:
    queue = {"concurrency": 3}
    data = {"procqueue": {"socket": "s.sock"}, "queues": {"q": queue}}
    config = config_from_dict(data, tmp_path / "x.toml")
    assert config.settings.socket == tmp_path / "s.sock"
    assert config.queues["q"].concurrency == 3
    queue["concurrency"] = 5
    assert config.raw["queues"]["q"]["concurrency"] == 3


def test_config_from_dict_validates_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    with pytest.raises(ConfigError) as info:
        config_from_dict({"queues": {"q": {"concurrency": "two"}}}, path)
    assert str(info.value) == f'{path}: queues."q".concurrency: expected an integer >= 1, got "two"'


def test_task_queue_config_freezes_a_plain_handlers_dict() -> None:
    handlers = {"t": "m:f"}
    queue = TaskQueueConfig(handlers=handlers)
    handlers["u"] = "m:g"
    assert isinstance(queue.handlers, MappingProxyType)
    assert dict(queue.handlers) == {"t": "m:f"}


# ----------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("1h30m", 5400.0),
        ("7d", 604800.0),
        ("1d2h3m4s5ms", 93784.005),
        ("0", 0.0),
        ("0s", 0.0),
        (" 10m ", 600.0),
        (0, 0.0),
        (5, 5.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == seconds
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize(
    "value",
    ["", "5", "5x", "-1s", "s", "1.s", "1h 30m", "1e3s", True, False, -1, -0.5, math.nan, math.inf],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"^retry_delay: expected a duration"):
        parse_duration(value, "retry_delay")  # type: ignore[arg-type]


def test_parse_duration_suggests_a_unit_for_bare_numbers() -> None:
    with pytest.raises(ValueError, match=r'add a unit, e\.g\. "5s"'):
        parse_duration("5")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (5, "5s"),
        (1.5, "1.5s"),
        (5400, "1h30m"),
        (604800, "7d"),
        (90061.5, "1d1h1m1.5s"),
        (3600.25, "1h250ms"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", ["0s", "250ms", "5s", "1.5s", "1h30m", "7d", "1d1h1m1.234s"])
def test_format_parse_round_trip_from_text(text: str) -> None:
    assert format_duration(parse_duration(text)) == text


@pytest.mark.parametrize("seconds", [0.0, 0.001, 0.25, 59.999, 3600.0, 5400.5, 3 * 86400 + 1])
def test_format_parse_round_trip_from_seconds(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("seconds", [-1.0, math.inf, math.nan])
def test_format_duration_rejects(seconds: float) -> None:
    with pytest.raises(ValueError):
        format_duration(seconds)


# --------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("512MiB", 512 << 20),
        ("4KiB", 4096),
        ("1GiB", 1 << 30),
        ("10KB", 10_000),
        ("100B", 100),
        ("1.5KiB", 1536),
        ("2 MiB", 2 << 20),
        ("8kib", 8192),
        ("1024", 1024),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(value: str | int, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "KiB", "5XB", "-1KiB", "1.5B", "1MB2", -1, True, 1.5])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"^ring_size: expected "):
        parse_size(value, "ring_size")  # type: ignore[arg-type]


# -------------------------------------------------------------------- errors


def test_error_message_matches_the_documented_form(tmp_path: Path) -> None:
    path, message = load_error(tmp_path, '[queues."emails"]\nconcurrency = "two"\n')
    assert message == f'{path}: queues."emails".concurrency: expected an integer >= 1, got "two"'


def test_config_error_is_a_procqueue_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[queues]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.code == 13


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        pytest.param(
            f'[procqueue]\nsockt = "x.sock"\n{MINIMAL}',
            "procqueue.sockt",
            'got unknown key "sockt" (did you mean "socket"?)',
            id="unknown-key-in-procqueue",
        ),
        pytest.param(
            '[queues."user.sync"]\nconcurency = 2\n',
            'queues."user.sync".concurency',
            'one of the keys concurrency, max_retry, retry_delay, buffer_size, timeout, prefetch, ring_size, kill_grace, max_tasks_per_child, max_memory_per_child, allow_calls, handlers, got unknown key "concurency" (did you mean "concurrency"?)',  # noqa: E501
            id="unknown-key-in-queue",
        ),
        pytest.param(
            f"[workers]\ncount = 2\n{MINIMAL}",
            "workers",
            'one of the keys procqueue, queues, cron, got unknown key "workers"',
            id="unknown-section",
        ),
        pytest.param(
            '[queues."user.sync"]\nconcurrency = "two"\n',
            'queues."user.sync".concurrency',
            'an integer >= 1, got "two"',
            id="concurrency-type",
        ),
        pytest.param(
            "[queues.q]\nconcurrency = 0\n",
            'queues."q".concurrency',
            "an integer >= 1, got 0",
            id="concurrency-zero",
        ),
        pytest.param(
            "[queues.q]\nconcurrency = true\n",
            'queues."q".concurrency',
            "an integer >= 1, got true",
            id="concurrency-bool",
        ),
        pytest.param(
            '[queues."user.sync"]\nmax_retry = -1\n',
            'queues."user.sync".max_retry',
            "an integer >= 0, got -1",
            id="negative-max-retry",
        ),
        pytest.param(
            '[queues."user.sync"]\nretry_delay = "5x"\n',
            'queues."user.sync".retry_delay',
            'a duration such as "250ms"',
            id="bad-duration",
        ),
        pytest.param(
            "[queues.q]\ntimeout = 30\nkill_grace = -1\n",
            'queues."q".kill_grace',
            "a number of seconds >= 0, got -1",
            id="negative-duration",
        ),
        pytest.param(
            f'[procqueue]\nshutdown_timeout = "30"\n{MINIMAL}',
            "procqueue.shutdown_timeout",
            'got "30" (add a unit, e.g. "30s" for seconds)',
            id="duration-without-unit",
        ),
        pytest.param(
            '[queues.q]\nring_size = "1KiB"\n',
            'queues."q".ring_size',
            'a size from "4KiB" to "1GiB", got "1KiB"',
            id="ring-too-small",
        ),
        pytest.param(
            '[queues.q]\nring_size = "2GiB"\n',
            'queues."q".ring_size',
            'a size from "4KiB" to "1GiB", got "2GiB"',
            id="ring-too-large",
        ),
        pytest.param(
            '[queues.q]\nring_size = "1 meg"\n',
            'queues."q".ring_size',
            'a size such as "512MiB"',
            id="bad-size",
        ),
        pytest.param(
            '[queues."user.sync".handlers]\n"user.sync.profile" = "examples.handlers"\n',
            'queues."user.sync".handlers."user.sync.profile"',
            'a handler "package.module:attribute"',
            id="handler-without-colon",
        ),
        pytest.param(
            '[queues.q.handlers]\nt = "examples.handlers:sync profile"\n',
            'queues."q".handlers."t"',
            'got "examples.handlers:sync profile"',
            id="handler-attr-not-identifier",
        ),
        pytest.param(
            '[queues.q.handlers]\nt = "class.mod:f"\n',
            'queues."q".handlers."t"',
            'got "class.mod:f"',
            id="handler-keyword",
        ),
        pytest.param(
            '[queues.q.handlers]\nt = "a:b:c"\n',
            'queues."q".handlers."t"',
            'got "a:b:c"',
            id="handler-two-colons",
        ),
        pytest.param(
            "[queues.q.handlers]\nt = 42\n",
            'queues."q".handlers."t"',
            "got 42",
            id="handler-not-a-string",
        ),
        pytest.param(
            '[queues.q.handlers]\nuser.sync = "m:f"\n',
            'queues."q".handlers."user"',
            'got a table (quote dotted task types: "user.sync.profile" = "module:attr")',
            id="handler-unquoted-dotted-type",
        ),
        pytest.param(
            '[queues.q.handlers]\n"bad type" = "m:f"\n',
            'queues."q".handlers."bad type"',
            'a name of 1-200 characters from A-Z a-z 0-9 . _ : -, got "bad type"',
            id="bad-task-type",
        ),
        pytest.param(
            '[queues."bad name"]\n',
            'queues."bad name"',
            'a name of 1-200 characters from A-Z a-z 0-9 . _ : -, got "bad name"',
            id="bad-queue-name",
        ),
        pytest.param(
            '[queues.""]\n',
            'queues.""',
            'a name of 1-200 characters from A-Z a-z 0-9 . _ : -, got ""',
            id="empty-queue-name",
        ),
        pytest.param(
            f'[queues."{"q" * 201}"]\n',
            f'queues."{"q" * 201}"',
            "(201 characters)",
            id="queue-name-too-long",
        ),
        pytest.param(
            "[queues.user.sync]\nconcurrency = 2\n",
            'queues."user".sync',
            'got unknown key "sync" (if "user.sync" is one queue name, quote it: '
            '[queues."user.sync"])',
            id="unquoted-dotted-queue-name",
        ),
        pytest.param(
            "[queues]\nq = 3\n",
            'queues."q"',
            "a table of queue settings, got 3",
            id="queue-not-a-table",
        ),
        pytest.param(
            '[procqueue]\nlog_level = "info"\n',
            "queues",
            'at least one queue table such as [queues."default"], got nothing',
            id="no-queues",
        ),
        pytest.param(
            "[queues]\n",
            "queues",
            "got an empty table",
            id="empty-queues",
        ),
        pytest.param(
            "[[queues]]\nname = 'q'\n",
            "queues",
            "got [a table]",
            id="queues-array-of-tables",
        ),
        pytest.param(
            f'[procqueue]\nstore = "sqlite://data/app.db"\n{MINIMAL}',
            "procqueue.store",
            '"memory" or "sqlite:///path/app.db"',
            id="sqlite-store-two-slashes",
        ),
        pytest.param(
            f'[procqueue]\nstore = "redis://localhost:6379/0"\n{MINIMAL}',
            "procqueue.store",
            'got "redis://localhost:6379/0"',
            id="unsupported-store-redis",
        ),
        pytest.param(
            f'[procqueue]\nlog_level = "verbose"\n{MINIMAL}',
            "procqueue.log_level",
            'one of "debug", "info", "warning", "error", got "verbose"',
            id="bad-log-level",
        ),
        pytest.param(
            f"[procqueue]\nsocket_mode = 600\n{MINIMAL}",
            "procqueue.socket_mode",
            'octal string such as "0600"',
            id="socket-mode-decimal",
        ),
        pytest.param(
            f'[procqueue]\nsocket_mode = "0400"\n{MINIMAL}',
            "procqueue.socket_mode",
            "lets the owner write",
            id="socket-mode-read-only",
        ),
        pytest.param(
            f'[procqueue]\nsocket_mode = "rw"\n{MINIMAL}',
            "procqueue.socket_mode",
            'got "rw"',
            id="socket-mode-text",
        ),
        pytest.param(
            f'[procqueue]\nsocket = ""\n{MINIMAL}',
            "procqueue.socket",
            'a non-empty path string, got ""',
            id="empty-socket",
        ),
        pytest.param(
            f'[procqueue]\nsocket = "{"s" * 120}.sock"\n{MINIMAL}',
            "procqueue.socket",
            "at most 107 bytes",
            id="socket-path-too-long",
        ),
        pytest.param(
            f'[procqueue]\npythonpath = "src"\n{MINIMAL}',
            "procqueue.pythonpath",
            'a list of directories such as ["."], got "src"',
            id="pythonpath-not-a-list",
        ),
        pytest.param(
            f'[procqueue]\npythonpath = [".", 3]\n{MINIMAL}',
            "procqueue.pythonpath[1]",
            "a non-empty path string, got 3",
            id="pythonpath-item",
        ),
        pytest.param(
            f"procqueue = 3\n{MINIMAL}",
            "procqueue",
            "a table of daemon settings ([procqueue]), got 3",
            id="procqueue-not-a-table",
        ),
    ],
)
def test_config_errors(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path, message = load_error(tmp_path, text)
    assert_error(message, path, key, expected)


def test_toml_syntax_error(tmp_path: Path) -> None:
    path, message = load_error(tmp_path, "[queues.q]\nconcurrency = = 2\n")
    assert message.startswith(f"{path}: invalid TOML: ")
    assert re.search(r"line 2", message), message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "app.toml"
    path.write_bytes(b"[queues.q]\n# \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid TOML")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: cannot read the config file")
    assert "No such file or directory" in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path)


def test_config_from_dict_rejects_a_non_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a table, got"):
        config_from_dict([], tmp_path / "x.toml")  # type: ignore[arg-type]


def test_sqlite_store_paths_resolve_against_config_dir(tmp_path):
    relative = config_from_dict(
        {"procqueue": {"store": "sqlite:///data/app.db"}, "queues": {"q": {}}},
        tmp_path / "app.toml",
    )
    assert relative.settings.store == f"sqlite://{tmp_path}/data/app.db"
    absolute = config_from_dict(
        {
            "procqueue": {"store": "sqlite:////var/lib/pq.db", "sync": "normal", "retention": "1d"},
            "queues": {"q": {}},
        },
        tmp_path / "app.toml",
    )
    assert absolute.settings.store == "sqlite:///var/lib/pq.db"
    assert absolute.settings.sync == "normal" and absolute.settings.retention == 86400
