"""The printer driver's errors.

``drivers/`` never imports ``agent/``, so this is a small tree of its own; the
agent maps :class:`PrinterError` to its ``DeviceError`` at the one boundary
that meets it. Messages name the printer URL (or field) and the next step; the
same facts are kept on attributes.
"""

from __future__ import annotations

from drivers.errors import DriverError


class PrinterError(DriverError):
    """Root of every printer driver error."""


class BadDeviceUrl(PrinterError):
    """A printer URL cannot be used; ``url`` and ``reason`` say why."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"printer URL {url!r}: {reason} (use tcp://HOST:9100, "
            f"serial:///dev/ttyUSB0?baudrate=9600, usb://VID:PID, file:///path "
            f"or sim://receipt|label)"
        )


class TransportError(PrinterError):
    """Bytes could not be moved to or from the printer at ``url``."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"printer {url}: {reason}")


class RenderError(PrinterError):
    """A receipt or label cannot be rendered; ``field`` names the input at fault."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class OptionsError(PrinterError):
    """A printer's options (keys of its ``[[devices]]`` entry) are not usable; ``key`` names one."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"printer option {key}: {reason}")
