"""``edge-agent hq report --date YYYY-MM-DD``: did every store's events of that day arrive?

The day is each site's local day: 00:00 to 24:00 in the time zone of its
``[[hq.sites]]`` entry (UTC for a site that is not registered), so a Denver
store's Monday and a Spokane store's Monday are different UTC windows.
Rows are grouped by state (the two-letter ``state`` of the entry; ``""`` for
unregistered sites, listed last). Every registered site has a row, also one
that stored nothing that day (``kinds: []``): that is the store to call.

The JSON keeps CONTRACT 8's report shape (``{"sites": [{"site", "kinds":
[...]}]}``) and adds, per site, ``state``, ``name``, ``registered``,
``timezone`` and the UTC ``window``; and ``states``: the site ids per state.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

from agent.envelope import iso_ms
from hq.config import HqReceiverConfig
from hq.store import Store


def parse_date(text: str) -> dt.date:
    """``YYYY-MM-DD``; ``ValueError`` otherwise."""
    try:
        if len(text) != 10:
            raise ValueError
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--date {text[:40]!r}: must be a day as YYYY-MM-DD, e.g. 2026-11-22") \
            from None


def local_day(day: dt.date, timezone: str) -> tuple[str, str]:
    """The UTC window [start, end) of ``day`` in ``timezone`` (23 or 25 h on DST days)."""
    zone = ZoneInfo(timezone)
    start = dt.datetime.combine(day, dt.time(), zone)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), zone)
    return iso_ms(start.timestamp()), iso_ms(end.timestamp())


def day_report(cfg: HqReceiverConfig, store: Store, day: dt.date, now: float) -> dict[str, Any]:
    registered = {s.id: s for s in cfg.hq.sites}
    seen = [s["site"] for s in store.report(now=now)["sites"]]
    sites = list(registered) + sorted(set(seen) - set(registered))
    rows = []
    for site in sites:
        entry = registered.get(site)
        timezone = entry.timezone if entry else "UTC"
        start, end = local_day(day, timezone)
        found = store.report(site=site, since=start, until=end, now=now)["sites"]
        rows.append({
            "site": site,
            "name": (entry.name if entry else "") or site,
            "state": entry.state if entry else "",
            "license_number": entry.license_number if entry else "",
            "registered": entry is not None,
            "timezone": timezone,
            "window": [start, end],
            "kinds": found[0]["kinds"] if found else [],
        })
    # By state (unregistered last), then registration order within a state.
    order = {site: i for i, site in enumerate(sites)}
    rows.sort(key=lambda r: (r["state"] == "", r["state"], order[r["site"]]))
    states: dict[str, list[str]] = {}
    for row in rows:
        states.setdefault(row["state"], []).append(row["site"])
    return {"date": day.isoformat(), "sites": rows,
            "states": [{"state": s, "sites": ids} for s, ids in states.items()],
            "generated_at": iso_ms(now), "since": None}


def format_day_report(report: dict[str, Any], table: Any) -> str:
    """Per state, a heading and the usual table of that state's sites."""
    parts = [f"sales and events of {report['date']} (each site's local day)"]
    by_site = {r["site"]: r for r in report["sites"]}
    for group in report["states"]:
        rows = [by_site[s] for s in group["sites"]]
        parts.append("")
        parts.append(f"== {group['state'] or 'not registered'} ==")
        parts.append(table({"sites": [r for r in rows if r["kinds"]], "since": None}))
        quiet = [r["site"] for r in rows if not r["kinds"]]
        if quiet:
            parts.append("nothing stored that day: " + ", ".join(quiet))
    return "\n".join(parts)
