"""The "floor" envelope key: a fresh HQ store acks an agent whose outbox starts above seq 1."""

from __future__ import annotations

import io
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.envelope import decode
from agent.outbox import Outbox
from agent.testing.localbroker import Broker
from agent.uplink import Uplink, with_epoch, with_floor
from hq.receiver import HqReceiver
from hq.report import format_report, report_main
from hq.store import SqliteStore
from tests.conftest import make_store, wait_for
from tests.test_hq import SITE, envelope, envelope_bytes, hq_config, kinds_of, running
from tests.test_uplink import SITE as AGENT_SITE
from tests.test_uplink import Hq, config, depth, submit


@contextmanager
def store_at(path: Path | str) -> Iterator[Any]:
    """A store on a SQLite file (a Path) or at a store URL (both backends: ``store_url``)."""
    store = SqliteStore(str(path)) if isinstance(path, Path) else make_store(path)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def uplink(cfg: Any, outbox: Outbox) -> Iterator[Uplink]:
    up = Uplink(cfg, outbox, version="9.9.9")
    up.start()
    try:
        yield up
    finally:
        up.stop()


# -- the store ----------------------------------------------------------------


def test_a_fresh_store_acks_past_a_floor_and_reports_it_skipped(store_url: str) -> None:
    """500..510 with floor 499 on 500: a fresh store acks 510 and reports skipped [[1, 499]]."""
    with store_at(store_url) as hq:
        marks = hq.store_batch([envelope(500, floor=499)] + [envelope(s) for s in range(501, 511)])
        assert marks == {(SITE, "sale", ""): 510}
        sale = kinds_of(hq.report())["sale"]
        assert sale["skipped"] == [[1, 499]] and sale["gaps"] == [] and sale["lost"] == []
        assert (sale["received"], sale["first_seq"], sale["last_seq"]) == (11, 500, 510)
        assert sale["acked_upto"] == 510 and hq.counters["skipped_ranges"] == 1


def test_without_a_floor_a_fresh_store_acks_nothing(store_url: str) -> None:
    """The same seqs 500..510 without a floor: the watermark stays 0 (the defect floor fixes)."""
    with store_at(store_url) as hq:
        assert hq.store_batch([envelope(s) for s in range(500, 511)]) == {(SITE, "sale", ""): 0}
        sale = kinds_of(hq.report())["sale"]
        assert sale["skipped"] == [] and sale["acked_upto"] == 0


def test_a_floor_below_the_watermark_changes_nothing(store_url: str) -> None:
    """A floor at or below the watermark (every resend of a caught-up store) records nothing."""
    with store_at(store_url) as hq:
        hq.store_batch([envelope(s) for s in range(1, 6)])
        marks = hq.store_batch([envelope(4, floor=3), envelope(6, floor=5)])
        assert marks == {(SITE, "sale", ""): 6}
        assert kinds_of(hq.report())["sale"]["skipped"] == []
        assert hq.counters["skipped_ranges"] == 0


def test_only_the_part_not_stored_is_skipped(store_url: str) -> None:
    """Between the mark and the floor, stored seqs and declared-lost ranges are not skipped."""
    with store_at(store_url) as hq:
        hq.store_batch([envelope(s) for s in (1, 2, 5, 6)] + [envelope(12, lost=[8, 9])])
        assert hq.watermarks() == {(SITE, "sale", ""): 2}
        assert hq.store_batch([envelope(20, floor=19)]) == {(SITE, "sale", ""): 20}
        sale = kinds_of(hq.report())["sale"]
        assert sale["skipped"] == [[3, 4], [7, 7], [10, 11], [13, 19]]
        assert sale["lost"] == [[8, 9]] and sale["gaps"] == []


def test_a_floor_inside_an_aggregate_moves_the_mark_to_its_end(store_url: str) -> None:
    """A stored aggregate reaching past the floor carries the watermark to its seq_end."""
    with store_at(store_url) as hq:
        hq.store_batch([envelope(90, kind="sensor", seq_end=120)])
        marks = hq.store_batch([envelope(121, kind="sensor", floor=100)])
        assert marks == {(SITE, "sensor", ""): 121}
        assert kinds_of(hq.report())["sensor"]["skipped"] == [[1, 89]]


