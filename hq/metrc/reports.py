"""What has been reported to Metrc: the ``metrc_*`` tables beside HQ's events.

One row per stored ``sale`` (and ``plant``) event in ``metrc_reports``, keyed by
the event's id, with its state:

- ``pending``: to be reported (again) once ``next_at`` has passed;
- ``reported``: Metrc has it (``metrc_id`` when it said);
- ``failed``: Metrc refused it (its message in ``error``), or it cannot be
  mapped; it waits for a person and ``edge-agent hq metrc retry``;
- ``skipped``: nothing to report (a plant ``observe``).

Work is claimed, never just read: a forwarder takes a batch by setting
``lease_owner``/``lease_until`` in one write transaction (SQLite: ``BEGIN
IMMEDIATE`` serialises the claimers, so two never take one row; PostgreSQL,
hq/metrc/pg_reports.py, uses ``SELECT ... FOR UPDATE SKIP LOCKED`` and
the server's clock for leases), and every later write of the
batch names its owner, so a forwarder whose lease ran out changes nothing.
``posted`` is set and committed *before* a POST leaves: a row that has it was
perhaps recorded by Metrc (the answer was lost, or the process died), so the
next attempt looks it up by external number before it posts again. That is how
many receivers, and a receiver killed mid-batch, still report each sale once.

Events are taken in by SQLite ``rowid`` (writers are serialised, so a commit
after ours always has higher rowids: the cursor misses nothing).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

from hq.store import StoreError, open_side_tables, sqlite_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS metrc_reports (
    event_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    seq INTEGER NOT NULL,
    number TEXT,                      -- sale: the receipt number (ExternalReceiptNumber)
    local_day TEXT NOT NULL,          -- YYYY-MM-DD, the site's local day of the event
    happened_at REAL NOT NULL,        -- the sale's time (epoch s)
    deadline REAL NOT NULL,           -- report by then (report_within_h)
    state TEXT NOT NULL,              -- pending | reported | failed | skipped
    attempts INTEGER NOT NULL DEFAULT 0,
    posted INTEGER NOT NULL DEFAULT 0,   -- a call left whose outcome is unknown
    next_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    error TEXT,                       -- failed: why (Metrc's message); pending: last trouble
    failed_since REAL,
    metrc_id TEXT,
    reported_at REAL,
    received_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS metrc_reports_due ON metrc_reports (state, next_at);
CREATE INDEX IF NOT EXISTS metrc_reports_day ON metrc_reports (site, local_day);
CREATE TABLE IF NOT EXISTS metrc_cursor (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS metrc_catalog (
    site TEXT NOT NULL,
    tag TEXT NOT NULL,                -- a package tag the site's catalog has from us
    PRIMARY KEY (site, tag)
);
CREATE TABLE IF NOT EXISTS metrc_sync (
    site TEXT PRIMARY KEY,
    lease_owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    synced_at REAL,
    packages INTEGER,
    error TEXT
);
"""
INTAKE_LIMIT = 2000
_COLUMNS = ("event_id, site, kind, seq, number, local_day, happened_at, deadline, state, "
            "attempts, posted, next_at, lease_owner, lease_until, error, failed_since, "
            "metrc_id, reported_at, received_at")


@dataclass(frozen=True)
class Report:
    """One row of ``metrc_reports``."""

    event_id: str
    site: str
    kind: str
    seq: int
    number: str | None
    local_day: str
    happened_at: float
    deadline: float
    state: str
    attempts: int
    posted: bool
    next_at: float
    lease_owner: str | None
    lease_until: float
    error: str | None
    failed_since: float | None
    metrc_id: str | None
    reported_at: float | None
    received_at: str


@dataclass(frozen=True)
class Intake:
    """What the forwarder makes of a new event: the row's fixed facts, or why it fails."""

    number: str | None
    local_day: str
    happened_at: float
    deadline: float
    error: str | None = None   # set: the row starts ``failed``
    skip: bool = False         # set: nothing to report


