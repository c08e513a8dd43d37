"""The printers family (issue 4): receipt and label printers inside the daemon.

One :class:`PrinterWorker` (a thread owning the printer's connection, from
``drivers/printer``) per ``[[devices]]`` entry of type ``receipt_printer`` or
``label_printer``. Documents come in three ways, all through :meth:`PrinterService.prepare`
(validate, render to bytes first) and :meth:`PrinterService.submit`:

- ``POST /v1/print/receipt`` and ``POST /v1/print/label`` (``agent/print_api.py``);
- HQ commands ``print-receipt`` and ``print-label``, whose command id is the
  job id, so a resent command does not print twice (ids are remembered in
  memory, like the command router's: not across a restart);
- nothing else: a printer never prints by itself.

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
import functools
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.commands import current_command_id
from agent.config import AgentConfig, DeviceConfig, SiteConfig
from agent.errors import AgentError, ConfigIssue, DeviceError
from agent.print_documents import (
    PrintRefused,
    parse_document,
    preview_document,
    render_document,
)
from agent.services import BaseService, CommandHandler, ServiceContext
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
from drivers.printer.transport import open_transport

if TYPE_CHECKING:
    from fastapi import APIRouter

    from agent.discovery import PrinterBrowser

log = logging.getLogger(__name__)

AGENT_KEYS = ("preview_dir",)  # entry keys the agent reads; the rest go to the driver
# Module level so tests can shrink them.
STATE_WATCH_S = 0.25  # how often printer states are compared for device events
ANSWER_TIMEOUT_S = 30.0  # longest wait for a job's first attempt (API, commands)
STOP_WORKER_S = 0.5
RESULTS_KEPT = 2000  # latest result per job id, for GET /v1/print/jobs/{id}
FAULT_TEXT = {
    "paper_out": "paper out",
    "head_open": "head or cover open",
    "ribbon_out": "ribbon out",
    "paused": "paused",
    "error": "printer error",
    "offline": "offline (not reachable)",
    "no_answer": "not answering status queries",
    "unknown": "state unknown",
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
        self._jobs: OrderedDict[str, tuple[str, dict[str, str]]] = OrderedDict()  # source, ref
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
                issues.append(ConfigIssue(f"devices.{i}.{exc.key}", exc.reason))
            try:
                open_transport(device.url)
            except BadDeviceUrl as exc:
                issues.append(ConfigIssue(f"devices.{i}.url", str(exc)))
        return issues

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        for dev in self.printers.values():
            if dev.worker is not None:
                dev.worker.start()
        self._watch_task = ctx.loop.create_task(self._watch(), name="printer-states")
        if self.cfg.api.advertise:
            # mDNS is on for this box (api.advertise): browse on the same interfaces.
            from agent.discovery import PrinterBrowser

            browser = PrinterBrowser(self.cfg.api.advertise_interfaces)
            if await browser.start():
                self.browser = browser

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = None
        workers = [dev.worker for dev in self.printers.values() if dev.worker is not None]
        await asyncio.gather(*(asyncio.to_thread(w.stop, STOP_WORKER_S) for w in workers))
        if self.browser is not None:
            await self.browser.close()
            self.browser = None
        # Held jobs live in memory: say what became of them rather than let them vanish.
        for dev in self.printers.values():
            if dev.worker is None:
                continue
            queue = dev.worker.queue
            held = {h["job_id"]: h for h in queue.snapshot()["held"]}
            for job in queue.pending():
                info = held.get(job.id, {})
                result = JobResult(job.id, dev.id, job.kind, "failed", info.get("attempts", 0),
                                   info.get("fault") or "unknown",
                                   "edge-agent stopped before the printer could print it; "
                                   "not printed", queue.clock(), job.summary)
                await self._emit("print", self._print_event(dev, result),
                                 self._job_source(job.id, final=True)[0])

    # -- jobs ---------------------------------------------------------------------------------

    def printer_for(self, kind: Kind, printer_id: str | None) -> PrinterDevice:
        """The named printer, or the first of ``kind``; PrintRefused (404/422/503) otherwise."""
        of_kind = [d for d in self.printers.values() if d.kind == kind]
        wanted = "receipt_printer" if kind == "receipt" else "label_printer"
        if printer_id is None:
            enabled = [d for d in of_kind if d.enabled]
            if not enabled:
                raise PrintRefused(404, f"printer: no {wanted} is configured (add a [[devices]] "
                                        f"entry with type = \"{wanted}\")", "printer",
                                   "no_printer")
            dev = enabled[0]
        else:
            found = self.printers.get(printer_id)
            if found is None:
                known = ", ".join(d.id for d in of_kind) or "none configured"
                raise PrintRefused(404, f"printer: no printer {printer_id[:64]!r}; {wanted}s: "
                                        f"{known}", "printer", "unknown_printer")
            if found.kind != kind:
                raise PrintRefused(422, f"printer: {found.id} is a {found.type}, not a {wanted}",
                                   "printer", "wrong_printer")
            dev = found
        if not dev.enabled:
            raise PrintRefused(503, f"{dev.id}: disabled in the config (enabled = false)",
                               reason="disabled")
        if dev.worker is None or dev.options is None:
            raise PrintRefused(503, f"{dev.id}: not running: {dev.error}", reason="misconfigured")
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
            raise PrintRefused(422, f"copies: {copies} is more than {dev.id} prints per job "
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
        except (OSError, PrintRefused) as exc:  # a preview must never stop a print
            log.warning("%s: cannot write the preview of job %s to %s: %s", dev.id, job.id,
                        dev.preview_dir, exc)

    def submit(self, prepared: PreparedJob, source: str) -> JobTicket:
        """Queue the job on its printer (thread-safe); a known job id gets its old ticket."""
        with self._lock:
            # A resend under a job id already queued keeps the first caller and ref: the
            # queue prints the first job's bytes, so its events must name that document.
            if prepared.job.id not in self._jobs:
                self._jobs[prepared.job.id] = (source, prepared.ref)
            while len(self._jobs) > RESULTS_KEPT:
                self._jobs.popitem(last=False)
        assert prepared.device.worker is not None
        return prepared.device.worker.submit(prepared.job)

    def job_result(self, job_id: str) -> JobResult | None:
        with self._lock:
            return self._results.get(job_id)

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

    def _job_source(self, job_id: str, final: bool) -> tuple[str, dict[str, str]]:
        with self._lock:
            if final:
                return self._jobs.pop(job_id, ("edge-agent", {}))
            return self._jobs.get(job_id, ("edge-agent", {}))

    def _on_result(self, dev: PrinterDevice, result: JobResult) -> None:
        """From the printer's thread: remember the result, record it as a ``print`` event."""
        with self._lock:
            self._results[result.job_id] = result
            self._results.move_to_end(result.job_id)
            while len(self._results) > RESULTS_KEPT:
                self._results.popitem(last=False)
        source, _ = self._job_source(result.job_id, final=False)
        data = self._print_event(dev, result)
        if result.final:
            self._job_source(result.job_id, final=True)
        self._emit_threadsafe("print", data, source)

    def _print_event(self, dev: PrinterDevice, result: JobResult) -> dict[str, Any]:
        _, ref = self._job_source(result.job_id, final=False)
        status = result.status_after or result.status_before
        return {
            "device": dev.id,
            "type": dev.type,
            "job_id": result.job_id,
            "document": result.kind,
            "summary": result.summary,
            **ref,
            "outcome": result.outcome,
            "printed": result.outcome == "printed",
            "fault": result.fault,
            "attempts": result.attempts,
            "detail": result.detail,
            "printer_state": status.state.value if status else None,
        }

    def _emit_threadsafe(self, kind: str, data: dict[str, Any], source: str) -> None:
        """From a printer thread: straight to the outbox's thread-safe submit.

        Not through the loop (``ctx.emit_threadsafe``): a task there is cancelled
        when the loop winds down, and its cancellation reaches the outbox's
        future, so an event of a job that did print could be dropped while
        stopping. The outbox's writer takes it from here, in submit order (a
        job's "held" before its "printed").
        """
        ctx = self._ctx
        if ctx is None:
            return
        payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        try:
            future = ctx.outbox.submit(kind, payload, source)
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

    def router(self) -> APIRouter:
        from agent.print_api import print_router

        return print_router(self)

    def commands(self) -> dict[str, CommandHandler]:
        return {"print-receipt": self._command("receipt"), "print-label": self._command("label")}

    def _command(self, kind: Kind) -> CommandHandler:
        def handle(args: dict[str, Any]) -> dict[str, Any]:
            # In a command worker thread: blocking waits are fine here.
            prepared = self.prepare(kind, args, job_id=current_command_id.get())
            dev = prepared.device
            ticket = self.submit(prepared, "hq")
            try:
                first = ticket.first.result(timeout=ANSWER_TIMEOUT_S)
            except TimeoutError:
                raise DeviceError(dev.id, f"no answer from the printer's queue within "
                                          f"{ANSWER_TIMEOUT_S:g} s; job {ticket.job_id} stays "
                                          f"queued") from None
            result = self.settled(ticket, first)
            if result.outcome in ("printed", "sent"):
                return result.as_dict()
            raise NotPrinted(dev.id, result, self.not_printed_message(dev, result)
                             .removeprefix(f"{dev.id}: "))
        return handle

    def collector(self) -> Collector:
        return PrinterCollector(self)


