"""Typing: keyboard-mode scanners send key presses; this turns them back into text.

Shared by the USB HID boot-keyboard decoder (:mod:`hid`) and the Linux evdev
decoder (:mod:`evdev_keys`): each maps its own key codes to the key *names*
below (Linux ``KEY_*`` names without the prefix) and tracks its own modifiers.

Keyboard-mode scanners type as a US keyboard unless told otherwise; the layout
here is US. Control characters a barcode carries arrive as Ctrl+key (GS1's
group separator is Ctrl+], 0x1D) or as an Alt+keypad code (Alt held, keypad
0,0,2,9, Alt released -> 0x1D); both are decoded.
"""

from __future__ import annotations

# name -> (unshifted, shifted)
US_LAYOUT: dict[str, tuple[str, str]] = {
    **{c: (c.lower(), c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"},
    "1": ("1", "!"), "2": ("2", "@"), "3": ("3", "#"), "4": ("4", "$"), "5": ("5", "%"),
    "6": ("6", "^"), "7": ("7", "&"), "8": ("8", "*"), "9": ("9", "("), "0": ("0", ")"),
    "MINUS": ("-", "_"), "EQUAL": ("=", "+"), "LEFTBRACE": ("[", "{"), "RIGHTBRACE": ("]", "}"),
    "BACKSLASH": ("\\", "|"), "SEMICOLON": (";", ":"), "APOSTROPHE": ("'", '"'),
    "GRAVE": ("`", "~"), "COMMA": (",", "<"), "DOT": (".", ">"), "SLASH": ("/", "?"),
    "SPACE": (" ", " "), "102ND": ("\\", "|"),
    "ENTER": ("\r", "\r"), "KPENTER": ("\r", "\r"), "TAB": ("\t", "\t"),
    "ESC": ("\x1b", "\x1b"), "BACKSPACE": ("\x08", "\x08"),
    "KPSLASH": ("/", "/"), "KPASTERISK": ("*", "*"), "KPMINUS": ("-", "-"),
    "KPPLUS": ("+", "+"), "KPDOT": (".", "."),
    **{f"KP{d}": (str(d), str(d)) for d in range(10)},
}
# Ctrl+key -> the C0 control character (the classic terminal mapping).
CTRL_CHARS: dict[str, str] = {
    **{c: chr(ord(c) - 0x40) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"},
    "LEFTBRACE": "\x1b", "BACKSLASH": "\x1c", "RIGHTBRACE": "\x1d",  # Ctrl+] = GS (FNC1)
    "6": "\x1e", "MINUS": "\x1f", "2": "\x00",
}
KEYPAD_DIGITS = {f"KP{d}": str(d) for d in range(10)}


class KeyTyper:
    """Key presses (by name, with modifier state) to text; keeps Caps Lock and Alt codes."""

    def __init__(self) -> None:
        self._caps = False
        self._alt_digits = ""

    def press(self, key: str, *, shift: bool, ctrl: bool, alt: bool) -> str:
        """Text produced by pressing ``key``; "" for keys that type nothing."""
        if key == "CAPSLOCK":
            self._caps = not self._caps
            return ""
        if alt and key in KEYPAD_DIGITS:
            self._alt_digits = (self._alt_digits + KEYPAD_DIGITS[key])[-4:]
            return ""
        if ctrl:
            return CTRL_CHARS.get(key, "")
        pair = US_LAYOUT.get(key)
        if pair is None:
            return ""
        if self._caps and len(key) == 1 and key.isalpha():
            shift = not shift
        return pair[1] if shift else pair[0]

    def alt_released(self) -> str:
        """Alt went up: the character of the collected keypad code, if any."""
        digits, self._alt_digits = self._alt_digits, ""
        return chr(int(digits) % 256) if digits else ""


def keys_for_text(text: str) -> list[tuple[str, bool, bool]]:
    """(key name, shift, ctrl) presses that type ``text`` on a US layout (fixtures, sim)."""
    unshifted = {pair[0]: name for name, pair in US_LAYOUT.items()
                 if not name.startswith("KP") and name != "102ND"}
    shifted = {pair[1]: name for name, pair in US_LAYOUT.items()
               if not name.startswith("KP") and name != "102ND" and pair[1] != pair[0]}
    ctrl = {ch: name for name, ch in CTRL_CHARS.items()}
    out: list[tuple[str, bool, bool]] = []
    for ch in text:
        if ch in unshifted:
            out.append((unshifted[ch], False, False))
        elif ch in shifted:
            out.append((shifted[ch], True, False))
        elif ch in ctrl:
            out.append((ctrl[ch], False, True))
        else:
            raise ValueError(f"{ch!r} cannot be typed on a US keyboard")
    return out
