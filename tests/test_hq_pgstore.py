"""The HQ store's semantics on both backends (SQLite and PostgreSQL), and what only the
PostgreSQL store has: migrations, the pool, concurrent writers in separate transactions."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.envelope import iso_ms
from agent.testing.localbroker import Broker
from agent.testing.localpg import PgServer
from hq import pgstore
from hq.backends import open_store
from hq.fleet import parse_health, parse_status
from hq.fleet_store import open_fleet_store
from hq.receiver import HqReceiver
from hq.retention import open_retention
from hq.store import StoreError, event_row
from tests.conftest import FakeClock, make_store, wait_for
from tests.test_hq import (
    BASE_TS,
    SITE,
    Site,
    envelope,
    hq_config,
    kinds_of,
    running,
)

REPO = Path(__file__).resolve().parent.parent
NOW = BASE_TS + 3600.0


def sale(seq: int, **kw: Any) -> dict[str, Any]:
    return envelope(seq, **kw)


# -- the same semantics on both backends ------------------------------------------------


def test_each_seq_once_and_duplicates_counted(store_url: str) -> None:
    """A (site, kind, seq) is stored once; repeats, in one batch or later, count as duplicates."""
    store = make_store(store_url)
    try:
        assert store.store_batch([sale(1), sale(2), sale(3)]) == {(SITE, "sale", ""): 3}
        assert store.store_batch([sale(2), sale(2), sale(4), sale(4)]) == {(SITE, "sale", ""): 4}
        assert [e["seq"] for e in store.events(SITE, "sale")] == [1, 2, 3, 4]
        sale_kind = kinds_of(store.report())["sale"]
        assert (sale_kind["received"], sale_kind["duplicates"], sale_kind["gaps"]) == (4, 3, [])
        assert store.counters["stored"] == 4 and store.counters["duplicates"] == 3
    finally:
        store.close()


def test_two_stores_on_one_database_advance_each_others_watermark(store_url: str) -> None:
    """The watermark is computed from the database, so writers on one store see each other."""
    a, b = make_store(store_url), make_store(store_url)
    try:
        assert a.store_batch([sale(1), sale(3)]) == {(SITE, "sale", ""): 1}
        assert b.store_batch([sale(2)]) == {(SITE, "sale", ""): 3}
        assert a.store_batch([sale(4)]) == {(SITE, "sale", ""): 4}
        assert a.watermarks() == b.watermarks() == {(SITE, "sale", ""): 4}
    finally:
        a.close()
        b.close()


def test_aggregates_lost_ranges_and_raw_rows_replaced(store_url: str) -> None:
    """seq_end covers its range; lost passes the mark; an aggregate and the raw reading at
    its first seq are both kept (not a conflict)."""
    store = make_store(store_url)
    try:
        assert store.store_batch([sale(1, kind="sensor"), sale(2, kind="sensor", seq_end=5),
                                  sale(6, kind="sensor")]) == {(SITE, "sensor", ""): 6}
        marks = store.store_batch([sale(1), sale(2), sale(6, lost=[3, 5])])
        assert marks == {(SITE, "sale", ""): 6}
        # seq 7 came raw, then (after an agent crash) as an aggregate 7..9
        assert store.store_batch([sale(7, kind="sensor")]) == {(SITE, "sensor", ""): 7}
        assert store.store_batch([sale(7, kind="sensor", seq_end=9), sale(10, kind="sensor")]
                                 ) == {(SITE, "sensor", ""): 10}
        kinds = kinds_of(store.report())
        assert kinds["sale"]["lost"] == [[3, 5]] and kinds["sale"]["gaps"] == []
        sensor = kinds["sensor"]
        assert (sensor["received"], sensor["first_seq"], sensor["last_seq"]) == (6, 1, 10)
        assert sensor["gaps"] == [] and store.counters["lost_ranges"] == 1
        assert sensor["conflicts"] == 0 and store.conflicts() == []
    finally:
        store.close()


def test_floor_skips_only_what_is_not_held(store_url: str) -> None:
    """A floor raises a fresh store's mark; held seqs and lost ranges are not skipped."""
    store = make_store(store_url)
    try:
        store.store_batch([sale(3), sale(7, lost=[5, 6])])
        marks = store.store_batch([sale(10, floor=9), sale(11)])
        assert marks == {(SITE, "sale", ""): 11}
        sale_kind = kinds_of(store.report())["sale"]
        assert sale_kind["skipped"] == [[1, 2], [4, 4], [8, 9]]
        assert sale_kind["gaps"] == [] and sale_kind["acked_upto"] == 11
        store.store_batch([sale(8)])  # a late arrival inside a skipped range is stored
        assert kinds_of(store.report())["sale"]["skipped"] == [[1, 2], [4, 4], [9, 9]]
        assert store.counters["skipped_ranges"] == 3
    finally:
        store.close()


