"""Is this reading believable? Range, failure values, spike, flat-line, stale, warm-up.

A suspect reading is never dropped and never silently trusted: :meth:`Checker.check`
returns the sample (with the sensor's calibration offsets applied) carrying a
:class:`~drivers.sensor.reading.Fault` for every reason it is suspect, and the
pipeline ships it marked invalid with those reasons. Vendor failure values
are found where the words are decoded (``registers.py``) and arrive here as
faults already.

One :class:`Checker` per sensor, fed in time order; ``now`` is always passed
in (no clock inside).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field, replace

from drivers.sensor.reading import QUANTITIES, Fault, Quantity, Sample

# What a grow-room sensor can physically report. Wider than any room should be
# (the alarms' bands are for "the room drifted"), narrow enough to catch a
# sensor that reports nonsense: -40 C from an unplugged probe, 0 ppm CO2.
DEFAULT_RANGES: dict[Quantity, tuple[float, float]] = {
    "temperature_c": (-20.0, 60.0),
    "rh_pct": (0.0, 100.0),
    "co2_ppm": (150.0, 40_000.0),
}
# The smallest jump from the recent median that counts as a spike, whatever
# the spread: a door opening moves a room by less, a glitch by more.
DEFAULT_SPIKE_JUMP: dict[Quantity, float] = {
    "temperature_c": 3.0,
    "rh_pct": 12.0,
    "co2_ppm": 600.0,
}
# How fast a room can really move, per second: CO2 injection at lights-on, an
# HVAC stage, a door. A value may stray from the median by the floor above plus
# this much for every second since the previous sample, so a real ramp read at
# a long interval is not called a spike, and a glitch still is.
DEFAULT_MAX_RATE: dict[Quantity, float] = {
    "temperature_c": 0.02,
    "rh_pct": 0.1,
    "co2_ppm": 10.0,
}
# Consistency constant: MAD * 1.4826 estimates the standard deviation of normal noise.
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class PlausibilityConfig:
    """Tunables for one sensor; defaults suit a 10 s interval in a grow room."""

    ranges: dict[Quantity, tuple[float, float]] = field(
        default_factory=lambda: dict(DEFAULT_RANGES))
    spike_window: int = 9          # median of this many previous samples
    spike_min_samples: int = 5     # no spike verdict before this many
    spike_jump: dict[Quantity, float] = field(default_factory=lambda: dict(DEFAULT_SPIKE_JUMP))
    spike_mad_k: float = 6.0       # or this many robust sigmas, if larger
    max_rate: dict[Quantity, float] = field(default_factory=lambda: dict(DEFAULT_MAX_RATE))
    flatline_samples: int = 60     # identical values in a row; 0 disables
    stale_intervals: float = 3.0   # no reading for this many intervals is stale
    warmup_s: float = 0.0          # readings this soon after start are not trusted
    offsets: dict[Quantity, float] = field(default_factory=dict)  # calibration, added to the raw


class Checker:
    """The plausibility state of one sensor (recent values, flat runs, start time)."""

    def __init__(self, config: PlausibilityConfig | None = None, *, started_at: float,
                 interval_s: float) -> None:
        self.config = config or PlausibilityConfig()
        self.started_at = started_at
        self.interval_s = interval_s
        self._recent: dict[Quantity, deque[float]] = {
            q: deque(maxlen=max(self.config.spike_window, 1)) for q in QUANTITIES
        }
        self._last: dict[Quantity, float] = {}
        self._run: dict[Quantity, int] = dict.fromkeys(QUANTITIES, 0)
        self._last_ts: dict[Quantity, float] = {}

    def check(self, sample: Sample, now: float) -> Sample:
        """The calibrated sample with every plausibility fault added (never dropped)."""
        cfg = self.config
        calibrated = self._calibrate(sample)
        faults = list(calibrated.faults)
        elapsed = now - self.started_at
        if elapsed < cfg.warmup_s:
            # Warm-up readings neither count as valid nor feed the history a
            # later spike is judged against.
            faults.append(Fault("warmup", f"warming up ({elapsed:.0f} s of {cfg.warmup_s:.0f} s)"))
            return replace(calibrated, faults=tuple(faults))
        for q in QUANTITIES:
            value = calibrated.get(q)
            if value is None:
                continue
            fault = self._range(q, value)
            if fault is not None:
                faults.append(fault)
                continue  # an impossible value must not move the median
            for fault in (self._spike(q, value, now), self._flatline(q, value)):
                if fault is not None:
                    faults.append(fault)
            self._recent[q].append(value)
            self._last_ts[q] = now
        return replace(calibrated, faults=tuple(faults))

    def stale(self, last_ts: float | None, now: float) -> Fault | None:
        """A ``stale`` fault when the newest reading (``last_ts``) is over 3 intervals old."""
        limit = self.config.stale_intervals * self.interval_s
        since = self.started_at if last_ts is None else last_ts
        age = now - since
        if age <= limit:
            return None
        what = "no reading yet" if last_ts is None else "no reading"
        intervals = f"{self.config.stale_intervals:g} intervals of {self.interval_s:g} s"
        return Fault("stale", f"stale: {what} for {age:.0f} s ({intervals})")

    def _calibrate(self, sample: Sample) -> Sample:
        offsets = self.config.offsets
        if not offsets:
            return sample
        changes: dict[str, float] = {}
        for q, offset in offsets.items():
            value = sample.get(q)
            if value is not None:
                changes[q] = value + offset
        return replace(sample, **changes)  # type: ignore[arg-type]

    def _range(self, q: Quantity, value: float) -> Fault | None:
        low, high = self.config.ranges.get(q, (float("-inf"), float("inf")))
        if low <= value <= high:
            return None
        return Fault("range", f"{q} {value:g} outside the physical range {low:g}..{high:g}", q)

    def _spike(self, q: Quantity, value: float, now: float) -> Fault | None:
        recent = self._recent[q]
        cfg = self.config
        if len(recent) < cfg.spike_min_samples:
            return None
        median = statistics.median(recent)
        mad = statistics.median(abs(v - median) for v in recent)
        since = max(now - self._last_ts.get(q, now), 0.0)
        threshold = (max(cfg.spike_jump.get(q, 0.0), cfg.spike_mad_k * MAD_TO_SIGMA * mad)
                     + cfg.max_rate.get(q, 0.0) * since)
        jump = value - median
        if abs(jump) <= threshold:
            return None
        return Fault("spike", f"{q} {value:g} jumped {jump:+g} from the median {median:g} "
                              f"of the last {len(recent)} samples", q)

    def _flatline(self, q: Quantity, value: float) -> Fault | None:
        n = self.config.flatline_samples
        if self._last.get(q) == value:
            self._run[q] += 1
        else:
            self._run[q] = 1
            self._last[q] = value
        if n <= 0 or self._run[q] < n:
            return None
        return Fault("flatline", f"{q} stuck at {value:g} for {self._run[q]} samples", q)
