"""The site page: what growers and managers see on a tablet (issue 6).

Routes (added to the API app by :func:`agent.web.api.create_app`):

- ``GET /`` and ``GET /static/{name}``: the page, plain HTML/CSS/JS shipped in
  ``agent/static/`` (no CDN: an edge box may have no internet). Public: they
  hold no data, and the sign-in form must load before anyone is signed in.
- ``POST /v1/session`` ``{"token"}``: sign in once per tablet; sets the
  HttpOnly session cookie (agent/web/sessions.py). ``GET`` says who is signed in
  (and renews the cookie), ``DELETE`` signs out.
- ``GET /v1/page``: the page's view of the site (below), once.
- ``GET /v1/events/stream``: the same view as Server-Sent Events, every
  ``HEARTBEAT_S`` and as soon as something a person would notice changes.

The view is ``GET /v1/status`` plus what the page needs to say plainly:
whether HQ is reachable (connected to the broker is not enough: HQ must be
acknowledging), how much waits to be sent, how old the oldest unsent sale is
against ``compliance.report_within_h``, which device families this agent has
(the page hides what it cannot use), and the newest alarm events.

Everything else the page shows comes from the families' own routes
(``/v1/scans``, ``/v1/rooms``, ``/v1/print/label``...), with the same cookie.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ipaddress
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from agent.config import AgentConfig
from agent.envelope import decode, iso_ms
from agent.errors import OutboxError
from agent.ops.status import build_status
from agent.web.caller import Caller
from agent.web.checks import parse_json_object
from agent.web.context import ApiContext
from agent.web.problems import ApiProblem, ErrorBody
from agent.web.sessions import COOKIE_NAME, SessionStore, same_origin

if TYPE_CHECKING:
    from fastapi import FastAPI

    from agent.outbox import Outbox

log = logging.getLogger(__name__)

# How often a stream looks for a change, and the longest it stays silent.
POLL_S = 0.5
HEARTBEAT_S = 2.0
RECENT_ALARMS = 50
# The alarm reader also wakes this often without a commit, to notice a closed outbox.
ALARM_IDLE_WAKE_S = 2.0

CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml",
                 ".png": "image/png", ".ico": "image/x-icon"}
# The page loads nothing from anywhere else; images may be blob: (label previews).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Same-origin requests keep their Referer: the CSRF check's fallback to Origin.
    "Referrer-Policy": "same-origin",
}
# Failed sign-ins (POST /v1/session with an unknown token) per client: at most
# SIGNIN_FAILURES within SIGNIN_WINDOW_S, then 429 until the oldest leaves the window.
SIGNIN_FAILURES = 5
SIGNIN_WINDOW_S = 60.0
SIGNIN_CLIENTS_MAX = 4096
# A token as the sign-in form sends it: something besides blanks (it is stripped).
SIGNIN_TOKEN_PATTERN = (
    "^[^\\x00]*[!-~][^\\x00]*$")  # noqa: S105 - a pattern
# Routes whose presence turns on a part of the page (the families are optional).
FEATURE_ROUTES = {
    "scans": "/v1/scans",
    "sensors": "/v1/sensors",
    "history": "/v1/sensors/{device}/history",
    "rooms": "/v1/rooms",
    "print_label": "/v1/print/label",
    "label_preview": "/v1/print/label/preview",
}


# -- the view -------------------------------------------------------------------------------


def _plain_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} seconds"
    if seconds < 7200:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.0f} hours"


def drain_words(waiting: int, drain: dict[str, Any] | None) -> str | None:
    """The backlog's drain in plain words ("sending 120 a second, all sent in about 3
    minutes"), or None when nothing waits or nothing is being sent."""
    rate = (drain or {}).get("rate_eps")
    if not waiting or not isinstance(rate, int | float) or rate <= 0:
        return None
    eta = (drain or {}).get("eta_s")
    per = f"{rate:.0f} a second" if rate >= 1 else f"one every {1 / rate:.0f} seconds"
    if not isinstance(eta, int | float):
        return f"sending {per}"
    when = "under a minute" if eta < 60 else f"about {_plain_age(eta)}"
    return f"sending {per}, all sent in {when}"


