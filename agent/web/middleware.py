"""ASGI middleware of the site's API.

The body limit (413 before parsing) and request accounting (metrics by route
template).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.ops.metrics import ApiMetrics
from agent.web.context import MAX_BODY_BYTES
from agent.web.problems import (
    client_gone,
    error_body,
)

log = logging.getLogger(__name__)


# An over-long body with a declared length up to this is read and discarded so the
# client can read its 413 (see BodyLimit); a longer one gets the connection cut.
DRAIN_MAX_BYTES = 64 << 20


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
                await client_gone(scope)(scope, receive, counting_send)
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
