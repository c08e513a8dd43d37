"""HQ's PostgreSQL store (``[hq] store = "postgresql://..."``), for a fleet.

The same semantics as :class:`hq.store.SqliteStore`, whose module
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
- **Many receivers**: a batch first takes a transaction-scoped advisory lock
  per (site, kind) it touches (``pg_advisory_xact_lock``, in one global order, so
  two batches never deadlock). That is SQLite's ``BEGIN IMMEDIATE`` narrowed to
  the pairs: in READ COMMITTED every statement after the lock sees what the
  previous holder committed, so duplicates, conflicts and the watermark are
  decided over every stored row, whichever receiver got the message.
- **Batches**: the rows already held at the batch's (site, kind, seq)s are read
  in one statement; what each envelope is (new, duplicate, moved to a new epoch,
  conflict) is worked out in Python exactly as SQLite's loop does
  (:class:`_Plan`); then one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO
  NOTHING RETURNING`` per table (events, conflicts, lost, rejects) and one
  ``UPDATE`` for duplicates, sent in pipeline mode, so a batch costs a few round
  trips whatever its size. The walk over contiguous rows runs in the server
  (``hq_cover``, per (site, kind, epoch) since migration 0002).
- The reading side (the report, conflicts, rejects, events) is the SQLite
  store's SQL (:class:`hq.store.StoreReads`), so the answers are the same.
- **Migrations**: numbered SQL files in ``hq/pg_migrations``
  (``0001_store.sql``, ...), applied in order, each in its own transaction
  under an advisory lock (receivers starting together apply each once), and
  recorded in ``schema_version``. A database whose version is newer than this
  code knows is refused, as is one that holds tables of these names without
  ``schema_version`` (someone else's).
"""

from __future__ import annotations

import hashlib
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
from hq.store import (
    EventRow,
    Pair,
    Reject,
    StoreError,
    StoreReads,
    Stream,
    _holes,
    event_row,
    redact_url,
)

