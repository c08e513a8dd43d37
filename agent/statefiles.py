"""The daemon's own state files are private (issue 10): mode 0600, whatever the umask.

The systemd unit sets ``UMask=0077``, but the agent also runs outside it (the
demo, a test box, ``edge-agent run`` by hand), where the usual umask makes new
files 0644: readable by every user of the box. Sessions, the command journal,
the print jobs and the Idempotency-Key answers are not for them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path

log = logging.getLogger(__name__)

MODE = 0o600


def private_file(path: Path) -> Path:
    """Make ``path`` exist with mode 0600 (created so, or narrowed if it was wider).

    SQLite creates its ``-wal`` and ``-shm`` files with the database file's mode,
    so calling this before ``sqlite3.connect`` covers those too.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != MODE:
            os.fchmod(fd, MODE)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            if side.stat().st_mode & 0o777 != MODE:
                side.chmod(MODE)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably, mode 0600.

    Written to a temporary file, fsynced, renamed over ``path``, then the folder
    fsynced, so a power cut leaves the old file or the new one, never a torn one.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, MODE)  # an old .tmp left wider by someone else
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_db(path: Path, schema: tuple[str, ...], what: str) -> sqlite3.Connection:
    """A private SQLite file (WAL, ``synchronous=FULL``), made with ``schema``.

    An unreadable file is moved aside with a timestamp, logged with ``what`` (the
    rest of the sentence: "ids from before are forgotten"), and a fresh one made:
    the daemon starts rather than crash-loops on a damaged state file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _connect(path, schema)
    except sqlite3.DatabaseError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        log.error("%s is unreadable (%s); moved to %s, starting a fresh one (%s)", path, exc,
                  aside, what)
        path.rename(aside)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                path.with_name(path.name + suffix).unlink()
        return _connect(path, schema)


def _connect(path: Path, schema: tuple[str, ...]) -> sqlite3.Connection:
    private_file(path)
    con = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        for statement in schema:
            con.execute(statement)
    except sqlite3.DatabaseError:
        con.close()
        raise
    private_file(path)  # the -wal and -shm files it just made
    con.isolation_level = "DEFERRED"
    return con
