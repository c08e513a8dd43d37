"""What growers read off a T/RH pair: VPD (air and leaf), dew point, absolute humidity.

Pure functions of temperature (deg C) and relative humidity (%). The formulas
are the ones growers' charts use, so our numbers match theirs:

- saturation vapour pressure: Tetens (Murray 1967 form), ``0.61078 *
  exp(17.27 T / (T + 237.3))`` kPa;
- dew point: Magnus with Sonntag's (1990) coefficients a = 17.62, b = 243.12 C,
  good to about 0.1 C between -45 and 60 C;
- leaf VPD: the saturation pressure at the leaf (air temperature plus the
  room's leaf offset, usually -1 to -3 C under lights) minus the air's actual
  vapour pressure.

Test vectors at 25 C and 60 % RH: air VPD 1.267 kPa, leaf VPD at a -2 C
offset 0.909 kPa, dew point 16.69 C, absolute humidity 13.8 g/m3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TETENS_A = 0.61078   # kPa
TETENS_B = 17.27
TETENS_C = 237.3     # deg C
MAGNUS_A = 17.62
MAGNUS_B = 243.12    # deg C
WATER_VAPOUR_R = 461.5  # J/(kg K), specific gas constant of water vapour
KELVIN = 273.15
# Outside this the formulas are not meant to hold, and no grow room is there.
T_MIN_C = -60.0
T_MAX_C = 100.0


def saturation_vapour_pressure_kpa(t_c: float) -> float:
    """Saturation vapour pressure over water at ``t_c`` (Tetens), in kPa."""
    _check_t(t_c)
    return TETENS_A * math.exp(TETENS_B * t_c / (t_c + TETENS_C))


def actual_vapour_pressure_kpa(t_c: float, rh_pct: float) -> float:
    """The air's vapour pressure at ``t_c`` and ``rh_pct``, in kPa."""
    _check_rh(rh_pct)
    return saturation_vapour_pressure_kpa(t_c) * rh_pct / 100.0


def air_vpd_kpa(t_c: float, rh_pct: float) -> float:
    """Vapour pressure deficit of the air, in kPa (never negative)."""
    _check_rh(rh_pct)
    return saturation_vapour_pressure_kpa(t_c) * (1.0 - rh_pct / 100.0)


def leaf_vpd_kpa(t_c: float, rh_pct: float, leaf_offset_c: float = 0.0) -> float:
    """Leaf VPD in kPa: saturation at the leaf (``t_c + leaf_offset_c``) minus the air's.

    Negative when the leaf is below the dew point (condensation on the leaf);
    returned as is, because that is exactly what a grower must see.
    """
    return saturation_vapour_pressure_kpa(t_c + leaf_offset_c) - actual_vapour_pressure_kpa(
        t_c, rh_pct
    )


def dew_point_c(t_c: float, rh_pct: float) -> float:
    """Dew point (Magnus, Sonntag 1990), in deg C. ``rh_pct`` must be above 0."""
    _check_t(t_c)
    _check_rh(rh_pct)
    if rh_pct <= 0.0:
        raise ValueError("rh_pct must be above 0 for a dew point (dry air has none)")
    gamma = math.log(rh_pct / 100.0) + MAGNUS_A * t_c / (MAGNUS_B + t_c)
    return MAGNUS_B * gamma / (MAGNUS_A - gamma)


def absolute_humidity_g_m3(t_c: float, rh_pct: float) -> float:
    """Water vapour per cubic metre of air, in g/m3 (ideal gas)."""
    e_pa = actual_vapour_pressure_kpa(t_c, rh_pct) * 1000.0
    return e_pa / (WATER_VAPOUR_R * (t_c + KELVIN)) * 1000.0


@dataclass(frozen=True, slots=True)
class Climate:
    """Everything derived from one T/RH pair; None where it cannot be computed."""

    vpd_kpa: float | None = None
    leaf_vpd_kpa: float | None = None
    dew_point_c: float | None = None
    abs_humidity_g_m3: float | None = None


NO_CLIMATE = Climate()


def derive(t_c: float | None, rh_pct: float | None, leaf_offset_c: float = 0.0) -> Climate:
    """All derived values; None for each the inputs do not allow (missing, out of domain)."""
    if t_c is None or rh_pct is None or not _in_domain(t_c, rh_pct):
        return NO_CLIMATE
    if not T_MIN_C <= t_c + leaf_offset_c <= T_MAX_C:
        return NO_CLIMATE
    es = TETENS_A * math.exp(TETENS_B * t_c / (t_c + TETENS_C))
    ea = es * rh_pct / 100.0
    t_leaf = t_c + leaf_offset_c
    es_leaf = TETENS_A * math.exp(TETENS_B * t_leaf / (t_leaf + TETENS_C))
    return Climate(
        vpd_kpa=es - ea,
        leaf_vpd_kpa=es_leaf - ea,
        dew_point_c=dew_point_c(t_c, rh_pct) if rh_pct > 0.0 else None,
        abs_humidity_g_m3=ea * 1000.0 / (WATER_VAPOUR_R * (t_c + KELVIN)) * 1000.0,
    )


def _in_domain(t_c: float, rh_pct: float) -> bool:
    return (
        math.isfinite(t_c) and math.isfinite(rh_pct)
        and T_MIN_C <= t_c <= T_MAX_C and 0.0 <= rh_pct <= 100.0
    )


def _check_t(t_c: float) -> None:
    if not (math.isfinite(t_c) and T_MIN_C <= t_c <= T_MAX_C):
        raise ValueError(f"temperature {t_c} C is outside {T_MIN_C}..{T_MAX_C} C")


def _check_rh(rh_pct: float) -> None:
    if not (math.isfinite(rh_pct) and 0.0 <= rh_pct <= 100.0):
        raise ValueError(f"relative humidity {rh_pct} % is outside 0..100 %")
