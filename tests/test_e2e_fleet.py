"""The fleet end to end (issue 12 acceptance): a real mosquitto, a real ``edge-agent hq``
with registered sites, two real ``edge-agent`` sites; ``hq fleet``, ``hq send`` and the
HQ page in Debian's Chromium (Playwright), with the README's screenshots.

Chromium is the system one (/usr/bin/chromium, installed by tools/bootstrap.sh).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from agent.testing.localbroker import free_port
from agent.testing.localpg import PgServer
from agent.testing.localsite import LocalSite, Proc, edge_agent_argv, sample_sale, write_toml
from tests.conftest import screenshot_dir, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = screenshot_dir()
LAPTOP = {"width": 1366, "height": 860}
PHONE = {"width": 390, "height": 844}
HQ_TOKEN = "hq-operator-token-e2e-0123456789"
TAGS = ["1A4FF0100000022000000901", "1A4FF0100000022000000902"]


@dataclass
class Fleet:
    denver: LocalSite
    boulder: LocalSite
    hq: Proc
    hq_config: Path
    http: str

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*edge_agent_argv(), "hq", *args, "--config", str(self.hq_config)],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def sales_stored(self, site: str) -> int:
        request = urllib.request.Request(  # noqa: S310 - loopback
            f"{self.http}/v1/sites/{site}",
            headers={"Authorization": f"Bearer {HQ_TOKEN}"})
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            kinds = json.load(response)["kinds"]
        return sum(int(k["received"]) for k in kinds if k["kind"] == "sale")

    def fleet(self) -> tuple[int, dict[str, dict[str, Any]]]:
        done = self.cli("fleet", "--json")
        assert done.returncode in (0, 1), done.stderr
        return done.returncode, {r["site"]: r for r in json.loads(done.stdout)["sites"]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    with _fleet(root, f"sqlite:///{root}/hq/hq.db") as running:
        yield running


@pytest.fixture(scope="module")
def pg_fleet(tmp_path_factory: pytest.TempPathFactory, pg_server: PgServer) -> Iterator[Fleet]:
    """The same fleet with its HQ on the suite's private PostgreSQL."""
    root = tmp_path_factory.mktemp("pg-fleet")
    with _fleet(root, pg_server.create_database(f"fleet_{os.getpid()}")) as running:
        yield running


@contextmanager
def _fleet(root: Path, store: str) -> Iterator[Fleet]:
    denver = LocalSite(root / "denver", site_id="co-denver-01")
    boulder = LocalSite(root / "boulder", site_id="co-boulder-02")
    hq: Proc | None = None
    try:
        broker = denver.start_broker()
        boulder.broker = broker
        for site in (denver, boulder):
            site.write_configs()
        tokens = root / "hq-tokens"
        tokens.write_text(f"ops {HQ_TOKEN}\n", encoding="utf-8")
        tokens.chmod(0o600)
        port = free_port()
        config = root / "hq.toml"
        write_toml(config, {
            "mqtt": {"hosts": ["127.0.0.1"], "port": broker.port, "tls": False,
                     "keepalive_s": 5, "backoff_min_s": 0.1, "backoff_max_s": 1.0},
            "hq": {"store": store, "http_port": port,
                   "tokens_file": str(tokens)},
            "compliance": {"report_within_h": 24},
            "hq.sites": [
                {"id": "co-denver-01", "name": "Denver Flagship", "state": "CO",
                 "license_number": "402R-00001", "timezone": "America/Denver"},
                {"id": "co-boulder-02", "name": "Boulder Pearl St", "state": "CO",
                 "license_number": "402R-00002", "timezone": "America/Denver"},
                {"id": "wa-spokane-03", "name": "Spokane North", "state": "WA",
                 "license_number": "412345", "timezone": "America/Los_Angeles"},
            ],
        })
        hq = Proc([*edge_agent_argv(), "hq", "--config", str(config)],
                  str(root / "hq.log")).start()
        http = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(f"{http}/healthz") == 200, 20, 0.1, what="the HQ page")
        denver.start_agent()
        boulder.start_agent()
        for n in range(1, 4):  # every test sees Denver's three sales, whichever runs alone
            assert denver.request("POST", "/v1/events/sale", {"data": sample_sale(n)})[0] == 202
        yield Fleet(denver, boulder, hq, config, http)
    finally:
        for site in (denver, boulder):
            if site.agent is not None:
                site.agent.terminate()
        if hq is not None:
            hq.terminate()
        if denver.broker is not None:
            denver.broker.stop()


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
            return int(response.status)
    except (urllib.error.URLError, OSError):
        return 0


