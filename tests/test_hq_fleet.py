"""HQ for a fleet (issue 12): many receivers, fleet state from P/status and P/health,
``hq fleet`` / ``hq send``, the HQ page's JSON API and metrics, against a real mosquitto."""

from __future__ import annotations

import io
import itertools
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.envelope import iso_ms
from agent.testing.localbroker import Broker
from agent.web.auth import Tokens
from hq import fleet as fleet_mod
from hq.config import HqReceiverConfig
from hq.fleet import (
    FleetPolicy,
    SiteState,
    apply,
    by_risk,
    fleet_rows,
    parse_health,
    parse_status,
    site_status,
)
from hq.fleet_cli import fleet_main, send_main
from hq.fleet_store import SqliteFleetStore, fault_growth
from hq.metrics import HqMetrics
from hq.receiver import HqReceiver, auto_client_id
from hq.store import SqliteStore
from hq.web import HqWebContext, create_hq_app
from tests.conftest import FakeClock, wait_for
from tests.test_hq import Site, envelope_bytes, running

NOW = 1_795_000_000.0
TOKEN = "hq-operator-token-0123456789"


def hq_cfg(port: int, db: Path, client_id: str = "", **hq: Any) -> HqReceiverConfig:
    return HqReceiverConfig(
        mqtt={"hosts": ["127.0.0.1"], "port": port, "tls": False, "keepalive_s": 5,
              "backoff_min_s": 0.05, "backoff_max_s": 0.5, "connect_timeout_s": 2.0},
        hq={"store": f"sqlite://{db}", "client_id": client_id, **hq})


def status_bytes(state: str, ts: float = NOW, version: str = "0.1.0") -> bytes:
    return json.dumps({"state": state, "ts": iso_ms(ts), "version": version}).encode()


def health_bytes(site: str, ts: float = NOW, *, sale_depth: int = 0, sale_age: float | None = None,
                 devices: list[dict[str, Any]] | None = None,
                 alarms: list[dict[str, Any]] | None = None) -> bytes:
    return json.dumps({
        "site": site, "version": "0.1.0", "ts": iso_ms(ts), "state": "healthy", "reasons": [],
        "outbox": {"kinds": {"sale": {"depth": sale_depth, "oldest_age_s": sale_age}}},
        "devices": devices or [], "alarms": alarms or []}).encode()


# -- pure: parsing hostile messages, the status rules, the risk order --------------------


@pytest.mark.parametrize("payload, why", [
    (b"\xff", "not UTF-8"),
    (b"[1]", "not a JSON object"),
    (b'{"state": "maybe", "ts": "2026-11-18T00:00:00Z"}', "'state'"),
    (b'{"state": "online", "ts": 12}', "'ts'"),
    (b'{"state": "online", "ts": "yesterday"}', "not an ISO 8601"),
    (b'{"state": "online", "ts": "2026-11-18T00:00:00Z", "version": [1]}', "'version'"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, "deeper"),
    (b'{"x": "' + b"a" * (fleet_mod.MAX_MESSAGE_BYTES + 1) + b'"}', "bytes is over"),
])
def test_bad_status_messages_are_refused_with_a_reason(payload: bytes, why: str) -> None:
    """Garbage, wrong types, deep nesting, oversize status messages: ValueError saying why."""
    with pytest.raises(ValueError, match=why):
        parse_status("co-a", payload)


