"""USB HID scanner reports to bytes: boot-keyboard mode and HID-POS mode.

Boot keyboard (HID 1.11, appendix B.1): 8-byte input reports
``[modifiers, reserved, key1..key6]``; the keys are usages of the Keyboard
page (0x07) held down at that moment. A character is typed when its key
*appears* in a report (n-key rollover: a key still held from the previous
report types nothing); a report full of ErrorRollOver (0x01) is phantom state
and changes nothing.

HID-POS (usage page 0x8C, Bar Code Scanner; the "Scanned Data Report",
usage 0x12): the layout the common scanners (Honeywell, Zebra, Datalogic in
"HID POS"/"USB HID bar code" mode) use for input report 0x02:

====== ===============================================================
offset content
====== ===============================================================
0      report ID 0x02
1      number of decoded-data bytes in this report (0..56)
2..4   symbology identifier (AIM, e.g. ``]d2``; zeros when off)
5..60  decoded data (56 bytes, zero padded)
61..62 vendor specific (Honeywell code ID)
63     bit 0: Decoded Data Continued (more reports follow for this read)
====== ===============================================================

A vendor with another layout gets its own :class:`PosLayout`. The decoded
data is the barcode's bytes as they are: no terminator, GS as 0x1D.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.scanner.keymap import KeyTyper, keys_for_text

# Modifier byte bits.
LCTRL, LSHIFT, LALT, LGUI, RCTRL, RSHIFT, RALT, RGUI = (1 << i for i in range(8))
CTRL = LCTRL | RCTRL
SHIFT = LSHIFT | RSHIFT
ALT = LALT  # right Alt is AltGr on most layouts: not an Alt-code modifier
ERROR_ROLLOVER = 0x01

# Keyboard page usages -> key names (Linux KEY_* names without the prefix).
USAGE_NAMES: dict[int, str] = {
    **{0x04 + i: chr(ord("A") + i) for i in range(26)},
    **{0x1E + i: str((i + 1) % 10) for i in range(10)},  # 1..9, 0
    0x28: "ENTER", 0x29: "ESC", 0x2A: "BACKSPACE", 0x2B: "TAB", 0x2C: "SPACE",
    0x2D: "MINUS", 0x2E: "EQUAL", 0x2F: "LEFTBRACE", 0x30: "RIGHTBRACE", 0x31: "BACKSLASH",
    0x32: "BACKSLASH",  # Non-US # and ~: Linux maps it to KEY_BACKSLASH too
    0x33: "SEMICOLON", 0x34: "APOSTROPHE", 0x35: "GRAVE", 0x36: "COMMA", 0x37: "DOT",
    0x38: "SLASH", 0x39: "CAPSLOCK",
    0x54: "KPSLASH", 0x55: "KPASTERISK", 0x56: "KPMINUS", 0x57: "KPPLUS", 0x58: "KPENTER",
    **{0x59 + i: f"KP{i + 1}" for i in range(9)}, 0x62: "KP0", 0x63: "KPDOT", 0x64: "102ND",
}
NAME_USAGES: dict[str, int] = {}
for _usage, _name in USAGE_NAMES.items():
    NAME_USAGES.setdefault(_name, _usage)


class BootKeyboardDecoder:
    """Boot-keyboard input reports to text; one instance per device (it keeps key state)."""

    def __init__(self, report_id: int | None = None) -> None:
        self._report_id = report_id
        self._held: set[int] = set()
        self._alt = False
        self._typer = KeyTyper()
        self.ignored_reports = 0  # malformed or phantom reports seen

    def feed(self, report: bytes) -> str:
        """Text typed by one report ("" for releases, modifiers, phantom state)."""
        if self._report_id is not None:
            if len(report) != 9 or report[0] != self._report_id:
                self.ignored_reports += 1
                return ""
            report = report[1:]
        if len(report) != 8:
            self.ignored_reports += 1
            return ""
        mods, keys = report[0], [k for k in report[2:8] if k]
        if ERROR_ROLLOVER in keys:
            self.ignored_reports += 1
            return ""
        out = []
        alt = bool(mods & ALT)
        for key in keys:
            if key in self._held:
                continue
            name = USAGE_NAMES.get(key)
            if name is not None:
                out.append(self._typer.press(name, shift=bool(mods & SHIFT),
                                             ctrl=bool(mods & CTRL), alt=alt))
        if self._alt and not alt:
            out.append(self._typer.alt_released())
        self._alt = alt
        self._held = set(keys)
        return "".join(out)

    def reset(self) -> None:
        """Forget held keys (after a reopen)."""
        self._held.clear()
        self._alt = False
        self._typer = KeyTyper()


def encode_keyboard_reports(text: str, *, rollover: bool = False) -> list[bytes]:
    """Boot-keyboard reports that type ``text``, press then release per key.

    With ``rollover`` the next key goes down before the previous one is
    released when they differ, as fast scanners do. For fixtures and sims.
    """
    reports: list[bytes] = []
    previous: tuple[int, int] | None = None  # (usage, modifiers) still held
    for name, shift, ctrl in keys_for_text(text):
        usage = NAME_USAGES[name]
        mods = (LSHIFT if shift else 0) | (LCTRL if ctrl else 0)
        if previous is not None:
            if rollover and previous[0] != usage and previous[1] == mods:
                reports.append(bytes([mods, 0, previous[0], usage, 0, 0, 0, 0]))
                reports.append(bytes([mods, 0, usage, 0, 0, 0, 0, 0]))
                previous = (usage, mods)
                continue
            reports.append(bytes(8))
        reports.append(bytes([mods, 0, usage, 0, 0, 0, 0, 0]))
        previous = (usage, mods)
    if previous is not None:
        reports.append(bytes(8))
    return reports


@dataclass(frozen=True)
class PosLayout:
    """Where the fields of a vendor's HID-POS scanned-data report are."""

    report_id: int = 0x02
    length_at: int = 1
    aim_at: int | None = 2  # None: this vendor sends no symbology identifier
    data_at: int = 5
    data_max: int = 56
    more_at: int = 63  # byte whose bit 0 says "Decoded Data Continued"


