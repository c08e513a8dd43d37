"""The HTTP server holds up (issue 10): the real ``edge-agent`` under hostile and slow
clients, plus the pieces (agent/web/httpserver.py, the sign-in throttle) on their own."""

from __future__ import annotations

import http.client
import json
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from agent.testing.localbroker import free_port
from agent.testing.localsite import LocalSite, Proc, edge_agent_argv, sample_sale
from agent.web.page import SignInThrottle, client_key
from tests.conftest import FakeClock, wait_for

ROOT = Path(__file__).resolve().parent.parent
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 1.5
# The agent under test gets a small open-file limit, as a box whose limit was
# never raised: with uvicorn as it was, 300 half-open sockets exhaust it.
NOFILE = 256

# Starts argv[1:] with RLIMIT_NOFILE lowered to argv[0] (soft and hard).
_WITH_NOFILE = ("import os, resource, sys; n = int(sys.argv[1]); "
                "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
                "os.execv(sys.argv[2], sys.argv[2:])")


def start_agent(workdir: Path, nofile: int | None = None, **api: Any) -> LocalSite:
    """A broker and the real ``edge-agent run`` (no HQ: a 202 needs only the outbox)."""
    site = LocalSite(workdir, agent_overrides={"api": api})
    site.start_broker()
    site.write_configs()
    argv = [*edge_agent_argv(), "run", "--config", str(site.agent_config)]
    if nofile is not None:
        argv = [sys.executable, "-c", _WITH_NOFILE, str(nofile), *argv]
    site.agent = Proc(argv, str(workdir / "agent.log")).start()
    site.wait_agent_ready()
    return site


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[LocalSite]:
    site = start_agent(tmp_path / "site", nofile=NOFILE, header_timeout_s=HEADER_TIMEOUT_S,
                       body_timeout_s=BODY_TIMEOUT_S, max_connections=512)
    try:
        yield site
    finally:
        site.stop()


def call(site: LocalSite, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None, source: str | None = None,
         ) -> tuple[int, http.client.HTTPMessage, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", site.api_port, timeout=10,
                                      source_address=None if source is None else (source, 0))
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        raw = response.read()
        return response.status, response.headers, json.loads(raw) if raw else None
    finally:
        conn.close()


def request_counts(site: LocalSite) -> dict[tuple[str, str], float]:
    status, text = site.request("GET", "/metrics")
    assert status == 200
    return {(s.labels["route"], s.labels["status"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "edge_http_requests_total"}


def wait_closed(socks: list[tuple[float, socket.socket]], within: float) -> dict[int, float]:
    """For each socket (opened at the given monotonic time), when the agent closed it;
    waits at most until ``within`` seconds after the last one opened."""
    selector = selectors.DefaultSelector()
    for i, (_, sock) in enumerate(socks):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, i)
    closed: dict[int, float] = {}
    deadline = max(opened for opened, _ in socks) + within
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.1):
            try:
                data = key.fileobj.recv(65536)  # type: ignore[union-attr]
            except ConnectionError:
                data = b""
            if not data:
                closed[key.data] = time.monotonic()
                selector.unregister(key.fileobj)
    selector.close()
    return closed


# -- with the real edge-agent ------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_half_open_connections_are_closed_and_a_sale_still_gets_through(
        agent: LocalSite) -> None:
    """300 sockets that send half a request are closed within the header timeout while a
    sale on a new connection gets its 202 in under 1 s (the file limit is 256)."""
    half = (b"POST /v1/events/sale HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Le")
    socks: list[tuple[float, socket.socket]] = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", agent.api_port), timeout=5)
            sock.sendall(half)
            socks.append((time.monotonic(), sock))
        started = time.monotonic()
        status, body = agent.request("POST", "/v1/events/sale", {"data": sample_sale(1)},
                                     timeout=5)
        took = time.monotonic() - started
        assert status == 202, body
        assert took < 1.0, f"the sale took {took:.2f} s behind 300 half-open connections"
        closed = wait_closed(socks, HEADER_TIMEOUT_S + 2.0)
        assert len(closed) == 300, f"{300 - len(closed)} half-open connections still open"
        late = [i for i, at in closed.items() if at - socks[i][0] > HEADER_TIMEOUT_S + 1.5]
        assert not late, f"{len(late)} closed long after the header timeout"
    finally:
        for _, sock in socks:
            sock.close()
    log = Path(agent.agent.log_path).read_text() if agent.agent else ""
    assert "Traceback" not in log and "out of system resource" not in log, log[-2000:]
    # The agent still answers, and its status is still a sale richer.
    assert agent.request("GET", "/v1/status")[1]["outbox"]["kinds"]["sale"]["last_seq"] == 1


