"""The printers family in the agent: the real app, a real outbox, fake printers on loopback TCP.

Each test builds the API exactly as the daemon does (``create_app`` over an
``ApiContext`` whose services hold a :class:`PrinterService`), starts the
service on the app's own event loop, and prints on the fake ESC/POS and ZPL
printers of ``tests/printer_fakes.py``, switched to paper-out, head-open or
silent at run time. Discovery runs real python-zeroconf on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zxingcpp
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from zeroconf import IPVersion, ServiceInfo, Zeroconf

import agent.devices.print_jobs as print_jobs
import agent.devices.printing as printing
from agent import cli
from agent.commands.handlers import CommandRouter
from agent.config import AgentConfig
from agent.devices.family import ServiceContext, all_devices
from agent.devices.printing import PrinterService
from agent.envelope import decode
from agent.outbox import Outbox
from agent.testing.localbroker import free_port
from agent.testing.localsite import write_toml
from agent.web.api import create_app
from agent.web.auth import Tokens
from agent.web.context import ApiContext
from drivers.printer import LabelOptions, ReceiptOptions, render_label, render_receipt
from tests.conftest import wait_for
from tests.printer_fakes import (
    LABEL,
    LABEL_OPTIONS,
    RECEIPT_OPTIONS,
    RETAIL_ID_URL,
    SALE,
    TAG,
    FakePrinter,
    fake_escpos_printer,
    fake_zpl_printer,
)

SITE = "co-denver-01"
TOKEN = "pos-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OTHER_TOKEN = "pos-3-token-0123456789abcdef"
OTHER_AUTH = {"Authorization": f"Bearer {OTHER_TOKEN}"}
# Quick printers: a held job is retried every 0.1 s, silence is decided in 0.3 s.
QUICK = {"retry_interval_s": 0.1, "status_timeout_s": 0.3, "status_interval_s": 0.2}
RECEIPT_BYTES = render_receipt(SALE, ReceiptOptions(**RECEIPT_OPTIONS))
LABEL_BYTES = render_label(LABEL, LabelOptions(**LABEL_OPTIONS))
LABEL_DOC = LABEL_BYTES.rstrip(b"\n")  # what the printer takes as one format: ^XA .. ^XZ


def receipt_entry(url: str, id: str = "counter-1-receipt", **extra: Any) -> dict[str, Any]:
    # No site_name: the header comes from site.name ("Denver Flagship", as in RECEIPT_OPTIONS).
    options = {k: v for k, v in RECEIPT_OPTIONS.items() if k != "site_name"}
    return {"id": id, "type": "receipt_printer", "url": url, **options, **QUICK, **extra}


def label_entry(url: str, id: str = "packaging-zebra", **extra: Any) -> dict[str, Any]:
    return {"id": id, "type": "label_printer", "url": url, **LABEL_OPTIONS, **QUICK, **extra}


@pytest.fixture(autouse=True)
def quick_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(printing, "STATE_WATCH_S", 0.05)


class PrintSite:
    """The app with a started PrinterService on a real outbox, as the daemon wires it."""

    def __init__(self, tmp: Path, devices: list[dict[str, Any]],
                 api: dict[str, Any] | None = None) -> None:
        self.cfg = AgentConfig(site={"id": SITE, "name": "Denver Flagship"},
                               outbox={"path": str(tmp / "outbox")},
                               api={"advertise": False, **(api or {})}, devices=devices)
        self.outbox = Outbox(str(tmp / "outbox"), SITE, max_bytes=1 << 26)
        self.outbox.open()
        self.service = PrinterService(self.cfg)
        tokens = Tokens({"pos-2": TOKEN, "pos-3": OTHER_TOKEN})
        self.ctx = ApiContext(cfg=self.cfg, outbox=self.outbox, tokens=tokens,
                              uplink_snapshot=lambda: {"state": "connected",
                                                       "since": time.time()},
                              devices_snapshot=lambda: all_devices([self.service]),
                              started_at=time.time(), services=[self.service])
        self.client = TestClient(create_app(self.ctx))
        self.client.__enter__()
        portal = self.client.portal
        assert portal is not None
        loop = portal.call(asyncio.get_running_loop)
        portal.call(self.service.start, ServiceContext(cfg=self.cfg, outbox=self.outbox,
                                                       state_dir=tmp, loop=loop))

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None
             ) -> httpx.Response:
        return self.client.post(path, json=body, headers={**AUTH, **(headers or {})})

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [decode(raw) for _, raw in self.outbox.read(kind, 0, 10_000)]

    def print_events(self, job_id: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events("print") if e["data"]["job_id"] == job_id]

    def device(self, device_id: str) -> dict[str, Any]:
        return next(d for d in self.service.devices() if d["id"] == device_id)

    def stop_service(self) -> None:
        portal = self.client.portal
        if portal is not None:
            portal.call(self.service.stop)

    def close(self) -> None:
        self.stop_service()
        self.client.__exit__(None, None, None)
        self.outbox.close()


@pytest.fixture
def escpos() -> Iterator[FakePrinter]:
    with fake_escpos_printer() as fake:
        yield fake


@pytest.fixture
def zpl() -> Iterator[FakePrinter]:
    with fake_zpl_printer() as fake:
        yield fake


@pytest.fixture
def site(tmp_path: Path, escpos: FakePrinter, zpl: FakePrinter) -> Iterator[PrintSite]:
    s = PrintSite(tmp_path, [receipt_entry(escpos.url), label_entry(zpl.url)])
    try:
        yield s
    finally:
        s.close()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


# -- printing through the API ----------------------------------------------------------------


def test_receipt_is_200_and_the_printer_got_the_exact_rendered_bytes(
        site: PrintSite, escpos: FakePrinter) -> None:
    """POST /v1/print/receipt: 200 once confirmed; the printer got the render, header from site."""
    r = site.post("/v1/print/receipt", {"sale": SALE})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["outcome"], body["printed"], body["printer"]) == ("printed", True,
                                                                   "counter-1-receipt")
    assert escpos.printed == [RECEIPT_BYTES]
    events = wait_for(lambda: site.print_events(body["job_id"]), what="print event")
    assert events[0] | {"detail": None} == {
        "device": "counter-1-receipt", "type": "receipt_printer", "job_id": body["job_id"],
        "document": "receipt", "summary": "receipt R-000123", "receipt_number": "R-000123",
        "outcome": "printed", "printed": True, "fault": None, "attempts": 1, "detail": None,
        "printer_state": "online"}
    assert site.events("print")[0]["source"] == "pos-2"


def test_label_is_200_and_the_zpl_printer_got_the_exact_label(site: PrintSite,
                                                              zpl: FakePrinter) -> None:
    """POST /v1/print/label on the default label printer: 200, the exact ZPL, a print event."""
    r = site.post("/v1/print/label", LABEL)
    assert r.status_code == 200, r.text
    assert LABEL_BYTES in zpl.received and zpl.printed == [LABEL_DOC]
    events = wait_for(lambda: site.print_events(r.json()["job_id"]), what="print event")
    assert (events[0]["outcome"], events[0]["package_tag"]) == ("printed", TAG)


@pytest.mark.parametrize(("make", "state", "fault", "words"), [
    ("escpos", "paper_out", "paper_out", "paper out"),
    ("escpos", "head_open", "head_open", "head or cover open"),
    ("escpos", "silent", "no_answer", "not answering"),
    ("zpl-flags", "head_open", "head_open", "head or cover open"),
    ("zpl", "paper_out", "no_answer", "not answering"),  # Zebra: silent when out of media
])
def test_a_printer_fault_is_503_naming_it_and_nothing_prints(
        tmp_path: Path, make: str, state: str, fault: str, words: str) -> None:
    """A faulted printer: 503 with the fault and the device named; nothing reaches the paper."""
    kind = "receipt" if make == "escpos" else "label"
    fake_cm = fake_escpos_printer(state) if make == "escpos" else fake_zpl_printer(
        state, silent_when_faulted=make == "zpl")
    with fake_cm as fake:
        entry = (receipt_entry if kind == "receipt" else label_entry)(fake.url, id="p1")
        s = PrintSite(tmp_path, [entry])
        try:
            r = s.post(f"/v1/print/{kind}", {"sale": SALE} if kind == "receipt" else LABEL)
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["reason"] == fault and body["job"]["outcome"] == "held"
            assert body["error"].startswith(f"p1: {words}") and "held" in body["error"]
            assert r.headers["Retry-After"] == "1"
            assert fake.printed == []
        finally:
            s.close()


def test_an_unreachable_printer_is_503_offline(tmp_path: Path) -> None:
    """Nothing listening at the printer's address: 503 offline, naming the device and URL."""
    url = f"tcp://127.0.0.1:{free_port()}"
    s = PrintSite(tmp_path, [receipt_entry(url, id="counter-9")])
    try:
        r = s.post("/v1/print/receipt", {"sale": SALE})
        assert r.status_code == 503
        assert r.json()["reason"] == "offline"
        assert r.json()["error"].startswith("counter-9: offline")
        assert url in r.json()["error"]
    finally:
        s.close()


