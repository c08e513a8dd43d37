"""Serial scanners over real byte streams: a pty, a socat pty link that vanishes, loop://, TCP."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.scanner import reader as reader_mod
from drivers.scanner.errors import BadScannerConfig
from drivers.scanner.options import ScannerOptions
from drivers.scanner.parse import Scan
from drivers.scanner.reader import ScannerReader
from drivers.scanner.transport import SerialTransport
from tests.conftest import wait_for

TAGS = [f"1A4FF01000000220000{n:05d}" for n in range(100)]


class Sink:
    """Thread-safe on_scan/on_state collector."""

    def __init__(self) -> None:
        self.scans: list[Scan] = []
        self.states: list[tuple[str, str | None, float]] = []
        self.lock = threading.Lock()

    def scan(self, s: Scan) -> None:
        with self.lock:
            self.scans.append(s)

    def state(self, state: str, reason: str | None) -> None:
        with self.lock:
            self.states.append((state, reason, time.monotonic()))

    def codes(self) -> list[str]:
        with self.lock:
            return [s.code for s in self.scans]

    def edges(self) -> list[str]:
        with self.lock:
            return [s for s, _, _ in self.states]


class SocatLink:
    """Two linked ptys made by a real socat: the scanner's side and the side tests write to."""

    def __init__(self, directory: Path) -> None:
        self.scanner = directory / "ttyScanner"
        self.writer = directory / "ttyWriter"
        self.log = directory / "socat.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.fd: int | None = None

    def start(self) -> None:
        self.log.write_bytes(b"")
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                ["socat", "-d", "-d", f"pty,raw,echo=0,link={self.scanner}",
                 f"pty,raw,echo=0,link={self.writer}"], stderr=err)
        wait_for(lambda: b"starting data transfer loop" in self.log.read_bytes(), 5,
                 what="socat to link its ptys")
        # Hold the writer side open for socat's lifetime: socat ends when a side closes.
        self.fd = os.open(self.writer, os.O_RDWR | os.O_NOCTTY)

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        os.write(self.fd, data)

    def kill(self) -> None:
        """SIGKILL socat: the pty vanishes under the reader, as a scanner does when unplugged.

        The dangling links are removed as udev removes /dev/serial/by-id links
        on unplug; left behind, one could point at a pts number another
        process on this machine takes next.
        """
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
            self.proc = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        for link in (self.scanner, self.writer):
            if link.is_symlink():
                link.unlink()


@pytest.fixture
def socat_link(tmp_path: Path) -> Iterator[SocatLink]:
    """A socat pty pair under tmp_path, killed after the test."""
    link = SocatLink(tmp_path)
    link.start()
    try:
        yield link
    finally:
        link.kill()


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink nothing that the 3 s recovery promise depends on; only the first retry."""
    monkeypatch.setattr(reader_mod, "BACKOFF_INITIAL_S", 0.02)


def test_pty_scans_arrive_classified() -> None:
    """Reads written into an os.openpty master reach on_scan parsed, in order."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    sink = Sink()
    reader = ScannerReader("counter-1", f"serial://{path}?baudrate=9600", {"debounce_ms": 0},
                           sink.scan, sink.state)
    try:
        with reader:
            wait_for(lambda: sink.edges() == ["up"], 5, what="reader up")
            os.write(master, TAGS[0].encode() + b"\r\n]E04006381333931\r\n")
            os.write(master, b"1A4\x07bad\r\n]Q1HTTPS://1A4.COM/5LN8CBN1UB33DON9CHKX\r\n")
            wait_for(lambda: len(sink.scans) == 4, 5, what="four scans")
    finally:
        os.close(master)
        os.close(slave)
    assert [(s.classification, s.valid) for s in sink.scans] == [
        ("package_tag", True), ("gtin", True), ("other", False), ("retail_id", True)]
    assert reader.counts["scans"] == 4 and reader.counts["invalid"] == 1


