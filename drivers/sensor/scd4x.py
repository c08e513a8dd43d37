"""Sensirion SCD4x (SCD40/SCD41) CO2/T/RH over I2C: the protocol as pure code, smbus2 as transport.

The protocol (datasheet "SCD4x", I2C commands): every command is a 16-bit word;
every data word, sent or received, is followed by a CRC-8 (polynomial 0x31,
init 0xFF, no reflection, no final XOR), checked on *every* word here. After
each command the sensor needs its execution time before it can be read, and
during periodic measurement only a few commands are accepted (the rest are
NACKed), so :meth:`Scd4xSensor.start` stops measurement first.

Automatic self-calibration (ASC) is turned OFF by default: ASC assumes the
sensor sees fresh air (about 400 ppm) at least once a week and pulls its
lowest reading toward 400 ppm. A CO2-enriched grow room never drops that low,
so ASC would drag every reading down over the weeks. ``asc=1`` in the URL turns
it on, with a warning saying why that is risky.

The bus is injected (anything with smbus2's ``i2c_rdwr(*msgs)``), so tests drive
the real driver through :class:`~drivers.sensor.scd4x_fake.FakeScd4x`, which
speaks the command protocol with real CRCs. Every call blocks: run it in a thread.

URL: ``i2c:///dev/i2c-1?address=0x62&asc=0&temperature_offset=4.0``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

from smbus2 import i2c_msg

from drivers.sensor.errors import CrcError, SensorConfigError, SensorConfigIssue
from drivers.sensor.reading import Sample, failed

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = 0x62

START_PERIODIC_MEASUREMENT = 0x21B1
READ_MEASUREMENT = 0xEC05
STOP_PERIODIC_MEASUREMENT = 0x3F86
GET_DATA_READY_STATUS = 0xE4B8
SET_AUTOMATIC_SELF_CALIBRATION_ENABLED = 0x2416
GET_AUTOMATIC_SELF_CALIBRATION_ENABLED = 0x2313
SET_TEMPERATURE_OFFSET = 0x241D
GET_SERIAL_NUMBER = 0x3682

# Execution times (s) from the datasheet: wait this long after a command.
EXECUTION_S = {
    START_PERIODIC_MEASUREMENT: 0.0,
    READ_MEASUREMENT: 0.001,
    STOP_PERIODIC_MEASUREMENT: 0.5,
    GET_DATA_READY_STATUS: 0.001,
    SET_AUTOMATIC_SELF_CALIBRATION_ENABLED: 0.001,
    GET_AUTOMATIC_SELF_CALIBRATION_ENABLED: 0.001,
    SET_TEMPERATURE_OFFSET: 0.001,
    GET_SERIAL_NUMBER: 0.001,
}
MEASUREMENT_INTERVAL_S = 5.0  # periodic mode: a new measurement every 5 s


# --- the protocol, no I/O -----------------------------------------------------------------

def crc8(data: bytes) -> int:
    """Sensirion CRC-8: polynomial 0x31, init 0xFF. crc8(b"\\xbe\\xef") == 0x92."""
    crc = 0xFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def encode_command(command: int, *args: int) -> bytes:
    """The bytes to write: the command word, then each argument word with its CRC."""
    frame = bytearray(command.to_bytes(2, "big"))
    for arg in args:
        word = (arg & 0xFFFF).to_bytes(2, "big")
        frame += word + bytes([crc8(word)])
    return bytes(frame)


def encode_words(words: Sequence[int]) -> bytes:
    """What the sensor sends for ``words``: each word and its CRC (for fakes and tests)."""
    out = bytearray()
    for w in words:
        word = w.to_bytes(2, "big")
        out += word + bytes([crc8(word)])
    return bytes(out)


def decode_words(data: bytes, device: str = "scd4x") -> list[int]:
    """The words in a response, every CRC checked; raises :class:`CrcError` on the first bad one."""
    if len(data) % 3:
        raise ValueError(f"{device}: {len(data)} bytes is not a whole number of words")
    words = []
    for i in range(0, len(data), 3):
        chunk = data[i:i + 2]
        expected = crc8(chunk)
        if data[i + 2] != expected:
            raise CrcError(device, i // 3, data[i:i + 3], expected)
        words.append(int.from_bytes(chunk, "big"))
    return words


def data_ready(status_word: int) -> bool:
    """get_data_ready_status: a measurement is waiting unless the low 11 bits are all 0."""
    return status_word & 0x07FF != 0


@dataclass(frozen=True, slots=True)
class Measurement:
    co2_ppm: float
    temperature_c: float
    rh_pct: float


def decode_measurement(words: Sequence[int]) -> Measurement:
    """read_measurement's words: CO2 ppm, T = -45 + 175 raw / 65535, RH = 100 raw / 65535."""
    co2, t_raw, rh_raw = words
    return Measurement(float(co2), -45.0 + 175.0 * t_raw / 65535.0, 100.0 * rh_raw / 65535.0)


