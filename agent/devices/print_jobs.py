"""Print jobs on disk (issues 9 and 10): a held job survives a restart and prints at most once.

Before a job is queued, its rendered bytes, its printer, who asked for it (the
*owner*: the API token's name, or HQ) and the digest of the request body are
committed here; before each time its bytes go to the printer it is marked
``sending``; a hold after a send marks it ``held`` again (the queue cleared the
printer's buffer: nothing can come out by itself); its final result marks it
``done`` (the bytes are dropped, the answer kept). So after a restart:

- a ``queued`` or ``held`` job is queued again and prints when the printer is
  back (or expires at the deadline it had);
- a ``sending`` job was cut off while its bytes were on the way: it may have
  printed, so it is not sent again (at most once: a second receipt or label is
  worse than a missing one, which the ``print`` event reports) and ends
  ``failed`` with that said;
- a ``done`` job answers a repeat of its Idempotency-Key or HQ command id, and
  ``GET /v1/print/jobs/{id}`` for its owner, without printing again.

A small SQLite file beside the outbox (WAL, ``synchronous=FULL``, mode 0600),
bounded: at most ``MAX_WAITING`` jobs or ``MAX_WAITING_BYTES`` of bytes wait at
once (more are refused with a clear error, never dropped), and finished jobs
are forgotten after ``DONE_KEEP_S`` or beyond the last ``DONE_KEPT``. Any
thread; each call is one short transaction.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.statefiles import open_db

JOBS_FILE = "print-jobs.sqlite"
# Module level so tests can shrink them.
MAX_WAITING = 500
MAX_WAITING_BYTES = 32 << 20
DONE_KEPT = 10_000
DONE_KEEP_S = 7 * 24 * 3600.0
PRUNE_EVERY = 500  # finished jobs between prunes
WAITING = ("queued", "sending", "held")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, printer TEXT NOT NULL, "
    "kind TEXT NOT NULL, owner TEXT NOT NULL, source TEXT NOT NULL, ref TEXT NOT NULL, "
    "digest TEXT, summary TEXT NOT NULL, data BLOB, expires_at REAL NOT NULL, "
    "state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, fault TEXT, result TEXT, "
    "updated_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, updated_at)",
    "SELECT COUNT(*) FROM jobs",
)


class PrintJobsFull(AgentError):
    """Too many jobs (or bytes) wait for their printers already; a new one is refused."""

    def __init__(self, waiting: int, size: int) -> None:
        self.waiting = waiting
        self.size = size
        super().__init__(f"{waiting} print jobs ({size} bytes) are already waiting for their "
                         f"printers (the limit is {MAX_WAITING} jobs, {MAX_WAITING_BYTES} bytes); "
                         "not queued: bring the printer back or wait for held jobs to expire")


@dataclass(frozen=True)
class StoredJob:
    """One row: a waiting job (with its bytes) or a finished one (with its result)."""

    job_id: str
    printer: str
    kind: str
    owner: str
    source: str
    ref: dict[str, str]
    digest: str | None
    summary: str
    data: bytes | None
    expires_at: float  # wall clock
    state: str
    attempts: int
    fault: str | None
    result: dict[str, Any] | None

    @property
    def done(self) -> bool:
        return self.state == "done"


_SELECT = ("SELECT job_id, printer, kind, owner, source, ref, digest, summary, data, "
           "expires_at, state, attempts, fault, result FROM jobs")


def _row(values: tuple[Any, ...]) -> StoredJob:
    (job_id, printer, kind, owner, source, ref, digest, summary, data, expires_at, state,
     attempts, fault, result) = values
    return StoredJob(job_id, printer, kind, owner, source, json.loads(ref), digest, summary,
                     bytes(data) if data is not None else None, expires_at, state, attempts,
                     fault, json.loads(result) if result else None)


class PrintJobStore:
    """The print jobs of this box, by job id (see the module doc)."""

    def __init__(self, directory: str | Path, *, clock: Any = time.time) -> None:
        self.path = Path(directory) / JOBS_FILE
        self.clock = clock
        self._lock = threading.Lock()
        self._con = open_db(self.path, _SCHEMA, "print jobs held before are lost")
        self._closed = False
        self._finished = 0
        self.prune()

    def get(self, job_id: str) -> StoredJob | None:
        with self._lock:
            found = self._con.execute(_SELECT + " WHERE job_id = ?",
                                      (job_id,)).fetchone()
        return _row(found) if found else None

    def waiting(self) -> list[StoredJob]:
        """The jobs not finished, oldest first (what a start queues again)."""
        with self._lock:
            rows = self._con.execute(
                _SELECT + " WHERE state IN ('queued', 'sending', 'held') ORDER BY rowid"
            ).fetchall()
        return [_row(r) for r in rows]

    def add(self, *, job_id: str, printer: str, kind: str, owner: str, source: str,
            ref: dict[str, str], digest: str | None, summary: str, data: bytes,
            expires_at: float) -> None:
        """Record a new job as ``queued``; PrintJobsFull past the bounds."""
        with self._lock, self._con:
            count, size = self._con.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM jobs "
                "WHERE state IN ('queued', 'sending', 'held')").fetchone()
            if count >= MAX_WAITING or size + len(data) > MAX_WAITING_BYTES:
                raise PrintJobsFull(count, size)
            self._con.execute(
                "INSERT INTO jobs (job_id, printer, kind, owner, source, ref, digest, summary, "
                "data, expires_at, state, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                (job_id, printer, kind, owner, source, json.dumps(ref), digest, summary, data,
                 expires_at, self.clock()))

    def mark(self, job_id: str, state: str, *, attempts: int | None = None,
             fault: str | None = None) -> None:
        """A waiting job is ``sending`` (its bytes go now) or ``held`` (they did not print)."""
        assert state in WAITING
        with self._lock, self._con:
            self._con.execute(
                "UPDATE jobs SET state = ?, attempts = COALESCE(?, attempts), "
                "fault = COALESCE(?, fault), updated_at = ? WHERE job_id = ? AND state != 'done'",
                (state, attempts, fault, self.clock(), job_id))

    def finish(self, job_id: str, result: dict[str, Any]) -> None:
        """The job's final result: kept for answers; its bytes are dropped."""
        with self._lock, self._con:
            self._con.execute(
                "UPDATE jobs SET state = 'done', data = NULL, result = ?, attempts = ?, "
                "fault = ?, updated_at = ? WHERE job_id = ?",
                (json.dumps(result, default=str), int(result.get("attempts") or 0),
                 result.get("fault"), self.clock(), job_id))
            self._finished += 1
        if self._finished % PRUNE_EVERY == 0:
            self.prune()

    def prune(self) -> None:
        """Forget finished jobs older than ``DONE_KEEP_S`` and beyond the last ``DONE_KEPT``."""
        with self._lock, self._con:
            self._con.execute("DELETE FROM jobs WHERE state = 'done' AND updated_at < ?",
                              (self.clock() - DONE_KEEP_S,))
            self._con.execute(
                "DELETE FROM jobs WHERE state = 'done' AND rowid NOT IN (SELECT rowid FROM jobs "
                "WHERE state = 'done' ORDER BY updated_at DESC, rowid DESC LIMIT ?)", (DONE_KEPT,))

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._con.close()
