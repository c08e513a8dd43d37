"""One poller per sensor: read the transport, derive, check, and hand back a Reading.

The pipeline for one poll is a few small pure steps (as structlog's processors):
``source.read(now)`` -> :meth:`Checker.check` (calibration, plausibility) ->
:func:`derive` (VPD, dew point) -> :class:`Reading`. The transport is the only
part that blocks, so :meth:`SensorPoller.poll` is meant for a thread:
``await asyncio.to_thread(poller.poll)``, or :meth:`SensorPoller.run` in a
thread of its own. Nothing here raises for a device fault; a driver bug is
caught, logged once and turned into an invalid reading too, so one sensor
never stops the others.

Availability is logged on edges (as Home Assistant's coordinators do): one
ERROR when a sensor goes down, one WARNING when its readings turn suspect,
one INFO when it recovers; repeats go to DEBUG.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from drivers.sensor.derived import derive
from drivers.sensor.errors import SensorConfigError, SensorConfigIssue
from drivers.sensor.plausibility import Checker, PlausibilityConfig
from drivers.sensor.reading import Reading, Sample, failed, iso_ms
from drivers.sensor.registers import PRESETS, RegisterMap

log = logging.getLogger(__name__)

MODELS = ("xy-md02", "senseair-s8", "gmp252", "scd4x", "custom", "sim")
DEFAULT_INTERVAL_S = 10.0
# Faults that mean "the device did not measure" (down) rather than "the number
# is not to be trusted" (degraded).
DOWN_CODES = frozenset({"no_answer", "exception", "crc"})

State = Literal["starting", "up", "degraded", "down"]


class SensorSource(Protocol):
    """A transport: blocking ``read(now)`` -> Sample (None: nothing new yet); never raises for
    a device fault."""

    describe: str

    def read(self, now: float) -> Sample | None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class SensorSpec:
    """One configured sensor, validated (see ``config.py``)."""

    device: str
    room: str
    model: str
    url: str
    interval_s: float = DEFAULT_INTERVAL_S
    register_map: RegisterMap | None = None     # Modbus models; presets filled in by config
    plausibility: PlausibilityConfig = field(default_factory=PlausibilityConfig)
    leaf_temp_offset_c: float = 0.0             # the room's; used for leaf VPD


def open_source(spec: SensorSpec) -> SensorSource:
    """The transport the URL names (``modbus-rtu[+pyserial]://``, ``i2c://``, ``sim://``)."""
    scheme = urlsplit(spec.url).scheme
    if scheme == "sim":
        from drivers.sensor.sim import SimClimate

        return SimClimate.from_url(spec.url, spec.device)
    if scheme == "modbus-rtu" or scheme.startswith("modbus-rtu+"):
        from drivers.sensor.modbus import ModbusSensor

        register_map = spec.register_map or PRESETS.get(spec.model)
        if register_map is None:
            raise SensorConfigError(spec.device, [SensorConfigIssue(
                "model", f"{spec.model!r} has no Modbus register map; use one of "
                         f"{', '.join(PRESETS)} or custom with a [devices.registers] table")])
        return ModbusSensor.from_url(spec.url, register_map, spec.device)
    if scheme == "i2c":
        if spec.model != "scd4x":
            raise SensorConfigError(spec.device, [SensorConfigIssue(
                "model", f"i2c:// sensors must be model scd4x, not {spec.model!r}")])
        from drivers.sensor.scd4x import Scd4xSensor

        return Scd4xSensor.open(spec.url, spec.device)
    raise SensorConfigError(spec.device, [SensorConfigIssue(
        "url", f"{spec.url!r}: a sensor URL is modbus-rtu:///dev/ttyUSB1?unit=1, "
               "i2c:///dev/i2c-1?address=0x62 or sim://climate")])


def build_reading(spec: SensorSpec, sample: Sample, ts: float) -> Reading:
    """The Reading for a checked sample: derived values, valid only when nothing is suspect."""
    climate = derive(sample.temperature_c, sample.rh_pct, spec.leaf_temp_offset_c)
    faults = sample.faults
    return Reading(
        device=spec.device, room=spec.room, ts=ts,
        temperature_c=sample.temperature_c, rh_pct=sample.rh_pct, co2_ppm=sample.co2_ppm,
        vpd_kpa=climate.vpd_kpa, dew_point_c=climate.dew_point_c,
        valid=not faults, reason="; ".join(f.message for f in faults) or None,
        leaf_vpd_kpa=climate.leaf_vpd_kpa, abs_humidity_g_m3=climate.abs_humidity_g_m3,
        faults=faults,
    )


class SensorPoller:
    """Polls one sensor; keeps its latest reading and availability state."""

    def __init__(self, spec: SensorSpec, source: SensorSource | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.clock = clock
        self.source = source if source is not None else open_source(spec)
        self.checker = Checker(spec.plausibility, started_at=clock(), interval_s=spec.interval_s)
        self.state: State = "starting"
        self.since = self.checker.started_at
        self.error: str | None = None
        self.polls = 0
        self._latest: Reading | None = None
        self._lock = threading.Lock()
        self._driver_error_logged = False

    @property
    def interval_s(self) -> float:
        return self.spec.interval_s

    def poll(self) -> Reading | None:
        """Read once (blocking); the new Reading, or None when the sensor has nothing new."""
        now = self.clock()
        try:
            sample = self.source.read(now)
        except Exception as exc:  # a driver bug must not stop the other sensors
            if not self._driver_error_logged:
                log.exception("sensor %s: driver error reading %s", self.spec.device,
                              self.source.describe)
                self._driver_error_logged = True
            sample = failed("no_answer", f"driver error: {exc!r}")
        now = self.clock()
        self.polls += 1
        if sample is None:
            return None
        reading = build_reading(self.spec, self.checker.check(sample, now), now)
        with self._lock:
            self._latest = reading
        self._track(reading, now)
        return reading

    def latest(self, now: float | None = None) -> Reading | None:
        """The newest reading, marked stale (invalid) when it is over 3 intervals old."""
        now = self.clock() if now is None else now
        with self._lock:
            reading = self._latest
        last_ts = None if reading is None else reading.ts
        stale = self.checker.stale(last_ts, now)
        if reading is None or stale is None:
            return reading
        faults = (*reading.faults, stale)
        return replace(reading, valid=False, faults=faults,
                       reason="; ".join(f.message for f in faults))

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """This sensor for GET /v1/status ``devices``."""
        now = self.clock() if now is None else now
        latest = self.latest(now)
        state: str = self.state
        error = self.error
        if latest is None and self.checker.stale(None, now) is not None:
            state, error = "down", f"no reading since start ({now - self.since:.0f} s)"
        elif latest is not None and "stale" in latest.codes:
            state, error = "down", latest.reason
        snap: dict[str, Any] = {
            "id": self.spec.device, "type": "sensor", "model": self.spec.model,
            "room": self.spec.room, "url": self.spec.url, "state": state,
            "since": iso_ms(self.since), "error": error,
            "last_reading": None if latest is None else latest.as_dict(),
        }
        warnings = getattr(self.source, "warnings", None)
        if warnings:
            snap["warnings"] = list(warnings)
        return snap

    def run(self, stop: threading.Event, on_reading: Callable[[Reading], None],
            monotonic: Callable[[], float] = time.monotonic) -> None:
        """Poll every ``interval_s`` until ``stop`` is set (for a thread of its own).

        Deadlines, not sleeps: the schedule does not drift with the time a read takes,
        and a poll that overran skips the missed slots instead of bursting.
        """
        interval = self.spec.interval_s
        next_at = monotonic()
        while not stop.is_set():
            reading = self.poll()
            if reading is not None:
                try:
                    on_reading(reading)
                except Exception:  # the consumer's bug, not this sensor's
                    log.exception("sensor %s: reading consumer failed", self.spec.device)
            next_at += interval
            now = monotonic()
            if next_at < now:
                next_at += ((now - next_at) // interval + 1) * interval
            stop.wait(next_at - now)

    def close(self) -> None:
        self.source.close()

    def _track(self, reading: Reading, now: float) -> None:
        codes = reading.codes
        if not codes:
            new: State = "up"
        elif codes & DOWN_CODES:
            new = "down"
        elif codes == {"warmup"}:
            new = "starting"
        else:
            new = "degraded"
        old, device = self.state, self.spec.device
        self.error = reading.reason
        if new == old:
            if new in ("down", "degraded"):
                log.debug("sensor %s still %s: %s", device, new, reading.reason)
            return
        self.state, self.since = new, now
        where = self.source.describe
        if new == "down":
            log.error("sensor %s (%s) is down: %s; retrying every %g s", device, where,
                      reading.reason, self.spec.interval_s)
        elif new == "degraded":
            log.warning("sensor %s (%s) readings are suspect: %s", device, where, reading.reason)
        elif new == "up" and old in ("down", "degraded"):
            log.info("sensor %s (%s) recovered", device, where)
        else:
            log.debug("sensor %s: %s -> %s", device, old, new)

