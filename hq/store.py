"""HQ's store: every distinct event, the ack watermark per outbox epoch, conflicts, rejects.

Identity (CONTRACT 4, issue 9). An event is its ``id``. A row is keyed by
(site, kind, epoch, seq, id): the same id at the same (site, kind, seq) again is
a *duplicate* (counted on the row, ``dups``), whatever epoch it comes under;
anything else is stored. A new id at a (site, kind, seq) already held under
another id is a *conflict*: both rows are kept and the pair is written to the
``conflicts`` table (a replaced box, a wiped outbox, a restored backup, or a
forgery on the broker). A sensor aggregate (``seq_end``) and the raw reading it
summarises in the same epoch are not a conflict (the agent thinned a reading it
had published before a crash); both are kept, coverage takes the wider.

Epochs. ``epoch`` (an additive envelope key; ``""`` for agents that send none)
names one run of one outbox: the agent makes a new one each time it opens its
outbox. Each (site, kind, epoch) is its own *stream* with its own watermark, so
an ack for one run of an outbox can never be satisfied by events of another
(a replaced box's seq 7 does not cover the new box's seq 7). A resend after a
restart carries the new epoch with the same id: it is a duplicate, and the row
*moves* to the new epoch (``UPDATE events SET epoch``), so the new stream covers
what the agent still holds. Rows never resent stay where they are.

The watermark of a stream is the highest seq ``n`` such that every seq from
its start to ``n`` is *covered* by rows of that stream: stored as an event,
inside the ``seq..seq_end`` range of a stored sensor aggregate, or inside a
range the agent declared ``lost`` (seqs that went down with a corrupt outbox;
acking past them is what lets the agent move on). A stream starts at 0, or at
the ``floor`` F of one of its events: every seq <= F of that kind has left the
agent's outbox for good (acked, by this store, an earlier store or under an
earlier epoch; or lost), so none will be sent again. A stream below F is
raised to F and the part of ``mark+1..F`` the store holds under no epoch and
that no other stream of the pair has acked is recorded in ``skipped``; the
report lists those ranges as ``skipped``, not as gaps. Seqs that arrive inside
a skipped range later are stored as usual. The receiver acks
``min(watermark, highest seq of the stream it just heard)`` (hq/receiver.py),
so a forged ``floor`` or seq jump cannot push an ack past what the agent has.

Rejects. A message the receiver cannot store (not UTF-8 JSON, too deep, too
big, wrong shape, a kind outside CONTRACT 4, an unregistered site...) is written
to ``rejects`` with the reason and its first :data:`REJECT_HEAD_BYTES` bytes,
in the same transaction as the batch it came in, so it is durable before its
PUBACK: never dropped silently, never redelivered forever.

Unproven claims. An event whose ``floor``/``lost``/``seq_end`` lacked valid
proof (agent/proof.py) is stored without them and flagged ``unproven`` on its row.

The report (:meth:`SqliteStore.report`) is per (site, kind), over every epoch:
``received`` counts rows (distinct events), gaps are seqs held under no epoch,
and ``conflicts``, ``rejected`` and ``unproven_claims`` count the anomalies.

Everything is computed inside the write transaction from the database, so any
number of receivers may share one store: SQLite serialises their ``BEGIN
IMMEDIATE`` transactions and each sees what the others committed.

Timestamps (``ts`` of the event, ``received_at`` at HQ) are stored as UTC ISO
8601 text with milliseconds and a ``Z`` (``agent.envelope.iso_ms``), which sorts
the same as time does, so ``--since`` is a plain string comparison.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeGuard

from agent.config import SITE_ID_RE
from agent.envelope import iso_ms
from agent.errors import AgentError

# The topic level of a kind only has to be a sane name here; the receiver rejects
# kinds outside CONTRACT 4 (a store fed directly keeps what it is given).
KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# An outbox epoch as the agent makes it (agent/outbox/epoch.py): short, printable.
EPOCH_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 30.0
PSYCOPG_HINT = "pip install 'psycopg[binary]' psycopg-pool"
REJECT_HEAD_BYTES = 256   # how much of a rejected message is kept
REJECT_TOPIC_CHARS = 512
MAX_ID_CHARS = 128

Pair = tuple[str, str]
Stream = tuple[str, str, str]   # (site, kind, epoch): one run of one outbox, one kind


class StoreError(AgentError):
    """HQ's store cannot be opened or written; ``location`` says which one."""

    def __init__(self, location: str, message: str) -> None:
        self.location = location
        super().__init__(f"HQ store {location}: {message}")


@dataclass(frozen=True)
class EventRow:
    """One envelope, checked and ready for the ``events`` table."""

    site: str
    kind: str
    seq: int
    seq_end: int | None
    id: str
    ts: str
    lost: tuple[int, int] | None
    payload: str  # the envelope's JSON text, as stored
    floor: int | None = None  # every seq <= floor has left the agent's outbox for good
    epoch: str = ""           # the outbox run that sent it ("" : an agent without epochs)
    unproven: bool = False    # its coverage claims lacked valid proof and were dropped

    @property
    def pair(self) -> Pair:
        return (self.site, self.kind)

    @property
    def stream(self) -> Stream:
        return (self.site, self.kind, self.epoch)

    @property
    def end(self) -> int:
        return self.seq if self.seq_end is None else self.seq_end