POOL_MIN = 1
POOL_MAX = 8               # per process: the receiver's writer, the page, retention
CONNECT_TIMEOUT_S = 10     # a server that does not answer: the store says so this soon
POOL_WAIT_S = 10.0         # longest wait for a free pooled connection
WRITE_RETRIES = 5          # deadlocks and serialization failures: retried, then an error
MIGRATION_LOCK = 0x65646765_68710001  # pg_advisory_xact_lock key ("edgehq" 1)
APPLICATION_NAME = "edge-agent-hq"
# Our tables: a database holding one of them without schema_version is not ours.
TABLES = ("events", "marks", "lost", "skipped", "conflicts", "rejects", "sites_state",
          "device_faults", "metrc_reports")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def migrations() -> list[Migration]:
    """The numbered SQL files of ``hq/pg_migrations``, in order (1, 2, ... no holes)."""
    folder = resources.files("hq").joinpath("pg_migrations")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"hq/pg_migrations: numbered 1..N without holes, got "
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
        raise StoreError(redact_url(url), f"cannot connect: {_message(exc)}") from None


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
                migrate(conn, redact_url(url), create=create)
            except psycopg.Error as exc:
                raise StoreError(redact_url(url), f"cannot set up the schema: "
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
            raise StoreError(redact_url(url), "cannot open a connection pool (server gone "
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
    return redact_url(text)[:300] or type(exc).__name__


_RETRY = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)


class PgStore(StoreReads):
    """The PostgreSQL store; thread-safe (pooled), any number of processes per database."""

    def __init__(self, url: str, *, create: bool = True, clock: Any = time.time) -> None:
        self.url = url
        self.location = redact_url(url)
        self._clock = clock
        self.counters: dict[str, int] = {"stored": 0, "duplicates": 0, "lost_ranges": 0,
                                         "skipped_ranges": 0, "batches": 0, "conflicts": 0,
                                         "rejected": 0, "adopted": 0, "retries": 0}
        self.stored_by_kind: dict[str, int] = {}  # for HQ's metrics (hq/metrics.py)
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

    def store_batch(self, envelopes: Sequence[Mapping[str, Any] | EventRow],
                    rejects: Sequence[Reject] = ()) -> dict[Stream, int]:
        """Store a batch and ``rejects`` in one transaction; the watermark of every
        touched (site, kind, epoch).

        As :meth:`hq.store.SqliteStore.store_batch`: committed (durably:
        ``synchronous_commit`` is the server's, on by default) before it returns,
        ``ValueError`` for a bad envelope (nothing written), :class:`StoreError`
        when the database fails.
        """
        rows = [env if isinstance(env, EventRow) else event_row(env) for env in envelopes]
        if not rows and not rejects:
            return {}
        now = iso_ms(self._clock())
        for attempt in range(WRITE_RETRIES):
            try:
                with self.connection() as conn:
                    result = self._write(conn, rows, rejects, now)
                break
            except _RETRY as exc:
                self.counters["retries"] += 1
                if attempt == WRITE_RETRIES - 1:
                    raise StoreError(self.location, f"write failed {WRITE_RETRIES} times, "
                                                    f"nothing stored: {_message(exc)}") from None
            except psycopg.Error as exc:
                raise StoreError(self.location,
                                 f"write failed, nothing stored: {_message(exc)}") from None
        marks, tally, new_by_kind = result
        c = self.counters
        for key, n in tally.items():
            c[key] += n
        for kind, n in new_by_kind.items():
            self.stored_by_kind[kind] = self.stored_by_kind.get(kind, 0) + n
        c["rejected"] += len(rejects)
        c["batches"] += 1
        return marks

    def _write(self, conn: psycopg.Connection[Any], rows: list[EventRow],
               rejects: Sequence[Reject], now: str
               ) -> tuple[dict[Stream, int], dict[str, int], dict[str, int]]:
        pairs = sorted({r.pair for r in rows})
        with conn.transaction():
            if pairs:
                # One writer per (site, kind) at a time (module docstring), locks taken
                # in one global order so two batches never deadlock; executemany runs
                # them in one pipeline.
                keys = sorted({_lock_key(p) for p in pairs})
                with conn.cursor() as cur:
                    cur.executemany("SELECT pg_advisory_xact_lock(%s)", [(k,) for k in keys])
            held = self._held(conn, rows)
            plan = _Plan(rows, held)
            tally = {"stored": 0, "duplicates": plan.dups, "adopted": plan.adopted,
                     "lost_ranges": 0, "conflicts": 0, "skipped_ranges": 0}
            streams = sorted({r.stream for r in rows})
            with conn.pipeline():
                if plan.updates:
                    ups = sorted(plan.updates.items())
                    conn.execute(
                        "UPDATE events e SET epoch = x.ne, dups = e.dups + x.n"
                        " FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[],"
                        " %s::text[], %s::text[], %s::int[]) AS x(s, k, oe, q, i, ne, n)"
                        " WHERE e.site = x.s AND e.kind = x.k AND e.epoch = x.oe"
                        " AND e.seq = x.q AND e.id = x.i",
                        ([k[0] for k, _ in ups], [k[1] for k, _ in ups], [k[2] for k, _ in ups],
                         [k[3] for k, _ in ups], [k[4] for k, _ in ups],
                         [v[0] for _, v in ups], [v[1] for _, v in ups]))
                new = plan.new
                stored_cur = conn.execute(
                    "INSERT INTO events (site, kind, epoch, seq, seq_end, id, ts, received_at,"
                    " payload, dups, unproven) SELECT s, k, ep, q, e, i, t, %s, p, d, u"
                    " FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[],"
                    " %s::bigint[], %s::text[], %s::text[], %s::text[], %s::int[], %s::int[])"
                    " AS x(s, k, ep, q, e, i, t, p, d, u)"
                    " ON CONFLICT DO NOTHING RETURNING kind",
                    (now, [n.row.site for n in new], [n.row.kind for n in new],
                     [n.epoch for n in new], [n.row.seq for n in new],
                     [n.row.seq_end for n in new], [n.row.id for n in new],
                     [n.row.ts for n in new], [n.row.payload for n in new],
                     [n.dups for n in new], [int(n.row.unproven) for n in new]))
                conflicts_cur = None
                if plan.conflicts:
                    cf = plan.conflicts
                    conflicts_cur = conn.execute(
                        "INSERT INTO conflicts (site, kind, seq, epoch, id, other_epoch, other_id,"
                        " ts, received_at) SELECT s, k, q, e, i, oe, oi, t, %s FROM"
                        " unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[],"
                        " %s::text[], %s::text[], %s::text[]) AS x(s, k, q, e, i, oe, oi, t)"
                        " ON CONFLICT DO NOTHING RETURNING 1",
                        (now, *([c[n] for c in cf] for n in range(8))))
                lost_rows = [r for r in rows if r.lost is not None]
                lost_cur = None
                if lost_rows:
                    lost_cur = conn.execute(
                        "INSERT INTO lost (site, kind, epoch, from_seq, to_seq, seq, ts,"
                        " received_at) SELECT s, k, ep, a, b, q, t, %s FROM unnest(%s::text[],"
                        " %s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[],"
                        " %s::text[]) AS x(s, k, ep, a, b, q, t) ON CONFLICT DO NOTHING"
                        " RETURNING 1",
                        (now, [r.site for r in lost_rows], [r.kind for r in lost_rows],
                         [r.epoch for r in lost_rows],
                         [r.lost[0] for r in lost_rows if r.lost],
                         [r.lost[1] for r in lost_rows if r.lost],
                         [r.seq for r in lost_rows], [r.ts for r in lost_rows]))
                if rejects:
                    conn.execute(
                        "INSERT INTO rejects (received_at, topic, site, kind, reason, size, head)"
                        " SELECT %s, tp, s, k, rs, n, h FROM unnest(%s::text[], %s::text[],"
                        " %s::text[], %s::text[], %s::bigint[], %s::bytea[])"
                        " WITH ORDINALITY AS x(tp, s, k, rs, n, h, o) ORDER BY o",
                        (now, [_pg_text(r.topic) for r in rejects],
                         [_pg_text(r.site) for r in rejects], [_pg_text(r.kind) for r in rejects],
                         [_pg_text(r.reason) for r in rejects], [r.size for r in rejects],
                         [r.head for r in rejects]))
                marks_cur = conn.execute(
                    "SELECT site, kind, epoch, upto FROM marks WHERE (site, kind, epoch) IN"
                    " (SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]))",
                    ([s[0] for s in streams], [s[1] for s in streams], [s[2] for s in streams]))
                new_by_kind: dict[str, int] = {}
                for (kind,) in stored_cur.fetchall():
                    tally["stored"] += 1
                    new_by_kind[kind] = new_by_kind.get(kind, 0) + 1
                if conflicts_cur is not None:
                    tally["conflicts"] = len(conflicts_cur.fetchall())
                if lost_cur is not None:
                    tally["lost_ranges"] = len(lost_cur.fetchall())
                start = {(s, k, e): int(u) for s, k, e, u in marks_cur.fetchall()}
            marks, tally["skipped_ranges"] = self._advance(conn, streams, start, rows, now)
        return marks, tally, new_by_kind

    @staticmethod
    def _held(conn: psycopg.Connection[Any], rows: list[EventRow]
              ) -> dict[tuple[str, str, int], list[tuple[str, str, int | None]]]:
        """The rows already stored at each (site, kind, seq) of the batch, any epoch."""
        keys = sorted({(r.site, r.kind, r.seq) for r in rows})
        held: dict[tuple[str, str, int], list[tuple[str, str, int | None]]] = {}
        if not keys:
            return held
        for s, k, q, e, i, end in conn.execute(
                "SELECT e.site, e.kind, e.seq, e.epoch, e.id, e.seq_end FROM events e"
                " JOIN unnest(%s::text[], %s::text[], %s::bigint[]) AS x(s, k, q)"
                " ON e.site = x.s AND e.kind = x.k AND e.seq = x.q ORDER BY e.received_at, e.id",
                ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])).fetchall():
            held.setdefault((s, k, int(q)), []).append((e, i, None if end is None else int(end)))
        return held

    def _advance(self, conn: psycopg.Connection[Any], streams: list[Stream],
                 start: dict[Stream, int], rows: list[EventRow], now: str
                 ) -> tuple[dict[Stream, int], int]:
        """Move each stream's watermark over contiguous coverage and over a ``floor``
        above it (as SqliteStore._advance), and note when each was heard."""
        marks = {s: start.get(s, 0) for s in streams}
        # Aggregates of this batch that start at or below the mark yet reach past it.
        extra: dict[Stream, list[tuple[int, int]]] = {}
        for r in rows:
            if r.seq <= marks[r.stream] < r.end:
                extra.setdefault(r.stream, []).append((r.seq, r.end))
        upto = self._cover(conn, streams, [marks[s] for s in streams], extra)
        skipped = 0
        floors: dict[Stream, EventRow] = {}
        for r in rows:
            if r.floor is not None and (r.stream not in floors
                                        or (floors[r.stream].floor or 0) < r.floor):
                floors[r.stream] = r
        for stream, floor_row in sorted(floors.items()):
            if (floor_row.floor or 0) > upto[stream]:
                upto[stream], ranges = self._raise_to_floor(conn, stream, upto[stream],
                                                            floor_row, now,
                                                            extra.get(stream, []))
                skipped += ranges
        # Also when the mark stays: heard_at says which run of the outbox is sending now.
        conn.execute(
            "INSERT INTO marks (site, kind, epoch, upto, heard_at) SELECT s, k, e, u, %s"
            " FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[]) AS x(s, k, e, u)"
            " ON CONFLICT (site, kind, epoch) DO UPDATE SET heard_at = excluded.heard_at,"
            " upto = greatest(marks.upto, excluded.upto)",
            (now, [s[0] for s in streams], [s[1] for s in streams], [s[2] for s in streams],
             [upto[s] for s in streams]))
        return upto, skipped

    @staticmethod
    def _cover(conn: psycopg.Connection[Any], streams: list[Stream], marks: list[int],
               extra: Mapping[Stream, list[tuple[int, int]]]) -> dict[Stream, int]:
        """``hq_cover`` for every stream in one statement."""
        index = {s: n for n, s in enumerate(streams, 1)}
        xi = [index[s] for s, ranges in extra.items() for _ in ranges]
        xa = [a for ranges in extra.values() for a, _ in ranges]
        xb = [b for ranges in extra.values() for _, b in ranges]
        found = conn.execute(
            "SELECT x.n, hq_cover(x.s, x.k, x.e, x.u,"
            " ARRAY(SELECT a FROM unnest(%s::int[], %s::bigint[]) AS y(i, a) WHERE y.i = x.n),"
            " ARRAY(SELECT b FROM unnest(%s::int[], %s::bigint[]) AS y(i, b) WHERE y.i = x.n))"
            " FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[])"
            " WITH ORDINALITY AS x(s, k, e, u, n)",
            (xi, xa, xi, xb, [s[0] for s in streams], [s[1] for s in streams],
             [s[2] for s in streams], marks)).fetchall()
        return {streams[n - 1]: int(u) for n, u in found}

    def _raise_to_floor(self, conn: psycopg.Connection[Any], stream: Stream, upto: int,
                        floor_row: EventRow, now: str, extra: list[tuple[int, int]]
                        ) -> tuple[int, int]:
        """A floor above the watermark: record what of ``upto+1..floor`` this store does
        not hold under any epoch (and no other stream of the pair acked) as skipped,
        and cover from the floor on."""
        site, kind, epoch = stream
        floor = floor_row.floor
        assert floor is not None
        lost = [(int(a), int(b)) for a, b in conn.execute(
            "SELECT from_seq, to_seq FROM lost WHERE site = %s AND kind = %s AND epoch = %s"
            " AND to_seq > %s", (site, kind, epoch, upto)).fetchall()]
        row = conn.execute("SELECT max(upto) FROM marks WHERE site = %s AND kind = %s"
                           " AND epoch <> %s", stream).fetchone()
        acked_elsewhere = int(row[0]) if row and row[0] is not None else 0
        scan_from = max(upto, min(acked_elsewhere, floor))
        # Rows of any epoch between the mark and the floor (late arrivals, the far
        # side of a gap), streamed by a server-side cursor: there may be many.
        with conn.cursor(name="edge_hq_held") as held:
            held.itersize = 2000
            held.execute("SELECT seq, coalesce(seq_end, seq) FROM events WHERE site = %s"
                         " AND kind = %s AND seq > %s AND seq <= %s ORDER BY seq",
                         (site, kind, scan_from, floor))
            pieces, _ = _holes((scan_from + 1, floor),
                               ((int(a), int(b)) for a, b in held), lost)
        skipped = 0
        if pieces:
            skipped = len(conn.execute(
                "INSERT INTO skipped (site, kind, epoch, from_seq, to_seq, seq, ts, received_at)"
                " SELECT %s, %s, %s, a, b, %s, %s, %s FROM unnest(%s::bigint[], %s::bigint[])"
                " AS x(a, b) ON CONFLICT DO NOTHING RETURNING 1",
                (site, kind, epoch, floor_row.seq, floor_row.ts, now, [a for a, _ in pieces],
                 [b for _, b in pieces])).fetchall())
        # A row of this stream may start at or below the floor and reach past it.
        row = conn.execute(
            "SELECT max(coalesce(seq_end, seq)) FROM events WHERE site = %s AND kind = %s"
            " AND epoch = %s AND seq > %s AND seq <= %s", (*stream, upto, floor)).fetchone()
        reach = int(row[0]) if row and row[0] is not None else 0
        covered = self._cover(conn, [stream], [max(floor, reach)], {stream: extra})
        return covered[stream], skipped

    # -- reading ---------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The shared SQL of StoreReads (qmark parameters) on a pooled connection."""
        try:
            with self.connection() as conn:
                return conn.execute(sql.replace("?", "%s"), params).fetchall()
        except psycopg.Error as exc:
            raise StoreError(self.location, f"read failed: {_message(exc)}") from None


