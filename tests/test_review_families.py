"""Regressions found reviewing the device families: each pins one defect that was fixed."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

import agent.devices.discovery as discovery
import agent.pipeline.alarms as climate_alarms
from tests.conftest import wait_for
from tests.printer_fakes import (
    LABEL,
    SALE,
    FakePrinter,
    fake_escpos_printer,
    fake_zpl_printer,
)
from tests.test_climate import T0, WARM_ROOM, Agent, Clock, _alarms, _tick
from tests.test_printing import AUTH, PrintSite, label_entry, receipt_entry


@pytest.fixture
def climate_agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for agent in made:
        agent.close()


def test_climate_alarm_file_is_fsynced_off_the_event_loop(
        tmp_path: Path, climate_agents: list[Agent], monkeypatch: pytest.MonkeyPatch) -> None:
    """Recording a committed climate alarm (write + fsync of its file) never blocks the loop."""
    real_fsync = os.fsync
    on_loop: list[str] = []

    def fsync(fd: int) -> None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = "?"
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            if climate_alarms.ALARMS_FILE.split(".")[0] in path:
                on_loop.append(path)
        real_fsync(fd)

    monkeypatch.setattr(climate_alarms.os, "fsync", fsync)
    clock = Clock(T0)
    agent = Agent(tmp_path, [], [WARM_ROOM], clock=clock)
    climate_agents.append(agent)
    _tick(agent, clock, 60, 25.0)
    _tick(agent, clock, 400, 28.0)
    assert _alarms(agent) == [("climate_temperature_high", "raised")]
    assert "climate_temperature_high" in (tmp_path / climate_alarms.ALARMS_FILE).read_text()
    assert on_loop == []


@pytest.fixture
def zpl_out() -> Iterator[FakePrinter]:
    with fake_zpl_printer("paper_out") as fake:
        yield fake


def test_a_repeated_idempotency_key_with_another_label_keeps_the_printed_labels_tag(
        tmp_path: Path, zpl_out: FakePrinter) -> None:
    """The same key with another body is 422 (issue 9) and must not relabel the held job."""
    site = PrintSite(tmp_path, [label_entry(zpl_out.url)])
    try:
        key = {"Idempotency-Key": "label-1"}
        first = site.post("/v1/print/label", LABEL, key)
        assert first.status_code == 503
        job_id = first.json()["job"]["job_id"]
        other = {**LABEL, "package_tag": "1A4FF0100000022000000999"}
        again = site.post("/v1/print/label", other, key)
        assert again.status_code == 422 and again.json()["field"] == "Idempotency-Key"
        same = site.post("/v1/print/label", LABEL, key)
        assert same.status_code == 503 and same.json()["job"]["job_id"] == job_id
        zpl_out.set_state("ok")
        wait_for(lambda: site.client.get(f"/v1/print/jobs/{job_id}", headers=AUTH)
                 .json()["outcome"] == "printed", what="the held label printed")
        events = wait_for(lambda: (e := site.print_events(job_id)) and len(e) == 2 and e,
                          what="both print events")
        assert len(zpl_out.printed) == 1 and LABEL["package_tag"].encode() in zpl_out.printed[0]
        assert [e["package_tag"] for e in events] == [LABEL["package_tag"]] * 2
    finally:
        site.close()


def test_printer_discovery_keeps_at_most_max_found_advertised_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Names advertised on the LAN are attacker-controlled: the browser keeps a bounded list."""
    monkeypatch.setattr(discovery, "MAX_FOUND", 1)
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    infos = [ServiceInfo("_pdl-datastream._tcp.local.",
                         f"Flood {i}._pdl-datastream._tcp.local.",
                         addresses=[socket.inet_aton("127.0.0.1")], port=9100 + i,
                         server=f"flood-{i}.local.") for i in range(3)]
    for info in infos:
        zc.register_service(info, cooperating_responders=True)
    loop = asyncio.new_event_loop()
    browser = discovery.PrinterBrowser(["127.0.0.1"])
    try:
        assert loop.run_until_complete(browser.start())

        def settled() -> bool:
            loop.run_until_complete(asyncio.sleep(0.05))  # let the browser's loop run
            return len(browser.found()) + browser.ignored >= len(infos)

        wait_for(settled, what="every advertised name resolved or ignored")
        assert len(browser.found()) == 1
    finally:
        loop.run_until_complete(browser.close())
        loop.close()
        for info in infos:
            zc.unregister_service(info)
        zc.close()


@pytest.fixture
def print_site(tmp_path: Path) -> Iterator[tuple[PrintSite, FakePrinter]]:
    with fake_escpos_printer() as escpos, fake_zpl_printer() as zpl:
        site = PrintSite(tmp_path, [receipt_entry(escpos.url), label_entry(zpl.url)])
        try:
            yield site, escpos
        finally:
            site.close()


def test_escpos_control_bytes_in_a_sale_are_422_and_never_reach_the_printer(
        print_site: tuple[PrintSite, FakePrinter]) -> None:
    """Sale text carrying ESC/POS commands (here: kick the cash drawer) is refused, not printed."""
    site, escpos = print_site
    kick = "\x1bp0\x19\xfa"  # ESC p m t1 t2: pulse the drawer pin
    lines = [dict(line) for line in SALE["lines"]]
    lines[0]["product"] = f"Blue Dream{kick}"
    r = site.post("/v1/print/receipt", {"sale": {**SALE, "lines": lines}})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "sale.lines.0.product"
    assert escpos.printed == [] and kick.encode("latin-1") not in escpos.received
    assert site.events("print") == []


@pytest.mark.parametrize(("kind", "body", "field"), [
    ("receipt", {"sale": {**SALE, "receipt_number": "R-\x1d1"}}, "sale.receipt_number"),
    ("receipt", {"sale": {**SALE, "register": "pos\r2"}}, "sale.register"),
    ("label", {**LABEL, "product": "Blue\x85Dream"}, "product"),
    ("label", {**LABEL, "strain": "Blue\u2029Dream"}, "strain"),
])
def test_control_characters_in_a_preview_body_are_422_not_500(
        print_site: tuple[PrintSite, FakePrinter], kind: str, body: dict[str, Any],
        field: str) -> None:
    """A preview of text the PNG renderer cannot lay out is a 422 naming the field."""
    site, _ = print_site
    r = site.post(f"/v1/print/{kind}/preview", body)
    assert r.status_code == 422 and r.json()["field"] == field
