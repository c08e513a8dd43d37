"""Metrc end to end (issue 13 acceptance): a real mosquitto, a real ``edge-agent`` taking
sales on its API, real ``edge-agent hq`` processes with ``[metrc] enabled``, and the
Metrc-shaped test server (tests/metrc_server.py, a loopback HTTP server built from the
public API description in tests/metrc_api/) standing in for the state's Metrc."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from agent.testing.localbroker import free_port
from agent.testing.localsite import LocalSite, Proc, edge_agent_argv, write_toml
from tests.conftest import screenshot_dir, wait_for
from tests.metrc_server import MetrcServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITE = "co-denver-01"
LICENSE = "402R-00001"
TZ = "America/Denver"
VENDOR, USER = "vendor-key-e2e-0123456789", "user-key-e2e-9876543210"
HQ_TOKEN = "hq-operator-token-metrc-0123456789"
CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = screenshot_dir()


def tag(n: int) -> str:
    return f"1A4FF0100000022000{n:06d}"


def sale(n: int, *, package: int | None = None, customer: str = "Consumer") -> dict[str, Any]:
    """A sale made now at the Denver counter (so its deadline is a day away)."""
    sold = datetime.now(ZoneInfo(TZ)).replace(microsecond=0)
    qty, price = f"{1 + n % 3}.5", f"{10 + n}.00"
    body: dict[str, Any] = {
        "receipt_number": f"E2E-{n:05d}", "sold_at": sold.isoformat(),
        "customer_type": customer, "register": "pos-1",
        "lines": [{"package_tag": tag(package if package is not None else n), "quantity": qty,
                   "unit": "Grams", "price": price, "total": price}],
        "total": price}
    if customer == "Patient":
        body["patient_license"] = f"PAT-{n}"
    return body


@dataclass
class MetrcSite:
    site: LocalSite
    server: MetrcServer
    root: Path
    hqs: list[Proc] = field(default_factory=list)

    def hq_config(self, name: str = "hq", http_port: int = 0, **metrc: Any) -> Path:
        assert self.site.broker is not None
        (self.root / "vendor.key").write_text(VENDOR + "\n")
        (self.root / "user.key").write_text(USER + "\n")
        path = self.root / f"{name}.toml"
        write_toml(path, {
            "mqtt": {"hosts": ["127.0.0.1"], "port": self.site.broker.port, "tls": False,
                     "keepalive_s": 5, "backoff_min_s": 0.1, "backoff_max_s": 1.0},
            "hq": {"store": f"sqlite:///{self.root}/hq/hq.db", "http_port": http_port,
                   "tokens_file": str(self.tokens()),
                   "master_key_file": str(self.site.workdir / "hq-master.key")},
            "compliance": {"report_within_h": 24},
            "metrc": {"enabled": True, "base_url": self.server.base_url,
                      "vendor_key_file": str(self.root / "vendor.key"),
                      "user_key_file": str(self.root / "user.key"), "kinds": ["sale", "plant"],
                      "timeout_s": 1.0, "lease_s": 3.0, "backoff_min_s": 0.1,
                      "backoff_max_s": 0.5, "poll_interval_s": 0.1,
                      "catalog_sync_interval_s": 0, **metrc},
            "hq.sites": [{"id": SITE, "name": "Denver Flagship", "state": "CO",
                          "license_number": LICENSE, "timezone": TZ}],
        })
        return path

    def tokens(self) -> Path:
        path = self.root / "hq-tokens"
        path.write_text(f"ops {HQ_TOKEN}\n", encoding="utf-8")
        path.chmod(0o600)
        return path

    def start_hq(self, config: Path, name: str = "hq") -> Proc:
        proc = Proc([*edge_agent_argv(), "hq", "--config", str(config)],
                    str(self.root / f"{name}.log")).start()
        self.hqs.append(proc)
        wait_for(lambda: "metrc: forwarding" in Path(proc.log_path).read_text(), 20, 0.1,
                 what=f"{name}'s Metrc forwarder started")
        return proc

    def cli(self, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*edge_agent_argv(), "hq", "metrc", *args, "--config",
                               str(config)], capture_output=True, text=True, timeout=60,
                              check=False)

    def status(self, config: Path) -> tuple[int, dict[str, Any]]:
        done = self.cli(config, "status", "--json")
        assert done.returncode in (0, 1), done.stderr
        return done.returncode, {s["site"]: s for s in json.loads(done.stdout)["sites"]}

    def sell(self, *sales: dict[str, Any]) -> None:
        for body in sales:
            code, answer = self.site.request("POST", "/v1/events/sale", {"data": body})
            assert code == 202, answer

    def reported(self, config: Path, n: int) -> bool:
        _, rows = self.status(config)
        return rows.get(SITE, {}).get("reported") == n


@pytest.fixture
def metrc(tmp_path: Path) -> Iterator[MetrcSite]:
    server = MetrcServer(VENDOR, USER).start()
    site = LocalSite(tmp_path / "site", site_id=SITE, proof_keys=True)
    env = MetrcSite(site, server, tmp_path)
    try:
        site.start_broker()
        site.write_configs()
        site.start_agent()
        yield env
    finally:
        for proc in env.hqs:
            proc.terminate()
        if site.agent is not None:
            site.agent.terminate()
        if site.broker is not None:
            site.broker.stop()
        server.stop()


def test_sales_become_one_receipt_each_through_500_429_and_slow(metrc: MetrcSite) -> None:
    """12 sales with known packages are 12 receipts at the server through a 500, a 429 and
    an answer slower than the timeout; each receipt's fields match the sale."""
    server = metrc.server
    sales = [sale(n, customer="Patient" if n == 3 else "Consumer") for n in range(1, 13)]
    server.add_packages(LICENSE, *(tag(n) for n in range(1, 13)))
    server.inject("500", method="POST")
    server.inject("429", method="POST", retry_after="1")
    server.inject("slow", method="POST", delay_s=2.0)
    config = metrc.hq_config(batch_size=5)
    metrc.start_hq(config)
    metrc.sell(*sales)
    wait_for(lambda: metrc.reported(config, 12), 60, 0.5, what="12 sales reported")
    assert server.receipts_by_number() == {s["receipt_number"]: 1 for s in sales}
    statuses = server.status_counts()
    assert statuses.get(500) == 1 and statuses.get(429) == 1
    by_number = {r["ExternalReceiptNumber"]: r for r in server.receipts}
    for s in sales:
        got = by_number[s["receipt_number"]]
        local = datetime.fromisoformat(s["sold_at"]).strftime("%Y-%m-%dT%H:%M:%S.000")
        assert got["SalesDateTime"] == local            # the facility's time, no zone
        assert got["SalesCustomerType"] == s["customer_type"]
        assert got["PatientLicenseNumber"] == s.get("patient_license")
        (tx,) = got["Transactions"]
        line = s["lines"][0]
        assert tx["PackageLabel"] == line["package_tag"]
        assert tx["Quantity"] == float(line["quantity"])
        assert tx["UnitOfMeasure"] == "Grams"
        assert tx["TotalAmount"] == float(line["total"]) == tx["Price"]
    code, rows = metrc.status(config)
    assert code == 0
    assert (rows[SITE]["pending"], rows[SITE]["overdue"], rows[SITE]["failed"]) == (0, 0, [])
    assert rows[SITE]["license_number"] == LICENSE


