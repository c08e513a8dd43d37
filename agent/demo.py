"""``make demo``: a whole site on this machine, events visibly flowing to HQ.

Starts a private mosquitto on a free loopback port, the HQ receiver and the
daemon, then plays a POS posting sample sales through the API, and prints, once
a second, what the agent holds and what HQ has stored and acknowledged. Ctrl-C
stops everything it started (and nothing else).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import time
from pathlib import Path

from agent.localsite import LocalSite, sample_sale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.demo", description=__doc__)
    parser.add_argument("--dir", default="demo-state", help="where state goes (default: "
                        "./demo-state, wiped at start)")
    parser.add_argument("--duration", type=float, default=0,
                        help="stop after this many seconds (default: run until Ctrl-C)")
    parser.add_argument("--rate", type=float, default=2.0, help="sales per second (default 2)")
    args = parser.parse_args(argv)

    workdir = Path(args.dir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    site = LocalSite(workdir)
    print(f"starting a private mosquitto, the HQ receiver and edge-agent under {workdir} ...")
    try:
        site.start()
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        site.stop()
        return 1
    assert site.broker is not None
    print(f"  broker      mqtt://127.0.0.1:{site.broker.port} (private, stopped on exit)")
    print(f"  site page   {site.api_url}/   (token: {site.token})")
    print(f"  status      edge-agent status --config {site.agent_config}")
    print(f"  HQ report   edge-agent hq report --config {site.hq_config}")
    print("posting sample sales as POS 'cli'; Ctrl-C to stop\n")
    started = time.monotonic()
    accepted = 0
    next_print = 0.0
    try:
        for n in itertools.count(1):
            if args.duration and time.monotonic() - started > args.duration:
                break
            status, body = site.request("POST", "/v1/events/sale",
                                        {"data": sample_sale(n)},
                                        headers={"Idempotency-Key": f"demo-{n}"})
            if status == 202:
                accepted += 1
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
