"""The printing routes of the local API (CONTRACT 5), served by :class:`PrinterService`.

- ``POST /v1/print/receipt`` ``{"printer"?: id, "sale": {...}}`` and
  ``POST /v1/print/label`` ``{"printer"?: id, "package_tag", "product", ...}``:
  200 when the printer confirmed it printed; 202 when the bytes went to a
  printer that cannot confirm (``file://``); 503 with the fault (paper out,
  head open, offline) when it did not print: the job is then held and prints
  by itself on recovery, so the caller must not send it again. 404 names an
  unknown printer, 422 the bad field.
- ``POST /v1/print/receipt/preview`` and ``/v1/print/label/preview``: the same
  bodies, answered with the PNG of what would print (no printer touched).
- ``GET /v1/print/jobs/{job_id}``: the latest result of a job (a held one's
  outcome once the printer recovers), to the caller that made it only (404 to
  any other token).

An ``Idempotency-Key`` header makes the job id (scoped by caller): a repeat
prints nothing more and answers with the job's result, final if it has one,
also after a restart (jobs are on disk, ``agent/devices/print_jobs.py``); the same key
with another body is 422.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from agent.devices.printing import ANSWER_TIMEOUT_S
from agent.errors import Invalid, NotFound, Refused, Unavailable
from agent.idempotency import IdempotencyKeyReused, body_digest
from agent.web.caller import Caller
from agent.web.checks import idempotency_key, json_body
from agent.web.problems import ApiProblem, ErrorBody, error_body
from drivers.printer import JobResult, Label

if TYPE_CHECKING:
    from agent.devices.printing import PrinterService
    from drivers.printer.device import Kind

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": desc, "model": ErrorBody}
    for code, desc in ((401, "no or unknown token"), (404, "unknown printer"),
                       (422, "a bad field, named"), (503, "not printed: the printer's fault"))}


def _receipt_schema() -> dict[str, Any]:
    return {"type": "object", "required": ["sale"], "additionalProperties": False,
            "properties": {"printer": {"type": "string", "description": "a receipt printer id "
                                       "(default: the first configured)"},
                           "sale": {"$ref": "#/components/schemas/Sale"}}}


def _label_schema() -> dict[str, Any]:
    schema = Label.model_json_schema()
    schema["properties"] = {"printer": {"type": "string", "description": "a label printer id "
                                        "(default: the first configured)"},
                            **schema["properties"]}
    return schema


def _body_doc(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": schema}}}}


# Each kind of refusal answers with one status.
REFUSED_STATUS: dict[type[Refused], int] = {NotFound: 404, Invalid: 422, Unavailable: 503}


def _refused(exc: Refused) -> ApiProblem:
    status = next(code for cls, code in REFUSED_STATUS.items() if isinstance(exc, cls))
    return ApiProblem(status, str(exc), exc.field, reason=exc.reason)


def _job_id(request: Request, caller: str) -> str | None:
    """The job id an Idempotency-Key names, scoped to the caller (two POS using the same
    key must not share a job); ":" since the id goes into /v1/print/jobs/{id}."""
    key = idempotency_key(request)
    return None if key is None else f"{caller}:{key}"


def print_router(service: PrinterService) -> APIRouter:
    router = APIRouter(tags=["printing"])

    async def print_document(kind: Kind, request: Request, caller: str) -> Response:
        body = await json_body(request)
        job_id = _job_id(request, caller)
        # The body's digest goes on disk with the job: a key reused with another body is 422.
        digest = body_digest({"kind": kind, "body": body}) if job_id is not None else None
        try:
            if job_id is not None:   # before the body's own checks, as the first answer did
                await asyncio.to_thread(service.check_key, job_id, digest)
            prepared = await asyncio.to_thread(service.prepare, kind, body, job_id)
            ticket = await asyncio.to_thread(service.submit, prepared, caller, digest=digest)
        except Refused as exc:
            raise _refused(exc) from None
        except IdempotencyKeyReused as exc:
            raise ApiProblem(422, str(exc), exc.field, reason="idempotency_key_reused") from None
        dev = prepared.device
        try:
            # Shielded: a client that goes away must not cancel the job's future,
            # which another request for the same job id may be waiting on.
            first = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(ticket.first)),
                                           ANSWER_TIMEOUT_S)
        except TimeoutError:
            raise ApiProblem(503, f"{dev.id}: no answer from the printer's queue within "
                                  f"{ANSWER_TIMEOUT_S:g} s; job {ticket.job_id} stays queued",
                             reason="busy") from None
        result = service.settled(ticket, first)
        if result.outcome == "printed":
            return JSONResponse(result.as_dict(), status_code=200)
        if result.outcome == "sent":
            return JSONResponse(result.as_dict(), status_code=202)
        return _not_printed(service, result)

    async def preview(kind: Kind, request: Request) -> Response:
        body = await json_body(request)

        def render() -> bytes:
            from agent.devices.print_documents import parse_document, preview_document

            document, _ = parse_document(kind, body)
            return preview_document(kind, document,
                                    service.document_options(kind, body.get("printer")))

        try:
            png = await asyncio.to_thread(render)
        except Refused as exc:
            raise _refused(exc) from None
        return Response(png, media_type="image/png")

    @router.post("/v1/print/receipt", summary="Print a sale's receipt; 200 only when printed",
                 responses=_ERRORS, openapi_extra=_body_doc(_receipt_schema()))
    async def print_receipt(request: Request, caller: Caller) -> Response:
        return await print_document("receipt", request, caller)

    @router.post("/v1/print/label", summary="Print a package label; 200 only when printed",
                 responses=_ERRORS, openapi_extra=_body_doc(_label_schema()))
    async def print_label(request: Request, caller: Caller) -> Response:
        return await print_document("label", request, caller)

    png: dict[int | str, dict[str, Any]] = {
        200: {"content": {"image/png": {}}, "description": "the preview"}}

    @router.post("/v1/print/receipt/preview", response_class=Response,
                 summary="The receipt as a PNG, printing nothing",
                 responses={**png, 422: _ERRORS[422]},
                 openapi_extra=_body_doc(_receipt_schema()))
    async def preview_receipt(request: Request, _: Caller) -> Response:
        return await preview("receipt", request)

    @router.post("/v1/print/label/preview", response_class=Response,
                 summary="The label as a PNG, printing nothing",
                 responses={**png, 422: _ERRORS[422]}, openapi_extra=_body_doc(_label_schema()))
    async def preview_label(request: Request, _: Caller) -> Response:
        return await preview("label", request)

    @router.get("/v1/print/jobs/{job_id:path}", summary="The latest result of a print job "
                "(only to the caller that made it)",
                responses={401: _ERRORS[401], 404: {"description": "no such job of this caller",
                                                    "model": ErrorBody}})
    async def job(job_id: str, caller: Caller) -> JSONResponse:
        result = await asyncio.to_thread(service.job_result, job_id, caller)
        if result is None:
            # The same answer for another caller's job as for none: ids say nothing.
            raise ApiProblem(404, f"job_id: no print job {job_id[:64]!r} of {caller} (jobs "
                                  "are kept a week, the last 10,000)", "job_id")
        return JSONResponse(result.as_dict())

    return router


def _not_printed(service: PrinterService, result: JobResult) -> JSONResponse:
    dev = service.printers[result.printer]
    body = error_body(service.not_printed_message(dev, result), reason=result.fault
                      or result.outcome)
    body["job"] = result.as_dict()
    retry = dev.options.queue.retry_interval_s if dev.options else 5.0
    return JSONResponse(body, status_code=503, headers={"Retry-After": f"{max(1, round(retry))}"})