def test_unknown_package_fails_with_metrcs_message_then_retry_reports_it(
        metrc: MetrcSite) -> None:
    """A sale of a package Metrc does not know is failed with the server's message (status
    exit 1) and does not hold back the others; once the package exists, retry reports it."""
    server = metrc.server
    server.add_packages(LICENSE, tag(21), tag(22), tag(24))
    port = free_port()
    config = metrc.hq_config(http_port=port)
    metrc.start_hq(config)
    metrc.sell(sale(21), sale(22), sale(23), sale(24))

    def failed() -> dict[str, Any] | None:
        code, rows = metrc.status(config)
        row = rows.get(SITE, {})
        return row if code == 1 and row.get("failed") and row.get("reported") == 3 else None

    row = wait_for(failed, 60, 0.5, what="one failed, three reported")
    (failure,) = row["failed"]
    assert failure["receipt_number"] == "E2E-00023" and failure["kind"] == "sale"
    assert f"Package {tag(23)} is not active or not found" in failure["error"]
    assert failure["attempts"] >= 1 and failure["since"]
    text = metrc.cli(config, "status")
    assert text.returncode == 1 and "E2E-00023" in text.stdout
    page_shows_the_failure(f"http://127.0.0.1:{port}", tag(23))
    server.add_packages(LICENSE, tag(23))
    done = metrc.cli(config, "retry", "--site", SITE, "--failed", "--wait", "30")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reported" in done.stdout
    code, rows = metrc.status(config)
    assert code == 0 and rows[SITE]["reported"] == 4
    assert server.receipts_by_number()["E2E-00023"] == 1
    again = metrc.cli(config, "retry", "--event", failure["event_id"])
    assert again.returncode == 1 and "nothing to retry" in again.stderr


