"""``[[cron]]`` tables -> :class:`procqueue.cron.CronSpecEntry`, validated at load.

Messages follow :mod:`procqueue.config`: file, TOML key path, what was wanted.
The spec is compiled once here (croniter, through ``cron._compile``) so that a
bad spec is a config error naming its entry, never a runtime surprise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orjson

from .cron import _ENTRY_KEYS, MISFIRE_POLICIES, CronSpecEntry, _BadField, _compile, _zone
from .errors import ConfigError

__all__ = ["parse_cron_entries"]


def _where(index: int, table: Mapping[str, Any]) -> str:
    name = table.get("name")
    if isinstance(name, str) and name:
        return f"cron[{index}] ({json.dumps(name, ensure_ascii=False)})"
    return f"cron[{index}]"


def _entry(index: int, value: object, queues: Mapping[str, Any]) -> CronSpecEntry:
    from . import config as c  # lazy: config.py imports this module

    table = c._table(value, f"cron[{index}]", "a table of cron settings ([[cron]])")
    where = _where(index, table)
    c._check_keys(table, where, _ENTRY_KEYS)
    name = c._check_name(table.get("name", c._MISSING), c._key(where, "name"))
    queue = table.get("queue", c._MISSING)
    if queue not in queues:
        known = ", ".join(json.dumps(q) for q in queues) or "none configured"
        raise c._Invalid(c._message(c._key(where, "queue"), f"one of the queues {known}", queue))
    timezone, spec = table.get("timezone", "UTC"), table.get("spec", c._MISSING)
    try:
        _compile(spec, _zone(timezone))
    except _BadField as bad:
        value = timezone if bad.field == "timezone" else spec
        key = c._key(where, bad.field)
        raise c._Invalid(c._message(key, bad.expected, value, bad.hint)) from None
    return CronSpecEntry(
        name=name,
        spec=" ".join(spec.split()),
        queue=queue,
        type=c._check_name(table.get("type", c._MISSING), c._key(where, "type")),
        payload=_payload_field(table, where),
        description=_description_field(table, where),
        timezone=timezone,
        misfire=c._choice_field(table, where, "misfire", MISFIRE_POLICIES, "coalesce"),
    )


def _payload_field(table: Mapping[str, Any], where: str) -> bytes | None:
    from . import config as c

    if "payload" not in table:
        return None
    try:
        return orjson.dumps(table["payload"])
    except orjson.JSONEncodeError:
        key = c._key(where, "payload")
        raise c._Invalid(c._message(key, "a JSON-serialisable value", table["payload"])) from None


def _description_field(table: Mapping[str, Any], where: str) -> str:
    from . import config as c

    value = table.get("description", "")
    if not isinstance(value, str):
        raise c._Invalid(c._message(c._key(where, "description"), "a string", value))
    return value


def parse_cron_entries(
    value: object, config_path: str, queues: Mapping[str, Any]
) -> tuple[CronSpecEntry, ...]:
    """Validate the ``[[cron]]`` array; every problem is a ConfigError naming entry and key."""
    from . import config as c

    try:
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            raise c._Invalid(c._message("cron", "an array of tables ([[cron]] entries)", value))
        entries: list[CronSpecEntry] = []
        seen: dict[str, int] = {}
        for index, item in enumerate(value):
            entry = _entry(index, item, queues)
            if entry.name in seen:
                key = f"cron[{index}] ({json.dumps(entry.name, ensure_ascii=False)}).name"
                hint = f" (already used by cron[{seen[entry.name]}])"
                raise c._Invalid(c._message(key, "a unique name", entry.name, hint))
            seen[entry.name] = index
            entries.append(entry)
    except c._Invalid as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    return tuple(entries)
