"""Opt-in retention: ``[hq] retention_days`` deletes stored events older than that.

Default 0 keeps everything. What is never deleted, whatever its age:

- an event above its pair's ack watermark: the watermark has to cover it once
  the gap below it fills, or the site's acks would stop (and the site would
  resend it forever); deletion is only ever of a *prefix* of a (site, kind)
  at or below the watermark, so the report shows no invented gaps, only a
  later ``first_seq``;
- an event a downstream sink still needs: each registered
  :class:`RetentionSink` (the Metrc forwarder, say) names, per (site, kind),
  the lowest seq it has not finished with; everything from there on stays.
  Without sinks only age counts.

Watermarks are per (site, kind, epoch) (hq/store.py), and so is the
deletion: a row goes only at or below the watermark of the epoch it is filed
under. The watermarks (``marks``), the lost/skipped ranges, the conflicts and
the rejects are never touched:
they are what a site's acks depend on. Fault counts per hour older than the
cutoff go too.

The SQL is plain and the same on both backends: on SQLite it runs on a
connection of its own, on PostgreSQL on the store's pool; either way the
receiver's writes are only held up for one short transaction per
DELETE_CHUNK rows of a (site, kind).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

from agent.envelope import iso_ms
from hq.backends import open_report_store
from hq.config import HqReceiverConfig
from hq.fleet_store import hour_of
from hq.store import BUSY_TIMEOUT_S, Pair, StoreError, redact_url, sqlite_path

log = logging.getLogger(__name__)

RUN_EVERY_S = 3600.0
DELETE_CHUNK = 10_000     # rows per transaction, so a first run on a big store never stalls ingest


class RetentionSink(Protocol):
    """A consumer of stored events that must see them before they may be deleted."""

    name: str

    def still_needs(self) -> Mapping[Pair, int]:
        """(site, kind) -> the lowest seq not yet finished with; an absent pair needs nothing."""
        ...


@dataclass(frozen=True)
class RetentionResult:
    deleted: int
    kept_for_sinks: int           # pairs where a sink held events back
    cutoff: str


class _Retention:
    """The policy (which prefix of each pair may go); the backends below run the SQL."""

    sinks: list[RetentionSink]

    def close(self) -> None:
        raise NotImplementedError

    def run(self, days: float, now: float | None = None) -> RetentionResult:
        """Delete what is older than ``days`` and allowed to go (see the module doc)."""
        now = time.time() if now is None else now
        cutoff = iso_ms(now - days * 86400)
        needs: dict[Pair, int] = {}
        for sink in self.sinks:
            for pair, seq in sink.still_needs().items():
                needs[pair] = min(seq, needs.get(pair, seq))
        deleted = held = 0
        # Per stream (site, kind, epoch): a row goes only at or below the watermark of
        # the epoch it is filed under.
        for site, kind, epoch, upto, young in self._limits(cutoff):
            limit = upto if young is None else min(upto, young - 1)
            needed = needs.get((site, kind))
            if needed is not None and needed - 1 < limit:
                limit = needed - 1
                held += 1
            deleted += self._delete_upto(site, kind, epoch, limit)
        self._delete_faults(hour_of(now - days * 86400))
        return RetentionResult(deleted, held, cutoff)

    def _limits(self, cutoff: str) -> list[tuple[str, str, str, int, int | None]]:
        """Per stream: its watermark and the pair's lowest seq with ``ts >= cutoff``
        (or None)."""
        raise NotImplementedError

    def _delete_upto(self, site: str, kind: str, epoch: str, limit: int) -> int:
        """Delete the stream's events with every seq they cover at or below ``limit``,
        DELETE_CHUNK rows per transaction."""
        raise NotImplementedError

    def _delete_faults(self, hour: str) -> None:
        raise NotImplementedError


_LIMITS_SQL = ("SELECT site, kind, epoch, upto, (SELECT MIN(seq) FROM events e"
               " WHERE e.site = m.site AND e.kind = m.kind AND e.ts >= {p})"
               " FROM marks m WHERE upto > 0")
_DELETE_SQL = ("DELETE FROM events WHERE site = {p} AND kind = {p} AND epoch = {p} AND"
               " (seq, id) IN (SELECT seq, id FROM events WHERE site = {p} AND kind = {p}"
               " AND epoch = {p} AND COALESCE(seq_end, seq) <= {p} ORDER BY seq LIMIT {p})")


class SqliteRetention(_Retention):
    """Retention on the SQLite HQ store."""

    def __init__(self, url: str, sinks: Sequence[RetentionSink] = ()) -> None:
        self.path = sqlite_path(url)
        self.sinks = list(sinks)
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None,
                                         check_same_thread=False, timeout=BUSY_TIMEOUT_S)
            self._conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise StoreError(self.path, f"cannot open for retention: {exc}") from None

    def close(self) -> None:
        self._conn.close()

    def run(self, days: float, now: float | None = None) -> RetentionResult:
        try:
            return super().run(days, now)
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                with suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            raise StoreError(self.path, f"retention failed: {exc}") from None

    def _limits(self, cutoff: str) -> list[tuple[str, str, str, int, int | None]]:
        return self._conn.execute(_LIMITS_SQL.format(p="?"), (cutoff,)).fetchall()

    def _delete_upto(self, site: str, kind: str, epoch: str, limit: int) -> int:
        total = 0
        while True:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(_DELETE_SQL.format(p="?"),
                                         (site, kind, epoch, site, kind, epoch, limit,
                                          DELETE_CHUNK))
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    with suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise
            total += cur.rowcount
            if cur.rowcount < DELETE_CHUNK:
                return total

    def _delete_faults(self, hour: str) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        with suppress(sqlite3.OperationalError):  # no fleet tables in this store yet
            self._conn.execute("DELETE FROM device_faults WHERE hour < ?", (hour,))
        self._conn.execute("COMMIT")


class PgRetention(_Retention):
    """Retention on the PostgreSQL HQ store, on the process's pool."""

    def __init__(self, url: str, sinks: Sequence[RetentionSink] = ()) -> None:
        from hq.pgstore import shared_pool

        self.url = url
        self.location = redact_url(url)
        self.sinks = list(sinks)
        self.pool = shared_pool(url)
        self._closed = False

    def close(self) -> None:
        from hq.pgstore import release_pool

        if not self._closed:
            self._closed = True
            release_pool(self.url)

    def run(self, days: float, now: float | None = None) -> RetentionResult:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            return super().run(days, now)
        except (psycopg.Error, PoolTimeout) as exc:
            text = redact_url(" ".join(str(exc).split()))[:300]
            raise StoreError(self.location, f"retention failed: {text}") from None

    def _limits(self, cutoff: str) -> list[tuple[str, str, str, int, int | None]]:
        with self.pool.connection() as conn:
            return [(s, k, e, int(u), None if y is None else int(y)) for s, k, e, u, y in
                    conn.execute(_LIMITS_SQL.format(p="%s"), (cutoff,)).fetchall()]

    def _delete_upto(self, site: str, kind: str, epoch: str, limit: int) -> int:
        total = 0
        while True:
            with self.pool.connection() as conn, conn.transaction():
                cur = conn.execute(_DELETE_SQL.format(p="%s"),
                                   (site, kind, epoch, site, kind, epoch, limit, DELETE_CHUNK))
            total += cur.rowcount
            if cur.rowcount < DELETE_CHUNK:
                return total

    def _delete_faults(self, hour: str) -> None:
        with self.pool.connection() as conn:
            conn.execute("DELETE FROM device_faults WHERE hour < %s", (hour,))


