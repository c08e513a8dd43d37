"""The site's package catalog: the Metrc package tags HQ says are registered.

HQ keeps, per site, the list of package tags registered in the state system
and sends it down with two commands (CONTRACT 4, ``P/commands/{name}``):

- ``catalog-put`` ``{"tags": [...], "replace"?: false}``: add these tags; with
  ``"replace": true`` the catalog becomes exactly these tags (an empty list
  empties it only with ``"allow_empty": true``; without, it is refused).
  One command carries up to about 9,000 tags (the router's 256 KiB payload
  limit); a larger catalog is sent as several puts, a ``replace`` only as the
  first of them.
- ``catalog-remove`` ``{"tags": [...]}``: remove these tags (absent ones are
  counted, not an error).

The catalog is a local SQLite file (WAL, ``synchronous=FULL``) beside the
outbox, so scans are judged offline too. Both operations are idempotent in
themselves (adding a present tag or removing an absent one changes nothing),
and a command id already applied is answered with its first result without
running again, also after a restart: the router remembers ids only in memory,
and re-running an old ``catalog-put`` after a newer ``catalog-remove`` would
bring a removed tag back.

Every tag in a command is checked before anything is written; a bad one is
named with its index (``tags.3: ...``) and nothing changes. A corrupt file is
moved aside and a fresh, empty catalog is used (every package then scans as
unknown until HQ sends the list again: a false "unknown" stops a sale for a
check, a false "known" would let one through).

Scans are judged in the scanner threads (:meth:`Catalog.known`) on a read
connection of their own, so a large ``replace`` never holds up a scan.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.pipeline.schemas import is_package_tag

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite"
# Applied command ids are kept this long: far longer than HQ retries a command.
APPLIED_KEEP_S = 30 * 24 * 3600.0
BUSY_TIMEOUT_S = 5.0
SCHEMA_VERSION = 1
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS tags (tag TEXT PRIMARY KEY, added_at REAL NOT NULL) "
    "WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS applied (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
    "result TEXT NOT NULL, applied_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS applied_at ON applied (applied_at)",
)
PUT_KEYS = frozenset({"tags", "replace", "allow_empty"})
REMOVE_KEYS = frozenset({"tags"})


class CatalogError(AgentError):
    """A catalog command cannot be applied; ``field`` names the argument (``tags.3``)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


def parse_tags(args: Mapping[str, Any], command: str, allowed: frozenset[str]) -> list[str]:
    """The ``tags`` argument, checked whole; the first problem raises, naming its index."""
    unknown = sorted(str(k) for k in args if k not in allowed)
    if unknown:
        raise CatalogError(f"{command}: args.{unknown[0][:40]}: unknown argument; known: "
                           f"{', '.join(sorted(allowed))}", f"args.{unknown[0][:40]}")
    tags = args.get("tags")
    if not isinstance(tags, list):
        raise CatalogError(f"{command}: tags: required, a list of package tags "
                           '({"tags": ["1A4FF0100000022000000123", ...]})', "tags")
    bad = [(i, t) for i, t in enumerate(tags) if not is_package_tag(t)]
    if bad:
        index, value = bad[0]
        shown = json.dumps(value)[:40]
        more = f"; {len(bad) - 1} more bad tag(s)" if len(bad) > 1 else ""
        raise CatalogError(f"{command}: tags.{index}: {shown} is not a package tag (24 "
                           f"upper-case letters and digits){more}; nothing was changed",
                           f"tags.{index}")
    return list(dict.fromkeys(tags))  # a tag listed twice counts once


