"""End to end (issue 9): every distinct sale stored, whatever the broker or the box does.

The real ``edge-agent run`` and ``edge-agent hq`` processes and a real mosquitto
(agent/testing/localsite.py). A box replaced (online, and installed while HQ is
unreachable), a wiped outbox, a restored old backup and a forged next-seq
event: HQ holds every distinct sale, reports the conflicts (exit 1), and the
outbox drains. Deep, huge and non-UTF-8 messages leave the receiver running
and appear as rejects; a forged floor does not wedge the kind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.envelope import UUIDv7, encode, iso_ms
from agent.testing.localsite import LocalSite, edge_agent_argv, sample_sale
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e

IDS = UUIDv7()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[LocalSite]:
    s = LocalSite(tmp_path / "site")
    try:
        yield s
    finally:
        s.stop()


def sell(site: LocalSite, first: int, count: int) -> list[str]:
    """POST ``count`` sales; every one must be accepted (202). Their ids."""
    ids = []
    for n in range(first, first + count):
        status, body = site.request("POST", "/v1/events/sale", {"data": sample_sale(n)})
        assert status == 202, (status, body)
        ids.append(body["id"])
    return ids


def hq_ids(site: LocalSite) -> set[str]:
    return {e["id"] for e in site.hq_events("sale")}


def depth(site: LocalSite) -> int:
    return int(site.request("GET", "/v1/status")[1]["outbox"]["kinds"]["sale"]["depth"])


def drained(site: LocalSite, ids: set[str], timeout: float = 40) -> None:
    """Every id in ``ids`` at HQ and the outbox empty (HQ acked them all)."""
    wait_for(lambda: ids <= hq_ids(site), timeout=timeout, what="every sale at HQ")
    wait_for(lambda: depth(site) == 0, timeout=timeout, what="the outbox to drain")


def hq_report(site: LocalSite) -> tuple[int, dict[str, Any]]:
    """``edge-agent hq report --json``: exit status and the sale row of the site."""
    proc = subprocess.run([*edge_agent_argv(), "hq", "report", "--json", "--config",
                           str(site.hq_config)], capture_output=True, text=True, timeout=60,
                          check=False)
    report = json.loads(proc.stdout)
    rows = {k["kind"]: k for s in report["sites"] if s["site"] == site.site_id
            for k in s["kinds"]}
    return proc.returncode, rows.get("sale", {})


def publish(site: LocalSite, topic: str, payload: bytes) -> None:
    """One QoS 1 message on the site's broker, as anyone with access to it could."""
    assert site.broker is not None
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="intruder",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", site.broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def current_epoch(site: LocalSite) -> str:
    return str(site.request("GET", "/v1/status")[1]["uplink"]["epoch"])


def forged(site: LocalSite, seq: int, **extra: Any) -> bytes:
    """An envelope of the site's sale with a new id at ``seq``: what a forger publishes."""
    return encode(event_id=IDS.new(), site=site.site_id, kind="sale", seq=seq,
                  ts=iso_ms(1.8e9), source="forger", data_json=json.dumps(sample_sale(999)),
                  extra={"epoch": current_epoch(site), **extra})


def move_to_new_box(site: LocalSite, name: str) -> None:
    """The same config on a new box: another, empty outbox directory."""
    site.agent_overrides["outbox"] = {"path": str(site.workdir / name)}
    site.write_configs()


def test_a_replaced_box_is_stored_in_full(site: LocalSite) -> None:
    """Box A sells 20 and dies with its disk; box B, same config, sells 20 (seqs 1..20
    again): HQ holds all 40, reports 20 conflicts (exit 1), and B's outbox drains."""
    site.start()
    first = set(sell(site, 0, 20))
    drained(site, first)
    assert site.agent is not None
    site.agent.kill()
    move_to_new_box(site, "outbox-b")
    site.start_agent()
    second = sell(site, 20, 20)
    drained(site, first | set(second))
    assert len(hq_ids(site)) == 40
    status, sale = hq_report(site)
    assert status == 1 and sale["conflicts"] == 20 and sale["received"] == 40
    assert sale["gaps"] == [] and sale["acked_upto"] == 20


def test_a_box_installed_while_hq_is_unreachable_sells_then_drains(site: LocalSite) -> None:
    """Box B is installed while the broker is down: it sells offline (202s), and once HQ
    is reachable every sale drains; nothing of box A or B is lost."""
    site.start()
    first = set(sell(site, 0, 10))
    drained(site, first)
    assert site.agent is not None and site.broker is not None
    site.agent.kill()
    site.broker.stop()
    move_to_new_box(site, "outbox-b")
    site.start_agent()
    offline = sell(site, 10, 15)
    assert depth(site) == 15
    site.broker.start()
    drained(site, first | set(offline), timeout=60)
    status, sale = hq_report(site)
    assert status == 1 and sale["received"] == 25 and sale["conflicts"] == 10


