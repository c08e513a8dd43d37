"""The Metrc forwarder in-process: the real HQ SQLite store, the real httpx client, and
tests/metrc_server.py (a Metrc-shaped HTTP server on loopback, built from the public API
description in tests/metrc_api/) standing in for the state's Metrc."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.envelope import iso_ms
from agent.testing.localsite import sample_sale
from hq.config import HqReceiverConfig
from hq.metrc.client import (
    MetrcClient,
    MetrcRateLimited,
    MetrcRefused,
    MetrcUnavailable,
    Pacer,
    retry_after,
)
from hq.metrc.forwarder import Forwarder, ForwarderError
from hq.metrc.mapping import dumps, local_time, plant_call, receipt
from hq.metrc.reports import SqliteReportStore
from hq.metrc.status import healthy, summarize
from hq.store import SqliteStore
from tests.conftest import FakeClock, wait_for
from tests.metrc_server import MetrcServer

SITE = "co-denver-01"
LICENSE = "402R-00001"
VENDOR, USER = "vendor-key-0123456789abcdef", "user-key-fedcba9876543210"


def envelope(seq: int, data: dict[str, Any], kind: str = "sale", site: str = SITE,
             ts: float = 1_795_000_000.0) -> dict[str, Any]:
    return {"v": 1, "id": str(uuid.uuid4()), "site": site, "kind": kind, "seq": seq,
            "ts": iso_ms(ts), "source": "pos-1", "data": data}


@pytest.fixture
def server() -> Iterator[MetrcServer]:
    s = MetrcServer(VENDOR, USER).start()
    try:
        yield s
    finally:
        s.stop()


def make_cfg(tmp: Path, server: MetrcServer, **metrc: Any) -> HqReceiverConfig:
    (tmp / "vendor.key").write_text(VENDOR + "\n")
    (tmp / "user.key").write_text(USER + "\n")
    return HqReceiverConfig(
        hq={"store": f"sqlite:///{tmp}/hq.db",
            "sites": [{"id": SITE, "name": "Denver", "state": "CO", "license_number": LICENSE,
                       "timezone": "America/Denver"}]},
        compliance={"report_within_h": 24},
        metrc={"enabled": True, "base_url": server.base_url,
               "vendor_key_file": str(tmp / "vendor.key"),
               "user_key_file": str(tmp / "user.key"), "timeout_s": 0.5, "lease_s": 5,
               "backoff_min_s": 0.01, "backoff_max_s": 0.05, "calls_per_s_per_facility": 1000,
               "calls_per_s_per_key": 1000, "catalog_sync_interval_s": 0, **metrc})


class Hq:
    def __init__(self, tmp: Path, server: MetrcServer, clock: FakeClock | None = None,
                 **metrc: Any) -> None:
        self.cfg = make_cfg(tmp, server, **metrc)
        self.events = SqliteStore(str(tmp / "hq.db"))
        self.reports = SqliteReportStore(self.cfg.hq.store)
        self.clock = clock or FakeClock(1_795_000_100.0)
        self.fw = Forwarder(self.cfg, store=self.reports, clock=self.clock)

    def drain(self, limit: int = 200) -> None:
        for _ in range(limit):
            if not self.fw.run_once():
                self.clock.advance(1.0)   # past any backoff
                if not self.fw.run_once():
                    return
        raise AssertionError("the forwarder never ran out of work")

    def state(self) -> dict[str, str]:
        return {r.number or r.event_id: r.state for r in self.reports.reports()}

    def close(self) -> None:
        self.fw.stop(1)
        self.reports.close()
        self.events.close()


@pytest.fixture
def hq(tmp_path: Path, server: MetrcServer) -> Iterator[Hq]:
    h = Hq(tmp_path, server)
    try:
        yield h
    finally:
        h.close()


def sales(n: int, server: MetrcServer, first: int = 1) -> list[dict[str, Any]]:
    out = []
    for i in range(first, first + n):
        sale = sample_sale(i)
        server.add_packages(LICENSE, sale["lines"][0]["package_tag"])
        out.append(envelope(i, sale))
    return out


# -- pure mapping ------------------------------------------------------------------------


def test_local_time_has_no_zone_and_follows_dst() -> None:
    """SalesDateTime is the facility's wall clock without a zone, summer and winter."""
    assert local_time("2026-11-22T17:03:11.250Z", "America/Denver") == "2026-11-22T10:03:11.250"
    assert local_time("2026-07-01T17:03:11+00:00", "America/Denver") == "2026-07-01T11:03:11.000"


