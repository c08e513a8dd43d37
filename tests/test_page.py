"""The site page's server side: sign-in cookie, CSRF guard, static assets, the live view.

Against the real API app on a real outbox (TestClient), and a real uvicorn on
loopback for the Server-Sent Events stream, which TestClient cannot read
while it is open.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import APIRouter, WebSocket
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from agent.config import AgentConfig
from agent.outbox import Outbox
from agent.testing.localbroker import free_port
from agent.web import page
from agent.web.api import create_app
from agent.web.auth import Tokens
from agent.web.caller import Caller
from agent.web.context import ApiContext
from agent.web.page import close_streams, hq_link
from agent.web.sessions import COOKIE_NAME
from tests.conftest import wait_for

SITE = "co-denver-01"
TABLET_TOKEN = "tablet-token-0123456789abcdef"
POS_TOKEN = "pos-token-0123456789abcdef"
SAME = "http://testserver"   # TestClient's origin
EVIL = "http://evil.example"
PLANT = {"action": "move", "plant_tags": ["1A4FF0200000022000000456"], "room": "Flower 2"}


def scans_router() -> APIRouter:
    """A stand-in family's WebSocket route using the shared Caller dependency."""
    router = APIRouter()

    @router.websocket("/v1/scans")
    async def scans(websocket: WebSocket, name: Caller) -> None:
        await websocket.accept()
        await websocket.send_json({"caller": name})
        await websocket.close()

    return router


class Site:
    def __init__(self, tmp: Path, tokens: dict[str, str] | None = None,
                 services: list[Any] | None = None,
                 routers: list[APIRouter] | None = None) -> None:
        self.tmp = tmp
        self.cfg = AgentConfig(site={"id": SITE, "name": "Denver Flagship"},
                               outbox={"path": str(tmp / "outbox")},
                               mqtt={"ack_timeout_s": 5.0})
        self.outbox = Outbox(str(tmp / "outbox"), SITE, max_bytes=1 << 26)
        self.outbox.open()
        self.uplink: dict[str, Any] = {"state": "connected", "host": "127.0.0.1",
                                       "since": time.time(), "last_ack_ts": None}
        self.ctx = ApiContext(cfg=self.cfg, outbox=self.outbox,
                              tokens=Tokens(tokens or {"tablet": TABLET_TOKEN, "pos-2": POS_TOKEN}),
                              uplink_snapshot=lambda: self.uplink, devices_snapshot=lambda: [],
                              started_at=time.time(), services=services or [])
        self.app = create_app(self.ctx, routers or [])
        self.client = TestClient(self.app)

    def sign_in(self, token: str = TABLET_TOKEN) -> str:
        answer = self.client.post("/v1/session", json={"token": token}, headers={"Origin": SAME})
        assert answer.status_code == 200, answer.text
        return answer.cookies[COOKIE_NAME]

    def close(self) -> None:
        close_streams(self.app)
        self.client.close()
        self.outbox.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.close()


def post_plant(site: Site, headers: dict[str, str]) -> Any:
    return site.client.post("/v1/events/plant", json={"data": PLANT}, headers=headers)


# -- sign-in ------------------------------------------------------------------------------


def test_sign_in_sets_a_strict_httponly_session_cookie_that_authenticates_gets(site: Site) -> None:
    """Sign-in sets an HttpOnly SameSite=Strict Path=/ cookie (not the token) that GETs accept."""
    answer = site.client.post("/v1/session", json={"token": TABLET_TOKEN},
                              headers={"Origin": SAME})
    assert answer.status_code == 200 and answer.json()["name"] == "tablet"
    header = answer.headers["set-cookie"]
    attrs = {part.strip().split("=")[0].lower() for part in header.split(";")}
    assert {"httponly", "path", "max-age"} <= attrs
    assert "samesite=strict" in header.lower() and "path=/" in header.lower()
    cookie = answer.cookies[COOKIE_NAME]
    assert TABLET_TOKEN not in header and len(cookie) >= 40
    site.client.cookies.set(COOKIE_NAME, cookie)
    status = site.client.get("/v1/status")
    assert status.status_code == 200 and status.json()["site"] == SITE
    assert site.client.get("/v1/session").json()["name"] == "tablet"
    view = site.client.get("/v1/page").json()
    assert view["site"] == {"id": SITE, "name": "Denver Flagship"}
    assert view["hq"]["reachable"] is True and view["compliance"]["report_within_h"] == 24
    # Only digests are kept on disk: neither the cookie nor the token is in the file.
    stored = (site.tmp / "sessions.json").read_text()
    assert cookie not in stored and TABLET_TOKEN not in stored and "tablet" in stored


