"""Scan-to-WebSocket latency and throughput through the real ``edge-agent`` process.

    .venv/bin/python bench/scan_ws_bench.py [--scans 1000] [--flood 5000] [--dir DIR]

A whole site on loopback (``agent.testing.localsite``: mosquitto, ``edge-agent hq``,
``edge-agent run``) with one scanner on ``serial://<pty>``. The bench types
CR-terminated package-tag reads into the pty master and reads
``/v1/scans`` with a ``websockets`` client holding the bearer header. Each
message it times has been read by the agent's reader thread, judged against
the catalog, committed to the outbox (SQLite, ``synchronous=FULL``) and sent.

- ``latency``: one read at a time, write into the pty -> message received
  (p50/p99/max over ``--scans``, after 20 warm-up reads; goal p99 < 10 ms);
  again with a stalled client connected (handshake done, never reads);
- ``flood``: ``--flood`` reads written back to back in bursts of 64; every one
  must arrive on the WebSocket, in order, with consecutive ``seq``.

Baselines, same run, same machine: the driver alone (the same pty path in
this process, write -> ``on_scan``; ``bench/scanner_bench.py``), and one
fsync'd SQLite commit of one row on the filesystem holding the outbox; the
scan path contains one of each (commits are shared under load).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import scanner_bench  # noqa: E402
from websockets.sync.client import ClientConnection, connect  # noqa: E402

from agent.testing.localsite import LocalSite  # noqa: E402

DEVICE = "bench-scanner"
WARMUP = 20


def tag(n: int) -> str:
    return f"1A4FF0{n:018d}"


def summary(samples: list[float]) -> dict[str, float | int]:
    return {"scans": len(samples), "p50_ms": round(statistics.median(samples), 3),
            "p99_ms": round(scanner_bench.percentile(samples, 0.99), 3),
            "max_ms": round(max(samples), 3), "mean_ms": round(statistics.fmean(samples), 3)}


def ws_connect(site: LocalSite) -> ClientConnection:
    return connect(f"ws://127.0.0.1:{site.api_port}/v1/scans",
                   additional_headers={"Authorization": f"Bearer {site.token}"}, open_timeout=5)


def stalled_client(site: LocalSite) -> socket.socket:
    """Completes the WebSocket handshake, then never reads (a frozen POS tab)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", site.api_port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /v1/scans HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {site.token}\r\n\r\n"
                 .encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise SystemExit("bench: the stalled client's handshake was refused")
        head += chunk
    return sock


def latency(site: LocalSite, master: int, n: int, first: int) -> dict[str, Any]:
    samples: list[float] = []
    with ws_connect(site) as ws:
        for i in range(n + WARMUP):
            code = tag(first + i)
            sent = time.perf_counter()
            os.write(master, f"{code}\r".encode())
            message = json.loads(ws.recv(timeout=10))
            got = time.perf_counter()
            if message["data"]["code"] != code:
                raise SystemExit(f"bench: expected {code}, got {message['data']['code']}")
            if i >= WARMUP:
                samples.append((got - sent) * 1000)
    return summary(samples)


def flood(site: LocalSite, master: int, n: int, first: int) -> dict[str, Any]:
    codes = [tag(first + i) for i in range(n)]
    with ws_connect(site) as ws:
        start = time.perf_counter()
        for i in range(0, n, 64):
            os.write(master, b"".join(f"{c}\r".encode() for c in codes[i:i + 64]))
        got: list[dict[str, Any]] = []
        try:
            while len(got) < n:
                got.append(json.loads(ws.recv(timeout=10)))
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - start
    seqs = [m["seq"] for m in got]
    return {"scans": n, "delivered": len(got), "lost": n - len(got),
            "in_order": [m["data"]["code"] for m in got] == codes[:len(got)],
            "seq_consecutive": seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs
            else False, "seconds": round(elapsed, 3), "scans_per_s": round(len(got) / elapsed)}


def fsync_baseline(directory: Path, n: int = 300) -> dict[str, Any]:
    """One-row commits at synchronous=FULL (WAL) in the outbox's directory."""
    path = directory / "fsync-baseline.sqlite"
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    samples = []
    for i in range(n):
        start = time.perf_counter()
        con.execute("INSERT INTO t VALUES (?, ?)", (i, b"x" * 400))
        samples.append((time.perf_counter() - start) * 1000)
    con.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    out = summary(samples)
    out["commits"] = out.pop("scans")
    return out


def filesystem(path: Path) -> str:
    best = ("?", "")
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            parts = line.split()
            if str(path).startswith(parts[1]) and len(parts[1]) >= len(best[1]):
                best = (parts[2], parts[1])
    return f"{best[0]} at {best[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scans", type=int, default=1000)
    parser.add_argument("--flood", type=int, default=5000)
    parser.add_argument("--dir", default=None, help="where the site lives (default: a temp dir)")
    args = parser.parse_args()

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="scan-ws-bench-")).resolve()
    master, slave = os.openpty()
    path = os.ttyname(slave)
    site = LocalSite(workdir / "site", devices=[{
        "id": DEVICE, "type": "scanner", "url": f"serial://{path}?baudrate=9600",
        "terminator": "cr", "debounce_ms": 500}])
    try:
        site.start()
        deadline = time.monotonic() + 10
        while True:
            _, status = site.request("GET", "/v1/status")
            if any(d["id"] == DEVICE and d["state"] == "up" for d in status["devices"]):
                break
            if time.monotonic() > deadline:
                raise SystemExit("bench: the scanner never came up")
            time.sleep(0.05)
        idle = latency(site, master, args.scans, 0)
        stalled = stalled_client(site)
        try:
            with_stalled = latency(site, master, args.scans, 100_000)
            fl = flood(site, master, args.flood, 200_000)
        finally:
            stalled.close()
        site.stop()  # the agent must let go of the pty before the driver-only baseline
        driver = scanner_bench.latency(master, path, args.scans, scanner_bench.tag)
        fsync = fsync_baseline(site.outbox_path.parent)
    finally:
        site.stop()
        os.close(master)
        os.close(slave)
    print(json.dumps({
        "bench": "scan_ws",
        "path": "pty -> edge-agent (reader thread, catalog, outbox commit) -> /v1/scans WebSocket",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "outbox_filesystem": filesystem(site.outbox_path),
        "latency": {"idle": idle, "with_a_stalled_client": with_stalled, "goal_p99_ms": 10,
                    "ok": idle["p99_ms"] < 10 and with_stalled["p99_ms"] < 10},
        "flood": fl,
        "baseline": {"driver_only_write_to_on_scan": driver,
                     "sqlite_commit_synchronous_full": fsync},
    }, indent=2))


if __name__ == "__main__":
    main()
