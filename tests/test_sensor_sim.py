"""The simulated room: plausible over a day, seeded, and faults that plausibility catches."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime

import pytest

from drivers.sensor.errors import SensorConfigError
from drivers.sensor.plausibility import Checker, PlausibilityConfig
from drivers.sensor.reader import SensorSpec, build_reading
from drivers.sensor.reading import Fault
from drivers.sensor.rooms import AlarmCleared, AlarmRaised, RoomMonitor, RoomSpec
from drivers.sensor.sim import SimClimate

MIDNIGHT = datetime(2026, 6, 1, tzinfo=UTC).timestamp()


def _day(url: str, step: float = 60.0, device: str = "sim-1"):  # type: ignore[no-untyped-def]
    sim = SimClimate.from_url(url, device)
    return [(MIDNIGHT + i * step, sim.read(MIDNIGHT + i * step)) for i in range(int(86400 / step))]


def test_a_day_in_the_flower_room_is_plausible_and_raises_no_alarm() -> None:
    """A simulated flower-room day has no plausibility fault and raises no alarm."""
    spec = SensorSpec(device="sim-1", room="Flower 2", model="sim", url="sim://climate?seed=1",
                      interval_s=60.0, leaf_temp_offset_c=-2.0)
    checker = Checker(PlausibilityConfig(), started_at=MIDNIGHT, interval_s=60.0)
    room = RoomMonitor(RoomSpec.for_stage("Flower 2", "flower"))
    faults: list[Fault] = []
    edges: list[AlarmRaised | AlarmCleared] = []
    for ts, sample in _day(spec.url):
        assert sample is not None
        reading = build_reading(spec, checker.check(sample, ts), ts)
        faults += reading.faults
        edges += room.observe(reading, ts)
    assert faults == []
    assert edges == []


def test_day_and_night_differ_the_way_a_grow_room_does() -> None:
    """Lights on (06-18 UTC): warmer, enriched CO2; lights off: cooler, CO2 near ambient."""
    day = _day("sim://climate?seed=2")
    lit = [s for ts, s in day if 7 <= datetime.fromtimestamp(ts, UTC).hour < 18]
    dark = [s for ts, s in day if datetime.fromtimestamp(ts, UTC).hour < 5]
    mean = statistics.fmean
    assert mean(s.temperature_c for s in lit) == pytest.approx(26.0, abs=0.5)
    assert mean(s.temperature_c for s in dark) == pytest.approx(20.0, abs=0.5)
    assert 1000 < mean(s.co2_ppm for s in lit) < 1400
    assert 420 < mean(s.co2_ppm for s in dark) < 800
    assert all(35.0 < s.rh_pct < 75.0 for _, s in day)


def test_seeded_and_reproducible() -> None:
    """The same URL and read times give the same readings; another seed or device differs."""
    a, b = _day("sim://climate?seed=5", 600), _day("sim://climate?seed=5", 600)
    assert a == b
    assert a != _day("sim://climate?seed=6", 600)
    assert a != _day("sim://climate?seed=5", 600, device="sim-2")


def test_quantities_subset_and_exact_mode() -> None:
    """quantities=co2 gives a CO2-only sensor; noise=0 gives exact, repeatable values."""
    sim = SimClimate.from_url("sim://climate?quantities=co2&noise=0", "co2-1")
    s = sim.read(MIDNIGHT + 12 * 3600)
    assert s is not None and s.temperature_c is None and s.rh_pct is None and s.co2_ppm


def test_stuck_sensor_is_caught_as_flatline() -> None:
    """fault=stuck freezes the output after fault_after_s; plausibility flags the flat-line."""
    sim = SimClimate.from_url("sim://climate?seed=3&fault=stuck&fault_after_s=600", "stuck-1")
    checker = Checker(PlausibilityConfig(flatline_samples=10), started_at=MIDNIGHT,
                      interval_s=10.0)
    codes = []
    for i in range(200):
        ts = MIDNIGHT + 10 * i
        sample = sim.read(ts)
        assert sample is not None
        codes.append({f.code for f in checker.check(sample, ts).faults})
    assert not any(codes[:60])
    assert all("flatline" in c for c in codes[80:])


def test_spiking_sensor_is_caught_as_spikes() -> None:
    """fault=spike adds glitches; plausibility flags them and nothing else."""
    sim = SimClimate.from_url("sim://climate?seed=4&fault=spike&spike_p=0.1", "spiky-1")
    checker = Checker(PlausibilityConfig(), started_at=MIDNIGHT, interval_s=10.0)
    seen: list[str] = []
    for i in range(500):
        ts = MIDNIGHT + 10 * i
        sample = sim.read(ts)
        assert sample is not None
        seen += [f.code for f in checker.check(sample, ts).faults]
    assert seen.count("spike") >= 20
    assert set(seen) <= {"spike", "range"}  # an RH glitch can leave 0..100 too


def test_offline_sensor_stops_answering() -> None:
    """fault=offline gives no_answer samples after fault_after_s."""
    sim = SimClimate.from_url("sim://climate?fault=offline&fault_after_s=30", "gone-1")
    assert sim.read(MIDNIGHT).faults == ()  # type: ignore[union-attr]
    sample = sim.read(MIDNIGHT + 31)
    assert sample is not None and [f.code for f in sample.faults] == ["no_answer"]


@pytest.mark.parametrize(("url", "path"), [
    ("sim://printer", "url"),
    ("sim://climate?fault=fire", "url.fault"),
    ("sim://climate?day_c=warm", "url.day_c"),
    ("sim://climate?colour=red", "url.colour"),
    ("sim://climate?lights_on=25:00", "url.lights"),
    ("sim://climate?quantities=t,wind", "url.quantities"),
])
def test_bad_sim_urls_name_the_key(url: str, path: str) -> None:
    """A bad sim URL is a config error naming the key."""
    with pytest.raises(SensorConfigError) as err:
        SimClimate.from_url(url, "sim-1")
    assert [i.path for i in err.value.issues] == [path]
