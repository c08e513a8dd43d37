"""Modbus RTU sensors over RS-485 (pymodbus 3.10+), a thin transport around ``registers.py``.

URLs (CONTRACT 3):

- ``modbus-rtu:///dev/ttyUSB1?unit=1&baudrate=9600``: a serial port;
- ``modbus-rtu+socket://10.0.0.9:4001?unit=3``: any pyserial URL after the
  ``+`` (``socket://`` for an RS-485-to-Ethernet gateway in raw mode,
  ``rfc2217://``, ``loop://``), the pyserial part keeping its own query keys.

Query keys: ``unit`` (1..247, sent as pymodbus' ``device_id``; ``slave=`` is
gone since 3.10), ``baudrate`` (9600), ``parity`` (N/E/O), ``bytesize`` (8),
``stopbits`` (1), ``timeout`` (seconds per request, 1.0), ``retries`` (1).

Several sensors on one RS-485 line share one :class:`ModbusLine` (one open
port, requests serialised by a lock), because a serial port can be opened
once. Every call blocks: run it in a thread (``asyncio.to_thread``). Device
faults never raise: a timeout, a Modbus exception, a failure value or a
status error come back as an invalid Sample with the reason.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from drivers.sensor.errors import ModbusFault, SensorConfigError, SensorConfigIssue
from drivers.sensor.reading import Sample, failed
from drivers.sensor.registers import Block, RegisterMap, RegisterType

log = logging.getLogger(__name__)

_MODBUS_KEYS = {"unit", "baudrate", "parity", "bytesize", "stopbits", "timeout", "retries"}
_EXCEPTIONS = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value",
    4: "device failure", 5: "acknowledge", 6: "device busy",
    10: "gateway path unavailable", 11: "gateway target failed to respond",
}


@dataclass(frozen=True)
class ModbusUrl:
    """A parsed ``modbus-rtu`` device URL."""

    port: str                 # a device path or a pyserial URL
    unit: int
    baudrate: int = 9600
    parity: str = "N"
    bytesize: int = 8
    stopbits: int = 1
    timeout_s: float = 1.0
    retries: int = 1

    @property
    def line_key(self) -> tuple[str, int, str, int, int]:
        return (self.port, self.baudrate, self.parity, self.bytesize, self.stopbits)

    @classmethod
    def parse(cls, url: str, device: str = "modbus") -> ModbusUrl:
        parts = urlsplit(url)
        scheme = parts.scheme
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {k: v for k, v in query if k in _MODBUS_KEYS}
        theirs = [(k, v) for k, v in query if k not in _MODBUS_KEYS]
        issues: list[SensorConfigIssue] = []
        if scheme == "modbus-rtu":
            port = parts.path
            if parts.netloc or not port:
                issues.append(SensorConfigIssue(
                    "url", f"{url!r}: expected modbus-rtu:///dev/ttyUSB1?unit=1 "
                           "(three slashes: no host) or modbus-rtu+socket://host:port?unit=1"))
            if theirs:
                issues.append(SensorConfigIssue(
                    "url", f"unknown key(s) {', '.join(k for k, _ in theirs)}; "
                           f"known: {', '.join(sorted(_MODBUS_KEYS))}"))
        elif scheme.startswith("modbus-rtu+") and scheme != "modbus-rtu+":
            inner = scheme.removeprefix("modbus-rtu+")
            port = f"{inner}://{parts.netloc}{parts.path}"
            if theirs:
                port += "?" + urlencode(theirs)
        else:
            raise SensorConfigError(device, [SensorConfigIssue(
                "url", f"{url!r} is not a modbus-rtu:// or modbus-rtu+<pyserial scheme>:// URL")])
        values: dict[str, object] = {}
        for key, cast, check, hint in (
            ("unit", int, lambda v: 1 <= v <= 247, "1..247"),
            ("baudrate", int, lambda v: v > 0, "a positive integer such as 9600"),
            ("parity", str, lambda v: v in ("N", "E", "O"), "N, E or O"),
            ("bytesize", int, lambda v: v in (7, 8), "7 or 8"),
            ("stopbits", int, lambda v: v in (1, 2), "1 or 2"),
            ("timeout", float, lambda v: 0 < v <= 60, "seconds, 0..60"),
            ("retries", int, lambda v: 0 <= v <= 10, "0..10"),
        ):
            if key not in ours:
                continue
            raw = ours[key]
            try:
                value = cast(raw.upper() if key == "parity" else raw)
                ok = check(value)
            except ValueError:
                ok = False
            if not ok:
                issues.append(SensorConfigIssue(f"url.{key}", f"{raw!r}: must be {hint}"))
            else:
                values["timeout_s" if key == "timeout" else key] = value
        if "unit" not in ours:
            issues.append(SensorConfigIssue("url.unit", "missing: the sensor's Modbus address, "
                                                        "e.g. ?unit=1"))
        if issues:
            raise SensorConfigError(device, issues)
        return cls(port=port, **values)  # type: ignore[arg-type]


class ModbusLine:
    """One serial line (an RS-485 bus) and its pymodbus client, shared by its sensors."""

    def __init__(self, url: ModbusUrl) -> None:
        _quiet_pymodbus()
        self.port = url.port
        self.timeout_s = url.timeout_s
        self._lock = threading.Lock()
        self._users = 0
        self._client = ModbusSerialClient(
            url.port, baudrate=url.baudrate, parity=url.parity, bytesize=url.bytesize,
            stopbits=url.stopbits, timeout=url.timeout_s, retries=url.retries,
            # The sync client never reconnects by itself; we reconnect on the next poll.
            reconnect_delay=0,
        )

    def read(self, unit: int, blocks: Sequence[Block]) -> dict[Block, list[int]]:
        """Fetch every block from ``unit``; raises :class:`ModbusFault` on the first failure."""
        with self._lock:
            if not self._client.connected and not self._client.connect():
                raise ModbusFault("no_answer", self._cannot_open())
            data: dict[Block, list[int]] = {}
            for block in blocks:
                data[block] = self._read_block(unit, block)
            return data

    def _read_block(self, unit: int, block: Block) -> list[int]:
        what = (f"{block.register_type} registers {block.address}.."
                f"{block.address + block.count - 1}")
        call = (self._client.read_input_registers if block.register_type is RegisterType.INPUT
                else self._client.read_holding_registers)
        try:
            response = call(block.address, count=block.count, device_id=unit)
        except ModbusIOException:
            raise ModbusFault("no_answer", f"no answer from unit {unit} on {self.port} within "
                                           f"{self.timeout_s:g} s ({what})") from None
        except ConnectionException:
            self._client.close()  # type: ignore[no-untyped-call]
            raise ModbusFault("no_answer", f"{self.port} closed while reading unit {unit}; "
                                           "reopening on the next poll") from None
        except ModbusException as exc:
            raise ModbusFault("no_answer", f"unit {unit} on {self.port}: {exc}") from None
        if response.isError():
            code = getattr(response, "exception_code", 0)
            name = _EXCEPTIONS.get(code, "unknown exception")
            raise ModbusFault("exception", f"unit {unit} on {self.port} answered Modbus "
                                           f"exception {code} ({name}) reading {what}")
        registers = list(response.registers)
        if len(registers) != block.count:
            raise ModbusFault("no_answer", f"unit {unit} on {self.port} sent {len(registers)} "
                                           f"registers for {what}")
        return registers

    def _cannot_open(self) -> str:
        if self.port.startswith("/") and not os.path.exists(self.port):
            return f"{self.port} does not exist (adapter unplugged?); retrying on the next poll"
        return f"cannot open {self.port}; retrying on the next poll"

    def acquire(self) -> None:
        self._users += 1

    def release(self) -> bool:
        """Drop one user; close the port when none is left. True when closed."""
        self._users -= 1
        if self._users > 0:
            return False
        with self._lock:
            self._client.close()  # type: ignore[no-untyped-call]
        return True


class _Lines:
    """The open lines, one per (port, serial settings)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: dict[tuple[str, int, str, int, int], ModbusLine] = {}

    def get(self, url: ModbusUrl) -> ModbusLine:
        with self._lock:
            line = self._lines.get(url.line_key)
            if line is None:
                # A second sensor on the same port with other serial settings is a config
                # mistake the line would hide: the port can only be opened once.
                for key in self._lines:
                    if key[0] == url.port:
                        raise SensorConfigError(url.port, [SensorConfigIssue(
                            "url", f"{url.port} is already used with other serial settings "
                                   f"(baudrate/parity/bytesize/stopbits {key[1:]}); sensors on "
                                   "one RS-485 line must agree")])
                line = self._lines[url.line_key] = ModbusLine(url)
            line.acquire()
            return line

    def put(self, url: ModbusUrl, line: ModbusLine) -> None:
        with self._lock:
            if line.release():
                self._lines.pop(url.line_key, None)


