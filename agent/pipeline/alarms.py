"""Climate alarms that outlive a restart: the open ones, kept in a small JSON file.

The room monitors (``drivers/sensor/rooms.py``) hold their alarm state in
memory and start empty. Without a record, a room still out of band after a
restart would be raised at HQ a second time, and one that recovered while the
agent was down would never be cleared. :class:`AlarmBook` is that record; the
climate service passes every edge through it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from drivers.sensor.reading import iso_ms
from drivers.sensor.rooms import AlarmEdge, AlarmRaised, Band, RoomMonitor

log = logging.getLogger(__name__)

ALARMS_FILE = "climate-alarms.json"



class AlarmBook:
    """The climate alarms raised and not yet cleared; the committed ones kept in a file.

    :attr:`open` is what the service has decided (for ``/v1/rooms``);
    the file holds only what the outbox has committed (:meth:`committed`), so
    a kill between the two never hides an alarm from HQ: one not yet committed
    is raised again after the restart. The monitors start empty after a
    restart; an alarm carried over from the previous run is not raised again
    when the monitor re-raises it (it is adopted), and is cleared by
    :meth:`resolve_carried` once its room is seen back inside the band.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.open: dict[str, dict[str, Any]] = {}      # "room/code" -> raised payload
        self.carried: set[str] = set()                 # keys from the previous run
        self._committed: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                self._committed = {k: v for k, v in loaded.items() if isinstance(v, dict)}
            except (OSError, ValueError, AttributeError) as exc:
                log.error("climate: cannot read the open alarms in %s (%s); starting without "
                          "them: an alarm still open may be raised again", path, exc)
            self.open = dict(self._committed)
            self.carried = set(self.open)

    @staticmethod
    def key(room: str, code: str) -> str:
        return f"{room}/{code}"

    def on_edge(self, edge: AlarmEdge) -> dict[str, Any] | None:
        """The payload to send for a monitor's edge, or None when HQ already has it."""
        key = self.key(edge.room, edge.code)
        if isinstance(edge, AlarmRaised):
            if key in self.carried:
                self.carried.discard(key)   # still out of band after the restart: adopt it
                return None
            self.open[key] = edge.payload()
            return self.open[key]
        self.carried.discard(key)
        self.open.pop(key, None)
        return edge.payload()

    def committed(self, payload: dict[str, Any]) -> None:
        """The outbox has this alarm event: record it as open at HQ (or closed)."""
        key = self.key(str(payload.get("room")), str(payload.get("code")))
        if payload.get("state") == "raised":
            self._committed[key] = payload
        elif self._committed.pop(key, None) is None:
            return
        self._save()

    def resolve_carried(self, monitors: Mapping[str, RoomMonitor], now: float
                        ) -> list[dict[str, Any]]:
        """Clear payloads for carried alarms whose room is now back in band."""
        out = []
        for key in sorted(self.carried):
            raised = self.open[key]
            monitor = monitors.get(str(raised.get("room")))
            code, quantity = str(raised.get("code")), str(raised.get("quantity"))
            value: float | None = None
            if monitor is not None:
                value = monitor.room_value(quantity, now, include_suspect=code == "co2_safety")
                if value is None:
                    continue   # nothing fresh yet: keep waiting
                spec = monitor.spec
                if code == "co2_safety":
                    hysteresis: float | None = spec.co2_safety_hysteresis
                else:
                    target = spec.targets.get(quantity)
                    hysteresis = None if target is None else target.hysteresis
                side = raised.get("side")
                if hysteresis is not None and side in ("low", "high"):
                    band = Band(raised.get("low"), raised.get("high"))
                    if not band.cleared(value, side, hysteresis):
                        continue
                    why = f"back in range at {value:.4g}"
                else:
                    why = "no longer monitored"
            else:
                why = "no longer monitored (room not configured)"
            self.carried.discard(key)
            self.open.pop(key)
            out.append({"code": code, "state": "cleared", "severity": "info",
                        "message": f"{raised.get('room')}: {quantity} {why} "
                                   "(alarm raised before the agent restarted)",
                        "room": raised.get("room"), "quantity": quantity,
                        "side": raised.get("side"),
                        "value": None if value is None else round(value, 3),
                        "raised_at": raised.get("raised_at"), "cleared_at": iso_ms(now)})
        return out

    def for_room(self, room: str) -> list[dict[str, Any]]:
        return [a for a in self.open.values() if a.get("room") == room]

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self._committed, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.error("climate: cannot save the open alarms to %s: %s", self.path, exc)
