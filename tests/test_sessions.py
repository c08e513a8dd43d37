"""Sessions tied to the token that made them, written off the event loop, mode 0600 (issue 10)."""

from __future__ import annotations

import hashlib
import json
import stat
import threading
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import agent.web.sessions as sessions_module
from agent.config import AgentConfig
from agent.outbox import Outbox
from agent.testing.localsite import LocalSite
from agent.web.api import create_app
from agent.web.auth import Tokens
from agent.web.context import ApiContext
from agent.web.sessions import COOKIE_NAME, SessionStore

SITE = "co-denver-01"
OLD = "tablet-token-0123456789abcdef"
NEW = "tablet-token-rotated-0123456789"


def status_with_cookie(tmp: Path, tokens: dict[str, str], cookie: str | None = None,
                       sign_in: str | None = None) -> tuple[int, str | None]:
    """One app on ``tmp`` (as after a daemon restart): sign in or call /v1/status."""
    cfg = AgentConfig(site={"id": SITE}, outbox={"path": str(tmp / "outbox")})
    outbox = Outbox(str(tmp / "outbox"), SITE, max_bytes=1 << 26)
    outbox.open()
    try:
        app = create_app(ApiContext(cfg=cfg, outbox=outbox, tokens=Tokens(tokens),
                                    uplink_snapshot=lambda: {}, devices_snapshot=lambda: [],
                                    started_at=time.time()))
        with TestClient(app) as client:
            if sign_in is not None:
                answer = client.post("/v1/session", json={"token": sign_in},
                                     headers={"Origin": "http://testserver"})
                assert answer.status_code == 200, answer.text
                cookie = answer.cookies[COOKIE_NAME]
            assert cookie is not None
            client.cookies.set(COOKIE_NAME, cookie)
            return client.get("/v1/status").status_code, cookie
    finally:
        outbox.close()


def test_a_rotated_token_ends_its_sessions(tmp_path: Path) -> None:
    """The same name with a new token in the tokens file: the old token's cookie is 401."""
    _, cookie = status_with_cookie(tmp_path, {"tablet": OLD}, sign_in=OLD)
    assert status_with_cookie(tmp_path, {"tablet": OLD}, cookie)[0] == 200
    assert status_with_cookie(tmp_path, {"tablet": NEW}, cookie)[0] == 401
    assert status_with_cookie(tmp_path, {"tablet": OLD}, cookie)[0] == 401  # gone for good


def test_the_sessions_file_keeps_a_fingerprint_not_the_token(tmp_path: Path) -> None:
    """sessions.json holds the token's fingerprint: neither the token nor its digest; 0600."""
    status_with_cookie(tmp_path, {"tablet": OLD}, sign_in=OLD)
    path = tmp_path / "sessions.json"
    text = path.read_text()
    fingerprint = Tokens({"tablet": OLD}).fingerprint("tablet")
    assert fingerprint is not None and fingerprint in text
    assert OLD not in text and hashlib.sha256(OLD.encode()).hexdigest() not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_sessions_file_is_written_by_its_own_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """create() returns while the (slow) disk write waits: the writer is not the caller."""
    gate, writers = threading.Event(), []
    real = sessions_module.write_private

    def slow_write(path: Path, data: bytes) -> None:
        writers.append(threading.current_thread())
        gate.wait(10)
        real(path, data)

    monkeypatch.setattr(sessions_module, "write_private", slow_write)
    tokens = Tokens({"tablet": OLD})
    store = SessionStore(tmp_path / "sessions.json", fingerprint=tokens.fingerprint)
    session_id, _ = store.create("tablet")      # would hang here if written inline
    assert store.lookup(session_id) is not None
    gate.set()
    assert store.flush()
    assert writers and all(t is not threading.current_thread() for t in writers)
    again = SessionStore(tmp_path / "sessions.json", fingerprint=tokens.fingerprint)
    assert again.lookup(session_id) is not None


def _call(site: LocalSite, method: str, path: str, headers: dict[str, str],
          body: bytes | None = None) -> tuple[int, Message]:
    req = urllib.request.Request(f"{site.api_url}{path}", data=body, method=method,  # noqa: S310
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as answer:  # noqa: S310 - loopback http
            return answer.status, answer.headers
    except urllib.error.HTTPError as err:
        return err.code, err.headers


@pytest.mark.e2e
def test_rotating_a_token_ends_its_sessions_on_the_real_agent(tmp_path: Path) -> None:
    """edge-agent run: a tablet signed in with pos-1's token is signed out once it is rotated."""
    site = LocalSite(tmp_path / "site")
    try:
        site.start()
        old = f"{site.token}-pos"
        code, headers = _call(site, "POST", "/v1/session", {"Content-Type": "application/json"},
                              json.dumps({"token": old}).encode())
        assert code == 200
        cookie = str(headers.get("Set-Cookie")).split(";", 1)[0]
        assert cookie.startswith(f"{COOKIE_NAME}=")
        assert _call(site, "GET", "/v1/status", {"Cookie": cookie})[0] == 200
        tokens = tmp_path / "site" / "tokens"
        tokens.write_text(tokens.read_text().replace(old, f"{site.token}-rotated"))
        assert site.agent is not None
        assert site.agent.terminate() == 0
        site.start_agent()
        assert _call(site, "GET", "/v1/status", {"Cookie": cookie})[0] == 401
        assert site.request("GET", "/v1/status")[0] == 200   # the other token still works
    finally:
        site.stop()
