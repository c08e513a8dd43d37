"""``edge-agent hq report``: did every site's events arrive?

Per site and kind: distinct events stored, the seq range, gaps (and since when
each is missing), ranges the agent declared lost, ranges skipped over an
agent's ``floor`` (acked by an earlier store; not a gap), duplicates dropped,
conflicts (one seq under two ids: a replaced box, a wiped outbox, a restored
backup or a forgery), rejected messages, unproven claims, and the age of the
newest event. ``--json`` prints CONTRACT 8's shape (plus extras, see
:meth:`hq.store.SqliteStore.report`); otherwise a table for humans.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from hq.backends import open_store
from hq.config import HqReceiverConfig
from hq.store import StoreError, parse_time

MAX_GAPS_SHOWN = 3


def format_age(seconds: float | None) -> str:
    """``42s``, ``7m``, ``3h``, ``2d``: how old the newest event is."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _ranges(ranges: list[list[int]]) -> str:
    return ", ".join(_span(a, b) for a, b in ranges) or "-"


def _gaps(details: list[dict[str, Any]]) -> str:
    if not details:
        return "-"
    shown = [f"{_span(d['from'], d['to'])} (since {d['since']})"
             for d in details[:MAX_GAPS_SHOWN]]
    more = len(details) - MAX_GAPS_SHOWN
    return ", ".join(shown) + (f", +{more} more" if more > 0 else "")


def format_report(report: dict[str, Any]) -> str:
    """The report as an aligned table, one row per (site, kind)."""
    header = ("SITE", "KIND", "RECEIVED", "SEQS", "ACKED", "GAPS", "LOST", "SKIPPED", "DUPS",
              "CONFLICTS", "REJECTED", "UNPROVEN", "NEWEST")
    rows: list[tuple[str, ...]] = []
    for site in report["sites"]:
        for k in site["kinds"]:
            rows.append((
                site["site"] or "?", k["kind"] or "?", str(k["received"]),
                f"{k['first_seq']}..{k['last_seq']}" if k["first_seq"] is not None else "-",
                str(k.get("acked_upto", "-")), _gaps(k.get("gap_details", [])),
                _ranges(k.get("lost", [])), _ranges(k.get("skipped", [])), str(k["duplicates"]),
                str(k.get("conflicts", 0)), str(k.get("rejected", 0)),
                str(k.get("unproven_claims", 0)), format_age(k.get("newest_age_s")),
            ))
    if not rows:
        since = f" since {report['since']}" if report.get("since") else ""
        return f"no events stored{since}"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    problems = sum(1 for s in report["sites"] for k in s["kinds"] if k["gaps"] or k.get("lost"))
    anomalies = sum(1 for s in report["sites"] for k in s["kinds"] if _anomalous(k))
    lines.append("")
    lines.append(f"{problems} site/kind pair(s) with gaps or lost events" if problems
                 else "no gaps")
    if anomalies:
        lines.append(f"{anomalies} site/kind pair(s) with conflicts, rejected messages or "
                     "unproven claims: see 'edge-agent hq report --json' and README "
                     "'Durability'")
    return "\n".join(lines)


def _anomalous(kind: dict[str, Any]) -> bool:
    return bool(kind.get("conflicts") or kind.get("rejected") or kind.get("unproven_claims"))


def has_gaps(report: dict[str, Any]) -> bool:
    """True when any kind has a gap or a declared-lost range."""
    return any(k["gaps"] or k.get("lost") for s in report["sites"] for k in s["kinds"])


def has_problems(report: dict[str, Any]) -> bool:
    """A gap or lost range, or a conflict, a rejected message or an unproven claim:
    each needs a person, so the daily check must not pass silently."""
    return has_gaps(report) or any(_anomalous(k) for s in report["sites"] for k in s["kinds"])


def report_main(cfg: HqReceiverConfig, site: str | None, since: str | None, as_json: bool,
                *, out: TextIO | None = None, err: TextIO | None = None,
                now: float | None = None, date: str | None = None) -> int:
    """Print the report; the exit status of ``edge-agent hq report``.

    0: every (site, kind) is complete between its first and last seq, with no
       conflicts, rejected messages or unproven claims.
    1: some (site, kind) has a gap, or a range its agent declared lost (those
       events will never arrive: the daily check must not pass silently), or
       a conflict, a rejected message or an unproven claim.
    2: the store cannot be opened (missing, not an HQ store, unreadable), or
       ``--since`` is not an ISO date/time, or ``--date`` not YYYY-MM-DD; the
       message says which.

    ``date``: each site's local day, grouped by state (hq/day_report.py).
    """
    from hq import day_report as days

    out = out or sys.stdout
    err = err or sys.stderr
    day = None
    if date and since:
        print("--date and --since: give one of them", file=err)
        return 2
    if date:
        try:
            day = days.parse_date(date)
        except ValueError as exc:
            print(exc, file=err)
            return 2
    if since:
        try:
            parse_time(since)
        except ValueError:
            print(f"--since {since!r}: not an ISO 8601 date or time "
                  "(e.g. 2026-11-22 or 2026-11-22T06:00:00-07:00)", file=err)
            return 2
    try:
        store = open_store(cfg.hq.store, create=False)
    except StoreError as exc:
        print(f"{exc}", file=err)
        return 2
    try:
        now = time.time() if now is None else now
        if day is not None:
            report = days.day_report(cfg, store, day, now)
            if site is not None:
                report["sites"] = [r for r in report["sites"] if r["site"] == site]
        else:
            report = store.report(site=site, since=since, now=now)
    except StoreError as exc:
        print(f"{exc}", file=err)
        return 2
    finally:
        store.close()
    if as_json:
        print(json.dumps(report, indent=2), file=out)
    elif day is not None:
        print(days.format_day_report(report, format_report), file=out)
        print(f"(generated {report['generated_at']})", file=out)
    else:
        print(format_report(report), file=out)
        print(f"(generated {report['generated_at']})", file=out)
    return 1 if has_problems(report) else 0