@dataclass(frozen=True)
class Claim:
    site: str
    kind: str
    reports: list[Report]
    envelopes: dict[str, str]   # event id -> the stored envelope JSON


Describe = Callable[[str, str, str, str], Intake]   # (site, kind, payload, ts) -> Intake


class ReportStore(Protocol):
    """What the forwarder, the CLI and the page need (SQLite here; PostgreSQL in pg_reports)."""

    def intake(self, kinds: Sequence[str], describe: Describe, now: float) -> int: ...
    def claim(self, owner: str, now: float, lease_s: float, batch: int) -> Claim | None: ...
    def renew(self, owner: str, ids: Sequence[str], until: float) -> None: ...
    def set_posted(self, owner: str, ids: Sequence[str], posted: bool = True) -> None: ...
    def reported(self, owner: str, done: dict[str, str | None], now: float) -> None: ...
    def release(self, owner: str, ids: Sequence[str], next_at: float, error: str | None,
                posted: bool | None = None) -> None: ...
    def failed(self, owner: str, ids: Sequence[str], error: str, now: float) -> None: ...
    def requeue(self, now: float, *, event_id: str | None = None,
                site: str | None = None) -> list[str]: ...
    def reports(self, site: str | None = None, day: str | None = None,
                since_day: str | None = None) -> list[Report]: ...
    def counts(self, now: float) -> dict[str, dict[str, int]]: ...
    def get(self, event_ids: Sequence[str]) -> list[Report]: ...
    def catalog(self, site: str) -> set[str]: ...
    def catalog_apply(self, site: str, added: Sequence[str], removed: Sequence[str],
                      replace: bool = False) -> None: ...
    def claim_sync(self, owner: str, site: str, now: float, interval_s: float,
                   lease_s: float) -> bool: ...
    def synced(self, owner: str, site: str, now: float, packages: int | None,
               error: str | None) -> None: ...
    def sync_states(self) -> dict[str, dict[str, Any]]: ...
    def still_needs(self, kinds: Sequence[str]) -> dict[tuple[str, str], int]: ...
    def close(self) -> None: ...


