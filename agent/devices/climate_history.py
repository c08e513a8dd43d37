"""A bounded on-disk 24-hour history per sensor, downsampled to minutes, for the site page.

Readings are folded into per-minute aggregates in memory (count, mean, min,
max of each quantity over the *valid* readings; invalid ones are counted) and
a minute is written to SQLite once it is over, in one transaction for every
sensor: 200 sensors at 1 Hz cost one small commit a minute, not 200 a second.
Rows older than the retention (24 h) are deleted on each write and the freed
pages returned (``auto_vacuum=INCREMENTAL``), so the file stays bounded at about
sensors x 1440 rows.

This is chart data, not compliance data (that goes through the outbox), so
``synchronous=NORMAL`` in WAL mode: a power cut may lose the last minute, never
corrupt the file. Blocking: call from a thread; one lock guards the connection.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from drivers.sensor.reading import Reading, iso_ms

RETENTION_S = 24 * 3600.0
MINUTE_S = 60
# Quantity -> column prefix.
SERIES = {"temperature_c": "t", "rh_pct": "rh", "co2_ppm": "co2", "vpd_kpa": "vpd",
          "dew_point_c": "dew"}

_COLUMNS = [f"{p}_{s}" for p in SERIES.values() for s in ("n", "sum", "min", "max")]
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS minutes (
    device TEXT NOT NULL,
    minute INTEGER NOT NULL,
    readings INTEGER NOT NULL,
    invalid INTEGER NOT NULL,
    {", ".join(f"{c} REAL" for c in _COLUMNS)},
    PRIMARY KEY (device, minute)
) WITHOUT ROWID
"""
# Merge into an existing row (a minute flushed at shutdown and continued after restart).
_MERGE = ", ".join(
    ["readings = readings + excluded.readings", "invalid = invalid + excluded.invalid"]
    + [f"{p}_n = {p}_n + excluded.{p}_n" for p in SERIES.values()]
    + [f"{p}_sum = {p}_sum + excluded.{p}_sum" for p in SERIES.values()]
    + [f"{p}_min = min(coalesce({p}_min, excluded.{p}_min), coalesce(excluded.{p}_min, {p}_min))"
       for p in SERIES.values()]
    + [f"{p}_max = max(coalesce({p}_max, excluded.{p}_max), coalesce(excluded.{p}_max, {p}_max))"
       for p in SERIES.values()]
)
# Built from constants only (column names above), never from input.
_INSERT = " ".join([
    "INSERT INTO minutes (device, minute, readings, invalid,", ", ".join(_COLUMNS) + ")",
    "VALUES (" + ", ".join("?" * (4 + len(_COLUMNS))) + ")",
    "ON CONFLICT (device, minute) DO UPDATE SET", _MERGE,
])


@dataclass(frozen=True, slots=True)
class Stat:
    mean: float
    min: float
    max: float
    n: int


@dataclass(frozen=True, slots=True)
class MinutePoint:
    """One minute of one sensor: aggregates of its valid readings, per quantity."""

    device: str
    minute: int            # epoch seconds at the start of the minute
    readings: int
    invalid: int
    stats: dict[str, Stat]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ts": iso_ms(self.minute), "readings": self.readings,
                               "invalid": self.invalid}
        for quantity, stat in self.stats.items():
            out[quantity] = {"mean": round(stat.mean, 3), "min": stat.min, "max": stat.max}
        return out


class _Acc:
    __slots__ = ("invalid", "readings", "values")

    def __init__(self) -> None:
        self.readings = 0
        self.invalid = 0
        # quantity -> [n, sum, min, max]
        self.values: dict[str, list[float]] = {}

    def add(self, reading: Reading) -> None:
        self.readings += 1
        if not reading.valid:
            self.invalid += 1
            return
        for quantity in SERIES:
            value = reading.value(quantity)
            if value is None:
                continue
            acc = self.values.get(quantity)
            if acc is None:
                self.values[quantity] = [1, value, value, value]
            else:
                acc[0] += 1
                acc[1] += value
                acc[2] = min(acc[2], value)
                acc[3] = max(acc[3], value)

    def row(self, device: str, minute: int) -> tuple[Any, ...]:
        cells: list[Any] = [device, minute, self.readings, self.invalid]
        for quantity in SERIES:
            acc = self.values.get(quantity)
            cells.extend([0, 0.0, None, None] if acc is None else acc)
        return tuple(cells)

    def point(self, device: str, minute: int) -> MinutePoint:
        stats = {q: Stat(a[1] / a[0], a[2], a[3], int(a[0])) for q, a in self.values.items()}
        return MinutePoint(device, minute, self.readings, self.invalid, stats)