# SQLite's INTEGER range: a bigger number would raise OverflowError inside the
# write and take the receiver down on a message the broker then redelivers forever.
SEQ_LIMIT = 2**63 - 1


def _int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value <= SEQ_LIMIT


def parse_time(value: str) -> datetime:
    """An ISO 8601 date or time; a naive one is taken as UTC."""
    dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


_ISO_MS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def canonical_time(value: str) -> str:
    """``value`` as ``iso_ms`` text (UTC, ms, ``Z``); ``ValueError`` if it is not ISO 8601."""
    if _ISO_MS_RE.match(value):
        # What agents send: only check it is a real time (strftime is the slow part).
        datetime.fromisoformat(value[:-1])
        return value
    return iso_ms(parse_time(value).timestamp())


def event_row(env: Mapping[str, Any], payload: str | None = None) -> EventRow:
    """Check one decoded envelope; ``ValueError`` names the field that is wrong.

    ``agent.envelope.decode`` already checked the v1 basics; this adds what the
    store relies on: a site id usable in a topic, a sane kind, a parseable
    ``ts``, and the ``seq_end`` / ``lost`` / ``floor`` extensions of CONTRACT 4.
    ``payload`` is the envelope's JSON text as received (stored verbatim);
    without it the envelope is serialised again.
    """
    site, kind, seq, event_id, ts = (env.get(k) for k in ("site", "kind", "seq", "id", "ts"))
    if not isinstance(site, str) or not SITE_ID_RE.match(site):
        raise ValueError(f"envelope field 'site' must match [a-z0-9-]{{1,64}}, got {site!r:.80}")
    if not isinstance(kind, str) or not KIND_RE.match(kind):
        raise ValueError(f"envelope field 'kind' must match [a-z][a-z0-9_-]{{0,31}}, "
                         f"got {kind!r:.80}")
    if not _int(seq) or seq < 1:
        raise ValueError(f"envelope field 'seq' must be an integer 1..2**63-1, got {seq!r:.40}")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_ID_CHARS:
        raise ValueError(f"envelope field 'id' must be a string of 1..{MAX_ID_CHARS} characters")
    if not event_id.isprintable() or not event_id.isascii():
        # UUIDv7 or ULID (CONTRACT 4); also keeps lone surrogates out of SQLite.
        raise ValueError(f"envelope field 'id' must be printable ASCII, got {event_id!r:.80}")
    if not isinstance(ts, str):
        raise ValueError("envelope field 'ts' must be an ISO 8601 string")
    try:
        ts_text = canonical_time(ts)
    except ValueError:
        raise ValueError(f"envelope field 'ts' is not an ISO 8601 time: {ts!r:.60}") from None
    seq_end = env.get("seq_end")
    if seq_end is not None and (not _int(seq_end) or seq_end < seq):
        raise ValueError(f"envelope field 'seq_end' must be an integer >= seq ({seq}), "
                         f"got {seq_end!r:.40}")
    lost = env.get("lost")
    lost_range: tuple[int, int] | None = None
    if lost is not None:
        if (not isinstance(lost, list | tuple) or len(lost) != 2
                or not all(_int(x) for x in lost) or not 1 <= lost[0] <= lost[1]):
            raise ValueError(f"envelope field 'lost' must be [from, to] with 1 <= from <= to, "
                             f"got {lost!r:.60}")
        lost_range = (lost[0], lost[1])
    floor = env.get("floor")
    if floor is not None and (not _int(floor) or not 0 <= floor < seq):
        raise ValueError(f"envelope field 'floor' must be an integer 0 <= floor < seq ({seq}), "
                         f"got {floor!r:.40}")
    epoch = env.get("epoch", "")
    if not isinstance(epoch, str) or (epoch and not EPOCH_RE.match(epoch)):
        raise ValueError(f"envelope field 'epoch' must match [A-Za-z0-9._:-]{{1,64}}, "
                         f"got {epoch!r:.80}")
    if payload is None:
        payload = json.dumps(env, separators=(",", ":"), ensure_ascii=False)
    return EventRow(site, kind, seq, seq_end, event_id, ts_text, lost_range, payload,
                    floor or None, epoch)


@dataclass(frozen=True)
class Reject:
    """A message the receiver could not store, kept with the reason (never dropped)."""

    topic: str
    site: str      # the topic's site level ("" if the topic has none)
    kind: str      # the topic's kind level ("" if none)
    reason: str
    size: int      # the whole message's length in bytes
    head: bytes    # its first REJECT_HEAD_BYTES bytes

    @classmethod
    def of(cls, topic: str, site: str, kind: str, reason: str, payload: bytes) -> Reject:
        return cls(topic[:REJECT_TOPIC_CHARS], site[:64], kind[:32], reason[:500],
                   len(payload), bytes(payload[:REJECT_HEAD_BYTES]))