def test_pty_debounce_counts_a_double_read_once() -> None:
    """The same tag twice within debounce_ms is one scan; the count of debounced reads is kept."""
    master, slave = os.openpty()
    sink = Sink()
    reader = ScannerReader("counter-1", f"serial://{os.ttyname(slave)}", {"debounce_ms": 5000},
                           sink.scan, sink.state)
    try:
        with reader:
            wait_for(lambda: sink.edges() == ["up"], 5)
            os.write(master, (TAGS[1] + "\r\n") .encode() * 2 + (TAGS[2] + "\r\n").encode())
            wait_for(lambda: len(sink.scans) == 2 and reader.counts["debounced"] == 1, 5)
    finally:
        os.close(master)
        os.close(slave)
    assert sink.codes() == [TAGS[1], TAGS[2]]


def test_socat_pty_vanishes_and_comes_back(socat_link: SocatLink, fast_backoff: None,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """Unplugged (socat SIGKILLed), back at the same path: down once, up within 3 s, no loss."""
    caplog.set_level(logging.DEBUG, logger="drivers.scanner")
    sink = Sink()
    url = f"serial://{socat_link.scanner}?baudrate=9600"
    reader = ScannerReader("counter-1", url, {"debounce_ms": 0}, sink.scan, sink.state)
    with reader:
        wait_for(lambda: sink.edges() == ["up"], 5, what="reader up")
        socat_link.write(b"".join(f"{t}\r\n".encode() for t in TAGS[:3]))
        wait_for(lambda: len(sink.scans) == 3, 5, what="scans before unplug")

        socat_link.kill()
        wait_for(lambda: sink.edges() == ["up", "down"], 5, what="down after unplug")
        # Stay unplugged long enough for several failed reopens at the capped backoff.
        wait_for(lambda: reader.state == "down" and time.monotonic() - sink.states[-1][2] > 1.5,
                 5, interval=0.1)

        socat_link.start()
        back_at = time.monotonic()
        # Scans sent the moment the port is back, before the reader has reopened it...
        socat_link.write(b"".join(f"{t}\r\n".encode() for t in TAGS[3:6]))
        wait_for(lambda: sink.edges() == ["up", "down", "up"], 3, what="recovery within 3 s")
        assert sink.states[-1][2] - back_at < 3.0
        # ...and a burst after it has: none lost, none doubled, in order.
        socat_link.write(b"".join(f"{t}\r\n".encode() for t in TAGS[6:60]))
        wait_for(lambda: len(sink.scans) == 60, 5, what="all scans after recovery")

    assert sink.codes() == TAGS[:60]
    assert all(s.valid for s in sink.scans)
    assert sink.edges() == ["up", "down", "up"]
    assert reader.counts["reopens"] == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"scanner counter-1: {socat_link.scanner} vanished; "
                      "waiting for it to come back"]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [f"scanner counter-1: {socat_link.scanner} open",
                     f"scanner counter-1: {socat_link.scanner} is back"]


def test_missing_port_at_start_is_down_until_it_appears(tmp_path: Path,
                                                         fast_backoff: None) -> None:
    """A port absent at start reports down once, then up when socat creates it."""
    link = SocatLink(tmp_path)
    sink = Sink()
    reader = ScannerReader("counter-2", f"serial://{link.scanner}", {}, sink.scan, sink.state)
    with reader:
        wait_for(lambda: sink.edges() == ["down"], 5, what="down while absent")
        reason = sink.states[0][1] or ""
        assert "No such file" in reason or "ENOENT" in reason
        try:
            link.start()
            wait_for(lambda: sink.edges() == ["down", "up"], 3, what="up once created")
            link.write(f"{TAGS[7]}\r".encode())
            wait_for(lambda: sink.codes() == [TAGS[7]], 5)
        finally:
            link.kill()
    assert reader.counts["reopens"] == 1