def test_a_held_job_prints_once_on_recovery_with_a_print_event_per_outcome(
        site: PrintSite, escpos: FakePrinter) -> None:
    """Paper out: 503 and held; paper back: printed exactly once; events held then printed."""
    escpos.set_state("paper_out")
    r = site.post("/v1/print/receipt", {"sale": SALE})
    assert r.status_code == 503
    job_id = r.json()["job"]["job_id"]
    assert site.client.get(f"/v1/print/jobs/{job_id}", headers=AUTH).json()["outcome"] == "held"
    escpos.set_state("ok")
    wait_for(lambda: site.client.get(f"/v1/print/jobs/{job_id}", headers=AUTH)
             .json()["outcome"] == "printed", what="the held job printed")
    # The job is finished, so nothing can send it again: exactly one receipt.
    assert escpos.printed == [RECEIPT_BYTES]
    events = wait_for(lambda: (e := site.print_events(job_id)) and len(e) == 2 and e,
                      what="both print events")
    assert [(e["outcome"], e["fault"]) for e in events] == [("held", "paper_out"),
                                                           ("printed", None)]
    assert events[1]["attempts"] >= 2
    device_events = wait_for(lambda: [e["data"] for e in site.events("device")
                                      if e["data"]["device"] == "counter-1-receipt"
                                      and e["data"]["cleared"]], what="cleared device event")
    raised = [e["data"] for e in site.events("device") if e["data"]["raised"] == ["paper_out"]]
    assert raised and raised[0]["state"] == "down" and raised[0]["faults"] == {"paper_out": 1}
    assert device_events[0]["cleared"] == ["paper_out"] and device_events[0]["state"] == "up"
    assert device_events[0]["jobs"]["held"] == 1


