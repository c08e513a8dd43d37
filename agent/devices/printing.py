"""The printers family (issue 4): receipt and label printers inside the daemon.

One :class:`PrinterWorker` (a thread owning the printer's connection, from
``drivers/printer``) per ``[[devices]]`` entry of type ``receipt_printer`` or
``label_printer``. Documents come in three ways, all through :meth:`PrinterService.prepare`
(validate, render to bytes first) and :meth:`PrinterService.submit`:

- ``POST /v1/print/receipt`` and ``POST /v1/print/label`` (``agent/web/print_routes.py``);
- HQ commands ``print-receipt`` and ``print-label``, whose command id is the
  job id, so a resent command does not print twice;
- nothing else: a printer never prints by itself.

Every job is on disk before it is queued (``agent/devices/print_jobs.py``): a job held
for a printer that is down survives a restart and prints when the printer is
back, a finished one answers a repeated Idempotency-Key or command id after a
restart without printing again, and a job whose bytes were on the way when the
agent stopped is not sent twice. ``GET /v1/print/jobs/{id}`` answers only the
caller that made the job.

Every job is recorded as a ``print`` event: its first outcome (printed, sent,
or held with the printer's fault) and, for a held job, the final one (printed
or expired) when it comes. Those results arrive in the printer's thread and go
to the outbox's thread-safe ``submit`` from there. A printer's state changes (a
fault raised or cleared) become ``device`` events carrying its fault
statistics, from a small watcher on the loop that reads each queue's
in-memory status (no printer I/O on the loop).

A device entry's keys beyond id/type/url/enabled are the printer's options
(``drivers/printer/config.py``), plus one the agent reads itself:
``preview_dir`` (write every job's bytes and a PNG preview there: the demo's
"printers writing files"). The receipt header's site name defaults to
``site.name``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig, DeviceConfig, SiteConfig, device_where
from agent.devices.family import BaseService, CommandHandler, ServiceContext, current_command_id
from agent.devices.print_documents import (
    parse_document,
    preview_document,
    render_document,
)
from agent.devices.print_jobs import PrintJobsFull, PrintJobStore, StoredJob
from agent.errors import (
    AgentError,
    ConfigIssue,
    DeviceError,
    Invalid,
    NotFound,
    Refused,
    Unavailable,
)
from agent.idempotency import IdempotencyKeyReused
from drivers.printer import (
    DEVICE_TYPES,
    BadDeviceUrl,
    FaultStats,
    JobResult,
    JobTicket,
    LabelOptions,
    OptionsError,
    PrinterOptions,
    PrinterStatus,
    PrinterWorker,
    PrintJob,
    ReceiptOptions,
    build_worker,
    printer_options,
)
from drivers.printer.device import Kind
from drivers.printer.job import Outcome
from drivers.printer.transport import open_transport

if TYPE_CHECKING:

    from agent.devices.discovery import PrinterBrowser

log = logging.getLogger(__name__)

AGENT_KEYS = ("preview_dir",)  # entry keys the agent reads; the rest go to the driver
# Module level so tests can shrink them.
STATE_WATCH_S = 0.25  # how often printer states are compared for device events
ANSWER_TIMEOUT_S = 30.0  # longest wait for a job's first attempt (API, commands)
STOP_WORKER_S = 0.5
RESULTS_KEPT = 2000  # latest result per job id, for GET /v1/print/jobs/{id}
# The owner of HQ's jobs: no token name has an "@" (agent/web/auth.py), so no API caller reads them.
HQ_OWNER = "@hq"
FAULT_TEXT = {
    "paper_out": "paper out",
    "head_open": "head or cover open",
    "ribbon_out": "ribbon out",
    "paused": "paused",
    "error": "printer error",
    "offline": "offline (not reachable)",
    "no_answer": "not answering status queries",
    "unknown": "state unknown",
    "not_recorded": "the job could not be recorded on the agent's disk",
    "interrupted": "the agent stopped while the job was being sent",
}
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class NotPrinted(DeviceError):
    """A job's first attempt did not print it (held with the fault, or expired)."""

    def __init__(self, device: str, result: JobResult, message: str) -> None:
        self.result = result
        super().__init__(device, message)


