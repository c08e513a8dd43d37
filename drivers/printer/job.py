"""Print jobs, one FIFO queue per printer: check, send, check again; hold, retry, expire.

A job is bytes rendered beforehand. An attempt asks the printer's status
first; a fault (or, by default, an ESC/POS printer that does not answer) holds
the job without sending anything. After sending, the status is asked again
(ZPL: until the printer's buffer is empty): a fault then clears the printer's
buffer, so the job cannot come out by itself on recovery, and holds the job to
be sent again. Only a printer that said it is fine after taking the job makes
a job ``printed``; bytes sent where nothing can be confirmed (file://, a
printer that went quiet) are ``sent``, never ``printed``. A held job is
retried every ``retry_interval_s`` until its deadline, then ``expired``.

:class:`PrintQueue` is the logic, driven by ``run_due()`` with an injected
clock (tests step it by hand); ``worker.py`` runs one in its own thread.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from drivers.printer.device import Kind, Printer
from drivers.printer.errors import TransportError
from drivers.printer.status import PrinterStatus

log = logging.getLogger("drivers.printer")

# Module level so tests can shrink them.
RETRY_INTERVAL_S = 5.0
JOB_TTL_S = 15 * 60.0
RESULTS_KEPT = 1000  # finished jobs remembered, so a repeated job id gets the same answer

Outcome = Literal["printed", "sent", "held", "expired", "failed"]
FINAL_OUTCOMES = ("printed", "sent", "expired", "failed")


@dataclass(frozen=True)
class PrintJob:
    """Rendered bytes for one printer, with an id (idempotency key) and a deadline."""

    id: str
    kind: Kind
    data: bytes = field(repr=False)
    created_at: float
    expires_at: float
    summary: str = ""  # what it is, for people: "receipt R-000123", "label 1A4F..."

    @classmethod
    def make(cls, kind: Kind, data: bytes, *, now: float, ttl_s: float = JOB_TTL_S,
             job_id: str | None = None, summary: str = "") -> PrintJob:
        return cls(job_id or uuid.uuid4().hex, kind, data, now, now + ttl_s, summary)


@dataclass(frozen=True)
class JobResult:
    """What became of a job (``held`` is interim; the rest are final)."""

    job_id: str
    printer: str
    kind: Kind
    outcome: Outcome
    attempts: int
    fault: str | None
    detail: str
    at: float
    summary: str = ""
    status_before: PrinterStatus | None = None
    status_after: PrinterStatus | None = None

    @property
    def final(self) -> bool:
        return self.outcome in FINAL_OUTCOMES

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for ``print`` events, command results and API answers."""
        return {
            "job_id": self.job_id,
            "printer": self.printer,
            "kind": self.kind,
            "summary": self.summary,
            "outcome": self.outcome,
            "printed": self.outcome == "printed",
            "attempts": self.attempts,
            "fault": self.fault,
            "detail": self.detail,
            "status_before": self.status_before.as_dict() if self.status_before else None,
            "status_after": self.status_after.as_dict() if self.status_after else None,
        }


@dataclass
class FaultStats:
    """Per printer: how often each fault began, and what became of jobs."""

    # fault episodes by kind: counted when a fault begins, not on every poll
    faults: Counter[str] = field(default_factory=Counter)
    jobs_submitted: int = 0
    jobs_printed: int = 0
    jobs_sent_unconfirmed: int = 0
    jobs_held: int = 0  # jobs held at least once
    jobs_retried: int = 0  # jobs that took more than one attempt
    retries: int = 0  # attempts after the first, all jobs
    jobs_expired: int = 0
    jobs_failed: int = 0  # never printed: expired or refused
    last_fault: str | None = None
    last_fault_at: float | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "faults": dict(sorted(self.faults.items())),
            "jobs_submitted": self.jobs_submitted,
            "jobs_printed": self.jobs_printed,
            "jobs_sent_unconfirmed": self.jobs_sent_unconfirmed,
            "jobs_held": self.jobs_held,
            "jobs_retried": self.jobs_retried,
            "retries": self.retries,
            "jobs_expired": self.jobs_expired,
            "jobs_failed": self.jobs_failed,
            "last_fault": self.last_fault,
            "last_fault_at": self.last_fault_at,
        }


