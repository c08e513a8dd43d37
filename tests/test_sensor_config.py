"""Sensor and room config: presets, custom register maps, rooms, errors with key paths."""

from __future__ import annotations

import math
from typing import Any

import pytest

from drivers.sensor.config import parse_rooms, parse_sensor, room_for
from drivers.sensor.errors import SensorConfigError
from drivers.sensor.registers import DataType, RegisterType, WordOrder
from drivers.sensor.rooms import Band, Stage


def _device(**kw: Any) -> dict[str, Any]:
    base = {"id": "flower-2-climate", "type": "sensor", "model": "xy-md02", "room": "Flower 2",
            "url": "modbus-rtu:///dev/ttyUSB1?unit=1&baudrate=9600", "interval_s": 10}
    return base | kw


def _paths(err: pytest.ExceptionInfo[SensorConfigError]) -> set[str]:
    return {i.path for i in err.value.issues}


def test_contract_example_device_parses() -> None:
    """The CONTRACT 3 sensor example is valid and gets the xy-md02 preset and warm-up."""
    spec = parse_sensor(_device())
    assert spec.register_map is not None and spec.register_map.model == "xy-md02"
    assert spec.plausibility.warmup_s == 2.0 and spec.interval_s == 10.0


def test_room_link_brings_the_leaf_offset_and_unknown_rooms_are_named() -> None:
    """A sensor in a configured room takes its leaf offset; an unknown room is an error."""
    rooms = parse_rooms([{"name": "Flower 2", "stage": "flower", "leaf_temp_offset_c": -2.0}])
    assert parse_sensor(_device(), rooms).leaf_temp_offset_c == -2.0
    with pytest.raises(SensorConfigError) as err:
        parse_sensor(_device(room="Flower 9"), rooms)
    assert _paths(err) == {"room"} and "Flower 2" in str(err.value)


def test_calibration_and_plausibility_options_reach_the_checker() -> None:
    """calibration offsets and plausibility overrides end up in the PlausibilityConfig."""
    spec = parse_sensor(_device(calibration={"temperature_c": -0.3},
                                plausibility={"flatline_samples": 0, "spike_jump": {"co2_ppm": 900},
                                              "ranges": {"temperature_c": [0, 50]}},
                                warmup_s=60))
    p = spec.plausibility
    assert p.offsets == {"temperature_c": -0.3}
    assert p.flatline_samples == 0 and p.spike_jump["co2_ppm"] == 900
    assert p.spike_jump["temperature_c"] == 3.0  # defaults kept for the rest
    assert p.ranges["temperature_c"] == (0, 50) and p.warmup_s == 60


def test_custom_register_map_from_config() -> None:
    """model = custom builds the register map from [devices.registers.*] tables."""
    spec = parse_sensor(_device(model="custom", registers={
        "co2_ppm": {"register_type": "holding", "address": 0, "data_type": "float32",
                    "word_order": "little", "failure_values": [float("nan")]},
        "temperature_c": {"address": 4, "scale": 0.01, "offset": -40},
    }, status=[{"address": 100, "error_mask": 3}]))
    m = spec.register_map
    assert m is not None and len(m.fields) == 2
    co2 = next(f for f in m.fields if f.quantity == "co2_ppm")
    assert (co2.register_type, co2.data_type, co2.word_order) == (
        RegisterType.HOLDING, DataType.FLOAT32, WordOrder.LITTLE)
    assert math.isnan(co2.failure_values[0])
    assert m.status[0].error_mask == 3


@pytest.mark.parametrize(("device", "paths"), [
    (_device(model="xy-md03"), {"model"}),
    (_device(interval_s=0), {"interval_s"}),
    (_device(model="custom"), {"registers"}),
    (_device(registers={"co2_ppm": {"address": 3}}), {"registers"}),
    (_device(model="custom", registers={"co2_ppm": {"address": 70000, "data_type": "int8",
                                                    "scale": 0}}),
     {"registers.co2_ppm.address", "registers.co2_ppm.data_type", "registers.co2_ppm.scale"}),
    (_device(url="modbus-rtu:///dev/ttyUSB1?unit=300"), {"url.unit"}),
    (_device(model="scd4x", url="i2c:///dev/i2c-1", interval_s=2), {"interval_s"}),
    (_device(model="xy-md02", url="i2c:///dev/i2c-1"), {"model"}),
    (_device(model="sim", url="sim://climate?fault=fire"), {"url.fault"}),
    (_device(colour="red"), {"colour"}),
])
def test_bad_sensor_config_names_every_key(device: dict[str, Any], paths: set[str]) -> None:
    """Each problem is reported with its key path, all at once."""
    with pytest.raises(SensorConfigError) as err:
        parse_sensor(device)
    assert _paths(err) == paths
    assert err.value.device == "flower-2-climate"


def test_rooms_take_stage_defaults_and_overrides() -> None:
    """A room gets its stage's bands and lights; [rooms.bands] overrides one quantity."""
    rooms = parse_rooms([
        {"name": "Flower 2", "stage": "flower",
         "bands": {"co2_ppm": {"on": [900, 1400], "off": {"high": 1000}, "hysteresis": 25}}},
        {"name": "Dry 1", "stage": "dry"},
    ], tz="America/Denver")
    flower = rooms["Flower 2"]
    assert flower.stage is Stage.FLOWER
    assert flower.targets["co2_ppm"].on == Band(900, 1400)
    assert flower.targets["co2_ppm"].off == Band(None, 1000)
    assert flower.targets["co2_ppm"].hysteresis == 25
    assert flower.targets["temperature_c"].on == Band(20.0, 28.0)
    assert str(flower.lights.on) == "06:00:00" and str(flower.lights.tz) == "America/Denver"
    assert rooms["Dry 1"].lights.on is None and "co2_ppm" not in rooms["Dry 1"].targets


def test_bad_rooms_are_reported_with_their_index() -> None:
    """Room errors carry rooms[i] paths; duplicate names and inverted bands are caught."""
    with pytest.raises(SensorConfigError) as err:
        parse_rooms([
            {"name": "A", "stage": "bloom"},
            {"name": "B", "stage": "veg", "bands": {"rh_pct": {"on": [70, 50]}}},
            {"name": "B", "stage": "veg"},
            {"name": "C", "stage": "veg", "lights_on": "25:00"},
        ])
    assert _paths(err) == {"rooms[0].stage", "rooms[1].bands.rh_pct", "rooms[2].name",
                           "rooms[3].lights_on"}
    with pytest.raises(SensorConfigError) as err:
        parse_rooms([], tz="Mars/Olympus")
    assert _paths(err) == {"site.timezone"}


def test_unlisted_room_is_safety_only() -> None:
    """A sensor's room missing from [[rooms]] still gets the CO2 safety alarm, no bands."""
    room = room_for("Cure 3", {})
    assert room.targets == {} and room.co2_safety_ppm == 5000.0
