"""sd_notify client against real AF_UNIX datagram sockets standing in for systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ops import sdnotify

# sun_path holds 108 bytes with the NUL; pytest's tmp_path is usually far shorter.
SUN_PATH_MAX = 107


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: a bound datagram socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env = {sdnotify.NOTIFY_SOCKET_ENV: env_value}

    def receive(self, timeout: float = 5.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def pending(self) -> list[str]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.fixture(autouse=True)
def _fresh_outage_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no notify outage remembered from an earlier one."""
    monkeypatch.setattr(sdnotify, "_last_send_failed", False)


@pytest.fixture
def fs_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    """A notify socket on the filesystem, in tmp_path (or a short /tmp dir if that is too long)."""
    directory, cleanup = tmp_path, None
    if len(str(tmp_path / "notify")) > SUN_PATH_MAX:
        directory = Path(tempfile.mkdtemp(prefix="sdn-"))
        cleanup = directory
    path = str(directory / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield FakeSystemd(sock, path)
    finally:
        sock.close()
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    """A notify socket in the abstract namespace (what systemd itself uses in containers)."""
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    try:
        yield FakeSystemd(sock, "@" + name)
    finally:
        sock.close()


def test_ready_reaches_a_filesystem_socket(fs_systemd: FakeSystemd) -> None:
    """READY=1 is delivered as one datagram to the path in $NOTIFY_SOCKET."""
    assert sdnotify.ready(env=fs_systemd.env) is True
    assert fs_systemd.receive() == "READY=1"


def test_each_state_is_sent_verbatim(fs_systemd: FakeSystemd) -> None:
    """WATCHDOG=1, STOPPING=1, STATUS=... and a raw notify() arrive exactly as systemd expects."""
    assert sdnotify.watchdog(env=fs_systemd.env)
    assert sdnotify.stopping(env=fs_systemd.env)
    assert sdnotify.status("draining 12 events", env=fs_systemd.env)
    assert sdnotify.notify("RELOADING=1", env=fs_systemd.env)
    got = [fs_systemd.receive() for _ in range(4)]
    assert got == ["WATCHDOG=1", "STOPPING=1", "STATUS=draining 12 events", "RELOADING=1"]


def test_ready_with_status_is_one_datagram(fs_systemd: FakeSystemd) -> None:
    """ready(status) sends READY=1 and STATUS= together, newline-separated, in one message."""
    sdnotify.ready("listening on 127.0.0.1:8787", env=fs_systemd.env)
    assert fs_systemd.receive() == "READY=1\nSTATUS=listening on 127.0.0.1:8787"


def test_status_cannot_smuggle_another_assignment(fs_systemd: FakeSystemd) -> None:
    """A newline in status text (say, from a device name) does not become a second assignment."""
    sdnotify.status("scanner x\nREADY=1", env=fs_systemd.env)
    msg = fs_systemd.receive()
    assert "\n" not in msg
    assert msg == "STATUS=scanner x READY=1"


def test_abstract_namespace_socket(abstract_systemd: FakeSystemd) -> None:
    """A $NOTIFY_SOCKET starting with '@' is an abstract-namespace address."""
    assert sdnotify.ready(env=abstract_systemd.env) is True
    assert abstract_systemd.receive() == "READY=1"


def test_no_socket_is_a_quiet_noop(monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    """Outside systemd every call returns False, raises nothing and logs nothing."""
    monkeypatch.delenv(sdnotify.NOTIFY_SOCKET_ENV, raising=False)
    with caplog.at_level(logging.DEBUG, logger="agent.ops.sdnotify"):
        assert sdnotify.ready() is False
        assert sdnotify.watchdog() is False
        assert sdnotify.stopping() is False
        assert sdnotify.notify("READY=1", env={sdnotify.NOTIFY_SOCKET_ENV: ""}) is False
    assert caplog.records == []


def test_reads_os_environ_by_default(fs_systemd: FakeSystemd,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit env, $NOTIFY_SOCKET comes from the process environment."""
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET_ENV, fs_systemd.env[sdnotify.NOTIFY_SOCKET_ENV])
    assert sdnotify.stopping() is True
    assert fs_systemd.receive() == "STOPPING=1"


def test_dead_socket_fails_softly_and_logs_once(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A vanished notify socket gives False and one WARNING per outage, not one per ping."""
    env = {sdnotify.NOTIFY_SOCKET_ENV: str(tmp_path / "gone")}
    with caplog.at_level(logging.WARNING, logger="agent.ops.sdnotify"):
        assert sdnotify.watchdog(env=env) is False
        assert sdnotify.watchdog(env=env) is False
        assert sdnotify.watchdog(env=env) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "gone" in warnings[0].getMessage()


def test_recovery_after_an_outage_is_logged(fs_systemd: FakeSystemd, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """After a failed send, the next successful one logs that systemd is reachable again."""
    with caplog.at_level(logging.INFO, logger="agent.ops.sdnotify"):
        assert sdnotify.watchdog(env={sdnotify.NOTIFY_SOCKET_ENV: str(tmp_path / "gone")}) is False
        assert sdnotify.watchdog(env=fs_systemd.env) is True
    assert "reachable again" in caplog.text
    assert fs_systemd.receive() == "WATCHDOG=1"


def test_unsupported_address_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """A relative path or a vsock address is not sent to, and says so."""
    with caplog.at_level(logging.WARNING, logger="agent.ops.sdnotify"):
        assert sdnotify.ready(env={sdnotify.NOTIFY_SOCKET_ENV: "vsock:2:1234"}) is False
    assert "vsock:2:1234" in caplog.text


def test_a_real_process_notifies_through_its_environment(fs_systemd: FakeSystemd) -> None:
    """A separate process with $NOTIFY_SOCKET set, as systemd starts it, gets READY=1 through."""
    env = dict(os.environ, **fs_systemd.env)
    subprocess.run([sys.executable, "-c", "from agent.ops import sdnotify; "
                    "raise SystemExit(0 if sdnotify.ready() else 1)"],
                   env=env, check=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert fs_systemd.receive() == "READY=1"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000"}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """WATCHDOG_USEC becomes seconds, only for the process WATCHDOG_PID names; junk means none."""
    assert sdnotify.watchdog_interval(env) == expected


def test_watchdog_interval_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit env, the watchdog settings come from the process environment."""
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 2.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sdnotify.watchdog_interval() is None


def test_run_watchdog_pings_at_half_the_interval(fs_systemd: FakeSystemd) -> None:
    """run_watchdog sends WATCHDOG=1 every interval/2 until cancelled."""
    env = {**fs_systemd.env, "WATCHDOG_USEC": "200000"}  # 0.2 s: pings every 0.1 s

    async def main() -> None:
        task = asyncio.create_task(sdnotify.run_watchdog(env=env))
        pings = await asyncio.to_thread(lambda: [fs_systemd.receive() for _ in range(3)])
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pings == ["WATCHDOG=1"] * 3

    asyncio.run(main())


def test_run_watchdog_withholds_pings_when_unhealthy(fs_systemd: FakeSystemd) -> None:
    """While healthy() is False no ping is sent; pings resume when it turns True."""
    env = {**fs_systemd.env, "WATCHDOG_USEC": "100000"}
    checks: list[bool] = []

    def healthy() -> bool:
        # Unhealthy for the first 3 checks, healthy after.
        checks.append(len(checks) >= 3)
        return checks[-1]

    async def main() -> None:
        task = asyncio.create_task(sdnotify.run_watchdog(healthy, env=env))
        ping = await asyncio.to_thread(fs_systemd.receive)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ping == "WATCHDOG=1"

    asyncio.run(main())
    # The first ping came only after the unhealthy checks.
    assert checks[:4] == [False, False, False, True]


def test_run_watchdog_returns_without_a_watchdog(fs_systemd: FakeSystemd) -> None:
    """With no WATCHDOG_USEC the task ends at once and sends nothing."""
    asyncio.run(asyncio.wait_for(sdnotify.run_watchdog(env=fs_systemd.env), timeout=5))
    assert fs_systemd.pending() == []
