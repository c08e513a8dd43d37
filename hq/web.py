"""The HQ page and its JSON API, served by ``edge-agent hq`` on ``[hq] http_bind``/``http_port``.

The same rules as the site's API (agent/web/api.py), by reuse rather than copy:
bearer tokens from ``[hq] tokens_file`` checked by :class:`agent.web.auth.Tokens`,
the browser's session cookie of :mod:`agent.web.sessions` (with its same-origin
check), the one error shape, the 1 MiB body limit, and 4xx naming the field
for anything a caller got wrong, never a 500.

Routes:

- ``GET /`` and ``/static/{name}``: the page (agent/static/hq.html, hq.js and
  the site page's app.css); public, they hold no data.
- ``POST|GET|DELETE /v1/session``: sign in with a token, who am I, sign out.
- ``GET /v1/fleet``: every site, most at risk first (:func:`hq.fleet.by_risk`).
- ``GET /v1/sites/{id}``: one site: its fleet row, the report's kinds (gaps,
  conflicts, rejects where the store has them), devices, and its printers'
  fault counts per hour over ``?hours=`` (default 48, at most 24*31).
- ``GET /v1/metrc[?site=ID][&days=N]``: Metrc reporting per site and local day
  (sales at HQ, reported, pending, failed with Metrc's message, overdue) over
  the last N days (default 7), with ``enabled`` false when ``[metrc]`` is off.
- ``GET /metrics``: Prometheus text (hq/metrics.py).
- ``GET /healthz``: 200 while the store answers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import __version__
from agent.config import SITE_ID_RE
from agent.envelope import iso_ms
from agent.web.auth import Tokens
from agent.web.caller import Caller
from agent.web.httpserver import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, build_server
from agent.web.middleware import BodyLimit
from agent.web.page import PAGE_HEADERS, add_session_routes, load_static, static_response
from agent.web.problems import ApiProblem, error_body, install_error_handlers
from agent.web.sessions import SessionStore
from hq.config import HqReceiverConfig
from hq.fleet import FleetStore, by_risk, fleet_rows
from hq.fleet_cli import policy
from hq.metrics import HqMetrics
from hq.store import Store, StoreError, sqlite_path

log = logging.getLogger(__name__)

FAULT_HOURS_DEFAULT = 48
FAULT_HOURS_MAX = 24 * 31
METRC_DAYS_MAX = 92


@dataclass
class HqWebContext:
    """What the HQ page reads. ``tokens`` has the name agent/web/api.py's Caller looks for."""

    cfg: HqReceiverConfig
    tokens: Tokens
    store: Store
    fleet: FleetStore
    metrics: HqMetrics
    state_dir: Path | None = None
    clock: Callable[[], float] = field(default=time.time)
    metrc: Any = None   # hq.metrc.reports.ReportStore when [metrc] is enabled


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, default=str), status_code=status,
                    media_type="application/json")


