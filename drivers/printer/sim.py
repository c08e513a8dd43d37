"""Simulated printers: the printer side of ESC/POS and ZPL, in memory, sans-I/O.

``feed(bytes) -> reply bytes``, like the real thing on its wire: documents are
recorded, real-time status queries are answered from a state that can be
switched at run time. ``sim://receipt`` and ``sim://label`` use these (the
demo), and the tests put them behind loopback TCP servers.

Like real printers, data that arrives while the printer cannot print waits in
its buffer and prints on recovery, unless the host clears the buffer first
(ESC/POS ``DLE DC4 8``, ZPL ``~JA``). That is what makes "print exactly once"
worth testing.

The status replies are built here from the spec's bit values, separately from
``status.py``'s parser, so a mistake in one is not silently mirrored by the other.
"""

from __future__ import annotations

import threading
from typing import Literal

SimState = Literal["ok", "paper_near_end", "paper_out", "head_open", "paused", "silent"]
SIM_STATES: tuple[str, ...] = ("ok", "paper_near_end", "paper_out", "head_open", "paused", "silent")
_BLOCKING = ("paper_out", "head_open", "paused")


class _SimPrinter:
    """Shared bookkeeping: what was received, what was printed, what waits."""

    def __init__(self, state: SimState = "ok") -> None:
        self._lock = threading.Lock()
        self.state: SimState = state
        self.received = bytearray()  # every byte ever received, queries included
        self.printed: list[bytes] = []  # documents that came out of the printer
        self.waiting: list[bytes] = []  # complete documents held while the printer cannot print
        self.cleared = 0  # buffer clears received
        self.queries = 0  # status queries received (answered or not)
        self._fault_after_next: SimState | None = None
        self._tail = bytearray()  # bytes of a document not complete yet

    def set_state(self, state: SimState) -> None:
        """Switch the printer's condition; back to a printable state prints what waits."""
        if state not in SIM_STATES:
            raise ValueError(f"unknown sim printer state {state!r}; one of {SIM_STATES}")
        with self._lock:
            self.state = state
            if state not in _BLOCKING and state != "silent":
                self.printed.extend(self.waiting)
                self.waiting.clear()

    def fault_after_next_document(self, state: SimState) -> None:
        """Enter ``state`` as the next document completes; that document stays unprinted."""
        with self._lock:
            self._fault_after_next = state

    def feed(self, data: bytes) -> bytes:
        """Take bytes from the host; return what the printer sends back."""
        with self._lock:
            self.received += data
            return self._feed(data)

    def _feed(self, data: bytes) -> bytes:
        raise NotImplementedError

    def _document(self, doc: bytes) -> None:
        if self._fault_after_next is not None:
            self.state, self._fault_after_next = self._fault_after_next, None
            self.waiting.append(doc)
        elif self.state in _BLOCKING or self.state == "silent":
            self.waiting.append(doc)
        else:
            self.printed.append(doc)

    def _clear(self) -> None:
        self.waiting.clear()
        self._tail.clear()
        self.cleared += 1


