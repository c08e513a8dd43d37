"""Whole-site benchmarks on loopback; prints one JSON object.

Each figure comes with a baseline measured in the same run on the same machine:

- http:    POST /v1/events/sale per second, 8 keep-alive clients, with p50/p99
           latency, versus the same clients against a bare FastAPI/uvicorn
           endpoint that stores nothing, in alternating rounds (agent, bare,
           agent, bare...) so noise hits both alike; medians; also the median of GET /healthz,
           /metrics and /v1/status, and keep-alive over fresh-connection latency.
- drain:   a 100,000-event backlog drained through mosquitto into the HQ
           receiver (stored and acked, outbox empty) per second, versus
           `mosquitto_pub -q 1 -l` publishing as many messages of the same size
           to the same broker.
- latency: API-accept (envelope ts) to HQ-stored (HQ's received_at), p50/p99,
           at 200 events/s.
- rss:     peak RSS (VmHWM) of the agent process holding a 1,000,000-event
           backlog while it reconnects and drains for a while.

Usage: python bench/site_bench.py [http drain latency rss] [--quick]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.testing.localbroker import free_port
from agent.testing.localsite import LocalSite, sample_sale


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _hammer(port: int, path: str, token: str, seconds: float,
            clients: int = 8) -> tuple[float, list[float]]:
    """Requests/s from ``clients`` threads on keep-alive connections, and every
    request's latency (s)."""
    body = json.dumps({"data": sample_sale(1)}).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    counts = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < stop:
            started = time.perf_counter()
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            latencies[i].append(time.perf_counter() - started)
            if response.status == 202:
                counts[i] += 1
        conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started), [x for per in latencies for x in per]


def _abab(ports: tuple[int, int], tokens: tuple[str, str], seconds: float, rounds: int
          ) -> tuple[list[float], list[float], list[float], list[float]]:
    """A warm-up of each, then ``rounds`` rounds alternating A (the agent) and B (the
    baseline), so the machine's noise falls on both alike: the rates of each round and
    every latency, for A and for B."""
    for port, token in zip(ports, tokens, strict=True):
        _hammer(port, "/v1/events/sale", token, 1.0)
    rates: tuple[list[float], list[float]] = ([], [])
    latencies: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for i, (port, token) in enumerate(zip(ports, tokens, strict=True)):
            rate, lat = _hammer(port, "/v1/events/sale", token, seconds)
            rates[i].append(rate)
            latencies[i].extend(lat)
    return rates[0], sorted(latencies[0]), rates[1], sorted(latencies[1])


def _keep_alive_vs_fresh(port: int, token: str, path: str, pairs: int = 200) -> float:
    """Median latency on one keep-alive connection over that on fresh connections,
    interleaved (the Nagle/delayed-ACK stall of issue 10 made it 10-17)."""
    headers = {"Authorization": f"Bearer {token}"}

    def timed(conn: http.client.HTTPConnection) -> float:
        started = time.perf_counter()
        conn.request("GET", path, headers=headers)
        conn.getresponse().read()
        return time.perf_counter() - started

    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    timed(kept)
    keep_alive, fresh = [], []
    for _ in range(pairs):
        keep_alive.append(timed(kept))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        fresh.append(timed(conn))
        conn.close()
    kept.close()
    return statistics.median(keep_alive) / statistics.median(fresh)


def _get_ms(port: int, token: str, path: str, count: int = 200) -> float:
    """Median latency (ms) of ``GET path`` on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"}
    times = []
    for _ in range(count):
        started = time.perf_counter()
        conn.request("GET", path, headers=headers)
        conn.getresponse().read()
        times.append(time.perf_counter() - started)
    conn.close()
    return round(statistics.median(times) * 1000, 3)


_BARE_APP = """
import sys, uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
app = FastAPI()
@app.post("/v1/events/{kind}")
async def accept(kind: str, request: Request):
    await request.json()
    return JSONResponse({"id": "x", "seq": 1, "kind": kind}, status_code=202)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def bench_http(work: Path, seconds: float, rounds: int = 4) -> dict[str, Any]:
    site = LocalSite(work / "http")
    port = free_port()
    bare = subprocess.Popen([sys.executable, "-c", _BARE_APP, str(port)])
    try:
        site.start()
        _wait(lambda: _port_open(port), 15, "bare uvicorn")
        agent_rates, agent_lat, base_rates, base_lat = _abab(
            (site.api_port, port), (site.token, "x"), seconds, rounds)
        cheap = {path: _get_ms(site.api_port, site.token, path)
                 for path in ("/healthz", "/metrics", "/v1/status")}
        keep_alive_ratio = _keep_alive_vs_fresh(site.api_port, site.token, "/v1/status")
    finally:
        bare.terminate()
        bare.wait(10)
        site.stop()
    agent, baseline = statistics.median(agent_rates), statistics.median(base_rates)
    return {"posts_per_s": round(agent), "baseline_bare_fastapi_per_s": round(baseline),
            "ratio": round(agent / baseline, 3), "clients": 8, "rounds": rounds,
            "order": "ABAB (agent, bare, agent, bare...), medians of the rounds",
            "round_posts_per_s": [round(r) for r in agent_rates],
            "round_baseline_per_s": [round(r) for r in base_rates],
            "p50_ms": round(_pct(agent_lat, 50) * 1000, 2),
            "p99_ms": round(_pct(agent_lat, 99) * 1000, 2),
            "baseline_p50_ms": round(_pct(base_lat, 50) * 1000, 2),
            "baseline_p99_ms": round(_pct(base_lat, 99) * 1000, 2),
            "get_median_ms": cheap,
            "keep_alive_over_fresh_median": round(keep_alive_ratio, 3)}


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _fill_outbox(site: LocalSite, count: int) -> int:
    """Write ``count`` sales straight into the (stopped) agent's outbox; return envelope size."""
    from agent.outbox import Outbox

    box = Outbox(str(site.outbox_path), site.site_id, max_bytes=1 << 40, max_batch=5000)
    box.open()
    data = json.dumps(sample_sale(1), separators=(",", ":"))
    try:
        futures = []
        for _ in range(count):
            futures.append(box.submit("sale", data, "bench"))
            if len(futures) >= 20_000:
                for f in futures:
                    f.result()
                futures.clear()
        for f in futures:
            f.result()
        size = len(box.read("sale", 0, 1)[0][1])
    finally:
        box.close()
    return size


