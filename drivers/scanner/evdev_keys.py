"""Linux input events from a keyboard-wedge scanner to text.

The kernel delivers ``struct input_event`` records: ``EV_KEY`` with value 1
(press), 0 (release) or 2 (autorepeat), framed by ``EV_MSC/MSC_SCAN`` and
``EV_SYN``. A character is typed on a press; Shift/Ctrl/Alt are tracked from
their own press and release events; ``KEY_ENTER`` types CR, which framing
takes as the terminator. Autorepeat is ignored: a scanner types each
character with its own press, and repeats only come from a key stuck down.

Key codes are the stable kernel ABI (``linux/input-event-codes.h``); they are
written out here so this module works without python-evdev, and a test checks
them against ``evdev.ecodes``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from drivers.scanner.keymap import KeyTyper, keys_for_text

EV_SYN, EV_KEY, EV_MSC = 0x00, 0x01, 0x04
SYN_REPORT, MSC_SCAN = 0, 4
KEY_RELEASE, KEY_PRESS, KEY_REPEAT = 0, 1, 2
# struct input_event on 64-bit Linux: struct timeval (two longs), __u16 type,
# __u16 code, __s32 value.
INPUT_EVENT = struct.Struct("@llHHi")

KEY_CODES: dict[str, int] = {
    "ESC": 1, **{str(d): 1 + d for d in range(1, 10)}, "0": 11, "MINUS": 12, "EQUAL": 13,
    "BACKSPACE": 14, "TAB": 15,
    **dict(zip("QWERTYUIOP", range(16, 26), strict=True)), "LEFTBRACE": 26, "RIGHTBRACE": 27,
    "ENTER": 28, "LEFTCTRL": 29,
    **dict(zip("ASDFGHJKL", range(30, 39), strict=True)), "SEMICOLON": 39, "APOSTROPHE": 40,
    "GRAVE": 41, "LEFTSHIFT": 42, "BACKSLASH": 43,
    **dict(zip("ZXCVBNM", range(44, 51), strict=True)), "COMMA": 51, "DOT": 52, "SLASH": 53,
    "RIGHTSHIFT": 54, "KPASTERISK": 55, "LEFTALT": 56, "SPACE": 57, "CAPSLOCK": 58,
    "KP7": 71, "KP8": 72, "KP9": 73, "KPMINUS": 74, "KP4": 75, "KP5": 76, "KP6": 77,
    "KPPLUS": 78, "KP1": 79, "KP2": 80, "KP3": 81, "KP0": 82, "KPDOT": 83, "102ND": 86,
    "KPENTER": 96, "RIGHTCTRL": 97, "KPSLASH": 98, "RIGHTALT": 100,
}
CODE_NAMES = {code: name for name, code in KEY_CODES.items()}
SHIFTS = frozenset({KEY_CODES["LEFTSHIFT"], KEY_CODES["RIGHTSHIFT"]})
CTRLS = frozenset({KEY_CODES["LEFTCTRL"], KEY_CODES["RIGHTCTRL"]})
ALTS = frozenset({KEY_CODES["LEFTALT"]})  # right Alt is AltGr, not an Alt-code modifier
MODIFIERS = SHIFTS | CTRLS | ALTS | {KEY_CODES["RIGHTALT"]}


class EvdevKeyDecoder:
    """(type, code, value) input events to text; one instance per device."""

    def __init__(self) -> None:
        self._down: set[int] = set()
        self._typer = KeyTyper()

    def feed(self, type_: int, code: int, value: int) -> str:
        """Text typed by one event ("" for everything but character presses)."""
        if type_ != EV_KEY:
            return ""
        if code in MODIFIERS:
            if value == KEY_PRESS:
                self._down.add(code)
            elif value == KEY_RELEASE:
                was_alt = bool(self._down & ALTS)
                self._down.discard(code)
                if was_alt and not self._down & ALTS:
                    return self._typer.alt_released()
            return ""
        if value != KEY_PRESS:
            return ""
        name = CODE_NAMES.get(code)
        if name is None:
            return ""
        return self._typer.press(name, shift=bool(self._down & SHIFTS),
                                 ctrl=bool(self._down & CTRLS), alt=bool(self._down & ALTS))

    def feed_many(self, events: Iterable[tuple[int, int, int]]) -> str:
        """Text typed by a run of events."""
        return "".join(self.feed(t, c, v) for t, c, v in events)

    def reset(self) -> None:
        """Forget held modifiers (after a reopen)."""
        self._down.clear()
        self._typer = KeyTyper()


def unpack_events(data: bytes) -> list[tuple[float, int, int, int]]:
    """(time, type, code, value) from raw ``input_event`` bytes; a torn tail is dropped."""
    out = []
    usable = len(data) - len(data) % INPUT_EVENT.size
    for sec, usec, type_, code, value in INPUT_EVENT.iter_unpack(data[:usable]):
        out.append((sec + usec / 1e6, type_, code, value))
    return out


def encode_key_events(text: str, *, start: float = 0.0, step: float = 0.001) -> bytes:
    """Raw ``input_event`` bytes of a keyboard wedge typing ``text`` (fixtures, sims).

    Shaped like the kernel's output for a USB keyboard: each key change is
    ``MSC_SCAN`` (its HID usage), ``EV_KEY``, ``SYN_REPORT``.
    """
    from drivers.scanner.hid import NAME_USAGES  # usage numbers for MSC_SCAN

    t = start
    out = bytearray()

    def emit(type_: int, code: int, value: int) -> None:
        sec = int(t)
        out.extend(INPUT_EVENT.pack(sec, round((t - sec) * 1e6), type_, code, value))

    def key(name: str, value: int) -> None:
        nonlocal t
        usage = NAME_USAGES.get(name, 0xE0 + {"LEFTCTRL": 0, "LEFTSHIFT": 1}.get(name, 0))
        emit(EV_MSC, MSC_SCAN, 0x70000 | usage)
        emit(EV_KEY, KEY_CODES[name], value)
        emit(EV_SYN, SYN_REPORT, 0)
        t += step

    for name, shift, ctrl in keys_for_text(text):
        mod = "LEFTSHIFT" if shift else "LEFTCTRL" if ctrl else None
        if mod:
            key(mod, KEY_PRESS)
        key(name, KEY_PRESS)
        key(name, KEY_RELEASE)
        if mod:
            key(mod, KEY_RELEASE)
    return bytes(out)
