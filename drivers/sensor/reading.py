"""The values that cross the sensor seams: a transport's ``Sample``, the ``Reading``.

A transport (Modbus, SCD4x, sim) turns one poll into a :class:`Sample`: the
quantities it measured and the faults it met. A device fault is data, not an
exception, so a sensor that times out or reports its failure value still
produces a reading, marked invalid with the reason (CONTRACT 5: "valid",
"reason"). The pipeline (``reader.py``) adds the derived values and the
plausibility verdict and returns a :class:`Reading`, the shape of
``GET /v1/sensors`` and of the ``sensor`` event's ``data``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

Quantity = Literal["temperature_c", "rh_pct", "co2_ppm"]
QUANTITIES: tuple[Quantity, ...] = ("temperature_c", "rh_pct", "co2_ppm")

# Fault codes. A consumer (alarms, the site page, HQ) keys on these, never on
# the human text. ``spike`` and ``flatline`` say "this number looks wrong", the
# others say "this number is not a measurement".
FaultCode = Literal[
    "no_answer",      # timeout, port gone, bus error: nothing was measured
    "exception",      # the device answered with a Modbus exception
    "failure_value",  # the device answered with its documented "no measurement" value
    "status",         # the device's status register reports an error
    "crc",            # a frame failed its checksum
    "range",          # outside the physical range
    "spike",          # far from the median of the recent samples
    "flatline",       # no change across N samples where the room should move
    "stale",          # no reading for 3 intervals
    "warmup",         # the sensor is still inside its warm-up time
]
# Faults under which the value is still the sensor's best measurement: the CO2
# safety alarm still looks at it (a CO2 tank valve that sticks open *is* a spike).
SUSPECT_ONLY: frozenset[str] = frozenset({"spike", "flatline"})


@dataclass(frozen=True, slots=True)
class Fault:
    """One reason a reading is not to be trusted; ``quantity`` is None for the whole reading."""

    code: FaultCode
    message: str
    quantity: Quantity | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    """What one poll of a transport measured; quantities it does not have are None."""

    temperature_c: float | None = None
    rh_pct: float | None = None
    co2_ppm: float | None = None
    faults: tuple[Fault, ...] = ()

    def get(self, quantity: Quantity) -> float | None:
        value: float | None = getattr(self, quantity)
        return value


def failed(code: FaultCode, message: str) -> Sample:
    """A sample with nothing measured and one fault (timeout, port gone, CRC)."""
    return Sample(faults=(Fault(code, message),))


@dataclass(frozen=True, slots=True)
class Reading:
    """One sensor reading with derived values and its validity (CONTRACT 5, GET /v1/sensors)."""

    device: str
    room: str
    ts: float                      # epoch seconds, when the poll finished
    temperature_c: float | None
    rh_pct: float | None
    co2_ppm: float | None
    vpd_kpa: float | None          # air VPD
    dew_point_c: float | None
    valid: bool
    reason: str | None             # "; "-joined fault messages, None when valid
    leaf_vpd_kpa: float | None = None
    abs_humidity_g_m3: float | None = None
    faults: tuple[Fault, ...] = field(default=())

    @property
    def codes(self) -> frozenset[str]:
        return frozenset(f.code for f in self.faults)

    def value(self, quantity: str) -> float | None:
        value: float | None = getattr(self, quantity)
        return value

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape (CONTRACT 5), rounded to what the sensors resolve."""
        return {
            "device": self.device,
            "room": self.room,
            "ts": iso_ms(self.ts),
            "temperature_c": _round(self.temperature_c, 2),
            "rh_pct": _round(self.rh_pct, 1),
            "co2_ppm": _round(self.co2_ppm, 0),
            "vpd_kpa": _round(self.vpd_kpa, 3),
            "dew_point_c": _round(self.dew_point_c, 2),
            "valid": self.valid,
            "reason": self.reason,
            "leaf_vpd_kpa": _round(self.leaf_vpd_kpa, 3),
            "abs_humidity_g_m3": _round(self.abs_humidity_g_m3, 2),
            "faults": [f.code for f in self.faults],
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def iso_ms(epoch_s: float) -> str:
    """UTC ISO 8601, milliseconds, ``Z``: the envelope's format (drivers/ cannot import it)."""
    dt = datetime.fromtimestamp(epoch_s, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
