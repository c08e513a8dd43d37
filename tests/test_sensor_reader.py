"""The per-sensor poller: the Reading shape, states and edges, stale marking, the run loop."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

import pytest

from drivers.sensor.errors import SensorConfigError
from drivers.sensor.plausibility import PlausibilityConfig
from drivers.sensor.reader import SensorPoller, SensorSpec, open_source
from drivers.sensor.reading import Sample
from drivers.sensor.scd4x import Scd4xSensor
from drivers.sensor.scd4x_fake import FakeScd4x
from drivers.sensor.sim import SimClimate
from tests.conftest import wait_for

NOON = datetime(2026, 6, 1, 12, tzinfo=UTC).timestamp()
CONTRACT_KEYS = {"device", "room", "ts", "temperature_c", "rh_pct", "co2_ppm", "vpd_kpa",
                 "dew_point_c", "valid", "reason"}


class Clock:
    """A settable clock for the poller."""

    def __init__(self, t: float = NOON) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _spec(url: str = "sim://climate?seed=1", model: str = "sim", **kw: object) -> SensorSpec:
    return SensorSpec(device="flower-2-climate", room="Flower 2", model=model, url=url,
                      interval_s=10.0, **kw)  # type: ignore[arg-type]


def test_reading_has_the_contract_shape() -> None:
    """A poll gives GET /v1/sensors' fields (plus leaf VPD, absolute humidity, fault codes)."""
    clock = Clock()
    poller = SensorPoller(_spec(leaf_temp_offset_c=-2.0), clock=clock)
    reading = poller.poll()
    assert reading is not None and reading.valid and reading.reason is None
    d = reading.as_dict()
    assert set(d) >= CONTRACT_KEYS
    assert d["device"] == "flower-2-climate" and d["room"] == "Flower 2"
    assert d["ts"] == "2026-06-01T12:00:00.000Z"
    assert 0.5 < d["vpd_kpa"] < 2.5 and d["leaf_vpd_kpa"] < d["vpd_kpa"]
    assert d["dew_point_c"] < d["temperature_c"]
    assert d["faults"] == []
    assert poller.state == "up"


def test_absent_quantities_are_null() -> None:
    """A CO2-only sensor reports null temperature, RH, VPD and dew point."""
    poller = SensorPoller(_spec("sim://climate?quantities=co2"), clock=Clock())
    d = poller.poll().as_dict()  # type: ignore[union-attr]
    assert d["co2_ppm"] is not None
    assert (d["temperature_c"], d["rh_pct"], d["vpd_kpa"], d["dew_point_c"]) == (None,) * 4


def test_warmup_then_up() -> None:
    """Inside the warm-up time readings are invalid ('warmup') and the state is starting."""
    clock = Clock()
    poller = SensorPoller(_spec(plausibility=PlausibilityConfig(warmup_s=30)), clock=clock)
    first = poller.poll()
    assert first is not None and not first.valid and first.codes == {"warmup"}
    assert poller.state == "starting"
    clock.t += 30
    assert poller.poll().valid and poller.state == "up"  # type: ignore[union-attr]


def test_latest_is_marked_stale_after_three_intervals() -> None:
    """After 3 intervals without a reading the latest is stale and the sensor down."""
    clock = Clock()
    poller = SensorPoller(_spec(), clock=clock)
    poller.poll()
    clock.t += 30
    assert poller.latest().valid  # type: ignore[union-attr]
    clock.t += 1
    stale = poller.latest()
    assert stale is not None and not stale.valid and "stale" in stale.codes
    assert "31 s" in (stale.reason or "")
    snap = poller.snapshot()
    assert snap["state"] == "down" and "stale" in snap["error"]
    assert snap["last_reading"]["valid"] is False


