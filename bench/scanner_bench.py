"""Scanner path bench: scan-to-callback latency and lossless throughput over a real pty.

    .venv/bin/python bench/scanner_bench.py [--scans 1000] [--flood 20000]

The whole driver path runs as in the daemon: a ``ScannerReader`` thread on
``serial://<pty>`` (pyserial, framing, parsing with biip, debounce) calling
``on_scan``. The bench writes package-tag reads (CRLF-terminated, as a USB
CDC scanner sends them) into the pty master.

- latency: one read at a time, from the write into the pty to ``on_scan``
  being called (p50/p99/max over ``--scans`` reads; goal p99 < 10 ms);
- flood: ``--flood`` reads written back to back; every one must arrive, in
  order; the rate is reads delivered per second from first write to last
  callback. A pty has no baud rate, so this is the software ceiling of one
  serial path; a real port is bounded by its line rate, printed alongside
  (10 bits per byte on the wire).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drivers.scanner.parse import Scan
from drivers.scanner.reader import ScannerReader

READ_BYTES = 26  # a 24-character package tag + CRLF (for the line-rate figures)


def tag(n: int) -> str:
    return f"1A4FF0{n:018d}"


def gs1(n: int) -> str:
    """A GS1 DataMatrix read (parsed by biip: the slow path)."""
    return "]d2010950110153000317260430" + f"10L{n:06d}\x1d21S{n:08d}"


KINDS = {"package_tag": tag, "gs1_datamatrix": gs1}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait(event: threading.Event, timeout: float, what: str) -> None:
    if not event.wait(timeout):
        raise SystemExit(f"bench: timed out after {timeout}s waiting for {what}")


def latency(master: int, path: str, n: int, make: Callable[[int], str]) -> dict[str, float | int]:
    arrived = threading.Event()
    seen: list[float] = []

    def on_scan(scan: Scan) -> None:
        seen.append(time.perf_counter())
        arrived.set()

    up = threading.Event()
    reader = ScannerReader("bench", f"serial://{path}", {"debounce_ms": 500}, on_scan,
                           lambda state, _: up.set() if state == "up" else None)
    samples = []
    with reader:
        wait(up, 5, "the reader to open the pty")
        for i in range(n + 20):
            arrived.clear()
            sent = time.perf_counter()
            os.write(master, f"{make(i)}\r\n".encode())
            wait(arrived, 5, f"scan {i}")
            if i >= 20:  # warm-up: imports, first allocations
                samples.append((seen[-1] - sent) * 1000)
    return {"scans": n, "p50_ms": round(statistics.median(samples), 3),
            "p99_ms": round(percentile(samples, 0.99), 3), "max_ms": round(max(samples), 3),
            "mean_ms": round(statistics.fmean(samples), 3)}


def flood(master: int, path: str, n: int,
          make: Callable[[int], str]) -> dict[str, float | int | bool]:
    codes: list[str] = []
    done = threading.Event()
    up = threading.Event()

    def on_scan(scan: Scan) -> None:
        codes.append(scan.code)
        if len(codes) == n:
            done.set()

    reader = ScannerReader("bench", f"serial://{path}", {"debounce_ms": 500}, on_scan,
                           lambda state, _: up.set() if state == "up" else None)
    payload = [f"{make(100_000 + i)}\r\n".encode() for i in range(n)]
    with reader:
        wait(up, 5, "the reader to open the pty")
        start = time.perf_counter()
        for i in range(0, n, 64):  # 64 reads per write(): a burst, as from a busy UART buffer
            os.write(master, b"".join(payload[i:i + 64]))
        wait(done, 120, f"{n} scans")
        elapsed = time.perf_counter() - start
    expected = [make(100_000 + i).removeprefix("]d2") for i in range(n)]
    return {"scans": n, "delivered": len(codes), "lost": n - len(codes),
            "in_order": codes == expected, "seconds": round(elapsed, 3),
            "scans_per_s": round(n / elapsed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scans", type=int, default=1000)
    parser.add_argument("--flood", type=int, default=20000)
    args = parser.parse_args()

    master, slave = os.openpty()
    path = os.ttyname(slave)
    try:
        lat = {kind: latency(master, path, args.scans, make) for kind, make in KINDS.items()}
        fl = {kind: flood(master, path, args.flood, make) for kind, make in KINDS.items()}
    finally:
        os.close(master)
        os.close(slave)
    line_rate = {f"{baud}": round(baud / 10 / READ_BYTES, 1) for baud in (9600, 115200)}
    print(json.dumps({
        "bench": "scanner",
        "path": "pty -> pyserial -> framing -> parse (biip) -> debounce -> on_scan",
        "python": platform.python_version(),
        "latency": {**lat, "goal_p99_ms": 10,
                    "ok": all(v["p99_ms"] < 10 for v in lat.values())},
        "flood": fl,
        "line_rate_scans_per_s_by_baud": line_rate,
    }, indent=2))


if __name__ == "__main__":
    main()
