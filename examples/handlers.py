"""Example handlers for conf/app.toml: CPU-bound, I/O-bound, retries, follow-ups."""

from __future__ import annotations

import hashlib
import logging
import os
import time

import procqueue
from procqueue import Context, QueueTask

log = logging.getLogger("examples")


def crunch(ctx: Context, task: QueueTask) -> dict[str, object]:
    """CPU-bound: hash a buffer ``rounds`` times. Runs in parallel across workers."""
    args = procqueue.unmarshal_payload(task) or {}
    rounds = int(args.get("rounds", 200_000))
    digest = b"procqueue"
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return {"pid": os.getpid(), "digest": digest.hex()[:16], "rounds": rounds}


def sync_profile(ctx: Context, task: QueueTask) -> None:
    """I/O-bound: pretend to call a slow API, then publish a follow-up task."""
    args = procqueue.unmarshal_payload(task) or {}
    time.sleep(float(args.get("latency", 0.2)))
    follow = ctx.publish(
        queue="report",
        type="report.profile_synced",
        payload={"user": args.get("user")},
        key=task.key,
    )
    log.info("synced %s, follow-up %s", args.get("user"), follow.id)


def flaky(ctx: Context, task: QueueTask) -> str:
    """Fails until its third attempt: shows retries (``attempt`` counts them)."""
    if task.attempt < 2:
        raise RuntimeError(f"upstream unavailable (attempt {task.attempt})")
    return f"ok after {task.attempt} retries"


def profile_synced(ctx: Context, task: QueueTask) -> None:
    log.info("report for %s", procqueue.unmarshal_payload(task))
