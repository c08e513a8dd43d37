"""The local HTTP API (CONTRACT 5) against a real outbox in a temporary directory."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AgentConfig
from agent.envelope import decode
from agent.errors import ConfigError, DiskFull, EventTooLarge, OutboxError
from agent.kinds import KINDS
from agent.outbox import Outbox
from agent.web.api import create_app, outbox_writable
from agent.web.auth import Tokens
from agent.web.caller import Caller
from agent.web.context import ApiContext

SITE = "co-denver-01"
POS_TOKEN = "pos-token-0123456789abcdef"
TABLET_TOKEN = "tablet-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {POS_TOKEN}"}
TAG = "1A4FF0100000022000000123"

SALE: dict[str, Any] = {
    "receipt_number": "R-000123", "sold_at": "2026-11-22T10:03:11-07:00",
    "customer_type": "Consumer", "patient_license": None, "register": "pos-2",
    "lines": [{"package_tag": TAG, "quantity": "3.5", "unit": "Grams", "price": "35.00",
               "total": "35.00"}],
    "total": "35.00",
}
PLANT: dict[str, Any] = {
    "action": "waste", "plant_tags": ["1A4FF0200000022000000456"], "room": "Flower 2",
    "weight": "12.5", "unit": "Grams", "reason": "Trim", "method": "Grinder",
}
CONNECTED = {"state": "connected", "host": "127.0.0.1", "since": time.time(), "unacked": {},
             "acks": 3, "resends": 1, "reconnects": 2, "publish_failures": 0}


class Site:
    """An app on a real outbox, with knobs for the snapshot sources and the clock."""

    def __init__(self, tmp: Path, max_bytes: int = 1 << 26) -> None:
        self.cfg = AgentConfig(site={"id": SITE}, outbox={"path": str(tmp / "outbox")})
        self.outbox = Outbox(str(tmp / "outbox"), SITE, max_bytes=max_bytes)
        self.outbox.open()
        self.uplink: dict[str, Any] = dict(CONNECTED)
        self.devices: list[dict[str, Any]] = []
        self.ctx = ApiContext(cfg=self.cfg, outbox=self.outbox,
                              tokens=Tokens({"pos-2": POS_TOKEN, "tablet": TABLET_TOKEN}),
                              uplink_snapshot=lambda: self.uplink,
                              devices_snapshot=lambda: self.devices, started_at=time.time())
        self.app = create_app(self.ctx)
        self.client = TestClient(self.app)

    def post(self, kind: str, data: Any, headers: dict[str, str] | None = None,
             **body: Any) -> httpx.Response:
        return self.client.post(f"/v1/events/{kind}", json={"data": data, **body},
                                headers={**AUTH, **(headers or {})})

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [decode(raw) for _, raw in self.outbox.read(kind, 0, 10_000)]

    def close(self) -> None:
        self.client.close()
        self.outbox.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.close()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# -- accepting events ---------------------------------------------------------------------


def test_sale_is_committed_before_202_with_its_seq(site: Site) -> None:
    """202 {id, seq, kind} comes back and the event is already readable from the outbox."""
    answers = [site.post("sale", {**SALE, "receipt_number": f"R-{i}"}) for i in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert [a.json()["seq"] for a in answers] == [1, 2, 3]
    events = site.events("sale")
    assert [(e["id"], e["seq"], e["kind"]) for e in events] == \
        [(a.json()["id"], a.json()["seq"], "sale") for a in answers]
    assert events[0]["site"] == SITE and events[0]["source"] == "pos-2"
    assert events[2]["data"]["receipt_number"] == "R-2"
    assert events[0]["data"]["lines"][0]["package_tag"] == TAG


def test_plant_and_alarm_and_driver_kinds_are_accepted(site: Site) -> None:
    """plant, alarm and a caller's scan and sensor reading each get their own seq 1."""
    for kind, data in (("plant", PLANT), ("alarm", {"code": "door", "message": "open"}),
                       ("scan", {"code": "Grüne Süße ✓"}),
                       ("sensor", {"device": "handheld-1", "temperature_c": 21.5})):
        answer = site.post(kind, data)
        assert answer.status_code == 202, answer.text
        assert answer.json()["seq"] == 1 and answer.json()["kind"] == kind
    assert site.events("scan")[0]["data"] == {"code": "Grüne Süße ✓"}


def test_idempotency_key_replays_the_first_answer(site: Site) -> None:
    """The same Idempotency-Key and body twice gives one event and the same answer, replayed."""
    key = {"Idempotency-Key": "R-000123/attempt"}
    first = site.post("sale", SALE, key)
    second = site.post("sale", dict(reversed(SALE.items())), key)  # key order is not the body
    assert first.status_code == second.status_code == 202
    assert second.json() == first.json()
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert len(site.events("sale")) == 1
    # Another caller's identical key is another event (keys are scoped by caller).
    other = site.client.post("/v1/events/sale", json={"data": SALE},
                             headers={"Authorization": f"Bearer {TABLET_TOKEN}", **key})
    assert other.status_code == 202 and other.json()["seq"] == 2


