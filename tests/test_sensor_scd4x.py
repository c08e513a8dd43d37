"""SCD4x over a fake I2C bus that speaks the command protocol with real CRCs."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st
from smbus2 import i2c_msg

from drivers.sensor import scd4x as p
from drivers.sensor.errors import CrcError, SensorConfigError
from drivers.sensor.scd4x import Scd4xSensor, Scd4xUrl
from drivers.sensor.scd4x_fake import FakeScd4x


class FakeClock:
    """Time that only moves when the driver waits (its injected sleep) or the test says so."""

    def __init__(self) -> None:
        self.t = 1_000_000.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock shared by the fake chip and the driver."""
    return FakeClock()


@pytest.fixture
def chip(clock: FakeClock) -> FakeScd4x:
    """A fake SCD4x fresh from the factory (ASC on)."""
    return FakeScd4x(clock.now)


def _sensor(chip: FakeScd4x, clock: FakeClock, **kw: object) -> Scd4xSensor:
    return Scd4xSensor(chip, sleep=clock.sleep, device="veg-1-co2", **kw)  # type: ignore[arg-type]


def test_crc8_datasheet_example() -> None:
    """The datasheet's example: CRC of 0xBEEF is 0x92."""
    assert p.crc8(b"\xbe\xef") == 0x92


def test_command_frames_carry_a_crc_per_argument_word() -> None:
    """set_automatic_self_calibration_enabled(0) is 24 16 00 00 81 on the wire."""
    assert p.encode_command(p.SET_AUTOMATIC_SELF_CALIBRATION_ENABLED, 0) == bytes.fromhex(
        "2416000081")
    assert p.encode_command(p.START_PERIODIC_MEASUREMENT) == bytes.fromhex("21b1")


@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=9))
def test_words_round_trip_and_every_corrupted_crc_is_caught(words: list[int]) -> None:
    """Encoded words decode back; flipping the CRC of any one word raises CrcError for it."""
    data = p.encode_words(words)
    assert p.decode_words(data) == words
    for i in range(len(words)):
        bad = bytearray(data)
        bad[3 * i + 2] ^= 0x5A
        with pytest.raises(CrcError) as err:
            p.decode_words(bytes(bad))
        assert err.value.word_index == i


