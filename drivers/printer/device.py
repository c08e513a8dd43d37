"""One printer: a transport plus its dialect (ESC/POS or ZPL). Blocking; run it in a thread.

``status()`` asks the printer itself, with a read deadline, and never turns
silence into "OK". ``send()`` moves rendered bytes. ``cancel()`` clears the
printer's buffer so a job that met a fault cannot print by itself later and
then again when it is retried. ``confirm()`` (ZPL) waits until the printer's
receive buffer holds no more formats, which is as close to "it came out" as
the protocol tells.
"""

from __future__ import annotations

import threading
import time
from typing import Literal

from drivers.printer.errors import TransportError
from drivers.printer.status import (
    ESCPOS_CLEAR_BUFFERS,
    ESCPOS_QUERIES,
    ZPL_CANCEL_ALL,
    ZPL_HOST_STATUS,
    PrinterStatus,
    escpos_reply_valid,
    parse_escpos,
    parse_host_status,
    unknown,
    unreachable,
    zpl_frames,
)
from drivers.printer.transport import Transport, open_transport

Kind = Literal["receipt", "label"]

# Module level so tests can shrink them.
STATUS_TIMEOUT_S = 1.0  # how long a printer has to answer one status query
CONFIRM_TIMEOUT_S = 10.0  # ZPL: how long a sent label may sit in the printer's buffer
CONFIRM_POLL_S = 0.1


class Printer:
    """A receipt (ESC/POS) or label (ZPL) printer at one URL."""

    def __init__(self, name: str, kind: Kind, transport: Transport, *,
                 status_timeout: float | None = None) -> None:
        self.name = name
        self.kind = kind
        self.transport = transport
        self.status_timeout = status_timeout or STATUS_TIMEOUT_S
        # One conversation at a time: a status query must not interleave with a job.
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @classmethod
    def from_url(cls, name: str, kind: Kind, url: str, *,
                 status_timeout: float | None = None) -> Printer:
        """Build from a device URL (BadDeviceUrl if it makes no sense; nothing is opened)."""
        return cls(name, kind, open_transport(url), status_timeout=status_timeout)

    @property
    def url(self) -> str:
        return self.transport.url

    @property
    def can_report(self) -> bool:
        """Whether this printer's answers can be read at all (not for file://)."""
        return self.transport.can_read

    def status(self) -> PrinterStatus:
        """Ask the printer. Unreachable: offline; silent: unknown (ESC/POS) or a fault (ZPL)."""
        if not self.transport.can_read:
            return unknown(f"{self.url} cannot report status: bytes are sent blind")
        with self._lock:
            try:
                self.transport.drain()
                if self.kind == "receipt":
                    return self._escpos_status()
                return self._zpl_status()
            except TransportError as exc:
                return unreachable(str(exc))

    def _escpos_status(self) -> PrinterStatus:
        replies: dict[int, int | None] = {}
        for n, query in ESCPOS_QUERIES.items():
            self.transport.write(query)
            byte = self._read_status_byte()
            replies[n] = byte
            if byte is None and n == 1:
                break  # silent to the first query: do not wait four times over
        return parse_escpos(replies)

    def _read_status_byte(self) -> int | None:
        deadline = time.monotonic() + self.status_timeout
        while (left := deadline - time.monotonic()) > 0:
            data = self.transport.read(1, left)
            if not data:
                return None
            # A printer with automatic status back on may send 4-byte ASB
            # blocks; skip bytes that cannot be a DLE EOT answer.
            if escpos_reply_valid(data[0]):
                return data[0]
        return None

    def _zpl_status(self) -> PrinterStatus:
        self.transport.write(ZPL_HOST_STATUS)
        buf = bytearray()
        deadline = time.monotonic() + self.status_timeout
        while (left := deadline - time.monotonic()) > 0:
            chunk = self.transport.read(256, left)
            if not chunk:
                break
            buf += chunk
            if zpl_frames(bytes(buf)) is not None:
                break  # a CR LF still on the wire is drained before the next query
        return parse_host_status(bytes(buf) or None)

    def send(self, data: bytes) -> None:
        """Write a rendered job; TransportError if the bytes did not all go."""
        with self._lock:
            self.transport.write(data)

    def cancel(self) -> None:
        """Clear the printer's buffers (best effort: the printer may be gone)."""
        with self._lock:
            try:
                if self.kind == "receipt":
                    self.transport.write(ESCPOS_CLEAR_BUFFERS)
                else:
                    self.transport.write(ZPL_CANCEL_ALL)
                if self.transport.can_read:
                    # The ESC/POS clear response (37 25 00) must not be taken
                    # for a status byte by the next query.
                    self.transport.read(16, min(self.status_timeout, 0.2))
                    self.transport.drain()
            except TransportError:
                pass

    def confirm(self, timeout: float | None = None) -> PrinterStatus:
        """After a send: the status once the printer has taken the job, or the last one seen.

        ZPL reports formats still waiting in its buffer, so this polls ``~HS``
        until that count is 0 or a fault shows (deadline ``CONFIRM_TIMEOUT_S``).
        ESC/POS has no such count: one status query.
        """
        status = self.status()
        if self.kind == "receipt":
            return status
        deadline = time.monotonic() + (timeout or CONFIRM_TIMEOUT_S)
        while (status.printable and status.formats_queued
               and time.monotonic() < deadline and not self._stop.is_set()):
            self._stop.wait(CONFIRM_POLL_S)
            status = self.status()
        return status

    def interrupt(self) -> None:
        """End a confirm() wait early, from any thread (shutting down)."""
        self._stop.set()

    def close(self) -> None:
        """Drop the connection (and end any confirm() wait)."""
        self._stop.set()
        with self._lock:
            self.transport.close()
