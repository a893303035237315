"""Section 6: one-way frames between two forked processes, no task machinery.

The parent produces N frames of one size, a child forked beforehand consumes
them; a run is timed from the first frame sent until the child reports (on a
pipe) that it has received every one, and the child checks the byte count.
The child is forked and has signalled that it is ready before the clock
starts. Systems, interleaved:

* ``procqueue.ring.Channel`` (1 MiB rings): ``send`` per frame and ``flush``
  after every frame or every 64 frames; when the ring is full the producer
  waits on ``Endpoint.wait`` (``sleep_prepare`` announces it, the consumer's
  ``recv`` rings it). The consumer ``recv``s and, with nothing there,
  ``wait``s with the worker's 50 µs spin, as a procqueue worker does.
* ``os.pipe``: 64 length-prefixed frames per ``write``; the reader splits
  frames out of 64 KiB reads (the same work the ring's ``recv`` does).
* ``multiprocessing.Pipe``: ``send_bytes`` / ``recv_bytes`` per frame.
* ``multiprocessing.Queue``: ``put`` / ``get`` per frame (pickled, fed by a
  background thread).

100-byte frames through all of them; 4 KiB frames through the ring and the
pipe.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Callable
from typing import Any

from procqueue.ring import Channel

from .daemons import CTX
from .stats import interleaved, median_ratio, ratio_text, summary

SMALL, LARGE = 100, 4096
BATCH = 64
RING_CAPACITY = 1 << 20
SPIN = 50e-6  # procqueue.worker.SPIN_SECONDS
STALL = 0.9  # a wait this long (timeout 1 s) means nobody rang: a lost wake-up
LEN = struct.Struct("<I")

Produce = Callable[[], None]
Consume = Callable[[], tuple[int, int]]  # (payload bytes received, lost wake-ups)


class Stalls:
    """Waits in the ring that ran to their timeout (a lost wake-up), across runs."""

    count = 0


def fork_transfer(consume: Consume, produce: Produce, expected: int) -> float:
    """Seconds from the first frame produced until the forked consumer has them all."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the consumer
        code = 1
        try:
            os.close(ready_r)
            os.write(ready_w, b"r")
            got, stalls = consume()
            os.write(ready_w, bytes((min(stalls, 255),)))
            code = 0 if got == expected else 2
        finally:
            os._exit(code)
    os.close(ready_w)
    try:
        if os.read(ready_r, 1) != b"r":
            raise RuntimeError("transport consumer died before it was ready")
        start = time.perf_counter()
        produce()
        done = os.read(ready_r, 1)
        elapsed = time.perf_counter() - start
    except BaseException:
        os.kill(pid, signal.SIGKILL)  # it would wait for frames forever
        raise
    finally:
        os.close(ready_r)
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if len(done) != 1 or code != 0:
        raise RuntimeError(f"transport consumer exited {code} (2: wrong byte count)")
    Stalls.count += done[0]
    return elapsed


# ------------------------------------------------------------------ ring


def ring(n: int, size: int, batch: int) -> float:
    """``n`` frames through a ``procqueue.ring.Channel``, flushing every ``batch``."""
    channel = Channel(RING_CAPACITY)
    frame = b"r" * size
    ends = []

    def consume() -> tuple[int, int]:
        ep = channel.child()
        got = frames = stalls = 0
        while frames < n:
            received = ep.recv()
            if received:
                frames += len(received)
                got += sum(map(len, received))
                continue
            if ep.spin(SPIN):
                continue
            start = time.monotonic()
            ep.wait(1.0)
            stalls += time.monotonic() - start >= STALL
        return got, stalls

    def produce() -> None:
        ep = channel.parent()
        ends.append(ep)
        for i in range(1, n + 1):
            ep.send(frame)
            if i % batch == 0 or i == n:
                while not ep.flush():  # ring full: sleep until the consumer makes room
                    start = time.monotonic()
                    ep.wait(1.0)
                    Stalls.count += time.monotonic() - start >= STALL

    try:
        return fork_transfer(consume, produce, n * size)
    finally:
        for ep in ends:  # closed once the consumer is done: its EOF means "peer gone"
            ep.close()


# ------------------------------------------------------------------ baselines


