"""A fake SCD4x behind smbus2's ``i2c_rdwr``: the command protocol with real CRCs.

Shipped with the driver (as httpcore ships its mock transport) so tests, the
demo and anyone wiring a new board can drive :class:`~drivers.sensor.scd4x.Scd4xSensor`
end to end without the chip. It behaves like the datasheet says the chip does:

- idle and periodic-measurement modes; in periodic mode only read_measurement,
  get_data_ready_status and stop_periodic_measurement are accepted, anything
  else is NACKed (``OSError(EREMOTEIO)``, what the kernel returns);
- a command's execution time must pass before it can be read (else NACK);
- a measurement every 5 s of the injected clock; data-ready clears on read;
- arguments are CRC-checked (a bad CRC is NACKed) and answers carry real CRCs;
- ASC starts enabled, as shipped from the factory.

Faults to inject: :meth:`corrupt` (flip the CRC of one word in the next
answer to a command), :attr:`unplugged` (NACK everything).
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable

from smbus2 import i2c_msg
from smbus2.smbus2 import I2C_M_RD

from drivers.sensor import scd4x as p

ALLOWED_WHILE_MEASURING = frozenset({
    p.READ_MEASUREMENT, p.GET_DATA_READY_STATUS, p.STOP_PERIODIC_MEASUREMENT,
})


class FakeScd4x:
    """One simulated SCD4x on one fake bus; ``clock`` is the injected time source."""

    def __init__(self, clock: Callable[[], float], address: int = p.DEFAULT_ADDRESS) -> None:
        self.clock = clock
        self.address = address
        self.measuring = False
        self.asc_enabled = True          # factory default
        self.temperature_offset_raw = round(4.0 * 65535 / 175)  # factory default 4 C
        self.co2_ppm = 1000
        self.temperature_c = 25.0
        self.rh_pct = 50.0
        self._corrupt: tuple[int, int] | None = None  # (command, word index)
        self.unplugged = False
        self.commands: list[int] = []    # every accepted command, for tests
        self._busy_until = 0.0
        self._pending: bytes | None = None
        self._pending_command = 0
        self._started_at = 0.0
        self._last_read_slot = 0

    def corrupt(self, command: int, word: int = 0) -> None:
        """Flip the CRC byte of ``word`` in the next answer to ``command``."""
        self._corrupt = (command, word)

    # --- smbus2 -----------------------------------------------------------------------------

    def i2c_rdwr(self, *msgs: i2c_msg) -> None:
        for msg in msgs:
            if self.unplugged or msg.addr != self.address:
                raise OSError(errno.EREMOTEIO, "Remote I/O error")
            if msg.flags & I2C_M_RD:
                self._read(msg)
            else:
                self._write(bytes(msg))

    def close(self) -> None:
        """Nothing to release."""

    # --- the chip ---------------------------------------------------------------------------

    def _nack(self) -> OSError:
        return OSError(errno.EREMOTEIO, "Remote I/O error")

    def _write(self, data: bytes) -> None:
        now = self.clock()
        if now < self._busy_until or len(data) < 2:
            raise self._nack()
        command = int.from_bytes(data[:2], "big")
        args = data[2:]
        if len(args) % 3:
            raise self._nack()
        words = []
        for i in range(0, len(args), 3):
            if p.crc8(args[i:i + 2]) != args[i + 2]:
                raise self._nack()
            words.append(int.from_bytes(args[i:i + 2], "big"))
        if self.measuring and command not in ALLOWED_WHILE_MEASURING:
            raise self._nack()
        if command not in p.EXECUTION_S:
            raise self._nack()
        self.commands.append(command)
        self._pending = self._execute(command, words, now)
        self._pending_command = command
        self._busy_until = now + p.EXECUTION_S[command]

    def _execute(self, command: int, words: list[int], now: float) -> bytes | None:
        if command == p.START_PERIODIC_MEASUREMENT:
            self.measuring = True
            self._started_at = now
            self._last_read_slot = 0
        elif command == p.STOP_PERIODIC_MEASUREMENT:
            self.measuring = False
        elif command == p.SET_AUTOMATIC_SELF_CALIBRATION_ENABLED:
            self.asc_enabled = bool(words[0])
        elif command == p.SET_TEMPERATURE_OFFSET:
            self.temperature_offset_raw = words[0]
        elif command == p.GET_AUTOMATIC_SELF_CALIBRATION_ENABLED:
            return p.encode_words([int(self.asc_enabled)])
        elif command == p.GET_SERIAL_NUMBER:
            return p.encode_words([0xBEEF, 0x1234, 0x5678])
        elif command == p.GET_DATA_READY_STATUS:
            return p.encode_words([0x8006 if self._slot(now) > self._last_read_slot else 0x8000])
        elif command == p.READ_MEASUREMENT:
            self._last_read_slot = self._slot(now)
            t_raw = round((self.temperature_c + 45.0) * 65535 / 175)
            rh_raw = round(self.rh_pct * 65535 / 100)
            return p.encode_words([self.co2_ppm, t_raw, rh_raw])
        return None

    def _slot(self, now: float) -> int:
        if not self.measuring:
            return self._last_read_slot
        return int((now - self._started_at) // p.MEASUREMENT_INTERVAL_S)

    def _read(self, msg: i2c_msg) -> None:
        if self.clock() < self._busy_until or self._pending is None:
            raise self._nack()
        data = bytearray(self._pending[:msg.len].ljust(msg.len, b"\xff"))
        self._pending = None
        if self._corrupt is not None and self._corrupt[0] == self._pending_command:
            index = 3 * self._corrupt[1] + 2
            self._corrupt = None
            data[index] ^= 0xFF
        ctypes.memmove(msg.buf, bytes(data), msg.len)
