"""Status answers to PrinterStatus: ESC/POS DLE EOT bytes and ZPL ~HS strings, as tables."""

from __future__ import annotations

import pytest
from escpos.printer import Dummy  # type: ignore[import-untyped]

from drivers.printer.sim import SimEscposPrinter, SimZplPrinter
from drivers.printer.status import (
    ESCPOS_QUERIES,
    PrinterState,
    parse_escpos,
    parse_host_status,
    zpl_frames,
)

OK = 0x12  # every DLE EOT reply: bit 1 and bit 4 on, bits 0 and 7 off

# (n=1, n=2, n=3, n=4) replies -> headline state, faults, warnings
ESCPOS_TABLE = [
    ("ready", (OK, OK, OK, OK), "online", (), ()),
    ("near end (Epson: bits 2+3)", (OK, OK, OK, 0x1E), "paper_near_end", (), ("paper_near_end",)),
    ("near end (one bit, Citizen)", (OK, OK, OK, 0x16), "paper_near_end", (), ("paper_near_end",)),
    ("paper out", (0x1A, 0x32, OK, 0x7E), "paper_out", ("paper_out",), ()),
    ("paper end sensor only", (OK, OK, OK, 0x72), "paper_out", ("paper_out",), ()),
    ("paper end, one bit", (OK, OK, OK, 0x32), "paper_out", ("paper_out",), ()),
    ("cover open", (0x1A, 0x16, OK, OK), "head_open", ("head_open",), ()),
    ("cover open and paper out", (0x1A, 0x36, OK, 0x7E), "head_open",
     ("head_open", "paper_out"), ()),
    ("autocutter error", (0x1A, 0x52, 0x1A, OK), "error", ("error",), ()),
    ("head overheat", (0x1A, 0x52, 0x52, OK), "error", ("error",), ()),
    ("offline, no cause given", (0x1A, OK, OK, OK), "offline", ("offline",), ()),
    ("feed button held", (OK, 0x1A, OK, OK), "online", (), ("feeding",)),
]


@pytest.mark.parametrize(("case", "replies", "state", "faults", "warnings"), ESCPOS_TABLE,
                         ids=[row[0] for row in ESCPOS_TABLE])
def test_escpos_status_table(case: str, replies: tuple[int, int, int, int], state: str,
                             faults: tuple[str, ...], warnings: tuple[str, ...]) -> None:
    """Each DLE EOT 1..4 reply combination maps to the state the Epson bit layout gives."""
    status = parse_escpos(dict(zip((1, 2, 3, 4), replies, strict=True)))
    assert status.state == PrinterState(state)
    assert status.faults == faults
    assert status.warnings == warnings
    assert status.printable is (not faults)
    assert status.answered


def test_escpos_silence_is_unknown_not_ok() -> None:
    """No answer to DLE EOT is "unknown": not printable-true, not a fault."""
    status = parse_escpos({1: None})
    assert status.state == PrinterState.UNKNOWN
    assert status.printable is None and not status.faulted and not status.answered


def test_python_escpos_paper_status_calls_silence_ok() -> None:
    """Why we ask ourselves: python-escpos 3.1's paper_status() says 2 (paper OK) to silence."""

    class Silent(Dummy):  # type: ignore[misc]
        def _read(self) -> bytes:
            return b""

    assert Silent().paper_status() == 2
    assert parse_escpos({n: None for n in ESCPOS_QUERIES}).state == PrinterState.UNKNOWN


def test_escpos_bytes_that_are_not_status_replies_are_not_trusted() -> None:
    """A reply without the fixed bits (0x12 signature) is no status; all-garbage is unknown."""
    status = parse_escpos({1: 0xFF, 2: 0x00})
    assert status.state == PrinterState.UNKNOWN and status.printable is None
    assert "not an ESC/POS status byte" in status.detail
    partial = parse_escpos({1: OK, 2: 0xFF, 3: None, 4: None})
    assert partial.state == PrinterState.ONLINE
    assert "no valid answer to DLE EOT [2, 3, 4]" in partial.detail


def hs(one: str, two: str, three: str = "1234,0") -> bytes:
    """A ~HS answer: three STX..ETX CR LF framed strings."""
    return b"".join(b"\x02" + s.encode() + b"\x03\r\n" for s in (one, two, three))


READY_1 = "030,0,0,1245,000,0,0,0,000,0,0,0"  # the Zebra guide's example string 1
READY_2 = "000,0,0,0,1,2,4,0,00000000,1,000"