def test_loop_url_round_trip() -> None:
    """pyserial's loop:// works where a serial port does: bytes written come back as scans."""
    transport = SerialTransport("loop://", ScannerOptions())
    sink = Sink()
    reader = ScannerReader("bench-loop", "loop://", {}, sink.scan, sink.state,
                           transport=transport)
    with reader:
        wait_for(lambda: sink.edges() == ["up"], 5)
        transport.write(b"]C0" + TAGS[9].encode() + b"\r\n")
        wait_for(lambda: len(sink.scans) == 1, 5)
    assert (sink.scans[0].code, sink.scans[0].symbology) == (TAGS[9], "]C0")


def test_socket_url_peer_goes_away_and_returns(fast_backoff: None) -> None:
    """socket:// to a serial-over-TCP adapter: peer gone -> down; listening again -> up, scans."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(5)
    sink = Sink()
    reader = ScannerReader("dock-1", f"socket://127.0.0.1:{port}", {}, sink.scan, sink.state)
    with reader:
        conn, _ = listener.accept()
        wait_for(lambda: sink.edges() == ["up"], 5)
        conn.sendall(f"{TAGS[10]}\r\n".encode())
        wait_for(lambda: len(sink.scans) == 1, 5)
        conn.close()
        listener.close()
        wait_for(lambda: sink.edges() == ["up", "down"], 5, what="down after peer closed")

        listener = socket.create_server(("127.0.0.1", port))
        listener.settimeout(5)
        conn, _ = listener.accept()
        wait_for(lambda: sink.edges() == ["up", "down", "up"], 3, what="reconnected")
        conn.sendall(f"{TAGS[11]}\r\n{TAGS[12]}\r\n".encode())
        wait_for(lambda: len(sink.scans) == 3, 5)
        conn.close()
    listener.close()
    assert sink.codes() == TAGS[10:13]


def test_stop_is_bounded_while_blocked_in_read() -> None:
    """stop() returns promptly while the reader waits on a silent port."""
    master, slave = os.openpty()
    sink = Sink()
    reader = ScannerReader("counter-3", f"serial://{os.ttyname(slave)}", {}, sink.scan,
                           sink.state)
    try:
        reader.start()
        wait_for(lambda: sink.edges() == ["up"], 5)
        started = time.monotonic()
        assert reader.stop(timeout=2.0)
        assert time.monotonic() - started < 0.5
        assert reader.state == "stopped"
    finally:
        os.close(master)
        os.close(slave)


def test_callback_errors_do_not_kill_the_reader() -> None:
    """An on_scan that raises costs that scan's callback only; later scans still arrive."""
    master, slave = os.openpty()
    seen: list[str] = []

    def flaky(scan: Scan) -> None:
        seen.append(scan.code)
        if len(seen) == 1:
            raise RuntimeError("consumer bug")

    reader = ScannerReader("counter-4", f"serial://{os.ttyname(slave)}", {"debounce_ms": 0},
                           flaky, lambda *_: None)
    try:
        with reader:
            wait_for(lambda: reader.state == "up", 5)
            os.write(master, f"{TAGS[20]}\r{TAGS[21]}\r".encode())
            wait_for(lambda: len(seen) == 2, 5)
    finally:
        os.close(master)
        os.close(slave)
    assert reader.counts["callback_errors"] == 1


@pytest.mark.parametrize(("url", "text"), [
    ("serial://", "no device path"),
    ("ftp://scanner", "unsupported scheme"),
    ("usb://zz:01", "usb://VID:PID"),
    ("/dev/ttyACM0", "no scheme"),
    ("sim://scanner?speed=3", "unknown sim parameter"),
])
def test_bad_urls_name_the_device(url: str, text: str) -> None:
    """A bad device URL fails at construction with the device's url key in the message."""
    with pytest.raises(BadScannerConfig) as err:
        ScannerReader("c9", url, {}, lambda s: None, lambda *_: None)
    assert err.value.key == "devices[c9].url" and text in str(err.value)
