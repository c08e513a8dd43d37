"""Command ids on disk (issue 9): a command runs once, also across agent restarts.

HQ resends a command whose result it did not see, with the same id; the router
answers a repeated id with the first answer. Kept only in memory, that would
print a label again after every restart. So the router writes each id here
*before* its handler runs, and the answer when it finishes: a command cut off
by a restart (started, no answer) is answered as interrupted and not run
again (at most once: for a printer, a second label is worse than a missing
one, which HQ sees and can send again under a new id).

A small SQLite file beside the outbox (WAL, ``synchronous=FULL``, mode 0600). Ids are
kept ``KEEP_S``, far longer than HQ retries a command. A corrupt file is moved
aside and a fresh one used, logged: ids from before are then forgotten, the
same as the in-memory router was.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from agent.statefiles import open_db

JOURNAL_FILE = "commands.sqlite"
KEEP_S = 30 * 24 * 3600.0
_SCHEMA = ("CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
           "started_at REAL NOT NULL, answer TEXT)",
           "CREATE INDEX IF NOT EXISTS commands_started ON commands (started_at)",
           "SELECT COUNT(*) FROM commands")


def interrupted(command_id: str, name: str) -> dict[str, Any]:
    """The answer to a command a restart cut off."""
    return {"id": command_id, "ok": False, "result": None,
            "error": f"{name} {command_id} was interrupted by an agent restart before it "
                     "finished; not run again, as it may have partly run (send it with a new "
                     "id to run it again)"}


class CommandJournal:
    """Which command ids were started and what they answered (any thread)."""

    def __init__(self, directory: str | Path, *, now: float | None = None) -> None:
        self.path = Path(directory) / JOURNAL_FILE
        self._lock = threading.Lock()
        self._con = open_db(self.path, _SCHEMA, "command ids from before are forgotten")
        cutoff = (time.time() if now is None else now) - KEEP_S
        with self._lock, self._con:
            self._con.execute("DELETE FROM commands WHERE started_at < ?", (cutoff,))

    def start(self, command_id: str, name: str) -> dict[str, Any] | None:
        """Record ``command_id`` as started; None if it is new, else the answer to give
        (the first answer, or :func:`interrupted` if it never finished)."""
        with self._lock, self._con:
            row = self._con.execute("SELECT name, answer FROM commands WHERE id = ?",
                                    (command_id,)).fetchone()
            if row is None:
                self._con.execute("INSERT INTO commands (id, name, started_at) VALUES (?, ?, ?)",
                                  (command_id, name, time.time()))
                return None
        if row[1] is None:
            return interrupted(command_id, row[0])
        answer: dict[str, Any] = json.loads(row[1])
        return answer

    def finish(self, command_id: str, answer: dict[str, Any]) -> None:
        with self._lock, self._con:
            self._con.execute("UPDATE commands SET answer = ? WHERE id = ?",
                              (json.dumps(answer, default=str), command_id))

    def close(self) -> None:
        with self._lock:
            self._con.close()