HONEYWELL_POS = PosLayout()


@dataclass(frozen=True)
class PosChunk:
    """One HID-POS report's share of a read."""

    aim: bytes
    data: bytes
    more: bool


def decode_pos_report(report: bytes, layout: PosLayout = HONEYWELL_POS) -> PosChunk | None:
    """The chunk one scanned-data report carries; None for other reports or malformed ones."""
    if len(report) <= layout.data_at or report[0] != layout.report_id:
        return None
    length = min(report[layout.length_at], layout.data_max)
    data = report[layout.data_at: layout.data_at + length]
    if len(data) != length:
        return None
    aim = b""
    if layout.aim_at is not None:
        aim = report[layout.aim_at: layout.aim_at + 3].rstrip(b"\0")
        if aim and not aim.startswith(b"]"):
            aim = b"]" + aim[:2]
    more = len(report) > layout.more_at and bool(report[layout.more_at] & 1)
    return PosChunk(aim, data, more)


class HidPosAssembler:
    """HID-POS reports to whole reads (AIM identifier + data), across continuations."""

    MAX_READ = 1 << 16  # a runaway "continued" chain is cut here

    def __init__(self, layout: PosLayout = HONEYWELL_POS) -> None:
        self._layout = layout
        self._aim: bytes | None = None
        self._data = bytearray()
        self.ignored_reports = 0

    def feed(self, report: bytes) -> bytes | None:
        """A complete read once its last report arrives; None until then."""
        chunk = decode_pos_report(report, self._layout)
        if chunk is None:
            self.ignored_reports += 1
            return None
        if self._aim is None:
            self._aim = chunk.aim
        self._data += chunk.data
        if chunk.more and len(self._data) < self.MAX_READ:
            return None
        read = self._aim + bytes(self._data)
        self._aim, self._data = None, bytearray()
        return read

    def reset(self) -> None:
        """Drop a half-assembled read (after a reopen)."""
        self._aim, self._data = None, bytearray()


def encode_pos_reports(data: bytes, aim: bytes = b"", layout: PosLayout = HONEYWELL_POS,
                       size: int = 64) -> list[bytes]:
    """Scanned-data reports carrying one read (for fixtures and sims)."""
    reports = []
    chunks = [data[i: i + layout.data_max] for i in range(0, len(data), layout.data_max)] or [b""]
    for i, chunk in enumerate(chunks):
        report = bytearray(size)
        report[0] = layout.report_id
        report[layout.length_at] = len(chunk)
        if layout.aim_at is not None and aim:
            report[layout.aim_at: layout.aim_at + 3] = aim[:3].ljust(3, b"\0")
        report[layout.data_at: layout.data_at + len(chunk)] = chunk
        if i < len(chunks) - 1:
            report[layout.more_at] |= 1
        reports.append(bytes(report))
    return reports
