"""``sim://climate?...``: a simulated grow room and the sensor hanging in it.

A small physical model, advanced by the ``now`` each read passes in (no clock
inside), so the demo, the tests and the bench all see a plausible room:

- temperature follows the lights (day/night setpoints) with a first-order lag;
- the air's vapour pressure lags behind its own target, so RH rises for a while
  at lights-off as the air cools faster than the dehumidifier dries it;
- CO2 is injected with lights on (an on/off controller around the setpoint),
  taken up by the plants, respired at night and exchanged with outside air;
- sensor noise and the sensor's resolution (0.1 C, 0.1 %, 1 ppm);
- optional faults: ``stuck`` (the output freezes), ``spike`` (occasional
  glitches), ``offline`` (stops answering) after ``fault_after_s``.

Seeded: the same URL, seed and read times give the same readings.

Query keys: ``seed``, ``lights_on``/``lights_off`` (HH:MM, ``tz``), ``day_c``,
``night_c``, ``day_rh``, ``night_rh``, ``co2`` (lights-on setpoint, 0 = no
enrichment), ``noise`` (a multiplier, 0 = exact), ``quantities`` (any of
``t,rh,co2``), ``fault`` (stuck|spike|offline), ``fault_after_s``, ``spike_p``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from drivers.sensor.derived import saturation_vapour_pressure_kpa
from drivers.sensor.errors import SensorConfigError, SensorConfigIssue
from drivers.sensor.reading import Sample, failed
from drivers.sensor.rooms import LightSchedule

OUTDOOR_CO2_PPM = 420.0
TAU_T_S = 900.0          # room air temperature lag
TAU_VAPOUR_S = 1500.0    # humidity control is slower than heating/cooling
TAU_EXCHANGE_S = 5400.0  # air exchange with outside
CO2_INJECT_PPM_S = 5.0
CO2_UPTAKE_PPM_S = 0.35  # photosynthesis, lights on
CO2_RESPIRE_PPM_S = 0.03
CO2_BAND_PPM = 75.0      # the injection controller's hysteresis
MAX_STEP_S = 10.0
MAX_CATCH_UP_S = 6 * 3600.0  # after a longer gap, start again from the steady state


@dataclass(frozen=True)
class SimParams:
    seed: int = 0
    lights_on: str | None = "06:00"
    lights_off: str | None = "18:00"
    tz: str = "UTC"
    day_c: float = 26.0
    night_c: float = 20.0
    day_rh: float = 52.0
    night_rh: float = 55.0
    co2: float = 1200.0
    noise: float = 1.0
    quantities: frozenset[str] = frozenset({"t", "rh", "co2"})
    fault: str | None = None
    fault_after_s: float = 0.0
    spike_p: float = 0.02

    @classmethod
    def from_url(cls, url: str, device: str = "sim") -> SimParams:
        parts = urlsplit(url)
        if parts.scheme != "sim" or parts.netloc != "climate":
            raise SensorConfigError(device, [SensorConfigIssue(
                "url", f"{url!r}: the sensor simulator is sim://climate?...")])
        kwargs: dict[str, object] = {}
        issues: list[SensorConfigIssue] = []
        floats = {"day_c", "night_c", "day_rh", "night_rh", "co2", "noise", "fault_after_s",
                  "spike_p"}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            try:
                if key == "seed":
                    kwargs[key] = int(value)
                elif key in floats:
                    kwargs[key] = float(value)
                elif key in ("lights_on", "lights_off"):
                    kwargs[key] = value or None
                elif key == "tz":
                    kwargs[key] = value
                elif key == "quantities":
                    chosen = frozenset(v.strip() for v in value.split(",") if v.strip())
                    if not chosen or not chosen <= {"t", "rh", "co2"}:
                        raise ValueError("must be a comma list of t, rh, co2")
                    kwargs[key] = chosen
                elif key == "fault":
                    if value not in ("stuck", "spike", "offline", ""):
                        raise ValueError("must be stuck, spike or offline")
                    kwargs[key] = value or None
                else:
                    raise ValueError("unknown key")
            except ValueError as exc:
                issues.append(SensorConfigIssue(f"url.{key}", f"{value!r}: {exc}"))
        if issues:
            raise SensorConfigError(device, issues)
        params = cls(**kwargs)  # type: ignore[arg-type]
        try:
            LightSchedule.parse(params.lights_on, params.lights_off, params.tz)
        except Exception as exc:  # a bad time or an unknown zone: both config errors
            raise SensorConfigError(device, [SensorConfigIssue("url.lights", str(exc))]) from None
        return params


class SimClimate:
    """One simulated sensor in its own simulated room (the SensorSource protocol)."""

    def __init__(self, params: SimParams, *, salt: str = "") -> None:
        self.params = params
        self.lights = LightSchedule.parse(params.lights_on, params.lights_off, params.tz)
        # The salt (the device id) lets many sensors share one URL and still differ.
        self._rng = random.Random(f"{params.seed}:{salt}")  # noqa: S311 - noise, not secrets
        self._t: float | None = None
        self._t_c = params.night_c
        self._ea_kpa = 0.0
        self._co2 = OUTDOOR_CO2_PPM
        self._injecting = False
        self._started: float | None = None
        self._stuck: Sample | None = None
        self.describe = f"sim://climate (seed {params.seed})"

    @classmethod
    def from_url(cls, url: str, device: str = "sim") -> SimClimate:
        return cls(SimParams.from_url(url, device), salt=device)

    def read(self, now: float) -> Sample | None:
        p = self.params
        if self._started is None:
            self._started = now
        self._advance(now)
        faulty = p.fault is not None and now - self._started >= p.fault_after_s
        if faulty and p.fault == "offline":
            return failed("no_answer", "simulated sensor is offline")
        if faulty and p.fault == "stuck" and self._stuck is not None:
            return self._stuck
        rng, k = self._rng, p.noise
        t_c = self._t_c + rng.gauss(0.0, 0.08) * k
        rh = 100.0 * self._ea_kpa / saturation_vapour_pressure_kpa(self._t_c)
        rh += rng.gauss(0.0, 0.4) * k
        co2 = self._co2 + rng.gauss(0.0, 12.0) * k
        if faulty and p.fault == "spike" and rng.random() < p.spike_p:
            which = rng.choice(sorted(p.quantities))
            if which == "t":
                t_c += rng.choice((-1, 1)) * rng.uniform(10, 20)
            elif which == "rh":
                rh += rng.choice((-1, 1)) * rng.uniform(25, 40)
            else:
                co2 += rng.uniform(2000, 4000)
        sample = Sample(
            temperature_c=round(t_c, 1) if "t" in p.quantities else None,
            rh_pct=round(min(max(rh, 0.0), 100.0), 1) if "rh" in p.quantities else None,
            co2_ppm=float(round(max(co2, 0.0))) if "co2" in p.quantities else None,
        )
        if faulty and p.fault == "stuck":
            self._stuck = sample
        return sample

    def close(self) -> None:
        """Nothing to release."""

    # --- the room ---------------------------------------------------------------------------

    def _targets(self, lights_on: bool) -> tuple[float, float]:
        p = self.params
        t_c = p.day_c if lights_on else p.night_c
        rh = p.day_rh if lights_on else p.night_rh
        return t_c, saturation_vapour_pressure_kpa(t_c) * rh / 100.0

    def _advance(self, now: float) -> None:
        if self._t is None or now - self._t > MAX_CATCH_UP_S or now < self._t:
            lights_on = self.lights.lights_on(now)
            self._t_c, self._ea_kpa = self._targets(lights_on)
            self._co2 = self.params.co2 if lights_on and self.params.co2 > 0 else 550.0
            self._t = now
            return
        while self._t < now:
            dt = min(MAX_STEP_S, now - self._t)
            self._step(self._t + dt, dt)
            self._t += dt

    def _step(self, t: float, dt: float) -> None:
        p = self.params
        lights_on = self.lights.lights_on(t)
        t_target, ea_target = self._targets(lights_on)
        self._t_c += (t_target - self._t_c) * (1.0 - math.exp(-dt / TAU_T_S))
        self._ea_kpa += (ea_target - self._ea_kpa) * (1.0 - math.exp(-dt / TAU_VAPOUR_S))
        # Air cannot hold more than saturation: the excess condenses.
        self._ea_kpa = min(self._ea_kpa, saturation_vapour_pressure_kpa(self._t_c))
        rate = (OUTDOOR_CO2_PPM - self._co2) / TAU_EXCHANGE_S
        if lights_on:
            rate -= CO2_UPTAKE_PPM_S
            if p.co2 > 0:
                if self._co2 < p.co2 - CO2_BAND_PPM:
                    self._injecting = True
                elif self._co2 > p.co2 + CO2_BAND_PPM:
                    self._injecting = False
                if self._injecting:
                    rate += CO2_INJECT_PPM_S
        else:
            self._injecting = False
            rate += CO2_RESPIRE_PPM_S
        self._co2 = max(self._co2 + rate * dt, 200.0)
