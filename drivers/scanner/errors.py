"""Errors of the scanner driver.

``drivers/`` never imports ``agent/``, so these do not derive from
``AgentError``; the daemon maps them once, at the seam where it starts a
reader. Messages name the device and the next step; the facts are attributes.
"""

from __future__ import annotations

from drivers.errors import DriverError


class ScannerError(DriverError):
    """Root of every scanner driver error."""


class BadScannerConfig(ScannerError):
    """A device URL or option cannot be used; ``key`` names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


class DeviceUnavailable(ScannerError):
    """The device cannot be opened now (not plugged in, busy, no permission)."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: cannot open ({reason})")


class DeviceGone(ScannerError):
    """An open device stopped answering: unplugged, port closed, peer gone."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where} vanished ({reason})")
