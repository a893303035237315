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

Polling pays only when the process we wait for runs on another core. When the
scheduler puts both on one core, ``sched_yield`` does not hand it over (Linux's
EEVDF scheduler keeps running the poller until the other process is
"eligible"), so the poll delays the very reply it waits for by about its own
length: measured with the client pinned to the supervisor's core, publish +
wait took 169 us at the median without a poll, 239 us with one of 30 us and
315 us with one of 200 us, against 113 and 81 us with the client on the
worker's core. Where the scheduler puts processes changes from one second to
the next, so a ``Client`` keeps choosing (``ReplyPoll``): it polls or not by
which of the two gave the shorter waits lately, and tries the other way now
and then. In the benchmark's latency section that took publish + wait from
285-301 to 180-191 us and ``Client.run`` from 91-211 to 109-115 us (three
runs each, side by side). ``Pool.run(...).result()`` always polls: pinned
beside its supervisor it lost less to the poll (148 us polling, 163 not),
and choosing gave 97-100 us in the benchmark against 84-96 polling.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import select
import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")

REPLY_SPIN = 200e-6  # seconds; a daemon's no-op round trip takes ~100-200 us here
TRY_OTHER = 1 / 16  # the share of waits that go the way not chosen, to measure it again
WAIT_CAP = 1e-3  # longer waits count as this: no poll saves or costs much beside them
# Weight of a new wait in the moving average of its way: about the last 16
# waits of the way chosen, and the last 4 tries of the other (~64 waits).
WEIGHT_CHOSEN, WEIGHT_TRIED = 1 / 16, 1 / 4


def poll_until(ready: Callable[[], T], end: float) -> T:
    """Call ``ready`` until it returns something true or ``perf_counter()``
    reaches ``end``; its last result. The one spin loop of procqueue (a reply,
    the next request, a ring's next frame): ``sched_yield`` between tries."""
    now, yield_ = time.perf_counter, os.sched_yield
    while not (result := ready()):
        if now() >= end:
            break
        yield_()
    return result


def readable_within(sock: socket.socket, seconds: float) -> bool:
    """Poll ``sock`` for up to ``seconds``; True as soon as it has data to read
    (or is closed), False when the time ran out: block on it then."""
    if seconds <= 0:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poll_until(lambda: poller.poll(0), time.perf_counter() + seconds))


_random = random.Random().random


class ReplyPoll:
    """Poll for a reply for up to ``seconds`` before blocking on it, or not,
    whichever gave the shorter waits lately (see the module's docstring).

    ``start()`` before a wait gives a ticket (``ticket.poll``: whether to
    poll); ``done(ticket)`` once the reply is there records how long the wait
    took, the poll included. Threads may share one: the state is per ticket.
    """

    def __init__(
        self,
        seconds: float,
        clock: Callable[[], float] = time.perf_counter,
        chance: Callable[[], float] = _random,  # not every 16th: requests alternate in kind
    ) -> None:
        self.seconds = seconds
        self.mean = [0.0, 0.0]  # moving averages of the waits without / with a poll
        self._clock, self._chance = clock, chance

    def start(self) -> PollTicket:
        without, with_poll = self.mean
        # Poll until both ways are measured, then only for a clear gain: a
        # poll costs CPU while it lasts.
        chosen = not (without and with_poll) or with_poll < 0.9 * without
        tried = self._chance() < TRY_OTHER
        poll = self.seconds > 0 and chosen != tried
        return PollTicket(poll, tried, self._clock())

    def done(self, ticket: PollTicket) -> None:
        took = min(self._clock() - ticket.since, WAIT_CAP)
        way = int(ticket.poll)
        mean = self.mean[way]
        weight = WEIGHT_TRIED if ticket.tried else WEIGHT_CHOSEN
        self.mean[way] = took if not mean else mean + weight * (took - mean)

    def wait(self, sock: socket.socket) -> PollTicket:
        """``start()`` and, if it says so, poll ``sock``; the caller reads the
        reply, then calls ``done()`` with the ticket."""
        ticket = self.start()
        if ticket.poll:
            readable_within(sock, self.seconds)
        return ticket


class PollTicket(NamedTuple):
    poll: bool  # whether this wait polls
    tried: bool  # the way not chosen, tried to measure it again
    since: float  # perf_counter() at its start


def select_until(selector: selectors.BaseSelector, end: float) -> list[tuple[Any, int]]:
    """Poll ``selector`` until it has events or ``perf_counter()`` reaches ``end``;
    the events, or [] when the time ran out: block on it then."""
    return poll_until(lambda: selector.select(0), end)