def test_idempotency_key_reused_with_another_body_is_422(site: Site) -> None:
    """The key again with another sale: 422 naming the header, nothing written (issue 9)."""
    key = {"Idempotency-Key": "R-000123/attempt"}
    first = site.post("sale", SALE, key)
    assert first.status_code == 202
    other = site.post("sale", {**SALE, "receipt_number": "R-other"}, key)
    assert other.status_code == 422, other.text
    assert other.json()["field"] == "Idempotency-Key"
    assert "different request body" in other.json()["error"]
    assert len(site.events("sale")) == 1
    # The first body still replays its answer.
    again = site.post("sale", SALE, key)
    assert again.status_code == 202 and again.json() == first.json()


async def _post_concurrently(app: Any, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
        return list(await asyncio.gather(*(
            client.post("/v1/events/sale", json={"data": body},
                        headers={**AUTH, "Idempotency-Key": "same"}) for body in bodies)))


def test_concurrent_reuse_with_another_body_stores_one(site: Site) -> None:
    """Two bodies under one key at once (one group commit): one stored, the other 422."""
    bodies = [SALE, {**SALE, "receipt_number": "R-other"}] * 3
    answers = asyncio.run(_post_concurrently(site.app, bodies))
    codes = sorted(a.status_code for a in answers)
    assert codes == [202, 202, 202, 422, 422, 422]
    assert len(site.events("sale")) == 1


async def _post_same_key_concurrently(app: Any, n: int) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
        return list(await asyncio.gather(*(
            client.post("/v1/events/sale", json={"data": SALE},
                        headers={**AUTH, "Idempotency-Key": "same"}) for _ in range(n))))


def test_concurrent_requests_with_one_key_make_one_event(site: Site) -> None:
    """Ten simultaneous posts with one Idempotency-Key: one event, ten identical answers."""
    answers = asyncio.run(_post_same_key_concurrently(site.app, 10))
    assert {a.status_code for a in answers} == {202}
    assert len({json.dumps(a.json()) for a in answers}) == 1
    assert len(site.events("sale")) == 1


async def _post_counting_tasks(app: Any, n: int) -> tuple[list[int], list[str]]:
    loop = asyncio.get_running_loop()
    made: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        made.append(getattr(coro, "__qualname__", repr(coro)))
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(factory)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
        answers = [await client.post("/v1/events/sale", json={"data": SALE}, headers=AUTH)
                   for _ in range(n)]
    return [a.status_code for a in answers], made


def test_an_event_post_hands_its_event_over_without_a_task_of_its_own(site: Site) -> None:
    """The event route queues its event when it runs (Outbox.enqueue) and shields that
    future: no task per request around Outbox.append, a loop pass less before the
    hand-over to the writer; still 202 after the commit, one event each."""
    codes, made = asyncio.run(_post_counting_tasks(site.app, 5))
    assert codes == [202] * 5
    assert [name for name in made if "append" in name] == []
    assert len(site.events("sale")) == 5


@pytest.mark.parametrize("key", ["", " ", "k" * 201, "clé", "tab\there"])
def test_bad_idempotency_key_is_400_naming_the_header(site: Site, key: str) -> None:
    """An empty, too long or non-printable Idempotency-Key is refused, nothing written."""
    answer = site.client.post("/v1/events/sale", json={"data": SALE},
                              headers={**AUTH, "Idempotency-Key": key.encode()})
    assert answer.status_code == 400
    assert answer.json()["field"] == "Idempotency-Key"
    assert site.events("sale") == []


def test_source_is_the_token_name_and_a_label_only_refines_it(site: Site) -> None:
    """The caller's token name leads the source; a body or header label is appended."""
    assert site.post("sale", SALE, source="register-3").status_code == 202
    assert site.post("sale", SALE, {"X-Edge-Source": "register-4"}).status_code == 202
    assert site.post("sale", SALE, source="pos-2").status_code == 202
    assert [e["source"] for e in site.events("sale")] == \
        ["pos-2/register-3", "pos-2/register-4", "pos-2"]
    clash = site.post("sale", SALE, {"X-Edge-Source": "b"}, source="a")
    assert clash.status_code == 422 and clash.json()["field"] == "source"
    spoof = site.post("sale", SALE, source="../tablet")
    assert spoof.status_code == 422 and spoof.json()["field"] == "source"


# -- authentication -----------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": f"Basic {POS_TOKEN}"},
    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {POS_TOKEN}x"},
])
def test_missing_or_wrong_token_is_401_on_every_route_but_healthz(site: Site,
                                                                   headers: dict[str, str]) -> None:
    """Every data route needs a known bearer token; 401 says Bearer and names the header.

    Only /healthz and the site page's sign-in shell (/, /static) are open; the
    shell holds no data and signs in through POST /v1/session.
    """
    for method, path in (("POST", "/v1/events/sale"), ("GET", "/v1/status"), ("GET", "/metrics"),
                         ("GET", "/openapi.json"), ("GET", "/v1/page")):
        answer = site.client.request(method, path, json={"data": SALE}, headers=headers)
        assert answer.status_code == 401, (path, answer.text)
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert answer.json()["field"] == "Authorization"
        assert POS_TOKEN not in answer.text
    assert site.client.get("/healthz").json() == {"ok": True}
    assert site.events("sale") == []


