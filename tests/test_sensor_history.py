"""The 24-hour per-minute history: aggregation, bounds on disk, persistence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.devices.climate_history import History
from drivers.sensor.reader import SensorSpec, build_reading
from drivers.sensor.reading import Fault, Reading, Sample

T0 = 1_780_000_020.0  # a minute boundary
assert T0 % 60 == 0


class Clock:
    """A settable clock for the history."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _reading(ts: float, device: str = "s1", t: float = 25.0, valid: bool = True) -> Reading:
    spec = SensorSpec(device=device, room="Flower 2", model="sim", url="sim://climate")
    faults = () if valid else (Fault("spike", "spike"),)
    return build_reading(spec, Sample(t, 50.0, 1000.0, faults), ts)


def test_a_minute_of_readings_becomes_one_point(tmp_path: Path) -> None:
    """A minute of readings folds into one row of valid-only stats, invalid ones counted."""
    clock = Clock()
    with History(str(tmp_path / "h.db"), clock=clock) as h:
        for i in range(60):
            h.add(_reading(T0 + i, t=20.0 + i * 0.1, valid=i != 30))
        clock.t = T0 + 61
        assert h.flush() == 1
        (point,) = h.series("s1")
        assert (point.minute, point.readings, point.invalid) == (T0, 60, 1)
        temp = point.stats["temperature_c"]
        assert temp.n == 59 and temp.min == 20.0 and temp.max == pytest.approx(25.9)
        assert temp.mean == pytest.approx((sum(20 + i * 0.1 for i in range(60)) - 23.0) / 59)
        assert "vpd_kpa" in point.stats and "dew_point_c" in point.stats
        d = point.as_dict()
        assert d["ts"].endswith("Z") and d["temperature_c"]["max"] == pytest.approx(25.9)


def test_series_includes_the_minute_in_progress(tmp_path: Path) -> None:
    """The chart shows the current minute before it is written."""
    clock = Clock(T0 + 30)
    with History(str(tmp_path / "h.db"), clock=clock) as h:
        h.add(_reading(T0 + 5))
        assert h.flush() == 0
        assert [p.readings for p in h.series("s1")] == [1]


def test_history_is_bounded_to_24_hours(tmp_path: Path) -> None:
    """Three days of data keep at most 24 h of rows and the file stops growing."""
    clock = Clock()
    path = str(tmp_path / "h.db")
    sizes = []
    with History(path, clock=clock) as h:
        for minute in range(3 * 1440):
            ts = T0 + 60 * minute
            clock.t = ts + 1
            for device in ("a", "b", "c"):
                h.add(_reading(ts, device))
            h.flush()
            if minute % 1440 == 1439:
                sizes.append(os.path.getsize(path) + os.path.getsize(path + "-wal"))
        assert h.rows() <= 3 * 1440
        oldest = h.series("a")[0].minute
        assert clock.t - oldest <= 24 * 3600 + 60
        assert h.devices() == ["a", "b", "c"]
    assert sizes[2] <= sizes[1] * 1.1


def test_history_survives_reopen_and_merges_a_split_minute(tmp_path: Path) -> None:
    """Closing mid-minute writes it; readings after a restart in the same minute merge in."""
    clock = Clock(T0 + 10)
    path = str(tmp_path / "h.db")
    with History(path, clock=clock) as h:
        h.add(_reading(T0 + 1, t=20.0))
        h.add(_reading(T0 + 2, t=22.0))
    with History(path, clock=clock) as h:
        h.add(_reading(T0 + 20, t=24.0))
        clock.t = T0 + 70
        h.flush()
        (point,) = h.series("s1")
        assert point.readings == 3
        assert point.stats["temperature_c"].mean == pytest.approx(22.0)
        assert (point.stats["temperature_c"].min, point.stats["temperature_c"].max) == (20, 24)


def test_old_backfill_is_not_stored(tmp_path: Path) -> None:
    """Readings older than the retention are dropped on write, not kept forever."""
    clock = Clock(T0 + 3 * 86400)
    with History(str(tmp_path / "h.db"), clock=clock) as h:
        h.add(_reading(T0))
        h.flush()
        assert h.rows() == 0