def test_seqs_at_the_top_of_the_range(store_url: str) -> None:
    """Seqs up to 2**63-1 are stored and acked (no overflow computing seq + 1)."""
    top = 2**63 - 1
    store = make_store(store_url)
    try:
        assert store.store_batch([sale(top - 1, floor=top - 2, ts=NOW)]
                                 ) == {(SITE, "sale", ""): top - 1}
        assert store.store_batch([sale(top, ts=NOW)]) == {(SITE, "sale", ""): top}
        assert kinds_of(store.report())["sale"]["gaps"] == []
    finally:
        store.close()


def test_report_has_the_contract_shape_on_both(store_url: str) -> None:
    """The report's keys and values are the same on both backends, gap_since included."""
    clock = FakeClock(BASE_TS + 100)
    store = make_store(store_url, clock=clock)
    try:
        store.store_batch([sale(1), sale(2), sale(2, kind="plant")])
        clock.advance(100)
        store.store_batch([sale(5), sale(2)])
        report = store.report(now=BASE_TS + 1000)
        plant, sale_kind = report["sites"][0]["kinds"]
        assert {k: sale_kind[k] for k in ("received", "first_seq", "last_seq", "gaps",
                                          "duplicates", "acked_upto", "lost", "skipped")} == {
            "received": 3, "first_seq": 1, "last_seq": 5, "gaps": [[3, 4]], "duplicates": 1,
            "acked_upto": 2, "lost": [], "skipped": []}
        assert sale_kind["gap_since"] == iso_ms(BASE_TS + 200)
        assert sale_kind["newest_ts"] == iso_ms(BASE_TS + 5)
        assert sale_kind["newest_age_s"] == 995.0
        assert plant["first_seq"] == 2 and plant["gaps"] == []
        day = 86400.0
        store.store_batch([sale(1, site="co-b", ts=BASE_TS),
                           sale(2, site="co-b", ts=BASE_TS + day)])
        window = store.report(site="co-b", since=iso_ms(BASE_TS + day)[:10])
        assert kinds_of(window, "co-b")["sale"]["received"] == 1
        until = store.report(site="co-b", until=iso_ms(BASE_TS + day)[:10])
        assert kinds_of(until, "co-b")["sale"]["last_seq"] == 1
        assert store.report(site="nobody")["sites"] == []
    finally:
        store.close()


def test_concurrent_writers_store_every_seq_once(store_url: str) -> None:
    """Four writers (own connections) racing over three pairs, with repeats: each seq once,
    every watermark complete, duplicates counted exactly."""
    n = 120
    pairs = [("co-a", "sale"), ("co-b", "sale"), ("co-a", "plant")]
    work = [(site, kind, seq) for site, kind in pairs for seq in range(1, n + 1)]
    work += random.Random(7).sample(work, 40)  # noqa: S311 - redeliveries, reproducible
    random.Random(8).shuffle(work)  # noqa: S311
    stores = [make_store(store_url) for _ in range(4)]
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        mine = work[i::4]
        try:
            for start in range(0, len(mine), 15):
                stores[i].store_batch([sale(q, site=s, kind=k) for s, k, q in
                                       mine[start:start + 15]])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors
        # The last writer to commit for a pair saw every row: one more batch is not needed.
        assert stores[0].watermarks() == {(*p, ""): n for p in pairs}
        for site, kind in pairs:
            assert [e["seq"] for e in stores[0].events(site, kind)] == list(range(1, n + 1))
        assert sum(s.counters["stored"] for s in stores) == 3 * n
        assert sum(s.counters["duplicates"] for s in stores) == 40
    finally:
        for s in stores:
            s.close()


def test_fleet_state_and_faults_on_both(store_url: str) -> None:
    """Fleet state survives a reopen; faults are summed per device and hour; a NUL in a
    device id or version is stored (PostgreSQL text cannot hold one raw)."""
    make_store(store_url).close()
    fleet = open_fleet_store(store_url)
    dev = [{"id": "zebra\u0000x", "state": "down", "faults": {"paper_out": 1}}]
    health = {"site": "co-a", "ts": iso_ms(NOW), "version": "1.0\u0000", "state": "degraded",
              "devices": dev}
    try:
        fleet.record([parse_status("co-a", json.dumps(
            {"state": "online", "ts": iso_ms(NOW), "version": "1.0"}).encode()),
            parse_health("co-a", json.dumps(health).encode())], NOW)
        dev[0]["faults"] = {"paper_out": 4}
        fleet.record([parse_health("co-a", json.dumps(health).encode())], NOW + 30)
    finally:
        fleet.close()
    again = open_fleet_store(store_url)
    try:
        state = again.states()["co-a"]
        assert state.online is True and state.health is not None
        assert len(state.health.devices_down) == 1
        [row] = again.faults("co-a", NOW - 3600)
        assert row["faults"] == 4 and row["device"].startswith("zebra")
    finally:
        again.close()