def test_tokens_file_parsing_names_lines_never_tokens(tmp_path: Path) -> None:
    """Comments and blanks are skipped; a bad line is reported by number, without its token."""
    path = tmp_path / "tokens"
    path.write_text(f"# site tokens\n\npos-1 {POS_TOKEN}\n  tablet   {TABLET_TOKEN}  \n",
                    encoding="utf-8")
    tokens = Tokens.load(str(path))
    assert tokens.names == ["pos-1", "tablet"]
    assert tokens.check(POS_TOKEN) == "pos-1" and tokens.check(TABLET_TOKEN) == "tablet"
    assert tokens.check("nope") is None and tokens.check("") is None
    assert POS_TOKEN not in repr(tokens)
    assert tokens.local_token() == POS_TOKEN

    secret = "s3cret-token-that-must-not-leak"
    path.write_text(f"pos-1 {POS_TOKEN}\n{secret}\npos-1 {secret}x\nbad/name {secret}y\n"
                    f"short abc\ncopy {POS_TOKEN}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        Tokens.load(str(path))
    text = str(err.value)
    assert secret not in text and POS_TOKEN not in text and "abc" not in text
    for line in ("line 2", "line 3", "line 4", "line 5", "line 6"):
        assert line in text
    with pytest.raises(ConfigError, match="not found"):
        Tokens.load(str(tmp_path / "missing"))


# -- body size ----------------------------------------------------------------------------


def test_body_over_1_mib_with_content_length_is_413_before_parsing(site: Site) -> None:
    """A declared Content-Length over 1 MiB is refused at once, token or not."""
    big = b'{"data": "' + b"x" * (1 << 20) + b'"}'
    for headers in (AUTH, {}):
        answer = site.client.post("/v1/events/sale", content=big,
                                  headers={**headers, "Content-Type": "application/json"})
        assert answer.status_code == 413
        assert answer.json()["reason"] == "body_too_large"
    assert site.events("sale") == []
    assert site.client.post("/v1/events/sale", content=b"{}",
                            headers={**AUTH, "Content-Type": "application/json",
                                     "Content-Length": "12abc"}).status_code == 400


async def _asgi_post_chunks(app: Any, chunks: Iterator[bytes],
                            headers: tuple[tuple[bytes, bytes], ...] = (
                                (b"transfer-encoding", b"chunked"),)) -> list[dict[str, Any]]:
    """Drive the app like a server does, one receive() per chunk."""
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/events/sale", "raw_path": b"/v1/events/sale",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 8787),
             "headers": [(b"authorization", f"Bearer {POS_TOKEN}".encode()),
                         (b"content-type", b"application/json"), *headers]}

    async def receive() -> dict[str, Any]:
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_chunked_body_over_1_mib_is_413_without_reading_further(site: Site) -> None:
    """A streamed body is counted as it arrives; at 1 MiB + 1 byte: 413, and no more reads."""
    read = 0

    def endless() -> Iterator[bytes]:
        nonlocal read
        yield b'{"data": "'
        while True:
            read += 1
            yield b"x" * 65536

    sent = asyncio.run(_asgi_post_chunks(site.app, endless()))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["reason"] == "body_too_large"
    assert len(sent) == 2
    # The 10-byte head plus 16 chunks of 64 KiB cross 1 MiB; nothing is read after that.
    assert read == 16
    assert site.events("sale") == []


