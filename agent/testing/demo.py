"""``make demo``: a whole site on this machine, events visibly flowing to HQ.

Starts a private mosquitto on a free loopback port, the HQ receiver and the
daemon, then plays a POS posting sample sales through the API, and prints, once
a second, what the agent holds and what HQ has stored and acknowledged. Ctrl-C
stops everything it started (and nothing else).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from agent.testing.localsite import LocalSite, edge_agent_argv, sample_sale
from drivers.scanner import SIM_KNOWN_TAGS
from hq.command import send_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.testing.demo", description=__doc__)
    parser.add_argument("--dir", default="demo-state", help="where state goes (default: "
                        "./demo-state, wiped at start)")
    parser.add_argument("--duration", type=float, default=0,
                        help="stop after this many seconds (default: run until Ctrl-C)")
    parser.add_argument("--rate", type=float, default=2.0, help="sales per second (default 2)")
    args = parser.parse_args(argv)

    workdir = Path(args.dir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    site = LocalSite(workdir, devices=demo_devices(workdir), rooms=DEMO_ROOMS)
    print(f"starting a private mosquitto, the HQ receiver and edge-agent under {workdir} ...")
    try:
        site.start()
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        site.stop()
        return 1
    assert site.broker is not None
    # HQ's side of the package catalog: the simulated scanner's known tags.
    send_command("127.0.0.1", site.broker.port, f"edge/{site.site_id}", "catalog-put",
                 {"tags": list(SIM_KNOWN_TAGS), "replace": True}, command_id="demo-catalog-seed")
    print(f"  broker      mqtt://127.0.0.1:{site.broker.port} (private, stopped on exit)")
    print(f"  site page   {site.api_url}/   (token: {site.token})")
    for label, command in demo_commands(site.agent_config, site.hq_config):
        print(f"  {label:<11} {command}")
    print(f"  prints      {workdir / 'prints'} (ESC/POS and ZPL bytes, PNG previews)")
    print("posting sample sales as POS 'cli'; Ctrl-C to stop\n")
    started = time.monotonic()
    accepted = 0
    next_print = 0.0
    try:
        for n in itertools.count(1):
            if args.duration and time.monotonic() - started > args.duration:
                break
            sale = demo_sale(n)
            status, body = site.request("POST", "/v1/events/sale", {"data": sale},
                                        headers={"Idempotency-Key": f"demo-{n}"})
            if status == 202:
                accepted += 1
                # Every sale gets its receipt; every fifth package a label.
                site.request("POST", "/v1/print/receipt", {"sale": sale})
                if n % 5 == 1:
                    site.request("POST", "/v1/print/label", demo_label(n))
            else:
                print(f"  sale {n} refused: {status} {body}")
            if time.monotonic() >= next_print:
                next_print = time.monotonic() + 1
                _show(site, accepted)
            time.sleep(1 / args.rate)
        _show(site, accepted)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(site.hq_events("sale")) < accepted:
            time.sleep(0.1)
        _show(site, accepted)
        stored = len(site.hq_events("sale"))
        print(f"\ndone: {accepted} sales accepted, {stored} stored at HQ")
        return 0 if stored >= accepted else 1
    except KeyboardInterrupt:
        print("\nstopping ...")
        return 0
    finally:
        site.stop()


def demo_commands(agent_config: Path, hq_config: Path) -> list[tuple[str, str]]:
    """The commands the demo prints, ready to paste into another shell: this checkout's
    ``edge-agent`` by its full path (it lives in .venv/bin, rarely on PATH), quoted."""
    argv = edge_agent_argv()
    return [("status", shlex.join([*argv, "status", "--config", str(agent_config)])),
            ("HQ report", shlex.join([*argv, "hq", "report", "--config", str(hq_config)]))]


WARNING_RECEIPT = ("There may be health risks associated with the consumption of this product. "
                   "Keep out of the reach of children.")
WARNING_LABEL = ("WARNING: This product contains cannabis. Keep out of the reach of children and "
                 "animals. For use only by adults 21 and older.")

DEMO_ROOMS: list[dict[str, Any]] = [
    {"name": "Flower 2", "stage": "flower", "lights_on": "06:00", "lights_off": "18:00",
     "leaf_temp_offset_c": -2.0, "alarm_delay_s": 300,
     "bands": {"co2_ppm": {"on": [800, 1500], "off": {"high": 1200}}}},
    {"name": "Veg 1", "stage": "veg", "leaf_temp_offset_c": -1.5},
]


def demo_devices(workdir: Path) -> list[dict[str, Any]]:
    """Simulated hardware: printers writing files and PNG previews, a climate per room."""
    prints = workdir / "prints"
    tz = "tz=America/Denver"
    return [
        # Every 2 s a realistic read: known and unknown tags, a Retail ID, a GTIN, a
        # garbled read; every 90 s it "unplugs" for 5 s to show the hot-plug alarm.
        {"id": "counter-1-scanner", "type": "scanner",
         "url": "sim://scanner?interval_ms=2000&seed=7&vanish_every_s=90&vanish_for_s=5"},
        {"id": "counter-1-receipt", "type": "receipt_printer", "url": "sim://receipt",
         "address": ["1600 Champa St", "Denver, CO 80202"], "licence_number": "402R-00123",
         "warning": WARNING_RECEIPT, "drawer_kick": True,
         "preview_dir": str(prints / "receipts")},
        {"id": "packaging-zebra", "type": "label_printer", "url": "sim://label", "width": 4,
         "height": 3, "size_unit": "in", "dpi": 203, "licence_number": "402R-00123",
         "warning": WARNING_LABEL, "preview_dir": str(prints / "labels")},
        {"id": "flower-2-climate", "type": "sensor", "model": "sim", "room": "Flower 2",
         "url": f"sim://climate?seed=1&{tz}", "interval_s": 5},
        {"id": "flower-2-co2", "type": "sensor", "model": "sim", "room": "Flower 2",
         "url": f"sim://climate?seed=2&{tz}&fault=spike&spike_p=0.05&fault_after_s=60",
         "interval_s": 5},
        {"id": "veg-1-climate", "type": "sensor", "model": "sim", "room": "Veg 1",
         "url": f"sim://climate?seed=3&{tz}&lights_on=06:00&lights_off=00:00&day_c=25"
                "&night_c=21&day_rh=62&night_rh=68&co2=900", "interval_s": 5},
    ]


def demo_sale(n: int, now: dt.datetime | None = None) -> dict[str, Any]:
    """Sale ``n`` as the demo's POS rings it up: a real time on every receipt (now, in
    this machine's zone, with its offset)."""
    when = (now or dt.datetime.now()).astimezone()
    return sample_sale(n, sold_at=when.isoformat(timespec="seconds"))


def demo_label(n: int) -> dict[str, Any]:
    sale = sample_sale(n)
    return {"package_tag": sale["lines"][0]["package_tag"], "product": "Blue Dream 3.5g",
            "strain": "Blue Dream", "net_weight": "3.5", "unit": "Grams", "thc_pct": "21.4",
            "cbd_pct": "0.1", "batch": f"B-{n:05d}"}


def _show(site: LocalSite, accepted: int) -> None:
    status, body = site.request("GET", "/v1/status")
    if status != 200:
        print(f"  status: {status} {body}")
        return
    sale = body["outbox"]["kinds"]["sale"]
    up = body["uplink"]
    stored = site.hq_events("sale")
    last = stored[-1]["seq"] if stored else 0
    print(f"  accepted {accepted:5d} | outbox sale depth {sale['depth']:4d} | uplink "
          f"{up.get('state')} acked to seq {up.get('acked_upto', {}).get('sale', 0):5d} | "
          f"HQ stored {len(stored):5d} (last seq {last})")


if __name__ == "__main__":
    sys.exit(main())
