"""The outbox's writer thread: group commit, capacity, thinning and acks.

One thread owns every write. It takes everything queued (up to
``max_batch``), stamps seq/id/ts, writes it all in one SQLite transaction
committed with ``synchronous=FULL`` and only then resolves the futures; acks
(deletes) go through it too. Everything it changes in memory (per-kind
counters, the full/disk-full conditions) is changed only after the commit
that makes it true.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from diskcache import Cache
from prometheus_client import Histogram

from agent.envelope import UUIDv7, encode, iso_ms
from agent.errors import DiskFull, EventTooLarge, OutboxError, OutboxFull
from agent.idempotency import IdempotencyKeyReused
from agent.kinds import HEADROOM_KINDS, NEVER_DROPPED, NEVER_DROPPED_TEXT, THINNED_KINDS
from agent.outbox.ballast import Ballast
from agent.outbox.drain import DrainMeter
from agent.outbox.records import Accepted, KindState, KindStats
from agent.outbox.recovery import Recovered
from agent.outbox.seqmark import SeqMarks
from agent.outbox.store import (
    INSERT_ROW,
    MAX_EVENT_BYTES,
    Row,
    event_key,
    free_bytes,
    insert_rows,
    is_disk_full,
    kind_range,
    seq_of,
    sync_wal,
    ts_at,
)
from agent.outbox.thinning import MinuteRun, scan_runs

log = logging.getLogger(__name__)

# NEVER_DROPPED, THINNED_KINDS and HEADROOM_KINDS are agent/kinds.py's; the last
# may go a little over max_bytes, so the alarm saying "outbox full" can be written.
HEADROOM_FRACTION = 0.01
# Thinning frees this much more than the event in hand needs, so readings
# arriving at the cap do not each pay for a scan.
THIN_SLACK_FRACTION = 0.01
# "full" clears once acks bring the outbox this far under max_bytes (no flapping).
FULL_CLEAR = 0.01
IDEMPOTENCY_TTL_S = 24 * 3600.0
# Rows deleted per transaction: a huge ack (after a long outage) is applied in
# rounds, so the WAL stays small and events submitted meanwhile are not stuck.
DELETE_CHUNK = 5000
IDLE_WAKE_S = 1.0  # the writer wakes this often when idle, for maintenance
EXPIRE_EVERY_S = 300.0
SEQMARK_LAZY_S = 5.0  # how often acked/published marks are saved (best effort)
ACK_RETRY_S = 2.0  # an ack whose delete failed (a full disk) is tried again this often
# Acks are applied at most this often: each delete is a transaction with its own
# fsync, and under load HQ acks every few events, so a delete per group commit halved
# the commits left for new events. An ack after a quiet spell goes at once; held ones
# go when the hold ends, or at once when the outbox is short of room or stops.
ACK_HOLD_S = 0.2


class Submit:
    __slots__ = ("data_json", "future", "idem_digest", "idem_key", "kind", "source")

    def __init__(self, kind: str, data_json: str, source: str, idem_key: str | None,
                 future: concurrent.futures.Future[Accepted],
                 idem_digest: str | None = None) -> None:
        self.kind = kind
        self.data_json = data_json
        self.source = source
        self.idem_key = idem_key
        self.future = future
        self.idem_digest = idem_digest  # the request body's digest (agent/idempotency.py)


class Ack:
    __slots__ = ("deleted", "future", "kind", "started", "upto")

    def __init__(self, kind: str, upto: int, future: concurrent.futures.Future[int]) -> None:
        self.kind = kind
        self.upto = upto
        self.future = future
        self.started = False  # taken up by the writer (a big ack takes several rounds)
        self.deleted = 0


STOP = object()  # put on the queue by close()


class _Batch:
    """What one group commit will do; applied to memory only after COMMIT."""

    def __init__(self, kinds: dict[str, KindState], thin_cursor: int) -> None:
        self._base = kinds
        self.kinds: dict[str, KindState] = {}
        self.delta_bytes = 0
        self.rows: list[Row] = []
        # Outcomes that stand whether or not the commit succeeds (refusals,
        # answers replayed from earlier commits) and those that need it.
        self.settled: list[tuple[concurrent.futures.Future[Any], Any]] = []
        self.on_commit: list[tuple[concurrent.futures.Future[Accepted], Accepted]] = []
        self.lost_used: set[str] = set()
        self.refused_full = 0
        self.replayed = 0
        self.thinned_events = 0
        self.thinned_aggregates = 0
        self.thin_cursor = thin_cursor
        self.thin_exhausted: tuple[int, int] | None = None
        # What the transaction holds until it ends (the publish lock once thinning
        # starts: see Writer._thin); _append's ``with`` lets it go.
        self.held = contextlib.ExitStack()
        self.thinning = False

    def kind(self, kind: str) -> KindState:
        state = self.kinds.get(kind)
        if state is None:
            state = self.kinds[kind] = replace(self._base[kind])
        return state


def _put_in(carry: list[object], item: object) -> None:
    if type(item) is list:
        carry.extend(item)
    else:
        carry.append(item)


class Writer:
    """State and work of the writer thread (see the module docstring).

    Attributes the facade reads from other threads (``stats``, ``total``,
    ``full_since``, ``disk_full_since``, ``counters``) are replaced or
    updated whole, never left half-changed.
    """

    def __init__(self, recovered: Recovered, *, path: str, site: str, max_bytes: int,
                 max_batch: int, clock: Callable[[], float], ballast: Ballast,
                 marks: SeqMarks, requests: queue.SimpleQueue[object],
                 listeners: list[Callable[[], None]], counters: dict[str, int],
                 drain: DrainMeter | None = None,
                 commit_seconds: Histogram | None = None,
                 after_round: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.drain = drain or DrainMeter()
        self._commit_seconds = commit_seconds
        self.site = site
        self.max_bytes = max_bytes
        self.max_batch = max_batch
        self.counters = counters
        self.cache: Cache = recovered.cache
        self._clock = clock
        self._headroom = int(max_bytes * HEADROOM_FRACTION)
        self._ballast = ballast
        self._marks = marks
        self._queue = requests
        self._listeners = listeners
        self._after_round = after_round  # after each round's requests are settled
        self._ids = UUIDv7()
        self._kinds: dict[str, KindState] = recovered.kinds
        self._lost: dict[str, tuple[int, int]] = recovered.lost
        self._published: dict[str, int] = recovered.published
        self._publish_lock = threading.Lock()
        self._published_unsaved = False  # the last durable save of a published mark failed
        self._thin_cursor = 0
        self._thin_exhausted: tuple[int, int] | None = None
        self._ballast_released = False  # by us, for deletes: appends wait for it to return
        self.total = sum(s.bytes for s in self._kinds.values())
        self.stats: dict[str, KindStats] = {}
        self.full_since: float | None = None
        self.disk_full_since: float | None = None
        # kind -> upto of acks whose delete failed: retried by the writer itself, since
        # HQ only acks again when something new reaches it.
        self._acks_to_retry: dict[str, int] = {}
        self._carry: list[object] = []  # requests taken from the queue, not yet batched
        self._publish_stats()

    def ballast_released_at_open(self) -> None:
        """The outbox opened on a full disk with the ballast's room: appends
        wait until it can be put back (acks delete meanwhile)."""
        self._ballast_released = True
        self.disk_full_since = self._clock()

    def mark_published(self, kind: str, seq: int) -> None:
        """See :meth:`Outbox.mark_published`: waits out an open thinning transaction.

        For the thinned kind the mark is on disk before this returns: after a
        kill -9 a lazily saved mark would be behind what went out, and thinning
        would fold readings HQ may already hold part of (its ack could then
        delete an aggregate covering seqs it never got).
        """
        with self._publish_lock:
            if seq > self._published.get(kind, 0):
                if kind in THINNED_KINDS:
                    try:
                        self._marks.reserve_published(kind, seq)
                        self._published_unsaved = False
                    except OSError as exc:  # a full disk must not stop the drain
                        (log.debug if self._published_unsaved else log.warning)(
                            "outbox %s: could not save the published mark of %s (%s); a "
                            "crash now could thin published readings", self.path, kind, exc)
                        self._published_unsaved = True
                self._published[kind] = seq

    def run(self) -> None:
        """The writer thread's loop, until a STOP is taken from the queue."""
        last_maintenance = last_expire = last_marks = last_ack_retry = time.monotonic()
        last_acks = 0.0
        held: list[Ack] = []  # acks put off until ACK_HOLD_S after the last applied
        stopping = False
        while not stopping:
            wait = IDLE_WAKE_S
            if held:
                wait = max(0.0, last_acks + ACK_HOLD_S - time.monotonic())
            batch = self._take(wait)
            stopping = any(r is STOP for r in batch)
            acks = [*held, *(r for r in batch if type(r) is Ack)]
            submits = [r for r in batch if type(r) is Submit]
            held = []
            # A big ack's next chunk (started) goes on at once when no events wait.
            if (acks and not stopping and time.monotonic() - last_acks < ACK_HOLD_S
                    and (submits or not all(a.started for a in acks))
                    and not self._short_of_room()):
                held, acks = acks, []
            try:
                if acks:
                    last_acks = time.monotonic()
                    self._apply_acks(acks)
                if submits:
                    self._append(submits)
            except Exception as exc:  # a bug: never leave a producer waiting forever
                log.exception("outbox writer failed on a batch")
                pending: list[Ack | Submit] = [*acks, *submits]
                for request in pending:
                    with contextlib.suppress(concurrent.futures.InvalidStateError):
                        request.future.set_exception(OutboxError(f"outbox writer failed: {exc}"))
            self._round_done()
            now = time.monotonic()
            if stopping or now - last_maintenance >= IDLE_WAKE_S:
                last_maintenance = now
                expire = now - last_expire >= EXPIRE_EVERY_S
                if expire:
                    last_expire = now
                save_marks = stopping or now - last_marks >= SEQMARK_LAZY_S
                if save_marks:
                    last_marks = now
                self._maintain(expire=expire, save_marks=save_marks)
            if self._acks_to_retry and (stopping or now - last_ack_retry >= ACK_RETRY_S):
                last_ack_retry = now
                self._retry_acks()
            self._round_done()
        self._finish()
        self._round_done()

    def _take(self, wait: float) -> list[object]:
        """Up to max_batch requests: those left over from the last round first, then the
        queue's, waiting up to ``wait`` for the first. An item may be a list (the event
        loop's appends of one pass, Outbox.append): it is taken apart here, and what does
        not fit waits for the next round, in order."""
        carry = self._carry
        if not carry:
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                return []
            _put_in(carry, item)
        while len(carry) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            _put_in(carry, item)
        if len(carry) <= self.max_batch:
            self._carry = []
            return carry
        batch, self._carry = carry[:self.max_batch], carry[self.max_batch:]
        return batch

    def _round_done(self) -> None:
        try:
            self._after_round()
        except Exception:  # a bug there must not stop the writer
            log.exception("outbox writer: after-round hook failed")

    def _short_of_room(self) -> bool:
        """Whether acks must not wait: the outbox is (nearly) full, or the disk is."""
        return (self.full_since is not None or self.disk_full_since is not None
                or self._ballast_released or self.total > self.max_bytes * 0.9)

    def _retry_acks(self) -> None:
        due, self._acks_to_retry = self._acks_to_retry, {}
        retries = [Ack(kind, upto, concurrent.futures.Future()) for kind, upto in due.items()]
        try:
            self._apply_acks(retries)
        except Exception:  # a bug: keep them for the next round rather than lose them
            log.exception("outbox %s: retrying acks failed", self.path)
            for kind, upto in due.items():
                self._acks_to_retry[kind] = max(upto, self._acks_to_retry.get(kind, 0))
            return
        done = [a for a in retries if a.future.done() and a.future.exception() is None]
        for a in done:
            log.info("outbox %s: deleted the acked %s events up to seq %d on a retry",
                     self.path, a.kind, a.upto)

    def _maintain(self, *, expire: bool, save_marks: bool) -> None:
        try:
            if expire:
                self.cache.expire()  # Idempotency-Key answers older than 24 h
            if save_marks:
                self._marks.note_published(self._published)
                self._marks.save_lazily()
        except (OSError, sqlite3.Error) as exc:
            log.debug("outbox maintenance deferred: %s", exc)
        if ((self._ballast_released or not self._ballast.present)
                and self._restore_ballast() and self.disk_full_since is not None
                and self._ballast.size > 0 and free_bytes(self.path) > self._ballast.size):
            log.info("outbox %s: disk space is back", self.path)
            self.disk_full_since = None

    def _finish(self) -> None:
        try:
            # A clean close: the exact marks replace those reserved ahead, renamed
            # into place durably (the folder fsynced too).
            self._marks.settle_published(self._published)
            self._marks.save_durably()
        except OSError as exc:
            log.debug("outbox final seqmark save skipped: %s", exc)
        try:
            # An empty WAL lets the read-only CLI open the file without creating any.
            self.cache._con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.debug("outbox final checkpoint skipped: %s", exc)
        self.cache.close()
        # SQLite fsyncs the database after a checkpoint but not the WAL's truncation
        # (nor the folder, when the last connection deletes the WAL): after a power cut
        # the frames it already copied would come back. Make both durable.
        try:
            sync_wal(self.path)
        except OSError as exc:
            log.debug("outbox final WAL sync skipped: %s", exc)

    # -- appending -------------------------------------------------------------

    def _append(self, submits: list[Submit]) -> None:
        cache = self.cache
        if self._ballast_released and not self._restore_ballast():
            # The room the ballast gave back is for deletes: new events wait
            # until the filesystem has room for the ballast again.
            self._refuse_disk_full(submits)
            return
        now = self._clock()
        ts = iso_ms(now)
        batch = _Batch(self._kinds, self._thin_cursor)
        started = time.perf_counter()
        try:
            # Whatever the transaction takes (see _thin) is let go once it has ended.
            with batch.held, cache.transact():
                con = cache._con
                self._plan(con, submits, batch, now, ts)
                if batch.rows:
                    self._reserve(batch)
                    insert_rows(con, batch.rows)
                    for kind, state in batch.kinds.items():
                        if state.last_seq != self._kinds[kind].last_seq:
                            cache.set(f"s:{kind}", state.last_seq)
                    for kind in batch.lost_used:
                        cache.delete(f"l:{kind}")
        except Exception as exc:  # any failure of the commit: every waiter hears it, none hangs
            self._rollback_quietly()
            self._settle(batch.settled)
            error = self._map_error(exc, "writing events")
            # Every request not settled above fails: those planned into the
            # rolled-back transaction and any the plan had not reached yet.
            failed = [s.future for s in submits if not s.future.done()]
            if isinstance(error, DiskFull):
                self.counters["refused_disk"] += len(failed)
            for future in failed:
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    future.set_exception(error)
            self._count_batch(batch, committed=False)
            return
        self._apply(batch)
        if batch.rows or batch.thinned_aggregates:
            self.counters["commits"] += 1
            if self._commit_seconds is not None:
                self._commit_seconds.observe(time.perf_counter() - started)
        if batch.rows and self.disk_full_since is not None:
            log.info("outbox %s: disk space is back; accepting events again", self.path)
            self.disk_full_since = None
        self._settle(batch.settled)
        for future, accepted in batch.on_commit:
            future.set_result(accepted)
        self._count_batch(batch, committed=True)
        # The answers' loop wake before the listeners' (the uplink's): the 202s go first.
        self._round_done()
        if batch.rows:
            for listener in self._listeners:
                try:
                    listener()
                except Exception:  # a listener's bug must not undo a durable commit
                    log.exception("outbox listener failed")

    def _plan(self, con: sqlite3.Connection, submits: list[Submit], batch: _Batch,
              now: float, ts: str) -> None:
        # The per-event loop of every group commit: names are bound locally
        # because this runs single-threaded for every event accepted.
        wall = time.time()  # diskcache's own clock for store/expire times
        now_ms = int(now * 1000)
        keys = [s.idem_key for s in submits if s.idem_key is not None]
        stored = self._stored_answers(con, keys, wall) if keys else {}
        in_batch: dict[str, Accepted] = {}
        idem_rows: list[Row] = []
        rows_append = batch.rows.append
        on_commit_append = batch.on_commit.append
        new_id = self._ids.new
        site = self.site
        total = self.total
        for sub in submits:
            future = sub.future
            if not future.set_running_or_notify_cancel():
                continue  # the caller gave up before it was written
            key = sub.idem_key
            if key is not None:
                first = in_batch.get(key) or stored.get(key)
                if first is not None and first.digest is not None \
                        and sub.idem_digest is not None and first.digest != sub.idem_digest:
                    batch.settled.append((future, IdempotencyKeyReused(key)))
                    continue
                if key in in_batch:
                    on_commit_append((future, replace(in_batch[key], replay=True)))
                    batch.replayed += 1
                    continue
                if key in stored:
                    batch.settled.append((future, replace(stored[key], replay=True)))
                    batch.replayed += 1
                    continue
            kind = sub.kind
            state = batch.kind(kind)
            seq = state.last_seq + 1
            event_id = new_id(now_ms)
            lost = self._lost.get(kind) if self._lost and kind not in batch.lost_used else None
            envelope = encode(event_id=event_id, site=site, kind=kind, seq=seq, ts=ts,
                              source=sub.source, data_json=sub.data_json,
                              extra={"lost": list(lost)} if lost else None)
            size = len(envelope)
            if size > MAX_EVENT_BYTES:
                batch.settled.append((future, EventTooLarge(kind, size, MAX_EVENT_BYTES)))
                continue
            if total + batch.delta_bytes + size > self.max_bytes:
                refusal = self._make_room(con, batch, kind, size, wall)
                if refusal is not None:
                    batch.refused_full += 1
                    batch.settled.append((future, refusal))
                    continue
            state.last_seq = seq
            state.depth += 1
            state.bytes += size
            if state.first_seq is None:
                state.first_seq = seq
                state.oldest_ts = now
            batch.delta_bytes += size
            if lost:
                batch.lost_used.add(kind)
            rows_append((event_key(kind, seq), wall, None, wall, envelope))
            accepted = Accepted(event_id, seq, kind, ts)
            if key is not None:
                in_batch[key] = replace(accepted, digest=sub.idem_digest)
                first_answer: dict[str, Any] = {"id": event_id, "seq": seq, "kind": kind,
                                                "ts": ts}
                if sub.idem_digest is not None:
                    first_answer["h"] = sub.idem_digest
                answer = json.dumps(first_answer)
                idem_rows.append((f"i:{key}", wall, wall + IDEMPOTENCY_TTL_S, wall,
                                  answer.encode()))
            on_commit_append((future, accepted))
        batch.rows.extend(idem_rows)

    def _stored_answers(self, con: sqlite3.Connection, keys: list[str], wall: float
                        ) -> dict[str, Accepted]:
        """Earlier answers for these Idempotency-Keys; expired ones are removed
        here so the new answer's INSERT does not collide with them."""
        found: dict[str, Accepted] = {}
        expired: list[tuple[str]] = []
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), 500):
            chunk = [f"i:{k}" for k in unique[i:i + 500]]
            marks = ",".join("?" * len(chunk))
            for db_key, expire_time, value in con.execute(
                    f"SELECT key, expire_time, value FROM Cache WHERE key IN ({marks})"  # noqa: S608
                    " AND raw = 1", chunk):
                if expire_time is not None and expire_time <= wall:
                    expired.append((db_key,))
                    continue
                answer = json.loads(value)
                found[db_key[2:]] = Accepted(answer["id"], answer["seq"], answer["kind"],
                                             answer["ts"], digest=answer.get("h"))
        if expired:
            con.executemany("DELETE FROM Cache WHERE key = ? AND raw = 1", expired)
        return found

    def _reserve(self, batch: _Batch) -> None:
        needed = {k: s.last_seq for k, s in batch.kinds.items()
                  if s.last_seq > self._kinds[k].last_seq}
        reservation = self._marks.plan_reservation(needed) if needed else None
        if reservation is not None:
            # Durable before the COMMIT that uses the seqs (seqmark.py says why).
            self._marks.commit_reservation(reservation)

    def _make_room(self, con: sqlite3.Connection, batch: _Batch, kind: str, size: int,
                   wall: float) -> OutboxFull | None:
        limit = self.max_bytes + (self._headroom if kind in HEADROOM_KINDS else 0)
        used = self.total + batch.delta_bytes
        if used + size <= limit:
            return None
        need = used + size - limit
        freed = self._thin(con, batch, need + int(self.max_bytes * THIN_SLACK_FRACTION), wall)
        if freed >= need:
            return None
        return OutboxFull(kind, self.total + batch.delta_bytes, self.max_bytes)

    # -- thinning ------------------------------------------------------------

    def _thin(self, con: sqlite3.Connection, batch: _Batch, target: int, wall: float) -> int:
        """Fold the oldest never-published raw sensor readings into per-minute
        aggregates until ``target`` bytes are freed or none are left."""
        if not batch.thinning:
            # Held until this transaction ends (see mark_published).
            batch.held.enter_context(self._publish_lock)
            batch.thinning = True
        start = max(self._published.get("sensor", 0), batch.thin_cursor)
        guard = (start, self._kinds["sensor"].last_seq)
        if guard in (self._thin_exhausted, batch.thin_exhausted):
            return 0  # scanned already, and nothing new has arrived since
        freed = 0
        for item in scan_runs(con, start):
            if isinstance(item, int):  # an aggregate: already as thin as it gets
                batch.thin_cursor = max(batch.thin_cursor, item)
                continue
            freed += self._fold(con, batch, item, wall)
            # Everything up to here is folded or cannot be (a lone reading).
            batch.thin_cursor = max(batch.thin_cursor, item.last_seq)
            if freed >= target:
                return freed
        batch.thin_exhausted = (max(self._published.get("sensor", 0), batch.thin_cursor),
                                self._kinds["sensor"].last_seq)
        return freed

    def _fold(self, con: sqlite3.Connection, batch: _Batch, run: MinuteRun, wall: float) -> int:
        if run.count < 2:
            return 0
        envelope = encode(
            event_id=self._ids.new(int(self._clock() * 1000)), site=self.site, kind="sensor",
            seq=run.first_seq,
            ts=run.first_ts, source=run.source(),
            data_json=json.dumps(run.data(), separators=(",", ":")),
            extra={"seq_end": run.last_seq, **({"lost": run.lost} if run.lost else {})})
        saved = run.bytes - len(envelope)
        if saved <= 0:
            return 0
        first, last = event_key("sensor", run.first_seq), event_key("sensor", run.last_seq)
        con.execute("DELETE FROM Cache WHERE key >= ? AND key <= ? AND raw = 1", (first, last))
        con.execute(INSERT_ROW, (first, wall, None, wall, envelope))
        state = batch.kind("sensor")
        state.depth -= run.count - 1
        state.bytes -= saved
        batch.delta_bytes -= saved
        batch.thinned_events += run.count
        batch.thinned_aggregates += 1
        return saved

    # -- acks ----------------------------------------------------------------

    def _apply_acks(self, acks: list[Ack]) -> None:
        live: list[Ack] = []
        for a in acks:
            if a.started or a.future.set_running_or_notify_cancel():
                a.started = True
                live.append(a)
        wanted: dict[str, int] = {}
        for a in live:
            wanted[a.kind] = max(wanted.get(a.kind, 0), a.upto)
        # Acks only move forward, and never past the last seq handed out.
        work = {k: min(upto, self._kinds[k].last_seq) for k, upto in wanted.items()}
        work = {k: upto for k, upto in work.items() if upto > self._kinds[k].acked}
        deleted: dict[str, int] = {}
        if work:
            try:
                deleted = self._delete(work)
            except Exception as exc:  # any failure of the delete: the acked events stay, retried
                self._rollback_quietly()
                if not is_disk_full(exc, self.path):
                    self._ack_failed(work)
                    self._fail(live, self._map_error(exc, "deleting acknowledged events"))
                    return
                # A delete writes WAL frames too, so on a full disk the acks
                # that would free space fail: give them the ballast's room.
                self._map_error(exc, "deleting acknowledged events")
                if self._ballast.release():
                    self._ballast_released = True
                self._checkpoint()
                try:
                    deleted = self._delete(work)
                except Exception as exc2:  # as above, after the ballast was freed
                    self._rollback_quietly()
                    self._ack_failed(work)
                    self._fail(live, self._map_error(exc2, "deleting acknowledged events"))
                    return
        for a in live:
            a.deleted += deleted.pop(a.kind, 0)  # counted once, on the first ack of the kind
            if min(a.upto, self._kinds[a.kind].last_seq) > self._kinds[a.kind].acked:
                # More than one chunk to delete: back of the queue, so events
                # submitted meanwhile are not held up behind a huge delete.
                self._queue.put(a)
            else:
                a.future.set_result(a.deleted)
        if self.disk_full_since is not None and any(a.deleted for a in live):
            # Hand the freed pages back to the filesystem, then see if there is room.
            self._checkpoint()
            if self._restore_ballast() and free_bytes(self.path) > self._ballast.size:
                log.info("outbox %s: disk space is back after acks", self.path)
                self.disk_full_since = None

    def _ack_failed(self, work: dict[str, int]) -> None:
        """Keep a failed ack for :meth:`_retry_acks` (acks only move forward)."""
        for kind, upto in work.items():
            self._acks_to_retry[kind] = max(upto, self._acks_to_retry.get(kind, 0))

    def _delete(self, work: dict[str, int]) -> dict[str, int]:
        cache = self.cache
        states: dict[str, KindState] = {}
        deleted: dict[str, int] = {}
        with cache.transact():
            con = cache._con
            for kind, upto in work.items():
                lo, kind_hi = kind_range(kind)
                # At most DELETE_CHUNK rows per transaction: bounded WAL growth
                # and no long stall for producers after a long outage.
                beyond = con.execute(
                    "SELECT key FROM Cache WHERE key >= ? AND key <= ? AND raw = 1"
                    " ORDER BY key LIMIT 1 OFFSET ?",
                    (lo, event_key(kind, upto), DELETE_CHUNK)).fetchone()
                if beyond is not None:
                    upto = seq_of(beyond[0]) - 1
                hi = event_key(kind, upto)
                count, nbytes = con.execute(
                    "SELECT count(*), total(length(value)) FROM Cache"
                    " WHERE key >= ? AND key <= ? AND raw = 1", (lo, hi)).fetchone()
                if count:
                    con.execute("DELETE FROM Cache WHERE key >= ? AND key <= ? AND raw = 1",
                                (lo, hi))
                state = replace(self._kinds[kind], acked=upto)
                state.depth -= count
                state.bytes -= int(nbytes)
                first = con.execute(
                    "SELECT key FROM Cache WHERE key > ? AND key <= ? AND raw = 1"
                    " ORDER BY key LIMIT 1", (hi, kind_hi)).fetchone()
                state.first_seq = seq_of(first[0]) if first else None
                state.oldest_ts = ts_at(con, first[0]) if first else None
                states[kind] = state
                deleted[kind] = count
        for kind, state in states.items():
            self.total += state.bytes - self._kinds[kind].bytes
            self._kinds[kind] = state
            self._marks.note_acked(kind, state.acked)
        for kind, count in deleted.items():
            self.drain.note(kind, count)
        self.counters["acked"] += sum(deleted.values())
        if self.full_since is not None and self.total <= self.max_bytes * (1 - FULL_CLEAR):
            log.info("outbox %s: below max_bytes again (%d of %d bytes)", self.path,
                     self.total, self.max_bytes)
            self.full_since = None
        self._publish_stats()
        return deleted

    # -- shared helpers ----------------------------------------------------------

    def _apply(self, batch: _Batch) -> None:
        for kind, state in batch.kinds.items():
            self._kinds[kind] = state
        self.total += batch.delta_bytes
        for kind in batch.lost_used:
            self._lost.pop(kind, None)
        self._thin_cursor = batch.thin_cursor
        if batch.thin_exhausted is not None:
            self._thin_exhausted = batch.thin_exhausted
        self._publish_stats()

    def _count_batch(self, batch: _Batch, *, committed: bool) -> None:
        c = self.counters
        c["refused_full"] += batch.refused_full
        c["replayed"] += batch.replayed
        if committed:
            c["accepted"] += len(batch.on_commit)
            c["thinned_events"] += batch.thinned_events
            c["thinned_aggregates"] += batch.thinned_aggregates
        if (committed and self.full_since is not None and not batch.refused_full
                and any(r[1].kind in NEVER_DROPPED for r in batch.on_commit)):
            self.full_since = None  # room again (thinning or acks): sales go through
        if batch.refused_full and self.full_since is None:
            self.full_since = self._clock()
            log.error("outbox %s full (%d of %d bytes): refusing %s events until HQ "
                      "acknowledges the backlog", self.path, self.total, self.max_bytes,
                      NEVER_DROPPED_TEXT)

    def _publish_stats(self) -> None:
        self.stats = {k: s.stats(k) for k, s in self._kinds.items()}

    def _settle(self, outcomes: list[tuple[concurrent.futures.Future[Any], Any]]) -> None:
        for future, outcome in outcomes:
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _restore_ballast(self) -> bool:
        if self._ballast.ensure():
            self._ballast_released = False
            return True
        return False

    def _refuse_disk_full(self, submits: list[Submit]) -> None:
        error = DiskFull(self.path)
        for sub in submits:
            if sub.future.set_running_or_notify_cancel():
                sub.future.set_exception(error)
                self.counters["refused_disk"] += 1

    def _fail(self, requests: list[Ack], error: OutboxError) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)

    def _map_error(self, exc: BaseException, doing: str) -> OutboxError:
        """Foreign errors become the outbox's own, once, here."""
        if is_disk_full(exc, self.path):
            if self.disk_full_since is None:
                self.disk_full_since = self._clock()
                log.error("outbox %s: disk full while %s (%s); refusing events until space "
                          "returns", self.path, doing, exc)
            return DiskFull(self.path)
        if isinstance(exc, OutboxError):
            return exc
        log.error("outbox %s: %s failed: %r", self.path, doing, exc)
        return OutboxError(f"outbox {self.path}: {doing} failed: {exc}")

    def _rollback_quietly(self) -> None:
        # diskcache rolls back when the body raises but not when COMMIT itself
        # fails (SQLITE_FULL at commit); a transaction left open would make
        # every later BEGIN fail.
        con = self.cache._con
        if con.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")

    def _checkpoint(self) -> None:
        try:
            self.cache._con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.debug("outbox checkpoint failed: %s", exc)