def encode_temperature_offset(offset_c: float) -> int:
    """set_temperature_offset's argument: offset * 65535 / 175."""
    return round(offset_c * 65535.0 / 175.0)


# --- the transport --------------------------------------------------------------------------

class I2cBus(Protocol):
    """The part of smbus2.SMBus the driver uses."""

    def i2c_rdwr(self, *i2c_msgs: i2c_msg) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Scd4xUrl:
    bus: str
    address: int = DEFAULT_ADDRESS
    asc: bool = False
    temperature_offset_c: float | None = None

    @classmethod
    def parse(cls, url: str, device: str = "scd4x") -> Scd4xUrl:
        parts = urlsplit(url)
        issues: list[SensorConfigIssue] = []
        if parts.scheme != "i2c" or parts.netloc or not parts.path:
            raise SensorConfigError(device, [SensorConfigIssue(
                "url", f"{url!r}: expected i2c:///dev/i2c-1?address=0x62")])
        values: dict[str, object] = {}
        for key, raw in parse_qsl(parts.query, keep_blank_values=True):
            try:
                if key == "address":
                    address = int(raw, 0)
                    if not 0x03 <= address <= 0x77:
                        raise ValueError
                    values["address"] = address
                elif key == "asc":
                    if raw not in ("0", "1", "true", "false", "on", "off"):
                        raise ValueError
                    values["asc"] = raw in ("1", "true", "on")
                elif key == "temperature_offset":
                    offset = float(raw)
                    if not 0.0 <= offset <= 20.0:
                        raise ValueError
                    values["temperature_offset_c"] = offset
                else:
                    issues.append(SensorConfigIssue(
                        f"url.{key}", "unknown key; known: address, asc, temperature_offset"))
            except ValueError:
                hint = {"address": "a 7-bit I2C address such as 0x62",
                        "asc": "0 or 1 (automatic self-calibration)",
                        "temperature_offset": "degrees C, 0..20"}[key]
                issues.append(SensorConfigIssue(f"url.{key}", f"{raw!r}: must be {hint}"))
        if issues:
            raise SensorConfigError(device, issues)
        return cls(bus=parts.path, **values)  # type: ignore[arg-type]


ASC_WARNING = (
    "automatic self-calibration is ON: it assumes this sensor sees fresh air (~400 ppm) "
    "at least once a week and pulls its lowest reading toward 400 ppm. A CO2-enriched room "
    "never does, so readings will drift low by hundreds of ppm over weeks. Set asc=0 in the "
    "URL and calibrate against a reference instead"
)