def test_receipt_maps_every_field_and_keeps_decimal_digits() -> None:
    """A sale becomes one receipt: number, customer type, patient, lines, prices, one tax."""
    sale = {**sample_sale(7), "customer_type": "Patient", "patient_license": "P-123",
            "taxes": [{"name": "Excise tax", "amount": "5.25"}], "total": "40.25"}
    body = receipt(sale, "America/Denver")
    assert body["SalesDateTime"] == "2026-11-22T10:03:11.000"
    assert body["ExternalReceiptNumber"] == "R-000007"
    assert body["SalesCustomerType"] == "Patient"
    assert body["PatientLicenseNumber"] == "P-123"
    (tx,) = body["Transactions"]
    assert tx == {"PackageLabel": sale["lines"][0]["package_tag"], "Quantity": Decimal("3.5"),
                  "UnitOfMeasure": "Grams", "TotalAmount": Decimal("35.00"),
                  "Price": Decimal("35.00"), "ExciseTax": Decimal("5.25")}
    text = dumps(body).decode()
    assert '"TotalAmount":35.00' in text and '"Quantity":3.5' in text
    assert json.loads(text)["Transactions"][0]["ExciseTax"] == 5.25


def test_plant_actions_map_to_the_v2_calls() -> None:
    """move/waste/harvest/destroy become their v2 calls; observe has none."""
    tags = ["1A4FF0200000022000000456", "1A4FF0200000022000000457"]
    ts = "2026-11-22T05:00:00.000Z"   # still the 21st in Denver
    move = plant_call({"action": "move", "plant_tags": tags, "room": "Flower 2"}, ts,
                      "America/Denver")
    assert move is not None and (move.method, move.path, move.repeatable) == (
        "PUT", "/plants/v2/location", True)
    assert move.body[0] == {"Id": None, "Label": tags[0], "Location": "Flower 2",
                            "ActualDate": "2026-11-21"}
    waste = plant_call({"action": "waste", "plant_tags": tags, "weight": "12.5", "unit": "Grams",
                        "reason": "Trim", "method": "Grinder"}, ts, "UTC")
    assert waste is not None and waste.path == "/plants/v2/waste"
    assert waste.body[0]["PlantLabels"] == tags and waste.body[0]["WasteWeight"] == Decimal("12.5")
    harvest = plant_call({"action": "harvest", "plant_tags": tags, "weight": "10.01",
                          "unit": "Grams"}, ts, "UTC")
    assert harvest is not None and [b["Weight"] for b in harvest.body] == [Decimal("5.00"),
                                                                           Decimal("5.01")]
    destroy = plant_call({"action": "destroy", "plant_tags": tags[:1]}, ts, "UTC")
    assert destroy is not None and (destroy.method, destroy.path) == ("DELETE", "/plants/v2/")
    assert plant_call({"action": "observe", "plant_tags": tags}, ts, "UTC") is None


def test_retry_after_seconds_date_and_cap() -> None:
    """Retry-After in seconds or as an HTTP date, never beyond the cap, never negative."""
    assert retry_after("7", 60) == 7
    assert retry_after("100000", 60) == 60
    assert retry_after("Thu, 01 Jan 2026 00:00:10 GMT", 60, now=1767225600.0) == 10
    assert retry_after("garbage", 60) == 10
    assert retry_after("-5", 60) == 0


# -- the client against the test server -----------------------------------------------------


def client(server: MetrcServer, *, user: str = USER, timeout: float = 0.5) -> MetrcClient:
    return MetrcClient(server.base_url, VENDOR, user, timeout_s=timeout,
                       pacer=Pacer(1000, 1000))