# -- not sharing a CPU with the client we serve ---------------------------------
#
# Linux wakes the reader of a Unix socket with a "sync" hint: the writer is
# about to sleep, so the reader is put on the writer's CPU unless its own is
# idle. With two vCPUs, a worker polling for its next task on one and a client
# in a request/reply loop with the supervisor, the client and the supervisor
# end up on the other, taking turns, and stay there: measured on 12-06 by
# sampling each process's CPU, publish + wait took 248-253 us at the median
# in that placement and 142-150 us in the others, and it held about half the
# time. Their polls are not the cost (without them it took as long): the two
# do their work one after the other. So the supervisor, when the client it just
# answered last ran on its own CPU, moves itself to another CPU it may use (and
# at once allows them all again: it is never pinned). It then meets the
# client's next request while polling for it, so no wake-up brings it back.
#
# That move can leave the supervisor beside the worker that runs the client's
# tasks, the worst placement for ``Pool.run`` and second worst for the daemon:
# pinned on the third sitting of 12-06, Pool(1).run().result() took 153 us at
# the median with the caller beside the worker, 184 beside the supervisor and
# 204 with the supervisor beside the worker; a daemon's Client.run / publish +
# wait 157 / 192, 196 / 319 and 203 / 231 us. The client and the worker take
# turns (one waits while the other works), the supervisor works at both ends
# of a round trip. So when the client is elsewhere but the worker that just
# served it is idle on our CPU, that worker is moved off it the same way.


def _load_sched_getcpu() -> Callable[[], int] | None:
    """libc's ``sched_getcpu`` (the os module has no binding for it), if any."""
    try:
        return ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (OSError, AttributeError):
        return None


_sched_getcpu = _load_sched_getcpu()
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
NUDGE_EVERY = 5e-3  # seconds between looks at a client's CPU (one /proc read each)


class CpuNudge:
    """Looks, at most every ``every`` seconds, at the CPU of a client just
    answered and moves this process off it when it is ours (see above).

    Only while one client at a time is in a request/reply loop with us: with
    two, on two CPUs, we would move back and forth between them (measured:
    two clients' publish + wait 436-465 us at the median with the moves,
    364-430 without).
    """

    def __init__(self, every: float = NUDGE_EVERY, clock: Callable[[], float] = time.perf_counter):
        self.every, self._clock = every, clock
        self.enabled = (
            _sched_getcpu is not None
            and hasattr(os, "sched_getaffinity")
            and len(os.sched_getaffinity(0)) > 1
        )
        # The pid of the worker that just served the client, if it holds no
        # task now (set by the supervisor; None: no worker to move).
        self.idle_worker: Callable[[], int | None] = lambda: None
        self._next = 0.0
        self._last: socket.socket | None = None  # the quick client answered last
        self._others_until = 0.0  # until then, another quick client is about
        self.moves = 0  # how many times it moved (the tests read it)
        self.worker_moves = 0  # how many times it moved a worker

    def after_reply(self, sock: socket.socket) -> None:
        """``sock``'s client was just answered and will ask again soon."""
        if not self.enabled:
            return
        now = self._clock()
        if sock is not self._last:
            self._last, self._others_until = sock, now + 2 * self.every
        if now < self._next or now < self._others_until:
            return
        self._next = now + self.every
        client = peer_cpu(sock)
        if client is None or _sched_getcpu is None:
            return
        ours = _sched_getcpu()
        if client == ours:
            self.move_off(ours)
        elif (worker := self.idle_worker()) is not None and pid_cpu(worker) == ours:
            self.move_worker_off(worker, ours)

    def move_off(self, cpu: int) -> None:
        """Run on another CPU than ``cpu``, then allow every CPU allowed before."""
        try:
            if _move(0, cpu):
                self.moves += 1
        except OSError:  # a cpuset that changed under us, a seccomp policy: stop trying
            self.enabled = False

    def move_worker_off(self, pid: int, cpu: int) -> None:
        """Move worker ``pid`` off ``cpu`` the same way (it keeps its own mask)."""
        try:
            if _move(pid, cpu):
                self.worker_moves += 1
        except ProcessLookupError:  # it has just exited: nothing to move
            pass
        except OSError:  # not ours to move (a policy): stop moving workers
            self.idle_worker = lambda: None


def _move(pid: int, cpu: int) -> bool:
    """Make process ``pid`` (0: this one) leave ``cpu`` now, then give it back
    every CPU it was allowed; False when it may run on no other CPU."""
    allowed = os.sched_getaffinity(pid)
    elsewhere = allowed - {cpu}
    if not elsewhere:
        return False
    os.sched_setaffinity(pid, elsewhere)  # a running process moves at once
    os.sched_setaffinity(pid, allowed)
    return True


def peer_cpu(sock: socket.socket) -> int | None:
    """The CPU the process at the other end of a Unix socket last ran on
    (its main thread's: a client in another thread may mislead it, which
    costs one needless move at most every ``NUDGE_EVERY``)."""
    with contextlib.suppress(OSError):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        return pid_cpu(_PEERCRED.unpack(creds)[0])
    return None


def pid_cpu(pid: int) -> int | None:
    """The CPU process ``pid`` (its main thread) last ran on; None if it is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/stat", "rb") as f:
        # field 39, "processor"; the fields after the command's ")" start at 3
        return int(f.read().rsplit(b")", 1)[1].split()[36])
    return None
