"""``procqueue`` command line: run | check | publish | task | status.

Exit codes: 0 ok, 1 failure, 2 bad usage or bad config.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from .config import Config, load_config, parse_duration
from .errors import ConfigError, ProcQueueError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="procqueue",
        description=(
            "A multiprocess worker-pool daemon: queues, retries, delays and time limits "
            "over forked workers."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="start the daemon in the foreground")
    run.add_argument("config", help="path of the TOML config")
    run.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="override [procqueue] log_level",
    )
    run.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per line, for log shippers",
    )
    run.add_argument(
        "--reload",
        action="store_true",
        help="development: reload handlers and config when their files change",
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate the config and import every handler")
    check.add_argument("config")
    check.set_defaults(func=cmd_check)

    pub = sub.add_parser("publish", help="publish one task; prints the stored task as JSON")
    pub.add_argument("config")
    pub.add_argument("--queue", required=True)
    pub.add_argument("--type", required=True)
    pub.add_argument("--payload", help="the payload as JSON text (e.g. '{\"id\": 7}')")
    pub.add_argument("--key", default="")
    pub.add_argument("--delay", help="run no earlier than this from now, e.g. 30s, 1h30m")
    pub.add_argument("--timeout", help="time limit for this task, e.g. 10s")
    pub.add_argument("--max-retry", type=int, default=0)
    pub.add_argument("--header", action="append", default=[], metavar="K=V")
    pub.add_argument("--wait", action="store_true", help="wait for the task to finish")
    pub.set_defaults(func=cmd_publish)

    task = sub.add_parser("task", help="print a task as JSON")
    task.add_argument("config")
    task.add_argument("id")
    task.set_defaults(func=cmd_task)

    _dead_parsers(sub)
    _cron_parsers(sub)

    status = sub.add_parser("status", help="queues, counters and workers")
    status.add_argument("config")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    return parser


def _dead_parsers(sub: Any) -> None:
    dead = sub.add_parser("dead", help="dead letters: tasks whose retries ran out")
    verbs = dead.add_subparsers(dest="verb", required=True, metavar="VERB")
    lst = verbs.add_parser("list", help="list dead letters, oldest first")
    lst.add_argument("config")
    lst.add_argument("--queue")
    lst.add_argument("--json", action="store_true", help="one JSON array")
    lst.set_defaults(func=cmd_dead_list)
    req = verbs.add_parser("requeue", help="put dead letters back as pending (attempt 0)")
    req.add_argument("config")
    req.add_argument("id", nargs="?")
    req.add_argument("--all", action="store_true", help="every dead letter (of --queue)")
    req.add_argument("--queue")
    req.set_defaults(func=cmd_dead_requeue)
    purge = verbs.add_parser("purge", help="delete dead letters")
    purge.add_argument("config")
    purge.add_argument("--queue")
    purge.set_defaults(func=cmd_dead_purge)


def _cron_parsers(sub: Any) -> None:
    cron = sub.add_parser("cron", help="cron entries of a running daemon")
    verbs = cron.add_subparsers(dest="verb", required=True, metavar="VERB")
    lst = verbs.add_parser("list", help="entries with their next and last run and counters")
    lst.add_argument("config")
    lst.add_argument("--json", action="store_true", help="one JSON array")
    lst.set_defaults(func=cmd_cron_list)
    cancel = verbs.add_parser("cancel", help="remove an entry until the next reload/restart")
    cancel.add_argument("config")
    cancel.add_argument("name")
    cancel.set_defaults(func=cmd_cron_cancel)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"procqueue: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ProcQueueError as exc:
        print(f"procqueue: {type(exc).__name__} (code {exc.code}): {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL


def _usage(message: str) -> int:
    print(f"procqueue: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_run(args: argparse.Namespace) -> int:
    from .logs import setup_logging
    from .supervisor import run

    config = load_config(args.config)
    setup_logging(args.log_level or config.settings.log_level, args.log_format)
    if args.reload:
        from .reload import run_with_reloader

        passed = ["--log-format", args.log_format]
        if args.log_level:
            passed += ["--log-level", args.log_level]
        return int(run_with_reloader(args.config, passed))
    profile = os.environ.get("PROCQUEUE_PROFILE")
    if profile:  # development: cProfile the supervisor (not its workers) into this file
        import cProfile

        with cProfile.Profile() as prof:
            code = run(config)
        prof.dump_stats(profile)
        return code
    return run(config)


def cmd_check(args: argparse.Namespace) -> int:
    from .worker import load_handler

    config = load_config(args.config)
    for entry in reversed(config.settings.pythonpath):
        sys.path.insert(0, str(entry))
    failures = 0
    for name, queue in config.queues.items():
        for ttype, target in queue.handlers.items():
            try:
                load_handler(target)
            except Exception as exc:
                failures += 1
                print(
                    f"{config.path}: queues.{name!r}.handlers.{ttype!r}: cannot import "
                    f"{target}: {type(exc).__name__}: {exc}",
                    file=sys.stderr,
                )
    if failures:
        return EXIT_FAIL
    handlers = sum(len(q.handlers) for q in config.queues.values())
    print(f"{config.path}: ok ({len(config.queues)} queue(s), {handlers} handler(s))")
    return EXIT_OK


def _client(config: Config) -> Any:
    from .client import Client

    return Client(config.settings.socket)


def cmd_publish(args: argparse.Namespace) -> int:
    from .task import QueueTask

    config = load_config(args.config)
    payload = None
    if args.payload is not None:
        try:
            payload = orjson.dumps(orjson.loads(args.payload))
        except orjson.JSONDecodeError as exc:
            return _usage(f"--payload is not valid JSON: {exc}")
    headers = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep or not key:
            return _usage(f"--header expects K=V, got {item!r}")
        headers[key] = value
    try:
        delay = parse_duration(args.delay, "--delay") if args.delay else 0.0
        timeout = parse_duration(args.timeout, "--timeout") if args.timeout else 0.0
    except ValueError as exc:
        return _usage(str(exc))
    task = QueueTask(
        queue=args.queue,
        type=args.type,
        payload=payload,
        key=args.key,
        headers=headers,
        delay=delay,
        timeout=timeout,
        max_retry=args.max_retry,
    )
    with _client(config) as client:
        stored = client.publish(task)
        if args.wait:
            stored = client.wait(stored.id)
    print(stored.to_json().decode())
    return EXIT_OK


def cmd_task(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    with _client(config) as client:
        print(client.get_task(args.id).to_json().decode())
    return EXIT_OK


def cmd_dead_list(args: argparse.Namespace) -> int:
    with _client(load_config(args.config)) as client:
        tasks = client.dead_letters(args.queue)
    if args.json:
        print(orjson.dumps([t.to_dict() for t in tasks], option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK
    for t in tasks:
        print(f"{t.id}  {t.queue}  {t.type}  attempt={t.attempt}  {t.last_error.splitlines()[0]}")
    print(f"{len(tasks)} dead letter(s)")
    return EXIT_OK


def cmd_dead_requeue(args: argparse.Namespace) -> int:
    if bool(args.id) == bool(args.all):
        return _usage("dead requeue: give a task ID or --all")
    with _client(load_config(args.config)) as client:
        tasks = client.requeue_dead(args.id, all=args.all, queue=args.queue)
    print(f"requeued {len(tasks)} task(s)")
    return EXIT_OK


def cmd_dead_purge(args: argparse.Namespace) -> int:
    with _client(load_config(args.config)) as client:
        print(f"purged {client.purge_dead(args.queue)} dead letter(s)")
    return EXIT_OK


def cmd_cron_list(args: argparse.Namespace) -> int:
    with _client(load_config(args.config)) as client:
        entries = client.list_cron()
    if args.json:
        print(orjson.dumps([e.to_dict() for e in entries], option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK
    from .status import render_cron

    print(render_cron([e.to_dict() for e in entries]))
    return EXIT_OK


def cmd_cron_cancel(args: argparse.Namespace) -> int:
    with _client(load_config(args.config)) as client:
        client.cancel_cron(args.name)
    print(f"cancelled cron entry {args.name!r}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from .status import render_status

    config = load_config(args.config)
    with _client(config) as client:
        status = client.status()
    if args.json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_status(status))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
