"""Transports from device URLs, against fake printers on loopback TCP, a pty, files and sim://."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.printer import BadDeviceUrl, Printer, PrinterState, TransportError
from drivers.printer.sim import SimEscposPrinter
from drivers.printer.status import ESCPOS_QUERIES
from drivers.printer.transport import (
    FileTransport,
    SerialTransport,
    SimTransport,
    TcpTransport,
    UsbTransport,
    open_transport,
)
from tests.conftest import wait_for
from tests.printer_fakes import fake_escpos_printer, fake_zpl_printer

QUICK = 0.3  # status read timeout for printers that are meant to stay silent


def test_tcp_bytes_reach_the_printer() -> None:
    """Bytes written over tcp:// arrive at the printer unchanged and in order."""
    with fake_escpos_printer() as fake:
        transport = open_transport(fake.url)
        assert isinstance(transport, TcpTransport)
        payload = bytes(range(32, 127)) * 100 + b"\x1dV\x00"
        transport.write(payload)
        wait_for(lambda: fake.received == payload, what="all bytes at the fake printer")
        assert fake.printed == [payload]
        transport.close()


@pytest.mark.parametrize(("state", "expected"), [
    ("ok", PrinterState.ONLINE),
    ("paper_near_end", PrinterState.PAPER_NEAR_END),
    ("paper_out", PrinterState.PAPER_OUT),
    ("head_open", PrinterState.HEAD_OPEN),
    ("silent", PrinterState.UNKNOWN),
])
def test_escpos_status_over_tcp(state: str, expected: PrinterState) -> None:
    """DLE EOT is sent over TCP and the fake's answer (or silence) becomes the right state."""
    with fake_escpos_printer(state) as fake:  # type: ignore[arg-type]
        printer = Printer.from_url("counter-1", "receipt", fake.url, status_timeout=QUICK)
        status = printer.status()
        assert status.state == expected
        assert status.faulted is (state in ("paper_out", "head_open"))
        if state == "silent":
            assert status.printable is None  # unknown, never "OK"
        printer.close()


def test_escpos_status_follows_runtime_switches() -> None:
    """One connection: the fake switched to paper-out, head-open and back is seen each time."""
    with fake_escpos_printer() as fake:
        printer = Printer.from_url("counter-1", "receipt", fake.url, status_timeout=QUICK)
        seen = []
        for state in ("paper_out", "head_open", "ok"):
            fake.set_state(state)
            seen.append(printer.status().state.value)
        assert seen == ["paper_out", "head_open", "online"]
        assert fake.connections == 1
        printer.close()


@pytest.mark.parametrize(("state", "answers", "expected", "fault"), [
    ("ok", True, PrinterState.ONLINE, None),
    ("paused", True, PrinterState.PAUSED, "paused"),
    ("paper_out", True, PrinterState.PAPER_OUT, "paper_out"),
    ("head_open", True, PrinterState.HEAD_OPEN, "head_open"),
    ("paper_out", False, PrinterState.UNKNOWN, "no_answer"),
    ("head_open", False, PrinterState.UNKNOWN, "no_answer"),
    ("silent", False, PrinterState.UNKNOWN, "no_answer"),
])
def test_zpl_status_over_tcp(state: str, answers: bool, expected: PrinterState,
                             fault: str | None) -> None:
    """~HS over TCP: flags become states, and a printer that stays silent is a fault."""
    with fake_zpl_printer(state, silent_when_faulted=not answers) as fake:  # type: ignore[arg-type]
        printer = Printer.from_url("zebra", "label", fake.url, status_timeout=QUICK)
        status = printer.status()
        assert status.state == expected
        assert (status.faults[0] if status.faults else None) == fault
        printer.close()


def test_zpl_bytes_and_status_share_one_connection() -> None:
    """A label and a ~HS on one TCP connection: the label prints, the status is read back."""
    with fake_zpl_printer() as fake:
        printer = Printer.from_url("zebra", "label", fake.url, status_timeout=QUICK)
        printer.send(b"^XA^FO10,10^FDone^FS^XZ")
        assert printer.confirm(timeout=2).state == PrinterState.ONLINE
        assert fake.printed == [b"^XA^FO10,10^FDone^FS^XZ"]
        printer.close()


def test_unreachable_tcp_printer_is_offline() -> None:
    """Nothing listening: status is an "offline" fault; send raises a TransportError naming it."""
    with fake_escpos_printer() as fake:
        url = fake.url
    printer = Printer.from_url("gone", "receipt", url, status_timeout=QUICK)
    status = printer.status()
    assert status.state == PrinterState.OFFLINE and status.faults == ("offline",)
    with pytest.raises(TransportError) as err:
        printer.send(b"x")
    assert err.value.url == url and "cannot connect" in str(err.value)


def test_serial_url_over_pyserial_socket_reaches_the_fake() -> None:
    """A pyserial socket:// URL is a serial transport that talks to the fake printer."""
    with fake_escpos_printer("paper_out") as fake:
        url = f"socket://127.0.0.1:{fake.port}"
        printer = Printer.from_url("serial-1", "receipt", url, status_timeout=QUICK)
        assert isinstance(printer.transport, SerialTransport)
        assert printer.status().state == PrinterState.PAPER_OUT
        printer.send(b"hello\x1dV\x00")
        wait_for(lambda: fake.sim.waiting == [b"hello\x1dV\x00"], what="job held by the printer")
        printer.close()


