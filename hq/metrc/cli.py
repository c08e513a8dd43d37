"""``edge-agent hq metrc status`` and ``edge-agent hq metrc retry`` (CONTRACT 9).

``status``: exit 0 when nothing failed and nothing is overdue, 1 otherwise, 2
when the store cannot be read or an option is wrong.

``retry (--event ID | --site ID --failed)``: failed events back to the queue
(after the cause was fixed); the running forwarder reports them. With
``--wait S`` it waits up to S seconds for their outcome: exit 0 when every one
is reported, 1 when one failed again (its message printed) or none matched,
3 when they are still pending at the end of the wait.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import TextIO

from agent.config import SITE_ID_RE
from hq.backends import open_report_store, open_store
from hq.config import HqReceiverConfig
from hq.metrc.status import format_summary, healthy, summarize
from hq.store import StoreError

DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
WAIT_POLL_S = 0.2


def _open(cfg: HqReceiverConfig):  # type: ignore[no-untyped-def]
    open_store(cfg.hq.store, create=False).close()   # exists and is an HQ store
    return open_report_store(cfg.hq.store)


def status_main(cfg: HqReceiverConfig, site: str | None, date: str | None, as_json: bool, *,
                out: TextIO | None = None, err: TextIO | None = None,
                now: float | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    if site is not None and not SITE_ID_RE.match(site):
        print(f"--site {site[:70]!r}: must match [a-z0-9-]{{1,64}}", file=err)
        return 2
    if date is not None and not DATE_RE.match(date):
        print(f"--date {date[:40]!r}: must be YYYY-MM-DD (the site's local day)", file=err)
        return 2
    try:
        store = _open(cfg)
        try:
            reports = store.reports(site=site, day=date)
        finally:
            store.close()
    except StoreError as exc:
        print(exc, file=err)
        return 2
    summary = summarize(reports, cfg.hq.sites, time.time() if now is None else now,
                        only_site=site)
    if date is not None:
        summary["date"] = date
    print(json.dumps(summary, indent=2) if as_json else format_summary(summary), file=out)
    return 0 if healthy(summary) else 1


def retry_main(cfg: HqReceiverConfig, event: str | None, site: str | None, failed: bool,
               wait_s: float = 0.0, *, out: TextIO | None = None,
               err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    if event is None and (site is None or not failed):
        print("give --event ID, or --site ID --failed", file=err)
        return 2
    if site is not None and not SITE_ID_RE.match(site):
        print(f"--site {site[:70]!r}: must match [a-z0-9-]{{1,64}}", file=err)
        return 2
    try:
        store = _open(cfg)
    except StoreError as exc:
        print(exc, file=err)
        return 2
    try:
        ids = store.requeue(time.time(), event_id=event, site=site)
        if not ids:
            what = f"event {event}" if event else f"site {site}"
            print(f"nothing to retry: {what} has no failed Metrc report", file=err)
            return 1
        print(f"re-queued {len(ids)} event(s) for Metrc: {', '.join(ids[:20])}"
              f"{' ...' if len(ids) > 20 else ''}", file=out)
        if wait_s <= 0:
            return 0
        deadline = time.monotonic() + wait_s
        while True:
            rows = store.get(ids)
            if all(r.state != "pending" for r in rows):
                break
            if time.monotonic() > deadline:
                pending = sum(r.state == "pending" for r in rows)
                print(f"{pending} of {len(ids)} still pending after {wait_s:g}s (is "
                      "'edge-agent hq' running with [metrc] enabled?)", file=err)
                return 3
            time.sleep(WAIT_POLL_S)
        bad = [r for r in rows if r.state == "failed"]
        for r in rows:
            print(f"{r.event_id} {r.kind} {r.number or '-'}: {r.state}"
                  f"{': ' + (r.error or '') if r.state == 'failed' else ''}", file=out)
        return 1 if bad else 0
    except StoreError as exc:
        print(exc, file=err)
        return 2
    finally:
        store.close()