def fault_text(fault: str | None) -> str:
    return FAULT_TEXT.get(fault or "unknown", fault or "unknown")


# -- one printer -------------------------------------------------------------------------


@dataclass
class PrinterDevice:
    """A configured printer: its options, its worker, or why it has none."""

    id: str
    type: str
    kind: Kind
    url: str
    enabled: bool
    options: PrinterOptions | None = None
    worker: PrinterWorker | None = None
    preview_dir: Path | None = None
    error: str | None = None  # a config problem: the printer is not run

    def health(self) -> dict[str, Any]:
        """State for status: up | degraded | down | unknown | disabled | error."""
        if not self.enabled:
            return {"state": "disabled", "active_faults": [], "status": None}
        if self.worker is None:
            return {"state": "error", "active_faults": [], "status": None}
        queue = self.worker.queue
        status = queue.last_status
        snap = queue.snapshot()
        faults = list(status.faults) if status else []
        if (status is not None and status.printable is None and queue.printer.can_report
                and queue.hold_on_unknown):
            faults.append("no_answer")  # jobs are held: as good as down
        for held in snap["held"]:
            if held["fault"] and held["fault"] not in faults:
                faults.append(held["fault"])
        if faults:
            state = "down"
        elif status is None or not status.answered:
            state = "unknown"
        elif status.warnings:
            state = "degraded"
        else:
            state = "up"
        return {"state": state, "active_faults": faults, "status": status, "snapshot": snap}


def device_options(cfg: AgentConfig, device: DeviceConfig) -> PrinterOptions:
    """The driver options of a printer entry (OptionsError names the key)."""
    kind = DEVICE_TYPES[device.type]
    entry = {k: v for k, v in device.model_dump().items() if k not in AGENT_KEYS}
    if kind == "receipt" and "site_name" not in entry and cfg.site.name:
        entry["site_name"] = cfg.site.name[:80]
    return printer_options(kind, entry)


def _preview_dir(device: DeviceConfig) -> Path | None:
    value = (device.model_extra or {}).get("preview_dir")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise OptionsError("preview_dir", "must be a directory path")
    return Path(value)


def _fault_counts(stats: FaultStats) -> dict[str, int]:
    # The printer's thread adds to the Counter; dict.copy is one step under the GIL,
    # where iterating it here could meet it growing.
    return dict(sorted(dict.copy(stats.faults).items()))


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# -- jobs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobInfo:
    """Who made a job (owner: may read it; source: its events' source) and what it prints."""

    source: str
    owner: str
    ref: dict[str, str] = field(default_factory=dict)