def test_bad_or_missing_token_is_refused_without_a_cookie(site: Site) -> None:
    """A wrong token is 401 naming the field; no token is 422; a forged cookie is 401."""
    wrong = site.client.post("/v1/session", json={"token": "nope-0123456789abcdefgh"})
    assert wrong.status_code == 401 and wrong.json()["field"] == "token"
    assert "set-cookie" not in wrong.headers
    missing = site.client.post("/v1/session", json={})
    assert missing.status_code == 422 and missing.json()["field"] == "token"
    garbage = site.client.post("/v1/session", content=b"{", headers={"Content-Type":
                                                                      "application/json"})
    assert garbage.status_code == 400 and garbage.json()["field"] == "body"
    site.client.cookies.set(COOKIE_NAME, "forged-session-id-0123456789")
    refused = site.client.get("/v1/status")
    assert refused.status_code == 401 and refused.json()["field"] == "session"


def test_cookie_alone_cannot_post_cross_origin_but_same_origin_can(site: Site) -> None:
    """A cookie POST needs this origin's Origin/Referer (else 403); a bearer token does not."""
    site.client.cookies.set(COOKIE_NAME, site.sign_in())
    for headers in ({"Origin": EVIL}, {}, {"Referer": f"{EVIL}/"}, {"Origin": "null"},
                    {"Origin": "http://testserver:8080"}, {"Origin": "https://testserver"}):
        refused = post_plant(site, headers)
        assert refused.status_code == 403, (headers, refused.text)
        assert refused.json()["reason"] == "cross_origin"
    assert site.outbox.stats()["plant"].last_seq == 0
    ok = post_plant(site, {"Origin": SAME})
    assert ok.status_code == 202 and ok.json()["seq"] == 1
    assert post_plant(site, {"Referer": f"{SAME}/#plants"}).status_code == 202
    # Bearer tokens are not ambient: a POS posts whatever its Origin says.
    site.client.cookies.clear()
    bearer = post_plant(site, {"Authorization": f"Bearer {POS_TOKEN}", "Origin": EVIL})
    assert bearer.status_code == 202
    # The tablet's events carry the tablet's name as their source.
    from agent.envelope import decode
    sources = [decode(raw)["source"] for _, raw in site.outbox.read("plant", 0, 10)]
    assert sources == ["tablet", "tablet", "pos-2"]


def test_cross_origin_sign_in_is_refused(site: Site) -> None:
    """Another origin's page cannot plant a session here (login CSRF)."""
    answer = site.client.post("/v1/session", json={"token": TABLET_TOKEN},
                              headers={"Origin": EVIL})
    assert answer.status_code == 403 and "set-cookie" not in answer.headers


def test_sign_out_ends_the_session(site: Site) -> None:
    """DELETE /v1/session clears the cookie and the server forgets it; cross-origin is 403."""
    cookie = site.sign_in()
    site.client.cookies.set(COOKIE_NAME, cookie)
    assert site.client.delete("/v1/session", headers={"Origin": EVIL}).status_code == 403
    assert site.client.get("/v1/status").status_code == 200
    out = site.client.delete("/v1/session", headers={"Origin": SAME})
    assert out.status_code == 204
    assert COOKIE_NAME in out.headers["set-cookie"] and "max-age=0" in \
        out.headers["set-cookie"].lower()
    site.client.cookies.set(COOKIE_NAME, cookie)  # a copy kept by someone: dead now
    assert site.client.get("/v1/status").status_code == 401


