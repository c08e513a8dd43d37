"""``seqmark.json``: per-kind seq high-water marks kept beside the database.

A corrupt database is set aside and a fresh one started (CONTRACT 6), but a
seq must never be used twice (CONTRACT 4). So seqs are reserved in blocks: the
file is written atomically and fsynced *before* any seq beyond the reservation
is committed, and after a reset each kind continues past its reservation.

The file also remembers, lazily, how far HQ has acknowledged: after a reset
the range ``[acked + 1, reserved]`` is what may have been lost (a stale, lower
``acked`` only widens that range). How far the uplink may have published a
thinned kind is reserved ahead, durably, like seqs (:meth:`SeqMarks.reserve_published`):
after a kill -9 thinning must not fold readings that already went to MQTT.

The writer thread and the uplink thread (through ``mark_published``) both
write the file, so every write and every change to the marks holds one lock.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from agent.outbox.store import fsync_dir

log = logging.getLogger(__name__)

SEQMARK_NAME = "seqmark.json"
SEQ_BLOCK = 1000
# Under load the block doubles (up to this) so a reservation, three fsyncs on a
# slow card, is paid about once a second rather than every 1000 events.
SEQ_BLOCK_MAX = 64 * SEQ_BLOCK
FAST_RESERVE_S = 1.0
# A published mark is saved this far ahead, so a reading handed to MQTT costs a
# durable write about once per block rather than once per uplink read.
PUBLISHED_AHEAD = SEQ_BLOCK


@dataclass
class SeqMarks:
    directory: str
    reserved: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    published: dict[str, int] = field(default_factory=dict)
    _block: dict[str, int] = field(default_factory=dict)
    _last_reserve: dict[str, float] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, SEQMARK_NAME)

    @classmethod
    def load(cls, directory: str) -> SeqMarks:
        marks = cls(directory)
        try:
            with open(marks.path, "rb") as fh:
                doc = json.load(fh)
            for kind, entry in doc["kinds"].items():
                marks.reserved[kind] = int(entry.get("reserved", 0))
                marks.acked[kind] = int(entry.get("acked", 0))
                marks.published[kind] = int(entry.get("published", 0))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Only the database can be trusted now; say so once, loudly.
            log.error("outbox %s unreadable (%s); seq reservations start again from the "
                      "database's own counters", marks.path, exc)
        return marks

    def plan_reservation(self, needed: dict[str, int], now: float | None = None
                         ) -> dict[str, int] | None:
        """New reservations covering ``needed`` (kind -> highest seq about to be
        used), or None when the current ones already do."""
        if all(seq <= self.reserved.get(kind, 0) for kind, seq in needed.items()):
            return None
        now = time.monotonic() if now is None else now
        new = dict(self.reserved)
        for kind, seq in needed.items():
            if seq <= new.get(kind, 0):
                continue
            last = self._last_reserve.get(kind)
            block = self._block.get(kind, SEQ_BLOCK)
            block = min(block * 2, SEQ_BLOCK_MAX) if last and now - last < FAST_RESERVE_S \
                else SEQ_BLOCK
            self._block[kind] = block
            self._last_reserve[kind] = now
            new[kind] = -(-(seq + block - SEQ_BLOCK) // SEQ_BLOCK) * SEQ_BLOCK
        return new

    def commit_reservation(self, reserved: dict[str, int]) -> None:
        """Durably write ``reserved``; only then are the seqs in it usable."""
        with self._lock:
            self._write(reserved, durable=True)
            self.reserved = reserved

    def save_lazily(self) -> None:
        """Write the acked/published marks (best effort: they only narrow a range)."""
        with self._lock:
            self._write(self.reserved, durable=False)

    def save_durably(self) -> None:
        """Write every mark, renamed into place with the folder fsynced (a clean close)."""
        with self._lock:
            self._write(self.reserved, durable=True)

    def note_acked(self, kind: str, seq: int) -> None:
        with self._lock:
            self.acked[kind] = max(self.acked.get(kind, 0), seq)

    def note_published(self, published: dict[str, int]) -> None:
        """Raise the published marks to ``published`` (never lowers one reserved ahead)."""
        with self._lock:
            for kind, seq in published.items():
                if seq > self.published.get(kind, 0):
                    self.published[kind] = seq

    def settle_published(self, published: dict[str, int]) -> None:
        """At a clean close: the exact marks (nothing is published after it)."""
        with self._lock:
            self.published.update(published)

    def reserve_published(self, kind: str, seq: int) -> None:
        """Make sure the file says ``kind`` may be published up to ``seq`` before
        it is: durably, ``PUBLISHED_AHEAD`` beyond, so most calls write nothing."""
        with self._lock:
            if seq <= self.published.get(kind, 0):
                return
            before = self.published.get(kind, 0)
            self.published[kind] = seq + PUBLISHED_AHEAD
            try:
                self._write(self.reserved, durable=True)
            except BaseException:
                self.published[kind] = before
                raise

    def _write(self, reserved: dict[str, int], durable: bool) -> None:
        kinds = set(reserved) | set(self.acked) | set(self.published)
        doc = {"v": 1, "kinds": {k: {"reserved": reserved.get(k, 0),
                                     "acked": self.acked.get(k, 0),
                                     "published": self.published.get(k, 0)}
                                 for k in sorted(kinds)}}
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(json.dumps(doc, separators=(",", ":")).encode())
            fh.flush()
            # Always fsync the file itself: a rename of unsynced data can
            # leave an empty file after power loss, losing the reservations.
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        if durable:
            fsync_dir(self.directory)
