"""One thread per printer: it owns the connection and runs the printer's :class:`PrintQueue`.

Every printer call blocks (sockets, serial, USB), so none of them may run on
the agent's event loop. The worker thread attempts due jobs, sleeps until the
next retry or expiry (or a new job), and polls the printer's status when idle
so status and fault statistics are current before any job. The agent awaits
``print(job)``: the first attempt's result (printed, sent, or held with the
fault), while a held job goes on being retried in the thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from drivers.printer.job import JobResult, JobTicket, PrintJob, PrintQueue

log = logging.getLogger("drivers.printer")

# Module level so tests can shrink them.
STATUS_INTERVAL_S = 30.0  # idle status polls (device health)
STOP_TIMEOUT_S = 5.0


class PrinterWorker:
    """One thread per printer that owns its connection and runs its :class:`PrintQueue`."""

    def __init__(self, queue: PrintQueue, *, status_interval_s: float | None = None) -> None:
        self.queue = queue
        self.status_interval_s = status_interval_s if status_interval_s is not None \
            else STATUS_INTERVAL_S
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"printer-{self.queue.printer.name}")
            self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop after the current attempt (bounded by transport timeouts); held jobs stay."""
        self._stop.set()
        self._wake.set()
        self.queue.printer.interrupt()  # end a confirm() wait now
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.queue.printer.close()

    def submit(self, job: PrintJob) -> JobTicket:
        ticket = self.queue.submit(job)
        self._wake.set()
        return ticket

    async def print(self, job: PrintJob) -> JobResult:
        """Submit and wait for the first attempt: printed/sent, or held with the fault."""
        return await asyncio.wrap_future(self.submit(job).first)

    def __enter__(self) -> PrinterWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> PrinterWorker:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def _run(self) -> None:
        # The first round polls at once (unless a job is waiting), so status
        # shows a printer's real state from start-up, not after an interval.
        last_poll = time.monotonic() - (self.status_interval_s or 0.0)
        while not self._stop.is_set():
            try:
                if self.queue.run_due():
                    last_poll = time.monotonic()
                elif (self.status_interval_s
                      and time.monotonic() - last_poll >= self.status_interval_s):
                    self.queue.poll_status()
                    last_poll = time.monotonic()
            except Exception:  # keep the printer's thread alive; the next round retries
                log.exception("printer %s: queue round failed", self.queue.printer.name)
            wake = self.queue.next_wakeup()
            delay = self.status_interval_s or 60.0
            if wake is not None:
                delay = min(delay, max(0.0, wake - self.queue.clock()))
            self._wake.wait(delay)
            self._wake.clear()
