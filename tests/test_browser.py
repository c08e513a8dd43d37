"""The site page in a real browser (issue 6 acceptance): Debian's Chromium, headless,
driven by Playwright, against the real edge-agent, HQ receiver and mosquitto.

Chromium is the system one (/usr/bin/chromium, installed by tools/bootstrap.sh);
Playwright's own browser download is never used. The tests write the README's
screenshots into docs/screenshots/.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from agent.testing.localsite import LocalSite, sample_sale
from hq.command import send_command
from tests.conftest import screenshot_dir, wait_for
from tests.printer_fakes import LABEL, LABEL_OPTIONS, fake_zpl_printer

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
# What this machine's Chromium needs headless as root, and no background traffic
# to Google's hosts (the network is closed; each attempt would be refused).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = screenshot_dir()
TABLET = {"width": 1280, "height": 800}     # a 10-inch tablet, landscape
GOOD_TAG = "1A4FF0200000022000000456"
KNOWN_PACKAGE = "1A4FF0100000022000000777"
UNKNOWN_PACKAGE = "1A4FF0100000022000000888"
# The simulated room runs hot (30.5 C day and night) against a 20-28 C band: the
# temperature alarm is raised after 2 s, for the Rooms and Alarms views to show.
ROOM: dict[str, Any] = {
    "name": "Flower 2", "stage": "flower", "lights_on": "00:00", "alarm_delay_s": 2,
    "bands": {"temperature_c": {"on": [20, 28]}, "rh_pct": {"on": [40, 65]},
              "vpd_kpa": {"on": [0.8, 1.5]}, "co2_ppm": {"on": [800, 1400]}},
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        raise AssertionError(f"{CHROMIUM} missing: run tools/bootstrap.sh (Debian chromium)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[LocalSite]:
    s = LocalSite(tmp_path / "site")
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=TABLET)
    try:
        yield context.new_page()
    finally:
        context.close()


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # clicks scroll; the README shows each view's top
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def sign_in(page: Page, site: LocalSite) -> None:
    page.goto(site.api_url + "/")
    expect(page.locator("#signin-token")).to_be_visible()
    page.fill("#signin-token", site.token)
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#app")).to_be_visible()


def test_sign_in_record_plant_events_and_see_the_hq_outage(site: LocalSite, page: Page) -> None:
    """Sign in; a bad tag is marked, a good one gets a seq and reaches HQ; HQ down: the backlog."""
    page.goto(site.api_url + "/")
    page.fill("#signin-token", "not-the-token-0123456789")
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#signin-error")).to_contain_text("unknown token")
    shot(page, "sign-in")
    sign_in(page, site)
    expect(page.locator("#hq-state")).to_have_text("✔ Connected", timeout=15_000)
    expect(page.locator("#hq-banner")).to_be_hidden()
    expect(page.locator("#state-pill")).to_have_text("Healthy")
    # The cookie is HttpOnly: the page's own script cannot read it.
    assert page.evaluate("document.cookie") == ""
    shot(page, "health")

    page.click("a.tab[data-view=plants]")
    page.fill("#pf-plant_tags", "1A4FF02-BAD")
    page.fill("#pf-room", "Flower 2")
    page.click("#pf-submit")
    error = page.locator("#pf-plant_tags-error")
    expect(error).to_contain_text('Tag 1 "1A4FF02-BAD" is not a plant tag')
    expect(page.locator("#pf-plant_tags")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#pf-room")).not_to_have_attribute("aria-invalid", "true")
    shot(page, "plant-form-error")
    assert site.hq_events("plant") == []

    page.fill("#pf-plant_tags", GOOD_TAG.lower())   # typed in lower case: taken as the tag
    page.click("#pf-submit")
    expect(page.locator("#pf-seq")).to_have_text("seq 1")
    expect(page.locator("#pf-plant_tags")).not_to_have_attribute("aria-invalid", "true")
    expect(page.locator("#pf-plant_tags-error")).to_be_empty()
    stored = wait_for(lambda: site.hq_events("plant"), timeout=15, what="the plant event at HQ")
    assert stored[0]["seq"] == 1 and stored[0]["source"] == "cli"
    assert stored[0]["data"]["plant_tags"] == [GOOD_TAG]
    assert stored[0]["data"]["room"] == "Flower 2"

    # A waste event needs weight, unit and reason: the API names the missing one.
    page.click("#plant-action label:has-text('Waste')")
    page.fill("#pf-plant_tags", GOOD_TAG)
    page.fill("#pf-weight", "12.5")
    page.click("#pf-submit")
    expect(page.locator("#pf-reason-error")).to_contain_text("required when action is waste")
    page.select_option("#pf-reason", "Trim")
    page.click("#pf-submit")
    expect(page.locator("#pf-seq")).to_have_text("seq 2")
    shot(page, "plant-form")

    # HQ goes away; the broker stays up, so only the missing acks tell.
    assert site.hq is not None
    site.hq.terminate()
    status, body = site.request("POST", "/v1/events/sale", {"data": sample_sale(1)})
    assert status == 202, body
    page.click("a.tab[data-view=health]")
    banner = page.locator("#hq-banner")
    expect(banner).to_be_visible(timeout=30_000)
    expect(banner).to_contain_text(
        re.compile(r"HQ unreachable - [1-9]\d* events? waiting to be sent"))
    expect(page.locator("#hq-state")).to_have_text("✖ Unreachable")
    # Plain words for store staff: what it means and what to do, no MQTT jargon.
    expect(banner).to_contain_text("HQ has not confirmed anything for")
    expect(banner).to_contain_text("Keep working")
    expect(banner).not_to_contain_text("broker")
    expect(page.locator("#outbox-table tr.waiting")).to_contain_text("Sales")
    expect(page.locator("#compliance")).to_contain_text("Oldest unsent sale")
    expect(page.locator("#state-pill")).to_have_text("HQ unreachable")
    shot(page, "health-hq-unreachable")
    page.click("a.tab[data-view=alarms]")
    expect(page.locator("#alarms-open")).to_contain_text("HQ unreachable")

    # The site keeps working through the outage: the page still records events.
    page.click("a.tab[data-view=plants]")
    page.click("#plant-action label:has-text('Observation')")
    page.fill("#pf-plant_tags", GOOD_TAG)
    page.fill("#pf-note", "Powdery mildew on lower leaves")
    page.click("#pf-submit")
    expect(page.locator("#pf-seq")).to_have_text("seq 3")
    expect(page.locator("#hq-banner")).to_contain_text("waiting to be sent")

    # HQ back: the backlog drains and the banner goes, without a reload.
    site.start_hq()
    expect(page.locator("#hq-banner")).to_be_hidden(timeout=30_000)
    assert [e["seq"] for e in wait_for(lambda: len(site.hq_events("plant")) == 3
                                       and site.hq_events("plant"), timeout=15,
                                       what="all plant events at HQ")] == [1, 2, 3]
    page.click("a.tab[data-view=alarms]")
    expect(page.locator("#alarms-open")).to_contain_text("No open alarms")


def test_signing_out_returns_to_the_sign_in_form(site: LocalSite, page: Page) -> None:
    """Sign out drops the session; a reload asks for the token again."""
    sign_in(page, site)
    page.click("#signout")
    expect(page.locator("#signin")).to_be_visible()
    page.reload()
    expect(page.locator("#signin-token")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()


def test_rooms_show_readings_against_bands_with_charts(tmp_path: Path, page: Page) -> None:
    """A (simulated) room: values against bands, 24-h charts, and its climate alarm under Alarms."""
    s = LocalSite(tmp_path / "site", devices=[{
        "id": "flower-2-climate", "type": "sensor", "model": "sim", "room": "Flower 2",
        "url": "sim://climate?seed=7&day_c=30.5&night_c=30.5", "interval_s": 1}],
        rooms=[ROOM])
    try:
        s.start()
        sign_in(page, s)
        rooms_tab = page.locator("a.tab[data-view=rooms]")
        expect(rooms_tab).to_be_visible(timeout=10_000)
        wait_for(lambda: any(r["values"].get("temperature_c") is not None
                             for r in s.request("GET", "/v1/rooms")[1]["rooms"]),
                 timeout=20, what="a room value")
        rooms_tab.click()
        card = page.locator(".room").first
        expect(card).to_contain_text("Flower 2", timeout=15_000)
        expect(card.locator(".reading").first).to_contain_text("°C")
        expect(card.locator(".chart svg")).to_have_count(4)
        hot = card.locator(".reading.high", has_text="Temperature")
        expect(hot).to_contain_text("above target", timeout=15_000)
        expect(page.locator("#devices")).to_contain_text("flower-2-climate")
        wait_for(lambda: [e for e in s.hq_events("alarm")
                          if e["data"]["code"] == "climate_temperature_high"],
                 timeout=20, what="the climate alarm at HQ")
        page.reload()  # the room's open alarms are read with the rooms
        page.click("a.tab[data-view=rooms]")
        expect(card).to_contain_text(re.compile(r"\d+ alarms?"), timeout=15_000)
        shot(page, "rooms")
        page.click("a.tab[data-view=alarms]")
        expect(page.locator("#alarms-open")).to_contain_text("Flower 2: climate temperature high")
        expect(page.locator("#alarms-recent")).to_contain_text("climate temperature high")
        shot(page, "alarms")
    finally:
        s.stop()


def test_scans_arrive_live_marked_known_or_unknown(tmp_path: Path, page: Page) -> None:
    """Scans on a (pty) scanner appear live, marked unknown, then known after HQ's catalog-put;
    the rows line up."""
    master, slave = os.openpty()
    s = LocalSite(tmp_path / "site", devices=[{
        "id": "counter-1-scanner", "type": "scanner", "terminator": "cr",
        "url": f"serial://{os.ttyname(slave)}?baudrate=9600"}])
    try:
        s.start()
        assert s.broker is not None
        sign_in(page, s)
        page.click("a.tab[data-view=scans]")
        expect(page.locator("#scan-conn")).to_have_text("live", timeout=10_000)
        os.write(master, f"{UNKNOWN_PACKAGE}\r".encode())
        first = page.locator("#scans li").first
        expect(first).to_contain_text(UNKNOWN_PACKAGE, timeout=10_000)
        expect(first).to_contain_text("unknown package")

        answer = send_command("127.0.0.1", s.broker.port, f"edge/{s.site_id}", "catalog-put",
                              {"tags": [KNOWN_PACKAGE]})
        assert answer["ok"] is True, answer
        os.write(master, f"{KNOWN_PACKAGE}\r".encode())
        expect(first).to_contain_text(KNOWN_PACKAGE, timeout=10_000)
        expect(first).to_contain_text("known package")
        expect(first).to_have_attribute("data-known", "true")
        expect(page.locator("#scans li")).to_have_count(2)
        # The rows line up: every tag starts at the same x, whatever its badge says.
        lefts = page.eval_on_selector_all(
            "#scans li .code", "els => els.map(e => Math.round(e.getBoundingClientRect().left))")
        assert len(lefts) == 2 and len(set(lefts)) == 1, lefts
        badge_rights = page.eval_on_selector_all(
            "#scans li > .badge", "els => els.map(e => e.getBoundingClientRect().right)")
        assert max(badge_rights) <= lefts[0], (badge_rights, lefts)  # no badge over a tag
        shot(page, "scans")

        # A scanned tag fills the plant form ("typed or scanned").
        page.click("a.tab[data-view=plants]")
        page.click("#pf-use-scan")
        expect(page.locator("#pf-plant_tags")).to_have_value(KNOWN_PACKAGE)
    finally:
        s.stop()
        os.close(master)
        os.close(slave)


def test_label_preview_and_print_to_a_fake_printer(tmp_path: Path, page: Page) -> None:
    """Labels: the preview PNG shows, Print prints once on the fake ZPL printer, a fault shows."""
    with fake_zpl_printer() as printer:
        s = LocalSite(tmp_path / "site", devices=[{
            "id": "packaging-zebra", "type": "label_printer", "url": printer.url,
            **LABEL_OPTIONS, "retry_interval_s": 0.1, "status_timeout_s": 0.3,
            "status_interval_s": 0.2}])
        try:
            s.start()
            sign_in(page, s)
            page.click("a.tab[data-view=labels]")
            expect(page.locator("#lf-printer")).to_contain_text("packaging-zebra")
            fill_label(page)
            page.click("#lf-preview")
            preview = page.locator("#lf-preview-img")
            expect(preview).to_be_visible(timeout=10_000)
            assert page.evaluate("document.getElementById('lf-preview-img').naturalWidth") > 100
            assert printer.printed == []        # a preview touches no printer

            page.click("#lf-print")
            result = page.locator("#lf-result")
            expect(result).to_contain_text("Printed on packaging-zebra", timeout=15_000)
            wait_for(lambda: len(printer.printed) == 1, timeout=5, what="the label out")
            assert LABEL["package_tag"].encode() in printer.printed[0]
            shot(page, "labels")

            page.fill("#lf-package_tag", "NOT-A-TAG")
            page.click("#lf-print")
            expect(page.locator("#lf-package_tag")).to_have_attribute("aria-invalid", "true")
            expect(page.locator("#lf-package_tag-error")).not_to_be_empty()

            printer.set_state("head_open")
            fill_label(page)
            page.click("#lf-print")
            expect(result).to_contain_text("Not printed", timeout=15_000)
            expect(result).to_contain_text(re.compile("head", re.I))
            assert len(printer.printed) == 1
        finally:
            s.stop()


def fill_label(page: Page) -> None:
    for name in ("package_tag", "product", "net_weight", "thc_pct", "cbd_pct", "batch"):
        page.fill(f"#lf-{name}", str(LABEL[name]))




def test_a_receipt_printer_only_box_shows_only_its_tabs(tmp_path: Path, page: Page) -> None:
    """A box with just a receipt printer working (its scanner and label printer disabled in
    the config) shows Health, Plants and Alarms; no Scans or Labels tab into a dead end."""
    s = LocalSite(tmp_path / "site", devices=[
        {"id": "counter-1-receipt", "type": "receipt_printer", "url": "sim://receipt"},
        {"id": "counter-1-scanner", "type": "scanner", "url": "sim://scanner",
         "enabled": False},
        {"id": "packaging-zebra", "type": "label_printer", "url": "sim://label",
         "enabled": False}])
    try:
        s.start()
        sign_in(page, s)
        visible = page.locator("a.tab:visible")
        expect(visible).to_have_count(3, timeout=10_000)
        assert [t.strip().split()[0] for t in visible.all_inner_texts()] == \
            ["Health", "Plants", "Alarms"]
        for hidden in ("scans", "rooms", "labels"):
            expect(page.locator(f"a.tab[data-view={hidden}]")).to_be_hidden()
    finally:
        s.stop()
