"""Barcode scanners: sans-I/O decoding (parse, framing, hid, evdev_keys) plus thin transports.

The daemon needs three names: :class:`ScannerReader` (one per ``[[devices]]``
entry of type ``scanner``), :class:`Scan` (what ``on_scan`` receives) and
:class:`ScannerError` (the root of what constructing a reader can raise).
"""

from __future__ import annotations

from drivers.scanner.errors import BadScannerConfig, DeviceGone, DeviceUnavailable, ScannerError
from drivers.scanner.options import ScannerOptions
from drivers.scanner.parse import Scan, parse_scan
from drivers.scanner.reader import ScannerReader
from drivers.scanner.sim import SIM_KNOWN_TAGS

__all__ = [
    "SIM_KNOWN_TAGS",
    "BadScannerConfig",
    "DeviceGone",
    "DeviceUnavailable",
    "Scan",
    "ScannerError",
    "ScannerOptions",
    "ScannerReader",
    "parse_scan",
]
