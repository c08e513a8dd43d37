"""The outbox's small values: what a producer gets back, what status reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accepted:
    id: str
    seq: int
    kind: str
    ts: str
    replay: bool = False  # answered from an earlier request with the same Idempotency-Key
    digest: str | None = None  # that request's body digest (agent/idempotency.py)


@dataclass(frozen=True)
class KindStats:
    kind: str
    depth: int
    bytes: int
    oldest_ts: float | None
    first_seq: int | None
    last_seq: int  # last seq ever assigned for the kind (0 if none)


@dataclass
class KindState:
    """The writer's counters for one kind (mutable; copied per batch)."""

    depth: int = 0
    bytes: int = 0
    first_seq: int | None = None
    oldest_ts: float | None = None
    last_seq: int = 0
    acked: int = 0  # highest seq HQ acknowledged (acks only move forward)

    def stats(self, kind: str) -> KindStats:
        return KindStats(kind, self.depth, self.bytes, self.oldest_ts, self.first_seq,
                         self.last_seq)