class History:
    """The per-minute history file; ``add`` is cheap, ``flush`` writes finished minutes."""

    def __init__(self, path: str, *, retention_s: float = RETENTION_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.retention_s = retention_s
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], _Acc] = {}
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # auto_vacuum only takes effect on a new file (before the first table).
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, reading: Reading) -> None:
        """Fold one reading into its minute (in memory); backfilled readings are welcome."""
        minute = int(reading.ts // MINUTE_S) * MINUTE_S
        with self._lock:
            acc = self._pending.get((reading.device, minute))
            if acc is None:
                acc = self._pending[(reading.device, minute)] = _Acc()
            acc.add(reading)

    def flush(self, now: float | None = None, *, everything: bool = False) -> int:
        """Write the minutes that are over (all with ``everything``) and prune; rows written."""
        now = self.clock() if now is None else now
        current = int(now // MINUTE_S) * MINUTE_S
        cutoff = now - self.retention_s
        with self._lock:
            done = [k for k in self._pending if everything or k[1] < current]
            rows = [self._pending.pop(k).row(*k) for k in done]
            rows = [r for r in rows if r[1] + MINUTE_S > cutoff]
            self._db.execute("BEGIN")
            try:
                if rows:
                    self._db.executemany(_INSERT, rows)
                deleted = self._db.execute("DELETE FROM minutes WHERE minute + ? <= ?",
                                           (MINUTE_S, cutoff)).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if deleted:
                self._db.execute("PRAGMA incremental_vacuum")
        return len(rows)

    def series(self, device: str, since: float | None = None, until: float | None = None
               ) -> list[MinutePoint]:
        """The device's minutes from ``since`` (default: retention ago) to ``until``, oldest first,
        including the minute in progress."""
        now = self.clock()
        since = now - self.retention_s if since is None else since
        until = now if until is None else until
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM minutes WHERE device = ? AND minute + ? > ? AND minute <= ? "
                "ORDER BY minute", (device, MINUTE_S, since, until)).fetchall()
            pending = {k[1]: acc.point(*k) for k, acc in self._pending.items()
                       if k[0] == device and since < k[1] + MINUTE_S and k[1] <= until}
        points = {row[1]: _point(row) for row in rows}
        for minute, point in pending.items():
            points[minute] = _merge(points[minute], point) if minute in points else point
        return [points[m] for m in sorted(points)]

    def devices(self) -> list[str]:
        with self._lock:
            stored = {r[0] for r in self._db.execute("SELECT DISTINCT device FROM minutes")}
            stored.update(k[0] for k in self._pending)
        return sorted(stored)

    def rows(self) -> int:
        with self._lock:
            count: int = self._db.execute("SELECT count(*) FROM minutes").fetchone()[0]
        return count

    def close(self) -> None:
        """Write everything pending and close the file."""
        try:
            self.flush(everything=True)
        finally:
            with self._lock:
                self._db.close()


def _point(row: tuple[Any, ...]) -> MinutePoint:
    device, minute, readings, invalid = row[:4]
    stats: dict[str, Stat] = {}
    for i, quantity in enumerate(SERIES):
        n, total, lo, hi = row[4 + 4 * i: 8 + 4 * i]
        if n:
            stats[quantity] = Stat(total / n, lo, hi, int(n))
    return MinutePoint(device, minute, readings, invalid, stats)


def _merge(a: MinutePoint, b: MinutePoint) -> MinutePoint:
    stats = dict(a.stats)
    for q, s in b.stats.items():
        t = stats.get(q)
        stats[q] = s if t is None else Stat((t.mean * t.n + s.mean * s.n) / (t.n + s.n),
                                             min(t.min, s.min), max(t.max, s.max), t.n + s.n)
    return MinutePoint(a.device, a.minute, a.readings + b.readings, a.invalid + b.invalid, stats)
