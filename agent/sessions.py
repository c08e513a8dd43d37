"""Browser sign-in: a session cookie per tablet instead of a token in every request.

A tablet signs in once with an API token (``POST /v1/session``); the agent
answers with a random session id in an HttpOnly, SameSite=Strict cookie and
keeps ``sha256(id) -> (token name, expiry)`` on its side. The token itself is
never in the cookie, so a cookie that leaks (a shared tablet, a proxy log) is
revocable by signing out or removing the token, and it never gives the token
to the POS integration that shares the name.

Sessions are kept in a small JSON file beside the outbox (only digests of the
ids, mode 0600), so a daemon restart does not send every grower back to the
sign-in screen. A session is valid only while its token's name is still in
the tokens file: removing a token signs out every tablet that used it.

Cookies are ambient: the browser sends them on any request to the box, also
one that another site's page makes it send. SameSite=Strict stops other
*sites*; :func:`same_origin` stops other *origins* (another port on the same
box) for the requests that change something.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

log = logging.getLogger(__name__)

COOKIE_NAME = "edge_session"
# "Once per tablet": long-lived, renewed on use (sliding), so a tablet in daily
# use never signs in again, and one left in a drawer expires.
SESSION_TTL_S = 30 * 24 * 3600.0
# Renew the expiry (and rewrite the file) at most this often per session.
RENEW_AFTER_S = 3600.0
MAX_SESSIONS = 1000
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Session:
    name: str       # the API token's name: the caller, and the events' source
    expires: float  # epoch seconds


class SessionStore:
    """Session ids (by digest) -> :class:`Session`; thread-safe; persisted when ``path`` is set."""

    def __init__(self, path: Path | None, *, ttl_s: float = SESSION_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._load()

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            now = self.clock()
            for digest, entry in raw.get("sessions", {}).items():
                session = Session(str(entry["name"]), float(entry["expires"]))
                if session.expires > now:
                    self._sessions[str(digest)] = session
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # A damaged file costs the tablets one sign-in, never the daemon's start.
            log.warning("sessions: ignoring %s (%s); tablets sign in again", self.path, exc)
            self._sessions.clear()

    def _save(self) -> None:
        """Atomically rewrite the file (caller holds the lock); a failure is logged only."""
        if self.path is None:
            return
        body = json.dumps({"sessions": {d: {"name": s.name, "expires": round(s.expires, 3)}
                                        for d, s in self._sessions.items()}})
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(body)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("sessions: cannot write %s (%s); sessions last until restart",
                        self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def create(self, name: str) -> tuple[str, Session]:
        """A new session for ``name``: (the id for the cookie, the session)."""
        session_id = secrets.token_urlsafe(32)
        session = Session(name, self.clock() + self.ttl_s)
        with self._lock:
            self._prune()
            if len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions, key=lambda d: self._sessions[d].expires)
                del self._sessions[oldest]
            self._sessions[_digest(session_id)] = session
            self._save()
        return session_id, session

    def lookup(self, session_id: str) -> Session | None:
        """The live session for this cookie value, renewed; None if unknown or expired."""
        digest = _digest(session_id)
        now = self.clock()
        with self._lock:
            session = self._sessions.get(digest)
            if session is None:
                return None
            if session.expires <= now:
                del self._sessions[digest]
                self._save()
                return None
            if session.expires - now < self.ttl_s - RENEW_AFTER_S:
                session = Session(session.name, now + self.ttl_s)
                self._sessions[digest] = session
                self._save()
            return session

    def delete(self, session_id: str) -> bool:
        with self._lock:
            found = self._sessions.pop(_digest(session_id), None) is not None
            if found:
                self._save()
            return found

    def _prune(self) -> None:
        now = self.clock()
        for digest in [d for d, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[digest]

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def _origin_of(url: str) -> tuple[str, str] | None:
    """(scheme, host[:port]) of an Origin or Referer value, lower-cased; None if not a URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return parts.scheme, parts.netloc.lower()


def needs_origin_check(conn: HTTPConnection) -> bool:
    """A cookie-authenticated request that may change something: not GET/HEAD/OPTIONS.

    A WebSocket handshake is a GET, but it opens a channel the page of another
    origin could then read, so it is checked too.
    """
    if conn.scope["type"] == "websocket":
        return True
    return str(conn.scope.get("method", "GET")).upper() not in SAFE_METHODS


def same_origin(conn: HTTPConnection) -> tuple[bool, str]:
    """Whether the request comes from a page of this very origin (scheme, host and port).

    ``Origin`` when the browser sent one (every fetch POST and WebSocket has it),
    else the ``Referer``; neither means we cannot tell, which is a no.
    """
    host = conn.headers.get("host", "").lower()
    if not host:
        return False, "Host: missing"
    scheme = "https" if conn.url.scheme in ("https", "wss") else "http"
    origin = conn.headers.get("origin")
    if origin is not None:
        seen, header = _origin_of(origin), "Origin"
    else:
        referer = conn.headers.get("referer")
        if referer is None:
            return False, "Origin: missing (neither Origin nor Referer sent)"
        seen, header = _origin_of(referer), "Referer"
    if seen is None or seen != (scheme, host):
        return False, f"{header}: not this agent's origin ({scheme}://{host})"
    return True, ""
