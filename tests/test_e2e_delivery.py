"""End to end: the real edge-agent and edge-agent hq processes, a real mosquitto, faults.

These are the acceptance tests of issue 2: whatever is killed, every sale the
API acknowledged with 202 ends up in HQ's store exactly once, seqs 1..N.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent.testing.localbroker import make_tls_files
from agent.testing.localsite import LocalSite, edge_agent_argv, sample_sale
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def site(tmp_path: Path) -> Iterator[LocalSite]:
    s = LocalSite(tmp_path / "site")
    try:
        yield s
    finally:
        s.stop()


def post_sale(site: LocalSite, n: int, key: str | None = None,
              timeout: float = 10.0) -> tuple[int, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    return site.request("POST", "/v1/events/sale", {"data": sample_sale(n)}, headers=headers,
                        timeout=timeout)


def post_until_accepted(site: LocalSite, n: int, deadline: float) -> dict[str, Any]:
    """Post sale n with its own Idempotency-Key, retrying through agent restarts."""
    while time.monotonic() < deadline:
        try:
            status, body = post_sale(site, n, key=f"sale-{n}", timeout=5)
        except (OSError, http.client.HTTPException):
            # The agent is down, or died mid-answer (IncompleteRead): a POS
            # retries, with the same key.
            time.sleep(0.05)
            continue
        if status == 202:
            return dict(body)
        if status >= 500 and status != 507:
            time.sleep(0.05)
            continue
        raise AssertionError(f"sale {n}: {status} {body}")
    raise AssertionError(f"sale {n} never accepted")


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in events]


def test_sales_survive_two_agent_sigkills(site: LocalSite) -> None:
    """5,000 sales from 8 clients, agent SIGKILLed twice: HQ holds each exactly once, seq 1..N."""
    site.start()
    total = 5000
    accepted: dict[int, dict[str, Any]] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + 240

    def client(worker: int) -> None:
        for n in range(worker, total, 8):
            answer = post_until_accepted(site, n, deadline)
            with lock:
                accepted[n] = answer

    def killer() -> None:
        for threshold in (1500, 3500):
            wait_for(lambda t=threshold: len(accepted) >= t, timeout=120, what="sales accepted")
            assert site.agent is not None
            site.agent.kill()
            site.start_agent(wait=False)

    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(client, w) for w in range(8)] + [pool.submit(killer)]
        for future in futures:
            future.result()

    assert len(accepted) == total
    events = wait_for(lambda: (e := site.hq_events("sale")) and len(e) >= total and e,
                      timeout=120, what="HQ to store every sale")
    assert seqs(events) == list(range(1, len(events) + 1))
    receipts = [e["data"]["receipt_number"] for e in events]
    assert len(receipts) == len(set(receipts)) == total
    stored_ids = {e["id"] for e in events}
    assert {a["id"] for a in accepted.values()} <= stored_ids
    assert {a["seq"] for a in accepted.values()} == set(range(1, total + 1))


def test_broker_sigkill_mid_stream_loses_nothing(site: LocalSite) -> None:
    """The broker SIGKILLed mid-stream and restarted: every accepted sale reaches HQ once."""
    site.start()
    total = 1500
    done = threading.Event()

    def producer() -> None:
        for n in range(total):
            assert post_sale(site, n)[0] == 202
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    wait_for(lambda: len(site.hq_events("sale")) >= 200, timeout=60, what="first sales at HQ")
    assert site.broker is not None
    site.broker.kill()
    site.broker.start()
    thread.join(120)
    assert done.is_set()
    events = wait_for(lambda: (e := site.hq_events("sale")) and len(e) >= total and e,
                      timeout=120, what="every sale at HQ after the broker restart")
    assert seqs(events) == list(range(1, total + 1))
    wait_for(lambda: site.request("GET", "/v1/status")[1]["outbox"]["kinds"]["sale"]["depth"] == 0,
             timeout=60, what="the outbox to drain after HQ acks")


def test_hq_outage_backlog_shows_and_drains_in_order(site: LocalSite) -> None:
    """HQ receiver stopped: the outbox holds, status shows backlog and age, then drains in order."""
    site.start()
    assert post_sale(site, 0)[0] == 202
    wait_for(lambda: len(site.hq_events("sale")) == 1, timeout=30, what="first sale at HQ")
    assert site.hq is not None
    site.hq.terminate()
    for n in range(1, 301):
        assert post_sale(site, n)[0] == 202

    def backlog() -> dict[str, Any] | None:
        status = site.request("GET", "/v1/status")[1]
        sale = status["outbox"]["kinds"]["sale"]
        return status if sale["depth"] == 300 and sale["oldest_age_s"] > 0.5 else None

    status = wait_for(backlog, timeout=30, what="status to show the 300-sale backlog with age")
    assert status["outbox"]["kinds"]["sale"]["first_seq"] == 2
    site.start_hq()
    events = wait_for(lambda: (e := site.hq_events("sale")) and len(e) >= 301 and e,
                      timeout=60, what="the backlog to drain to HQ")
    assert seqs(events) == list(range(1, 302))
    assert [e["data"]["receipt_number"] for e in events] == [f"R-{n:06d}" for n in range(301)]
    wait_for(lambda: site.request("GET", "/v1/status")[1]["outbox"]["kinds"]["sale"]["depth"] == 0,
             timeout=60, what="the outbox to empty after HQ's acks")


def test_idempotency_key_twice_gives_one_event(site: LocalSite) -> None:
    """The same Idempotency-Key twice: one event, the same answer, one row at HQ."""
    site.start()
    first = post_sale(site, 7, key="pos-2:R-000007")
    again = post_sale(site, 7, key="pos-2:R-000007")
    assert first[0] == again[0] == 202
    assert first[1] == again[1]
    assert post_sale(site, 8)[0] == 202
    # Per-kind order: a doubled R-000007 would hold seq 2 and arrive before R-000008.
    events = wait_for(lambda: (e := site.hq_events("sale")) and any(
        x["data"]["receipt_number"] == "R-000008" for x in e) and e, timeout=30,
        what="the later sale at HQ")
    assert [e["data"]["receipt_number"] for e in events] == ["R-000007", "R-000008"]


def sensor_reading(i: int) -> dict[str, Any]:
    return {"device": f"flower-{i % 3}", "room": "Flower 2", "temperature_c": 24 + (i % 10) / 10,
            "rh_pct": 55.0 + (i % 7), "co2_ppm": 900 + i % 50}


def test_outbox_cap_refuses_sales_thins_sensors_and_recovers(tmp_path: Path) -> None:
    """At max_bytes a sale gets 507 with a clear message, sensors are thinned, and HQ's drain
    makes room again."""
    site = LocalSite(tmp_path / "site", agent_overrides={
        "outbox": {"max_bytes": 262144}, "mqtt": {"max_inflight": 20}})
    try:
        site.start()
        assert site.hq is not None and site.broker is not None
        site.hq.terminate()
        site.broker.stop()  # nothing leaves: the whole backlog stays unpublished
        for i in range(900):
            assert site.request("POST", "/v1/events/sensor", {"data": sensor_reading(i)})[0] == 202
        refused = None
        for n in range(5000):
            status, body = post_sale(site, n)
            if status == 507:
                refused = body
                break
            assert status == 202, body
        assert refused is not None, "no sale was ever refused at the cap"
        assert "outbox full" in refused["error"] and "max_bytes" in refused["error"]
        status = site.request("GET", "/v1/status")[1]
        assert status["state"] == "degraded"
        assert status["outbox"]["counters"]["thinned_events"] > 0
        site.broker.start()
        site.start_hq()
        wait_for(lambda: post_sale(site, 99999)[0] == 202, timeout=90,
                 what="a sale to be accepted again once HQ drained the outbox")
        alarms = wait_for(lambda: (a := site.hq_events("alarm")) and a, timeout=30,
                          what="the outbox_full alarm at HQ")
        assert any(a["data"]["code"] == "outbox_full" for a in alarms)
        sensors = wait_for(lambda: (s := site.hq_events("sensor")) and s, timeout=30,
                           what="sensor events at HQ")
        assert any("seq_end" in e for e in sensors), "no thinned aggregate reached HQ"
    finally:
        site.stop()


def test_disk_full_refuses_cleanly_and_recovers(tmp_path: Path) -> None:
    """A full disk under the outbox: clean 507 refusals, no crash, recovery once HQ drains."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    site = LocalSite(tmp_path / "site", agent_overrides={
        "outbox": {"path": str(mount / "outbox"), "ballast_bytes": 262144}})
    try:
        site.start()
        assert site.hq is not None
        site.hq.terminate()
        reason = None
        for n in range(50_000):
            status, body = post_sale(site, n)
            if status == 507:
                reason = body.get("reason")
                break
            assert status == 202, body
        assert reason == "disk_full"
        assert site.agent is not None and site.agent.alive
        assert post_sale(site, 1)[0] == 507
        site.start_hq()
        wait_for(lambda: post_sale(site, 777777)[0] == 202, timeout=120,
                 what="sales accepted again after HQ acked and space returned")
        assert site.agent.alive
    finally:
        site.stop()
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_corrupt_outbox_is_set_aside_and_seq_continues(site: LocalSite) -> None:
    """A corrupt outbox file is moved aside, the daemon starts, and seqs are never reused."""
    site.start()
    for n in range(5):
        assert post_sale(site, n)[0] == 202
    wait_for(lambda: len(site.hq_events("sale")) == 5, timeout=30, what="five sales at HQ")
    assert site.agent is not None
    site.agent.kill()
    db = site.outbox_path / "cache.db"
    with open(db, "r+b") as fh:
        fh.write(b"this is not a sqlite database" * 4)
    for extra in ("cache.db-wal", "cache.db-shm"):
        (site.outbox_path / extra).unlink(missing_ok=True)
    site.start_agent()
    moved = list(site.outbox_path.glob("cache.db.corrupt-*"))
    assert moved, "the corrupt file was not set aside"
    status, body = post_sale(site, 5)
    assert status == 202 and body["seq"] > 5
    events = wait_for(lambda: (e := site.hq_events("sale")) and len(e) == 6 and e, timeout=30,
                      what="the sale after the reset at HQ")
    assert events[-1]["seq"] == body["seq"]
    alarms = wait_for(lambda: (a := site.hq_events("alarm")) and a, timeout=30,
                      what="the outbox_corrupt alarm at HQ")
    assert any(a["data"]["code"] == "outbox_corrupt" for a in alarms)
    # HQ's ack passes the declared-lost range, so the outbox empties.
    wait_for(lambda: site.request("GET", "/v1/status")[1]["outbox"]["kinds"]["sale"]["depth"] == 0,
             timeout=30, what="HQ to ack past the lost range")