class PrinterCollector(Collector):
    """Per printer: up, fault episodes by kind, jobs by outcome; read at scrape time."""

    def __init__(self, service: PrinterService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("edge_printer_up", "1 when the printer can print (up or "
                               "degraded), else 0", labels=["device", "type"])
        faults = CounterMetricFamily("edge_printer_faults", "Fault episodes by kind (counted "
                                     "when a fault begins)", labels=["device", "fault"])
        jobs = CounterMetricFamily("edge_printer_jobs", "Print jobs by what became of them "
                                   "(held and retried: at least once)",
                                   labels=["device", "outcome"])
        pending = GaugeMetricFamily("edge_printer_jobs_pending", "Jobs queued or held",
                                    labels=["device"])
        retries = CounterMetricFamily("edge_printer_retries", "Attempts after a job's first",
                                      labels=["device"])
        try:
            entries = self._service.devices()
        except Exception:  # a scrape must not fail because one source did
            log.exception("metrics: the printer snapshot failed")
            entries = []
        discovered = 0
        for entry in entries:
            if entry.get("discovered"):
                discovered += 1
                continue
            device = entry["id"]
            up.add_metric([device, entry["type"]],
                          1.0 if entry["state"] in ("up", "degraded") else 0.0)
            for fault, count in entry.get("faults", {}).items():
                faults.add_metric([device, fault], count)
            for outcome, count in entry.get("jobs", {}).items():
                if outcome == "pending":
                    pending.add_metric([device], count)
                elif outcome == "retries":
                    retries.add_metric([device], count)
                else:
                    jobs.add_metric([device, outcome], count)
        yield from (up, faults, jobs, retries, pending)
        yield GaugeMetricFamily("edge_printers_discovered",
                                "Network printers advertised over mDNS", value=discovered)


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
    except PrintRefused as exc:
        print(f"edge-agent print-preview: {source}: {exc}", file=sys.stderr)
        return 2
    out = Path(output or Path(source).with_suffix(".png"))
    out.write_bytes(png)
    print(f"{summary}: {len(data)} bytes to print, preview written to {out}")
    return 0
