"""The sensor drivers' errors.

``drivers/`` never imports ``agent/``, so these do not derive from
``agent.errors.AgentError``; the daemon maps them once at its boundary
(``SensorConfigError`` -> ``ConfigError``, ``SensorError`` -> ``DeviceError``).
Device faults met while polling are *not* raised: they become an invalid
:class:`~drivers.sensor.reading.Sample` with a reason, so one lying sensor never
stops the loop. These exceptions are for things a retry cannot fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.errors import DriverError


class SensorError(DriverError):
    """A sensor cannot be set up; ``device`` is its configured id (or the URL)."""

    def __init__(self, device: str, message: str) -> None:
        self.device = device
        super().__init__(f"{device}: {message}")


@dataclass(frozen=True)
class SensorConfigIssue:
    """One problem in a sensor or room config: the dotted key path and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SensorConfigError(SensorError):
    """A sensor/room config cannot be used; ``issues`` lists every problem found."""

    def __init__(self, device: str, issues: list[SensorConfigIssue]) -> None:
        self.issues = issues
        super().__init__(device, "; ".join(str(i) for i in issues))


class CrcError(SensorError):
    """A frame failed its checksum (an SCD4x word); the bytes are kept for the log."""

    def __init__(self, device: str, word_index: int, data: bytes, expected: int) -> None:
        self.word_index = word_index
        self.data = data
        self.expected = expected
        super().__init__(
            device,
            f"CRC mismatch on word {word_index} ({data.hex()}: expected CRC {expected:#04x}); "
            "check the I2C wiring and pull-ups",
        )


class ModbusFault(DriverError):
    """A request failed: ``code`` is a reading fault code (no_answer, exception)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)