def test_start_turns_asc_off_and_reads_it_back(chip: FakeScd4x, clock: FakeClock,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Default start: stop (wait 500 ms), ASC off, read back, start periodic; no warning."""
    s = _sensor(chip, clock)
    assert chip.asc_enabled  # factory default
    with caplog.at_level(logging.WARNING):
        assert s.read(clock.now()) is None  # started, nothing measured yet
    assert not chip.asc_enabled and chip.measuring
    assert chip.commands[:4] == [p.STOP_PERIODIC_MEASUREMENT,
                                 p.SET_AUTOMATIC_SELF_CALIBRATION_ENABLED,
                                 p.GET_AUTOMATIC_SELF_CALIBRATION_ENABLED,
                                 p.START_PERIODIC_MEASUREMENT]
    assert 0.5 in clock.slept
    assert not caplog.records and s.warnings == []


def test_asc_on_warns_clearly(chip: FakeScd4x, clock: FakeClock,
                              caplog: pytest.LogCaptureFixture) -> None:
    """asc=True leaves ASC on and logs a warning that says why that drifts in enriched rooms."""
    s = _sensor(chip, clock, asc=True)
    with caplog.at_level(logging.WARNING):
        s.read(clock.now())
    assert chip.asc_enabled
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    assert "veg-1-co2" in text and "self-calibration is ON" in text and "asc=0" in text
    assert s.warnings == [text]


def test_periodic_measurement_decoded(chip: FakeScd4x, clock: FakeClock) -> None:
    """After 5 s a measurement is ready and decodes to the chip's CO2, T and RH."""
    s = _sensor(chip, clock)
    chip.co2_ppm, chip.temperature_c, chip.rh_pct = 1234, 26.5, 55.0
    assert s.read(clock.now()) is None
    clock.t += 5.0
    sample = s.read(clock.now())
    assert sample is not None and sample.faults == ()
    assert sample.co2_ppm == 1234
    assert sample.temperature_c == pytest.approx(26.5, abs=0.01)
    assert sample.rh_pct == pytest.approx(55.0, abs=0.01)
    assert s.read(clock.now()) is None  # data-ready cleared by the read


def test_corrupted_crc_on_the_last_word_is_rejected(chip: FakeScd4x, clock: FakeClock) -> None:
    """A bad CRC on the RH word (the third) gives a crc fault: every word is checked."""
    s = _sensor(chip, clock)
    s.read(clock.now())
    clock.t += 5.0
    chip.corrupt(p.READ_MEASUREMENT, word=2)
    sample = s.read(clock.now())
    assert sample is not None and sample.co2_ppm is None
    assert [f.code for f in sample.faults] == ["crc"]
    assert "word 2" in sample.faults[0].message
    clock.t += 5.0
    good = s.read(clock.now())
    assert good is not None and good.faults == ()


def test_unplugged_sensor_is_no_answer_and_restarts_when_back(chip: FakeScd4x,
                                                              clock: FakeClock) -> None:
    """A NACKing bus is no_answer; when it answers the driver restarts it and reads."""
    s = _sensor(chip, clock)
    s.read(clock.now())
    chip.unplugged = True
    sample = s.read(clock.now())
    assert sample is not None and [f.code for f in sample.faults] == ["no_answer"]
    assert "0x62" in sample.faults[0].message
    chip.unplugged = False
    chip.measuring = False  # power-cycled: idle, factory ASC
    chip.asc_enabled = True
    assert s.read(clock.now()) is None
    assert not chip.asc_enabled and chip.measuring
    clock.t += 5.0
    again = s.read(clock.now())
    assert again is not None and again.faults == ()


def test_fake_chip_refuses_configuration_while_measuring(chip: FakeScd4x,
                                                         clock: FakeClock) -> None:
    """The fake NACKs config while measuring and reads before the execution time."""
    chip.i2c_rdwr(i2c_msg.write(0x62, p.encode_command(p.START_PERIODIC_MEASUREMENT)))
    with pytest.raises(OSError):
        chip.i2c_rdwr(i2c_msg.write(0x62, p.encode_command(
            p.SET_AUTOMATIC_SELF_CALIBRATION_ENABLED, 0)))
    chip.i2c_rdwr(i2c_msg.write(0x62, p.encode_command(p.GET_DATA_READY_STATUS)))
    with pytest.raises(OSError):
        chip.i2c_rdwr(i2c_msg.read(0x62, 3))  # 0 ms after a 1 ms command


def test_sensor_left_measuring_by_a_previous_process_is_restarted(chip: FakeScd4x,
                                                                  clock: FakeClock) -> None:
    """A chip already in periodic mode still gets ASC off: the driver stops it first."""
    chip.i2c_rdwr(i2c_msg.write(0x62, p.encode_command(p.START_PERIODIC_MEASUREMENT)))
    s = _sensor(chip, clock)
    s.read(clock.now())
    assert not chip.asc_enabled and chip.measuring


def test_temperature_offset_is_sent(chip: FakeScd4x, clock: FakeClock) -> None:
    """A configured temperature offset reaches the chip as offset * 65535 / 175."""
    s = _sensor(chip, clock, temperature_offset_c=2.5)
    s.read(clock.now())
    assert chip.temperature_offset_raw == round(2.5 * 65535 / 175)


def test_close_stops_measurement(chip: FakeScd4x, clock: FakeClock) -> None:
    """close() stops periodic measurement, so the chip idles at low power."""
    s = _sensor(chip, clock)
    s.read(clock.now())
    s.close()
    assert not chip.measuring


def test_url_parsing() -> None:
    """i2c URLs give bus path, address (hex or decimal), ASC and T offset; bad keys are named."""
    u = Scd4xUrl.parse("i2c:///dev/i2c-1?address=0x62")
    assert (u.bus, u.address, u.asc, u.temperature_offset_c) == ("/dev/i2c-1", 0x62, False, None)
    v = Scd4xUrl.parse("i2c:///dev/i2c-0?address=98&asc=1&temperature_offset=4")
    assert (v.address, v.asc, v.temperature_offset_c) == (98, True, 4.0)
    with pytest.raises(SensorConfigError) as err:
        Scd4xUrl.parse("i2c:///dev/i2c-1?address=0x99&asc=maybe&speed=fast", "veg-1-co2")
    paths = {i.path for i in err.value.issues}
    assert paths == {"url.address", "url.asc", "url.speed"}


def test_opening_a_missing_bus_is_a_down_sensor_not_a_crash(tmp_path: object) -> None:
    """An i2c bus that does not exist yet opens lazily: each read reports no_answer."""
    s = Scd4xSensor.open("i2c:///dev/i2c-does-not-exist?address=0x62", "veg-1-co2",
                         sleep=lambda _s: None)
    sample = s.read(0.0)
    assert sample is not None and [f.code for f in sample.faults] == ["no_answer"]
    s.close()
