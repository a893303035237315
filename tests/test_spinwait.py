"""procqueue.spinwait: the bounded polls done before sleeping on a reply (a client)
or on the next request (the supervisor)."""

from __future__ import annotations

import selectors
import socket
import threading
import time

import pytest

from procqueue.spinwait import readable_within, select_until

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