@pytest.fixture
def pty_printer() -> Iterator[tuple[str, SimEscposPrinter]]:
    """An ESC/POS sim printer on the far side of a pty (a serial port stand-in)."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    sim = SimEscposPrinter()
    stop = threading.Event()

    def serve() -> None:
        import select

        while not stop.is_set():
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:
                    return
                reply = sim.feed(data)
                if reply:
                    os.write(master, reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path, sim
    finally:
        stop.set()
        thread.join(2)
        os.close(master)
        os.close(slave)


def test_serial_device_url_over_a_pty(pty_printer: tuple[str, SimEscposPrinter]) -> None:
    """serial:///dev/pts/N?baudrate=9600: bytes go out and DLE EOT answers come back."""
    path, sim = pty_printer
    printer = Printer.from_url("pty", "receipt", f"serial://{path}?baudrate=9600",
                               status_timeout=1.0)
    transport = printer.transport
    assert isinstance(transport, SerialTransport) and transport.options == {"baudrate": 9600}
    assert printer.status().state == PrinterState.ONLINE
    sim.set_state("head_open")
    assert printer.status().state == PrinterState.HEAD_OPEN
    printer.send(b"receipt\x1dV\x00")
    wait_for(lambda: sim.waiting == [b"receipt\x1dV\x00"], what="bytes over the pty")
    printer.close()


def test_loop_url_reads_back_what_it_writes() -> None:
    """pyserial's loop:// works as a transport (reads time out instead of blocking)."""
    transport = open_transport("loop://")
    transport.write(b"\x10\x04\x01")
    assert transport.read(16, 0.5) == b"\x10\x04\x01"
    started = time.monotonic()
    assert transport.read(16, 0.1) == b""
    assert time.monotonic() - started < 1.0
    transport.close()


def test_file_url_appends_and_reports_unknown(tmp_path: Path) -> None:
    """file:// appends bytes to the file; such a printer cannot report, so status is unknown."""
    target = tmp_path / "spool.bin"
    printer = Printer.from_url("file", "label", f"file://{target}")
    assert isinstance(printer.transport, FileTransport) and not printer.can_report
    printer.send(b"^XA^XZ")
    printer.send(b"^XA^XZ")
    assert target.read_bytes() == b"^XA^XZ^XA^XZ"
    status = printer.status()
    assert status.state == PrinterState.UNKNOWN and not status.faulted


def test_file_url_to_a_missing_folder_is_a_transport_error(tmp_path: Path) -> None:
    """A file:// path that cannot be written is a TransportError naming the path."""
    printer = Printer.from_url("file", "label", f"file://{tmp_path}/no/such/dir/x")
    with pytest.raises(TransportError, match="cannot write"):
        printer.send(b"x")


def test_sim_url_is_an_in_memory_printer() -> None:
    """sim://receipt?state=paper_out starts out of paper and can be switched."""
    printer = Printer.from_url("sim", "receipt", "sim://receipt?state=paper_out")
    assert isinstance(printer.transport, SimTransport)
    assert printer.status().state == PrinterState.PAPER_OUT
    printer.transport.printer.set_state("ok")
    assert printer.status().state == PrinterState.ONLINE
    label = Printer.from_url("sim", "label", "sim://label")
    assert label.status().state == PrinterState.ONLINE


def test_usb_url_parses_ids_and_sets_a_timeout() -> None:
    """usb://VID:PID is parsed as hex and always carries a timeout (pyusb's default is none)."""
    transport = open_transport("usb://04b8:0202?timeout=2.5")
    assert isinstance(transport, UsbTransport)
    assert (transport.vendor, transport.product, transport.timeout_ms) == (0x04B8, 0x0202, 2500)
    assert open_transport("usb://04b8:0202").timeout_ms > 0  # type: ignore[attr-defined]


def test_absent_usb_printer_is_a_transport_error() -> None:
    """A USB printer that is not there is a TransportError naming it; status is offline."""
    printer = Printer.from_url("usb", "receipt", "usb://1234:5678")
    with pytest.raises(TransportError) as err:
        printer.send(b"x")
    assert "usb://1234:5678" in str(err.value)
    assert printer.status().faults == ("offline",)


@pytest.mark.parametrize("url", [
    "tcp://", "tcp://printer:99999", "tcp://printer?timeout=soon", "tcp://printer?timeout=0",
    "usb://epson", "usb://12345:1", "serial://", "serial:///dev/ttyS0?baudrate=fast",
    "file://host/x", "sim://fax", "sim://receipt?state=wet", "lpd://printer", "printer",
])
def test_bad_urls_are_refused_with_the_url_named(url: str) -> None:
    """Every unusable URL is a BadDeviceUrl that names the URL and the schemes that work."""
    with pytest.raises(BadDeviceUrl) as err:
        open_transport(url)
    assert err.value.url == url
    assert "tcp://HOST:9100" in str(err.value)


def test_escpos_queries_are_dle_eot() -> None:
    """The status queries are exactly DLE EOT 1..4 (10 04 n)."""
    assert ESCPOS_QUERIES == {1: b"\x10\x04\x01", 2: b"\x10\x04\x02", 3: b"\x10\x04\x03",
                              4: b"\x10\x04\x04"}
