"""A scanner's options, from its ``[[devices]]`` entry and its URL query.

```toml
[[devices]]
id = "counter-1-scanner"
type = "scanner"
url = "serial:///dev/ttyACM0?baudrate=9600"
terminator = "crlf"      # cr | lf | crlf | tab | any (default: CR, LF or CRLF) | none
idle_timeout_ms = 80     # a read also ends after this much silence (default 50 with "none")
prefix = "\u0002"        # stripped from the front of a read when present
suffix = "\u0003"        # stripped from the end of a read when present
debounce_ms = 500        # the same code again within this window counts once (0: off)
max_length = 4096        # a longer read is reported invalid and skipped to the next terminator
baudrate = 9600          # serial only
hid_mode = "auto"        # usb:// only: auto | keyboard | pos
grab = true              # evdev:// only: take the keyboard exclusively
```

Query parameters of the URL (``?baudrate=9600``) are options too; keys of the
entry override them. Unknown keys are errors naming the key, so a typo
(``debounce = 500``) does not silently leave the default in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from drivers.scanner.errors import BadScannerConfig

TERMINATORS: dict[str, tuple[bytes, ...]] = {
    "cr": (b"\r",),
    "lf": (b"\n",),
    "crlf": (b"\r\n",),
    "tab": (b"\t",),
    "any": (b"\r", b"\n"),  # CRLF is CR then an empty line, which framing drops
    "none": (),
}
HID_MODES = ("auto", "keyboard", "pos")
DEFAULT_IDLE_MS_WITHOUT_TERMINATOR = 50
# Keys of a [[devices]] entry that are the daemon's, not the scanner's.
DEVICE_KEYS = frozenset({"id", "type", "url", "name", "model", "room", "enabled", "description"})


@dataclass(frozen=True)
class ScannerOptions:
    """Validated scanner options; defaults suit a factory-configured USB scanner."""

    terminator: str = "any"
    idle_timeout_ms: int | None = None
    prefix: bytes = b""
    suffix: bytes = b""
    debounce_ms: int = 500
    max_length: int = 4096
    baudrate: int = 9600
    hid_mode: str = "auto"
    grab: bool = True

    @property
    def terminators(self) -> tuple[bytes, ...]:
        """Byte sequences that end a read."""
        return TERMINATORS[self.terminator]

    @property
    def idle_timeout_s(self) -> float | None:
        """Silence that ends a read, in seconds; None when only a terminator does."""
        if self.idle_timeout_ms is not None:
            return self.idle_timeout_ms / 1000
        if self.terminator == "none":
            return DEFAULT_IDLE_MS_WITHOUT_TERMINATOR / 1000
        return None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, where: str = "scanner",
                     ignore: frozenset[str] = DEVICE_KEYS) -> ScannerOptions:
        """Options from a device entry (and URL query); errors name ``where.key``."""
        known = {f.name for f in fields(cls)}
        out: dict[str, Any] = {}
        for key, value in values.items():
            if key in ignore:
                continue
            if key not in known:
                raise BadScannerConfig(f"{where}.{key}",
                                       f"unknown scanner option; known: {', '.join(sorted(known))}")
            out[key] = _convert(f"{where}.{key}", key, value)
        return cls(**out)


def _convert(path: str, key: str, value: Any) -> Any:
    if key == "terminator":
        text = str(value).lower()
        if text not in TERMINATORS:
            raise BadScannerConfig(path, f"must be one of {', '.join(TERMINATORS)}, got {value!r}")
        return text
    if key == "hid_mode":
        text = str(value).lower()
        if text not in HID_MODES:
            raise BadScannerConfig(path, f"must be one of {', '.join(HID_MODES)}, got {value!r}")
        return text
    if key in ("prefix", "suffix"):
        if isinstance(value, bytes):
            return value
        if not isinstance(value, str):
            raise BadScannerConfig(path, f"must be a string, got {value!r}")
        return value.encode("utf-8")
    if key == "grab":
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise BadScannerConfig(path, f"must be true or false, got {value!r}")
    limits = {"idle_timeout_ms": (1, 60_000), "debounce_ms": (0, 600_000),
              "max_length": (16, 1 << 20), "baudrate": (50, 4_000_000)}
    low, high = limits[key]
    try:
        number = int(value)
        if isinstance(value, bool) or str(number) != str(value).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise BadScannerConfig(path, f"must be a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise BadScannerConfig(path, f"must be {low}..{high}, got {number}")
    return number
