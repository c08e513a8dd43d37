"""Modbus register maps as data, and their decoding (pure: register lists in, a Sample out).

A sensor model is a :class:`RegisterMap`: which registers hold which
quantity, how the words become a number (type, word order, scale, offset),
which raw values the vendor uses to say "no measurement", and which status
bits mean the sensor is faulty. Presets cover common grow-room sensors; a
``custom`` model gives the same description in config. Nothing here touches a
bus: :meth:`RegisterMap.reads` says what to fetch and :meth:`RegisterMap.decode`
turns the fetched words into a :class:`~drivers.sensor.reading.Sample`.

Addresses are PDU addresses (0-based, what goes on the wire). Vendor sheets
that number registers from 1 (Vaisala, Senseair's "IR4") are converted in the
presets and say so.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from drivers.sensor.reading import Fault, Quantity, Sample

MAX_REGISTERS_PER_READ = 125  # Modbus limit for function codes 3 and 4


class RegisterType(StrEnum):
    INPUT = "input"      # function code 4
    HOLDING = "holding"  # function code 3


class DataType(StrEnum):
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    FLOAT32 = "float32"

    @property
    def words(self) -> int:
        return 1 if self in (DataType.INT16, DataType.UINT16) else 2


class WordOrder(StrEnum):
    BIG = "big"        # high word first (the Modbus "default")
    LITTLE = "little"  # low word first (Vaisala, many PLCs)


_STRUCT = {
    DataType.INT16: ">h",
    DataType.UINT16: ">H",
    DataType.INT32: ">i",
    DataType.UINT32: ">I",
    DataType.FLOAT32: ">f",
}


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` registers of ``register_type`` from ``address``."""

    register_type: RegisterType
    address: int
    count: int

    def covers(self, register_type: RegisterType, address: int, count: int) -> bool:
        return (
            register_type == self.register_type
            and self.address <= address
            and address + count <= self.address + self.count
        )


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One measured quantity: where it lives and how raw words become a value.

    value = raw * scale + offset. ``failure_values`` are compared with the raw
    number before scaling; ``nan`` in it matches any NaN (Vaisala's "unavailable").
    """

    quantity: Quantity
    address: int
    register_type: RegisterType = RegisterType.INPUT
    data_type: DataType = DataType.INT16
    word_order: WordOrder = WordOrder.BIG
    scale: float = 1.0
    offset: float = 0.0
    failure_values: tuple[float, ...] = ()

    @property
    def count(self) -> int:
        return self.data_type.words

    def __post_init__(self) -> None:
        if not 0 <= self.address <= 0xFFFF - self.count + 1:
            raise ValueError(f"{self.quantity}: address {self.address} is outside 0..65535")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"{self.quantity}: scale must be a finite non-zero number")


@dataclass(frozen=True, slots=True)
class StatusSpec:
    """A status register: any bit of ``error_mask`` set makes the whole reading invalid."""

    name: str
    address: int
    error_mask: int
    register_type: RegisterType = RegisterType.INPUT
    bits: tuple[tuple[int, str], ...] = ()  # (bit value, meaning) for the message

    @property
    def count(self) -> int:
        return 1

    def describe(self, raw: int) -> str:
        errors = raw & self.error_mask
        names = [meaning for bit, meaning in self.bits if errors & bit]
        detail = f" ({', '.join(names)})" if names else ""
        return f"{self.name} {raw:#06x}{detail}"


@dataclass(frozen=True)
class RegisterMap:
    """A sensor model as data: its fields, status registers and warm-up time."""

    model: str
    fields: tuple[FieldSpec, ...]
    status: tuple[StatusSpec, ...] = ()
    warmup_s: float = 0.0
    # Registers between two fields are read rather than asked for separately,
    # up to this gap: one request is far cheaper than two on a 9600 baud line.
    max_gap: int = 8

    def __post_init__(self) -> None:
        if not self.fields:
            raise ValueError(f"{self.model}: a register map needs at least one field")
        seen: set[str] = set()
        for f in self.fields:
            if f.quantity in seen:
                raise ValueError(f"{self.model}: {f.quantity} is mapped twice")
            seen.add(f.quantity)

    def reads(self) -> tuple[Block, ...]:
        """The read requests that fetch every field and status register, coalesced."""
        wanted = {(f.register_type, f.address, f.count) for f in self.fields}
        wanted |= {(s.register_type, s.address, s.count) for s in self.status}
        spans = sorted(
            wanted,
            key=lambda s: (s[0].value, s[1]),
        )
        blocks: list[Block] = []
        for rtype, address, count in spans:
            if blocks:
                last = blocks[-1]
                end = max(last.address + last.count, address + count)
                if (
                    last.register_type == rtype
                    and address - (last.address + last.count) <= self.max_gap
                    and end - last.address <= MAX_REGISTERS_PER_READ
                ):
                    blocks[-1] = Block(rtype, last.address, end - last.address)
                    continue
            blocks.append(Block(rtype, address, count))
        return tuple(blocks)

    def decode(self, data: Mapping[Block, Sequence[int]]) -> Sample:
        """Turn the words fetched for :meth:`reads` into a Sample (failure values become faults)."""
        faults: list[Fault] = []
        for status in self.status:
            raw = _words(data, status.register_type, status.address, 1)[0]
            if raw & status.error_mask:
                faults.append(Fault("status", f"{self.model} reports {status.describe(raw)}"))
        values: dict[str, float | None] = {}
        for spec in self.fields:
            value, fault = decode_field(spec, _words(data, spec.register_type, spec.address,
                                                     spec.count))
            values[spec.quantity] = value
            if fault is not None:
                faults.append(Fault("failure_value", f"{self.model} {fault}", spec.quantity))
        return Sample(
            temperature_c=values.get("temperature_c"),
            rh_pct=values.get("rh_pct"),
            co2_ppm=values.get("co2_ppm"),
            faults=tuple(faults),
        )


def decode_field(spec: FieldSpec, words: Sequence[int]) -> tuple[float | None, str | None]:
    """(value, None), or (None, why) when the raw value is a failure value or not a number."""
    raw = decode_raw(spec.data_type, spec.word_order, words)
    for failure in spec.failure_values:
        if (math.isnan(failure) and math.isnan(raw)) or raw == failure:
            return None, f"{spec.quantity}: failure value {_show(spec, words)}"
    if not math.isfinite(raw):
        return None, f"{spec.quantity}: not a number {_show(spec, words)}"
    return raw * spec.scale + spec.offset, None


def decode_raw(data_type: DataType, word_order: WordOrder, words: Sequence[int]) -> float:
    """The raw number in ``words`` (16-bit registers, each big-endian on the wire)."""
    if len(words) != data_type.words:
        raise ValueError(f"{data_type} needs {data_type.words} registers, got {len(words)}")
    for w in words:
        if not 0 <= w <= 0xFFFF:
            raise ValueError(f"register value {w} is not 16-bit")
    ordered = list(words) if word_order is WordOrder.BIG else list(reversed(words))
    raw = b"".join(w.to_bytes(2, "big") for w in ordered)
    value: float = struct.unpack(_STRUCT[data_type], raw)[0]
    return value


def encode_raw(data_type: DataType, word_order: WordOrder, value: float) -> list[int]:
    """The registers a device sends for ``value`` (inverse of :func:`decode_raw`; for tests)."""
    fmt = _STRUCT[data_type]
    packed = struct.pack(fmt, value if data_type is DataType.FLOAT32 else int(value))
    words = [int.from_bytes(packed[i:i + 2], "big") for i in range(0, len(packed), 2)]
    return words if word_order is WordOrder.BIG else list(reversed(words))


def _words(data: Mapping[Block, Sequence[int]], rtype: RegisterType, address: int,
           count: int) -> Sequence[int]:
    for block, words in data.items():
        if block.covers(rtype, address, count):
            start = address - block.address
            return words[start:start + count]
    raise KeyError(f"no {rtype} registers {address}..{address + count - 1} were read")


def _show(spec: FieldSpec, words: Sequence[int]) -> str:
    hex_words = "".join(f"{w:04x}" for w in words)
    return f"0x{hex_words} ({spec.data_type}, {spec.word_order} word order)"


# --- presets --------------------------------------------------------------------------------

NAN = float("nan")

XY_MD02 = RegisterMap(
    model="xy-md02",
    fields=(
        # Input registers 1 and 2, tenths. The sheet lists no failure code; the
        # register extremes, which no real reading reaches, are treated as one.
        FieldSpec("temperature_c", 1, RegisterType.INPUT, DataType.INT16, scale=0.1,
                  failure_values=(-32768.0, 32767.0)),
        FieldSpec("rh_pct", 2, RegisterType.INPUT, DataType.UINT16, scale=0.1,
                  failure_values=(65535.0,)),
    ),
    warmup_s=2.0,
)

SENSEAIR_S8 = RegisterMap(
    model="senseair-s8",
    fields=(
        # "IR4 Space CO2" is PDU address 3. The S8 reports 0 ppm while it warms
        # up; 0 ppm does not occur in air, so it is a failure value.
        FieldSpec("co2_ppm", 3, RegisterType.INPUT, DataType.UINT16, failure_values=(0.0,)),
    ),
    status=(
        # "IR1 MeterStatus": bits 0..6 are errors.
        StatusSpec("meter status", 0, 0x007F, RegisterType.INPUT, bits=(
            (0x01, "fatal error"), (0x02, "offset regulation error"),
            (0x04, "algorithm error"), (0x08, "output error"),
            (0x10, "self-diagnostics error"), (0x20, "out of range"),
            (0x40, "memory error"),
        )),
    ),
    warmup_s=30.0,
)

GMP252 = RegisterMap(
    model="gmp252",
    fields=(
        # Register number 1 = address 0: CO2 as a float32, least significant
        # word first. A quiet NaN means "unavailable" (no Modbus exception).
        FieldSpec("co2_ppm", 0, RegisterType.HOLDING, DataType.FLOAT32, WordOrder.LITTLE,
                  failure_values=(NAN,)),
    ),
    status=(
        # Register 2049 (0x0800) device status: 1 critical, 2 error (4 is a warning only).
        StatusSpec("device status", 0x0800, 0x0003, RegisterType.HOLDING,
                   bits=((0x1, "critical error"), (0x2, "error"))),
        # Register 2050 (0x0801) CO2 status: 2 not reliable, 256 not ready (start-up).
        StatusSpec("CO2 status", 0x0801, 0x0102, RegisterType.HOLDING,
                   bits=((0x002, "CO2 reading not reliable"), (0x100, "measurement not ready"))),
    ),
)

PRESETS: dict[str, RegisterMap] = {m.model: m for m in (XY_MD02, SENSEAIR_S8, GMP252)}
