"""End to end (issue 3): the real edge-agent with a pty as its scanner, a WebSocket POS, HQ.

A catalog-put goes in as HQ sends it (MQTT, P/commands), scans go in as bytes
on a pty, and come out both on the WebSocket and in the HQ receiver's store.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from agent.testing.localsite import LocalSite
from hq.command import send_command
from tests.conftest import Pty, wait_for

pytestmark = pytest.mark.e2e

DEVICE = "counter-1-scanner"
TAGS = [f"1A4FF01000000220000{n:05d}" for n in range(100)]
DEBOUNCE_MS = 100


@pytest.fixture
def site(tmp_path: Path, pty: Pty) -> Iterator[LocalSite]:
    s = LocalSite(tmp_path / "site", devices=[{
        "id": DEVICE, "type": "scanner", "url": f"serial://{pty.path}?baudrate=9600",
        "terminator": "cr", "debounce_ms": DEBOUNCE_MS}])
    try:
        yield s
    finally:
        s.stop()


def scanner_state(site: LocalSite) -> str | None:
    status, body = site.request("GET", "/v1/status")
    if status != 200:
        return None
    return next((d["state"] for d in body["devices"] if d["id"] == DEVICE), None)


def ws_connect(site: LocalSite) -> ClientConnection:
    return connect(f"ws://127.0.0.1:{site.api_port}/v1/scans",
                   additional_headers={"Authorization": f"Bearer {site.token}"}, open_timeout=5)


def receive(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    return [json.loads(ws.recv(timeout=10)) for _ in range(n)]


def stalled_client(site: LocalSite) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", site.api_port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /v1/scans HTTP/1.1\r\nHost: 127.0.0.1:{site.api_port}\r\n"
                 "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                 f"Authorization: Bearer {site.token}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "the agent closed the stalled client's handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_scans_reach_the_websocket_and_hq_in_order_known_after_catalog_put(
        site: LocalSite, pty: Pty) -> None:
    """pty scans -> WebSocket and HQ store in order; known flips right after an HQ catalog-put."""
    site.start()
    assert site.broker is not None
    wait_for(lambda: scanner_state(site) == "up", 10, what="the scanner up")
    root = f"edge/{site.site_id}"
    stalled = stalled_client(site)
    try:
        with ws_connect(site) as ws:
            pty.scan(*TAGS[:5])
            before = receive(ws, 5)

            answer = send_command("127.0.0.1", site.broker.port, root, "catalog-put",
                                  {"tags": TAGS[:3]}, command_id="c1")
            assert answer == {"id": "c1", "ok": True, "error": None, "result": {
                "added": 3, "present": 0, "removed": 0, "replace": False, "count": 3}}
            bad = send_command("127.0.0.1", site.broker.port, root, "catalog-remove",
                               {"tags": [TAGS[0], "1a4ff01000000220000zzzzz"]}, command_id="c2")
            assert bad["ok"] is False and "tags.1" in bad["error"]
            assert "1a4ff01000000220000zzzzz" in bad["error"]

            # Past the debounce window, the same tags again, then a long burst.
            wait_for(lambda: time.monotonic() - pty.last_write > 1.5 * DEBOUNCE_MS / 1000, 2,
                     what="the debounce window to pass")
            pty.scan(*TAGS[:5])
            after = receive(ws, 5)
            pty.scan(*TAGS[5:65])
            burst = receive(ws, 60)
    finally:
        stalled.close()

    seen = before + after + burst
    assert [m["seq"] for m in seen] == list(range(1, 71))
    assert [m["data"]["code"] for m in seen] == TAGS[:5] + TAGS[:5] + TAGS[5:65]
    assert [m["data"]["known"] for m in before] == [False] * 5
    assert [m["data"]["known"] for m in after] == [True, True, True, False, False]
    assert {m["source"] for m in seen} == {DEVICE}
    assert all(m["data"]["device"] == DEVICE and m["data"]["valid"] for m in seen)

    wait_for(lambda: len(site.hq_events("scan")) == 70, 20, what="70 scans stored at HQ")
    stored = site.hq_events("scan")
    assert [(e["id"], e["seq"], e["data"]) for e in stored] == \
        [(m["id"], m["seq"], m["data"]) for m in seen]
    assert [e["data"]["state"] for e in site.hq_events("device")] == ["up"]


def test_catalog_survives_a_sigkill_and_judges_scans_with_hq_offline(
        site: LocalSite, pty: Pty) -> None:
    """After kill -9 and a restart with the broker down, scans are judged from the local file."""
    site.start()
    assert site.broker is not None
    root = f"edge/{site.site_id}"
    answer = send_command("127.0.0.1", site.broker.port, root, "catalog-put",
                          {"tags": TAGS[:10]}, command_id="seed")
    assert answer["ok"] and answer["result"]["count"] == 10
    assert site.agent is not None and site.hq is not None
    site.agent.kill()
    site.broker.kill()
    site.start_agent()
    wait_for(lambda: scanner_state(site) == "up", 10, what="the scanner up after the restart")
    with ws_connect(site) as ws:
        pty.scan(TAGS[9], TAGS[10])
        got = receive(ws, 2)
    assert [(m["data"]["code"], m["data"]["known"]) for m in got] == \
        [(TAGS[9], True), (TAGS[10], False)]
    status, body = site.request("GET", f"/v1/catalog?tag={TAGS[9]}")
    assert status == 200 and body["count"] == 10 and body["known"] is True

    site.broker.start()   # HQ's link is back: the scans taken offline arrive
    wait_for(lambda: [e["data"]["code"] for e in site.hq_events("scan")] == TAGS[9:11], 20,
             what="the offline scans at HQ")
    # HQ resends "seed" (it never saw the answer, say): the first result, nothing re-run.
    again = send_command("127.0.0.1", site.broker.port, root, "catalog-put",
                         {"tags": TAGS[:10]}, command_id="seed")
    assert again == answer