def _hq_count(site: LocalSite) -> int:
    if not site.hq_db.exists():
        return 0
    con = sqlite3.connect(f"file:{site.hq_db}?mode=ro", uri=True, timeout=5)
    try:
        return int(con.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def bench_drain(work: Path, count: int) -> dict[str, Any]:
    site = LocalSite(work / "drain")
    try:
        site.start_broker()
        site.write_configs()
        size = _fill_outbox(site, count)
        site.start_hq()
        _wait(lambda: site.hq_db.exists(), 15, "HQ store")
        started = time.monotonic()
        site.start_agent()
        _wait(lambda: _hq_count(site) >= count, 900, "HQ to store the backlog")
        stored = time.monotonic() - started
        _wait(lambda: site.request("GET", "/v1/status")[1]["outbox"]["kinds"]["sale"]["depth"]
              == 0, 300, "the outbox to empty")
        acked = time.monotonic() - started
        assert site.broker is not None
        base = _mosquitto_pub(site.broker.port, count, size)
    finally:
        site.stop()
    rate = count / acked
    return {"events": count, "envelope_bytes": size, "stored_s": round(stored, 2),
            "stored_and_acked_s": round(acked, 2), "drain_per_s": round(rate),
            "baseline_mosquitto_pub_q1_per_s": round(base),
            "ratio": round(rate / base, 3)}


def _mosquitto_pub(port: int, count: int, size: int) -> float:
    line = b"x" * (size - 1) + b"\n"
    payload = line * count
    started = time.monotonic()
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t",
                    "bench/baseline", "-l"], input=payload, check=True)
    return count / (time.monotonic() - started)


def bench_latency(work: Path, rate: float, seconds: float) -> dict[str, Any]:
    site = LocalSite(work / "latency")
    try:
        site.start()
        conn = http.client.HTTPConnection("127.0.0.1", site.api_port, timeout=10)
        headers = {"Authorization": f"Bearer {site.token}", "Content-Type": "application/json"}
        body = json.dumps({"data": sample_sale(1)}).encode()
        total = int(rate * seconds)
        started = time.monotonic()
        for i in range(total):
            target = started + i / rate
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            conn.request("POST", "/v1/events/sale", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
        _wait(lambda: _hq_count(site) >= total, 60, "HQ to store every event")
        con = sqlite3.connect(f"file:{site.hq_db}?mode=ro", uri=True)
        rows = con.execute("SELECT ts, received_at FROM events WHERE kind='sale'").fetchall()
        con.close()
    finally:
        site.stop()
    from agent.envelope import parse_iso

    lat = sorted((parse_iso(received) - parse_iso(ts)) * 1000 for ts, received in rows)
    return {"events": len(lat), "rate_per_s": rate, "p50_ms": round(_pct(lat, 50), 2),
            "p99_ms": round(_pct(lat, 99), 2), "max_ms": round(lat[-1], 2),
            "note": "envelope ts (ms precision) to HQ received_at, same clock"}


def _pct(values: list[float], p: float) -> float:
    index = min(len(values) - 1, max(0, round(p / 100 * len(values)) - 1))
    return values[index]


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def bench_rss(work: Path, count: int, seconds: float) -> dict[str, Any]:
    site = LocalSite(work / "rss")
    try:
        site.start_broker()
        site.write_configs()
        started = time.monotonic()
        _fill_outbox(site, count)
        fill_s = time.monotonic() - started
        site.start_agent(timeout=120)
        assert site.agent is not None and site.agent.popen is not None
        pid = site.agent.popen.pid
        idle_kb = _vm_hwm_kb(pid)
        site.start_hq()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.5)
        peak_kb = _vm_hwm_kb(pid)
        drained = _hq_count(site)
        status = site.request("GET", "/v1/status")[1]
    finally:
        site.stop()
    return {"backlog_events": count, "fill_s": round(fill_s, 1),
            "peak_rss_mb_at_start": round(idle_kb / 1024, 1),
            "peak_rss_mb_while_draining": round(peak_kb / 1024, 1),
            "drained_in_window": drained, "window_s": seconds,
            "outbox_depth_after": status["outbox"]["kinds"]["sale"]["depth"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", nargs="*", default=["http", "drain", "latency", "rss"])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
    try:
        if "http" in args.which:
            results["http"] = bench_http(work, 2.0 if args.quick else 5.0)
        if "drain" in args.which:
            results["drain"] = bench_drain(work, 10_000 if args.quick else 100_000)
        if "latency" in args.which:
            results["latency"] = bench_latency(work, 200.0, 5.0 if args.quick else 15.0)
        if "rss" in args.which:
            results["rss"] = bench_rss(work, 50_000 if args.quick else 1_000_000,
                                       10.0 if args.quick else 30.0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