def hq_link(uplink: dict[str, Any], kinds: dict[str, Any], ack_timeout_s: float,
            now: float, reasons: list[str] | None = None,
            drain: dict[str, Any] | None = None) -> dict[str, Any]:
    """Whether HQ is taking our events, and what waits; pure.

    Connected to the broker is not enough: with the HQ receiver down the broker
    takes every publish and nothing is ever acknowledged. So HQ counts as
    unreachable when events wait, the oldest has waited longer than the ack
    timeout, and no ack arrived in that time either. ``reasons`` (the status's):
    HQ's acks stalled or refused say so too, in the status's words. ``drain`` (the
    status's ``outbox.drain``): the backlog's rate and time to empty, as ``progress``.
    """
    from agent.uplink.protocol import CAUSES

    waiting = sum(int((k or {}).get("depth") or 0) for k in kinds.values())
    ages = [k.get("oldest_age_s") for k in kinds.values() if k and k.get("oldest_age_s")]
    oldest = max(ages) if ages else None
    last_ack = uplink.get("last_ack_ts")
    since_ack = None if not isinstance(last_ack, int | float) else max(0.0, now - last_ack)
    state = uplink.get("state") or "disconnected"
    view: dict[str, Any] = {"waiting": waiting, "oldest_age_s": oldest,
                            "last_ack_age_s": since_ack, "broker": state,
                            "host": uplink.get("host"),
                            "drain_rate_eps": (drain or {}).get("rate_eps"),
                            "drain_eta_s": (drain or {}).get("eta_s") if waiting else None,
                            "progress": drain_words(waiting, drain)}
    ack_trouble = [r.split(":", 1)[1].strip() for r in reasons or []
                   if r.split(":", 1)[0] in ("acks_stalled", "acks_refused")]
    # message: plain words for store staff; detail: the same for whoever fixes it (IT).
    if state != "connected":
        error = uplink.get("last_error")
        cause = CAUSES.get(str(uplink.get("cause")))
        view.update(reachable=False, message="this box cannot reach HQ right now",
                    detail="no connection to the HQ broker" + (f": {cause}" if cause else "")
                    + (f" ({error})" if error else ""))
    elif ack_trouble:
        view.update(reachable=False, message="HQ is not confirming what this box sends",
                    detail=f"connected to the broker, but {ack_trouble[0]}")
    elif (waiting and oldest is not None and oldest > ack_timeout_s
          and (since_ack is None or since_ack > ack_timeout_s)):
        quiet = oldest if since_ack is None else since_ack
        view.update(reachable=False,
                    message=f"HQ has not confirmed anything for {_plain_age(quiet)}",
                    detail=f"connected to the broker, but HQ has acknowledged nothing for "
                           f"{quiet:.0f} s")
    else:
        view.update(reachable=True, message="HQ is receiving everything",
                    detail="HQ is acknowledging events")
    return view


def compliance_view(kinds: dict[str, Any], report_within_h: float) -> dict[str, Any]:
    """The oldest unsent sale and plant event against the state's reporting deadline."""
    limit_s = report_within_h * 3600
    out: dict[str, Any] = {"report_within_h": report_within_h}
    for kind in ("sale", "plant"):
        age = (kinds.get(kind) or {}).get("oldest_age_s")
        out[kind] = {"oldest_age_s": age,
                     "share": None if age is None else round(age / limit_s, 4)}
    return out


def route_paths(routes: list[Any], prefix: str = "") -> set[str]:
    """Every path template served, through included routers (FastAPI keeps those
    as wrappers holding ``original_router`` and a prefix) and mounts."""
    paths: set[str] = set()
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            paths |= route_paths(inner.routes, prefix + str(getattr(context, "prefix", "") or ""))
        elif isinstance(getattr(route, "path", None), str):
            paths.add(prefix + route.path)
            if getattr(route, "routes", None):  # a Mount
                paths |= route_paths(route.routes, prefix + route.path)
    return paths


