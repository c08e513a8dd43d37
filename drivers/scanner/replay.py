"""Recorded reports and events, played back at the transport boundary.

The mock sources ship in the package (not in tests) so the daemon's tests,
the bench and a support engineer replaying a customer's capture all use the
same code path the real pyusb/evdev sources feed:

- :class:`ReplayReportSource` stands where :class:`PyUsbReportSource` does;
- :class:`ReplayEventSource` stands where :class:`PyEvdevSource` does.

Both are fed through a queue (``push``), and ``vanish()`` makes the next read
raise :class:`DeviceGone`, as an unplug does. HID captures are read in
hid-recorder's text format (hid-tools: ``N:`` name, ``I:`` bus/vid/pid,
``R:`` report descriptor, ``E: <sec.usec> <len> <hex bytes>`` per report);
evdev captures are the raw ``struct input_event`` bytes a read of
``/dev/input/eventN`` returns.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from pathlib import Path

from drivers.scanner.errors import DeviceGone
from drivers.scanner.evdev_keys import unpack_events

_GONE = object()


@dataclass(frozen=True)
class HidRecording:
    """A hid-recorder capture."""

    name: str = ""
    bus: int = 3
    vid: int = 0
    pid: int = 0
    descriptor: bytes = b""
    reports: list[bytes] = field(default_factory=list)


def load_hid_recording(path: str | Path) -> HidRecording:
    """Parse a hid-recorder text capture; unknown lines (comments, ``D:``) are skipped."""
    name, bus, vid, pid, descriptor, reports = "", 3, 0, 0, b"", []
    for line in Path(path).read_text().splitlines():
        tag, _, rest = line.partition(":")
        rest = rest.strip()
        if tag == "N":
            name = rest
        elif tag == "I":
            fields = rest.split()
            bus, vid, pid = int(fields[0], 16), int(fields[1], 16), int(fields[2], 16)
        elif tag == "R":
            fields = rest.split()
            descriptor = bytes.fromhex("".join(fields[1:]))
        elif tag == "E":
            fields = rest.split()
            length = int(fields[1])
            report = bytes.fromhex("".join(fields[2:]))
            if len(report) != length:
                raise ValueError(f"{path}: report length {len(report)} != declared {length}: "
                                 f"{line!r}")
            reports.append(report)
    return HidRecording(name, bus, vid, pid, descriptor, reports)


def dump_hid_recording(rec: HidRecording, *, interval: float = 0.004) -> str:
    """hid-recorder text for a capture (the inverse of :func:`load_hid_recording`)."""
    lines = [f"N: {rec.name}", f"I: {rec.bus:x} {rec.vid:04x} {rec.pid:04x}"]
    if rec.descriptor:
        lines.append(f"R: {len(rec.descriptor)} " + " ".join(f"{b:02x}" for b in rec.descriptor))
    for i, report in enumerate(rec.reports):
        t = i * interval
        lines.append(f"E: {int(t):06d}.{round((t % 1) * 1e6):06d} {len(report)} "
                     + " ".join(f"{b:02x}" for b in report))
    return "\n".join(lines) + "\n"


class ReplayReportSource:
    """HID reports from a queue, in place of a USB device."""

    def __init__(self, reports: list[bytes] | None = None, *, hid_protocol: int = 1,
                 where: str = "replay") -> None:
        self.hid_protocol = hid_protocol
        self.where = where
        self._q: queue.Queue[object] = queue.Queue()
        self.closed = False
        self.push(reports or [])

    def push(self, reports: list[bytes]) -> None:
        """Queue reports for the reader (thread-safe)."""
        for report in reports:
            self._q.put(report)

    def vanish(self) -> None:
        """The next read after the queued reports raises DeviceGone."""
        self._q.put(_GONE)

    def read_report(self, timeout: float) -> bytes | None:
        """The next queued report, or None when none comes within ``timeout``."""
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _GONE:
            raise DeviceGone(self.where, "unplugged (replay)")
        assert isinstance(item, bytes)
        return item

    def close(self) -> None:
        """Nothing to release."""
        self.closed = True


class ReplayEventSource:
    """Input events from a queue, in place of ``/dev/input/eventN``."""

    def __init__(self, raw: bytes = b"", *, where: str = "replay") -> None:
        self.where = where
        self._q: queue.Queue[object] = queue.Queue()
        self.closed = False
        if raw:
            self.push_raw(raw)

    def push_raw(self, raw: bytes) -> None:
        """Queue raw ``input_event`` bytes, one read's worth per SYN_REPORT batch."""
        self.push([(t, c, v) for _, t, c, v in unpack_events(raw)])

    def push(self, events: list[tuple[int, int, int]]) -> None:
        """Queue (type, code, value) events (thread-safe)."""
        self._q.put(list(events))

    def vanish(self) -> None:
        """The next read after the queued events raises DeviceGone."""
        self._q.put(_GONE)

    def read_events(self, timeout: float) -> list[tuple[int, int, int]]:
        """The next queued batch, or [] when none comes within ``timeout``."""
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return []
        if item is _GONE:
            raise DeviceGone(self.where, "unplugged (replay)")
        assert isinstance(item, list)
        return item

    def close(self) -> None:
        """Nothing to release."""
        self.closed = True
