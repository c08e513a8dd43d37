"""USB HID: boot-keyboard and HID-POS reports to scans; captures fed at the transport boundary."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.scanner import reader as reader_mod
from drivers.scanner.hid import (
    BootKeyboardDecoder,
    HidPosAssembler,
    decode_pos_report,
    encode_keyboard_reports,
    encode_pos_reports,
)
from drivers.scanner.options import ScannerOptions
from drivers.scanner.parse import Scan
from drivers.scanner.reader import ScannerReader
from drivers.scanner.replay import ReplayReportSource, load_hid_recording
from drivers.scanner.transport import UsbHidTransport
from tests.conftest import wait_for

FIXTURES = Path(__file__).parent / "fixtures" / "scanner"
TAG = "1A4FF0100000022000000123"
GS1 = "]d2" + "0109501101530003" + "17260430" + "10LOT42A\x1d" + "21SN123"
RETAIL = "]Q1HTTPS://1A4.COM/5LN8CBN1UB33DON9CHKX"


def r(*b: int) -> bytes:
    return bytes(b) + bytes(8 - len(b))


def decode_all(reports: list[bytes]) -> str:
    dec = BootKeyboardDecoder()
    return "".join(dec.feed(rep) for rep in reports)


def test_boot_report_bytes_to_characters() -> None:
    """Hand-written reports: a, Shift+a, 1, Shift+1, Enter, with releases between."""
    reports = [r(0, 0, 0x04), r(), r(0x02, 0, 0x04), r(), r(0, 0, 0x1E), r(), r(0x20, 0, 0x1E),
               r(), r(0, 0, 0x28), r()]
    assert decode_all(reports) == "aA1!\r"


def test_ctrl_right_bracket_is_group_separator() -> None:
    """Ctrl+] (left or right Ctrl) types 0x1D, the GS1 group separator."""
    assert decode_all([r(0x01, 0, 0x30), r(), r(0x10, 0, 0x30), r()]) == "\x1d\x1d"


def test_rollover_only_newly_pressed_keys_type() -> None:
    """A key still held in the next report does not type again; a re-press after release does."""
    reports = [r(0, 0, 0x04), r(0, 0, 0x04, 0x05), r(0, 0, 0x05), r(0, 0, 0x05, 0x04), r(),
               r(0, 0, 0x04), r()]
    assert decode_all(reports) == "abaa"


def test_phantom_rollover_report_changes_nothing() -> None:
    """A report full of ErrorRollOver (0x01) neither types nor releases held keys."""
    dec = BootKeyboardDecoder()
    assert dec.feed(r(0, 0, 0x04)) == "a"
    assert dec.feed(r(0, 0, 1, 1, 1, 1, 1, 1)) == ""
    assert dec.feed(r(0, 0, 0x04)) == ""  # still the same press
    assert dec.ignored_reports == 1


def test_alt_keypad_code_types_its_character() -> None:
    """Alt held while keypad 0,0,2,9 is typed gives GS when Alt is released."""
    lalt = 0x04
    reports = [r(lalt)]
    for usage in (0x62, 0x62, 0x5A, 0x61):  # KP0 KP0 KP2 KP9
        reports += [r(lalt, 0, usage), r(lalt)]
    reports.append(r())
    assert decode_all(reports) == "\x1d"


def test_malformed_reports_are_ignored() -> None:
    """Reports of the wrong length type nothing and are counted."""
    dec = BootKeyboardDecoder()
    assert dec.feed(b"\x00\x00\x04") == "" and dec.feed(bytes(9)) == ""
    assert dec.ignored_reports == 2


def test_report_id_prefixed_keyboard() -> None:
    """A keyboard behind a report ID (9-byte reports) decodes when told its ID."""
    dec = BootKeyboardDecoder(report_id=1)
    assert dec.feed(b"\x01" + r(0x02, 0, 0x04)) == "A"


@pytest.mark.parametrize(("fixture", "expected"), [
    ("hid_boot_package_tag.hid", TAG + "\r"),
    ("hid_boot_gs1_datamatrix.hid", GS1 + "\r"),
    ("hid_boot_gs1_altcode.hid", GS1 + "\r"),
    ("hid_boot_retail_id.hid", RETAIL + "\r"),
])
def test_recorded_keyboard_captures_decode(fixture: str, expected: str) -> None:
    """Each hid-recorder capture decodes to exactly the text the scanner typed."""
    rec = load_hid_recording(FIXTURES / fixture)
    assert rec.descriptor[:4] == bytes.fromhex("05010906")  # boot keyboard descriptor
    assert decode_all(rec.reports) == expected


def test_encoder_round_trips_every_typable_character() -> None:
    """encode_keyboard_reports (used for sims) is the inverse of the decoder."""
    text = "".join(chr(c) for c in range(0x20, 0x7F)) + "\x1d\r\t"
    for rollover in (False, True):
        assert decode_all(encode_keyboard_reports(text, rollover=rollover)) == text


def test_hid_pos_report_layout() -> None:
    """A hand-built scanned-data report gives AIM, data and the continuation bit."""
    report = bytearray(64)
    report[0], report[1] = 0x02, 3
    report[2:5] = b"]C0"
    report[5:8] = b"ABC"
    report[63] = 1
    chunk = decode_pos_report(bytes(report))
    assert chunk is not None and (chunk.aim, chunk.data, chunk.more) == (b"]C0", b"ABC", True)
    report[2:5] = b"C0\0"  # AIM without the flag character
    chunk = decode_pos_report(bytes(report))
    assert chunk is not None and chunk.aim == b"]C0"
    assert decode_pos_report(b"\x04" + bytes(63)) is None  # not a scanned-data report


def test_hid_pos_capture_assembles_continued_reads() -> None:
    """The HID-POS capture gives a 2-report GS1 read and a Retail ID read, in order."""
    rec = load_hid_recording(FIXTURES / "hid_pos_reads.hid")
    asm = HidPosAssembler()
    reads = [read for rep in rec.reports if (read := asm.feed(rep)) is not None]
    assert len(rec.reports) == 3 and len(reads) == 2
    assert reads[0].startswith(b"]d201095011015300031726043010LOT42A\x1d") and len(reads[0]) > 56
    assert reads[1] == RETAIL.encode()
    assert encode_pos_reports(reads[0][3:], aim=b"]d2") == rec.reports[:2]


class Collector:
    """on_scan/on_state sink that tests poll."""

    def __init__(self) -> None:
        self.scans: list[Scan] = []
        self.states: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    def scan(self, s: Scan) -> None:
        with self.lock:
            self.scans.append(s)

    def state(self, state: str, reason: str | None) -> None:
        with self.lock:
            self.states.append((state, reason))


def usb_reader(sources: list[ReplayReportSource], col: Collector, **opts: object) -> ScannerReader:
    it = iter(sources)
    transport = UsbHidTransport(lambda: next(it), ScannerOptions(**opts),  # type: ignore[arg-type]
                                where="usb 1209:0001")
    return ScannerReader("counter-1", "usb://1209:0001", None, col.scan, col.state,
                         transport=transport)


def test_usb_keyboard_capture_through_reader() -> None:
    """Recorded keyboard reports fed at the USB boundary become classified scans."""
    reports = []
    for name in ("hid_boot_package_tag.hid", "hid_boot_gs1_datamatrix.hid",
                 "hid_boot_retail_id.hid"):
        reports += load_hid_recording(FIXTURES / name).reports
    col = Collector()
    with usb_reader([ReplayReportSource(reports, hid_protocol=1)], col):
        wait_for(lambda: len(col.scans) == 3, 5, what="three scans")
    assert [s.classification for s in col.scans] == ["package_tag", "gtin", "retail_id"]
    assert col.scans[1].gs1 is not None and col.scans[1].gs1["serial"] == "SN123"
    assert col.states == [("up", None)]


def test_usb_hid_pos_capture_through_reader() -> None:
    """A non-keyboard HID interface is read as HID-POS: whole reads, no terminator needed."""
    rec = load_hid_recording(FIXTURES / "hid_pos_reads.hid")
    col = Collector()
    with usb_reader([ReplayReportSource(rec.reports, hid_protocol=0)], col):
        wait_for(lambda: len(col.scans) == 2, 5, what="two scans")
    assert [(s.classification, s.symbology) for s in col.scans] == [("gtin", "]d2"),
                                                                      ("retail_id", "]Q1")]
    assert col.scans[0].gs1 is not None and col.scans[0].gs1["elements"]["240"] == "CART-ROSIN-1G"


def test_usb_unplug_mid_read_then_replug(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unplugged mid-scan: a partial invalid scan, state down once, back up, later scans arrive."""
    monkeypatch.setattr(reader_mod, "BACKOFF_INITIAL_S", 0.01)
    first = ReplayReportSource(encode_keyboard_reports("1A4FF"), hid_protocol=1)
    first.vanish()
    second = ReplayReportSource(encode_keyboard_reports(TAG + "\r"), hid_protocol=1)
    col = Collector()
    with usb_reader([first, second], col):
        wait_for(lambda: len(col.scans) == 2, 5, what="partial + full scan")
    assert not col.scans[0].valid and "vanished" in (col.scans[0].reason or "")
    assert col.scans[1].code == TAG
    assert [s for s, _ in col.states] == ["up", "down", "up"]
    assert first.closed


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=70), max_size=40))
def test_random_reports_never_raise(reports: list[bytes]) -> None:
    """Arbitrary report bytes through both HID decoders: text or nothing, never an exception."""
    keyboard, pos = BootKeyboardDecoder(), HidPosAssembler()
    for report in reports:
        assert isinstance(keyboard.feed(report), str)
        read = pos.feed(report)
        assert read is None or isinstance(read, bytes)
