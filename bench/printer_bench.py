"""Printer benchmarks on loopback; prints one JSON object.

Each figure comes with a baseline measured in the same run on the same machine:

- receipts: sales rendered to ESC/POS bytes per second (layout + python-escpos),
            versus python-escpos writing the same lines with no layout at all;
            PNG previews per second alongside.
- labels:   label render + send latency to the fake ZPL printer on loopback TCP
            (p50/p99/max), and the full job path (status ~HS before, send,
            ~HS until the printer's buffer is empty), versus a bare sendall of
            the same pre-rendered bytes on an open socket, and a bare sendall
            of the label plus one ~HS round trip (the least a confirmed print
            can cost).

Usage: python bench/printer_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from escpos.printer import Dummy  # type: ignore[import-untyped]

from drivers.printer import (
    LabelOptions,
    Printer,
    PrintQueue,
    ReceiptOptions,
    label_png,
    receipt_png,
    render_label,
    render_receipt,
)
from drivers.printer.receipt import Text, layout_receipt
from tests.printer_fakes import (
    LABEL,
    LABEL_OPTIONS,
    RECEIPT_OPTIONS,
    SALE,
    fake_zpl_printer,
)


def _rate(fn: Callable[[int], object], seconds: float) -> float:
    """Calls per second of ``fn(i)`` over about ``seconds``."""
    n = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(20):
            fn(n)
            n += 1
    return n / elapsed


def _pcts(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"n": len(ms), "p50_ms": round(q[49], 3), "p99_ms": round(q[98], 3),
            "max_ms": round(ms[-1], 3)}


def bench_receipts(seconds: float) -> dict[str, Any]:
    options = ReceiptOptions(**RECEIPT_OPTIONS)

    def sale(i: int) -> dict[str, Any]:
        return {**SALE, "receipt_number": f"R-{i:06d}"}

    lines = [b.text for b in layout_receipt(sale(0), options) if isinstance(b, Text)]

    def baseline(i: int) -> None:
        p = Dummy()
        for line in lines:
            p.textln(line)
        p.cut()

    return {
        "rendered_per_s": round(_rate(lambda i: render_receipt(sale(i), options), seconds), 1),
        "baseline_plain_escpos_per_s": round(_rate(baseline, seconds), 1),
        "previews_png_per_s": round(_rate(lambda i: receipt_png(sale(i), options),
                                          seconds / 2), 1),
        "bytes": len(render_receipt(sale(0), options)),
    }


def bench_labels(count: int) -> dict[str, Any]:
    options = LabelOptions(**LABEL_OPTIONS)

    def label(i: int) -> dict[str, Any]:
        return {**LABEL, "batch": f"B-{i:06d}"}

    render_send: list[float] = []
    job: list[float] = []
    bare: list[float] = []
    bare_rtt: list[float] = []
    with fake_zpl_printer() as fake:
        printer = Printer.from_url("bench", "label", fake.url)
        for i in range(count):
            t0 = time.perf_counter()
            printer.send(render_label(label(i), options))
            render_send.append(time.perf_counter() - t0)
        queue = PrintQueue(printer)
        for i in range(count):
            t0 = time.perf_counter()
            ticket = queue.submit(queue.job(render_label(label(i), options)))
            queue.run_due()
            assert ticket.final.result(timeout=0).outcome == "printed"
            job.append(time.perf_counter() - t0)
        printer.close()
        data = render_label(label(0), options)
        with socket.create_connection(("127.0.0.1", fake.port)) as sock:
            for _ in range(count):
                t0 = time.perf_counter()
                sock.sendall(data)
                bare.append(time.perf_counter() - t0)
            for _ in range(count):
                # The least a confirmed print can cost: the label and one ~HS round trip.
                t0 = time.perf_counter()
                sock.sendall(data + b"~HS")
                got = b""
                while got.count(b"\x03") < 3:
                    got += sock.recv(4096)
                bare_rtt.append(time.perf_counter() - t0)
        deadline = time.monotonic() + 10
        while len(fake.printed) < 4 * count and time.monotonic() < deadline:
            time.sleep(0.01)  # bench only: wait for the fake to take the bare sends
        printed = len(fake.printed)
    return {
        "render_send": _pcts(render_send),
        "job_status_send_confirm": _pcts(job),
        "baseline_bare_sendall": _pcts(bare),
        "baseline_bare_send_and_hs_roundtrip": _pcts(bare_rtt),
        "labels_printed_by_fake": printed,
        "expected_printed": 4 * count,
        "zpl_bytes": len(render_label(label(0), options)),
        "preview_png_ms": round(_rate(lambda i: label_png(label(i), options), 1.0) ** -1 * 1000,
                                2),
    }


def bench_agent_labels(count: int) -> dict[str, Any]:
    import asyncio
    import tempfile

    from fastapi.testclient import TestClient

    from agent.config import AgentConfig
    from agent.devices.family import ServiceContext, all_devices
    from agent.devices.printing import PrinterService
    from agent.outbox import Outbox
    from agent.web.api import create_app
    from agent.web.auth import Tokens
    from agent.web.context import ApiContext

    def label(i: int) -> dict[str, Any]:
        return {**LABEL, "batch": f"B-{i:06d}"}

    samples: list[float] = []
    with fake_zpl_printer() as fake, tempfile.TemporaryDirectory() as tmp:
        cfg = AgentConfig(site={"id": "bench"}, outbox={"path": f"{tmp}/outbox"},  # type: ignore[arg-type]
                          api={"advertise": False},
                          devices=[{"id": "zebra", "type": "label_printer", "url": fake.url,
                                    **LABEL_OPTIONS}])
        outbox = Outbox(f"{tmp}/outbox", "bench", max_bytes=1 << 28)
        outbox.open()
        service = PrinterService(cfg)
        ctx = ApiContext(cfg=cfg, outbox=outbox, tokens=Tokens({"bench": "b" * 24}),
                         uplink_snapshot=dict, devices_snapshot=lambda: all_devices([service]),
                         started_at=time.time(), services=[service])
        with TestClient(create_app(ctx)) as client:
            portal = client.portal
            assert portal is not None
            loop = portal.call(asyncio.get_running_loop)
            portal.call(service.start, ServiceContext(cfg, outbox, Path(tmp), loop))
            auth = {"Authorization": "Bearer " + "b" * 24}
            for i in range(count):
                t0 = time.perf_counter()
                r = client.post("/v1/print/label", json=label(i), headers=auth)
                samples.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
            portal.call(service.stop)
        deadline = time.monotonic() + 10
        while outbox.stats()["print"].depth < count and time.monotonic() < deadline:
            time.sleep(0.01)  # bench only: the last events' group commit
        events = outbox.stats()["print"].depth
        outbox.close()
    return {"post_print_label": _pcts(samples), "print_events_committed": events,
            "labels_printed_by_fake": len(fake.printed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (CI smoke)")
    args = parser.parse_args()
    seconds, count = (0.5, 100) if args.quick else (3.0, 1000)
    result = {
        "bench": "printer",
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "receipts": bench_receipts(seconds),
        "labels": bench_labels(count),
        "agent": bench_agent_labels(count // 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
