"""Room bands and alarms: fire once after the delay, clear once with hysteresis, CO2 safety."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from agent.pipeline.schemas import validate
from drivers.sensor.derived import air_vpd_kpa, leaf_vpd_kpa
from drivers.sensor.reader import SensorSpec, build_reading
from drivers.sensor.reading import Fault, Reading, Sample
from drivers.sensor.rooms import (
    AlarmCleared,
    AlarmRaised,
    Band,
    LightSchedule,
    RoomMonitor,
    RoomSpec,
    Target,
)

# 2026-06-01 12:00 UTC: lights on in a 06:00-18:00 UTC flower room.
NOON = datetime(2026, 6, 1, 12, 0, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2026, 6, 2, 0, 0, tzinfo=UTC).timestamp()


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, t: float) -> None:
        self.t = t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


def _reading(ts: float, device: str = "s1", *, t: float | None = 25.0, rh: float | None = 50.0,
             co2: float | None = 1100.0, faults: tuple[Fault, ...] = ()) -> Reading:
    spec = SensorSpec(device=device, room="Flower 2", model="sim", url="sim://climate",
                      leaf_temp_offset_c=-2.0)
    return build_reading(spec, Sample(t, rh, co2, faults), ts)


def _room(**kw: object) -> RoomMonitor:
    spec = RoomSpec.for_stage("Flower 2", "flower", alarm_delay_s=600, **kw)  # type: ignore[arg-type]
    return RoomMonitor(spec)


def _feed(room: RoomMonitor, clock: Clock, seconds: float, step: float = 10.0, **values: object
          ) -> list[AlarmRaised | AlarmCleared]:
    """Feed one reading every ``step`` seconds for ``seconds``; return every edge."""
    edges: list[AlarmRaised | AlarmCleared] = []
    end = clock.t + seconds
    while clock.t < end:
        now = clock.advance(step)
        edges += room.observe(_reading(now, **values), now)  # type: ignore[arg-type]
    return edges


def test_in_band_room_raises_nothing() -> None:
    """A flower room at 25 C, 50 %, 1,100 ppm, leaf VPD in band: no alarms all day."""
    room, clock = _room(), Clock(NOON)
    assert _feed(room, clock, 3600) == []


def test_out_of_band_fires_once_after_the_delay_and_clears_once_with_hysteresis() -> None:
    """29 C fires once after 600 s; 27.8 C holds it (hysteresis); 27.4 C clears it once."""
    room, clock = _room(), Clock(NOON)
    start = clock.t
    edges = _feed(room, clock, 590, t=29.0, rh=54.0)
    assert edges == []
    edges = _feed(room, clock, 1800, t=29.0, rh=54.0)
    raised = [e for e in edges if isinstance(e, AlarmRaised)]
    assert len(raised) == 1 and len(edges) == 1
    alarm = raised[0]
    assert (alarm.code, alarm.side, alarm.severity) == ("climate_temperature_high", "high",
                                                        "warning")
    assert alarm.ts - start == pytest.approx(600, abs=10) and alarm.since == start + 10
    assert "above the lights-on band 20..28" in alarm.message
    assert _feed(room, clock, 600, t=27.8, rh=54.0) == []
    assert room.open_alarms() == [alarm]
    edges = _feed(room, clock, 600, t=27.4, rh=54.0)
    assert len(edges) == 1 and isinstance(edges[0], AlarmCleared)
    assert edges[0].code == "climate_temperature_high" and edges[0].raised_at == alarm.ts
    assert room.open_alarms() == []
    assert _feed(room, clock, 600, t=27.4, rh=54.0) == []


def test_short_excursions_never_fire() -> None:
    """Out of band for less than the delay, back in, out again: the timer restarts, no alarm."""
    room, clock = _room(), Clock(NOON)
    for _ in range(5):
        assert _feed(room, clock, 300, t=30.0, rh=55.0) == []
        assert _feed(room, clock, 60, t=25.0) == []


def test_delay_expires_between_readings_on_evaluate() -> None:
    """evaluate(now) on a timer raises an alarm whose delay ran out after the last reading."""
    room, clock = _room(sensor_max_age_s=3600.0), Clock(NOON)
    room.observe(_reading(clock.t, t=30.0, rh=55.0), clock.t)
    assert room.evaluate(clock.advance(599)) == []
    (edge,) = room.evaluate(clock.advance(1))
    assert isinstance(edge, AlarmRaised) and edge.quantity == "temperature_c"


def test_clear_delay_requires_the_value_to_stay_back() -> None:
    """With clear_delay_s the value must stay inside the hysteresis margin that long to clear."""
    room, clock = _room(clear_delay_s=300), Clock(NOON)
    _feed(room, clock, 700, t=30.0, rh=55.0)
    assert room.open_alarms()
    assert _feed(room, clock, 200, t=25.0) == []
    assert _feed(room, clock, 10, t=30.0, rh=55.0) == []  # relapse: the clear timer resets
    assert _feed(room, clock, 290, t=25.0) == []
    edges = _feed(room, clock, 20, t=25.0)
    assert [type(e) for e in edges] == [AlarmCleared]


def test_co2_safety_alarm_is_critical_and_separate() -> None:
    """5,200 ppm raises CO2 safety (critical) after 30 s; it clears once below 4,500."""
    room, clock = _room(), Clock(NOON)
    edges = _feed(room, clock, 40, co2=5200.0)
    assert [(e.code, e.severity) for e in edges if isinstance(e, AlarmRaised)] == [
        ("co2_safety", "critical")]
    assert "5000 ppm safety limit" in edges[0].message
    edges = _feed(room, clock, 600, co2=5200.0)
    assert [e.code for e in edges] == ["climate_co2_high"]
    assert _feed(room, clock, 60, co2=4700.0) == []
    edges = _feed(room, clock, 20, co2=1400.0)
    assert sorted(e.code for e in edges) == ["climate_co2_high", "co2_safety"]
    assert all(isinstance(e, AlarmCleared) for e in edges)


def test_spike_flagged_co2_counts_for_safety_but_not_for_bands() -> None:
    """A stuck-open CO2 valve looks like a spike: safety still fires, the band alarm does not."""
    room, clock = _room(), Clock(NOON)
    spike = (Fault("spike", "co2_ppm jumped", "co2_ppm"),)
    edges = _feed(room, clock, 900, co2=6000.0, faults=spike)
    assert [e.code for e in edges] == ["co2_safety"]


def test_invalid_readings_never_raise() -> None:
    """Readings with device faults (failure value, range) are ignored by the alarms."""
    room, clock = _room(), Clock(NOON)
    bad = (Fault("range", "temperature_c 85 outside", "temperature_c"),)
    assert _feed(room, clock, 1800, t=85.0, co2=9000.0, faults=bad) == []


def test_backfilled_readings_never_raise_or_clear() -> None:
    """Flagged backfill and readings older than backfill_after_s change nothing."""
    room, clock = _room(), Clock(NOON)
    for _ in range(200):
        now = clock.advance(10)
        assert room.observe(_reading(now, t=35.0, co2=8000.0), now, backfill=True) == []
        assert room.observe(_reading(now - 3600, t=35.0, co2=8000.0), now) == []
    _feed(room, clock, 700, t=30.0)
    assert room.open_alarms()
    for _ in range(100):
        now = clock.advance(10)
        assert room.observe(_reading(now, t=24.0), now, backfill=True) == []
    assert room.open_alarms()


def test_one_lying_sensor_among_three_does_not_move_the_room() -> None:
    """One lying sensor of three does not move the room's median; two do."""
    room, clock = _room(), Clock(NOON)
    for _ in range(100):
        now = clock.advance(10)
        for device, t in (("a", 25.0), ("b", 25.2), ("c", 35.0)):
            assert room.observe(_reading(now, device, t=t), now) == []
    edges = []
    for _ in range(70):
        now = clock.advance(10)
        for device, t in (("a", 25.0), ("b", 34.0), ("c", 35.0)):
            edges += room.observe(_reading(now, device, t=t), now)
    assert "climate_temperature_high" in [e.code for e in edges]


