"""The fleet's state in the HQ store's database (:class:`hq.fleet.FleetStore`).

Two tables beside the events (on PostgreSQL made by the store's migrations,
hq/pg_migrations; text timestamps in iso_ms that sort as time):

- ``sites_state``: one row per site, the latest status and health;
- ``device_faults``: printer faults per (site, device, hour), the growth of the
  device's fault count between two health snapshots (an agent restart resets
  the count: the new count is then all new).

Each receiver writes every status it gets (all receivers get all of them);
:func:`hq.fleet.apply` makes that order-independent. The tables are
created on open (additive: an older HQ ignores them).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

from hq.fleet import (
    HealthMessage,
    SiteState,
    StatusMessage,
    apply,
    health_from_json,
    health_to_json,
)
from hq.store import StoreError, open_side_tables, redact_url, sqlite_path

FLEET_SCHEMA = """
CREATE TABLE IF NOT EXISTS sites_state (
    site TEXT PRIMARY KEY,
    online INTEGER,            -- 1 online, 0 offline, NULL no status heard
    status_ts TEXT,            -- the agent's ts of the stored status
    status_at TEXT,            -- when HQ got it
    last_seen TEXT,
    version TEXT,
    health_at TEXT,
    health TEXT                -- the kept parts of the last P/health, JSON
);
CREATE TABLE IF NOT EXISTS device_faults (
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    hour TEXT NOT NULL,        -- UTC, 'YYYY-MM-DDTHH:00Z'
    faults INTEGER NOT NULL,
    PRIMARY KEY (site, device, hour)
);
"""


def hour_of(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:00Z")


def fault_growth(before: HealthMessage | None, after: HealthMessage) -> dict[str, int]:
    """Faults per device that happened between two snapshots (pure)."""
    old = {d.id: d.faults for d in before.devices} if before else {}
    out = {}
    for device in after.devices:
        prev = old.get(device.id)
        # New to us, or the agent restarted (the count went down): all of it is new.
        grown = device.faults if prev is None or device.faults < prev else device.faults - prev
        if grown > 0:
            out[device.id] = grown
    return out


class SqliteFleetStore:
    """The fleet tables in the HQ store's SQLite file (its own connection)."""

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        self._lock = threading.Lock()
        self._conn = open_side_tables(self.path, FLEET_SCHEMA, "the fleet tables")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _row(self, site: str) -> SiteState | None:
        row = self._conn.execute(
            "SELECT site, online, status_ts, status_at, last_seen, version, health_at, health "
            "FROM sites_state WHERE site = ?", (site,)).fetchone()
        return None if row is None else _state(row)

    def record(self, messages: Sequence[StatusMessage | HealthMessage], now: float) -> None:
        if not messages:
            return
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                states: dict[str, SiteState | None] = {}
                faults: dict[tuple[str, str], int] = {}
                for message in messages:
                    if message.site not in states:
                        states[message.site] = self._row(message.site)
                    before = states[message.site]
                    if isinstance(message, HealthMessage):
                        for device, n in fault_growth(before.health if before else None,
                                                      message).items():
                            key = (message.site, device)
                            faults[key] = faults.get(key, 0) + n
                    states[message.site] = apply(before, message, now)
                for state in states.values():
                    assert state is not None
                    self._conn.execute(
                        "INSERT INTO sites_state (site, online, status_ts, status_at, "
                        "last_seen, version, health_at, health) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT (site) DO UPDATE SET online = excluded.online, "
                        "status_ts = excluded.status_ts, status_at = excluded.status_at, "
                        "last_seen = excluded.last_seen, version = excluded.version, "
                        "health_at = excluded.health_at, health = excluded.health",
                        (state.site, None if state.online is None else int(state.online),
                         state.status_ts, state.status_at, state.last_seen, state.version,
                         state.health_at,
                         None if state.health is None else health_to_json(state.health)))
                hour = hour_of(now)
                for (site, device), n in faults.items():
                    self._conn.execute(
                        "INSERT INTO device_faults (site, device, hour, faults) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (site, device, hour) "
                        "DO UPDATE SET faults = device_faults.faults + excluded.faults",
                        (site, device, hour, n))
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    with suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise StoreError(self.path, f"fleet write failed: {exc}") from None

    def states(self) -> dict[str, SiteState]:
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT site, online, status_ts, status_at, last_seen, version, health_at, "
                    "health FROM sites_state ORDER BY site").fetchall()
            except sqlite3.Error as exc:
                raise StoreError(self.path, f"fleet read failed: {exc}") from None
        return {row[0]: _state(row) for row in rows}

    def faults(self, site: str, since: float) -> list[dict[str, Any]]:
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT device, hour, faults FROM device_faults WHERE site = ? AND hour >= ?"
                    " ORDER BY device, hour", (site, hour_of(since))).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(self.path, f"fleet read failed: {exc}") from None
        return [{"device": d, "hour": h, "faults": n} for d, h, n in rows]

    def delete_faults_before(self, cutoff: float) -> int:
        """Retention: fault counts of hours before ``cutoff``."""
        with self._lock:
            cur = self._conn.execute("DELETE FROM device_faults WHERE hour < ?",
                                     (hour_of(cutoff),))
            return int(cur.rowcount)


