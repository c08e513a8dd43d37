"""The scanners service in the real app: ptys as scanners, a real outbox, WebSocket, catalog."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from agent.commands.handlers import CommandRouter
from agent.config import AgentConfig
from agent.devices.catalog import CATALOG_FILE, Catalog
from agent.devices.family import ServiceContext, all_devices
from agent.devices.scan_feed import ScanFeed
from agent.devices.scanning import ScannerService
from agent.envelope import decode
from agent.outbox import Outbox
from agent.web.api import create_app
from agent.web.auth import Tokens
from agent.web.context import ApiContext
from drivers.scanner import reader as reader_mod
from drivers.scanner.retail_id import encode_short_url
from tests.conftest import Pty, wait_for
from tests.test_scanner_serial import SocatLink

SITE = "co-denver-01"
TOKEN = "pos-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TAG = "1A4FF0100000022000000123"
OTHER = "1A4FF0100000022000000999"
TAGS = [f"1A4FF01000000220000{n:05d}" for n in range(200)]


class Rig:
    """The real app (create_app) with a ScannerService on a real outbox, a router for commands."""

    def __init__(self, tmp: Path, devices: list[dict[str, Any]], max_bytes: int = 1 << 26
                 ) -> None:
        self.tmp = tmp
        self.cfg = AgentConfig(site={"id": SITE}, outbox={"path": str(tmp / "outbox")},
                               devices=devices)
        self.outbox = Outbox(str(tmp / "outbox"), SITE, max_bytes=max_bytes)
        self.outbox.open()
        self.service = ScannerService(self.cfg)
        self.results: list[dict[str, Any]] = []
        self.router = CommandRouter(self.results.append)
        ctx = ApiContext(cfg=self.cfg, outbox=self.outbox, tokens=Tokens({"pos-2": TOKEN}),
                         uplink_snapshot=lambda: {},
                         devices_snapshot=lambda: all_devices([self.service]),
                         started_at=time.time(), services=[self.service])
        self.client = TestClient(create_app(ctx))
        self.client.__enter__()
        assert self.client.portal is not None
        self.portal = self.client.portal
        loop = self.portal.call(asyncio.get_running_loop)
        self.portal.call(self.service.start,
                         ServiceContext(cfg=self.cfg, outbox=self.outbox, state_dir=tmp, loop=loop))
        for name, handler in self.service.commands().items():
            self.router.register(name, handler)
        self.stopped = False

    def command(self, name: str, command_id: str, args: Any) -> dict[str, Any]:
        """Dispatch as the uplink would; wait for the answer to this id."""
        before = len(self.results)
        self.router.dispatch(name, json.dumps({"id": command_id, "args": args}).encode())
        wait_for(lambda: len(self.results) > before, 5, what=f"result of {command_id}")
        return self.results[-1]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [decode(raw) for _, raw in self.outbox.read(kind, 0, 100_000)]

    def data(self, kind: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events(kind)]

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.portal.call(self.service.stop)

    def close(self) -> None:
        self.stop()
        self.client.__exit__(None, None, None)
        self.router.close()
        self.outbox.close()


@pytest.fixture
def pty() -> Iterator[Pty]:
    """A pty pair whose scans end in CR LF (the rig's scanners expect crlf)."""
    p = Pty(end="\r\n")
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def rig(tmp_path: Path, pty: Pty) -> Iterator[Rig]:
    r = Rig(tmp_path, [{"id": "counter-1-scanner", "type": "scanner",
                        "url": f"serial://{pty.path}?baudrate=9600", "terminator": "crlf",
                        "debounce_ms": 0}])
    try:
        wait_for(lambda: r.service.devices()[0]["state"] == "up", 5, what="scanner up")
        yield r
    finally:
        r.close()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# -- config ------------------------------------------------------------------------------


def test_config_issues_name_the_device_and_key() -> None:
    """Every bad scanner entry is one issue at devices[ID].key; other types are not judged."""
    cfg = AgentConfig(site={"id": SITE}, devices=[
        {"id": "ok", "type": "scanner", "url": "serial:///dev/ttyACM0?baudrate=9600"},
        {"id": "zebra", "type": "label_printer", "url": "tcp://10.0.0.50:9100"},
        {"id": "typo", "type": "scanner", "url": "serial:///dev/ttyACM1", "debounce": 500},
        {"id": "scheme", "type": "scanner", "url": "ftp://x"},
        {"id": "number", "type": "scanner", "url": "serial:///dev/ttyACM2?debounce_ms=soon"},
        {"id": "sim", "type": "scanner", "url": "sim://scanner?interval_ms=100&colour=red"},
    ])
    issues = ScannerService.config_issues(cfg)
    assert [i.path for i in issues] == ["devices[typo].debounce", "devices[scheme].url",
                                        "devices[number].debounce_ms", "devices[sim].url"]
    assert "unknown scanner option" in issues[0].message
    assert "unsupported scheme 'ftp'" in issues[1].message
    assert "whole number" in issues[2].message and "colour" in issues[3].message


def test_bad_entry_is_reported_down_and_the_rest_run(tmp_path: Path, pty: Pty) -> None:
    """A scanner with a bad option is not started and shows down with its key; the others read."""
    r = Rig(tmp_path, [
        {"id": "good", "type": "scanner", "url": f"serial://{pty.path}", "debounce_ms": 0},
        {"id": "bad", "type": "scanner", "url": "serial:///dev/nope", "terminator": "semicolon"},
        {"id": "off", "type": "scanner", "url": "serial:///dev/nope2", "enabled": False}])
    try:
        devices = {d["id"]: d for d in r.service.devices()}
        assert devices["bad"]["state"] == "down"
        assert "devices[bad].terminator" in devices["bad"]["error"]
        assert devices["off"]["state"] == "disabled"
        wait_for(lambda: r.service.devices()[0]["state"] == "up", 5, what="good scanner up")
        pty.scan(TAG)
        wait_for(lambda: r.data("scan"), 5, what="a scan from the good scanner")
    finally:
        r.close()


# -- scans, the catalog, known --------------------------------------------------------------


def test_scan_is_committed_unknown_then_known_after_catalog_put(rig: Rig, pty: Pty) -> None:
    """A package scan commits with known false; after catalog-put via the router, known true."""
    retail = encode_short_url(TAG, 7)
    pty.scan(TAG, f"]Q1{retail}", "]E04006381333931")
    wait_for(lambda: len(rig.data("scan")) == 3, 5, what="three scans committed")
    answer = rig.command("catalog-put", "c1", {"tags": [TAG, OTHER]})
    assert answer == {"id": "c1", "ok": True, "error": None,
                      "result": {"added": 2, "present": 0, "removed": 0, "replace": False,
                                 "count": 2}}
    pty.scan(TAG, f"]Q1{retail}", "1A4FF0100000022000000777")
    wait_for(lambda: len(rig.data("scan")) == 6, 5, what="three more scans")

    events = rig.events("scan")
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert {e["source"] for e in events} == {"counter-1-scanner"}
    data = [e["data"] for e in events]
    assert [(d["classification"], d["package_tag"], d["known"]) for d in data] == [
        ("package_tag", TAG, False), ("retail_id", TAG, False), ("gtin", None, None),
        ("package_tag", TAG, True), ("retail_id", TAG, True),
        ("package_tag", "1A4FF0100000022000000777", False)]
    first = data[0]
    assert first["device"] == "counter-1-scanner" and first["code"] == TAG
    assert first["valid"] is True and first["symbology"] is None
    assert data[2]["gs1"]["gtin"] == "4006381333931"


def test_garbled_read_is_an_invalid_scan_event(rig: Rig, pty: Pty) -> None:
    """Control bytes in a read give a scan event with valid false, a reason and the raw hex."""
    os.write(pty.master, b"1A4FF01\x07000022\r\n")
    wait_for(lambda: rig.data("scan"), 5, what="the garbled scan")
    (data,) = rig.data("scan")
    assert data["valid"] is False and "control byte 0x07" in data["reason"]
    assert data["known"] is None and data["package_tag"] is None
    assert bytes.fromhex(data["raw_hex"]) == b"1A4FF01\x07000022"


def test_bad_catalog_commands_are_answered_naming_the_tag(rig: Rig) -> None:
    """Bad tags, args and types get ok false naming the argument; nothing is written."""
    assert rig.command("catalog-put", "seed", {"tags": [TAG]})["ok"]
    cases = {
        "b1": ("catalog-put", {"tags": [OTHER, TAG, "1a4ff0100000022000000123", "short"]},
               'tags.2: "1a4ff0100000022000000123" is not a package tag'),
        "b2": ("catalog-put", {"tags": TAG}, "tags: required, a list"),
        "b3": ("catalog-put", {"tags": [OTHER], "replace": "yes"}, "replace: must be true"),
        "b4": ("catalog-put", {"tags": [OTHER], "mode": "x"}, "args.mode: unknown argument"),
        "b5": ("catalog-remove", {"tags": [TAG, 12]}, "tags.1: 12 is not a package tag"),
        "b6": ("catalog-remove", {}, "tags: required"),
    }
    for command_id, (name, args, message) in cases.items():
        answer = rig.command(name, command_id, args)
        assert answer["ok"] is False and answer["result"] is None, answer
        assert message in answer["error"], answer["error"]
    assert "1 more bad tag" in rig.results[-6]["error"]
    assert rig.client.get("/v1/catalog", headers=AUTH).json()["count"] == 1


def test_replace_with_no_tags_needs_allow_empty(rig: Rig) -> None:
    """catalog-put replace with an empty list is refused naming tags, unless allow_empty."""
    assert rig.command("catalog-put", "seed", {"tags": [TAG, OTHER]})["ok"]
    refused = rig.command("catalog-put", "wipe-1", {"tags": [], "replace": True})
    assert refused["ok"] is False and "allow_empty" in refused["error"], refused
    assert rig.client.get("/v1/catalog", headers=AUTH).json()["count"] == 2
    bad = rig.command("catalog-put", "wipe-2", {"tags": [], "replace": True,
                                               "allow_empty": "yes"})
    assert bad["ok"] is False and "allow_empty: must be true" in bad["error"]
    meant = rig.command("catalog-put", "wipe-3", {"tags": [], "replace": True,
                                                 "allow_empty": True})
    assert meant["ok"] and meant["result"]["removed"] == 2, meant
    assert rig.client.get("/v1/catalog", headers=AUTH).json()["count"] == 0


def test_catalog_commands_are_idempotent_by_id_even_after_a_restart(tmp_path: Path) -> None:
    """A command id applied before answers with its first result and does not run again."""
    path = tmp_path / CATALOG_FILE
    catalog = Catalog(path)
    catalog.open()
    first = catalog.put([TAG, OTHER], command_id="c1")
    assert catalog.remove([TAG], command_id="c2") == {"removed": 1, "absent": 0, "count": 1}
    catalog.close()

    again = Catalog(path)  # a restart: the router's in-memory ids are gone
    again.open()
    assert again.put([TAG, OTHER], command_id="c1") == first
    assert again.known(TAG) is False and again.known(OTHER) is True
    assert again.put([TAG], command_id="c3")["added"] == 1
    assert again.put([TAG], command_id="c4") == {"added": 0, "present": 1, "removed": 0,
                                                 "replace": False, "count": 2}
    replaced = again.put([TAGS[0], TAG], replace=True, command_id="c5")
    assert replaced == {"added": 1, "present": 1, "removed": 1, "replace": True, "count": 2}
    assert again.known(OTHER) is False and again.count() == 2
    again.close()


def test_corrupt_catalog_is_moved_aside_and_a_fresh_one_works(tmp_path: Path) -> None:
    """A catalog file that is not SQLite is set aside; the new, empty one takes commands."""
    path = tmp_path / CATALOG_FILE
    path.write_bytes(b"this is not a database" * 100)
    catalog = Catalog(path)
    catalog.open()
    assert catalog.available and catalog.moved_aside is not None
    assert Path(catalog.moved_aside).read_bytes().startswith(b"this is not")
    assert catalog.known(TAG) is False
    assert catalog.put([TAG])["count"] == 1
    catalog.close()
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_catalog_endpoint_counts_and_looks_up(rig: Rig) -> None:
    """GET /v1/catalog gives the count, and ?tag= whether it is known; bad tags 422 naming tag."""
    rig.command("catalog-put", "c1", {"tags": TAGS[:50]})
    body = rig.client.get("/v1/catalog", headers=AUTH).json()
    assert body["count"] == 50 and body["available"] is True and body["updated_at"]
    hit = rig.client.get("/v1/catalog", params={"tag": TAGS[3]}, headers=AUTH).json()
    assert hit["tag"] == TAGS[3] and hit["known"] is True and hit["added_at"].endswith("Z")
    miss = rig.client.get("/v1/catalog", params={"tag": OTHER}, headers=AUTH).json()
    assert miss["known"] is False and miss["added_at"] is None
    bad = rig.client.get("/v1/catalog", params={"tag": "nope"}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["field"] == "tag"
    assert rig.client.get("/v1/catalog").status_code == 401
    paths = rig.client.get("/openapi.json", headers=AUTH).json()["paths"]
    assert "/v1/catalog" in paths


# -- the WebSocket ---------------------------------------------------------------------------


def test_websocket_clients_get_each_scan_envelope_in_order(rig: Rig, pty: Pty) -> None:
    """Two clients each receive every scan, in order, as the envelope committed to the outbox."""
    with rig.client.websocket_connect("/v1/scans", headers=AUTH) as one, \
            rig.client.websocket_connect("/v1/scans", headers=AUTH) as two:
        wait_for(lambda: len(rig.service.feed.clients) == 2, 5, what="two clients joined")
        rig.command("catalog-put", "c1", {"tags": TAGS[:20:2]})
        for start in range(0, 60, 15):
            pty.scan(*TAGS[start:start + 15])
        got_one = [json.loads(one.receive_text()) for _ in range(60)]
        got_two = [json.loads(two.receive_text()) for _ in range(60)]
    committed = rig.events("scan")
    assert got_one == got_two == committed
    assert [m["seq"] for m in got_one] == list(range(1, 61))
    assert [m["data"]["code"] for m in got_one] == TAGS[:60]
    assert [m["data"]["known"] for m in got_one[:20]] == [True, False] * 10
    assert got_one[0]["kind"] == "scan" and got_one[0]["site"] == SITE


def test_websocket_handshake_without_a_good_token_is_refused(rig: Rig) -> None:
    """No token, an unknown one, or not Bearer: the handshake is refused naming Authorization."""
    for headers, message in (({}, "Authorization: missing"),
                             ({"Authorization": "Bearer wrong-token-0123456789"},
                              "Authorization: unknown token"),
                             ({"Authorization": "Basic abc"}, "must be 'Bearer <token>'")):
        with pytest.raises(WebSocketDisconnect) as refused, \
                rig.client.websocket_connect("/v1/scans", headers=headers):
            pass
        if isinstance(refused.value, WebSocketDenialResponse):  # an HTTP answer with a body
            assert refused.value.status_code == 401
            assert message in refused.value.json()["error"]
        else:                                                     # a close before accept
            assert refused.value.code == 1008 and message in refused.value.reason
    assert not rig.service.feed.clients


def test_a_stalled_client_loses_its_oldest_scans_and_blocks_no_one() -> None:
    """A client that never reads keeps the newest 256 messages; publishing never waits."""
    async def scenario() -> tuple[list[str], ScanFeed, Any, Any]:
        feed = ScanFeed(maxlen=256)
        stalled = feed.join("pos-stalled", "127.0.0.1:1")
        reader = feed.join("pos-2", "127.0.0.1:2")
        got: list[str] = []

        async def consume() -> None:
            while len(got) < 1000:
                text = await reader.next()
                assert text is not None
                got.append(text)

        task = asyncio.create_task(consume())
        for n in range(1000):
            feed.publish(str(n))   # synchronous: cannot wait for anyone
            if n % 50 == 0:
                await asyncio.sleep(0)
        await asyncio.wait_for(task, 5)
        return got, feed, stalled, reader

    got, feed, stalled, reader = asyncio.run(scenario())
    assert got == [str(n) for n in range(1000)]
    assert list(stalled.queue) == [str(n) for n in range(744, 1000)]
    assert stalled.dropped == 744 and reader.dropped == 0 and feed.dropped == 744


def test_scans_the_outbox_refuses_still_reach_the_pos_marked_refused(
        tmp_path: Path, pty: Pty, caplog: pytest.LogCaptureFixture) -> None:
    """At max_bytes a scan is refused; clients still get it, seq null and why; one ERROR line."""
    r = Rig(tmp_path, [{"id": "counter-1-scanner", "type": "scanner",
                        "url": f"serial://{pty.path}", "debounce_ms": 0}], max_bytes=1 << 14)
    try:
        wait_for(lambda: r.service.devices()[0]["state"] == "up", 5, what="scanner up")
        with r.client.websocket_connect("/v1/scans", headers=AUTH) as ws:
            wait_for(lambda: r.service.feed.clients, 5, what="client joined")
            for start in range(0, 120, 20):
                pty.scan(*TAGS[start:start + 20])
            got = [json.loads(ws.receive_text()) for _ in range(120)]
        assert [m["data"]["code"] for m in got] == TAGS[:120]
        committed = [m for m in got if m["seq"] is not None]
        refused = [m for m in got if m["seq"] is None]
        assert committed and refused and got[:len(committed)] == committed
        assert [m["seq"] for m in committed] == list(range(1, len(committed) + 1))
        assert all("outbox full" in m["refused"] and m["id"] is None for m in refused)
        assert len(r.data("scan")) == len(committed)
        assert r.service.devices()[0]["refused"] == len(refused)
        errors = [rec.getMessage() for rec in caplog.records
                  if rec.name == "agent.devices.scanning" and rec.levelname == "ERROR"]
        assert len(errors) == 1 and "refused a scan event" in errors[0]
    finally:
        r.close()


# -- hot-plug, status, metrics, stop -------------------------------------------------------


def test_scanner_port_vanishing_and_returning_raises_and_clears_one_alarm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """socat killed and restarted: device down/up events, one alarm raised and cleared, no loss."""
    monkeypatch.setattr(reader_mod, "BACKOFF_INITIAL_S", 0.02)
    link = SocatLink(tmp_path / "tty")
    (tmp_path / "tty").mkdir()
    link.start()
    r = Rig(tmp_path, [{"id": "counter-1-scanner", "type": "scanner",
                        "url": f"serial://{link.scanner}", "debounce_ms": 0}])
    try:
        wait_for(lambda: r.service.devices()[0]["state"] == "up", 5, what="up")
        link.write(f"{TAGS[0]}\r\n".encode())
        wait_for(lambda: len(r.data("scan")) == 1, 5, what="scan before unplug")
        link.kill()
        wait_for(lambda: [d["state"] for d in r.data("device")] == ["up", "down"], 5,
                 what="down event")
        assert r.service.devices()[0]["state"] == "down"
        status = r.client.get("/v1/status", headers=AUTH).json()
        assert status["state"] == "degraded"
        assert any(x.startswith("device_down") for x in status["reasons"])
        link.start()
        back = time.monotonic()
        link.write(b"".join(f"{t}\r\n".encode() for t in TAGS[1:21]))
        wait_for(lambda: [d["state"] for d in r.data("device")] == ["up", "down", "up"], 3,
                 what="up within 3 s")
        assert time.monotonic() - back < 3.0
        wait_for(lambda: len(r.data("scan")) == 21, 5, what="the scans sent once it was back")
        alarms = r.data("alarm")
        assert [(a["code"], a["state"], a["device"]) for a in alarms] == [
            ("scanner_down", "raised", "counter-1-scanner"),
            ("scanner_down", "cleared", "counter-1-scanner")]
        assert str(link.scanner) in alarms[0]["message"]
        assert [d["code"] for d in r.data("scan")] == TAGS[:21]
        assert r.service.devices()[0]["reopens"] == 1
    finally:
        r.close()
        link.kill()


def test_metrics_and_status_show_each_scanner(rig: Rig, pty: Pty) -> None:
    """/metrics has scans by device/classification/valid and up; /v1/status the counts."""
    rig.command("catalog-put", "c1", {"tags": [TAG]})
    pty.scan(TAG, OTHER, "]E04006381333931")
    os.write(pty.master, b"\xff\xfe\r\n")
    wait_for(lambda: len(rig.data("scan")) == 4, 5, what="four scans")
    samples = metric_samples(rig.client.get("/metrics", headers=AUTH).text)
    dev = ("device", "counter-1-scanner")
    assert samples[("edge_scans_total", (("classification", "package_tag"), dev,
                                         ("valid", "true")))] == 2
    assert samples[("edge_scans_total", (("classification", "gtin"), dev, ("valid", "true")))] \
        == 1
    assert samples[("edge_scans_total", (("classification", "other"), dev, ("valid", "false")))] \
        == 1
    assert samples[("edge_scans_unknown_package_total", (dev,))] == 1
    assert samples[("edge_scanner_up", (dev,))] == 1
    assert samples[("edge_catalog_tags", ())] == 1
    (device,) = rig.client.get("/v1/status", headers=AUTH).json()["devices"]
    assert device["id"] == "counter-1-scanner" and device["state"] == "up"
    assert device["scans"] == 4 and device["invalid"] == 1
    assert device["known"] == 1 and device["unknown"] == 1
    assert device["by_classification"]["package_tag"] == {"valid": 2, "invalid": 0}


def test_stop_is_bounded_and_closes_websocket_clients(rig: Rig, pty: Pty) -> None:
    """stop() with a reader and a client connected returns within 1 s; the client hears 1001."""
    with rig.client.websocket_connect("/v1/scans", headers=AUTH) as ws:
        wait_for(lambda: rig.service.feed.clients, 5, what="client joined")
        pty.scan(TAG)
        assert json.loads(ws.receive_text())["data"]["code"] == TAG
        started = time.monotonic()
        rig.stop()
        assert time.monotonic() - started < 1.0
        message = ws.receive()
        assert message["type"] == "websocket.close" and message["code"] == 1001
    assert rig.service.scanners["counter-1-scanner"].reader is not None
    assert rig.service.scanners["counter-1-scanner"].reader.state == "stopped"
