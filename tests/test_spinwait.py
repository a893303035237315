"""procqueue.spinwait: the bounded polls done before sleeping on a reply (a client)
or on the next request (the supervisor)."""

from __future__ import annotations

import selectors
import socket
import threading
import time

import pytest

from procqueue.spinwait import WAIT_CAP, ReplyPoll, readable_within, select_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_data_already_there_is_seen_at_once(pair):
    a, b = pair
    b.send(b"x")
    assert readable_within(a, 10.0)  # returns on the first poll, not after 10 s


def test_gives_up_after_its_budget_without_reading(pair):
    a, _ = pair
    start = time.perf_counter()
    assert not readable_within(a, 0.002)
    assert time.perf_counter() - start >= 0.002
    assert not readable_within(a, 0)  # no budget: no poll at all
    a.setblocking(False)
    with pytest.raises(BlockingIOError):
        a.recv(1)  # nothing was consumed or invented


def test_data_arriving_during_the_spin_ends_it(pair):
    a, b = pair
    threading.Timer(0.005, b.send, (b"late",)).start()
    start = time.perf_counter()
    assert readable_within(a, 5.0)
    assert time.perf_counter() - start < 4.0
    assert a.recv(4) == b"late"


def test_a_closed_peer_counts_as_readable(pair):
    a, b = pair
    b.close()
    assert readable_within(a, 5.0)
    assert a.recv(1) == b""  # the caller then reads EOF and reports it


def test_select_until_returns_ready_events_at_once(pair):
    a, b = pair
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ, "a")
        b.send(b"x")
        events = select_until(sel, time.perf_counter() + 10.0)
        assert [key.data for key, _ in events] == ["a"]


def test_select_until_gives_up_at_its_deadline(pair):
    a, _ = pair
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ, "a")
        start = time.perf_counter()
        assert select_until(sel, start + 0.002) == []
        assert time.perf_counter() - start >= 0.002
        assert select_until(sel, 0.0) == []  # a deadline passed: one look, no wait


def test_select_until_ends_when_an_event_arrives(pair):
    a, b = pair
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ, "a")
        threading.Timer(0.005, b.send, (b"late",)).start()
        start = time.perf_counter()
        assert [key.data for key, _ in select_until(sel, start + 5.0)] == ["a"]
        assert time.perf_counter() - start < 4.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _waits(poll: ReplyPoll, clock: FakeClock, polled: float, blocked: float, n: int) -> list:
    """``n`` waits that take ``polled`` seconds when they poll, ``blocked`` when not;
    their tickets."""
    tickets = []
    for _ in range(n):
        ticket = poll.start()
        clock.now += polled if ticket.poll else blocked
        poll.done(ticket)
        tickets.append(ticket)
    return tickets


def _chosen(tickets: list) -> set[bool]:
    """The ways chosen (not tried) by these waits."""
    return {t.poll for t in tickets if not t.tried}


def test_reply_poll_starts_polling_and_keeps_on_while_it_pays():
    clock, chance = FakeClock(), iter([0.5] * 15 + [0.0] + [0.5] * 200).__next__
    poll = ReplyPoll(200e-6, clock, chance)
    tickets = _waits(poll, clock, polled=80e-6, blocked=120e-6, n=216)
    assert [t.poll for t in tickets[:15]] == [True] * 15
    assert tickets[15].tried and not tickets[15].poll  # the one try of the other way
    assert _chosen(tickets[16:]) == {True}  # 120 us blocked against 80 polling
    assert poll.mean == [pytest.approx(120e-6, rel=1e-3), pytest.approx(80e-6, rel=1e-3)]


def test_reply_poll_stops_when_polling_delays_the_reply_and_comes_back():
    """Beside the process it waits for, on one core, the poll holds the reply
    back; tries of the other way show it, and later show the way back."""
    clock = FakeClock()
    poll = ReplyPoll(200e-6, clock, iter(([0.5] * 7 + [0.0]) * 200).__next__)  # 1 try in 8
    _waits(poll, clock, polled=80e-6, blocked=120e-6, n=64)  # apart: polling wins
    shared = _waits(poll, clock, polled=340e-6, blocked=170e-6, n=160)  # one core
    assert _chosen(shared[-80:]) == {False}
    assert {t.poll for t in shared[-80:] if t.tried} == {True}  # tries still measure it
    assert poll.mean[0] == pytest.approx(170e-6, rel=1e-3) and poll.mean[1] > 300e-6
    apart = _waits(poll, clock, polled=80e-6, blocked=120e-6, n=160)
    assert _chosen(apart[-80:]) == {True}  # polling again