def test_never_read_sensor_goes_down_after_three_intervals() -> None:
    """A sensor that never produced a reading is down after 3 intervals in the snapshot."""
    clock = Clock()
    chip = FakeScd4x(clock)
    source = Scd4xSensor(chip, sleep=lambda s: setattr(clock, "t", clock.t + s))
    poller = SensorPoller(_spec("i2c:///dev/i2c-1", model="scd4x"), source, clock=clock)
    chip.unplugged = True
    assert poller.snapshot()["state"] == "starting"
    clock.t += 31
    assert poller.snapshot()["state"] == "down"


def test_scd4x_not_ready_yields_no_reading() -> None:
    """With the SCD4x fake, polls between measurements return None, not a repeated reading."""
    clock = Clock()
    chip = FakeScd4x(clock)
    source = Scd4xSensor(chip, sleep=lambda s: setattr(clock, "t", clock.t + s))
    poller = SensorPoller(_spec("i2c:///dev/i2c-1", model="scd4x"), source, clock=clock)
    assert poller.poll() is None
    clock.t += 5
    assert poller.poll() is not None
    assert poller.poll() is None


def test_suspect_readings_are_degraded_with_one_warning(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """A stuck sim sensor turns degraded with one WARNING; repeats are DEBUG only."""
    clock = Clock()
    spec = _spec("sim://climate?fault=stuck", plausibility=PlausibilityConfig(flatline_samples=3))
    poller = SensorPoller(spec, clock=clock)
    caplog.set_level(logging.DEBUG, logger="drivers.sensor.reader")
    for _ in range(10):
        clock.t += 10
        poller.poll()
    assert poller.state == "degraded"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "flower-2-climate" in warnings[0].getMessage()
    assert "stuck at" in warnings[0].getMessage()


class _BrokenSource:
    describe = "a driver with a bug"

    def __init__(self) -> None:
        self.calls = 0

    def read(self, now: float) -> Sample | None:
        self.calls += 1
        raise ZeroDivisionError("oops")

    def close(self) -> None:
        pass


def test_a_driver_bug_is_an_invalid_reading_logged_once(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """An exception inside a driver becomes an invalid reading; the traceback is logged once."""
    poller = SensorPoller(_spec(), _BrokenSource(), clock=Clock())
    with caplog.at_level(logging.ERROR):
        readings = [poller.poll() for _ in range(3)]
    assert all(r is not None and not r.valid and "ZeroDivisionError" in (r.reason or "")
               for r in readings)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1


def test_run_loop_polls_on_schedule_and_stops_promptly() -> None:
    """run() polls each interval, survives a failing consumer and stops at once."""
    spec = SensorSpec(device="d", room="r", model="sim", url="sim://climate", interval_s=0.05)
    poller = SensorPoller(spec)
    got: list[object] = []

    def consume(reading: object) -> None:
        got.append(reading)
        if len(got) == 2:
            raise RuntimeError("consumer bug")

    stop = threading.Event()
    thread = threading.Thread(target=poller.run, args=(stop, consume))
    thread.start()
    try:
        wait_for(lambda: len(got) >= 6, 5, what="six readings")
    finally:
        stop.set()
        thread.join(2)
    assert not thread.is_alive()


def test_open_source_by_url() -> None:
    """The URL scheme picks the transport; a wrong scheme or model is a config error."""
    sim = open_source(_spec())
    assert isinstance(sim, SimClimate)
    i2c = open_source(_spec("i2c:///dev/i2c-nope?address=0x62", model="scd4x"))
    assert isinstance(i2c, Scd4xSensor)
    i2c.close()
    with pytest.raises(SensorConfigError, match="model scd4x"):
        open_source(_spec("i2c:///dev/i2c-1", model="xy-md02"))
    with pytest.raises(SensorConfigError, match="sensor URL"):
        open_source(_spec("tcp://10.0.0.5:502"))
    with pytest.raises(SensorConfigError, match="no Modbus register map"):
        open_source(_spec("modbus-rtu:///dev/ttyUSB9?unit=1", model="scd4x"))