# What a part of the page needs on the box besides its route: a tab for scans on a box
# with no scanner (or rooms with no sensor) is a dead end for the staff who tap it.
FEATURE_DEVICES = {
    "scans": ("scanner",), "sensors": ("sensor",), "history": ("sensor",),
    "rooms": ("sensor",), "print_label": ("label_printer",),
    "label_preview": ("label_printer",),
}


def features(app: FastAPI, cfg: AgentConfig | None = None) -> dict[str, bool]:
    """The parts of the page this box has: the route is there and, with ``cfg``, an
    enabled device of the kind that part shows (rooms also show with [[rooms]])."""
    paths = route_paths(app.router.routes)
    found = {name: path in paths for name, path in FEATURE_ROUTES.items()}
    if cfg is None:
        return found
    types = {d.type for d in cfg.devices if d.enabled}
    for name, needs in FEATURE_DEVICES.items():
        has = bool(types.intersection(needs)) or (name == "rooms" and bool(cfg.rooms))
        found[name] = found[name] and has
    return found


def change_key(view: dict[str, Any]) -> str:
    """What a person would notice changing; ages and clocks tick and are left out."""
    status = view["status"]
    kinds = status.get("outbox", {}).get("kinds", {})
    uplink = status.get("uplink", {})
    return json.dumps([
        status.get("state"), [str(r).split(":", 1)[0] for r in status.get("reasons", [])],
        uplink.get("state"), uplink.get("last_ack_ts"), uplink.get("acked_upto"),
        {k: (v or {}).get("depth") for k, v in kinds.items()},
        {k: (v or {}).get("last_seq") for k, v in kinds.items()},
        [(d.get("id"), d.get("state"), d.get("last_fault")) for d in status.get("devices", [])],
        [(a.get("code"), a.get("state")) for a in status.get("alarms", [])],
        view["hq"]["reachable"], [a.get("seq") for a in view["alarms"]["recent"][:1]],
    ], default=str, sort_keys=True)


# -- recent alarm events ----------------------------------------------------------------