def test_health_keeps_only_checked_fields_and_refuses_another_sites_body() -> None:
    """Health: junk entries are skipped, lists and text cut short, a foreign site refused."""
    with pytest.raises(ValueError, match="does not match"):
        parse_health("co-a", health_bytes("co-b"))
    body = json.loads(health_bytes("co-a", sale_depth=3, sale_age=120.0))
    body["outbox"]["kinds"]["BAD KIND"] = {"depth": 1}
    body["outbox"]["kinds"]["plant"] = {"depth": "lots", "oldest_age_s": float("1e300")}
    body["devices"] = [7, {"id": "zebra", "state": "down", "last_fault": "x" * 999,
                           "faults": {"paper_out": 2, "head_open": True, "bad": "3"}},
                       {"id": "mdns:x", "discovered": True, "state": "discovered"},
                       {"id": "off", "enabled": False, "state": "down"}]
    body["alarms"] = [{"code": "outbox_full", "state": "raised"}, {"code": "old",
                                                                  "state": "cleared"}, "junk"]
    health = parse_health("co-a", json.dumps(body).encode())
    assert health.backlog == {"sale": 3} and health.oldest_unsent_s == {"sale": 120.0}
    assert [d.id for d in health.devices] == ["zebra"]
    assert health.devices[0].faults == 2 and len(health.devices[0].last_fault or "") == 200
    assert health.devices_down == ["zebra"]
    assert [a["code"] for a in health.alarms] == ["outbox_full"]


def test_status_rules_online_offline_silent_never_seen() -> None:
    """never-seen without a message; the will's offline; silent after the health gap."""
    rules = FleetPolicy(silent_after_s=90)
    assert site_status(None, NOW, rules) == "never-seen"
    online = apply(None, parse_status("co-a", status_bytes("online")), NOW)
    assert site_status(online, NOW + 89, rules) == "online"
    assert site_status(online, NOW + 91, rules) == "silent"
    fresh = apply(online, parse_health("co-a", health_bytes("co-a")), NOW + 80)
    assert site_status(fresh, NOW + 160, rules) == "online"
    # The will carries the online status's ts: offline wins the tie ...
    offline = apply(fresh, parse_status("co-a", status_bytes("offline")), NOW + 100)
    assert site_status(offline, NOW + 101, rules) == "offline"
    # ... and a stale status stored late by a slower receiver changes nothing.
    back = apply(offline, parse_status("co-a", status_bytes("online", NOW + 200)), NOW + 200)
    late = apply(back, parse_status("co-a", status_bytes("offline", NOW)), NOW + 201)
    assert late.online is True and late.last_seen == iso_ms(NOW + 201)


def test_fleet_rows_registered_first_and_risk_order() -> None:
    """Rows cover registered and unregistered sites; risk puts offline, then deadline first."""
    cfg = HqReceiverConfig(hq={"sites": [{"id": "co-a", "name": "A", "state": "CO"},
                                         {"id": "co-b", "state": "CO"},
                                         {"id": "wa-c", "state": "WA"}]})
    states = {
        "co-a": apply(None, parse_health("co-a", health_bytes("co-a", sale_depth=5,
                                                             sale_age=20 * 3600)), NOW),
        "co-b": apply(None, parse_status("co-b", status_bytes("offline")), NOW),
        "zz-new": apply(None, parse_health("zz-new", health_bytes(
            "zz-new", devices=[{"id": "p1", "state": "down"}])), NOW),
    }
    rows = fleet_rows(cfg.hq.sites, states, NOW + 10, FleetPolicy())
    assert [(r["site"], r["status"], r["registered"]) for r in rows] == [
        ("co-a", "online", True), ("co-b", "offline", True), ("wa-c", "never-seen", True),
        ("zz-new", "online", False)]
    assert rows[0]["oldest_unsent_s"] == {"sale": 20 * 3600 + 10}  # aged since the snapshot
    assert rows[3]["devices_down"] == ["p1"]
    ordered = [r["site"] for r in by_risk(rows, 24)]
    assert ordered == ["co-b", "wa-c", "co-a", "zz-new"]


def test_fault_growth_counts_new_faults_and_survives_a_restart() -> None:
    """Fault counts grow by the difference; an agent restart (count down) counts all anew."""
    def health(n: int) -> fleet_mod.HealthMessage:
        return parse_health("co-a", health_bytes("co-a", devices=[
            {"id": "zebra", "state": "up", "faults": {"paper_out": n}}]))
    assert fault_growth(None, health(2)) == {"zebra": 2}
    assert fault_growth(health(2), health(5)) == {"zebra": 3}
    assert fault_growth(health(5), health(5)) == {}
    assert fault_growth(health(5), health(1)) == {"zebra": 1}