def test_reply_poll_never_polls_without_a_budget_or_for_long_waits():
    clock = FakeClock()
    assert not any(t.poll for t in _waits(ReplyPoll(0.0, clock), clock, 50e-6, 50e-6, 100))
    poll = ReplyPoll(200e-6, clock, iter(([0.5] * 3 + [0.0]) * 100).__next__)
    tickets = _waits(poll, clock, polled=0.02, blocked=0.02, n=400)  # 20 ms tasks
    assert poll.mean == [WAIT_CAP, WAIT_CAP]  # both capped: no gain from polling
    assert _chosen(tickets[-100:]) == {False}  # only the tries poll
    assert sum(t.poll for t in tickets[-100:]) == 25


# -- CpuNudge: off the CPU of the client being served ----------------------------


def _current_cpu() -> int:
    from procqueue import spinwait

    assert spinwait._sched_getcpu is not None
    return spinwait._sched_getcpu()


def test_peer_cpu_reads_where_the_other_end_last_ran(pair):
    from procqueue.spinwait import peer_cpu

    a, _ = pair  # both ends are this process: its main thread is running now
    # (a migration between the two reads could tell them apart: try a few times)
    assert any(peer_cpu(a) == _current_cpu() for _ in range(10))
    a.close()
    assert peer_cpu(a) is None  # no peer to ask: no answer, no error


def test_moving_off_a_cpu_runs_elsewhere_and_keeps_every_cpu_allowed():
    import os

    from procqueue.spinwait import CpuNudge

    allowed = os.sched_getaffinity(0)
    nudge = CpuNudge()
    if len(allowed) < 2:  # nowhere to go: it never tries
        assert not nudge.enabled
        nudge.move_off(_current_cpu())
        assert nudge.moves == 0 and os.sched_getaffinity(0) == allowed
        return
    assert nudge.enabled
    for _ in range(3):
        cpu = _current_cpu()
        nudge.move_off(cpu)
        assert _current_cpu() != cpu
        assert os.sched_getaffinity(0) == allowed  # moved, not pinned
    assert nudge.moves == 3


def test_a_lone_quick_client_on_our_cpu_is_looked_at_once_per_interval(monkeypatch):
    from procqueue import spinwait

    clock = [100.0]
    nudge = spinwait.CpuNudge(every=0.005, clock=lambda: clock[0])
    nudge.enabled = True
    looked: list[socket.socket] = []
    moved: list[int] = []
    where = [_current_cpu()]
    monkeypatch.setattr(spinwait, "peer_cpu", lambda s: looked.append(s) or where[0])
    monkeypatch.setattr(nudge, "move_off", moved.append)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        nudge.after_reply(a)  # a new client: alone for two intervals first
        clock[0] += 0.009
        nudge.after_reply(a)
        assert looked == []
        clock[0] += 0.002
        nudge.after_reply(a)  # alone long enough, and on our CPU: move
        assert looked == [a] and moved == [_current_cpu()]
        clock[0] += 0.004
        nudge.after_reply(a)  # too soon: not even a look
        assert len(looked) == 1
        clock[0] += 0.002
        where[0] = -1
        nudge.after_reply(a)  # looked again; the client is elsewhere: stay
        assert len(looked) == 2 and len(moved) == 1
        where[0] = _current_cpu()
        for _ in range(10):  # two quick clients take turns: never a look
            clock[0] += 0.003
            nudge.after_reply(c if len(looked) % 2 else a)
            nudge.after_reply(a if len(looked) % 2 else c)
        assert len(looked) == 2
        clock[0] += 0.011
        nudge.after_reply(c)  # the other one went quiet: c is alone now
        assert looked[-1] is c and len(moved) == 2
        nudge.enabled = False
        clock[0] += 1
        nudge.after_reply(c)
        assert len(looked) == 3
    finally:
        for sock in (a, b, c, d):
            sock.close()