class AlarmTap:
    """The newest alarm events, read from the outbox right after they commit.

    HQ's ack deletes events from the outbox, so they are read as soon as the
    writer reports a commit (the outbox listener only wakes this thread: it
    runs in the writer thread and must stay cheap). An alarm acked before it
    could be read is counted in ``missed``, not invented.
    """

    def __init__(self, outbox: Outbox, size: int = RECENT_ALARMS) -> None:
        self.outbox = outbox
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self.missed = 0
        self._seen = 0  # set at start(): create_app must not touch the outbox
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _last_seq(self) -> int:
        stats = self.outbox.stats().get("alarm")
        return stats.last_seq if stats else 0

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._seen = max(0, self._last_seq() - (self.recent.maxlen or 0))
            self.outbox.add_listener(self._wake.set)
            self._thread = threading.Thread(target=self._run, name="page-alarms", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(ALARM_IDLE_WAKE_S)
            self._wake.clear()
            try:
                self.read_new()
            except OutboxError:
                return  # the outbox closed: the agent is stopping
            except Exception:  # never let the page's helper thread die silently
                log.exception("page: reading alarm events failed")

    def read_new(self) -> None:
        last = self._last_seq()
        while self._seen < last:
            rows = self.outbox.read("alarm", self._seen, 100)
            if not rows:
                self.missed += last - self._seen
                self._seen = last
                break
            for seq, raw in rows:
                self.missed += max(0, seq - self._seen - 1)
                self._seen = seq
                try:
                    envelope = decode(raw)
                except ValueError:
                    continue
                data = envelope.get("data") or {}
                self.recent.appendleft({"seq": seq, "ts": envelope.get("ts"),
                                        "source": envelope.get("source"), **data})

    def snapshot(self) -> list[dict[str, Any]]:
        return list(self.recent)


class SessionInfo(BaseModel):
    name: str = Field(description="the name of the token signed in with")
    expires: str | None = Field(description="when the session ends (ISO 8601, UTC)")


# -- sign-in throttling -------------------------------------------------------------------


def client_key(host: str) -> str:
    """Whom a failure is counted against: the address, or its /64 for IPv6 (one
    machine picks addresses at will inside its /64)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class SignInThrottle:
    """Failed sign-ins per client in a sliding window; pure, ``now`` passed in.

    Past ``failures`` within ``window_s`` every sign-in from that client (a right
    token too: that is what makes guessing pointless) waits until the oldest
    failure leaves the window. At most ``clients_max`` clients are remembered,
    the longest-quiet forgotten first, so a flood of addresses cannot grow it.
    """

    def __init__(self, failures: int = SIGNIN_FAILURES, window_s: float = SIGNIN_WINDOW_S,
                 clients_max: int = SIGNIN_CLIENTS_MAX) -> None:
        self.failures = failures
        self.window_s = window_s
        self.clients_max = clients_max
        self._seen: collections.OrderedDict[str, collections.deque[float]] = \
            collections.OrderedDict()
        self._locked: set[str] = set()

    def _recent(self, client: str, now: float) -> collections.deque[float] | None:
        times = self._seen.get(client)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._seen[client]
            self._locked.discard(client)
            return None
        return times

    def retry_after(self, client: str, now: float) -> float | None:
        """Seconds until ``client`` may try again, or None when it may now."""
        times = self._recent(client, now)
        if times is None or len(times) < self.failures:
            return None
        return max(0.001, times[0] + self.window_s - now)

    def first_refusal(self, client: str) -> bool:
        """True once per lockout: the refusal worth a WARNING (the rest go to DEBUG)."""
        if client in self._locked:
            return False
        self._locked.add(client)
        return True

    def failed(self, client: str, now: float) -> None:
        times = self._recent(client, now)
        if times is None:
            times = self._seen[client] = collections.deque(maxlen=self.failures)
        times.append(now)
        self._seen.move_to_end(client)
        while len(self._seen) > self.clients_max:
            forgotten, _ = self._seen.popitem(last=False)
            self._locked.discard(forgotten)

    def succeeded(self, client: str) -> None:
        self._seen.pop(client, None)
        self._locked.discard(client)


# -- serving ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def load_static() -> dict[str, StaticFile]:
    """Every file shipped in agent/static/, read once (they are small)."""
    files: dict[str, StaticFile] = {}
    for entry in resources.files("agent").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if not entry.is_file() or suffix not in CONTENT_TYPES:
            continue
        body = entry.read_bytes()
        files[entry.name] = StaticFile(body, CONTENT_TYPES[suffix],
                                       '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    return files


def static_response(request: Request, file: StaticFile, headers: dict[str, str]) -> Response:
    # no-cache = revalidate each time: after an upgrade every tablet gets the new page.
    common = {"ETag": file.etag, "Cache-Control": "no-cache", **headers}
    if request.headers.get("if-none-match") == file.etag:
        return Response(status_code=304, headers=common)
    return Response(file.body, media_type=file.content_type, headers=common)


def _set_cookie(response: Response, request: Request, session_id: str, max_age: float) -> None:
    # Secure only over https: the box serves plain http on the LAN, and a Secure
    # cookie would never come back there.
    response.set_cookie(COOKIE_NAME, session_id, max_age=int(max_age), path="/",
                        httponly=True, samesite="strict", secure=request.url.scheme == "https")


def close_streams(app: FastAPI) -> None:
    """End every open event stream (the daemon calls it first thing when stopping)."""
    app.state.page_closing.set()
    app.state.page_alarms.stop()


def install_page(app: FastAPI, ctx: ApiContext) -> None:
    """Add the page's routes to the API app."""
    closing = threading.Event()
    tap = AlarmTap(ctx.outbox)
    app.state.page_closing = closing
    app.state.page_alarms = tap
    app.include_router(page_router(ctx, closing, tap))


def add_session_routes(router: APIRouter, *, check: Callable[[str], str | None],
                       clock: Callable[[], float], required: str, tokens_key: str,
                       log_name: str) -> None:
    """``POST|GET|DELETE /v1/session`` on ``router``: sign in with a token, who am I,
    sign out. One copy for the site page and the HQ page; ``check`` names a token's
    owner (or None), ``required``/``tokens_key`` say in errors where tokens come from."""

    throttle = SignInThrottle()

    @router.post("/v1/session", summary="Sign in with a token: sets the session cookie",
                 responses={200: {"model": SessionInfo},
                            401: {"model": ErrorBody, "description": "unknown token"},
                            403: {"model": ErrorBody, "description": "from another origin"},
                            422: {"model": ErrorBody, "description": "no token"},
                            429: {"model": ErrorBody, "description": "too many failed sign-ins "
                                  "from this client: wait Retry-After seconds"}},
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": {
                         "type": "object", "required": ["token"],
                         "properties": {"token": {"type": "string",
                                                  "pattern": SIGNIN_TOKEN_PATTERN}}}}}}})
    async def sign_in(request: Request) -> Response:
        # Signing in from another origin's page would plant that page's session here.
        if "origin" in request.headers:
            ok, why = same_origin(request)
            if not ok:
                raise ApiProblem(403, why, "Origin", reason="cross_origin")
        client = request.client.host if request.client else "?"
        key = client_key(client)
        wait = throttle.retry_after(key, clock())
        if wait is not None:
            seconds = math.ceil(wait)
            (log.warning if throttle.first_refusal(key) else log.debug)(
                "%s: too many failed sign-ins from %s; refusing sign-ins for %d s",
                log_name, client, seconds)
            raise ApiProblem(429, f"token: too many failed sign-ins from {client}; try again "
                                  f"in {seconds} s", "token", reason="too_many_attempts",
                             headers={"Retry-After": str(seconds)})
        body = parse_json_object(await request.body())
        token = body.get("token")
        if not isinstance(token, str) or not token.strip():
            raise ApiProblem(422, f"token: required, {required}", "token")
        name = check(token.strip())
        if name is None:
            throttle.failed(key, clock())
            log.info("%s: sign-in with an unknown token from %s", log_name, client)
            raise ApiProblem(401, f"token: unknown token; check it against {tokens_key}",
                             "token", reason="unauthenticated")
        throttle.succeeded(key)
        sessions: SessionStore = request.app.state.sessions
        previous = request.cookies.get(COOKIE_NAME)
        if previous:  # signing in again replaces this browser's session, never piles them up
            sessions.delete(previous)
        session_id, session = sessions.create(name)
        log.info("%s: %s signed in from %s", log_name, name, client)
        response = JSONResponse({"name": name, "expires": iso_ms(session.expires)})
        _set_cookie(response, request, session_id, sessions.ttl_s)
        return response

    @router.get("/v1/session", response_model=SessionInfo,
                summary="Who is signed in (renews the cookie)")
    async def who(request: Request, name: Caller) -> Response:
        sessions: SessionStore = request.app.state.sessions
        cookie = request.cookies.get(COOKIE_NAME)
        session = sessions.lookup(cookie) if cookie else None
        response = JSONResponse({"name": name, "expires": None if session is None
                                 else iso_ms(session.expires)})
        if cookie and session is not None:  # slide the browser's expiry along with ours
            _set_cookie(response, request, cookie, session.expires - clock())
        return response

    @router.delete("/v1/session", status_code=204, response_class=Response,
                   summary="Sign out: ends the session and clears the cookie",
                   responses={403: {"model": ErrorBody, "description": "from another origin"}})
    async def sign_out(request: Request) -> Response:
        cookie = request.cookies.get(COOKIE_NAME)
        if cookie:
            ok, why = same_origin(request)
            if not ok:
                raise ApiProblem(403, why, why.split(":", 1)[0], reason="cross_origin")
            request.app.state.sessions.delete(cookie)
        response = Response(status_code=204)
        response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
        return response


