"""Drain progress: how fast HQ's acks empty the outbox, and when it will be empty.

The writer thread notes every delete an ack makes (:meth:`DrainMeter.note`); status
reads :meth:`DrainMeter.progress` from another thread. The rate of a kind is the
events deleted over the last ``window_s`` seconds: the events of every delete in the
window but its first, divided by the time from that first delete to now (the first
delete's events were acked over time before the window saw it). So a drain that
stops decays to 0 within one window rather than showing its last rate for ever, and
one delete alone gives no rate. Time to empty is the depth at that rate.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

DRAIN_WINDOW_S = 60.0


def drain_rate(samples: list[tuple[float, int]], now: float, window_s: float) -> float:
    """Events per second from ``(time, events deleted)`` samples, oldest first."""
    recent = [(t, n) for t, n in samples if t > now - window_s]
    if len(recent) < 2:
        return 0.0
    span = now - recent[0][0]
    if span <= 0:
        return 0.0
    return sum(n for _, n in recent[1:]) / span


def time_to_empty(depth: int, rate: float) -> float | None:
    """Seconds until ``depth`` events are gone at ``rate`` per second; None if not draining."""
    if depth <= 0:
        return 0.0
    if rate <= 0:
        return None
    return depth / rate


class DrainMeter:
    """Deletes by acks per kind, over a sliding window (thread-safe)."""

    def __init__(self, window_s: float = DRAIN_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def note(self, kind: str, deleted: int) -> None:
        """The writer deleted ``deleted`` acked events of ``kind`` just now."""
        if deleted <= 0:
            return
        now = self._clock()
        with self._lock:
            samples = self._samples.setdefault(kind, deque())
            samples.append((now, deleted))
            while samples and samples[0][0] <= now - self.window_s:
                samples.popleft()

    def rates(self) -> dict[str, float]:
        """Events per second per kind over the window (kinds never drained are left out)."""
        now = self._clock()
        with self._lock:
            copies = {kind: list(samples) for kind, samples in self._samples.items()}
        return {kind: drain_rate(samples, now, self.window_s) for kind, samples in copies.items()}

    def progress(self, depths: Mapping[str, int]) -> dict[str, Any]:
        """``{"rate_eps", "eta_s", "window_s", "kinds": {kind: {"rate_eps", "eta_s"}}}``:
        the rate and time to empty of every kind with a depth, and of all of them
        together (their summed depth at their summed rate)."""
        rates = self.rates()
        kinds: dict[str, dict[str, float | None]] = {}
        for kind, depth in depths.items():
            rate = rates.get(kind, 0.0)
            kinds[kind] = {"rate_eps": round(rate, 3), "eta_s": _round(time_to_empty(depth, rate))}
        total_rate = sum(rates.get(kind, 0.0) for kind in depths)
        return {"rate_eps": round(total_rate, 3),
                "eta_s": _round(time_to_empty(sum(depths.values()), total_rate)),
                "window_s": self.window_s, "kinds": kinds}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
