"""``seqmark.json``: per-kind seq high-water marks kept beside the database.

A corrupt database is set aside and a fresh one started (CONTRACT 6), but a
seq must never be used twice (CONTRACT 4). So seqs are reserved in blocks: the
file is written atomically and fsynced *before* any seq beyond the reservation
is committed, and after a reset each kind continues past its reservation.

The file also remembers, lazily, how far HQ has acknowledged and how far the
uplink has published: after a reset the range ``[acked + 1, reserved]`` is what
may have been lost (a stale, lower ``acked`` only widens that range).
"""

from __future__ import annotations

import json
import logging
import os
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


@dataclass
class SeqMarks:
    directory: str
    reserved: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    published: dict[str, int] = field(default_factory=dict)
    _block: dict[str, int] = field(default_factory=dict)
    _last_reserve: dict[str, float] = field(default_factory=dict)

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
        self._write(reserved, durable=True)
        self.reserved = reserved

    def save_lazily(self) -> None:
        """Write the acked/published marks (best effort: they only narrow a range)."""
        self._write(self.reserved, durable=False)

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
