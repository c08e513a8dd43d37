"""Print queues against fake printers on loopback TCP: hold, retry, expire, print exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.printer import (
    DEVICE_TYPES,
    JobResult,
    LabelOptions,
    Printer,
    PrinterWorker,
    PrintQueue,
    ReceiptOptions,
    build_worker,
    printer_options,
    render_label,
    render_receipt,
)
from tests.conftest import FakeClock, wait_for
from tests.printer_fakes import (
    LABEL,
    LABEL_OPTIONS,
    RECEIPT_OPTIONS,
    SALE,
    FakePrinter,
    fake_escpos_printer,
    fake_zpl_printer,
)

QUICK = 0.3  # status read timeout: silence is detected this fast
RETRY = 5.0
RECEIPT = render_receipt(SALE, ReceiptOptions(**RECEIPT_OPTIONS))
LABEL_ZPL = render_label(LABEL, LabelOptions(**LABEL_OPTIONS))
LABEL_DOC = LABEL_ZPL.rstrip(b"\n")  # what the ZPL printer counts as one format: ^XA..^XZ


@pytest.fixture
def clock() -> FakeClock:
    """A hand-moved clock for the queue."""
    return FakeClock(1000.0)


def queue_for(fake: FakePrinter | str, kind: str, clock: FakeClock, **kw: object) -> PrintQueue:
    """A queue on a printer at ``fake``'s URL (or a URL), timed by ``clock``."""
    url = fake if isinstance(fake, str) else fake.url
    printer = Printer.from_url(f"test-{kind}", kind, url, status_timeout=QUICK)  # type: ignore[arg-type]
    return PrintQueue(printer, clock=clock, retry_interval_s=RETRY, job_ttl_s=60,
                      **kw)  # type: ignore[arg-type]


@pytest.fixture
def escpos() -> Iterator[FakePrinter]:
    """A fake ESC/POS printer on loopback TCP."""
    with fake_escpos_printer() as fake:
        yield fake


@pytest.fixture
def zpl() -> Iterator[FakePrinter]:
    """A fake ZPL printer on loopback TCP (silent when out of paper or head open)."""
    with fake_zpl_printer() as fake:
        yield fake


def test_paper_out_holds_then_recovery_prints_exactly_once(escpos: FakePrinter,
                                                           clock: FakeClock) -> None:
    """Paper out: the job is held, nothing is sent; paper back: it prints once and says so."""
    escpos.set_state("paper_out")
    queue = queue_for(escpos, "receipt", clock)
    ticket = queue.submit(queue.job(RECEIPT, summary="receipt R-000123"))
    [held] = queue.run_due()
    assert (held.outcome, held.fault, held.attempts) == ("held", "paper_out", 1)
    assert ticket.first.result() == held and not ticket.final.done()
    assert RECEIPT not in escpos.received and escpos.printed == []

    queries = escpos.sim.queries
    clock.advance(RETRY - 1)
    assert queue.run_due() == []  # not due yet: the printer is not even asked
    assert escpos.sim.queries == queries

    escpos.set_state("ok")
    clock.advance(1)
    [done] = queue.run_due()
    assert (done.outcome, done.fault, done.attempts) == ("printed", None, 2)
    assert ticket.final.result() == done
    assert escpos.printed == [RECEIPT]
    assert escpos.received.count(RECEIPT) == 1
    stats = queue.stats.snapshot()
    assert stats["faults"] == {"paper_out": 1}
    assert (stats["jobs_held"], stats["jobs_retried"], stats["jobs_printed"]) == (1, 1, 1)


def test_held_job_expires_with_a_failed_result(zpl: FakePrinter, clock: FakeClock) -> None:
    """A head left open past the job's deadline: the job expires, reported failed, never printed."""
    zpl.set_state("head_open")
    queue = queue_for(zpl, "label", clock)
    ticket = queue.submit(queue.job(LABEL_ZPL))
    [held] = queue.run_due()
    assert (held.outcome, held.fault) == ("held", "no_answer")  # Zebra is silent with head open
    clock.advance(RETRY)
    assert [r.outcome for r in queue.run_due()] == ["held"]
    clock.advance(60)
    [expired] = queue.run_due()
    assert expired.outcome == "expired" and expired.final
    assert expired.fault == "no_answer" and "not printed within 60s" in expired.detail
    assert ticket.final.result().as_dict()["printed"] is False
    zpl.set_state("ok")
    clock.advance(RETRY)
    assert queue.run_due() == [] and queue.pending() == []
    assert zpl.printed == [] and LABEL_ZPL not in zpl.received
    stats = queue.stats.snapshot()
    assert (stats["jobs_expired"], stats["jobs_failed"], stats["jobs_printed"]) == (1, 1, 0)


