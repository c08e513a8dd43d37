"""Many receivers on one PostgreSQL, end to end (issue 12 acceptance): a real mosquitto,
three real ``edge-agent`` sites, three real ``edge-agent hq`` receivers without client
ids on the suite's private PostgreSQL; one receiver SIGKILLed mid-stream."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.testing.localpg import PgServer
from agent.testing.localsite import LocalSite, Proc, edge_agent_argv, sample_sale, write_toml
from tests.conftest import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITES = ("co-denver-01", "co-boulder-02", "wa-spokane-03")
SALES = 150         # per site
KILL_AFTER = 30     # per site: the first receiver dies once about this many are stored


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[list[LocalSite]]:
    out = [LocalSite(tmp_path / s, site_id=s) for s in SITES]
    try:
        broker = out[0].start_broker()
        for site in out:
            site.broker = broker
            site.write_configs()
        yield out
    finally:
        for site in out:
            if site.agent is not None:
                site.agent.terminate()
        if out[0].broker is not None:
            out[0].broker.stop()


def _receivers(root: Path, port: int, store: str, n: int) -> list[Proc]:
    config = root / "hq.toml"
    write_toml(config, {
        # No client_id: each receiver makes its own unique one.
        "mqtt": {"hosts": ["127.0.0.1"], "port": port, "tls": False, "keepalive_s": 5,
                 "backoff_min_s": 0.1, "backoff_max_s": 1.0},
        "hq": {"store": store},
    })
    return [Proc([*edge_agent_argv(), "hq", "--config", str(config)],
                 str(root / f"hq-{i}.log")).start() for i in range(n)]


def _sell(site: LocalSite, first: int, last: int, errors: list[str]) -> None:
    for n in range(first, last + 1):
        code, body = site.request("POST", "/v1/events/sale", {"data": sample_sale(n)})
        if code != 202:
            errors.append(f"{site.site_id} sale {n}: {code} {body}")


def _stored(url: str) -> dict[str, list[tuple[int, str]]]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT site, seq, payload FROM events WHERE kind = 'sale' "
                            "ORDER BY site, seq").fetchall()
    out: dict[str, list[tuple[int, str]]] = {}
    for site, seq, payload in rows:
        out.setdefault(site, []).append((seq, json.loads(payload)["data"]["receipt_number"]))
    return out


def _drained(site: LocalSite) -> bool:
    code, status = site.request("GET", "/v1/status")
    return code == 200 and status["outbox"]["kinds"].get("sale", {}).get("depth", 1) == 0


def test_three_receivers_one_sigkilled_every_sale_once_gap_free(
        sites: list[LocalSite], pg_server: PgServer, tmp_path: Path) -> None:
    """Three receivers without client ids share one PostgreSQL; one is SIGKILLed while
    three sites sell: every sale is stored exactly once per site, seqs 1..N without a
    gap, every outbox drains, and ``hq report`` exits 0."""
    assert sites[0].broker is not None
    url = pg_server.create_database(f"many_{os.getpid()}")
    receivers = _receivers(tmp_path, sites[0].broker.port, url, 3)
    try:
        for rx in receivers:
            wait_for(lambda rx=rx: "connected to" in rx.log_tail(200) or not rx.alive, 30,
                     0.1, what="each receiver connected")
            assert rx.alive, rx.log_tail()
        for site in sites:
            site.start_agent()
        errors: list[str] = []
        sellers = [threading.Thread(target=_sell, args=(s, 1, SALES, errors)) for s in sites]
        for t in sellers:
            t.start()
        # Mid-stream: some sales stored, the sites still selling.
        wait_for(lambda: sum(len(v) for v in _stored(url).values()) >= 3 * KILL_AFTER, 60,
                 0.05, what="the first sales stored")
        receivers[0].kill()
        assert any(t.is_alive() for t in sellers), "the sites stopped selling before the kill"
        for t in sellers:
            t.join(120)
        assert errors == []
        for site in sites:
            wait_for(lambda site=site: _drained(site), 90, 0.25,
                     what=f"{site.site_id}'s outbox drained (every sale acked by HQ)")
        stored = _stored(url)
        for site in sites:
            rows = stored.get(site.site_id, [])
            assert [seq for seq, _ in rows] == list(range(1, SALES + 1)), site.site_id
            assert sorted(r for _, r in rows) == [f"R-{n:06d}" for n in range(1, SALES + 1)]
        assert all(rx.alive for rx in receivers[1:])
        report = _report(tmp_path / "hq.toml")
        assert report.returncode == 0, report.stdout + report.stderr
        kinds = {s["site"]: s["kinds"][0] for s in json.loads(report.stdout)["sites"]}
        assert set(kinds) == set(SITES)
        assert all((k["received"], k["gaps"], k["acked_upto"]) == (SALES, [], SALES)
                   for k in kinds.values())
        assert all((k["conflicts"], k["rejected"], k["duplicates"] >= 0) == (0, 0, True)
                   for k in kinds.values())
    finally:
        for rx in receivers:
            rx.terminate()


def _report(config: Path) -> subprocess.CompletedProcess[str]:
    argv: list[Any] = [*edge_agent_argv(), "hq", "report", "--json", "--config", str(config)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