@pytest.mark.parametrize(("declared", "expect", "drained", "closed"), [
    (2 << 20, False, True, False),     # discarded to its end, so urllib-style clients read the 413
    (2 << 20, True, False, True),      # Expect: 100-continue: the body was never sent
    (100 << 20, False, False, True),   # too long to discard: answer and cut the connection
])
def test_declared_oversize_is_413_before_the_app_reads(site: Site, declared: int, expect: bool,
                                                      drained: bool, closed: bool) -> None:
    """Over 1 MiB declared: 413 before parsing; the body is discarded only when that is cheap."""
    chunk = 1 << 16
    read = 0

    def body() -> Iterator[bytes]:
        nonlocal read
        for _ in range(declared // chunk):
            read += 1
            yield b"x" * chunk

    headers: tuple[tuple[bytes, bytes], ...] = ((b"content-length", str(declared).encode()),)
    if expect:
        headers += ((b"expect", b"100-continue"),)
    sent = asyncio.run(_asgi_post_chunks(site.app, body(), headers))
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["reason"] == "body_too_large"
    assert read == (declared // chunk if drained else 0)
    assert ((b"connection", b"close") in sent[0]["headers"]) is closed
    assert site.events("sale") == []


def test_chunked_body_under_the_limit_is_accepted(site: Site) -> None:
    """A small chunked body is read to its end and accepted."""
    body = json.dumps({"data": SALE}).encode()
    sent = asyncio.run(_asgi_post_chunks(site.app, iter([body[:10], body[10:]])))
    assert sent[0]["status"] == 202
    assert len(site.events("sale")) == 1


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "status", "field"), [
    (b"{", 400, "body"),
    (b"", 400, "body"),
    (b"   ", 400, "body"),
    (b"\xff\xfe{}", 400, "body"),
    (b'{"data": NaN}', 400, "body"),
    (b'{"data": {"x": 1e999}}', 400, "body"),
    (b'{"data": {"x": ' + b"9" * 5000 + b"}}", 400, "body"),
    (b"[" * 100_000, 400, "body"),
    (b"[1, 2]", 422, "body"),
    (b'"sale"', 422, "body"),
    (b"null", 422, "body"),
    (b"{}", 422, "data"),
    (b'{"date": {}}', 422, "date"),
    (b'{"data": []}', 422, "data"),
    (b'{"data": "x"}', 422, "data"),
    (b'{"data": {}, "source": 5}', 422, "source"),
    (b'{"data": {"receipt_number": "R\\ud800"}}', 422, "data.receipt_number"),
    (b'{"data": {"note": "a\\u0000b"}}', 422, "data.note"),
    (b'{"data": ' + b'{"a": ' * 40 + b"1" + b"}" * 41, 422, "data.a.a.a.a.a.a.a.a.a.a.a.a.a"),
])
def test_malformed_bodies_get_4xx_naming_the_problem(site: Site, raw: bytes, status: int,
                                                     field: str) -> None:
    """Malformed JSON is 400, a well-formed body of the wrong shape 422; each names its field."""
    answer = site.client.post("/v1/events/sale", content=raw,
                              headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) >= {"error", "field", "problems"}
    assert body["field"].startswith(field), body
    assert site.events("sale") == []


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_wrong_content_type_is_415(site: Site, content_type: str | None) -> None:
    """Only JSON is taken; anything else is 415 naming Content-Type."""
    headers = dict(AUTH)
    if content_type:
        headers["Content-Type"] = content_type
    answer = site.client.post("/v1/events/sale", content=json.dumps({"data": SALE}),
                              headers=headers)
    assert answer.status_code == 415
    assert answer.json()["field"] == "Content-Type"


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) else last
    if value is KeyError:
        del node[key]
    else:
        node[key] = value
    return data


@pytest.mark.parametrize(("path", "value", "field"), [
    ("lines.0.package_tag", "1a4ff0100000022000000123", "data.lines.0.package_tag"),
    ("lines.0.package_tag", "SHORT", "data.lines.0.package_tag"),
    ("lines.0.quantity", 3.5, "data.lines.0.quantity"),
    ("lines.0.quantity", "three", "data.lines.0.quantity"),
    ("lines.0.unit", "Bags", "data.lines.0.unit"),
    ("lines", [], "data.lines"),
    ("lines", "everything", "data.lines"),
    ("total", "99.00", "data.total"),
    ("customer_type", "Patient", "data.patient_license"),
    ("customer_type", "Alien", "data.customer_type"),
    ("receipt_number", KeyError, "data.receipt_number"),
    ("receipt_number", 123, "data.receipt_number"),
    ("sold_at", "2026-11-22T10:03:11", "data.sold_at"),
    ("sold_at", "yesterday", "data.sold_at"),
])
def test_bad_sales_get_422_naming_the_field(site: Site, path: str, value: Any,
                                            field: str) -> None:
    """Wrong types, bad tags, totals that do not add up, a Patient without licence: 422 + field."""
    answer = site.post("sale", _with(SALE, path, value))
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["field"] == field, body
    assert body["problems"] and body["problems"][0]["field"] == field
    assert site.events("sale") == []


