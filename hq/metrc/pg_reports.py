"""The ``metrc_*`` tables on the PostgreSQL HQ store (``[hq] store = "postgresql://..."``).

The same :class:`hq.metrc.reports.ReportStore` as the SQLite one, with what
PostgreSQL does differently (tables made by migration 0003, hq/pg_migrations):

- **Claims** take rows with ``SELECT ... FOR UPDATE SKIP LOCKED``: forwarders on
  any number of hosts claim at once without waiting on each other, and no row is
  in two claims. Every later write of a batch names its ``lease_owner``, as on SQLite.
- **Leases are in the database server's clock**: ``lease_until`` is set and
  compared against ``now()`` on the server, never a forwarder's clock, so a host
  whose clock runs fast cannot take over a batch whose lease is still running
  elsewhere. (``next_at``, a retry's backoff, stays in the forwarder's clock: a
  skew only delays or hastens a retry.) :meth:`renew` extends a lease by the
  length :meth:`claim` was given.
- **Intake** takes events whose ``metrc_taken`` is false (a partial index: the
  cost is the new rows), ``FOR UPDATE SKIP LOCKED``, and sets the flag in the same
  transaction; a sequence would not be committed in order, so a rowid-like cursor
  could miss a row another receiver commits late.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from hq.metrc.reports import _COLUMNS, INTAKE_LIMIT, Claim, Describe, Report, _report
from hq.pgstore import _message, release_pool, shared_pool
from hq.store import StoreError, redact_url

SERVER_NOW = "extract(epoch FROM now())"   # the server's clock, epoch seconds


class PgReportStore:
    """The Metrc tables on the HQ store's PostgreSQL, on the process's shared pool."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.location = redact_url(url)
        self.pool = shared_pool(url)
        self._closed = False
        self._lease_s: float | None = None   # what claim() was given, for renew()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            release_pool(self.url)

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self.pool.connection() as conn, conn.transaction():
                yield conn
        except psycopg.Error as exc:
            raise StoreError(self.location, f"metrc write failed: {_message(exc)}") from None
        except PoolTimeout:
            raise StoreError(self.location, "metrc write failed: no database connection "
                                            "(server down or the pool exhausted)") from None

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            with self.pool.connection() as conn:
                return conn.execute(sql, params).fetchall()
        except psycopg.Error as exc:
            raise StoreError(self.location, f"metrc read failed: {_message(exc)}") from None
        except PoolTimeout:
            raise StoreError(self.location, "metrc read failed: no database connection "
                                            "(server down or the pool exhausted)") from None

    def server_time(self) -> float:
        """The database server's clock (what leases are measured in)."""
        return float(self._read(f"SELECT {SERVER_NOW}")[0][0])

    # -- intake --------------------------------------------------------------

    def intake(self, kinds: Sequence[str], describe: Describe, now: float) -> int:
        """Take new events of ``kinds`` from ``events`` into ``metrc_reports``."""
        kinds = list(kinds)
        if not self._read("SELECT 1 FROM events WHERE NOT metrc_taken AND kind = ANY(%s)"
                          " LIMIT 1", (kinds,)):
            return 0   # nothing new: no transaction, no locks
        with self._write() as conn:
            rows = conn.execute(
                "SELECT site, kind, epoch, seq, id, ts, payload, received_at FROM events"
                " WHERE NOT metrc_taken AND kind = ANY(%s) ORDER BY received_at, seq"
                " LIMIT %s FOR UPDATE SKIP LOCKED", (kinds, INTAKE_LIMIT)).fetchall()
            if not rows:
                return 0
            values = []
            for site, kind, _epoch, seq, event_id, ts, payload, received_at in rows:
                facts = describe(site, kind, payload, ts)
                state = "skipped" if facts.skip else "failed" if facts.error else "pending"
                values.append((event_id, site, kind, seq, facts.number, facts.local_day,
                               facts.happened_at, facts.deadline, state, now, facts.error,
                               now if facts.error else None, received_at))
            cols = list(zip(*values, strict=True))
            taken = len(conn.execute(
                "INSERT INTO metrc_reports (event_id, site, kind, seq, number, local_day,"
                " happened_at, deadline, state, next_at, error, failed_since, received_at)"
                " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[],"
                " %s::text[], %s::text[], %s::float8[], %s::float8[], %s::text[],"
                " %s::float8[], %s::text[], %s::float8[], %s::text[])"
                " ON CONFLICT (event_id) DO NOTHING RETURNING 1",
                [list(c) for c in cols]).fetchall())
            conn.execute(
                "UPDATE events e SET metrc_taken = true FROM unnest(%s::text[], %s::text[],"
                " %s::text[], %s::bigint[], %s::text[]) AS x(s, k, ep, q, i)"
                " WHERE e.site = x.s AND e.kind = x.k AND e.epoch = x.ep AND e.seq = x.q"
                " AND e.id = x.i",
                [[r[n] for r in rows] for n in range(5)])
        return taken

    # -- claiming and settling -----------------------------------------------

    def claim(self, owner: str, now: float, lease_s: float, batch: int) -> Claim | None:
        """Lease the next due work (up to ``batch`` sales of one site, or one plant event)
        for ``lease_s`` seconds of the server's clock; rows others hold are skipped."""
        self._lease_s = lease_s
        with self._write() as conn:
            first = conn.execute(
                "SELECT site, kind, event_id FROM metrc_reports WHERE state = 'pending'"  # noqa: S608
                f" AND next_at <= %s AND lease_until <= {SERVER_NOW}"
                " ORDER BY next_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED", (now,)).fetchone()
            if first is None:
                return None
            site, kind, event_id = first
            if kind == "sale":
                ids = [r[0] for r in conn.execute(
                    "SELECT event_id FROM metrc_reports WHERE site = %s AND kind = 'sale'"  # noqa: S608
                    f" AND state = 'pending' AND next_at <= %s AND lease_until <= {SERVER_NOW}"
                    " ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED",
                    (site, now, batch)).fetchall()]
            else:
                ids = [event_id]
            rows = conn.execute(
                f"UPDATE metrc_reports SET lease_owner = %s, lease_until = {SERVER_NOW} + %s,"  # noqa: S608
                f" attempts = attempts + 1 WHERE event_id = ANY(%s) RETURNING {_COLUMNS}",
                (owner, lease_s, ids)).fetchall()
            reports = sorted((_report(r) for r in rows), key=lambda r: r.seq)
            payloads = {i: p for i, p in conn.execute(
                "SELECT e.id, e.payload FROM events e JOIN unnest(%s::text[], %s::text[],"
                " %s::bigint[], %s::text[]) AS x(s, k, q, i) ON e.site = x.s AND e.kind = x.k"
                " AND e.seq = x.q AND e.id = x.i",
                ([r.site for r in reports], [r.kind for r in reports],
                 [r.seq for r in reports], [r.event_id for r in reports])).fetchall()}
        return Claim(site, kind, reports, payloads)

    def _owned(self, sql: str, owner: str, ids: Sequence[str], params: Sequence[Any]) -> None:
        with self._write() as conn:
            conn.execute(f"{sql} WHERE lease_owner = %s AND event_id = ANY(%s)",
                         (*params, owner, list(ids)))

    def renew(self, owner: str, ids: Sequence[str], until: float) -> None:
        """Extend the leases by the claim's length, on the server's clock (``until`` is
        the forwarder's idea of the end; only used before any claim of this object)."""
        if ids:
            length = self._lease_s if self._lease_s is not None else until - time.time()
            self._owned(f"UPDATE metrc_reports SET lease_until = {SERVER_NOW} + %s",  # noqa: S608
                        owner, ids, (length,))

    def set_posted(self, owner: str, ids: Sequence[str], posted: bool = True) -> None:
        if ids:
            self._owned("UPDATE metrc_reports SET posted = %s", owner, ids, (int(posted),))

    def reported(self, owner: str, done: dict[str, str | None], now: float) -> None:
        if not done:
            return
        with self._write() as conn:
            conn.execute(
                "UPDATE metrc_reports m SET state = 'reported', posted = 0, metrc_id = x.mid,"
                " reported_at = %s, error = NULL, lease_owner = NULL, lease_until = 0"
                " FROM unnest(%s::text[], %s::text[]) AS x(eid, mid)"
                " WHERE m.event_id = x.eid AND m.lease_owner = %s",
                (now, list(done), list(done.values()), owner))

    def release(self, owner: str, ids: Sequence[str], next_at: float, error: str | None,
                posted: bool | None = None) -> None:
        if not ids:
            return
        if posted is None:
            self._owned("UPDATE metrc_reports SET next_at = %s, error = %s, "
                        "lease_owner = NULL, lease_until = 0", owner, ids, (next_at, error))
        else:
            self._owned("UPDATE metrc_reports SET next_at = %s, error = %s, posted = %s, "
                        "lease_owner = NULL, lease_until = 0", owner, ids,
                        (next_at, error, int(posted)))

    def failed(self, owner: str, ids: Sequence[str], error: str, now: float) -> None:
        if ids:
            self._owned("UPDATE metrc_reports SET state = 'failed', error = %s, "
                        "failed_since = COALESCE(failed_since, %s), "
                        "lease_owner = NULL, lease_until = 0", owner, ids, (error, now))

    def requeue(self, now: float, *, event_id: str | None = None,
                site: str | None = None) -> list[str]:
        where, params = "state = 'failed'", []
        if event_id is not None:
            where += " AND event_id = %s"
            params.append(event_id)
        if site is not None:
            where += " AND site = %s"
            params.append(site)
        with self._write() as conn:
            rows = conn.execute(
                "UPDATE metrc_reports SET state = 'pending', next_at = %s, "  # noqa: S608
                "posted = CASE WHEN kind = 'sale' THEN posted ELSE 0 END, "
                "failed_since = NULL, lease_owner = NULL, lease_until = 0 "
                f"WHERE {where} RETURNING event_id", (now, *params)).fetchall()
        return [r[0] for r in rows]

    # -- reading ---------------------------------------------------------------

    def reports(self, site: str | None = None, day: str | None = None,
                since_day: str | None = None) -> list[Report]:
        where, params = ["TRUE"], []
        for column, op, value in (("local_day", ">=", since_day), ("site", "=", site),
                                  ("local_day", "=", day)):
            if value is not None:
                where.append(f"{column} {op} %s")
                params.append(value)
        rows = self._read(f"SELECT {_COLUMNS} FROM metrc_reports "  # noqa: S608
                          f"WHERE {' AND '.join(where)} ORDER BY site, kind, seq", params)
        return [_report(r) for r in rows]

    def counts(self, now: float) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for site, state, late, n in self._read(
                "SELECT site, state, state IN ('pending', 'failed') AND deadline < %s,"
                " COUNT(*) FROM metrc_reports GROUP BY 1, 2, 3", (now,)):
            row = out.setdefault(site, dict.fromkeys(
                ("pending", "reported", "failed", "skipped", "overdue"), 0))
            row[state] = row.get(state, 0) + int(n)
            if late:
                row["overdue"] += int(n)
        return out

    def still_needs(self, kinds: Sequence[str]) -> dict[tuple[str, str], int]:
        """Per (site, kind): the lowest seq not settled with Metrc (pending, failed, or
        not taken in yet)."""
        rows = self._read(
            "SELECT site, kind, MIN(seq) FROM metrc_reports WHERE state IN ('pending',"
            " 'failed') AND kind = ANY(%s) GROUP BY site, kind UNION ALL"
            " SELECT site, kind, MIN(seq) FROM events WHERE NOT metrc_taken AND kind = ANY(%s)"
            " GROUP BY site, kind", (list(kinds), list(kinds)))
        out: dict[tuple[str, str], int] = {}
        for site, kind, seq in rows:
            out[(site, kind)] = min(int(seq), out.get((site, kind), int(seq)))
        return out

    def get(self, event_ids: Sequence[str]) -> list[Report]:
        if not event_ids:
            return []
        rows = self._read(f"SELECT {_COLUMNS} FROM metrc_reports "  # noqa: S608
                          "WHERE event_id = ANY(%s)", (list(event_ids),))
        return [_report(r) for r in rows]

    # -- the catalog -----------------------------------------------------------

    def catalog(self, site: str) -> set[str]:
        return {r[0] for r in self._read("SELECT tag FROM metrc_catalog WHERE site = %s",
                                         (site,))}

    def catalog_apply(self, site: str, added: Sequence[str], removed: Sequence[str],
                      replace: bool = False) -> None:
        with self._write() as conn:
            if replace:
                conn.execute("DELETE FROM metrc_catalog WHERE site = %s", (site,))
            conn.execute("INSERT INTO metrc_catalog (site, tag) SELECT %s, t FROM"
                         " unnest(%s::text[]) AS t ON CONFLICT DO NOTHING", (site, list(added)))
            conn.execute("DELETE FROM metrc_catalog WHERE site = %s AND tag = ANY(%s)",
                         (site, list(removed)))

    def claim_sync(self, owner: str, site: str, now: float, interval_s: float,
                   lease_s: float) -> bool:
        """Take the site's catalog sync if it is due and nobody holds it (the lease on
        the server's clock)."""
        with self._write() as conn:
            conn.execute("INSERT INTO metrc_sync (site) VALUES (%s) ON CONFLICT DO NOTHING",
                         (site,))
            cur = conn.execute(
                f"UPDATE metrc_sync SET lease_owner = %s, lease_until = {SERVER_NOW} + %s"  # noqa: S608
                f" WHERE site = %s AND lease_until <= {SERVER_NOW}"
                " AND (synced_at IS NULL OR synced_at <= %s)",
                (owner, lease_s, site, now - interval_s))
            return bool(cur.rowcount)

    def synced(self, owner: str, site: str, now: float, packages: int | None,
               error: str | None) -> None:
        with self._write() as conn:
            conn.execute("UPDATE metrc_sync SET synced_at = %s, packages = COALESCE(%s,"
                         " packages), error = %s, lease_owner = NULL, lease_until = 0"
                         " WHERE site = %s AND lease_owner = %s",
                         (now, packages, error, site, owner))

    def sync_states(self) -> dict[str, dict[str, Any]]:
        rows = self._read("SELECT site, synced_at, packages, error FROM metrc_sync")
        return {s: {"synced_at": at, "packages": n, "error": e} for s, at, n, e in rows}