class Scd4xSensor:
    """One SCD4x on an injected bus (the SensorSource protocol); starts itself on first read."""

    def __init__(self, bus: I2cBus, address: int = DEFAULT_ADDRESS, *, asc: bool = False,
                 temperature_offset_c: float | None = None, device: str = "scd4x",
                 bus_name: str = "i2c", sleep: Callable[[float], None] = time.sleep) -> None:
        self.bus = bus
        self.address = address
        self.asc = asc
        self.temperature_offset_c = temperature_offset_c
        self.device = device
        self.describe = f"SCD4x at {address:#04x} on {bus_name}"
        self.warnings: list[str] = []
        self._sleep = sleep
        self._started = False

    @classmethod
    def open(cls, url: str, device: str = "scd4x",
             sleep: Callable[[float], None] = time.sleep) -> Scd4xSensor:
        from smbus2 import SMBus

        parsed = Scd4xUrl.parse(url, device)
        bus: I2cBus
        try:
            bus = SMBus(parsed.bus)
        except OSError as exc:
            # Not fatal: the poller reports the sensor down and we retry on each poll.
            log.debug("%s: cannot open %s yet: %s", device, parsed.bus, exc)
            bus = _ReopeningBus(parsed.bus)
        return cls(bus, parsed.address, asc=parsed.asc,
                   temperature_offset_c=parsed.temperature_offset_c, device=device,
                   bus_name=parsed.bus, sleep=sleep)

    def start(self) -> None:
        """Stop any running measurement, set ASC (and the T offset), start periodic measurement."""
        # A previous process may have left the sensor measuring; in that mode the
        # configuration commands are NACKed.
        self._command(STOP_PERIODIC_MEASUREMENT)
        self._command(SET_AUTOMATIC_SELF_CALIBRATION_ENABLED, int(self.asc))
        (enabled,) = self._query(GET_AUTOMATIC_SELF_CALIBRATION_ENABLED, 1)
        if bool(enabled) != self.asc:
            raise OSError(f"ASC read back as {enabled} after setting it to {int(self.asc)}")
        if self.asc:
            message = f"{self.device}: {ASC_WARNING}"
            if message not in self.warnings:
                self.warnings.append(message)
            log.warning("%s", message)
        if self.temperature_offset_c is not None:
            self._command(SET_TEMPERATURE_OFFSET,
                          encode_temperature_offset(self.temperature_offset_c))
        self._command(START_PERIODIC_MEASUREMENT)
        self._started = True

    def read(self, now: float) -> Sample | None:
        """The newest measurement, None when none is new yet, or a failed Sample (NACK, CRC)."""
        try:
            if not self._started:
                self.start()
            (status,) = self._query(GET_DATA_READY_STATUS, 1)
            if not data_ready(status):
                return None
            m = decode_measurement(self._query(READ_MEASUREMENT, 3))
        except CrcError as exc:
            return failed("crc", str(exc))
        except OSError as exc:
            # NACK (errno 121/6) or the adapter went away: start over on the next poll,
            # the sensor may have lost power and be idle.
            self._started = False
            return failed("no_answer", f"no answer from {self.describe}: {exc}")
        return Sample(temperature_c=m.temperature_c, rh_pct=m.rh_pct, co2_ppm=m.co2_ppm)

    def close(self) -> None:
        try:
            if self._started:
                self._command(STOP_PERIODIC_MEASUREMENT)
        except OSError:
            pass  # already gone; nothing to stop
        finally:
            self._started = False
            self.bus.close()

    def _command(self, command: int, *args: int) -> None:
        self.bus.i2c_rdwr(i2c_msg.write(self.address, encode_command(command, *args)))
        self._sleep(EXECUTION_S[command])

    def _query(self, command: int, n_words: int) -> list[int]:
        self._command(command)
        msg = i2c_msg.read(self.address, 3 * n_words)
        self.bus.i2c_rdwr(msg)
        return decode_words(bytes(msg), self.device)


class _ReopeningBus:
    """An SMBus that could not be opened yet: every transfer tries to open it again."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._bus: I2cBus | None = None

    def i2c_rdwr(self, *i2c_msgs: i2c_msg) -> None:
        if self._bus is None:
            from smbus2 import SMBus

            self._bus = SMBus(self.path)
        self._bus.i2c_rdwr(*i2c_msgs)

    def close(self) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = None