def _lock_key(pair: Pair) -> int:
    """The advisory lock of a (site, kind): 64 bits of a hash of it (signed, as
    PostgreSQL's bigint)."""
    digest = hashlib.blake2b(f"{pair[0]}\x00{pair[1]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _pg_text(value: str) -> str:
    """PostgreSQL text cannot hold NUL (a reject's topic or reason could)."""
    return value.replace("\x00", "\ufffd")


@dataclass
class _New:
    row: EventRow
    epoch: str
    dups: int = 0


class _Plan:
    """What a batch does, worked out row by row as SqliteStore.store_batch does it,
    against the rows already held at its (site, kind, seq)s (read under the pairs'
    locks): rows to insert, held rows to count a duplicate on or move to a new epoch,
    and conflicts to record."""

    def __init__(self, rows: list[EventRow],
                 held: dict[tuple[str, str, int], list[tuple[str, str, int | None]]]) -> None:
        self.new: list[_New] = []
        # (site, kind, epoch as stored, seq, id) -> [epoch it moves to, dups to add]
        self.updates: dict[tuple[str, str, str, int, str], list[Any]] = {}
        self.conflicts: list[tuple[str, str, int, str, str, str, str, str]] = []
        self.dups = self.adopted = 0
        # Per (site, kind, seq): [epoch now, id, seq_end, a _New or the stored key].
        state: dict[tuple[str, str, int], list[list[Any]]] = {}
        for key, found in held.items():
            state[key] = [[e, i, end, (*key[:2], e, key[2], i)] for e, i, end in found]
        for row in rows:
            here = state.setdefault((row.site, row.kind, row.seq), [])
            same = [h for h in here if h[1] == row.id]
            if same:
                self.dups += 1
                h = same[0]
                if h[0] != row.epoch:
                    # Resent by a later run of the same outbox: the row joins that run.
                    self.adopted += 1
                    h[0] = row.epoch
                ref = h[3]
                if isinstance(ref, _New):
                    ref.epoch, ref.dups = h[0], ref.dups + 1
                else:
                    self.updates[ref] = [h[0], self.updates.get(ref, [h[0], 0])[1] + 1]
                continue
            for other_epoch, other_id, other_end, _ in here:
                if other_epoch == row.epoch and (row.seq_end is not None
                                                 or other_end is not None):
                    continue  # a thinned aggregate and the raw reading it summarises
                self.conflicts.append((row.site, row.kind, row.seq, row.epoch, row.id,
                                       other_epoch, other_id, row.ts))
            new = _New(row, row.epoch)
            self.new.append(new)
            here.append([row.epoch, row.id, row.seq_end, new])
