"""The one error shape of the HTTP layer and the handlers that give it.

Every refusal is {"error", "field", "problems"?, "reason"?} with one status
(CONTRACT 5: a message naming the field, never a 500 for bad input).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Scope

from agent.web.httpserver import TIMEOUT_SCOPE_KEY

log = logging.getLogger(__name__)


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


def problem_response(exc: ApiProblem) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.field, exc.problems, exc.reason),
                        status_code=exc.status, headers=exc.headers)


def shown(text: str, limit: int = 40) -> str:
    """A caller's string, cut short for an error message."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def install_error_handlers(app: FastAPI) -> None:
    """The one error shape for every app of ours (the site API, the HQ page): an
    ApiProblem, a 404/405 and a request that fails validation all answer
    ``error_body``, naming the field."""

    @app.exception_handler(ApiProblem)
    async def _on_problem(request: Request, exc: ApiProblem) -> JSONResponse:
        return problem_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no such path {shown(request.url.path)}",
                   405: f"method {request.method} not allowed on {shown(request.url.path)}"} \
            .get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _on_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        return client_gone(request.scope)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"field": ".".join(str(p) for p in err.get("loc", ())),
                     "message": str(err.get("msg", "invalid"))} for err in exc.errors()]
        first = problems[0] if problems else {"field": None, "message": "invalid request"}
        return JSONResponse(error_body(f"{first['field']}: {first['message']}", first["field"],
                                       problems), status_code=422)


def client_gone(scope: Scope) -> JSONResponse:
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