def test_hostile_requests_get_4xx_from_the_real_process(site: LocalSite) -> None:
    """Malformed bodies, wrong tokens, oversized bodies and hostile kinds: 4xx, never 5xx."""
    site.start()
    import urllib.error
    import urllib.request

    def raw(path: str, body: bytes, token: str | None = site.token,
            ctype: str = "application/json") -> int:
        headers = {"Content-Type": ctype}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(f"{site.api_url}{path}", data=body,  # noqa: S310 - http
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback http
                return int(r.status)
        except urllib.error.HTTPError as err:
            return err.code

    cases = {
        "malformed json": raw("/v1/events/sale", b"{\"data\": "),
        "not an object": raw("/v1/events/sale", b"[1,2,3]"),
        "wrong token": raw("/v1/events/sale", json.dumps({"data": sample_sale(1)}).encode(),
                           token="nope"),
        "no token": raw("/v1/events/sale", b"{}", token=None),
        "oversized": raw("/v1/events/sale", b"{\"data\": \"" + b"x" * (1 << 21) + b"\"}"),
        "hostile kind": raw("/v1/events/..%2F..%2Fetc", b"{}"),
        "sql kind": raw("/v1/events/sale;DROP%20TABLE", b"{}"),
        "bad tag": raw("/v1/events/sale", json.dumps({"data": {**sample_sale(1), "lines": [
            {**sample_sale(1)["lines"][0], "package_tag": "short"}]}}).encode()),
    }
    assert all(400 <= code < 500 for code in cases.values()), cases
    assert cases["wrong token"] == cases["no token"] == 401
    assert cases["oversized"] == 413
    assert site.agent is not None and site.agent.alive


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    """Against a mosquitto that requires client certificates, sales reach HQ over mTLS."""
    tls = make_tls_files(str(tmp_path / "pki"))
    site = LocalSite(tmp_path / "site", tls=tls)
    try:
        site.start()
        for n in range(20):
            assert post_sale(site, n)[0] == 202
        events = wait_for(lambda: (e := site.hq_events("sale")) and len(e) >= 20 and e,
                          timeout=30, what="sales at HQ over TLS")
        assert seqs(events) == list(range(1, 21))
        assert site.request("GET", "/v1/status")[1]["uplink"]["state"] == "connected"
    finally:
        site.stop()


def test_sigterm_drains_and_exits_within_10s(site: LocalSite) -> None:
    """SIGTERM while sales stream in: exit 0 within 10 s, every 202 sale is still delivered."""
    site.start()
    accepted: list[int] = []
    stop = threading.Event()

    def producer() -> None:
        n = 0
        while not stop.is_set():
            try:
                status, _ = post_sale(site, n, timeout=2)
            except (OSError, http.client.HTTPException):
                return
            if status == 202:
                accepted.append(n)
            n += 1

    thread = threading.Thread(target=producer)
    thread.start()
    wait_for(lambda: len(accepted) >= 100, timeout=30, what="sales flowing")
    assert site.agent is not None
    started = time.monotonic()
    code = site.agent.terminate(timeout=15)
    elapsed = time.monotonic() - started
    stop.set()
    thread.join(10)
    assert code == 0 and elapsed < 10, (code, elapsed, site.agent.log_tail())
    site.start_agent()
    events = wait_for(lambda: (e := site.hq_events("sale")) and len(e) >= len(accepted) and e,
                      timeout=60, what="every accepted sale at HQ after restart")
    receipts = {e["data"]["receipt_number"] for e in events}
    assert {f"R-{n:06d}" for n in accepted} <= receipts


def test_ready_and_stopping_reach_systemd(tmp_path: Path) -> None:
    """With NOTIFY_SOCKET set, the daemon sends READY=1 once it listens, STOPPING=1 on SIGTERM."""
    import socket

    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.2)
    site = LocalSite(tmp_path / "site")
    messages: list[str] = []

    def drain() -> bool:
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except TimeoutError:
            return True

    try:
        site.start_broker()
        site.write_configs()
        os.environ["NOTIFY_SOCKET"] = sock_path
        try:
            site.start_agent(wait=False)
        finally:
            del os.environ["NOTIFY_SOCKET"]
        wait_for(lambda: drain() and any("READY=1" in m for m in messages), timeout=20,
                 what="READY=1")
        assert site.request("GET", "/healthz")[0] == 200
        assert site.agent is not None
        site.agent.terminate()
        drain()
        assert any("STOPPING=1" in m for m in messages)
    finally:
        sock.close()
        site.stop()


