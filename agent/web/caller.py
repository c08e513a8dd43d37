"""Who is calling: a bearer token or this origin's session cookie (``Caller``).

And the scraper on this box that may read /metrics without a token
(``MetricsCaller``).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Annotated

from fastapi import Depends, Security, WebSocketException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection
from starlette.status import WS_1008_POLICY_VIOLATION

from agent.web.context import ApiContext
from agent.web.problems import (
    ApiProblem,
)
from agent.web.sessions import COOKIE_NAME, SessionStore, needs_origin_check, same_origin

log = logging.getLogger(__name__)


bearer_scheme = HTTPBearer(auto_error=False, description="a token of api.tokens_file")


async def authenticated_caller(
        request: HTTPConnection,
        creds: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]) -> str:
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
        creds: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]) -> str:
    """``/metrics``: open to a scraper on the box itself (a local Prometheus agent or
    node exporter; loopback has no one else on it), token-guarded from anywhere else
    like every other route. A token that is sent is checked, from loopback too."""
    if creds is None and scraper_on_this_box(request):
        return "loopback"
    return await authenticated_caller(request, creds)


MetricsCaller = Annotated[str, Depends(metrics_caller)]