class Store(Protocol):
    """What the receiver and the report need from a store (SQLite here, PostgreSQL in
    hq/pgstore.py): the semantics are those of the module docstring."""

    counters: dict[str, int]

    def store_batch(self, envelopes: Sequence[Mapping[str, Any] | EventRow],
                    rejects: Sequence[Reject] = ()) -> dict[Stream, int]:
        """Store events and rejects in one committed transaction; return the watermark
        of every (site, kind, epoch) the events touched."""
        ...

    def watermarks(self) -> dict[Stream, int]: ...

    def report(self, site: str | None = None, since: str | None = None,
               now: float | None = None, until: str | None = None) -> dict[str, Any]: ...

    def events(self, site: str, kind: str) -> list[dict[str, Any]]: ...

    def conflicts(self, site: str | None = None) -> list[dict[str, Any]]: ...

    def rejects(self, site: str | None = None) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    epoch TEXT NOT NULL DEFAULT '',    -- the outbox run that last sent it ('' : none given)
    seq INTEGER NOT NULL,
    seq_end INTEGER,                   -- a thinned sensor aggregate covers seq..seq_end
    id TEXT NOT NULL,
    ts TEXT NOT NULL,                  -- when the agent accepted it (iso_ms)
    received_at TEXT NOT NULL,         -- when HQ first stored it (iso_ms)
    payload TEXT NOT NULL,             -- the whole envelope, JSON
    dups INTEGER NOT NULL DEFAULT 0,   -- redeliveries dropped; per row so --since applies
    unproven INTEGER NOT NULL DEFAULT 0,  -- 1: its floor/lost/seq_end had no valid proof
    PRIMARY KEY (site, kind, epoch, seq, id)
);
CREATE INDEX IF NOT EXISTS events_by_seq ON events (site, kind, seq);
CREATE TABLE IF NOT EXISTS marks (
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    epoch TEXT NOT NULL DEFAULT '',
    upto INTEGER NOT NULL,
    heard_at TEXT NOT NULL DEFAULT '', -- when a batch last touched this stream (iso_ms)
    PRIMARY KEY (site, kind, epoch)
);
CREATE TABLE IF NOT EXISTS lost (
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    epoch TEXT NOT NULL DEFAULT '',
    from_seq INTEGER NOT NULL,
    to_seq INTEGER NOT NULL,
    seq INTEGER NOT NULL,              -- the event that declared the range
    ts TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (site, kind, epoch, from_seq, to_seq)
);
CREATE TABLE IF NOT EXISTS skipped (
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    epoch TEXT NOT NULL DEFAULT '',
    from_seq INTEGER NOT NULL,         -- seqs the watermark was raised over by a "floor"
    to_seq INTEGER NOT NULL,           -- and that this store did not hold at the time
    seq INTEGER NOT NULL,              -- the event that carried the floor
    ts TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (site, kind, epoch, from_seq, to_seq)
);
CREATE TABLE IF NOT EXISTS conflicts (
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    seq INTEGER NOT NULL,              -- one (site, kind, seq) held under two ids
    epoch TEXT NOT NULL,               -- the event that came second
    id TEXT NOT NULL,
    other_epoch TEXT NOT NULL,         -- the one already held
    other_id TEXT NOT NULL,
    ts TEXT NOT NULL,                  -- the second event's ts
    received_at TEXT NOT NULL,
    PRIMARY KEY (site, kind, seq, epoch, id, other_epoch, other_id)
);
CREATE TABLE IF NOT EXISTS rejects (
    received_at TEXT NOT NULL,
    topic TEXT NOT NULL,
    site TEXT NOT NULL,                -- the topic's site level ('' if none)
    kind TEXT NOT NULL,                -- the topic's kind level ('' if none)
    reason TEXT NOT NULL,
    size INTEGER NOT NULL,             -- the message's length in bytes
    head BLOB NOT NULL                 -- its first bytes (REJECT_HEAD_BYTES)
);
CREATE INDEX IF NOT EXISTS rejects_by_site ON rejects (site, kind, received_at);
"""
_V1_TABLES = ("events", "marks", "lost", "skipped")
# A version-1 store (no epochs, one row per (site, kind, seq)) is migrated in place
# on open: its rows become epoch '' (what an agent without epochs sends).
_MIGRATE_V1 = """
INSERT INTO events (site, kind, epoch, seq, seq_end, id, ts, received_at, payload, dups)
    SELECT site, kind, '', seq, seq_end, id, ts, received_at, payload, dups FROM v1_events;
INSERT INTO marks (site, kind, epoch, upto, heard_at) SELECT site, kind, '', upto, '' FROM v1_marks;
INSERT INTO lost (site, kind, epoch, from_seq, to_seq, seq, ts, received_at)
    SELECT site, kind, '', from_seq, to_seq, seq, ts, received_at FROM v1_lost;
