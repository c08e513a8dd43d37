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
import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from agent import __version__
from agent.errors import DiskFull, EventTooLarge, OutboxError, OutboxFull
from agent.idempotency import IdempotencyKeyReused, body_digest
from agent.kinds import KINDS
from agent.ops.device_metrics import family_collectors
from agent.ops.metrics import ApiMetrics
from agent.ops.status import build_status
from agent.pipeline import schemas
from agent.web.allowed_hosts import HostCheck
from agent.web.caller import Caller, MetricsCaller, authenticated_caller, bearer_scheme
from agent.web.checks import (
    IDEMPOTENCY_KEY_MAX,
    idempotency_key,
    json_body,
)
from agent.web.context import ApiContext
from agent.web.middleware import BodyLimit, RequestAccounting
from agent.web.openapi_doc import complete as complete_openapi
from agent.web.page import install_page
from agent.web.problems import (
    ApiProblem,
    ErrorBody,
    client_gone,
    error_body,
    install_error_handlers,
    problem_response,
    shown,
)
from agent.web.sessions import SessionStore

if TYPE_CHECKING:
    from agent.outbox import Outbox

log = logging.getLogger(__name__)

SOURCE_LABEL_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
ENVELOPE_KEYS = frozenset({"data", "source"})
RETRY_AFTER_FULL_S = "60"
RETRY_AFTER_UNAVAILABLE_S = "5"


# -- the error shape -----------------------------------------------------------------------


# -- ASGI middleware ---------------------------------------------------------------------


# -- request parsing -----------------------------------------------------------------------


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


# -- documentation models (OpenAPI only; the handlers parse by hand, see the module doc) -----


class EventAccepted(BaseModel):
    id: str = Field(description="the event's UUIDv7, kept on every resend")
    seq: int = Field(description="per (site, kind), from 1, never reused")
    kind: str


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
            response = problem_response(exc)
        except ClientDisconnect:
            response = client_gone(scope)
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
        name = await authenticated_caller(request, await bearer_scheme(request))
        if kind not in KINDS:
            raise ApiProblem(404, f"kind: unknown event kind {shown(kind)}; one of "
                                  f"{', '.join(KINDS)}", "kind", reason="unknown_kind")
        if kind in schemas.AGENT_ONLY_KINDS:
            raise ApiProblem(403, f"kind: {schemas.AGENT_ONLY_KINDS[kind]}; they cannot be "
                                  "posted over the API", "kind", reason="agent_only_kind")
        idem_key = idempotency_key(request)
        body = await json_body(request)
        unknown = sorted(set(body) - ENVELOPE_KEYS)
        if unknown:
            raise ApiProblem(422, f"{shown(unknown[0])}: unknown field; the body is "
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
                ctx.outbox.enqueue(kind, data_json, source, scoped_key,
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
    # The site page: GET /, /static, sign-in, the live status stream.
    install_page(app, ctx)
    # Imported here, not with this module: the route modules import their families and
    # those their drivers, which the daemon has loaded (in a thread) by the time it
    # builds the app.
    from agent.web.family_routes import family_routers

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