class SqliteReportStore:
    """The ``metrc_*`` tables in the HQ store's SQLite file (their own connection)."""

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        self._lock = threading.Lock()
        self._conn = open_side_tables(self.path, SCHEMA, "the metrc tables")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(self.path, f"metrc write failed: {exc}") from None
                raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(self.path, f"metrc read failed: {exc}") from None

    # -- intake --------------------------------------------------------------

    def intake(self, kinds: Sequence[str], describe: Describe, now: float) -> int:
        """Take new events of ``kinds`` from ``events`` into ``metrc_reports``."""
        marks = ",".join("?" for _ in kinds)
        taken = 0
        try:   # nothing new since the last intake: no write lock taken
            seen = self._read("SELECT value FROM metrc_cursor WHERE name = 'events'")
            newest = self._read("SELECT MAX(rowid) FROM events")[0][0] or 0
        except StoreError:
            return 0   # no events table yet
        if seen and seen[0][0] == newest:
            return 0
        with self._write() as conn:
            try:
                found = conn.execute("SELECT value FROM metrc_cursor WHERE name = 'events'"
                                     ).fetchone()
                top = conn.execute("SELECT MAX(rowid) FROM events").fetchone()[0] or 0
            except sqlite3.OperationalError:
                return 0   # no events table yet: nothing stored
            cursor = found[0] if found else 0
            cursor = min(cursor, top)  # rows deleted at the top: rowids may be reused
            rows = conn.execute(
                "SELECT rowid, id, site, kind, seq, ts, payload, received_at FROM events "  # noqa: S608 - marks is fixed text
                f"WHERE rowid > ? AND kind IN ({marks}) ORDER BY rowid LIMIT ?",
                (cursor, *kinds, INTAKE_LIMIT)).fetchall()
            last = cursor
            for rowid, event_id, site, kind, seq, ts, payload, received_at in rows:
                last = rowid
                facts = describe(site, kind, payload, ts)
                state = "skipped" if facts.skip else "failed" if facts.error else "pending"
                cur = conn.execute(
                    "INSERT INTO metrc_reports (event_id, site, kind, seq, number, local_day, "
                    "happened_at, deadline, state, next_at, error, failed_since, received_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (event_id) DO NOTHING",
                    (event_id, site, kind, seq, facts.number, facts.local_day,
                     facts.happened_at, facts.deadline, state, now, facts.error,
                     now if facts.error else None, received_at))
                taken += cur.rowcount
            if len(rows) < INTAKE_LIMIT:
                last = max(last, top)   # no row of ours up to the top: skip the rest
            if found is None or last != found[0]:
                conn.execute("INSERT INTO metrc_cursor (name, value) VALUES ('events', ?) "
                             "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (last,))
        return taken

    # -- claiming and settling -----------------------------------------------

    def claim(self, owner: str, now: float, lease_s: float, batch: int) -> Claim | None:
        """Lease the next due work: up to ``batch`` sales of one site, or one plant event."""
        # An idle forwarder polls: a read first, so it takes no write lock (which the
        # receiver's commits wait on) when nothing is due.
        if not self._read("SELECT 1 FROM metrc_reports WHERE state = 'pending' AND "
                          "next_at <= ? AND lease_until <= ? LIMIT 1", (now, now)):
            return None
        with self._write() as conn:
            first = conn.execute(
                "SELECT site, kind, event_id FROM metrc_reports WHERE state = 'pending' "
                "AND next_at <= ? AND lease_until <= ? ORDER BY next_at, seq LIMIT 1",
                (now, now)).fetchone()
            if first is None:
                return None
            site, kind, event_id = first
            if kind == "sale":
                ids = [r[0] for r in conn.execute(
                    "SELECT event_id FROM metrc_reports WHERE site = ? AND kind = 'sale' "
                    "AND state = 'pending' AND next_at <= ? AND lease_until <= ? "
                    "ORDER BY seq LIMIT ?", (site, now, now, batch))]
            else:
                ids = [event_id]
            marks = ",".join("?" for _ in ids)
            conn.execute(
                "UPDATE metrc_reports SET lease_owner = ?, lease_until = ?, "  # noqa: S608
                f"attempts = attempts + 1 WHERE event_id IN ({marks})",
                (owner, now + lease_s, *ids))
            rows = conn.execute(f"SELECT {_COLUMNS} FROM metrc_reports "  # noqa: S608
                                f"WHERE event_id IN ({marks}) ORDER BY seq", ids).fetchall()
            reports = [_report(r) for r in rows]
            payloads: dict[str, str] = {}
            for r in reports:   # by (site, kind, seq): the events table's index
                for event_id, payload in conn.execute(
                        "SELECT id, payload FROM events WHERE site = ? AND kind = ? "
                        "AND seq = ? AND id = ?", (r.site, r.kind, r.seq, r.event_id)):
                    payloads[event_id] = payload
        return Claim(site, kind, reports, payloads)

    def _owned(self, conn: sqlite3.Connection, sql: str, owner: str, ids: Sequence[str],
               params: Sequence[Any]) -> None:
        marks = ",".join("?" for _ in ids)
        conn.execute(f"{sql} WHERE lease_owner = ? AND event_id IN ({marks})",
                     (*params, owner, *ids))

    def renew(self, owner: str, ids: Sequence[str], until: float) -> None:
        if ids:
            with self._write() as conn:
                self._owned(conn, "UPDATE metrc_reports SET lease_until = ?", owner, ids,
                            (until,))

    def set_posted(self, owner: str, ids: Sequence[str], posted: bool = True) -> None:
        """Committed before a POST leaves (and cleared when Metrc said it recorded nothing)."""
        if ids:
            with self._write() as conn:
                self._owned(conn, "UPDATE metrc_reports SET posted = ?", owner, ids,
                            (int(posted),))

    def reported(self, owner: str, done: dict[str, str | None], now: float) -> None:
        if not done:
            return
        with self._write() as conn:
            for event_id, metrc_id in done.items():
                self._owned(conn, "UPDATE metrc_reports SET state = 'reported', posted = 0, "
                                  "metrc_id = ?, reported_at = ?, error = NULL, "
                                  "lease_owner = NULL, lease_until = 0", owner, [event_id],
                            (metrc_id, now))

    def release(self, owner: str, ids: Sequence[str], next_at: float, error: str | None,
                posted: bool | None = None) -> None:
        """Back to the queue, due at ``next_at``; ``posted`` None keeps the flag."""
        if not ids:
            return
        with self._write() as conn:
            if posted is None:
                self._owned(conn, "UPDATE metrc_reports SET next_at = ?, error = ?, "
                                  "lease_owner = NULL, lease_until = 0", owner, ids,
                            (next_at, error))
            else:
                self._owned(conn, "UPDATE metrc_reports SET next_at = ?, error = ?, "
                                  "posted = ?, lease_owner = NULL, lease_until = 0", owner,
                            ids, (next_at, error, int(posted)))

    def failed(self, owner: str, ids: Sequence[str], error: str, now: float) -> None:
        if ids:
            with self._write() as conn:
                self._owned(conn, "UPDATE metrc_reports SET state = 'failed', error = ?, "
                                  "failed_since = COALESCE(failed_since, ?), "
                                  "lease_owner = NULL, lease_until = 0", owner, ids,
                            (error, now))

    def requeue(self, now: float, *, event_id: str | None = None,
                site: str | None = None) -> list[str]:
        """Failed events back to ``pending`` (``retry``); the ids re-queued."""
        where, params = "state = 'failed'", []
        if event_id is not None:
            where += " AND event_id = ?"
            params.append(event_id)
        if site is not None:
            where += " AND site = ?"
            params.append(site)
        with self._write() as conn:
            ids = [r[0] for r in conn.execute(
                f"SELECT event_id FROM metrc_reports WHERE {where}", params)]  # noqa: S608
            # A plant call that may have landed was checked by the person retrying it;
            # a sale keeps ``posted``: it is looked up by its number first.
            conn.execute("UPDATE metrc_reports SET state = 'pending', next_at = ?, "  # noqa: S608
                         "posted = CASE WHEN kind = 'sale' THEN posted ELSE 0 END, "
                         "failed_since = NULL, lease_owner = NULL, lease_until = 0 "
                         f"WHERE {where}", (now, *params))
        return ids

    # -- reading ---------------------------------------------------------------

    def reports(self, site: str | None = None, day: str | None = None,
                since_day: str | None = None) -> list[Report]:
        where, params = ["1"], []
        if since_day is not None:
            where.append("local_day >= ?")
            params.append(since_day)
        if site is not None:
            where.append("site = ?")
            params.append(site)
        if day is not None:
            where.append("local_day = ?")
            params.append(day)
        rows = self._read(f"SELECT {_COLUMNS} FROM metrc_reports "  # noqa: S608
                          f"WHERE {' AND '.join(where)} ORDER BY site, kind, seq", params)
        return [_report(r) for r in rows]

    def counts(self, now: float) -> dict[str, dict[str, int]]:
        """Per site: rows by state, and ``overdue`` (not reported, deadline passed)."""
        out: dict[str, dict[str, int]] = {}
        for site, state, late, n in self._read(
                "SELECT site, state, state IN ('pending', 'failed') AND deadline < ?, COUNT(*) "
                "FROM metrc_reports GROUP BY 1, 2, 3", (now,)):
            row = out.setdefault(site, dict.fromkeys(
                ("pending", "reported", "failed", "skipped", "overdue"), 0))
            row[state] = row.get(state, 0) + n
            if late:
                row["overdue"] += n
        return out

    def still_needs(self, kinds: Sequence[str]) -> dict[tuple[str, str], int]:
        """Per (site, kind): the lowest seq not yet settled with Metrc (retention keeps
        it and everything above): pending or failed rows, and events not taken in yet."""
        marks = ",".join("?" for _ in kinds)
        found = self._read("SELECT value FROM metrc_cursor WHERE name = 'events'")
        cursor = found[0][0] if found else 0
        rows = self._read(
            "SELECT site, kind, MIN(seq) FROM metrc_reports "  # noqa: S608 - marks is fixed
            f"WHERE state IN ('pending', 'failed') AND kind IN ({marks}) GROUP BY site, kind",
            list(kinds))
        rows += self._read(
            "SELECT site, kind, MIN(seq) FROM events "  # noqa: S608 - marks is fixed text
            f"WHERE rowid > ? AND kind IN ({marks}) GROUP BY site, kind", [cursor, *kinds])
        out: dict[tuple[str, str], int] = {}
        for site, kind, seq in rows:
            out[(site, kind)] = min(seq, out.get((site, kind), seq))
        return out

    def get(self, event_ids: Sequence[str]) -> list[Report]:
        if not event_ids:
            return []
        marks = ",".join("?" for _ in event_ids)
        rows = self._read(f"SELECT {_COLUMNS} FROM metrc_reports "  # noqa: S608
                          f"WHERE event_id IN ({marks})", list(event_ids))
        return [_report(r) for r in rows]

    # -- the catalog -----------------------------------------------------------

    def catalog(self, site: str) -> set[str]:
        return {r[0] for r in self._read("SELECT tag FROM metrc_catalog WHERE site = ?",
                                         (site,))}

    def catalog_apply(self, site: str, added: Sequence[str], removed: Sequence[str],
                      replace: bool = False) -> None:
        with self._write() as conn:
            if replace:
                conn.execute("DELETE FROM metrc_catalog WHERE site = ?", (site,))
            conn.executemany("INSERT INTO metrc_catalog (site, tag) VALUES (?, ?) "
                             "ON CONFLICT DO NOTHING", [(site, t) for t in added])
            conn.executemany("DELETE FROM metrc_catalog WHERE site = ? AND tag = ?",
                             [(site, t) for t in removed])

    def claim_sync(self, owner: str, site: str, now: float, interval_s: float,
                   lease_s: float) -> bool:
        """Take the site's catalog sync if it is due and nobody holds it."""
        with self._write() as conn:
            conn.execute("INSERT INTO metrc_sync (site) VALUES (?) ON CONFLICT DO NOTHING",
                         (site,))
            cur = conn.execute(
                "UPDATE metrc_sync SET lease_owner = ?, lease_until = ? WHERE site = ? "
                "AND lease_until <= ? AND (synced_at IS NULL OR synced_at <= ?)",
                (owner, now + lease_s, site, now, now - interval_s))
            return bool(cur.rowcount)

    def synced(self, owner: str, site: str, now: float, packages: int | None,
               error: str | None) -> None:
        with self._write() as conn:
            conn.execute("UPDATE metrc_sync SET synced_at = ?, packages = COALESCE(?, packages),"
                         " error = ?, lease_owner = NULL, lease_until = 0 "
                         "WHERE site = ? AND lease_owner = ?",
                         (now, packages, error, site, owner))

    def sync_states(self) -> dict[str, dict[str, Any]]:
        rows = self._read("SELECT site, synced_at, packages, error FROM metrc_sync")
        return {s: {"synced_at": at, "packages": n, "error": e} for s, at, n, e in rows}


def _report(row: Sequence[Any]) -> Report:
    values = list(row)
    values[10] = bool(values[10])   # posted
    return Report(*values)


