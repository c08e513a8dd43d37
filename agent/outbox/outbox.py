"""The durable outbox: every accepted event, on disk, until HQ acknowledges it.

The thread-safe face of the outbox. Producers call :meth:`Outbox.submit`
from any thread and get a ``concurrent.futures.Future`` that resolves once
the event is committed with ``synchronous=FULL`` (group commit, see
:mod:`agent.outbox.writer`); the uplink reads with :meth:`Outbox.read` in its
own thread (diskcache keeps a connection per thread; WAL readers never block
the writer) and deletes with :meth:`Outbox.ack`. Status reads in-memory
counters, computed once at open with SQL aggregates, so it is cheap and the
backlog is never loaded into memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Histogram

from agent.envelope import iso_ms
from agent.errors import DiskFull, EventTooLarge, OutboxCorrupt, OutboxError
from agent.kinds import KINDS, NEVER_DROPPED_TEXT
from agent.outbox.ballast import Ballast
from agent.outbox.drain import DrainMeter
from agent.outbox.epoch import start_epoch
from agent.outbox.reader import OutboxReader
from agent.outbox.records import Accepted, KindState, KindStats
from agent.outbox.recovery import recover
from agent.outbox.seqmark import SeqMarks
from agent.outbox.store import (
    MAX_EVENT_BYTES,
    SEQ_MAX,
    event_key,
    is_disk_full,
    seq_of,
    sync_wal,
)
from agent.outbox.writer import STOP, Ack, Submit, Writer

log = logging.getLogger(__name__)

_IDLE_STATS = {k: KindState().stats(k) for k in KINDS}
# Group commit buckets (seconds): an fsync on an SSD takes well under a millisecond, on
# an SD card tens of milliseconds, on a dying one seconds.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _LoopWaiters:
    """The asyncio futures awaiting the writer's, resolved on their loop in one wake
    per writer round.

    ``asyncio.wrap_future`` makes one ``call_soon_threadsafe`` per event, each a
    write to the loop's self-pipe that lets the loop thread take the GIL from the
    writer in the middle of resolving a group commit: the batch's answers went out
    one handover at a time. Here the writer thread only notes what is done; at the
    end of its round (:meth:`round_done`) each loop gets one callback that
    resolves all of them. A future resolved in any other thread (a refusal in
    :meth:`Outbox.submit`) wakes its loop at once. Cancelling the awaiting side
    cancels the writer's future, as ``wrap_future`` does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[asyncio.AbstractEventLoop, list[tuple[
            concurrent.futures.Future[Any], asyncio.Future[Any]]]] = {}
        self._scheduled: set[asyncio.AbstractEventLoop] = set()
        self.writer_thread: int | None = None

    def watch(self, future: concurrent.futures.Future[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        waiter.add_done_callback(lambda w: future.cancel() if w.cancelled() else None)
        future.add_done_callback(lambda f: self._done(loop, f, waiter))
        return waiter

    def _done(self, loop: asyncio.AbstractEventLoop, future: concurrent.futures.Future[Any],
              waiter: asyncio.Future[Any]) -> None:
        if future.cancelled() and waiter.cancelled():
            return  # the awaiting side gave up (and cancelled it, on its own loop)
        with self._lock:
            self._due.setdefault(loop, []).append((future, waiter))
        if threading.get_ident() != self.writer_thread:
            self._signal(loop)

    def round_done(self) -> None:
        """The writer thread, after each round: wake every loop with answers due."""
        if not self._due:
            return
        with self._lock:
            loops = list(self._due)
        for loop in loops:
            self._signal(loop)

    def _signal(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if not self._due.get(loop) or loop in self._scheduled:
                return
            self._scheduled.add(loop)
        try:
            loop.call_soon_threadsafe(self._flush, loop)
        except RuntimeError:  # that loop is closed: nobody awaits these any more
            with self._lock:
                self._scheduled.discard(loop)
                self._due.pop(loop, None)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            items = self._due.pop(loop, [])
            self._scheduled.discard(loop)
        for future, waiter in items:
            if waiter.done():
                continue
            if future.cancelled():
                waiter.cancel()
                continue
            exc = future.exception()
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(future.result())


class Outbox:
    """The durable, size-capped outbox of one site (see the module docstring)."""

    def __init__(self, path: str, site: str, *, max_bytes: int, max_batch: int = 2000,
                 ballast_bytes: int = 1 << 20, clock: Callable[[], float] = time.time) -> None:
        self.path = os.path.abspath(path)
        self.site = site
        self.max_bytes = max_bytes
        self.max_batch = max_batch
        self.counters: dict[str, int] = dict.fromkeys(
            ("accepted", "replayed", "acked", "refused_full", "refused_disk", "thinned_events",
             "thinned_aggregates", "commits", "corrupt_moved"), 0)
        self._clock = clock
        self._ballast = Ballast(self.path, ballast_bytes)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submit/ack against close
        self._closed = False
        self._writer: Writer | None = None
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[], None]] = []
        self._waiters = _LoopWaiters()
        # Per event loop, what append() took in the loop's current pass (only that
        # loop's thread touches its list); _hand_over puts it on the queue as one.
        self._loop_pending: dict[asyncio.AbstractEventLoop, list[Submit]] = {}
        self._corrupt: list[OutboxCorrupt] = []
        # This opening's epoch (agent/outbox/epoch.py); the uplink puts it on the wire.
        self.epoch = ""
        # How fast acks empty it (agent/outbox/drain.py), for status.
        self.drain = DrainMeter()
        # Each group commit's time (the transaction and its fsync), for /metrics; not in
        # any registry: agent/ops/metrics.py exports it from here.
        self.commit_seconds = Histogram(
            "edge_outbox_commit_duration_seconds",
            "Time of one group commit of events (the SQLite transaction and its fsync)",
            buckets=COMMIT_BUCKETS, registry=None)

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> list[OutboxCorrupt]:
        """Open (or create) the outbox and start the writer thread.

        A database SQLite does not trust is moved aside and a fresh one
        started; the reports are returned (and kept for :meth:`status_alarms`).
        """
        if self._writer is not None or self._closed:
            raise OutboxError(f"outbox {self.path} is already open or was closed")
        ballast_released = False
        while True:
            try:
                os.makedirs(self.path, exist_ok=True)
                marks = SeqMarks.load(self.path)
                recovered = recover(self.path, marks)
                break
            except (OSError, sqlite3.Error) as exc:
                if not is_disk_full(exc, self.path):
                    raise OutboxError(f"outbox {self.path} cannot be opened: {exc}") from exc
                # Even opening writes (WAL, -shm, settings): on a full disk the
                # ballast's room lets the daemon start and drain, which is what
                # frees space. New events stay refused until the ballast fits again.
                if ballast_released or not self._ballast.release():
                    raise DiskFull(self.path) from exc
                ballast_released = True
        self._corrupt.extend(recovered.reports)
        self.counters["corrupt_moved"] += len(recovered.reports)
        self.epoch = start_epoch(self.path)
        if not ballast_released:
            self._ballast.ensure()
        self._writer = Writer(recovered, path=self.path, site=self.site,
                              max_bytes=self.max_bytes, max_batch=self.max_batch,
                              clock=self._clock, ballast=self._ballast, marks=marks,
                              requests=self._queue, listeners=self._listeners,
                              counters=self.counters, drain=self.drain,
                              commit_seconds=self.commit_seconds,
                              after_round=self._waiters.round_done)
        if ballast_released:
            self._writer.ballast_released_at_open()
        self._thread = threading.Thread(target=self._writer.run, name="outbox-writer",
                                        daemon=True)
        self._thread.start()
        self._waiters.writer_thread = self._thread.ident
        return recovered.reports

    def close(self, timeout: float | None = None) -> None:
        """Commit what is queued, stop the writer thread and close the database.

        ``timeout``: how long to wait for the writer (None: as long as it takes). A
        writer still busy after it (an fsync on a dying card) is logged and left to
        finish on its own: what it commits is durable, what it has not was never
        acknowledged.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread is not None:
            self._queue.put(STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("outbox %s: the writer did not finish within %.1f s; exiting "
                          "without waiting for it", self.path, timeout or 0.0)
                return
        # Anything that raced in behind the stop, or that the writer's last round left.
        leftover: list[object] = list(self._writer._carry) if self._writer else []
        while True:
            if leftover:
                request = leftover.pop(0)
            else:
                try:
                    request = self._queue.get_nowait()
                except queue.Empty:
                    break
            for each in request if isinstance(request, list) else [request]:
                if isinstance(each, Submit | Ack):
                    with contextlib.suppress(concurrent.futures.InvalidStateError):
                        each.future.set_exception(OutboxError(f"outbox {self.path} is closed"))
        if self._writer is not None:
            self._writer.cache.close()  # this thread's connection, if it read
            # The last connection closed deletes the WAL: make that unlink durable.
            with contextlib.suppress(OSError):
                sync_wal(self.path)

    # -- producers ----------------------------------------------------------

    def writer_alive(self) -> bool:
        """Whether the writer thread runs (``/healthz``): False once closed or crashed."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._closed

    def submit(self, kind: str, data_json: str, source: str, idem_key: str | None = None,
               idem_digest: str | None = None) -> concurrent.futures.Future[Accepted]:
        """Queue an event; the future resolves once its transaction committed."""
        future, request = self._request(kind, data_json, source, idem_key, idem_digest)
        if request is not None:
            with self._lock:
                if self._closed or self._thread is None:
                    raise OutboxError(f"outbox {self.path} is not open")
                self._queue.put(request)
        return future

    def _request(self, kind: str, data_json: str, source: str, idem_key: str | None,
                 idem_digest: str | None
                 ) -> tuple[concurrent.futures.Future[Accepted], Submit | None]:
        """The future and the writer's request (None: refused at once, on the future)."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r} (one of {', '.join(KINDS)})")
        future: concurrent.futures.Future[Accepted] = concurrent.futures.Future()
        if len(data_json) > MAX_EVENT_BYTES:
            future.set_exception(EventTooLarge(kind, len(data_json), MAX_EVENT_BYTES))
            return future, None
        return future, Submit(kind, data_json, source, idem_key, future, idem_digest)

    async def append(self, kind: str, data_json: str, source: str,
                     idem_key: str | None = None, idem_digest: str | None = None) -> Accepted:
        """:meth:`submit` from the event loop, awaiting the commit (see :meth:`enqueue`)."""
        return await self.enqueue(kind, data_json, source, idem_key, idem_digest)

    def enqueue(self, kind: str, data_json: str, source: str, idem_key: str | None = None,
                idem_digest: str | None = None) -> asyncio.Future[Accepted]:
        """:meth:`submit` from the event loop: a future of the loop, done on the commit.

        Queued when called, so ``asyncio.shield`` of it needs no task of its own (the
        API's event post: a task per request was a loop pass more before the hand-over).

        What the loop appends in one pass of its callbacks reaches the writer as one
        list, one ``put`` (:meth:`_hand_over` at the end of the pass): a put per event
        woke the writer thread for the first and let it start a commit of one while the
        rest of the pass's events were still coming. The answers come back in one loop
        wake per group commit (_LoopWaiters), not asyncio.wrap_future's one per event.
        """
        future, request = self._request(kind, data_json, source, idem_key, idem_digest)
        if request is not None:
            if self._closed or self._thread is None:
                raise OutboxError(f"outbox {self.path} is not open")
            loop = asyncio.get_running_loop()
            pending = self._loop_pending.get(loop)
            if pending is None:
                pending = self._loop_pending[loop] = []
                loop.call_soon(self._hand_over, loop)
            pending.append(request)
        waiter: asyncio.Future[Accepted] = self._waiters.watch(future)
        return waiter

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``, after the callbacks that appended: their requests to the writer."""
        requests = self._loop_pending.pop(loop, [])
        with self._lock:
            if not self._closed:
                self._queue.put(requests)
                return
        for request in requests:   # closed between the append and this pass's end
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                request.future.set_exception(OutboxError(f"outbox {self.path} is closed"))

    # -- the uplink ----------------------------------------------------------

    def read(self, kind: str, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` events of ``kind`` with seq > ``after_seq``, ascending."""
        writer = self._writer
        if writer is None or self._closed:
            raise OutboxError(f"outbox {self.path} is not open")
        try:
            # diskcache keeps one connection per thread; a single range scan
            # of the (key, raw) index, so a huge backlog is never in memory.
            rows = writer.cache._con.execute(
                "SELECT key, value FROM Cache WHERE key > ? AND key <= ? AND raw = 1"
                " ORDER BY key LIMIT ?",
                (event_key(kind, max(after_seq, 0)), event_key(kind, SEQ_MAX), max(limit, 0)),
            ).fetchall()
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {self.path}: reading {kind} failed: {exc}") from exc
        return [(seq_of(key), bytes(value)) for key, value in rows]

    def ack(self, kind: str, upto: int) -> concurrent.futures.Future[int]:
        """Delete every event of ``kind`` with seq <= ``upto``; resolves to the
        number deleted (once all are). A lower ack than one already applied
        changes nothing."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        with self._lock:
            if self._closed or self._thread is None:
                raise OutboxError(f"outbox {self.path} is not open")
            self._queue.put(Ack(kind, upto, future))
        return future

    def add_listener(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def mark_published(self, kind: str, seq: int) -> None:
        """The uplink is about to publish up to ``seq``: thinning stays off it.

        Waits while a thinning transaction is open, so once this returns no
        fold of seq <= ``seq`` can still commit, and one that committed is
        seen by the next :meth:`read` (else raw readings could go out while
        the aggregate replacing them is never sent).
        """
        if kind in KINDS and self._writer is not None and not self._closed:
            self._writer.mark_published(kind, seq)

    # -- status ------------------------------------------------------------

    def stats(self) -> dict[str, KindStats]:
        """Every kind's depth, bytes, oldest accepted time and seq range (in memory)."""
        return dict(self._writer.stats if self._writer else _IDLE_STATS)

    @property
    def total_bytes(self) -> int:
        return self._writer.total if self._writer else 0

    @property
    def state(self) -> str:
        """``"ok"``, ``"full"`` (at max_bytes) or ``"disk_full"``."""
        writer = self._writer
        if writer is not None and writer.disk_full_since is not None:
            return "disk_full"
        return "full" if writer is not None and writer.full_since is not None else "ok"

    def status_alarms(self) -> list[dict[str, Any]]:
        """The open conditions for status: full, disk full, a corrupt file set aside."""
        alarms: list[dict[str, Any]] = []
        writer = self._writer
        full_since = writer.full_since if writer else None
        disk_full_since = writer.disk_full_since if writer else None
        if full_since is not None:
            alarms.append({
                "code": "outbox_full", "since": iso_ms(full_since),
                "message": f"outbox at max_bytes ({self.total_bytes} of {self.max_bytes} "
                           f"bytes): {NEVER_DROPPED_TEXT} events are refused until HQ "
                           "catches up"})
        if disk_full_since is not None:
            alarms.append({
                "code": "outbox_disk_full", "since": iso_ms(disk_full_since),
                "message": f"disk full under {self.path}: events are refused until space "
                           "returns"})
        for report in self._corrupt:
            alarms.append({"code": "outbox_corrupt", "message": str(report),
                           "moved_to": report.moved_to})
        return alarms

    @staticmethod
    def inspect(path: str) -> OutboxReader:
        """A read-only view for the CLI (the daemon stopped): stats, peek, export."""
        return OutboxReader(path)

    def __repr__(self) -> str:
        return f"Outbox({self.path!r}, state={self.state}, bytes={self.total_bytes})"
