"""Rooms, their stage's target bands, and climate alarms that fire once and clear once.

Pure: a :class:`RoomMonitor` is fed readings and the injected ``now`` and
returns alarm edges (:class:`AlarmRaised`, :class:`AlarmCleared`), small
frozen values the daemon turns into ``alarm`` events (:meth:`AlarmRaised.payload`
matches ``agent/pipeline/schemas.py``'s Alarm). No clock, no I/O, no logging.

Rules, per room and quantity:

- the room's value is the median of its sensors' latest *valid* values (one
  lying sensor among three does not move it; a suspect reading never raises
  a climate alarm);
- an alarm is raised once, when the value has stayed outside the band (the
  lights-on or lights-off band, by the room's light schedule) for
  ``alarm_delay_s``; it clears once, when the value is back inside the band
  by the quantity's hysteresis (and, with ``clear_delay_s``, stays there);
- the CO2 safety alarm (5,000 ppm, the 8-hour exposure limit) is separate,
  critical, and also counts spike/flat-line suspects: a stuck CO2 valve looks
  exactly like a spike;
- backfilled readings (flagged, or older than ``backfill_after_s``) never
  raise or clear anything.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import datetime, time
from enum import StrEnum
from typing import Any, Literal
from zoneinfo import ZoneInfo

from drivers.sensor.reading import SUSPECT_ONLY, Reading, iso_ms

Side = Literal["low", "high"]
# Quantities a band can watch. vpd_kpa is judged on the *leaf* VPD (the
# reading's leaf_vpd_kpa, computed with the room's leaf offset), what growers
# steer by; with a 0 offset it equals the air VPD.
BAND_QUANTITIES = ("vpd_kpa", "temperature_c", "rh_pct", "co2_ppm")
CO2_SAFETY_PPM = 5000.0
_LABELS = {"vpd_kpa": ("VPD", "kPa"), "temperature_c": ("temperature", "C"),
           "rh_pct": ("RH", "%"), "co2_ppm": ("CO2", "ppm")}
_CODES = {"vpd_kpa": "vpd", "temperature_c": "temperature", "rh_pct": "rh", "co2_ppm": "co2"}


class Stage(StrEnum):
    CLONE = "clone"
    VEG = "veg"
    FLOWER = "flower"
    DRY = "dry"


@dataclass(frozen=True, slots=True)
class Band:
    """Inclusive target range; a missing side is unbounded."""

    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"band low {self.low} must be below high {self.high}")

    def breach(self, value: float) -> Side | None:
        if self.low is not None and value < self.low:
            return "low"
        if self.high is not None and value > self.high:
            return "high"
        return None

    def cleared(self, value: float, side: Side, hysteresis: float) -> bool:
        """Back inside by ``hysteresis`` on the side that was breached."""
        if side == "low":
            return self.low is None or value >= self.low + hysteresis
        return self.high is None or value <= self.high - hysteresis

    def text(self) -> str:
        low = "-" if self.low is None else f"{self.low:g}"
        high = "-" if self.high is None else f"{self.high:g}"
        return f"{low}..{high}"


@dataclass(frozen=True, slots=True)
class Target:
    """A quantity's bands with lights on and off, and its clearing hysteresis."""

    on: Band
    off: Band
    hysteresis: float

    def band(self, lights_on: bool) -> Band:
        return self.on if lights_on else self.off


def _t(on: tuple[float | None, float | None], off: tuple[float | None, float | None] | None,
       hysteresis: float) -> Target:
    return Target(Band(*on), Band(*(off or on)), hysteresis)


# Starting points from common grower practice; every room can override any of them.
# The lights-off VPD bands are lower: the leaf offset is set for lights on, and a
# dark canopy transpires less.
STAGE_TARGETS: dict[Stage, dict[str, Target]] = {
    Stage.CLONE: {
        "vpd_kpa": _t((0.4, 0.8), None, 0.05),
        "temperature_c": _t((24.0, 28.0), (22.0, 26.0), 0.5),
        "rh_pct": _t((70.0, 85.0), None, 2.0),
        "co2_ppm": _t((None, 1500.0), None, 50.0),
    },
    Stage.VEG: {
        "vpd_kpa": _t((0.8, 1.2), (0.5, 1.2), 0.05),
        "temperature_c": _t((22.0, 28.0), (18.0, 24.0), 0.5),
        "rh_pct": _t((55.0, 70.0), (55.0, 75.0), 2.0),
        "co2_ppm": _t((400.0, 1500.0), (None, 1500.0), 50.0),
    },
    Stage.FLOWER: {
        "vpd_kpa": _t((1.0, 1.5), (0.6, 1.4), 0.05),
        "temperature_c": _t((20.0, 28.0), (17.0, 24.0), 0.5),
        "rh_pct": _t((40.0, 55.0), (40.0, 60.0), 2.0),
        "co2_ppm": _t((800.0, 1500.0), (None, 1500.0), 50.0),
    },
    Stage.DRY: {
        "temperature_c": _t((15.0, 21.0), None, 0.5),
        "rh_pct": _t((55.0, 65.0), None, 2.0),
    },
}
STAGE_LIGHTS: dict[Stage, tuple[str | None, str | None]] = {
    Stage.CLONE: ("06:00", "00:00"),   # 18/6
    Stage.VEG: ("06:00", "00:00"),     # 18/6
    Stage.FLOWER: ("06:00", "18:00"),  # 12/12
    Stage.DRY: (None, None),           # dark
}