def test_hq_fleet_online_never_seen_and_send_catalog_put(fleet: Fleet) -> None:
    """hq fleet: running sites online, the unheard registered one never-seen (exit 1);
    hq send catalog-put reaches the site's catalog and prints its result (exit 0)."""
    _fleet_and_send(fleet)


def test_hq_fleet_send_and_offline_on_postgresql(pg_fleet: Fleet) -> None:
    """On a PostgreSQL store: online, never-seen (exit 1), catalog-put delivered, and a
    stopped agent offline within 30 s."""
    _fleet_and_send(pg_fleet)
    assert pg_fleet.boulder.agent is not None
    pg_fleet.boulder.agent.terminate()
    wait_for(lambda: pg_fleet.fleet()[1]["co-boulder-02"]["status"] == "offline", 30, 0.5,
             what="the stopped agent offline in hq fleet within 30 s")
    code, rows = pg_fleet.fleet()
    assert code == 1 and rows["co-denver-01"]["status"] == "online"


def _fleet_and_send(fleet: Fleet) -> None:
    def both_online() -> dict[str, dict[str, Any]] | None:
        code, rows = fleet.fleet()
        ok = all(rows.get(s, {}).get("status") == "online"
                 for s in ("co-denver-01", "co-boulder-02"))
        return rows if ok and code == 1 else None

    rows = wait_for(both_online, 30, 0.5, what="both sites online in hq fleet")
    assert rows["wa-spokane-03"]["status"] == "never-seen"
    assert rows["co-denver-01"]["state"] == "CO" and rows["co-denver-01"]["version"]
    assert set(rows["co-denver-01"]) >= {"site", "name", "state", "status", "last_seen",
                                         "version", "backlog", "oldest_unsent_s",
                                         "devices_down", "alarms"}

    done = fleet.cli("send", "catalog-put", "--site", "co-denver-01", "--args",
                     json.dumps({"tags": TAGS}))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is True and result["result"]["added"] == 2
    catalog = fleet.denver.outbox_path.parent / "catalog.sqlite"
    con = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)
    try:
        assert {r[0] for r in con.execute("SELECT tag FROM tags")} == set(TAGS)
    finally:
        con.close()
    bad = fleet.cli("send", "catalog-put", "--site", "co-denver-01", "--args",
                    '{"tags": ["not-a-tag"]}')
    assert bad.returncode == 1 and json.loads(bad.stdout)["ok"] is False


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


def test_hq_page_fleet_by_risk_and_site_detail(fleet: Fleet, browser: Browser) -> None:
    """The HQ page in Chromium: sign in, the fleet sorted by risk (offline first), a site's
    detail; screenshots at laptop and phone widths; a stopped agent goes offline in 30 s."""
    assert fleet.boulder.agent is not None
    fleet.boulder.agent.terminate()  # a clean stop: the agent says offline itself
    wait_for(lambda: fleet.fleet()[1]["co-boulder-02"]["status"] == "offline", 30, 0.5,
             what="the stopped agent offline in hq fleet within 30 s")
    wait_for(lambda: fleet.sales_stored("co-denver-01") == 3, 20, 0.2,
             what="Denver's three sales stored at HQ")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name, viewport in (("laptop", LAPTOP), ("phone", PHONE)):
        context = browser.new_context(viewport=viewport)
        try:
            page = context.new_page()
            page.goto(fleet.http + "/")
            page.fill("#signin-token", "wrong-token-0123456789")
            page.click("#signin-form button[type=submit]")
            expect(page.locator("#signin-error")).to_contain_text("unknown token")
            page.fill("#signin-token", HQ_TOKEN)
            page.click("#signin-form button[type=submit]")
            cards = page.locator(".site-card")
            expect(cards).to_have_count(3)
            # Offline first, then the registered site never heard from, then the online one.
            expect(cards.nth(0)).to_have_attribute("data-site", "co-boulder-02")
            expect(cards.nth(0)).to_contain_text("offline")
            expect(cards.nth(1)).to_have_attribute("data-site", "wa-spokane-03")
            expect(cards.nth(1)).to_contain_text("never-seen")
            expect(cards.nth(2)).to_contain_text("online")
            expect(page.locator("#fleet-pill")).to_have_text("1 of 3 online")
            page.screenshot(path=str(SCREENSHOTS / f"hq-fleet-{name}.png"), full_page=True)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport["width"], f"{name}: the page scrolls sideways ({width}px)"
            cards.nth(2).click()
            expect(page.locator("#h-site")).to_contain_text("Denver Flagship")
            expect(page.locator("#site-kinds")).to_contain_text("sale")
            expect(page.locator("#site-facts")).to_contain_text("402R-00001")
            page.screenshot(path=str(SCREENSHOTS / f"hq-site-{name}.png"), full_page=True)
        finally:
            context.close()
