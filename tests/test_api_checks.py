"""Request checks of the local API (issue 10): device kinds, duplicate keys, the Host header."""

from __future__ import annotations

import http.client
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from agent.config import AgentConfig
from agent.envelope import decode
from agent.outbox import Outbox
from agent.testing.localsite import LocalSite, sample_sale
from agent.web.allowed_hosts import allowed_hosts
from agent.web.api import create_app
from agent.web.auth import Tokens
from agent.web.context import ApiContext
from tests.conftest import wait_for

SITE = "co-denver-01"
TOKEN = "pos-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


class App:
    def __init__(self, tmp: Path, **ctx: Any) -> None:
        self.cfg = AgentConfig(site={"id": SITE}, outbox={"path": str(tmp / "outbox")},
                               api={"advertise": False},
                               devices=[{"id": "counter-1-scanner", "type": "scanner",
                                         "url": "sim://scanner", "enabled": False}])
        self.outbox = Outbox(str(tmp / "outbox"), SITE, max_bytes=1 << 26)
        self.outbox.open()
        self.app = create_app(ApiContext(cfg=self.cfg, outbox=self.outbox,
                                         tokens=Tokens({"pos-2": TOKEN}),
                                         uplink_snapshot=lambda: {},
                                         devices_snapshot=lambda: [], started_at=time.time(),
                                         **ctx))
        self.client = TestClient(self.app)

    def post(self, kind: str, raw: str, **kw: Any) -> httpx.Response:
        return self.client.post(f"/v1/events/{kind}", content=raw.encode(), headers=AUTH, **kw)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [decode(raw) for _, raw in self.outbox.read(kind, 0, 1000)]

    def close(self) -> None:
        self.client.close()
        self.outbox.close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[App]:
    a = App(tmp_path)
    try:
        yield a
    finally:
        a.close()


@pytest.mark.parametrize("kind", ["print", "device"])
def test_agent_only_kinds_cannot_be_posted(api: App, kind: str) -> None:
    """print and device events come only from the agent: 403 naming kind, nothing stored."""
    answer = api.post(kind, '{"data": {"device": "counter-1-receipt", "outcome": "printed"}}')
    assert answer.status_code == 403, answer.text
    assert (answer.json()["field"], answer.json()["reason"]) == ("kind", "agent_only_kind")
    assert api.events(kind) == []


@pytest.mark.parametrize(("kind", "data", "field"), [
    ("scan", '{"barcode": "x"}', "data.code"),
    ("scan", '{"code": "x", "valid": true}', "data.valid"),
    ("sensor", '{"t": 21.5}', "data.device"),
    ("sensor", '{"device": "meter-1"}', "data.temperature_c"),
    ("sensor", '{"device": "meter-1", "rh_pct": 140}', "data.rh_pct"),
    ("scan", '{"code": "x", "device": "counter-1-scanner"}', "data.device"),
])
def test_posted_scans_and_readings_fit_a_schema(api: App, kind: str, data: str,
                                                field: str) -> None:
    """A caller's scan or reading is checked strictly, naming the field; it may not claim
    one of this box's devices."""
    answer = api.post(kind, f'{{"data": {data}}}')
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
    assert api.events(kind) == []


def test_a_valid_posted_reading_is_stored_as_sent(api: App) -> None:
    """A hand-held meter's reading passes, stored with the caller as its source."""
    answer = api.post("sensor", '{"data": {"device": "meter-1", "room": "Flower 2", '
                                '"temperature_c": 24.5, "rh_pct": 55}}')
    assert answer.status_code == 202, answer.text
    event = api.events("sensor")[0]
    assert event["source"] == "pos-2"
    assert event["data"] == {"device": "meter-1", "room": "Flower 2", "temperature_c": 24.5,
                             "rh_pct": 55.0}


@pytest.mark.parametrize(("raw", "field"), [
    ('{"data": {"receipt_number": "R-1"}, "data": {}}', "data"),
    ('{"data": {"code": "a", "code": "b"}}', "data.code"),
    ('{"data": {"action": "observe", "plant_tags": [{"a": 1, "a": 2}]}}', "data.plant_tags.0.a"),
])
def test_duplicate_json_keys_are_422_naming_the_key(api: App, raw: str, field: str) -> None:
    """A key given twice in one object is refused (422 naming it), never silently last-wins."""
    kind = "plant" if "plant_tags" in raw else "scan"
    answer = api.post(kind, raw)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field and "more than once" in answer.json()["error"]
    assert api.events(kind) == []


