"""Shared-memory SPSC rings and the per-worker ``Channel``.

A channel is one anonymous shared ``mmap`` holding two rings (down:
supervisor -> worker, up: worker -> supervisor) plus a socketpair used as the
doorbell and as the liveness signal (EOF = the peer died). The mmap is created
by the supervisor right before it forks the worker and is inherited across
the fork: no name, no ``/dev/shm`` entry, no resource tracker (whose Python
3.11 habit of unlinking segments when an attaching process exits is the trap
DESIGN.md warns about), nothing to leak when anyone is SIGKILLed.

Each ring carries a byte *stream* of length-prefixed frames, like a pipe. A
producer writes as many bytes as fit and keeps the rest in a local buffer
until the consumer frees space, so a frame larger than the ring (a 16 MiB
payload through a 1 MiB ring) goes through in pieces with no size deadlock.

Ring layout (HEADER bytes, each counter on its own 64-byte cache line, then
``capacity`` data bytes; all counters little-endian u64)::

    offset   0  head        bytes ever written       (stored by the producer only)
    offset  64  tail        bytes ever consumed      (stored by the consumer only)
    offset 128  sleep_seq   odd = consumer asleep on the doorbell (consumer only)
    offset 192  wait_seq    odd = producer has bytes that did not fit (producer only)
    offset 256  data[capacity], byte i of the stream at data[i % capacity]

Frame layout in the stream: ``u32 length (little-endian) | body``.

Memory ordering: counters are written with one aligned 8-byte store through a
``memoryview`` cast to ``'Q'`` (never ``struct.pack_into``, which zeroes its
destination first, so a reader could see a counter go to 0 or backwards).
On x86-64 stores are not reordered with other stores and loads not with
other loads, so a consumer that sees ``head`` advance also sees the data
before it. The one reordering x86-64 allows, a store followed by a load of
another location, matters for the sleep handshake ("I store that I sleep,
then check for data" against "I store data, then check whether you sleep"),
so both sides put a full barrier (``_fence``) between the two.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import select
import socket
import struct
import threading
import time

from .spinwait import poll_until

HEADER = 256
_HEAD, _TAIL, _SLEEP, _WAIT = 0, 8, 16, 24  # indexes into the header cast to 'Q'
_LEN = struct.Struct("<I")
MAX_FRAME = (1 << 32) - 1
DIRECT_FRAME = 1024  # frames this large go straight into the ring (Endpoint.send)

_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier.

    Acquiring an uncontended lock executes an atomic read-modify-write (a
    ``lock``-prefixed instruction on x86-64), which orders every earlier store
    before every later load.
    """
    _fence_lock.acquire()
    _fence_lock.release()


class PeerGone(EOFError):
    """The other end of a channel closed its doorbell: it exited or died."""


class Ring:
    """One single-producer/single-consumer byte ring inside a shared buffer."""

    __slots__ = ("_ctr", "_data", "capacity")

    def __init__(self, buf: mmap.mmap, offset: int, capacity: int) -> None:
        view = memoryview(buf)
        self._ctr = view[offset : offset + HEADER].cast("Q")
        self._data = view[offset + HEADER : offset + HEADER + capacity]
        self.capacity = capacity

    # -- producer side -------------------------------------------------
    def write(self, src: memoryview) -> int:
        """Copy as much of ``src`` as fits; return the number of bytes written."""
        ctr, cap = self._ctr, self.capacity
        head = ctr[_HEAD]
        n = min(cap - (head - ctr[_TAIL]), len(src))
        if n <= 0:
            return 0
        pos = head % cap
        first = min(n, cap - pos)
        self._data[pos : pos + first] = src[:first]
        if n > first:
            self._data[: n - first] = src[first:n]
        ctr[_HEAD] = head + n  # publish: one 8-byte store, after the data (x86-64 TSO)
        return n

    def write_frame(self, body: bytes) -> bool:
        """Put one whole ``u32 length | body`` frame in if it fits without
        wrapping; False (nothing written) otherwise."""
        ctr, cap, size = self._ctr, self.capacity, len(body)
        head = ctr[_HEAD]
        pos = head % cap
        if pos + 4 + size > cap or head + 4 + size - ctr[_TAIL] > cap:
            return False
        # The data area, not a counter: the consumer reads none of it until head moves.
        _LEN.pack_into(self._data, pos, size)
        self._data[pos + 4 : pos + 4 + size] = body
        ctr[_HEAD] = head + 4 + size  # publish: one 8-byte store, after the data
        return True

    # -- consumer side -------------------------------------------------
    def read(self) -> bytes:
        """Take every byte available now (possibly none)."""
        ctr, cap = self._ctr, self.capacity
        tail = ctr[_TAIL]
        n = ctr[_HEAD] - tail
        if not n:
            return b""
        pos = tail % cap
        first = min(n, cap - pos)
        if first == n:
            out = self._data[pos : pos + n].tobytes()
        else:
            out = self._data[pos:].tobytes() + self._data[: n - first].tobytes()
        ctr[_TAIL] = tail + n
        return out

    def readable(self) -> int:
        return self._ctr[_HEAD] - self._ctr[_TAIL]

    def used(self) -> int:
        return self.readable()

    def release(self) -> None:
        self._ctr.release()
        self._data.release()


