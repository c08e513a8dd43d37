"""The status snapshot: one dict for ``GET /v1/status``, ``edge-agent status`` and ``P/health``.

It only reads: ``outbox.stats()`` (in-memory counters), the uplink's and the
devices' snapshots. A snapshot source that fails is reported as a reason, never
raised, so status keeps answering while the part it describes is broken.

``state`` is ``"healthy"`` or ``"degraded"``; every degraded reason is a string
starting with a stable code (``uplink_down: ...``) so both people and HQ's
fleet dashboards can read it:

- ``uplink_down``: not connected to a broker for more than ``mqtt.down_grace_s``,
  counted from the first failure of the outage (reconnect attempts do not restart
  it); the reason names the cause (keepalive timeout, refused, TLS, DNS...);
- ``acks_stalled``: events of a kind were sent and HQ's ack has not advanced for
  ``ACK_STALL_FACTOR`` x ``mqtt.ack_timeout_s`` (resends included) while connected;
- ``acks_refused``: acks from HQ for a kind with events waiting were refused;
- ``outbox_full`` / ``disk_full``: the outbox refuses events;
- ``report_deadline``: the oldest unsent sale (or plant event: both are
  state compliance reports) is older than half of ``compliance.report_within_h``;
- ``device_down``: a configured device is down;
- ``alarm``: another open outbox condition (a corrupt file set aside);
- ``snapshot_failed``: a snapshot source raised (a bug; it is logged).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from agent import __version__
from agent.envelope import iso_ms
from agent.kinds import COMPLIANCE_KINDS, NEVER_DROPPED_TEXT
from agent.uplink.protocol import CAUSES

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.outbox import Outbox

log = logging.getLogger(__name__)

# A reconnect after a broker restart or a failover takes a few seconds; only a
# longer outage is worth a degraded state (mqtt.down_grace_s, default 60 s). An ack
# timeout is healed by a resend; two in a row without progress are an outage.
ACK_STALL_FACTOR = 2.0
# Every code a reason may start with (the /metrics edge_status_reasons labels).
REASON_CODES = ("uplink_down", "acks_stalled", "acks_refused", "outbox_full", "disk_full",
                "report_deadline", "device_down", "alarm", "snapshot_failed")
# Device states that mean "not working"; the drivers report "up", "down",
# "degraded" (works with a fault such as paper low) or "disabled".
DEVICE_DOWN_STATES = frozenset({"down", "offline", "error", "fault"})


class StatusSources(Protocol):
    """What the snapshot reads; :class:`agent.web.context.ApiContext` is one."""

    @property
    def cfg(self) -> AgentConfig: ...
    @property
    def outbox(self) -> Outbox: ...
    @property
    def uplink_snapshot(self) -> Callable[[], dict[str, Any]]: ...
    @property
    def devices_snapshot(self) -> Callable[[], list[dict[str, Any]]]: ...
    @property
    def started_at(self) -> float: ...


def _epoch(value: Any) -> float | None:
    """Epoch seconds from a float or an ISO 8601 string (snapshots use either)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _outbox_part(outbox: Outbox, now: float) -> dict[str, Any]:
    kinds: dict[str, Any] = {}
    for kind, st in outbox.stats().items():
        kinds[kind] = {
            "depth": st.depth,
            "bytes": st.bytes,
            "oldest_age_s": None if st.oldest_ts is None else round(max(0.0, now - st.oldest_ts),
                                                                     3),
            "first_seq": st.first_seq,
            "last_seq": st.last_seq,
        }
    part = {
        "state": outbox.state,
        "bytes": outbox.total_bytes,
        "max_bytes": outbox.max_bytes,
        "kinds": kinds,
        "counters": dict(outbox.counters),
    }
    meter = getattr(outbox, "drain", None)
    if meter is not None:
        # Beyond the contract (issue 14): how fast acks empty the backlog and when it
        # will be empty, per kind and in total (agent/outbox/drain.py).
        # Kept apart from the contract's per-kind objects, whose keys stay as they are.
        part["drain"] = meter.progress({kind: k["depth"] for kind, k in kinds.items()})
    return part


def _refused_ack_reasons(uplink: dict[str, Any], kinds: dict[str, Any]) -> list[str]:
    """``acks_refused``: a kind with events waiting whose acks from HQ were refused
    (beyond what was sent, or without valid proof) may not be draining."""
    refused = uplink.get("acks_refused")
    if not isinstance(refused, dict):
        return []
    return [f"acks_refused: {count} {kind} ack(s) from HQ refused (beyond the last seq sent, "
            f"or without valid proof); {kinds[kind].get('depth')} {kind} events wait"
            for kind, count in sorted(refused.items())
            if isinstance(count, int) and count > 0 and (kinds.get(kind) or {}).get("depth")]


