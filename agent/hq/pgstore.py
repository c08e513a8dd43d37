"""HQ's PostgreSQL store (``[hq] store = "postgresql://..."``), for a fleet.

The same semantics as :class:`agent.hq.store.SqliteStore`, whose module
docstring is the specification: every event once per (site, kind, seq), the
watermark over contiguous coverage (stored rows, aggregates' ``seq..seq_end``,
declared ``lost`` ranges), a ``floor`` raising it and recording ``skipped``
ranges, and the same report. The store tests run against both backends.

How it differs inside:

- **A pool** (psycopg_pool, ``POOL_MAX`` connections), one per process and URL,
  shared by every store object of that process (the receiver, the HQ page, the
  fleet tables, retention). Connections are autocommit; a write opens its own
  transaction. :attr:`PgStore.pool` is public, for other HQ parts that keep
  their own tables in this database (see :func:`shared_pool`).
- **Batches**: one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING
  RETURNING`` per batch, sent in pipeline mode with the ``lost`` insert and the
  locking of the batch's ``marks`` rows, so a batch costs a few round trips
  whatever its size.
- **Many receivers**: each (site, kind) has a ``marks`` row, locked
  (``SELECT ... FOR UPDATE``, in sorted order, so two batches never deadlock on
  them) after the batch's rows are inserted and before the watermark is
  computed. In READ COMMITTED every statement after the lock sees what the
  previous holder committed, so whichever receiver commits last for a pair
  computes the watermark over every stored row, as SQLite's ``BEGIN
  IMMEDIATE`` gives. The walk over contiguous rows runs in the server
  (``hq_cover`` in the first migration). A deadlock or serialization failure
  (duplicate rows of one batch racing another's) is retried.
- **Migrations**: numbered SQL files in ``agent/hq/pg_migrations``
  (``0001_store.sql``, ...), applied in order, each in its own transaction
  under an advisory lock (receivers starting together apply each once), and
  recorded in ``schema_version``. A database whose version is newer than this
  code knows is refused, as is one that holds tables of these names without
  ``schema_version`` (someone else's).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from agent.envelope import iso_ms
from agent.hq.store import (
    EventRow,
    Pair,
    StoreError,
    _holes,
    _redact,
    _subtract,
    canonical_time,
    event_row,
    parse_time,
)

POOL_MIN = 1
POOL_MAX = 8               # per process: the receiver's writer, the page, retention
CONNECT_TIMEOUT_S = 10     # a server that does not answer: the store says so this soon
POOL_WAIT_S = 10.0         # longest wait for a free pooled connection
WRITE_RETRIES = 5          # deadlocks and serialization failures: retried, then an error
MIGRATION_LOCK = 0x65646765_68710001  # pg_advisory_xact_lock key ("edgehq" 1)
APPLICATION_NAME = "edge-agent-hq"
# Our tables: a database holding one of them without schema_version is not ours.
TABLES = ("events", "marks", "lost", "skipped", "sites_state", "device_faults")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def migrations() -> list[Migration]:
    """The numbered SQL files of ``agent/hq/pg_migrations``, in order (1, 2, ... no holes)."""
    folder = resources.files("agent.hq").joinpath("pg_migrations")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"agent/hq/pg_migrations: numbered 1..N without holes, got "
                           f"{[m.version for m in found]}")
    return found


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The applied version of a store's schema; 0 when it has none."""
    if not _exists(conn, "schema_version"):
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection[Any], location: str, *, create: bool = True) -> int:
    """Bring the schema up to date; the version it is at. ``create=False`` refuses an
    empty database (the report must not make a store where none was)."""
    todo = migrations()
    latest = todo[-1].version
    with conn.transaction():
        # Receivers starting at once: one applies, the others then find it done.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        current = schema_version(conn)
        if current == 0:
            clash = [t for t in TABLES if _exists(conn, t)]
            if clash:
                raise StoreError(location, f"is not an HQ store (it holds table(s) "
                                           f"{', '.join(clash)} but no schema_version); point "
                                           "[hq] store at a database of its own")
            if not create:
                raise StoreError(location, "is empty, not an HQ store (has 'edge-agent hq' "
                                           "run with this config? check [hq] store)")
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
                         "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
    if current > latest:
        raise StoreError(location, f"has schema version {current}, newer than this edge-agent "
                                   f"knows ({latest}): upgrade edge-agent on every HQ host")
    for step in todo[current:]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            if schema_version(conn) >= step.version:
                continue  # another process applied it while we waited
            conn.execute(step.sql.encode())  # no parameters: several statements at once
            conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                         (step.version, step.name))
    return latest


