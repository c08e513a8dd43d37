"""Opening an outbox: trust the database, or set it aside and carry on.

At open the database must pass SQLite's ``PRAGMA quick_check`` and carry the
marker this outbox writes when it creates one. A file that fails is moved
aside as ``cache.db.corrupt-<UTC stamp>`` (with its -wal and -shm), reported,
and a fresh database started (CONTRACT 6). A fresh database continues every
kind past the seqs reserved in ``seqmark.json``, so no seq is ever reused,
and records the range that may have been lost for that kind's next event.

Then the writer's per-kind counters are computed once with SQL aggregates
(never by loading the backlog).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field

from diskcache import Cache

from agent.envelope import iso_ms
from agent.errors import OutboxCorrupt
from agent.kinds import KINDS
from agent.outbox.records import KindState
from agent.outbox.seqmark import SeqMarks
from agent.outbox.store import (
    CREATED_KEY,
    DB_NAME,
    DB_SUFFIXES,
    check_database,
    db_files,
    fsync_dir,
    is_corruption,
    is_disk_full,
    kind_range,
    open_cache,
    seq_of,
    ts_at,
)

log = logging.getLogger(__name__)


@dataclass
class Recovered:
    """What the writer starts from."""

    cache: Cache
    reports: list[OutboxCorrupt]
    kinds: dict[str, KindState]
    lost: dict[str, tuple[int, int]] = field(default_factory=dict)
    published: dict[str, int] = field(default_factory=dict)


def recover(path: str, marks: SeqMarks) -> Recovered:
    """Open the database under ``path`` (setting aside one SQLite cannot trust)
    and load the per-kind counters. ``marks`` is updated to cover every seq used."""
    reports: list[OutboxCorrupt] = []
    db = os.path.join(path, DB_NAME)
    fresh = True
    if os.path.exists(db):
        problem, has_marker = check_database(db)
        if problem is None and not has_marker and any(marks.reserved.values()):
            problem = ("it holds no outbox data although seqmark.json shows events were "
                       "accepted (truncated or replaced?)")
        if problem is not None:
            reports.append(set_aside(path, problem))
        else:
            fresh = not has_marker
    elif any(marks.reserved.values()):
        log.warning("outbox %s is missing although seqmark.json shows events were accepted; "
                    "starting fresh past the reserved seqs", db)
    try:
        cache = open_cache(path)
    except sqlite3.DatabaseError as exc:
        if is_disk_full(exc, path) or not is_corruption(exc):
            raise
        reports.append(set_aside(path, f"sqlite: {exc}"))
        cache = open_cache(path)
        fresh = True
    try:
        if fresh:
            _initialise(cache, marks)
        recovered = _load(cache, marks, reports)
    except BaseException:
        cache.close()
        raise
    # The writer thread opens its own connection; drop this thread's.
    cache.close()
    return recovered


def set_aside(path: str, reason: str) -> OutboxCorrupt:
    db = os.path.join(path, DB_NAME)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{db}.corrupt-{stamp}"
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{db}.corrupt-{stamp}.{n}"
    # The -wal and -shm keep their suffix after the new name, so the set-aside
    # copy still opens as one database for a post-mortem.
    for name, suffix in zip(db_files(path), DB_SUFFIXES, strict=True):
        if os.path.exists(name):
            os.replace(name, target + suffix)
    fsync_dir(path)
    report = OutboxCorrupt(db, target, reason)
    log.error("%s", report)
    return report


def _initialise(cache: Cache, marks: SeqMarks) -> None:
    """Mark a new database as ours; continue each kind past its reserved seqs,
    with the range that may have been lost recorded for its next event."""
    with cache.transact():
        cache.set(CREATED_KEY, json.dumps({"created": iso_ms(time.time())}).encode())
        for kind, reserved in marks.reserved.items():
            if kind not in KINDS or reserved <= 0:
                continue
            cache.set(f"s:{kind}", reserved)
            first_lost = marks.acked.get(kind, 0) + 1
            if first_lost <= reserved:
                cache.set(f"l:{kind}", json.dumps([first_lost, reserved]).encode())
                log.error("outbox: %s seqs %d..%d may have been lost with the old database; new "
                          "%s events start at %d", kind, first_lost, reserved, kind, reserved + 1)


def _load(cache: Cache, marks: SeqMarks, reports: list[OutboxCorrupt]) -> Recovered:
    con = cache._con
    recovered = Recovered(cache, reports, {})
    for kind in KINDS:
        lo, hi = kind_range(kind)
        depth, nbytes, first_key, last_key = con.execute(
            "SELECT count(*), total(length(value)), min(key), max(key) FROM Cache"
            " WHERE key >= ? AND key <= ? AND raw = 1", (lo, hi)).fetchone()
        state = KindState(depth=depth, bytes=int(nbytes))
        state.last_seq = int(cache.get(f"s:{kind}", 0))
        if first_key is not None:
            state.first_seq = seq_of(first_key)
            state.oldest_ts = ts_at(con, first_key)
            state.last_seq = max(state.last_seq, seq_of(last_key))
        lost = cache.get(f"l:{kind}")
        if lost is not None:
            first_lost, last_lost = json.loads(lost)
            recovered.lost[kind] = (int(first_lost), int(last_lost))
            # Until that range has gone out, a later reset must report it again.
            state.acked = int(first_lost) - 1
        else:
            # Events leave only by ack, so everything before the first one left was acked.
            state.acked = max(marks.acked.get(kind, 0),
                              state.first_seq - 1 if state.first_seq else state.last_seq)
        recovered.published[kind] = max(state.acked, marks.published.get(kind, 0))
        recovered.kinds[kind] = state
    # seqmark.json may be missing or older than the database: it must cover
    # every seq the database used before a new one is handed out.
    needed = {k: s.last_seq for k, s in recovered.kinds.items() if s.last_seq}
    reservation = marks.plan_reservation(needed)
    if reservation is not None:
        marks.commit_reservation(reservation)
    return recovered