@dataclass(frozen=True)
class LightSchedule:
    """Lights on from ``on`` to ``off`` local time (across midnight if off < on).

    ``on`` and ``off`` both None: always dark (a dry room); only ``off`` None: always on.
    """

    on: time | None
    off: time | None
    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))

    @classmethod
    def parse(cls, on: str | None, off: str | None, tz: str = "UTC") -> LightSchedule:
        return cls(_hhmm(on) if on else None, _hhmm(off) if off else None, ZoneInfo(tz))

    def lights_on(self, now: float) -> bool:
        if self.on is None:
            return False
        if self.off is None or self.off == self.on:
            return True
        local = datetime.fromtimestamp(now, self.tz).time()
        if self.on < self.off:
            return self.on <= local < self.off
        return local >= self.on or local < self.off


def _hhmm(value: str) -> time:
    try:
        hours, minutes = (int(part) for part in value.split(":"))
        if (hours, minutes) == (24, 0):
            return time(0, 0)
        return time(hours, minutes)
    except ValueError:
        raise ValueError(f"{value!r} is not a time of day like \"06:00\"") from None


@dataclass(frozen=True)
class RoomSpec:
    """A room as configured: stage, bands (stage defaults plus overrides), lights, timings."""

    name: str
    stage: Stage
    targets: dict[str, Target]
    lights: LightSchedule
    leaf_temp_offset_c: float = 0.0
    alarm_delay_s: float = 600.0        # out of band this long before an alarm
    clear_delay_s: float = 0.0          # back in band (by the hysteresis) this long to clear
    co2_safety_ppm: float = CO2_SAFETY_PPM
    co2_safety_delay_s: float = 30.0
    co2_safety_hysteresis: float = 500.0
    sensor_max_age_s: float = 120.0     # a sensor's value older than this leaves the room's median
    backfill_after_s: float = 120.0     # readings older than this on arrival are backfill

    @classmethod
    def for_stage(cls, name: str, stage: Stage | str, *, tz: str = "UTC",
                  overrides: dict[str, Target] | None = None,
                  lights: tuple[str | None, str | None] | None = None, **timings: Any) -> RoomSpec:
        stage = Stage(stage)
        targets = dict(STAGE_TARGETS[stage])
        targets.update(overrides or {})
        on, off = lights if lights is not None else STAGE_LIGHTS[stage]
        return cls(name=name, stage=stage, targets=targets,
                   lights=LightSchedule.parse(on, off, tz), **timings)


@dataclass(frozen=True, slots=True)
class AlarmRaised:
    """A room's value stayed out of band (or over the CO2 safety limit) long enough."""

    room: str
    code: str               # climate_temperature_high, co2_safety, ...
    quantity: str
    side: Side
    value: float
    band: Band
    lights_on: bool
    since: float            # when the value first left the band
    ts: float               # when the alarm was raised
    severity: Literal["warning", "critical"]
    message: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.room, self.code)

    def payload(self) -> dict[str, Any]:
        """``data`` of the ``alarm`` event (agent/pipeline/schemas.py Alarm, plus room facts)."""
        return {"code": self.code, "state": "raised", "severity": self.severity,
                "message": self.message, "room": self.room, "quantity": self.quantity,
                "side": self.side, "value": round(self.value, 3), "low": self.band.low,
                "high": self.band.high, "lights": "on" if self.lights_on else "off",
                "since": iso_ms(self.since), "raised_at": iso_ms(self.ts)}


@dataclass(frozen=True, slots=True)
class AlarmCleared:
    """The value came back inside the band by the hysteresis; closes the raised alarm."""

    room: str
    code: str
    quantity: str
    side: Side
    value: float
    raised_at: float
    ts: float
    message: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.room, self.code)

    def payload(self) -> dict[str, Any]:
        return {"code": self.code, "state": "cleared", "severity": "info",
                "message": self.message, "room": self.room, "quantity": self.quantity,
                "side": self.side, "value": round(self.value, 3),
                "raised_at": iso_ms(self.raised_at), "cleared_at": iso_ms(self.ts)}


AlarmEdge = AlarmRaised | AlarmCleared


@dataclass
class _Condition:
    """One alarm's state: ok -> pending -> raised -> (clearing) -> ok."""

    side: Side | None = None
    since: float = 0.0          # pending: first out-of-band time; clearing: first back-in time
    raised: AlarmRaised | None = None
    clearing_since: float | None = None