def test_an_idle_worker_beside_us_moves_when_the_client_is_elsewhere(monkeypatch):
    from procqueue import spinwait

    clock = [100.0]
    nudge = spinwait.CpuNudge(every=0.005, clock=lambda: clock[0])
    nudge.enabled = True
    ours = _current_cpu()
    client, worker = [ours + 1], [ours]  # the client elsewhere, the worker beside us
    idle: list[int | None] = [4242]
    monkeypatch.setattr(spinwait, "peer_cpu", lambda s: client[0])
    monkeypatch.setattr(spinwait, "pid_cpu", lambda pid: worker[0] if pid == 4242 else None)
    monkeypatch.setattr(spinwait, "_sched_getcpu", lambda: ours)
    moved_self: list[int] = []
    moved_workers: list[tuple[int, int]] = []
    monkeypatch.setattr(nudge, "move_off", moved_self.append)
    monkeypatch.setattr(nudge, "move_worker_off", lambda pid, cpu: moved_workers.append((pid, cpu)))
    nudge.idle_worker = lambda: idle[0]
    a, b = socket.socketpair()

    def look() -> None:
        clock[0] += 0.011  # past the interval, and alone long enough
        nudge.after_reply(a)

    try:
        nudge.after_reply(a)  # a new client: alone for two intervals first
        look()
        assert moved_workers == [(4242, ours)] and moved_self == []
        worker[0] = ours + 1  # it went to the client's side: leave it there
        look()
        idle[0] = None  # busy with a task (or none served): never moved
        worker[0] = ours
        look()
        assert moved_workers == [(4242, ours)]
        client[0] = ours  # the client came to our CPU: we move, not the worker
        idle[0] = 4242
        look()
        assert moved_self == [ours] and len(moved_workers) == 1
    finally:
        a.close()
        b.close()


def test_moving_a_worker_off_a_cpu_keeps_its_whole_mask():
    import os
    import signal

    from procqueue.spinwait import CpuNudge, pid_cpu

    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("one CPU: there is nowhere to move a process (the nudge is off)")
    pid = os.fork()
    if pid == 0:  # a busy child, like a worker polling its ring
        while True:
            pass
    try:
        nudge = CpuNudge()
        moved_from_somewhere = False
        for _ in range(20):
            cpu = pid_cpu(pid)
            assert cpu is not None
            nudge.move_worker_off(pid, cpu)
            moved_from_somewhere |= pid_cpu(pid) != cpu
            assert os.sched_getaffinity(pid) == allowed  # moved, not pinned
        assert moved_from_somewhere and nudge.worker_moves == 20
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    nudge.idle_worker = lambda: 7
    nudge.move_worker_off(pid, 0)  # gone: nothing moved, and workers still move
    assert nudge.worker_moves == 20 and nudge.idle_worker() == 7


def test_a_worker_we_may_not_move_stops_the_worker_moves_only(monkeypatch):
    from procqueue import spinwait

    def refused(pid: int, cpu: int) -> bool:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(spinwait, "_move", refused)
    nudge = spinwait.CpuNudge()
    nudge.idle_worker = lambda: 4242
    nudge.move_worker_off(4242, 0)
    assert nudge.idle_worker() is None and nudge.worker_moves == 0
    assert nudge.enabled == spinwait.CpuNudge().enabled  # its own moves go on


def test_the_worker_offered_is_the_last_to_report_and_only_while_idle(tmp_path):
    import collections
    import selectors

    from procqueue.config import config_from_dict
    from procqueue.pool import WorkerPool
    from procqueue.spawn import WorkerHandle
    from procqueue.task import QueueTask

    config = config_from_dict({"queues": {"q": {"concurrency": 2}}}, tmp_path / "c.toml")
    pool = WorkerPool(config, None, selectors.DefaultSelector(), lambda: None)  # type: ignore[arg-type]
    assert pool.idle_last_done() is None  # no outcome yet
    handle = WorkerHandle(queue="q", index=0, pid=4242, ep=None)  # type: ignore[arg-type]
    pool.by_pid[handle.pid] = handle
    pool.last_done = handle
    assert pool.idle_last_done() == 4242
    handle.inflight = collections.deque([QueueTask(queue="q", type="t")])
    assert pool.idle_last_done() is None  # busy again
    handle.inflight.clear()
    del pool.by_pid[handle.pid]
    assert pool.idle_last_done() is None  # exited