class SimEscposPrinter(_SimPrinter):
    """An ESC/POS receipt printer: a document ends at a cut (GS V); answers DLE EOT n."""

    def _status_byte(self, n: int) -> int:
        base = 0x12  # fixed bits 1 and 4 on, 0 and 7 off
        state = self.state
        if n == 1:
            return base | (0x08 if state in _BLOCKING else 0)  # bit 3: offline
        if n == 2:
            return base | {"head_open": 0x04, "paper_out": 0x20}.get(state, 0)
        if n == 3:
            return base
        if n == 4:
            return base | {"paper_out": 0x6C, "paper_near_end": 0x0C}.get(state, 0)
        return base

    def _feed(self, data: bytes) -> bytes:
        buf = self._tail + data
        self._tail = bytearray()
        reply = bytearray()
        doc = bytearray()
        i = 0
        while i < len(buf):
            byte = buf[i]
            if byte == 0x10:  # DLE: maybe a real-time command, acted on at once
                if i + 2 >= len(buf):
                    self._tail = doc + buf[i:]
                    return bytes(reply)
                if buf[i + 1] == 0x04:
                    self.queries += 1
                    if self.state != "silent":
                        reply.append(self._status_byte(buf[i + 2]))
                    i += 3
                    continue
                if buf[i + 1] == 0x14 and buf[i + 2] == 0x08:
                    if i + 10 > len(buf):
                        self._tail = doc + buf[i:]
                        return bytes(reply)
                    self._clear()
                    doc.clear()
                    if self.state != "silent":
                        reply += b"\x37\x25\x00"
                    i += 10
                    continue
            if byte == 0x1D and i + 1 < len(buf) and buf[i + 1] == 0x56:  # GS V: cut
                size = 3 if i + 2 < len(buf) and buf[i + 2] in (0, 1, 48, 49) else 4
                if i + size > len(buf):
                    self._tail = doc + buf[i:]
                    return bytes(reply)
                doc += buf[i:i + size]
                self._document(bytes(doc))
                doc.clear()
                i += size
                continue
            doc.append(byte)
            i += 1
        self._tail = doc
        return bytes(reply)


class SimZplPrinter(_SimPrinter):
    """A ZPL label printer: a document is ^XA..^XZ; answers ~HS, cancels on ~JA."""

    label_length = 609

    def host_status(self) -> bytes:
        """The three ~HS strings for the current state (Zebra ZPL guide layout)."""
        state = self.state
        paper_out = int(state == "paper_out")
        paused = int(state in ("paused", "paper_out", "head_open"))
        head_up = int(state == "head_open")
        one = (f"030,{paper_out},{paused},{self.label_length:04d},{len(self.waiting):03d},"
               f"0,0,0,000,0,0,0")
        two = f"001,0,{head_up},0,0,2,6,0,00000000,1,000"
        three = "1234,0"
        return b"".join(b"\x02" + s.encode() + b"\x03\r\n" for s in (one, two, three))

    # Like the Zebra firmware the issue describes: no answer at all while out of
    # media or with the head open. Tests that want the flags can turn this off.
    silent_when_faulted = True

    def _feed(self, data: bytes) -> bytes:
        # Everything in stream order: a format completed before a ~HS is
        # already in the buffer when the ~HS is answered.
        buf = self._tail + data
        reply = bytearray()
        pos = 0  # start of what is not yet part of a completed format
        while True:
            start = buf.find(b"^XA", pos)
            end = buf.find(b"^XZ", start) if start != -1 else -1
            events = [(p, c) for c in (b"~HS", b"~JA") if (p := buf.find(c, pos)) != -1]
            if end != -1:
                events.append((end, b"^XZ"))
            if not events:
                break
            at, what = min(events)
            if what == b"^XZ":
                self._document(bytes(buf[start:end + 3]))
                pos = end + 3
            elif what == b"~HS":
                del buf[at:at + 3]
                self.queries += 1
                quiet = self.state == "silent" or (
                    self.silent_when_faulted and self.state in ("paper_out", "head_open"))
                if not quiet:
                    reply += self.host_status()
            else:  # ~JA drops the formats waiting, and one still arriving
                del buf[pos:at + 3]
                self._clear()
        rest = buf[pos:]
        start = rest.find(b"^XA")
        if start != -1:
            self._tail = rest[start:]  # a format still arriving
        else:
            # Keep the start of a command the wire cut in two ("~H" + "S").
            cut = max(rest.rfind(b"~"), rest.rfind(b"^"))
            self._tail = rest[cut:] if cut != -1 and len(rest) - cut < 3 else bytearray()
        return bytes(reply)


def sim_printer(kind: str, state: SimState = "ok") -> SimEscposPrinter | SimZplPrinter:
    """A simulated printer for ``sim://receipt`` or ``sim://label``."""
    if kind == "receipt":
        return SimEscposPrinter(state)
    if kind == "label":
        return SimZplPrinter(state)
    raise ValueError(f"unknown sim printer {kind!r}: sim://receipt or sim://label")
