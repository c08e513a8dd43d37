"""What POS, the site page and Prometheus see of the scanners family.

The family itself is ``agent/devices/scanning.py``.

- ``GET /v1/scans`` (WebSocket): every scan from every scanner, as it happens.
  Each text message is the scan's event envelope exactly as HQ receives it
  (``{"v":1,"id","site","kind":"scan","seq","ts","source","data":{...}}``),
  sent once the event is committed; ``seq`` is per site, so a client sees
  from ``seq`` alone whether it missed a scan. Messages from the client are
  read and ignored.
- ``GET /v1/catalog``: the package catalog's size and state; with
  ``?tag=...``, whether that package tag is in it.

Authentication is :func:`agent.web.caller.authenticated_caller`, as for every other
route: ``Authorization: Bearer <token>`` on the handshake (POS and tools), or
the site page's session cookie (a same-origin page only). There is no
``?token=`` form: a token in a URL lands in access logs, proxies and browser
history, and the browser client that cannot set a header (the site page) has
the cookie. A refused handshake is never accepted: it is closed with 1008 and
the API's message as the reason (uvicorn answers such a handshake with HTTP
403), or, where agent.web.api raises its JSON error, that error with its 401/403
through the WebSocket Denial Response extension.

A slow or stalled client must not hold up the reader or the other clients:
each client has a queue of ``CLIENT_QUEUE_MAX`` messages and its own sender
task; publishing never awaits, and a full queue drops its oldest message
(counted per client and in ``edge_scan_clients_dropped_total``; the client
sees the gap in ``seq``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import WebSocketException

from agent.devices.scan_feed import FeedClient
from agent.envelope import iso_ms
from agent.pipeline.schemas import is_package_tag
from agent.web.caller import Caller, authenticated_caller
from agent.web.problems import ApiProblem, error_body

if TYPE_CHECKING:
    from agent.devices.scanning import ScannerService

log = logging.getLogger(__name__)

GOING_AWAY = 1001
POLICY_VIOLATION = 1008


async def _send_loop(websocket: WebSocket, client: FeedClient) -> None:
    while True:
        text = await client.next()
        if text is None:
            with contextlib.suppress(Exception):
                await websocket.close(GOING_AWAY, "edge-agent is stopping")
            return
        try:
            await websocket.send_text(text)
        except Exception as exc:  # the client went away mid-send: any transport error
            log.debug("scans: sending to %s failed: %s", client.peer, exc)
            return
        client.sent += 1


async def _receive_loop(websocket: WebSocket) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


async def _deny(websocket: WebSocket, problem: ApiProblem) -> None:
    body = error_body(problem.message, problem.field, problem.problems, problem.reason)
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse(body, status_code=problem.status,
                                                          headers=problem.headers))
    else:
        await websocket.close(POLICY_VIOLATION, problem.message[:120])


def scanning_router(service: ScannerService) -> APIRouter:
    """``/v1/scans`` and ``/v1/catalog`` over ``service``."""
    router = APIRouter(tags=["scanners"])
    bearer = HTTPBearer(auto_error=False)

    @router.websocket("/v1/scans", name="scans")
    async def scans(websocket: WebSocket) -> None:
        """Every scan as its committed event envelope (see the module docstring)."""
        try:
            name = await authenticated_caller(websocket, await bearer(websocket))
        except ApiProblem as problem:
            await _deny(websocket, problem)
            return
        except WebSocketException as exc:  # agent.web.api's own refusal for a WebSocket
            await websocket.close(exc.code, exc.reason)
            return
        feed = service.feed
        if feed.closed:
            await _deny(websocket, ApiProblem(503, "scans: edge-agent is stopping",
                                              reason="stopping"))
            return
        await websocket.accept()
        peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "?"
        client = feed.join(name, peer)
        log.debug("scans: %s (%s) connected", name, peer)
        sender = asyncio.create_task(_send_loop(websocket, client))
        receiver = asyncio.create_task(_receive_loop(websocket))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            feed.leave(client)
            for task in (sender, receiver):
                task.cancel()
            # asyncio.wait, not gather: a cancellation of this handler (server shutdown,
            # anyio's cancel scope) must surface as its own CancelledError, not the
            # children's, or the server's task group does not recognise it.
            await asyncio.wait({sender, receiver})
            log.debug("scans: %s (%s) left after %d scans (%d dropped)", name, peer,
                      client.sent, client.dropped)

    @router.get("/v1/catalog", summary="The package catalog: size, state, and one tag's entry",
                responses={401: {}, 422: {}, 503: {}})
    async def catalog(_: Caller, tag: str | None = None) -> JSONResponse:
        cat = service.catalog
        if cat is None:
            raise ApiProblem(503, "catalog: the scanners service is not started",
                             reason="catalog_unavailable")
        snap = cat.snapshot()
        body: dict[str, Any] = {
            "count": snap["count"], "available": snap["available"], "error": snap["error"],
            "updated_at": iso_ms(snap["updated_at"]) if snap["updated_at"] else None}
        if tag is not None:
            if not is_package_tag(tag):
                shown = repr(tag if len(tag) <= 40 else tag[:40] + "...")
                raise ApiProblem(422, f"tag: {shown} is not a package tag (24 upper-case "
                                      "letters and digits)", "tag")
            hit = await asyncio.to_thread(cat.lookup, tag)
            if hit is None:
                raise ApiProblem(503, f"catalog: cannot be read ({cat.error or 'see the log'})",
                                 reason="catalog_unavailable")
            added = hit["added_at"]
            body.update(tag=tag, known=hit["known"], added_at=iso_ms(added) if added else None)
        return JSONResponse(body)

    return router