def _uplink_reason(uplink: dict[str, Any], started_at: float, now: float,
                   grace_s: float) -> str | None:
    state = uplink.get("state") or "disconnected"
    if state == "connected":
        return None
    since = _epoch(uplink.get("down_since")) or _epoch(uplink.get("since")) or started_at
    down_s = now - since
    if down_s <= grace_s:
        return None
    host = uplink.get("host")
    error = uplink.get("last_error")
    cause = CAUSES.get(str(uplink.get("cause")))
    return (f"uplink_down: not connected to the broker for {down_s:.0f} s"
            f"{f' (cause: {cause})' if cause else ''} "
            f"(state {state}{f', last host {host}' if host else ''}"
            f"{f', last error: {error}' if error else ''}); events wait in the outbox")


def _stalled_ack_reasons(uplink: dict[str, Any], kinds: dict[str, Any],
                         ack_timeout_s: float) -> list[str]:
    """``acks_stalled``: connected, events of a kind sent, and no ack for 2 timeouts."""
    waits = uplink.get("ack_wait_s")
    if uplink.get("state") != "connected" or not isinstance(waits, dict):
        return []   # while down, uplink_down says why nothing is acked
    limit = ACK_STALL_FACTOR * ack_timeout_s
    return [f"acks_stalled: HQ has acknowledged no {kind} event for {wait:.0f} s while "
            f"{kinds[kind].get('depth')} wait (resent after mqtt.ack_timeout_s of "
            f"{ack_timeout_s:g} s, then at doubling intervals); is the HQ receiver "
            f"running and subscribed?"
            for kind, wait in sorted(waits.items())
            if isinstance(wait, int | float) and wait >= limit
            and (kinds.get(kind) or {}).get("depth")]


def _deadline_reasons(kinds: dict[str, Any], report_within_h: float) -> list[str]:
    limit_s = report_within_h * 3600 / 2
    reasons = []
    for kind in COMPLIANCE_KINDS:
        age = (kinds.get(kind) or {}).get("oldest_age_s")
        if age is not None and age > limit_s:
            reasons.append(
                f"report_deadline: the oldest unsent {kind} event is {age / 3600:.1f} h old; "
                f"the state's deadline is {report_within_h:g} h (compliance.report_within_h)")
    return reasons


def _device_reasons(devices: list[dict[str, Any]]) -> list[str]:
    reasons = []
    for device in devices:
        if device.get("enabled") is False:
            continue
        state = str(device.get("state") or "")
        if state in DEVICE_DOWN_STATES:
            fault = device.get("last_fault") or device.get("error")
            reasons.append(f"device_down: {device.get('id', '?')} is {state}"
                           + (f" ({fault})" if fault else ""))
    return reasons


def _call(name: str, fn: Callable[[], Any], default: Any, reasons: list[str]) -> Any:
    try:
        return fn()
    except Exception as exc:  # a broken snapshot must not take status down
        log.exception("status: the %s snapshot failed", name)
        reasons.append(f"snapshot_failed: the {name} snapshot failed ({type(exc).__name__}); "
                       "see the agent log")
        return default


def build_status(src: StatusSources, now: float | None = None) -> dict[str, Any]:
    """The status snapshot (CONTRACT 5 ``GET /v1/status``, CONTRACT 4 ``P/health``)."""
    now = time.time() if now is None else now
    reasons: list[str] = []
    outbox = src.outbox
    uplink = _call("uplink", src.uplink_snapshot, {}, reasons) or {}
    devices = _call("devices", src.devices_snapshot, [], reasons) or []
    outbox_part = _call("outbox", lambda: _outbox_part(outbox, now),
                        {"state": "unknown", "kinds": {}}, reasons)
    alarms = _call("alarms", outbox.status_alarms, [], reasons) or []

    uplink_reason = _uplink_reason(uplink, src.started_at, now, src.cfg.mqtt.down_grace_s)
    if uplink_reason:
        reasons.append(uplink_reason)
    reasons.extend(_stalled_ack_reasons(uplink, outbox_part.get("kinds", {}),
                                        src.cfg.mqtt.ack_timeout_s))
    reasons.extend(_refused_ack_reasons(uplink, outbox_part.get("kinds", {})))
    box_state = outbox_part.get("state")
    if box_state == "full":
        reasons.append(f"outbox_full: {outbox_part.get('bytes')} of {outbox_part.get('max_bytes')}"
                       f" bytes (outbox.max_bytes) unsent; {NEVER_DROPPED_TEXT} events are "
                       "refused until HQ acknowledges the backlog")
    elif box_state == "disk_full":
        reasons.append("disk_full: the disk under the outbox is full; events are refused")
    reasons.extend(_deadline_reasons(outbox_part.get("kinds", {}),
                                     src.cfg.compliance.report_within_h))
    reasons.extend(_device_reasons(devices))
    for alarm in alarms:
        code = alarm.get("code")
        if code in ("outbox_full", "outbox_disk_full", "disk_full") \
                or alarm.get("state") == "cleared":
            continue  # already a reason above, from the outbox state itself
        reasons.append(f"alarm: {alarm.get('message') or code}")

    return {
        "site": src.cfg.site.id,
        "version": __version__,
        "ts": iso_ms(now),
        "uptime_s": round(max(0.0, now - src.started_at), 3),
        "state": "degraded" if reasons else "healthy",
        "reasons": reasons,
        "uplink": uplink,
        "outbox": outbox_part,
        "devices": devices,
        "alarms": alarms,
    }