async def _bounded(fn: Callable[[float], None], timeout: float, name: str) -> None:
    """Run ``fn(timeout)`` in a daemon thread and wait for it at most ``timeout`` + 0.25 s.

    Not ``asyncio.to_thread``: ``asyncio.run`` joins the default executor's threads at
    exit, so a printer call stuck on a silent device (a status read of up to
    ``status_timeout_s``) would hold the process past systemd's stop deadline. The
    printer's own thread is a daemon too; what it still does is settled from disk at
    the next start.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            fn(timeout)
        except Exception:  # a stop step's bug must not keep the others from running
            log.exception("%s failed", name)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(finished)

    threading.Thread(target=run, name=name, daemon=True).start()
    try:
        await asyncio.wait_for(done, timeout + 0.25)
    except TimeoutError:  # within the daemon's share for this family (SHUTDOWN_BUDGET_S / 8)
        log.warning("%s: still busy with the printer after %.2f s; not waiting for it", name,
                    timeout + 0.25)


def _resolved(result: JobResult) -> JobTicket:
    """A ticket for a job finished before this start: both answers are its stored result."""
    first: Future[JobResult] = Future()
    final: Future[JobResult] = Future()
    first.set_result(result)
    final.set_result(result)
    return JobTicket(result.job_id, first, final)


def _stored_result(row: StoredJob) -> JobResult:
    """The result of a stored job: its final one, else "held" with what is known of it."""
    result = row.result or {}
    kind: Kind = "receipt" if row.kind == "receipt" else "label"
    return JobResult(row.job_id, row.printer, kind, result.get("outcome", "held"),
                     int(result.get("attempts", row.attempts)), result.get("fault", row.fault),
                     result.get("detail", "waiting for the printer"), time.monotonic(),
                     row.summary)


@dataclass(frozen=True)
class PreparedJob:
    """A document rendered for one printer, not yet submitted."""

    device: PrinterDevice
    job: PrintJob
    ref: dict[str, str] = field(default_factory=dict)  # receipt_number or package_tag


def _safe_name(text: str) -> str:
    """A file name part: letters, digits, ``_ . -`` only, never ``..``-led, at most 100."""
    return _UNSAFE_NAME.sub("_", text)[:100].lstrip(".") or "job"


# -- the service -----------------------------------------------------------------------------


class PrinterService(BaseService):
    name = "printers"

    def __init__(self, cfg: AgentConfig) -> None:
        super().__init__(cfg)
        self.printers: dict[str, PrinterDevice] = {}
        for device in cfg.devices:
            if device.type in DEVICE_TYPES:
                self.printers[device.id] = self._build(device)
        self._ctx: ServiceContext | None = None
        self.browser: PrinterBrowser | None = None
        self._lock = threading.Lock()
        self._results: OrderedDict[str, JobResult] = OrderedDict()
        self._jobs: OrderedDict[str, JobInfo] = OrderedDict()
        # Held around every write of a job's state and its event, and by stop(): once
        # stopped, a printer thread past its deadline records nothing (the next start
        # settles the job from disk), so no job gets both a "failed" and a "printed".
        self._record_lock = threading.Lock()
        self._closed = False
        self.store: PrintJobStore | None = None
        self._stopping: Future[None] = Future()
        self._watch_task: asyncio.Task[None] | None = None
        self._seen: dict[str, tuple[Any, ...]] = {}
        self.emit_failures = 0

    def _build(self, device: DeviceConfig) -> PrinterDevice:
        kind = DEVICE_TYPES[device.type]
        dev = PrinterDevice(device.id, device.type, kind, device.url, device.enabled)
        try:
            dev.preview_dir = _preview_dir(device)
            dev.options = device_options(self.cfg, device)
            if device.enabled:
                dev.worker = build_worker(device.id, kind, device.url, dev.options,
                                          on_result=functools.partial(self._on_result, dev))
                dev.worker.queue.journal = self
        except OptionsError as exc:
            dev.error = f"option {exc.key}: {exc.reason}"
        except BadDeviceUrl as exc:
            dev.error = str(exc)
        if dev.error and device.enabled:
            log.error("printer %s not started: %s (edge-agent check-config lists every problem)",
                      device.id, dev.error)
        return dev

    @classmethod
    def config_issues(cls, cfg: AgentConfig) -> list[ConfigIssue]:
        issues: list[ConfigIssue] = []
        for i, device in enumerate(cfg.devices):
            if device.type not in DEVICE_TYPES:
                continue
            try:
                _preview_dir(device)
                device_options(cfg, device)
            except OptionsError as exc:
                issues.append(ConfigIssue(f"{device_where(i, device.id)}.{exc.key}", exc.reason))
            try:
                open_transport(device.url)
            except BadDeviceUrl as exc:
                issues.append(ConfigIssue(f"{device_where(i, device.id)}.url", str(exc)))
        return issues

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self.store = await asyncio.to_thread(PrintJobStore, ctx.state_dir)
        for dev, result in await asyncio.to_thread(self._restore):
            await self._emit("print", self._print_event(dev.id, dev.type, result),
                             self._info(result.job_id).source)
        for dev in self.printers.values():
            if dev.worker is not None:
                dev.worker.start()
        self._watch_task = ctx.loop.create_task(self._watch(), name="printer-states")
        if self.cfg.api.advertise:
            # mDNS is on for this box (api.advertise): browse on the same interfaces.
            from agent.devices.discovery import PrinterBrowser

            browser = PrinterBrowser(self.cfg.api.advertise_interfaces)
            if await browser.start():
                self.browser = browser

    def _restore(self) -> list[tuple[PrinterDevice, JobResult]]:
        """Queue the jobs left waiting by the last run; settle those that cannot be.

        Blocking (the store); before the workers start. Returns the results to
        record as ``print`` events: jobs cut off mid-send, for a printer no longer
        configured, or past their deadline.
        """
        assert self.store is not None
        settled: list[tuple[PrinterDevice, JobResult]] = []
        now = time.time()
        for row in self.store.waiting():
            with self._lock:
                self._jobs[row.job_id] = JobInfo(row.source, row.owner, row.ref)
            dev = self.printers.get(row.printer)
            kind: Kind = "receipt" if row.kind == "receipt" else "label"
            outcome: Outcome = "failed"
            fault, detail = row.fault or "unknown", ""
            if row.state == "sending":
                fault = "interrupted"
                detail = ("the agent stopped while its bytes were being sent; it may have "
                          "printed, so it is not sent again (print it again with a new request "
                          "if it did not)")
            elif dev is None or dev.worker is None or dev.kind != kind or row.data is None:
                detail = (f"printer {row.printer} is no longer configured or not running; "
                          "not printed")
            elif row.expires_at <= now:
                outcome = "expired"
                detail = f"not printed before its deadline, which passed while the agent was " \
                         f"stopped, after {row.attempts} attempt(s)"
            else:
                queue = dev.worker.queue
                left = row.expires_at - now
                queue.submit(PrintJob(row.job_id, kind, row.data, queue.clock(),
                                      queue.clock() + left, row.summary))
                log.info("%s: job %s (%s) was waiting when the agent stopped; queued again",
                         dev.id, row.job_id, row.summary)
                continue
            result = JobResult(row.job_id, row.printer, kind, outcome, row.attempts, fault,
                               detail, time.monotonic(), row.summary)
            log.warning("%s: job %s (%s) %s: %s", row.printer, row.job_id, row.summary,
                        outcome, detail)
            self.store.finish(row.job_id, result.as_dict())
            self._remember(result)
            settled.append((dev or PrinterDevice(row.printer, "unknown", kind, "", False),
                            result))
        return settled

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = None
        if not self._stopping.done():
            self._stopping.set_result(None)   # command handlers waiting on a printer answer now
        workers = [dev.worker for dev in self.printers.values() if dev.worker is not None]
        try:
            await asyncio.gather(*(_bounded(w.stop, STOP_WORKER_S,
                                            f"printer-stop-{w.queue.printer.name}")
                                   for w in workers))
        finally:
            # Waiting jobs stay on disk, held, for the next start. A worker still in an
            # attempt past its deadline records nothing from here on.
            await asyncio.to_thread(self._close_records)
        if self.browser is not None:
            await self.browser.close()
            self.browser = None

    def _close_records(self) -> None:
        with self._record_lock:
            self._closed = True
            if self.store is not None:
                self.store.close()

    # -- jobs ---------------------------------------------------------------------------------

    def printer_for(self, kind: Kind, printer_id: str | None) -> PrinterDevice:
        """The named printer, or the first of ``kind``; else NotFound, Invalid or Unavailable."""
        of_kind = [d for d in self.printers.values() if d.kind == kind]
        wanted = "receipt_printer" if kind == "receipt" else "label_printer"
        if printer_id is None:
            enabled = [d for d in of_kind if d.enabled]
            if not enabled:
                raise NotFound(f"printer: no {wanted} is configured (add a [[devices]] "
                               f"entry with type = \"{wanted}\")", "printer",
                               "no_printer")
            dev = enabled[0]
        else:
            found = self.printers.get(printer_id)
            if found is None:
                known = ", ".join(d.id for d in of_kind) or "none configured"
                raise NotFound(f"printer: no printer {printer_id[:64]!r}; {wanted}s: "
                               f"{known}", "printer", "unknown_printer")
            if found.kind != kind:
                raise Invalid(f"printer: {found.id} is a {found.type}, not a {wanted}",
                              "printer", "wrong_printer")
            dev = found
        if not dev.enabled:
            raise Unavailable(f"{dev.id}: disabled in the config (enabled = false)",
                              reason="disabled")
        if dev.worker is None or dev.options is None:
            raise Unavailable(f"{dev.id}: not running: {dev.error}", reason="misconfigured")
        return dev

    def document_options(self, kind: Kind, printer_id: str | None,
                         ) -> ReceiptOptions | LabelOptions:
        """Options for a preview: the printer's, else the defaults (no printer configured)."""
        if printer_id is None and not any(d.kind == kind and d.options
                                          for d in self.printers.values()):
            if kind == "receipt":
                return ReceiptOptions(site_name=self.cfg.site.name[:80])
            return LabelOptions()
        dev = self.printer_for(kind, printer_id) if printer_id else next(
            d for d in self.printers.values() if d.kind == kind and d.options)
        assert dev.options is not None
        return dev.options.document

    def prepare(self, kind: Kind, body: Any, job_id: str | None = None) -> PreparedJob:
        """Validate, pick the printer, render (and write the preview files). Blocking: CPU."""
        document, ref = parse_document(kind, body)
        dev = self.printer_for(kind, body.get("printer"))
        assert dev.worker is not None and dev.options is not None
        limit = getattr(dev.options.document, "max_copies", None)
        copies = getattr(document, "copies", 1)
        if isinstance(limit, int) and isinstance(copies, int) and copies > limit:
            raise Invalid(f"copies: {copies} is more than {dev.id} prints per job "
                          f"(max_copies = {limit} in its [[devices]] entry)",
                          "copies", reason="invalid")
        data, summary = render_document(kind, document, dev.options.document)
        job = dev.worker.queue.job(data, job_id=job_id or uuid.uuid4().hex, summary=summary)
        if dev.preview_dir is not None:
            self._write_preview(dev, job, kind, document)
        return PreparedJob(dev, job, ref)

    def _write_preview(self, dev: PrinterDevice, job: PrintJob, kind: Kind,
                       document: Any) -> None:
        assert dev.preview_dir is not None and dev.options is not None
        # "receipt_R-000123--<job id>": findable by the document, unique by the job.
        stem = f"{_safe_name(job.summary)}--{_safe_name(job.id)}"
        ext = ".escpos" if kind == "receipt" else ".zpl"
        try:
            dev.preview_dir.mkdir(parents=True, exist_ok=True)
            (dev.preview_dir / (stem + ext)).write_bytes(job.data)
            (dev.preview_dir / (stem + ".png")).write_bytes(
                preview_document(kind, document, dev.options.document))
        except (OSError, Refused) as exc:  # a preview must never stop a print
            log.warning("%s: cannot write the preview of job %s to %s: %s", dev.id, job.id,
                        dev.preview_dir, exc)

    def submit(self, prepared: PreparedJob, source: str, *, owner: str | None = None,
               digest: str | None = None) -> JobTicket:
        """Record the job on disk, then queue it; a known job id gets its old ticket.

        Blocking (a commit): from a thread. ``owner`` may read the job (default:
        ``source``); ``digest`` is the request body's, for an Idempotency-Key job id:
        the same id with another body raises IdempotencyKeyReused. Refused
        (503) when too many jobs wait already or the agent is stopping.
        """
        job, dev = prepared.job, prepared.device
        assert dev.worker is not None
        with self._record_lock:
            if self._closed or self.store is None:
                raise Unavailable(f"{dev.id}: edge-agent is not running its printers "
                                  "(starting or stopping); not queued", reason="stopping")
            row = self.store.get(job.id)
            if row is None:
                try:
                    self.store.add(job_id=job.id, printer=dev.id, kind=job.kind,
                                   owner=owner or source, source=source, ref=prepared.ref,
                                   digest=digest, summary=job.summary, data=job.data,
                                   expires_at=time.time() + (job.expires_at
                                                             - dev.worker.queue.clock()))
                except PrintJobsFull as exc:
                    raise Unavailable(f"{dev.id}: {exc}", reason="queue_full") from None
                with self._lock:
                    self._jobs[job.id] = JobInfo(source, owner or source, prepared.ref)
                    self._jobs.move_to_end(job.id)
                    while len(self._jobs) > RESULTS_KEPT:
                        self._jobs.popitem(last=False)
                return dev.worker.submit(job)
        # A job id seen before (a resend, a retry with the same Idempotency-Key): its
        # first document is what prints, so nothing of this request is queued.
        if digest is not None and row.digest is not None and row.digest != digest:
            raise IdempotencyKeyReused(job.id)
        holder = self.printers.get(row.printer)
        known = holder.worker.queue.ticket(job.id) if holder and holder.worker else None
        if known is not None:
            return known
        return _resolved(_stored_result(row))

    def check_key(self, job_id: str, digest: str | None) -> None:
        """IdempotencyKeyReused if job ``job_id`` was made from another body. Blocking."""
        row = self.store.get(job_id) if self.store is not None else None
        if row is not None and None not in (digest, row.digest) and row.digest != digest:
            raise IdempotencyKeyReused(job_id)

    def job_result(self, job_id: str, owner: str) -> JobResult | None:
        """The latest result of ``owner``'s job ``job_id``; None if unknown or not theirs.

        Blocking (may read the store): from a thread.
        """
        with self._lock:
            result = self._results.get(job_id)
            info = self._jobs.get(job_id)
        if info is not None:
            if not hmac.compare_digest(info.owner, owner):
                return None
            if result is not None:
                return result
        store = self.store
        row = store.get(job_id) if store is not None else None
        if row is None or not hmac.compare_digest(row.owner, owner):
            return None
        return result or _stored_result(row)

    def not_printed_message(self, dev: PrinterDevice, result: JobResult) -> str:
        what = result.summary or f"{result.kind} job"
        if result.outcome == "held":
            ttl = dev.options.queue.job_ttl_s if dev.options else 0
            return (f"{dev.id}: {fault_text(result.fault)} ({result.detail}); {what} is held as "
                    f"job {result.job_id} and prints by itself when the printer recovers, or "
                    f"expires after {ttl:g} s. Do not send it again: GET /v1/print/jobs/"
                    f"{result.job_id} (or the same Idempotency-Key) tells its outcome")
        return f"{dev.id}: {what} not printed ({result.outcome}): {result.detail}"

    @staticmethod
    def settled(ticket: JobTicket, first: JobResult) -> JobResult:
        """The final result when there is one already (a repeat of a finished job), else first."""
        if ticket.final.done():
            return ticket.final.result()
        return first

    # -- results and events (printer threads -> outbox) -------------------------------------

    def _info(self, job_id: str) -> JobInfo:
        with self._lock:
            return self._jobs.get(job_id) or JobInfo("edge-agent", "edge-agent")

    def _remember(self, result: JobResult) -> None:
        with self._lock:
            self._results[result.job_id] = result
            self._results.move_to_end(result.job_id)
            while len(self._results) > RESULTS_KEPT:
                self._results.popitem(last=False)

    # The queue's JobJournal (drivers/printer/job.py), from the printer's thread.

    def sending(self, job: PrintJob) -> None:
        with self._record_lock:
            if self._closed or self.store is None:
                raise AgentError("edge-agent is stopping")
            self.store.mark(job.id, "sending")

    def unsent(self, job: PrintJob, result: JobResult) -> None:
        with self._record_lock:
            if not self._closed and self.store is not None:
                self.store.mark(job.id, "held", attempts=result.attempts, fault=result.fault)

    def _on_result(self, dev: PrinterDevice, result: JobResult) -> None:
        """From the printer's thread: the job's state on disk, then its ``print`` event."""
        with self._record_lock:
            if self._closed or self.store is None:
                log.warning("%s: job %s ended %s after the printers stopped; not recorded now "
                            "(the next start settles it from disk)", dev.id, result.job_id,
                            result.outcome)
                return
            try:
                if result.final:
                    self.store.finish(result.job_id, result.as_dict())
                else:
                    self.store.mark(result.job_id, "held", attempts=result.attempts,
                                    fault=result.fault)
            except Exception:  # the event still records what happened
                log.exception("%s: cannot record job %s as %s on disk", dev.id, result.job_id,
                              result.outcome)
            self._remember(result)
            self._emit_threadsafe("print", self._print_event(dev.id, dev.type, result),
                                  self._info(result.job_id).source)

    def _print_event(self, device: str, device_type: str, result: JobResult) -> dict[str, Any]:
        status = result.status_after or result.status_before
        return {
            "device": device,
            "type": device_type,
            "job_id": result.job_id,
            "document": result.kind,
            "summary": result.summary,
            **self._info(result.job_id).ref,
            "outcome": result.outcome,
            "printed": result.outcome == "printed",
            "fault": result.fault,
            "attempts": result.attempts,
            "detail": result.detail,
            "printer_state": status.state.value if status else None,
        }

    def _emit_threadsafe(self, kind: str, data: dict[str, Any], source: str) -> None:
        """From a printer thread: straight to the outbox's thread-safe submit.

        Not through the loop (``run_coroutine_threadsafe``): a task there is cancelled
        when the loop winds down, and its cancellation reaches the outbox's
        future, so an event of a job that did print could be dropped while
        stopping. The outbox's writer takes it from here, in submit order (a
        job's "held" before its "printed").
        """
        ctx = self._ctx
        if ctx is None:
            return
        try:
            future = ctx.submit(kind, data, source)
        except Exception as exc:  # a closed outbox while stopping
            self._emit_failed(kind, data, str(exc) or type(exc).__name__)
            return
        future.add_done_callback(lambda f: self._emitted(f, kind, data))

    def _emitted(self, future: Future[Any], kind: str, data: dict[str, Any]) -> None:
        if future.cancelled():
            self._emit_failed(kind, data, "cancelled")
        elif (exc := future.exception()) is not None:
            self._emit_failed(kind, data, str(exc))

    def _emit_failed(self, kind: str, data: dict[str, Any], why: str) -> None:
        self.emit_failures += 1
        log.error("%s: %s event for job %s (%s) not recorded: %s", data.get("device"), kind,
                  data.get("job_id", "-"), data.get("outcome", data.get("state")), why)

    async def _emit(self, kind: str, data: dict[str, Any], source: str) -> None:
        if self._ctx is None:
            return
        try:
            await self._ctx.emit(kind, data, source)
        except AgentError as exc:
            self._emit_failed(kind, data, str(exc))

    async def _watch(self) -> None:
        """Device events on every state change (fault raised or cleared), with the statistics."""
        while True:
            try:
                await self._compare_states()
            except Exception:  # a bug here must not end the events for good
                log.exception("printer state watcher failed; trying again")
            await asyncio.sleep(STATE_WATCH_S)

    async def _compare_states(self) -> None:
        for dev in self.printers.values():
            if dev.worker is None:
                continue
            health = dev.health()
            stats = dev.worker.queue.stats
            counts = _fault_counts(stats)
            key = (health["state"], tuple(health["active_faults"]), tuple(counts.items()))
            before = self._seen.get(dev.id)
            if key == before:
                continue
            self._seen[dev.id] = key
            if before is None and health["state"] == "unknown":
                continue  # nothing known yet: not an event
            was = set(before[1]) if before else set()
            now = set(health["active_faults"])
            # An episode that began and ended between two looks shows in its count.
            counted = dict(before[2]) if before else {}
            flickered = {f for f, n in counts.items() if n > counted.get(f, 0)} - now
            data = self._device_entry(dev, health)
            data.update(device=dev.id, raised=sorted(now - was | flickered),
                        cleared=sorted(was - now | flickered))
            await self._emit("device", data, dev.id)

    # -- what the daemon asks ---------------------------------------------------------------

    def devices(self) -> list[dict[str, Any]]:
        entries = [self._device_entry(dev, dev.health()) for dev in self.printers.values()]
        if self.browser is not None:
            entries.extend(self._discovered_entries())
        return entries

    def _device_entry(self, dev: PrinterDevice, health: dict[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": dev.id, "type": dev.type, "url": dev.url,
                                 "enabled": dev.enabled, "state": health["state"]}
        if dev.worker is None:
            entry.update(last_fault=None, error=dev.error, faults={}, jobs={})
            return entry
        stats = dev.worker.queue.stats
        status: PrinterStatus | None = health["status"]
        active = health["active_faults"]
        last_fault_ts = None
        if stats.last_fault_at is not None:  # the queue's clock is monotonic
            last_fault_ts = time.time() - (dev.worker.queue.clock() - stats.last_fault_at)
        entry.update(
            printer_state=status.state.value if status else "unknown",
            active_faults=active,
            last_fault=active[0] if active else stats.last_fault,
            last_fault_ts=last_fault_ts,
            detail=status.detail if status else "",
            warnings=list(status.warnings) if status else [],
            faults=_fault_counts(stats),
            jobs={"submitted": stats.jobs_submitted, "printed": stats.jobs_printed,
                  "sent": stats.jobs_sent_unconfirmed, "held": stats.jobs_held,
                  "retried": stats.jobs_retried, "retries": stats.retries,
                  "expired": stats.jobs_expired, "failed": stats.jobs_failed,
                  "pending": health["snapshot"]["pending"]},
            held_jobs=_json_ready(health["snapshot"]["held"]),
        )
        return entry

    def _discovered_entries(self) -> list[dict[str, Any]]:
        assert self.browser is not None
        configured = {dev.url.rstrip("/"): dev.id for dev in self.printers.values()}
        entries = []
        for found in self.browser.found():
            entries.append({"id": f"mdns:{found.name}", "type": "network_printer",
                            "discovered": True, "state": "discovered",
                            "configured_as": configured.get(found.url), **found.as_dict()})
        return entries


    def commands(self) -> dict[str, CommandHandler]:
        return {"print-receipt": self._command("receipt"), "print-label": self._command("label")}

    def _command(self, kind: Kind) -> CommandHandler:
        def handle(args: dict[str, Any]) -> dict[str, Any]:
            # In a command worker thread: blocking waits are fine here.
            prepared = self.prepare(kind, args, job_id=current_command_id.get())
            dev = prepared.device
            ticket = self.submit(prepared, "hq", owner=HQ_OWNER)
            # Until the first answer, the deadline, or the agent stopping: a SIGTERM must
            # not wait for a printer that does not answer (the stop is bounded).
            waits: list[Future[Any]] = [ticket.first, self._stopping]
            concurrent.futures.wait(waits, ANSWER_TIMEOUT_S,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
            if not ticket.first.done():
                why = ("edge-agent is stopping" if self._stopping.done() else
                       f"no answer from the printer's queue within {ANSWER_TIMEOUT_S:g} s")
                raise DeviceError(dev.id, f"{why}; job {ticket.job_id} stays queued (on disk: "
                                          "it prints when the printer answers, also after a "
                                          "restart)")
            result = self.settled(ticket, ticket.first.result())
            if result.outcome in ("printed", "sent"):
                return result.as_dict()
            raise NotPrinted(dev.id, result, self.not_printed_message(dev, result)
                             .removeprefix(f"{dev.id}: "))
        return handle


# -- edge-agent print-preview -------------------------------------------------------------


def preview_main(cfg_loader: Callable[[], AgentConfig], document: str, source: str,
                 printer: str | None, output: str | None) -> int:
    """Render a sale ("receipt") or a "label" from a JSON file to a PNG; 0 ok, 2 bad input."""
    kind: Kind = "receipt" if document == "receipt" else "label"
    try:
        body = json.loads(Path(source).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"edge-agent print-preview: cannot read {source}: {exc}", file=sys.stderr)
        return 2
    if kind == "receipt" and isinstance(body, dict) and "sale" not in body:
        body = {"sale": body.get("data", body)}  # a bare sale, or an event body {"data": ...}
    if isinstance(body, dict) and printer:
        body = {**body, "printer": printer}
    cfg = cfg_loader() if printer else AgentConfig(site=SiteConfig(id="preview"))
    service = PrinterService(cfg)
    try:
        document, _ = parse_document(kind, body)
        options = service.document_options(kind, printer)
        png = preview_document(kind, document, options)
        data, summary = render_document(kind, document, options)
    except Refused as exc:
        print(f"edge-agent print-preview: {source}: {exc}", file=sys.stderr)
        return 2
    out = Path(output or Path(source).with_suffix(".png"))
    out.write_bytes(png)
    print(f"{summary}: {len(data)} bytes to print, preview written to {out}")
    return 0
