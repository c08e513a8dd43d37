"""HQ's store: every event once per (site, kind, seq), and the ack watermark.

The watermark of a (site, kind) is the highest seq ``n`` such that every seq
``1..n`` is *covered*: stored as an event, inside the ``seq..seq_end`` range of
a stored sensor aggregate (the agent thinned those readings into it), or inside
a range an agent declared ``lost`` (seqs that went down with a corrupt outbox;
acking past them is what lets the agent move on). HQ acks exactly that number,
so the agent deletes only what HQ holds.

An event may also carry ``floor`` F: every seq <= F of its kind has left the
agent's outbox for good (acked, by this store or an earlier one, or lost), so
none of them will ever be sent. A store whose watermark is below F (a fresh
database facing an agent whose outbox starts at F + 1) raises it to F and
records the part of ``mark+1..F`` it does not hold in the ``skipped`` table; the
report lists those ranges as ``skipped``, not as gaps. Without this the
watermark would wait forever for seqs no agent still has. Seqs that arrive
inside a skipped range later are stored as usual.

The watermark is recomputed from the database inside the write transaction, so
any number of receivers may share one store: SQLite serialises their
``BEGIN IMMEDIATE`` transactions and each sees what the others committed.

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

# Kinds beyond CONTRACT 4's list are stored rather than dropped (dropping is
# data loss); the topic level only has to be a sane name.
KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
PSYCOPG_HINT = "pip install 'psycopg[binary]'"

Pair = tuple[str, str]


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

    @property
    def pair(self) -> Pair:
        return (self.site, self.kind)

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
    if not isinstance(event_id, str) or not event_id:
        raise ValueError("envelope field 'id' must be a non-empty string")
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
    if payload is None:
        payload = json.dumps(env, separators=(",", ":"), ensure_ascii=False)
    return EventRow(site, kind, seq, seq_end, event_id, ts_text, lost_range, payload,
                    floor or None)


class Store(Protocol):
    """What the receiver and the report need from a store (SQLite now, PostgreSQL later)."""

    counters: dict[str, int]

    def store_batch(self, envelopes: Sequence[Mapping[str, Any] | EventRow]
                    ) -> dict[Pair, int]: ...

    def watermarks(self) -> dict[Pair, int]: ...

    def report(self, site: str | None = None, since: str | None = None,
               now: float | None = None, until: str | None = None) -> dict[str, Any]: ...

    def events(self, site: str, kind: str) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    seq INTEGER NOT NULL,
    seq_end INTEGER,                   -- a thinned sensor aggregate covers seq..seq_end
    id TEXT NOT NULL,
    ts TEXT NOT NULL,                  -- when the agent accepted it (iso_ms)
    received_at TEXT NOT NULL,         -- when HQ first stored it (iso_ms)
    payload TEXT NOT NULL,             -- the whole envelope, JSON
    dups INTEGER NOT NULL DEFAULT 0,   -- redeliveries dropped; per row so --since applies
    PRIMARY KEY (site, kind, seq)
);
CREATE TABLE IF NOT EXISTS marks (
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    upto INTEGER NOT NULL,
    PRIMARY KEY (site, kind)
);
CREATE TABLE IF NOT EXISTS lost (
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    from_seq INTEGER NOT NULL,
    to_seq INTEGER NOT NULL,
    seq INTEGER NOT NULL,              -- the event that declared the range
    ts TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (site, kind, from_seq, to_seq)
);
CREATE TABLE IF NOT EXISTS skipped (
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    from_seq INTEGER NOT NULL,         -- seqs the watermark was raised over by a "floor"
    to_seq INTEGER NOT NULL,           -- and that this store did not hold at the time
    seq INTEGER NOT NULL,              -- the event that carried the floor
    ts TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (site, kind, from_seq, to_seq)
);
"""
# Added after the first release of the schema: a store made before it gets the
# table on open (additive, so SCHEMA_VERSION stays; older code ignores it).
_SKIPPED_TABLE = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS skipped"):]


def sqlite_path(url: str) -> str:
    """The file of ``sqlite:///PATH``: ``/PATH`` (``sqlite:///./x.db`` is relative)."""
    path = url.removeprefix("sqlite://")
    if path.startswith(("/./", "/../", "//")):  # relative, or sqlite:////abs spelled out
        return path[1:]
    return path