@pytest.mark.parametrize("kind", ["receipt", "label"])
def test_fault_right_after_sending_clears_the_printer_and_reprints_once(
        kind: str, clock: FakeClock) -> None:
    """Paper runs out on the job: buffer cleared (not printed on recovery), resent once."""
    make = fake_escpos_printer if kind == "receipt" else fake_zpl_printer
    data = RECEIPT if kind == "receipt" else LABEL_ZPL
    doc = RECEIPT if kind == "receipt" else LABEL_DOC
    with make() as fake:
        fake.sim.fault_after_next_document("paper_out")
        queue = queue_for(fake, kind, clock)
        ticket = queue.submit(queue.job(data))
        [held] = queue.run_due()
        assert held.outcome == "held" and held.status_after is not None
        assert "cleared" in held.detail
        wait_for(lambda: fake.sim.cleared == 1, what="the buffer clear at the printer")
        assert fake.sim.waiting == []
        fake.set_state("ok")
        assert fake.printed == []  # nothing came out by itself on recovery
        clock.advance(RETRY)
        [done] = queue.run_due()
        assert done.outcome == "printed" and ticket.final.result() == done
        assert fake.printed == [doc]


def test_jobs_behind_a_held_job_answer_at_once_and_print_in_order(escpos: FakePrinter,
                                                                 clock: FakeClock) -> None:
    """Every waiting caller gets a first answer (held) at once; on recovery jobs print in order."""
    escpos.set_state("head_open")
    queue = queue_for(escpos, "receipt", clock)
    docs = [render_receipt({**SALE, "receipt_number": f"R-{n}"}, ReceiptOptions())
            for n in (1, 2, 3)]
    first = queue.submit(queue.job(docs[0]))
    second = queue.submit(queue.job(docs[1]))
    results = queue.run_due()
    assert [r.outcome for r in results] == ["held", "held"]
    assert first.first.done() and second.first.done()
    assert second.first.result().fault == "head_open"
    third = queue.submit(queue.job(docs[2]))
    clock.advance(1)  # a new caller is answered without waiting for the retry interval
    assert [r.outcome for r in queue.run_due()] == ["held", "held"]
    assert third.first.result().outcome == "held"
    escpos.set_state("ok")
    clock.advance(RETRY)
    assert [r.outcome for r in queue.run_due()] == ["printed"] * 3
    assert escpos.printed == docs


def test_a_job_id_is_printed_once(escpos: FakePrinter, clock: FakeClock) -> None:
    """Submitting the same job id again (an HQ command retried) returns the first ticket."""
    queue = queue_for(escpos, "receipt", clock)
    job = queue.job(RECEIPT, job_id="cmd-42")
    ticket = queue.submit(job)
    assert queue.submit(job) is ticket
    queue.run_due()
    assert queue.submit(queue.job(RECEIPT, job_id="cmd-42")) is ticket
    assert queue.run_due() == []
    assert ticket.final.result().outcome == "printed"
    assert escpos.printed == [RECEIPT]


def test_fault_stats_count_episodes_not_polls(escpos: FakePrinter, clock: FakeClock) -> None:
    """Faults are counted once per episode per kind; retries and held jobs are counted too."""
    queue = queue_for(escpos, "receipt", clock)

    def run(state: str, retries: int) -> None:
        escpos.set_state(state)  # type: ignore[arg-type]
        queue.submit(queue.job(RECEIPT))
        queue.run_due()
        for _ in range(retries):
            clock.advance(RETRY)
            queue.run_due()
        escpos.set_state("ok")
        clock.advance(RETRY)
        assert queue.run_due()[-1].outcome == "printed"

    run("paper_out", retries=3)
    run("head_open", retries=1)
    run("paper_out", retries=0)
    stats = queue.stats.snapshot()
    assert stats["faults"] == {"head_open": 1, "paper_out": 2}
    assert stats["jobs_held"] == 3 and stats["jobs_retried"] == 3
    assert stats["retries"] == 4 + 2 + 1
    assert stats["jobs_printed"] == 3 and stats["jobs_failed"] == 0
    assert stats["last_fault"] == "paper_out"
    snap = queue.snapshot()
    assert snap["state"] == "online" and snap["pending"] == 0 and snap["held"] == []


def test_silent_escpos_printer_holds_by_default(clock: FakeClock) -> None:
    """An ESC/POS printer that answers nothing gets no job (status unknown, counted no_answer)."""
    with fake_escpos_printer("silent") as fake:
        queue = queue_for(fake, "receipt", clock)
        assert queue.run_due() == []  # nothing queued: nothing asked
        queue.submit(queue.job(RECEIPT))
        [result] = queue.run_due()
        assert (result.outcome, result.fault) == ("held", "no_answer")
        assert result.status_before is not None and result.status_before.state.value == "unknown"
        assert RECEIPT not in fake.received
        assert queue.stats.faults["no_answer"] == 1


