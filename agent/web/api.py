"""The local HTTP API (CONTRACT 5): POS and tablets post events, operators read status.

Every answer that is not a success is one JSON shape,
``{"error": message, "field": dotted.path | null, "problems": [{"field", "message"}], "reason"?}``,
whether it comes from our checks, FastAPI's routing or the body-size guard. Bad
input is answered with a 4xx naming the field; it never reaches the outbox and
never causes a 500. A 500 means a bug: it is logged with its traceback once, and
the caller learns the event was not accepted.

The event path parses the body itself (``Request.body()`` + ``json.loads``)
rather than through a FastAPI body model: it must tell malformed JSON (400), the
wrong content type (415), an envelope mistake (422 ``data``) and a payload
mistake (422 ``data.lines.0.package_tag``) apart, and a model per kind would
answer all of them with FastAPI's own 422 shape. The OpenAPI document still
describes the bodies (see ``_openapi``).

Callers and the event ``source``: the token's name (``pos-2``) is the source.
A caller may add a label of its own, in the body's ``source`` or an
``X-Edge-Source`` header, for one token shared by several registers; it is
appended (``pos-2/register-3``) and never replaces the authenticated name, so
no caller can post as another.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Security, WebSocketException
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.routing import Match
from starlette.status import WS_1008_POLICY_VIOLATION
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__
from agent.config import AgentConfig
from agent.errors import DiskFull, EventTooLarge, OutboxError, OutboxFull
from agent.idempotency import IdempotencyKeyReused, body_digest
from agent.kinds import KINDS
from agent.ops.device_metrics import family_collectors
from agent.ops.metrics import ApiMetrics
from agent.ops.status import build_status
from agent.pipeline import schemas
from agent.web.allowed_hosts import HostCheck
from agent.web.auth import Tokens
from agent.web.httpserver import TIMEOUT_SCOPE_KEY
from agent.web.openapi_doc import complete as complete_openapi
from agent.web.sessions import COOKIE_NAME, SessionStore, needs_origin_check, same_origin

if TYPE_CHECKING:
    from agent.outbox import Outbox

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
# An over-long body with a declared length up to this is read and discarded so the
# client can read its 413 (see BodyLimit); a longer one gets the connection cut.
DRAIN_MAX_BYTES = 64 << 20
# Deeper JSON than any POS sends; bounds the recursion of every later encoder.
MAX_JSON_DEPTH = 32
IDEMPOTENCY_KEY_MAX = 200
SOURCE_LABEL_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
ENVELOPE_KEYS = frozenset({"data", "source"})
RETRY_AFTER_FULL_S = "60"
RETRY_AFTER_UNAVAILABLE_S = "5"


@dataclass
class ApiContext:
    """What the API reads and writes; built by the daemon (and by tests)."""

    cfg: AgentConfig
    outbox: Outbox
    tokens: Tokens
    uplink_snapshot: Callable[[], dict[str, Any]]
    devices_snapshot: Callable[[], list[dict[str, Any]]]
    started_at: float
    max_body_bytes: int = MAX_BODY_BYTES
    clock: Callable[[], float] = field(default=time.time)
    # Device families (agent/devices/family.py): each may add routes and metrics.
    services: list[Any] = field(default_factory=list)
    # The Host names answered (agent/web/allowed_hosts.py); the daemon sets them. None: any
    # (an app embedded in a test client, whose Host is "testserver").
    allowed_hosts: frozenset[str] | None = None


# -- the error shape -----------------------------------------------------------------------


class ApiProblem(Exception):
    """A request we refuse; rendered as the one error shape."""

    def __init__(self, status: int, message: str, field: str | None = None, *,
                 problems: list[dict[str, str]] | None = None, reason: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.problems = problems
        self.reason = reason
        self.headers = headers


def error_body(message: str, field: str | None = None,
               problems: list[dict[str, str]] | None = None,
               reason: str | None = None) -> dict[str, Any]:
    if problems is None:
        problems = [{"field": field, "message": message}] if field else []
    body: dict[str, Any] = {"error": message, "field": field, "problems": problems}
    if reason:
        body["reason"] = reason
    return body


def _problem_response(exc: ApiProblem) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.field, exc.problems, exc.reason),
                        status_code=exc.status, headers=exc.headers)


def _shown(text: str, limit: int = 40) -> str:
    """A caller's string, cut short for an error message."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def install_error_handlers(app: FastAPI) -> None:
    """The one error shape for every app of ours (the site API, the HQ page): an
    ApiProblem, a 404/405 and a request that fails validation all answer
    ``error_body``, naming the field."""

    @app.exception_handler(ApiProblem)
    async def _on_problem(request: Request, exc: ApiProblem) -> JSONResponse:
        return _problem_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no such path {_shown(request.url.path)}",
                   405: f"method {request.method} not allowed on {_shown(request.url.path)}"} \
            .get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _on_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        return _client_gone(request.scope)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"field": ".".join(str(p) for p in err.get("loc", ())),
                     "message": str(err.get("msg", "invalid"))} for err in exc.errors()]
        first = problems[0] if problems else {"field": None, "message": "invalid request"}
        return JSONResponse(error_body(f"{first['field']}: {first['message']}", first["field"],
                                       problems), status_code=422)


