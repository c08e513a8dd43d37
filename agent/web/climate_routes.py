"""What the API and Prometheus see of the climate family (``agent/devices/climate.py``).

- ``GET /v1/sensors``: the newest reading per sensor with derived values and
  validity (CONTRACT 5; extra keys: ``leaf_vpd_kpa``, ``abs_humidity_g_m3``,
  ``faults`` as codes);
- ``GET /v1/sensors/{device}/history?hours=24``: per-minute mean/min/max of the
  valid readings, oldest first, for the site page's charts;
- ``GET /v1/rooms``: each room's stage, lights, bands, current values (the
  median of its sensors' fresh valid readings; ``vpd_kpa`` is the leaf VPD the
  bands judge) and open alarms.

Everything here reads state the event loop owns (monitors, counters) from
handlers that run in that loop; only the history query goes to a thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from agent.devices.climate_history import MINUTE_S, RETENTION_S
from agent.web.caller import Caller
from agent.web.problems import ApiProblem, shown
from drivers.sensor.rooms import BAND_QUANTITIES, Band

if TYPE_CHECKING:
    from agent.devices.climate import ClimateService

log = logging.getLogger(__name__)

MAX_HOURS = RETENTION_S / 3600


def _band(band: Band) -> dict[str, float | None]:
    return {"low": band.low, "high": band.high}


def _hours(raw: str | None) -> float:
    if raw is None:
        return MAX_HOURS
    try:
        hours = float(raw)
    except ValueError:
        hours = math.nan
    if not (math.isfinite(hours) and 0 < hours <= MAX_HOURS):
        raise ApiProblem(422, f"hours: must be a number of hours, more than 0 and at most "
                              f"{MAX_HOURS:g}, not {shown(raw)}", "hours")
    return hours


def _point(point: dict[str, Any]) -> dict[str, Any]:
    """A history minute with min/max rounded like the mean (VPD is computed, not measured)."""
    for stat in point.values():
        if isinstance(stat, dict):
            for key in ("min", "max"):
                if isinstance(stat.get(key), float):
                    stat[key] = round(stat[key], 3)
    return point


def rooms_view(svc: ClimateService) -> list[dict[str, Any]]:
    now = svc.clock()
    out = []
    for name, monitor in svc.monitors.items():
        spec = monitor.spec
        lights_on = spec.lights.lights_on(now)
        out.append({
            "name": name,
            "stage": str(spec.stage),
            "configured": name in svc.rooms,
            "lights": "on" if lights_on else "off",
            "leaf_temp_offset_c": spec.leaf_temp_offset_c,
            "alarm_delay_s": spec.alarm_delay_s,
            "clear_delay_s": spec.clear_delay_s,
            "co2_safety_ppm": spec.co2_safety_ppm,
            "sensors": [s.device for s in svc.sensors.values() if s.room == name],
            "bands": {q: {"on": _band(t.on), "off": _band(t.off), "hysteresis": t.hysteresis,
                          "now": _band(t.band(lights_on))}
                      for q, t in spec.targets.items()},
            "values": {q: _rounded(monitor.room_value(q, now)) for q in BAND_QUANTITIES},
            "alarms": svc.alarms.for_room(name),
        })
    return out


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def climate_router(svc: ClimateService) -> APIRouter:
    router = APIRouter(tags=["climate"])

    @router.get("/v1/sensors", summary="The newest reading of every sensor, with VPD, dew "
                                       "point and validity")
    async def sensors(_: Caller) -> dict[str, Any]:
        return {"sensors": svc.latest()}

    @router.get("/v1/sensors/{device}/history",
                summary="Per-minute mean/min/max of one sensor's valid readings (24 h kept)")
    async def history(device: str, _: Caller, hours: str | None = None) -> dict[str, Any]:
        entry = svc.sensors.get(device)
        if entry is None:
            known = ", ".join(sorted(svc.sensors)) or "none configured"
            raise ApiProblem(404, f"device: no sensor {shown(device)} (sensors: {known})",
                             "device", reason="unknown_device")
        span_h = _hours(hours)
        store = svc.history
        if store is None:
            raise ApiProblem(503, f"history: not available ({svc.history_error or 'not started'})",
                             reason="history_unavailable")
        since = svc.clock() - span_h * 3600
        try:
            points = await asyncio.to_thread(store.series, device, since)
        except sqlite3.Error as exc:
            log.error("climate: reading the history of %s failed: %s", device, exc)
            raise ApiProblem(503, f"history: cannot read {store.path}: {exc}",
                             reason="history_unavailable") from None
        return {"device": device, "room": entry.room, "hours": span_h, "minute_s": MINUTE_S,
                "points": [_point(p.as_dict()) for p in points]}

    @router.get("/v1/rooms", summary="Rooms: stage, lights, bands, current values, open alarms")
    async def rooms(_: Caller) -> dict[str, Any]:
        return {"rooms": rooms_view(svc)}

    return router