def test_a_silent_room_holds_its_alarm() -> None:
    """When every sensor goes quiet the alarm stays raised: silence is not recovery."""
    room, clock = _room(), Clock(NOON)
    _feed(room, clock, 700, t=30.0)
    assert room.evaluate(clock.advance(7200)) == []
    assert room.open_alarms()


def test_lights_off_band_applies_at_night() -> None:
    """1,300 ppm is in the lights-on CO2 band but above a 1,000 ppm lights-off band."""
    co2 = Target(Band(800, 1500), Band(None, 1000), 50)
    room = _room(overrides={"co2_ppm": co2})
    clock = Clock(NOON)
    assert _feed(room, clock, 900, co2=1300.0) == []
    clock.t = MIDNIGHT
    edges = _feed(room, clock, 700, co2=1300.0, t=20.0, rh=50.0)
    assert [e.code for e in edges] == ["climate_co2_high"]
    assert "lights-off band -..1000" in edges[0].message


def test_vpd_band_uses_the_leaf_vpd() -> None:
    """The VPD band judges leaf VPD: 22 C / 55 % is in band as air VPD, low at the leaf."""
    room, clock = _room(), Clock(NOON)
    edges = _feed(room, clock, 700, t=22.0, rh=55.0)
    assert [e.code for e in edges] == ["climate_vpd_low"]
    assert edges[0].value == pytest.approx(leaf_vpd_kpa(22.0, 55.0, -2.0))
    assert air_vpd_kpa(22.0, 55.0) > 1.0


def test_alarm_payloads_are_valid_alarm_events() -> None:
    """Raised and cleared payloads pass the agent's alarm schema and are JSON."""
    room, clock = _room(), Clock(NOON)
    edges = _feed(room, clock, 700, co2=5500.0) + _feed(room, clock, 20, co2=1100.0)
    assert {type(e) for e in edges} == {AlarmRaised, AlarmCleared}
    for edge in edges:
        payload = edge.payload()
        json.dumps(payload)
        assert validate("alarm", payload)["state"] in ("raised", "cleared")
        assert payload["room"] == "Flower 2"


def test_light_schedule_across_midnight_and_time_zone() -> None:
    """An 18/6 schedule from 18:00 to 12:00 local (Denver) is on at 02:00 local, off at 14:00."""
    lights = LightSchedule.parse("18:00", "12:00", "America/Denver")
    two_am = datetime(2026, 6, 1, 8, 0, tzinfo=UTC).timestamp()   # 02:00 MDT
    two_pm = datetime(2026, 6, 1, 20, 0, tzinfo=UTC).timestamp()  # 14:00 MDT
    assert lights.lights_on(two_am) and not lights.lights_on(two_pm)
    assert not LightSchedule.parse(None, None).lights_on(two_am)   # dry room: dark
    assert LightSchedule.parse("00:00", None).lights_on(two_pm)    # always on


def test_band_rejects_inverted_limits() -> None:
    """A band whose low is not below its high is refused."""
    with pytest.raises(ValueError, match="below high"):
        Band(30.0, 20.0)