def _exists(conn: psycopg.Connection[Any], table: str) -> bool:
    # pg_tables through the statement's snapshot, not to_regclass(): that reads the
    # catalog cache, which an advisory lock does not refresh, so a table another
    # process created while we waited for the lock could still look absent.
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname"
                       " = current_schema() AND tablename = %s)", (table,)).fetchone()
    return bool(row and row[0])


# -- the pool, one per process and URL ------------------------------------------------

_pools: dict[str, tuple[ConnectionPool, int]] = {}
_pools_lock = threading.Lock()


def connect(url: str) -> psycopg.Connection[Any]:
    """One autocommit connection (migrations, tools); ``StoreError`` naming the server."""
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name=APPLICATION_NAME)
    except psycopg.Error as exc:
        raise StoreError(_redact(url), f"cannot connect: {_message(exc)}") from None


def shared_pool(url: str, *, create: bool = True) -> ConnectionPool:
    """The process's pool for ``url``, migrated; release it with :func:`release_pool`.

    For other HQ parts on this database (the Metrc forwarder's work queue, say):
    ``with pool.connection() as conn, conn.transaction(): conn.execute("SELECT ...
    FOR UPDATE SKIP LOCKED")``. Connections are autocommit outside such a block.
    """
    with _pools_lock:
        held = _pools.get(url)
        if held is not None:
            _pools[url] = (held[0], held[1] + 1)
            return held[0]
        # Check and migrate on a connection of our own first: a wrong URL fails now
        # with the server's message, not after the pool's retries time out.
        with connect(url) as conn:
            try:
                migrate(conn, _redact(url), create=create)
            except psycopg.Error as exc:
                raise StoreError(_redact(url), f"cannot set up the schema: "
                                               f"{_message(exc)}") from None
        pool = ConnectionPool(
            url, min_size=POOL_MIN, max_size=POOL_MAX, open=False, timeout=POOL_WAIT_S,
            name=f"edge-hq-{len(_pools) + 1}", check=ConnectionPool.check_connection,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S,
                    "application_name": APPLICATION_NAME})
        try:
            pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except PoolTimeout:
            pool.close()
            raise StoreError(_redact(url), "cannot open a connection pool (server gone "
                                           "since the first connection?)") from None
        _pools[url] = (pool, 1)
        return pool


def release_pool(url: str) -> None:
    """Give back a :func:`shared_pool`; the last one out closes it."""
    with _pools_lock:
        held = _pools.get(url)
        if held is None:
            return
        if held[1] > 1:
            _pools[url] = (held[0], held[1] - 1)
            return
        del _pools[url]
    held[0].close()


def _message(exc: BaseException) -> str:
    """A psycopg error as one line, without the URL (it may hold a password)."""
    text = " ".join(str(exc).split())
    return _redact(text)[:300] or type(exc).__name__


_RETRY = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)


