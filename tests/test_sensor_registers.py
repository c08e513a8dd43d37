"""Register maps as data: decoding each preset from raw words, word order, failure values."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.sensor.registers import (
    GMP252,
    PRESETS,
    SENSEAIR_S8,
    XY_MD02,
    Block,
    DataType,
    FieldSpec,
    RegisterMap,
    RegisterType,
    WordOrder,
    decode_raw,
    encode_raw,
)

IR, HR = RegisterType.INPUT, RegisterType.HOLDING


def test_presets_are_the_three_models() -> None:
    """The presets named in the config contract exist."""
    assert set(PRESETS) == {"xy-md02", "senseair-s8", "gmp252"}


def test_xy_md02_reads_input_registers_1_and_2_in_tenths() -> None:
    """XY-MD02: one read of input registers 1..2; 251 -> 25.1 C, 603 -> 60.3 %; negative T too."""
    assert XY_MD02.reads() == (Block(IR, 1, 2),)
    s = XY_MD02.decode({Block(IR, 1, 2): [251, 603]})
    assert (s.temperature_c, s.rh_pct, s.co2_ppm, s.faults) == (pytest.approx(25.1),
                                                                  pytest.approx(60.3), None, ())
    cold = XY_MD02.decode({Block(IR, 1, 2): [0xFFEC, 900]})  # -20 as int16 = -2.0 C
    assert cold.temperature_c == pytest.approx(-2.0)


def test_xy_md02_failure_values_invalidate_only_their_quantity() -> None:
    """A T register at 0x8000 is a failure value: T is None with the reason, RH still decoded."""
    s = XY_MD02.decode({Block(IR, 1, 2): [0x8000, 555]})
    assert s.temperature_c is None
    assert s.rh_pct == pytest.approx(55.5)
    (fault,) = s.faults
    assert (fault.code, fault.quantity) == ("failure_value", "temperature_c")
    assert "0x8000" in fault.message and "xy-md02" in fault.message


def test_senseair_s8_reads_status_and_co2_in_one_request() -> None:
    """S8: input registers 0..3 in one read (meter status at 0, CO2 at 3)."""
    assert SENSEAIR_S8.reads() == (Block(IR, 0, 4),)
    s = SENSEAIR_S8.decode({Block(IR, 0, 4): [0, 0, 0, 1234]})
    assert (s.co2_ppm, s.faults) == (1234.0, ())


def test_senseair_s8_status_error_bits_name_the_fault() -> None:
    """A meter status with error bits makes the sample faulty, naming the bits."""
    s = SENSEAIR_S8.decode({Block(IR, 0, 4): [0x0021, 0, 0, 800]})
    (fault,) = s.faults
    assert fault.code == "status"
    assert "fatal error" in fault.message and "out of range" in fault.message


def test_senseair_s8_zero_ppm_is_its_warm_up_failure_value() -> None:
    """The S8 reads 0 ppm while warming up; that is a failure value, not a measurement."""
    s = SENSEAIR_S8.decode({Block(IR, 0, 4): [0, 0, 0, 0]})
    assert s.co2_ppm is None
    assert s.faults[0].code == "failure_value"


def test_gmp252_float32_low_word_first_matches_vaisalas_example() -> None:
    """GMP252: holding registers 0..1 = 0xD47A, 0x43E8 (low word first) is 465.66 ppm."""
    assert GMP252.reads() == (Block(HR, 0, 2), Block(HR, 0x0800, 2))
    s = GMP252.decode({Block(HR, 0, 2): [0xD47A, 0x43E8], Block(HR, 0x0800, 2): [0, 0]})
    assert s.co2_ppm == pytest.approx(465.65997, abs=1e-4)
    assert s.faults == ()


def test_gmp252_quiet_nan_is_unavailable() -> None:
    """Vaisala's quiet NaN (0x7FC00000, sent low word first) is the failure value."""
    nan_words = encode_raw(DataType.FLOAT32, WordOrder.LITTLE, float("nan"))
    assert nan_words == [0x0000, 0x7FC0]
    s = GMP252.decode({Block(HR, 0, 2): nan_words, Block(HR, 0x0800, 2): [0, 0]})
    assert s.co2_ppm is None
    assert s.faults[0].code == "failure_value"