@pytest.mark.e2e
def test_keep_alive_is_no_slower_than_fresh_connections(agent: LocalSite) -> None:
    """On one keep-alive connection the median request takes no longer than on fresh
    connections (interleaved, as a ratio): no Nagle/delayed-ACK stall (it made both 7-17x)."""
    sale = json.dumps({"data": sample_sale(1)}).encode()
    headers = {"Authorization": f"Bearer {agent.token}", "Content-Type": "application/json"}

    def timed(conn: http.client.HTTPConnection, method: str, path: str) -> float:
        started = time.perf_counter()
        conn.request(method, path, body=sale if method == "POST" else None, headers=headers)
        response = conn.getresponse()
        response.read()
        assert response.status in (200, 202), response.status
        return time.perf_counter() - started

    def ratio(method: str, path: str, pairs: int) -> float:
        kept = http.client.HTTPConnection("127.0.0.1", agent.api_port, timeout=10)
        keep_alive: list[float] = []
        fresh: list[float] = []
        try:
            timed(kept, method, path)  # the connection is open before timing starts
            for _ in range(pairs):
                keep_alive.append(timed(kept, method, path))
                conn = http.client.HTTPConnection("127.0.0.1", agent.api_port, timeout=10)
                try:
                    fresh.append(timed(conn, method, path))
                finally:
                    conn.close()
        finally:
            kept.close()
        return statistics.median(keep_alive) / statistics.median(fresh)

    status = ratio("GET", "/v1/status", 150)
    assert status <= 1.0, f"GET /v1/status: keep-alive median {status:.2f}x fresh"
    # A sale is ~3 ms of fsync either way, which swamps the ~0.2 ms a fresh
    # connection costs (measured 0.86-0.98): the 10% is that noise, not a stall.
    sales = ratio("POST", "/v1/events/sale", 200)
    assert sales <= 1.1, f"POST /v1/events/sale: keep-alive median {sales:.2f}x fresh"


@pytest.mark.e2e
def test_failed_sign_ins_are_throttled_per_client(agent: LocalSite) -> None:
    """After 5 unknown tokens a client gets 429 with Retry-After, even with the right
    token; another client address still signs in."""
    for attempt in range(5):
        status, _, body = call(agent, "POST", "/v1/session",
                               {"token": f"guess-{attempt}-0123456789abcdef"})
        assert status == 401, body
    status, headers, body = call(agent, "POST", "/v1/session", {"token": "guess-5-0123456789"})
    assert status == 429, body
    assert body["reason"] == "too_many_attempts" and body["field"] == "token"
    assert 1 <= int(headers["Retry-After"]) <= 60
    status, headers, _ = call(agent, "POST", "/v1/session", {"token": agent.token})
    assert status == 429 and int(headers["Retry-After"]) >= 1
    status, headers, body = call(agent, "POST", "/v1/session", {"token": agent.token},
                                 source="127.0.0.2")
    assert status == 200 and body["name"] == "cli"
    assert "edge_session=" in headers["Set-Cookie"]


@pytest.mark.e2e
def test_a_client_gone_mid_body_is_a_4xx_not_an_error(agent: LocalSite) -> None:
    """A client that closes halfway through its body is answered 400 (counted so, never
    a 500), writes nothing, and leaves no ERROR or traceback in the log; a body that
    stalls gets a 408 within the body timeout."""
    head = (f"POST /v1/events/sale HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {agent.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 1000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", agent.api_port), timeout=5) as sock:
        sock.sendall(head + b'{"data": {"receipt_number": "R-1"' + b" " * 60)
    route = "/v1/events/{kind}"
    wait_for(lambda: request_counts(agent).get((route, "400")) == 1, timeout=10,
             what="the abandoned request to be counted as a 400")

    stalled = socket.create_connection(("127.0.0.1", agent.api_port), timeout=5)
    try:
        stalled.sendall(head + b'{"data": ')
        opened = time.monotonic()
        answer = b""
        while True:
            chunk = stalled.recv(4096)
            if not chunk:
                break
            answer += chunk
        took = time.monotonic() - opened
    finally:
        stalled.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"reason": "request_timeout"' in answer
    assert BODY_TIMEOUT_S - 0.2 < took < BODY_TIMEOUT_S + 1.5
    counts = wait_for(lambda: (c := request_counts(agent)).get((route, "408")) == 1 and c,
                      timeout=10, what="the stalled request to be counted as a 408")
    assert not [k for k in counts if k[1].startswith("5")], counts
    assert agent.request("GET", "/v1/status")[1]["outbox"]["kinds"]["sale"]["last_seq"] == 0
    log = Path(agent.agent.log_path).read_text() if agent.agent else ""
    assert "Traceback" not in log and "ERROR" not in log, log[-2000:]


# -- accept errors: a real loop out of file descriptors -------------------------------------


_EMFILE_SERVER = """
import asyncio, logging, os, resource, sys
sys.path.insert(0, sys.argv[2])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
from fastapi import FastAPI
from agent.web.httpserver import build_server
app = FastAPI()

@app.get("/ping")
async def ping() -> dict:
    return {"ok": True}

server = build_server(app, "api", host="127.0.0.1", port=int(sys.argv[1]), lifespan="off")

async def main() -> None:
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    hog = []
    try:
        while True:
            hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    for fd in hog[:3]:  # room for three connections, and no more
        os.close(fd)
    del hog[:3]
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    while server.guard.counters["accept_failed"] < 3:  # accept is retried every second
        await asyncio.sleep(0.05)
    for fd in hog:
        os.close(fd)
    print("freed", server.guard.counters["accept_failed"], flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    server.should_exit = True
    await task

asyncio.run(main())
"""


