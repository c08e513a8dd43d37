"""Sensor and room config: pydantic models for the TOML, turned into frozen specs.

The daemon's ``[[devices]]`` entries of ``type = "sensor"`` carry these keys
beside ``id``/``type``/``url``/``enabled``; rooms are a ``[[rooms]]`` array.
Errors come back as one :class:`SensorConfigError` listing every problem with
its key path (``registers.temperature_c.scale: ...``, ``rooms[1].bands...``),
which the daemon prefixes and maps into its own ``ConfigError``.

A sensor::

    [[devices]]
    id = "flower-2-climate"
    type = "sensor"
    model = "xy-md02"              # xy-md02 | senseair-s8 | gmp252 | scd4x | custom | sim
    room = "Flower 2"
    url = "modbus-rtu:///dev/ttyUSB1?unit=1&baudrate=9600"
    interval_s = 10
    calibration = { temperature_c = -0.3, rh_pct = 1.5 }     # added to the raw value
    # model = "custom": the register map as data
    # [devices.registers.temperature_c]
    # register_type = "holding"; address = 0; data_type = "float32"; word_order = "little"
    # scale = 1.0; offset = 0.0; failure_values = [-9999]

A room::

    [[rooms]]
    name = "Flower 2"
    stage = "flower"               # clone | veg | flower | dry
    lights_on = "06:00"            # local time (site.timezone)
    lights_off = "18:00"
    leaf_temp_offset_c = -2.0
    alarm_delay_s = 600
    [rooms.bands]                  # overrides of the stage's defaults
    temperature_c = { on = [20, 28], off = [17, 24], hysteresis = 0.5 }
    co2_ppm = { on = [800, 1500], off = { high = 1200 } }
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from drivers.sensor.errors import SensorConfigError, SensorConfigIssue
from drivers.sensor.plausibility import (
    DEFAULT_MAX_RATE,
    DEFAULT_RANGES,
    DEFAULT_SPIKE_JUMP,
    PlausibilityConfig,
)
from drivers.sensor.reader import MODELS, SensorSpec
from drivers.sensor.registers import (
    PRESETS,
    DataType,
    FieldSpec,
    RegisterMap,
    RegisterType,
    StatusSpec,
    WordOrder,
)
from drivers.sensor.rooms import (
    BAND_QUANTITIES,
    STAGE_LIGHTS,
    STAGE_TARGETS,
    Band,
    LightSchedule,
    RoomSpec,
    Stage,
    Target,
)

QuantityName = Literal["temperature_c", "rh_pct", "co2_ppm"]
# Warm-up per model when the config does not say: SCD4x's first periodic
# measurements are less accurate; the S8 reads 0 for ~30 s after power-up.
WARMUP_S = {"scd4x": 10.0, "senseair-s8": 30.0, "xy-md02": 2.0, "gmp252": 0.0}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegisterFieldConfig(_Model):
    register_type: Literal["input", "holding"] = "input"
    address: Annotated[int, Field(ge=0, le=65535)]
    data_type: Literal["int16", "uint16", "int32", "uint32", "float32"] = "int16"
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0
    offset: float = 0.0
    failure_values: list[float] = Field(default_factory=list)

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: float) -> float:
        if not math.isfinite(value) or value == 0:
            raise ValueError("must be a finite non-zero number (value = raw * scale + offset)")
        return value


class StatusRegisterConfig(_Model):
    name: str = "status"
    register_type: Literal["input", "holding"] = "input"
    address: Annotated[int, Field(ge=0, le=65535)]
    error_mask: Annotated[int, Field(ge=1, le=0xFFFF)]


class PlausibilityOptions(_Model):
    ranges: dict[QuantityName, tuple[float, float]] = Field(default_factory=dict)
    spike_window: Annotated[int, Field(ge=3, le=100)] = 9
    spike_jump: dict[QuantityName, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    max_rate: dict[QuantityName, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    flatline_samples: Annotated[int, Field(ge=0, le=100_000)] = 60
    stale_intervals: Annotated[float, Field(ge=1, le=100)] = 3.0

    @field_validator("ranges")
    @classmethod
    def _ranges(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for quantity, (low, high) in value.items():
            if low >= high:
                raise ValueError(f"{quantity}: low {low} must be below high {high}")
        return value


class SensorDeviceConfig(_Model):
    id: str
    type: Literal["sensor"] = "sensor"
    url: str
    enabled: bool = True
    model: Literal["xy-md02", "senseair-s8", "gmp252", "scd4x", "custom", "sim"]
    room: Annotated[str, Field(min_length=1, max_length=64)]
    interval_s: Annotated[float, Field(ge=1, le=3600)] = 10.0
    warmup_s: Annotated[float, Field(ge=0, le=3600)] | None = None
    calibration: dict[QuantityName, float] = Field(default_factory=dict)
    plausibility: PlausibilityOptions = Field(default_factory=PlausibilityOptions)
    registers: dict[QuantityName, RegisterFieldConfig] | None = None
    status: list[StatusRegisterConfig] = Field(default_factory=list)


BandValue = tuple[float, float] | dict[Literal["low", "high"], float]


class BandConfig(_Model):
    on: BandValue
    off: BandValue | None = None
    hysteresis: Annotated[float, Field(ge=0)] | None = None


class RoomConfig(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    stage: Literal["clone", "veg", "flower", "dry"]
    lights_on: str | None = None
    lights_off: str | None = None
    leaf_temp_offset_c: Annotated[float, Field(ge=-10, le=10)] = 0.0
    alarm_delay_s: Annotated[float, Field(ge=0, le=86400)] = 600.0
    clear_delay_s: Annotated[float, Field(ge=0, le=86400)] = 0.0
    co2_safety_ppm: Annotated[float, Field(ge=1000, le=40000)] = 5000.0
    co2_safety_delay_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    bands: dict[Literal["vpd_kpa", "temperature_c", "rh_pct", "co2_ppm"], BandConfig] = Field(
        default_factory=dict)


def parse_sensor(device: Mapping[str, Any],
                 rooms: Mapping[str, RoomSpec] | None = None) -> SensorSpec:
    """A validated SensorSpec from one ``[[devices]]`` table (paths relative to it)."""
    device_id = str(device.get("id", "sensor"))
    try:
        cfg = SensorDeviceConfig.model_validate(dict(device))
    except ValidationError as exc:
        raise SensorConfigError(device_id, _issues(exc)) from None
    issues: list[SensorConfigIssue] = []
    register_map: RegisterMap | None = PRESETS.get(cfg.model)
    if cfg.model == "custom":
        if not cfg.registers:
            issues.append(SensorConfigIssue(
                "registers", "model custom needs a [devices.registers.<quantity>] table for "
                             "each of temperature_c, rh_pct, co2_ppm it measures"))
        else:
            try:
                register_map = _custom_map(cfg)
            except ValueError as exc:
                issues.append(SensorConfigIssue("registers", str(exc)))
    elif cfg.registers is not None:
        issues.append(SensorConfigIssue("registers", f"only model custom takes a register map "
                                                     f"({cfg.model} is a preset)"))
    if cfg.model == "scd4x" and cfg.interval_s < 5:
        issues.append(SensorConfigIssue("interval_s", "the SCD4x measures every 5 s; "
                                                      "an interval under 5 s reads nothing new"))
    room = None
    if rooms:
        room = rooms.get(cfg.room)
        if room is None:
            issues.append(SensorConfigIssue(
                "room", f"{cfg.room!r} is not a [[rooms]] name (known: {', '.join(rooms)})"))
    issues.extend(url_issues(cfg.id, cfg.model, cfg.url))
    if issues:
        raise SensorConfigError(cfg.id, issues)
    warmup = cfg.warmup_s
    if warmup is None:
        warmup = register_map.warmup_s if register_map else WARMUP_S.get(cfg.model, 0.0)
    p = cfg.plausibility
    plausibility = PlausibilityConfig(
        ranges={**DEFAULT_RANGES, **p.ranges}, spike_window=p.spike_window,
        spike_jump={**DEFAULT_SPIKE_JUMP, **p.spike_jump},
        max_rate={**DEFAULT_MAX_RATE, **p.max_rate}, flatline_samples=p.flatline_samples,
        stale_intervals=p.stale_intervals, warmup_s=warmup, offsets=dict(cfg.calibration))
    return SensorSpec(
        device=cfg.id, room=cfg.room, model=cfg.model, url=cfg.url, interval_s=cfg.interval_s,
        register_map=register_map, plausibility=plausibility,
        leaf_temp_offset_c=room.leaf_temp_offset_c if room else 0.0)


def url_issues(device: str, model: str, url: str) -> list[SensorConfigIssue]:
    """Check a sensor URL without opening anything (for ``check-config``)."""
    from urllib.parse import urlsplit

    from drivers.sensor.modbus import ModbusUrl
    from drivers.sensor.scd4x import Scd4xUrl
    from drivers.sensor.sim import SimParams

    scheme = urlsplit(url).scheme
    try:
        if scheme == "sim":
            SimParams.from_url(url, device)
        elif scheme == "modbus-rtu" or scheme.startswith("modbus-rtu+"):
            if model in ("scd4x", "sim"):
                return [SensorConfigIssue("model", f"{model} is not a Modbus sensor")]
            ModbusUrl.parse(url, device)
        elif scheme == "i2c":
            if model != "scd4x":
                return [SensorConfigIssue("model", f"i2c:// sensors are model scd4x, "
                                                   f"not {model!r}")]
            Scd4xUrl.parse(url, device)
        else:
            return [SensorConfigIssue("url", f"{url!r}: a sensor URL is "
                                             "modbus-rtu:///dev/ttyUSB1?unit=1, "
                                             "i2c:///dev/i2c-1?address=0x62 or sim://climate")]
    except SensorConfigError as exc:
        return list(exc.issues)
    return []


def _custom_map(cfg: SensorDeviceConfig) -> RegisterMap:
    assert cfg.registers is not None
    fields = tuple(
        FieldSpec(quantity, f.address, RegisterType(f.register_type), DataType(f.data_type),
                  WordOrder(f.word_order), f.scale, f.offset, tuple(f.failure_values))
        for quantity, f in cfg.registers.items())
    status = tuple(StatusSpec(s.name, s.address, s.error_mask, RegisterType(s.register_type))
                   for s in cfg.status)
    return RegisterMap(model=f"custom ({cfg.id})", fields=fields, status=status)


def parse_rooms(rooms: Sequence[Mapping[str, Any]], tz: str = "UTC") -> dict[str, RoomSpec]:
    """Validated RoomSpecs by name from the ``[[rooms]]`` array (paths ``rooms[i]...``)."""
    issues: list[SensorConfigIssue] = []
    out: dict[str, RoomSpec] = {}
    seen: set[str] = set()
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise SensorConfigError("rooms", [SensorConfigIssue(
            "site.timezone", f"{tz!r} is not an IANA time zone such as America/Denver")]) from None
    for i, raw in enumerate(rooms):
        prefix = f"rooms[{i}]"
        try:
            cfg = RoomConfig.model_validate(dict(raw))
        except ValidationError as exc:
            issues.extend(SensorConfigIssue(f"{prefix}.{x.path}" if x.path else prefix, x.message)
                          for x in _issues(exc))
            continue
        if cfg.name in seen:
            issues.append(SensorConfigIssue(f"{prefix}.name", f"{cfg.name!r} is used twice"))
            continue
        seen.add(cfg.name)
        try:
            out[cfg.name] = _room(cfg, tz)
        except _PathError as exc:
            issues.append(SensorConfigIssue(f"{prefix}.{exc.path}", exc.message))
    if issues:
        raise SensorConfigError("rooms", issues)
    return out


class _PathError(Exception):
    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


def _room(cfg: RoomConfig, tz: str) -> RoomSpec:
    stage = Stage(cfg.stage)
    default_on, default_off = STAGE_LIGHTS[stage]
    explicit = cfg.lights_on is not None or cfg.lights_off is not None
    on = cfg.lights_on if explicit else default_on
    off = cfg.lights_off if explicit else default_off
    try:
        lights = LightSchedule.parse(on, off, tz)
    except ValueError as exc:
        raise _PathError("lights_on" if cfg.lights_on else "lights_off", str(exc)) from None
    targets = dict(STAGE_TARGETS[stage])
    for quantity, band in cfg.bands.items():
        base = targets.get(quantity)
        try:
            on_band = _band(band.on)
            off_band = _band(band.off) if band.off is not None else on_band
        except ValueError as exc:
            raise _PathError(f"bands.{quantity}", str(exc)) from None
        hysteresis = band.hysteresis if band.hysteresis is not None else (
            base.hysteresis if base else _DEFAULT_HYSTERESIS[quantity])
        targets[quantity] = Target(on_band, off_band, hysteresis)
    return RoomSpec(name=cfg.name, stage=stage, targets=targets, lights=lights,
                    leaf_temp_offset_c=cfg.leaf_temp_offset_c, alarm_delay_s=cfg.alarm_delay_s,
                    clear_delay_s=cfg.clear_delay_s, co2_safety_ppm=cfg.co2_safety_ppm,
                    co2_safety_delay_s=cfg.co2_safety_delay_s)


_DEFAULT_HYSTERESIS = {"vpd_kpa": 0.05, "temperature_c": 0.5, "rh_pct": 2.0, "co2_ppm": 50.0}
assert set(_DEFAULT_HYSTERESIS) == set(BAND_QUANTITIES)


def _band(value: BandValue) -> Band:
    if isinstance(value, dict):
        return Band(value.get("low"), value.get("high"))
    return Band(*value)


def room_for(name: str, rooms: Mapping[str, RoomSpec], tz: str = "UTC") -> RoomSpec:
    """The configured room, or a safety-only room (CO2 limit, no bands) for an unlisted name."""
    room = rooms.get(name)
    if room is not None:
        return room
    return RoomSpec(name=name, stage=Stage.FLOWER, targets={},
                    lights=LightSchedule.parse(None, None, tz))


def _issues(exc: ValidationError) -> list[SensorConfigIssue]:
    issues = []
    for err in exc.errors():
        path = ""
        for part in err["loc"]:
            # pydantic names union branches (tuple[float, float], dict[...]); drop them.
            if isinstance(part, str) and ("[" in part or part in ("tuple", "dict")):
                continue
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            message = f"{err['input']!r}: {message}"
        issues.append(SensorConfigIssue(path, message))
    # A union reports one error per branch; keep the first per path.
    seen: set[str] = set()
    unique = []
    for issue in issues:
        if issue.path not in seen:
            seen.add(issue.path)
            unique.append(issue)
    return unique


__all__ = ["MODELS", "RoomConfig", "SensorDeviceConfig", "parse_rooms", "parse_sensor",
           "room_for"]
