"""The fleet's state at HQ: who is online, what waits, what is broken (CONTRACT 8).

Every receiver subscribes ``P/status`` (retained, QoS 1; the agent's will sets
it offline) with a plain subscription, since a shared one gets no retained
messages, and ``P/health`` (the status snapshot, every ``mqtt.health_interval_s``)
through the share group. This module is the pure part:

- :func:`parse_status` / :func:`parse_health` turn one message into a
  :class:`StatusMessage` / :class:`HealthMessage`, or raise ``ValueError``
  saying what is wrong. Both are hostile input like any event: bounded size
  and depth, every field type-checked, lists cut to a sane length.
- :func:`fleet_rows` joins the registered sites (``[[hq.sites]]``) with the
  stored :class:`SiteState` into CONTRACT 8's ``hq fleet`` rows, with the
  status ``online | offline | silent | never-seen`` computed at ``now``.
- :func:`risk_key` orders the rows for the HQ page: offline first, then the
  oldest unsent sale against the deadline, devices down, open alarms.

The storage is behind :class:`FleetStore` (hq/fleet_store.py has the
SQLite one), so a PostgreSQL store can follow with the same plain SQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from agent.config import SITE_ID_RE, HqSiteConfig
from agent.envelope import iso_ms
from hq.store import KIND_RE, parse_time

MAX_MESSAGE_BYTES = 256 * 1024   # a health snapshot of a big site is ~10 KiB
MAX_DEPTH = 16
MAX_ITEMS = 200                  # devices, alarms, kinds kept per site
MAX_TEXT = 200                   # any string kept
# Device states that mean "not working" (agent/ops/status.py DEVICE_DOWN_STATES).
DEVICE_DOWN_STATES = frozenset({"down", "offline", "error", "fault"})
STATUSES = ("online", "offline", "silent", "never-seen")


@dataclass(frozen=True)
class StatusMessage:
    """``P/status``: ``{"state": "online"|"offline", "ts", "version"}``."""

    site: str
    online: bool
    ts: str          # the agent's ts (iso_ms); the will carries its connect time
    version: str


@dataclass(frozen=True)
class DeviceHealth:
    id: str
    type: str
    state: str
    last_fault: str | None
    faults: int      # the device's fault count since the agent started (printers)


@dataclass(frozen=True)
class HealthMessage:
    """The parts of ``P/health`` (``GET /v1/status``) that HQ keeps."""

    site: str
    ts: str
    version: str
    state: str                       # healthy | degraded
    reasons: tuple[str, ...]
    backlog: dict[str, int]
    oldest_unsent_s: dict[str, float]
    devices: tuple[DeviceHealth, ...]
    alarms: tuple[dict[str, str], ...]   # open ones: code, message, since

    @property
    def devices_down(self) -> list[str]:
        return [d.id for d in self.devices if d.state in DEVICE_DOWN_STATES]


@dataclass(frozen=True)
class SiteState:
    """What the store holds for one site; times are iso_ms text (HQ's clock unless said)."""

    site: str
    online: bool | None = None       # None: no P/status heard yet
    status_ts: str | None = None     # the agent's ts of that status
    status_at: str | None = None     # when HQ got it
    last_seen: str | None = None     # the newest status or health, HQ's clock
    version: str | None = None
    health_at: str | None = None
    health: HealthMessage | None = None


class FleetStore(Protocol):
    """Where the fleet's state lives: the HQ store's database (SQLite now, PostgreSQL next)."""

    def record(self, messages: Sequence[StatusMessage | HealthMessage], now: float) -> None:
        """Apply messages in arrival order, in one transaction."""
        ...

    def states(self) -> dict[str, SiteState]: ...

    def faults(self, site: str, since: float) -> list[dict[str, Any]]:
        """``[{"device", "hour", "faults"}]``: printer faults per device and hour since then."""
        ...

    def close(self) -> None: ...


# -- parsing ---------------------------------------------------------------------------


def _load(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(payload)} bytes is over {MAX_MESSAGE_BYTES}")
    try:
        value = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    _check_depth(value)
    return value


def _check_depth(root: Any) -> None:
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _text(value: Any, name: str, *, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string")
    return value[:MAX_TEXT]


def _ts(value: Any, name: str = "ts") -> str:
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be an ISO 8601 string")
    try:
        return iso_ms(parse_time(value).timestamp())
    except (ValueError, OverflowError):
        raise ValueError(f"field {name!r} is not an ISO 8601 time: {value[:40]!r}") from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if number == number and abs(number) < 1e15 else None  # not NaN, sane


def topic_site(prefix: str, topic: str, leaf: str) -> str | None:
    """The site of ``{prefix}/{site}/{leaf}``, else None."""
    head = prefix + "/"
    if not topic.startswith(head) or not topic.endswith("/" + leaf):
        return None
    site = topic[len(head):-len(leaf) - 1]
    return site if SITE_ID_RE.match(site) else None


def parse_status(site: str, payload: bytes) -> StatusMessage:
    body = _load(payload)
    state = body.get("state")
    if state not in ("online", "offline"):
        raise ValueError(f"field 'state' must be 'online' or 'offline', got {state!r:.40}")
    return StatusMessage(site, state == "online", _ts(body.get("ts")),
                         _text(body.get("version"), "version"))


def parse_health(site: str, payload: bytes) -> HealthMessage:
    body = _load(payload)
    claimed = body.get("site")
    if claimed is not None and claimed != site:
        raise ValueError(f"field 'site' {str(claimed)[:64]!r} does not match the topic's {site}")
    outbox = body.get("outbox") or {}
    kinds = outbox.get("kinds") if isinstance(outbox, dict) else None
    backlog: dict[str, int] = {}
    oldest: dict[str, float] = {}
    if isinstance(kinds, dict):
        for kind, entry in list(kinds.items())[:MAX_ITEMS]:
            if not KIND_RE.match(kind) or not isinstance(entry, dict):
                continue
            depth = _number(entry.get("depth"))
            if depth is not None:
                backlog[kind] = max(0, int(depth))
            age = _number(entry.get("oldest_age_s"))
            if age is not None:
                oldest[kind] = round(max(0.0, age), 3)
    devices = []
    raw_devices = body.get("devices")
    for entry in raw_devices[:MAX_ITEMS] if isinstance(raw_devices, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        if entry.get("discovered") or entry.get("enabled") is False:
            continue  # a printer seen on mDNS, or switched off: nothing to watch
        counts = entry.get("faults")
        total = 0
        if isinstance(counts, dict):
            total = int(sum(n for n in (_number(v) for v in counts.values()) if n and n > 0))
        fault = entry.get("last_fault")
        devices.append(DeviceHealth(
            entry["id"][:MAX_TEXT], _text(entry.get("type"), "type") if isinstance(
                entry.get("type"), str) else "", str(entry.get("state") or "")[:40],
            fault[:MAX_TEXT] if isinstance(fault, str) else None, total))
    alarms = []
    raw_alarms = body.get("alarms")
    for entry in raw_alarms[:MAX_ITEMS] if isinstance(raw_alarms, list) else []:
        if not isinstance(entry, dict) or entry.get("state") == "cleared":
            continue
        alarms.append({k: str(entry.get(k) or "")[:MAX_TEXT]
                       for k in ("code", "message", "since", "state")})
    reasons = body.get("reasons")
    return HealthMessage(
        site, _ts(body.get("ts")), _text(body.get("version"), "version"),
        str(body.get("state") or "")[:40],
        tuple(str(r)[:MAX_TEXT] for r in (reasons if isinstance(reasons, list) else [])
              [:MAX_ITEMS]),
        backlog, oldest, tuple(devices), tuple(alarms))


# -- the state -------------------------------------------------------------------------


def apply(state: SiteState | None, message: StatusMessage | HealthMessage,
          now: float) -> SiteState:
    """The site's state after one message arrived at ``now`` (pure)."""
    at = iso_ms(now)
    current = state or SiteState(message.site)
    if isinstance(message, StatusMessage):
        # Receivers all get every status, and may store them in any order: a
        # status older than the one stored is stale. The will carries the same
        # ts as the online status of its connection, so "offline" wins a tie.
        if current.status_ts is not None and message.ts < current.status_ts:
            return replace(current, last_seen=max(current.last_seen or "", at))
        return replace(current, online=message.online, status_ts=message.ts, status_at=at,
                       last_seen=max(current.last_seen or "", at),
                       version=message.version or current.version)
    return replace(current, health_at=at, health=message,
                   last_seen=max(current.last_seen or "", at),
                   version=message.version or current.version,
                   # A health message is proof of life: a site whose retained
                   # status went missing (a broker without persistence) is online.
                   online=True if current.online is None else current.online)


def health_to_json(health: HealthMessage) -> str:
    return json.dumps({
        "ts": health.ts, "version": health.version, "state": health.state,
        "reasons": list(health.reasons), "backlog": health.backlog,
        "oldest_unsent_s": health.oldest_unsent_s,
        "devices": [d.__dict__ for d in health.devices], "alarms": list(health.alarms)},
        separators=(",", ":"))


def health_from_json(site: str, text: str) -> HealthMessage:
    raw = json.loads(text)
    return HealthMessage(site, raw["ts"], raw["version"], raw["state"], tuple(raw["reasons"]),
                         dict(raw["backlog"]), dict(raw["oldest_unsent_s"]),
                         tuple(DeviceHealth(**d) for d in raw["devices"]),
                         tuple(raw["alarms"]))


@dataclass(frozen=True)
class FleetPolicy:
    """When a site counts as silent, and the sale deadline the page measures against."""

    silent_after_s: float = 90.0
    report_within_h: float = 24.0


def site_status(state: SiteState | None, now: float, policy: FleetPolicy) -> str:
    """``online | offline | silent | never-seen`` at ``now``."""
    if state is None or (state.online is None and state.health_at is None):
        return "never-seen"
    if state.online is False:
        return "offline"
    heard = [t for t in (state.health_at, state.status_at) if t]
    newest = max(parse_time(t).timestamp() for t in heard)
    return "silent" if now - newest > policy.silent_after_s else "online"


def fleet_rows(registered: Iterable[HqSiteConfig], states: Mapping[str, SiteState],
               now: float, policy: FleetPolicy) -> list[dict[str, Any]]:
    """CONTRACT 8's ``hq fleet`` rows: registered sites first (config order), then the
    sites heard of but not registered (by id), each with ``registered``."""
    rows = []
    seen: set[str] = set()
    for entry in registered:
        seen.add(entry.id)
        rows.append(_row(entry.id, entry, states.get(entry.id), now, policy))
    for site in sorted(set(states) - seen):
        rows.append(_row(site, None, states[site], now, policy))
    return rows


def _row(site: str, entry: HqSiteConfig | None, state: SiteState | None, now: float,
         policy: FleetPolicy) -> dict[str, Any]:
    health = state.health if state else None
    oldest = dict(health.oldest_unsent_s) if health else {}
    # The snapshot's ages were true when it was sent; what still waits has aged since.
    if health is not None and state is not None and state.health_at:
        waited = max(0.0, now - parse_time(state.health_at).timestamp())
        oldest = {k: round(v + waited, 3) for k, v in oldest.items()}
    return {
        "site": site,
        "name": (entry.name if entry else "") or site,
        "state": entry.state if entry else "",
        "license_number": entry.license_number if entry else "",
        "timezone": entry.timezone if entry else "UTC",
        "registered": entry is not None,
        "status": site_status(state, now, policy),
        "last_seen": state.last_seen if state else None,
        "version": state.version if state else None,
        "health": health.state if health else None,
        "reasons": list(health.reasons) if health else [],
        "backlog": dict(health.backlog) if health else {},
        "oldest_unsent_s": oldest,
        "devices_down": health.devices_down if health else [],
        "alarms": list(health.alarms) if health else [],
    }


_STATUS_RISK = {"offline": 0, "never-seen": 1, "silent": 2, "online": 3}


def deadline_share(row: Mapping[str, Any], report_within_h: float) -> float:
    """The oldest unsent sale (or plant event) as a share of the deadline (1.0 = overdue)."""
    ages = [row["oldest_unsent_s"].get(k) for k in ("sale", "plant")]
    worst = max((a for a in ages if a is not None), default=0.0)
    return float(worst) / (report_within_h * 3600)


def risk_key(row: Mapping[str, Any], report_within_h: float) -> tuple[Any, ...]:
    """Sort key, most at risk first: offline, then the oldest unsent sale against the
    deadline, then devices down, then open alarms; the site id breaks ties."""
    return (_STATUS_RISK.get(row["status"], 4), -deadline_share(row, report_within_h),
            -len(row["devices_down"]), -len(row["alarms"]), row["site"])


def by_risk(rows: Sequence[dict[str, Any]], report_within_h: float) -> list[dict[str, Any]]:
    out = [dict(r, deadline_share=round(deadline_share(r, report_within_h), 4)) for r in rows]
    return sorted(out, key=lambda r: risk_key(r, report_within_h))