@pytest.mark.parametrize(("path", "value", "field"), [
    ("weight", KeyError, "data.weight"),
    ("unit", None, "data.unit"),
    ("plant_tags", [], "data.plant_tags"),
    ("plant_tags.0", "nope", "data.plant_tags.0"),
    ("action", "sell", "data.action"),
])
def test_bad_plant_events_get_422_naming_the_field(site: Site, path: str, value: Any,
                                                   field: str) -> None:
    """A plant waste without weight or unit, or with bad tags, is 422 naming the field."""
    answer = site.post("plant", _with(PLANT, path, value))
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
    assert site.events("plant") == []


@pytest.mark.parametrize("kind", ["..%2Fetc", "../etc", "sale;drop", "x" * 10_000, "säle", "SALE",
                                  "sale%00", "%F0%9F%92%A3", "sale ", "__proto__"])
def test_hostile_kinds_get_404_not_500(site: Site, kind: str) -> None:
    """A kind outside KINDS is 404 (field kind when it reaches the route); never a 5xx."""
    answer = site.client.post(f"/v1/events/{kind}", json={"data": SALE}, headers=AUTH)
    assert answer.status_code == 404, answer.text
    body = answer.json()
    assert set(body) >= {"error", "field", "problems"}
    assert len(answer.text) < 500  # a 10k-character kind is not echoed back whole
    if body["field"] is not None:
        assert body["field"] == "kind"
    for k in KINDS:
        assert site.events(k) == []


def test_unknown_paths_and_methods_use_the_error_shape(site: Site) -> None:
    """Routing errors (404, 405) answer the same JSON shape as everything else."""
    missing = site.client.get("/v2/nothing", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]
    wrong = site.client.delete("/v1/status", headers=AUTH)
    assert wrong.status_code == 405 and set(wrong.json()) >= {"error", "field", "problems"}


# -- outbox refusals ------------------------------------------------------------------------


def test_outbox_full_is_507_with_a_clear_message(tmp_path: Path) -> None:
    """At max_bytes a sale gets 507 reason outbox_full, nothing written, status degraded."""
    s = Site(tmp_path, max_bytes=1 << 16)
    try:
        accepted = 0
        for i in range(1000):
            answer = s.post("sale", {**SALE, "receipt_number": f"R-{i}"})
            if answer.status_code != 202:
                break
            accepted += 1
        assert answer.status_code == 507, answer.text
        body = answer.json()
        assert body["reason"] == "outbox_full"
        assert "outbox full" in body["error"] and "max_bytes" in body["error"]
        assert answer.headers["retry-after"]
        assert 0 < accepted == len(s.events("sale"))
        status = s.client.get("/v1/status", headers=AUTH).json()
        assert status["state"] == "degraded"
        assert any(r.startswith("outbox_full") for r in status["reasons"])
        samples = metric_samples(s.client.get("/metrics", headers=AUTH).text)
        assert samples[("edge_refusals_total", (("reason", "outbox_full"),))] >= 1
    finally:
        s.close()


class _FailingOutbox:
    """The real outbox, except that append raises what the test says."""

    def __init__(self, real: Outbox, exc: BaseException) -> None:
        self._real = real
        self._exc = exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def append(self, *args: Any, **kwargs: Any) -> Any:
        raise self._exc

    def enqueue(self, *args: Any, **kwargs: Any) -> Any:
        """The route's way in: the error comes when the future is awaited."""
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(self._exc)
        return failed


@pytest.mark.parametrize(("exc", "status", "reason"), [
    (DiskFull("/var/lib/edge-agent/outbox"), 507, "disk_full"),
    (EventTooLarge("sale", 5_000_000, 4_194_304), 413, "event_too_large"),
    (OutboxError("outbox is closed"), 503, "outbox_unavailable"),
    (RuntimeError("a bug"), 500, "internal"),
])
def test_outbox_errors_map_to_their_status(site: Site, exc: BaseException, status: int,
                                           reason: str, caplog: pytest.LogCaptureFixture) -> None:
    """DiskFull 507, EventTooLarge 413, other OutboxError 503; a bug is a logged JSON 500."""
    site.ctx.outbox = _FailingOutbox(site.outbox, exc)  # type: ignore[assignment]
    app = create_app(site.ctx)
    with caplog.at_level(logging.ERROR), TestClient(app) as client:
        answer = client.post("/v1/events/sale", json={"data": SALE}, headers=AUTH)
    assert answer.status_code == status
    assert answer.json()["reason"] == reason
    if status == 500:
        assert "a bug" in caplog.text and "Traceback" in caplog.text
        assert "a bug" not in answer.text