def create_hq_app(ctx: HqWebContext) -> FastAPI:
    app = FastAPI(title="edge-agent HQ", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.ctx = ctx
    app.state.sessions = SessionStore(
        None if ctx.state_dir is None else ctx.state_dir / "hq-sessions.json", clock=ctx.clock,
        fingerprint=ctx.tokens.fingerprint)
    app.add_middleware(BodyLimit)
    static = load_static()
    registered = {s.id: s for s in ctx.cfg.hq.sites}
    rules = policy(ctx.cfg)

    install_error_handlers(app)

    @app.exception_handler(StoreError)
    async def _on_store(request: Request, exc: StoreError) -> JSONResponse:
        log.error("hq page: %s", exc)
        return JSONResponse(error_body(f"the HQ store is not answering: {exc}",
                                       reason="store_unavailable"),
                            status_code=503, headers={"Retry-After": "5"})

    def rows() -> list[dict[str, Any]]:
        now = ctx.clock()
        return by_risk(fleet_rows(ctx.cfg.hq.sites, ctx.fleet.states(), now, rules),
                       rules.report_within_h)

    @app.get("/healthz")
    async def healthz() -> Response:
        try:
            ctx.fleet.states()
        except StoreError as exc:
            return _json({"ok": False, "reason": str(exc)}, 503)
        return _json({"ok": True})

    @app.get("/")
    async def index(request: Request) -> Response:
        page = static.get("hq.html")
        if page is None:
            raise ApiProblem(503, "the HQ page is not installed (agent/static/hq.html missing)",
                             reason="page_missing")
        return static_response(request, page, PAGE_HEADERS)

    @app.get("/static/{name}")
    async def static_file(name: str, request: Request) -> Response:
        file = static.get(name)
        if file is None:
            raise ApiProblem(404, f"no such file {name[:40]!r} in the HQ page", "name")
        return static_response(request, file, {"X-Content-Type-Options": "nosniff"})

    sessions_router = APIRouter()
    add_session_routes(sessions_router, check=lambda token: ctx.tokens.check(token),
                       clock=ctx.clock, required="a token of [hq] tokens_file",
                       tokens_key="[hq] tokens_file", log_name="hq page")
    app.include_router(sessions_router)

    @app.get("/v1/fleet")
    async def fleet(_: Caller) -> Response:
        sites = rows()
        registered_rows = [r for r in sites if r["registered"]]
        return _json({
            "generated_at": iso_ms(ctx.clock()),
            "report_within_h": rules.report_within_h,
            "silent_after_s": rules.silent_after_s,
            "summary": {s: sum(1 for r in sites if r["status"] == s)
                        for s in ("online", "offline", "silent", "never-seen")},
            "all_online": all(r["status"] == "online" for r in registered_rows),
            "sites": sites,
        })

    @app.get("/v1/sites/{site_id}")
    async def site(site_id: str, request: Request, _: Caller) -> Response:
        if not SITE_ID_RE.match(site_id):
            raise ApiProblem(422, "site_id: must match [a-z0-9-]{1,64}", "site_id")
        hours = _hours(request.query_params.get("hours"))
        row = next((r for r in rows() if r["site"] == site_id), None)
        if row is None:
            raise ApiProblem(404, f"site_id: no site {site_id!r} is registered or has been "
                                  "heard from", "site_id", reason="unknown_site")
        now = ctx.clock()
        report = ctx.store.report(site=site_id, now=now)
        kinds: list[dict[str, Any]] = next(
            (s["kinds"] for s in report["sites"] if s["site"] == site_id), [])
        states = ctx.fleet.states()
        health = states[site_id].health if site_id in states else None
        return _json({
            **row,
            "entry": None if site_id not in registered else registered[site_id].model_dump(),
            "kinds": kinds,
            "devices": [d.__dict__ for d in health.devices] if health else [],
            "faults": {"hours": hours, "rows": ctx.fleet.faults(site_id, now - hours * 3600)},
            "generated_at": iso_ms(now),
        })

    @app.get("/v1/metrc")
    async def metrc(request: Request, _: Caller) -> Response:
        from hq.metrc.status import by_day

        site_id = request.query_params.get("site")
        if site_id is not None and not SITE_ID_RE.match(site_id):
            raise ApiProblem(422, "site: must match [a-z0-9-]{1,64}", "site")
        raw = request.query_params.get("days", "7")
        if not raw.isdigit() or not 1 <= int(raw) <= METRC_DAYS_MAX:
            raise ApiProblem(422, f"days: must be a whole number 1..{METRC_DAYS_MAX}", "days")
        now = ctx.clock()
        if ctx.metrc is None:
            return _json({"enabled": False, "days": [], "generated_at": iso_ms(now)})
        return _json({"enabled": True, "report_within_h": rules.report_within_h,
                      "days": by_day(ctx.metrc, ctx.cfg.hq.sites, now, int(raw), site_id),
                      "generated_at": iso_ms(now)})

    @app.get("/metrics")
    async def metrics(_: Caller) -> Response:
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _hours(raw: str | None) -> int:
    if raw is None:
        return FAULT_HOURS_DEFAULT
    if not raw.isdigit() or not 1 <= int(raw) <= FAULT_HOURS_MAX:
        raise ApiProblem(422, f"hours: must be a whole number 1..{FAULT_HOURS_MAX}", "hours")
    return int(raw)


class HqWebServer:
    """uvicorn in a thread of ``edge-agent hq``; the receiver never waits on it."""

    def __init__(self, app: FastAPI, host: str, port: int,
                 on_stop: Callable[[], Any] | None = None, *,
                 header_timeout_s: float = HEADER_TIMEOUT_S,
                 body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        import threading

        self.host, self.port = host, port
        self._on_stop = on_stop
        # The site API's server (agent/web/httpserver.py): TCP_NODELAY, header/body
        # deadlines, the connection cap, accept errors logged once per edge.
        self._server = build_server(app, "hq page", host=host, port=port, lifespan="off",
                                    header_timeout_s=header_timeout_s,
                                    body_timeout_s=body_timeout_s)
        self._thread = threading.Thread(target=self._server.run, name="hq-web", daemon=True)

    def start(self, timeout: float = 10.0) -> bool:
        """Serve; False (logged) when the port cannot be bound in ``timeout``."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._thread.is_alive():
            if self._server.started:
                log.info("hq page on http://%s:%d/", self.host, self.port)
                return True
            time.sleep(0.02)
        why = self._server.listen_error
        log.error("hq page: cannot serve on %s:%d (%s; see [hq] http_bind/http_port); "
                  "the receiver runs without it", self.host, self.port,
                  why.strerror or why if why else "in use?")
        return False

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
        if self._on_stop is not None:
            self._on_stop()


def start_web(cfg: HqReceiverConfig, receiver: Any, metrics: HqMetrics) -> HqWebServer | None:
    """The page beside a running receiver, or None (logged) when it cannot be served:
    a broken page must never stop events from being stored and acked."""
    from agent.errors import AgentError, ConfigError
    from hq.backends import open_store
    from hq.fleet_store import open_fleet_store

    if cfg.hq.http_port == 0:
        return None
    try:
        tokens = Tokens.load(cfg.hq.tokens_file)
    except (ConfigError, AgentError) as exc:
        log.warning("hq page: not served: [hq] tokens_file: %s", exc)
        return None
    try:
        store = open_store(cfg.hq.store)
        fleet = open_fleet_store(cfg.hq.store)
    except StoreError as exc:
        log.error("hq page: not served: %s", exc)
        return None
    metrics.watch(receiver, fleet.states, [s.id for s in cfg.hq.sites], policy(cfg))
    # Sessions beside the SQLite store, so a restart keeps people signed in.
    state_dir = (Path(sqlite_path(cfg.hq.store)).parent if cfg.hq.store.startswith("sqlite:")
                 else None)
    reports = None
    if cfg.metrc.enabled:
        from hq.backends import open_report_store

        try:
            reports = open_report_store(cfg.hq.store)
        except StoreError as exc:
            log.warning("hq page: no Metrc view: %s", exc)
    app = create_hq_app(HqWebContext(cfg, tokens, store, fleet, metrics, state_dir,
                                     metrc=reports))
    server = HqWebServer(app, cfg.hq.http_bind, cfg.hq.http_port,
                         on_stop=lambda: _close(store, fleet, reports))
    return server if server.start() else None


def _close(store: Store, fleet: FleetStore, reports: Any = None) -> None:
    store.close()
    fleet.close()
    if reports is not None:
        reports.close()