class Endpoint:
    """One side of a channel: sends frames on ``tx``, receives them from ``rx``."""

    def __init__(self, tx: Ring, rx: Ring, sock: socket.socket, buf: mmap.mmap) -> None:
        self.tx, self.rx, self.sock = tx, rx, sock
        self._buf = buf
        self._out = bytearray()  # bytes not yet in the tx ring
        self._unflushed = False  # frames went into the ring since the last flush
        self._in = bytearray()  # bytes of an incomplete frame from the rx ring
        self._rung_sleep = 0  # the peer's sleep_seq we last rang for
        self._rung_wait = 0  # the peer's wait_seq we last rang for
        self.closed = False
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- sending ---------------------------------------------------------
    def send(self, body: bytes) -> None:
        """Send one frame. It goes into the ring now, if it fits whole and
        nothing is queued before it, when it is the first since the last
        ``flush`` (one frame a flush, the usual case, is then one copy) or
        large (a copy into the queue would cost more than a ring write);
        small frames after the first are queued and copied in by ``flush`` as
        one block, cheaper per frame than a ring write each. The peer is rung
        (if it sleeps) on the next ``flush`` either way."""
        if len(body) > MAX_FRAME:
            raise ValueError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
        if (
            not self._out
            and (not self._unflushed or len(body) >= DIRECT_FRAME)
            and self.tx.write_frame(body)
        ):
            self._unflushed = True
            return
        self._out += _LEN.pack(len(body))
        self._out += body

    def flush(self) -> bool:
        """Move queued bytes into the ring; ring the doorbell if the peer sleeps.

        Returns True when nothing is left queued. Never blocks: what does not
        fit stays queued; ``sleep_prepare`` asks the peer to ring when it has
        made room.
        """
        if self._out and self._write_out():
            self._unflushed = True
        if self._unflushed:
            # Only a flush after writes wakes the peer: its sleep_prepare re-checks
            # the ring after announcing, so earlier bytes cannot be missed.
            self._unflushed = False
            _fence()
            self._ring_if(self.tx._ctr[_SLEEP], "_rung_sleep")
        return not self._out

    def _write_out(self) -> int:
        with memoryview(self._out) as view:
            n = self.tx.write(view)
        if n:
            del self._out[:n]
        return n

    @property
    def pending_out(self) -> int:
        return len(self._out)

    def _ring_if(self, seq: int, attr: str) -> None:
        if seq & 1 and seq != getattr(self, attr):
            setattr(self, attr, seq)
            self.ring()

    def ring(self) -> None:
        try:
            self.sock.send(b"\x01")
        except BlockingIOError:
            pass  # the doorbell is full of unread rings: the peer will wake anyway
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                self.closed = True
            else:
                raise

    # -- receiving -------------------------------------------------------
    def recv(self) -> list[bytes]:
        """Every complete frame available now; also lets a waiting producer go on."""
        chunk = self.rx.read()
        if chunk:
            _fence()
            self._ring_if(self.rx._ctr[_WAIT], "_rung_wait")
        elif not self._in:
            return []
        if self._in:
            self._in += chunk
            data: bytes | bytearray = self._in
        else:
            data = chunk
        frames, used = _split_frames(data)
        if data is self._in:
            del self._in[:used]
        elif used < len(data):
            self._in += memoryview(data)[used:]
        return frames

    def drain_doorbell(self) -> None:
        """Read pending doorbell bytes; raise ``PeerGone`` at EOF."""
        while True:
            try:
                got = self.sock.recv(4096)
            except BlockingIOError:
                return
            except ConnectionResetError:
                got = b""
            if not got:
                self.closed = True
                raise PeerGone("channel peer closed its end")
            if len(got) < 4096:
                return

    # -- sleeping --------------------------------------------------------
    def sleep_prepare(self) -> bool:
        """Announce that we are about to block on the doorbell.

        Returns False (and takes the announcement back) when there is already
        something to do, so the caller must not block.
        """
        ctr = self.rx._ctr
        if not ctr[_SLEEP] & 1:
            ctr[_SLEEP] += 1
        if self._out:  # waiting for room too: a fresh odd wait_seq asks for one more ring
            wait = self.tx._ctr
            wait[_WAIT] += 2 if wait[_WAIT] & 1 else 1
        _fence()
        if self.rx.readable() or (self._out and self.tx.capacity > self.tx.used()):
            self.sleep_done()
            return False
        return True

    def sleep_done(self) -> None:
        for ctr, index in ((self.rx._ctr, _SLEEP), (self.tx._ctr, _WAIT)):
            if ctr[index] & 1:
                ctr[index] += 1

    def spin(self, seconds: float) -> bool:
        """Poll the rx ring for up to ``seconds``; True as soon as it has data.

        A frame arriving right after another then costs no system call.
        ``sched_yield`` in the loop hands the core to another runnable process
        (with more processes than cores, a bare spin would starve the very
        process we wait for) and costs little when there is none.
        """
        return bool(poll_until(self.rx.readable, time.perf_counter() + seconds))

    def wait(self, timeout: float | None) -> None:
        """Block until there is something to read (or room to write), or ``timeout``."""
        if not self.sleep_prepare():
            return
        try:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if ready:
                self.drain_doorbell()
        finally:
            self.sleep_done()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()
        self.tx.release()
        self.rx.release()
        with contextlib.suppress(BufferError):
            self._buf.close()


