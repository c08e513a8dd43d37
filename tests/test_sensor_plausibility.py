"""Plausibility: range, spike, flat-line, stale, warm-up, calibration; suspects kept, marked."""

from __future__ import annotations

import pytest

from drivers.sensor.plausibility import Checker, PlausibilityConfig
from drivers.sensor.reading import Fault, Sample

T0 = 1_800_000_000.0


def _checker(**kw: object) -> Checker:
    return Checker(PlausibilityConfig(**kw), started_at=T0, interval_s=10.0)  # type: ignore[arg-type]


def _codes(s: Sample) -> list[str]:
    return [f.code for f in s.faults]


def test_clean_readings_pass_untouched() -> None:
    """Ordinary readings come back unchanged with no faults."""
    c = _checker()
    for i in range(20):
        s = c.check(Sample(25.0 + 0.1 * (i % 3), 55.0 - 0.2 * (i % 4), 1100.0 + i), T0 + 10 * i)
        assert s.faults == ()


def test_out_of_range_value_is_marked_and_kept() -> None:
    """-40 C from an unplugged probe is kept, marked 'range' for that quantity only."""
    c = _checker()
    s = c.check(Sample(temperature_c=-40.0, rh_pct=55.0), T0)
    assert s.temperature_c == -40.0  # never dropped
    (fault,) = s.faults
    assert (fault.code, fault.quantity) == ("range", "temperature_c")
    assert "-40" in fault.message


def test_spike_against_the_median_is_flagged_and_does_not_poison_the_median() -> None:
    """A CO2 jump of 3,000 ppm over a steady 1,100 is a spike; the next normal value is clean."""
    c = _checker()
    for i in range(9):
        assert c.check(Sample(co2_ppm=1100.0 + (i % 3) * 10), T0 + i).faults == ()
    spike = c.check(Sample(co2_ppm=4100.0), T0 + 10)
    assert _codes(spike) == ["spike"] and spike.co2_ppm == 4100.0
    assert "median" in spike.faults[0].message
    assert c.check(Sample(co2_ppm=1110.0), T0 + 11).faults == ()


def test_fast_real_ramp_at_a_long_interval_is_not_a_spike() -> None:
    """A real CO2 ramp read once a minute is not a spike; a glitch is."""
    c = _checker()
    t = T0
    for _ in range(9):
        t += 60
        c.check(Sample(co2_ppm=600.0), t)
    for level in (900.0, 1200.0, 1300.0, 1250.0):
        t += 60
        assert c.check(Sample(co2_ppm=level), t).faults == ()
    t += 60
    assert _codes(c.check(Sample(co2_ppm=3800.0), t)) == ["spike"]


def test_no_spike_verdict_before_enough_samples() -> None:
    """With fewer than spike_min_samples there is no median to judge against."""
    c = _checker()
    c.check(Sample(co2_ppm=1100.0), T0)
    assert c.check(Sample(co2_ppm=5000.0), T0 + 1).faults == ()


def test_noisy_signal_raises_the_spike_threshold() -> None:
    """A noisy sensor (large MAD) is judged against its own spread, not the absolute floor."""
    c = _checker(spike_jump={"co2_ppm": 100.0})
    for i, v in enumerate([1000, 1300, 900, 1250, 950, 1200, 1050, 1350, 980]):
        c.check(Sample(co2_ppm=float(v)), T0 + i)
    assert c.check(Sample(co2_ppm=1500.0), T0 + 10).faults == ()


def test_level_shift_is_accepted_after_half_a_window() -> None:
    """A real step change (lights on, CO2 injection) stops being a spike once it is the median."""
    c = _checker()
    for i in range(9):
        c.check(Sample(co2_ppm=500.0), T0 + i)
    flags = [_codes(c.check(Sample(co2_ppm=1400.0 + (i % 2)), T0 + 10 + i)) for i in range(8)]
    assert flags[0] == ["spike"]
    assert flags[-1] == []


def test_flatline_after_n_identical_samples() -> None:
    """The same value N times in a row is a flat-line (a stuck sensor); a change clears it."""
    c = _checker(flatline_samples=5)
    results = [c.check(Sample(temperature_c=24.3, rh_pct=50.0 + i), T0 + i) for i in range(6)]
    assert [_codes(r) for r in results[:4]] == [[], [], [], []]
    assert _codes(results[4]) == ["flatline"] and results[4].faults[0].quantity == "temperature_c"
    assert "5 samples" in results[4].faults[0].message
    assert _codes(results[5]) == ["flatline"]
    assert c.check(Sample(temperature_c=24.4), T0 + 7).faults == ()


def test_flatline_disabled_with_zero() -> None:
    """flatline_samples = 0 turns the check off."""
    c = _checker(flatline_samples=0)
    for i in range(100):
        assert c.check(Sample(co2_ppm=800.0), T0 + i).faults == ()


def test_stale_after_three_intervals() -> None:
    """No reading for more than 3 intervals is stale, with the age in the message."""
    c = _checker()
    assert c.stale(T0, T0 + 30.0) is None
    fault = c.stale(T0, T0 + 31.0)
    assert isinstance(fault, Fault) and fault.code == "stale"
    assert "31 s" in fault.message and "3 intervals of 10 s" in fault.message
    assert c.stale(None, T0 + 29.0) is None  # since start
    assert "no reading yet" in (c.stale(None, T0 + 45.0) or Fault("stale", "")).message


def test_warmup_readings_are_marked_and_not_remembered() -> None:
    """During warm-up every reading is marked 'warmup' and kept out of the spike history."""
    c = _checker(warmup_s=30.0, spike_min_samples=1)
    s = c.check(Sample(co2_ppm=3000.0), T0 + 5)
    assert _codes(s) == ["warmup"] and s.co2_ppm == 3000.0 and "5 s of 30 s" in s.faults[0].message
    assert c.check(Sample(co2_ppm=800.0), T0 + 30).faults == ()
    assert c.check(Sample(co2_ppm=810.0), T0 + 40).faults == ()  # 3000 never entered the median


def test_calibration_offsets_apply_before_the_checks() -> None:
    """Offsets are added to the raw values, and the range check sees the calibrated value."""
    c = _checker(offsets={"temperature_c": -0.4, "co2_ppm": 25.0},
                 ranges={"temperature_c": (-20.0, 60.0), "rh_pct": (0.0, 100.0),
                         "co2_ppm": (150.0, 40000.0)})
    s = c.check(Sample(temperature_c=25.0, rh_pct=60.0, co2_ppm=130.0), T0)
    assert s.temperature_c == pytest.approx(24.6)
    assert s.rh_pct == 60.0
    assert s.co2_ppm == 155.0 and s.faults == ()


def test_device_faults_pass_through_with_plausibility_faults() -> None:
    """A failure value from the device stays, and a range fault on another quantity is added."""
    c = _checker()
    device = Fault("failure_value", "xy-md02 rh_pct: failure value 0xffff", "rh_pct")
    s = c.check(Sample(temperature_c=99.0, faults=(device,)), T0)
    assert _codes(s) == ["failure_value", "range"]