def test_sessions_survive_a_restart_and_die_with_their_token(tmp_path: Path) -> None:
    """A new app on the same state dir accepts the cookie; removing the token's name revokes it."""
    first = Site(tmp_path)
    try:
        cookie = first.sign_in()
    finally:
        first.close()
    again = Site(tmp_path)
    try:
        again.client.cookies.set(COOKIE_NAME, cookie)
        assert again.client.get("/v1/status").status_code == 200
    finally:
        again.close()
    revoked = Site(tmp_path, tokens={"pos-2": POS_TOKEN})
    try:
        revoked.client.cookies.set(COOKIE_NAME, cookie)
        assert revoked.client.get("/v1/status").status_code == 401
    finally:
        revoked.close()


def test_websocket_routes_take_the_cookie_from_this_origin_only(tmp_path: Path) -> None:
    """A family's WebSocket takes the cookie; another origin's handshake is closed with 1008."""
    site = Site(tmp_path, routers=[scans_router()])
    try:
        site.client.cookies.set(COOKIE_NAME, site.sign_in())
        with site.client.websocket_connect("/v1/scans", headers={"Origin": SAME}) as ws:
            assert ws.receive_json() == {"caller": "tablet"}
        with pytest.raises(WebSocketDisconnect) as refused, \
                site.client.websocket_connect("/v1/scans", headers={"Origin": EVIL}):
            pass
        assert refused.value.code == 1008
        # The route alone does not make a Scans tab: this box has no scanner.
        assert site.client.get("/v1/page").json()["features"]["scans"] is False
    finally:
        site.close()


# -- static assets ---------------------------------------------------------------------------