def _state(row: Sequence[Any]) -> SiteState:
    site, online, status_ts, status_at, last_seen, version, health_at, health = row
    parsed = None
    if health:
        with suppress(ValueError, KeyError, TypeError):
            parsed = health_from_json(site, health)
    return SiteState(site, None if online is None else bool(online), status_ts, status_at,
                     last_seen, version, health_at, parsed)


def _pg_text(value: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL (a hostile site's version string could)."""
    return None if value is None else value.replace("\x00", "\ufffd")


class PgFleetStore:
    """The fleet tables in the PostgreSQL store (made by its migrations), on its pool.

    Each site's row is locked (``FOR UPDATE``, sites in sorted order) for the
    read-apply-write, so receivers writing the same site's status at once
    serialise as SQLite's ``BEGIN IMMEDIATE`` makes them.
    """

    def __init__(self, url: str) -> None:
        from hq.pgstore import shared_pool

        self.url = url
        self.location = redact_url(url)
        self.pool = shared_pool(url)
        self._closed = False

    def close(self) -> None:
        from hq.pgstore import release_pool

        if not self._closed:
            self._closed = True
            release_pool(self.url)

    def record(self, messages: Sequence[StatusMessage | HealthMessage], now: float) -> None:
        import psycopg
        from psycopg_pool import PoolTimeout

        if not messages:
            return
        sites = sorted({m.site for m in messages})
        try:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute("INSERT INTO sites_state (site) SELECT unnest(%s::text[]) AS s "
                             "ORDER BY s ON CONFLICT DO NOTHING", (sites,))
                found = conn.execute(
                    "SELECT site, online, status_ts, status_at, last_seen, version, health_at,"
                    " health FROM sites_state WHERE site = ANY(%s) ORDER BY site FOR UPDATE",
                    (sites,)).fetchall()
                states: dict[str, SiteState | None] = {r[0]: _state(r) for r in found}
                faults: dict[tuple[str, str], int] = {}
                for message in messages:
                    before = states.get(message.site)
                    if isinstance(message, HealthMessage):
                        for device, n in fault_growth(before.health if before else None,
                                                      message).items():
                            key = (message.site, device)
                            faults[key] = faults.get(key, 0) + n
                    states[message.site] = apply(before, message, now)
                done = [s for s in states.values() if s is not None]
                conn.cursor().executemany(
                    "UPDATE sites_state SET online = %s, status_ts = %s, status_at = %s, "
                    "last_seen = %s, version = %s, health_at = %s, health = %s WHERE site = %s",
                    [(s.online, s.status_ts, s.status_at, s.last_seen, _pg_text(s.version),
                      s.health_at, None if s.health is None else health_to_json(s.health),
                      s.site) for s in done])
                if faults:
                    hour = hour_of(now)
                    keys = sorted(faults)
                    conn.execute(
                        "INSERT INTO device_faults (site, device, hour, faults) SELECT s, d, %s, n"
                        " FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS x(s, d, n)"
                        " ON CONFLICT (site, device, hour)"
                        " DO UPDATE SET faults = device_faults.faults + excluded.faults",
                        (hour, [k[0] for k in keys], [_pg_text(k[1]) for k in keys],
                         [faults[k] for k in keys]))
        except PoolTimeout:
            raise StoreError(self.location, "fleet write failed: no database connection") \
                from None
        except psycopg.Error as exc:
            raise StoreError(self.location, f"fleet write failed: {_one_line(exc)}") from None

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self.pool.connection() as conn:
                return conn.execute(sql, params).fetchall()
        except PoolTimeout:
            raise StoreError(self.location, "fleet read failed: no database connection") \
                from None
        except psycopg.Error as exc:
            raise StoreError(self.location, f"fleet read failed: {_one_line(exc)}") from None

    def states(self) -> dict[str, SiteState]:
        rows = self._read("SELECT site, online, status_ts, status_at, last_seen, version, "
                          "health_at, health FROM sites_state ORDER BY site")
        return {row[0]: _state(row) for row in rows}

    def faults(self, site: str, since: float) -> list[dict[str, Any]]:
        rows = self._read("SELECT device, hour, faults FROM device_faults WHERE site = %s "
                          "AND hour >= %s ORDER BY device, hour", (site, hour_of(since)))
        return [{"device": d, "hour": h, "faults": int(n)} for d, h, n in rows]


def _one_line(exc: BaseException) -> str:
    return redact_url(" ".join(str(exc).split()))[:300] or type(exc).__name__


def open_fleet_store(url: str) -> SqliteFleetStore | PgFleetStore:
    """The fleet store beside ``[hq] store``, in the same database."""
    if url.startswith("sqlite:///"):
        return SqliteFleetStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        return PgFleetStore(url)
    raise StoreError(redact_url(url), "unknown store URL; use sqlite:///PATH or "
                                   "postgresql://user@host/db")
