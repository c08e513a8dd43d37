"""Sensor thinning: runs of raw readings folded into per-minute aggregates.

At ``max_bytes`` the outbox replaces the oldest sensor readings that were
never published by one aggregate per run of consecutive readings in the same
UTC minute (CONTRACT 6). The aggregate keeps the run's first seq as its
``seq`` and carries ``"seq_end"``, so HQ can treat the whole range as stored.

:class:`MinuteRun` is pure; :func:`scan_runs` walks the stored readings in
seq order, a chunk at a time (never the whole backlog in memory).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any

from agent.outbox.store import SEQ_MAX, event_key, seq_of

AGGREGATE_SOURCE = "outbox"
SCAN_CHUNK = 512


def minute_of(ts: str) -> str:
    """``2026-11-22T17:03:11.482Z`` -> ``2026-11-22T17:03:00Z``."""
    return ts[:16] + ":00Z"


def is_aggregate(envelope: dict[str, Any]) -> bool:
    data = envelope.get("data")
    return "seq_end" in envelope or (isinstance(data, dict) and "aggregate" in data)


class MinuteRun:
    """Consecutive raw readings of one UTC minute, folded as they stream past."""

    def __init__(self, seq: int, envelope: dict[str, Any], size: int) -> None:
        self.minute = minute_of(envelope["ts"])
        self.first_seq = seq
        self.last_seq = seq - 1
        self.first_ts: str = envelope["ts"]
        # The first reading after a corrupt-outbox reset declares the seqs that may
        # have been lost; the aggregate replacing it must declare them too, or
        # HQ's watermark never passes them.
        lost = envelope.get("lost")
        self.lost: list[int] | None = list(lost) if isinstance(lost, list) else None
        self.count = 0
        self.bytes = 0
        self.sources: set[str] = set()
        # series -> field -> [sum, min, max, count]
        self.series: dict[str, dict[str, list[float]]] = {}
        # series -> reason -> count: readings the sensor layer marked invalid
        # (a spike, a vendor failure value) are counted, never averaged in.
        self.invalid: dict[str, dict[str, int]] = {}
        self.add(seq, envelope, size)

    def continues(self, seq: int, envelope: dict[str, Any]) -> bool:
        """Whether the reading at ``seq`` extends this run (next seq, same minute)."""
        return (seq == self.last_seq + 1 and minute_of(envelope["ts"]) == self.minute
                and "lost" not in envelope)

    def add(self, seq: int, envelope: dict[str, Any], size: int) -> None:
        self.last_seq = seq
        self.count += 1
        self.bytes += size
        source = str(envelope.get("source", ""))
        self.sources.add(source)
        data = envelope.get("data")
        if not isinstance(data, dict):
            return
        device = data.get("device")
        name = device if isinstance(device, str) and device else source
        if data.get("valid") is False:
            reasons = self.invalid.setdefault(name, {})
            reason = str(data.get("reason") or "invalid")[:64]
            reasons[reason] = reasons.get(reason, 0) + 1
            return
        fields = self.series.setdefault(name, {})
        for key, value in data.items():
            if key == "device" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            stat = fields.get(key)
            if stat is None:
                fields[key] = [float(value), value, value, 1]
            else:
                stat[0] += value
                stat[1] = min(stat[1], value)
                stat[2] = max(stat[2], value)
                stat[3] += 1

    def data(self) -> dict[str, Any]:
        """The aggregate event's ``data``."""
        return {
            "aggregate": "1m",
            "minute": self.minute,
            "count": self.count,
            "from_seq": self.first_seq,
            "to_seq": self.last_seq,
            "series": {
                name: {
                    key: {"mean": round(s[0] / s[3], 6), "min": s[1], "max": s[2],
                          "count": int(s[3])}
                    for key, s in fields.items()
                }
                for name, fields in self.series.items()
            },
            **({"invalid": self.invalid} if self.invalid else {}),
        }

    def source(self) -> str:
        return next(iter(self.sources)) if len(self.sources) == 1 else AGGREGATE_SOURCE


def scan_runs(con: sqlite3.Connection, after_seq: int) -> Iterator[MinuteRun | int]:
    """The sensor readings with seq > ``after_seq`` as runs, oldest first.

    Yields each :class:`MinuteRun` once it is closed (the next reading is of
    another minute, or not the next seq) and the last one at the end; for an
    aggregate (or an unreadable row), which is never folded again, yields its
    last seq instead. Rows are fetched a chunk at a time, so the caller may
    delete and insert between items.
    """
    after = event_key("sensor", after_seq)
    hi = event_key("sensor", SEQ_MAX)
    run: MinuteRun | None = None
    while True:
        rows = con.execute(
            "SELECT key, value FROM Cache WHERE key > ? AND key <= ? AND raw = 1"
            " ORDER BY key LIMIT ?", (after, hi, SCAN_CHUNK)).fetchall()
        if not rows:
            break
        for key, value in rows:
            after = key
            seq = seq_of(key)
            try:
                envelope = json.loads(value)
                aggregate = is_aggregate(envelope)
            except ValueError:
                envelope, aggregate = {"seq_end": seq}, True
            if run is not None and not aggregate and run.continues(seq, envelope):
                run.add(seq, envelope, len(value))
                continue
            if run is not None:
                yield run
                run = None
            if aggregate:
                yield int(envelope.get("seq_end", seq))
            else:
                run = MinuteRun(seq, envelope, len(value))
    if run is not None:
        yield run