def test_a_wiped_outbox_is_stored_in_full(site: LocalSite) -> None:
    """The outbox directory wiped under a stopped agent: seqs restart at 1 with new ids;
    HQ keeps both sets and reports the conflicts."""
    site.start()
    first = set(sell(site, 0, 12))
    drained(site, first)
    assert site.agent is not None
    site.agent.terminate()
    shutil.rmtree(site.outbox_path)
    site.start_agent()
    again = sell(site, 12, 8)
    drained(site, first | set(again))
    assert sorted(e["seq"] for e in site.hq_events("sale")) == sorted(
        [*range(1, 13), *range(1, 9)])
    status, sale = hq_report(site)
    assert status == 1 and sale["conflicts"] == 8 and sale["received"] == 20


def test_a_restored_old_backup_is_stored_in_full(site: LocalSite) -> None:
    """The box restored from a backup taken at seq 10 while HQ holds 1..20: its new sales
    reuse seqs 11..15 with new ids; HQ holds all 25 and the outbox drains."""
    site.start()
    first = set(sell(site, 0, 10))
    drained(site, first)
    assert site.agent is not None
    site.agent.terminate()
    backup = site.workdir / "backup"
    shutil.copytree(site.outbox_path, backup)
    site.start_agent()
    later = set(sell(site, 10, 10))
    drained(site, first | later)
    site.agent.kill()
    shutil.rmtree(site.outbox_path)
    shutil.copytree(backup, site.outbox_path)
    site.start_agent()
    restored = sell(site, 20, 5)
    drained(site, first | later | set(restored))
    assert len(hq_ids(site)) == 25
    status, sale = hq_report(site)
    assert status == 1 and sale["conflicts"] == 5 and sale["gaps"] == []


def test_a_forged_next_seq_event_does_not_take_the_real_sales_place(site: LocalSite) -> None:
    """A forged envelope with seq N+1 and another id reaches HQ first; the real sale N+1
    and those after it are still stored and acked, and HQ reports the conflict."""
    site.start()
    real = set(sell(site, 0, 5))
    drained(site, real)
    fake = forged(site, 6)
    publish(site, f"edge/{site.site_id}/events/sale", fake)
    wait_for(lambda: json.loads(fake)["id"] in hq_ids(site), timeout=20,
             what="the forgery at HQ")
    real |= set(sell(site, 5, 5))
    drained(site, real)
    assert hq_ids(site) == real | {json.loads(fake)["id"]}
    status, sale = hq_report(site)
    assert status == 1 and sale["conflicts"] == 1 and sale["received"] == 11


def test_a_forged_floor_does_not_wedge_the_kind(tmp_path: Path) -> None:
    """A forged event at seq 1,000,000 claiming floor 999,999 (no valid proof): real sales
    are still acked (the outbox drains) and HQ counts the unproven claim (exit 1)."""
    site = LocalSite(tmp_path / "site", proof_keys=True)
    try:
        site.start()
        real = set(sell(site, 0, 3))
        drained(site, real)
        fake = forged(site, 1_000_000, floor=999_999)
        publish(site, f"edge/{site.site_id}/events/sale", fake)
        wait_for(lambda: json.loads(fake)["id"] in hq_ids(site), timeout=20,
                 what="the forgery at HQ")
        real |= set(sell(site, 3, 5))
        drained(site, real)
        status, sale = hq_report(site)
        assert status == 1 and sale["unproven_claims"] == 1 and sale["acked_upto"] == 8
    finally:
        site.stop()


def test_hostile_messages_become_rejects_and_the_receiver_runs_on(site: LocalSite) -> None:
    """A 100,000-deep, a 10 MB and a non-UTF-8 message on an events topic, and a kind
    outside the contract: the receiver keeps running and storing, each is a reject with
    its reason and first bytes, and the report counts them (exit 1)."""
    site.start()
    topic = f"edge/{site.site_id}/events/sale"
    publish(site, topic, b"[" * 100_000 + b"]" * 100_000)
    publish(site, topic, b'{"v":1,"pad":"' + b"x" * (10 << 20) + b'"}')
    publish(site, topic, b"\xff\xfe\x00not utf-8 at all")
    publish(site, f"edge/{site.site_id}/events/bogus", b"{}")
    real = set(sell(site, 0, 3))
    drained(site, real)
    assert site.hq is not None and site.hq.alive
    status, sale = hq_report(site)
    assert status == 1 and sale["rejected"] == 3 and sale["received"] == 3
    import sqlite3

    con = sqlite3.connect(f"file:{site.hq_db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT kind, reason, size, length(head) FROM rejects "
                           "ORDER BY rowid").fetchall()
    finally:
        con.close()
    reasons = [r[1] for r in rows]
    assert "RecursionError" in reasons[0]
    assert "over the" in reasons[1] and rows[1][2] > 10 << 20 and rows[1][3] == 256
    assert "UTF-8" in reasons[2]
    assert rows[3][0] == "bogus" and "not one of" in reasons[3]