def test_client_errors_by_class_and_keys_never_in_messages(server: MetrcServer) -> None:
    """401, 400 (Metrc's message), 429 (Retry-After), 500 and a slow answer map to their
    classes; no message carries either key."""
    tag = "1A4FF0100000022000000001"
    server.add_packages(LICENSE, tag)
    body = receipt(sample_sale(1), "UTC") | {"Transactions": [
        {"PackageLabel": tag, "Quantity": 1, "UnitOfMeasure": "Grams", "TotalAmount": 1}]}
    bad = client(server, user="wrong-" + USER)
    with pytest.raises(Exception) as auth:
        bad.post_receipts(LICENSE, [body])
    assert type(auth.value).__name__ == "MetrcAuthFailed"
    good = client(server)
    server.inject("429", retry_after="3")
    with pytest.raises(MetrcRateLimited) as limited:
        good.post_receipts(LICENSE, [body])
    assert limited.value.retry_after == 3 and good.pacer.blocked_for(LICENSE) > 2
    good.pacer = Pacer(1000, 1000)
    server.inject("500")
    with pytest.raises(MetrcUnavailable) as failed:
        good.post_receipts(LICENSE, [body])
    assert failed.value.sent and failed.value.status == 500
    server.inject("slow", delay_s=1.5)
    with pytest.raises(MetrcUnavailable) as slow:
        good.post_receipts(LICENSE, [body])
    assert slow.value.sent and "may have been recorded" in str(slow.value)
    unknown = body | {"Transactions": [{**body["Transactions"][0],
                                        "PackageLabel": "1A4FF0100000022000099999"}]}
    with pytest.raises(MetrcRefused) as refused:
        good.post_receipts(LICENSE, [unknown])
    assert "1A4FF0100000022000099999" in refused.value.message and not refused.value.retryable
    assert good.find_receipt(LICENSE, body["ExternalReceiptNumber"]) is not None  # slow landed
    assert good.find_receipt(LICENSE, "R-NOPE") is None
    for exc in (auth.value, limited.value, failed.value, slow.value, refused.value):
        assert VENDOR not in str(exc) and USER not in str(exc)
    bad.close()
    good.close()


def test_client_pages_active_packages(server: MetrcServer) -> None:
    """GET /packages/v2/active is read page after page (pageSize <= 20)."""
    tags = [f"1A4FF01000000220000{n:05d}" for n in range(45)]
    server.add_packages(LICENSE, *tags)
    c = client(server)
    assert sorted(p["Label"] for p in c.active_packages(LICENSE, 20)) == tags
    pages = [call for call in server.calls if call.path == "/packages/v2/active"]
    assert len(pages) == 3
    c.close()


def test_pacer_spaces_calls_per_facility_and_per_key() -> None:
    """Calls of one facility are 1/rate apart; the key's rate bounds all facilities."""
    clock = FakeClock(0.0)
    pacer = Pacer(2.0, 4.0, clock=clock)
    assert pacer.reserve("A") == 0.0
    assert pacer.reserve("A") == pytest.approx(0.5)      # facility: 2 per s
    assert pacer.reserve("B") == pytest.approx(0.75)     # key: 4 per s across facilities
    pacer.block("C", 10.0)
    assert pacer.reserve("C") == pytest.approx(10.0)


# -- the forwarder ---------------------------------------------------------------------------


def test_sales_reported_once_through_500_429_and_a_slow_answer(hq: Hq,
                                                               server: MetrcServer) -> None:
    """25 sales become exactly 25 receipts, in batches of 10, through a 500, a 429 and an
    answer slower than the timeout (looked up by external number before posting again)."""
    hq.events.store_batch(sales(25, server))
    server.inject("500", method="POST")
    server.inject("429", method="POST", retry_after="1")
    server.inject("slow", method="POST", delay_s=1.0)
    hq.drain()
    counts = server.receipts_by_number()
    assert counts == {f"R-{i:06d}": 1 for i in range(1, 26)}
    assert set(hq.state().values()) == {"reported"}
    posts = [c for c in server.calls if c.method == "POST"]
    assert max(len(c.body) for c in posts) == 10
    assert hq.fw.counters["found_by_lookup"] == 10   # the slow batch had landed
    summary = summarize(hq.reports.reports(), hq.cfg.hq.sites, hq.clock())
    (row,) = summary["sites"]
    assert (row["reported"], row["pending"], row["overdue"], row["failed"]) == (25, 0, 0, [])


def test_one_unknown_package_is_isolated_and_fails_with_metrcs_message(
        hq: Hq, server: MetrcServer) -> None:
    """Metrc refuses a batch for one bad receipt: halves isolate it; the other 9 are
    reported; the bad one fails with the server's message and is never posted blindly."""
    batch = sales(10, server)
    server.remove_packages(LICENSE, batch[6]["data"]["lines"][0]["package_tag"])
    hq.events.store_batch(batch)
    hq.drain()
    state = hq.state()
    assert state.pop("R-000007") == "failed" and set(state.values()) == {"reported"}
    assert sorted(server.receipts_by_number()) == sorted(state)
    summary = summarize(hq.reports.reports(), hq.cfg.hq.sites, hq.clock())
    (failure,) = summary["sites"][0]["failed"]
    assert "Package 1A4FF0100000022000000007 is not active" in failure["error"]
    assert not healthy(summary)
    posts = len([c for c in server.calls if c.method == "POST"])
    hq.clock.advance(3600)
    hq.drain()
    assert len([c for c in server.calls if c.method == "POST"]) == posts  # not retried blindly
    server.add_packages(LICENSE, "1A4FF0100000022000000007")
    assert len(hq.reports.requeue(hq.clock(), site=SITE)) == 1
    hq.drain()
    assert hq.state()["R-000007"] == "reported"
    assert server.receipts_by_number()["R-000007"] == 1