def test_healthz_is_503_when_the_outbox_cannot_write() -> None:
    """/healthz reports a full disk or a dead writer as not writable."""
    assert outbox_writable(SimpleNamespace(state="ok"))[0] is True  # type: ignore[arg-type]
    ok, reason = outbox_writable(SimpleNamespace(state="disk_full"))  # type: ignore[arg-type]
    assert not ok and reason and reason.startswith("disk_full")


# -- status, metrics, openapi ---------------------------------------------------------------


def test_status_has_the_contract_shape(site: Site) -> None:
    """GET /v1/status: site, version, state, reasons, uplink, outbox per kind, devices, alarms."""
    site.post("sale", SALE)
    status = site.client.get("/v1/status", headers=AUTH).json()
    assert set(status) >= {"site", "version", "state", "reasons", "uplink", "outbox", "devices",
                           "alarms"}
    assert status["site"] == SITE and status["state"] == "healthy" and status["reasons"] == []
    assert status["uplink"]["state"] == "connected"
    box = status["outbox"]
    assert set(box) >= {"state", "bytes", "max_bytes", "kinds", "counters"}
    assert set(box["kinds"]) == set(KINDS)
    sale = box["kinds"]["sale"]
    assert set(sale) == {"depth", "bytes", "oldest_age_s", "first_seq", "last_seq"}
    assert sale["depth"] == 1 and sale["first_seq"] == 1 and sale["last_seq"] == 1
    assert sale["oldest_age_s"] is not None and sale["oldest_age_s"] >= 0
    assert box["kinds"]["plant"]["oldest_age_s"] is None


def test_status_degrades_with_named_reasons(site: Site) -> None:
    """Uplink down > 60 s, a device down and an old unsent sale each add a coded reason."""
    site.post("sale", SALE)
    site.uplink = {"state": "connecting", "host": "hq", "since": time.time() - 120}
    site.devices = [{"id": "counter-1-scanner", "type": "scanner", "state": "down",
                     "last_fault": "/dev/ttyACM0 vanished"},
                    {"id": "zebra", "type": "label_printer", "state": "up"}]
    real = time.time
    site.ctx.clock = lambda: real() + 13 * 3600  # the sale is 13 h old; half of 24 h is 12
    status = site.client.get("/v1/status", headers=AUTH).json()
    assert status["state"] == "degraded"
    codes = sorted(r.split(":", 1)[0] for r in status["reasons"])
    assert codes == ["device_down", "report_deadline", "uplink_down"]
    assert "counter-1-scanner" in " ".join(status["reasons"])
    site.uplink = {"state": "connecting", "since": real() - 5}
    site.devices = []
    site.ctx.clock = real
    assert site.client.get("/v1/status", headers=AUTH).json()["state"] == "healthy"


def test_status_survives_a_failing_snapshot(site: Site) -> None:
    """A snapshot source that raises degrades status instead of failing it."""
    def broken() -> dict[str, Any]:
        raise RuntimeError("uplink bug")
    site.ctx.uplink_snapshot = broken
    answer = site.client.get("/v1/status", headers=AUTH)
    assert answer.status_code == 200
    assert answer.json()["reasons"][0].startswith("snapshot_failed")


def test_metrics_export_every_family(site: Site) -> None:
    """/metrics has the outbox, uplink, refusal, commit and HTTP families, read at scrape time."""
    site.post("sale", SALE)
    site.client.post("/v1/events/nope", json={"data": {}}, headers=AUTH)
    site.client.get("/no/such/path", headers=AUTH)
    text = site.client.get("/metrics", headers=AUTH).text
    families = {f.name for f in text_string_to_metric_families(text)}
    assert families >= {
        "edge_outbox_depth", "edge_outbox_bytes", "edge_outbox_oldest_age_seconds",
        "edge_outbox_unacked", "edge_uplink_connected", "edge_acks", "edge_resends",
        "edge_reconnects", "edge_refusals", "edge_outbox_commits", "edge_http_requests"}
    samples = metric_samples(text)
    assert samples[("edge_outbox_depth", (("kind", "sale"),))] == 1
    assert samples[("edge_outbox_bytes", (("kind", "sale"),))] > 0
    assert samples[("edge_uplink_connected", ())] == 1
    assert samples[("edge_acks_total", ())] == 3
    assert samples[("edge_reconnects_total", ())] == 2
    assert samples[("edge_outbox_commits_total", ())] >= 1
    http = (("route", "/v1/events/{kind}"), ("status", "202"))
    assert samples[("edge_http_requests_total", http)] == 1
    assert samples[("edge_http_requests_total", (("route", "/v1/events/{kind}"),
                                                 ("status", "404")))] == 1
    assert samples[("edge_http_requests_total", (("route", "unmatched"), ("status", "404")))] == 1