def test_page_and_static_assets_are_served_with_nothing_from_outside(site: Site) -> None:
    """GET / and every agent/static file are served (CSP self only) naming no http(s) origin."""
    index = site.client.get("/")  # no token: the sign-in form must load
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in index.headers["content-security-policy"]
    shipped = {f.name: f.read_bytes() for f in resources.files("agent").joinpath("static")
               .iterdir() if f.is_file()}
    assert {"index.html", "app.js", "app.css"} <= set(shipped)
    for name, body in shipped.items():
        answer = site.client.get(f"/static/{name}")
        assert answer.status_code == 200 and answer.content == body
        text = body.decode("utf-8")
        assert not re.search(r"(?i)\b(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text), name
        assert "@import" not in text and "fonts.g" not in text, name
        again = site.client.get(f"/static/{name}", headers={"If-None-Match":
                                                             answer.headers["etag"]})
        assert again.status_code == 304
    # Every asset the page references is one we ship.
    refs = re.findall(r'(?:src|href)="([^"#]+)"', index.text)
    assert refs and all(r.startswith("/static/") and r.split("/")[-1] in shipped for r in refs)
    for bad in ("/static/../api.py", "/static/%2e%2e%2fapi.py", "/static/nope.js"):
        missing = site.client.get(bad)
        assert missing.status_code == 404 and "error" in missing.json()


# -- the live view -----------------------------------------------------------------------------


def test_hq_is_unreachable_when_connected_but_nothing_is_acknowledged() -> None:
    """The banner's rule: broker down, or events older than the ack timeout with no ack since."""
    now = 1_000_000.0
    waiting = {"sale": {"depth": 3, "oldest_age_s": 12.0}, "plant": {"depth": 1,
                                                                     "oldest_age_s": 2.0}}
    connected = {"state": "connected", "last_ack_ts": None}
    down = hq_link(connected, waiting, ack_timeout_s=5, now=now)
    assert down["reachable"] is False and down["waiting"] == 4
    assert "acknowledged nothing for 12 s" in down["detail"]
    assert down["message"] == "HQ has not confirmed anything for 12 seconds"
    assert hq_link({**connected, "last_ack_ts": now - 1}, waiting, 5, now)["reachable"] is True
    assert hq_link(connected, {"sale": {"depth": 2, "oldest_age_s": 3.0}}, 5, now)["reachable"]
    assert hq_link(connected, {"sale": {"depth": 0, "oldest_age_s": None}}, 5, now)["reachable"]
    broker = hq_link({"state": "connecting", "last_error": "connection refused"}, {}, 5, now)
    assert broker["reachable"] is False and "connection refused" in broker["detail"]
    # Store staff read plain words: no broker, no socket errors.
    assert broker["message"] == "this box cannot reach HQ right now"


def test_alarm_events_are_listed_as_recent(site: Site) -> None:
    """An alarm event committed to the outbox appears in the view's recent alarms."""
    site.client.cookies.set(COOKIE_NAME, site.sign_in())
    assert site.client.get("/v1/page").json()["alarms"]["recent"] == []
    answer = site.client.post("/v1/events/alarm", headers={"Origin": SAME}, json={
        "data": {"code": "door_open", "message": "vault door open", "severity": "critical"}})
    assert answer.status_code == 202

    def recent() -> list[dict[str, Any]]:
        return list(site.client.get("/v1/page").json()["alarms"]["recent"])

    listed = wait_for(recent, timeout=5, what="the alarm in the page view")
    assert listed[0]["code"] == "door_open" and listed[0]["source"] == "tablet"


class Server:
    """The app under a real uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=10, what="uvicorn to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class EventReader:
    """Reads ``event:``/``data:`` blocks from an open SSE response."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.response = response

    def next(self) -> tuple[str, dict[str, Any]]:
        event, data = "", ""
        while True:
            line = self.response.readline().decode()
            if not line:
                raise AssertionError("the stream ended")
            line = line.rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
            elif line == "" and event:
                return event, json.loads(data)


def test_event_stream_pushes_the_view_at_once_and_on_change(site: Site,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """SSE: the view at once, again right after a change (long heartbeat), ends on close."""
    monkeypatch.setattr(page, "HEARTBEAT_S", 60.0)
    cookie = site.sign_in()
    server = Server(site.app)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/v1/events/stream", headers={"Cookie": f"{COOKIE_NAME}={cookie}"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = EventReader(response)
        kind, first = events.next()
        assert kind == "status" and first["status"]["outbox"]["kinds"]["plant"]["depth"] == 0
        started = time.monotonic()
        assert post_plant(site, {"Authorization": f"Bearer {POS_TOKEN}"}).status_code == 202
        kind, second = events.next()
        assert second["status"]["outbox"]["kinds"]["plant"]["depth"] == 1
        assert time.monotonic() - started < 5  # well before the 60 s heartbeat
        close_streams(site.app)
        wait_for(lambda: response.readline() == b"", timeout=5, what="the stream to end")
        conn.close()
    finally:
        server.stop()


def test_event_stream_needs_a_session_or_token(site: Site) -> None:
    """The stream is behind the same authentication as the API (401 without it)."""
    answer = site.client.get("/v1/events/stream")
    assert answer.status_code == 401


def test_signing_in_again_replaces_the_browsers_session(site: Site) -> None:
    """A second sign-in from the same browser retires its first session instead of adding one."""
    first = site.sign_in()
    site.client.cookies.set(COOKIE_NAME, first)
    second = site.sign_in()
    assert second != first and len(site.app.state.sessions) == 1
    site.client.cookies.set(COOKIE_NAME, first)
    assert site.client.get("/v1/status").status_code == 401


@pytest.mark.parametrize(("devices", "rooms", "shown"), [
    ([{"id": "r", "type": "receipt_printer", "url": "sim://receipt"}], [], set()),
    ([{"id": "s", "type": "scanner", "url": "sim://scanner"}], [], {"scans"}),
    ([{"id": "z", "type": "label_printer", "url": "sim://label"}], [],
     {"print_label", "label_preview"}),
    ([{"id": "c", "type": "sensor", "model": "sim", "room": "Veg", "url": "sim://climate"}],
     [], {"sensors", "history", "rooms"}),
    ([{"id": "s", "type": "scanner", "url": "sim://scanner", "enabled": False}],
     [{"name": "Veg", "stage": "veg"}], {"rooms"}),
])
def test_features_follow_the_boxs_devices(tmp_path: Path, devices: list[dict[str, Any]],
                                          rooms: list[dict[str, Any]], shown: set[str]) -> None:
    """A part of the page shows only when its route exists and the box has (enabled) devices
    of that kind: a receipt-printer-only box gets no Scans, Rooms or Labels."""
    from fastapi import FastAPI

    from agent.web.page import FEATURE_ROUTES, features

    app = FastAPI()
    for path in FEATURE_ROUTES.values():
        app.get(path)(lambda: None)
    cfg = AgentConfig(site={"id": SITE}, devices=devices, rooms=rooms)
    assert {name for name, on in features(app, cfg).items() if on} == shown
