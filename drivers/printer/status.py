"""Printer status, sans-I/O: what to ask, and what an answer means.

Two dialects:

* ESC/POS real-time status, ``DLE EOT n`` (10 04 n). Each query is answered
  with one byte whose bits 0, 1, 4 and 7 are fixed to 0, 1, 1, 0 (Epson ESC/POS
  reference, "DLE EOT"); a byte without that signature is not a status reply.
  n=1 printer status (bit 3 offline), n=2 offline cause (bit 2 cover open,
  bit 3 feeding by the FEED button, bit 5 stopped at paper end, bit 6 error),
  n=3 error cause (bit 3 autocutter, bit 5 unrecoverable, bit 6
  auto-recoverable, e.g. head overheat), n=4 roll paper sensor (bits 2-3 near
  end, bits 5-6 paper end). Some vendors (Citizen) set only one bit of a pair,
  so either bit counts. No answer is ``unknown``, never "paper OK": python-escpos
  3.1's ``paper_status()`` returns 2 ("adequate") when the printer says nothing.

* ZPL host status, ``~HS``: three ``STX ... ETX CR LF`` framed strings.
  String 1 ``aaa,b,c,dddd,eee,f,g,h,iii,j,k,l`` (b paper out, c paused,
  eee formats waiting in the receive buffer, f buffer full, j corrupt RAM,
  k under temperature, l over temperature); string 2
  ``mmm,n,o,p,q,r,s,t,uuuuuuuu,v,www`` (o head up, p ribbon out, q thermal
  transfer mode, uuuuuuuu labels remaining in the batch); string 3
  ``xxxx,y``. Zebra printers send nothing at all while media or ribbon is out,
  the head is open or it is over temperature (Zebra ZPL guide, ~HS), so silence
  is a fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# --- ESC/POS -----------------------------------------------------------------

DLE_EOT = b"\x10\x04"
ESCPOS_QUERIES: dict[int, bytes] = {n: DLE_EOT + bytes([n]) for n in (1, 2, 3, 4)}
# DLE DC4 fn=8 "clear buffer(s)": drops the receive and print buffers; the
# printer answers 37 25 00. Sent when a fault shows up right after a job, so
# the half-received job cannot print by itself on recovery and then again
# when it is retried.
ESCPOS_CLEAR_BUFFERS = b"\x10\x14\x08\x01\x03\x14\x01\x06\x02\x08"
ESCPOS_CLEAR_REPLY = b"\x37\x25\x00"

_FIXED_MASK = 0x93  # bits 7, 4, 1, 0
_FIXED_VALUE = 0x12  # 0, 1, 1, 0

# n=1
_N1_OFFLINE = 0x08
# n=2
_N2_COVER_OPEN = 0x04
_N2_FEEDING = 0x08
_N2_PAPER_END_STOP = 0x20
_N2_ERROR = 0x40
# n=3
_N3_AUTOCUTTER = 0x08
_N3_UNRECOVERABLE = 0x20
_N3_AUTO_RECOVERABLE = 0x40
_N3_CAUSES = ((_N3_AUTOCUTTER, "autocutter error"), (_N3_UNRECOVERABLE, "unrecoverable error"),
              (_N3_AUTO_RECOVERABLE, "auto-recoverable error (head too hot?)"))
# n=4
_N4_NEAR_END = 0x0C
_N4_PAPER_END = 0x60

# --- ZPL ---------------------------------------------------------------------

ZPL_HOST_STATUS = b"~HS"
# ~JA "cancel all": drops every format waiting in the printer's buffer. Sent
# for the same reason as ESCPOS_CLEAR_BUFFERS; tilde commands are acted on at
# once, even while the printer is paused or out of media.
ZPL_CANCEL_ALL = b"~JA"
STX = 0x02
ETX = 0x03


class PrinterState(StrEnum):
    """The headline state of a printer (the worst condition it reports)."""

    ONLINE = "online"
    PAPER_NEAR_END = "paper_near_end"
    PAPER_OUT = "paper_out"
    HEAD_OPEN = "head_open"
    PAUSED = "paused"
    RIBBON_OUT = "ribbon_out"
    OFFLINE = "offline"
    ERROR = "error"
    UNKNOWN = "unknown"


# Faults that stop printing, in the order the headline state is chosen.
# "no_answer" is ZPL's silence and a status reply that is not one.
FAULT_ORDER = ("head_open", "paper_out", "ribbon_out", "paused", "error", "offline", "no_answer")
_FAULT_STATE = {
    "head_open": PrinterState.HEAD_OPEN,
    "paper_out": PrinterState.PAPER_OUT,
    "ribbon_out": PrinterState.RIBBON_OUT,
    "paused": PrinterState.PAUSED,
    "error": PrinterState.ERROR,
    "offline": PrinterState.OFFLINE,
    "no_answer": PrinterState.UNKNOWN,
}


@dataclass(frozen=True)
class PrinterStatus:
    """What a printer said about itself (or that it said nothing)."""

    state: PrinterState
    faults: tuple[str, ...] = ()  # conditions that stop printing (FAULT_ORDER names)
    warnings: tuple[str, ...] = ()  # conditions that do not (paper_near_end, ...)
    answered: bool = True
    detail: str = ""
    formats_queued: int | None = None  # ZPL: formats still in the receive buffer
    raw: bytes = field(default=b"", repr=False)

    @property
    def faulted(self) -> bool:
        """True when the printer cannot print now."""
        return bool(self.faults)

    @property
    def printable(self) -> bool | None:
        """True: it can print; False: it cannot; None: nobody knows (no answer, no fault)."""
        if self.faults:
            return False
        return True if self.answered else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for status, events and API answers."""
        return {
            "state": self.state.value,
            "faults": list(self.faults),
            "warnings": list(self.warnings),
            "answered": self.answered,
            "detail": self.detail,
            "formats_queued": self.formats_queued,
        }


