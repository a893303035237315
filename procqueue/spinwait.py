"""Spin-then-block waits for a reply that is due within microseconds.

On a virtual machine, waking a process whose vCPU has gone idle costs tens of
microseconds (the host must schedule the vCPU again): measured here, a
request relayed client -> supervisor -> worker and back by four blocking
reads took 83-127 us at the median, and 38-43 us when the client polled for
its reply instead of sleeping on it. So a caller that expects its reply soon
(``Client.run``, ``wait``, ``Pool.run(...).result()``) polls its socket for
a short, bounded time before it blocks. ``sched_yield`` between polls hands
the core to any other runnable process (with more processes than cores the
very process we wait for may be queued behind us). The budget is spent only
while a reply is awaited, never while idle; ``spin=0`` turns it off.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import time
from typing import Any

REPLY_SPIN = 200e-6  # seconds; a daemon's no-op round trip takes ~100-200 us here


def readable_within(sock: socket.socket, seconds: float) -> bool:
    """Poll ``sock`` for up to ``seconds``; True as soon as it has data to read
    (or is closed), False when the time ran out: block on it then."""
    if seconds <= 0:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poll, now, yield_ = poller.poll, time.perf_counter, os.sched_yield
    end = now() + seconds
    while not poll(0):
        if now() >= end:
            return False
        yield_()
    return True


def select_until(selector: selectors.BaseSelector, end: float) -> list[tuple[Any, int]]:
    """Poll ``selector`` until it has events or ``perf_counter()`` reaches ``end``;
    the events, or [] when the time ran out: block on it then."""
    now, yield_ = time.perf_counter, os.sched_yield
    while not (events := selector.select(0)):
        if now() >= end:
            break
        yield_()
    return events