ZPL_TABLE = [
    ("ready", READY_1, READY_2, "online", (), ()),
    ("paper out", "030,1,0,1245,000,0,0,0,000,0,0,0", READY_2, "paper_out", ("paper_out",), ()),
    ("paused", "030,0,1,1245,000,0,0,0,000,0,0,0", READY_2, "paused", ("paused",), ()),
    ("head up", READY_1, "000,0,1,0,1,2,4,0,00000000,1,000", "head_open", ("head_open",), ()),
    ("paper out and paused", "030,1,1,1245,000,0,0,0,000,0,0,0", READY_2, "paper_out",
     ("paper_out", "paused"), ()),
    ("ribbon out, thermal transfer", READY_1, "000,0,0,1,1,2,4,0,00000000,1,000", "ribbon_out",
     ("ribbon_out",), ()),
    ("ribbon flag, direct thermal", READY_1, "000,0,0,1,0,2,4,0,00000000,1,000", "online", (), ()),
    ("over temperature", "030,0,0,1245,000,0,0,0,000,0,0,1", READY_2, "error", ("error",), ()),
    ("under temperature", "030,0,0,1245,000,0,0,0,000,0,1,0", READY_2, "online", (),
     ("under_temperature",)),
    ("buffer full", "030,0,0,1245,003,1,0,0,000,0,0,0", READY_2, "online", (), ("buffer_full",)),
]


@pytest.mark.parametrize(("case", "one", "two", "state", "faults", "warnings"), ZPL_TABLE,
                         ids=[row[0] for row in ZPL_TABLE])
def test_zpl_host_status_table(case: str, one: str, two: str, state: str,
                               faults: tuple[str, ...], warnings: tuple[str, ...]) -> None:
    """Each ~HS flag (paper out, pause, head up, ribbon, temperature) maps to its state."""
    status = parse_host_status(hs(one, two))
    assert status.state == PrinterState(state)
    assert status.faults == faults
    assert status.warnings == warnings


def test_zpl_formats_waiting_are_counted() -> None:
    """eee (formats in the receive buffer) is kept, so a sent label can be confirmed gone."""
    assert parse_host_status(hs("030,0,0,1245,002,0,0,0,000,0,0,0", READY_2)).formats_queued == 2
    assert parse_host_status(hs(READY_1, READY_2)).formats_queued == 0


@pytest.mark.parametrize("reply", [None, b"", b"hello", hs(READY_1, READY_2)[:40],
                                   b"\x02030,0,0\x03\r\n\x02x\x03\r\n\x021,0\x03\r\n"])
def test_zpl_silence_or_garbage_is_a_fault(reply: bytes | None) -> None:
    """No answer, half an answer or garbage to ~HS is a fault (Zebra goes silent on errors)."""
    status = parse_host_status(reply)
    assert status.faulted and status.faults == ("no_answer",)
    assert status.state == PrinterState.UNKNOWN and status.printable is False


def test_zpl_frames_need_all_three_strings() -> None:
    """Framing waits for three STX..ETX strings, ignoring noise between them."""
    full = hs(READY_1, READY_2)
    assert zpl_frames(full[:-10]) is None
    assert zpl_frames(b"\r\n" + full) == [READY_1, READY_2, "1234,0"]


@pytest.mark.parametrize(("state", "expected"), [
    ("ok", "online"), ("paper_near_end", "paper_near_end"), ("paper_out", "paper_out"),
    ("head_open", "head_open"), ("paused", "offline"),
])
def test_simulated_escpos_replies_parse_to_their_state(state: str, expected: str) -> None:
    """The sim printer's DLE EOT bytes (built from the spec) parse back to the state it is in."""
    sim = SimEscposPrinter(state)  # type: ignore[arg-type]
    replies = {n: sim.feed(query)[0] for n, query in ESCPOS_QUERIES.items()}
    assert parse_escpos(replies).state == PrinterState(expected)


@pytest.mark.parametrize(("state", "expected"), [
    ("ok", "online"), ("paper_out", "paper_out"), ("head_open", "head_open"), ("paused", "paused"),
])
def test_simulated_zpl_replies_parse_to_their_state(state: str, expected: str) -> None:
    """The sim ZPL printer's ~HS strings, when it answers, parse back to its state."""
    sim = SimZplPrinter(state)  # type: ignore[arg-type]
    sim.silent_when_faulted = False
    assert parse_host_status(sim.feed(b"~HS")).state == PrinterState(expected)