class Catalog:
    """The package tags of this site, in SQLite; thread-safe."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._count = 0
        self.error: str | None = None        # why the catalog is unavailable, if it is
        self.moved_aside: str | None = None  # where a corrupt file went at open
        self.updated_at: float | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Open or create the file; a corrupt one is moved aside. Never raises."""
        for attempt in (1, 2):
            try:
                self._connect()
                self.error = None
                return
            except sqlite3.DatabaseError as exc:
                self._disconnect()
                if attempt == 2 or isinstance(exc, sqlite3.OperationalError) \
                        or not self.path.exists():
                    # OperationalError: permissions, a missing directory, a full disk;
                    # moving the file aside would not help and would lose the list.
                    self.error = f"cannot open {self.path}: {exc}"
                    break
                self._move_aside(str(exc))
            except OSError as exc:
                self._disconnect()
                self.error = f"cannot open {self.path}: {exc}"
                break
        log.error("catalog: %s; scans are reported with known=null and catalog commands "
                  "fail until it can be opened", self.error)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                 check_same_thread=False)
        self._writer = writer
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            writer.execute(statement)
        writer.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._count = writer.execute("SELECT count(*) FROM tags").fetchone()[0]
        reader = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                 check_same_thread=False)
        self._reader = reader
        reader.execute("PRAGMA query_only=ON")

    def _move_aside(self, reason: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self.moved_aside = str(aside)
        log.error("catalog: %s is unreadable (%s); moved aside to %s and started empty: every "
                  "package scans as unknown until HQ sends the catalog again (catalog-put with "
                  "replace)", self.path, reason, aside)

    def _disconnect(self) -> None:
        for con in (self._reader, self._writer):
            if con is not None:
                with contextlib.suppress(sqlite3.Error):
                    con.close()
        self._reader = self._writer = None

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._disconnect()

    @property
    def available(self) -> bool:
        return self._writer is not None

    # -- reads (scanner threads, the API) ----------------------------------------------------

    def known(self, tag: str) -> bool | None:
        """Whether ``tag`` is in the catalog; None when the catalog cannot be read."""
        row = self._read("SELECT added_at FROM tags WHERE tag = ?", (tag,))
        return None if row is None else bool(row)

    def lookup(self, tag: str) -> dict[str, Any] | None:
        """``{"tag", "known", "added_at"}``, or None when the catalog cannot be read."""
        row = self._read("SELECT added_at FROM tags WHERE tag = ?", (tag,))
        if row is None:
            return None
        return {"tag": tag, "known": bool(row), "added_at": row[0][0] if row else None}

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]] | None:
        with self._read_lock:
            if self._reader is None:
                return None
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                log.debug("catalog: read failed: %s", exc)
                return None

    def count(self) -> int:
        """Tags in the catalog (kept in memory, updated on every write)."""
        return self._count

    def snapshot(self) -> dict[str, Any]:
        """For status and ``GET /v1/catalog``."""
        return {"count": self._count, "available": self.available, "error": self.error,
                "updated_at": self.updated_at, "moved_aside": self.moved_aside,
                "path": str(self.path)}

    # -- the two commands (command worker threads) ---------------------------------------------

    def put(self, tags: Iterable[str], *, replace: bool = False,
            command_id: str | None = None) -> dict[str, Any]:
        """Add ``tags`` (already checked); with ``replace``, drop every other tag."""
        tags = list(tags)

        def apply(con: sqlite3.Connection, now: float) -> dict[str, Any]:
            removed = 0
            if replace:
                con.execute("CREATE TEMP TABLE IF NOT EXISTS incoming (tag TEXT PRIMARY KEY)")
                con.execute("DELETE FROM incoming")
                con.executemany("INSERT OR IGNORE INTO incoming VALUES (?)",
                                ((t,) for t in tags))
                removed = con.execute("DELETE FROM tags WHERE tag NOT IN "
                                      "(SELECT tag FROM incoming)").rowcount
                con.execute("DELETE FROM incoming")
            before = con.total_changes
            con.executemany("INSERT OR IGNORE INTO tags (tag, added_at) VALUES (?, ?)",
                            ((t, now) for t in tags))
            added = con.total_changes - before
            return {"added": added, "present": len(tags) - added, "removed": removed,
                    "replace": replace}

        return self._write("catalog-put", command_id, apply)

    def remove(self, tags: Iterable[str], *, command_id: str | None = None) -> dict[str, Any]:
        """Remove ``tags`` (already checked); absent ones are counted."""
        tags = list(tags)

        def apply(con: sqlite3.Connection, now: float) -> dict[str, Any]:
            before = con.total_changes
            con.executemany("DELETE FROM tags WHERE tag = ?", ((t,) for t in tags))
            removed = con.total_changes - before
            return {"removed": removed, "absent": len(tags) - removed}

        return self._write("catalog-remove", command_id, apply)

    def _write(self, name: str, command_id: str | None,
               apply: Callable[[sqlite3.Connection, float], dict[str, Any]]) -> dict[str, Any]:
        with self._write_lock:
            con = self._writer
            if con is None:
                raise CatalogError(f"{name}: the catalog is unavailable ({self.error}); "
                                   "nothing was changed")
            now = self.clock()
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    if command_id is not None:
                        row = con.execute("SELECT result FROM applied WHERE id = ?",
                                          (command_id,)).fetchone()
                        if row is not None:
                            con.execute("ROLLBACK")
                            log.info("catalog: %s %s was applied before; answering with its "
                                     "first result", name, command_id)
                            result: dict[str, Any] = json.loads(row[0])
                            return result
                    result = apply(con, now)
                    count = con.execute("SELECT count(*) FROM tags").fetchone()[0]
                    result["count"] = count
                    if command_id is not None:
                        con.execute("INSERT INTO applied (id, name, result, applied_at) "
                                    "VALUES (?, ?, ?, ?)",
                                    (command_id, name, json.dumps(result), now))
                        con.execute("DELETE FROM applied WHERE applied_at < ?",
                                    (now - APPLIED_KEEP_S,))
                    con.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        con.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                log.error("catalog: %s failed: %s", name, exc)
                raise CatalogError(f"{name}: writing {self.path} failed ({exc}); nothing was "
                                   "changed, send the command again") from None
            self._count = count
            self.updated_at = now
        log.info("catalog: %s %s: %s", name, command_id or "(local)",
                 ", ".join(f"{k} {v}" for k, v in result.items()))
        return result