def test_gmp252_status_registers_warning_is_not_a_fault_but_not_ready_is() -> None:
    """Device status 4 (warning) passes; CO2 status 256 (not ready, start-up) is a fault."""
    words = encode_raw(DataType.FLOAT32, WordOrder.LITTLE, 900.0)
    ok = GMP252.decode({Block(HR, 0, 2): words, Block(HR, 0x0800, 2): [4, 0]})
    assert ok.faults == () and ok.co2_ppm == pytest.approx(900.0)
    starting = GMP252.decode({Block(HR, 0, 2): words, Block(HR, 0x0800, 2): [0, 256]})
    assert [f.code for f in starting.faults] == ["status"]
    assert "not ready" in starting.faults[0].message


def test_word_order_matters_for_32_bit_values() -> None:
    """The same two registers decode differently in big and little word order."""
    words = [0x0001, 0x0002]
    assert decode_raw(DataType.UINT32, WordOrder.BIG, words) == 0x00010002
    assert decode_raw(DataType.UINT32, WordOrder.LITTLE, words) == 0x00020001
    assert decode_raw(DataType.INT32, WordOrder.BIG, [0xFFFF, 0xFFFE]) == -2
    assert decode_raw(DataType.FLOAT32, WordOrder.BIG, [0x41C8, 0x0000]) == 25.0


@given(st.sampled_from(list(DataType)), st.sampled_from(list(WordOrder)), st.data())
def test_encode_then_decode_round_trips(dt: DataType, order: WordOrder, data: st.DataObject
                                        ) -> None:
    """encode_raw and decode_raw are inverses for every type and word order."""
    strategy = {
        DataType.INT16: st.integers(-32768, 32767),
        DataType.UINT16: st.integers(0, 65535),
        DataType.INT32: st.integers(-(2**31), 2**31 - 1),
        DataType.UINT32: st.integers(0, 2**32 - 1),
        DataType.FLOAT32: st.floats(width=32, allow_nan=False),
    }[dt]
    value = data.draw(strategy)
    words = encode_raw(dt, order, value)
    assert len(words) == dt.words
    assert decode_raw(dt, order, words) == value


def test_custom_map_scale_offset_and_coalescing() -> None:
    """A custom map: raw * scale + offset; nearby registers are read in one request."""
    m = RegisterMap("custom", (
        FieldSpec("temperature_c", 10, HR, DataType.INT16, scale=0.01, offset=-0.5),
        FieldSpec("rh_pct", 14, HR, DataType.FLOAT32, WordOrder.BIG),
        FieldSpec("co2_ppm", 200, HR, DataType.UINT16),
    ))
    assert m.reads() == (Block(HR, 10, 6), Block(HR, 200, 1))
    rh = struct.unpack(">HH", struct.pack(">f", 48.5))
    s = m.decode({Block(HR, 10, 6): [2500, 0, 0, 0, *rh], Block(HR, 200, 1): [700]})
    assert s.temperature_c == pytest.approx(24.5)
    assert s.rh_pct == pytest.approx(48.5)
    assert s.co2_ppm == 700


def test_input_and_holding_are_never_coalesced() -> None:
    """Input and holding registers at neighbouring addresses are two requests."""
    m = RegisterMap("custom", (FieldSpec("temperature_c", 0, IR), FieldSpec("rh_pct", 1, HR)))
    assert set(m.reads()) == {Block(IR, 0, 1), Block(HR, 1, 1)}


def test_bad_maps_are_refused_with_the_reason() -> None:
    """A map without fields, a quantity twice or a zero scale is refused at build time."""
    with pytest.raises(ValueError, match="at least one field"):
        RegisterMap("x", ())
    with pytest.raises(ValueError, match="mapped twice"):
        RegisterMap("x", (FieldSpec("co2_ppm", 0), FieldSpec("co2_ppm", 1)))
    with pytest.raises(ValueError, match="scale"):
        FieldSpec("co2_ppm", 0, scale=0.0)


def test_non_finite_float_without_failure_value_is_still_a_fault() -> None:
    """An infinite float32 is not a measurement even if the map lists no failure value."""
    m = RegisterMap("x", (FieldSpec("co2_ppm", 0, HR, DataType.FLOAT32),))
    s = m.decode({Block(HR, 0, 2): encode_raw(DataType.FLOAT32, WordOrder.BIG, math.inf)})
    assert s.co2_ppm is None and "not a number" in s.faults[0].message