def test_cli_check_config_status_and_outbox(site: LocalSite) -> None:
    """check-config exits 0/2 with key paths; status 0/3; outbox stats/peek/export with the
    daemon stopped."""
    argv = edge_agent_argv()
    site.start()
    ok = subprocess.run([*argv, "check-config", "--config", str(site.agent_config)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = site.workdir / "bad.toml"
    bad.write_text(site.agent_config.read_text().replace(
        f"port = {site.api_port}", "port = 70000") + "\n[oops]\nx = 1\n")
    res = subprocess.run([*argv, "check-config", "--config", str(bad)], capture_output=True,
                         text=True)
    assert res.returncode == 2
    assert "api.port: must be 1..65535" in res.stderr and "oops: unknown key" in res.stderr
    status = subprocess.run([*argv, "status", "--json", "--config", str(site.agent_config)],
                            capture_output=True, text=True)
    assert status.returncode in (0, 1), status.stderr
    assert json.loads(status.stdout)["site"] == site.site_id
    assert site.hq is not None
    site.hq.terminate()
    for n in range(3):
        assert post_sale(site, n)[0] == 202
    assert site.agent is not None
    site.agent.terminate()
    down = subprocess.run([*argv, "status", "--config", str(site.agent_config)],
                          capture_output=True, text=True)
    assert down.returncode == 3 and "not reachable" in down.stderr
    stats = subprocess.run([*argv, "outbox", "stats", "--config", str(site.agent_config)],
                           capture_output=True, text=True)
    assert stats.returncode == 0, stats.stderr
    assert "sale" in stats.stdout
    peek = subprocess.run([*argv, "outbox", "peek", "--kind", "sale", "-n", "2", "--config",
                           str(site.agent_config)], capture_output=True, text=True)
    assert [json.loads(line)["seq"] for line in peek.stdout.splitlines()] == [1, 2]
    export = subprocess.run([*argv, "outbox", "export", "--config", str(site.agent_config)],
                            capture_output=True, text=True)
    lines = [json.loads(line) for line in export.stdout.splitlines()]
    assert [(e["kind"], e["seq"]) for e in lines] == [("sale", 1), ("sale", 2), ("sale", 3)]