def open_retention(url: str, sinks: Sequence[RetentionSink] = ()) -> _Retention:
    """Retention for the store named by ``[hq] store``."""
    if url.startswith(("postgresql://", "postgres://")):
        return PgRetention(url, sinks)
    return SqliteRetention(url, sinks)


def retention_sinks(cfg: HqReceiverConfig) -> list[RetentionSink]:
    """The sinks of this HQ that retention must wait for.

    The Metrc forwarder (CONTRACT 9) when it is enabled in ``cfg``: what Metrc
    does not have yet stays.
    """
    if cfg.metrc.enabled:
        return [MetrcRetentionSink(cfg.hq.store, cfg.metrc.kinds)]
    return []


class RetentionRunner:
    """Runs retention every RUN_EVERY_S in a thread of ``edge-agent hq``."""

    def __init__(self, url: str, days: float, sinks: Sequence[RetentionSink] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.url, self.days, self.sinks, self.clock = url, days, list(sinks), clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hq-retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                retention = open_retention(self.url, self.sinks)
                try:
                    result = retention.run(self.days, self.clock())
                finally:
                    retention.close()
                if result.deleted:
                    log.info("hq retention: deleted %d event(s) stored before %s "
                             "(hq.retention_days = %g)", result.deleted, result.cutoff,
                             self.days)
            except StoreError as exc:
                log.warning("hq retention: %s; trying again in %.0fs", exc, RUN_EVERY_S)
            self._stop.wait(RUN_EVERY_S)


class MetrcRetentionSink:
    """Retention (hq/retention.py) keeps every event Metrc does not have yet."""

    name = "metrc"

    def __init__(self, url: str, kinds: Sequence[str]) -> None:
        self.url = url
        self.kinds = list(kinds)

    def still_needs(self) -> dict[tuple[str, str], int]:
        store = open_report_store(self.url)
        try:
            return store.still_needs(self.kinds)
        finally:
            store.close()