def split_frames(data: bytearray) -> list[bytes]:
    """Cut complete ``u32 length | body`` frames off the front of ``data`` (in place)."""
    frames: list[bytes] = []
    pos, end = 0, len(data)
    while end - pos >= 4:
        (length,) = LEN.unpack_from(data, pos)
        if end - pos - 4 < length:
            break
        frames.append(bytes(data[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    del data[:pos]
    return frames


def pipe(n: int, size: int, batch: int) -> float:
    """``n`` frames through ``os.pipe``, ``batch`` length-prefixed frames per write."""
    read_fd, write_fd = os.pipe()
    chunk = (LEN.pack(size) + b"p" * size) * batch

    def consume() -> tuple[int, int]:
        os.close(write_fd)
        pending, got, frames = bytearray(), 0, 0
        while frames < n:
            data = os.read(read_fd, 1 << 16)
            if not data:
                break
            pending += data
            received = split_frames(pending)
            frames += len(received)
            got += sum(map(len, received))
        return got, 0

    def produce() -> None:
        os.close(read_fd)
        try:
            for first in range(0, n, batch):
                count = min(batch, n - first)
                view = memoryview(chunk)[: count * (4 + size)]
                while view:
                    view = view[os.write(write_fd, view) :]
        finally:
            os.close(write_fd)

    return fork_transfer(consume, produce, n * size)


def mp_pipe(n: int, size: int) -> float:
    """``n`` frames through ``multiprocessing.Pipe``: ``send_bytes`` per frame."""
    reader, writer = CTX.Pipe(duplex=False)
    frame = b"m" * size

    def consume() -> tuple[int, int]:
        writer.close()
        return sum(len(reader.recv_bytes()) for _ in range(n)), 0

    def produce() -> None:
        reader.close()
        try:
            for _ in range(n):
                writer.send_bytes(frame)
        finally:
            writer.close()

    return fork_transfer(consume, produce, n * size)


def mp_queue(n: int, size: int) -> float:
    """``n`` frames through ``multiprocessing.Queue``: ``put`` per frame."""
    queue: Any = CTX.Queue()
    frame = b"q" * size

    def consume() -> tuple[int, int]:
        return sum(len(queue.get()) for _ in range(n)), 0

    def produce() -> None:
        for _ in range(n):
            queue.put(frame)
        queue.close()
        queue.join_thread()

    return fork_transfer(consume, produce, n * size)


# ------------------------------------------------------------------ the section


def name(system: str, size: int) -> str:
    return f"{size:,} B  {system}"


RING_1 = "procqueue.ring.Channel, flush/frame"
RING_B = f"procqueue.ring.Channel, flush/{BATCH} frames"
PIPE = f"os.pipe, {BATCH} frames/write"
MP_PIPE = "multiprocessing.Pipe, send_bytes/frame"
MP_QUEUE = "multiprocessing.Queue, put/frame"


def run_transport(frames: int, repeat: int) -> dict[str, Any]:
    large = max(1, frames // 4)
    plan: dict[str, tuple[int, Callable[[], float]]] = {
        name(RING_1, SMALL): (frames, lambda: ring(frames, SMALL, 1)),
        name(RING_B, SMALL): (frames, lambda: ring(frames, SMALL, BATCH)),
        name(PIPE, SMALL): (frames, lambda: pipe(frames, SMALL, BATCH)),
        name(MP_PIPE, SMALL): (frames, lambda: mp_pipe(frames, SMALL)),
        name(MP_QUEUE, SMALL): (frames, lambda: mp_queue(frames, SMALL)),
        name(RING_1, LARGE): (large, lambda: ring(large, LARGE, 1)),
        name(RING_B, LARGE): (large, lambda: ring(large, LARGE, BATCH)),
        name(PIPE, LARGE): (large, lambda: pipe(large, LARGE, BATCH)),
    }
    ring(min(frames, 1000), SMALL, 1)  # warm-up: page the code in
    Stalls.count = 0
    counts = {system: count for system, (count, _) in plan.items()}
    runs = {system: run for system, (_, run) in plan.items()}
    rates = interleaved("transport", runs, counts, repeat, unit="frames")
    result = {system: summary(r, "frames") for system, r in rates.items()}
    for system, info in result.items():
        size = LARGE if system.startswith(f"{LARGE:,} B") else SMALL
        info["frame_bytes"] = size
        info["median_mib_per_s"] = info["median_frames_per_s"] * size / (1 << 20)
    pairs = [
        (name(RING_1, SMALL), name(MP_PIPE, SMALL)),
        (name(RING_1, SMALL), name(MP_QUEUE, SMALL)),
        (name(RING_B, SMALL), name(PIPE, SMALL)),
        (name(RING_1, LARGE), name(PIPE, LARGE)),
        (name(RING_B, LARGE), name(PIPE, LARGE)),
    ]
    return {
        "frames": frames,
        "large_frames": large,
        "ring_capacity": RING_CAPACITY,
        "ring_stalls": Stalls.count,
        "systems": result,
        "ratios": {f"{a} / {b}": median_ratio(result, a, b, "frames") for a, b in pairs},
    }


def transport_table(title: str, section: dict[str, Any]) -> list[str]:
    lines = [
        title,
        f"  {'system':<48}{'median/s':>12}{'min/s':>12}{'max/s':>12}{'MiB/s':>9}",
    ]
    for system, info in section["systems"].items():
        lines.append(
            f"  {system:<48}{info['median_frames_per_s']:>12,.0f}"
            f"{info['min_frames_per_s']:>12,.0f}{info['max_frames_per_s']:>12,.0f}"
            f"{info['median_mib_per_s']:>9,.0f}"
        )
    if section["ring_stalls"]:
        lines.append(f"  WARNING: {section['ring_stalls']} ring wait(s) hit the 1 s timeout")
    lines += ["  ratios of medians:"]
    lines += [f"    {k}: {ratio_text(v)}" for k, v in section["ratios"].items()]
    return lines
