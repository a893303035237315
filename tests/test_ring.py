"""Unit tests for procqueue.ring: the SPSC byte ring, framing, doorbell and a real fork."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import select
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procqueue.ring import _HEAD, _SLEEP, _TAIL, _WAIT, HEADER, Channel, Endpoint, PeerGone, Ring

MIN_CAP = 64


@contextlib.contextmanager
def endpoints(capacity: int = MIN_CAP) -> Iterator[tuple[Endpoint, Endpoint]]:
    """Both ends of one channel in this process: (parent = producer on down, child)."""
    ch = Channel(capacity)
    # The layout Channel.__init__ chose: (offset, capacity) of the down and up rings.
    (down, down_cap), (up, up_cap) = ch._down, ch._up
    assert down_cap == up_cap == capacity
    assert down + HEADER + capacity <= up or up + HEADER + capacity <= down  # no overlap
    assert max(down, up) + HEADER + capacity <= len(ch.buf)
    down_p, up_p = Ring(ch.buf, down, capacity), Ring(ch.buf, up, capacity)
    down_c, up_c = Ring(ch.buf, down, capacity), Ring(ch.buf, up, capacity)
    parent = Endpoint(down_p, up_p, ch.parent_sock, ch.buf)
    child = Endpoint(up_c, down_c, ch.child_sock, ch.buf)
    try:
        yield parent, child
    finally:
        parent.close()
        child.close()


@pytest.fixture
def pair() -> Iterator[tuple[Endpoint, Endpoint]]:
    with endpoints() as eps:
        yield eps


def readable(sock: object) -> bool:
    ready, _, _ = select.select([sock], [], [], 0)
    return bool(ready)


def pump(producer: Endpoint, consumer: Endpoint, limit: int = 1_000_000) -> list[bytes]:
    """Alternate flush and recv until the producer has nothing queued and the ring is empty."""
    got: list[bytes] = []
    for _ in range(limit):
        done = producer.flush()
        got += consumer.recv()
        if done and not consumer.rx.readable():
            got += consumer.recv()
            return got
    raise AssertionError("pump made no progress")


# ---------------------------------------------------------------- basic frames


def test_round_trip(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    parent.send(b"hello")
    assert parent.flush() is True
    assert child.recv() == [b"hello"]
    assert child.recv() == []
    child.send(b"world")
    assert child.flush() is True
    assert parent.recv() == [b"world"]


def test_many_small_frames_in_order() -> None:
    with endpoints(4096) as (parent, child):
        frames = [f"frame-{i}".encode() for i in range(200)]
        for frame in frames:
            parent.send(frame)
        assert parent.flush() is True
        assert child.recv() == frames


def test_empty_frames(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    for body in (b"", b"x", b"", b""):
        parent.send(body)
    assert parent.flush() is True
    assert child.recv() == [b"", b"x", b"", b""]
    parent.send(b"")
    parent.flush()
    assert child.recv() == [b""]


def test_recv_on_empty_ring_returns_nothing(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    assert child.recv() == []
    assert parent.recv() == []
    assert parent.flush() is True  # nothing queued: nothing left


def test_partial_frame_is_held_until_complete(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    body = bytes(range(50))
    parent._out += b"\x32\x00\x00\x00" + body[:10]  # a frame whose body has not all arrived
    parent.flush()
    assert child.recv() == []
    parent._out += body[10:]
    parent.flush()
    assert child.recv() == [body]


# ------------------------------------------------------------------ wrap-around


def test_wraparound_over_many_cycles() -> None:
    cap = MIN_CAP
    rng = random.Random(1)
    with endpoints(cap) as (parent, child):
        total = 0
        for i in range(5000):
            body = rng.randbytes(rng.randrange(0, cap - 4 + 1))  # frame fits whole
            parent.send(body)
            assert parent.flush() is True
            assert child.recv() == [body], i
            total += 4 + len(body)
        ring = parent.tx
        assert ring._ctr[_HEAD] == ring._ctr[_TAIL] == total
        assert total > 1000 * cap  # counters far beyond capacity


def test_frames_straddle_the_end_of_the_data_area() -> None:
    cap = 100  # not a power of two: positions are head % capacity
    with endpoints(cap) as (parent, child):
        straddled = 0
        for i in range(3000):
            body = bytes([i % 251]) * (7 + i % 60)
            start = parent.tx._ctr[_HEAD] % cap
            if start + 4 + len(body) > cap:
                straddled += 1
            parent.send(body)
            assert parent.flush() is True
            assert child.recv() == [body]
        assert straddled > 100


def test_length_prefix_split_across_the_wrap(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    parent.send(b"a" * 58)  # 62 bytes: the next frame's 4-byte length straddles the end
    parent.flush()
    assert child.recv() == [b"a" * 58]
    parent.send(b"bcdefgh")
    assert parent.flush() is True
    assert child.recv() == [b"bcdefgh"]
    assert parent.tx._ctr[_HEAD] == 62 + 11


# -------------------------------------------------------------------- full ring


def test_full_ring_keeps_the_rest_queued() -> None:
    cap = MIN_CAP
    with endpoints(cap) as (parent, child):
        frames = [bytes([i]) * 20 for i in range(10)]  # 240 bytes of stream
        for frame in frames:
            parent.send(frame)
        assert parent.flush() is False
        assert parent.tx.used() == cap
        assert parent.pending_out == 240 - cap
        assert parent.flush() is False  # still full: nothing moves, nothing lost
        assert parent.pending_out == 240 - cap
        got = child.recv()
        assert got == frames[:2]  # 64 bytes = two whole 24-byte frames and a piece
        assert parent.tx.used() == 0
        got += pump(parent, child)
        assert got == frames
        assert parent.pending_out == 0


def test_full_ring_then_more_sends_stay_in_order() -> None:
    with endpoints(MIN_CAP) as (parent, child):
        got: list[bytes] = []
        expected: list[bytes] = []
        for i in range(300):
            body = f"{i:05d}".encode() * (i % 9)
            expected.append(body)
            parent.send(body)
            parent.flush()
            if i % 7 == 0:
                got += child.recv()
        got += pump(parent, child)
        assert got == expected


# ---------------------------------------------------------------- oversize frames


def test_oversize_frames_pass_in_pieces() -> None:
    cap = MIN_CAP
    rng = random.Random(7)
    with endpoints(cap) as (parent, child):
        frames = [rng.randbytes(5 * 1024) for _ in range(4)] + [rng.randbytes(100_000)]
        for frame in frames:
            parent.send(frame)
        got = pump(parent, child)
        assert got == frames
        assert parent.tx._ctr[_HEAD] == sum(4 + len(f) for f in frames)


def test_oversize_frame_both_directions_interleaved() -> None:
    with endpoints(MIN_CAP) as (parent, child):
        down, up = os.urandom(3000), os.urandom(4000)
        parent.send(down)
        child.send(up)
        got_down: list[bytes] = []
        got_up: list[bytes] = []
        for _ in range(10_000):
            parent.flush()
            child.flush()
            got_down += child.recv()
            got_up += parent.recv()
            if got_down and got_up:
                break
        assert got_down == [down]
        assert got_up == [up]


# ------------------------------------------------------------------ the doorbell


def test_flush_rings_a_sleeping_consumer_once(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    assert child.sleep_prepare() is True
    assert child.rx._ctr[_SLEEP] & 1
    assert not readable(child.sock)
    parent.send(b"one")
    parent.flush()
    assert readable(child.sock)
    parent.send(b"two")
    parent.flush()  # the consumer has not woken yet: no second ring
    assert child.sock.recv(100) == b"\x01"
    assert not readable(child.sock)
    child.sleep_done()
    assert not child.rx._ctr[_SLEEP] & 1
    assert child.recv() == [b"one", b"two"]

    # A new sleep is a new sequence number: it gets rung again.
    assert child.sleep_prepare() is True
    parent.send(b"three")
    parent.flush()
    assert child.sock.recv(100) == b"\x01"
    child.sleep_done()
    assert child.recv() == [b"three"]


def test_a_frame_that_fits_goes_into_the_ring_at_once_and_rings_at_flush(
    pair: tuple[Endpoint, Endpoint],
) -> None:
    parent, child = pair
    assert child.sleep_prepare() is True
    parent.send(b"direct")
    assert parent.pending_out == 0 and child.rx.readable() == 4 + len(b"direct")
    assert not readable(child.sock)  # the doorbell waits for the flush
    assert parent.flush() is True
    assert child.sock.recv(100) == b"\x01"
    parent.flush()  # nothing written since: no second ring
    assert not readable(child.sock)
    child.sleep_done()
    assert child.recv() == [b"direct"]


def test_small_frames_after_the_first_are_queued_until_flush() -> None:
    from procqueue.ring import DIRECT_FRAME

    big = b"b" * DIRECT_FRAME
    with endpoints(capacity=4 * DIRECT_FRAME) as (parent, child):
        parent.send(b"first")  # straight in
        parent.send(b"second")  # queued: copied in with the others at flush
        assert child.rx.readable() == 4 + 5 and parent.pending_out == 4 + 6
        parent.send(big)  # behind queued bytes: queued too, to keep the order
        assert parent.pending_out == 4 + 6 + 4 + DIRECT_FRAME
        assert pump(parent, child) == [b"first", b"second", big]
        parent.send(b"x")
        parent.send(big)  # large, nothing queued: straight in
        assert parent.pending_out == 0
        assert pump(parent, child) == [b"x", big]


def test_a_frame_behind_queued_bytes_waits_its_turn() -> None:
    with endpoints(capacity=64) as (parent, child):
        parent.send(b"a" * 70)  # larger than the ring: queued, goes in pieces
        parent.send(b"b")  # would fit, but must not overtake the queued frame
        assert parent.pending_out == 4 + 70 + 4 + 1 and not child.rx.readable()
        assert pump(parent, child) == [b"a" * 70, b"b"]


def test_no_ring_when_consumer_is_awake(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    for _ in range(5):
        parent.send(b"x")
        parent.flush()
    assert not readable(child.sock)
    assert child.recv() == [b"x"] * 5


def test_sleep_prepare_refuses_when_data_is_there(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    parent.send(b"ready")
    parent.flush()
    assert child.sleep_prepare() is False
    assert not child.rx._ctr[_SLEEP] & 1  # announcement taken back
    assert not readable(child.sock)
    assert child.recv() == [b"ready"]
    assert child.sleep_prepare() is True
    child.sleep_done()


def test_waiting_producer_is_rung_when_space_frees(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    parent.send(b"z" * 200)
    assert parent.flush() is False
    assert parent.sleep_prepare() is True  # full ring, nothing to read: may sleep
    assert parent.tx._ctr[_WAIT] & 1
    assert not readable(parent.sock)
    assert child.recv() == []  # consumer takes the first piece and frees space
    assert readable(parent.sock)
    assert parent.sock.recv(100) == b"\x01"
    parent.sleep_done()
    assert not parent.tx._ctr[_WAIT] & 1
    # Second round: a fresh wait gets a fresh ring.
    assert parent.flush() is False
    assert parent.sleep_prepare() is True
    assert child.recv() == []
    assert parent.sock.recv(100) == b"\x01"
    parent.sleep_done()
    assert pump(parent, child) == [b"z" * 200]


def test_producer_with_room_does_not_sleep(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    parent.send(b"q" * 200)
    parent.flush()
    child.recv()  # room again, but the producer has not flushed since
    assert parent.sleep_prepare() is False
    assert not parent.tx._ctr[_WAIT] & 1
    assert not parent.rx._ctr[_SLEEP] & 1


def test_wait_times_out_and_resets_sleep_state(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    start = time.monotonic()
    child.wait(0.05)
    assert time.monotonic() - start >= 0.04
    assert not child.rx._ctr[_SLEEP] & 1
    parent.send(b"go")
    parent.flush()
    assert not readable(child.sock)  # nobody asleep: no ring
    start = time.monotonic()
    child.wait(5)  # data is there: returns at once
    assert time.monotonic() - start < 1
    assert child.recv() == [b"go"]


def test_wait_drains_the_doorbell(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    assert child.sleep_prepare() is True
    parent.send(b"a")
    parent.flush()
    child.sleep_done()
    child.wait(5)  # data is there: sleep_prepare refuses, ring still pending
    child.drain_doorbell()
    assert not readable(child.sock)
    assert child.recv() == [b"a"]


def test_spin_sees_data_and_gives_up_when_there_is_none(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    start = time.perf_counter()
    assert child.spin(0.01) is False
    assert time.perf_counter() - start >= 0.01
    parent.send(b"spin")
    parent.flush()
    assert child.spin(5) is True
    assert child.recv() == [b"spin"]


def test_drain_doorbell_reads_everything(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    for _ in range(10_000):
        parent.ring()
    child.drain_doorbell()
    assert not readable(child.sock)
    child.drain_doorbell()  # nothing pending: returns


def test_drain_doorbell_raises_peer_gone(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    child.sock.close()
    with pytest.raises(PeerGone):
        parent.drain_doorbell()
    assert parent.closed
    assert isinstance(PeerGone(), EOFError)


def test_drain_doorbell_peer_gone_after_pending_rings(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    child.ring()
    child.sock.close()
    # The EOF stays readable: at the latest the next drain reports it.
    with pytest.raises(PeerGone):
        for _ in range(2):
            assert readable(parent.sock)
            parent.drain_doorbell()


def test_ring_to_a_dead_peer_marks_closed(pair: tuple[Endpoint, Endpoint]) -> None:
    parent, child = pair
    assert child.sleep_prepare() is True
    child.sock.close()
    parent.send(b"lost")
    parent.flush()  # rings: EPIPE is swallowed and recorded
    assert parent.closed


def test_send_rejects_frames_over_the_limit(
    pair: tuple[Endpoint, Endpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    import procqueue.ring as ring_module

    parent, _ = pair
    monkeypatch.setattr(ring_module, "MAX_FRAME", 10)
    with pytest.raises(ValueError, match="exceeds"):
        parent.send(b"x" * 11)
    parent.send(b"x" * 10)


# -------------------------------------------------------------------- counters


def test_counters_only_grow() -> None:
    cap = MIN_CAP
    rng = random.Random(3)
    with endpoints(cap) as (parent, child):
        ring = parent.tx
        assert ring._ctr.format == "Q"
        assert ring._ctr.itemsize == 8
        last_head = last_tail = 0
        sent: list[bytes] = []
        got: list[bytes] = []
        for _ in range(3000):
            if rng.random() < 0.5:
                body = rng.randbytes(rng.randrange(0, 3 * cap))
                sent.append(body)
                parent.send(body)
                parent.flush()
            else:
                got += child.recv()
            head, tail = ring._ctr[_HEAD], ring._ctr[_TAIL]
            assert head >= last_head
            assert tail >= last_tail
            assert 0 <= head - tail <= cap
            last_head, last_tail = head, tail
        got += pump(parent, child)
        assert got == sent
        assert ring._ctr[_HEAD] == ring._ctr[_TAIL] == sum(4 + len(b) for b in sent)


def _offset_in_cache_line(ring: Ring) -> int:
    probe = ctypes.c_char.from_buffer(ring._ctr)
    try:
        return ctypes.addressof(probe) % 64
    finally:
        del probe


def test_counters_are_cache_line_aligned_for_round_capacities() -> None:
    with endpoints(1 << 16) as (parent, _):
        assert _offset_in_cache_line(parent.tx) == 0
        assert _offset_in_cache_line(parent.rx) == 0


@pytest.mark.parametrize("capacity", [100, 4100, 4156])
def test_counters_are_aligned_for_any_capacity(capacity: int) -> None:
    with endpoints(capacity) as (parent, _):
        assert _offset_in_cache_line(parent.tx) == 0
        assert _offset_in_cache_line(parent.rx) == 0


def test_ring_write_and_read_directly() -> None:
    ch = Channel(MIN_CAP)
    ring = Ring(ch.buf, 0, MIN_CAP)
    try:
        assert ring.write(memoryview(b"a" * 100)) == MIN_CAP
        assert ring.write(memoryview(b"b")) == 0
        assert ring.readable() == ring.used() == MIN_CAP
        assert ring.read() == b"a" * MIN_CAP
        assert ring.read() == b""
        assert ring.write(memoryview(b"0123456789")) == 10
        assert ring.read() == b"0123456789"
    finally:
        ring.release()
        ch.parent_sock.close()
        ch.child_sock.close()
        ch.buf.close()


def test_channel_rejects_tiny_capacity() -> None:
    with pytest.raises(ValueError, match="at least 64"):
        Channel(63)


# ------------------------------------------------------------- property test


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.sampled_from([64, 100, 257]),
    data=st.data(),
)
def test_any_interleaving_delivers_frames_in_order(capacity: int, data: st.DataObject) -> None:
    frames = data.draw(
        st.lists(st.binary(min_size=0, max_size=3 * capacity), max_size=30), label="frames"
    )
    steps = data.draw(st.lists(st.sampled_from("sfr"), max_size=200), label="steps")
    with endpoints(capacity) as (producer, consumer):
        queued = iter(frames)
        got: list[bytes] = []
        for step in steps:
            if step == "s":
                body = next(queued, None)
                if body is not None:
                    producer.send(body)
            elif step == "f":
                producer.flush()
            else:
                got += consumer.recv()
            assert got == frames[: len(got)]
        for body in queued:
            producer.send(body)
        got += pump(producer, consumer)
        assert got == frames


# ---------------------------------------------------------------- real fork


def _echo_child(ep: Endpoint) -> int:
    """Echo every frame back until the parent goes away; return the exit code."""
    deadline = time.monotonic() + 55
    stalls = 0
    while time.monotonic() < deadline:
        frames = ep.recv()
        for frame in frames:
            ep.send(frame)
        if ep.pending_out:
            ep.flush()
        if frames:
            continue
        start = time.monotonic()
        try:
            ep.wait(5)
        except PeerGone:
            return min(stalls, 100)
        if time.monotonic() - start >= 4.5:
            stalls += 1  # a lost wake-up: nobody rang although there was work
    return 101


@pytest.mark.timeout(60)
def test_fork_echo_cross_process() -> None:
    cap = 64 * 1024
    rng = random.Random(11)
    frames = [rng.randbytes(rng.randrange(0, 300)) for _ in range(20_000)]
    frames.insert(10_000, rng.randbytes(16 << 20))
    frames.insert(500, rng.randbytes(3 * cap + 17))
    shm_before = set(os.listdir("/dev/shm"))

    ch = Channel(cap)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 102
        try:
            code = _echo_child(ch.child())
        finally:
            os._exit(code)

    ep = ch.parent()
    status = None
    try:
        for frame in frames:
            ep.send(frame)
        got: list[bytes] = []
        deadline = time.monotonic() + 50
        while len(got) < len(frames):
            assert time.monotonic() < deadline, f"only {len(got)} of {len(frames)} echoed"
            # Flush only with bytes queued: an idle flush would also ring a sleeping
            # child and hide a missing "room freed" ring.
            if ep.pending_out:
                ep.flush()
            received = ep.recv()
            if received:
                got += received
                continue
            start = time.monotonic()
            ep.wait(5)
            if time.monotonic() - start >= 4.5:
                pytest.fail(
                    f"lost wake-up: nothing for 5 s after {len(got)} of {len(frames)} frames "
                    f"({ep.pending_out} bytes still queued)"
                )
        assert len(got) == len(frames)
        bad = [i for i, (a, b) in enumerate(zip(got, frames, strict=True)) if a != b]
        assert not bad, f"{len(bad)} frames differ, first at index {bad[0]}"
    finally:
        ep.close()  # the child sees EOF (PeerGone) and exits
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0, "child stalled or hit its deadline"
    assert set(os.listdir("/dev/shm")) <= shm_before


# ------------------------------------------------------------ no /dev/shm


def test_channel_creates_no_dev_shm_file() -> None:
    before = set(os.listdir("/dev/shm"))
    with endpoints(1 << 16) as (parent, child):
        parent.send(b"x" * 1000)
        parent.flush()
        assert child.recv() == [b"x" * 1000]
        after = set(os.listdir("/dev/shm"))
        fds = os.listdir("/proc/self/fd")
        targets = []
        for fd in fds:
            with contextlib.suppress(OSError):
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
    assert after - before == set()
    assert not [t for t in targets if t.startswith("/dev/shm/")]
    assert "/dev/shm/" not in mapped


# ---------------------------------------------------------------- the supervisor's spin


def test_supervisor_spins_only_for_workers_on_short_tasks() -> None:
    """WorkerPool.spin polls the up ring of a worker whose last task was short,
    and leaves alone (the doorbell will wake the loop) one on long tasks."""
    from procqueue.pool import WorkerPool
    from procqueue.spawn import WorkerHandle
    from procqueue.task import QueueTask

    with endpoints() as (parent, child):
        handle = WorkerHandle(queue="q", index=0, pid=1, ep=parent)
        handle.inflight.append(QueueTask(queue="q", type="t", id="a"))
        pool = WorkerPool.__new__(WorkerPool)
        pool.by_pid = {1: handle}
        child.send(b"done")
        child.flush()
        handle.last_run = 5e-6
        assert pool.spin(50e-6) is True  # short tasks: the ring is polled
        handle.last_run = 0.010
        assert pool.spin(50e-6) is False  # a 10 ms task: not even polled once


def test_a_worker_polls_long_only_after_a_short_task() -> None:
    from procqueue.worker import LONG_TASK, SPIN_AFTER_LONG_TASK, SPIN_SECONDS, poll_seconds

    assert SPIN_SECONDS > SPIN_AFTER_LONG_TASK > 0
    assert poll_seconds(0.0) == poll_seconds(5e-6) == SPIN_SECONDS  # a client may follow up
    assert poll_seconds(LONG_TASK) == poll_seconds(0.010) == SPIN_AFTER_LONG_TASK
