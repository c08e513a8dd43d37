"""The Metrc forwarder on the PostgreSQL HQ store: the suite's private PostgreSQL, the
real httpx client and tests/metrc_server.py (the fake Metrc). Claims are
``FOR UPDATE SKIP LOCKED`` and leases run on the database server's clock."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hq.backends import open_report_store
from hq.config import HqReceiverConfig
from hq.metrc.forwarder import Forwarder
from hq.metrc.pg_reports import PgReportStore
from hq.pgstore import PgStore
from hq.retention import MetrcRetentionSink, retention_sinks
from tests.conftest import FakeClock, wait_for
from tests.metrc_server import MetrcServer
from tests.test_metrc import LICENSE, SITE, make_cfg, sales


class PgHq:
    """HQ's events, the Metrc tables and a forwarder on one PostgreSQL database."""

    def __init__(self, tmp: Path, server: MetrcServer, url: str, **metrc: Any) -> None:
        cfg = make_cfg(tmp, server, **metrc)
        self.cfg = HqReceiverConfig(hq={**cfg.hq.model_dump(), "store": url},
                                    compliance=cfg.compliance.model_dump(),
                                    metrc=cfg.metrc.model_dump())
        self.events = PgStore(url)
        self.reports = PgReportStore(url)
        self.clock = FakeClock(1_795_000_100.0)
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
def server() -> Iterator[MetrcServer]:
    from tests.test_metrc import USER, VENDOR

    s = MetrcServer(VENDOR, USER).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def pghq(tmp_path: Path, server: MetrcServer, pg_url: str) -> Iterator[PgHq]:
    h = PgHq(tmp_path, server, pg_url)
    try:
        yield h
    finally:
        h.close()


def test_a_postgresql_store_is_accepted(pg_url: str) -> None:
    """open_report_store takes a postgresql:// store (it used to refuse one)."""
    PgStore(pg_url).close()
    store = open_report_store(pg_url)
    try:
        assert isinstance(store, PgReportStore) and store.reports() == []
    finally:
        store.close()


def test_sales_reported_once_through_500_429_and_a_slow_answer(pghq: PgHq,
                                                               server: MetrcServer) -> None:
    """On PostgreSQL: 25 sales become exactly 25 receipts through a 500, a 429 and an answer
    slower than the timeout (looked up by external number before posting again)."""
    pghq.events.store_batch(sales(25, server))
    server.inject("500", method="POST")
    server.inject("429", method="POST", retry_after="1")
    server.inject("slow", method="POST", delay_s=1.0)
    pghq.drain()
    assert server.receipts_by_number() == {f"R-{i:06d}": 1 for i in range(1, 26)}
    assert set(pghq.state().values()) == {"reported"}
    assert pghq.fw.counters["found_by_lookup"] == 10
    assert pghq.reports.counts(pghq.clock())[SITE]["reported"] == 25


def test_concurrent_claims_never_share_a_row(pghq: PgHq, server: MetrcServer,
                                             pg_url: str) -> None:
    """Eight threads on two stores claim all 80 rows (SKIP LOCKED); none is claimed twice."""
    other = PgReportStore(pg_url)
    try:
        pghq.events.store_batch(sales(80, server))
        assert pghq.fw.intake(pghq.clock()) == 80
        assert pghq.fw.intake(pghq.clock()) == 0   # taken once
        claimed: list[str] = []
        lock = threading.Lock()

        def grab(store: PgReportStore, owner: str) -> None:
            while True:
                claim = store.claim(owner, pghq.clock(), 60, 4)
                if claim is None:
                    return
                assert all(r.event_id in claim.envelopes for r in claim.reports)
                with lock:
                    claimed.extend(r.event_id for r in claim.reports)

        threads = [threading.Thread(target=grab, args=(s, f"o{i}"))
                   for i, s in enumerate([pghq.reports, other] * 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(claimed) == 80 == len(set(claimed))
    finally:
        other.close()


def test_leases_run_on_the_database_servers_clock(pghq: PgHq, server: MetrcServer,
                                                  pg_url: str) -> None:
    """A forwarder whose clock is an hour fast cannot take a batch another holds: the
    lease is measured by the server's now(); it can once the lease has run out there."""
    other = PgReportStore(pg_url)
    try:
        pghq.events.store_batch(sales(3, server))
        pghq.fw.intake(pghq.clock())
        held = pghq.reports.claim("slow-host", pghq.clock(), 1.5, 10)
        assert held is not None and len(held.reports) == 3
        lease_end = held.reports[0].lease_until
        assert abs(lease_end - (pghq.reports.server_time() + 1.5)) < 1.5
        assert other.claim("fast-host", pghq.clock() + 3600, 60, 10) is None
        pghq.reports.renew("slow-host", [r.event_id for r in held.reports], 0.0)
        (renewed,) = pghq.reports.get([held.reports[0].event_id])
        assert renewed.lease_until >= lease_end   # by the claim's length, not ``until``
        taken = wait_for(lambda: other.claim("fast-host", pghq.clock() + 3600, 60, 10), 10,
                         0.1, what="the lease run out on the server's clock")
        assert {r.lease_owner for r in taken.reports} == {"fast-host"}
        pghq.reports.set_posted("slow-host", [r.event_id for r in held.reports])
        assert not any(r.posted for r in pghq.reports.get([r.event_id for r in held.reports]))
    finally:
        other.close()


def test_two_forwarders_on_one_postgresql_post_each_receipt_once(
        tmp_path: Path, server: MetrcServer, pg_url: str) -> None:
    """Two forwarders with their workers on one PostgreSQL: every receipt posted once."""
    server.latency_s = 0.02
    a = PgHq(tmp_path, server, pg_url, batch_size=3, poll_interval_s=0.02)
    b = Forwarder(a.cfg, store=PgReportStore(pg_url), clock=a.clock)
    try:
        a.events.store_batch(sales(60, server))
        for fw in (a.fw, b):
            fw.start()
        wait_for(lambda: len(server.receipts_by_number()) == 60, 30, 0.05,
                 what="60 receipts at the server")
        wait_for(lambda: set(a.state().values()) == {"reported"}, 10, 0.05, what="all reported")
        assert set(server.receipts_by_number().values()) == {1}
        assert b.counters["posts"] and a.fw.counters["posts"]
    finally:
        b.stop(5)
        b.store.close()
        a.close()


def test_retention_keeps_what_metrc_does_not_have_on_postgresql(pghq: PgHq,
                                                                server: MetrcServer) -> None:
    """The retention sink on PostgreSQL: events not taken in yet, then the failed one,
    then nothing once all are reported."""
    (sink,) = retention_sinks(pghq.cfg)
    assert isinstance(sink, MetrcRetentionSink)
    batch = sales(4, server)
    server.remove_packages(LICENSE, batch[2]["data"]["lines"][0]["package_tag"])
    pghq.events.store_batch(batch)
    assert sink.still_needs() == {(SITE, "sale"): 1}
    pghq.drain()
    assert sink.still_needs() == {(SITE, "sale"): 3}
    server.add_packages(LICENSE, batch[2]["data"]["lines"][0]["package_tag"])
    assert len(pghq.reports.requeue(pghq.clock(), site=SITE)) == 1
    pghq.drain()
    assert sink.still_needs() == {}
