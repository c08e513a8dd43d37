"""A read-only view of an outbox for the CLI (``edge-agent outbox stats|peek|export``).

Opened while the daemon is stopped. It must not create files or take the
writer's role: SQLite's ``mode=ro`` still creates the ``-wal``/``-shm`` files of
a WAL database, so when the WAL is absent or empty (a clean shutdown leaves it
so) the file is opened ``immutable``, which creates nothing. Only after a crash,
with committed frames still in the WAL, is ``mode=ro`` used so they are seen.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import IO, Any
from urllib.parse import quote

from agent.envelope import iso_ms, parse_iso
from agent.errors import OutboxError
from agent.kinds import KINDS
from agent.outbox.records import KindStats
from agent.outbox.store import DB_NAME, kind_range, seq_of


def _accepted_at(text: str) -> str:
    """The ``ts`` of an envelope's JSON text ("" if it has none)."""
    try:
        ts = json.loads(text).get("ts")
    except (ValueError, AttributeError):
        return ""
    return ts if isinstance(ts, str) else ""


class OutboxReader:
    def __init__(self, path: str) -> None:
        db = os.path.join(os.path.abspath(path), DB_NAME)
        if not os.path.isfile(db):
            raise OutboxError(f"no outbox database at {db}")
        wal = db + "-wal"
        mode = "mode=ro" if os.path.exists(wal) and os.path.getsize(wal) > 0 else "immutable=1"
        self.path = db
        try:
            self._con = sqlite3.connect(f"file:{quote(db)}?{mode}", uri=True)
            self._con.execute("SELECT count(*) FROM Cache").fetchone()
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {db} cannot be read: {exc}") from exc

    def stats(self) -> dict[str, KindStats]:
        """Per kind: depth, bytes, oldest accepted time and seq range."""
        result = {}
        for kind in KINDS:
            lo, hi = kind_range(kind)
            depth, nbytes, first_key = self._query(
                "SELECT count(*), total(length(value)), min(key) FROM Cache"
                " WHERE key >= ? AND key <= ? AND raw = 1", (lo, hi))[0]
            row = self._query("SELECT value FROM Cache WHERE key = ? AND raw = 1",
                              (f"s:{kind}",))
            last_seq = int(row[0][0]) if row else 0
            oldest = None
            if first_key is not None:
                envelope = self._envelope(first_key)
                oldest = parse_iso(envelope["ts"]) if envelope else None
            result[kind] = KindStats(kind, depth, int(nbytes), oldest,
                                     seq_of(first_key) if first_key else None, last_seq)
        return result

    def peek(self, kind: str | None, n: int) -> list[dict[str, Any]]:
        """The first ``n`` pending envelopes of ``kind`` (all kinds when None),
        in (kind, seq) order."""
        if kind is not None and kind not in KINDS:
            raise OutboxError(f"unknown event kind {kind!r} (one of {', '.join(KINDS)})")
        return [json.loads(value) for _, value in self._pending(kind, n)]

    def export(self, stream: IO[str], *, kind: str | None = None, since: float | None = None,
               progress: Callable[[int, int], None] | None = None) -> int:
        """Every pending envelope as one JSON line, in (kind, seq) order; the count.

        ``kind``: only that kind; ``since``: only events accepted at or after that
        epoch time (the envelope's ``ts``). ``progress(done, total)`` is called as
        rows are read (``total``: the pending events of the kinds read)."""
        if kind is not None and kind not in KINDS:
            raise OutboxError(f"unknown event kind {kind!r} (one of {', '.join(KINDS)})")
        lo, hi = kind_range(kind) if kind else ("e:", "e;")
        total = int(self._query("SELECT count(*) FROM Cache WHERE key >= ? AND key <= ?"
                                " AND raw = 1", (lo, hi))[0][0]) if progress else 0
        # iso_ms text sorts as time does: compare the envelope's ts as text.
        cutoff = None if since is None else iso_ms(since)
        count = 0
        for done, (_, value) in enumerate(self._pending(kind, None), start=1):
            text = bytes(value).decode("utf-8")
            if cutoff is None or _accepted_at(text) >= cutoff:
                stream.write(text)
                stream.write("\n")
                count += 1
            if progress is not None:
                progress(done, total)
        return count

    def _pending(self, kind: str | None, n: int | None) -> Iterator[tuple[str, bytes]]:
        lo, hi = kind_range(kind) if kind else ("e:", "e;")
        sql = "SELECT key, value FROM Cache WHERE key >= ? AND key <= ? AND raw = 1 ORDER BY key"
        args: tuple[Any, ...] = (lo, hi)
        if n is not None:
            sql += " LIMIT ?"
            args += (n,)
        try:
            # A cursor, not fetchall: an export of a million events streams.
            yield from self._con.execute(sql, args)
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {self.path} cannot be read: {exc}") from exc

    def _envelope(self, key: str) -> dict[str, Any] | None:
        row = self._query("SELECT value FROM Cache WHERE key = ? AND raw = 1", (key,))
        try:
            return json.loads(row[0][0]) if row else None
        except ValueError:
            return None

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        try:
            return self._con.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {self.path} cannot be read: {exc}") from exc

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> OutboxReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