def test_openapi_is_served_behind_the_token(site: Site) -> None:
    """/openapi.json documents the event route, its errors and the Sale and Plant payloads."""
    doc = site.client.get("/openapi.json", headers=AUTH).json()
    post = doc["paths"]["/v1/events/{kind}"]["post"]
    assert {"202", "400", "401", "404", "413", "415", "422", "507"} <= set(post["responses"])
    assert {"Sale", "Plant", "SaleLine"} <= set(doc["components"]["schemas"])
    assert "/healthz" in doc["paths"] and "/v1/status" in doc["paths"]
    assert site.client.get("/", headers=AUTH).status_code == 200


# -- fuzz -----------------------------------------------------------------------------------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=25)
sale_paths = ["receipt_number", "sold_at", "customer_type", "patient_license", "lines",
              "lines.0", "lines.0.package_tag", "lines.0.quantity", "lines.0.unit",
              "lines.0.price", "lines.0.total", "total", "taxes", "extra"]
mutated_sales = st.builds(lambda path, value: {"data": _with(SALE, path, value)},
                          st.sampled_from(sale_paths), json_values)
bodies = (json_values.map(lambda v: json.dumps(v).encode())
          | st.dictionaries(st.sampled_from(["data", "source", "x"]), json_values)
          .map(lambda v: json.dumps(v).encode())
          | mutated_sales.map(lambda v: json.dumps(v).encode())
          | st.binary(max_size=200))


