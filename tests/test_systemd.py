"""sd_notify against a real AF_UNIX datagram socket standing in for systemd, and the unit file."""

from __future__ import annotations

import configparser
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from procqueue.config import config_from_dict
from procqueue.systemd import Notifier, journal_stream_attached

UNIT = Path(__file__).resolve().parent.parent / "conf" / "procqueue.service"


class FakeSystemd:
    """The receiving end of ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(5)

    def recv(self) -> str:
        return self.sock.recv(4096).decode()

    def pending(self) -> list[str]:
        """Every datagram queued right now, without waiting."""
        self.sock.setblocking(False)
        try:
            messages = []
            while True:
                try:
                    messages.append(self.sock.recv(4096).decode())
                except BlockingIOError:
                    return messages
        finally:
            self.sock.settimeout(5)

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            Path(self.address).unlink(missing_ok=True)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # tmp_path can exceed AF_UNIX's 107-byte limit; the default temp dir is short.
    path = Path(tempfile.mkdtemp(prefix="pq-sd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def systemd(short_dir: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(short_dir / "notify"))
    yield fake
    fake.close()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd(f"@pq-test-{secrets.token_hex(8)}")
    yield fake
    fake.close()


def check_messages(notifier: Notifier, fake: FakeSystemd) -> None:
    assert notifier.enabled
    notifier.ready("2 queues, 3 workers")
    assert fake.recv() == f"READY=1\nSTATUS=2 queues, 3 workers\nMAINPID={os.getpid()}"

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = fake.recv().split("\n")
    assert lines[0] == "RELOADING=1"
    match = re.fullmatch(r"MONOTONIC_USEC=(\d+)", lines[1])
    assert match is not None and before <= int(match.group(1)) <= after
    assert len(lines) == 2

    notifier.stopping()
    assert fake.recv() == "STOPPING=1"
    notifier.stopping("draining 4 tasks")
    assert fake.recv() == "STOPPING=1\nSTATUS=draining 4 tasks"
    notifier.status("two\nlines")
    assert fake.recv() == "STATUS=two lines"
    notifier.watchdog(now=100.0)
    assert fake.recv() == "WATCHDOG=1"
    notifier.close()


def test_messages_to_a_path_socket(systemd: FakeSystemd) -> None:
    env = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "30000000"}
    check_messages(Notifier.from_env(env), systemd)


def test_messages_to_an_abstract_socket(abstract_systemd: FakeSystemd) -> None:
    env = {
        "NOTIFY_SOCKET": abstract_systemd.address,
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    check_messages(Notifier.from_env(env), abstract_systemd)


def test_ready_without_status(systemd: FakeSystemd) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": systemd.address})
    notifier.ready()
    assert systemd.recv() == f"READY=1\nMAINPID={os.getpid()}"
    notifier.close()


def test_watchdog_interval_is_half_and_drives_the_timer(systemd: FakeSystemd) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "30000000"})
    assert notifier.watchdog_interval == 15.0
    assert notifier.next_watchdog(50.0) == 50.0  # never pinged: due now
    assert notifier.watchdog_due(50.0)
    notifier.watchdog(now=50.0)
    assert systemd.recv() == "WATCHDOG=1"
    assert notifier.next_watchdog(51.0) == 65.0
    assert not notifier.watchdog_due(64.9)
    assert notifier.watchdog_due(65.0)
    notifier.close()


def test_watchdog_pid_of_another_process_disables_the_watchdog(systemd: FakeSystemd) -> None:
    env = {
        "NOTIFY_SOCKET": systemd.address,
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    notifier = Notifier.from_env(env)
    assert notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.next_watchdog(10.0) is None
    assert not notifier.watchdog_due(10.0)
    notifier.watchdog(now=10.0)
    notifier.status("still here")
    assert systemd.recv() == "STATUS=still here"  # and no WATCHDOG=1 before it
    notifier.close()


@pytest.mark.parametrize("usec", ["", "0", "-5", "abc", "\u0661\u0660"])
def test_bad_watchdog_usec_means_no_watchdog(systemd: FakeSystemd, usec: str) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": usec})
    assert notifier.enabled
    assert notifier.watchdog_interval is None


@pytest.mark.parametrize(
    "env",
    [{}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "30000000"}, {"NOTIFY_SOCKET": "relative"}],
)
def test_disabled_notifier_is_a_no_op(env: dict[str, str]) -> None:
    notifier = Notifier.from_env(env)
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.next_watchdog(1.0) is None
    assert not notifier.watchdog_due(1.0)
    notifier.ready("up")
    notifier.reloading()
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()


def test_vanished_socket_does_not_raise_and_warns_once(
    systemd: FakeSystemd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="procqueue.systemd")
    notifier = Notifier.from_env({"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "1000000"})
    notifier.ready()
    systemd.recv()
    systemd.close()  # systemd went away: the peer is closed and its path unlinked

    notifier.status("lost")  # ECONNREFUSED on the connected socket
    notifier.watchdog(now=7.0)  # ENOENT on reconnect
    notifier.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert systemd.address in warnings[0].getMessage()
    # The failed ping still moves the timer on: no busy loop on a dead socket.
    assert notifier.next_watchdog(7.0) == 7.5

    back = FakeSystemd(systemd.address)  # systemd is back at the same path
    try:
        notifier.status("again")
        assert back.recv() == "STATUS=again"
        assert "reachable again" in caplog.text
    finally:
        back.close()
        notifier.close()


def test_socket_that_never_existed(short_dir: Path) -> None:
    for address in (str(short_dir / "missing"), f"@pq-test-{secrets.token_hex(8)}"):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
        notifier.ready("up")
        notifier.stopping()
        notifier.close()


def test_full_queue_drops_messages_but_keeps_the_socket(
    systemd: FakeSystemd, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": systemd.address})
    for _ in range(5000):  # well past net.unix.max_dgram_qlen; systemd is not reading
        notifier.status("flood")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert systemd.pending()
    notifier.status("after")
    assert systemd.recv() == "STATUS=after"
    notifier.close()


def test_no_messages_from_a_forked_child(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "1000000"})
    parent = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: parent + 1)
    notifier.watchdog(now=1.0)
    notifier.ready()
    monkeypatch.undo()
    notifier.status("parent")
    assert systemd.recv() == "STATUS=parent"
    notifier.close()


def test_journal_stream_attached(short_dir: Path) -> None:
    with open(short_dir / "stream", "wb") as stream:
        st = os.fstat(stream.fileno())
        fd = stream.fileno()
        assert journal_stream_attached({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd)
        assert not journal_stream_attached({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fd)
        assert not journal_stream_attached({}, fd)
        for garbage in ("", "12", "a:b", ":", f"{st.st_dev}:"):
            assert not journal_stream_attached({"JOURNAL_STREAM": garbage}, fd)
    assert not journal_stream_attached({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd)
    err = os.fstat(2)
    assert journal_stream_attached({"JOURNAL_STREAM": f"{err.st_dev}:{err.st_ino}"})


# ----------------------------------------------------------------- unit file


def load_unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT, encoding="utf-8")
    return parser


def test_unit_has_the_required_settings() -> None:
    unit = load_unit()
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"].split()[1:] == ["run", "/etc/procqueue/app.toml"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    defaults = config_from_dict({"queues": {"q": {}}}, "/etc/procqueue/app.toml").settings
    shutdown_default = defaults.shutdown_timeout
    assert float(service["TimeoutStopSec"]) > shutdown_default == 30.0
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert service["RuntimeDirectory"] == "procqueue"
    assert service["StateDirectory"] == "procqueue"
    assert service["User"] == service["Group"] == "procqueue"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert service[key] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert "MemoryDenyWriteExecute" not in service
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def verify(unit_dir: Path, name: str, text: str) -> subprocess.CompletedProcess[str]:
    path = unit_dir / name
    path.write_text(text, encoding="utf-8")
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    return subprocess.run(
        [analyze, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(short_dir: Path) -> None:
    # verify rejects an ExecStart= binary that does not exist here; point it at Python.
    exec_start = f"ExecStart={sys.executable} -m procqueue.cli run /etc/procqueue/app.toml"
    text = re.sub(r"(?m)^ExecStart=.*$", lambda _: exec_start, UNIT.read_text(encoding="utf-8"))
    result = verify(short_dir, "procqueue.service", text)
    about_unit = [
        line for line in (result.stdout + result.stderr).splitlines() if "procqueue" in line
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert about_unit == []

    # The check can fail: a typo is reported (verify still exits 0 for it).
    broken = verify(short_dir, "broken.service", text.replace("KillMode=mixed", "KillMode=mixd"))
    assert "broken.service" in broken.stdout + broken.stderr