def test_fleet_store_round_trip_and_fault_hours(tmp_path: Path) -> None:
    """SQLite fleet tables: state survives a reopen; faults are summed per device and hour."""
    url = f"sqlite://{tmp_path}/hq.db"
    SqliteStore(str(tmp_path / "hq.db")).close()
    store = SqliteFleetStore(url)
    dev = [{"id": "zebra", "state": "down", "faults": {"paper_out": 1}}]
    store.record([parse_status("co-a", status_bytes("online")),
                  parse_health("co-a", health_bytes("co-a", devices=dev))], NOW)
    dev[0]["faults"] = {"paper_out": 4}
    store.record([parse_health("co-a", health_bytes("co-a", NOW + 30, devices=dev))], NOW + 30)
    store.close()
    again = SqliteFleetStore(url)
    state = again.states()["co-a"]
    assert state.online is True and state.health is not None
    assert state.health.devices_down == ["zebra"]
    assert again.faults("co-a", NOW - 3600) == [
        {"device": "zebra", "hour": "2026-11-18T11:00Z", "faults": 4}]
    again.close()


# -- receivers on a real mosquitto ------------------------------------------------------


def test_auto_client_ids_are_unique_and_valid() -> None:
    """Without hq.client_id every receiver gets its own id, within MQTT's 23+ char comfort."""
    ids = {auto_client_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(i.startswith("edge-hq-") and len(i) <= 64 for i in ids)


@pytest.fixture
def site(broker: Broker) -> Iterator[Site]:
    s = Site(broker.port)
    s.listen_acks()
    yield s
    s.close()


def test_two_receivers_without_client_ids_share_the_load(broker: Broker, site: Site,
                                                         tmp_path: Path) -> None:
    """Two receivers, no client id: both stay connected, events split, none lost or doubled."""
    db = tmp_path / "hq.db"
    rx1, rx2 = HqReceiver(hq_cfg(broker.port, db)), HqReceiver(hq_cfg(broker.port, db))
    assert rx1.client_id != rx2.client_id
    with running(rx1), running(rx2):
        site.events(range(1, 201))
        wait_for(lambda: site.upto() == 200, 20, what="ack upto 200")
        assert rx1.counters["connects"] == rx2.counters["connects"] == 1
    assert rx1.counters["taken_over"] == rx2.counters["taken_over"] == 0
    assert rx1.counters["received"] > 0 and rx2.counters["received"] > 0
    assert rx1.counters["received"] + rx2.counters["received"] == 200
    store = SqliteStore(str(db))
    try:
        events = store.events("co-test-01", "sale")
    finally:
        store.close()
    assert [e["seq"] for e in events] == list(range(1, 201))
    assert sum(e["dups"] for e in events) == 0


def test_a_stopped_receiver_leaves_the_share_group_at_once(broker: Broker, site: Site,
                                                           tmp_path: Path) -> None:
    """A receiver with a made-up client id that stops ends its session: the remaining one
    gets every event at once (no share queued for the gone one until its session expires)."""
    db = tmp_path / "hq.db"
    gone, stays = HqReceiver(hq_cfg(broker.port, db)), HqReceiver(hq_cfg(broker.port, db))
    with running(stays):
        with running(gone):
            pass
        site.events(range(1, 21))
        wait_for(lambda: site.upto() == 20, 5, what="every event acked by the remaining one")
    assert stays.counters["stored"] == 20 and gone.counters["received"] == 0


def test_a_shared_client_id_is_logged_once_as_a_takeover(
        broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two receivers with one id on mosquitto 2.0 (it closes the socket without a reason):
    said once per receiver as a takeover; 'lost the connection' at most once each."""
    db = tmp_path / "hq.db"
    rx1 = HqReceiver(hq_cfg(broker.port, db, client_id="edge-hq-same"))
    rx2 = HqReceiver(hq_cfg(broker.port, db, client_id="edge-hq-same"))
    caplog.set_level(logging.DEBUG, logger="hq.receiver")
    with running(rx1), running(rx2):
        wait_for(lambda: rx1.counters["taken_over"] and rx2.counters["taken_over"], 20,
                 what="both receivers to see the takeover loop")
        wait_for(lambda: rx1.counters["connects"] + rx2.counters["connects"] >= 10, 20,
                 what="a few more rounds of the loop")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("session taken over" in m for m in warnings) == 2
    assert sum("lost the connection" in m for m in warnings) <= 2


def test_a_takeover_disconnect_reason_is_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A broker's DISCONNECT 0x8E (session taken over) is said once, as that, then DEBUG."""
    rx = HqReceiver(hq_cfg(1, tmp_path / "hq.db", client_id="edge-hq-same"))
    code = ReasonCode(PacketTypes.DISCONNECT, identifier=0x8E)
    caplog.set_level(logging.DEBUG, logger="hq.receiver")
    for _ in range(3):
        rx._on_disconnect(rx._client, None, None, code, None)
    # (The receiver's start-up WARNING about a missing hq.master_key_file is not a takeover.)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
              and "master_key_file" not in r.getMessage()]
    assert len(errors) == 1 and "session taken over" in errors[0]
    assert rx.counters["taken_over"] == 3
    rx.store.close()


_PUBLISHERS = itertools.count()


def _publish(port: int, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
    # An id of its own each time: with one id, the next call's CONNECT can take the
    # session over while the broker has not read this one's QoS 0 PUBLISH yet, and
    # mosquitto drops it with the old connection (a flake on a loaded box).
    client = mqtt.Client(CallbackAPIVersion.VERSION2,
                         client_id=f"fleet-pub-{next(_PUBLISHERS)}", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port, 5)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


class Agentish:
    """A paho client with the agent's will (retained offline status) and online status."""

    def __init__(self, port: int, site: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-{site}",
                                  protocol=mqtt.MQTTv5)
        self.site = site
        self.client.will_set(f"edge/{site}/status", status_bytes("offline"), qos=1, retain=True)
        self.client.connect("127.0.0.1", port, 5)
        self.client.loop_start()
        self.client.publish(f"edge/{site}/status", status_bytes("online"), qos=1,
                            retain=True).wait_for_publish(5)

    def health(self, payload: bytes) -> None:
        self.client.publish(f"edge/{self.site}/health", payload, qos=0).wait_for_publish(5)

    def die(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker publishes the will."""
        sock = self.client.socket()
        self.client.loop_stop()
        if sock is not None:
            sock.close()


def test_fleet_state_from_status_health_and_will(broker: Broker, tmp_path: Path) -> None:
    """HQ keeps status and health per site; the will marks offline; junk counted, no crash."""
    db = tmp_path / "hq.db"
    cfg = hq_cfg(broker.port, db, sites=[{"id": "co-a", "name": "A", "state": "CO"},
                                         {"id": "co-never", "state": "CO"}])
    _publish(broker.port, "edge/co-old/status", status_bytes("online"), retain=True)
    rx = HqReceiver(cfg)
    with running(rx):
        assert rx.fleet is not None
        fleet = rx.fleet
        wait_for(lambda: "co-old" in fleet.states(), what="the retained status of co-old")
        agent = Agentish(broker.port, "co-a")
        agent.health(health_bytes("co-a", sale_depth=4, sale_age=30.0,
                                  devices=[{"id": "zebra", "state": "down"}]))
        # QoS 1: the broker has each before _publish returns (at QoS 0 a loaded CI machine
        # once left one of them unseen after 10 s); the deadline is for a loaded machine too.
        for junk in (b"\x00garbage", b'{"a":' * 50 + b"1" + b"}" * 50, health_bytes("co-b")):
            _publish(broker.port, "edge/co-a/health", junk)
        _publish(broker.port, "edge/co-a/status", b'{"state": 1}')
        wait_for(lambda: rx.counters["fleet_malformed"] == 4, 30, what="4 bad fleet messages")
        wait_for(lambda: (fleet.states().get("co-a") or SiteState("x")).health is not None,
                 what="co-a's health stored")
        out = io.StringIO()
        assert fleet_main(cfg, True, out=out) == 1  # co-never is never-seen
        rows = {r["site"]: r for r in json.loads(out.getvalue())["sites"]}
        assert rows["co-a"]["status"] == "online" and rows["co-a"]["backlog"] == {"sale": 4}
        assert rows["co-a"]["devices_down"] == ["zebra"] and rows["co-a"]["state"] == "CO"
        assert rows["co-never"]["status"] == "never-seen" and rows["co-never"]["registered"]
        assert rows["co-old"]["status"] in ("online", "silent") and not rows["co-old"][
            "registered"]
        agent.die()
        wait_for(lambda: fleet.states()["co-a"].online is False, 15, what="the will: offline")
    out = io.StringIO()
    assert fleet_main(cfg, False, out=out) == 1
    text = out.getvalue()
    assert "co-a" in text and "offline" in text and "never-seen" in text
    assert "2 of 2 registered site(s) not online" in text


def test_fleet_exit_0_when_every_registered_site_is_online(tmp_path: Path) -> None:
    """hq fleet exits 0 only when each registered site is online; 2 without a store."""
    db = tmp_path / "hq.db"
    cfg = hq_cfg(1, db, sites=[{"id": "co-a"}])
    err = io.StringIO()
    assert fleet_main(cfg, True, out=io.StringIO(), err=err) == 2
    assert "no such file" in err.getvalue()
    SqliteStore(str(db)).close()
    fleet = SqliteFleetStore(f"sqlite://{db}")
    fleet.record([parse_status("co-a", status_bytes("online"))], NOW)
    fleet.close()
    assert fleet_main(cfg, True, out=io.StringIO(), now=NOW + 5) == 0
    assert fleet_main(cfg, True, out=io.StringIO(), now=NOW + 500) == 1  # silent


def test_send_usage_errors_and_no_answer(broker: Broker, tmp_path: Path) -> None:
    """hq send: bad name/site/args exit 2 naming the option; nobody answering exits 3."""
    cfg = hq_cfg(broker.port, tmp_path / "hq.db")
    for argv, where in ((("BAD NAME", "co-a", "{}", None), "NAME"),
                        (("catalog-put", "Not A Site", "{}", None), "--site"),
                        (("catalog-put", "co-a", "[1]", None), "--args"),
                        (("catalog-put", "co-a", "{nope", None), "--args"),
                        (("catalog-put", "co-a", None, str(tmp_path / "none.json")),
                         "--args-file")):
        err = io.StringIO()
        assert send_main(cfg, *argv, out=io.StringIO(), err=err) == 2
        assert where in err.getvalue()
    err = io.StringIO()
    assert send_main(cfg, "catalog-put", "co-a", '{"tags": []}', None, timeout=1.0,
                     out=io.StringIO(), err=err) == 3
    assert "no answer" in err.getvalue()


def test_send_prints_the_result_and_exits_by_ok(broker: Broker, tmp_path: Path) -> None:
    """hq send prints the site's result; exit 0 when ok, 1 when the site says it failed."""
    cfg = hq_cfg(broker.port, tmp_path / "hq.db")
    answers = {"good": True, "bad": False}
    ready = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        name = msg.topic.rsplit("/", 1)[1]
        body = json.loads(msg.payload)
        client.publish("edge/co-a/command-results", json.dumps(
            {"id": body["id"], "ok": answers[name], "result": body["args"],
             "error": None if answers[name] else "no"}), qos=1)

    agent = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edge-co-a",
                        protocol=mqtt.MQTTv5)
    agent.on_message = on_message
    agent.on_subscribe = lambda *a: ready.set()
    agent.connect("127.0.0.1", broker.port, 5)
    agent.subscribe("edge/co-a/commands/+", qos=1)
    agent.loop_start()
    try:
        assert ready.wait(5)
        args_file = tmp_path / "args.json"
        args_file.write_text('{"tags": ["X"]}')
        out = io.StringIO()
        assert send_main(cfg, "good", "co-a", None, str(args_file), out=out) == 0
        assert json.loads(out.getvalue())["result"] == {"tags": ["X"]}
        assert send_main(cfg, "bad", "co-a", "{}", None, out=io.StringIO()) == 1
    finally:
        agent.disconnect()
        agent.loop_stop()


# -- the HQ page's JSON API and metrics (in process) ------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    db = tmp_path / "hq.db"
    cfg = hq_cfg(1, db, sites=[{"id": "co-a", "name": "Denver", "state": "CO"},
                               {"id": "wa-never", "state": "WA"}])
    store = SqliteStore(str(db))
    fleet = SqliteFleetStore(f"sqlite://{db}")
    store.store_batch([json.loads(envelope_bytes(s, site="co-a")) for s in (1, 2, 4)])
    fleet.record([parse_status("co-a", status_bytes("online")),
                  parse_health("co-a", health_bytes("co-a", sale_depth=2, sale_age=60.0,
                                                    devices=[{"id": "zebra", "state": "down",
                                                              "faults": {"paper_out": 3}}]))],
                 NOW)
    metrics = HqMetrics()

    class _Rx:  # what the metrics read of a receiver
        def __init__(self) -> None:
            self.counters = {"received": 3, "malformed": 1, "fleet_malformed": 2}
            self.store = store

    clock = FakeClock(NOW + 5)
    metrics.watch(_Rx(), fleet.states, ["co-a", "wa-never"], FleetPolicy(), clock=clock)
    app = create_hq_app(HqWebContext(cfg, Tokens({"ops": TOKEN}), store, fleet, metrics,
                                     clock=clock))
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield client
    store.close()
    fleet.close()


def test_api_fleet_sorted_by_risk_and_site_detail(api: TestClient) -> None:
    """GET /v1/fleet lists every site by risk; /v1/sites/{id} has kinds, gaps, devices, faults."""
    body = api.get("/v1/fleet").json()
    assert [s["site"] for s in body["sites"]] == ["wa-never", "co-a"]
    assert body["summary"]["never-seen"] == 1 and body["all_online"] is False
    site = api.get("/v1/sites/co-a").json()
    assert site["status"] == "online" and site["name"] == "Denver"
    assert site["kinds"][0]["gaps"] == [[3, 3]]
    assert site["devices"][0]["id"] == "zebra"
    assert site["faults"]["rows"] == [{"device": "zebra", "hour": "2026-11-18T11:00Z",
                                       "faults": 3}]


@pytest.mark.parametrize("path, status, field", [
    ("/v1/sites/NOPE", 422, "site_id"),
    ("/v1/sites/unknown-site", 404, "site_id"),
    ("/v1/sites/co-a?hours=-1", 422, "hours"),
    ("/v1/sites/co-a?hours=1e9", 422, "hours"),
    ("/v1/nothing", 404, None),
])
def test_api_hostile_requests_get_4xx_naming_the_field(api: TestClient, path: str, status: int,
                                                       field: str | None) -> None:
    """Bad ids and parameters get a 4xx in the one error shape naming the field, never a 500."""
    response = api.get(path)
    assert response.status_code == status
    assert response.json()["field"] == field


def test_api_needs_a_token_and_signs_in_with_a_cookie(api: TestClient) -> None:
    """No token: 401; a wrong one at sign-in: 401 naming token; a right one: a session cookie."""
    bare = TestClient(api.app)
    assert bare.get("/v1/fleet").status_code == 401
    assert bare.post("/v1/session", json={"token": "wrong-token-0123456789"}).json()[
        "field"] == "token"
    assert bare.post("/v1/session", content=b"{").status_code == 400
    assert bare.post("/v1/session", json={"token": TOKEN}).status_code == 200
    assert bare.get("/v1/fleet").status_code == 200
    assert bare.get("/").status_code == 200 and "edge-agent HQ" in bare.get("/").text


def test_metrics_follow_prometheus_naming(api: TestClient) -> None:
    """/metrics: _total counters, seconds histogram, per-site online and lag gauges."""
    text = api.get("/metrics").text
    for line in ('edge_hq_events_stored_total{kind="sale"} 3.0',
                 'edge_hq_rejected_total{topic="events"} 1.0',
                 'edge_hq_rejected_total{topic="fleet"} 2.0',
                 "edge_hq_conflicts_total 0.0",
                 'edge_hq_site_online{site="co-a"} 1.0',
                 'edge_hq_site_online{site="wa-never"} 0.0',
                 'edge_hq_site_status{site="wa-never",status="never-seen"} 1.0',
                 'edge_hq_site_oldest_unsent_seconds{kind="sale",site="co-a"} 60.0',
                 "edge_hq_store_batch_seconds_bucket"):
        assert line in text, line


# -- retention ----------------------------------------------------------------------------


class _Sink:
    name = "metrc"

    def __init__(self, needs: dict[tuple[str, str], int]) -> None:
        self.needs = needs

    def still_needs(self) -> dict[tuple[str, str], int]:
        return self.needs


def _retention_store(tmp_path: Path) -> tuple[SqliteStore, str]:
    """Seqs 1-5 and 7-8 ten days old, 9 fresh: the watermark is 5 (6 is missing)."""
    db = tmp_path / "hq.db"
    store = SqliteStore(str(db))
    old = NOW - 10 * 86400
    store.store_batch([json.loads(envelope_bytes(s, site="co-a", ts=old + s))
                       for s in (1, 2, 3, 4, 5, 7, 8)])
    store.store_batch([json.loads(envelope_bytes(9, site="co-a", ts=NOW))])
    assert store.watermarks()[("co-a", "sale", "")] == 5
    return store, f"sqlite://{db}"


def test_retention_deletes_only_old_events_at_or_below_the_watermark(tmp_path: Path) -> None:
    """Old events under the watermark go; old ones above it stay, so acks go on past the gap."""
    from hq.retention import SqliteRetention

    store, url = _retention_store(tmp_path)
    retention = SqliteRetention(url)
    assert retention.run(days=7, now=NOW).deleted == 5
    retention.close()
    assert [e["seq"] for e in store.events("co-a", "sale")] == [7, 8, 9]
    assert store.watermarks()[("co-a", "sale", "")] == 5
    marks = store.store_batch([json.loads(envelope_bytes(6, site="co-a", ts=NOW))])
    assert marks[("co-a", "sale", "")] == 9  # the kept 7 and 8 still count
    kinds = store.report(site="co-a", now=NOW)["sites"][0]["kinds"]
    assert kinds[0]["gaps"] == [] and kinds[0]["first_seq"] == 6
    store.close()


def test_retention_keeps_what_a_sink_still_needs_and_nothing_by_default(tmp_path: Path) -> None:
    """A sink's lowest needed seq bounds the deletion; retention_days defaults to keep all."""
    from hq.retention import SqliteRetention

    assert HqReceiverConfig().hq.retention_days == 0
    store, url = _retention_store(tmp_path)
    retention = SqliteRetention(url, [_Sink({("co-a", "sale"): 3})])
    result = retention.run(days=7, now=NOW)
    retention.close()
    assert result.deleted == 2 and result.kept_for_sinks == 1
    assert [e["seq"] for e in store.events("co-a", "sale")] == [3, 4, 5, 7, 8, 9]
    store.close()


def test_hq_sites_config_errors_name_the_key(tmp_path: Path) -> None:
    """A bad [[hq.sites]] entry is refused with its key path; a site registered twice too."""
    from agent.errors import ConfigError
    from hq.config import load_hq_config

    path = tmp_path / "hq.toml"
    path.write_text('[[hq.sites]]\nid = "co-a"\nstate = "Colorado"\n'
                    '[[hq.sites]]\nid = "co-a"\ntimezone = "Mars/Base"\n')
    with pytest.raises(ConfigError) as caught:
        load_hq_config(str(path))
    text = str(caught.value)
    assert "hq.sites.0.state" in text and "hq.sites.1.timezone" in text


# -- hq report --date ----------------------------------------------------------------------


def test_report_date_is_each_sites_local_day_grouped_by_state(tmp_path: Path) -> None:
    """--date takes each site's local day from its time zone (UTC unregistered), groups
    the rows by state, lists a registered site that stored nothing, keeps the JSON shape."""
    from hq.report import report_main

    db = tmp_path / "hq.db"
    cfg = hq_cfg(1, db, sites=[{"id": "wa-a", "state": "WA", "timezone": "America/Los_Angeles"},
                               {"id": "co-a", "state": "CO", "timezone": "America/Denver"},
                               {"id": "co-b", "state": "CO"}])
    store = SqliteStore(str(db))
    # 2026-11-22 in Denver is 07:00Z..07:00Z next day; in Los Angeles 08:00Z..08:00Z.
    day = 1_795_305_600.0  # 2026-11-22T00:00:00Z
    store.store_batch([json.loads(envelope_bytes(1, site="co-a", ts=day + 6 * 3600)),  # 21st
                       json.loads(envelope_bytes(2, site="co-a", ts=day + 8 * 3600)),
                       json.loads(envelope_bytes(3, site="co-a", ts=day + 30 * 3600)),
                       json.loads(envelope_bytes(1, site="wa-a", ts=day + 7.5 * 3600)),  # 21st
                       json.loads(envelope_bytes(2, site="wa-a", ts=day + 31 * 3600)),  # 22nd
                       json.loads(envelope_bytes(1, site="zz-x", ts=day + 3600))])
    store.close()
    out = io.StringIO()
    assert report_main(cfg, None, None, True, out=out, date="2026-11-22", now=day + 86400 * 3) \
        == 0
    report = json.loads(out.getvalue())
    rows = {r["site"]: r for r in report["sites"]}
    assert [r["site"] for r in report["sites"]] == ["co-a", "co-b", "wa-a", "zz-x"]
    assert [g["state"] for g in report["states"]] == ["CO", "WA", ""]
    co = rows["co-a"]["kinds"][0]
    assert (co["first_seq"], co["last_seq"], co["received"], co["gaps"]) == (2, 3, 2, [])
    assert rows["co-a"]["window"] == ["2026-11-22T07:00:00.000Z", "2026-11-23T07:00:00.000Z"]
    assert rows["wa-a"]["kinds"][0]["first_seq"] == 2 and rows["wa-a"]["state"] == "WA"
    assert rows["co-b"]["kinds"] == [] and rows["zz-x"]["timezone"] == "UTC"
    text = io.StringIO()
    report_main(cfg, None, None, False, out=text, date="2026-11-22", now=day + 86400 * 3)
    assert "== CO ==" in text.getvalue() and "nothing stored that day: co-b" in text.getvalue()
    err = io.StringIO()
    assert report_main(cfg, None, None, True, out=io.StringIO(), err=err, date="22/11/2026") == 2
    assert "--date" in err.getvalue()


def test_report_date_and_since_together_is_a_usage_error(tmp_path: Path) -> None:
    """--date with --since exits 2 saying to pick one."""
    from hq.report import report_main

    err = io.StringIO()
    assert report_main(hq_cfg(1, tmp_path / "hq.db"), None, "2026-11-01", True,
                       out=io.StringIO(), err=err, date="2026-11-22") == 2
    assert "--date and --since" in err.getvalue()
