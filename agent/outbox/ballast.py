"""A ballast file beside the outbox: room held back for the day the disk fills.

On a full filesystem SQLite cannot even delete (a delete writes WAL frames),
so the acks that would free space fail too. Removing the ballast gives the
delete its room; the file is put back once there is room again.
"""

from __future__ import annotations

import contextlib
import logging
import os

from agent.outbox.store import free_bytes

log = logging.getLogger(__name__)

BALLAST_NAME = "ballast"
CHUNK = 1 << 16


class Ballast:
    def __init__(self, directory: str, size: int) -> None:
        self.path = os.path.join(directory, BALLAST_NAME)
        self.directory = directory
        self.size = size

    @property
    def present(self) -> bool:
        try:
            return os.path.getsize(self.path) >= self.size
        except OSError:
            return False

    def ensure(self) -> bool:
        """Create the ballast if it is missing and the filesystem has room for it
        twice over (so putting it back does not itself fill the disk)."""
        if self.size <= 0 or self.present:
            return True
        if free_bytes(self.directory) < 2 * self.size + CHUNK:
            return False
        try:
            with open(self.path, "wb") as fh:
                # Real blocks, not a sparse file: a hole frees nothing when removed.
                zeros = bytes(min(CHUNK, self.size))
                left = self.size
                while left > 0:
                    left -= fh.write(zeros[: min(left, len(zeros))])
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            log.debug("outbox ballast %s not created yet: %s", self.path, exc)
            with contextlib.suppress(OSError):
                os.remove(self.path)
            return False
        return True

    def release(self) -> bool:
        """Remove the ballast; True if that freed space."""
        try:
            os.remove(self.path)
        except FileNotFoundError:
            return False
        log.warning("outbox: disk full; removed the ballast %s (%d bytes) so deletes can run",
                    self.path, self.size)
        return True