LINES = _Lines()


class ModbusSensor:
    """One Modbus sensor (the SensorSource protocol): read its map, decode, never raise."""

    def __init__(self, url: ModbusUrl, register_map: RegisterMap) -> None:
        self.url = url
        self.register_map = register_map
        self._blocks = register_map.reads()
        self._line: ModbusLine | None = LINES.get(url)
        self.describe = f"unit {url.unit} on {url.port}"

    @classmethod
    def from_url(cls, url: str, register_map: RegisterMap, device: str = "modbus"
                 ) -> ModbusSensor:
        return cls(ModbusUrl.parse(url, device), register_map)

    def read(self, now: float) -> Sample:
        if self._line is None:
            return failed("no_answer", f"{self.describe}: closed")
        try:
            data = self._line.read(self.url.unit, self._blocks)
        except ModbusFault as fault:
            return failed(fault.code, str(fault))  # type: ignore[arg-type]
        return self.register_map.decode(data)

    def close(self) -> None:
        line, self._line = self._line, None
        if line is not None:
            LINES.put(self.url, line)


def _quiet_pymodbus() -> None:
    # pymodbus logs an ERROR for every unanswered request; the poller logs one
    # ERROR when a sensor goes down and one INFO when it recovers. Leave it be if
    # the operator configured the pymodbus logger on purpose.
    for name in ("pymodbus", "pymodbus.logging"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.CRITICAL)
