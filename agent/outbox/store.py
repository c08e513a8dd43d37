"""The outbox's on-disk layer: one diskcache ``Cache`` per outbox directory.

diskcache is the project's store, configured against its traps
(DEVELOPERS.md): ``synchronous=FULL`` so a commit is on disk before anyone is
answered, no eviction and no culling so nothing is ever dropped silently, no
mmap (a full filesystem under a mapped file is a SIGBUS, not an error), and
values that are JSON bytes kept inline in SQLite (never pickle, never a side
file: a side file is written outside the transaction).

Key layout, all plain ``str`` keys so SQLite orders them and a kind's events
are one range of the ``Cache(key, raw)`` index:

- ``e:{kind}:{seq:012d}``  an event's envelope bytes
- ``s:{kind}``             the last seq ever assigned for that kind (int)
- ``i:{idem_key}``         an Idempotency-Key's first answer (JSON, expires)
- ``l:{kind}``             a pending ``"lost"`` range after a reset (JSON)
- ``m:created``            written once when this database was created
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
from itertools import chain
from typing import Any

from diskcache import Cache, Disk
from diskcache.core import MODE_RAW, UNKNOWN

from agent.envelope import parse_iso

DB_NAME = "cache.db"
DB_SUFFIXES = ("", "-wal", "-shm")
# Values stay inline in SQLite below this size (diskcache writes bigger ones to
# side files outside the transaction); events are capped far below it.
INLINE_LIMIT = 4 << 20
MAX_EVENT_BYTES = 1 << 20
SEQ_DIGITS = 12
SEQ_MAX = 10**SEQ_DIGITS - 1
CREATED_KEY = "m:created"
# Page cache per connection (pages of 4 KiB): small, so RSS stays bounded
# whatever the backlog; the writer appends at the end of a few index ranges.
CACHE_PAGES = 2048

CACHE_SETTINGS: dict[str, Any] = {
    "statistics": 0,
    "tag_index": 0,
    "eviction_policy": "none",
    "cull_limit": 0,
    "sqlite_synchronous": 2,
    "sqlite_journal_mode": "wal",
    "sqlite_mmap_size": 0,
    "sqlite_cache_size": CACHE_PAGES,
    "disk_min_file_size": INLINE_LIMIT,
}

# Exactly the row Cache.set writes for an inline raw value (see
# diskcache.core.Cache._row_insert): raw=1, access_count=0, tag NULL, size 0,
# mode MODE_RAW, no filename. Written with executemany because Cache.set runs a
# SELECT, an INSERT and a cull per call, which caps a group commit far below
# what SQLite itself can do.
INSERT_ROW = (
    "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count,"
    " tag, size, mode, filename, value) VALUES (?, 1, ?, ?, ?, 0, NULL, 0, 1, NULL, ?)"
)
assert MODE_RAW == 1, "diskcache changed its row format; INSERT_ROW must follow it"
# Many rows per INSERT statement: about 30% less time per row than executemany
# (one statement step per row) for the same triggers and indexes. 100 rows of
# 5 parameters stay under SQLite's oldest host-parameter limit (999).
ROWS_PER_INSERT = 100
_VALUES = "(?, 1, ?, ?, ?, 0, NULL, 0, 1, NULL, ?)"
INSERT_MANY = INSERT_ROW.split(" VALUES ")[0] + " VALUES " + ",".join([_VALUES] * ROWS_PER_INSERT)

Row = tuple[str, float, float | None, float, bytes]


def insert_rows(con: sqlite3.Connection, rows: list[Row]) -> None:
    """INSERT ``(key, store_time, expire_time, access_time, value)`` rows into Cache."""
    whole = len(rows) - len(rows) % ROWS_PER_INSERT
    for i in range(0, whole, ROWS_PER_INSERT):
        con.execute(INSERT_MANY, list(chain.from_iterable(rows[i:i + ROWS_PER_INSERT])))
    if whole < len(rows):
        con.executemany(INSERT_ROW, rows[whole:])


def event_key(kind: str, seq: int) -> str:
    return f"e:{kind}:{seq:0{SEQ_DIGITS}d}"


def seq_of(key: str) -> int:
    return int(key[-SEQ_DIGITS:])


def kind_range(kind: str) -> tuple[str, str]:
    """The inclusive key range holding every event of ``kind``."""
    return event_key(kind, 0), event_key(kind, SEQ_MAX)


class EnvelopeDisk(Disk):  # type: ignore[misc]  # diskcache ships no type hints
    """A diskcache Disk that stores only str keys and bytes/int values, inline.

    Stock ``Disk`` pickles anything it does not know and ``JSONDisk``
    compresses keys (which breaks the sorted key ranges the uplink reads).
    Here anything else is a programming error, raised loudly.
    """

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) is not str:
            raise TypeError(f"outbox keys are str, not {type(key).__name__}")
        return key, True

    def get(self, key: Any, raw: bool) -> Any:
        return key

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[int, int, None, Any]:
        if type(value) is int:
            return 0, MODE_RAW, None, value
        if type(value) is bytes and not read:
            if len(value) >= self.min_file_size:
                raise ValueError(f"outbox value of {len(value)} bytes is over the inline limit")
            return 0, MODE_RAW, None, sqlite3.Binary(value)
        raise TypeError(f"outbox values are JSON bytes or int, not {type(value).__name__}")

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode != MODE_RAW:
            raise ValueError(f"outbox row in diskcache mode {mode}; only inline values are used")
        return bytes(value) if isinstance(value, memoryview) else value


def open_cache(path: str) -> Cache:
    return Cache(path, timeout=10, disk=EnvelopeDisk, **CACHE_SETTINGS)


def is_disk_full(exc: BaseException, path: str) -> bool:
    """Whether ``exc`` means the filesystem under ``path`` has no room.

    SQLite reports ENOSPC from write() as SQLITE_FULL; a failed extension of
    the -shm file comes back as an I/O error, so for those the filesystem's
    free space decides.
    """
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code == sqlite3.SQLITE_FULL or "disk is full" in str(exc):
            return True
        if code == sqlite3.SQLITE_IOERR:
            return free_bytes(path) < 64 * 1024
    return False


def is_corruption(exc: BaseException) -> bool:
    """Whether SQLite says the file itself is damaged (not a full disk, a lock,
    permissions or a failed read: moving a healthy outbox aside for one of
    those would take every pending event out of delivery)."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def ts_at(con: sqlite3.Connection, key: str) -> float | None:
    """The accepted time (envelope ``ts``, epoch seconds) of the event at ``key``."""
    row = con.execute("SELECT value FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchone()
    try:
        return parse_iso(json.loads(row[0])["ts"]) if row else None
    except (ValueError, KeyError, TypeError):
        return None


def free_bytes(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def check_database(db_path: str) -> tuple[str | None, bool]:
    """``(problem, has_marker)`` for an existing database file.

    ``problem`` is why SQLite cannot be trusted with the file (None when
    ``PRAGMA quick_check`` is ok); ``has_marker`` says whether this outbox
    created it (a file truncated to nothing passes quick_check but is empty).
    An error that is not damage to the file (a full disk, a lock) is raised.
    """
    con: sqlite3.Connection | None = None
    try:
        con = sqlite3.connect(db_path, timeout=10, isolation_level=None)
        rows = con.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            return "quick_check: " + "; ".join(str(r[0]) for r in rows[:3]), False
        try:
            found = con.execute(
                "SELECT 1 FROM Cache WHERE key = ? AND raw = 1", (CREATED_KEY,)
            ).fetchall()
        except sqlite3.OperationalError:  # no Cache table: not an outbox (yet)
            return None, False
        return None, bool(found)
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise
        return f"sqlite: {exc}", False
    finally:
        if con is not None:
            con.close()


def db_files(path: str) -> list[str]:
    return [os.path.join(path, DB_NAME + suffix) for suffix in DB_SUFFIXES]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_wal(path: str) -> None:
    """fsync the outbox's WAL file (if any) and its folder: a truncation or an unlink
    SQLite did is then on disk too."""
    wal = os.path.join(path, DB_NAME + "-wal")
    try:
        fd = os.open(wal, os.O_RDONLY)
    except FileNotFoundError:
        pass
    else:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(path)
