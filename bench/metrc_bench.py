"""Metrc forwarder throughput against the Metrc-shaped test server; prints one JSON object.

The forwarder (4 workers, batches of 10, the real SQLite store and httpx client)
reports N stored sales of two facilities to tests/metrc_server.py answering every
call in 150 ms and limiting each (key, licence) to ``--server-rate`` calls/s
(429 + Retry-After beyond). Measured in the same run:

- ``reported_per_s``: receipts reported per second, first claim to last report;
- ``pacing_limit_per_s``: what the pacing allows, ``min(facilities x
  calls_per_s_per_facility, calls_per_s_per_key) x batch_size``, and the same
  limit measured by running the pacer alone (no HTTP) for as many calls;
- ``ratio``: reported / measured pacing limit (1.0: the pacing is the only limit).

Usage: python bench/metrc_bench.py [--sales N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.envelope import iso_ms
from agent.testing.localsite import sample_sale
from hq.config import HqReceiverConfig
from hq.metrc.client import Pacer
from hq.metrc.forwarder import Forwarder
from hq.metrc.reports import SqliteReportStore
from hq.store import SqliteStore
from tests.metrc_server import MetrcServer

FACILITIES = [("co-denver-01", "402R-00001"), ("co-boulder-02", "402R-00002")]
LATENCY_S = 0.150
PER_FACILITY = 5.0
PER_KEY = 10.0
BATCH = 10


def pacer_alone(calls: int) -> float:
    """Calls/s the pacer lets through for the two facilities, no HTTP at all."""
    pacer = Pacer(PER_FACILITY, PER_KEY)
    started = time.monotonic()
    for i in range(calls):
        pacer.acquire(FACILITIES[i % len(FACILITIES)][1])
    return calls / (time.monotonic() - started)


def run(sales: int, server_rate: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="metrc-bench-") as tmp, \
            MetrcServer(latency_s=LATENCY_S, rate_per_s=server_rate) as server:
        root = Path(tmp)
        (root / "v.key").write_text(server.vendor_key)
        (root / "u.key").write_text(server.user_key)
        cfg = HqReceiverConfig(
            hq={"store": f"sqlite:///{root}/hq.db", "sites": [
                {"id": s, "state": "CO", "license_number": lic, "timezone": "America/Denver"}
                for s, lic in FACILITIES]},
            compliance={"report_within_h": 1e6},
            metrc={"enabled": True, "base_url": server.base_url,
                   "vendor_key_file": str(root / "v.key"), "user_key_file": str(root / "u.key"),
                   "batch_size": BATCH, "timeout_s": 5, "lease_s": 30, "workers": 4,
                   "calls_per_s_per_facility": PER_FACILITY, "calls_per_s_per_key": PER_KEY,
                   "poll_interval_s": 0.01, "backoff_min_s": 0.05, "backoff_max_s": 1,
                   "catalog_sync_interval_s": 0})
        events = SqliteStore(str(root / "hq.db"))
        batch = []
        for n in range(1, sales + 1):
            site, lic = FACILITIES[n % len(FACILITIES)]
            sale = sample_sale(n)
            server.add_packages(lic, sale["lines"][0]["package_tag"])
            batch.append({"v": 1, "id": str(uuid.uuid4()), "site": site, "kind": "sale",
                          "seq": n // len(FACILITIES) + 1, "ts": iso_ms(time.time()),
                          "source": "bench", "data": sale})
        events.store_batch(batch)
        store = SqliteReportStore(cfg.hq.store)
        fw = Forwarder(cfg, store=store)
        started = time.monotonic()
        fw.start()
        deadline = started + 600
        while time.monotonic() < deadline:
            counts = store.counts(time.time())
            if sum(row.get("reported", 0) for row in counts.values()) >= sales:
                break
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        fw.stop()
        store.close()
        events.close()
        doubles = sum(1 for n in server.receipts_by_number().values() if n > 1)
        statuses = server.status_counts()
        posts = sum(1 for c in server.calls if c.method == "POST")
    limit_calls = min(len(FACILITIES) * PER_FACILITY, PER_KEY)
    measured_calls = pacer_alone(max(20, int(posts)))
    reported_per_s = sales / elapsed
    return {
        "sales": sales, "facilities": len(FACILITIES), "batch_size": BATCH,
        "server_latency_ms": LATENCY_S * 1000, "server_rate_per_s": server_rate,
        "seconds": round(elapsed, 2),
        "reported_per_s": round(reported_per_s, 1),
        "pacing_limit_per_s": limit_calls * BATCH,
        "pacing_limit_measured_per_s": round(measured_calls * BATCH, 1),
        "ratio": round(reported_per_s / (measured_calls * BATCH), 3),
        "posts": posts, "answers": {str(k): v for k, v in sorted(statuses.items())},
        "receipts_doubled": doubles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sales", type=int, default=2000)
    parser.add_argument("--server-rate", type=float, default=6.0,
                        help="the test server's calls/s per (key, licence) before 429")
    parser.add_argument("--quick", action="store_true", help="300 sales")
    args = parser.parse_args()
    print(json.dumps(run(300 if args.quick else args.sales, args.server_rate), indent=2))


if __name__ == "__main__":
    main()