@pytest.mark.slow
def test_accept_errors_are_logged_once_per_edge() -> None:
    """Out of descriptors, accept fails again and again: one ERROR (no traceback) when it
    starts, one INFO when connections are accepted again, and the server still serves."""
    port = free_port()
    # RLIMIT lowered for the server alone, so the hog is quick and the cap is no help.
    proc = subprocess.Popen(
        [sys.executable, "-c", _WITH_NOFILE, "96", sys.executable, "-c", _EMFILE_SERVER,
         str(port), str(ROOT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(iter(proc.stderr.readline, "")),
                              daemon=True)
    reader.start()
    clients: list[socket.socket] = []
    try:
        assert proc.stdout.readline().strip() == "ready", errors
        for _ in range(10):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_for(lambda: any("cannot accept connections" in line for line in errors),
                 timeout=10, what="the accept error to be logged")
        proc.stdin.write("\n")
        proc.stdin.flush()
        freed = proc.stdout.readline().split()
        assert freed[0] == "freed" and int(freed[1]) >= 3, freed
        for client in clients:
            client.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/ping")
        assert conn.getresponse().status == 200
        conn.close()
        wait_for(lambda: any("accepting connections again" in line for line in errors),
                 timeout=10, what="the recovery to be logged")
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(15) == 0
    finally:
        for client in clients:
            client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    reader.join(5)
    text = "".join(errors)
    assert sum("cannot accept connections" in line for line in errors) == 1, text
    assert sum("accepting connections again" in line for line in errors) == 1, text
    assert "Traceback" not in text and "out of system resource" not in text, text


# -- the HQ page's server ---------------------------------------------------------------


def test_hq_page_server_closes_a_half_sent_request(tmp_path: Path) -> None:
    """The HQ page's server (hq/web.py) has the same header deadline: half a
    request head gets a 408 and the connection closed."""
    from hq.web import HqWebServer

    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    port = free_port()
    server = HqWebServer(app, "127.0.0.1", port, header_timeout_s=0.5)
    assert server.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            opened = time.monotonic()
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            took = time.monotonic() - opened
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert 0.3 < took < 3.0
    finally:
        server.stop()


# -- the sign-in throttle, on its own -----------------------------------------------------


def test_sign_in_throttle_window_slides_and_forgets() -> None:
    """The throttle: 5 failures in 60 s lock a client until the oldest leaves the window;
    a success clears it; other clients are untouched; memory stays bounded."""
    clock = FakeClock(1000.0)
    throttle = SignInThrottle(failures=5, window_s=60.0, clients_max=3)
    for _ in range(4):
        throttle.failed("10.0.0.5", clock())
        clock.advance(10)
    assert throttle.retry_after("10.0.0.5", clock()) is None
    throttle.failed("10.0.0.5", clock())  # the fifth, at t=1040
    assert throttle.retry_after("10.0.0.5", clock()) == pytest.approx(20.0)
    assert throttle.first_refusal("10.0.0.5") and not throttle.first_refusal("10.0.0.5")
    assert throttle.retry_after("10.0.0.6", clock()) is None
    clock.advance(20.5)  # the first failure (t=1000) left the window
    assert throttle.retry_after("10.0.0.5", clock()) is None
    throttle.failed("10.0.0.5", clock())
    assert throttle.retry_after("10.0.0.5", clock()) is not None
    throttle.succeeded("10.0.0.5")
    assert throttle.retry_after("10.0.0.5", clock()) is None
    for client in ("a", "b", "c", "d"):
        throttle.failed(client, clock())
    assert len(throttle._seen) == 3 and "a" not in throttle._seen


def test_client_key_groups_an_ipv6_64() -> None:
    """One IPv6 machine may pick any address in its /64: failures count per /64;
    an IPv4-mapped address counts as its IPv4 address."""
    assert client_key("2001:db8:1:2::17") == client_key("2001:db8:1:2:ffff::1")
    assert client_key("2001:db8:1:3::17") != client_key("2001:db8:1:2::17")
    assert client_key("::ffff:10.0.0.5") == "10.0.0.5" == client_key("10.0.0.5")
    assert client_key("testclient") == "testclient"


@pytest.mark.e2e
def test_metrics_need_no_token_from_this_box_over_a_real_socket(agent: LocalSite) -> None:
    """Through the real server, /metrics from 127.0.0.1 is 200 with no token (the scope's
    client is the socket's peer); /v1/status from there still needs one; a proxy
    header makes /metrics need one too."""
    def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", agent.api_port, timeout=10)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    status, text = get("/metrics")
    assert status == 200 and "edge_outbox_depth" in text
    assert get("/v1/status")[0] == 401
    assert get("/metrics", {"X-Forwarded-For": "192.0.2.7"})[0] == 401
