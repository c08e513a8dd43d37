"""Issue 5 acceptance: the real edge-agent reads a Modbus sensor and HQ gets readings and alarms."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.testing.localsite import LocalSite
from tests.conftest import wait_for
from tests.test_sensor_modbus import XY, ModbusPeer

DEVICE = "flower-2-climate"
# Judged on temperature (20..26 C, hysteresis 0.5) with lights always on, so the
# outcome does not depend on the time of day; the other bands are wide. A 3 s
# delay keeps the test short; what it proves is "once", not "after 10 minutes".
ROOM: dict[str, Any] = {
    "name": "Flower 2", "stage": "flower", "lights_on": "00:00",
    "alarm_delay_s": 3, "clear_delay_s": 0,
    "bands": {"temperature_c": {"on": [20, 26], "hysteresis": 0.5},
              "vpd_kpa": {"on": [0.2, 3.0]}, "rh_pct": {"on": [30, 80]}},
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def peer() -> Iterator[tuple[ModbusPeer, int]]:
    """pymodbus's own server with the XY-MD02 map, RTU framing over loopback TCP."""
    p = ModbusPeer()
    port = _free_port()
    p.start_tcp(port)
    try:
        yield p, port
    finally:
        p.close()


@pytest.fixture
def site(tmp_path: Path, peer: tuple[ModbusPeer, int]) -> Iterator[LocalSite]:
    """Broker, HQ receiver and edge-agent with one Modbus sensor in one room."""
    _, port = peer
    s = LocalSite(tmp_path, devices=[{
        "id": DEVICE, "type": "sensor", "model": "xy-md02", "room": "Flower 2",
        "url": f"modbus-rtu+socket://127.0.0.1:{port}?unit={XY}&timeout=0.5",
        "interval_s": 1,
        # The peer's registers hold still between changes; a real room never does
        # for a minute, which is what the flat-line check looks for (tested elsewhere).
        "plausibility": {"flatline_samples": 0},
    }], rooms=[ROOM])
    try:
        s.start()
        yield s
    finally:
        s.stop()


def _alarms(site: LocalSite) -> list[tuple[str, str]]:
    return [(e["data"]["code"], e["data"]["state"]) for e in site.hq_events("alarm")
            if e["data"]["code"].startswith("climate_")]


@pytest.mark.e2e
def test_modbus_readings_and_one_alarm_each_way_reach_hq(site: LocalSite,
                                                          peer: tuple[ModbusPeer, int]) -> None:
    """Readings with VPD reach HQ; out of band past the delay: one raised, back: one cleared."""
    modbus, _ = peer
    readings = wait_for(lambda: [e for e in site.hq_events("sensor") if e["data"]["valid"]],
                        20, what="valid readings at HQ")
    first = readings[0]
    assert first["source"] == DEVICE and first["data"]["device"] == DEVICE
    assert first["data"]["room"] == "Flower 2"
    assert first["data"]["temperature_c"] == pytest.approx(25.1)
    assert first["data"]["rh_pct"] == pytest.approx(60.3)
    assert first["data"]["vpd_kpa"] == pytest.approx(1.265, abs=0.002)
    assert first["data"]["dew_point_c"] == pytest.approx(16.87, abs=0.02)

    modbus.values[XY]["input"][1] = 275          # 27.5 C: above 26, and no spike (< 3 C)
    wait_for(lambda: _alarms(site), 20, what="the alarm at HQ")
    raised = next(e for e in site.hq_events("alarm") if e["data"]["code"].startswith("climate_"))
    assert raised["data"]["code"] == "climate_temperature_high"
    assert raised["data"]["room"] == "Flower 2" and raised["data"]["value"] == pytest.approx(27.5)
    assert raised["source"] == "climate"
    status, rooms = site.request("GET", "/v1/rooms")
    assert status == 200
    assert [a["code"] for a in rooms["rooms"][0]["alarms"]] == ["climate_temperature_high"]
    hot = len(site.hq_events("sensor"))
    wait_for(lambda: len(site.hq_events("sensor")) >= hot + 3, 10, what="more hot readings")
    assert _alarms(site) == [("climate_temperature_high", "raised")]   # raised once

    modbus.values[XY]["input"][1] = 251
    wait_for(lambda: len(_alarms(site)) >= 2, 20, what="the clear at HQ")
    back = len(site.hq_events("sensor"))
    wait_for(lambda: len(site.hq_events("sensor")) >= back + 3, 10, what="more readings")
    assert _alarms(site) == [("climate_temperature_high", "raised"),
                             ("climate_temperature_high", "cleared")]
    status, body = site.request("GET", "/v1/sensors")
    assert status == 200
    latest = body["sensors"][0]
    assert latest["device"] == DEVICE and latest["valid"] is True
    assert latest["temperature_c"] == pytest.approx(25.1)