def unknown(detail: str) -> PrinterStatus:
    """No status could be had, and that is not in itself a fault (ESC/POS, file://)."""
    return PrinterStatus(PrinterState.UNKNOWN, answered=False, detail=detail)


def unreachable(detail: str) -> PrinterStatus:
    """The printer could not be reached at all: a fault for either dialect."""
    return PrinterStatus(PrinterState.OFFLINE, faults=("offline",), answered=False, detail=detail)


def _compose(faults: list[str], warnings: list[str], details: list[str], *,
             formats_queued: int | None = None, raw: bytes = b"") -> PrinterStatus:
    ordered = tuple(f for f in FAULT_ORDER if f in faults)
    if ordered:
        state = _FAULT_STATE[ordered[0]]
    elif "paper_near_end" in warnings:
        state = PrinterState.PAPER_NEAR_END
    else:
        state = PrinterState.ONLINE
    return PrinterStatus(state, ordered, tuple(warnings), True, "; ".join(details) or "ready",
                         formats_queued, raw)


def escpos_reply_valid(byte: int) -> bool:
    """Whether one byte has the fixed bits of a DLE EOT reply."""
    return byte & _FIXED_MASK == _FIXED_VALUE


def parse_escpos(replies: Mapping[int, int | None]) -> PrinterStatus:
    """Interpret the one-byte answers to DLE EOT 1..4 (``None``: no answer to that n)."""
    raw = bytes(b for b in (replies.get(n) for n in (1, 2, 3, 4)) if b is not None)
    got = {n: b for n, b in replies.items() if b is not None and escpos_reply_valid(b)}
    bad = sorted(n for n, b in replies.items() if b is not None and not escpos_reply_valid(b))
    if not got:
        if bad:
            return PrinterStatus(PrinterState.UNKNOWN, answered=False, raw=raw,
                                 detail=f"reply to DLE EOT {bad} is not an ESC/POS status byte "
                                        f"({raw.hex()}); is this an ESC/POS printer?")
        return unknown("no answer to DLE EOT: status unknown (not assumed OK)")
    faults: list[str] = []
    warnings: list[str] = []
    details: list[str] = []
    n1, n2, n3, n4 = (got.get(n) for n in (1, 2, 3, 4))
    if n2 is not None:
        if n2 & _N2_COVER_OPEN:
            faults.append("head_open")
            details.append("cover open")
        if n2 & _N2_PAPER_END_STOP:
            faults.append("paper_out")
            details.append("stopped at paper end")
        if n2 & _N2_FEEDING:
            warnings.append("feeding")
        if n2 & _N2_ERROR:
            faults.append("error")
    if n3 is not None:
        causes = [name for bit, name in _N3_CAUSES if n3 & bit]
        if causes:
            faults.append("error")
            details.extend(causes)
    if n4 is not None:
        if n4 & _N4_PAPER_END:
            faults.append("paper_out")
            details.append("roll paper end")
        elif n4 & _N4_NEAR_END:
            warnings.append("paper_near_end")
            details.append("roll paper near end")
    if n1 is not None and n1 & _N1_OFFLINE and not faults:
        faults.append("offline")
        details.append("offline (cause not reported)")
    missing = [n for n in (1, 2, 3, 4) if n not in got]
    if missing:
        details.append(f"no valid answer to DLE EOT {missing}")
    return _compose(faults, warnings, details, raw=raw)