class RoomMonitor:
    """Turns one room's readings into alarm edges. Pure; feed it in time order."""

    def __init__(self, spec: RoomSpec) -> None:
        self.spec = spec
        # (device, quantity) -> (ts, value, suspect_only)
        self._latest: dict[tuple[str, str], tuple[float, float, bool]] = {}
        self._conditions: dict[str, _Condition] = {}

    def observe(self, reading: Reading, now: float, *, backfill: bool = False) -> list[AlarmEdge]:
        """Take one reading; return the alarms it raised or cleared (usually none)."""
        if backfill or reading.ts < now - self.spec.backfill_after_s:
            return []
        codes = reading.codes
        usable = reading.valid or (bool(codes) and codes <= SUSPECT_ONLY)
        if not usable:
            return []
        for quantity in BAND_QUANTITIES:
            value = reading.leaf_vpd_kpa if quantity == "vpd_kpa" else reading.value(quantity)
            if value is not None:
                self._latest[(reading.device, quantity)] = (reading.ts, value, not reading.valid)
        return self.evaluate(now)

    def evaluate(self, now: float) -> list[AlarmEdge]:
        """Re-judge every condition at ``now`` (also call it on a timer: a delay can expire
        between readings)."""
        spec = self.spec
        lights_on = spec.lights.lights_on(now)
        edges: list[AlarmEdge] = []
        for quantity, target in spec.targets.items():
            value = self.room_value(quantity, now, include_suspect=False)
            band = target.band(lights_on)
            edges.extend(self._step(_CODES.get(quantity, quantity), quantity, value, band,
                                    target.hysteresis, spec.alarm_delay_s, "warning",
                                    lights_on, now))
        co2 = self.room_value("co2_ppm", now, include_suspect=True)
        edges.extend(self._step("co2_safety", "co2_ppm", co2, Band(None, spec.co2_safety_ppm),
                                spec.co2_safety_hysteresis, spec.co2_safety_delay_s, "critical",
                                lights_on, now))
        return edges

    def room_value(self, quantity: str, now: float, *, include_suspect: bool = False
                   ) -> float | None:
        """Median of the room's sensors' fresh values of ``quantity``."""
        horizon = now - self.spec.sensor_max_age_s
        values = [value for (_, q), (ts, value, suspect) in self._latest.items()
                  if q == quantity and ts >= horizon and (include_suspect or not suspect)]
        return statistics.median(values) if values else None

    def open_alarms(self) -> list[AlarmRaised]:
        return [c.raised for c in self._conditions.values() if c.raised is not None]

    def _step(self, code: str, quantity: str, value: float | None, band: Band,
              hysteresis: float, delay_s: float, severity: Literal["warning", "critical"],
              lights_on: bool, now: float) -> list[AlarmEdge]:
        cond = self._conditions.setdefault(code, _Condition())
        if value is None:
            # No fresh data: hold the state (a stale sensor is its own fault,
            # not proof that the room recovered).
            return []
        breach = band.breach(value)
        if cond.raised is not None:
            raised = cond.raised
            if not band.cleared(value, raised.side, hysteresis):
                cond.clearing_since = None
                return []
            if cond.clearing_since is None:
                cond.clearing_since = now
            if now - cond.clearing_since < self.spec.clear_delay_s:
                return []
            self._conditions[code] = _Condition()
            label, unit = _LABELS.get(quantity, (quantity, ""))
            cleared = AlarmCleared(
                room=self.spec.name, code=raised.code, quantity=quantity, side=raised.side,
                value=value, raised_at=raised.ts, ts=now,
                message=f"{self.spec.name}: {label} back in range at {value:.4g} {unit} "
                        f"after {_duration(now - raised.since)}")
            # The other side may already be breached (rare): start timing it now.
            return [cleared, *self._step(code, quantity, value, band, hysteresis, delay_s,
                                         severity, lights_on, now)] if breach else [cleared]
        if breach is None:
            cond.side = None
            return []
        if cond.side != breach:
            cond.side, cond.since = breach, now
        if now - cond.since < delay_s:
            return []
        full_code = code if code == "co2_safety" else f"climate_{code}_{breach}"
        label, unit = _LABELS.get(quantity, (quantity, ""))
        if code == "co2_safety":
            what = f"CO2 at {value:.0f} ppm, over the {band.high:g} ppm safety limit"
        else:
            where = "below" if breach == "low" else "above"
            what = (f"{label} {value:.4g} {unit} {where} the lights-{'on' if lights_on else 'off'} "
                    f"band {band.text()} {unit}")
        cond.raised = AlarmRaised(
            room=self.spec.name, code=full_code, quantity=quantity, side=breach, value=value,
            band=band, lights_on=lights_on, since=cond.since, ts=now, severity=severity,
            message=f"{self.spec.name}: {what} for {_duration(now - cond.since)}")
        return [cond.raised]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