def page_router(ctx: ApiContext, closing: threading.Event, tap: AlarmTap) -> APIRouter:
    router = APIRouter()
    static = load_static()

    def view(request: Request) -> dict[str, Any]:
        tap.start()  # on first use: an API without page visitors runs no extra thread
        now = ctx.clock()
        status = build_status(ctx, now=now)
        kinds = status.get("outbox", {}).get("kinds", {})
        open_alarms = [a for a in status.get("alarms", []) if a.get("state") != "cleared"]
        return {
            "site": {"id": ctx.cfg.site.id, "name": ctx.cfg.site.name or ctx.cfg.site.id},
            "ts": iso_ms(now),
            "status": status,
            "hq": hq_link(status.get("uplink") or {}, kinds, ctx.cfg.mqtt.ack_timeout_s, now,
                          status.get("reasons"), (status.get("outbox") or {}).get("drain")),
            "compliance": compliance_view(kinds, ctx.cfg.compliance.report_within_h),
            "features": features(request.app, ctx.cfg),
            "alarms": {"open": open_alarms, "recent": tap.snapshot(), "missed": tap.missed},
        }

    @router.get("/", response_class=Response, summary="The site page (no token: it holds no data)",
                responses={200: {"content": {"text/html": {}}}, 304: {"description": "unchanged"},
                           503: {"model": ErrorBody, "description": "the page is not installed"}})
    async def index(request: Request) -> Response:
        page = static.get("index.html")
        if page is None:  # a broken install: say so instead of a bare 404
            raise ApiProblem(503, "the site page is not installed (agent/static/index.html "
                                  "missing); reinstall edge-agent", reason="page_missing")
        return static_response(request, page, PAGE_HEADERS)

    @router.get("/static/{name}", response_class=Response, summary="The page's files (no token)",
                responses={200: {"content": {"text/css": {}, "text/javascript": {},
                                             "image/svg+xml": {}, "image/png": {},
                                             "image/x-icon": {}, "text/html": {}}},
                           304: {"description": "unchanged"},
                           404: {"model": ErrorBody, "description": "no such file"}})
    async def static_file(name: str, request: Request) -> Response:
        file = static.get(name)
        if file is None:
            raise ApiProblem(404, f"no such file {name[:40]!r} in the site page", "name")
        return static_response(request, file, {"X-Content-Type-Options": "nosniff"})

    add_session_routes(router, check=lambda token: ctx.tokens.check(token), clock=ctx.clock,
                       required="the API token of this tablet (a line of api.tokens_file)",
                       tokens_key="api.tokens_file", log_name="page")

    @router.get("/v1/page", response_class=Response,
                summary="The page's view of the site: status, HQ link, compliance, alarms",
                responses={200: {"content": {"application/json": {"schema": {
                    "type": "object", "required": ["site", "status", "hq", "alarms"]}}}}})
    async def page_view(request: Request, _: Caller) -> Response:
        return Response(json.dumps(view(request), default=str), media_type="application/json")

    @router.get("/v1/events/stream", response_class=StreamingResponse,
                summary="The page's view as Server-Sent Events (status events, on change "
                        "and every HEARTBEAT_S)",
                responses={200: {"content": {"text/event-stream": {}}}})
    async def stream(request: Request, _: Caller) -> StreamingResponse:
        return StreamingResponse(_events(request, lambda: view(request), closing),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    return router


async def _events(request: Request, build: Callable[[], dict[str, Any]],
                  closing: threading.Event) -> AsyncIterator[bytes]:
    """``status`` events: at once, on every change, and at least every HEARTBEAT_S."""
    yield b"retry: 2000\n\n"  # EventSource reconnects after 2 s when the agent restarts
    last_key: str | None = None
    last_sent = 0.0
    while not closing.is_set():
        try:
            current = build()
        except Exception:  # a broken view must end this stream, never the agent
            log.exception("page: building the status view failed")
            yield b"event: error\ndata: {\"error\": \"status view failed; see the agent log\"}\n\n"
            return
        key = change_key(current)
        now = time.monotonic()
        if key != last_key or now - last_sent >= HEARTBEAT_S:
            yield b"event: status\ndata: " + json.dumps(current, default=str).encode() + b"\n\n"
            last_key, last_sent = key, now
        if await request.is_disconnected():
            return
        await asyncio.sleep(POLL_S)