def test_seqs_arriving_late_inside_a_skipped_range_are_stored(store_url: str) -> None:
    """A seq inside a skipped range is still stored and counted; it is no longer skipped."""
    with store_at(store_url) as hq:
        hq.store_batch([envelope(10, floor=9)])
        assert hq.store_batch([envelope(5)]) == {(SITE, "sale", ""): 10}
        sale = kinds_of(hq.report())["sale"]
        assert (sale["received"], sale["first_seq"]) == (2, 5)
        assert sale["skipped"] == [[1, 4], [6, 9]] and sale["gaps"] == []
        assert [e["seq"] for e in hq.events(SITE, "sale")] == [5, 10]


@pytest.mark.parametrize("floor", [True, -1, 10, 11, 2**63, "9", 9.0])
def test_a_bad_floor_is_malformed(tmp_path: Path, floor: Any) -> None:
    """floor must be an integer 0 <= floor < seq (<= 2**63-1); anything else is refused."""
    with store_at(tmp_path / "hq.db") as hq, pytest.raises(ValueError, match="'floor'"):
        hq.store_batch([envelope(10, floor=floor)])


def test_report_shows_skipped_apart_from_gaps_and_exits_0(tmp_path: Path) -> None:
    """The table has a SKIPPED column; skipped seqs are no gap, so the report exits 0."""
    db = tmp_path / "hq.db"
    with store_at(db) as hq:
        hq.store_batch([envelope(500, floor=499), envelope(501)])
    out = io.StringIO()
    assert report_main(hq_config(1, db), None, None, False, out=out) == 0
    text = out.getvalue()
    assert "SKIPPED" in text and "1-499" in text and "no gaps" in text
    out = io.StringIO()
    assert report_main(hq_config(1, db), None, None, True, out=out) == 0
    [entry] = json.loads(out.getvalue())["sites"]
    assert entry["kinds"][0]["skipped"] == [[1, 499]]


def test_a_store_made_before_skipped_existed_gets_the_table(tmp_path: Path) -> None:
    """An HQ store from before this table opens, gains it, and a floor works on it."""
    db = tmp_path / "hq.db"
    with store_at(db) as hq:
        hq.store_batch([envelope(1)])
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE skipped")
    with store_at(db) as hq:
        assert hq.store_batch([envelope(5, floor=4)]) == {(SITE, "sale", ""): 5}
        assert kinds_of(hq.report())["sale"]["skipped"] == [[2, 4]]


def test_the_receiver_acks_a_floor_event_over_mqtt(broker: Broker, tmp_path: Path) -> None:
    """Over a real broker, a fresh receiver acks seq 42 that carries floor 41."""
    from tests.test_hq import Site
    site = Site(broker.port)
    site.listen_acks()
    try:
        with running(HqReceiver(hq_config(broker.port, tmp_path / "hq.db"))) as rx:
            site.publish(envelope_bytes(42, floor=41))
            wait_for(lambda: site.upto() == 42, what="the ack of 42")
            assert kinds_of(rx.store.report())["sale"]["skipped"] == [[1, 41]]
    finally:
        site.close()


# -- the agent, end to end ------------------------------------------------------