def zpl_frames(buffer: bytes) -> list[str] | None:
    """The STX..ETX framed strings in ``buffer`` once all three ~HS strings are in, else None."""
    frames: list[str] = []
    start = buffer.find(STX)
    while start != -1:
        end = buffer.find(ETX, start + 1)
        if end == -1:
            break
        frames.append(buffer[start + 1:end].decode("ascii", "replace"))
        start = buffer.find(STX, end + 1)
    return frames if len(frames) >= 3 else None


def _flag(fields: list[str], index: int) -> bool:
    return index < len(fields) and fields[index].strip() == "1"


def _int(fields: list[str], index: int) -> int | None:
    try:
        return int(fields[index])
    except (IndexError, ValueError):
        return None


def parse_host_status(reply: bytes | None) -> PrinterStatus:
    """Interpret a ZPL ``~HS`` answer; silence (``None`` or empty) is a fault."""
    if not reply:
        return PrinterStatus(
            PrinterState.UNKNOWN, faults=("no_answer",), answered=False,
            detail="no answer to ~HS: Zebra printers say nothing while media or ribbon is out, "
                   "the head is open or it is over temperature; check the printer")
    frames = zpl_frames(reply)
    if frames is None or len(frames[0].split(",")) < 12 or len(frames[1].split(",")) < 11:
        return PrinterStatus(PrinterState.UNKNOWN, faults=("no_answer",), answered=False, raw=reply,
                             detail=f"answer to ~HS is not a host status ({reply[:60]!r})")
    one = frames[0].split(",")
    two = frames[1].split(",")
    faults: list[str] = []
    warnings: list[str] = []
    details: list[str] = []
    if _flag(two, 2):
        faults.append("head_open")
        details.append("head open")
    if _flag(one, 1):
        faults.append("paper_out")
        details.append("paper out")
    if _flag(two, 3) and _flag(two, 4):  # a ribbon only matters in thermal transfer mode
        faults.append("ribbon_out")
        details.append("ribbon out")
    if _flag(one, 2):
        faults.append("paused")
        details.append("paused")
    if _flag(one, 11):
        faults.append("error")
        details.append("head over temperature")
    if _flag(one, 10):
        warnings.append("under_temperature")
    if _flag(one, 5):
        warnings.append("buffer_full")
    if _flag(one, 9):
        warnings.append("configuration_lost")
        details.append("corrupt RAM: configuration lost")
    queued = _int(one, 4)
    if queued:
        details.append(f"{queued} format(s) waiting")
    return _compose(faults, warnings, details, formats_queued=queued, raw=reply)
