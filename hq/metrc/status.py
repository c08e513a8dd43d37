"""``hq metrc status`` as data (pure): per site, what Metrc has, what waits, what failed.

CONTRACT 9's shape, ``{"sites": [{"site", "license_number", "reported", "pending",
"overdue", "failed": [...]}]}``, plus HQ's extras per site: ``at_hq`` (sales and
plant events HQ holds), ``skipped`` (nothing to report), ``reported_late``, and
``overdue_events`` (the oldest few, for a person).

``pending`` and ``overdue`` do not overlap: a row not reported whose deadline
has passed is ``overdue`` (whether it waits or failed); ``pending`` are the
rest still on their way. A failed row is listed under ``failed`` too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from agent.config import HqSiteConfig
from agent.envelope import iso_ms
from hq.metrc.reports import Report, ReportStore

OVERDUE_LISTED = 20


def summarize(reports: Iterable[Report], sites: Sequence[HqSiteConfig], now: float, *,
              only_site: str | None = None) -> dict[str, Any]:
    registered = {s.id: s for s in sites}
    rows: dict[str, dict[str, Any]] = {}

    def row(site: str) -> dict[str, Any]:
        if site not in rows:
            entry = registered.get(site)
            rows[site] = {"site": site,
                          "license_number": entry.license_number if entry else "",
                          "state": entry.state if entry else "",
                          "at_hq": 0, "reported": 0, "pending": 0, "overdue": 0,
                          "skipped": 0, "reported_late": 0, "failed": [],
                          "overdue_events": []}
        return rows[site]

    for entry in sites:
        if entry.license_number and only_site in (None, entry.id):
            row(entry.id)
    for r in reports:
        out = row(r.site)
        out["at_hq"] += 1
        if r.state == "reported":
            out["reported"] += 1
            if r.reported_at is not None and r.reported_at > r.deadline:
                out["reported_late"] += 1
            continue
        if r.state == "skipped":
            out["skipped"] += 1
            continue
        late = now > r.deadline
        if late:
            out["overdue"] += 1
            if len(out["overdue_events"]) < OVERDUE_LISTED:
                out["overdue_events"].append({"event_id": r.event_id, "kind": r.kind,
                                              "receipt_number": r.number,
                                              "deadline": iso_ms(r.deadline)})
        elif r.state == "pending":
            out["pending"] += 1
        if r.state == "failed":
            out["failed"].append({
                "event_id": r.event_id, "kind": r.kind, "receipt_number": r.number,
                "error": r.error, "attempts": r.attempts,
                "since": iso_ms(r.failed_since) if r.failed_since is not None else None})
    return {"sites": [rows[s] for s in sorted(rows)], "generated_at": iso_ms(now)}


def healthy(summary: dict[str, Any]) -> bool:
    """Exit 0 of ``hq metrc status``: nothing failed and nothing overdue."""
    return all(not s["failed"] and not s["overdue"] for s in summary["sites"])


def format_summary(summary: dict[str, Any]) -> str:
    if not summary["sites"]:
        return "no sales or plant events for Metrc (and no site with a license_number)"
    header = ("SITE", "LICENSE", "AT HQ", "REPORTED", "PENDING", "FAILED", "OVERDUE")
    table = [header] + [
        (s["site"], s["license_number"] or "-", str(s["at_hq"]), str(s["reported"]),
         str(s["pending"]), str(len(s["failed"])), str(s["overdue"]))
        for s in summary["sites"]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in table]
    for s in summary["sites"]:
        for f in s["failed"]:
            lines.append(f"  failed {s['site']} {f['kind']} {f['receipt_number'] or '-'} "
                         f"(event {f['event_id']}, {f['attempts']} attempt(s), since "
                         f"{f['since']}): {f['error']}")
        for o in s["overdue_events"]:
            lines.append(f"  overdue {s['site']} {o['kind']} {o['receipt_number'] or '-'} "
                         f"(event {o['event_id']}, due {o['deadline']})")
    return "\n".join(lines)


def by_day(store: ReportStore, sites: Sequence[HqSiteConfig], now: float, days: int,
           site: str | None = None) -> list[dict[str, Any]]:
    """The HQ page's rows: one per (site, local day) over the last ``days`` days, newest
    day first, each with :func:`summarize`'s counts and failures."""
    zones = {s.id: s.timezone for s in sites}
    groups: dict[tuple[str, str], list[Report]] = {}
    oldest = (datetime.fromtimestamp(now, ZoneInfo("UTC")) - timedelta(days=days + 1)
              ).date().isoformat()
    for r in store.reports(site=site, since_day=oldest):
        groups.setdefault((r.site, r.local_day), []).append(r)
    out = []
    for (s, day), rows in groups.items():
        today = datetime.fromtimestamp(now, ZoneInfo(zones.get(s, "UTC"))).date()
        if day < (today - timedelta(days=days - 1)).isoformat():
            continue
        (row,) = summarize(rows, [], now)["sites"]
        out.append({**row, "day": day, "license_number": next(
            (e.license_number for e in sites if e.id == s), "")})
    return sorted(out, key=lambda r: (r["day"], r["site"]), reverse=True)