def test_a_fresh_hq_store_drains_an_outbox_acked_by_another(broker: Broker,
                                                            tmp_path: Path) -> None:
    """Store A acked 1..100 (deleted); a receiver on fresh store B acks 101..150: outbox empty."""
    outbox = Outbox(str(tmp_path / "outbox"), AGENT_SITE, max_bytes=1 << 28)
    outbox.open()
    try:
        cfg = config(broker.port, ack_timeout_s=0.5)
        submit(outbox, "sale", 100)
        with running(HqReceiver(hq_config(broker.port, tmp_path / "a.db"))) as rx_a, \
                uplink(cfg, outbox):
            wait_for(lambda: depth(outbox, "sale") == 0, timeout=20, what="store A acks 1..100")
            assert rx_a.store.watermarks() == {(AGENT_SITE, "sale", outbox.epoch): 100}
        submit(outbox, "sale", 50, start=100)
        assert outbox.stats()["sale"].first_seq == 101
        # The same HQ receiver identity, restarted on a new database.
        with running(HqReceiver(hq_config(broker.port, tmp_path / "b.db"))) as rx_b, \
                uplink(cfg, outbox) as up:
            wait_for(lambda: depth(outbox, "sale") == 0, timeout=20, what="store B acks 101..150")
            assert rx_b.store.watermarks() == {(AGENT_SITE, "sale", outbox.epoch): 150}
            assert up.snapshot()["acked_upto"]["sale"] == 150
            report = rx_b.store.report()
            events = rx_b.store.events(AGENT_SITE, "sale")
    finally:
        outbox.close()
    assert [e["seq"] for e in events] == list(range(101, 151))
    assert events[0]["envelope"]["floor"] == 100
    assert all("floor" not in e["envelope"] for e in events[1:])
    sale = kinds_of(report, AGENT_SITE)["sale"]
    assert sale["skipped"] == [[1, 100]] and sale["gaps"] == [] and sale["lost"] == []
    assert (sale["received"], sale["first_seq"], sale["last_seq"]) == (50, 101, 150)
    assert "1-100" in format_report(report)


def test_a_resent_oldest_event_carries_the_floor_and_the_stored_bytes(
        broker: Broker, tmp_path: Path) -> None:
    """Resent oldest seq 3 = stored bytes + "floor":2, and every event the outbox's
    "epoch" (same id/seq/data); a fresh store acks."""
    outbox = Outbox(str(tmp_path / "outbox"), AGENT_SITE, max_bytes=1 << 28)
    outbox.open()
    hq = Hq(broker.port)

    def copies() -> list[tuple[int, bytes]]:
        with hq.lock:
            return [(e["seq"], raw) for e, raw in zip(hq.events, hq.raw, strict=True)]

    try:
        with uplink(config(broker.port, ack_timeout_s=0.3), outbox):
            submit(outbox, "sale", 5)
            wait_for(lambda: len(copies()) >= 5, what="first sends")
            stored = {s: with_epoch(b, outbox.epoch) for s, b in outbox.read("sale", 0, 10)}
            assert copies()[:5] == [(s, stored[s]) for s in range(1, 6)]  # seq 1: never a floor
            hq.send_ack("sale", 2)      # another HQ store acked 1..2
            wait_for(lambda: depth(outbox, "sale") == 3, what="1..2 deleted")
            floored = b'{"floor":2,' + stored[3][1:]
            wait_for(lambda: (3, floored) in copies(), what="seq 3 resent with floor 2")
            assert floored == with_floor(stored[3], 2)
            published, original = decode(floored), decode(stored[3])
            assert published.pop("floor") == 2 and published == original
            assert {raw for seq, raw in copies() if seq == 3} <= {stored[3], floored}
            assert all(raw == stored[seq] for seq, raw in copies() if seq != 3)
            with running(HqReceiver(hq_config(broker.port, tmp_path / "fresh.db"))) as rx:
                wait_for(lambda: depth(outbox, "sale") == 0, timeout=20, what="fresh store acks")
                assert rx.store.watermarks() == {(AGENT_SITE, "sale", outbox.epoch): 5}
                assert kinds_of(rx.store.report(), AGENT_SITE)["sale"]["skipped"] == [[1, 2]]
    finally:
        hq.close()
        outbox.close()


def test_with_floor_splices_after_the_brace_only() -> None:
    """with_floor inserts "floor":N, after the opening brace; seq 1 and non-objects are left."""
    body = b'{"v":1,"id":"x","seq":7,"data":{"a":1}}'
    assert with_floor(body, 6) == b'{"floor":6,"v":1,"id":"x","seq":7,"data":{"a":1}}'
    assert with_floor(body, 0) == body
    assert with_floor(b"[1]", 3) == b"[1]" and with_floor(b"{}", 3) == b"{}"