def test_two_forwarders_on_one_store_post_each_receipt_once(tmp_path: Path,
                                                            server: MetrcServer) -> None:
    """Two forwarders with four workers each, one store: every receipt is posted once."""
    server.latency_s = 0.02
    a = Hq(tmp_path, server, batch_size=3, poll_interval_s=0.02)
    # One clock, as processes sharing one SQLite file on one machine have.
    b = Forwarder(a.cfg, store=SqliteReportStore(a.cfg.hq.store), clock=a.clock)
    try:
        a.events.store_batch(sales(60, server))
        for fw in (a.fw, b):
            fw.start()
        wait_for(lambda: len(server.receipts_by_number()) == 60, 30, 0.05,
                 what="60 receipts at the server")
        wait_for(lambda: set(a.state().values()) == {"reported"}, 10, 0.05,
                 what="all reported")
        assert set(server.receipts_by_number().values()) == {1}
        owners = {b.owner, a.fw.owner}
        assert len(owners) == 2 and b.counters["posts"] and a.fw.counters["posts"]
    finally:
        b.stop(5)
        a.close()


def test_overdue_and_unregistered_sites(tmp_path: Path, server: MetrcServer) -> None:
    """A sale not reported within report_within_h is overdue (per-state override); a site
    without a license_number fails with a message saying what to add."""
    h = Hq(tmp_path, server)
    try:
        h.cfg = h.cfg.model_copy(update={"compliance": h.cfg.compliance.model_copy(
            update={"report_within_h_by_state": {"CO": 1.0}})})
        h.fw.cfg = h.cfg
        server.inject("500", count=1000)
        h.events.store_batch([*sales(2, server), envelope(1, sample_sale(9), site="wa-x-1")])
        h.fw.intake(h.clock())
        h.fw.run_once()
        sold = datetime.fromisoformat(sample_sale(1)["sold_at"]).timestamp()
        early = summarize(h.reports.reports(), h.cfg.hq.sites, sold + 1800)
        assert early["sites"][0]["pending"] == 2 and early["sites"][0]["overdue"] == 0
        summary = summarize(h.reports.reports(), h.cfg.hq.sites, sold + 7200)
        rows = {r["site"]: r for r in summary["sites"]}
        assert rows[SITE]["overdue"] == 2 and rows[SITE]["pending"] == 0
        assert "no license_number" in rows["wa-x-1"]["failed"][0]["error"]
        counts = h.reports.counts(sold + 7200)
        assert counts[SITE]["overdue"] == 2
    finally:
        h.close()


def test_plant_events_go_to_their_calls_and_a_lost_waste_is_not_resent(
        tmp_path: Path, server: MetrcServer) -> None:
    """With kinds ["sale","plant"]: a move is sent (again after a lost answer), a waste
    whose answer was lost fails for a person instead of being recorded twice."""
    h = Hq(tmp_path, server, kinds=["sale", "plant"])
    try:
        tags = ["1A4FF0200000022000000456"]
        server.inject("slow", path="/plants/v2/location", delay_s=1.0)
        server.inject("slow", path="/plants/v2/waste", delay_s=1.0)
        h.events.store_batch([
            envelope(1, {"action": "move", "plant_tags": tags, "room": "Flower 2"}, "plant"),
            envelope(2, {"action": "waste", "plant_tags": tags, "weight": "1.5", "unit": "Grams",
                         "reason": "Trim", "method": "Grinder"}, "plant"),
            envelope(3, {"action": "observe", "plant_tags": tags}, "plant")])
        h.drain()
        states = sorted((r.seq, r.state) for r in h.reports.reports())
        assert states == [(1, "reported"), (2, "failed"), (3, "skipped")]
        paths = [c[2] for c in server.plant_calls]
        assert paths.count("/plants/v2/location") == 2 and paths.count("/plants/v2/waste") == 1
        (failed,) = [r for r in h.reports.reports() if r.state == "failed"]
        assert "may have reached Metrc" in (failed.error or "")
    finally:
        h.close()


def test_keys_unreadable_is_a_clear_error(tmp_path: Path, server: MetrcServer) -> None:
    """A missing key file stops the forwarder with the key's name, never its content."""
    cfg = make_cfg(tmp_path, server)
    cfg = cfg.model_copy(update={"metrc": cfg.metrc.model_copy(
        update={"user_key_file": str(tmp_path / "missing.key")})})
    with pytest.raises(ForwarderError, match="user_key_file"):
        Forwarder(cfg)