def test_a_held_job_that_never_prints_expires_with_an_event(tmp_path: Path) -> None:
    """A job held past job_ttl_s ends as expired (never printed), and that is recorded."""
    with fake_escpos_printer("paper_out") as fake:
        s = PrintSite(tmp_path, [receipt_entry(fake.url, job_ttl_s=0.4)])
        try:
            job_id = s.post("/v1/print/receipt", {"sale": SALE}).json()["job"]["job_id"]
            events = wait_for(lambda: (e := s.print_events(job_id)) and len(e) == 2 and e,
                              what="expired event")
            assert [e["outcome"] for e in events] == ["held", "expired"]
            assert events[1]["fault"] == "paper_out" and events[1]["printed"] is False
            assert s.device("counter-1-receipt")["jobs"]["expired"] == 1
            assert fake.printed == []
        finally:
            s.close()


def test_a_job_held_at_stop_stays_held_and_prints_after_the_next_start(tmp_path: Path) -> None:
    """Stopping records no "failed": the held job is on disk and the next start prints it once."""
    with fake_escpos_printer("paper_out") as fake:
        s = PrintSite(tmp_path, [receipt_entry(fake.url)])
        try:
            job_id = s.post("/v1/print/receipt", {"sale": SALE}).json()["job"]["job_id"]
            s.stop_service()
            wait_for(lambda: s.print_events(job_id), what="the held event")
            assert [e["outcome"] for e in s.print_events(job_id)] == ["held"]
        finally:
            s.close()
        fake.set_state("ok")
        s = PrintSite(tmp_path, [receipt_entry(fake.url)])
        try:
            wait_for(lambda: [e["outcome"] for e in s.print_events(job_id)] == ["held", "printed"],
                     what="the held job printed after the restart")
            assert fake.printed == [RECEIPT_BYTES]
            assert s.client.get(f"/v1/print/jobs/{job_id}", headers=AUTH).json()["outcome"] == \
                "printed"
        finally:
            s.close()


def test_an_idempotency_key_replays_across_a_restart_without_printing(tmp_path: Path) -> None:
    """After a restart the same key and body answer the first job's result; another body is 422."""
    key = {"Idempotency-Key": "sale-R-000123"}
    with fake_escpos_printer() as fake:
        s = PrintSite(tmp_path, [receipt_entry(fake.url)])
        try:
            first = s.post("/v1/print/receipt", {"sale": SALE}, key)
            assert first.status_code == 200, first.text
        finally:
            s.close()
        s = PrintSite(tmp_path, [receipt_entry(fake.url)])
        try:
            again = s.post("/v1/print/receipt", {"sale": SALE}, key)
            assert again.status_code == 200, again.text
            assert (again.json()["job_id"], again.json()["outcome"]) == (
                first.json()["job_id"], "printed")
            other = s.post("/v1/print/receipt", {"sale": {**SALE, "register": "pos-9"}}, key)
            assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key"
            assert fake.printed == [RECEIPT_BYTES]
        finally:
            s.close()