def test_fuzzed_bodies_never_get_a_5xx(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Random JSON (and non-JSON) bodies posted as sales get 202/400/413/415/422, never 5xx."""
    s = Site(tmp_path_factory.mktemp("fuzz"))

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=bodies, content_type=st.sampled_from(["application/json", "application/json",
                                                      "text/plain"]))
    def fuzz(body: bytes, content_type: str) -> None:
        answer = s.client.post("/v1/events/sale", content=body,
                               headers={**AUTH, "Content-Type": content_type})
        assert answer.status_code in {202, 400, 413, 415, 422}, (body, answer.text)
        assert set(answer.json()) >= ({"id", "seq", "kind"} if answer.status_code == 202
                                      else {"error", "field", "problems"})

    try:
        fuzz()
    finally:
        s.close()


def test_service_routes_are_counted_under_their_template(site: Site) -> None:
    """Routes a device family adds (an included router) are labelled by template, not unmatched."""
    echo_router = APIRouter()

    @echo_router.get("/v1/echo/{word}")
    async def echo(word: str, _: Caller) -> dict[str, str]:
        return {"word": word}

    ctx = ApiContext(cfg=site.cfg, outbox=site.outbox, tokens=site.ctx.tokens,
                     uplink_snapshot=lambda: site.uplink, devices_snapshot=list,
                     started_at=time.time(), services=[])
    with TestClient(create_app(ctx, [echo_router])) as client:
        assert client.get("/v1/echo/hi", headers=AUTH).json() == {"word": "hi"}
        samples = metric_samples(client.get("/metrics", headers=AUTH).text)
    assert samples[("edge_http_requests_total", (("route", "/v1/echo/{word}"),
                                                 ("status", "200")))] == 1


# -- the fast lane (AgentApp) ---------------------------------------------------------------


FAST_LANE_CASES: list[tuple[str, dict[str, str], bytes]] = [
    ("sale", {**AUTH, "Content-Type": "application/json"}, json.dumps({"data": SALE}).encode()),
    ("sale", {"Content-Type": "application/json"}, json.dumps({"data": SALE}).encode()),
    ("sale", {"Authorization": "Bearer nope", "Content-Type": "application/json"}, b"{}"),
    ("sale", {**AUTH, "Content-Type": "text/plain"}, json.dumps({"data": SALE}).encode()),
    ("sale", AUTH, json.dumps({"data": SALE}).encode()),
    ("nope", {**AUTH, "Content-Type": "application/json"}, b"{}"),
    ("device", {**AUTH, "Content-Type": "application/json"}, b'{"data": {}}'),
    ("sale", {**AUTH, "Content-Type": "application/json"}, b'{"data": '),
    ("sale", {**AUTH, "Content-Type": "application/json"}, b""),
    ("sale", {**AUTH, "Content-Type": "application/json"}, b'{"data": {"a": 1, "a": 2}}'),
    ("sale", {**AUTH, "Content-Type": "application/json"}, b'{"data": {"n": "a\\u0000"}}'),
    ("sale", {**AUTH, "Content-Type": "application/json"}, b'{"data": {}, "extra": 1}'),
    ("sale", {**AUTH, "Content-Type": "application/json"}, b'{"source": "x"}'),
    ("sale", {**AUTH, "Content-Type": "application/json"},
     json.dumps({"data": {**SALE, "lines": [{**SALE["lines"][0], "package_tag": "x"}]}})
     .encode()),
    ("sale", {**AUTH, "Content-Type": "application/json", "Idempotency-Key": " bad"},
     json.dumps({"data": SALE}).encode()),
    ("sale", {**AUTH, "Content-Type": "application/json", "Idempotency-Key": "k-1"},
     json.dumps({"data": SALE}).encode()),
    ("sale", {**AUTH, "Content-Type": "application/json", "Idempotency-Key": "k-1"},
     json.dumps({"data": SALE}).encode()),
    ("sale", {**AUTH, "Content-Type": "application/json", "Idempotency-Key": "k-1"},
     json.dumps({"data": {**SALE, "total": "36.00"}}).encode()),
    ("sale", {**AUTH, "Content-Type": "application/json", "X-Edge-Source": "reg 1"},
     json.dumps({"data": SALE}).encode()),
    ("sale", {**AUTH, "Content-Type": "application/json"}, b"x" * ((1 << 20) + 1)),
]
SHOWN_HEADERS = ("content-type", "retry-after", "www-authenticate", "idempotent-replayed",
                 "connection")


def test_event_posts_skip_the_router_with_the_routed_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """POST /v1/events/{kind} goes past Starlette's router (AgentApp's fast lane) and gives,
    case by case, the answer the routed request gives: status, body, headers, metrics."""
    import starlette.routing

    routed_calls: list[str] = []
    real_call = starlette.routing.Router.__call__

    async def counted(self: Any, scope: Any, receive: Any, send: Any) -> None:
        routed_calls.append(scope["path"])
        await real_call(self, scope, receive, send)

    monkeypatch.setattr(starlette.routing.Router, "__call__", counted)
    fast, routed = Site(tmp_path / "fast"), Site(tmp_path / "routed")
    routed.app.fast_events = None  # type: ignore[attr-defined]  # the lane off: routed
    try:
        answers = []
        for one in (fast, routed):
            routed_calls.clear()
            got = []
            for kind, headers, body in FAST_LANE_CASES:
                r = one.client.post(f"/v1/events/{kind}", content=body, headers=headers)
                shown = {h: r.headers.get(h) for h in SHOWN_HEADERS}
                data = r.json()
                if r.status_code == 202:
                    data = {k: v for k, v in data.items() if k != "id"}
                got.append((r.status_code, data, shown))
            answers.append((got, list(routed_calls)))
            samples = metric_samples(one.client.get("/metrics", headers=AUTH).text)
            answers[-1] += ({k: v for k, v in samples.items()
                             if k[0] == "edge_http_requests_total"},)
        (fast_got, fast_routed, fast_counts), (routed_got, routed_routed, routed_counts) = answers
        assert fast_got == routed_got
        assert {s for s, _, _ in fast_got} >= {202, 400, 401, 403, 404, 413, 415, 422}
        assert fast_routed == []
        assert len(routed_routed) == len(FAST_LANE_CASES) - 1  # the 413 is BodyLimit's
        assert fast_counts == routed_counts
    finally:
        fast.close()
        routed.close()


def test_the_payload_walk_runs_only_when_it_can_find_something(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain sale skips the value walk; a repeated key, a \\u escape or deep nesting still
    get it (and their 422)."""
    import agent.web.checks as api_module

    walked: list[int] = []
    real_walk = api_module._check_values

    def counted(root: dict[str, Any]) -> tuple[str, str] | None:
        walked.append(1)
        return real_walk(root)

    monkeypatch.setattr(api_module, "_check_values", counted)
    assert site.post("sale", SALE).status_code == 202
    assert walked == []
    headers = {**AUTH, "Content-Type": "application/json"}
    for body in (b'{"data": {"a": 1, "a": 2}}', b'{"data": {"n": "\\u0000"}}',
                 b'{"data": ' + b'[' * 40 + b']' * 40 + b'}'):
        r = site.client.post("/v1/events/sale", content=body, headers=headers)
        assert r.status_code == 422, (body, r.json())
    assert len(walked) == 3


def test_request_metrics_look_up_their_children_once(site: Site,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The request counter's labelled child is looked up once per (route, status), not per
    request; the counts stay right."""
    counter = site.app.state.metrics.http_requests
    looked_up: list[tuple[str, ...]] = []
    real_labels = counter.labels

    def counted(*values: str) -> Any:
        looked_up.append(values)
        return real_labels(*values)

    monkeypatch.setattr(counter, "labels", counted)
    for i in range(5):
        assert site.post("sale", {**SALE, "receipt_number": f"R-{i}"}).status_code == 202
    assert looked_up.count(("/v1/events/{kind}", "202")) <= 1
    samples = metric_samples(site.client.get("/metrics", headers=AUTH).text)
    assert samples[("edge_http_requests_total",
                    (("route", "/v1/events/{kind}"), ("status", "202")))] == 5