def test_mock_transport_connect_error_is_not_sent() -> None:
    """A connection that never opened says sent=False (safe to post again)."""
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    c = MetrcClient("http://metrc.invalid", VENDOR, USER, timeout_s=1, pacer=Pacer(100, 100),
                    transport=httpx.MockTransport(refuse))
    with pytest.raises(MetrcUnavailable) as exc:
        c.post_receipts(LICENSE, [{}])
    assert exc.value.sent is False
    c.close()


def test_concurrent_claims_never_share_a_row(tmp_path: Path, server: MetrcServer) -> None:
    """Eight threads on two store connections claim all rows; no row is claimed twice."""
    h = Hq(tmp_path, server, batch_size=4)
    other = SqliteReportStore(h.cfg.hq.store)
    try:
        h.events.store_batch(sales(80, server))
        h.fw.intake(h.clock())
        claimed: list[str] = []
        lock = threading.Lock()

        def grab(store: SqliteReportStore, owner: str) -> None:
            while True:
                claim = store.claim(owner, h.clock(), 60, 4)
                if claim is None:
                    return
                with lock:
                    claimed.extend(r.event_id for r in claim.reports)

        threads = [threading.Thread(target=grab, args=(s, f"o{i}"))
                   for i, s in enumerate([h.reports, other] * 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(claimed) == 80 == len(set(claimed))
    finally:
        other.close()
        h.close()


def test_retention_keeps_what_metrc_does_not_have(tmp_path: Path, server: MetrcServer) -> None:
    """The retention sink names the lowest unsettled seq: events not taken in yet, then
    pending or failed rows; nothing once all are reported."""
    from hq.retention import MetrcRetentionSink, retention_sinks

    h = Hq(tmp_path, server)
    try:
        (sink,) = retention_sinks(h.cfg)
        assert isinstance(sink, MetrcRetentionSink)
        batch = sales(4, server)
        server.remove_packages(LICENSE, batch[2]["data"]["lines"][0]["package_tag"])
        h.events.store_batch(batch)
        assert sink.still_needs() == {(SITE, "sale"): 1}   # not taken in yet
        h.drain()
        assert sink.still_needs() == {(SITE, "sale"): 3}   # the failed one
        server.add_packages(LICENSE, batch[2]["data"]["lines"][0]["package_tag"])
        h.reports.requeue(h.clock(), site=SITE)
        h.drain()
        assert sink.still_needs() == {}
    finally:
        h.close()


def test_hq_page_api_shows_metrc_per_site_and_day(tmp_path: Path, server: MetrcServer) -> None:
    """GET /v1/metrc: per site and local day, sales at HQ, reported, pending, failed with
    Metrc's message, overdue; 422 naming the field for a bad query; needs a token."""
    from fastapi.testclient import TestClient

    from agent.web.auth import Tokens
    from hq.fleet_store import SqliteFleetStore
    from hq.metrics import HqMetrics
    from hq.web import HqWebContext, create_hq_app

    h = Hq(tmp_path, server)
    fleet = SqliteFleetStore(h.cfg.hq.store)
    try:
        batch = sales(3, server)
        server.remove_packages(LICENSE, batch[1]["data"]["lines"][0]["package_tag"])
        h.events.store_batch(batch)
        h.drain()
        sold = datetime.fromisoformat(sample_sale(1)["sold_at"]).timestamp()
        app = create_hq_app(HqWebContext(h.cfg, Tokens({"ops": "t" * 24}), h.events, fleet,
                                         HqMetrics(), clock=lambda: sold + 600,
                                         metrc=h.reports))
        with TestClient(app) as web:
            assert web.get("/v1/metrc").status_code == 401
            web.headers["Authorization"] = "Bearer " + "t" * 24
            body = web.get("/v1/metrc", params={"site": SITE}).json()
            assert body["enabled"] is True
            (day,) = body["days"]
            assert (day["site"], day["day"], day["at_hq"], day["reported"], day["pending"],
                    day["overdue"]) == (SITE, "2026-11-22", 3, 2, 0, 0)
            (failure,) = day["failed"]
            assert failure["receipt_number"] == "R-000002" and "not active" in failure["error"]
            bad = web.get("/v1/metrc", params={"days": "0"})
            assert bad.status_code == 422 and "days" in bad.json()["error"]
            assert web.get("/v1/metrc", params={"site": "Bad Site"}).status_code == 422
    finally:
        fleet.close()
        h.close()