def test_two_receivers_post_nothing_twice(metrc: MetrcSite) -> None:
    """Two ``edge-agent hq`` processes on one store and broker: 30 sales, 30 receipts."""
    server = metrc.server
    server.latency_s = 0.05
    server.add_packages(LICENSE, *(tag(n) for n in range(31, 61)))
    config_a = metrc.hq_config("hq-a", batch_size=2)
    config_b = metrc.hq_config("hq-b", batch_size=2)
    metrc.start_hq(config_a, "hq-a")
    metrc.start_hq(config_b, "hq-b")
    metrc.sell(*(sale(n) for n in range(31, 61)))
    wait_for(lambda: metrc.reported(config_a, 30), 60, 0.5, what="30 sales reported")
    assert server.receipts_by_number() == {f"E2E-{n:05d}": 1 for n in range(31, 61)}
    assert all(p.alive for p in metrc.hqs)


def test_hq_killed_mid_batch_posts_nothing_twice(metrc: MetrcSite) -> None:
    """SIGKILL of ``edge-agent hq`` while Metrc holds its POST: the restarted HQ looks the
    receipts up by external number and reports them without posting them again."""
    server = metrc.server
    server.add_packages(LICENSE, *(tag(n) for n in range(61, 69)))
    server.inject("slow", method="POST", delay_s=20.0)
    config = metrc.hq_config(timeout_s=8.0, lease_s=17.0, batch_size=10)
    hq = metrc.start_hq(config)
    metrc.sell(*(sale(n) for n in range(61, 69)))
    wait_for(lambda: len(server.receipts) == 8, 30, 0.1, what="the batch at the server")
    hq.kill()
    assert server.receipts_by_number() == {f"E2E-{n:05d}": 1 for n in range(61, 69)}
    held = len(next(c for c in server.calls if c.method == "POST").body)  # the slow POST
    config = metrc.hq_config(timeout_s=1.0, lease_s=3.0)   # the old lease (17 s) still holds
    metrc.start_hq(config, "hq-2")
    wait_for(lambda: metrc.reported(config, 8), 90, 0.5, what="8 reported after the restart")
    assert server.receipts_by_number() == {f"E2E-{n:05d}": 1 for n in range(61, 69)}
    lookups = [c for c in server.calls if c.path.startswith("/sales/v2/receipts/external/")]
    assert len(lookups) == held and all(c.status == 200 for c in lookups)


def test_catalog_sync_adds_and_removes_tags_at_the_site(metrc: MetrcSite) -> None:
    """HQ pages through Metrc's active packages and makes the site's catalog follow: first
    exactly Metrc's list, then a removed package leaves and a new one arrives."""
    server = metrc.server
    first = [tag(n) for n in range(100, 125)]   # more than one page of 20
    server.add_packages(LICENSE, *first)
    catalog = metrc.site.outbox_path.parent / "catalog.sqlite"

    def tags() -> set[str]:
        if not catalog.exists():
            return set()
        con = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)
        try:
            return {r[0] for r in con.execute("SELECT tag FROM tags")}
        except sqlite3.OperationalError:
            return set()
        finally:
            con.close()

    config = metrc.hq_config(catalog_sync_interval_s=1.0, command_timeout_s=10.0)
    metrc.start_hq(config)
    wait_for(lambda: tags() == set(first), 60, 0.5, what="the first catalog at the site")
    server.remove_packages(LICENSE, first[0], first[1])
    server.add_packages(LICENSE, tag(200))
    want = set(first[2:]) | {tag(200)}
    wait_for(lambda: tags() == want, 60, 0.5, what="the catalog following Metrc")


def page_shows_the_failure(http: str, package: str) -> None:
    """The HQ page in Debian's Chromium: the site's Metrc card lists today's sales at HQ,
    reported, failed with Metrc's message; the fleet card says Metrc failed."""
    from playwright.sync_api import expect, sync_playwright

    from tests.test_e2e_fleet import CHROMIUM_ARGS, LAPTOP

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport=LAPTOP).new_page()
            page.goto(http + "/")
            page.fill("#signin-token", HQ_TOKEN)
            page.click("#signin-form button[type=submit]")
            card = page.locator(f".site-card[data-site='{SITE}']")
            expect(card).to_contain_text("Metrc: 1 failed")
            card.click()
            today = datetime.now(ZoneInfo(TZ)).date().isoformat()
            row = page.locator(f"#site-metrc tr[data-day='{today}']")
            expect(row).to_contain_text(today)
            cells = row.locator("td")
            expect(cells.nth(1)).to_have_text("4")    # sales at HQ
            expect(cells.nth(2)).to_have_text("3")    # reported
            expect(cells.nth(4)).to_have_text("1")    # failed
            expect(page.locator("#site-metrc-failed")).to_contain_text(
                f"Package {package} is not active or not found")
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "hq-metrc-laptop.png"), full_page=True)
        finally:
            browser.close()