class PgStore:
    """The PostgreSQL store; thread-safe (pooled), any number of processes per database."""

    def __init__(self, url: str, *, create: bool = True, clock: Any = time.time) -> None:
        self.url = url
        self.location = _redact(url)
        self._clock = clock
        self.counters: dict[str, int] = {"stored": 0, "duplicates": 0, "lost_ranges": 0,
                                         "skipped_ranges": 0, "batches": 0, "retries": 0}
        self.stored_by_kind: dict[str, int] = {}  # for HQ's metrics (agent/hq/metrics.py)
        self.pool = shared_pool(url, create=create)
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            release_pool(self.url)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled autocommit connection; psycopg and pool errors become StoreError."""
        try:
            with self.pool.connection() as conn:
                yield conn
        except PoolTimeout:
            raise StoreError(self.location, f"no database connection within {POOL_WAIT_S}s "
                                            "(server down or the pool exhausted)") from None

    # -- writing ---------------------------------------------------------

    def store_batch(self, envelopes: Sequence[Mapping[str, Any] | EventRow]
                    ) -> dict[Pair, int]:
        """Store a batch in one transaction; the watermark of every touched pair.

        As :meth:`agent.hq.store.SqliteStore.store_batch`: committed (durably:
        ``synchronous_commit`` is the server's, on by default) before it returns,
        ``ValueError`` for a bad envelope (nothing written), :class:`StoreError`
        when the database fails.
        """
        rows = [env if isinstance(env, EventRow) else event_row(env) for env in envelopes]
        if not rows:
            return {}
        now = iso_ms(self._clock())
        # Sorted, so concurrent batches take row locks in one order.
        rows.sort(key=lambda r: (r.site, r.kind, r.seq))
        for attempt in range(WRITE_RETRIES):
            try:
                with self.connection() as conn:
                    result = self._write(conn, rows, now)
                break
            except _RETRY as exc:
                self.counters["retries"] += 1
                if attempt == WRITE_RETRIES - 1:
                    raise StoreError(self.location, f"write failed {WRITE_RETRIES} times, "
                                                    f"nothing stored: {_message(exc)}") from None
            except psycopg.Error as exc:
                raise StoreError(self.location,
                                 f"write failed, nothing stored: {_message(exc)}") from None
        marks, stored, dups, lost, skipped, new_by_kind = result
        self.counters["stored"] += stored
        for kind, n in new_by_kind.items():
            self.stored_by_kind[kind] = self.stored_by_kind.get(kind, 0) + n
        self.counters["skipped_ranges"] += skipped
        self.counters["duplicates"] += dups
        self.counters["lost_ranges"] += lost
        self.counters["batches"] += 1
        return marks

    def _write(self, conn: psycopg.Connection[Any], rows: list[EventRow], now: str
               ) -> tuple[dict[Pair, int], int, int, int, int, dict[str, int]]:
        pairs = sorted({r.pair for r in rows})
        sites, kinds = [p[0] for p in pairs], [p[1] for p in pairs]
        lost_rows = [r for r in rows if r.lost is not None]
        with conn.transaction():
            with conn.pipeline():
                inserted_cur = conn.execute(
                    "INSERT INTO events (site, kind, seq, seq_end, id, ts, received_at, payload)"
                    " SELECT s, k, q, e, i, t, %s, p FROM unnest(%s::text[], %s::text[],"
                    " %s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::text[])"
                    " AS x(s, k, q, e, i, t, p)"
                    " ON CONFLICT DO NOTHING RETURNING site, kind, seq",
                    (now, [r.site for r in rows], [r.kind for r in rows], [r.seq for r in rows],
                     [r.seq_end for r in rows], [r.id for r in rows], [r.ts for r in rows],
                     [r.payload for r in rows]))
                lost_cur = None
                if lost_rows:
                    lost_cur = conn.execute(
                        "INSERT INTO lost (site, kind, from_seq, to_seq, seq, ts, received_at)"
                        " SELECT s, k, a, b, q, t, %s FROM unnest(%s::text[], %s::text[],"
                        " %s::bigint[], %s::bigint[], %s::bigint[], %s::text[])"
                        " AS x(s, k, a, b, q, t) ON CONFLICT DO NOTHING RETURNING 1",
                        (now, [r.site for r in lost_rows], [r.kind for r in lost_rows],
                         [r.lost[0] for r in lost_rows if r.lost],
                         [r.lost[1] for r in lost_rows if r.lost],
                         [r.seq for r in lost_rows], [r.ts for r in lost_rows]))
                # The pairs' marks rows are their write locks (see the module docstring).
                conn.execute(
                    "INSERT INTO marks (site, kind, upto) SELECT s, k, 0 FROM"
                    " unnest(%s::text[], %s::text[]) AS x(s, k) ORDER BY s, k"
                    " ON CONFLICT DO NOTHING", (sites, kinds))
                marks_cur = conn.execute(
                    "SELECT site, kind, upto FROM marks WHERE (site, kind) IN"
                    " (SELECT * FROM unnest(%s::text[], %s::text[]))"
                    " ORDER BY site, kind FOR UPDATE", (sites, kinds))
                inserted = {(s, k, q) for s, k, q in inserted_cur.fetchall()}
                lost = len(lost_cur.fetchall()) if lost_cur is not None else 0
                start = {(s, k): int(u) for s, k, u in marks_cur.fetchall()}
            stored, dups, new_by_kind = self._settle(conn, rows, inserted)
            marks, skipped = self._advance(conn, pairs, start, rows, now)
        return marks, stored, dups, lost, skipped, new_by_kind

    def _settle(self, conn: psycopg.Connection[Any], rows: list[EventRow],
                inserted: set[tuple[str, str, int]]) -> tuple[int, int, dict[str, int]]:
        """Count what was inserted; upgrade raw rows to aggregates; count duplicates."""
        stored = 0
        new_by_kind: dict[str, int] = {}
        claimed: set[tuple[str, str, int]] = set()
        upgrades: dict[tuple[str, str, int], EventRow] = {}
        repeats: dict[tuple[str, str, int], int] = {}
        for row in rows:
            key = (row.site, row.kind, row.seq)
            if key in inserted and key not in claimed:
                claimed.add(key)
                stored += 1
                new_by_kind[row.kind] = new_by_kind.get(row.kind, 0) + 1
            elif row.seq_end is not None:
                # An aggregate whose first seq arrived raw before (published, then
                # thinned after an agent crash): it replaces the raw row, or the
                # coverage of seq+1..seq_end would be lost (as in SqliteStore). One
                # per key: the widest; the others are duplicates.
                best = upgrades.get(key)
                if best is None or (best.seq_end or 0) < row.seq_end:
                    if best is not None:
                        repeats[key] = repeats.get(key, 0) + 1
                    upgrades[key] = row
                else:
                    repeats[key] = repeats.get(key, 0) + 1
            else:
                repeats[key] = repeats.get(key, 0) + 1
        if upgrades:
            ups = list(upgrades.values())
            done = {(s, k, q) for s, k, q in conn.execute(
                "UPDATE events e SET seq_end = x.e, id = x.i, ts = x.t, payload = x.p"
                " FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::text[],"
                " %s::text[], %s::text[]) AS x(s, k, q, e, i, t, p)"
                " WHERE e.site = x.s AND e.kind = x.k AND e.seq = x.q"
                " AND coalesce(e.seq_end, e.seq) < x.e RETURNING e.site, e.kind, e.seq",
                ([r.site for r in ups], [r.kind for r in ups], [r.seq for r in ups],
                 [r.seq_end for r in ups], [r.id for r in ups], [r.ts for r in ups],
                 [r.payload for r in ups])).fetchall()}
            for key in upgrades:
                if key in done:
                    stored += 1
                else:
                    repeats[key] = repeats.get(key, 0) + 1
        if repeats:
            keys = sorted(repeats)
            conn.execute(
                "UPDATE events e SET dups = e.dups + x.n FROM unnest(%s::text[], %s::text[],"
                " %s::bigint[], %s::int[]) AS x(s, k, q, n)"
                " WHERE e.site = x.s AND e.kind = x.k AND e.seq = x.q",
                ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
                 [repeats[k] for k in keys]))
        return stored, sum(repeats.values()), new_by_kind

    def _advance(self, conn: psycopg.Connection[Any], pairs: list[Pair],
                 start: dict[Pair, int], rows: list[EventRow], now: str
                 ) -> tuple[dict[Pair, int], int]:
        """Move each pair's watermark over contiguous coverage and over a ``floor``
        above it (as SqliteStore._advance); its marks row is locked already."""
        # Aggregates of this batch that start at or below the mark yet reach past it.
        extra: dict[Pair, list[tuple[int, int]]] = {}
        for r in rows:
            if r.seq <= start[r.pair] < r.end:
                extra.setdefault(r.pair, []).append((r.seq, r.end))
        upto = self._cover(conn, pairs, [start[p] for p in pairs], extra)
        skipped = 0
        floors: dict[Pair, EventRow] = {}
        for r in rows:
            if r.floor is not None and r.floor > upto[r.pair] and (
                    r.pair not in floors or (floors[r.pair].floor or 0) < r.floor):
                floors[r.pair] = r
        for pair, floor_row in floors.items():
            assert floor_row.floor is not None
            new, ranges = self._raise_to_floor(conn, pair, upto[pair], floor_row, now,
                                               extra.get(pair, []))
            upto[pair] = new
            skipped += ranges
        changed = [p for p in pairs if upto[p] != start[p]]
        if changed:
            conn.execute(
                "UPDATE marks m SET upto = x.u FROM unnest(%s::text[], %s::text[],"
                " %s::bigint[]) AS x(s, k, u)"
                " WHERE m.site = x.s AND m.kind = x.k AND x.u > m.upto",
                ([p[0] for p in changed], [p[1] for p in changed], [upto[p] for p in changed]))
        return {p: upto[p] for p in pairs}, skipped

    @staticmethod
    def _cover(conn: psycopg.Connection[Any], pairs: list[Pair], marks: list[int],
               extra: Mapping[Pair, list[tuple[int, int]]]) -> dict[Pair, int]:
        """``hq_cover`` for every pair in one statement."""
        index = {p: n for n, p in enumerate(pairs, 1)}
        xi = [index[p] for p, ranges in extra.items() for _ in ranges]
        xa = [a for ranges in extra.values() for a, _ in ranges]
        xb = [b for ranges in extra.values() for _, b in ranges]
        found = conn.execute(
            "SELECT x.n, hq_cover(x.s, x.k, x.u,"
            " ARRAY(SELECT a FROM unnest(%s::int[], %s::bigint[]) AS y(i, a) WHERE y.i = x.n),"
            " ARRAY(SELECT b FROM unnest(%s::int[], %s::bigint[]) AS y(i, b) WHERE y.i = x.n))"
            " FROM unnest(%s::text[], %s::text[], %s::bigint[]) WITH ORDINALITY AS x(s, k, u, n)",
            (xi, xa, xi, xb, [p[0] for p in pairs], [p[1] for p in pairs], marks)).fetchall()
        return {pairs[n - 1]: int(u) for n, u in found}

    def _raise_to_floor(self, conn: psycopg.Connection[Any], pair: Pair, upto: int,
                        floor_row: EventRow, now: str, extra: list[tuple[int, int]]
                        ) -> tuple[int, int]:
        """A floor above the watermark: record what of ``upto+1..floor`` this store does
        not hold as skipped, and cover from the floor on."""
        site, kind = pair
        floor = floor_row.floor
        assert floor is not None
        lost = [(int(a), int(b)) for a, b in conn.execute(
            "SELECT from_seq, to_seq FROM lost WHERE site = %s AND kind = %s AND to_seq > %s",
            (site, kind, upto)).fetchall()]
        # Rows stored between the mark and the floor (late arrivals, or the far
        # side of a gap), streamed by a server-side cursor: there may be many.
        with conn.cursor(name="edge_hq_held") as held:
            held.itersize = 2000
            held.execute("SELECT seq, coalesce(seq_end, seq) FROM events WHERE site = %s"
                         " AND kind = %s AND seq > %s AND seq <= %s ORDER BY seq",
                         (site, kind, upto, floor))
            pieces, reach = _holes((upto + 1, floor), ((int(a), int(b)) for a, b in held), lost)
        skipped = 0
        if pieces:
            skipped = len(conn.execute(
                "INSERT INTO skipped (site, kind, from_seq, to_seq, seq, ts, received_at)"
                " SELECT %s, %s, a, b, %s, %s, %s FROM unnest(%s::bigint[], %s::bigint[])"
                " AS x(a, b) ON CONFLICT DO NOTHING RETURNING 1",
                (site, kind, floor_row.seq, floor_row.ts, now, [a for a, _ in pieces],
                 [b for _, b in pieces])).fetchall())
        covered = self._cover(conn, [pair], [max(floor, reach)], {pair: extra})
        return covered[pair], skipped

    # -- reading ---------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            with self.connection() as conn:
                return conn.execute(sql, params).fetchall()
        except psycopg.Error as exc:
            raise StoreError(self.location, f"read failed: {_message(exc)}") from None

    def watermarks(self) -> dict[Pair, int]:
        """The committed watermark of every (site, kind), as every receiver sees it."""
        return {(s, k): int(u) for s, k, u in
                self._read("SELECT site, kind, upto FROM marks WHERE upto > 0")}

    def events(self, site: str, kind: str) -> list[dict[str, Any]]:
        """Every stored event of a pair in seq order (for tests and debugging)."""
        rows = self._read("SELECT seq, seq_end, id, ts, received_at, dups, payload FROM events"
                          " WHERE site = %s AND kind = %s ORDER BY seq", (site, kind))
        return [{"seq": seq, "seq_end": seq_end, "id": eid, "ts": ts, "received_at": rec,
                 "dups": dups, "envelope": json.loads(payload)}
                for seq, seq_end, eid, ts, rec, dups, payload in rows]

    def report(self, site: str | None = None, since: str | None = None,
               now: float | None = None, until: str | None = None) -> dict[str, Any]:
        """CONTRACT 8's report: the same as :meth:`agent.hq.store.SqliteStore.report`."""
        since_text = canonical_time(since) if since else None
        window = (since_text, canonical_time(until) if until else None)
        now_s = self._clock() if now is None else now
        where, params = ["TRUE"], []
        if site is not None:
            where.append("site = %s")
            params.append(site)
        filt, extra = _window(window)
        cond = " AND ".join(where) + filt
        # Only fixed fragments are spliced into the SQL; every value is a bound parameter.
        summary = self._read(
            "SELECT site, kind, COUNT(*), MIN(seq), MAX(COALESCE(seq_end, seq)), MAX(ts),"  # noqa: S608
            f" MAX(received_at), SUM(dups) FROM events WHERE {cond}"
            " GROUP BY site, kind ORDER BY site, kind", params + extra)
        marks = self.watermarks()
        sites: dict[str, list[dict[str, Any]]] = {}
        for s, k, count, first, last, newest, newest_rx, dups in summary:
            lost = self._ranges("lost", s, k, window)
            skipped = self._ranges("skipped", s, k, window)
            details = self._gaps(s, k, window, lost + skipped)
            sites.setdefault(s, []).append({
                "kind": k,
                "received": int(count),
                "first_seq": int(first),
                "last_seq": int(last),
                "gaps": [[d["from"], d["to"]] for d in details],
                "duplicates": int(dups),
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

    def _ranges(self, table: str, site: str, kind: str,
                window: tuple[str | None, str | None]) -> list[tuple[int, int]]:
        """The ranges of ``lost`` or ``skipped`` declared by events in the window."""
        assert table in ("lost", "skipped")
        filt, extra = _window(window)
        return [(int(a), int(b)) for a, b in self._read(
            f"SELECT from_seq, to_seq FROM {table} WHERE site = %s AND kind = %s"  # noqa: S608
            f"{filt} ORDER BY from_seq", [site, kind, *extra])]

    def _unheld(self, site: str, kind: str,
                ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The parts of ``ranges`` not covered by a stored event (some may arrive late)."""
        out: list[tuple[int, int]] = []
        for first, last in ranges:
            held = [(int(a), int(b)) for a, b in self._read(
                "(SELECT seq, COALESCE(seq_end, seq) FROM events WHERE site = %s AND kind = %s"
                " AND seq < %s ORDER BY seq DESC LIMIT 1) UNION ALL"
                " (SELECT seq, COALESCE(seq_end, seq) FROM events WHERE site = %s AND kind = %s"
                " AND seq >= %s AND seq <= %s ORDER BY seq)",
                (site, kind, first, site, kind, first, last))]
            out += _holes((first, last), held, [])[0]
        return out

    def _gaps(self, site: str, kind: str, window: tuple[str | None, str | None],
              lost: list[tuple[int, int]]) -> list[dict[str, Any]]:
        filt, extra = _window(window)
        holes = self._read(
            "SELECT prev_end + 1, seq - 1, received_at FROM ("  # noqa: S608 - filt is fixed text
            " SELECT seq, received_at, MAX(COALESCE(seq_end, seq)) OVER ("
            "  ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_end"
            f" FROM events WHERE site = %s AND kind = %s{filt}) AS w"
            " WHERE prev_end IS NOT NULL AND seq - 1 > prev_end ORDER BY seq",
            [site, kind, *extra])
        gaps = []
        for first, last, since_at in holes:
            for a, b in _subtract((int(first), int(last)), lost):
                gaps.append({"from": a, "to": b, "since": since_at})
        return gaps


def _window(window: tuple[str | None, str | None]) -> tuple[str, list[Any]]:
    """The SQL filter (fixed text) and parameters of a (since, until) ts window."""
    filt, params = "", []
    if window[0] is not None:
        filt += " AND ts >= %s"
        params.append(window[0])
    if window[1] is not None:
        filt += " AND ts < %s"
        params.append(window[1])
    return filt, params
