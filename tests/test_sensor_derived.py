"""Derived climate values: the published test vectors and physical invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.sensor.derived import (
    absolute_humidity_g_m3,
    air_vpd_kpa,
    derive,
    dew_point_c,
    leaf_vpd_kpa,
    saturation_vapour_pressure_kpa,
)

temps = st.floats(min_value=-20.0, max_value=50.0, allow_nan=False)
rhs = st.floats(min_value=1.0, max_value=100.0, allow_nan=False)


def test_vectors_at_25c_60pct() -> None:
    """At 25 C and 60 % RH: air VPD 1.267 kPa, leaf VPD (-2 C) 0.909 kPa, dew point 16.69 C."""
    assert round(air_vpd_kpa(25.0, 60.0), 3) == 1.267
    assert round(leaf_vpd_kpa(25.0, 60.0, -2.0), 3) == 0.909
    assert round(dew_point_c(25.0, 60.0), 2) == 16.69
    assert round(absolute_humidity_g_m3(25.0, 60.0), 1) == 13.8


def test_tetens_saturation_pressure_known_points() -> None:
    """Tetens gives 0.611 kPa at 0 C, 2.339 at 20 C, 7.38 at 40 C (steam tables, +-0.5 %)."""
    assert saturation_vapour_pressure_kpa(0.0) == pytest.approx(0.6108, abs=1e-4)
    assert saturation_vapour_pressure_kpa(20.0) == pytest.approx(2.339, rel=5e-3)
    assert saturation_vapour_pressure_kpa(40.0) == pytest.approx(7.384, rel=5e-3)


def test_derive_bundles_everything_and_matches_the_functions() -> None:
    """derive() returns the same numbers as the single functions."""
    c = derive(25.0, 60.0, -2.0)
    assert c.vpd_kpa == pytest.approx(air_vpd_kpa(25.0, 60.0))
    assert c.leaf_vpd_kpa == pytest.approx(leaf_vpd_kpa(25.0, 60.0, -2.0))
    assert c.dew_point_c == pytest.approx(dew_point_c(25.0, 60.0))
    assert c.abs_humidity_g_m3 == pytest.approx(absolute_humidity_g_m3(25.0, 60.0))


@pytest.mark.parametrize(("t", "rh"), [(None, 50.0), (25.0, None), (25.0, 120.0), (25.0, -1.0),
                                       (float("nan"), 50.0), (150.0, 50.0)])
def test_derive_gives_none_outside_the_domain(t: float | None, rh: float | None) -> None:
    """Missing or impossible inputs give None for every derived value, never an exception."""
    c = derive(t, rh)
    assert (c.vpd_kpa, c.leaf_vpd_kpa, c.dew_point_c, c.abs_humidity_g_m3) == (None,) * 4


def test_dew_point_of_dry_air_is_none_but_vpd_is_not() -> None:
    """At 0 % RH there is no dew point, but the VPD is the full saturation pressure."""
    c = derive(25.0, 0.0)
    assert c.dew_point_c is None
    assert c.vpd_kpa == pytest.approx(saturation_vapour_pressure_kpa(25.0))
    with pytest.raises(ValueError, match="above 0"):
        dew_point_c(25.0, 0.0)


@given(temps, rhs)
def test_dew_point_never_above_air_temperature(t: float, rh: float) -> None:
    """The dew point is at most the air temperature, equal at saturation."""
    assert dew_point_c(t, rh) <= t + 1e-9
    assert dew_point_c(t, 100.0) == pytest.approx(t, abs=1e-9)


@given(temps, rhs, rhs)
def test_vpd_falls_as_humidity_rises(t: float, rh1: float, rh2: float) -> None:
    """Air VPD is never negative and decreases with RH at a fixed temperature."""
    lo, hi = sorted((rh1, rh2))
    assert air_vpd_kpa(t, hi) <= air_vpd_kpa(t, lo)
    assert air_vpd_kpa(t, hi) >= 0.0


@given(temps, rhs)
def test_leaf_vpd_with_zero_offset_is_air_vpd(t: float, rh: float) -> None:
    """With no leaf offset the leaf VPD is the air VPD; a cooler leaf has a lower VPD."""
    assert leaf_vpd_kpa(t, rh, 0.0) == pytest.approx(air_vpd_kpa(t, rh), abs=1e-12)
    assert leaf_vpd_kpa(t, rh, -2.0) < air_vpd_kpa(t, rh)


@given(st.floats(min_value=0.0, max_value=45.0), st.floats(min_value=10.0, max_value=100.0))
def test_dew_point_round_trips_to_the_vapour_pressure(t: float, rh: float) -> None:
    """Saturation pressure at the dew point is the air's vapour pressure (within 2 %)."""
    ea = saturation_vapour_pressure_kpa(t) * rh / 100.0
    td = dew_point_c(t, rh)
    assert math.isclose(saturation_vapour_pressure_kpa(td), ea, rel_tol=2e-2)
