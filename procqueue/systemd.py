"""systemd integration without libsystemd: ``sd_notify`` and journald detection.

The notify protocol is one ``AF_UNIX``/``SOCK_DGRAM`` datagram per message,
sent to the socket named by ``$NOTIFY_SOCKET``, holding newline-separated
``KEY=value`` assignments (see ``sd_notify(3)``)::

    READY=1\\nSTATUS=2 queues, 5 workers\\nMAINPID=4242

``$NOTIFY_SOCKET`` is a filesystem path (``/run/systemd/notify``) or, when it
starts with ``@``, a Linux abstract socket whose name starts with a NUL byte.
Other forms (``vsock:`` of newer systemd) are not supported: the notifier logs
a warning and stays disabled.

How the supervisor uses a :class:`Notifier` (DESIGN.md, Signals):

* ``ready()`` once workers are up, and again when a reload has finished
  (systemd leaves the "reloading" state on the next ``READY=1``);
* ``reloading()`` on SIGHUP, ``stopping()`` on SIGTERM/SIGINT/SIGQUIT;
* ``watchdog(now)`` from its loop whenever ``watchdog_due(now)``, with
  ``next_watchdog(now)`` folded into the selector timeout. Pinging from the
  loop (never from a thread) is the point: a wedged loop stops the pings and
  systemd restarts the service.

Sends never raise: the daemon must not die because systemd went away. The
first failure is logged as a warning, later ones at debug level until a send
succeeds again. A send from any process other than the one that built the
notifier is a no-op, so a forked worker cannot ping the supervisor's
watchdog; workers should still ``close()`` the inherited socket
(``fork_worker``'s ``close_in_child``).

The environment is left as it is (``sd_notify``'s ``unset_environment`` is
not wanted): workers inherit ``NOTIFY_SOCKET`` but a message from their pids
is rejected under ``NotifyAccess=main``, and ``WATCHDOG_PID`` keeps a child
that builds its own notifier from pinging.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "journal_stream_attached"]

log = logging.getLogger("procqueue.systemd")


class Notifier:
    """Speaks ``sd_notify`` to systemd; every method is a no-op when disabled."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        """``address`` as in ``$NOTIFY_SOCKET`` (None: disabled); ``watchdog_usec`` > 0 or None."""
        self.address = address
        self.enabled = address is not None
        self.watchdog_interval: float | None = None
        if self.enabled and watchdog_usec is not None and watchdog_usec > 0:
            # systemd's advice: ping at half the timeout (sd_watchdog_enabled(3)).
            self.watchdog_interval = watchdog_usec / 2 / 1e6
        self._pid = os.getpid()
        self._sock: socket.socket | None = None
        self._failing = False
        self._last_ping: float | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Build from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        Disabled when ``NOTIFY_SOCKET`` is unset, empty or not a path/``@name``.
        The watchdog is on only when ``WATCHDOG_USEC`` is a positive integer and
        ``WATCHDOG_PID`` is unset or this process's pid.
        """
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning(
                "NOTIFY_SOCKET=%r is neither an absolute path nor an @abstract name; "
                "not notifying systemd",
                address,
            )
            address = None
        return cls(address, _watchdog_usec(environ))

    # ------------------------------------------------------------ messages

    def ready(self, status: str = "") -> None:
        """``READY=1``: startup (or a reload) is complete."""
        self._send("READY=1", *_status(status), f"MAINPID={os.getpid()}")

    def reloading(self, status: str = "") -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (required by systemd >= 253).

        Send :meth:`ready` when the reload is done.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str = "") -> None:
        """``STOPPING=1``: a stop has begun."""
        self._send("STOPPING=1", *_status(status))

    def status(self, text: str) -> None:
        """``STATUS=``: one free-form line shown by ``systemctl status``."""
        self._send(*_status(text))

    # ------------------------------------------------------------ watchdog

    def watchdog(self, now: float | None = None) -> None:
        """``WATCHDOG=1``; ``now`` is the loop's ``time.monotonic()``.

        The ping counts as done even if the send fails, so a vanished socket
        cannot turn the loop's timer into a busy loop.
        """
        if self.watchdog_interval is None:
            return
        self._last_ping = time.monotonic() if now is None else now
        self._send("WATCHDOG=1")

    def next_watchdog(self, now: float) -> float | None:
        """Monotonic time the next ping is due (``now`` before the first); None: no watchdog."""
        if self.watchdog_interval is None:
            return None
        if self._last_ping is None:
            return now
        return self._last_ping + self.watchdog_interval

    def watchdog_due(self, now: float) -> bool:
        due = self.next_watchdog(now)
        return due is not None and now >= due

    # ---------------------------------------------------------------- socket

    def close(self) -> None:
        """Close the socket; a later send reconnects (use it after fork in the child)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, *lines: str) -> None:
        if not self.enabled or not lines or os.getpid() != self._pid:
            return
        message = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = self._connect()
            self._sock.send(message)
        except OSError as exc:
            # ECONNREFUSED/ENOENT: systemd's socket went away; reconnect next time.
            # EAGAIN: its queue is full; this message is dropped.
            if exc.errno != errno.EAGAIN:
                self.close()
            self._report(exc, lines[0])
            return
        if self._failing:
            log.info("systemd notify socket %s is reachable again", self.address)
            self._failing = False

    def _connect(self) -> socket.socket:
        assert self.address is not None
        # "@name" is an abstract socket: its address starts with a NUL byte.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(target)
        except OSError:
            sock.close()
            raise
        return sock

    def _report(self, exc: OSError, first_line: str) -> None:
        if self._failing:
            log.debug("systemd notify %s not sent: %s", first_line, exc)
            return
        self._failing = True
        log.warning(
            "cannot notify systemd at %s (%s); carrying on, %s and later messages may be lost",
            self.address,
            exc,
            first_line,
        )


def _status(text: str) -> tuple[str, ...]:
    """``STATUS=`` as one line (newlines would start a new assignment), or nothing."""
    line = " ".join(text.split())
    return (f"STATUS={line}",) if line else ()


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """``WATCHDOG_USEC`` if it is meant for this process, else None."""
    usec = _positive_int(environ.get("WATCHDOG_USEC"))
    if usec is None:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and _positive_int(pid) != os.getpid():
        return None
    return usec


def _positive_int(text: str | None) -> int | None:
    if text is None or not _is_decimal(text):
        return None
    value = int(text)
    return value if value > 0 else None


def _is_decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()


def journal_stream_attached(environ: Mapping[str, str] = os.environ, fd: int = 2) -> bool:
    """True when ``fd`` (stderr) is the journald stream named by ``$JOURNAL_STREAM``.

    systemd sets ``JOURNAL_STREAM=<st_dev>:<st_ino>`` of the stream it connects
    to stdout/stderr; comparing with ``fstat(fd)`` tells whether stderr still
    goes there (not redirected), so log lines can drop their own timestamps.
    """
    value = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not _is_decimal(dev) or not _is_decimal(ino):
        return False
    try:
        stat = os.fstat(fd)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) == (int(dev), int(ino))
