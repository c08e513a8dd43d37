"""The outbox's epoch: which run of which outbox is sending (issue 9, CONTRACT 4 proposal).

An event's identity is its ``id``; its ``seq`` is only unique within one
timeline of one outbox. A box replaced with an empty disk, a wiped outbox and
a box restored from an old backup all start counting again from a seq HQ has
already seen, and nothing on the box can tell a restored backup from a plain
restart: the backup holds the same files. So the epoch is made anew each time
the outbox is opened, ``<UTC creation time>-<16 random hex digits>``, and the
uplink puts it on every event it publishes (``"epoch"``, spliced like
``floor``: the stored envelope is unchanged, so every event still in the
outbox goes out again under the new epoch with its own id). HQ keeps a
watermark per (site, kind, epoch) and every ack names its epoch, so an ack for
one run can never delete another run's events, and a new run is acked only
on what HQ holds *from it* (hq/store.py).

``epoch.json`` in the outbox folder records the current epoch and the one
before it, written atomically and fsynced, for an operator correlating a box
with HQ's report; the agent never trusts it for identity (a restored backup
restores it too).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time

from agent.outbox.store import fsync_dir

log = logging.getLogger(__name__)

EPOCH_NAME = "epoch.json"


def new_epoch(now: float | None = None) -> str:
    """``20261203T150102Z-3f9a1c2b4d5e6f70``: when it was made, and 64 random bits."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(8)}"


def start_epoch(directory: str, now: float | None = None) -> str:
    """A new epoch for this opening of the outbox under ``directory``, recorded (best
    effort: a full disk must not stop the outbox from opening and draining)."""
    epoch = new_epoch(now)
    path = os.path.join(directory, EPOCH_NAME)
    previous = None
    try:
        with open(path, "rb") as fh:
            previous = json.load(fh).get("epoch")
    except (OSError, ValueError, AttributeError):
        pass
    doc = {"epoch": epoch, "previous": previous if isinstance(previous, str) else None}
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(json.dumps(doc, separators=(",", ":")).encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as exc:
        log.warning("outbox %s: could not record epoch %s in %s (%s); it is used anyway",
                    directory, epoch, EPOCH_NAME, exc)
    log.info("outbox %s: epoch %s (previous %s)", directory, epoch, doc["previous"])
    return epoch


def read_epoch(directory: str) -> str | None:
    """The epoch recorded by the last opening (for ``edge-agent outbox stats``)."""
    try:
        with open(os.path.join(directory, EPOCH_NAME), "rb") as fh:
            value = json.load(fh).get("epoch")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
