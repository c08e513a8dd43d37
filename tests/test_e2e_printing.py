"""End to end (issue 4 acceptance): the real edge-agent and HQ, a fake ESC/POS printer on TCP.

A sale posted to the real ``edge-agent run``, its receipt printed on the fake
printer; paper out makes the next receipt 503 and a ``print`` event with the
fault reaches HQ (the real ``edge-agent hq`` over a private mosquitto); paper
back prints the held receipt, once, and HQ hears that too. Then an HQ command
over MQTT prints a receipt, answered once per command id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.testing.localsite import LocalSite
from drivers.printer import ReceiptOptions, render_receipt
from tests.conftest import wait_for
from tests.printer_fakes import RECEIPT_OPTIONS, SALE, FakePrinter, fake_escpos_printer

pytestmark = pytest.mark.e2e

DEVICE = "counter-1-receipt"
HQ_WAIT_S = 30.0


def sale(number: str) -> dict[str, Any]:
    return {**SALE, "receipt_number": number}


def receipt_bytes(number: str) -> bytes:
    # The agent's header comes from site.name, which LocalSite sets to "Denver Flagship".
    return render_receipt(sale(number), ReceiptOptions(**RECEIPT_OPTIONS))


@pytest.fixture
def printer() -> Iterator[FakePrinter]:
    with fake_escpos_printer() as fake:
        yield fake


@pytest.fixture
def site(tmp_path: Path, printer: FakePrinter) -> Iterator[LocalSite]:
    options = {k: v for k, v in RECEIPT_OPTIONS.items() if k != "site_name"}
    s = LocalSite(tmp_path / "site", devices=[{
        "id": DEVICE, "type": "receipt_printer", "url": printer.url, **options,
        "retry_interval_s": 0.2, "status_timeout_s": 0.5, "status_interval_s": 0.5}])
    try:
        s.start()
        yield s
    finally:
        s.stop()


class HqCommander:
    """HQ's side of P/commands and P/command-results; paho driven from this thread only."""

    def __init__(self, site: LocalSite) -> None:
        assert site.broker is not None
        self.root = f"edge/{site.site_id}"
        self.results: list[dict[str, Any]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hq-commander",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, msg: self.results.append(json.loads(msg.payload))
        self.client.connect("127.0.0.1", site.broker.port, 10)
        subscribed: list[bool] = []
        self.client.on_subscribe = lambda *a: subscribed.append(True)
        self.client.subscribe(f"{self.root}/command-results", qos=1)
        self.pump_until(lambda: subscribed, "SUBACK")

    def pump_until(self, predicate: Any, what: str, timeout: float = HQ_WAIT_S) -> Any:
        def step() -> Any:
            self.client.loop(timeout=0.05)
            return predicate()
        return wait_for(step, timeout, interval=0, what=what)

    def send(self, name: str, command_id: str, args: dict[str, Any]) -> None:
        info = self.client.publish(f"{self.root}/commands/{name}",
                                   json.dumps({"id": command_id, "args": args}), qos=1)
        self.pump_until(info.is_published, f"PUBACK for {command_id}")

    def close(self) -> None:
        self.client.disconnect()


def hq_print(site: LocalSite, job_id: str, outcome: str) -> list[dict[str, Any]]:
    return [e["data"] for e in site.hq_events("print")
            if e["data"]["job_id"] == job_id and e["data"]["outcome"] == outcome]


def test_sale_receipt_paper_out_503_reaches_hq_and_recovery_prints_the_held_job(
        site: LocalSite, printer: FakePrinter) -> None:
    """Issue 4 acceptance, on the real processes: printed, 503 on paper out, HQ told, recovered."""
    assert site.request("POST", "/v1/events/sale", {"data": sale("R-000201")})[0] == 202
    status, body = site.request("POST", "/v1/print/receipt", {"sale": sale("R-000201")})
    assert (status, body["outcome"], body["printer"]) == (200, "printed", DEVICE), body
    assert printer.printed == [receipt_bytes("R-000201")]

    printer.set_state("paper_out")
    assert site.request("POST", "/v1/events/sale", {"data": sale("R-000202")})[0] == 202
    status, body = site.request("POST", "/v1/print/receipt", {"sale": sale("R-000202")})
    assert status == 503, body
    assert body["reason"] == "paper_out" and body["error"].startswith(f"{DEVICE}: paper out")
    job_id = body["job"]["job_id"]
    held = wait_for(lambda: hq_print(site, job_id, "held"), HQ_WAIT_S, what="held event at HQ")
    assert (held[0]["fault"], held[0]["receipt_number"], held[0]["device"]) == (
        "paper_out", "R-000202", DEVICE)
    assert printer.printed == [receipt_bytes("R-000201")]

    printer.set_state("ok")
    wait_for(lambda: hq_print(site, job_id, "printed"), HQ_WAIT_S, what="printed event at HQ")
    assert printer.printed == [receipt_bytes("R-000201"), receipt_bytes("R-000202")]
    # Other kinds travel on their own topics: poll for them rather than expect
    # them to have arrived with the print event.
    wait_for(lambda: any(e["data"]["device"] == DEVICE and e["data"].get("raised") == ["paper_out"]
                         for e in site.hq_events("device")), HQ_WAIT_S,
             what="the paper_out device event at HQ")
    wait_for(lambda: [s["data"]["receipt_number"] for s in site.hq_events("sale")] == [
        "R-000201", "R-000202"], HQ_WAIT_S, what="both sales at HQ")

    def recovered() -> dict[str, Any] | None:
        report = site.request("GET", "/v1/status")[1]
        entry = next(d for d in report["devices"] if d["id"] == DEVICE)
        return entry if entry["state"] == "up" else None

    entry = wait_for(recovered, HQ_WAIT_S, what="the printer back up in status")
    assert (entry["faults"], entry["jobs"]["printed"]) == ({"paper_out": 1}, 2)

    hq = HqCommander(site)
    try:
        hq.send("print-receipt", "hq-cmd-1", {"sale": sale("R-000203")})
        hq.pump_until(lambda: hq.results, "the command's result")
        hq.send("print-receipt", "hq-cmd-1", {"sale": sale("R-000203")})  # HQ resends
        hq.pump_until(lambda: len(hq.results) == 2, "the replayed result")
    finally:
        hq.close()
    assert hq.results[0] == hq.results[1]
    assert hq.results[0]["ok"] and hq.results[0]["result"]["job_id"] == "hq-cmd-1"
    assert printer.printed[2:] == [receipt_bytes("R-000203")]
    wait_for(lambda: hq_print(site, "hq-cmd-1", "printed"), HQ_WAIT_S, what="command's event")