def _split_frames(data: bytes | bytearray) -> tuple[list[bytes], int]:
    """Cut complete ``u32 length | body`` frames off the front of ``data``."""
    frames: list[bytes] = []
    pos, end = 0, len(data)
    unpack = _LEN.unpack_from
    while end - pos >= 4:
        (size,) = unpack(data, pos)
        if end - pos - 4 < size:
            break
        frames.append(bytes(data[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return frames, pos


class Channel:
    """Two rings and a doorbell, created by the supervisor before a fork."""

    def __init__(self, capacity: int = 1 << 20) -> None:
        if capacity < 64:
            raise ValueError("ring capacity must be at least 64 bytes")
        self.capacity = capacity
        # The up ring starts on a 64-byte boundary so that its counters, like the
        # down ring's, are aligned 8-byte stores on their own cache lines.
        stride = HEADER + (capacity + 63) // 64 * 64
        size = stride + HEADER + capacity
        # -1: anonymous; MAP_SHARED so parent and forked child see the same pages.
        self.buf = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.parent_sock, self.child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._down = (0, capacity)
        self._up = (stride, capacity)

    def parent(self) -> Endpoint:
        """The supervisor's end (call in the parent after the fork)."""
        self.child_sock.close()
        return Endpoint(self._ring(self._down), self._ring(self._up), self.parent_sock, self.buf)

    def child(self) -> Endpoint:
        """The worker's end (call in the child after the fork)."""
        self.parent_sock.close()
        return Endpoint(self._ring(self._up), self._ring(self._down), self.child_sock, self.buf)

    def _ring(self, where: tuple[int, int]) -> Ring:
        return Ring(self.buf, where[0], where[1])