def test_silent_escpos_printer_with_hold_off_is_sent_not_printed(clock: FakeClock) -> None:
    """hold_on_unknown=False sends anyway, but the result is "sent", never "printed"."""
    with fake_escpos_printer("silent") as fake:
        queue = queue_for(fake, "receipt", clock, hold_on_unknown=False)
        queue.submit(queue.job(RECEIPT))
        [result] = queue.run_due()
        assert result.outcome == "sent" and result.as_dict()["printed"] is False
        wait_for(lambda: RECEIPT in fake.received, what="receipt bytes at the printer")
        assert queue.stats.jobs_sent_unconfirmed == 1 and queue.stats.jobs_printed == 0


def test_file_printer_jobs_are_sent_not_printed(tmp_path: Path, clock: FakeClock) -> None:
    """file:// cannot confirm anything: the bytes land in the file, the outcome is "sent"."""
    target = tmp_path / "labels.zpl"
    queue = queue_for(f"file://{target}", "label", clock)
    queue.submit(queue.job(LABEL_ZPL))
    [result] = queue.run_due()
    assert result.outcome == "sent" and "cannot report" in result.detail
    assert target.read_bytes() == LABEL_ZPL


def test_unreachable_printer_holds_as_offline(clock: FakeClock) -> None:
    """Nothing listening at the URL: the job is held with fault "offline", then expires."""
    with fake_zpl_printer() as fake:
        url = fake.url
    queue = queue_for(url, "label", clock)
    queue.submit(queue.job(LABEL_ZPL))
    [held] = queue.run_due()
    assert (held.outcome, held.fault) == ("held", "offline")
    clock.advance(61)
    assert [r.outcome for r in queue.run_due()] == ["expired"]


def test_a_broken_result_listener_does_not_stop_the_queue(escpos: FakePrinter,
                                                          clock: FakeClock) -> None:
    """An on_result callback that raises is logged; the job still completes."""
    def boom(result: JobResult) -> None:
        raise RuntimeError("listener bug")

    queue = queue_for(escpos, "receipt", clock, on_result=boom)
    ticket = queue.submit(queue.job(RECEIPT))
    queue.run_due()
    assert ticket.final.result().outcome == "printed"


def test_worker_thread_answers_held_then_prints_on_recovery() -> None:
    """The worker thread: print() answers "held" at once; recovery prints the job by itself."""
    with fake_zpl_printer("paper_out") as fake:
        seen: list[JobResult] = []
        printer = Printer.from_url("zebra", "label", fake.url, status_timeout=QUICK)
        queue = PrintQueue(printer, retry_interval_s=0.05, on_result=seen.append)
        with PrinterWorker(queue, status_interval_s=0) as worker:
            job = queue.job(LABEL_ZPL, summary="label 1A4F")
            first = asyncio.run(worker.print(job))
            assert (first.outcome, first.fault) == ("held", "no_answer")
            fake.set_state("ok")
            ticket = worker.submit(job)  # same id: the same ticket
            final = ticket.final.result(timeout=10)
            assert final.outcome == "printed"
        assert [r.outcome for r in seen] == ["held", "printed"]
        assert fake.printed == [LABEL_DOC]


def test_worker_polls_status_when_idle() -> None:
    """An idle worker asks the printer now and then, so status shows a fault before any job."""
    with fake_escpos_printer() as fake:
        printer = Printer.from_url("counter", "receipt", fake.url, status_timeout=QUICK)
        queue = PrintQueue(printer)
        with PrinterWorker(queue, status_interval_s=0.05):
            wait_for(lambda: queue.snapshot()["state"] == "online", what="first idle poll")
            fake.set_state("paper_out")
            wait_for(lambda: queue.snapshot()["state"] == "paper_out", what="paper out seen")
        assert queue.stats.faults["paper_out"] == 1


def test_worker_built_from_a_device_entry_prints_on_sim() -> None:
    """A [[devices]] entry builds a worker; on sim://receipt a sale prints and is confirmed."""
    entry = {"id": "counter-1", "type": "receipt_printer", "url": "sim://receipt",
             **RECEIPT_OPTIONS, "drawer_kick": True, "retry_interval_s": 0.05}
    options = printer_options(DEVICE_TYPES[entry["type"]], entry)
    worker = build_worker(entry["id"], options.kind, entry["url"], options)
    data = render_receipt(SALE, options.document)  # type: ignore[arg-type]
    with worker:
        result = asyncio.run(worker.print(worker.queue.job(data, summary="receipt R-000123")))
    assert result.outcome == "printed" and result.as_dict()["summary"] == "receipt R-000123"
    sim = worker.queue.printer.transport.printer  # type: ignore[attr-defined]
    assert sim.printed == [data[:-len(b"\x1bp\x0022")]]  # the drawer kick follows the cut
    assert bytes(sim.received).count(data) == 1  # the whole job, kick included, sent once