@dataclass
class JobTicket:
    """Futures for a submitted job: the first attempt's result and the final one."""

    job_id: str
    first: Future[JobResult]
    final: Future[JobResult]


@dataclass
class _Entry:
    job: PrintJob
    ticket: JobTicket
    attempts: int = 0
    fault: str | None = None
    detail: str = ""
    held: bool = False


class JobJournal(Protocol):
    """Told before a job's bytes go and when, sent, they did not print (the agent keeps jobs
    on disk across restarts with it). ``sending`` raising keeps the bytes back: the job is
    held with the fault ``not_recorded``."""

    def sending(self, job: PrintJob) -> None: ...

    def unsent(self, job: PrintJob, result: JobResult) -> None: ...


class PrintQueue:
    """The jobs of one printer, in order. ``submit`` from any thread; ``run_due`` from one."""

    def __init__(self, printer: Printer, *, clock: Callable[[], float] = time.monotonic,
                 retry_interval_s: float | None = None, job_ttl_s: float | None = None,
                 hold_on_unknown: bool = True,
                 on_result: Callable[[JobResult], None] | None = None) -> None:
        self.printer = printer
        self.clock = clock
        self.retry_interval_s = retry_interval_s or RETRY_INTERVAL_S
        self.job_ttl_s = job_ttl_s or JOB_TTL_S
        self.hold_on_unknown = hold_on_unknown
        self.on_result = on_result
        self.journal: JobJournal | None = None
        self.stats = FaultStats()
        self.last_status: PrinterStatus | None = None
        self._active_faults: frozenset[str] = frozenset()
        self._pending: OrderedDict[str, _Entry] = OrderedDict()
        self._done: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._next_attempt = 0.0

    # --- producers ------------------------------------------------------------

    def job(self, data: bytes, *, job_id: str | None = None, summary: str = "") -> PrintJob:
        """A job for this printer, timed by this queue's clock and TTL."""
        return PrintJob.make(self.printer.kind, data, now=self.clock(), ttl_s=self.job_ttl_s,
                             job_id=job_id, summary=summary)

    def submit(self, job: PrintJob) -> JobTicket:
        """Queue ``job``; a job id seen before gets that job's ticket and nothing is queued."""
        if job.kind != self.printer.kind:
            raise ValueError(f"a {job.kind} job cannot go to {self.printer.kind} printer "
                             f"{self.printer.name}")
        with self._lock:
            known = self._pending.get(job.id) or self._done.get(job.id)
            if known is not None:
                return known.ticket
            ticket = JobTicket(job.id, Future(), Future())
            self._pending[job.id] = _Entry(job, ticket)
            self.stats.jobs_submitted += 1
            return ticket

    def ticket(self, job_id: str) -> JobTicket | None:
        """The ticket of a job this queue holds or remembers, else None."""
        with self._lock:
            known = self._pending.get(job_id) or self._done.get(job_id)
            return known.ticket if known is not None else None

    def pending(self) -> list[PrintJob]:
        with self._lock:
            return [e.job for e in self._pending.values()]

    def next_wakeup(self) -> float | None:
        """Clock time at which ``run_due`` has work (a retry or an expiry); None when idle."""
        with self._lock:
            entries = list(self._pending.values())
        if not entries:
            return None
        if any(not e.ticket.first.done() for e in entries):
            return self.clock()  # someone waits for a first answer
        return min(self._next_attempt, min(e.job.expires_at for e in entries))

    # --- the worker -------------------------------------------------------------

    def run_due(self) -> list[JobResult]:
        """Expire what is overdue and attempt what is due, in order; returns every result made."""
        results: list[JobResult] = []
        now = self.clock()
        with self._lock:
            entries = list(self._pending.values())
        for entry in entries:
            if now >= entry.job.expires_at:
                results.append(self._expire(entry, now))
        with self._lock:
            entries = list(self._pending.values())
        if not entries:
            return results
        if now < self._next_attempt and all(e.ticket.first.done() for e in entries):
            return results
        for entry in entries:
            now = self.clock()
            if now >= entry.job.expires_at:
                results.append(self._expire(entry, now))
                continue
            result = self._attempt(entry, now)
            results.append(result)
            if result.outcome == "held":
                self._next_attempt = now + self.retry_interval_s
                # Jobs behind a held one wait for the same printer: say so now
                # rather than leave their callers waiting for a first answer.
                for other in entries:
                    if other is not entry and not other.ticket.first.done():
                        results.append(self._hold(other, now, result.fault or "unknown",
                                                  f"waiting behind job {entry.job.id}: "
                                                  f"{result.detail}", result.status_before, None))
                break
        return results

    def poll_status(self) -> PrinterStatus:
        """Ask the printer now, outside any job (device health); counts fault edges too."""
        status = self.printer.status()
        self._observe(status, self.clock())
        return status

    # --- one attempt ------------------------------------------------------------

    def _attempt(self, entry: _Entry, now: float) -> JobResult:
        entry.attempts += 1
        if entry.attempts == 2:
            self.stats.jobs_retried += 1
        if entry.attempts > 1:
            self.stats.retries += 1
        printer = self.printer
        before = printer.status()
        self._observe(before, now)
        if before.faulted:
            return self._hold(entry, now, before.faults[0], before.detail, before, None)
        if before.printable is None and self.hold_on_unknown and printer.can_report:
            # ESC/POS silence is "unknown", not a fault; by default a job is
            # still not sent blind to a printer that should answer and does not.
            return self._hold(entry, now, "no_answer", before.detail, before, None)
        if self.journal is not None:
            try:
                self.journal.sending(entry.job)
            except Exception as exc:  # not on record: sending now could print it twice
                log.error("printer %s: job %s not sent: it could not be recorded first (%s)",
                          printer.name, entry.job.id, exc)
                return self._hold(entry, now, "not_recorded",
                                  f"the job could not be recorded before sending ({exc})",
                                  before, None)
        try:
            printer.send(entry.job.data)
        except TransportError as exc:
            self._observe_fault("offline", now)
            printer.cancel()  # part of the job may be in the printer: it must not print alone
            return self._unsent(entry, self._hold(entry, now, "offline", str(exc), before, None))
        if not printer.can_report:
            return self._finish(entry, now, "sent", None,
                                f"sent to {printer.url}, which cannot report whether it printed",
                                before, None)
        after = printer.confirm()
        self._observe(after, self.clock())
        if after.faulted:
            printer.cancel()
            return self._unsent(entry, self._hold(
                entry, now, after.faults[0], f"{after.detail} after the job was sent; the "
                "printer's buffer was cleared and the job will be sent again when it recovers",
                before, after))
        if after.printable and not after.formats_queued:
            return self._finish(entry, now, "printed", None, after.detail, before, after)
        why = (f"{after.formats_queued} format(s) still waiting in the printer"
               if after.formats_queued else after.detail)
        return self._finish(entry, now, "sent", None,
                            f"sent, but the printer did not confirm it printed: {why}",
                            before, after)

    def _unsent(self, entry: _Entry, result: JobResult) -> JobResult:
        if self.journal is not None:
            try:
                self.journal.unsent(entry.job, result)
            except Exception:  # it stays "sending" on record: not sent again after a restart
                log.exception("printer %s: cannot record job %s as held", self.printer.name,
                              entry.job.id)
        return result

    def _observe(self, status: PrinterStatus, now: float) -> None:
        self.last_status = status
        active = list(status.faults)
        if status.printable is None and self.printer.can_report:
            active.append("no_answer")  # counted like a fault: a printer that should answer did not
        for fault in active:
            if fault not in self._active_faults:
                self._fault_began(fault, now, status.detail)
        if self._active_faults and not active:
            log.info("printer %s (%s): recovered, %s", self.printer.name, self.printer.url,
                     status.state.value)
        self._active_faults = frozenset(active)

    def _observe_fault(self, fault: str, now: float) -> None:
        if fault not in self._active_faults:
            self._fault_began(fault, now, "")
        self._active_faults = self._active_faults | {fault}

    def _fault_began(self, fault: str, now: float, detail: str) -> None:
        self.stats.faults[fault] += 1
        self.stats.last_fault = fault
        self.stats.last_fault_at = now
        log.error("printer %s (%s): %s%s; jobs are held until it recovers", self.printer.name,
                  self.printer.url, fault, f" ({detail})" if detail else "")

    def _result(self, entry: _Entry, now: float, outcome: Outcome, fault: str | None,
                detail: str, before: PrinterStatus | None,
                after: PrinterStatus | None) -> JobResult:
        job = entry.job
        return JobResult(job.id, self.printer.name, job.kind, outcome, entry.attempts, fault,
                         detail, now, job.summary, before, after)

    def _hold(self, entry: _Entry, now: float, fault: str, detail: str,
              before: PrinterStatus | None, after: PrinterStatus | None) -> JobResult:
        entry.fault, entry.detail = fault, detail
        result = self._result(entry, now, "held", fault, detail, before, after)
        if not entry.held:
            entry.held = True
            self.stats.jobs_held += 1
            self._emit(result)
        if not entry.ticket.first.done():
            entry.ticket.first.set_result(result)
        return result

    def _finish(self, entry: _Entry, now: float, outcome: Outcome, fault: str | None,
                detail: str, before: PrinterStatus | None,
                after: PrinterStatus | None) -> JobResult:
        result = self._result(entry, now, outcome, fault, detail, before, after)
        if outcome == "printed":
            self.stats.jobs_printed += 1
        elif outcome == "sent":
            self.stats.jobs_sent_unconfirmed += 1
        else:
            self.stats.jobs_failed += 1
            if outcome == "expired":
                self.stats.jobs_expired += 1
        with self._lock:
            self._pending.pop(entry.job.id, None)
            self._done[entry.job.id] = entry
            while len(self._done) > RESULTS_KEPT:
                self._done.popitem(last=False)
        if not entry.ticket.first.done():
            entry.ticket.first.set_result(result)
        entry.ticket.final.set_result(result)
        self._emit(result)
        return result

    def _expire(self, entry: _Entry, now: float) -> JobResult:
        ttl = entry.job.expires_at - entry.job.created_at
        last = f"; last fault: {entry.fault} ({entry.detail})" if entry.fault else ""
        return self._finish(entry, now, "expired", entry.fault or "unknown",
                            f"not printed within {ttl:g}s after {entry.attempts} attempt(s){last}",
                            None, None)

    def _emit(self, result: JobResult) -> None:
        if self.on_result is None:
            return
        try:
            self.on_result(result)
        except Exception:  # a broken listener must not stop the printer's queue
            log.exception("printer %s: on_result callback failed", self.printer.name)

    def snapshot(self) -> dict[str, Any]:
        """For status JSON, /metrics and ``device`` events."""
        status = self.last_status
        with self._lock:
            held = [{"job_id": e.job.id, "summary": e.job.summary, "fault": e.fault,
                     "attempts": e.attempts} for e in self._pending.values() if e.held]
            pending = len(self._pending)
        return {
            "printer": self.printer.name,
            "kind": self.printer.kind,
            "url": self.printer.url,
            "state": status.state.value if status else "unknown",
            "status": status.as_dict() if status else None,
            "pending": pending,
            "held": held,
            "stats": self.stats.snapshot(),
        }