def _client_gone(scope: Scope) -> JSONResponse:
    """The answer to a request whose client left (or stalled) before its body ended.

    Nobody reads it (the server drops it; a stalled body already got its 408 from
    agent/web/httpserver.py), but it is what the request counter records: a 4xx, not a
    500, and a line at DEBUG, not a traceback.
    """
    client = scope.get("client") or ("?", 0)
    if scope.get(TIMEOUT_SCOPE_KEY):
        log.debug("api: %s %s from %s: the body did not arrive in time", scope.get("method"),
                  scope.get("path"), client[0])
        return JSONResponse(error_body("body: did not arrive in time", "body",
                                       reason="request_timeout"), status_code=408)
    log.debug("api: %s %s from %s: the client left before its body ended", scope.get("method"),
              scope.get("path"), client[0])
    return JSONResponse(error_body("body: the connection closed before the body ended", "body",
                                   reason="client_disconnected"), status_code=400)


# -- ASGI middleware ---------------------------------------------------------------------


class _BodyTooLarge(Exception):
    """Raised into the app from ``receive`` once the 413 is already sent."""


class BodyLimit:
    """Answers 413 for a request body over ``max_bytes`` before anything parses it.

    A declared ``Content-Length`` over the limit is refused before the app runs.
    A body without one (chunked) is counted as it arrives; at the first byte
    over the limit the 413 goes out and ``receive`` raises, so the app reads
    nothing further. Whatever the app then tries to send is dropped.

    The connection: most clients (urllib, requests) write the whole body before
    they read the answer, and a server that closes on unread input resets the
    connection, so they would see a broken pipe instead of the 413. So a
    declared length up to ``DRAIN_MAX_BYTES`` is read to its end and discarded
    chunk by chunk (never buffered, never parsed) before the 413 goes out. A
    client that sent ``Expect: 100-continue`` is answered at once (it has not
    sent the body); so is a longer declared body, and a chunked one, which may
    never end, with ``Connection: close``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send, status: int, message: str, reason: str,
                      close: bool = True) -> None:
        body = json.dumps(error_body(message, "body", reason=reason)).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _discard(receive: Receive, declared_bytes: int) -> None:
        seen = 0
        while seen <= declared_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _too_large(self) -> str:
        return (f"body: over {self.max_bytes} bytes ({self.max_bytes / (1 << 20):g} MiB), "
                "the API's limit for one request")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = [v for k, v in scope["headers"] if k == b"content-length"]
        if declared:
            raw = declared[0]
            if len(declared) > 1 or not raw.isdigit():
                await self._refuse(send, 400, "Content-Length: not a single decimal number",
                                   "bad_content_length")
                return
            declared_bytes = int(raw)
            if declared_bytes > self.max_bytes:
                expects_continue = any(k == b"expect" and v.lower() == b"100-continue"
                                       for k, v in scope["headers"])
                drain = declared_bytes <= DRAIN_MAX_BYTES and not expects_continue
                if drain:
                    await self._discard(receive, declared_bytes)
                await self._refuse(send, 413, self._too_large(), "body_too_large",
                                   close=not drain)
                return

        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(send, 413, self._too_large(), "body_too_large")
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        with contextlib.suppress(_BodyTooLarge):  # the 413 is already sent
            await self.app(scope, limited_receive, guarded_send)


class RequestAccounting:
    """Counts answers by route template and status; turns a bug into a logged JSON 500.

    The route label is the template (``/v1/events/{kind}``), or ``unmatched``:
    a hostile path must not become a new time series.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, routes: Callable[[], list[Any]]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        # The metric children per label set, looked up once rather than per request
        # (``labels()`` takes a lock and builds the key every time). Bounded: route
        # templates times the statuses we answer.
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def _count(self, route: str, status: int, seconds: float) -> None:
        children = self._children.get((route, status))
        if children is None:
            children = (self.metrics.http_requests.labels(route, str(status)),
                        self.metrics.http_duration.labels(route))
            if len(self._children) < 4096:
                self._children[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def _route(self, scope: Scope) -> str:
        # Routing stores the matched route in the (shared) scope; this also finds
        # routes of included routers, which FastAPI wraps without a ``path``.
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        for route in self.routes():
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return str(getattr(route, "path", "unmatched"))
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = "unmatched"
        status = 0
        started = time.perf_counter()

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except ClientDisconnect:  # read outside a route (a middleware): still not a 500
            if not status:
                await _client_gone(scope)(scope, receive, counting_send)
        except Exception:  # any bug in a route: logged, answered 500 once, counted
            route = self._route(scope)
            log.exception("api: unexpected error answering %s %s", scope.get("method"), route)
            if not status:
                status = 500
                body = json.dumps(error_body(
                    "internal error: the request was not completed; it is logged on the agent "
                    "(edge-agent journal), please report it", reason="internal")).encode()
                await send({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
        finally:
            self._count(self._route(scope), status or 499, time.perf_counter() - started)


# -- request parsing -----------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or an ApiProblem naming what is wrong."""
    if not raw.strip():
        raise ApiProblem(400, 'body: empty; send a JSON object {"data": {...}}', "body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiProblem(400, f"body: not UTF-8 (byte {exc.start})", "body") from None
    duplicated = False

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicated
        value = dict(pairs)
        if len(value) == len(pairs):
            return value
        duplicated = True
        return _object(pairs)

    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                           object_pairs_hook=pairs_hook)
    except json.JSONDecodeError as exc:
        raise ApiProblem(400, f"body: not valid JSON: {exc.msg} at line {exc.lineno} column "
                              f"{exc.colno}", "body") from None
    except RecursionError:
        raise ApiProblem(400, f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels",
                         "body") from None
    except ValueError as exc:  # NaN/Infinity, an out-of-range number, a 5000-digit integer
        raise ApiProblem(400, f"body: not valid JSON: {exc}", "body") from None
    if not isinstance(value, dict):
        raise ApiProblem(422, f'body: must be a JSON object {{"data": {{...}}}}, not '
                              f"{_json_type(value)}", "body")
    if duplicated or _may_hold_bad_values(text):
        problem = _check_values(value)
        if problem:
            raise ApiProblem(422, f"{problem[0]}: {problem[1]}", problem[0])
    return value


def _may_hold_bad_values(text: str) -> bool:
    """Whether :func:`_check_values` could find anything in a body parsed from ``text``
    (without a repeated key): the walk is only paid for when it can.

    Text decoded strictly from UTF-8 holds no surrogate, and json refuses a raw
    control character, so a NUL or an unpaired surrogate can only come from a
    ``\\u`` escape; and values nest at most one level deeper than the text has
    ``{`` and ``[`` (counted inside strings too: more, never fewer).
    """
    return "\\u" in text or text.count("{") + text.count("[") >= MAX_JSON_DEPTH


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _bad_text(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate (\\ud800-\\udfff)"
    return None


class _Duplicated(dict[str, Any]):
    """An object that had a key twice (json keeps the last one silently); refused."""

    duplicate = ""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a plain dict, or a :class:`_Duplicated` naming the repeated key.

    A key sent twice is ambiguous (which total does the POS mean?) and a classic way
    to smuggle a value past one parser and into another: refused, naming the key.
    """
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    marked = _Duplicated(value)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked.duplicate = key
            break
        seen.add(key)
    return marked


def _check_values(root: dict[str, Any]) -> tuple[str, str] | None:
    """The first value no later encoder or HQ database can take: too deep, bad text, a
    key given twice.

    Iterative, so a hostile body cannot exhaust the stack here either.
    """
    stack: list[tuple[str, Any, int]] = [("", root, 1)]
    while stack:
        path, value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return path or "body", f"nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(value, _Duplicated):
            where = f"{path}.{value.duplicate}" if path else value.duplicate
            return where[:200], "given more than once in one object; send each key once"
        if isinstance(value, dict):
            for key, item in value.items():
                sub = f"{path}.{key}" if path else key
                bad = _bad_text(key)
                if bad:
                    return path or "body", f"a key {bad}"
                stack.append((sub, item, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item, depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            bad = _bad_text(value)
            if bad:
                return path, bad
    return None


def _content_type_is_json(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                            and media.endswith("+json"))


def _idempotency_key(request: Request) -> str | None:
    values = request.headers.getlist("idempotency-key")
    if not values:
        return None
    message = f"must be 1-{IDEMPOTENCY_KEY_MAX} printable ASCII characters"
    if len(values) > 1:
        message = "send it once"
    else:
        key = values[0]
        if (0 < len(key) <= IDEMPOTENCY_KEY_MAX and key.strip() == key
                and all(" " <= c <= "~" for c in key)):
            return key
    raise ApiProblem(400, f"Idempotency-Key: {message}", "Idempotency-Key")


def _source(caller: str, body: dict[str, Any], request: Request) -> str:
    labels = []
    if "source" in body:
        if not isinstance(body["source"], str):
            raise ApiProblem(422, "source: must be a string", "source")
        labels.append(("source", body["source"]))
    header = request.headers.get("x-edge-source")
    if header is not None:
        labels.append(("X-Edge-Source", header))
    if not labels:
        return caller
    if len(labels) == 2 and labels[0][1] != labels[1][1]:
        raise ApiProblem(422, "source: the body's source and the X-Edge-Source header differ",
                         "source")
    where, label = labels[0]
    if not SOURCE_LABEL_RE.match(label):
        raise ApiProblem(422, f"{where}: must be 1-64 letters, digits, '_', '.', ':' or '-'",
                         where)
    # The authenticated name always leads: a label refines it, never replaces it.
    return caller if label == caller else f"{caller}/{label}"


# -- authentication ------------------------------------------------------------------------


_bearer = HTTPBearer(auto_error=False, description="a token of api.tokens_file")


async def authenticated_caller(
        request: HTTPConnection,
        creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> str:
    """The name of the caller's token, or a 401 that says how to authenticate.

    A bearer token (POS, CLI, HQ tools) or the site page's session cookie
    (agent/web/sessions.py). Typed HTTPConnection so WebSocket routes use it too.
    A cookie is sent by the browser whoever made the page, so a request that
    changes something and carries only the cookie must come from this very
    origin (403 otherwise): that is the CSRF guard.
    """
    try:
        return _caller(request, creds)
    except ApiProblem as problem:
        if request.scope["type"] != "websocket":
            raise
        # A WebSocket cannot carry the JSON error: refuse the handshake with a
        # policy-violation close whose reason is the same message.
        raise WebSocketException(WS_1008_POLICY_VIOLATION,
                                 problem.message[:120]) from None


def _caller(request: HTTPConnection, creds: HTTPAuthorizationCredentials | None) -> str:
    ctx: ApiContext = request.app.state.ctx
    if creds is None:
        cookie = request.cookies.get(COOKIE_NAME)
        if cookie:
            return _cookie_caller(request, cookie)
        if "authorization" in request.headers:
            message = "Authorization: must be 'Bearer <token>'"
        else:
            message = "Authorization: missing; send 'Authorization: Bearer <token>'"
        raise ApiProblem(401, message, "Authorization", reason="unauthenticated",
                         headers={"WWW-Authenticate": 'Bearer realm="edge-agent"'})
    name = ctx.tokens.check(creds.credentials)
    if name is None:
        client = request.client.host if request.client else "?"
        log.info("api: unknown token from %s on %s", client, request.url.path)
        raise ApiProblem(401, "Authorization: unknown token", "Authorization",
                         reason="unauthenticated",
                         headers={"WWW-Authenticate":
                                  'Bearer realm="edge-agent", error="invalid_token"'})
    return name


def _cookie_caller(request: HTTPConnection, cookie: str) -> str:
    ctx: ApiContext = request.app.state.ctx
    sessions: SessionStore = request.app.state.sessions
    session = sessions.lookup(cookie)
    # A session outlives nothing: its token's name must still be in the tokens file.
    if session is None or session.name not in ctx.tokens.names:
        raise ApiProblem(401, "session: expired or signed out; sign in again with a token",
                         "session", reason="unauthenticated",
                         headers={"WWW-Authenticate": 'Bearer realm="edge-agent"'})
    if needs_origin_check(request):
        ok, why = same_origin(request)
        if not ok:
            client = request.client.host if request.client else "?"
            log.warning("api: refused a cross-origin %s %s from %s by session %s (%s)",
                        request.scope.get("method", "WebSocket"), request.url.path, client,
                        session.name, why)
            raise ApiProblem(403, f"{why}; a signed-in page may only change things from the "
                                  "agent's own page", why.split(":", 1)[0],
                             reason="cross_origin")
    return session.name


Caller = Annotated[str, Depends(authenticated_caller)]

# Headers a reverse proxy on the box adds: its request comes from loopback but is
# somebody else's, so it needs the token like any request from the LAN.
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, and 127.x as a dual-stack socket shows it (``::ffff:127.0.0.1``)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False   # "testclient", a name: not an address on this box
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def scraper_on_this_box(request: HTTPConnection) -> bool:
    """A request from loopback with no token, no cookie and no proxy header."""
    headers = request.headers
    return (is_loopback(request.client.host if request.client else "")
            and "authorization" not in headers and "cookie" not in headers
            and not any(name in headers for name in PROXY_HEADERS))


async def metrics_caller(
        request: HTTPConnection,
        creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> str:
    """``/metrics``: open to a scraper on the box itself (a local Prometheus agent or
    node exporter; loopback has no one else on it), token-guarded from anywhere else
    like every other route. A token that is sent is checked, from loopback too."""
    if creds is None and scraper_on_this_box(request):
        return "loopback"
    return await authenticated_caller(request, creds)


MetricsCaller = Annotated[str, Depends(metrics_caller)]


# -- documentation models (OpenAPI only; the handlers parse by hand, see the module doc) -----


class EventAccepted(BaseModel):
    id: str = Field(description="the event's UUIDv7, kept on every resend")
    seq: int = Field(description="per (site, kind), from 1, never reused")
    kind: str


class Problem(BaseModel):
    field: str | None
    message: str


class ErrorBody(BaseModel):
    error: str
    field: str | None = Field(description="dotted path of the first problem, e.g. "
                                          "data.lines.0.package_tag")
    problems: list[Problem]
    reason: str | None = Field(default=None, description="machine-readable cause, e.g. "
                                                         "outbox_full, disk_full")


class Healthz(BaseModel):
    ok: bool
    reason: str | None = None


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in codes}


def _event_body_schema() -> dict[str, Any]:
    payloads = [{"$ref": f"#/components/schemas/{m.__name__}"}
                for m in (schemas.Sale, schemas.Plant, schemas.Alarm)]
    return {
        "type": "object",
        "required": ["data"],
        "additionalProperties": False,
        "properties": {
            "data": {"description": "the payload of that kind: Sale for sale, Plant for plant, "
                                    "Alarm for alarm, an object for the others",
                     "anyOf": [*payloads, {"type": "object"}]},
            "source": {"type": "string", "pattern": SOURCE_LABEL_RE.pattern,
                       "description": "a label appended to the token's name "
                                      "(pos-2/register-3)"},
        },
    }


# -- the app ----------------------------------------------------------------------------


EVENTS_PREFIX = "/v1/events/"


class AgentApp(FastAPI):
    """FastAPI with one fast lane: ``POST /v1/events/{kind}``, the path every sale takes.

    That request skips Starlette's middleware stack, router and FastAPI's request
    handler (matching every route's regex, the exception-handler and exit-stack
    layers, the dependency machinery: more of the request's time than the event's
    own checks) and goes through our own layers, built with the same settings, to
    the same handler (:func:`create_app`'s ``accept_event``): the Host check, the
    body limit, request accounting, then authentication, kind, Idempotency-Key,
    content type, JSON and payload validation, the durable commit. Its answers
    are the ones the routed request gives, errors in the one error shape; the
    route stays registered, so the OpenAPI document is unchanged and a request
    the lane does not take (another method, a ``root_path``) is routed as before.
    FastAPI's native OpenTelemetry middleware is not on the lane (the agent sets
    up no provider).
    """

    fast_events: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast_events
        if (fast is not None and scope["type"] == "http" and scope["method"] == "POST"
                and not self.root_path and not scope.get("root_path")):
            path: str = scope["path"]
            # What the route's {kind} matches: one non-empty segment.
            if (path.startswith(EVENTS_PREFIX) and len(path) > len(EVENTS_PREFIX)
                    and "/" not in path[len(EVENTS_PREFIX):]):
                await fast(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _fast_lane(app: FastAPI, ctx: ApiContext, metrics: ApiMetrics, route: Any,
               handler: Callable[[str, Request], Any]) -> ASGIApp:
    """The ASGI app :class:`AgentApp` sends event posts to: our middleware in the
    order ``create_app`` adds it, around ``handler``, with the exception handlers'
    answers (``install_error_handlers``) for what it raises."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        # What Starlette and the router put in the scope, for Request and accounting.
        scope["app"] = app
        scope["route"] = route
        kind = scope["path"][len(EVENTS_PREFIX):]
        scope["path_params"] = {"kind": kind}
        request = Request(scope, receive)
        try:
            response = await handler(kind, request)
        except ApiProblem as exc:
            response = _problem_response(exc)
        except ClientDisconnect:
            response = _client_gone(scope)
        await response(scope, receive, send)

    lane: ASGIApp = endpoint
    if ctx.allowed_hosts is not None:
        lane = HostCheck(lane, allowed=ctx.allowed_hosts)
    lane = BodyLimit(lane, max_bytes=ctx.max_body_bytes)
    return RequestAccounting(lane, metrics=metrics, routes=lambda: app.router.routes)


def create_app(ctx: ApiContext, routers: Iterable[APIRouter] = ()) -> FastAPI:
    """The API over ``ctx``; uvicorn (the daemon) or TestClient (tests) serves it.

    The running families' routes (``family_routes.py``) are added, then ``routers``.
    """
    app = AgentApp(title="edge-agent", version=__version__,
                  summary="Local API of one site: events in, status out (CONTRACT 5)",
                  # /docs and /redoc pull their JavaScript from a CDN an edge box may not
                  # reach; the document itself is served below, behind the token.
                  docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ApiMetrics(ctx.outbox, ctx.uplink_snapshot, ctx.clock,
                         status=lambda: build_status(ctx, now=ctx.clock()))
    app.state.ctx = ctx
    app.state.metrics = metrics
    # Beside the outbox, in the daemon's state directory (as the services' state_dir).
    app.state.sessions = SessionStore(Path(ctx.cfg.outbox.path).parent / "sessions.json",
                                      clock=ctx.clock, fingerprint=ctx.tokens.fingerprint)
    # add_middleware puts the last one outermost: accounting sees every answer,
    # the 413s of BodyLimit included.
    if ctx.allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=ctx.allowed_hosts)
    app.add_middleware(BodyLimit, max_bytes=ctx.max_body_bytes)
    app.add_middleware(RequestAccounting, metrics=metrics, routes=lambda: app.router.routes)

    install_error_handlers(app)
    device_ids = frozenset(device.id for device in ctx.cfg.devices)  # not for callers to claim

    @app.get("/healthz", response_model=Healthz, responses={503: {"model": Healthz}},
             summary="200 while the outbox can take events (no token needed)")
    async def healthz() -> JSONResponse:
        ok, reason = outbox_writable(ctx.outbox)
        body: dict[str, Any] = {"ok": ok} if ok else {"ok": False, "reason": reason}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/status", responses=_errors(401),
             summary="Uplink, outbox (per kind) and devices, with the degraded reasons")
    async def status(_: Caller) -> Response:
        # default=str: a driver's snapshot holding a datetime must not turn status into a 500.
        return Response(json.dumps(build_status(ctx, now=ctx.clock()), default=str),
                        media_type="application/json")

    # The empty requirement appended to the bearer one says the token is optional (for a
    # scraper on this box: 127.0.0.0/8 or ::1 with no proxy header); from elsewhere, 401.
    @app.get("/metrics", responses=_errors(401), response_class=Response,
             summary="Prometheus text format (no token needed from 127.0.0.1 or ::1)",
             openapi_extra={"security": [{}]})
    async def prometheus(_: MetricsCaller) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(_: Caller) -> JSONResponse:
        return JSONResponse(app.openapi())

    async def accept_event(kind: str, request: Request) -> JSONResponse:
        # The hot path: the caller is found without FastAPI's dependency solver (a
        # quarter of the route's time); the same check as Caller, declared in the
        # document by openapi_extra's security.
        name = await authenticated_caller(request, await _bearer(request))
        if kind not in KINDS:
            raise ApiProblem(404, f"kind: unknown event kind {_shown(kind)}; one of "
                                  f"{', '.join(KINDS)}", "kind", reason="unknown_kind")
        if kind in schemas.AGENT_ONLY_KINDS:
            raise ApiProblem(403, f"kind: {schemas.AGENT_ONLY_KINDS[kind]}; they cannot be "
                                  "posted over the API", "kind", reason="agent_only_kind")
        idem_key = _idempotency_key(request)
        if not _content_type_is_json(request):
            got = request.headers.get("content-type")
            raise ApiProblem(415, "Content-Type: must be application/json"
                                  + (f", not {_shown(got)}" if got else " (missing)"),
                             "Content-Type", reason="unsupported_media_type")
        body = parse_json_object(await request.body())
        unknown = sorted(set(body) - ENVELOPE_KEYS)
        if unknown:
            raise ApiProblem(422, f"{_shown(unknown[0])}: unknown field; the body is "
                                  '{"data": {...}, "source"?: "..."}', unknown[0][:64])
        if "data" not in body:
            raise ApiProblem(422, 'data: required; the body is {"data": {...}}', "data")
        source = _source(name, body, request)
        try:
            data = schemas.validate_posted(kind, body["data"], device_ids)
        except schemas.FieldProblem as exc:
            raise ApiProblem(422, str(exc), exc.field, problems=exc.problems,
                             reason="invalid") from None
        # Raw UTF-8 rather than \u escapes: a third of the bytes for accented product
        # names; safe because parse_json_object refused unpaired surrogates and NUL.
        data_json = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        # Scoped by caller and kind: two POS that happen to pick the same key (a
        # receipt number) must not get each other's answers.
        scoped_key = None if idem_key is None else f"{name}/{kind}/{idem_key}"
        try:
            # Shielded: once handed to the outbox the event commits even if the
            # client goes away; a retry with its Idempotency-Key gets the answer.
            accepted = await asyncio.shield(
                ctx.outbox.append(kind, data_json, source, scoped_key,
                                  None if idem_key is None else body_digest(body)))
        except IdempotencyKeyReused as exc:
            raise ApiProblem(422, str(exc), exc.field, reason="idempotency_key_reused") from None
        except OutboxFull as exc:
            raise ApiProblem(507, str(exc), reason="outbox_full",
                             headers={"Retry-After": RETRY_AFTER_FULL_S}) from None
        except DiskFull as exc:
            raise ApiProblem(507, str(exc), reason="disk_full",
                             headers={"Retry-After": RETRY_AFTER_FULL_S}) from None
        except EventTooLarge as exc:
            raise ApiProblem(413, str(exc), "data", reason="event_too_large") from None
        except OutboxError as exc:
            log.error("api: outbox refused a %s event: %s", kind, exc)
            raise ApiProblem(503, f"outbox unavailable: {exc}", reason="outbox_unavailable",
                             headers={"Retry-After": RETRY_AFTER_UNAVAILABLE_S}) from None
        headers = {"Idempotent-Replayed": "true"} if accepted.replay else None
        return JSONResponse({"id": accepted.id, "seq": accepted.seq, "kind": accepted.kind},
                            status_code=202, headers=headers)

    @app.post("/v1/events/{kind}", status_code=202, response_model=EventAccepted,
              responses=_errors(400, 401, 403, 404, 413, 415, 422, 503, 507),
              summary="Validate an event, commit it durably, then answer 202",
              openapi_extra={"parameters": [
                  {"name": "Idempotency-Key", "in": "header", "required": False,
                   "schema": {"type": "string", "minLength": 1,
                              "maxLength": IDEMPOTENCY_KEY_MAX,
                              "pattern": "^[!-~]([ -~]*[!-~])?$"},
                   "description": "a repeat with the same key (same caller and kind) and "
                                  "the same body returns the first answer and writes "
                                  "nothing; the same key with another body is 422"},
                  {"name": "X-Edge-Source", "in": "header", "required": False,
                   "schema": {"type": "string", "pattern": SOURCE_LABEL_RE.pattern},
                   "description": "a label appended to the token's name as the event source"}],
                  "security": [{"HTTPBearer": []}],
                  "requestBody": {"required": True, "content": {
                      "application/json": {"schema": _event_body_schema()}}}})
    async def post_event(kind: str, request: Request) -> JSONResponse:
        return await accept_event(kind, request)

    # The same handler, without the routing around it (AgentApp).
    app.fast_events = _fast_lane(app, ctx, metrics, app.router.routes[-1], accept_event)

    def _openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary,
                              routes=app.routes)
            # The payload models, so integrators see the Sale and Plant rules.
            _, defs = models_json_schema(
                [(m, "validation") for m in (schemas.Sale, schemas.Plant, schemas.Alarm,
                                             schemas.PostedScan, schemas.PostedReading)],
                ref_template="#/components/schemas/{model}")
            doc.setdefault("components", {}).setdefault("schemas", {}).update(
                defs.get("$defs", {}))
            # Every answer each route can give, and one path per kind (agent/web/openapi_doc.py).
            app.openapi_schema = complete_openapi(doc)
        return app.openapi_schema

    app.openapi = _openapi  # type: ignore[method-assign]
    # The site page (GET /, /static, sign-in, the live status stream) and the
    # families' routes; imported here because they build on this module's Caller
    # and ApiProblem.
    from agent.web.family_routes import family_routers
    from agent.web.page import install_page

    install_page(app, ctx)
    # Device families add their routes (authenticated with the same Caller
    # dependency) and their metrics to this app's registry.
    for router in [*family_routers(ctx.services), *routers]:
        app.include_router(router)
    for collector in family_collectors(ctx.services):
        metrics.registry.register(collector)
    _upgrade_required_routes(app)
    return app


def _upgrade_required_routes(app: FastAPI) -> None:
    """A plain HTTP GET on a WebSocket path answers 426 saying so, rather than a 404
    that claims the path does not exist (and the document lists the path)."""
    from starlette.routing import WebSocketRoute

    def sockets(routes: list[Any], prefix: str = "") -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for route in routes:
            inner = getattr(route, "original_router", None)  # an included router
            if inner is not None:
                context = getattr(route, "include_context", None)
                found += sockets(inner.routes,
                                 prefix + str(getattr(context, "prefix", "") or ""))
            elif isinstance(route, WebSocketRoute):
                found.append((prefix + route.path, route.name))
        return found

    def answer(path: str) -> Callable[[], Any]:
        async def upgrade_required() -> JSONResponse:
            return JSONResponse(error_body(f"{path} is a WebSocket: connect with "
                                           "'Upgrade: websocket' (and a token)",
                                           reason="upgrade_required"),
                                status_code=426, headers={"Upgrade": "websocket"})

        return upgrade_required

    for path, name in sockets(app.router.routes):
        upgrade_required = answer(path)

        app.add_api_route(path, upgrade_required, methods=["GET"], name=f"{name}_http",
                          summary=f"WebSocket ({name}); a plain GET answers 426",
                          responses={101: {"description": "Switching Protocols: the "
                                           "WebSocket, authenticated by a bearer token or the "
                                           "session cookie (closed with 1008 when not)"},
                                     426: {"model": ErrorBody}},
                          status_code=426, response_class=JSONResponse,
                          dependencies=[])


def outbox_writable(outbox: Outbox) -> tuple[bool, str | None]:
    """Whether the outbox can take events now, else why not (for ``/healthz``)."""
    if outbox.state == "disk_full":
        return False, "disk_full: the disk under the outbox is full"
    alive = getattr(outbox, "writer_alive", None)
    if callable(alive):
        alive = alive()
    if alive is False:
        return False, "outbox_stopped: the outbox writer is not running"
    return True, None