def test_retention_on_both(store_url: str) -> None:
    """Old events at or below the watermark go; those above it and young ones stay."""
    store = make_store(store_url)
    old = NOW - 10 * 86400
    try:
        store.store_batch([sale(s, site="co-a", ts=old + s) for s in (1, 2, 3, 4, 5, 7, 8)])
        store.store_batch([sale(9, site="co-a", ts=NOW)])
        retention = open_retention(store_url)
        try:
            assert retention.run(days=7, now=NOW).deleted == 5
        finally:
            retention.close()
        assert [e["seq"] for e in store.events("co-a", "sale")] == [7, 8, 9]
        assert store.store_batch([sale(6, site="co-a", ts=NOW)]) == {("co-a", "sale", ""): 9}
    finally:
        store.close()


def test_a_nul_in_the_id_is_malformed() -> None:
    """An id with a NUL is refused when parsed, before any store sees it."""
    env = sale(1)
    env["id"] = "abc\u0000def"
    with pytest.raises(ValueError, match="'id'"):
        event_row(env)


# -- PostgreSQL only ---------------------------------------------------------------------


def _sql(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description is not None else []


def test_migrations_are_numbered_recorded_and_applied_once(pg_url: str) -> None:
    """schema_version records each numbered migration once; reopening applies nothing."""
    steps = pgstore.migrations()
    assert [m.version for m in steps] == list(range(1, len(steps) + 1))
    open_store(pg_url).close()
    first = _sql(pg_url, "SELECT version, name, applied_at FROM schema_version ORDER BY 1")
    assert [(v, n) for v, n, _ in first] == [(m.version, m.name) for m in steps]
    open_store(pg_url).close()
    assert _sql(pg_url, "SELECT version, name, applied_at FROM schema_version ORDER BY 1") \
        == first


def test_a_version_1_database_is_migrated_to_version_2(pg_url: str) -> None:
    """A PostgreSQL store made before epochs (schema 1) opens with its rows, marks and lost
    ranges as epoch '', then stores, dedups and reports as schema 2 does."""
    first = pgstore.migrations()[0]
    env = envelope(1)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version integer PRIMARY KEY, name text"
                     " NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        conn.execute(first.sql.encode())
        conn.execute("INSERT INTO schema_version (version, name) VALUES (1, %s)", (first.name,))
        conn.execute("INSERT INTO events VALUES (%s, 'sale', 1, NULL, %s, %s, %s, %s, 2)",
                     (SITE, env["id"], env["ts"], env["ts"], json.dumps(env)))
        conn.execute("INSERT INTO marks VALUES (%s, 'sale', 1)", (SITE,))
        conn.execute("INSERT INTO lost VALUES (%s, 'sale', 3, 4, 5, %s, %s)",
                     (SITE, env["ts"], env["ts"]))
    store = make_store(pg_url)
    try:
        assert _sql(pg_url, "SELECT max(version) FROM schema_version") == [
            (len(pgstore.migrations()),)]
        assert store.watermarks() == {(SITE, "sale", ""): 1}
        assert store.store_batch([envelope(1), envelope(2)]) == {(SITE, "sale", ""): 4}
        sale = kinds_of(store.report())["sale"]
        assert (sale["received"], sale["duplicates"], sale["conflicts"]) == (2, 3, 0)
        assert sale["lost"] == [[3, 4]] and sale["epochs"] == 1
    finally:
        store.close()


_MIGRATE = """
import sys
from hq.pgstore import connect, migrate
with connect(sys.argv[1]) as conn:
    print(migrate(conn, "test"))
"""


def test_receivers_starting_together_migrate_once(pg_url: str) -> None:
    """Four processes migrating one empty database at once: each version applied once."""
    procs = [subprocess.Popen([sys.executable, "-c", _MIGRATE, pg_url], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    latest = len(pgstore.migrations())
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(latest).encode()}
    assert _sql(pg_url, "SELECT count(*), max(version) FROM schema_version") == [
        (latest, latest)]


def test_a_database_not_ours_or_too_new_is_refused(pg_url: str, pg_server: PgServer) -> None:
    """Foreign tables of our names, an empty database for the report, or a newer schema:
    each a StoreError saying what to do, and nothing is changed."""
    with pytest.raises(StoreError, match="is empty, not an HQ store"):
        open_store(pg_url, create=False)
    assert _sql(pg_url, "SELECT to_regclass('schema_version') IS NULL") == [(True,)]
    other = pg_server.create_database("foreign_db")
    _sql(other, "CREATE TABLE events (x int)")
    with pytest.raises(StoreError, match=r"not an HQ store.*events"):
        open_store(other)
    open_store(pg_url).close()
    _sql(pg_url, "INSERT INTO schema_version (version, name) VALUES (999, 'future')")
    with pytest.raises(StoreError, match="schema version 999, newer"):
        open_store(pg_url)


def test_an_unreachable_server_is_a_clear_error_without_the_password() -> None:
    """A closed port: StoreError naming the server, the password redacted."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://hq:s3cret@127.0.0.1:{port}/hq"
    with pytest.raises(StoreError, match="cannot connect") as info:
        open_store(url)
    assert "s3cret" not in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
    with pytest.raises(StoreError) as info:
        open_store(f"postgresql://127.0.0.1:{port}/hq?password=s3cret")
    assert "s3cret" not in str(info.value)


def test_stores_of_one_process_share_one_pool(pg_url: str) -> None:
    """The store, the fleet tables and retention of one process use one pool; the last
    close closes it."""
    a, fleet = make_store(pg_url), open_fleet_store(pg_url)
    b = open_store(pg_url)
    assert isinstance(b, pgstore.PgStore)
    try:
        assert a.pool is b.pool is getattr(fleet, "pool", None)
        with a.pool.connection() as conn:
            assert conn.autocommit
    finally:
        a.close()
        fleet.close()
    assert not b.pool.closed
    b.close()
    assert b.pool.closed


def test_a_failed_write_stores_nothing_and_is_a_store_error(pg_url: str) -> None:
    """A batch the database refuses is rolled back whole and raised as StoreError."""
    store = make_store(pg_url)
    try:
        store.store_batch([sale(1)])
        _sql(pg_url, "ALTER TABLE events ADD CONSTRAINT no_seven CHECK (seq <> 7)")
        with pytest.raises(StoreError, match="nothing stored"):
            store.store_batch([sale(2), sale(3, lost=[4, 6]), sale(7)])
        assert [e["seq"] for e in store.events(SITE, "sale")] == [1]
        assert store.watermarks() == {(SITE, "sale", ""): 1}
        assert _sql(pg_url, "SELECT count(*) FROM lost") == [(0,)]
    finally:
        store.close()


# -- the receiver on PostgreSQL, against mosquitto --------------------------------------


def _pg_config(port: int, url: str, client_id: str = "") -> Any:
    cfg = hq_config(port, Path("/unused"), client_id)
    return cfg.model_copy(update={"hq": cfg.hq.model_copy(update={"store": url})})


def test_two_receivers_on_one_postgresql_split_and_complete(broker: Broker, pg_url: str) -> None:
    """Two receivers without client ids on one PostgreSQL: the union is every seq once,
    acked to the end, with the fleet status stored."""
    site = Site(broker.port)
    site.listen_acks()
    a = HqReceiver(_pg_config(broker.port, pg_url))
    b = HqReceiver(_pg_config(broker.port, pg_url))
    try:
        with running(a), running(b):
            site.publish(json.dumps({"state": "online", "ts": iso_ms(NOW), "version": "9"}
                                    ).encode(), topic=f"edge/{SITE}/status")
            site.events(range(1, 301))
            site.events([5, 6])
            wait_for(lambda: site.upto() == 300, 20, what="ack upto 300")
            assert a.counters["stored"] > 0 and b.counters["stored"] > 0
            assert a.counters["stored"] + b.counters["stored"] == 300
            wait_for(lambda: a.counters["duplicates"] + b.counters["duplicates"] == 2,
                     what="the two repeats counted")
            assert [e["seq"] for e in a.store.events(SITE, "sale")] == list(range(1, 301))
            assert a.fleet is not None
            wait_for(lambda: SITE in a.fleet.states(), what="the status stored")  # type: ignore[union-attr]
    finally:
        site.close()


def test_receiver_with_postgresql_down_acks_nothing_and_keeps_running(broker: Broker,
                                                                      tmp_path: Path) -> None:
    """The database killed under a running receiver: nothing more is acked, the receiver
    counts the failures and stays up (the broker keeps the events for it)."""
    from agent.testing.localpg import start_pg

    server = start_pg()
    site = Site(broker.port)
    site.listen_acks()
    try:
        url = server.create_database("down")
        rx = HqReceiver(_pg_config(broker.port, url, "hq-pg-down"))
        with running(rx):
            site.events([1, 2])
            wait_for(lambda: site.upto() == 2, what="ack upto 2")
            server.kill()
            site.events([3, 4])
            wait_for(lambda: rx.counters["store_failures"] >= 1, 30, what="a store failure")
            assert site.upto() == 2
    finally:
        site.close()
        server.stop()