INSERT INTO skipped (site, kind, epoch, from_seq, to_seq, seq, ts, received_at)
    SELECT site, kind, '', from_seq, to_seq, seq, ts, received_at FROM v1_skipped;
DROP TABLE v1_events; DROP TABLE v1_marks; DROP TABLE v1_lost; DROP TABLE v1_skipped;
"""
_V1_SKIPPED = """
CREATE TABLE IF NOT EXISTS skipped (
    site TEXT NOT NULL, kind TEXT NOT NULL, from_seq INTEGER NOT NULL, to_seq INTEGER NOT NULL,
    seq INTEGER NOT NULL, ts TEXT NOT NULL, received_at TEXT NOT NULL,
    PRIMARY KEY (site, kind, from_seq, to_seq)
);
"""
_REQUIRED = {"events", "marks", "lost", "skipped", "conflicts", "rejects"}


def sqlite_path(url: str) -> str:
    """The file of ``sqlite:///PATH``: ``/PATH`` (``sqlite:///./x.db`` is relative)."""
    path = url.removeprefix("sqlite://")
    if path.startswith(("/./", "/../", "//")):  # relative, or sqlite:////abs spelled out
        return path[1:]
    return path


def open_side_tables(path: str, schema: str, what: str) -> sqlite3.Connection:
    """A connection of its own to the HQ store's SQLite file, with ``schema`` created:
    WAL, FULL sync, autocommit (callers open their own transactions). ``what`` names
    the tables in the error (e.g. "the fleet tables")."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_S)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript("BEGIN IMMEDIATE;" + schema + "COMMIT;")
    except sqlite3.Error as exc:
        raise StoreError(path, f"cannot open {what}: {exc}") from None
    return conn


class StoreReads:
    """The reading half of a store, the same SQL on SQLite and PostgreSQL.

    A subclass provides ``_read(sql, params)`` (qmark ``?`` parameters; the
    PostgreSQL store turns them into ``%s``) and ``_clock``. Both backends have a
    ``rowid`` on ``marks`` and ``rejects`` (SQLite's own; a ``bigserial`` on
    PostgreSQL), so the order of rows is the order they were written in.
    """

    _clock: Any

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    def watermarks(self) -> dict[Stream, int]:
        """The committed watermark of every (site, kind, epoch), as every receiver sees it."""
        return {(s, k, e): upto for s, k, e, upto in
                self._read("SELECT site, kind, epoch, upto FROM marks WHERE upto > 0")}

    def events(self, site: str, kind: str) -> list[dict[str, Any]]:
        """Every stored event of a pair in seq order (for tests and debugging)."""
        rows = self._read("SELECT seq, seq_end, id, ts, received_at, dups, payload, epoch, "
                          "unproven FROM events WHERE site = ? AND kind = ? "
                          "ORDER BY seq, received_at, id", (site, kind))
        return [{"seq": seq, "seq_end": seq_end, "id": eid, "ts": ts, "received_at": rec,
                 "dups": dups, "envelope": json.loads(payload), "epoch": epoch,
                 "unproven": bool(unproven)}
                for seq, seq_end, eid, ts, rec, dups, payload, epoch, unproven in rows]

    def conflicts(self, site: str | None = None) -> list[dict[str, Any]]:
        """Every recorded conflict (one (site, kind, seq) under two ids), oldest first."""
        sql = ("SELECT site, kind, seq, epoch, id, other_epoch, other_id, ts, received_at "
               "FROM conflicts")
        rows = self._read(sql + (" WHERE site = ?" if site is not None else "")
                          + " ORDER BY received_at, site, kind, seq",
                          (site,) if site is not None else ())
        keys = ("site", "kind", "seq", "epoch", "id", "other_epoch", "other_id", "ts",
                "received_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def rejects(self, site: str | None = None) -> list[dict[str, Any]]:
        """Every rejected message, oldest first; ``head`` is its first bytes."""
        sql = "SELECT received_at, topic, site, kind, reason, size, head FROM rejects"
        rows = self._read(sql + (" WHERE site = ?" if site is not None else "")
                          + " ORDER BY rowid", (site,) if site is not None else ())
        keys = ("received_at", "topic", "site", "kind", "reason", "size", "head")
        return [dict(zip(keys, (*r[:6], bytes(r[6])), strict=True)) for r in rows]

    def report(self, site: str | None = None, since: str | None = None,
               now: float | None = None, until: str | None = None) -> dict[str, Any]:
        """CONTRACT 8's report, per site and kind (over every epoch), plus HQ's extras.

        ``since`` (an ISO date or time; ``ValueError`` if not) keeps events whose
        ``ts`` is at or after it. Each kind has the contract's ``received``
        (distinct events: rows), ``first_seq``, ``last_seq``, ``gaps`` (seqs held
        under no epoch between first and last, excluding declared-lost and
        skipped ranges) and ``duplicates``, and also ``conflicts`` (new ids at a
        (site, kind, seq) already held: see the module docstring), ``rejected``
        (messages on the pair's topic that could not be stored, by when they
        arrived), ``unproven_claims`` (events whose floor/lost/seq_end had no
        valid proof), ``lost`` (declared-lost ranges), ``skipped`` (seqs a
        watermark was raised over by an agent's ``floor`` and this store does
        not hold: acked by an earlier store, not missing), ``gap_details``
        (each gap with ``since``: when HQ stored the event after it),
        ``gap_since`` (that of the first gap), ``epoch`` (that of the newest
        row) with its ``acked_upto``, ``epochs`` (how many epochs hold rows),
        ``newest_ts``, ``newest_age_s`` and ``newest_received_at``.
        A pair with only rejects has ``received`` 0 and null seqs.
        """
        since_text = canonical_time(since) if since else None
        # until (exclusive) bounds ts from above, for ``hq report --date``.
        window = (since_text, canonical_time(until) if until else None)
        now_s = self._clock() if now is None else now
        where, params = ["TRUE"], []
        if site is not None:
            where.append("site = ?")
            params.append(site)
        filt, extra = _window(window)
        cond = " AND ".join(where) + filt
        params += extra
        # Only fixed fragments are spliced into the SQL; every value is a bound parameter.
        summary = self._read(
            "SELECT site, kind, COUNT(*), MIN(seq), MAX(COALESCE(seq_end, seq)), MAX(ts),"  # noqa: S608
            f" MAX(received_at), SUM(dups), SUM(unproven), COUNT(DISTINCT epoch)"
            f" FROM events WHERE {cond} GROUP BY site, kind ORDER BY site, kind", params)
        conflicts = {(s, k): n for s, k, n in self._read(
            f"SELECT site, kind, COUNT(*) FROM conflicts WHERE {cond} "  # noqa: S608
            "GROUP BY site, kind", params)}
        rx_where = " AND ".join(where) + _window(window, column="received_at")[0]
        rejected = {(s, k): n for s, k, n in self._read(
            f"SELECT site, kind, COUNT(*) FROM rejects WHERE {rx_where} "  # noqa: S608
            "GROUP BY site, kind", params)}
        marks = self.watermarks()
        sites: dict[str, list[dict[str, Any]]] = {}
        for s, k, count, first, last, newest, newest_rx, dups, unproven, epochs in summary:
            lost = self._lost(s, k, window)
            skipped = self._ranges("skipped", s, k, window)
            details = self._gaps(s, k, window, lost + skipped)
            epoch = self._newest_epoch(s, k)
            sites.setdefault(s, []).append({
                "kind": k,
                "received": count,
                "first_seq": first,
                "last_seq": last,
                "gaps": [[d["from"], d["to"]] for d in details],
                "duplicates": dups,
                "conflicts": conflicts.get((s, k), 0),
                "rejected": rejected.pop((s, k), 0),
                "unproven_claims": unproven,
                "lost": [list(r) for r in lost],
                "skipped": [list(r) for r in self._unheld(s, k, skipped)],
                "gap_details": details,
                "gap_since": details[0]["since"] if details else None,
                "epoch": epoch,
                "epochs": epochs,
                "acked_upto": marks.get((s, k, epoch), 0),
                "newest_ts": newest,
                "newest_age_s": round(max(0.0, now_s - parse_time(newest).timestamp()), 3),
                "newest_received_at": newest_rx,
            })
        for (s, k), n in sorted(rejected.items()):   # pairs that sent nothing storable
            sites.setdefault(s, []).append({
                "kind": k, "received": 0, "first_seq": None, "last_seq": None, "gaps": [],
                "duplicates": 0, "conflicts": conflicts.get((s, k), 0), "rejected": n,
                "unproven_claims": 0, "lost": [], "skipped": [], "gap_details": [],
                "gap_since": None, "epoch": None, "epochs": 0, "acked_upto": 0,
                "newest_ts": None, "newest_age_s": None, "newest_received_at": None})
        return {"sites": [{"site": s, "kinds": kinds} for s, kinds in sites.items()],
                "generated_at": iso_ms(now_s), "since": since_text}

    def _newest_epoch(self, site: str, kind: str) -> str:
        """The epoch of the pair's most recently stored row: the outbox run now sending."""
        row = self._read("SELECT epoch FROM marks WHERE site = ? AND kind = ? "
                         "ORDER BY heard_at DESC, rowid DESC LIMIT 1", (site, kind))
        return str(row[0][0]) if row else ""

    def _lost(self, site: str, kind: str,
              window: tuple[str | None, str | None]) -> list[tuple[int, int]]:
        return self._ranges("lost", site, kind, window)

    def _ranges(self, table: str, site: str, kind: str,
                window: tuple[str | None, str | None]) -> list[tuple[int, int]]:
        """The ranges of ``lost`` or ``skipped`` declared by events at or after ``since``."""
        assert table in ("lost", "skipped")
        # Every epoch's: the same range declared again after a restart is one range.
        sql = f"SELECT DISTINCT from_seq, to_seq FROM {table} WHERE site = ? AND kind = ?"  # noqa: S608
        params: list[Any] = [site, kind]
        filt, extra = _window(window)
        return [(a, b) for a, b in self._read(sql + filt + " ORDER BY from_seq",
                                              params + extra)]

    def _unheld(self, site: str, kind: str,
                ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The parts of ``ranges`` not covered by a stored event (some may arrive late)."""
        out: list[tuple[int, int]] = []
        for first, last in ranges:
            # The row just below the range (an aggregate may reach into it), then
            # the rows inside it: both index range scans.
            held = [(a, b) for a, b in self._read(
                "SELECT seq, COALESCE(seq_end, seq) FROM events "
                "WHERE site = ? AND kind = ? AND seq < ? ORDER BY seq DESC LIMIT 1",
                (site, kind, first))]
            held += [(a, b) for a, b in self._read(
                "SELECT seq, COALESCE(seq_end, seq) FROM events "
                "WHERE site = ? AND kind = ? AND seq >= ? AND seq <= ? ORDER BY seq",
                (site, kind, first, last))]
            out += _holes((first, last), held, [])[0]
        return out

    def _gaps(self, site: str, kind: str, window: tuple[str | None, str | None],
              lost: list[tuple[int, int]]) -> list[dict[str, Any]]:
        # Holes between stored rows, found in SQL: a row whose seq is beyond
        # every earlier row's coverage + 1 has a hole before it.
        filt, extra = _window(window)
        params: list[Any] = [site, kind, *extra]
        holes = self._read(
            "SELECT prev_end + 1, seq - 1, received_at FROM ("  # noqa: S608 - filt is fixed text
            " SELECT seq, received_at, MAX(COALESCE(seq_end, seq)) OVER ("
            "  ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_end"
            f" FROM events WHERE site = ? AND kind = ?{filt}) AS w"
            # "seq - 1 > prev_end", not "seq > prev_end + 1": seqs go up to 2**63 - 1.
            " WHERE prev_end IS NOT NULL AND seq - 1 > prev_end ORDER BY seq", params)
        gaps = []
        for first, last, since_at in holes:
            for a, b in _subtract((first, last), lost):
                gaps.append({"from": a, "to": b, "since": since_at})
        return gaps


class SqliteStore(StoreReads):
    """The default store: one SQLite file in WAL mode, every commit ``synchronous=FULL``.

    Thread-safe (one connection behind a lock), so a test or the report may
    read while the receiver writes; several processes may share the file.
    """

    def __init__(self, path: str, *, create: bool = True,
                 clock: Any = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {"stored": 0, "duplicates": 0, "lost_ranges": 0,
                                         "skipped_ranges": 0, "batches": 0, "conflicts": 0,
                                         "rejected": 0, "adopted": 0}
        self.stored_by_kind: dict[str, int] = {}  # for HQ's metrics (hq/metrics.py)
        if not create and not os.path.exists(path):
            raise StoreError(path, "no such file (has 'edge-agent hq' run with this config? "
                                   "check [hq] store)")
        try:
            if create:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are begun explicitly (BEGIN IMMEDIATE).
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                         timeout=BUSY_TIMEOUT_S)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(path, f"cannot open: {exc}") from None
        try:
            self._setup(create)
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(path, f"cannot open: {exc}") from None
        except StoreError:
            self._conn.close()
            raise

    def _setup(self, create: bool) -> None:
        conn = self._conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version == SCHEMA_VERSION and tables >= _REQUIRED:
            return
        if version == 1 and {"events", "marks", "lost"} <= tables:
            self._migrate_v1("skipped" in tables)
            return
        if version not in (0, SCHEMA_VERSION) or (tables and version == 0):
            # Someone else's database (an outbox, say): never add tables to it.
            raise StoreError(self.path, "is not an HQ store (it holds other tables); "
                                        "point [hq] store at a file of its own")
        if not create:
            raise StoreError(self.path, "is empty, not an HQ store")
        conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA +
                           f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    def _migrate_v1(self, has_skipped: bool) -> None:
        """Version 1 (no epochs) to 2, in one transaction: nothing or everything."""
        renames = "".join(f"ALTER TABLE {t} RENAME TO v1_{t};" for t in _V1_TABLES)
        self._conn.executescript(
            "BEGIN IMMEDIATE;" + ("" if has_skipped else _V1_SKIPPED) + renames + _SCHEMA
            + _MIGRATE_V1 + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(self.path, f"cannot begin a write: {exc}") from None
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as exc:
                if self._conn.in_transaction:
                    # If even ROLLBACK fails the connection is unusable; the first error matters.
                    with suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(self.path, f"write failed, nothing stored: {exc}") from None
                raise

    # -- writing ---------------------------------------------------------

    def store_batch(self, envelopes: Sequence[Mapping[str, Any] | EventRow],
                    rejects: Sequence[Reject] = ()) -> dict[Stream, int]:
        """Store a batch in one transaction; return the watermark of every touched stream.

        ``envelopes`` are decoded envelopes, or rows already checked by
        :func:`event_row` (the receiver's fast path). Per row (module docstring):
        the same id at its (site, kind, seq) is a duplicate (counted on the row,
        which moves to the row's epoch); another id is stored, and every id
        already held at that (site, kind, seq) makes a conflict. ``lost`` ranges
        are recorded; a ``floor`` above a stream's watermark raises it.
        ``rejects`` are written in the same transaction. It is committed
        (``synchronous=FULL``) before this returns, so the caller may PUBACK and
        ack what it returns. ``ValueError`` if an envelope is bad (nothing is
        written then); :class:`StoreError` if SQLite fails.
        """
        rows = [env if isinstance(env, EventRow) else event_row(env) for env in envelopes]
        if not rows and not rejects:
            return {}
        now = iso_ms(self._clock())
        stored = dups = lost = conflicts = adopted = 0
        new_by_kind: dict[str, int] = {}
        touched: dict[Stream, list[EventRow]] = {}
        with self._write() as conn:
            for row in rows:
                touched.setdefault(row.stream, []).append(row)
                held = conn.execute(
                    "SELECT epoch, id, seq_end FROM events WHERE site = ? AND kind = ? AND seq = ?",
                    (row.site, row.kind, row.seq)).fetchall()
                same = [h for h in held if h[1] == row.id]
                if same:
                    dups += 1
                    if any(h[0] == row.epoch for h in same):
                        conn.execute("UPDATE events SET dups = dups + 1 WHERE site = ? AND "
                                     "kind = ? AND epoch = ? AND seq = ? AND id = ?",
                                     (row.site, row.kind, row.epoch, row.seq, row.id))
                    else:
                        # Resent by a later run of the same outbox: the row joins that
                        # run's stream, which must cover what the agent still holds.
                        adopted += 1
                        conn.execute("UPDATE events SET dups = dups + 1, epoch = ? WHERE "
                                     "site = ? AND kind = ? AND epoch = ? AND seq = ? AND id = ?",
                                     (row.epoch, row.site, row.kind, same[0][0], row.seq,
                                      row.id))
                else:
                    conn.execute(
                        "INSERT INTO events (site, kind, epoch, seq, seq_end, id, ts,"
                        " received_at, payload, unproven) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (row.site, row.kind, row.epoch, row.seq, row.seq_end, row.id, row.ts,
                         now, row.payload, int(row.unproven)))
                    stored += 1
                    new_by_kind[row.kind] = new_by_kind.get(row.kind, 0) + 1
                    for other_epoch, other_id, other_end in held:
                        if other_epoch == row.epoch and (row.seq_end is not None
                                                         or other_end is not None):
                            # A thinned aggregate and the raw reading it summarises
                            # (published, then thinned after a crash): both kept.
                            continue
                        conflicts += conn.execute(
                            "INSERT OR IGNORE INTO conflicts (site, kind, seq, epoch, id,"
                            " other_epoch, other_id, ts, received_at)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (row.site, row.kind, row.seq, row.epoch, row.id, other_epoch,
                             other_id, row.ts, now)).rowcount
                if row.lost is not None:
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO lost (site, kind, epoch, from_seq, to_seq, seq,"
                        " ts, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (row.site, row.kind, row.epoch, row.lost[0], row.lost[1], row.seq,
                         row.ts, now))
                    lost += cur.rowcount
            if rejects:
                conn.executemany(
                    "INSERT INTO rejects (received_at, topic, site, kind, reason, size, head)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(now, r.topic, r.site, r.kind, r.reason, r.size, r.head) for r in rejects])
            marks: dict[Stream, int] = {}
            skipped = 0
            for stream, batch in touched.items():
                marks[stream], ranges = self._advance(conn, stream, batch, now)
                skipped += ranges
        c = self.counters
        c["stored"] += stored
        for kind, n in new_by_kind.items():
            self.stored_by_kind[kind] = self.stored_by_kind.get(kind, 0) + n
        c["skipped_ranges"] += skipped
        c["duplicates"] += dups
        c["adopted"] += adopted
        c["lost_ranges"] += lost
        c["conflicts"] += conflicts
        c["rejected"] += len(rejects)
        c["batches"] += 1
        return marks

    def _advance(self, conn: sqlite3.Connection, stream: Stream, batch: list[EventRow],
                 now: str) -> tuple[int, int]:
        """Move the stream's watermark over contiguous coverage, and over a ``floor``
        above it; runs inside the write. Returns the watermark and the number of
        skipped ranges recorded."""
        site, kind, epoch = stream
        found = conn.execute("SELECT upto FROM marks WHERE site = ? AND kind = ? AND epoch = ?",
                             stream).fetchone()
        start = found[0] if found else 0
        # Ranges that may start at or below the mark yet reach past it: lost
        # ranges (few), and aggregates of this batch whose first seq was already
        # covered. Stored rows starting above the mark come from the cursor.
        lost = [(a, b) for a, b in conn.execute(
            "SELECT from_seq, to_seq FROM lost WHERE site = ? AND kind = ? AND epoch = ?"
            " AND to_seq > ?", (*stream, start))]
        extra = lost + [(r.seq, r.end) for r in batch if r.seq <= start < r.end]
        upto = self._cover(conn, stream, start, extra)
        floor_row = max((r for r in batch if r.floor is not None),
                        key=lambda r: r.floor or 0, default=None)
        skipped = 0
        if floor_row is not None and floor_row.floor is not None and floor_row.floor > upto:
            floor = floor_row.floor
            # What another stream of the pair acked (an earlier run of this outbox,
            # usually) is not skipped; nor what rows of any epoch and the lost
            # ranges cover between the mark and the floor (late arrivals, the far
            # side of a gap).
            acked_elsewhere = conn.execute(
                "SELECT MAX(upto) FROM marks WHERE site = ? AND kind = ? AND epoch <> ?",
                stream).fetchone()[0] or 0
            scan_from = max(upto, min(acked_elsewhere, floor))
            held = conn.execute(
                "SELECT seq, COALESCE(seq_end, seq) FROM events "
                "WHERE site = ? AND kind = ? AND seq > ? AND seq <= ? ORDER BY seq",
                (site, kind, scan_from, floor))
            pieces, _ = _holes((scan_from + 1, floor), held, lost)
            for first, last in pieces:
                skipped += conn.execute(
                    "INSERT OR IGNORE INTO skipped (site, kind, epoch, from_seq, to_seq, seq, ts,"
                    " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (site, kind, epoch, first, last, floor_row.seq, floor_row.ts,
                     now)).rowcount
            # A row of this stream may start at or below the floor and reach past it.
            reach = conn.execute(
                "SELECT MAX(COALESCE(seq_end, seq)) FROM events WHERE site = ? AND kind = ?"
                " AND epoch = ? AND seq > ? AND seq <= ?", (*stream, upto, floor)).fetchone()[0]
            upto = self._cover(conn, stream, max(floor, reach or 0), extra)
        # Also when the mark stays: heard_at says which run of the outbox is sending now.
        conn.execute(
            "INSERT INTO marks (site, kind, epoch, upto, heard_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (site, kind, epoch) DO UPDATE SET heard_at = excluded.heard_at, "
            "upto = MAX(marks.upto, excluded.upto)", (site, kind, epoch, upto, now))
        return upto, skipped

    @staticmethod
    def _cover(conn: sqlite3.Connection, stream: Stream, upto: int,
               extra: list[tuple[int, int]]) -> int:
        """The highest seq reached from ``upto`` over the stream's contiguous rows and ``extra``."""
        # Lazily read rows above the mark in seq order, stopping at the first
        # hole: the cost is the distance advanced, not the backlog beyond a gap.
        cursor = conn.execute(
            "SELECT seq, COALESCE(seq_end, seq) FROM events "
            "WHERE site = ? AND kind = ? AND epoch = ? AND seq > ? ORDER BY seq", (*stream, upto))
        row = cursor.fetchone()
        while True:
            moved = False
            while row is not None and row[0] <= upto + 1:
                upto = max(upto, row[1])
                row = cursor.fetchone()
                moved = True
            for first, last in extra:
                if first <= upto + 1 and last > upto:
                    upto = last
                    moved = True
            if not moved:
                break
        cursor.close()
        return upto

    # -- reading ---------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(self.path, f"read failed: {exc}") from None


def _window(window: tuple[str | None, str | None], column: str = "ts"
            ) -> tuple[str, list[Any]]:
    """The SQL filter (fixed text) and parameters of a (since, until) window on ``column``."""
    assert column in ("ts", "received_at")
    filt, params = "", []
    if window[0] is not None:
        filt += f" AND {column} >= ?"
        params.append(window[0])
    if window[1] is not None:
        filt += f" AND {column} < ?"
        params.append(window[1])
    return filt, params


def _holes(span: tuple[int, int], held: Iterable[tuple[int, int]],
           ranges: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], int]:
    """The parts of ``span`` (inclusive) covered neither by ``held`` (sorted by
    start, streamed: may be many) nor by ``ranges`` (few); and the highest end
    among ``held`` (``span``'s first - 1 if none)."""
    first, last = span
    reach = first - 1
    pieces = []
    for a, b in held:
        reach = max(reach, b)
        if a > first and first <= last:
            pieces.append((first, min(a - 1, last)))
        first = max(first, b + 1)
    if first <= last:
        pieces.append((first, last))
    return [p for piece in pieces for p in _subtract(piece, ranges)], reach


def _subtract(span: tuple[int, int], ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``span`` (inclusive) not inside any of ``ranges``."""
    pieces = [span]
    for lo, hi in ranges:
        out = []
        for a, b in pieces:
            if hi < a or lo > b:
                out.append((a, b))
                continue
            if a < lo:
                out.append((a, lo - 1))
            if hi < b:
                out.append((hi + 1, b))
        pieces = out
    return pieces


def redact_url(url: str) -> str:
    """The URL without a password, for messages."""
    url = re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)
    return re.sub(r"(password=)[^&\s]*", r"\1***", url)