class SqliteStore:
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
                                         "skipped_ranges": 0, "batches": 0}
        self.stored_by_kind: dict[str, int] = {}  # for HQ's metrics (agent/hq/metrics.py)
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
        if version == SCHEMA_VERSION and {"events", "marks", "lost"} <= tables:
            if "skipped" not in tables:
                conn.executescript("BEGIN IMMEDIATE;" + _SKIPPED_TABLE + "COMMIT;")
            return
        if version not in (0, SCHEMA_VERSION) or (tables and version == 0):
            # Someone else's database (an outbox, say): never add tables to it.
            raise StoreError(self.path, "is not an HQ store (it holds other tables); "
                                        "point [hq] store at a file of its own")
        if not create:
            raise StoreError(self.path, "is empty, not an HQ store")
        conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA +
                           f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

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

    def store_batch(self, envelopes: Sequence[Mapping[str, Any] | EventRow]
                    ) -> dict[Pair, int]:
        """Store a batch in one transaction; return the watermark of every touched pair.

        ``envelopes`` are decoded envelopes, or rows already checked by
        :func:`event_row` (the receiver's fast path). Each (site, kind, seq) is
        inserted once; a repeat is a duplicate (counted on the stored row).
        ``lost`` ranges are recorded; a ``floor`` above a pair's watermark raises
        it (see the module docstring). The transaction is committed
        (``synchronous=FULL``) before this returns, so the caller may ack what
        it returns. ``ValueError`` if an envelope is bad (nothing is written
        then); :class:`StoreError` if SQLite fails.
        """
        rows = [env if isinstance(env, EventRow) else event_row(env) for env in envelopes]
        if not rows:
            return {}
        now = iso_ms(self._clock())
        stored = dups = lost = 0
        new_by_kind: dict[str, int] = {}
        touched: dict[Pair, list[EventRow]] = {}
        with self._write() as conn:
            for row in rows:
                touched.setdefault(row.pair, []).append(row)
                cur = conn.execute(
                    "INSERT OR IGNORE INTO events (site, kind, seq, seq_end, id, ts, received_at,"
                    " payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (row.site, row.kind, row.seq, row.seq_end, row.id, row.ts, now, row.payload))
                if cur.rowcount:
                    stored += 1
                    new_by_kind[row.kind] = new_by_kind.get(row.kind, 0) + 1
                elif row.seq_end is not None and conn.execute(
                        "UPDATE events SET seq_end = ?, id = ?, ts = ?, payload = ? "
                        "WHERE site = ? AND kind = ? AND seq = ? AND COALESCE(seq_end, seq) < ?",
                        (row.seq_end, row.id, row.ts, row.payload, row.site, row.kind, row.seq,
                         row.seq_end)).rowcount:
                    # An aggregate whose first seq arrived raw before (published,
                    # then thinned after an agent crash): keeping the raw row would
                    # drop the coverage of seq+1..seq_end, and the watermark could
                    # never pass it. The aggregate summarises that reading too.
                    stored += 1
                else:
                    dups += 1
                    conn.execute("UPDATE events SET dups = dups + 1 "
                                 "WHERE site = ? AND kind = ? AND seq = ?",
                                 (row.site, row.kind, row.seq))
                if row.lost is not None:
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO lost (site, kind, from_seq, to_seq, seq, ts,"
                        " received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (row.site, row.kind, row.lost[0], row.lost[1], row.seq, row.ts, now))
                    lost += cur.rowcount
            marks: dict[Pair, int] = {}
            skipped = 0
            for pair, batch in touched.items():
                marks[pair], ranges = self._advance(conn, pair, batch, now)
                skipped += ranges
        self.counters["stored"] += stored
        for kind, n in new_by_kind.items():
            self.stored_by_kind[kind] = self.stored_by_kind.get(kind, 0) + n
        self.counters["skipped_ranges"] += skipped
        self.counters["duplicates"] += dups
        self.counters["lost_ranges"] += lost
        self.counters["batches"] += 1
        return marks

    def _advance(self, conn: sqlite3.Connection, pair: Pair, batch: list[EventRow],
                 now: str) -> tuple[int, int]:
        """Move the pair's watermark over contiguous coverage, and over a ``floor``
        above it; runs inside the write. Returns the watermark and the number of
        skipped ranges recorded."""
        site, kind = pair
        found = conn.execute("SELECT upto FROM marks WHERE site = ? AND kind = ?",
                             pair).fetchone()
        start = found[0] if found else 0
        # Ranges that may start at or below the mark yet reach past it: lost
        # ranges (few), and aggregates of this batch whose first seq was already
        # covered. Stored rows starting above the mark come from the cursor.
        lost = [(a, b) for a, b in conn.execute(
            "SELECT from_seq, to_seq FROM lost WHERE site = ? AND kind = ? AND to_seq > ?",
            (site, kind, start))]
        extra = lost + [(r.seq, r.end) for r in batch if r.seq <= start < r.end]
        upto = self._cover(conn, pair, start, extra)
        floor_row = max((r for r in batch if r.floor is not None),
                        key=lambda r: r.floor or 0, default=None)
        skipped = 0
        if floor_row is not None and floor_row.floor is not None and floor_row.floor > upto:
            floor = floor_row.floor
            # Rows stored between the mark and the floor (late arrivals, or the
            # far side of a gap): what they and the lost ranges cover is not skipped,
            # and one of them may reach past the floor.
            held = conn.execute(
                "SELECT seq, COALESCE(seq_end, seq) FROM events "
                "WHERE site = ? AND kind = ? AND seq > ? AND seq <= ? ORDER BY seq",
                (site, kind, upto, floor))
            pieces, reach = _holes((upto + 1, floor), held, lost)
            for first, last in pieces:
                skipped += conn.execute(
                    "INSERT OR IGNORE INTO skipped (site, kind, from_seq, to_seq, seq, ts,"
                    " received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (site, kind, first, last, floor_row.seq, floor_row.ts, now)).rowcount
            upto = self._cover(conn, pair, max(floor, reach), extra)
        if upto != start:
            conn.execute(
                "INSERT INTO marks (site, kind, upto) VALUES (?, ?, ?) "
                "ON CONFLICT (site, kind) DO UPDATE SET upto = excluded.upto "
                "WHERE excluded.upto > marks.upto", (site, kind, upto))
        return upto, skipped

    @staticmethod
    def _cover(conn: sqlite3.Connection, pair: Pair, upto: int,
               extra: list[tuple[int, int]]) -> int:
        """The highest seq reached from ``upto`` over contiguous stored rows and ``extra``."""
        # Lazily read rows above the mark in seq order, stopping at the first
        # hole: the cost is the distance advanced, not the backlog beyond a gap.
        cursor = conn.execute(
            "SELECT seq, COALESCE(seq_end, seq) FROM events "
            "WHERE site = ? AND kind = ? AND seq > ? ORDER BY seq", (*pair, upto))
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

    def watermarks(self) -> dict[Pair, int]:
        """The committed watermark of every (site, kind), as every receiver sees it."""
        return {(s, k): upto for s, k, upto in self._read("SELECT site, kind, upto FROM marks")}

    def events(self, site: str, kind: str) -> list[dict[str, Any]]:
        """Every stored event of a pair in seq order (for tests and debugging)."""
        rows = self._read("SELECT seq, seq_end, id, ts, received_at, dups, payload FROM events "
                          "WHERE site = ? AND kind = ? ORDER BY seq", (site, kind))
        return [{"seq": seq, "seq_end": seq_end, "id": eid, "ts": ts, "received_at": rec,
                 "dups": dups, "envelope": json.loads(payload)}
                for seq, seq_end, eid, ts, rec, dups, payload in rows]

    def report(self, site: str | None = None, since: str | None = None,
               now: float | None = None, until: str | None = None) -> dict[str, Any]:
        """CONTRACT 8's report, per site and kind, plus HQ's extras.

        ``since`` (an ISO date or time; ``ValueError`` if not) keeps events whose
        ``ts`` is at or after it. Each kind has the contract's ``received``,
        ``first_seq``, ``last_seq``, ``gaps`` (seqs missing between first and
        last, excluding declared-lost and skipped ranges) and ``duplicates``, and
        also ``lost`` (declared-lost ranges), ``skipped`` (seqs the watermark was
        raised over by an agent's ``floor`` and this store does not hold: acked
        by an earlier store, not missing), ``gap_details`` (each gap with
        ``since``: when HQ stored the event after it), ``gap_since`` (that of the
        first gap), ``acked_upto``, ``newest_ts``, ``newest_age_s`` and
        ``newest_received_at``.
        """
        since_text = canonical_time(since) if since else None
        # until (exclusive) bounds ts from above, for ``hq report --date``.
        window = (since_text, canonical_time(until) if until else None)
        now_s = self._clock() if now is None else now
        where, params = ["1"], []
        if site is not None:
            where.append("site = ?")
            params.append(site)
        if since_text is not None:
            where.append("ts >= ?")
            params.append(since_text)
        if window[1] is not None:
            where.append("ts < ?")
            params.append(window[1])
        cond = " AND ".join(where)
        # Only fixed fragments are spliced into the SQL; every value is a bound parameter.
        summary = self._read(
            "SELECT site, kind, COUNT(*), MIN(seq), MAX(COALESCE(seq_end, seq)), MAX(ts),"  # noqa: S608
            f" MAX(received_at), SUM(dups) FROM events WHERE {cond} "
            "GROUP BY site, kind ORDER BY site, kind", params)
        marks = self.watermarks()
        sites: dict[str, list[dict[str, Any]]] = {}
        for s, k, count, first, last, newest, newest_rx, dups in summary:
            lost = self._lost(s, k, window)
            skipped = self._ranges("skipped", s, k, window)
            details = self._gaps(s, k, window, lost + skipped)
            sites.setdefault(s, []).append({
                "kind": k,
                "received": count,
                "first_seq": first,
                "last_seq": last,
                "gaps": [[d["from"], d["to"]] for d in details],
                "duplicates": dups,
                "lost": [list(r) for r in lost],
                "skipped": [list(r) for r in self._unheld(s, k, skipped)],
                "gap_details": details,
                "gap_since": details[0]["since"] if details else None,
                "acked_upto": marks.get((s, k), 0),
                "newest_ts": newest,
                "newest_age_s": round(max(0.0, now_s - parse_time(newest).timestamp()), 3),
                "newest_received_at": newest_rx,
            })
        return {"sites": [{"site": s, "kinds": kinds} for s, kinds in sites.items()],
                "generated_at": iso_ms(now_s), "since": since_text}

    def _lost(self, site: str, kind: str,
              window: tuple[str | None, str | None]) -> list[tuple[int, int]]:
        return self._ranges("lost", site, kind, window)

    def _ranges(self, table: str, site: str, kind: str,
                window: tuple[str | None, str | None]) -> list[tuple[int, int]]:
        """The ranges of ``lost`` or ``skipped`` declared by events at or after ``since``."""
        assert table in ("lost", "skipped")
        sql = f"SELECT from_seq, to_seq FROM {table} WHERE site = ? AND kind = ?"  # noqa: S608
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
            f" FROM events WHERE site = ? AND kind = ?{filt})"
            " WHERE prev_end IS NOT NULL AND seq > prev_end + 1 ORDER BY seq", params)
        gaps = []
        for first, last, since_at in holes:
            for a, b in _subtract((first, last), lost):
                gaps.append({"from": a, "to": b, "since": since_at})
        return gaps


def _window(window: tuple[str | None, str | None]) -> tuple[str, list[Any]]:
    """The SQL filter (fixed text) and parameters of a (since, until) ts window."""
    filt, params = "", []
    if window[0] is not None:
        filt += " AND ts >= ?"
        params.append(window[0])
    if window[1] is not None:
        filt += " AND ts < ?"
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


class PostgresStore:
    """Placeholder for ``postgresql://`` stores: fails with a clear message.

    The SQL above is close to portable (ON CONFLICT, window functions), but a
    PostgreSQL store is not built or tested yet; it says so instead of
    half-working.
    """

    def __init__(self, url: str) -> None:
        try:
            import psycopg  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            raise StoreError(_redact(url), "PostgreSQL needs the psycopg package, which is not "
                                           f"installed: {PSYCOPG_HINT}") from None
        raise StoreError(_redact(url), "PostgreSQL stores are not supported by this version "
                                       "yet; use [hq] store = \"sqlite:///PATH\"")


def _redact(url: str) -> str:
    """The URL without a password, for messages."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


def open_store(url: str, *, create: bool = True) -> Store:
    """The store named by ``[hq] store``: ``sqlite:///PATH`` or ``postgresql://...``."""
    if url.startswith("sqlite:///"):
        return SqliteStore(sqlite_path(url), create=create)
    if url.startswith(("postgresql://", "postgres://")):
        PostgresStore(url)
    raise StoreError(_redact(url), "unknown store URL; use sqlite:///PATH or "
                                   "postgresql://user@host/db")
