"""Browser sign-in: a session cookie per tablet instead of a token in every request.

A tablet signs in once with an API token (``POST /v1/session``); the agent
answers with a random session id in an HttpOnly, SameSite=Strict cookie and
keeps ``sha256(id) -> (token name, expiry)`` on its side. The token itself is
never in the cookie, so a cookie that leaks (a shared tablet, a proxy log) is
revocable by signing out or removing the token, and it never gives the token
to the POS integration that shares the name.

Sessions are kept in a small JSON file beside the outbox (only digests of the
ids, mode 0600), so a daemon restart does not send every grower back to the
sign-in screen. The file is written by a thread of its own (atomically, fsynced),
never on the event loop. A session is tied to the token that made it: it keeps
the token's fingerprint (an HMAC keyed by the token's digest, see
:meth:`agent.web.auth.Tokens.fingerprint`; never the token), and is valid only while
that very token is still in the tokens file, so rotating a token or removing it
signs out every tablet that used it.

Cookies are ambient: the browser sends them on any request to the box, also
one that another site's page makes it send. SameSite=Strict stops other
*sites*; :func:`same_origin` stops other *origins* (another port on the same
box) for the requests that change something.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from agent.statefiles import write_private

log = logging.getLogger(__name__)

COOKIE_NAME = "edge_session"
# "Once per tablet": long-lived, renewed on use (sliding), so a tablet in daily
# use never signs in again, and one left in a drawer expires.
SESSION_TTL_S = 30 * 24 * 3600.0
# Renew the expiry (and rewrite the file) at most this often per session.
RENEW_AFTER_S = 3600.0
MAX_SESSIONS = 1000
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FLUSH_TIMEOUT_S = 5.0
# The live store of each file in this process: a new store on the same file (an app
# rebuilt in one process) first lets the old one finish writing, then reads.
_LIVE: weakref.WeakValueDictionary[Path, SessionStore] = weakref.WeakValueDictionary()
_LIVE_LOCK = threading.Lock()


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Session:
    name: str       # the API token's name: the caller, and the events' source
    expires: float  # epoch seconds
    token: str | None = None  # the fingerprint of the token that signed in


class SessionStore:
    """Session ids (by digest) -> :class:`Session`; thread-safe; persisted when ``path`` is set."""

    def __init__(self, path: Path | None, *, ttl_s: float = SESSION_TTL_S,
                 clock: Callable[[], float] = time.time,
                 fingerprint: Callable[[str], str | None] | None = None) -> None:
        """``fingerprint(name)``: the fingerprint of the token now named ``name`` (None if
        there is none); when given, a session lives only while it is its maker's."""
        self.path = path
        self.ttl_s = ttl_s
        self.clock = clock
        self._fingerprint = fingerprint
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._pending: bytes | None = None   # the next body for the writer thread
        self._writing = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
        if path is not None:
            with _LIVE_LOCK:
                previous = _LIVE.get(path)
                _LIVE[path] = self
            if previous is not None:
                previous.flush()
        self._load()

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            now = self.clock()
            for digest, entry in raw.get("sessions", {}).items():
                token = entry.get("token")
                session = Session(str(entry["name"]), float(entry["expires"]),
                                  None if token is None else str(token))
                if session.expires > now:
                    self._sessions[str(digest)] = session
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # A damaged file costs the tablets one sign-in, never the daemon's start.
            log.warning("sessions: ignoring %s (%s); tablets sign in again", self.path, exc)
            self._sessions.clear()

    def _save(self) -> None:
        """Hand the file's new body to the writer thread (caller holds the lock)."""
        if self.path is None:
            return
        self._pending = json.dumps({"sessions": {
            d: {"name": s.name, "expires": round(s.expires, 3), "token": s.token}
            for d, s in self._sessions.items()}}).encode("utf-8")
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                            name="sessions-writer")
            self._writer.start()

    def _write_loop(self) -> None:
        """The writer thread, while there is something to write: atomically rewrite the file
        with the latest body; a failure is logged only (sessions then last until restart)."""
        assert self.path is not None
        while True:
            with self._lock:
                if self._pending is None:
                    self._writer = None  # done; the next change starts a new writer
                    return
                body = self._pending
            try:
                write_private(self.path, body)
            except OSError as exc:
                log.warning("sessions: cannot write %s (%s); sessions last until restart",
                            self.path, exc)
            with self._lock:
                if self._pending is body:
                    self._pending = None
                    self._writing.notify_all()

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until the file holds every change made so far; False on timeout."""
        with self._lock:
            return self._writing.wait_for(lambda: self._pending is None, timeout)

    def create(self, name: str) -> tuple[str, Session]:
        """A new session for ``name``: (the id for the cookie, the session)."""
        session_id = secrets.token_urlsafe(32)
        token = self._fingerprint(name) if self._fingerprint is not None else None
        session = Session(name, self.clock() + self.ttl_s, token)
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
            if session.expires <= now or not self._still_its_token(session):
                del self._sessions[digest]
                self._save()
                return None
            if session.expires - now < self.ttl_s - RENEW_AFTER_S:
                session = Session(session.name, now + self.ttl_s, session.token)
                self._sessions[digest] = session
                self._save()
            return session

    def _still_its_token(self, session: Session) -> bool:
        """Whether the token that made ``session`` is still the one named so."""
        if self._fingerprint is None:
            return True
        current = self._fingerprint(session.name)
        return (current is not None and session.token is not None
                and hmac.compare_digest(current, session.token))

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