def host_app(tmp: Path, extra: list[str]) -> App:
    cfg = AgentConfig(site={"id": SITE}, api={"bind": "0.0.0.0", "allowed_hosts": extra})
    return App(tmp, allowed_hosts=allowed_hosts(cfg, hostname="Edge-Box"))


@pytest.mark.parametrize(("host", "code"), [
    ("evil.example", 400), ("evil.example:8787", 400), ("edge-box.evil.example", 400),
    ("localhost:8787", 200), ("a.localhost", 200), ("127.0.0.1:8787", 200),
    ("10.0.0.5:8787", 200), ("[::1]:8787", 200), ("edge-box:8787", 200),
    ("EDGE-BOX.local", 200), ("edge-agent-co-denver-01.local", 200),
    ("pos.store.lan", 200), ("t1.tablets.lan:8787", 200), ("tablets.lan", 200),
])
def test_only_this_boxs_names_are_answered(tmp_path: Path, host: str, code: int) -> None:
    """Host allow-list: loopback names, the box's names, IP literals, api.allowed_hosts."""
    app = host_app(tmp_path, ["pos.store.lan", ".tablets.lan"])
    try:
        answer = app.client.get("/v1/status", headers={**AUTH, "Host": host})
        assert answer.status_code == code, answer.text
        if code == 400:
            assert (answer.json()["field"], answer.json()["reason"]) == ("Host",
                                                                         "host_not_allowed")
            assert "api.allowed_hosts" in answer.json()["error"]
    finally:
        app.close()


def test_a_star_answers_any_host(tmp_path: Path) -> None:
    """api.allowed_hosts = ["*"] turns the check off."""
    app = host_app(tmp_path, ["*"])
    try:
        assert app.client.get("/healthz", headers={"Host": "evil.example"}).status_code == 200
    finally:
        app.close()


def test_a_bad_allowed_hosts_entry_is_a_config_error() -> None:
    """check-config names api.allowed_hosts.N for an entry that is not a host name."""
    with pytest.raises(ValidationError) as err:
        AgentConfig(site={"id": SITE}, api={"allowed_hosts": ["ok.lan", "http://x/"]})
    assert err.value.errors()[0]["loc"][:3] == ("api", "allowed_hosts", 1)


# --------------------------------------------------------------------- real processes


def raw_get(port: int, path: str, host: str, token: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.e2e
def test_the_real_agent_refuses_foreign_hosts_and_keeps_its_files_private(
        tmp_path: Path) -> None:
    """edge-agent run: a rebinding Host is 400, its own names work; every state file it
    makes is 0600 even under a 022 umask."""
    old = os.umask(0o022)
    site = LocalSite(tmp_path / "site")
    try:
        site.start()
        assert raw_get(site.api_port, "/v1/status", "attacker.example", site.token) == 400
        assert raw_get(site.api_port, "/v1/status", f"localhost:{site.api_port}",
                       site.token) == 200
        assert raw_get(site.api_port, "/v1/status", socket.gethostname(), site.token) == 200
        assert site.request("POST", "/v1/events/sale", {"data": sample_sale(1)})[0] == 202
        answer = site.request("POST", "/v1/session", {"token": site.token})
        assert answer[0] == 200, answer
        state = tmp_path / "site"
        wait_for(lambda: (state / "sessions.json").exists(), what="the sessions file")
        made = [p for p in (state / "outbox").rglob("*") if p.is_file()]
        made += [state / "commands.sqlite", state / "print-jobs.sqlite", state / "sessions.json"]
        assert made and {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in made} == {
            p.name: "0o600" for p in made}
    finally:
        site.stop()
        os.umask(old)


def test_openapi_documents_the_new_refusals(api: App) -> None:
    """The events route documents its 403 (agent-only kinds) in the OpenAPI document."""
    doc = api.client.get("/openapi.json", headers=AUTH).json()
    assert "403" in doc["paths"]["/v1/events/{kind}"]["post"]["responses"]