def test_a_print_job_is_read_only_by_the_caller_that_made_it(site: PrintSite) -> None:
    """GET /v1/print/jobs/{id}: the owner's token reads it; another token gets 404, as for none."""
    r = site.post("/v1/print/receipt", {"sale": SALE}, {"Idempotency-Key": "k-1"})
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    assert site.client.get(f"/v1/print/jobs/{job_id}", headers=AUTH).status_code == 200
    theirs = site.client.get(f"/v1/print/jobs/{job_id}", headers=OTHER_AUTH)
    none = site.client.get("/v1/print/jobs/pos-3:nothing", headers=OTHER_AUTH)
    assert (theirs.status_code, none.status_code) == (404, 404)
    assert theirs.json()["field"] == "job_id"


def test_a_worker_past_its_stop_deadline_records_one_outcome(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A printer thread that finishes a job after stop() gave up on it records nothing then;
    the next start records it once (failed: it may have printed), never also "printed"."""
    with fake_escpos_printer() as fake:
        s = PrintSite(tmp_path, [receipt_entry(fake.url)])
        try:
            dev = s.service.printers["counter-1-receipt"]
            assert dev.worker is not None
            printer, thread = dev.worker.queue.printer, dev.worker._thread
            assert thread is not None
            real_confirm, in_confirm, gate = printer.confirm, threading.Event(), threading.Event()

            def slow_confirm(timeout: float | None = None) -> Any:
                status = real_confirm(timeout)  # the printer said it printed...
                in_confirm.set()
                gate.wait(10)                   # ...and this thread is slow to go on
                return status

            monkeypatch.setattr(printer, "confirm", slow_confirm)
            prepared = s.service.prepare("receipt", {"sale": SALE})
            s.service.submit(prepared, "pos-2")
            assert in_confirm.wait(10)
            s.stop_service()                    # gives up on the worker after STOP_WORKER_S
            gate.set()
            thread.join(10)
            assert not thread.is_alive()
            assert s.print_events(prepared.job.id) == []
        finally:
            gate.set()
            s.close()
        assert fake.printed == [RECEIPT_BYTES]
        s = PrintSite(tmp_path, [receipt_entry(fake.url)])
        try:
            events = s.print_events(prepared.job.id)
            assert [(e["outcome"], e["fault"]) for e in events] == [("failed", "interrupted")]
            assert "may have printed" in events[0]["detail"]
            assert fake.printed == [RECEIPT_BYTES]  # not sent again
        finally:
            s.close()


def test_waiting_print_jobs_are_bounded(site: PrintSite, escpos: FakePrinter,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_WAITING held jobs a new one is refused with 503 queue_full, not dropped."""
    monkeypatch.setattr(print_jobs, "MAX_WAITING", 2)
    escpos.set_state("paper_out")
    codes = [site.post("/v1/print/receipt", {"sale": {**SALE, "receipt_number": f"R-{i}"}})
             for i in range(3)]
    assert [r.status_code for r in codes] == [503, 503, 503]
    assert [r.json()["reason"] for r in codes] == ["paper_out", "paper_out", "queue_full"]
    assert "2 print jobs" in codes[2].json()["error"]


def test_print_state_files_are_private(site: PrintSite, tmp_path: Path) -> None:
    """The print jobs and the command journal are mode 0600, whatever the umask."""
    from agent.commands.journal import CommandJournal

    site.post("/v1/print/receipt", {"sale": SALE})
    CommandJournal(tmp_path).close()
    for name in ("print-jobs.sqlite", "print-jobs.sqlite-wal", "commands.sqlite"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


def test_print_events_reach_the_outbox_without_the_event_loop(tmp_path: Path,
                                                              zpl: FakePrinter) -> None:
    """Job results go from the printer thread to the outbox: a loop winding down drops none."""
    cfg = AgentConfig(site={"id": SITE}, outbox={"path": str(tmp_path / "outbox")},
                      api={"advertise": False}, devices=[label_entry(zpl.url)])
    outbox = Outbox(str(tmp_path / "outbox"), SITE, max_bytes=1 << 26)
    outbox.open()
    service = PrinterService(cfg)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(service.start(ServiceContext(cfg, outbox, tmp_path, loop)))
        # From here the loop does not run, as while the daemon stops.
        tickets = [service.submit(service.prepare("label", {**LABEL, "batch": f"B-{i}"}),
                                  "pos-2") for i in range(5)]
        assert [t.final.result(timeout=10).outcome for t in tickets] == ["printed"] * 5
        wait_for(lambda: len(outbox.read("print", 0, 100)) == 5, what="5 print events")
    finally:
        loop.run_until_complete(service.stop())
        loop.close()
        outbox.close()


def test_idempotency_key_prints_once_and_answers_with_the_final_result(
        site: PrintSite, escpos: FakePrinter) -> None:
    """A POS resending with its Idempotency-Key gets the job's result; nothing prints twice."""
    escpos.set_state("paper_out")
    key = {"Idempotency-Key": "R-000123-receipt"}
    first = site.post("/v1/print/receipt", {"sale": SALE}, key)
    assert first.status_code == 503
    escpos.set_state("ok")
    wait_for(lambda: len(escpos.printed) == 1, what="printed on recovery")
    again = site.post("/v1/print/receipt", {"sale": SALE}, key)
    assert again.status_code == 200 and again.json()["outcome"] == "printed"
    assert again.json()["job_id"] == first.json()["job"]["job_id"] == "pos-2:R-000123-receipt"
    assert escpos.printed == [RECEIPT_BYTES]


def test_idempotency_key_reused_with_another_body_is_422(
        site: PrintSite, escpos: FakePrinter) -> None:
    """A print key reused with another document: 422 naming the header, printed once."""
    key = {"Idempotency-Key": "R-000124-receipt"}
    first = site.post("/v1/print/receipt", {"sale": SALE}, key)
    assert first.status_code == 200
    other = site.post("/v1/print/receipt", {"sale": {**SALE, "total": "99.00"}}, key)
    assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key"
    assert escpos.printed == [RECEIPT_BYTES]


# -- refusals ----------------------------------------------------------------------------------


def test_copies_over_the_printers_limit_is_422_naming_copies(site: PrintSite) -> None:
    """copies beyond max_copies (default 50) is refused naming the field; nothing prints."""
    r = site.post("/v1/print/label", {**LABEL, "copies": 51})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "copies" and "max_copies = 50" in r.json()["error"]


def test_unknown_printer_is_404_naming_it(site: PrintSite) -> None:
    """A printer id that is not configured: 404 naming it and the printers there are."""
    r = site.post("/v1/print/label", {**LABEL, "printer": "zebra-9"})
    assert r.status_code == 404
    assert r.json()["field"] == "printer"
    assert "'zebra-9'" in r.json()["error"] and "packaging-zebra" in r.json()["error"]
    r = site.post("/v1/print/receipt", {"sale": SALE, "printer": "packaging-zebra"})
    assert (r.status_code, r.json()["field"]) == (422, "printer")
    assert "is a label_printer" in r.json()["error"]


def test_no_printer_of_that_type_is_404(tmp_path: Path, escpos: FakePrinter) -> None:
    """Printing a label on a site with no label printer: 404 saying none is configured."""
    s = PrintSite(tmp_path, [receipt_entry(escpos.url)])
    try:
        r = s.post("/v1/print/label", LABEL)
        assert (r.status_code, r.json()["reason"]) == (404, "no_printer")
        assert "no label_printer is configured" in r.json()["error"]
    finally:
        s.close()


@pytest.mark.parametrize(("change", "field"), [
    ({"package_tag": "1a4ff0100000022000000123"}, "package_tag"),
    ({"net_weight": "0"}, "net_weight"),
    ({"thc_pct": "140"}, "thc_pct"),
    ({"retail_id_url": "ftp://x"}, "retail_id_url"),
    ({"harvest_date": "yesterday"}, "harvest_date"),
    ({"colour": "red"}, "colour"),
    ({"printer": 7}, "printer"),
])
def test_bad_label_field_is_422_naming_it_and_nothing_prints(
        site: PrintSite, zpl: FakePrinter, change: dict[str, Any], field: str) -> None:
    """A bad label field: 422 naming that field; no job, no bytes to the printer."""
    r = site.post("/v1/print/label", {**LABEL, **change})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and r.json()["error"].startswith(f"{field}: ")
    assert zpl.printed == [] and site.device("packaging-zebra")["jobs"]["submitted"] == 0


def test_bad_sale_is_422_naming_the_field_under_sale(site: PrintSite) -> None:
    """A receipt for a bad sale: 422 naming sale.lines.0.package_tag; no body: sale required."""
    bad = {**SALE, "lines": [{**SALE["lines"][0], "package_tag": "short"}]}
    r = site.post("/v1/print/receipt", {"sale": bad})
    assert (r.status_code, r.json()["field"]) == (422, "sale.lines.0.package_tag")
    r = site.post("/v1/print/receipt", {"printer": "counter-1-receipt"})
    assert (r.status_code, r.json()["field"]) == (422, "sale")
    r = site.client.post("/v1/print/receipt", content=b"{nope", headers={
        **AUTH, "Content-Type": "application/json"})
    assert (r.status_code, r.json()["field"]) == (400, "body")
    r = site.client.post("/v1/print/receipt", json={"sale": SALE})
    assert r.status_code == 401


def test_bad_printer_config_is_named_by_check_config_and_never_crashes(
        tmp_path: Path, escpos: FakePrinter) -> None:
    """config_issues names devices[ID].key; the agent runs on, the printer shows state error."""
    devices = [receipt_entry(escpos.url, columns=9), receipt_entry("tcp://", id="r2"),
               label_entry("sim://label", id="z1", dpi=250, colour="red")]
    cfg = AgentConfig(site={"id": SITE}, devices=devices)
    issues = {(i.path, i.message.split(" (")[0]) for i in PrinterService.config_issues(cfg)}
    assert ("devices[counter-1-receipt].columns",
            "Input should be greater than or equal to 24") in issues
    assert any(path == "devices[r2].url" and "no host" in msg for path, msg in issues)
    assert any(path == "devices[z1].colour" for path, _ in issues)
    s = PrintSite(tmp_path, devices)
    try:
        entry = s.device("counter-1-receipt")
        assert entry["state"] == "error" and "columns" in entry["error"]
        r = s.post("/v1/print/receipt", {"sale": SALE})
        assert (r.status_code, r.json()["reason"]) == (503, "misconfigured")
        status = s.client.get("/v1/status", headers=AUTH).json()
        assert any(reason.startswith("device_down: counter-1-receipt is error")
                   for reason in status["reasons"])
    finally:
        s.close()


# -- previews ---------------------------------------------------------------------------------


def test_previews_are_pngs_whose_codes_decode_and_nothing_prints(
        site: PrintSite, escpos: FakePrinter, zpl: FakePrinter) -> None:
    """Preview routes answer image/png; zxing-cpp reads back the tag, the URL, the receipt no."""
    r = site.post("/v1/print/label/preview", LABEL)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    found = {c.format.name: c.text for c in zxingcpp.read_barcodes(Image.open(io.BytesIO(
        r.content)))}
    assert found == {"Code128": TAG, "QRCode": RETAIL_ID_URL}
    r = site.post("/v1/print/receipt/preview", {"sale": SALE})
    assert r.status_code == 200
    assert [c.text for c in zxingcpp.read_barcodes(Image.open(io.BytesIO(r.content)))] == [
        "R-000123"]
    r = site.post("/v1/print/label/preview", {**LABEL, "net_weight": "-1"})
    assert (r.status_code, r.json()["field"]) == (422, "net_weight")
    assert escpos.printed == [] and zpl.printed == []


def test_sim_printers_with_preview_dir_write_the_job_and_its_png(tmp_path: Path) -> None:
    """The demo's printers: sim:// prints (confirmed), preview_dir gets the bytes and a PNG."""
    out = tmp_path / "prints"
    s = PrintSite(tmp_path, [receipt_entry("sim://receipt", preview_dir=str(out)),
                             label_entry("sim://label", preview_dir=str(out)),
                             label_entry(f"file://{tmp_path}/zebra.zpl", id="spool")])
    try:
        r = s.post("/v1/print/receipt", {"sale": SALE}, {"Idempotency-Key": "../a.b"})
        assert r.status_code == 200 and r.json()["outcome"] == "printed"
        assert (out / "receipt_R-000123--pos-2_.._a.b.escpos").read_bytes() == RECEIPT_BYTES
        assert Image.open(out / "receipt_R-000123--pos-2_.._a.b.png").format == "PNG"
        r = s.post("/v1/print/label", LABEL)
        assert r.status_code == 200
        assert (out / f"label_{TAG}--{r.json()['job_id']}.zpl").read_bytes() == LABEL_BYTES
        # file:// cannot confirm anything: 202 "sent", never "printed".
        r = s.post("/v1/print/label", {**LABEL, "printer": "spool"})
        assert (r.status_code, r.json()["outcome"], r.json()["printed"]) == (202, "sent", False)
        assert (tmp_path / "zebra.zpl").read_bytes() == LABEL_BYTES
    finally:
        s.close()


def test_print_preview_cli_writes_a_png_with_the_printers_options(tmp_path: Path) -> None:
    """edge-agent print-preview --sale FILE --printer ID writes the receipt PNG."""
    config = tmp_path / "agent.toml"
    write_toml(config, {"site": {"id": SITE, "name": "Denver Flagship"},
                        "devices": [receipt_entry("sim://receipt", columns=32)]})
    sale = tmp_path / "sale.json"
    sale.write_text(json.dumps(SALE))
    out = tmp_path / "receipt.png"
    assert cli.main(["print-preview", "--config", str(config), "--sale", str(sale),
                     "--printer", "counter-1-receipt", "-o", str(out)]) == 0
    image = Image.open(out)
    assert image.width == 32 * 12 + 24  # 58 mm paper: 32 columns of 12 dots, padding
    assert [c.text for c in zxingcpp.read_barcodes(image)] == ["R-000123"]
    label = tmp_path / "label.json"
    label.write_text(json.dumps({**LABEL, "package_tag": "nope"}))
    assert cli.main(["print-preview", "--label", str(label)]) == 2


# -- HQ commands, statistics ---------------------------------------------------------------


def test_hq_print_label_command_prints_once_per_command_id(site: PrintSite,
                                                            zpl: FakePrinter) -> None:
    """print-label via CommandRouter: job id = command id; a resent id is answered, not printed."""
    answers: list[dict[str, Any]] = []
    router = CommandRouter(answers.append)
    for name, handler in site.service.commands().items():
        router.register(name, handler)
    try:
        payload = json.dumps({"id": "cmd-7", "args": LABEL}).encode()
        router.dispatch("print-label", payload)
        router.dispatch("print-label", payload)  # while the first may still run
        wait_for(lambda: answers, what="the first answer")
        router.dispatch("print-label", payload)  # after it finished
        wait_for(lambda: len(answers) >= 2, what="the replayed answer")
        assert all(a == answers[0] for a in answers)
        assert answers[0]["ok"] and answers[0]["result"]["job_id"] == "cmd-7"
        assert answers[0]["result"]["outcome"] == "printed"
        assert zpl.printed == [LABEL_DOC]
        events = wait_for(lambda: site.print_events("cmd-7"), what="print event")
        assert len(events) == 1 and site.events("print")[0]["source"] == "hq"
        router.dispatch("print-label", json.dumps({"id": "cmd-8", "args": {
            **LABEL, "net_weight": "x"}}).encode())
        bad = wait_for(lambda: [a for a in answers if a["id"] == "cmd-8"], what="refusal")[0]
        assert not bad["ok"] and bad["error"].startswith("net_weight: ")
    finally:
        router.close()


def test_hq_print_receipt_on_paper_out_is_not_ok_naming_the_fault(
        site: PrintSite, escpos: FakePrinter) -> None:
    """print-receipt on a printer out of paper: ok false, the error names device and fault."""
    escpos.set_state("paper_out")
    answers: list[dict[str, Any]] = []
    router = CommandRouter(answers.append)
    router.register("print-receipt", site.service.commands()["print-receipt"])
    try:
        router.dispatch("print-receipt", json.dumps({"id": "cmd-r1", "args": {
            "sale": SALE}}).encode())
        answer = wait_for(lambda: answers, what="answer")[0]
        assert answer["ok"] is False
        assert answer["error"].startswith("counter-1-receipt: paper out")
        escpos.set_state("ok")
        wait_for(lambda: [e for e in site.print_events("cmd-r1") if e["outcome"] == "printed"],
                 what="printed on recovery")
        assert escpos.printed == [RECEIPT_BYTES]
    finally:
        router.close()


def test_fault_statistics_show_in_devices_status_and_metrics(
        site: PrintSite, escpos: FakePrinter) -> None:
    """Per printer: fault counts and job counts in devices(), /v1/status and /metrics."""
    escpos.set_state("paper_out")
    assert site.post("/v1/print/receipt", {"sale": SALE}).status_code == 503
    status = site.client.get("/v1/status", headers=AUTH).json()
    assert status["state"] == "degraded"
    assert "device_down: counter-1-receipt is down (paper_out)" in status["reasons"]
    escpos.set_state("ok")
    wait_for(lambda: site.device("counter-1-receipt")["jobs"]["printed"] == 1, what="printed")
    escpos.set_state("head_open")
    wait_for(lambda: site.device("counter-1-receipt")["faults"].get("head_open"),
             what="idle poll sees head open")
    entry = site.device("counter-1-receipt")
    assert entry["faults"] == {"head_open": 1, "paper_out": 1}
    assert entry["jobs"] | {"retries": 0} == {
        "submitted": 1, "printed": 1, "sent": 0, "held": 1, "retried": 1, "retries": 0,
        "expired": 0, "failed": 0, "pending": 0}
    assert (entry["state"], entry["last_fault"]) == ("down", "head_open")
    status = site.client.get("/v1/status", headers=AUTH).json()
    assert next(d for d in status["devices"] if d["id"] == "packaging-zebra")["state"] == "up"
    text = site.client.get("/metrics", headers=AUTH).text
    device = {"device": "counter-1-receipt"}
    assert metric_value(text, "edge_printer_faults_total", **device, fault="paper_out") == 1
    assert metric_value(text, "edge_printer_faults_total", **device, fault="head_open") == 1
    assert metric_value(text, "edge_printer_jobs_total", **device, outcome="printed") == 1
    assert metric_value(text, "edge_printer_jobs_retried_total", **device) == 1
    assert metric_value(text, "edge_printer_jobs_held_total", **device) == 1
    assert metric_value(text, "edge_printer_jobs_submitted_total", **device) == 1
    assert metric_value(text, "edge_printer_up", **device) == 0
    assert metric_value(text, "edge_printer_up", device="packaging-zebra") == 1


# -- discovery ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def advertised_zebra() -> Iterator[FakePrinter]:
    """A fake ZPL printer advertised as _pdl-datastream._tcp on 127.0.0.1 (real zeroconf)."""
    with fake_zpl_printer() as fake:
        zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        info = ServiceInfo("_pdl-datastream._tcp.local.",
                           "Test Zebra ZT411._pdl-datastream._tcp.local.",
                           addresses=[socket.inet_aton("127.0.0.1")], port=fake.port,
                           server="test-zt411.local.",
                           properties={"ty": "Zebra ZT411", "note": "packaging room"})
        zc.register_service(info)
        try:
            yield fake
        finally:
            zc.unregister_service(info)
            zc.close()


def test_discovery_lists_an_advertised_printer_in_status(
        tmp_path: Path, advertised_zebra: FakePrinter) -> None:
    """A printer advertised over mDNS shows in devices() and /v1/status, matched to its entry."""
    s = PrintSite(tmp_path, [label_entry(advertised_zebra.url)],
                  api={"advertise": True, "advertise_interfaces": ["127.0.0.1"]})
    try:
        found = wait_for(lambda: [d for d in s.service.devices() if d.get("discovered")],
                         what="the advertised printer")
        assert found[0] | {"txt": None} == {
            "id": "mdns:Test Zebra ZT411", "type": "network_printer", "discovered": True,
            "state": "discovered", "configured_as": "packaging-zebra",
            "name": "Test Zebra ZT411", "service": "_pdl-datastream._tcp", "protocol": "raw",
            "host": "127.0.0.1", "port": advertised_zebra.port, "server": "test-zt411.local.",
            "url": advertised_zebra.url, "model": "Zebra ZT411", "txt": None}
        status = s.client.get("/v1/status", headers=AUTH).json()
        assert any(d.get("discovered") for d in status["devices"])
        text = s.client.get("/metrics", headers=AUTH).text
        assert metric_value(text, "edge_printers_discovered") == 1
    finally:
        s.close()


def test_edge_agent_devices_lists_configured_and_found_printers(
        tmp_path: Path, advertised_zebra: FakePrinter, capsys: pytest.CaptureFixture[str]
) -> None:
    """edge-agent devices --json: the config's devices, then the printer found on 127.0.0.1."""
    config = tmp_path / "agent.toml"
    write_toml(config, {"site": {"id": SITE},
                        "api": {"advertise_interfaces": ["127.0.0.1"]},
                        "devices": [label_entry(advertised_zebra.url)]})
    assert cli.main(["devices", "--config", str(config), "--seconds", "1.5", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["configured"] == [{"id": "packaging-zebra", "type": "label_printer",
                                      "url": advertised_zebra.url, "enabled": True}]
    found = [d for d in listing["discovered"] if d["name"] == "Test Zebra ZT411"]
    assert found and found[0]["configured_as"] == "packaging-zebra"
    assert (found[0]["host"], found[0]["port"]) == ("127.0.0.1", advertised_zebra.port)


def test_finished_print_jobs_are_forgotten_beyond_the_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job store keeps the last DONE_KEPT finished jobs, pruned as jobs finish."""
    monkeypatch.setattr(print_jobs, "DONE_KEPT", 3)
    monkeypatch.setattr(print_jobs, "PRUNE_EVERY", 2)
    store = print_jobs.PrintJobStore(tmp_path)
    try:
        for i in range(6):
            store.add(job_id=f"j{i}", printer="p", kind="receipt", owner="pos", source="pos",
                      ref={}, digest=None, summary="", data=b"x", expires_at=time.time() + 60)
            store.finish(f"j{i}", {"outcome": "printed", "attempts": 1})
        assert [store.get(f"j{i}") is not None for i in range(6)] == [False] * 3 + [True] * 3
        last = store.get("j5")
        assert last is not None and last.done and last.data is None
    finally:
        store.close()


def test_print_routes_check_requests_as_the_events_route_does(site: PrintSite) -> None:
    """One copy of the request checks: +json is JSON, a bad Idempotency-Key and a wrong
    Content-Type get the events route's answer, word for word."""
    content = json.dumps({"sale": SALE})
    r = site.client.post("/v1/print/receipt", content=content,
                         headers={**AUTH, "Content-Type": "application/vnd.pos+json"})
    assert r.status_code == 200, r.text
    for headers in ({"Content-Type": "text/plain"},
                    {"Content-Type": "application/json", "Idempotency-Key": " padded"}):
        printed = site.client.post("/v1/print/receipt", content=content,
                                   headers={**AUTH, **headers})
        event = site.client.post("/v1/events/sale", content=json.dumps({"data": {}}),
                                 headers={**AUTH, **headers})
        assert printed.status_code == event.status_code in (400, 415)
        assert printed.json() == event.json()
